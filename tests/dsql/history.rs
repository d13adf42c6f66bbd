//! A randomized history checker for the emulator's commit-time conflicts, in the manner of
//! Jepsen/Elle: random multi-session histories, each transaction sent through a random protocol
//! shape built from raw frontend messages ([`crate::frontend`]), then DSQL's contract checked
//! over the whole history.
//!
//! - **Generator**: `sessions` raw sessions on `counters` hot rows. Each transaction increments
//!   1–3 counters, by read-modify-write (`SELECT v`, then `SET v = <read + 1>`) or relatively
//!   (`SET v = v + 1`), reads some, logs its id in `history_log`, and commits (or, one in ten,
//!   rolls back). It goes through one of [`SHAPES`]: simple single statements, one
//!   multi-statement simple query (`BEGIN; …; COMMIT`), the extended protocol with a `Sync` a
//!   statement, pipelined extended messages with `Flush` before the one `Sync`, `BEGIN`
//!   batched with the first statement (pgJDBC), statements flushed and awaited before their
//!   `Sync` (libpq's `PQsendFlushRequest`), several transactions under one `Sync`, one
//!   autocommit increment, or a block that writes and is then rolled back and begun again by
//!   one `ROLLBACK; BEGIN; COPY … FROM STDIN` query (its write must never land). A seeded scheduler picks which session takes its next step, so a
//!   session leaves its transaction open while others run; one step in ten runs two sessions'
//!   steps at once (crossed commits).
//! - **Invariants**: every counter holds, by name (each write appends its transaction's id to
//!   the row's `ops`), exactly the increments of the transactions that were told `COMMIT`,
//!   and its value is their number (no lost, no phantom, no overwritten increment); the log
//!   holds exactly the ids of the acknowledged transactions; every failure is `40001` (at a statement or at `COMMIT`) and
//!   leaves nothing behind; every answer comes within [`STEP_BOUND`] (no hang); every session
//!   ends usable (`SELECT 1`). A committed transaction's reads must be repeatable and show its
//!   own writes; a read that misses the transaction's own pending write is DSQL-legal only
//!   here: it is the emulator's documented deviation, counted apart
//!   ([`Report::own_write_misses`]), never a failure.
//!
//! The seed decides the history (what each session sends and the schedule); the outcomes may
//! vary with timing, and the invariants hold for every outcome. [`Report`]'s `Display` names
//! the seed and the command that replays it:
//! `cargo run --example history -- --seed <seed> --transactions <n>`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use tokio_postgres_dsql::emulator::DsqlEmulator;

use crate::frontend::{Answer, Frontend, Message};

/// How long any answer may take before the checker calls it a hang (a replay at `COMMIT` may
/// wait 5 s for a lock whose holder is committing ahead of it).
pub const STEP_BOUND: Duration = Duration::from_secs(20);

/// What a history looks like.
#[derive(Debug, Clone)]
pub struct Config {
    /// Decides everything the sessions send, and the schedule.
    pub seed: u64,
    /// Concurrent sessions (at least 2).
    pub sessions: usize,
    /// Transactions per session.
    pub transactions: usize,
    /// Hot rows.
    pub counters: u32,
}

impl Config {
    /// `sessions` × `transactions` on 4 counters.
    pub fn new(seed: u64, sessions: usize, transactions: usize) -> Config {
        Config {
            seed,
            sessions: sessions.max(2),
            transactions,
            counters: 4,
        }
    }
}

/// How a transaction travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Shape {
    /// One simple `Query` a statement (psql, `batch_execute`).
    Simple,
    /// The whole transaction as one simple multi-statement `Query` (`psql -c`, scripts).
    MultiStatement,
    /// Parse/Bind/Describe/Execute/Sync a statement, `BEGIN` and `COMMIT` too (libpq's
    /// `PQexecParams`, node-postgres, psycopg's default).
    Extended,
    /// Every statement Parse/Bind/Execute (some followed by `Flush`), then `Flush` and one
    /// `Sync` after the `COMMIT` (libpq pipeline mode, psycopg's `pipeline()`).
    Pipelined,
    /// `BEGIN` in the same batch as the first statement, then one batch a statement
    /// (pgJDBC with autocommit off).
    BatchedBegin,
    /// Each statement Parse/Bind/Execute/Flush, its answer awaited before any `Sync`; the
    /// `COMMIT` then flushed and synced (libpq's `PQsendFlushRequest`).
    Flushed,
    /// Two or three whole transactions under one `Sync`.
    ManyUnderOneSync,
    /// One increment outside any transaction block (simple or extended).
    Autocommit,
    /// A block that writes (the write may be left pending behind another session's lock), is
    /// rolled back and begun again in one `Query` the relay runs whole (`ROLLBACK; BEGIN;
    /// COPY … FROM STDIN`, a script's shape), then runs as `Simple`: nothing of the
    /// rolled-back write may land, and the new block owes nothing of it.
    Restarted,
    /// A whole transaction behind a statement that fails, in one `Query` (`SELECT 1/0;
    /// BEGIN; …; COMMIT`: PostgreSQL runs none of it), with the session's next transaction
    /// sent behind it before the answer is read, as one autocommit increment (simple or
    /// extended): nothing of the first may land, and the second is not in any block.
    FailedPiece,
}

