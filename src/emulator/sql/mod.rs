//! DSQL's SQL dialect in front of PostgreSQL (`DsqlEmulatorBuilder::sql_rules`).
//!
//! ## Approach
//!
//! The relay reads the client's PostgreSQL v3 messages (not bytes) and follows the server:
//! the transaction state it works with is corrected from each `ReadyForQuery`'s status once
//! every answer is in, and each plan it makes for an answer is checked against that answer (a
//! `ReadyForQuery` no request accounts for, or a statement of the relay's own that fails, closes
//! the session with a `FATAL` that says so, [`Responder`]). Each `Query` and each `Parse` is
//! read with PostgreSQL's own parser (`pg_query`) and checked against DSQL's rules (`rules.rs`:
//! statements and types DSQL refuses, sequence and identity caches, index and `ALTER TABLE`
//! forms, isolation levels, `SET` and `set_config`, savepoints, SQL-level `PREPARE`);
//! `Execute` and every statement of a `Query` are checked against the transaction rules (one
//! DDL per transaction, no DDL with DML). Statements are classified from the parse tree:
//! `BEGIN`, `COMMIT` (`END`, commented) and `ROLLBACK` are distinct kinds wherever they stand.
//! DSQL's `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC … VALIDATE` are recognised with
//! PostgreSQL's scanner and sent on without `ASYNC`. The messages of an extended-protocol
//! batch are held until its `Sync` (or a `Flush`), so that whatever the relay puts before a
//! write (a savepoint, a `BEGIN`) goes before the whole batch: a simple `Query` in the middle
//! of a batch would drop its unnamed statement, and be ignored after an error in it. A batch
//! or a multi-statement `Query` that opens, ends or writes in a transaction block goes one
//! statement at a time ([`Piece`]): each piece's `ReadyForQuery` is dropped unless an error
//! ends the request there, so the client sees one answer, as it would from PostgreSQL.
//!
//! A refusal is answered **by PostgreSQL**, which keeps the protocol and the transaction in
//! step: the refused `Query` is replaced by a `DO` block that raises DSQL's SQLSTATE and
//! message; for the extended protocol the refused `Parse` or `Execute` and everything after it
//! up to `Sync` are dropped (as PostgreSQL skips to `Sync` after an error) and the `Sync` is
//! replaced by that `DO` block. The client sees DSQL's `ErrorResponse` and a `ReadyForQuery`
//! with the right status; inside a transaction block the raise aborts the transaction, so
//! every later statement gets `25P02` until `ROLLBACK`, and `COMMIT` answers `ROLLBACK`, as on
//! DSQL. The `CONTEXT` line PL/pgSQL adds to the error is taken out on the way back.
//!
//! ## Commit-time optimistic concurrency
//!
//! DSQL never makes a writer wait, and the first transaction to commit wins: both writers of
//! a row get their `UPDATE 1` at once, and the later to commit fails at `COMMIT` with
//! `40001 change conflicts with another transaction (OC000)`. How the relay gets that out of
//! PostgreSQL, which makes the second writer wait on the row lock, is in [`occ`]: a write in
//! a block goes after a savepoint with a 10 ms lock timeout ([`LOCK_TIMEOUT`]); one that meets
//! a row an open transaction holds is undone to its savepoint, told its tag and kept pending;
//! one that meets a row changed since its snapshot has lost ([`Plan::Write`]'s `guard`). Every
//! `COMMIT` in a block, whatever its shape, first passes [`Dialect::commit_point`]: the checks
//! that need no server (a lost conflict, `OC001`, size, age), then [`occ::validate`] (replays,
//! dooming the blockers), then the `COMMIT` goes and the relay waits for its answer. A failed
//! `COMMIT` is a `ROLLBACK` followed by the `DO` refusal. An autocommit write that meets a held
//! row runs again as the first committer ([`Planned::retry`]). `SELECT … FOR UPDATE` goes
//! without its locking clause and is validated at `COMMIT` by a statement that locks its rows
//! and writes them unchanged (`rules::locking_read`). DDL and `ANALYZE` wait for table locks
//! ([`WAIT_LOCK_TIMEOUT`]), a DDL dooming the open transactions it waits for; a DDL's answer
//! that shows a concurrent change of the same object becomes `OC001` ([`Plan::Ddl`]).
//! Elsewhere PostgreSQL's own lock timeouts, serialization failures and deadlocks reach the
//! client as DSQL's `OC000`.
//!
//! `OC001`: [`Catalog`] records each committed catalog change (DDL, `GRANT`, `REVOKE`; outside
//! a block when sent, inside one at its `COMMIT`) with the relations it names (`pg_query`'s
//! table list, without schema); a session that had used one of them gets the `DO` refusal
//! `40001 schema has been updated by another transaction (OC001)` on its next statement naming
//! it, once, or at `COMMIT` when the change landed while its transaction was open.
//!
//! ## Transaction limits
//!
//! - Rows (3 000): each request that writes ([`Plan::Write`]) is answered before the relay
//!   sends anything more upstream; the [`Responder`] adds up the row counts of the
//!   transaction's command tags. A write outside a transaction block runs in a transaction the
//!   relay opens (a pipelined `BEGIN`) and ends once its answer is in: `COMMIT`, or
//!   `ROLLBACK` when it crossed the limit; not one whose text bounds its rows within the limit
//!   (`INSERT … VALUES`), nor a request with `COPY … FROM STDIN`, whose answer waits for the
//!   client's data (the relay must not wait for it). Inside a block the statement that crosses
//!   it is answered `54000 transaction row limit exceeded` by a `DO` refusal, which aborts the
//!   block.
//! - Age (300 s, [`TRANSACTION_AGE_LIMIT`], or the builder's): the first statement after it
//!   gets `54000 transaction age limit of 300s exceeded` with DSQL's DETAIL and aborts the
//!   block; a `COMMIT` then fails and ends it.
//! - Size: 1 MiB a value (refused at the statement, named by the parameter's type), 10 MiB a
//!   transaction (its `COMMIT` fails, [`TX_SIZE_LIMIT`]), and a message over
//!   [`MESSAGE_LIMIT`] closes the connection.
//!
//! ## Known deviations
//!
//! - Conflicts (see [`occ`] for how they are decided): a pending write's change is not
//!   visible to its own transaction before `COMMIT`; a doomed transaction's later statements
//!   run on a fresh snapshot without its earlier writes (its `COMMIT` fails either way); a
//!   pending write is told a one-row tag and its `COMMIT` fails if the replay answers another;
//!   a write with `RETURNING`, a locking read over a subquery or a set operation, and several
//!   writes in one autocommit request that meet a held row get `OC000` at the statement;
//!   `FOR KEY SHARE` keeps PostgreSQL's locking; only transactions of the emulator's own
//!   sessions are doomed; a read that waits for a running DDL's lock gets `OC000` after
//!   10 ms. A DDL that PostgreSQL then refuses still counts as a schema change, and a DDL in a
//!   block that dooms others and then rolls back doomed them for nothing. Relation names are
//!   compared without their schema.
//! - Catalog-dependent rules (24 indexes a table, 10 schemas, no primary-key column drop) are
//!   checked by event triggers in the upstream (`bootstrap.sql`), after PostgreSQL has run the
//!   statement, which then fails and is undone; they act in sessions the relay opened with the
//!   rules on ([`RULES_PARAMETER`]). `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC … VALIDATE`
//!   run synchronously, inside `SELECT sys.dsql_emulator_ddl_job(…) AS job_id` (one statement,
//!   so either protocol gets the `job_id` row); that `SELECT`'s tag is replaced by the DDL's
//!   ([`Plan::Job`]).
//! - Sizes: a value over 1 MiB is found among a write's bound values and the string constants
//!   of its text; the 10 MiB of a transaction are the bytes of its writes' texts and bound
//!   values (data PostgreSQL makes itself and index entries are not counted).
//! - Row limit: rows of a write's `RETURNING` reach the client before the `54000`; a query
//!   text that opens and commits its own block (`BEGIN; INSERT …; COMMIT` in one `Query`) is
//!   counted but not stopped; writes inside a `WITH`, and `COPY`, are not counted. An
//!   autocommit write whose text does not bound its rows costs one more round trip to
//!   PostgreSQL (its `COMMIT`), and pipelined requests behind a write wait for its answer. A
//!   batch that binds the unnamed statement of an earlier batch, or was flushed before its
//!   `Sync`, gets no savepoint and, in autocommit, no row limit.
//! - Memory: each server message is held whole while the relay reads it (a very large row
//!   sits in memory until it is passed on).
//! - The transaction rules follow the statements the relay has seen, as it reads them: a
//!   client pipelining statements across a failed one may see a rule applied to a statement
//!   PostgreSQL then skips.
//! - Rules apply when a statement is parsed (`Parse`) and, for the transaction rules, when it
//!   is executed; DSQL may apply some later (at `Bind`).

pub(crate) mod occ;
pub(crate) mod rules;

/// The startup parameter that tells the upstream's event triggers a session has the rules on.
pub(crate) const RULES_PARAMETER: &str = "dsql_emulator.sql_rules";

