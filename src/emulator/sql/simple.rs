//! Simple queries, writes that meet held rows, and the transaction state.

use super::*;
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Dialect {
    /// The bytes the open transaction has written so far: those of this request's writes
    /// (`text` for a simple query), after the earlier requests' in a block.
    pub(super) fn count_bytes(&mut self, bytes: u64) {
        if !self.in_block {
            self.tx_bytes = 0;
        }
        self.tx_bytes += bytes;
    }

    pub(super) fn classified(&mut self, text: &str) -> Arc<Classified> {
        self.cache.classified(text)
    }

    /// The most rows a write writes, when its text bounds them (`most_rows`) or its `WHERE`
    /// pins a unique index's columns (`pinned`, [`Catalog::bounds_one_row`]).
    pub(super) fn rows_bound(
        &self,
        most_rows: Option<u64>,
        pinned: Option<&rules::Pinned>,
    ) -> Option<u64> {
        most_rows.or_else(|| {
            pinned
                .filter(|pinned| self.catalog.bounds_one_row(pinned, self.sessions.as_ref()))
                .map(|_| 1)
        })
    }

    /// Whether a multi-statement query goes one statement at a time: when it opens, ends or
    /// writes in a transaction block (the relay validates a `COMMIT` and guards a write alone).
    pub(super) fn split(&self, text: &str, classified: &Classified) -> Option<Vec<String>> {
        let statements = &classified.statements;
        if statements.len() < 2 || statements.iter().any(|s| s.copy_in) {
            return None;
        }
        // (A block opened anywhere in the text: its writes and its COMMIT are the relay's to
        // guard and validate.)
        let opens = statements.iter().any(|s| s.kind == Kind::Begin);
        let transaction = statements
            .iter()
            .any(|s| matches!(s.kind, Kind::Begin | Kind::Commit | Kind::Rollback));
        let writes = statements.iter().any(|s| s.kind == Kind::Dml);
        if !((self.in_block || opens) && (transaction || writes)) {
            return None;
        }
        let pieces = pg_query::split_with_scanner(text).ok()?;
        (pieces.len() == statements.len()).then(|| pieces.into_iter().map(str::to_owned).collect())
    }

    pub(super) fn on_query(
        &mut self,
        body: &[u8],
        whole: &[u8],
        intermediate: Option<bool>,
        out: &mut Outgoing,
    ) {
        let text = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
        let classified = self.classified(&text);
        let refuse = |d: &mut Dialect, refusal: &Refusal, out: &mut Outgoing| {
            d.end_of_implicit_transaction();
            out.push(&raise_query(refusal), Some(Plan::Pass));
            d.end_piece(intermediate, out);
        };
        if let Some(refusal) = classified.statements.iter().find_map(|s| s.refusal.clone()) {
            return refuse(self, &refusal, out);
        }
        let ends_block = matches!(classified.statements.as_slice(),
            [statement] if matches!(statement.kind, Kind::Commit | Kind::Rollback));
        if intermediate.is_none() && ends_block && classified.statements[0].kind == Kind::Commit {
            // A lone COMMIT is validated first.
            let piece = Piece::Query(text.clone());
            if self.commit_point(&piece, None, out) {
                return;
            }
        }
        if let Some(refusal) = self.too_old()
            && !ends_block
        {
            // Only ROLLBACK and (above) COMMIT get through.
            return refuse(self, &refusal, out);
        }
        if let Some(refusal) = self.schema_check(&classified.tables) {
            return refuse(self, &refusal, out);
        }
        // The whole query runs as one implicit transaction unless it opens or is in a block.
        let mut state = self.transaction();
        for statement in &classified.statements {
            if let Err(refusal) = state.apply(statement.kind) {
                return refuse(self, &refusal, out);
            }
        }
        if intermediate.is_none()
            && let Some(pieces) = self.split(&text, &classified)
        {
            self.validated = false;
            let before_begin = classified
                .statements
                .iter()
                .position(|s| s.kind == Kind::Begin)
                .filter(|at| *at > 0 && !self.in_block);
            if let Some(at) = before_begin {
                // PostgreSQL makes the statements before a BEGIN of the same query part of
                // the block it opens: the relay opens it before the first of them (rolled
                // back, and the client told it is in none, should one of them fail).
                out.push(
                    &hidden("BEGIN ISOLATION LEVEL REPEATABLE READ"),
                    Some(Plan::Swallow),
                );
                self.plans.doomed.store(false, Ordering::SeqCst);
                self.set_transaction(Transaction {
                    in_block: true,
                    ..Transaction::default()
                });
                self.own_block_pieces = at;
            }
            self.pieces.extend(pieces.into_iter().map(Piece::Query));
            return self.next_piece(out);
        }
        // The one place a Query that commits goes on: with the license of its commit point
        // (taken before anything of the query is recorded).
        let commits = classified
            .statements
            .iter()
            .find(|s| s.kind == Kind::Commit);
        if let Some(refusal) = self.take_license(commits.map_or(Kind::Other, |s| s.kind)) {
            return refuse(self, &refusal, out);
        }
        if self.in_block
            && state.in_block
            && classified
                .statements
                .iter()
                .any(|s| matches!(s.kind, Kind::Commit | Kind::Rollback))
        {
            // The block ends inside the query and another begins (`ROLLBACK; BEGIN; COPY …`
            // runs whole): nothing of the old one carries over (its pending writes, its
            // number, its age, its DDL); what the query does counts for the new one.
            self.set_transaction(Transaction::default());
            self.pending_ddl = None;
            self.plans.doomed.store(false, Ordering::SeqCst);
            self.set_transaction(Transaction {
                in_block: true,
                ..Transaction::default()
            });
            let now = self.catalog.current();
            for table in &classified.tables {
                self.block_used.entry(table.clone()).or_insert(now);
            }
        }
        // Run whole (a split query's pieces each come here): its writes count for the block
        // it runs in, if any.
        self.note_written(&classified.written);
        let kinds: Vec<Kind> = classified.statements.iter().map(|s| s.kind).collect();
        let ends = !state.in_block;
        if ends && kinds.contains(&Kind::Rollback) && !kinds.contains(&Kind::Ddl) {
            // Rolled back: its DDL never happened.
            self.pending_ddl = None;
        }
        self.note_catalog_change(&kinds, &classified.tables, ends);
        if kinds.contains(&Kind::Dml) {
            self.count_bytes(text.len() as u64);
        }
        let oversize = (self.tx_bytes > TX_SIZE_LIMIT).then_some(self.tx_bytes);
        let write = |guard, autocommit: bool| Plan::Write {
            guard,
            autocommit,
            oversize: oversize.filter(|_| autocommit),
            defer: false,
        };
        let copy_in = classified.statements.iter().any(|s| s.copy_in);
        if copy_in && self.pending_writes() {
            // COPY cannot be undone alone: it goes before the pending write it follows, so the
            // transaction cannot commit (see `occ`).
            self.plans.doomed.store(true, Ordering::SeqCst);
        }
        let mut replay = None;
        let (prefix, plan) = if !kinds.contains(&Kind::Dml) || copy_in {
            // (With `COPY … FROM STDIN` the relay would wait for the answer while the server
            // waits for the data.)
            let ddl = kinds.contains(&Kind::Ddl);
            let exists_ok = classified.statements.iter().find_map(|s| s.exists_ok);
            (
                None,
                if ddl {
                    Plan::Ddl { exists_ok }
                } else {
                    Plan::Pass
                },
            )
        } else if self.in_block {
            // A write in a transaction goes after a savepoint, to be undone alone if it loses
            // a conflict.
            match classified.statements.as_slice() {
                [
                    Statement {
                        write_tag: Some(tag),
                        ..
                    },
                ] => {
                    replay = Some(occ::Replay {
                        request: query(&classified.upstream_text),
                        told: Some((*tag).to_owned()),
                    });
                    let guarded = Plan::Write {
                        guard: Some(*tag),
                        autocommit: false,
                        oversize: None,
                        defer: self.pending_writes(),
                    };
                    (Some(self.savepoint()), guarded)
                }
                _ => {
                    if self.pending_writes() {
                        // A write the relay cannot undo alone goes before the pending one it
                        // follows: the transaction cannot commit (see `occ`).
                        self.plans.doomed.store(true, Ordering::SeqCst);
                    }
                    (None, write(None, false))
                }
            }
        } else if kinds
            .iter()
            .any(|k| matches!(k, Kind::Begin | Kind::Commit | Kind::Rollback))
        {
            (None, write(None, false))
        } else if oversize.is_none()
            && classified
                .statements
                .iter()
                .filter(|s| s.kind == Kind::Dml)
                .try_fold(0, |sum, s| {
                    self.rows_bound(s.most_rows, s.pinned.as_ref())
                        .map(|rows| sum + rows)
                })
                .is_some_and(|rows| rows <= ROW_LIMIT)
        {
            // Nothing to undo for: within the row limit whatever it does, and small.
            if classified
                .statements
                .iter()
                .any(|s| s.kind == Kind::Dml && s.most_rows.is_none())
            {
                self.catalog.key_bounded.fetch_add(1, Ordering::SeqCst);
            }
            (None, Plan::Pass)
        } else {
            // Its own transaction, to be undone if it writes too many rows.
            (Some(query("BEGIN")), write(None, true))
        };
        if state.in_block && self.in_block {
            // A locking read is validated at COMMIT like a write.
            for statement in &classified.statements {
                if let Some(touch) = &statement.touch {
                    self.replays.push(occ::Replay {
                        request: query(touch),
                        told: None,
                    });
                }
            }
        }
        if state.in_block != self.in_block || !state.in_block {
            // A new transaction, or the end of one: nothing lost yet.
            self.plans.doomed.store(false, Ordering::SeqCst);
        }
        self.set_transaction(state);
        self.end_of_implicit_transaction();
        if let Some(prefix) = prefix {
            out.push(&prefix, Some(Plan::Swallow));
        }
        let waits = matches!(classified.statements.as_slice(), [one] if one.waits);
        if waits {
            self.wait_for_locks(out);
        }
        let plan = match classified.job {
            Some(tag) => Plan::Job {
                tag,
                described: false,
            },
            None => plan,
        };
        let request = if classified.upstream_text == text {
            whole.to_vec()
        } else {
            query(&classified.upstream_text)
        };
        out.push(&request, Some(plan));
        self.mark_licensed(out);
        if !state.in_block && kinds == [Kind::Dml] && intermediate.is_none() && !copy_in {
            self.retry_on_held_row(request, plan, out);
        }
        if waits {
            self.waited(kinds.contains(&Kind::Ddl), out);
        }
        self.await_write(plan, replay);
        self.end_piece(intermediate, out);
    }

    /// The answer to the autocommit write just pushed (`request`, with `plan`: as it is, or in
    /// a transaction the relay opened) is held until it is known whether it met a row an open
    /// transaction holds: then it runs again, as the transaction that commits first
    /// ([`Self::run_again`]).
    pub(super) fn retry_on_held_row(&mut self, request: Vec<u8>, plan: Plan, out: &mut Outgoing) {
        let prefix = match plan {
            Plan::Pass => None,
            Plan::Write {
                autocommit: true, ..
            } => Some(query("BEGIN")),
            _ => return,
        };
        if let Some(last) = out.plans.last_mut() {
            last.retry = true;
            last.report = true;
            out.gate = true;
        }
        self.awaiting.retry = true;
        self.retry = Some(Retry {
            prefix,
            request,
            plan,
        });
    }

    /// Runs an autocommit write again after it met a row an open transaction holds: it
    /// commits on its own, so it is the first committer: it waits for the row (the relay dooms
    /// the holder meanwhile, see [`occ`]), then the lock timeout is set back.
    pub(super) fn run_again(&mut self, retry: Retry, out: &mut Outgoing) {
        self.wait_for_locks(out);
        if let Some(prefix) = &retry.prefix {
            out.push(prefix, Some(Plan::Swallow));
        }
        out.bytes.extend_from_slice(&retry.request);
        out.push_planned(Planned {
            report: true,
            drop_close: true,
            ..Planned::new(retry.plan)
        });
        out.committer = true;
        self.awaiting.waits = true;
        self.awaiting.write = matches!(retry.plan, Plan::Write { .. });
    }

    /// The end of a piece of a split request (`intermediate`: not the last), if this is one:
    /// the relay waits for its answer.
    pub(super) fn end_piece(&mut self, intermediate: Option<bool>, out: &mut Outgoing) {
        if let Some(intermediate) = intermediate {
            out.mark_piece(intermediate);
            self.awaiting.piece = Some(intermediate);
            if self.own_block_pieces > 0 {
                // Before the query's own BEGIN, in the block the relay opened for it.
                self.own_block_pieces -= 1;
                if let Some(last) = out.plans.last_mut() {
                    last.own_block = true;
                }
                self.awaiting.own_block = true;
            }
        }
    }

    /// Marks the plan just pushed as the answer to a licensed `COMMIT`, if the request's
    /// statement took the license ([`Dialect::take_license`]).
    pub(super) fn mark_licensed(&mut self, out: &mut Outgoing) {
        if std::mem::take(&mut self.licensed_commit)
            && let Some(last) = out.plans.last_mut()
        {
            last.commit = true;
        }
    }

    /// After a request with `plan`: a write's answer is awaited, with its replay form.
    pub(super) fn await_write(&mut self, plan: Plan, replay: Option<occ::Replay>) {
        if matches!(plan, Plan::Write { .. }) {
            self.awaiting.write = true;
            self.last_write = replay;
        }
    }

    /// Before a statement that waits for table locks (DDL, `ANALYZE`): a lock timeout long
    /// enough to wait, set back when its answer is in ([`Self::waited`], [`Self::on_reply`]).
    pub(super) fn wait_for_locks(&mut self, out: &mut Outgoing) {
        out.push(
            &hidden(&format!("SET lock_timeout = '{WAIT_LOCK_TIMEOUT}'")),
            Some(Plan::Swallow),
        );
    }

    /// After the statement [`Self::wait_for_locks`] prepared for: the relay waits for its
    /// answer (a DDL dooming the open transactions whose locks it waits for), then sets the
    /// lock timeout back.
    pub(super) fn waited(&mut self, ddl: bool, out: &mut Outgoing) {
        out.mark_piece(false);
        self.awaiting.waits = true;
        out.committer = ddl;
    }

    pub(super) fn transaction(&self) -> Transaction {
        Transaction {
            in_block: self.in_block,
            ddl: self.ddl,
            dml: self.dml,
        }
    }

    pub(super) fn set_transaction(&mut self, state: Transaction) {
        if state.in_block != self.in_block {
            self.tx_bytes = 0;
            self.block_used.clear();
            self.block_written.clear();
            self.began = state.in_block.then(std::time::Instant::now);
            self.replays.clear();
            self.last_write = None;
            self.savepoint_kept = false;
            if state.in_block {
                self.block = self.sessions.as_ref().map_or(1, |s| s.next_block());
                self.entry.begin(self.block);
            } else {
                self.block = 0;
                self.entry.end();
            }
        }
        self.in_block = state.in_block;
        self.ddl = state.ddl;
        self.dml = state.dml;
    }

    /// The savepoint before a guarded write (a `Query`), after letting go of the last one
    /// when it is still open ([`Dialect::savepoint_kept`]): one savepoint at most stays open
    /// however many writes the block makes.
    pub(super) fn savepoint(&mut self) -> Vec<u8> {
        if std::mem::take(&mut self.savepoint_kept) {
            query(&format!(
                "RELEASE SAVEPOINT {SAVEPOINT}; SAVEPOINT {SAVEPOINT}"
            ))
        } else {
            query(&format!("SAVEPOINT {SAVEPOINT}"))
        }
    }

    /// `54000` if the open transaction block is older than the age limit.
    pub(super) fn too_old(&self) -> Option<Refusal> {
        let age = self.began?.elapsed();
        (self.in_block && age > self.age_limit).then(|| {
            let limit = self.age_limit.as_secs();
            Refusal {
                detail: Some(format!(
                    "Current transaction age {}s exceeds {limit}s",
                    age.as_secs()
                )),
                ..Refusal::new(
                    "54000",
                    format!("transaction age limit of {limit}s exceeded"),
                )
            }
        })
    }

    /// Outside a block, each `Query` and each `Sync` ends an implicit transaction.
    pub(super) fn end_of_implicit_transaction(&mut self) {
        if !self.in_block {
            self.ddl = false;
            self.dml = false;
            self.tx_bytes = 0;
        }
    }
}