/// Every shape the generator uses.
pub const SHAPES: [Shape; 10] = [
    Shape::Simple,
    Shape::MultiStatement,
    Shape::Extended,
    Shape::Pipelined,
    Shape::BatchedBegin,
    Shape::Flushed,
    Shape::ManyUnderOneSync,
    Shape::Autocommit,
    Shape::Restarted,
    Shape::FailedPiece,
];

impl Shape {
    /// The shape answers each statement before the next is sent (a read's value can be used).
    fn stepwise(self) -> bool {
        matches!(
            self,
            Shape::Simple
                | Shape::Extended
                | Shape::BatchedBegin
                | Shape::Flushed
                | Shape::Restarted
        )
    }
}

/// One statement of a generated transaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    /// `SET v = v + 1`.
    Increment(u32),
    /// `SELECT v`, then `SET v = <read + 1>`.
    ReadModifyWrite(u32),
    /// `SELECT v`.
    Read(u32),
}

/// A generated transaction.
#[derive(Debug, Clone)]
struct Plan {
    id: String,
    shape: Shape,
    ops: Vec<Op>,
    commit: bool,
}

impl Plan {
    /// The increments a commit of it adds, by counter.
    fn increments(&self) -> BTreeMap<u32, u64> {
        let mut by = BTreeMap::new();
        for op in &self.ops {
            if let Op::Increment(k) | Op::ReadModifyWrite(k) = op {
                *by.entry(*k).or_default() += 1;
            }
        }
        by
    }
}

/// How a transaction ended, as its client was told.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    Committed,
    /// `40001` at a statement or at `COMMIT`.
    Conflict,
    RolledBack,
}

/// What a history did, and what it broke.
#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub transactions: usize,
    pub committed: usize,
    pub conflicts: usize,
    pub rolled_back: usize,
    /// Acknowledged increments that the counters do not hold.
    pub lost: u64,
    /// Increments the counters hold that no acknowledged transaction made.
    pub phantom: u64,
    /// Reads in committed transactions that did not show the transaction's own earlier
    /// writes (the documented deviation: a pending write, and the writes after it, are not
    /// visible to the transaction).
    pub own_write_misses: usize,
    /// Reads in committed transactions whose value the checker can predict (the counter was
    /// read before the transaction wrote it): the base of `own_write_misses`.
    pub checked_reads: usize,
    /// By shape: (transactions, committed, conflicts).
    pub by_shape: BTreeMap<Shape, (usize, usize, usize)>,
    /// Every violated invariant, in words.
    pub violations: Vec<String>,
}

impl Report {
    /// No invariant was violated.
    pub fn ok(&self) -> bool {
        self.violations.is_empty() && self.lost == 0 && self.phantom == 0
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "history seed {}: {} transactions, {} committed, {} conflicts (40001), {} rolled \
             back; lost {}, phantom {}; {} of {} checked reads missed their own pending write \
             (deviation)",
            self.seed,
            self.transactions,
            self.committed,
            self.conflicts,
            self.rolled_back,
            self.lost,
            self.phantom,
            self.own_write_misses,
            self.checked_reads
        )?;
        for (shape, (n, committed, conflicts)) in &self.by_shape {
            writeln!(
                f,
                "  {shape:?}: {n} transactions, {committed} committed, {conflicts} conflicts"
            )?;
        }
        for violation in self.violations.iter().take(20) {
            writeln!(f, "  violation: {violation}")?;
        }
        if self.violations.len() > 20 {
            writeln!(f, "  … and {} more", self.violations.len() - 20)?;
        }
        if !self.ok() {
            writeln!(
                f,
                "replay: cargo run --example history -- --seed {} --transactions {}",
                self.seed, self.transactions
            )?;
        }
        Ok(())
    }
}

/// One session of the history: its connection, its transactions to come, the one under way.
struct Session {
    index: usize,
    frontend: Frontend,
    plans: std::collections::VecDeque<Plan>,
    current: Option<Running>,
    /// The session failed for good (a hang, a lost connection): it takes no more steps.
    broken: bool,
}

/// A transaction under way, sent one step at a time.
struct Running {
    plan: Plan,
    /// The next step: 0 opens the block; `1..=ops` the operations; then the log, then the end.
    step: usize,
    /// Per counter: the value first read (before any own write) and own increments since.
    seen: BTreeMap<u32, (i64, i64)>,
    /// Reads to judge if it commits: (counter, value read, base, own increments then).
    reads: Vec<(u32, i64, i64, i64)>,
    /// A value awaited by a read-modify-write's write.
    read_value: Option<i64>,
}

