//! The client's messages, one by one: batches, the extended protocol, `Sync`.

use super::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering;

impl Dialect {
    /// Decides what goes upstream for the client's message `tag` with `body` (`whole` is the
    /// message with its header), appending it to `out`.
    ///
    /// The messages of an extended-protocol batch are held until its `Sync` (or a `Flush`), so
    /// that what the relay adds for a write (a savepoint, or a `BEGIN`) goes before the whole
    /// batch: a simple `Query` in the middle would drop the batch's unnamed statement, and
    /// would be ignored after an error in it. A batch or a multi-statement `Query` that opens,
    /// ends or writes in a transaction block goes one statement at a time ([`Piece`]).
    pub(crate) fn on_message(&mut self, tag: u8, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        if self.discard_to_sync {
            match tag {
                b'S' => {
                    self.discard_to_sync = false;
                    out.push(whole, Some(Plan::Pass));
                    self.end_of_implicit_transaction();
                }
                b'X' => out.push(whole, None),
                _ => {}
            }
            return;
        }
        self.follow_server();
        match tag {
            b'P' | b'B' | b'E' | b'C' | b'D' => {
                self.raw.extend_from_slice(whole);
                if self.raw.len() > HELD_LIMIT && !self.commit_held {
                    self.decide_raw(out);
                    self.release_held(out);
                } else if self.raw.len() > COMMIT_HELD_LIMIT {
                    tracing::warn!(
                        "emulator: a client sent more than {COMMIT_HELD_LIMIT} bytes after a \
                         COMMIT's Execute without a Sync; closing the session"
                    );
                    out.close = true;
                }
            }
            b'S' if self.copy_tail && self.raw.is_empty() => {
                self.copy_tail = false;
                self.copy_batch = false;
                out.push(whole, Some(Plan::CopySync));
            }
            b'S' => {
                let raw = std::mem::take(&mut self.raw);
                self.commit_held = false;
                self.on_batch(raw, whole.to_vec(), out);
            }
            // COPY data, then its end: the copy's Sync follows.
            b'c' | b'f' => {
                self.copy_tail = self.copy_batch;
                out.push(whole, None);
            }
            b'H' => {
                self.decide_raw(out);
                self.release_held(out);
                if let Some(refusal) = &self.skipping
                    && !self.refusal_sent
                    && !self.batch.released
                {
                    // PostgreSQL sends an error at once; the client may wait for it.
                    out.push(&raise_query(refusal), Some(Plan::AllButReady));
                    self.refusal_sent = true;
                }
                out.push(whole, None);
            }
            b'Q' => {
                self.decide_raw(out);
                self.release_held(out);
                if self.commit_held {
                    return self.unsupported_after_commit("a Query", out);
                }
                self.on_query(body, whole, None, out);
            }
            // A FunctionCall is answered up to its own ReadyForQuery.
            b'F' => {
                self.decide_raw(out);
                self.release_held(out);
                if self.commit_held {
                    return self.unsupported_after_commit("a FunctionCall", out);
                }
                out.push(whole, Some(Plan::Pass));
            }
            _ => {
                // (Terminate drops a COMMIT whose answer the client will never read: nothing
                // is acknowledged.)
                self.decide_raw(out);
                self.release_held(out);
                out.push(whole, None);
            }
        }
    }

    /// A client followed a `COMMIT`'s `Execute` with a message that needs the answers before
    /// it without a `Sync`: the relay cannot validate that `COMMIT` and keep the order, so it
    /// closes the session (loudly) rather than let the `COMMIT` skip its validation.
    fn unsupported_after_commit(&mut self, what: &str, out: &mut Outgoing) {
        tracing::error!(
            what,
            "emulator: a COMMIT's Execute was followed by this before any Sync; the relay \
             validates a COMMIT at its Sync and closes the session instead of letting it pass \
             unvalidated"
        );
        out.close = true;
    }

