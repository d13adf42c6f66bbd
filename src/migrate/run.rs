//! Running migrations: the history and lease tables, the lease, and each statement in a
//! transaction of its own.
//!
//! **What is guaranteed.** Each statement's effect is recorded by advancing its file's
//! `statements_applied` from `n` to `n + 1` with a conditional write (`WHERE
//! statements_applied = n`). DSQL's optimistic concurrency lets exactly one transaction that
//! writes that row commit: that write, not the lease, is the fence. (The lease check each step
//! makes in the same transaction is a read: it stops a runner that lost the lease before its
//! next statement, and says so, but DSQL validates only what a transaction writes.) So:
//!
//! - **DML runs exactly once**: the statement and its progress record commit together, after
//!   checks (in the same transaction) that the runner still holds the lease and that nobody
//!   recorded the statement yet. A second runner (one whose lease lapsed mid-statement, a
//!   paused process, or the one that took over) fails at `COMMIT` or finds the record advanced
//!   and applies nothing: it skips the statement, or, when it lost the lease, stops with
//!   [`MigrateError::LeaseLost`].
//! - **DDL runs at least once and is recorded once**: DSQL cannot commit DDL with DML, so a
//!   DDL statement first records its intent (`in_flight`), then commits alone, then its record
//!   follows (clearing the intent). A runner cut between the DDL and its record leaves the
//!   intent behind; the next run resumes at that statement, runs it again, and takes "already
//!   exists" (or, for a `DROP`, "does not exist") as applied, only then: a statement that
//!   failed on its own is still reported. Only one record of a statement commits, so two
//!   runners never both count it applied. A runner that lost its lease may still send the DDL
//!   it was about to send (DSQL cannot fence DDL): a re-run may come after later statements of
//!   the new holder, so write DDL that can be run again (named objects, `IF NOT EXISTS`).
//! - **Asynchronous DDL is waited for**: the runner polls `sys.jobs` for the job's status on
//!   its own connection, bounded by the job timeout; on resume it finds the job by the index's
//!   name (or, when `sys.jobs` no longer lists it, the index's `indisvalid`). A failed job is
//!   an error naming the job, its details and the remedy.
//!
//! **The lease.** DSQL has no advisory locks, and its writers never wait for each other: the
//! first transaction to commit wins and the others fail at `COMMIT` (`OC000`). The lease is a
//! row (`id = 1`) of `<history>_lock` holding an owner and an expiry. A runner takes it in one
//! transaction that reads the row and, if it is absent, expired or its own, writes it with a
//! new expiry; two runners that try at once both write the row and only the first `COMMIT`
//! succeeds, so exactly one holds it. A task of the holder's own renews it every third of the
//! lease on a connection of its own, so a long statement or index build cannot starve it; a
//! renewal that finds another owner marks the lease lost, and the runner stops before its next
//! statement. The holder deletes the row at the end. The others poll, with backoff, until it
//! is free or everything is applied; a runner that dies frees the lease when it expires.
//!
//! **Fixable files.** Each record keeps a checksum of the statements applied so far: a file
//! that failed part-way may have its statements from the failed one on edited (the next run
//! applies them); an edited applied statement is refused as [`MigrateError::Changed`] until
//! [`Migrator::repair`] accepts the file as it is now.

use std::time::{Duration, Instant};

use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tokio_postgres::Client;

use super::{MigrateError, Migration, Migrator};
use crate::retry::OccConflict;
use crate::{
    AsOccConflict, DsqlConnector, Error, RetryPolicy, retry_statement_on, retry_transaction_on,
};

/// What a migration's history says.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MigrationState {
    /// Every statement applied.
    Applied,
    /// Not started.
    Pending,
    /// Started, `applied` of `total` statements done (a run was interrupted; the next resumes).
    Partial {
        /// Statements applied.
        applied: usize,
        /// Statements in the file.
        total: usize,
    },
    /// Applied (or started) with another text: refused until the file is restored.
    Changed,
}

/// One migration and its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    /// The version.
    pub version: i64,
    /// The file.
    pub file: String,
    /// Its state in the history.
    pub state: MigrationState,
    /// The statements a run would apply (none when applied).
    pub statements_to_run: usize,
}

/// Every migration's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// By version.
    pub migrations: Vec<Planned>,
    /// Versions the history has that no file has: `(version, name)`.
    pub unknown: Vec<(i64, String)>,
}

impl Status {
    /// Whether nothing is left to run and nothing changed.
    pub fn up_to_date(&self) -> bool {
        self.migrations
            .iter()
            .all(|m| m.state == MigrationState::Applied)
    }
}

/// What [`Migrator::repair`] changed in one file's record.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Repaired {
    /// A file that had applied nothing: its record was removed (the next run starts it anew).
    Removed {
        /// The version.
        version: i64,
        /// The file.
        file: String,
    },
    /// A file that failed part-way: its record now holds the file as it is (the statements
    /// applied stay applied; the next run applies the rest of the file as it is now).
    Accepted {
        /// The version.
        version: i64,
        /// The file.
        file: String,
        /// Statements applied (kept).
        applied: usize,
        /// The checksum recorded before.
        old_checksum: String,
        /// The file's checksum now.
        new_checksum: String,
    },
}

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// The versions this run applied (or finished), in order.
    pub applied: Vec<i64>,
    /// Statements this run applied.
    pub statements_applied: usize,
    /// Whether this run waited for another runner's lease.
    pub waited_for_lease: bool,
}