/// Runs one history against `emulator` (an endpoint of its own: the checker creates its
/// tables) and checks it.
pub async fn run(emulator: &DsqlEmulator, config: &Config) -> Report {
    let mut rng = fastrand::Rng::with_seed(config.seed);
    let mut report = Report {
        seed: config.seed,
        ..Report::default()
    };
    let mut admin = Frontend::connect(emulator).await;
    for statement in [
        "DROP TABLE IF EXISTS history_counter",
        "DROP TABLE IF EXISTS history_log",
        "DROP TABLE IF EXISTS history_scratch",
        "CREATE TABLE history_scratch (id text PRIMARY KEY)",
        "CREATE TABLE history_counter (k int PRIMARY KEY, v bigint NOT NULL, \
         ops text NOT NULL DEFAULT '')",
        "CREATE TABLE history_log (id text PRIMARY KEY)",
    ] {
        let answer = admin.simple(statement).await;
        assert_eq!(answer.error(), None, "{statement}: {answer:?}");
    }
    let rows: Vec<String> = (0..config.counters).map(|k| format!("({k}, 0)")).collect();
    let insert = format!("INSERT INTO history_counter VALUES {}", rows.join(", "));
    assert_eq!(admin.simple(&insert).await.error(), None);

    let mut sessions = Vec::new();
    for index in 0..config.sessions {
        let mut plans = std::collections::VecDeque::new();
        for t in 0..config.transactions {
            plans.push_back(generate(&mut rng, config, format!("s{index}t{t}")));
        }
        sessions.push(Session {
            index,
            frontend: Frontend::connect(emulator).await,
            plans,
            current: None,
            broken: false,
        });
    }
    // What the clients were told, transaction by transaction.
    let mut outcomes: Vec<(Plan, Outcome)> = Vec::new();
    loop {
        let live: Vec<usize> = sessions
            .iter()
            .filter(|s| !s.broken && (s.current.is_some() || !s.plans.is_empty()))
            .map(|s| s.index)
            .collect();
        if live.is_empty() {
            break;
        }
        let a = live[rng.usize(..live.len())];
        let crossed = live.len() > 1 && rng.u32(..10) == 0;
        if crossed {
            let b = loop {
                let b = live[rng.usize(..live.len())];
                if b != a {
                    break b;
                }
            };
            let (low, high) = (a.min(b), a.max(b));
            let (left, right) = sessions.split_at_mut(high);
            let (first, second) = (&mut left[low], &mut right[0]);
            let mut other = Report::default();
            let (x, y) = tokio::join!(step(first, &mut report), step(second, &mut other));
            outcomes.extend(x);
            outcomes.extend(y);
            report.violations.extend(other.violations);
            report.own_write_misses += other.own_write_misses;
            report.checked_reads += other.checked_reads;
        } else {
            outcomes.extend(step(&mut sessions[a], &mut report).await);
        }
    }
    // Every session ends usable.
    for session in &mut sessions {
        if session.broken {
            continue;
        }
        session.frontend.query("SELECT 1").send().await;
        match session.frontend.try_answer(STEP_BOUND).await {
            Ok(answer) if answer.values() == [Some("1".to_owned())] && answer.status() == b'I' => {}
            Ok(answer) => report.violations.push(format!(
                "session {} is not usable after its history: SELECT 1 answered {answer:?}",
                session.index
            )),
            Err(why) => report
                .violations
                .push(format!("session {}: SELECT 1: {why}", session.index)),
        }
    }
    judge(&mut admin, &outcomes, &mut report).await;
    report
}

/// A transaction for `config`'s counters.
fn generate(rng: &mut fastrand::Rng, config: &Config, id: String) -> Plan {
    let shape = SHAPES[rng.usize(..SHAPES.len())];
    let counter = |rng: &mut fastrand::Rng| rng.u32(..config.counters);
    if shape == Shape::Autocommit {
        return Plan {
            id,
            shape,
            ops: vec![Op::Increment(counter(rng))],
            commit: true,
        };
    }
    let writes = rng.usize(1..=3);
    let mut ops = Vec::new();
    let mut written = BTreeSet::new();
    for _ in 0..writes {
        let k = counter(rng);
        // A read-modify-write of a counter the transaction wrote already would build on a
        // read that may miss that write (the documented deviation) and lose an increment
        // through it: the checker counts the deviation at the read instead.
        let fresh = written.insert(k);
        if rng.bool() && shape.stepwise() && fresh {
            ops.push(Op::ReadModifyWrite(k));
        } else {
            ops.push(Op::Increment(k));
        }
        if rng.u32(..3) == 0 {
            // Half the reads are of the counter just written: they show whether the
            // transaction sees its own writes.
            let read = if rng.bool() { k } else { counter(rng) };
            ops.push(Op::Read(read));
        }
    }
    Plan {
        id,
        shape,
        ops,
        commit: rng.u32(..10) != 0,
    }
}

/// The text of transaction `id`'s write of counter `k` (`value`: a read-modify-write's new
/// value): it also appends `id` to the counter's `ops`, so that every increment is accounted
/// for by name (a lost one and a phantom one cannot cancel out).
fn write_text(id: &str, k: u32, value: Option<i64>) -> String {
    let set = match value {
        Some(value) => value.to_string(),
        None => "v + 1".to_owned(),
    };
    format!("UPDATE history_counter SET v = {set}, ops = ops || ' {id}' WHERE k = {k}")
}

fn read_text(k: u32) -> String {
    format!("SELECT v FROM history_counter WHERE k = {k}")
}

fn log_text(id: &str) -> String {
    format!("INSERT INTO history_log (id) VALUES ('{id}')")
}

/// The statements of a plan sent whole (no read-modify-write): texts, in order.
fn whole_texts(plan: &Plan) -> Vec<String> {
    let mut texts = vec!["BEGIN".to_owned()];
    for op in &plan.ops {
        texts.push(match *op {
            Op::Increment(k) | Op::ReadModifyWrite(k) => write_text(&plan.id, k, None),
            Op::Read(k) => read_text(k),
        });
    }
    texts.push(log_text(&plan.id));
    texts.push(if plan.commit { "COMMIT" } else { "ROLLBACK" }.to_owned());
    texts
}