/// How long preparing the upstream may take (a server that does not answer fails the start).
const PREPARE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Creates what the upstream PostgreSQL needs for the rules (`bootstrap.sql`: `sys.jobs`,
/// `sys.wait_for_job`, the event triggers of the catalog limits), as `admin`, within
/// [`PREPARE_TIMEOUT`]. Blocking; runs on a thread of its own, so it may be called from inside
/// an async runtime.
pub(crate) fn prepare_upstream(url: String) -> Result<(), crate::Error> {
    let failed = |reason: String, source: Option<Box<dyn std::error::Error + Send + Sync>>| {
        crate::Error::Emulator {
            reason: format!(
                "cannot prepare the upstream PostgreSQL for DSQL's SQL rules ({reason}); its \
                 `admin` role must be a superuser, or turn the rules off with sql_rules(false)"
            ),
            source,
        }
    };
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| failed("no runtime".into(), Some(Box::new(e))))?;
        let prepare = async {
            let (client, connection) =
                tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .map_err(|e| failed("cannot connect".into(), Some(Box::new(e))))?;
            let connection = tokio::spawn(connection);
            let outcome = client
                .batch_execute(include_str!("bootstrap.sql"))
                .await
                .map_err(|e| failed("bootstrap.sql failed".into(), Some(Box::new(e))));
            drop(client);
            let _ = connection.await;
            outcome
        };
        runtime
            .block_on(async { tokio::time::timeout(PREPARE_TIMEOUT, prepare).await })
            .map_err(|_| {
                failed(
                    format!("no answer within {} s", PREPARE_TIMEOUT.as_secs()),
                    None,
                )
            })?
    })
    .join()
    .map_err(|_| failed("the thread panicked".into(), None))?
}

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rules::{Classified, Kind, Refusal, Statement};

/// The name of the savepoint the relay puts before each write in a transaction.
const SAVEPOINT: &str = "dsql_emulator_occ";

/// How long an upstream statement waits for a row lock before the relay counts the write as a
/// conflict (a startup parameter of every upstream session; `RESET ALL` keeps it).
pub(crate) const LOCK_TIMEOUT: &str = "10ms";

/// How long DDL and `ANALYZE` wait for the table locks they need (on DSQL nothing makes them
/// fail for a lock; here a DDL dooms the open transactions that hold one, see [`occ`]).
pub(crate) const WAIT_LOCK_TIMEOUT: &str = "30s";

