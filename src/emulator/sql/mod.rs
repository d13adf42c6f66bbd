//! DSQL's SQL dialect in front of PostgreSQL (`DsqlEmulatorBuilder::sql_rules`).
//!
//! ## Approach
//!
//! The relay reads the client's PostgreSQL v3 messages (not bytes). Each `Query` and each
//! `Parse` is read with PostgreSQL's own parser (`pg_query`) and checked against DSQL's rules
//! (`rules.rs`: statements and types DSQL refuses, sequence and identity caches, index and
//! `ALTER TABLE` forms, isolation levels, `SET`, savepoints, SQL-level `PREPARE`); `Execute`
//! and every statement of a `Query` are checked against the transaction rules (one DDL per
//! transaction, no DDL with DML) using the transaction state the session's statements imply.
//! DSQL's `CREATE INDEX ASYNC` and `ALTER TABLE ASYNC … VALIDATE` are recognised with
//! PostgreSQL's scanner and sent on without `ASYNC`. The messages of an extended-protocol
//! batch are held until its `Sync` (or a `Flush`), so that whatever the relay puts before a
//! write (a savepoint, a `BEGIN`) goes before the whole batch: a simple `Query` in the middle
//! of a batch would drop its unnamed statement, and be ignored after an error in it.
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
//! DSQL never makes a writer wait: both writers of a row get their `UPDATE 1` at once, and the
//! second fails at `COMMIT` with `40001 change conflicts with another transaction (OC000)`.
//! PostgreSQL behind the relay would make the second writer wait on the row lock, then (at
//! REPEATABLE READ) fail its statement. So:
//!
//! - Upstream sessions start with `lock_timeout` = [`LOCK_TIMEOUT`]. Inside a transaction
//!   block, each `INSERT`/`UPDATE`/`DELETE` without `RETURNING` goes upstream right after an
//!   injected `SAVEPOINT` (pipelined: no extra round trip), whose answer is dropped
//!   ([`Plan::Swallow`]); the write's answer is watched (`guard` of [`Plan::Write`]). A
//!   `55P03` lock timeout or PostgreSQL's `40001 could not serialize access` on it means a concurrent
//!   writer holds or changed a row: the [`Responder`] drops the error, asks the upstream side
//!   for `ROLLBACK TO SAVEPOINT`, marks the transaction doomed, and tells the client the
//!   statement's tag. A doomed transaction's `COMMIT` becomes the `DO` refusal with
//!   `40001 … (OC000)` followed by a `ROLLBACK` ([`Plan::AllButReady`], [`Plan::OnlyReady`]),
//!   so the client sees the error and a session outside any transaction, as on DSQL.
//! - Everywhere else PostgreSQL's own `55P03` and `could not serialize access` reach the
//!   client as DSQL's `OC000` (a write with `RETURNING`, `SELECT … FOR UPDATE`, autocommit):
//!   at the statement, which the retry helpers handle as well.
//! - Foreign-key checks take key-share locks on parent rows, so deleting a parent while its
//!   child is inserted conflicts, and referential actions too; non-key updates and disjoint
//!   rows never wait, so never conflict.
//! - `OC001`: [`Catalog`] records each committed catalog change (DDL, `GRANT`, `REVOKE`;
//!   outside a block when sent, inside one at its `COMMIT`) with the relations it names
//!   (`pg_query`'s table list, without schema); a session that had used one of them gets the
//!   `DO` refusal `40001 schema has been updated by another transaction (OC001)` on its next
//!   statement naming it, once.
//!
//! ## Transaction limits
//!
//! - Rows (3 000): each request that writes ([`Plan::Write`]) is answered before the relay
//!   sends anything more upstream; the [`Responder`] adds up the row counts of the
//!   transaction's command tags. A write outside a transaction block runs in a transaction the
//!   relay opens (a pipelined `BEGIN`) and ends once its answer is in: `COMMIT`, or
//!   `ROLLBACK` when it crossed the limit; not one whose text bounds its rows within the limit
//!   (`INSERT … VALUES`), nor a request with `COPY … FROM STDIN`, whose answer waits for the
//!   client's data (the relay must not wait for it). Inside a block the statement that crosses it is
//!   answered `54000 transaction row limit exceeded` by a `DO` refusal, which aborts the block.
//! - Age (300 s, [`TRANSACTION_AGE_LIMIT`], or the builder's): the first statement after it
//!   gets `54000 transaction age limit of 300s exceeded` with DSQL's DETAIL and aborts the
//!   block; a `COMMIT` then fails and ends it.
//! - Size: 1 MiB a value (refused at the statement, named by the parameter's type), 10 MiB a
//!   transaction (its `COMMIT` fails, [`TX_SIZE_LIMIT`]), and a message over
//!   [`MESSAGE_LIMIT`] closes the connection.
//!
//! ## Known deviations
//!
//! - The loser of a conflict is the second *writer*, not always the second to commit; a lost
//!   write's tag says one row; a doomed transaction does not read its own lost write; a write
//!   that waits on something other than a row (a table lock held by DDL) counts as a
//!   conflict. A DDL that PostgreSQL then refuses still counts as a schema change. Relation
//!   names are compared without their schema.
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
//! - A DDL on a table that another session's open transaction has used meets PostgreSQL's
//!   lock, times out and reports `OC000`; on DSQL it goes through and the other transaction
//!   fails with `OC001` (a change that takes no such lock, `GRANT`, does that here too).
//! - Row limit: rows of a write's `RETURNING` reach the client before the `54000`; a query
//!   text that opens and commits its own block (`BEGIN; INSERT …; COMMIT` in one `Query`) is
//!   counted but not stopped; writes inside a `WITH`, and `COPY`, are not counted. An
//!   autocommit write whose text does not bound its rows costs one more round trip to
//!   PostgreSQL (its `COMMIT`), and pipelined requests behind a write wait for its answer. A batch that binds the unnamed statement of
//!   an earlier batch, or was flushed before its `Sync`, gets no savepoint and, in
//!   autocommit, no row limit.
//! - The transaction rules follow the statements the relay has seen, as it reads them: a
//!   client pipelining statements across a failed one may see a rule applied to a statement
//!   PostgreSQL then skips.
//! - Rules apply when a statement is parsed (`Parse`) and, for the transaction rules, when it
//!   is executed; DSQL may apply some later (at `Bind`).

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
}