/// Parse/Bind/Execute of `text` with the unnamed statement and portal.
fn pbe(f: &mut Frontend, text: &str) {
    f.parse("", text).bind("", &[]).execute();
}

/// Takes one step of `session`: opens a transaction, or runs its next step. Returns the
/// transactions that ended in it, with their outcome.
async fn step(session: &mut Session, report: &mut Report) -> Vec<(Plan, Outcome)> {
    let running = match session.current.take() {
        Some(running) => running,
        None => {
            let Some(plan) = session.plans.pop_front() else {
                return Vec::new();
            };
            if plan.shape == Shape::FailedPiece {
                return failed_piece(session, plan, report).await;
            }
            if !plan.shape.stepwise() {
                return whole(session, plan, report).await;
            }
            Running {
                plan,
                step: 0,
                seen: BTreeMap::new(),
                reads: Vec::new(),
                read_value: None,
            }
        }
    };
    match stepwise(session, running, report).await {
        Ok(Some(running)) => {
            session.current = Some(running);
            Vec::new()
        }
        Ok(None) => Vec::new(),
        Err(ended) => vec![ended],
    }
}

/// Sends one request and reads its answer (`flushed`: read up to the statement's
/// `CommandComplete` or error, no `ReadyForQuery` awaited).
async fn exchange(
    session: &mut Session,
    flushed: bool,
    report: &mut Report,
    what: &str,
) -> Option<Answer> {
    if let Err(why) = session.frontend.try_send().await {
        report
            .violations
            .push(format!("session {}: {what}: {why}", session.index));
        session.broken = true;
        return None;
    }
    let answer = if flushed {
        let mut messages = Vec::new();
        loop {
            match session.frontend.try_read(STEP_BOUND).await {
                Ok(message) => {
                    let end = matches!(message.tag, b'C' | b'E' | b'Z');
                    messages.push(message);
                    if end {
                        break Ok(Answer { messages });
                    }
                }
                Err(why) => break Err(why),
            }
        }
    } else {
        session.frontend.try_answer(STEP_BOUND).await
    };
    match answer {
        Ok(answer) => Some(answer),
        Err(why) => {
            report
                .violations
                .push(format!("session {}: {what}: {why}", session.index));
            session.broken = true;
            None
        }
    }
}

/// The first error of an answer, if any: `Ok` when it is a conflict (`40001`), `Err` with a
/// violation otherwise.
fn error_of(messages: &[Message]) -> Option<Result<(), String>> {
    let error = messages.iter().find(|m| m.tag == b'E')?;
    let code = error.field(b'C').unwrap_or_default();
    let message = error.field(b'M').unwrap_or_default();
    Some(if code == "40001" {
        Ok(())
    } else {
        Err(format!("{code} {message}"))
    })
}

/// Ends a failed transaction: `ROLLBACK` when the session is still in a block.
async fn roll_back(session: &mut Session, status: u8, report: &mut Report) {
    if status == b'I' {
        return;
    }
    session.frontend.query("ROLLBACK");
    if let Some(answer) = exchange(session, false, report, "ROLLBACK after a conflict").await
        && answer.status() != b'I'
    {
        report.violations.push(format!(
            "session {}: ROLLBACK after a conflict left status {}",
            session.index,
            answer.status() as char
        ));
    }
}

/// Whether `answer` failed: then the transaction ended (rolled back if the session is still
/// in a block), and an error other than a conflict is a violation.
async fn failed(session: &mut Session, answer: &Answer, report: &mut Report, what: &str) -> bool {
    let Some(error) = error_of(&answer.messages) else {
        return false;
    };
    if let Err(error) = error {
        report
            .violations
            .push(format!("{what}: not a conflict: {error}"));
    }
    // (No ReadyForQuery yet: an error flushed before its Sync, the block failed.)
    let status = match answer.status() {
        0 => b'E',
        status => status,
    };
    roll_back(session, status, report).await;
    true
}

/// The value a read answered, recorded with what the transaction had seen of its counter.
fn note_read(
    running: &mut Running,
    k: u32,
    answer: &Answer,
    report: &mut Report,
    what: &str,
) -> Option<i64> {
    let Some(Some(value)) = answer.values().first().cloned() else {
        report
            .violations
            .push(format!("{what}: no row: {answer:?}"));
        return None;
    };
    let value: i64 = value.parse().unwrap_or(i64::MIN);
    let (base, own) = *running.seen.entry(k).or_insert((value, 0));
    running.reads.push((k, value, base, own));
    Some(value)
}