/// An extended-protocol batch that runs `text` as a statement of the relay's own, ending with
/// `Sync` (neither the client's unnamed statement nor its named ones change); its answer is
/// swallowed.
fn hidden(text: &str) -> Vec<u8> {
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
    Write {
        guard: Option<&'static str>,
        autocommit: bool,
        oversize: Option<u64>,
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
    /// lock) become DSQL's `40001 … (OC001)`: the later DDL to commit loses.
    Ddl,
    /// A statement the relay runs at `COMMIT` to validate the transaction (a write that met a
    /// row held by an open transaction, or a locking read): the answer is dropped, its tag or
    /// error reported in the [`Reply`].
    Replay,
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
}

impl Planned {
    /// `plan`, reported when it is a write or a replay.
    pub(crate) fn new(plan: Plan) -> Planned {
        Planned {
            plan,
            report: matches!(plan, Plan::Write { .. } | Plan::Replay),
            intermediate: false,
            own_block: false,
            retry: false,
            drop_close: false,
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

fn size_limit_exceeded(bytes: u64) -> Refusal {
    Refusal {
        detail: Some(format!(
            "Current transaction size {}mb > 10mb",
            bytes.div_ceil(1 << 20)
        )),
        ..Refusal::new("54000", "transaction size limit 10mb exceeded")
    }
}

fn row_limit_exceeded() -> Refusal {
    Refusal::new("54000", "transaction row limit exceeded")
}

/// The relay's plans for the answers it awaits, in the order of the requests, shared by both
/// directions of a session; whether the session's transaction lost a conflict; and the
/// server's transaction status at the last `ReadyForQuery`.
#[derive(Debug, Default, Clone)]
pub(crate) struct Plans {
    queue: Arc<Mutex<VecDeque<Planned>>>,
    doomed: Arc<AtomicBool>,
    status: Arc<std::sync::atomic::AtomicU8>,
}

impl Plans {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Planned>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the plan of a request about to be sent upstream.
    pub(crate) fn push(&self, planned: Planned) {
        self.lock().push_back(planned);
    }

    /// The server's transaction status when every answer is in (`None` while some are
    /// awaited: then it says nothing of what the relay has sent since).
    fn settled_status(&self) -> Option<u8> {
        let queue = self.lock();
        let status = self.status.load(Ordering::SeqCst);
        (queue.is_empty() && status != 0).then_some(status)
    }
}

/// The committed catalog changes (DDL, `GRANT`, `REVOKE`) of one emulator's sessions, with the
/// relations they named: another session that had used one of them before the change gets
/// `40001 schema has been updated by another transaction (OC001)` on its next statement naming
/// it, once (its cached schema is stale; a session that never used it has none to be stale).
#[derive(Debug, Default)]
pub(crate) struct Catalog {
    changes: Mutex<VecDeque<Change>>,
    sessions: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct Change {
    seq: u64,
    session: u64,
    tables: Vec<String>,
}

/// Changes remembered (a session that has seen none of the oldest is told of them anyway).
const CHANGES_KEPT: usize = 1024;

impl Catalog {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Change>> {
        self.changes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new session's id.
    fn join(&self) -> u64 {
        self.sessions.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn current(&self) -> u64 {
        self.lock().back().map_or(0, |c| c.seq)
    }

    /// Records a committed change by `session`; returns its number.
    fn record(&self, session: u64, tables: &[String]) -> u64 {
        let mut changes = self.lock();
        let seq = changes.back().map_or(0, |c| c.seq) + 1;
        if changes.len() >= CHANGES_KEPT {
            changes.pop_front();
        }
        changes.push_back(Change {
            seq,
            session,
            tables: tables.to_vec(),
        });
        seq
    }

    /// Whether another session changed one of `tables` since `session` last used it
    /// (`touched`: table → the latest change number then).
    fn stale(&self, session: u64, touched: &HashMap<String, u64>, tables: &[String]) -> bool {
        let changes = self.lock();
        tables.iter().any(|table| {
            touched.get(table).is_some_and(|&used_at| {
                changes
                    .iter()
                    .any(|c| c.seq > used_at && c.session != session && c.tables.contains(table))
            })
        })
    }
}

fn schema_conflict() -> Refusal {
    Refusal::new(
        "40001",
        "schema has been updated by another transaction (OC001)",
    )
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
    fn push(&mut self, bytes: &[u8], plan: Option<Plan>) {
        self.bytes.extend_from_slice(bytes);
        if let Some(plan) = plan {
            self.push_planned(Planned::new(plan));
        }
    }

    fn push_planned(&mut self, planned: Planned) {
        self.gate |= planned.report;
        self.plans.push(planned);
    }

    /// Marks the last plan as the answer to a piece of a split request that the relay waits
    /// for (`intermediate`: not the last piece).
    fn mark_piece(&mut self, intermediate: bool) {
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

/// A prepared statement as the rules see it.
#[derive(Debug, Clone)]
struct Prepared {
    kind: Kind,
    write_tag: Option<&'static str>,
    tables: Arc<[String]>,
    /// The parameter types its `Parse` gave (0: for the server to infer).
    parameter_types: Arc<[u32]>,
    /// The most rows it writes, when its text bounds them.
    most_rows: Option<u64>,
    /// `COPY … FROM STDIN`.
    copy_in: bool,
    /// Asynchronous DDL run by its job's `SELECT`: the DDL's tag.
    job: Option<&'static str>,
    /// Its text as it went upstream (for a replay at `COMMIT`).
    text: Arc<str>,
    /// For a locking read: the statement that validates it at `COMMIT`.
    touch: Option<Arc<str>>,
    /// It waits for table locks (DDL, `ANALYZE`).
    waits: bool,
}

fn other() -> Prepared {
    Prepared {
        kind: Kind::Other,
        write_tag: None,
        tables: Arc::new([]),
        parameter_types: Arc::new([]),
        most_rows: None,
        copy_in: false,
        job: None,
        text: "".into(),
        touch: None,
        waits: false,
    }
}

/// The parameter type OIDs after a `Parse` body's query text.
fn parameter_types(rest: &[u8]) -> Vec<u32> {
    let Some((count, mut oids)) = rest.split_at_checked(2) else {
        return Vec::new();
    };
    let count = u16::from_be_bytes([count[0], count[1]]);
    (0..count)
        .map_while(|_| {
            let (oid, tail) = oids.split_at_checked(4)?;
            oids = tail;
            Some(u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]]))
        })
        .collect()
}

/// A portal: its statement, the bytes of the values bound to it, and, for a write or a
/// locking read, its `Bind` parameters (to replay it at `COMMIT`).
#[derive(Debug, Clone)]
struct Portal {
    statement: String,
    bytes: u64,
    params: Option<Arc<[u8]>>,
}

/// The parameter values of a `Bind` body (`None` for NULL), after its portal and statement.
fn bound_values(mut rest: &[u8]) -> Option<Vec<Option<&[u8]>>> {
    let mut take = |n: usize| -> Option<&[u8]> {
        let (head, tail) = rest.split_at_checked(n)?;
        rest = tail;
        Some(head)
    };
    let u16_of = |b: &[u8]| usize::from(u16::from_be_bytes([b[0], b[1]]));
    let formats = u16_of(take(2)?);
    take(2 * formats)?;
    let count = u16_of(take(2)?);
    (0..count)
        .map(|_| {
            let len = take(4)?;
            let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
            match usize::try_from(len) {
                Ok(len) => take(len).map(Some),
                Err(_) => Some(None),
            }
        })
        .collect()
}

/// The name DSQL gives a parameter's type in its value-size refusal, from the type the
/// `Parse` declared or, failing that, the one PostgreSQL inferred for a named statement.
fn value_refusal(statement: &str, prepared: &Prepared, index: usize) -> Refusal {
    let declared = match prepared.parameter_types.get(index) {
        Some(17) => Some("bytea"),
        Some(25) => Some("text"),
        Some(114) => Some("json"),
        Some(1042) => Some("bpchar"),
        Some(1043) => Some("varchar"),
        Some(3802) => Some("jsonb"),
        _ => None,
    };
    let mut refusal = rules::value_limit_exceeded(declared.unwrap_or("text"));
    if declared.is_none() && !statement.is_empty() {
        let prefix = refusal.message.trim_end_matches("text").replace('\'', "''");
        refusal.message_sql = Some(format!(
            "'{prefix}' || coalesce((SELECT t.typname FROM pg_prepared_statements p \
             JOIN pg_type t ON t.oid = p.parameter_types[{}]::oid WHERE p.name = '{}'), 'text')",
            index + 1,
            statement.replace('\'', "''"),
        ));
    }
    refusal
}

/// One session's view of DSQL's rules: the transaction it is in, what that transaction did,
/// and its prepared statements.
#[derive(Debug, Default)]
pub(crate) struct Dialect {
    in_block: bool,
    ddl: bool,
    dml: bool,
    plans: Plans,
    /// Prepared statement name → what it is.
    statements: HashMap<String, Prepared>,
    /// Portal name → statement name.
    portals: HashMap<String, Portal>,
    /// An extended-protocol batch being skipped to `Sync` after this refusal.
    skipping: Option<Refusal>,
    /// The refusal of the batch being skipped has gone upstream already (at a `Flush`).
    refusal_sent: bool,
    /// The client's extended-protocol messages since the last `Sync`, not decided yet.
    raw: Vec<u8>,
    /// The decided messages of the current extended-protocol batch not sent yet.
    held: Vec<u8>,
    /// What the current extended-protocol batch does.
    batch: Batch,
    /// Query texts already read (a service sends the same few again and again).
    cache: HashMap<String, Arc<Classified>>,
    catalog: Arc<Catalog>,
    /// This session's id in the catalog.
    session: u64,
    /// The relations this session has used, with the latest catalog change number then.
    touched: HashMap<String, u64>,
    /// Relations named by DDL in the open transaction block, recorded when it commits.
    pending_ddl: Vec<String>,
    /// When the open transaction block began.
    began: Option<std::time::Instant>,
    /// The bytes of the values the open transaction has written, as far as the relay sees.
    tx_bytes: u64,
    /// The relations the open transaction block used, with the latest catalog change number
    /// when it first did.
    block_used: HashMap<String, u64>,
    /// How long a transaction block may stay open.
    age_limit: std::time::Duration,
    /// This session among the database's (dooms, commit tickets).
    sessions: Option<Arc<occ::Sessions>>,
    entry: Arc<occ::Entry>,
    /// The open transaction block's number (0: none).
    block: u64,
    /// The block whose transaction was rolled back upstream after a committer doomed it.
    released: u64,
    /// What the open transaction replays at `COMMIT` (pending writes, locking reads).
    replays: Vec<occ::Replay>,
    /// The replay form of the guarded write whose answer is awaited.
    last_write: Option<occ::Replay>,
    /// Pieces of a client request the relay sends one at a time, not sent yet.
    pieces: VecDeque<Piece>,
    /// What the reported answer the relay waits for is.
    awaiting: Awaiting,
    /// A `COMMIT` waiting for its validation, and whether it is an intermediate piece.
    commit: Option<(Piece, Option<bool>)>,
    /// The `COMMIT` being sent has been validated.
    validated: bool,
    /// The last extended-protocol batch ran `COPY … FROM STDIN`.
    copy_batch: bool,
    /// Its `CopyDone` or `CopyFail` went through: the next `Sync` is the copy's
    /// ([`Plan::CopySync`]).
    copy_tail: bool,
    /// The autocommit write whose answer is awaited, to run again as a committer if it meets
    /// a row an open transaction holds.
    retry: Option<Retry>,
}

/// An autocommit write as the relay runs it again ([`Planned::retry`]): what went before it
/// (the relay's `BEGIN`), the request (with a `Close` before each named `Parse`, so that it can
/// be parsed again), and its plan.
#[derive(Debug, Clone)]
struct Retry {
    prefix: Option<Vec<u8>>,
    request: Vec<u8>,
    plan: Plan,
}

/// A piece of a client request: one statement of a multi-statement `Query` (the client's
/// text), or the messages of an extended-protocol batch up to one `Execute`, with the `Sync`
/// that ends it (the relay's, or the client's for the last piece).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Query(String),
    Batch {
        messages: Vec<u8>,
        sync: Vec<u8>,
    },
    /// A refused extended-protocol message, answered once the messages before it ran
    /// (`own_block`: in a block the relay opened, rolled back after the refusal).
    Refusal {
        refusal: Refusal,
        own_block: bool,
    },
}

/// What the reported answer the relay waits for belongs to.
#[derive(Debug, Default, Clone, Copy)]
struct Awaiting {
    write: bool,
    commit: bool,
    /// A piece of a split request: `Some(intermediate)`.
    piece: Option<bool>,
    /// The piece runs in a block the relay opened.
    own_block: bool,
    /// A statement that waited for table locks under [`WAIT_LOCK_TIMEOUT`]: the session's
    /// lock timeout goes back to [`LOCK_TIMEOUT`].
    waits: bool,
    /// An autocommit write on its first try ([`Dialect::retry`]).
    retry: bool,
}

/// The most query texts remembered per session.
const CACHE_LIMIT: usize = 256;

/// The most bytes of an extended-protocol batch held back before they go upstream anyway.
const HELD_LIMIT: usize = 1 << 20;

/// What an extended-protocol batch (messages up to a `Sync`) does, as far as the relay has read.
#[derive(Debug, Default)]
struct Batch {
    /// `Execute` messages.
    executes: u32,
    /// Its first write.
    write: Option<BatchWrite>,
    /// It begins or ends a transaction block.
    transaction_statement: bool,
    /// It parses the unnamed statement.
    parsed_unnamed: bool,
    /// It binds the unnamed statement of an earlier batch.
    reuses_unnamed: bool,
    /// Some of it went upstream before its `Sync`.
    released: bool,
    /// The most rows its writes can write, as far as their texts bound them.
    bounded_rows: u64,
    /// One of its writes has no bound in its text.
    unbounded: bool,
    /// It copies data in: its answer waits for the client (so the relay must not).
    copy_in: bool,
    /// The tag of the asynchronous DDL it executes.
    job: Option<&'static str>,
    /// It executes DDL.
    ddl: bool,
    /// It executes a statement that waits for table locks.
    waits: bool,
}

#[derive(Debug, Clone)]
struct BatchWrite {
    in_block: bool,
    tag: Option<&'static str>,
    /// The write as the relay would replay it at `COMMIT`.
    replay: Option<occ::Replay>,
}

/// The frontend messages in `bytes` (whole ones), as (tag, body, whole message).
fn messages(bytes: &[u8]) -> impl Iterator<Item = (u8, &[u8], &[u8])> {
    let mut at = 0;
    std::iter::from_fn(move || {
        let header = bytes.get(at..at + 5)?;
        let len = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
        let whole = bytes.get(at..at + 1 + len.max(4))?;
        at += whole.len();
        Some((whole[0], &whole[5..], whole))
    })
}

/// An extended-protocol batch that runs `text` as a statement of the relay's own (so that
/// neither the client's unnamed statement nor its named ones change) with the `Bind`
/// parameters `params` (formats and values, as the client sent them), ending with `Sync`.
fn statement_batch(text: &str, types: &[u32], params: &[u8]) -> Vec<u8> {
    const NAME: &str = "dsql_emulator_replay";
    let mut out = message(b'C', format!("S{NAME}\0").as_bytes());
    let mut parse = format!("{NAME}\0{text}\0").into_bytes();
    parse.extend_from_slice(&(types.len() as u16).to_be_bytes());
    for oid in types {
        parse.extend_from_slice(&oid.to_be_bytes());
    }
    super::wire::append_message(&mut out, b'P', &parse);
    let mut bind = format!("\0{NAME}\0").into_bytes();
    bind.extend_from_slice(params);
    bind.extend_from_slice(&0u16.to_be_bytes());
    super::wire::append_message(&mut out, b'B', &bind);
    super::wire::append_message(&mut out, b'E', b"\0\0\0\0\0");
    super::wire::append_message(&mut out, b'C', format!("S{NAME}\0").as_bytes());
    super::wire::append_message(&mut out, b'S', b"");
    out
}

/// The parameter part of a `Bind` body after its portal and statement names (formats and
/// values, without the result formats).
fn bind_parameters(rest: &[u8]) -> Option<&[u8]> {
    let u16_at = |at: usize| -> Option<usize> {
        let b = rest.get(at..at + 2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    };
    let mut at = 2 + 2 * u16_at(0)?;
    let count = u16_at(at)?;
    at += 2;
    for _ in 0..count {
        let len = rest.get(at..at + 4)?;
        let len = i32::from_be_bytes([len[0], len[1], len[2], len[3]]);
        at += 4 + usize::try_from(len).unwrap_or(0);
    }
    rest.get(..at)
}

impl Dialect {
    /// A session's dialect, sharing `plans` with its [`Responder`] and `catalog` with the
    /// emulator's other sessions.
    pub(crate) fn new(plans: Plans, catalog: Arc<Catalog>, age_limit: std::time::Duration) -> Self {
        let session = catalog.join();
        Dialect {
            plans,
            catalog,
            session,
            age_limit,
            ..Dialect::default()
        }
    }

    /// The session is `entry` among the database's `sessions`: its transactions take part in
    /// commit-time conflicts with theirs (see [`occ`]).
    pub(crate) fn with_sessions(
        mut self,
        sessions: Arc<occ::Sessions>,
        entry: Arc<occ::Entry>,
    ) -> Self {
        self.sessions = Some(sessions);
        self.entry = entry;
        self
    }

    /// `54000` if the open transaction block is older than the age limit.
    fn too_old(&self) -> Option<Refusal> {
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

    /// Ends a transaction block that cannot commit: `COMMIT` fails with `refusal` and the
    /// block is rolled back, so the session is outside any transaction, as on DSQL.
    fn fail_commit(&mut self, refusal: &Refusal, out: &mut Outgoing) {
        // Rolled back first: a validation that failed upstream left the block aborted.
        out.push(&query("ROLLBACK"), Some(Plan::Swallow));
        out.push(&raise_query(refusal), Some(Plan::Pass));
        self.plans.doomed.store(false, Ordering::SeqCst);
        self.set_transaction(Transaction::default());
        self.pending_ddl.clear();
    }

    /// Why the open block's `COMMIT` fails before anything is validated, if it does: its age,
    /// a conflict it lost, a schema change that landed meanwhile, its size.
    fn commit_refusal(&mut self) -> Option<Refusal> {
        if let Some(refusal) = self.too_old() {
            return Some(refusal);
        }
        // A schema change that doomed it is told as the schema change.
        if let Some(refusal) = self.commit_schema_check() {
            return Some(refusal);
        }
        if self.plans.doomed.load(Ordering::SeqCst) || self.entry.doomed(self.block) {
            return Some(change_conflict());
        }
        (self.tx_bytes > TX_SIZE_LIMIT).then(|| size_limit_exceeded(self.tx_bytes))
    }

    /// A `COMMIT` (`piece`, a piece of a split request when `intermediate` is `Some`) in a
    /// transaction block: fails at once, or waits for its validation (`true`), or goes on as it
    /// is (`false`: validated already, or nothing to commit).
    fn commit_point(
        &mut self,
        piece: &Piece,
        intermediate: Option<bool>,
        out: &mut Outgoing,
    ) -> bool {
        if std::mem::take(&mut self.validated)
            || !self.in_block
            || self.plans.settled_status() == Some(b'E')
        {
            // A failed block's COMMIT answers ROLLBACK, as PostgreSQL's does.
            return false;
        }
        if let Some(refusal) = self.commit_refusal() {
            self.fail_commit(&refusal, out);
            self.end_piece(intermediate, out);
            return true;
        }
        out.validate = Some(occ::Validation {
            replays: std::mem::take(&mut self.replays),
            block: self.block,
        });
        self.commit = Some((piece.clone(), intermediate));
        true
    }

    /// After the validation of the waiting `COMMIT`: it goes upstream, or fails with
    /// `outcome`'s refusal.
    pub(crate) fn after_validation(&mut self, outcome: Result<(), Refusal>, out: &mut Outgoing) {
        let Some((piece, intermediate)) = self.commit.take() else {
            return;
        };
        match outcome {
            Err(refusal) => {
                self.entry.committed();
                self.fail_commit(&refusal, out);
                self.end_piece(intermediate, out);
            }
            Ok(()) => {
                self.validated = true;
                self.run_piece(piece, intermediate, out);
                self.validated = false;
                // The commit ticket is held until the COMMIT's answer is in.
                out.mark_piece(intermediate.unwrap_or(false));
                self.awaiting.commit = true;
                self.awaiting.piece = intermediate;
            }
        }
    }

    /// The upstream side's answer to a reported request is in: what to do next.
    pub(crate) fn on_reply(&mut self, reply: &Reply, out: &mut Outgoing) {
        let awaited = std::mem::take(&mut self.awaiting);
        if awaited.write {
            match self.last_write.take() {
                Some(replay) if reply.pending && self.in_block => self.replays.push(replay),
                // A pending write the relay cannot replay must not vanish: its transaction
                // cannot commit.
                _ if reply.pending && self.in_block => {
                    self.plans.doomed.store(true, Ordering::SeqCst)
                }
                _ => {}
            }
        }
        if awaited.commit {
            self.entry.committed();
        }
        if awaited.retry {
            match self.retry.take() {
                Some(retry) if reply.pending => self.run_again(retry, out),
                _ => {}
            }
        }
        if awaited.waits {
            out.push(
                &hidden(&format!("SET lock_timeout = '{LOCK_TIMEOUT}'")),
                Some(Plan::Swallow),
            );
        }
        if awaited.piece == Some(true) {
            if reply.failed {
                // The request ends here, as PostgreSQL's would at its error.
                self.pieces.clear();
                if awaited.own_block {
                    out.push(&query("ROLLBACK"), Some(Plan::Swallow));
                }
            } else {
                self.next_piece(out);
            }
        }
    }

    /// A committer doomed this session's open transaction: roll it back upstream now (the
    /// session is idle), so that its rows are free, and open a block again, so that the
    /// client's later statements run in one until its `COMMIT` fails (`OC000`) or it rolls
    /// back.
    pub(crate) fn release(&mut self, out: &mut Outgoing) {
        if self.in_block && self.entry.doomed(self.block) && self.released != self.block {
            self.released = self.block;
            self.replays.clear();
            out.push(
                &query("ROLLBACK; BEGIN ISOLATION LEVEL REPEATABLE READ"),
                Some(Plan::Swallow),
            );
        }
    }

    /// Follows the server's transaction status when every answer is in: the relay's own
    /// reading of the statements may have missed an error that ended or failed a block.
    fn follow_server(&mut self) {
        let Some(status) = self.plans.settled_status() else {
            return;
        };
        if !self.raw.is_empty() || !self.held.is_empty() || !self.pieces.is_empty() {
            return;
        }
        match (status, self.in_block) {
            (b'I', true) => {
                self.set_transaction(Transaction::default());
                self.pending_ddl.clear();
            }
            (b'T' | b'E', false) => self.set_transaction(Transaction {
                in_block: true,
                ..Transaction::default()
            }),
            _ => {}
        }
    }

    /// `OC001` for a statement naming `tables`, if another session changed one since this
    /// session last used it; it is told once. Either way the tables count as used now.
    fn schema_check(&mut self, tables: &[String]) -> Option<Refusal> {
        if tables.is_empty() {
            return None;
        }
        let stale = self.catalog.stale(self.session, &self.touched, tables);
        let now = self.catalog.current();
        for table in tables {
            self.touched.insert(table.clone(), now);
            if self.in_block {
                self.block_used.entry(table.clone()).or_insert(now);
            }
        }
        stale.then(schema_conflict)
    }

    /// `OC001` for a `COMMIT` if another session changed a table this block used after it
    /// first used it (a change that landed mid-transaction); it is told once.
    fn commit_schema_check(&mut self) -> Option<Refusal> {
        let used: Vec<String> = self.block_used.keys().cloned().collect();
        if !self.catalog.stale(self.session, &self.block_used, &used) {
            return None;
        }
        let now = self.catalog.current();
        for table in used {
            self.touched.insert(table, now);
        }
        Some(schema_conflict())
    }

    /// After statements of `kind` naming `tables` went through: DDL outside a block is
    /// committed now, inside one when the block commits.
    fn note_catalog_change(&mut self, kinds: &[Kind], tables: &[String], committed: bool) {
        if kinds.contains(&Kind::Ddl) {
            self.pending_ddl.extend_from_slice(tables);
        }
        if committed && !self.pending_ddl.is_empty() {
            let pending = std::mem::take(&mut self.pending_ddl);
            let seq = self.catalog.record(self.session, &pending);
            for table in pending {
                self.touched.insert(table, seq);
            }
        }
    }

    /// Decides what goes upstream for the client's message `tag` with `body` (`whole` is the
    /// message with its header), appending it to `out`.
    ///
    /// The messages of an extended-protocol batch are held until its `Sync` (or a `Flush`), so
    /// that what the relay adds for a write (a savepoint, or a `BEGIN`) goes before the whole
    /// batch: a simple `Query` in the middle would drop the batch's unnamed statement, and
    /// would be ignored after an error in it. A batch or a multi-statement `Query` that opens,
    /// ends or writes in a transaction block goes one statement at a time ([`Piece`]).
    pub(crate) fn on_message(&mut self, tag: u8, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        self.follow_server();
        match tag {
            b'P' | b'B' | b'E' | b'C' | b'D' => {
                self.raw.extend_from_slice(whole);
                if self.raw.len() > HELD_LIMIT {
                    self.decide_raw(out);
                    self.release_held(out);
                }
            }
            b'S' if self.copy_tail && self.raw.is_empty() => {
                self.copy_tail = false;
                self.copy_batch = false;
                out.push(whole, Some(Plan::CopySync));
            }
            b'S' => {
                let raw = std::mem::take(&mut self.raw);
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
                self.on_query(body, whole, None, out);
            }
            // A FunctionCall is answered up to its own ReadyForQuery.
            b'F' => {
                self.decide_raw(out);
                self.release_held(out);
                out.push(whole, Some(Plan::Pass));
            }
            _ => {
                self.decide_raw(out);
                self.release_held(out);
                out.push(whole, None);
            }
        }
    }

    /// Decides the extended-protocol messages received so far (a `Flush`, or too many held).
    fn decide_raw(&mut self, out: &mut Outgoing) {
        let raw = std::mem::take(&mut self.raw);
        for (tag, body, whole) in messages(&raw) {
            self.on_extended(tag, body, whole, out);
        }
    }

    fn on_extended(&mut self, tag: u8, body: &[u8], whole: &[u8], out: &mut Outgoing) {
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
    fn executed_kinds(&mut self, raw: &[u8]) -> Vec<(usize, Kind, bool)> {
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
    fn on_batch(&mut self, raw: Vec<u8>, sync: Vec<u8>, out: &mut Outgoing) {
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
    fn next_piece(&mut self, out: &mut Outgoing) {
        if let Some(piece) = self.pieces.pop_front() {
            let intermediate = !self.pieces.is_empty();
            self.start_piece(piece, Some(intermediate), out);
        }
    }

    /// A piece (or a whole request, `intermediate` `None`): a `COMMIT` in a block waits for
    /// its validation; anything else goes.
    fn start_piece(&mut self, piece: Piece, intermediate: Option<bool>, out: &mut Outgoing) {
        let commits = match &piece {
            Piece::Query(text) => matches!(self.classified(text).statements.as_slice(),
                [one] if one.kind == Kind::Commit),
            Piece::Batch { messages, .. } => matches!(
                self.executed_kinds(messages).as_slice(),
                [(_, Kind::Commit, _)]
            ),
            Piece::Refusal { .. } => false,
        };
        if commits && self.commit_point(&piece, intermediate, out) {
            return;
        }
        self.run_piece(piece, intermediate, out);
    }

    fn run_piece(&mut self, piece: Piece, intermediate: Option<bool>, out: &mut Outgoing) {
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
    fn hold(&mut self, whole: &[u8], out: &mut Outgoing) {
        self.held.extend_from_slice(whole);
        if self.held.len() > HELD_LIMIT {
            self.release_held(out);
        }
    }

    /// Sends the held messages of the batch on now; nothing can go before them any more.
    fn release_held(&mut self, out: &mut Outgoing) {
        if !self.held.is_empty() {
            out.push(&self.held, None);
            self.held.clear();
            self.batch.released = true;
        }
    }

    /// The end of an extended-protocol batch: what goes before it, and the plan of its answer.
    fn on_sync(&mut self, whole: &[u8], intermediate: Option<bool>, out: &mut Outgoing) {
        let batch = std::mem::take(&mut self.batch);
        let held = std::mem::take(&mut self.held);
        self.copy_batch = batch.copy_in;
        if let Some(refusal) = self.skipping.take() {
            if std::mem::take(&mut self.refusal_sent) {
                out.push(&held, None);
                out.push(whole, Some(Plan::Pass));
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
                    None if batch.ddl => (None, Plan::Ddl),
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
                        (Some(savepoint_query()), write(Some(tag), false))
                    }
                    _ => (None, write(None, false)),
                },
                // Nothing to undo for: within the row limit whatever it does, and small.
                Some(_)
                    if !batch.unbounded
                        && batch.bounded_rows <= ROW_LIMIT
                        && oversize.is_none() =>
                {
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
                        super::wire::append_message(&mut request, b'C', &close);
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

    /// The bytes the open transaction has written so far: those of this request's writes
    /// (`text` for a simple query), after the earlier requests' in a block.
    fn count_bytes(&mut self, bytes: u64) {
        if !self.in_block {
            self.tx_bytes = 0;
        }
        self.tx_bytes += bytes;
    }

    fn classified(&mut self, text: &str) -> Arc<Classified> {
        if let Some(hit) = self.cache.get(text) {
            return hit.clone();
        }
        let classified = Arc::new(rules::classify(text));
        if self.cache.len() >= CACHE_LIMIT {
            self.cache.clear();
        }
        self.cache.insert(text.to_owned(), classified.clone());
        classified
    }

    /// Whether a multi-statement query goes one statement at a time: when it opens, ends or
    /// writes in a transaction block (the relay validates a `COMMIT` and guards a write alone).
    fn split(&self, text: &str, classified: &Classified) -> Option<Vec<String>> {
        let statements = &classified.statements;
        if statements.len() < 2 || statements.iter().any(|s| s.copy_in) {
            return None;
        }
        let opens = statements[0].kind == Kind::Begin;
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

    fn on_query(
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
            self.pieces.extend(pieces.into_iter().map(Piece::Query));
            return self.next_piece(out);
        }
        let kinds: Vec<Kind> = classified.statements.iter().map(|s| s.kind).collect();
        let ends = !state.in_block;
        if ends && kinds.contains(&Kind::Rollback) && !kinds.contains(&Kind::Ddl) {
            // Rolled back: its DDL never happened.
            self.pending_ddl.clear();
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
        };
        let copy_in = classified.statements.iter().any(|s| s.copy_in);
        let mut replay = None;
        let (prefix, plan) = if !kinds.contains(&Kind::Dml) || copy_in {
            // (With `COPY … FROM STDIN` the relay would wait for the answer while the server
            // waits for the data.)
            let ddl = kinds.contains(&Kind::Ddl);
            (None, if ddl { Plan::Ddl } else { Plan::Pass })
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
                    (Some(savepoint_query()), write(Some(*tag), false))
                }
                _ => (None, write(None, false)),
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
                .try_fold(0, |sum, s| s.most_rows.map(|rows| sum + rows))
                .is_some_and(|rows| rows <= ROW_LIMIT)
        {
            // Nothing to undo for: within the row limit whatever it does, and small.
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
    fn retry_on_held_row(&mut self, request: Vec<u8>, plan: Plan, out: &mut Outgoing) {
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
    fn run_again(&mut self, retry: Retry, out: &mut Outgoing) {
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
    fn end_piece(&mut self, intermediate: Option<bool>, out: &mut Outgoing) {
        if let Some(intermediate) = intermediate {
            out.mark_piece(intermediate);
            self.awaiting.piece = Some(intermediate);
        }
    }

    /// After a request with `plan`: a write's answer is awaited, with its replay form.
    fn await_write(&mut self, plan: Plan, replay: Option<occ::Replay>) {
        if matches!(plan, Plan::Write { .. }) {
            self.awaiting.write = true;
            self.last_write = replay;
        }
    }

    /// Before a statement that waits for table locks (DDL, `ANALYZE`): a lock timeout long
    /// enough to wait, set back when its answer is in ([`Self::waited`], [`Self::on_reply`]).
    fn wait_for_locks(&mut self, out: &mut Outgoing) {
        out.push(
            &hidden(&format!("SET lock_timeout = '{WAIT_LOCK_TIMEOUT}'")),
            Some(Plan::Swallow),
        );
    }

    /// After the statement [`Self::wait_for_locks`] prepared for: the relay waits for its
    /// answer (a DDL dooming the open transactions whose locks it waits for), then sets the
    /// lock timeout back.
    fn waited(&mut self, ddl: bool, out: &mut Outgoing) {
        out.mark_piece(false);
        self.awaiting.waits = true;
        out.committer = ddl;
    }

    fn on_parse(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
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
                    parameter_types: parameter_types(rest).into(),
                    most_rows: one.most_rows,
                    copy_in: one.copy_in,
                    job: classified.job,
                    text: classified.upstream_text.as_str().into(),
                    touch: one.touch.as_deref().map(Into::into),
                    waits: one.waits,
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

    fn on_bind(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
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

    fn on_execute(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
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
        if let Some(refusal) = self.too_old().filter(|_| !ends) {
            self.skipping = Some(refusal);
            return;
        }
        if let Some(refusal) = self.schema_check(&prepared.tables) {
            self.skipping = Some(refusal);
            return;
        }
        let mut state = self.transaction();
        match state.apply(prepared.kind) {
            Ok(()) => {
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
                batch.waits |= prepared.waits;
                if prepared.kind == Kind::Dml {
                    match prepared.most_rows {
                        Some(rows) => batch.bounded_rows += rows,
                        None => batch.unbounded = true,
                    }
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

    fn transaction(&self) -> Transaction {
        Transaction {
            in_block: self.in_block,
            ddl: self.ddl,
            dml: self.dml,
        }
    }

    fn set_transaction(&mut self, state: Transaction) {
        if state.in_block != self.in_block {
            self.tx_bytes = 0;
            self.block_used.clear();
            self.began = state.in_block.then(std::time::Instant::now);
            self.replays.clear();
            self.last_write = None;
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

    /// Outside a block, each `Query` and each `Sync` ends an implicit transaction.
    fn end_of_implicit_transaction(&mut self) {
        if !self.in_block {
            self.ddl = false;
            self.dml = false;
            self.tx_bytes = 0;
        }
    }
}

/// The transaction rules' state: in a block or not, and whether it has run DDL or DML.
#[derive(Debug, Clone, Copy, Default)]
struct Transaction {
    in_block: bool,
    ddl: bool,
    dml: bool,
}

impl Transaction {
    fn apply(&mut self, kind: Kind) -> Result<(), Refusal> {
        let refuse = |message: &str| Err(Refusal::new("0A000", message));
        match kind {
            Kind::Begin => {
                *self = Transaction {
                    in_block: true,
                    ..Transaction::default()
                }
            }
            Kind::Commit | Kind::Rollback => *self = Transaction::default(),
            Kind::Ddl if self.ddl => {
                return refuse("multiple ddl statements not supported in a transaction");
            }
            Kind::Ddl if self.dml => {
                return refuse("ddl and dml are not supported in the same transaction");
            }
            Kind::Ddl => self.ddl = true,
            Kind::Dml if self.ddl => {
                return refuse("ddl and dml are not supported in the same transaction");
            }
            Kind::Dml => self.dml = true,
            Kind::Other => {}
        }
        Ok(())
    }
}

/// DSQL's `server_version` and `server_version_num` (`DSQL_SQL_RULES.md` §7).
pub(crate) const DSQL_SERVER_VERSION: &str = "16.15";
pub(crate) const DSQL_SERVER_VERSION_NUM: &str = "160015";
/// What DSQL's `version()` answers.
pub(crate) const DSQL_VERSION: &str = "PostgreSQL 16";

/// A `ParameterStatus` body with DSQL's value for `server_version`, if it is that parameter.
pub(crate) fn dsql_parameter_status(body: &[u8]) -> Option<Vec<u8>> {
    let name = body.split(|b| *b == 0).next()?;
    (name == b"server_version").then(|| {
        let mut out = b"server_version\0".to_vec();
        out.extend_from_slice(DSQL_SERVER_VERSION.as_bytes());
        out.push(0);
        out
    })
}

/// The dollar-quote tag of the refusal `DO` blocks.
const TAG: &str = "$dsql_emulator_refusal$";

/// A `Query` message whose execution raises `refusal` in PostgreSQL.
fn raise_query(refusal: &Refusal) -> Vec<u8> {
    let quote = |text: &str| text.replace('\'', "''");
    let detail = refusal
        .detail
        .as_deref()
        .map(|detail| format!(", DETAIL = '{}'", quote(detail)))
        .unwrap_or_default();
    let text_of_message = refusal
        .message_sql
        .clone()
        .unwrap_or_else(|| format!("'{}'", quote(&refusal.message)));
    let text = format!(
        "DO {TAG} BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = {text_of_message}{detail}; \
         END {TAG}\0",
        refusal.code,
    );
    message(b'Q', text.as_bytes())
}

/// An `ErrorResponse` with `refusal`, as PostgreSQL would send it.
fn error_response(refusal: &Refusal, out: &mut Vec<u8>) {
    let mut body =
        format!("SERROR\0VERROR\0C{}\0M{}\0", refusal.code, refusal.message).into_bytes();
    if let Some(detail) = &refusal.detail {
        body.extend_from_slice(format!("D{detail}\0").as_bytes());
    }
    body.push(0);
    super::wire::append_message(out, b'E', &body);
}

/// A typed message.
fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    super::wire::append_message(&mut out, tag, body);
    out
}

/// A `Query` message.
fn query(text: &str) -> Vec<u8> {
    let mut body = text.as_bytes().to_vec();
    body.push(0);
    message(b'Q', &body)
}

fn savepoint_query() -> Vec<u8> {
    query(&format!("SAVEPOINT {SAVEPOINT}"))
}

/// What PL/pgSQL's `CONTEXT` says of an error in one of the upstream's `sys` functions.
const SYS_FUNCTION: &[u8] = b"PL/pgSQL function sys.";

/// The `CONTEXT` PL/pgSQL adds to the errors of the refusal `DO` blocks.
const RAISE_CONTEXT: &[u8] = b"WPL/pgSQL function inline_code_block line 1 at RAISE\0";

/// The server-to-client side of a session with DSQL's rules: follows the framing of the
/// server's messages and applies the plan of each answer (see [`Plan`]); takes the refusal
/// blocks' `CONTEXT` out of errors; counts the rows each transaction writes; and, at the
/// `ReadyForQuery` of a reported answer ([`Planned::report`]), tells the upstream side what it
/// needs to go on ([`Reply`]: what to send next, the write that met a held row, a replay's
/// outcome). An answer no plan accounts for closes the session with a `FATAL` that says so.
#[derive(Debug)]
pub(crate) struct Responder {
    plans: Plans,
    /// Replies for the upstream side, which waits for them after each reported request.
    upstream: tokio::sync::mpsc::Sender<Reply>,
    /// The framing of the server's messages.
    framer: super::wire::Framer,
    /// The current message, header included.
    current: Vec<u8>,
    /// The current guarded write met a conflict: `Some(true)` a row an open transaction
    /// holds, `Some(false)` a row a transaction changed and committed since.
    lost: Option<bool>,
    /// Rows written in the current transaction.
    rows: u64,
    /// The current write crossed the row limit.
    over: bool,
    /// The rows now coming are a job's (after its `RowDescription`).
    job_rows: bool,
    /// An error reached the client since the last reply (or the last `ReadyForQuery` passed).
    failed: bool,
    /// What the next reply carries.
    reply: Reply,
    /// The session must close: the relay lost track of it.
    closing: bool,
    /// The current answer entered copy-in mode (`CopyInResponse`).
    copying: bool,
    /// The answer of an autocommit write on its first try, held until it is known whether
    /// it met a held row ([`Planned::retry`]).
    retry_buf: Vec<u8>,
    /// It did.
    retry_lost: bool,
}

impl Responder {
    pub(crate) fn new(plans: Plans, upstream: tokio::sync::mpsc::Sender<Reply>) -> Self {
        Responder {
            plans,
            upstream,
            framer: super::wire::Framer::new(usize::MAX),
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
        }
    }

    /// Appends to `out` what the client should get for the next `data` from the server;
    /// `false` when the session must close (a `FATAL` saying why is in `out`).
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> bool {
        let mut framer = std::mem::replace(&mut self.framer, super::wire::Framer::new(0));
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
    fn lose_track(&mut self, what: &str, out: &mut Vec<u8>) {
        tracing::error!(
            what,
            "emulator: the relay lost track of a session; closing it"
        );
        out.extend_from_slice(&super::wire::fatal(
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
    fn finish(&mut self, out: &mut Vec<u8>) {
        let tag = self.current[0];
        let ready = tag == b'Z';
        self.copying |= tag == b'G';
        let Some(planned) = self.plans.lock().front().copied() else {
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

    /// What `planned` makes of the current message.
    fn apply(&mut self, planned: Planned, out: &mut Vec<u8>) {
        let tag = self.current[0];
        let ready = tag == b'Z';
        match planned.plan {
            Plan::Pass | Plan::CopySync => self.pass(out),
            // The relay's own statement: an error other than an aborted block's means its
            // picture of the session is wrong.
            Plan::Swallow if tag == b'E' && field(&self.current[5..], b'C') != b"25P02" => {
                let error = super::wire::error_message(&self.current[5..]);
                self.lose_track(&format!("the relay's own statement failed: {error}"), out);
            }
            Plan::Swallow => {}
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
            } => self.write(guard, autocommit, oversize, out),
            Plan::Job { tag, described } => self.job(tag, described, out),
            Plan::Ddl if tag == b'E' && catalog_race(&self.current[5..]) => {
                error_response(&schema_conflict(), out);
                self.failed = true;
            }
            Plan::Ddl => self.pass(out),
            Plan::Replay => match tag {
                b'C' => {
                    let body = &self.current[5..];
                    let tag = body.strip_suffix(&[0]).unwrap_or(body);
                    self.reply.tag = Some(String::from_utf8_lossy(tag).into_owned());
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
    fn ready(&mut self, planned: Planned, out: &mut Vec<u8>) {
        {
            let status = self.current.get(5).copied().unwrap_or(b'I');
            // Outside any transaction now: the next one starts with no rows written.
            if status == b'I' {
                self.rows = 0;
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

    /// A message of the answer to asynchronous DDL run by its job's `SELECT`: that `SELECT`'s
    /// tag becomes the DDL's.
    fn job(&mut self, tag: &'static str, described: bool, out: &mut Vec<u8>) {
        match self.current[0] {
            b'T' => {
                // One field, `job_id`: the job's row follows.
                let body = &self.current[5..];
                self.job_rows = body.get(2..9) == Some(b"job_id\0") && body.starts_with(&[0, 1]);
                self.pass(out);
            }
            b'C' if (self.job_rows || described) && self.current[5..].starts_with(b"SELECT ") => {
                let mut body = tag.as_bytes().to_vec();
                body.push(0);
                super::wire::append_message(out, b'C', &body);
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
    fn write(
        &mut self,
        guard: Option<&'static str>,
        autocommit: bool,
        oversize: Option<u64>,
        out: &mut Vec<u8>,
    ) {
        match self.current[0] {
            b'E' if guard.is_some() && conflict(&self.current[5..]).is_some() => {
                self.lost = conflict(&self.current[5..]);
            }
            b'Z' => self.end_of_write(guard, autocommit, oversize, out),
            _ if self.lost.is_some() || self.over => {}
            b'C' => {
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
    fn end_of_write(
        &mut self,
        guard: Option<&'static str>,
        autocommit: bool,
        oversize: Option<u64>,
        out: &mut Vec<u8>,
    ) {
        let status = self.current.get(5).copied().unwrap_or(b'I');
        let requests = &mut self.reply.requests;
        if self.retry_lost {
            // Run again: the relay's transaction ends unseen.
            if autocommit {
                requests.push((query("ROLLBACK"), Plan::Swallow));
            }
        } else if let (Some(held), Some(told)) = (self.lost, guard) {
            // Undo the write alone, and tell the client it went through: against a row that
            // changed since, the transaction has lost already; against one an open
            // transaction holds, it is replayed at COMMIT.
            requests.push((
                query(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}")),
                Plan::Swallow,
            ));
            if held {
                self.reply.pending = true;
            } else {
                self.plans.doomed.store(true, Ordering::SeqCst);
            }
            let mut complete = told.as_bytes().to_vec();
            complete.push(0);
            super::wire::append_message(out, b'C', &complete);
            super::wire::append_message(out, b'Z', b"T");
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
        } else {
            // Over the limit in a block the query itself committed: too late (see the docs).
            self.pass(out);
        }
        self.lost = None;
        self.over = false;
    }

    /// Passes the current message on, without the refusal blocks' `CONTEXT`; PostgreSQL's own
    /// lock timeouts, serialization failures and deadlocks become DSQL's conflict.
    fn pass(&mut self, out: &mut Vec<u8>) {
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
            super::wire::append_message(out, b'E', &rewritten);
            return;
        }
        out.extend_from_slice(message);
    }
}

/// The rows a `CommandComplete` body says a write changed (`INSERT 0 n`, `UPDATE n`,
/// `DELETE n`, `MERGE n`); 0 for anything else.
fn written_rows(body: &[u8]) -> u64 {
    let tag = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body));
    let mut words = tag.split(' ');
    match words.next() {
        Some("INSERT" | "UPDATE" | "DELETE" | "MERGE") => {
            words.next_back().and_then(|n| n.parse().ok()).unwrap_or(0)
        }
        _ => 0,
    }
}

/// A field of an `ErrorResponse` body.
fn field(body: &[u8], name: u8) -> &[u8] {
    body.split(|b| *b == 0)
        .find_map(|field| field.strip_prefix(&[name]))
        .unwrap_or_default()
}

/// DSQL's data conflict.
pub(crate) fn change_conflict() -> Refusal {
    Refusal::new("40001", "change conflicts with another transaction (OC000)")
}

/// Whether an `ErrorResponse` body is PostgreSQL's own answer to a conflict over rows, not one
/// the relay raised itself: `Some(true)` for a row another transaction holds (`55P03`, the
/// lock timeout), `Some(false)` for one changed since the snapshot (`40001 could not
/// serialize access …`) or a deadlock (`40P01`).
fn conflict(body: &[u8]) -> Option<bool> {
    match field(body, b'C') {
        b"55P03" => Some(true),
        b"40P01" => Some(false),
        b"40001" if field(body, b'M').starts_with(b"could not serialize access") => Some(false),
        _ => None,
    }
}

/// Whether a DDL's error is PostgreSQL's answer to a concurrent change of the same object:
/// a duplicate in one of its catalog's unique indexes, a row type created meanwhile, or a
/// wait for the other change's locks; on DSQL the later change to commit gets `OC001`.
fn catalog_race(body: &[u8]) -> bool {
    let message = field(body, b'M');
    match field(body, b'C') {
        b"23505" => message.windows(4).any(|w| w == b"\"pg_"),
        b"42710" => message.starts_with(b"type \"") && message.ends_with(b"already exists"),
        b"55P03" | b"40P01" => true,
        b"40001" => message.starts_with(b"could not serialize access"),
        b"XX000" => message.starts_with(b"tuple concurrently"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(text: &str) -> Vec<u8> {
        query(text)
    }

    fn dialect() -> Dialect {
        Dialect::new(Plans::default(), Arc::default(), TRANSACTION_AGE_LIMIT)
    }

    /// Runs one whole client message through `d`: what goes upstream, as text, and the plans.
    fn send(d: &mut Dialect, whole: &[u8]) -> (String, Vec<Plan>) {
        let mut out = Outgoing::default();
        d.on_message(whole[0], &whole[5..], whole, &mut out);
        let plans = out.plans.iter().map(|p| p.plan).collect();
        (String::from_utf8_lossy(&out.bytes).into_owned(), plans)
    }

    #[test]
    fn one_ddl_per_transaction_and_no_ddl_with_dml() {
        let mut d = dialect();
        assert_eq!(send(&mut d, &q("BEGIN")).1, [Plan::Pass]);
        let (text, _) = send(&mut d, &q("CREATE TABLE a (id int)"));
        assert!(text.contains("CREATE TABLE a"));
        let (text, _) = send(&mut d, &q("CREATE TABLE b (id int)"));
        assert!(
            text.contains("multiple ddl statements not supported"),
            "{text}"
        );
        send(&mut d, &q("ROLLBACK"));
        // Autocommit: each query is its own transaction; a write that could cross the row
        // limit runs in one the relay opens, one whose text bounds its rows does not.
        send(&mut d, &q("CREATE TABLE a (id int)"));
        let (text, plans) = send(&mut d, &q("INSERT INTO a SELECT generate_series(1, 9)"));
        assert!(
            text.contains("BEGIN") && text.contains("INSERT INTO a"),
            "{text}"
        );
        assert_eq!(plans, [Plan::Swallow, autocommit()]);
        let (text, plans) = send(&mut d, &q("INSERT INTO a VALUES (1), (2)"));
        assert!(!text.contains("BEGIN"), "{text}");
        assert_eq!(plans, [Plan::Pass]);
        // A batch is one transaction.
        let (text, _) = send(
            &mut d,
            &q("CREATE TABLE c (id int); INSERT INTO c VALUES (1)"),
        );
        assert!(text.contains("ddl and dml are not supported"), "{text}");
        let (text, _) = send(
            &mut d,
            &q("DROP TABLE IF EXISTS c; CREATE TABLE c (id int)"),
        );
        assert!(text.contains("multiple ddl"), "{text}");
    }

    #[test]
    fn a_write_in_a_transaction_goes_after_a_savepoint_and_a_doomed_commit_fails() {
        let mut d = dialect();
        send(&mut d, &q("BEGIN"));
        let (text, plans) = send(&mut d, &q("UPDATE t SET v = 1 WHERE id = 1"));
        assert!(text.starts_with("Q"), "{text}");
        assert!(text.contains("SAVEPOINT dsql_emulator_occ") && text.contains("UPDATE t"));
        assert_eq!(plans, [Plan::Swallow, guard("UPDATE 1")]);
        // Reads are not guarded.
        assert_eq!(send(&mut d, &q("SELECT 1")).1, [Plan::Pass]);
        // The responder found the write lost: COMMIT raises OC000 and ends the transaction.
        d.plans.doomed.store(true, Ordering::SeqCst);
        let (text, plans) = send(&mut d, &q("COMMIT"));
        assert!(
            text.contains("ERRCODE = '40001'") && text.contains("(OC000)"),
            "{text}"
        );
        assert!(text.contains("ROLLBACK"));
        assert_eq!(plans, [Plan::Swallow, Plan::Pass]);
        assert!(!d.in_block);
        // The next transaction starts clean; its COMMIT waits for its validation, then goes
        // (and the relay waits for its answer, holding its commit ticket).
        send(&mut d, &q("BEGIN"));
        let mut out = Outgoing::default();
        let commit = q("COMMIT");
        d.on_message(b'Q', &commit[5..], &commit, &mut out);
        assert!(out.bytes.is_empty());
        assert_eq!(out.validate.as_ref().map(|v| v.replays.len()), Some(0));
        out.clear();
        d.after_validation(Ok(()), &mut out);
        assert_eq!(out.bytes, commit);
        assert!(out.gate && out.plans[0].report && out.plans[0].plan == Plan::Pass);
        assert!(!d.in_block);
    }

    #[test]
    fn every_commit_in_a_block_is_validated_whatever_its_shape() {
        let mut d = dialect();
        for round in 0..3 {
            send(&mut d, &q("BEGIN"));
            let mut out = Outgoing::default();
            for m in [parse("", "COMMIT"), bind(""), execute(), sync()] {
                d.on_message(m[0], &m[5..], &m, &mut out);
            }
            assert!(
                out.validate.is_some(),
                "round {round}: extended COMMIT validated"
            );
            out.clear();
            d.after_validation(Ok(()), &mut out);
            assert!(out.bytes.ends_with(&sync()) && out.gate);
            assert!(!d.in_block);
            send(&mut d, &q("BEGIN"));
            let mut out = Outgoing::default();
            let commit = q("/* tag */ END");
            d.on_message(b'Q', &commit[5..], &commit, &mut out);
            assert!(
                out.validate.is_some(),
                "round {round}: commented END validated"
            );
            out.clear();
            d.after_validation(Ok(()), &mut out);
        }
        // Outside a block a COMMIT has nothing to validate.
        let (text, plans) = send(&mut d, &q("COMMIT"));
        assert!(text.contains("COMMIT") && plans == [Plan::Pass]);
    }

    fn guard(tag: &'static str) -> Plan {
        Plan::Write {
            guard: Some(tag),
            autocommit: false,
            oversize: None,
        }
    }

    fn autocommit() -> Plan {
        Plan::Write {
            guard: None,
            autocommit: true,
            oversize: None,
        }
    }

    fn parse(name: &str, text: &str) -> Vec<u8> {
        let mut body = format!("{name}\0{text}\0").into_bytes();
        body.extend_from_slice(&[0, 0]);
        message(b'P', &body)
    }

    fn bind(statement: &str) -> Vec<u8> {
        message(b'B', format!("\0{statement}\0\0\0\0\0\0\0").as_bytes())
    }

    fn execute() -> Vec<u8> {
        message(b'E', b"\0\0\0\0\0")
    }

    fn sync() -> Vec<u8> {
        message(b'S', b"")
    }

    #[test]
    fn an_extended_batch_is_skipped_to_sync_and_sync_raises() {
        let mut d = dialect();
        assert_eq!(send(&mut d, &parse("s1", "TRUNCATE t")).0, "");
        assert_eq!(send(&mut d, &message(b'D', b"Ss1\0")).0, "");
        let (text, plans) = send(&mut d, &sync());
        assert!(text.contains("ERRCODE = '0A000', MESSAGE = 'unsupported statement: Truncate'"));
        assert_eq!(plans, [Plan::Pass]);
        // The next batch runs normally, held to its Sync.
        let select = parse("s1", "SELECT 1");
        assert_eq!(send(&mut d, &select).0, "");
        send(&mut d, &bind("s1"));
        send(&mut d, &execute());
        let (text, plans) = send(&mut d, &sync());
        let mut expected = select.clone();
        expected.extend_from_slice(&bind("s1"));
        expected.extend_from_slice(&execute());
        expected.extend_from_slice(&sync());
        assert_eq!(text.as_bytes(), expected.as_slice());
        assert_eq!(plans, [Plan::Pass]);
        // A Flush sends what is held on at once.
        send(&mut d, &parse("s2", "SELECT 2"));
        let (text, _) = send(&mut d, &message(b'H', b""));
        assert!(text.contains("SELECT 2"), "{text}");
        send(&mut d, &sync());
        // ASYNC DDL goes as the SELECT that runs it and answers its job, with its own tag.
        send(&mut d, &parse("s1", "CREATE INDEX ASYNC i ON t (v)"));
        let (text, _) = send(&mut d, &sync());
        let expected = parse(
            "s1",
            "SELECT sys.dsql_emulator_ddl_job($dsql_emulator_ddl$CREATE INDEX  i ON t \
             (v)$dsql_emulator_ddl$, 'INDEX_BUILD', '\"t\"', 'i') AS job_id",
        );
        // (Compared as text: its length is not UTF-8.)
        assert!(
            text.starts_with(&*String::from_utf8_lossy(&expected)),
            "{text}"
        );
        send(&mut d, &bind("s1"));
        send(&mut d, &execute());
        let (_, plans) = send(&mut d, &sync());
        // (After the lock timeout a DDL waits under.)
        assert_eq!(
            plans,
            [
                Plan::Swallow,
                Plan::Job {
                    tag: "CREATE INDEX",
                    described: true
                }
            ]
        );
    }

    #[test]
    fn what_the_relay_adds_for_a_write_goes_before_the_whole_batch() {
        let mut d = dialect();
        // Autocommit: the batch (unnamed statement and all) runs in a transaction of its own.
        send(&mut d, &parse("", "UPDATE t SET v = $1"));
        send(&mut d, &bind(""));
        send(&mut d, &execute());
        let (text, plans) = send(&mut d, &sync());
        let begin = query("BEGIN");
        assert!(text.as_bytes().starts_with(&begin), "{text}");
        assert!(text.as_bytes()[begin.len()..].starts_with(&parse("", "UPDATE t SET v = $1")));
        assert_eq!(plans, [Plan::Swallow, autocommit()]);
        // Unless its text bounds its rows within the limit.
        send(&mut d, &parse("", "INSERT INTO t VALUES ($1)"));
        send(&mut d, &bind(""));
        send(&mut d, &execute());
        let (text, plans) = send(&mut d, &sync());
        assert!(
            text.as_bytes()
                .starts_with(&parse("", "INSERT INTO t VALUES ($1)"))
        );
        assert_eq!(plans, [Plan::Pass]);
        // In a transaction the savepoint goes before the Parse.
        send(&mut d, &q("BEGIN"));
        send(&mut d, &parse("", "DELETE FROM t WHERE id = $1"));
        send(&mut d, &bind(""));
        send(&mut d, &execute());
        let (text, plans) = send(&mut d, &sync());
        assert!(text.as_bytes().starts_with(&savepoint_query()), "{text}");
        assert_eq!(plans, [Plan::Swallow, guard("DELETE 1")]);
        // Binding the unnamed statement of an earlier batch: nothing can go before it.
        send(&mut d, &bind(""));
        send(&mut d, &execute());
        let (text, plans) = send(&mut d, &sync());
        assert!(text.as_bytes().starts_with(&bind("")), "{text}");
        assert_eq!(
            plans,
            [Plan::Write {
                guard: None,
                autocommit: false,
                oversize: None,
            }]
        );
        // A named statement bound in a later batch gets its savepoint.
        send(&mut d, &parse("w", "UPDATE t SET v = 1"));
        send(&mut d, &sync());
        send(&mut d, &bind("w"));
        send(&mut d, &execute());
        let mut out = Outgoing::default();
        let whole = sync();
        d.on_message(b'S', b"", &whole, &mut out);
        assert!(out.gate);
        let plans: Vec<Plan> = out.plans.iter().map(|p| p.plan).collect();
        assert_eq!(plans, [Plan::Swallow, guard("UPDATE 1")]);
    }

    fn error(code: &str, extra: &[u8]) -> Vec<u8> {
        let mut body = format!("SERROR\0C{code}\0Mnope\0").into_bytes();
        body.extend_from_slice(extra);
        body.push(0);
        message(b'E', &body)
    }

    fn responder_for(plans: &[Plan]) -> (Responder, tokio::sync::mpsc::Receiver<Reply>) {
        let shared = Plans::default();
        for plan in plans {
            shared.push(Planned::new(*plan));
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        (Responder::new(shared, tx), rx)
    }

    #[test]
    fn the_refusal_context_is_taken_out_across_any_split() {
        let mut stream = message(b'C', b"SELECT 1\0");
        stream.extend_from_slice(&error("0A000", RAISE_CONTEXT));
        stream.extend_from_slice(&message(b'Z', b"I"));
        let mut expected = message(b'C', b"SELECT 1\0");
        expected.extend_from_slice(&error("0A000", b""));
        expected.extend_from_slice(&message(b'Z', b"I"));
        for split in 0..stream.len() {
            let (mut responder, _rx) = responder_for(&[Plan::Pass]);
            let mut out = Vec::new();
            responder.feed(&stream[..split], &mut out);
            responder.feed(&stream[split..], &mut out);
            assert_eq!(out, expected, "split at {split}");
        }
    }

    #[test]
    fn a_lost_write_is_told_its_tag_and_rolled_back_to_its_savepoint() {
        // SAVEPOINT's answer (swallowed), then the write's: it timed out on a row an open
        // transaction holds, so it is pending (replayed at COMMIT), not lost.
        let answer = |code: &str, message: &str| {
            let mut stream = super::message(b'C', b"SAVEPOINT\0");
            stream.extend_from_slice(&super::message(b'Z', b"T"));
            stream.extend_from_slice(&super::message(b'2', b""));
            let body = format!("SERROR\0C{code}\0M{message}\0\0");
            stream.extend_from_slice(&super::message(b'E', body.as_bytes()));
            stream.extend_from_slice(&super::message(b'Z', b"E"));
            stream
        };
        let mut expected = message(b'2', b"");
        expected.extend_from_slice(&message(b'C', b"UPDATE 1\0"));
        expected.extend_from_slice(&message(b'Z', b"T"));
        let rollback = vec![(
            query("ROLLBACK TO SAVEPOINT dsql_emulator_occ"),
            Plan::Swallow,
        )];
        let (mut responder, mut rx) = responder_for(&[Plan::Swallow, guard("UPDATE 1")]);
        let mut out = Vec::new();
        responder.feed(
            &answer("55P03", "canceling statement due to lock timeout"),
            &mut out,
        );
        assert_eq!(out, expected);
        assert!(!responder.plans.doomed.load(Ordering::SeqCst));
        let reply = rx.try_recv().unwrap();
        assert!(reply.pending && !reply.failed, "{reply:?}");
        assert_eq!(reply.requests, rollback);
        assert!(responder.plans.lock().is_empty());

        // Against a row a transaction changed and committed since: lost for good.
        let (mut responder, mut rx) = responder_for(&[Plan::Swallow, guard("UPDATE 1")]);
        let mut out = Vec::new();
        let serialization = "could not serialize access due to concurrent update";
        responder.feed(&answer("40001", serialization), &mut out);
        assert_eq!(out, expected);
        assert!(responder.plans.doomed.load(Ordering::SeqCst));
        let reply = rx.try_recv().unwrap();
        assert!(!reply.pending, "{reply:?}");
        assert_eq!(reply.requests, rollback);

        // Another error is the client's own: passed on, nothing doomed.
        let (mut responder, mut rx) = responder_for(&[guard("UPDATE 1")]);
        let mut stream = error("23505", b"");
        stream.extend_from_slice(&message(b'Z', b"E"));
        let mut out = Vec::new();
        responder.feed(&stream, &mut out);
        assert_eq!(out, stream);
        // Nothing to send, but the upstream side is told to read on.
        let reply = rx.try_recv().unwrap();
        assert!(reply.requests.is_empty() && reply.failed);
        assert_eq!(responder.plans.settled_status(), Some(b'E'));
        assert!(!responder.plans.doomed.load(Ordering::SeqCst));

        // Elsewhere PostgreSQL's own lock timeout and deadlock reach the client as DSQL's
        // conflict.
        for code in ["55P03", "40P01"] {
            let (mut responder, _rx) = responder_for(&[Plan::Pass]);
            let mut out = Vec::new();
            responder.feed(&error(code, b""), &mut out);
            assert!(
                String::from_utf8_lossy(&out)
                    .contains("C40001\0Mchange conflicts with another transaction (OC000)"),
                "{out:?}"
            );
        }

        // A doomed COMMIT: the ROLLBACK's answer dropped, then the error and its
        // ReadyForQuery.
        let (mut responder, _rx) = responder_for(&[Plan::Swallow, Plan::Pass]);
        let mut stream = message(b'C', b"ROLLBACK\0");
        stream.extend_from_slice(&message(b'Z', b"I"));
        stream.extend_from_slice(&error("40001", RAISE_CONTEXT));
        stream.extend_from_slice(&message(b'Z', b"I"));
        let mut out = Vec::new();
        responder.feed(&stream, &mut out);
        let mut expected = error("40001", b"");
        expected.extend_from_slice(&message(b'Z', b"I"));
        assert_eq!(out, expected);
    }

    #[test]
    fn an_answer_no_plan_accounts_for_closes_the_session_with_a_fatal() {
        // A ReadyForQuery with no request awaiting it: every later answer would go to the
        // wrong request.
        let (mut responder, _rx) = responder_for(&[]);
        let mut out = Vec::new();
        assert!(!responder.feed(&message(b'Z', b"I"), &mut out));
        let text = String::from_utf8_lossy(&out);
        assert!(out.starts_with(b"E") && text.contains("SFATAL"), "{text}");
        assert!(text.contains("lost track of this session"), "{text}");
        // The relay's own statement failing (not in an aborted block): its picture is wrong.
        let (mut responder, _rx) = responder_for(&[Plan::Swallow]);
        let mut out = Vec::new();
        let mut stream = error("3B001", b"");
        stream.extend_from_slice(&message(b'Z', b"E"));
        assert!(!responder.feed(&stream, &mut out));
        assert!(String::from_utf8_lossy(&out).contains("relay's own statement failed"));
        // In an aborted block, its statements fail as the client's do: not a mismatch.
        let (mut responder, _rx) = responder_for(&[Plan::Swallow]);
        let mut out = Vec::new();
        let mut stream = error("25P02", b"");
        stream.extend_from_slice(&message(b'Z', b"E"));
        assert!(responder.feed(&stream, &mut out));
        assert!(out.is_empty());
    }
}