/// Requests the server-to-client side sends upstream (with their plans) when the answer to a
/// [`Plan::Write`] is in; possibly none: either way the upstream side reads on.
pub(crate) type Requests = Vec<(Vec<u8>, Plan)>;

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
/// directions of a session; and whether the session's transaction lost a conflict.
#[derive(Debug, Default, Clone)]
pub(crate) struct Plans {
    queue: Arc<Mutex<VecDeque<Plan>>>,
    doomed: Arc<AtomicBool>,
}

impl Plans {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Plan>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues the plan of a request about to be sent upstream.
    pub(crate) fn push(&self, plan: Plan) {
        self.lock().push_back(plan);
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
    pub(crate) plans: Vec<Plan>,
    /// They end with a request that writes ([`Plan::Write`]): nothing more goes upstream
    /// until the [`Responder`] has its answer.
    pub(crate) gate: bool,
    /// The client sent a message over [`MESSAGE_LIMIT`]: DSQL closes the connection.
    pub(crate) close: bool,
}

impl Outgoing {
    /// Whole messages; `plan` when they end with a `Query` or `Sync`.
    fn push(&mut self, bytes: &[u8], plan: Option<Plan>) {
        self.bytes.extend_from_slice(bytes);
        self.gate |= matches!(plan, Some(Plan::Write { .. }));
        self.plans.extend(plan);
    }