#[derive(Debug, Clone)]
struct HistoryRow {
    version: i64,
    name: String,
    checksum: String,
    applied: usize,
    complete: bool,
    /// The checksum of the statements applied ([`prefix_checksum`]); none in a history
    /// written before it was kept.
    prefix: Option<String>,
    /// The statement (from 1) a runner sent and had not recorded when it stopped: the intent a
    /// DDL statement writes before it goes (see the module docs).
    in_flight: Option<usize>,
}

/// What the server said, for an error's message: its SQLSTATE and message, or the error.
pub(crate) fn server_says(error: &Error) -> String {
    use crate::retry::AsOccConflict as _;
    match error.database_error() {
        Some(db) => format!("{} {}", db.code().code(), db.message()),
        None => error.to_string(),
    }
}

/// SHA-256 (hex) of the first `n` statements of `migration`, each text followed by a NUL.
fn prefix_checksum(migration: &Migration, n: usize) -> String {
    let mut hash = Sha256::new();
    for statement in migration.statements().iter().take(n) {
        hash.update(statement.text.as_bytes());
        hash.update([0]);
    }
    hex::encode(hash.finalize())
}

/// Why a fenced step does not go on.
#[derive(Debug)]
enum Fenced {
    /// Another runner holds the lease (its owner, as the lease row says).
    LeaseLost(String),
    /// Another runner recorded this statement first: it applied it.
    AppliedByOther,
    /// The file's record is gone (a `repair` removed it meanwhile).
    RecordGone,
}

/// The error of a fenced transaction's body: the database's, or a fence.
#[derive(Debug)]
enum StepError {
    Db(Error),
    Fenced(Fenced),
}

impl From<tokio_postgres::Error> for StepError {
    fn from(error: tokio_postgres::Error) -> Self {
        StepError::Db(error.into())
    }
}

impl From<Error> for StepError {
    fn from(error: Error) -> Self {
        StepError::Db(error)
    }
}

impl AsOccConflict for StepError {
    fn occ_conflict(&self) -> Option<OccConflict> {
        match self {
            StepError::Db(error) => error.occ_conflict(),
            StepError::Fenced(_) => None,
        }
    }

    fn database_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            StepError::Db(error) => error.database_error(),
            StepError::Fenced(_) => None,
        }
    }
}

