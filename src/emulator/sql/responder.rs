//! The server-to-client side: answers checked against the plans and rewritten.

use super::*;
use std::sync::atomic::Ordering;

/// The server-to-client side of a session with DSQL's rules: follows the framing of the
/// server's messages and applies the plan of each answer (see [`Plan`]); takes the refusal
/// blocks' `CONTEXT` out of errors; counts the rows each transaction writes; and, at the
/// `ReadyForQuery` of a reported answer ([`Planned::report`]), tells the upstream side what it
/// needs to go on ([`Reply`]: what to send next, the write that met a held row, a replay's
/// outcome). An answer no plan accounts for closes the session with a `FATAL` that says so.
#[derive(Debug)]
pub(crate) struct Responder {
    pub(super) plans: Plans,
    /// Replies for the upstream side, which waits for them after each reported request.
    pub(super) upstream: tokio::sync::mpsc::Sender<Reply>,
    /// The framing of the server's messages.
    pub(super) framer: crate::emulator::wire::Framer,
    /// The current message, header included.
    pub(super) current: Vec<u8>,
    /// The current guarded write met a conflict: `Some(true)` a row an open transaction
    /// holds, `Some(false)` a row a transaction changed and committed since.
    pub(super) lost: Option<bool>,
    /// Rows written in the current transaction.
    pub(super) rows: u64,
    /// The current write crossed the row limit.
    pub(super) over: bool,
    /// The rows now coming are a job's (after its `RowDescription`).
    pub(super) job_rows: bool,
    /// An error reached the client since the last reply (or the last `ReadyForQuery` passed).
    pub(super) failed: bool,
    /// What the next reply carries.
    pub(super) reply: Reply,
    /// The session must close: the relay lost track of it.
    pub(super) closing: bool,
    /// The current answer entered copy-in mode (`CopyInResponse`).
    pub(super) copying: bool,
    /// The answer of an autocommit write on its first try, held until it is known whether
    /// it met a held row ([`Planned::retry`]).
    pub(super) retry_buf: Vec<u8>,
    /// It did.
    pub(super) retry_lost: bool,
    /// The command tag the current write answered.
    pub(super) write_tag: Option<String>,
    /// The commit ledger, kept from the answers alone: pending writes of the open transaction
    /// not replayed yet. A `COMMIT` is never acknowledged while it is not zero (see
    /// [`Responder::finish`]).
    pub(super) owed: u32,
    /// The open transaction lost a conflict (a write met a row changed since its snapshot, or
    /// a committer doomed it): no `COMMIT` of it may be acknowledged.
    pub(super) lost_block: bool,
    /// The answers so far show the session in a transaction block (the last `ReadyForQuery`,
    /// and the `BEGIN`, `COMMIT` and `ROLLBACK` tags since).
    pub(super) answer_in_block: bool,
    /// A client's `ROLLBACK` ended its block in the answer now coming: a `BEGIN` later in the
    /// same answer (`ROLLBACK; BEGIN; COPY …` runs whole) starts a block that owes nothing.
    pub(super) ended_by_client: bool,
}

/// What the client is told instead of a `COMMIT` the relay would have acknowledged although
/// its transaction's pending writes were not replayed: the answer-side invariant of
/// [`Responder::finish`]. It is an emulator defect, said loudly, never a silent loss.
pub(crate) const UNVALIDATED_COMMIT: &str = "the DSQL emulator refused to acknowledge a COMMIT \
     whose transaction still owed pending writes or had lost a conflict (an emulator defect: \
     the transaction's other writes may have committed; please report it with the statements \
     sent)";

impl Responder {
    pub(crate) fn new(plans: Plans, upstream: tokio::sync::mpsc::Sender<Reply>) -> Self {
        Responder {
            plans,
            upstream,
            framer: crate::emulator::wire::Framer::new(usize::MAX),
            current: Vec::new(),
            lost: None,
            rows: 0,
            over: false,
            job_rows: false,
            failed: false,
            reply: Reply::default(),
            closing: false,
            copying: false,
            retry_buf: Vec::new(),
            retry_lost: false,
            write_tag: None,
            owed: 0,
            lost_block: false,
            answer_in_block: false,
            ended_by_client: false,
        }
    }