    /// Decides the extended-protocol messages received so far (a `Flush`, or too many held),
    /// unless they execute a statement that commits: then the whole batch waits for its
    /// `Sync`, where every `COMMIT` is decided ([`Dialect::commit_point`]), with what goes
    /// before it (a write's savepoint) and the validation between whole batches.
    pub(super) fn decide_raw(&mut self, out: &mut Outgoing) {
        let raw = std::mem::take(&mut self.raw);
        if self.commit_held || self.commits(&raw) {
            self.raw = raw;
            self.commit_held = true;
            return;
        }
        self.early = true;
        for (tag, body, whole) in messages(&raw) {
            self.on_extended(tag, body, whole, out);
        }
        self.early = false;
    }

    /// Whether `raw` executes a statement that commits.
    pub(super) fn commits(&mut self, raw: &[u8]) -> bool {
        self.executed_kinds(raw)
            .iter()
            .any(|(_, kind, _)| *kind == Kind::Commit)
    }

    pub(super) fn on_extended(&mut self, tag: u8, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        if self.skipping.is_some() {
            return;
        }
        match tag {
            b'P' => self.on_parse(body, whole, out),
            b'B' => self.on_bind(body, whole, out),
            b'E' => self.on_execute(body, whole, out),
            b'C' => {
                if let Some((&kind, name)) = body.split_first() {
                    let name = String::from_utf8_lossy(name.strip_suffix(&[0]).unwrap_or(name));
                    match kind {
                        b'S' => {
                            self.statements.remove(name.as_ref());
                        }
                        _ => {
                            self.portals.remove(name.as_ref());
                        }
                    }
                }
                self.hold(whole, out);
            }
            _ => self.hold(whole, out),
        }
    }

    /// The kinds of the statements a batch's `Execute`s run, with where each `Execute` ends.
    pub(super) fn executed_kinds(&mut self, raw: &[u8]) -> Vec<(usize, Kind, bool)> {
        let mut parsed: HashMap<String, (Kind, bool)> = HashMap::new();
        let mut portals: HashMap<String, String> = HashMap::new();
        let mut executes = Vec::new();
        let mut at = 0;
        for (tag, body, whole) in messages(raw) {
            at += whole.len();
            let mut fields = body.split(|b| *b == 0);
            let mut field =
                || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
            match tag {
                b'P' => {
                    let (name, text) = (field(), field());
                    let classified = self.classified(&text);
                    let kind = match classified.statements.as_slice() {
                        [one] => (one.kind, one.copy_in),
                        _ => (Kind::Other, false),
                    };
                    parsed.insert(name, kind);
                }
                b'B' => {
                    let (portal, statement) = (field(), field());
                    portals.insert(portal, statement);
                }
                b'E' => {
                    let portal = field();
                    let statement = portals.get(&portal).cloned().unwrap_or_else(|| {
                        self.portals
                            .get(&portal)
                            .map(|p| p.statement.clone())
                            .unwrap_or_default()
                    });
                    let (kind, copy_in) = parsed.get(&statement).copied().unwrap_or_else(|| {
                        self.statements
                            .get(&statement)
                            .map_or((Kind::Other, false), |p| (p.kind, p.copy_in))
                    });
                    executes.push((at, kind, copy_in));
                }
                _ => {}
            }
        }
        executes
    }

