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
//! PostgreSQL's scanner and sent on without `ASYNC`.
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
//!   ([`Plan::Swallow`]); the write's answer is watched ([`Plan::Guard`]). A `55P03` lock
//!   timeout or PostgreSQL's `40001 could not serialize access` on it means a concurrent
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
//! ## Known deviations
//!
//! - The loser of a conflict is the second *writer*, not always the second to commit; a lost
//!   write's tag says one row; a doomed transaction does not read its own lost write; a write
//!   that waits on something other than a row (a table lock held by DDL) counts as a
//!   conflict. A DDL that PostgreSQL then refuses still counts as a schema change. Relation
//!   names are compared without their schema.
//! - Not yet emulated: the 3 000-row, 10 MiB and 300 s transaction limits, `CREATE INDEX
//!   ASYNC`'s `job_id` row and `sys.jobs` / `sys.wait_for_job`, the per-value and per-table
//!   limits of §8, refusing to drop a primary-key column, full-text search configurations,
//!   `version()`. The 3 000-row limit fits the plan above: the write tags of a transaction
//!   summed, the statement that crosses 3 000 undone to its savepoint and answered `54000
//!   transaction row limit exceeded`.
//! - The transaction rules follow the statements the relay has seen, as it reads them: a
//!   client pipelining statements across a failed one may see a rule applied to a statement
//!   PostgreSQL then skips, and a lost write's `ROLLBACK TO SAVEPOINT` lands after any
//!   statement the client pipelined behind it.
//! - Rules apply when a statement is parsed (`Parse`) and, for the transaction rules, when it
//!   is executed; DSQL may apply some later (at `Bind`).

pub(crate) mod rules;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rules::{Classified, Kind, Refusal};

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
    /// A write inside a transaction, after a savepoint the relay added: the answer goes to the
    /// client, unless the write met a row another transaction holds or changed (`55P03` lock
    /// timeout, `40001` concurrent update): then the error is dropped, the write rolled back to
    /// the savepoint, the transaction doomed, and the client told `tag`.
    Guard { tag: &'static str },
    /// The answer but its `ReadyForQuery`.
    AllButReady,
    /// Only the `ReadyForQuery`.
    OnlyReady,
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
    Refusal {
        code: "40001",
        message: "schema has been updated by another transaction (OC001)".into(),
    }
}

/// What goes upstream for some client messages: the bytes, and a plan for each `Query` or
/// `Sync` among them, in order.
#[derive(Debug, Default)]
pub(crate) struct Outgoing {
    pub(crate) bytes: Vec<u8>,
    pub(crate) plans: Vec<Plan>,
}

impl Outgoing {
    /// Whole messages; `plan` when they end with a `Query` or `Sync`.
    fn push(&mut self, bytes: &[u8], plan: Option<Plan>) {
        self.bytes.extend_from_slice(bytes);
        self.plans.extend(plan);
    }

    /// Empties it for the next round.
    pub(crate) fn clear(&mut self) {
        self.bytes.clear();
        self.plans.clear();
    }
}

/// A prepared statement as the rules see it.
#[derive(Debug, Clone)]
struct Prepared {
    kind: Kind,
    write_tag: Option<&'static str>,
    tables: Arc<[String]>,
}

fn other() -> Prepared {
    Prepared {
        kind: Kind::Other,
        write_tag: None,
        tables: Arc::new([]),
    }
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
    portals: HashMap<String, String>,
    /// An extended-protocol batch being skipped to `Sync` after this refusal.
    skipping: Option<Refusal>,
    /// The plan of the current extended-protocol batch's `Sync` (a guarded write).
    batch_plan: Option<Plan>,
    /// Query texts already read (a service sends the same few again and again).
    cache: HashMap<String, Classified>,
    catalog: Arc<Catalog>,
    /// This session's id in the catalog.
    session: u64,
    /// The relations this session has used, with the latest catalog change number then.
    touched: HashMap<String, u64>,
    /// Relations named by DDL in the open transaction block, recorded when it commits.
    pending_ddl: Vec<String>,
}

/// The most query texts remembered per session.
const CACHE_LIMIT: usize = 256;