/// Runs the next step of a step-by-step transaction: `Ok(Some)` to go on later, `Ok(None)`
/// when the session broke, `Err` with the outcome when it ended.
async fn stepwise(
    session: &mut Session,
    mut running: Running,
    report: &mut Report,
) -> Result<Option<Running>, (Plan, Outcome)> {
    let shape = running.plan.shape;
    let ops = running.plan.ops.len();
    let at = running.step;
    // What this step sends, and whether it is a read (its value used).
    let (text, read): (String, Option<u32>) = if at == 0 {
        ("BEGIN".to_owned(), None)
    } else if at <= ops {
        match running.plan.ops[at - 1] {
            Op::Increment(k) => (write_text(&running.plan.id, k, None), None),
            Op::Read(k) => (read_text(k), Some(k)),
            Op::ReadModifyWrite(k) => match running.read_value.take() {
                None => (read_text(k), Some(k)),
                Some(value) => (write_text(&running.plan.id, k, Some(value + 1)), None),
            },
        }
    } else if at == ops + 1 {
        (log_text(&running.plan.id), None)
    } else if running.plan.commit {
        ("COMMIT".to_owned(), None)
    } else {
        ("ROLLBACK".to_owned(), None)
    };
    let last = at == ops + 2;
    let f = &mut session.frontend;
    let mut flushed = false;
    match shape {
        Shape::Restarted if at == 0 => {
            return Box::pin(stepwise_restarted(session, running, report)).await;
        }
        Shape::Simple | Shape::Restarted => {
            f.query(&text);
        }
        Shape::Extended => {
            f.parse("", &text)
                .bind("", &[])
                .describe_portal()
                .execute()
                .sync();
        }
        Shape::BatchedBegin if at == 0 => {
            // BEGIN rides with the first statement; the step is that statement's.
            running.step = 1;
            return Box::pin(stepwise_batched_begin(session, running, report)).await;
        }
        Shape::BatchedBegin => {
            f.parse("", &text)
                .bind("", &[])
                .describe_portal()
                .execute()
                .sync();
        }
        Shape::Flushed if last || at == 0 => {
            pbe(f, &text);
            f.flush_message().sync();
        }
        Shape::Flushed => {
            f.parse("", &text).bind("", &[]).describe_portal().execute();
            f.flush_message();
            flushed = true;
        }
        _ => unreachable!("{shape:?} is sent whole"),
    }
    let what = format!("{} ({shape:?}) step {at}: {text}", running.plan.id);
    let Some(mut answer) = exchange(session, flushed, report, &what).await else {
        return Ok(None);
    };
    if flushed && answer.messages.last().is_some_and(|m| m.tag == b'E') {
        // The pipeline is aborted to its Sync.
        session.frontend.sync();
        let Some(rest) = exchange(session, false, report, &what).await else {
            return Ok(None);
        };
        answer.messages.extend(rest.messages);
    }
    if failed(session, &answer, report, &what).await {
        return Err((running.plan, Outcome::Conflict));
    }
    if let Some(k) = read {
        let Some(value) = note_read(&mut running, k, &answer, report, &what) else {
            return Err((running.plan, Outcome::Conflict));
        };
        if matches!(running.plan.ops[at - 1], Op::ReadModifyWrite(_)) {
            running.read_value = Some(value);
            // The write is the same step's second half.
            return Ok(Some(running));
        }
    } else if at >= 1 && at <= ops {
        let k = match running.plan.ops[at - 1] {
            Op::Increment(k) | Op::ReadModifyWrite(k) | Op::Read(k) => k,
        };
        if let Some((_, own)) = running.seen.get_mut(&k) {
            *own += 1;
        }
        let tags = answer.tags();
        if tags.last().map(String::as_str) != Some("UPDATE 1") {
            report
                .violations
                .push(format!("{what}: the write answered {answer:?}"));
        }
    }
    if last {
        let tags = answer.tags();
        let outcome = match (running.plan.commit, tags.last().map(String::as_str)) {
            (true, Some("COMMIT")) => Outcome::Committed,
            (false, Some("ROLLBACK")) => Outcome::RolledBack,
            _ => {
                report
                    .violations
                    .push(format!("{what}: the end answered {answer:?}"));
                Outcome::RolledBack
            }
        };
        if answer.status() != b'I' {
            report.violations.push(format!(
                "{what}: the session is left in status {}",
                answer.status() as char
            ));
        }
        if outcome == Outcome::Committed {
            judge_reads(&running, report);
        }
        return Err((running.plan, outcome));
    }
    running.step += 1;
    Ok(Some(running))
}

/// The first step of a [`Shape::Restarted`] transaction: `BEGIN`, a write of one of its
/// counters under its id (an increment the checker must never find, as the block is rolled
/// back), then `ROLLBACK; BEGIN; COPY history_scratch FROM STDIN` with one row; the
/// transaction goes on from its first statement in the new block.
async fn stepwise_restarted(
    session: &mut Session,
    mut running: Running,
    report: &mut Report,
) -> Result<Option<Running>, (Plan, Outcome)> {
    let id = running.plan.id.clone();
    let k = match running.plan.ops[0] {
        Op::Increment(k) | Op::Read(k) | Op::ReadModifyWrite(k) => k,
    };
    for text in ["BEGIN".to_owned(), write_text(&id, k, None)] {
        session.frontend.query(&text);
        let what = format!("{id} (Restarted) before the restart: {text}");
        let Some(answer) = exchange(session, false, report, &what).await else {
            return Ok(None);
        };
        // (A conflict there fails the old block only: the restart rolls it back.)
        if let Some(Err(error)) = error_of(&answer.messages) {
            report.violations.push(format!("{what}: {error}"));
        }
    }
    let what = format!("{id} (Restarted) ROLLBACK; BEGIN; COPY");
    let f = &mut session.frontend;
    f.query("ROLLBACK; BEGIN; COPY history_scratch (id) FROM STDIN");
    if let Err(why) = f.try_send().await {
        report.violations.push(format!("{what}: {why}"));
        session.broken = true;
        return Ok(None);
    }
    let mut tags = Vec::new();
    loop {
        match session.frontend.try_read(STEP_BOUND).await {
            Ok(m) if m.tag == b'G' => break,
            Ok(m) if m.tag == b'C' => tags.push(m.tag_text()),
            Ok(m) if m.tag == b'E' || m.tag == b'Z' => {
                report
                    .violations
                    .push(format!("{what}: answered {m:?} before the COPY started"));
                session.broken = true;
                return Ok(None);
            }
            Ok(_) => {}
            Err(why) => {
                report.violations.push(format!("{what}: {why}"));
                session.broken = true;
                return Ok(None);
            }
        }
    }
    if tags != ["ROLLBACK", "BEGIN"] {
        report
            .violations
            .push(format!("{what}: answered {tags:?} before the COPY"));
    }
    let row = format!("{id}\n");
    session
        .frontend
        .message(b'd', row.as_bytes())
        .message(b'c', b"");
    let Some(answer) = exchange(session, false, report, &what).await else {
        return Ok(None);
    };
    if failed(session, &answer, report, &what).await {
        return Err((running.plan, Outcome::Conflict));
    }
    if (answer.tags(), answer.status()) != (vec!["COPY 1".to_owned()], b'T') {
        report
            .violations
            .push(format!("{what}: the COPY answered {answer:?}"));
    }
    running.step = 1;
    Ok(Some(running))
}