    /// The end of an extended-protocol batch (`raw` and the client's `Sync`): sent as it is,
    /// or one `Execute` at a time when it opens, ends or writes in a transaction block.
    pub(super) fn on_batch(&mut self, raw: Vec<u8>, sync: Vec<u8>, out: &mut Outgoing) {
        if self.skipping.is_none() && self.in_block && self.batch.released && self.commits(&raw) {
            // Part of the batch went upstream at an earlier Flush and its COMMIT waited here: a
            // Sync of the relay's ends that part first (its ReadyForQuery hidden), so that the
            // COMMIT's validation runs between whole batches; after an error in that part,
            // the rest is skipped as PostgreSQL would ([`Dialect::on_reply`]).
            out.push(&message(b'S', b""), None);
            out.push_planned(Planned {
                report: true,
                ..Planned::new(Plan::AllButReady)
            });
            self.awaiting.resume = true;
            self.resume = Some((raw, sync));
            return;
        }
        let executes = self.executed_kinds(&raw);
        let transaction = executes
            .iter()
            .any(|(_, kind, _)| matches!(kind, Kind::Begin | Kind::Commit | Kind::Rollback));
        let writes = executes.iter().any(|(_, kind, _)| *kind == Kind::Dml);
        let copy = executes.iter().any(|(_, _, copy_in)| *copy_in);
        if executes.len() < 2 || copy || !(transaction || (self.in_block && writes)) {
            let piece = Piece::Batch {
                messages: raw,
                sync,
            };
            return self.start_piece(piece, None, out);
        }
        let mut start = 0;
        let cuts: Vec<usize> = executes[..executes.len() - 1].iter().map(|e| e.0).collect();
        for cut in cuts {
            self.pieces.push_back(Piece::Batch {
                messages: raw[start..cut].to_vec(),
                sync: message(b'S', b""),
            });
            start = cut;
        }
        self.pieces.push_back(Piece::Batch {
            messages: raw[start..].to_vec(),
            sync,
        });
        self.next_piece(out);
    }

    /// Sends the next piece of a split request.
    pub(super) fn next_piece(&mut self, out: &mut Outgoing) {
        if let Some(piece) = self.pieces.pop_front() {
            let intermediate = !self.pieces.is_empty();
            self.start_piece(piece, Some(intermediate), out);
        }
    }

    /// A piece (or a whole request, `intermediate` `None`): a `COMMIT` in a block waits for
    /// its validation; anything else goes.
    pub(super) fn start_piece(
        &mut self,
        piece: Piece,
        intermediate: Option<bool>,
        out: &mut Outgoing,
    ) {
        let commits = match &piece {
            Piece::Query(text) => matches!(self.classified(text).statements.as_slice(),
                [one] if one.kind == Kind::Commit),
            Piece::Batch { messages, .. } => matches!(
                self.executed_kinds(messages).as_slice(),
                [(_, Kind::Commit, _)]
            ),
            Piece::Refusal { .. } => false,
        };
        // (A batch being skipped to its Sync after a refusal executes nothing.)
        if commits && self.skipping.is_none() && self.commit_point(&piece, intermediate, out) {
            return;
        }
        self.run_piece(piece, intermediate, out);
        // A license the piece did not use does not outlive it.
        self.validated = false;
    }

    pub(super) fn run_piece(
        &mut self,
        piece: Piece,
        intermediate: Option<bool>,
        out: &mut Outgoing,
    ) {
        match piece {
            Piece::Query(text) => {
                let mut whole = text.into_bytes();
                whole.push(0);
                let whole = message(b'Q', &whole);
                self.on_query(&whole[5..], &whole, intermediate, out);
            }
            Piece::Batch {
                messages: raw,
                sync,
            } => {
                for (tag, body, whole) in messages(&raw) {
                    self.on_extended(tag, body, whole, out);
                }
                self.on_sync(&sync, intermediate, out);
            }
            Piece::Refusal { refusal, own_block } => {
                if own_block {
                    out.push(&raise_query(&refusal), Some(Plan::AllButReady));
                    out.push(&query("ROLLBACK"), Some(Plan::OnlyReady));
                } else {
                    out.push(&raise_query(&refusal), Some(Plan::Pass));
                }
                self.end_piece(intermediate, out);
            }
        }
    }

    /// Holds a message of the current extended-protocol batch.
    pub(super) fn hold(&mut self, whole: &[u8], out: &mut Outgoing) {
        self.held.extend_from_slice(whole);
        if self.held.len() > HELD_LIMIT {
            self.release_held(out);
        }
    }

    /// Sends the held messages of the batch on now; nothing can go before them any more.
    pub(super) fn release_held(&mut self, out: &mut Outgoing) {
        if !self.held.is_empty() {
            out.push(&self.held, None);
            self.held.clear();
            self.batch.released = true;
        }
    }