impl Dialect {
    /// A session's dialect, sharing `plans` with its [`Responder`] and `catalog` with the
    /// emulator's other sessions.
    pub(crate) fn new(plans: Plans, catalog: Arc<Catalog>) -> Self {
        let session = catalog.join();
        Dialect {
            plans,
            catalog,
            session,
            ..Dialect::default()
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
        }
        stale.then(schema_conflict)
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
    pub(crate) fn on_message(&mut self, tag: u8, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let skipping = self.skipping.is_some();
        match tag {
            b'Q' => self.on_query(body, whole, out),
            b'P' => self.on_parse(body, whole, out),
            b'B' if !skipping => {
                let mut fields = body.split(|b| *b == 0);
                if let (Some(portal), Some(statement)) = (fields.next(), fields.next()) {
                    let statement = String::from_utf8_lossy(statement).into_owned();
                    let prepared = self
                        .statements
                        .get(&statement)
                        .cloned()
                        .unwrap_or_else(other);
                    // A write in a transaction goes after a savepoint, to be undone alone if
                    // it loses a conflict.
                    if let (true, Some(tag)) = (self.in_block, prepared.write_tag) {
                        out.push(&savepoint_query(), Some(Plan::Swallow));
                        self.batch_plan = Some(Plan::Guard { tag });
                    }
                    self.portals
                        .insert(String::from_utf8_lossy(portal).into_owned(), statement);
                }
                out.push(whole, None);
            }
            b'E' if !skipping => self.on_execute(body, whole, out),
            b'S' => {
                match self.skipping.take() {
                    Some(refusal) => out.push(&raise_query(&refusal), Some(Plan::Pass)),
                    None => out.push(whole, Some(self.batch_plan.take().unwrap_or(Plan::Pass))),
                }
                self.batch_plan = None;
                self.end_of_implicit_transaction();
            }
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
                out.push(whole, None);
            }
            b'B' | b'E' | b'C' | b'D' | b'H' if skipping => {}
            _ => out.push(whole, None),
        }
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
        // A transaction that lost a conflict fails at COMMIT, as on DSQL, and is over.
        if let [statement] = classified.statements.as_slice()
            && statement.kind == Kind::End
            && self.in_block
            && self.plans.doomed.swap(false, Ordering::SeqCst)
            && is_commit(&text)
        {
            out.push(
                &raise_query(&Refusal {
                    code: "40001",
                    message: "change conflicts with another transaction (OC000)".into(),
                }),
                Some(Plan::AllButReady),
            );
            out.push(&query("ROLLBACK"), Some(Plan::OnlyReady));
            self.set_transaction(Transaction::default());
            self.pending_ddl.clear();
            return;
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
        let guard = match classified.statements.as_slice() {
            [statement] if self.in_block => statement.write_tag,
            _ => None,
        };
        if state.in_block != self.in_block || !state.in_block {
            // A new transaction, or the end of one: nothing lost yet.
            self.plans.doomed.store(false, Ordering::SeqCst);
        }
        self.set_transaction(state);
        self.end_of_implicit_transaction();
        let plan = match guard {
            Some(tag) => {
                out.push(&savepoint_query(), Some(Plan::Swallow));
                Plan::Guard { tag }
            }
            None => Plan::Pass,
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
            return out.push(whole, None);
        };
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
                },
            },
            // Not one statement PostgreSQL can parse: it answers for itself.
            _ => other(),
        };
        self.statements.insert(name.clone(), prepared);
        if classified.upstream_text == text {
            return out.push(whole, None);
        }
        let mut parse = Vec::with_capacity(body.len());
        parse.extend_from_slice(name.as_bytes());
        parse.push(0);
        parse.extend_from_slice(classified.upstream_text.as_bytes());
        parse.push(0);
        parse.extend_from_slice(rest);
        out.push(&message(b'P', &parse), None);
    }

    fn on_execute(&mut self, body: &[u8], whole: &[u8], out: &mut Outgoing) {
        let portal = body.split(|b| *b == 0).next().unwrap_or_default();
        let portal = String::from_utf8_lossy(portal);
        let prepared = self
            .portals
            .get(portal.as_ref())
            .and_then(|statement| self.statements.get(statement))
            .cloned()
            .unwrap_or_else(other);
        if let Some(refusal) = self.schema_check(&prepared.tables) {
            self.skipping = Some(refusal);
            self.batch_plan = None;
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
                out.push(whole, None);
            }
            Err(refusal) => {
                self.skipping = Some(refusal);
                self.batch_plan = None;
            }
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
        self.in_block = state.in_block;
        self.ddl = state.ddl;
        self.dml = state.dml;
    }

    /// Outside a block, each `Query` and each `Sync` ends an implicit transaction.
    fn end_of_implicit_transaction(&mut self) {
        if !self.in_block {
            self.ddl = false;
            self.dml = false;
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
        let refuse = |message: &str| {
            Err(Refusal {
                code: "0A000",
                message: message.to_owned(),
            })
        };
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
    let quoted = refusal.message.replace('\'', "''");
    let text = format!(
        "DO {TAG} BEGIN RAISE EXCEPTION USING ERRCODE = '{}', MESSAGE = '{quoted}'; END {TAG}\0",
        refusal.code
    );
    message(b'Q', text.as_bytes())
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

/// The `CONTEXT` PL/pgSQL adds to the errors of the refusal `DO` blocks.
const RAISE_CONTEXT: &[u8] = b"WPL/pgSQL function inline_code_block line 1 at RAISE\0";

/// The server-to-client side of a session with DSQL's rules: follows the framing of the
/// server's messages and applies the plan of each answer (see [`Plan`]); takes the refusal
/// blocks' `CONTEXT` out of errors; asks for the `ROLLBACK TO SAVEPOINT` of a lost write.
#[derive(Debug)]
pub(crate) struct Responder {
    plans: Plans,
    /// Requests for the upstream side (the rollback of a lost write).
    upstream: tokio::sync::mpsc::UnboundedSender<Vec<u8>>,
    header: Vec<u8>,
    /// Body bytes left in the current message.
    left: usize,
    /// The current message, header included.
    current: Vec<u8>,
    /// The current guarded write lost its conflict.
    lost: bool,
}

impl Responder {
    pub(crate) fn new(plans: Plans, upstream: tokio::sync::mpsc::UnboundedSender<Vec<u8>>) -> Self {
        Responder {
            plans,
            upstream,
            header: Vec::with_capacity(5),
            left: 0,
            current: Vec::new(),
            lost: false,
        }
    }

    /// Appends to `out` what the client should get for the next `data` from the server.
    pub(crate) fn feed(&mut self, mut data: &[u8], out: &mut Vec<u8>) {
        while !data.is_empty() {
            if self.left == 0 && self.header.len() < 5 {
                let take = (5 - self.header.len()).min(data.len());
                self.header.extend_from_slice(&data[..take]);
                data = &data[take..];
                if self.header.len() < 5 {
                    continue;
                }
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.left = (len as usize).saturating_sub(4);
                self.current.clear();
                self.current.extend_from_slice(&self.header);
                if self.left == 0 {
                    self.finish(out);
                }
                continue;
            }
            let take = self.left.min(data.len());
            self.current.extend_from_slice(&data[..take]);
            self.left -= take;
            data = &data[take..];
            if self.left == 0 {
                self.finish(out);
            }
        }
    }

    /// One whole server message in `self.current`.
    fn finish(&mut self, out: &mut Vec<u8>) {
        self.header.clear();
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
            Plan::Guard { tag: told } => {
                if tag == b'E' && native_conflict(&self.current[5..]) {
                    self.lost = true;
                } else if self.lost && ready {
                    // Undo the write alone, and tell the client it went through.
                    let _ = self
                        .upstream
                        .send(query(&format!("ROLLBACK TO SAVEPOINT {SAVEPOINT}")));
                    self.plans.doomed.store(true, Ordering::SeqCst);
                    let mut complete = told.as_bytes().to_vec();
                    complete.push(0);
                    super::wire::append_message(out, b'C', &complete);
                    super::wire::append_message(out, b'Z', b"T");
                    self.lost = false;
                } else if !self.lost {
                    self.pass(out);
                }
            }
        }
        if ready {
            self.plans.lock().pop_front();
        }
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
        if message[0] == b'E'
            && let Some(at) = message[5..]
                .windows(RAISE_CONTEXT.len())
                .position(|w| w == RAISE_CONTEXT)
        {
            let body = &message[5..];
            let mut rewritten = body[..at].to_vec();
            rewritten.extend_from_slice(&body[at + RAISE_CONTEXT.len()..]);
            super::wire::append_message(out, b'E', &rewritten);
            return;
        }
        out.extend_from_slice(message);
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

    /// Runs one whole client message through `d`: what goes upstream, as text, and the plans.
    fn send(d: &mut Dialect, whole: &[u8]) -> (String, Vec<Plan>) {
        let mut out = Outgoing::default();
        d.on_message(whole[0], &whole[5..], whole, &mut out);
        (String::from_utf8_lossy(&out.bytes).into_owned(), out.plans)
    }

    #[test]
    fn one_ddl_per_transaction_and_no_ddl_with_dml() {
        let mut d = Dialect::default();
        assert_eq!(send(&mut d, &q("BEGIN")).1, [Plan::Pass]);
        let (text, _) = send(&mut d, &q("CREATE TABLE a (id int)"));
        assert!(text.contains("CREATE TABLE a"));
        let (text, _) = send(&mut d, &q("CREATE TABLE b (id int)"));
        assert!(
            text.contains("multiple ddl statements not supported"),
            "{text}"
        );
        send(&mut d, &q("ROLLBACK"));
        // Autocommit: each query is its own transaction, and writes are not guarded.
        send(&mut d, &q("CREATE TABLE a (id int)"));
        assert_eq!(send(&mut d, &q("INSERT INTO a VALUES (1)")).1, [Plan::Pass]);
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
        let mut d = Dialect::default();
        send(&mut d, &q("BEGIN"));
        let (text, plans) = send(&mut d, &q("UPDATE t SET v = 1 WHERE id = 1"));
        assert!(text.starts_with("Q"), "{text}");
        assert!(text.contains("SAVEPOINT dsql_emulator_occ") && text.contains("UPDATE t"));
        assert_eq!(plans, [Plan::Swallow, Plan::Guard { tag: "UPDATE 1" }]);
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

    #[test]
    fn an_extended_batch_is_skipped_to_sync_and_sync_raises() {
        let mut d = Dialect::default();
        let parse = |text: &str| {
            let mut body = b"s1\0".to_vec();
            body.extend_from_slice(text.as_bytes());
            body.extend_from_slice(&[0, 0, 0]);
            message(b'P', &body)
        };
        assert_eq!(send(&mut d, &parse("TRUNCATE t")).0, "");
        assert_eq!(send(&mut d, &message(b'D', b"Ss1\0")).0, "");
        let (text, plans) = send(&mut d, &message(b'S', b""));
        assert!(text.contains("ERRCODE = '0A000', MESSAGE = 'unsupported statement: Truncate'"));
        assert_eq!(plans, [Plan::Pass]);
        // The next batch runs normally.
        let select = parse("SELECT 1");
        assert_eq!(send(&mut d, &select).0.as_bytes(), select.as_slice());
        send(&mut d, &message(b'B', b"\0s1\0\0\0\0\0\0\0"));
        send(&mut d, &message(b'E', b"\0\0\0\0\0"));
        assert_eq!(send(&mut d, &message(b'S', b"")).1, [Plan::Pass]);
        // ASYNC is taken out of the text sent on.
        let (text, _) = send(&mut d, &parse("CREATE INDEX ASYNC i ON t (v)"));
        assert_eq!(&text.as_bytes()[5..], b"s1\0CREATE INDEX  i ON t (v)\0\0\0");
        // A write bound inside a transaction gets its savepoint, and its Sync a guard.
        send(&mut d, &q("BEGIN"));
        send(&mut d, &parse("DELETE FROM t WHERE id = $1"));
        let (text, plans) = send(&mut d, &message(b'B', b"\0s1\0\0\0\0\0\0\0"));
        assert!(text.contains("SAVEPOINT dsql_emulator_occ"));
        assert_eq!(plans, [Plan::Swallow]);
        send(&mut d, &message(b'E', b"\0\0\0\0\0"));
        assert_eq!(
            send(&mut d, &message(b'S', b"")).1,
            [Plan::Guard { tag: "DELETE 1" }]
        );
    }

    fn error(code: &str, extra: &[u8]) -> Vec<u8> {
        let mut body = format!("SERROR\0C{code}\0Mnope\0").into_bytes();
        body.extend_from_slice(extra);
        body.push(0);
        message(b'E', &body)
    }

    fn responder_for(plans: &[Plan]) -> (Responder, tokio::sync::mpsc::UnboundedReceiver<Vec<u8>>) {
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
        let (mut responder, mut rx) =
            responder_for(&[Plan::Swallow, Plan::Guard { tag: "UPDATE 1" }]);
        let mut out = Vec::new();
        responder.feed(&stream, &mut out);
        let mut expected = message(b'2', b"");
        expected.extend_from_slice(&message(b'C', b"UPDATE 1\0"));
        expected.extend_from_slice(&message(b'Z', b"T"));
        assert_eq!(out, expected);
        assert!(responder.plans.doomed.load(Ordering::SeqCst));
        assert_eq!(
            rx.try_recv().unwrap(),
            query("ROLLBACK TO SAVEPOINT dsql_emulator_occ")
        );
        assert!(responder.plans.lock().is_empty());

        // Another error is the client's own: passed on, nothing doomed.
        let (mut responder, mut rx) = responder_for(&[Plan::Guard { tag: "UPDATE 1" }]);
        let mut stream = error("23505", b"");
        stream.extend_from_slice(&message(b'Z', b"E"));
        let mut out = Vec::new();
        responder.feed(&stream, &mut out);
        assert_eq!(out, stream);
        assert!(rx.try_recv().is_err());
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