/// pgJDBC's first batch: `BEGIN` and the first statement under one `Sync`.
async fn stepwise_batched_begin(
    session: &mut Session,
    running: Running,
    report: &mut Report,
) -> Result<Option<Running>, (Plan, Outcome)> {
    let text = match running.plan.ops[0] {
        Op::Increment(k) => write_text(&running.plan.id, k, None),
        Op::Read(k) | Op::ReadModifyWrite(k) => read_text(k),
    };
    let f = &mut session.frontend;
    pbe(f, "BEGIN");
    f.parse("", &text)
        .bind("", &[])
        .describe_portal()
        .execute()
        .sync();
    let what = format!("{} (BatchedBegin) BEGIN + {text}", running.plan.id);
    let Some(answer) = exchange(session, false, report, &what).await else {
        return Ok(None);
    };
    finish_first(session, running, answer, report, &what).await
}

/// Applies the answer of a batched `BEGIN` + first statement to `running` (at step 1).
async fn finish_first(
    session: &mut Session,
    mut running: Running,
    answer: Answer,
    report: &mut Report,
    what: &str,
) -> Result<Option<Running>, (Plan, Outcome)> {
    if failed(session, &answer, report, what).await {
        return Err((running.plan, Outcome::Conflict));
    }
    if answer.tags().first().map(String::as_str) != Some("BEGIN") {
        report
            .violations
            .push(format!("{what}: BEGIN answered {answer:?}"));
    }
    match running.plan.ops[0] {
        Op::Increment(k) => {
            if let Some((_, own)) = running.seen.get_mut(&k) {
                *own += 1;
            }
            running.step = 2;
        }
        Op::Read(k) | Op::ReadModifyWrite(k) => {
            let Some(value) = note_read(&mut running, k, &answer, report, what) else {
                return Err((running.plan, Outcome::Conflict));
            };
            if matches!(running.plan.ops[0], Op::ReadModifyWrite(_)) {
                running.read_value = Some(value);
                running.step = 1;
            } else {
                running.step = 2;
            }
        }
    }
    Ok(Some(running))
}

/// A committed transaction's reads: each shows the value first read plus the transaction's
/// own increments since (repeatable read, read your writes); one that shows fewer of its own
/// increments is the documented deviation.
fn judge_reads(running: &Running, report: &mut Report) {
    for &(k, value, base, own) in &running.reads {
        if own == 0 {
            // Nothing of its own to miss: a repeated read (checked as equal below) or the
            // first one.
            if value != base {
                report.violations.push(format!(
                    "{}: counter {k} read {value}, then {base} before: not repeatable",
                    running.plan.id
                ));
            }
            continue;
        }
        report.checked_reads += 1;
        if value == base + own {
            continue;
        }
        if value >= base && value < base + own {
            report.own_write_misses += 1;
        } else {
            report.violations.push(format!(
                "{}: counter {k} read {value}, expected {} (first read {base}, {own} own \
                 increments since)",
                running.plan.id,
                base + own
            ));
        }
    }
}

/// Queues an autocommit increment of counter `k` for transaction `id`: a simple `Query` for
/// an even-length id, else Parse/Bind/Describe/Execute/Sync.
fn autocommit_increment(f: &mut Frontend, id: &str, k: u32) {
    let text = write_text(id, k, None);
    if id.len().is_multiple_of(2) {
        f.query(&text);
    } else {
        f.parse("", &text)
            .bind("", &[])
            .describe_portal()
            .execute()
            .sync();
    }
}