    /// The end of an extended-protocol batch: what goes before it, and the plan of its answer.
    pub(super) fn on_sync(&mut self, whole: &[u8], intermediate: Option<bool>, out: &mut Outgoing) {
        let batch = std::mem::take(&mut self.batch);
        let held = std::mem::take(&mut self.held);
        self.copy_batch = batch.copy_in;
        if let Some(refusal) = self.skipping.take() {
            if std::mem::take(&mut self.refusal_sent) {
                out.push(&held, None);
                out.push(whole, Some(Plan::Pass));
                self.mark_licensed(out);
            } else if held.is_empty() && !batch.released {
                out.push(&raise_query(&refusal), Some(Plan::Pass));
            } else {
                // The messages before the refused one run first, up to a Sync of the relay's
                // (PostgreSQL runs them and stops at the first error); then the refusal. In
                // autocommit they run in a block the relay opens and rolls back, as the
                // batch's implicit transaction would be.
                let own_block = !self.in_block && !batch.released;
                if own_block {
                    out.push(&query("BEGIN"), Some(Plan::Swallow));
                }
                out.push(&held, None);
                out.push(&message(b'S', b""), Some(Plan::Pass));
                self.mark_licensed(out);
                out.mark_piece(true);
                if let Some(last) = out.plans.last_mut() {
                    last.own_block = own_block;
                }
                self.awaiting.piece = Some(true);
                self.awaiting.own_block = own_block;
                self.pieces
                    .push_front(Piece::Refusal { refusal, own_block });
                self.end_of_implicit_transaction();
                return;
            }
        } else {
            let oversize = (self.tx_bytes > TX_SIZE_LIMIT).then_some(self.tx_bytes);
            let write = |guard, autocommit: bool| Plan::Write {
                guard,
                autocommit,
                oversize: oversize.filter(|_| autocommit),
                defer: false,
            };
            let mut replay = None;
            let writes = batch.write.is_some();
            let (prefix, plan) = match batch.write {
                None => match batch.job {
                    Some(tag) => (
                        None,
                        Plan::Job {
                            tag,
                            described: batch.executes == 1,
                        },
                    ),
                    None if batch.ddl => (
                        None,
                        Plan::Ddl {
                            exists_ok: batch.exists_ok,
                        },
                    ),
                    None => (None, Plan::Pass),
                },
                // The relay would wait for the answer while the server waits for the data.
                Some(_) if batch.copy_in => (None, Plan::Pass),
                // Too late, or it would drop the unnamed statement the batch binds.
                Some(_) if batch.released || batch.reuses_unnamed => (None, write(None, false)),
                // A write in a transaction goes after a savepoint, to be undone alone if it
                // loses a conflict (one statement a batch: several writes cannot be told apart).
                Some(w) if w.in_block => match (batch.executes, w.tag) {
                    (1, Some(tag)) => {
                        replay = w.replay;
                        let guarded = Plan::Write {
                            guard: Some(tag),
                            autocommit: false,
                            oversize: None,
                            defer: self.pending_writes(),
                        };
                        (Some(self.savepoint()), guarded)
                    }
                    _ => (None, write(None, false)),
                },
                // Nothing to undo for: within the row limit whatever it does, and small.
                Some(_)
                    if !batch.unbounded
                        && batch.bounded_rows <= ROW_LIMIT
                        && oversize.is_none() =>
                {
                    if batch.key_bounded {
                        self.catalog.key_bounded.fetch_add(1, Ordering::SeqCst);
                    }
                    (None, Plan::Pass)
                }
                Some(_) if !batch.transaction_statement => {
                    (Some(query("BEGIN")), write(None, true))
                }
                Some(_) => (None, write(None, false)),
            };
            if let Some(prefix) = prefix {
                out.push(&prefix, Some(Plan::Swallow));
            }
            let waits = batch.waits && batch.executes == 1 && !batch.released;
            if waits {
                self.wait_for_locks(out);
            }
            out.push(&held, None);
            out.push(whole, Some(plan));
            self.mark_licensed(out);
            if waits {
                self.waited(batch.ddl, out);
            }
            if !self.in_block
                && writes
                && batch.executes == 1
                && !(batch.copy_in || batch.released || batch.transaction_statement)
                && intermediate.is_none()
            {
                let mut request = Vec::new();
                for (tag, body, _) in messages(&held) {
                    let name = body.split(|b| *b == 0).next().unwrap_or_default();
                    if tag == b'P' && !name.is_empty() {
                        let mut close = vec![b'S'];
                        close.extend_from_slice(name);
                        close.push(0);
                        crate::emulator::wire::append_message(&mut request, b'C', &close);
                    }
                }
                request.extend_from_slice(&held);
                request.extend_from_slice(whole);
                self.retry_on_held_row(request, plan, out);
            }
            self.await_write(plan, replay);
        }
        self.end_piece(intermediate, out);
        self.end_of_implicit_transaction();
    }