/// Keeps the lease while a runner works: renews it every third of its length from a task of
/// its own, on a connection of its own; notes when it was lost.
struct LeaseKeeper {
    lost: Arc<Mutex<Option<String>>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LeaseKeeper {
    fn start(migrator: &Migrator, connector: &DsqlConnector, owner: &str) -> LeaseKeeper {
        let lost = Arc::new(Mutex::new(None));
        if !migrator.renew {
            return LeaseKeeper { lost, task: None };
        }
        let sql = format!(
            "UPDATE {} SET expires_at = now() + make_interval(secs => $2) \
             WHERE id = 1 AND owner = $1",
            migrator.lock_table()
        );
        let holder_sql = format!("SELECT owner FROM {} WHERE id = 1", migrator.lock_table());
        let (connector, owner, lease) = (connector.clone(), owner.to_owned(), migrator.lease);
        let policy = migrator.policy.clone();
        let noted = lost.clone();
        let task = tokio::spawn(async move {
            // Each renewal (with its connect) is bounded: a third of the lease.
            let bound = lease / 3;
            let connect = || async {
                match tokio::time::timeout(bound, connector.connect()).await {
                    Ok(Ok(client)) => Some(client),
                    _ => None,
                }
            };
            let mut client: Option<Client> = connect().await;
            let mut renewed = Instant::now();
            loop {
                tokio::time::sleep(lease / 3).await;
                if client.as_ref().is_none_or(Client::is_closed) {
                    client = connect().await;
                }
                let outcome = match client.as_mut() {
                    Some(client) => {
                        let lease_secs = lease.as_secs_f64();
                        let renewal = retry_transaction_on(client, &policy, |tx| {
                            let (sql, owner) = (sql.clone(), owner.clone());
                            async move {
                                Ok::<_, Error>(tx.execute(&sql, &[&owner, &lease_secs]).await?)
                            }
                        });
                        match tokio::time::timeout(bound, renewal).await {
                            Ok(outcome) => outcome.map_err(|e| e.to_string()),
                            Err(_) => Err(format!("no answer within {bound:?}")),
                        }
                    }
                    None => Err("cannot connect".to_owned()),
                };
                let holder = match outcome {
                    Ok(1) => {
                        renewed = Instant::now();
                        continue;
                    }
                    Ok(_) => match client.as_ref() {
                        Some(client) => client
                            .query_opt(&holder_sql, &[])
                            .await
                            .ok()
                            .flatten()
                            .map_or_else(|| "nobody".to_owned(), |r| r.get(0)),
                        None => "another runner".to_owned(),
                    },
                    Err(error) if renewed.elapsed() < lease => {
                        tracing::warn!(%error, "renewing the migration lease failed; retrying");
                        client = None;
                        continue;
                    }
                    Err(error) => format!("nobody it can know of (renewing failed: {error})"),
                };
                *noted.lock().unwrap_or_else(|p| p.into_inner()) = Some(holder);
                return;
            }
        });
        LeaseKeeper {
            lost,
            task: Some(task),
        }
    }

    /// `LeaseLost` once the renewal found the lease gone.
    fn check(&self) -> Result<(), MigrateError> {
        match self.lost.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            Some(owner) => Err(MigrateError::LeaseLost { owner }),
            None => Ok(()),
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn database(context: impl Into<String>) -> impl FnOnce(Error) -> MigrateError {
    let context = context.into();
    move |source| MigrateError::Database { context, source }
}

/// DDL and other statements that are not plain DML run alone; DML runs with its progress.
fn is_dml(text: &str) -> bool {
    let words = super::split::first_words(text, 1);
    matches!(
        words.first().map(String::as_str),
        Some("insert" | "update" | "delete" | "select" | "with" | "values")
    )
}

/// Whether a statement drops something (`DROP …`): run again, it finds nothing to drop.
fn is_drop(text: &str) -> bool {
    super::split::first_words(text, 1)
        .first()
        .map(String::as_str)
        == Some("drop")
}

/// The index a `CREATE [UNIQUE] INDEX ASYNC [IF NOT EXISTS] name ON …` names, if it names one.
fn index_name(text: &str) -> Option<String> {
    let words = super::split::first_words(text, 9);
    let at = words.iter().position(|w| w == "async")? + 1;
    let rest: Vec<&str> = words[at..].iter().map(String::as_str).collect();
    let name = match rest.as_slice() {
        ["if", "not", "exists", name, ..] | [name, ..] => *name,
        [] => return None,
    };
    (name != "on").then(|| {
        let name = name.rsplit('.').next().unwrap_or(name);
        name.trim_matches('"').to_owned()
    })
}

/// Whether a statement is asynchronous DDL that answers a `job_id`.
fn is_async_ddl(text: &str) -> bool {
    let words = super::split::first_words(text, 4);
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    matches!(
        w.as_slice(),
        ["create", "index", "async", ..]
            | ["create", "unique", "index", "async"]
            | ["alter", "table", "async", ..]
    )
}

impl Migrator {
    fn lock_table(&self) -> String {
        format!("{}_lock", self.table)
    }

    async fn connect(&self, connector: &DsqlConnector) -> Result<Client, MigrateError> {
        connector.connect().await.map_err(database("connecting"))
    }

    /// Creates the history and lease tables if they are missing (each DDL alone, retried on
    /// the conflicts of runners creating them at once).
    async fn ensure_tables(&self, client: &mut Client) -> Result<(), MigrateError> {
        for ddl in [
            format!(
                "CREATE TABLE IF NOT EXISTS {} (version bigint PRIMARY KEY, name text NOT NULL, \
                 checksum text NOT NULL, statements_total int NOT NULL, statements_applied int \
                 NOT NULL, started_at timestamptz NOT NULL, applied_at timestamptz, \
                 duration_ms bigint, prefix_checksum text, in_flight int)",
                self.table
            ),
            format!(
                "CREATE TABLE IF NOT EXISTS {} (id int PRIMARY KEY, owner text NOT NULL, \
                 expires_at timestamptz NOT NULL)",
                self.lock_table()
            ),
        ] {
            // Only when missing: even `IF NOT EXISTS` is a schema change on DSQL, which gives
            // every other runner's next statement on the table OC001.
            let name = ddl.split_whitespace().nth(5).unwrap_or_default().to_owned();
            let exists = retry_transaction_on(client, &self.policy, |tx| {
                let name = name.clone();
                async move {
                    let row = tx
                        .query_one("SELECT to_regclass($1)::text IS NOT NULL", &[&name])
                        .await?;
                    Ok::<_, Error>(row.get::<_, bool>(0))
                }
            })
            .await
            .map_err(database(format!("looking for {name}")))?;
            if exists {
                continue;
            }
            let mut attempts = 0;
            loop {
                match retry_statement_on(client, &self.policy, &ddl).await {
                    Ok(_) => break,
                    // Two runners creating it at once: the loser sees the winner's table.
                    Err(e) if attempts < 5 && duplicate(&e) => attempts += 1,
                    Err(e) => return Err(database(format!("creating {}", self.table))(e)),
                }
            }
        }
        // A history written by an earlier version gets the columns it lacks.
        for (column, kind) in [("prefix_checksum", "text"), ("in_flight", "int")] {
            let table = self.table.clone();
            let present = retry_transaction_on(client, &self.policy, |tx| {
                let table = table.clone();
                async move {
                    let row = tx
                        .query_one(
                            "SELECT count(*) FROM information_schema.columns \
                             WHERE table_schema = current_schema() AND table_name = $1 \
                             AND column_name = $2",
                            &[&table, &column],
                        )
                        .await?;
                    Ok::<_, Error>(row.get::<_, i64>(0) > 0)
                }
            })
            .await
            .map_err(database(format!("reading {}'s columns", self.table)))?;
            if !present {
                let alter = format!("ALTER TABLE {} ADD COLUMN {column} {kind}", self.table);
                match retry_statement_on(client, &self.policy, &alter).await {
                    Ok(_) => {}
                    Err(e) if duplicate(&e) => {}
                    Err(e) => return Err(database(format!("adding to {}", self.table))(e)),
                }
            }
        }
        Ok(())
    }

    async fn history(&self, client: &mut Client) -> Result<Vec<HistoryRow>, MigrateError> {
        let sql = format!(
            "SELECT version, name, checksum, statements_applied, applied_at IS NOT NULL, \
             prefix_checksum, in_flight FROM {} ORDER BY version",
            self.table
        );
        // Reads meet OC001 too, after another runner's DDL.
        let rows = retry_transaction_on(client, &self.policy, |tx| {
            let sql = sql.clone();
            async move { Ok::<_, Error>(tx.query(&sql, &[]).await?) }
        })
        .await
        .map_err(database("reading the history"))?;
        Ok(rows
            .iter()
            .map(|r| HistoryRow {
                version: r.get(0),
                name: r.get(1),
                checksum: r.get(2),
                applied: r.get::<_, i32>(3).max(0) as usize,
                complete: r.get(4),
                prefix: r.get(5),
                in_flight: r.get::<_, Option<i32>>(6).map(|n| n.max(0) as usize),
            })
            .collect())
    }

    fn plan_from(&self, history: &[HistoryRow]) -> Status {
        let migrations = self
            .migrations
            .iter()
            .map(|m| {
                let total = m.statements().len();
                let state = match history.iter().find(|h| h.version == m.version()) {
                    None => MigrationState::Pending,
                    Some(h) if changed_text(m, h) => MigrationState::Changed,
                    Some(h) if h.complete => MigrationState::Applied,
                    Some(h) => MigrationState::Partial {
                        applied: h.applied.min(total),
                        total,
                    },
                };
                let statements_to_run = match &state {
                    MigrationState::Pending => total,
                    MigrationState::Partial { applied, total } => total - applied,
                    _ => 0,
                };
                Planned {
                    version: m.version(),
                    file: m.file().to_owned(),
                    state,
                    statements_to_run,
                }
            })
            .collect();
        let unknown = history
            .iter()
            .filter(|h| !self.migrations.iter().any(|m| m.version() == h.version))
            .map(|h| (h.version, h.name.clone()))
            .collect();
        Status {
            migrations,
            unknown,
        }
    }

    /// Every migration's state in the database (creating the history tables if needed).
    pub async fn status(&self, connector: &DsqlConnector) -> Result<Status, MigrateError> {
        let mut client = self.connect(connector).await?;
        self.ensure_tables(&mut client).await?;
        let history = self.history(&mut client).await?;
        Ok(self.plan_from(&history))
    }

    /// What [`run`](Self::run) would apply now: the migrations not applied yet, after the
    /// same checks.
    pub async fn plan(&self, connector: &DsqlConnector) -> Result<Vec<Planned>, MigrateError> {
        self.check()?;
        let status = self.status(connector).await?;
        self.refuse_changes(&status)?;
        Ok(status
            .migrations
            .into_iter()
            .filter(|m| m.statements_to_run > 0)
            .collect())
    }

    fn refuse_changes(&self, status: &Status) -> Result<(), MigrateError> {
        if let Some((version, name)) = status.unknown.first() {
            return Err(MigrateError::Unknown {
                version: *version,
                name: name.clone(),
            });
        }
        Ok(())
    }

    fn changed(&self, migration: &Migration, history: &[HistoryRow]) -> Option<MigrateError> {
        let h = history.iter().find(|h| h.version == migration.version())?;
        changed_text(migration, h).then(|| MigrateError::Changed {
            file: migration.file().to_owned(),
            version: migration.version(),
            applied: h.checksum.clone(),
            now: migration.checksum().to_owned(),
        })
    }

    /// Applies what is not applied yet: checks every statement first (nothing runs if one
    /// would be refused), takes the lease (waiting for another runner, up to the lock
    /// timeout), then runs each remaining statement in its own transaction, in order, under
    /// the retry policy, recording progress after each, and waits for each asynchronous
    /// index build. Returns at once, without the lease, when everything is applied.
    pub async fn run(&self, connector: &DsqlConnector) -> Result<Report, MigrateError> {
        self.check()?;
        let mut client = self.connect(connector).await?;
        self.ensure_tables(&mut client).await?;
        let owner = format!(
            "{}-{}-{:08x}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "runner".into()),
            std::process::id(),
            fastrand::u32(..)
        );
        let mut report = Report::default();
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            let history = self.history(&mut client).await?;
            let status = self.plan_from(&history);
            self.refuse_changes(&status)?;
            for migration in self.migrations.iter() {
                if let Some(changed) = self.changed(migration, &history) {
                    return Err(changed);
                }
            }
            if status.up_to_date() {
                return Ok(report);
            }
            match self.try_lease(&mut client, &owner).await? {
                None => break,
                Some(holder) => {
                    report.waited_for_lease = true;
                    if started.elapsed() >= self.lock_timeout {
                        return Err(MigrateError::LockTimeout {
                            owner: holder,
                            timeout: self.lock_timeout,
                        });
                    }
                    tokio::time::sleep(backoff + Duration::from_millis(fastrand::u64(..25))).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        let keeper = LeaseKeeper::start(self, connector, &owner);
        let outcome = self.apply(&mut client, &owner, &keeper, &mut report).await;
        drop(keeper);
        // Freed whatever happened (retried: another runner's DDL gives this OC001 too); an
        // expired lease frees itself if this fails.
        if let Err(error) = self.give_back_lease(&mut client, &owner).await {
            tracing::warn!(%error, "the migration lease was not given back; it expires");
        }
        outcome.map(|()| report)
    }

    /// Gives `owner`'s lease back (retried on conflicts: another runner's DDL gives this
    /// `OC001` too).
    async fn give_back_lease(&self, client: &mut Client, owner: &str) -> Result<u64, Error> {
        let release = format!(
            "DELETE FROM {} WHERE id = 1 AND owner = $1",
            self.lock_table()
        );
        retry_transaction_on(client, &self.policy, |tx| {
            let release = release.clone();
            async move { Ok::<_, Error>(tx.execute(&release, &[&owner]).await?) }
        })
        .await
    }

    /// Takes the lease for `owner`: `None` if taken, else the other holder.
    async fn try_lease(
        &self,
        client: &mut Client,
        owner: &str,
    ) -> Result<Option<String>, MigrateError> {
        let table = self.lock_table();
        let lease_secs = self.lease.as_secs_f64();
        let once = RetryPolicy::default().with_max_attempts(1);
        let result = retry_transaction_on(client, &once, |tx| {
            let table = table.clone();
            async move {
                let holder = tx
                    .query_opt(
                        &format!(
                            "SELECT owner FROM {table} WHERE id = 1 AND expires_at > now() \
                             AND owner <> $1"
                        ),
                        &[&owner],
                    )
                    .await?;
                if let Some(row) = holder {
                    return Ok(Some(row.get::<_, String>(0)));
                }
                tx.execute(
                    &format!(
                        "INSERT INTO {table} VALUES (1, $1, now() + make_interval(secs => $2)) \
                         ON CONFLICT (id) DO UPDATE SET owner = EXCLUDED.owner, \
                         expires_at = EXCLUDED.expires_at"
                    ),
                    &[&owner, &lease_secs],
                )
                .await?;
                Ok::<_, Error>(None)
            }
        })
        .await;
        match result {
            Ok(holder) => Ok(holder),
            // Another runner wrote the row first: it holds the lease.
            Err(e) if e.occ_conflict().is_some() || duplicate(&e) => {
                Ok(Some("another runner".into()))
            }
            Err(e) => Err(database("taking the migration lease")(e)),
        }
    }

    /// Checks, in transaction `tx`, that `owner` still holds the lease (whether or not it
    /// expired: only another owner fences it out).
    async fn holds_lease(&self, tx: &Client, owner: &str) -> Result<(), StepError> {
        let holder = tx
            .query_opt(
                &format!("SELECT owner FROM {} WHERE id = 1", self.lock_table()),
                &[],
            )
            .await?
            .map(|row| row.get::<_, String>(0));
        match holder {
            Some(holder) if holder == owner => Ok(()),
            Some(holder) => Err(StepError::Fenced(Fenced::LeaseLost(holder))),
            None => Err(StepError::Fenced(Fenced::LeaseLost("nobody".into()))),
        }
    }

    /// One field (`expression`) of `migration`'s record, read in transaction `tx`; `None` when
    /// the record is gone.
    async fn record_field<T>(
        &self,
        tx: &Client,
        migration: &Migration,
        expression: &str,
    ) -> Result<Option<T>, tokio_postgres::Error>
    where
        T: for<'r> tokio_postgres::types::FromSql<'r>,
    {
        let sql = format!("SELECT {expression} FROM {} WHERE version = $1", self.table);
        Ok(tx
            .query_opt(&sql, &[&migration.version()])
            .await?
            .map(|row| row.get(0)))
    }

    /// Checks, in transaction `tx`, that `migration`'s record still says `index` statements
    /// applied.
    async fn at_statement(
        &self,
        tx: &Client,
        migration: &Migration,
        index: usize,
    ) -> Result<(), StepError> {
        let applied: Option<i32> = self
            .record_field(tx, migration, "statements_applied")
            .await?;
        match applied {
            Some(applied) if applied as usize == index => Ok(()),
            Some(_) => Err(StepError::Fenced(Fenced::AppliedByOther)),
            None => Err(StepError::Fenced(Fenced::RecordGone)),
        }
    }

    /// Records, in transaction `tx`, that statement `index` of `migration` is about to be sent
    /// (`Some`) or that it failed (`None`): only while the record says `index` applied.
    async fn mark_in_flight(
        &self,
        tx: &Client,
        migration: &Migration,
        index: usize,
        on: bool,
    ) -> Result<(), StepError> {
        let sql = format!(
            "UPDATE {} SET in_flight = $3 WHERE version = $1 AND statements_applied = $2",
            self.table
        );
        let marker = on.then_some(index as i32 + 1);
        let marked = tx
            .execute(&sql, &[&migration.version(), &(index as i32), &marker])
            .await?;
        if marked == 1 {
            Ok(())
        } else {
            Err(StepError::Fenced(Fenced::AppliedByOther))
        }
    }

    /// Records, in transaction `tx`, statement `index` of `migration` applied: only if the
    /// record still says `index` (the write every other runner's record conflicts with).
    async fn record_progress(
        &self,
        tx: &Client,
        migration: &Migration,
        index: usize,
    ) -> Result<(), StepError> {
        let sql = format!(
            "UPDATE {} SET statements_applied = $3, prefix_checksum = $4, checksum = $5, \
             statements_total = $6, in_flight = NULL WHERE version = $1 \
             AND statements_applied = $2",
            self.table
        );
        let (at, next) = (index as i32, index as i32 + 1);
        let prefix = prefix_checksum(migration, index + 1);
        let total = migration.statements().len() as i32;
        let recorded = tx
            .execute(
                &sql,
                &[
                    &migration.version(),
                    &at,
                    &next,
                    &prefix,
                    &migration.checksum(),
                    &total,
                ],
            )
            .await?;
        if recorded == 1 {
            Ok(())
        } else {
            Err(StepError::Fenced(Fenced::AppliedByOther))
        }
    }

    /// `MigrateError::LeaseLost` naming the holder, for a fence met at a statement.
    fn fence_error(fenced: Fenced) -> Result<bool, MigrateError> {
        match fenced {
            Fenced::LeaseLost(owner) => Err(MigrateError::LeaseLost { owner }),
            Fenced::AppliedByOther => Ok(false),
            Fenced::RecordGone => Err(MigrateError::LeaseLost {
                owner: "a repair (the file's record was removed)".into(),
            }),
        }
    }

    /// Checks the lease now, in a transaction of its own.
    async fn check_lease(&self, client: &mut Client, owner: &str) -> Result<(), MigrateError> {
        let held = retry_transaction_on(client, &self.policy, |tx| async move {
            self.holds_lease(&tx, owner).await
        })
        .await;
        match held {
            Ok(()) => Ok(()),
            Err(StepError::Fenced(fenced)) => Self::fence_error(fenced).map(|_| ()),
            Err(StepError::Db(e)) => Err(database("checking the migration lease")(e)),
        }
    }

    async fn apply(
        &self,
        client: &mut Client,
        owner: &str,
        keeper: &LeaseKeeper,
        report: &mut Report,
    ) -> Result<(), MigrateError> {
        let history = self.history(client).await?;
        for migration in self.migrations.iter() {
            if let Some(changed) = self.changed(migration, &history) {
                return Err(changed);
            }
            let row = history.iter().find(|h| h.version == migration.version());
            if row.is_some_and(|h| h.complete) {
                continue;
            }
            let started = Instant::now();
            let resume_at = row.map_or(0, |h| h.applied);
            if row.is_none() {
                self.record_start(client, migration).await?;
            }
            let statements = migration.statements();
            for (index, statement) in statements.iter().enumerate().skip(resume_at) {
                keeper.check()?;
                let fail = |source| MigrateError::Statement {
                    file: migration.file().to_owned(),
                    line: statement.line,
                    index: index + 1,
                    source,
                };
                let applied = if is_dml(&statement.text) {
                    // The statement and its progress record commit together, fenced by the
                    // lease and by the record itself: exactly once.
                    let text = statement.text.clone();
                    let outcome = retry_transaction_on(client, &self.policy, |tx| {
                        let text = text.clone();
                        async move {
                            self.holds_lease(&tx, owner).await?;
                            self.at_statement(&tx, migration, index).await?;
                            tx.batch_execute(&text).await?;
                            self.record_progress(&tx, migration, index).await
                        }
                    })
                    .await;
                    match outcome {
                        Ok(()) => true,
                        Err(StepError::Fenced(fenced)) => Self::fence_error(fenced)?,
                        Err(StepError::Db(e)) => return Err(fail(e)),
                    }
                } else {
                    // A statement that a run sent and did not record before it stopped (its
                    // intent is in the record) may have been applied: "already exists" (a
                    // DROP's "does not exist") is taken as applied then, and only then.
                    let resumed =
                        index == resume_at && row.is_some_and(|h| h.in_flight == Some(index + 1));
                    let intent = retry_transaction_on(client, &self.policy, |tx| async move {
                        self.holds_lease(&tx, owner).await?;
                        self.mark_in_flight(&tx, migration, index, true).await
                    })
                    .await;
                    match intent {
                        Ok(()) => {}
                        Err(StepError::Fenced(fenced)) => {
                            if !Self::fence_error(fenced)? {
                                // Another runner recorded it meanwhile.
                                continue;
                            }
                        }
                        Err(StepError::Db(e)) => {
                            return Err(database("recording a statement's intent")(e));
                        }
                    }
                    let mut job = None;
                    let mut found = false;
                    match retry_statement_on(client, &self.policy, &statement.text).await {
                        Ok(rows) if is_async_ddl(&statement.text) => {
                            job = rows
                                .first()
                                .and_then(|r| r.get("job_id"))
                                .map(str::to_owned);
                            // (`IF NOT EXISTS` over an index a stopped run made: no job.)
                            found = job.is_none() && resumed;
                        }
                        Ok(_) => {}
                        Err(e)
                            if resumed
                                && (duplicate(&e)
                                    || (is_drop(&statement.text) && undefined(&e))) =>
                        {
                            tracing::warn!(
                                file = migration.file(),
                                line = statement.line,
                                "a resumed migration's statement was applied by the run that \
                                 stopped; going on"
                            );
                            found = is_async_ddl(&statement.text);
                        }
                        Err(e) => {
                            // A runner that lost the lease says so (the holder may have
                            // applied the statement meanwhile).
                            self.check_lease(client, owner).await?;
                            // A definite failure: the intent goes, so that a re-run does not
                            // take "already exists" for success.
                            let cleared =
                                retry_transaction_on(client, &self.policy, |tx| async move {
                                    self.mark_in_flight(&tx, migration, index, false).await
                                })
                                .await;
                            if let Err(StepError::Db(error)) = cleared {
                                tracing::warn!(%error, "clearing a failed statement's intent");
                            }
                            return Err(fail(e));
                        }
                    }
                    if found {
                        job = self
                            .resumed_index(client, migration, statement.line, &statement.text)
                            .await?;
                    }
                    if let Some(job) = job {
                        self.wait_for_job(client, keeper, migration, statement.line, &job)
                            .await?;
                    }
                    let outcome = retry_transaction_on(client, &self.policy, |tx| async move {
                        self.holds_lease(&tx, owner).await?;
                        self.record_progress(&tx, migration, index).await
                    })
                    .await;
                    match outcome {
                        Ok(()) => true,
                        Err(StepError::Fenced(fenced)) => Self::fence_error(fenced)?,
                        Err(StepError::Db(e)) => return Err(database("recording progress")(e)),
                    }
                };
                if applied {
                    report.statements_applied += 1;
                }
            }
            let finish = format!(
                "UPDATE {} SET applied_at = now(), duration_ms = $2 WHERE version = $1 \
                 AND applied_at IS NULL AND statements_applied = statements_total",
                self.table
            );
            let duration = started.elapsed().as_millis() as i64;
            let finished = retry_transaction_on(client, &self.policy, |tx| {
                let finish = finish.clone();
                async move {
                    self.holds_lease(&tx, owner).await?;
                    let done = tx
                        .execute(&finish, &[&migration.version(), &duration])
                        .await?;
                    if done == 1 {
                        return Ok(true);
                    }
                    // Finished by another runner (this one's lease lapsed), or not complete.
                    let complete: Option<bool> = self
                        .record_field(&tx, migration, "applied_at IS NOT NULL")
                        .await?;
                    match complete {
                        Some(true) => Ok(false),
                        Some(false) => Err(StepError::Fenced(Fenced::AppliedByOther)),
                        None => Err(StepError::Fenced(Fenced::RecordGone)),
                    }
                }
            })
            .await;
            match finished {
                Ok(true) => report.applied.push(migration.version()),
                // Another runner finished it: it reports it.
                Ok(false) => {}
                Err(StepError::Fenced(Fenced::AppliedByOther)) => {
                    return Err(MigrateError::LeaseLost {
                        owner: "another runner (the file's record is not complete)".into(),
                    });
                }
                Err(StepError::Fenced(fenced)) => {
                    Self::fence_error(fenced)?;
                }
                Err(StepError::Db(e)) => {
                    return Err(database("recording a finished migration")(e));
                }
            }
        }
        Ok(())
    }

    async fn record_start(
        &self,
        client: &mut Client,
        migration: &Migration,
    ) -> Result<(), MigrateError> {
        let statement = format!(
            "INSERT INTO {} (version, name, checksum, statements_total, statements_applied, \
             started_at, prefix_checksum) VALUES ({}, '{}', '{}', {}, 0, now(), '{}')",
            self.table,
            migration.version(),
            migration.name().replace('\'', "''"),
            migration.checksum(),
            migration.statements().len(),
            prefix_checksum(migration, 0),
        );
        match retry_statement_on(client, &self.policy, &statement).await {
            // Another runner recorded it first (this one's lease lapsed): the fenced steps
            // that follow find out which runner goes on.
            Ok(_) => Ok(()),
            Err(e) if duplicate(&e) => Ok(()),
            Err(e) => Err(database("recording a started migration")(e)),
        }
    }

    /// A resumed `CREATE INDEX ASYNC` found its index: the job to wait for (the index's newest
    /// build), or, when `sys.jobs` no longer lists one (finished jobs stay about 30 minutes),
    /// the index's own state: an invalid index (a failed build) is an error naming it and the
    /// remedy; a valid one, or one the runner cannot name, is taken as built.
    async fn resumed_index(
        &self,
        client: &mut Client,
        migration: &Migration,
        line: usize,
        text: &str,
    ) -> Result<Option<String>, MigrateError> {
        if let Some(job) = self.job_of(client, text).await? {
            return Ok(Some(job));
        }
        let Some(name) = index_name(text) else {
            return Ok(None);
        };
        let valid = retry_transaction_on(client, &self.policy, |tx| {
            let name = name.clone();
            async move {
                Ok::<_, Error>(
                    tx.query_opt(
                        "SELECT i.indisvalid FROM pg_index i JOIN pg_class c \
                         ON c.oid = i.indexrelid WHERE c.relname = $1 \
                         AND c.relnamespace = ANY(current_schemas(false)::regnamespace[])",
                        &[&name],
                    )
                    .await?
                    .map(|row| row.get::<_, bool>(0)),
                )
            }
        })
        .await
        .map_err(database("reading the index's state"))?;
        if valid == Some(false) {
            return Err(MigrateError::Job {
                file: migration.file().to_owned(),
                line,
                job_id: "(no longer listed in sys.jobs)".into(),
                status: "failed".into(),
                details: format!(
                    "the index {name} is invalid (its build failed) and may still enforce \
                     uniqueness: drop it (DROP INDEX {name}), fix the data, and create it again \
                     in a new migration"
                ),
            });
        }
        Ok(None)
    }

    /// The newest job of the index a resumed `CREATE INDEX ASYNC` names, if any.
    async fn job_of(
        &self,
        client: &mut Client,
        text: &str,
    ) -> Result<Option<String>, MigrateError> {
        let Some(name) = index_name(text) else {
            return Ok(None);
        };
        retry_transaction_on(client, &self.policy, |tx| {
            let name = name.clone();
            async move {
                Ok::<_, Error>(
                    tx.query_opt(
                        // DSQL names the index with its schema (`public.i`): one of the
                        // schemas the runner's statements resolve names in.
                        "SELECT job_id FROM sys.jobs \
                         WHERE (object_name = $1 OR object_name IN \
                                (SELECT s || '.' || $1 FROM unnest(current_schemas(false)) s)) \
                         AND job_type = 'INDEX_BUILD' ORDER BY start_time DESC LIMIT 1",
                        &[&name],
                    )
                    .await?
                    .map(|row| row.get::<_, String>(0)),
                )
            }
        })
        .await
        .map_err(database("reading sys.jobs"))
    }

    /// Waits for DSQL's job `job` by polling `sys.jobs` on the runner's connection (short
    /// sleeps, growing to a second; the lease is renewed meanwhile by its own task), bounded
    /// by the job timeout; fails if the job failed, naming it, its details and the remedy.
    async fn wait_for_job(
        &self,
        client: &mut Client,
        keeper: &LeaseKeeper,
        migration: &Migration,
        line: usize,
        job: &str,
    ) -> Result<(), MigrateError> {
        let job_error = |status: &str, details: String| MigrateError::Job {
            file: migration.file().to_owned(),
            line,
            job_id: job.to_owned(),
            status: status.to_owned(),
            details,
        };
        let deadline = Instant::now() + self.job_timeout;
        let mut pause = Duration::from_millis(100);
        loop {
            keeper.check()?;
            let row = retry_transaction_on(client, &self.policy, |tx| async move {
                Ok::<_, Error>(
                    tx.query_opt(
                        "SELECT status, coalesce(details, ''), \
                         CASE WHEN job_type = 'INDEX_BUILD' THEN coalesce(object_name, '') \
                         ELSE '' END FROM sys.jobs WHERE job_id = $1",
                        &[&job],
                    )
                    .await?,
                )
            })
            .await
            .map_err(database("reading sys.jobs"))?;
            let (status, details, object): (String, String, String) = match &row {
                Some(row) => (
                    row.get::<_, String>(0).to_ascii_lowercase(),
                    row.get(1),
                    row.get(2),
                ),
                None => ("submitted".into(), String::new(), String::new()),
            };
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => {
                    let remedy = if object.is_empty() {
                        String::new()
                    } else {
                        format!(
                            "; the index {object} may stay behind, invalid, and still enforce \
                             uniqueness: drop it (DROP INDEX {object}), fix the data, and \
                             create it again in a new migration"
                        )
                    };
                    return Err(job_error(&status, format!("{details}{remedy}")));
                }
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(job_error(
                    "not finished",
                    format!("after {:?}", self.job_timeout),
                ));
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_secs(1));
        }
    }

    /// Repairs the records of files that failed part-way, so that the next run applies them as
    /// they are now: a record that applied nothing is removed; one that applied some statements
    /// takes the file's checksum as it is now (the applied statements stay applied and are
    /// not run again). Takes the lease for the change (fails if another runner holds it);
    /// returns what it changed. Applied files and versions no file has are left alone.
    pub async fn repair(&self, connector: &DsqlConnector) -> Result<Vec<Repaired>, MigrateError> {
        self.check()?;
        let mut client = self.connect(connector).await?;
        self.ensure_tables(&mut client).await?;
        let owner = format!("repair-{}-{:08x}", std::process::id(), fastrand::u32(..));
        // The lease, waited for as a run waits (a runner at work must not see its record
        // change under it).
        let started = Instant::now();
        let mut backoff = Duration::from_millis(50);
        while let Some(holder) = self.try_lease(&mut client, &owner).await? {
            if started.elapsed() >= self.lock_timeout {
                return Err(MigrateError::LockTimeout {
                    owner: holder,
                    timeout: self.lock_timeout,
                });
            }
            tokio::time::sleep(backoff + Duration::from_millis(fastrand::u64(..25))).await;
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
        let history = self.history(&mut client).await?;
        let mut repaired = Vec::new();
        let mut outcome = Ok(());
        for migration in self.migrations.iter() {
            let Some(h) = history.iter().find(|h| h.version == migration.version()) else {
                continue;
            };
            if h.complete {
                continue;
            }
            let version = migration.version();
            let owner = owner.as_str();
            let change = if h.applied == 0 && h.in_flight.is_none() {
                // Nothing applied, nothing in flight: the next run starts the file anew.
                let sql = format!(
                    "DELETE FROM {} WHERE version = $1 AND statements_applied = 0 \
                     AND in_flight IS NULL",
                    self.table
                );
                retry_transaction_on(&mut client, &self.policy, |tx| {
                    let sql = sql.clone();
                    async move {
                        self.holds_lease(&tx, owner).await?;
                        Ok::<_, StepError>(tx.execute(&sql, &[&version]).await?)
                    }
                })
                .await
                .map(|n| {
                    (n == 1).then(|| Repaired::Removed {
                        version,
                        file: migration.file().to_owned(),
                    })
                })
            } else if h.checksum == migration.checksum() {
                // Nothing to accept.
                Ok(None)
            } else {
                let applied = h.applied.min(migration.statements().len());
                let sql = format!(
                    "UPDATE {} SET checksum = $2, prefix_checksum = $3, statements_total = $4 \
                     WHERE version = $1 AND statements_applied = $5",
                    self.table
                );
                let (prefix, total) = (
                    prefix_checksum(migration, applied),
                    migration.statements().len() as i32,
                );
                let at = h.applied as i32;
                retry_transaction_on(&mut client, &self.policy, |tx| {
                    let (sql, prefix) = (sql.clone(), prefix.clone());
                    async move {
                        self.holds_lease(&tx, owner).await?;
                        Ok::<_, StepError>(
                            tx.execute(
                                &sql,
                                &[&version, &migration.checksum(), &prefix, &total, &at],
                            )
                            .await?,
                        )
                    }
                })
                .await
                .map(|n| {
                    (n == 1).then(|| Repaired::Accepted {
                        version,
                        file: migration.file().to_owned(),
                        applied,
                        old_checksum: h.checksum.clone(),
                        new_checksum: migration.checksum().to_owned(),
                    })
                })
            };
            match change {
                Ok(Some(change)) => repaired.push(change),
                // (Its record changed meanwhile: nothing done.)
                Ok(None) => {}
                Err(StepError::Fenced(fenced)) => {
                    outcome = Self::fence_error(fenced).map(|_| ());
                    break;
                }
                Err(StepError::Db(e)) => {
                    outcome = Err(database("repairing the history")(e));
                    break;
                }
            }
        }
        if let Err(error) = self.give_back_lease(&mut client, &owner).await {
            tracing::warn!(%error, "the migration lease was not given back; it expires");
        }
        outcome.map(|()| repaired)
    }
}

/// Whether `migration`'s text differs from what its record `h` applied: the whole file once
/// it is applied; the statements applied so far while it is not (the rest may be edited).
fn changed_text(migration: &Migration, h: &HistoryRow) -> bool {
    if h.checksum == migration.checksum() {
        return false;
    }
    if h.complete || h.applied > migration.statements().len() {
        return true;
    }
    match &h.prefix {
        Some(prefix) => *prefix != prefix_checksum(migration, h.applied),
        // (Recorded before the applied part's checksum was kept: the whole file counts.)
        None => true,
    }
}

/// A "duplicate" error: another runner created the object, or inserted the row, first.
fn duplicate(error: &Error) -> bool {
    matches!(
        error.code().map(|c| c.code()),
        Some("42P07" | "42710" | "42701" | "42P06" | "23505")
    )
}

/// An "undefined" error: what a `DROP` run again answers.
fn undefined(error: &Error) -> bool {
    matches!(
        error.code().map(|c| c.code()),
        Some("42P01" | "42704" | "42703" | "3F000" | "42883")
    )
}