    /// Empties it for the next round.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.plans.clear();
        self.gate = false;
        self.close = false;
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

/// A portal: its statement, and the bytes of the values bound to it.
#[derive(Debug, Clone)]
struct Portal {
    statement: String,
    bytes: u64,
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
    /// The messages of the current extended-protocol batch not sent yet.
    held: Vec<u8>,
    /// What the current extended-protocol batch does.
    batch: Batch,
    /// Query texts already read (a service sends the same few again and again).
    cache: HashMap<String, Classified>,
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
}

#[derive(Debug, Clone, Copy)]
struct BatchWrite {
    in_block: bool,
    tag: Option<&'static str>,
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
        out.push(&raise_query(refusal), Some(Plan::AllButReady));
        out.push(&query("ROLLBACK"), Some(Plan::OnlyReady));
        self.plans.doomed.store(false, Ordering::SeqCst);
        self.set_transaction(Transaction::default());
        self.pending_ddl.clear();
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
    /// would be ignored after an error in it.
    pub(crate) fn on_message(&mut self, tag: u8, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let skipping = self.skipping.is_some();
        match tag {
            b'P' => self.on_parse(body, whole, out),
            b'B' if !skipping => self.on_bind(body, whole, out),
            b'E' if !skipping => self.on_execute(body, whole, out),
            b'S' => self.on_sync(whole, out),
            b'C' if !skipping => {
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
            b'D' if !skipping => self.hold(whole, out),
            b'B' | b'E' | b'C' | b'D' | b'H' if skipping => {}
            b'H' => {
                self.release(out);
                out.push(whole, None);
            }
            b'Q' => {
                self.release(out);
                self.on_query(body, whole, out);
            }
            _ => {
                self.release(out);
                out.push(whole, None);
            }
        }
    }

    /// Holds a message of the current extended-protocol batch.
    fn hold(&mut self, whole: &[u8], out: &mut Outgoing) {
        self.held.extend_from_slice(whole);
        if self.held.len() > HELD_LIMIT {
            self.release(out);
        }
    }

    /// Sends the held messages of the batch on now; nothing can go before them any more.
    fn release(&mut self, out: &mut Outgoing) {
        if !self.held.is_empty() {
            out.push(&self.held, None);
            self.held.clear();
            self.batch.released = true;
        }
    }

    /// The end of an extended-protocol batch: what goes before it, and the plan of its answer.
    fn on_sync(&mut self, whole: &[u8], out: &mut Outgoing) {
        let batch = std::mem::take(&mut self.batch);
        let held = std::mem::take(&mut self.held);
        if let Some(refusal) = self.skipping.take() {
            out.push(&held, None);
            out.push(&raise_query(&refusal), Some(Plan::Pass));
        } else {
            let oversize = (self.tx_bytes > TX_SIZE_LIMIT).then_some(self.tx_bytes);
            let write = |guard, autocommit: bool| Plan::Write {
                guard,
                autocommit,
                oversize: oversize.filter(|_| autocommit),
            };
            let (prefix, plan) = match batch.write {
                None => match batch.job {
                    Some(tag) => (
                        None,
                        Plan::Job {
                            tag,
                            described: batch.executes == 1,
                        },
                    ),
                    None => (None, Plan::Pass),
                },
                // The relay would wait for the answer while the server waits for the data.
                Some(_) if batch.copy_in => (None, Plan::Pass),
                // Too late, or it would drop the unnamed statement the batch binds.
                Some(_) if batch.released || batch.reuses_unnamed => (None, write(None, false)),
                // A write in a transaction goes after a savepoint, to be undone alone if it
                // loses a conflict (one statement a batch: several writes cannot be told apart,
                // and a batch that also opens the block would get the savepoint before it).
                Some(w) if w.in_block => match (batch.executes, w.tag) {
                    (1, Some(tag)) => (Some(savepoint_query()), write(Some(tag), false)),
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
            out.push(&held, None);
            out.push(whole, Some(plan));
        }
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

    fn classified(&mut self, text: &str) -> Classified {
        if let Some(hit) = self.cache.get(text) {
            return hit.clone();
        }
        let classified = rules::classify(text);
        if self.cache.len() >= CACHE_LIMIT {
            self.cache.clear();
        }
        self.cache.insert(text.to_owned(), classified.clone());
        classified
    }

    fn on_query(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let text = String::from_utf8_lossy(body.strip_suffix(&[0]).unwrap_or(body)).into_owned();
        let classified = self.classified(&text);
        if let Some(refusal) = classified.statements.iter().find_map(|s| s.refusal.clone()) {
            self.end_of_implicit_transaction();
            return out.push(&raise_query(&refusal), Some(Plan::Pass));
        }
        let ends_block = matches!(classified.statements.as_slice(),
            [statement] if statement.kind == Kind::End);
        if let Some(refusal) = self.too_old() {
            // Only ROLLBACK gets through; COMMIT fails and ends the block.
            if ends_block && is_commit(&text) {
                return self.fail_commit(&refusal, out);
            }
            if !ends_block {
                return out.push(&raise_query(&refusal), Some(Plan::Pass));
            }
        }
        if ends_block && self.in_block && is_commit(&text) {
            // A transaction that lost a conflict fails at COMMIT, as on DSQL, and is over; so
            // does one whose tables another session changed meanwhile.
            if self.plans.doomed.load(Ordering::SeqCst) {
                return self.fail_commit(
                    &Refusal::new("40001", "change conflicts with another transaction (OC000)"),
                    out,
                );
            }
            if let Some(refusal) = self.commit_schema_check() {
                return self.fail_commit(&refusal, out);
            }
            if self.tx_bytes > TX_SIZE_LIMIT {
                return self.fail_commit(&size_limit_exceeded(self.tx_bytes), out);
            }
        }
        if let Some(refusal) = self.schema_check(&classified.tables) {
            self.end_of_implicit_transaction();
            return out.push(&raise_query(&refusal), Some(Plan::Pass));
        }
        // The whole query runs as one implicit transaction unless it opens or is in a block.
        let mut state = self.transaction();
        for statement in &classified.statements {
            if let Err(refusal) = state.apply(statement.kind) {
                self.end_of_implicit_transaction();
                return out.push(&raise_query(&refusal), Some(Plan::Pass));
            }
        }
        let kinds: Vec<Kind> = classified.statements.iter().map(|s| s.kind).collect();
        let ends = !state.in_block;
        if ends && kinds.contains(&Kind::End) && !is_commit(&text) && !kinds.contains(&Kind::Ddl) {
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
        let (prefix, plan) = if !kinds.contains(&Kind::Dml) || copy_in {
            // (With `COPY … FROM STDIN` the relay would wait for the answer while the server
            // waits for the data.)
            (None, Plan::Pass)
        } else if self.in_block {
            // A write in a transaction goes after a savepoint, to be undone alone if it loses
            // a conflict.
            match classified.statements.as_slice() {
                [
                    Statement {
                        write_tag: Some(tag),
                        ..
                    },
                ] => (Some(savepoint_query()), write(Some(*tag), false)),
                _ => (None, write(None, false)),
            }
        } else if kinds.iter().any(|k| matches!(k, Kind::Begin | Kind::End)) {
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
        if state.in_block != self.in_block || !state.in_block {
            // A new transaction, or the end of one: nothing lost yet.
            self.plans.doomed.store(false, Ordering::SeqCst);
        }
        self.set_transaction(state);
        self.end_of_implicit_transaction();
        if let Some(prefix) = prefix {
            out.push(&prefix, Some(Plan::Swallow));
        }
        let plan = match classified.job {
            Some(tag) => Plan::Job {
                tag,
                described: false,
            },
            None => plan,
        };
        if classified.upstream_text == text {
            out.push(whole, Some(plan));
        } else {
            out.push(&query(&classified.upstream_text), Some(plan));
        }
    }

    fn on_parse(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        if self.skipping.is_some() {
            return;
        }
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
            self.portals.insert(
                String::from_utf8_lossy(portal).into_owned(),
                Portal { statement, bytes },
            );
        }
        self.hold(whole, out);
    }

    fn on_execute(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let portal = body.split(|b| *b == 0).next().unwrap_or_default();
        let portal = self.portals.get(String::from_utf8_lossy(portal).as_ref());
        let bytes = portal.map_or(0, |p| p.bytes);
        let prepared = portal
            .and_then(|portal| self.statements.get(&portal.statement))
            .cloned()
            .unwrap_or_else(other);
        if let Some(refusal) = self.too_old().filter(|_| prepared.kind != Kind::End) {
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
                if state.in_block != self.in_block {
                    self.plans.doomed.store(false, Ordering::SeqCst);
                }
                self.set_transaction(state);
                self.note_catalog_change(&[prepared.kind], &prepared.tables, !state.in_block);
                if prepared.kind == Kind::Dml {
                    self.tx_bytes += bytes;
                }
                let batch = &mut self.batch;
                batch.executes += 1;
                batch.copy_in |= prepared.copy_in;
                batch.job = batch.job.or(prepared.job);
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
                        });
                    }
                    Kind::Begin | Kind::End => batch.transaction_statement = true,
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

/// Whether a transaction-ending statement commits (`COMMIT`, `END`, `COMMIT WORK`).
fn is_commit(text: &str) -> bool {
    let word = text
        .trim_start()
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or_default();
    word.eq_ignore_ascii_case("commit") || word.eq_ignore_ascii_case("end")
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
            Kind::End => *self = Transaction::default(),
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
/// blocks' `CONTEXT` out of errors; counts the rows each transaction writes; and, when the
/// answer to a write is in, tells the upstream side what to send next (the rollback of a lost
/// write, the end of an autocommit write's transaction, the row-limit refusal).
#[derive(Debug)]
pub(crate) struct Responder {
    plans: Plans,
    /// Requests for the upstream side, which waits for them after each write.
    upstream: tokio::sync::mpsc::UnboundedSender<Requests>,
    /// The framing of the server's messages.
    framer: super::wire::Framer,
    /// The current message, header included.
    current: Vec<u8>,
    /// The current guarded write lost its conflict.
    lost: bool,
    /// Rows written in the current transaction.
    rows: u64,
    /// The current write crossed the row limit.
    over: bool,
    /// The rows now coming are a job's (after its `RowDescription`).
    job_rows: bool,
}

impl Responder {
    pub(crate) fn new(
        plans: Plans,
        upstream: tokio::sync::mpsc::UnboundedSender<Requests>,
    ) -> Self {
        Responder {
            plans,
            upstream,
            framer: super::wire::Framer::new(usize::MAX),
            current: Vec::new(),
            lost: false,
            rows: 0,
            over: false,
            job_rows: false,
        }
    }

    /// Appends to `out` what the client should get for the next `data` from the server.
    pub(crate) fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let mut framer = std::mem::replace(&mut self.framer, super::wire::Framer::new(0));
        framer.feed(data, |message| {
            std::mem::swap(&mut self.current, message);
            self.finish(out);
        });
        self.framer = framer;
    }

    /// One whole server message in `self.current`.
    fn finish(&mut self, out: &mut Vec<u8>) {
        let tag = self.current[0];
        let plan = self.plans.lock().front().copied().unwrap_or(Plan::Pass);
        let ready = tag == b'Z';
        match plan {
            Plan::Pass => self.pass(out),
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
        }
        if ready {
            // Outside any transaction now: the next one starts with no rows written.
            if self.current.get(5) == Some(&b'I') {
                self.rows = 0;
            }
            self.plans.lock().pop_front();
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
            b'E' if guard.is_some() && native_conflict(&self.current[5..]) => self.lost = true,
            b'Z' => self.end_of_write(guard, autocommit, oversize, out),
            _ if self.lost || self.over => {}
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
        let mut requests: Requests = Vec::new();
        if let (true, Some(told)) = (self.lost, guard) {
            // Undo the write alone, and tell the client it went through.
            requests.push((
                query(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}")),
                Plan::Swallow,
            ));
            self.plans.doomed.store(true, Ordering::SeqCst);
            let mut complete = told.as_bytes().to_vec();
            complete.push(0);
            super::wire::append_message(out, b'C', &complete);
            super::wire::append_message(out, b'Z', b"T");
        } else if self.over && autocommit {
            error_response(&row_limit_exceeded(), out);
            requests.push((query("ROLLBACK"), Plan::OnlyReady));
        } else if self.over && status == b'T' {
            // PostgreSQL fails the transaction block, as DSQL does.
            requests.push((raise_query(&row_limit_exceeded()), Plan::Pass));
        } else if self.over && status == b'E' {
            error_response(&row_limit_exceeded(), out);
            self.pass(out);
        } else if let (true, Some(bytes), b'T') = (autocommit, oversize, status) {
            // Checked at COMMIT, as DSQL does.
            error_response(&size_limit_exceeded(bytes), out);
            requests.push((query("ROLLBACK"), Plan::OnlyReady));
        } else if autocommit && status == b'T' {
            requests.push((query("COMMIT"), Plan::Finish));
        } else if autocommit {
            requests.push((query("ROLLBACK"), Plan::OnlyReady));
        } else {
            // Over the limit in a block the query itself committed: too late (see the docs).
            self.pass(out);
        }
        self.lost = false;
        self.over = false;
        let _ = self.upstream.send(requests);
    }

    /// Passes the current message on, without the refusal blocks' `CONTEXT`; PostgreSQL's own
    /// lock timeouts and serialization failures become DSQL's conflict.
    fn pass(&mut self, out: &mut Vec<u8>) {
        let message = &self.current;
        if message[0] == b'E' && native_conflict(&message[5..]) {
            let body =
                b"SERROR\0VERROR\0C40001\0Mchange conflicts with another transaction (OC000)\0\0";
            super::wire::append_message(out, b'E', body);
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

/// Whether an `ErrorResponse` body is PostgreSQL's own answer to a row another transaction
/// holds (`55P03` lock timeout) or changed since the snapshot (`40001 could not serialize
/// access …`), not a conflict the relay raised itself.
fn native_conflict(body: &[u8]) -> bool {
    let field = |name: u8| {
        body.split(|b| *b == 0)
            .find_map(|field| field.strip_prefix(&[name]))
            .unwrap_or_default()
    };
    match field(b'C') {
        b"55P03" => true,
        b"40001" => field(b'M').starts_with(b"could not serialize access"),
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
        (String::from_utf8_lossy(&out.bytes).into_owned(), out.plans)
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
        assert_eq!(plans, [Plan::AllButReady, Plan::OnlyReady]);
        assert!(!d.in_block);
        // The next transaction starts clean.
        send(&mut d, &q("BEGIN"));
        assert_eq!(send(&mut d, &q("COMMIT")).1, [Plan::Pass]);
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
        assert_eq!(
            plans,
            [Plan::Job {
                tag: "CREATE INDEX",
                described: true
            }]
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
        assert_eq!(out.plans, [Plan::Swallow, guard("UPDATE 1")]);
    }

    fn error(code: &str, extra: &[u8]) -> Vec<u8> {
        let mut body = format!("SERROR\0C{code}\0Mnope\0").into_bytes();
        body.extend_from_slice(extra);
        body.push(0);
        message(b'E', &body)
    }

    fn responder_for(
        plans: &[Plan],
    ) -> (Responder, tokio::sync::mpsc::UnboundedReceiver<Requests>) {
        let shared = Plans::default();
        for plan in plans {
            shared.push(*plan);
        }
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
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
        // SAVEPOINT's answer (swallowed), then the write's: it timed out on a row lock.
        let mut stream = message(b'C', b"SAVEPOINT\0");
        stream.extend_from_slice(&message(b'Z', b"T"));
        stream.extend_from_slice(&message(b'2', b""));
        stream.extend_from_slice(&error("55P03", b""));
        stream.extend_from_slice(&message(b'Z', b"E"));
        let (mut responder, mut rx) = responder_for(&[Plan::Swallow, guard("UPDATE 1")]);
        let mut out = Vec::new();
        responder.feed(&stream, &mut out);
        let mut expected = message(b'2', b"");
        expected.extend_from_slice(&message(b'C', b"UPDATE 1\0"));
        expected.extend_from_slice(&message(b'Z', b"T"));
        assert_eq!(out, expected);
        assert!(responder.plans.doomed.load(Ordering::SeqCst));
        assert_eq!(
            rx.try_recv().unwrap(),
            [(
                query("ROLLBACK TO SAVEPOINT dsql_emulator_occ"),
                Plan::Swallow
            )]
        );
        assert!(responder.plans.lock().is_empty());

        // Another error is the client's own: passed on, nothing doomed.
        let (mut responder, mut rx) = responder_for(&[guard("UPDATE 1")]);
        let mut stream = error("23505", b"");
        stream.extend_from_slice(&message(b'Z', b"E"));
        let mut out = Vec::new();
        responder.feed(&stream, &mut out);
        assert_eq!(out, stream);
        // Nothing to send, but the upstream side is told to read on.
        assert_eq!(rx.try_recv().unwrap(), []);
        assert!(!responder.plans.doomed.load(Ordering::SeqCst));

        // Elsewhere PostgreSQL's own lock timeout reaches the client as DSQL's conflict.
        let (mut responder, _rx) = responder_for(&[Plan::Pass]);
        let mut out = Vec::new();
        responder.feed(&error("55P03", b""), &mut out);
        assert!(
            String::from_utf8_lossy(&out)
                .contains("C40001\0Mchange conflicts with another transaction (OC000)"),
            "{out:?}"
        );

        // A doomed COMMIT: the error without its ReadyForQuery, then only the ROLLBACK's.
        let (mut responder, _rx) = responder_for(&[Plan::AllButReady, Plan::OnlyReady]);
        let mut stream = error("40001", RAISE_CONTEXT);
        stream.extend_from_slice(&message(b'Z', b"E"));
        stream.extend_from_slice(&message(b'C', b"ROLLBACK\0"));
        stream.extend_from_slice(&message(b'Z', b"I"));
        let mut out = Vec::new();
        responder.feed(&stream, &mut out);
        let mut expected = error("40001", b"");
        expected.extend_from_slice(&message(b'Z', b"I"));
        assert_eq!(out, expected);
    }
}