    pub(super) fn on_parse(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let mut fields = body.splitn(3, |b| *b == 0);
        let (Some(name), Some(text), Some(rest)) = (fields.next(), fields.next(), fields.next())
        else {
            return self.hold(whole, out);
        };
        if name.is_empty() {
            self.batch.parsed_unnamed = true;
        }
        let name = String::from_utf8_lossy(name).into_owned();
        let text = String::from_utf8_lossy(text).into_owned();
        let classified = self.classified(&text);
        let prepared = match classified.statements.as_slice() {
            [one] => match &one.refusal {
                Some(refusal) => {
                    self.skipping = Some(refusal.clone());
                    return;
                }
                None => Prepared {
                    kind: one.kind,
                    write_tag: one.write_tag,
                    tables: classified.tables.clone().into(),
                    written: classified.written.clone().into(),
                    parameter_types: parameter_types(rest).into(),
                    most_rows: one.most_rows,
                    pinned: one.pinned.clone().map(std::sync::Arc::new),
                    copy_in: one.copy_in,
                    job: classified.job,
                    text: classified.upstream_text.as_str().into(),
                    touch: one.touch.as_deref().map(Into::into),
                    waits: one.waits,
                    exists_ok: one.exists_ok,
                },
            },
            // Not one statement PostgreSQL can parse: it answers for itself.
            _ => other(),
        };
        self.statements.insert(name.clone(), prepared);
        let upstream_text = &classified.upstream_text;
        if *upstream_text == text {
            return self.hold(whole, out);
        }
        let mut parse = Vec::with_capacity(body.len());
        parse.extend_from_slice(name.as_bytes());
        parse.push(0);
        parse.extend_from_slice(upstream_text.as_bytes());
        parse.push(0);
        parse.extend_from_slice(rest);
        self.hold(&message(b'P', &parse), out);
    }

    pub(super) fn on_bind(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let mut fields = body.splitn(3, |b| *b == 0);
        if let (Some(portal), Some(statement), Some(rest)) =
            (fields.next(), fields.next(), fields.next())
        {
            if statement.is_empty() && !self.batch.parsed_unnamed {
                self.batch.reuses_unnamed = true;
            }
            let statement = String::from_utf8_lossy(statement).into_owned();
            let values = bound_values(rest).unwrap_or_default();
            // A write stores its values: none may be over DSQL's largest.
            if let Some(prepared) = self.statements.get(&statement)
                && prepared.kind == Kind::Dml
                && let Some(index) = values
                    .iter()
                    .position(|v| v.is_some_and(|v| v.len() > rules::VALUE_LIMIT))
            {
                self.skipping = Some(value_refusal(&statement, prepared, index));
                return;
            }
            let bytes = values.iter().flatten().map(|v| v.len() as u64).sum();
            let replayable = self
                .statements
                .get(&statement)
                .is_some_and(|p| p.kind == Kind::Dml || p.touch.is_some());
            let params = if replayable {
                bind_parameters(rest).map(Into::into)
            } else {
                None
            };
            self.portals.insert(
                String::from_utf8_lossy(portal).into_owned(),
                Portal {
                    statement,
                    bytes,
                    params,
                },
            );
        }
        self.hold(whole, out);
    }

