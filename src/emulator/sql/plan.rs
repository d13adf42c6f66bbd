//! What the relay plans for each answer it awaits, and what goes upstream.

use super::*;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// The name of the savepoint the relay puts before each write in a transaction.
pub(super) const SAVEPOINT: &str = "dsql_emulator_occ";

/// How long an upstream statement waits for a row lock before the relay counts the write as a
/// conflict (a startup parameter of every upstream session; `RESET ALL` keeps it).
pub(crate) const LOCK_TIMEOUT: &str = "10ms";

/// How long DDL and `ANALYZE` wait for the table locks they need (on DSQL nothing makes them
/// fail for a lock; here a DDL dooms the open transactions that hold one, see [`occ`]).
pub(crate) const WAIT_LOCK_TIMEOUT: &str = "30s";

/// An extended-protocol batch that runs `text` as a statement of the relay's own, ending with
/// `Sync` (neither the client's unnamed statement nor its named ones change); its answer is
/// swallowed.
pub(super) fn hidden(text: &str) -> Vec<u8> {
    statement_batch(text, &[], &[0, 0, 0, 0])
}

/// What the relay makes of the server's answer to one `Query` or `Sync` it sends upstream (one
/// group of messages ending with `ReadyForQuery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Plan {
    /// The client's own request: the answer goes to the client.
    Pass,
    /// A request the relay added: the whole answer is dropped.
    Swallow,
    /// A request that writes rows. Its row counts are added to the transaction's (DSQL's
    /// 3 000-row limit: the statement that crosses it fails with `54000`); the relay sends
    /// nothing else upstream until its answer is in (see [`Responder`]).
    ///
    /// `guard`: a single write inside a transaction, after a savepoint the relay added: unless
    /// it met a row another transaction holds or changed (`55P03` lock timeout, `40001`
    /// concurrent update): then the error is dropped, the write rolled back to the savepoint,
    /// the transaction doomed, and the client told this tag.
    ///
    /// `autocommit`: a write outside a transaction block, which the relay runs in a
    /// transaction of its own (after a `BEGIN` it added) so that it can still be undone; the
    /// relay ends it with `COMMIT` or, over the row limit, `ROLLBACK`.
    ///
    /// `oversize`: the bytes of an autocommit write over DSQL's 10 MiB transaction size: it
    /// fails at its `COMMIT`.
    ///
    /// `defer`: a guarded write after a pending one in the same transaction: whatever its
    /// outcome it is undone to its savepoint and replayed at `COMMIT` after the pending ones,
    /// so that the transaction's writes apply in statement order (see [`occ`]); the client is
    /// told the tag it answered.
    Write {
        guard: Option<&'static str>,
        autocommit: bool,
        oversize: Option<u64>,
        defer: bool,
    },
    /// The answer but its `ReadyForQuery`.
    AllButReady,
    /// Only the `ReadyForQuery`.
    OnlyReady,
    /// The `COMMIT` the relay sends for an autocommit write: all but its command tag.
    Finish,
    /// Asynchronous DDL, run by the `SELECT` that records its job and returns its `job_id`
    /// row: the client gets the row with the DDL's command tag `tag` instead of `SELECT 1`.
    /// `described`: the request is an extended-protocol batch that executes only that
    /// statement (its `RowDescription` may have come with an earlier `Describe`); otherwise
    /// the tag that follows a `job_id` `RowDescription` is the one replaced.
    Job { tag: &'static str, described: bool },
    /// DDL: passed on, but PostgreSQL's answers to a concurrent change of the same object (a
    /// duplicate in a catalog index, a type that already exists, a wait for the other change's
    /// lock; after `IF NOT EXISTS`, an "already exists") become DSQL's `40001 … (OC001)`:
    /// the later DDL to commit loses. `exists_ok`: the [`rules::name_key`] of the object an
    /// `IF NOT EXISTS` in the request creates.
    Ddl { exists_ok: Option<u64> },
    /// A statement the relay runs at `COMMIT` to validate the transaction (a write that met a
    /// row held by an open transaction, or a locking read): the answer is dropped, its tag or
    /// error reported in the [`Reply`]. `owed`: it is a pending write, which the
    /// [`Responder`] counts as replayed when it answers a tag.
    Replay { owed: bool },
    /// The rollback of a transaction a committer doomed ([`Dialect::release`]): swallowed;
    /// the [`Responder`] notes that nothing of that block may be acknowledged as committed.
    Release,
    /// The `Sync` a client sends after `CopyDone` or `CopyFail` of an extended-protocol
    /// `COPY … FROM STDIN`: the server answers it only when the `COPY` never started (an error
    /// at its `Execute`); otherwise its one `ReadyForQuery` ends the `COPY`'s batch, whose `Sync`
    /// the server ignored in copy mode.
    CopySync,
}