    /// Appends to `out` what the client should get for the next `data` from the server;
    /// `false` when the session must close (a `FATAL` saying why is in `out`).
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let mut framer = std::mem::replace(&mut self.framer, crate::emulator::wire::Framer::new(0));
        framer.feed(data, |message| {
            if !self.closing {
                std::mem::swap(&mut self.current, message);
                self.finish(out);
            }
        });
        self.framer = framer;
        !self.closing
    }

    /// The relay's plans and the server's answers disagree: nothing later can be trusted.
    pub(super) fn lose_track(&mut self, what: &str, out: &mut Vec<u8>) {
        tracing::error!(
            what,
            "emulator: the relay lost track of a session; closing it"
        );
        out.extend_from_slice(&crate::emulator::wire::fatal(
            "XX000",
            &format!(
                "the DSQL emulator lost track of this session's protocol state ({what}); the \
                 connection is closed"
            ),
            None,
        ));
        self.closing = true;
    }

    /// One whole server message in `self.current`.
    ///
    /// The answer-side invariant: a `COMMIT` command tag is never passed on for a transaction
    /// whose pending writes were not all replayed in it, that lost a conflict, or whose
    /// `COMMIT` did not pass the commit point (its request's plan says so,
    /// [`Planned::commit`]); it becomes an `XX000` error ([`UNVALIDATED_COMMIT`]), logged,
    /// whatever path let it through.
    pub(super) fn finish(&mut self, out: &mut Vec<u8>) {
        let front = self.plans.lock().front().copied();
        if self.current[0] == b'C' {
            self.check_commit(front);
        }
        let tag = self.current[0];
        let ready = tag == b'Z';
        self.copying |= tag == b'G';
        let Some(planned) = front else {
            if ready {
                return self.lose_track("a ReadyForQuery no request accounts for", out);
            }
            // Notices and parameter changes between requests.
            return self.pass(out);
        };
        if planned.drop_close && tag == b'3' {
            return;
        }
        if planned.retry {
            if tag == b'E' && conflict(&self.current[5..]) == Some(true) {
                self.retry_lost = true;
            }
            let mut held = std::mem::take(&mut self.retry_buf);
            self.apply(planned, &mut held);
            if !ready {
                self.retry_buf = held;
            } else if std::mem::take(&mut self.retry_lost) {
                // Run again (the upstream side is told): the client sees only that answer.
                self.reply.pending = true;
                self.failed = false;
            } else {
                out.extend_from_slice(&held);
            }
        } else {
            self.apply(planned, out);
        }
        if ready {
            self.ready(planned, out);
        }
    }

    /// The commit ledger's check of a `CommandComplete` (see [`Responder::finish`]), and the
    /// transaction block as the answers show it.
    fn check_commit(&mut self, planned: Option<Planned>) {
        let body = &self.current[5..];
        let tag = body.strip_suffix(&[0]).unwrap_or(body);
        // (The relay's own `ROLLBACK TO SAVEPOINT`, whose tag is `ROLLBACK` too, its rollback
        // of a doomed block or of its own, and of an autocommit write's transaction are not
        // the client's; client messages released at a `Flush` travel with no plan.)
        let client = !planned.is_some_and(|p| {
            matches!(
                p.plan,
                Plan::Swallow
                    | Plan::Release
                    | Plan::OnlyReady
                    | Plan::Finish
                    | Plan::Replay { .. }
            )
        });
        match tag {
            b"BEGIN" | b"START TRANSACTION" => {
                if std::mem::take(&mut self.ended_by_client) {
                    self.rows = 0;
                    self.owed = 0;
                    self.lost_block = false;
                }
                self.answer_in_block = true;
            }
            b"ROLLBACK" => {
                self.answer_in_block = false;
                self.ended_by_client = client;
            }
            b"COMMIT" => {
                // The relay's own COMMIT of an autocommit write's transaction, and a COMMIT
                // that passed the commit point, may end a block; nothing else may.
                let licensed = planned.is_some_and(|p| p.commit || p.plan == Plan::Finish);
                let unlicensed = self.answer_in_block && !licensed;
                if self.owed > 0 || self.lost_block || unlicensed {
                    tracing::error!(
                        owed = self.owed,
                        lost = self.lost_block,
                        unlicensed,
                        "emulator: a COMMIT reached PostgreSQL without its validation; the \
                         client is told XX000 instead of COMMIT"
                    );
                    let mut error = Vec::new();
                    error_response(&Refusal::new("XX000", UNVALIDATED_COMMIT), &mut error);
                    self.current = error;
                }
                self.answer_in_block = false;
            }
            _ => {}
        }
    }

    /// What `planned` makes of the current message.
    pub(super) fn apply(&mut self, planned: Planned, out: &mut Vec<u8>) {
        let tag = self.current[0];
        let ready = tag == b'Z';
        match planned.plan {
            Plan::Pass | Plan::CopySync => self.pass(out),
            // The relay's own statement: an error other than an aborted block's means its
            // picture of the session is wrong.
            Plan::Swallow if tag == b'E' && field(&self.current[5..], b'C') != b"25P02" => {
                let error = crate::emulator::wire::error_message(&self.current[5..]);
                self.lose_track(&format!("the relay's own statement failed: {error}"), out);
            }
            Plan::Swallow | Plan::Release => {}
            Plan::AllButReady if !ready => self.pass(out),
            Plan::AllButReady => {}
            Plan::OnlyReady if ready => self.pass(out),
            Plan::OnlyReady => {}
            Plan::Finish if tag == b'C' => {}
            Plan::Finish => self.pass(out),
            Plan::Write {
                guard,
                autocommit,
                oversize,
                defer,
            } => self.write(guard, autocommit, oversize, defer, out),
            Plan::Job { tag, described } => self.job(tag, described, out),
            Plan::Ddl { exists_ok }
                if tag == b'E' && catalog_race(&self.current[5..], exists_ok) =>
            {
                error_response(&schema_conflict(), out);
                self.failed = true;
            }
            Plan::Ddl { .. } => self.pass(out),
            Plan::Replay { owed } => match tag {
                b'C' => {
                    let body = &self.current[5..];
                    let tag = body.strip_suffix(&[0]).unwrap_or(body);
                    self.reply.tag = Some(String::from_utf8_lossy(tag).into_owned());
                    if owed {
                        self.owed = self.owed.saturating_sub(1);
                    }
                }
                b'E' => {
                    let code = field(&self.current[5..], b'C');
                    self.reply.error = Some(String::from_utf8_lossy(code).into_owned());
                }
                _ => {}
            },
        }
    }

    /// The `ReadyForQuery` that ends the answer `planned` is for.
    pub(super) fn ready(&mut self, planned: Planned, out: &mut Vec<u8>) {
        {
            let status = self.current.get(5).copied().unwrap_or(b'I');
            self.ended_by_client = false;
            // Outside any transaction now: the next one starts with no rows written and
            // nothing owed.
            if status == b'I' {
                self.rows = 0;
                self.owed = 0;
                self.lost_block = false;
            }
            self.answer_in_block = status != b'I';
            if planned.plan == Plan::Release {
                self.lost_block = true;
            }
            self.plans.status.store(status, Ordering::SeqCst);
            {
                let mut queue = self.plans.lock();
                queue.pop_front();
                // A COPY's batch ends with this ReadyForQuery: the Sync after its CopyDone
                // has none of its own.
                if std::mem::take(&mut self.copying)
                    && queue.front().is_some_and(|p| p.plan == Plan::CopySync)
                {
                    queue.pop_front();
                }
            }
            let passed = out.len() >= 6 && out[out.len() - 6] == b'Z';
            if planned.intermediate && !self.failed && passed {
                // Not the end of the client's request.
                out.truncate(out.len() - 6);
            } else if planned.intermediate && planned.own_block && passed {
                // The relay rolls its own block back: the client is in none.
                let last = out.len() - 1;
                out[last] = b'I';
            }
            if planned.report {
                let mut reply = std::mem::take(&mut self.reply);
                reply.failed = self.failed;
                self.failed = false;
                if self.upstream.try_send(reply).is_err() {
                    self.lose_track("the upstream side does not take replies", out);
                }
            } else if passed {
                self.failed = false;
            }
        }
    }

    /// A message of the answer to asynchronous DDL run by its job's `SELECT` (or to a `SHOW`
    /// the relay answers with a `SELECT`): that `SELECT`'s tag becomes the DDL's (`SHOW`).
    pub(super) fn job(&mut self, tag: &'static str, described: bool, out: &mut Vec<u8>) {
        match self.current[0] {
            b'T' => {
                // One field, `job_id` (or the setting a `SHOW` answers): the job's row follows.
                let body = &self.current[5..];
                let field = |name: &[u8]| body.get(2..2 + name.len()) == Some(name);
                self.job_rows = body.starts_with(&[0, 1])
                    && if tag == "SHOW" {
                        field(b"server_version\0") || field(b"server_version_num\0")
                    } else {
                        field(b"job_id\0")
                    };
                self.pass(out);
            }
            b'C' if (self.job_rows || described) && self.current[5..].starts_with(b"SELECT ") => {
                let mut body = tag.as_bytes().to_vec();
                body.push(0);
                crate::emulator::wire::append_message(out, b'C', &body);
                self.job_rows = false;
            }
            b'Z' => {
                self.job_rows = false;
                self.pass(out);
            }
            _ => self.pass(out),
        }
    }

    /// A message of the answer to a request that writes.
    pub(super) fn write(
        &mut self,
        guard: Option<&'static str>,
        autocommit: bool,
        oversize: Option<u64>,
        defer: bool,
        out: &mut Vec<u8>,
    ) {
        match self.current[0] {
            b'E' if guard.is_some() && conflict(&self.current[5..]).is_some() => {
                self.lost = conflict(&self.current[5..]);
            }
            b'Z' => self.end_of_write(guard, autocommit, oversize, defer, out),
            _ if self.lost.is_some() || self.over => {}
            b'C' => {
                let body = &self.current[5..];
                let tag = body.strip_suffix(&[0]).unwrap_or(body);
                self.write_tag = Some(String::from_utf8_lossy(tag).into_owned());
                let rows = written_rows(&self.current[5..]);
                if self.rows + rows > ROW_LIMIT {
                    // The statement that crosses the limit fails, and so does its transaction.
                    self.over = true;
                } else {
                    self.rows += rows;
                    self.pass(out);
                }
            }
            _ => self.pass(out),
        }
    }

    /// The `ReadyForQuery` that ends the answer to a request that writes: what the client is
    /// told, and what goes upstream next (possibly nothing; the upstream side reads on either
    /// way).
    pub(super) fn end_of_write(
        &mut self,
        guard: Option<&'static str>,
        autocommit: bool,
        oversize: Option<u64>,
        defer: bool,
        out: &mut Vec<u8>,
    ) {
        let status = self.current.get(5).copied().unwrap_or(b'I');
        let written = self.write_tag.take();
        let requests = &mut self.reply.requests;
        // Undone to its savepoint, which goes too (nested savepoints would pile up).
        let undo = || {
            query(&format!(
                "ROLLBACK TO SAVEPOINT {SAVEPOINT}; RELEASE SAVEPOINT {SAVEPOINT}"
            ))
        };
        if self.retry_lost {
            // Run again: the relay's transaction ends unseen.
            if autocommit {
                requests.push((query("ROLLBACK"), Plan::Swallow));
            }
        } else if let (Some(held), Some(told)) = (self.lost, guard) {
            // Undo the write alone, and tell the client it went through: against a row that
            // changed since, the transaction has lost already; against one an open
            // transaction holds, it is replayed at COMMIT.
            requests.push((undo(), Plan::Swallow));
            if held {
                self.reply.pending = true;
                self.owed += 1;
            } else {
                self.plans.doomed.store(true, Ordering::SeqCst);
                self.lost_block = true;
            }
            let mut complete = told.as_bytes().to_vec();
            complete.push(0);
            crate::emulator::wire::append_message(out, b'C', &complete);
            crate::emulator::wire::append_message(out, b'Z', b"T");
        } else if self.over && autocommit {
            error_response(&row_limit_exceeded(), out);
            self.failed = true;
            requests.push((query("ROLLBACK"), Plan::OnlyReady));
        } else if self.over && status == b'T' {
            // PostgreSQL fails the transaction block, as DSQL does.
            requests.push((raise_query(&row_limit_exceeded()), Plan::Pass));
        } else if self.over && status == b'E' {
            error_response(&row_limit_exceeded(), out);
            self.failed = true;
            self.pass(out);
        } else if let (true, Some(bytes), b'T') = (autocommit, oversize, status) {
            // Checked at COMMIT, as DSQL does.
            error_response(&size_limit_exceeded(bytes), out);
            self.failed = true;
            requests.push((query("ROLLBACK"), Plan::OnlyReady));
        } else if autocommit && status == b'T' {
            requests.push((query("COMMIT"), Plan::Finish));
        } else if autocommit {
            requests.push((query("ROLLBACK"), Plan::OnlyReady));
        } else if guard.is_some() && defer && status == b'T' {
            // It went through after a pending write: undone, and replayed after it at COMMIT
            // against the tag it answered (the client has that tag already).
            requests.push((undo(), Plan::Swallow));
            self.reply.pending = true;
            self.reply.tag = written;
            self.owed += 1;
            self.pass(out);
        } else if guard.is_some() && status == b'T' {
            // It went through: its savepoint goes with the next one the relay sets (nested
            // savepoints would pile up) or with the block, not in a round trip of its own.
            self.reply.savepoint_kept = true;
            self.pass(out);
        } else {
            // Over the limit in a block the query itself committed: too late (see the docs).
            self.pass(out);
        }
        self.lost = None;
        self.over = false;
    }

    /// Passes the current message on, without the refusal blocks' `CONTEXT`; PostgreSQL's own
    /// lock timeouts, serialization failures and deadlocks become DSQL's conflict.
    pub(super) fn pass(&mut self, out: &mut Vec<u8>) {
        let message = &self.current;
        if message[0] == b'E' {
            self.failed = true;
        }
        if message[0] == b'E' && conflict(&message[5..]).is_some() {
            error_response(&change_conflict(), out);
            return;
        }
        // The `CONTEXT` of the relay's refusal blocks and of the upstream's `sys` functions
        // (event triggers, `sys.wait_for_job`): DSQL's errors have none.
        let ours = |field: &[u8]| {
            field == &RAISE_CONTEXT[..RAISE_CONTEXT.len() - 1]
                || (field.starts_with(b"W")
                    && field.windows(SYS_FUNCTION.len()).any(|w| w == SYS_FUNCTION))
        };
        let body = &message[5..];
        if message[0] == b'E' && body.split(|b| *b == 0).any(ours) {
            // With the statement the function ran, and where in it the error is.
            let internal = |field: &[u8]| matches!(field.first(), Some(b'p' | b'q'));
            let mut rewritten = Vec::with_capacity(body.len());
            for field in body.split(|b| *b == 0) {
                if !field.is_empty() && !ours(field) && !internal(field) {
                    rewritten.extend_from_slice(field);
                    rewritten.push(0);
                }
            }
            rewritten.push(0);
            crate::emulator::wire::append_message(out, b'E', &rewritten);
            return;
        }
        out.extend_from_slice(message);
    }
}