/// Runs a [`Shape::FailedPiece`] transaction and the autocommit increment sent behind it.
async fn failed_piece(
    session: &mut Session,
    plan: Plan,
    report: &mut Report,
) -> Vec<(Plan, Outcome)> {
    let rider = session.plans.pop_front().map(|mut next| {
        let k = match next.ops[0] {
            Op::Increment(k) | Op::ReadModifyWrite(k) | Op::Read(k) => k,
        };
        next.shape = Shape::Autocommit;
        next.ops = vec![Op::Increment(k)];
        next.commit = true;
        (next, k)
    });
    let texts = whole_texts(&plan);
    session
        .frontend
        .query(&format!("SELECT 1/0; {}", texts.join("; ")));
    if let Some((rider, k)) = &rider {
        autocommit_increment(&mut session.frontend, &rider.id, *k);
    }
    let what = format!("{} (FailedPiece)", plan.id);
    let Some(failed) = exchange(session, false, report, &what).await else {
        return Vec::new();
    };
    let error = failed.error().map(|e| e.0);
    if error.as_deref() != Some("22012") || failed.status() != b'I' || !failed.tags().is_empty() {
        report.violations.push(format!(
            "{what}: expected only 22012 and an idle session, got {failed:?}"
        ));
    }
    let mut outcomes = vec![(plan, Outcome::RolledBack)];
    if let Some((rider, _)) = rider {
        let what = format!("{} (autocommit behind {what})", rider.id);
        let Some(answer) = exchange(session, false, report, &what).await else {
            return outcomes;
        };
        let outcome = match error_of(&answer.messages) {
            None if answer.tags() == ["UPDATE 1"] && answer.status() == b'I' => Outcome::Committed,
            Some(Ok(())) => Outcome::Conflict,
            Some(Err(error)) => {
                report
                    .violations
                    .push(format!("{what}: not a conflict: {error}"));
                Outcome::Conflict
            }
            None => {
                report.violations.push(format!(
                    "{what}: expected UPDATE 1 and an idle session, got {answer:?}"
                ));
                Outcome::Conflict
            }
        };
        if answer.status() != b'I' {
            roll_back(session, answer.status(), report).await;
        }
        outcomes.push((rider, outcome));
    }
    outcomes
}

/// Sends a whole transaction (or several) in one request and reads the outcome of each.
async fn whole(session: &mut Session, plan: Plan, report: &mut Report) -> Vec<(Plan, Outcome)> {
    let mut plans = vec![plan];
    if plans[0].shape == Shape::ManyUnderOneSync {
        // The session's next one or two transactions ride along, whatever their shape.
        let more = 1 + (plans[0].ops.len() % 2);
        for _ in 0..more {
            if let Some(mut next) = session.plans.pop_front() {
                next.shape = Shape::ManyUnderOneSync;
                next.ops.retain(|op| !matches!(op, Op::ReadModifyWrite(_)));
                if next.ops.is_empty() {
                    next.ops.push(Op::Increment(0));
                }
                plans.push(next);
            }
        }
    }
    let shape = plans[0].shape;
    let f = &mut session.frontend;
    // The tags each transaction's statements answer, in order.
    let mut expected: Vec<Vec<String>> = Vec::new();
    match shape {
        Shape::Autocommit => {
            let Op::Increment(k) = plans[0].ops[0] else {
                unreachable!()
            };
            autocommit_increment(f, &plans[0].id, k);
            expected.push(vec!["UPDATE 1".to_owned()]);
        }
        Shape::MultiStatement => {
            let texts = whole_texts(&plans[0]);
            f.query(&texts.join("; "));
            expected.push(tags_of(&plans[0], &texts));
        }
        Shape::Pipelined | Shape::ManyUnderOneSync => {
            for (i, plan) in plans.iter().enumerate() {
                let texts = whole_texts(plan);
                for (j, text) in texts.iter().enumerate() {
                    pbe(f, text);
                    // libpq's PQsendFlushRequest now and then, and always after the end.
                    if j == texts.len() - 1 || (i + j) % 3 == 0 {
                        f.flush_message();
                    }
                }
                expected.push(tags_of(plan, &texts));
            }
            f.sync();
        }
        _ => unreachable!("{shape:?} goes step by step"),
    }
    let what = format!(
        "{} ({shape:?}{})",
        plans[0].id,
        if plans.len() > 1 {
            format!(" with {} more", plans.len() - 1)
        } else {
            String::new()
        }
    );
    let Some(answer) = exchange(session, false, report, &what).await else {
        return Vec::new();
    };
    // Walk the answer: each transaction's tags in order; an error ends the request there.
    let mut tags = answer
        .messages
        .iter()
        .filter(|m| matches!(m.tag, b'C' | b'E'));
    let mut outcomes = Vec::new();
    let mut failed = false;
    for (plan, expected) in plans.into_iter().zip(expected) {
        if failed {
            // Skipped after an earlier error: it never ran.
            outcomes.push((plan, Outcome::Conflict));
            continue;
        }
        let mut outcome = None;
        for want in &expected {
            match tags.next() {
                Some(m) if m.tag == b'E' => {
                    if let Some(Err(error)) = error_of(std::slice::from_ref(m)) {
                        report
                            .violations
                            .push(format!("{what}: not a conflict: {error}"));
                    }
                    failed = true;
                    outcome = Some(Outcome::Conflict);
                    break;
                }
                Some(m) if m.tag_text() == *want => {}
                other => {
                    report.violations.push(format!(
                        "{what}: {} expected {want}, got {other:?} in {answer:?}",
                        plan.id
                    ));
                    failed = true;
                    outcome = Some(Outcome::Conflict);
                    break;
                }
            }
        }
        let outcome = outcome.unwrap_or(if plan.commit {
            Outcome::Committed
        } else {
            Outcome::RolledBack
        });
        outcomes.push((plan, outcome));
    }
    if answer.status() != b'I' {
        if failed {
            roll_back(session, answer.status(), report).await;
        } else {
            report.violations.push(format!(
                "{what}: left the session in status {}",
                answer.status() as char
            ));
        }
    }
    outcomes
}