/// A plan as queued: what is done with the answer, and what is done at its `ReadyForQuery`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Planned {
    pub(crate) plan: Plan,
    /// The upstream side waits for this answer: the [`Responder`] sends a [`Reply`] at its
    /// `ReadyForQuery` (writes, replays, the pieces of a request the relay sends one statement
    /// at a time, a `COMMIT`).
    pub(crate) report: bool,
    /// The answer to one piece of a client request the relay split: its `ReadyForQuery` is
    /// the client's only if an error ends the request there.
    pub(crate) intermediate: bool,
    /// The piece runs in a transaction block the relay opened: an error that ends the request
    /// there tells the client it is outside any block (the relay rolls it back).
    pub(crate) own_block: bool,
    /// An autocommit write on its first try: if it meets a row an open transaction holds, its
    /// answer is dropped and the relay runs it again as a committer (see [`occ`]).
    pub(crate) retry: bool,
    /// A write run again: the `CloseComplete`s of the relay's `Close`s are dropped.
    pub(crate) drop_close: bool,
    /// The request carries a `COMMIT` that passed the commit point: the only request whose
    /// `COMMIT` tag may end a transaction block ([`Responder::finish`]).
    pub(crate) commit: bool,
}

impl Planned {
    /// `plan`, reported when it is a write or a replay.
    pub(crate) fn new(plan: Plan) -> Planned {
        Planned {
            plan,
            report: matches!(plan, Plan::Write { .. } | Plan::Replay { .. }),
            intermediate: false,
            own_block: false,
            retry: false,
            drop_close: false,
            commit: false,
        }
    }
}

/// Requests the server-to-client side sends upstream (with their plans) when the answer to a
/// [`Plan::Write`] is in; possibly none: either way the upstream side reads on.
pub(crate) type Requests = Vec<(Vec<u8>, Plan)>;

/// What the [`Responder`] tells the upstream side at the `ReadyForQuery` of a reported plan
/// ([`Planned::report`]).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Reply {
    /// What to send upstream next (the rollback of a write that lost, the end of an
    /// autocommit write's transaction, ...).
    pub(crate) requests: Requests,
    /// An error reached the client in this answer (or since the last reply).
    pub(crate) failed: bool,
    /// The guarded write met a row an open transaction holds: it was rolled back to its
    /// savepoint and the client told its tag; it is replayed at `COMMIT`.
    pub(crate) pending: bool,
    /// A replay's command tag.
    pub(crate) tag: Option<String>,
    /// A replay's error: SQLSTATE.
    pub(crate) error: Option<String>,
    /// The guarded write went through and its savepoint was left open: the relay lets it go
    /// before its next savepoint in the block ([`Dialect::savepoint`]); `COMMIT` and
    /// `ROLLBACK` end it with the block.
    pub(crate) savepoint_kept: bool,
}

/// DSQL's limit on how long a transaction may stay open (`DSQL_SQL_RULES.md` §1, §8).
pub(crate) const TRANSACTION_AGE_LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// DSQL's limit on the rows one transaction writes (`DSQL_SQL_RULES.md` §1, §8).
pub(crate) const ROW_LIMIT: u64 = 3_000;