    pub(super) fn on_execute(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let portal = body.split(|b| *b == 0).next().unwrap_or_default();
        let portal = self
            .portals
            .get(String::from_utf8_lossy(portal).as_ref())
            .cloned();
        let bytes = portal.as_ref().map_or(0, |p| p.bytes);
        let prepared = portal
            .as_ref()
            .and_then(|portal| self.statements.get(&portal.statement))
            .cloned()
            .unwrap_or_else(other);
        let ends = matches!(prepared.kind, Kind::Commit | Kind::Rollback);
        if let Some(refusal) = self.take_license(prepared.kind) {
            self.skipping = Some(refusal);
            return;
        }
        if let Some(refusal) = self.too_old().filter(|_| !ends) {
            self.skipping = Some(refusal);
            return;
        }
        if let Some(refusal) = self.schema_check(&prepared.tables) {
            self.skipping = Some(refusal);
            return;
        }
        self.note_written(&prepared.written);
        let mut state = self.transaction();
        match state.apply(prepared.kind) {
            Ok(()) => {
                let unguarded = prepared.write_tag.is_none()
                    || self.early
                    || self.batch.released
                    || self.batch.reuses_unnamed;
                if self.pending_writes()
                    && ((prepared.kind == Kind::Dml && unguarded) || prepared.copy_in)
                {
                    // A write the relay cannot undo alone goes before the pending one it
                    // follows: the transaction cannot commit (see `occ`).
                    self.plans.doomed.store(true, Ordering::SeqCst);
                }
                let replay = |text: &str| {
                    portal
                        .as_ref()
                        .and_then(|p| p.params.as_deref())
                        .map(|params| occ::Replay {
                            request: statement_batch(text, &prepared.parameter_types, params),
                            told: prepared.write_tag.map(str::to_owned),
                        })
                };
                if self.in_block
                    && state.in_block
                    && let Some(touch) = prepared.touch.as_deref()
                    && let Some(mut touch) = replay(touch)
                {
                    touch.told = None;
                    self.replays.push(touch);
                }
                if state.in_block != self.in_block {
                    self.plans.doomed.store(false, Ordering::SeqCst);
                }
                let was_in_block = self.in_block;
                self.set_transaction(state);
                self.note_catalog_change(&[prepared.kind], &prepared.tables, !state.in_block);
                if prepared.kind == Kind::Dml {
                    self.tx_bytes += bytes;
                }
                let batch = &mut self.batch;
                batch.executes += 1;
                batch.copy_in |= prepared.copy_in;
                batch.job = batch.job.or(prepared.job);
                batch.ddl |= prepared.kind == Kind::Ddl;
                batch.exists_ok = batch.exists_ok.or(prepared.exists_ok);
                batch.waits |= prepared.waits;
                // (A parameter the key may be converted to, with its coarser equality: no bound.)
                let pinned = prepared.pinned.as_deref().filter(|_| {
                    !prepared
                        .parameter_types
                        .iter()
                        .any(|t| rules::COARSE_PARAMETER_TYPES.contains(t))
                });
                let bound = (prepared.kind == Kind::Dml)
                    .then(|| self.rows_bound(prepared.most_rows, pinned))
                    .flatten();
                let batch = &mut self.batch;
                if prepared.kind == Kind::Dml {
                    match bound {
                        Some(rows) => batch.bounded_rows += rows,
                        None => batch.unbounded = true,
                    }
                    batch.key_bounded |= bound.is_some() && prepared.most_rows.is_none();
                }
                match prepared.kind {
                    Kind::Dml if batch.write.is_none() => {
                        batch.write = Some(BatchWrite {
                            in_block: state.in_block,
                            tag: prepared.write_tag,
                            replay: if was_in_block {
                                replay(&prepared.text)
                            } else {
                                None
                            },
                        });
                    }
                    Kind::Begin | Kind::Commit | Kind::Rollback => {
                        batch.transaction_statement = true
                    }
                    _ => {}
                }
                self.hold(whole, out);
            }
            Err(refusal) => self.skipping = Some(refusal),
        }
    }
}