/// The command tags a whole transaction's statements answer.
fn tags_of(plan: &Plan, texts: &[String]) -> Vec<String> {
    let _ = plan;
    texts
        .iter()
        .map(|text| match text.split(' ').next() {
            Some("BEGIN") => "BEGIN".to_owned(),
            Some("UPDATE") => "UPDATE 1".to_owned(),
            Some("SELECT") => "SELECT 1".to_owned(),
            Some("INSERT") => "INSERT 0 1".to_owned(),
            Some("COMMIT") => "COMMIT".to_owned(),
            _ => "ROLLBACK".to_owned(),
        })
        .collect()
}

/// The invariants over the whole history: counters, the log, the outcomes.
async fn judge(admin: &mut Frontend, outcomes: &[(Plan, Outcome)], report: &mut Report) {
    let mut logged_expected = BTreeSet::new();
    for (plan, outcome) in outcomes {
        report.transactions += 1;
        let entry = report.by_shape.entry(plan.shape).or_default();
        entry.0 += 1;
        match outcome {
            Outcome::Committed => {
                report.committed += 1;
                entry.1 += 1;
                if plan.shape != Shape::Autocommit {
                    logged_expected.insert(plan.id.clone());
                }
            }
            Outcome::Conflict => {
                report.conflicts += 1;
                entry.2 += 1;
            }
            Outcome::RolledBack => report.rolled_back += 1,
        }
    }
    // Each counter: the increments it holds, by name, against the acknowledged ones.
    let mut expected_ids: BTreeMap<u32, BTreeMap<String, u64>> = BTreeMap::new();
    for (plan, outcome) in outcomes {
        if *outcome == Outcome::Committed {
            for (k, n) in plan.increments() {
                *expected_ids
                    .entry(k)
                    .or_default()
                    .entry(plan.id.clone())
                    .or_default() += n;
            }
        }
    }
    let counters = admin
        .simple("SELECT k, v, ops FROM history_counter ORDER BY k")
        .await;
    for message in counters.messages.iter().filter(|m| m.tag == b'D') {
        let fields = data_fields(message);
        let k: u32 = fields[0].parse().unwrap_or(u32::MAX);
        let v: u64 = fields[1].parse().unwrap_or(u64::MAX);
        let mut held: BTreeMap<String, u64> = BTreeMap::new();
        for id in fields[2].split_whitespace() {
            *held.entry(id.to_owned()).or_default() += 1;
        }
        let want = expected_ids.remove(&k).unwrap_or_default();
        let (mut lost, mut phantom) = (Vec::new(), Vec::new());
        for (id, n) in &want {
            let got = held.get(id).copied().unwrap_or(0);
            if got < *n {
                lost.push(format!("{id}×{}", n - got));
                report.lost += n - got;
            }
        }
        for (id, n) in &held {
            let wanted = want.get(id).copied().unwrap_or(0);
            if *n > wanted {
                phantom.push(format!("{id}×{}", n - wanted));
                report.phantom += n - wanted;
            }
        }
        if !lost.is_empty() {
            report.violations.push(format!(
                "counter {k}: acknowledged increments missing: {}",
                lost.join(" ")
            ));
        }
        if !phantom.is_empty() {
            report.violations.push(format!(
                "counter {k}: increments no acknowledged transaction made: {}",
                phantom.join(" ")
            ));
        }
        // Every named increment added one: fewer means one overwrote another (a lost update
        // by a stale read-modify-write).
        let named: u64 = held.values().sum();
        if v < named {
            report.lost += named - v;
            report.violations.push(format!(
                "counter {k} holds {v} after {named} increments: {} overwritten",
                named - v
            ));
        } else if v > named {
            report.phantom += v - named;
            report
                .violations
                .push(format!("counter {k} holds {v} after {named} increments"));
        }
    }
    let log = admin.simple("SELECT id FROM history_log").await;
    let logged: BTreeSet<String> = log.values().into_iter().flatten().collect();
    let mut missing = String::new();
    for id in logged_expected.difference(&logged) {
        let _ = write!(missing, " {id}");
    }
    if !missing.is_empty() {
        report.violations.push(format!(
            "acknowledged transactions missing from the log:{missing}"
        ));
    }
    let mut left = String::new();
    for id in logged.difference(&logged_expected) {
        let _ = write!(left, " {id}");
    }
    if !left.is_empty() {
        report.violations.push(format!(
            "transactions that failed or rolled back left a log row:{left}"
        ));
    }
}

/// The text fields of a `DataRow`.
fn data_fields(message: &Message) -> Vec<String> {
    let body = &message.body;
    let count = u16::from_be_bytes([body[0], body[1]]) as usize;
    let mut at = 2;
    let mut fields = Vec::with_capacity(count);
    for _ in 0..count {
        let len = i32::from_be_bytes(body[at..at + 4].try_into().unwrap());
        at += 4;
        match usize::try_from(len) {
            Ok(len) => {
                fields.push(String::from_utf8_lossy(&body[at..at + len]).into_owned());
                at += len;
            }
            Err(_) => fields.push(String::new()),
        }
    }
    fields
}