/// DSQL's limit on the bytes one transaction writes (`DSQL_SQL_RULES.md` §8), checked at
/// `COMMIT`. The relay counts the bytes of the writes' query texts and bound values: data
/// PostgreSQL makes itself (`INSERT … SELECT`, defaults) and index entries are not counted.
pub(crate) const TX_SIZE_LIMIT: u64 = 10 << 20;

/// DSQL's largest protocol message: a bigger one closes the connection without a word.
pub(crate) const MESSAGE_LIMIT: usize = 10 << 20;

pub(super) fn size_limit_exceeded(bytes: u64) -> Refusal {
    Refusal {
        detail: Some(format!(
            "Current transaction size {}mb > 10mb",
            bytes.div_ceil(1 << 20)
        )),
        ..Refusal::new("54000", "transaction size limit 10mb exceeded")
    }
}

pub(super) fn row_limit_exceeded() -> Refusal {
    Refusal::new("54000", "transaction row limit exceeded")
}

/// The relay's plans for the answers it awaits, in the order of the requests, shared by both
/// directions of a session; whether the session's transaction lost a conflict; and the
/// server's transaction status at the last `ReadyForQuery`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Plans {
    pub(super) queue: Arc<Mutex<VecDeque<Planned>>>,
    pub(super) doomed: Arc<AtomicBool>,
    pub(super) status: Arc<std::sync::atomic::AtomicU8>,
}

impl Plans {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Planned>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the plan of a request about to be sent upstream.
    pub(crate) fn push(&self, planned: Planned) {
        self.lock().push_back(planned);
    }

    /// The server's transaction status when every answer is in (`None` while some are
    /// awaited: then it says nothing of what the relay has sent since).
    pub(super) fn settled_status(&self) -> Option<u8> {
        let queue = self.lock();
        let status = self.status.load(Ordering::SeqCst);
        (queue.is_empty() && status != 0).then_some(status)
    }
}

/// What goes upstream for some client messages: the bytes, and a plan for each `Query` or
/// `Sync` among them, in order.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    pub(crate) bytes: Vec<u8>,
    pub(crate) plans: Vec<Planned>,
    /// They end with a reported request ([`Planned::report`]): nothing more goes upstream
    /// until the [`Responder`] has its answer.
    pub(crate) gate: bool,
    /// The client sent a message over [`MESSAGE_LIMIT`], or the relay lost track of the
    /// session: it is closed.
    pub(crate) close: bool,
    /// A `COMMIT` waits for this validation (see [`occ`]); the relay then calls
    /// [`Dialect::after_validation`].
    pub(crate) validate: Option<occ::Validation>,
    /// The reported request commits on its own (DDL): while it waits for a lock, the open
    /// transactions that hold it are doomed.
    pub(crate) committer: bool,
}

impl Outgoing {
    /// Whole messages; `plan` when they end with a `Query` or `Sync`.
    pub(super) fn push(&mut self, bytes: &[u8], plan: Option<Plan>) {
        self.bytes.extend_from_slice(bytes);
        if let Some(plan) = plan {
            self.push_planned(Planned::new(plan));
        }
    }

    pub(super) fn push_planned(&mut self, planned: Planned) {
        self.gate |= planned.report;
        self.plans.push(planned);
    }

    /// Marks the last plan as the answer to a piece of a split request that the relay waits
    /// for (`intermediate`: not the last piece).
    pub(super) fn mark_piece(&mut self, intermediate: bool) {
        if let Some(last) = self.plans.last_mut() {
            last.report = true;
            last.intermediate = intermediate;
            self.gate = true;
        }
    }

    /// Empties it for the next round.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.plans.clear();
        self.gate = false;
        self.close = false;
        self.validate = None;
        self.committer = false;
    }
}
