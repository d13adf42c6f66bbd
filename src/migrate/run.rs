//! Running migrations: the history and lease tables, the lease, and each statement in a
//! transaction of its own.
//!
//! **The lease.** DSQL has no advisory locks, and its writers never wait for each other: the
//! first transaction to commit wins and the others fail at `COMMIT` (`OC000`). The lease is a
//! row (`id = 1`) of `<history>_lock` holding an owner and an expiry. A runner takes it in one
//! transaction that reads the row and, if it is absent, expired or its own, writes it with a
//! new expiry; two runners that try at once both write the row and only the first `COMMIT`
//! succeeds, so exactly one holds it. The holder renews it between statements (a write that
//! names it as owner; a renewal that finds another owner stops the run), and deletes it at the
//! end. The others poll, with backoff, until it is free or everything is applied; a runner that
//! dies frees the lease when it expires.

use std::time::{Duration, Instant};

use tokio_postgres::Client;

use super::{MigrateError, Migration, Migrator};
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
                 duration_ms bigint)",
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
        Ok(())
    }

    async fn history(&self, client: &mut Client) -> Result<Vec<HistoryRow>, MigrateError> {
        let sql = format!(
            "SELECT version, name, checksum, statements_applied, applied_at IS NOT NULL \
             FROM {} ORDER BY version",
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
                    Some(h) if h.checksum != m.checksum() => MigrationState::Changed,
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
        (h.checksum != migration.checksum()).then(|| MigrateError::Changed {
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
        let outcome = self.apply(&mut client, &owner, &mut report).await;
        // Freed whatever happened (retried: another runner's DDL gives this OC001 too); an
        // expired lease frees itself if this fails.
        let release = format!(
            "DELETE FROM {} WHERE id = 1 AND owner = $1",
            self.lock_table()
        );
        let released = retry_transaction_on(&mut client, &self.policy, |tx| {
            let (release, owner) = (release.clone(), owner.clone());
            async move { Ok::<_, Error>(tx.execute(&release, &[&owner]).await?) }
        })
        .await;
        if let Err(error) = released {
            tracing::warn!(%error, "the migration lease was not given back; it expires");
        }
        outcome.map(|()| report)
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

    async fn renew(&self, client: &mut Client, owner: &str) -> Result<(), MigrateError> {
        let sql = format!(
            "UPDATE {} SET expires_at = now() + make_interval(secs => $2) \
             WHERE id = 1 AND owner = $1",
            self.lock_table()
        );
        let lease = self.lease.as_secs_f64();
        let renewed = retry_transaction_on(client, &self.policy, |tx| {
            let sql = sql.clone();
            async move { Ok::<_, Error>(tx.execute(&sql, &[&owner, &lease]).await?) }
        })
        .await
        .map_err(database("renewing the migration lease"))?;
        if renewed == 0 {
            let holder = client
                .query_opt(
                    &format!("SELECT owner FROM {} WHERE id = 1", self.lock_table()),
                    &[],
                )
                .await
                .ok()
                .flatten()
                .map_or_else(|| "nobody".to_owned(), |r| r.get(0));
            return Err(MigrateError::LeaseLost { owner: holder });
        }
        Ok(())
    }

    async fn apply(
        &self,
        client: &mut Client,
        owner: &str,
        report: &mut Report,
    ) -> Result<(), MigrateError> {
        let history = self.history(client).await?;
        let mut renewed_at = Instant::now();
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
                if renewed_at.elapsed() >= self.lease / 3 {
                    self.renew(client, owner).await?;
                    renewed_at = Instant::now();
                }
                let fail = |source| MigrateError::Statement {
                    file: migration.file().to_owned(),
                    line: statement.line,
                    index: index + 1,
                    source,
                };
                let progress = format!(
                    "UPDATE {} SET statements_applied = {} WHERE version = {}",
                    self.table,
                    index + 1,
                    migration.version()
                );
                if is_dml(&statement.text) {
                    // The statement and its progress commit together.
                    let text = statement.text.clone();
                    retry_transaction_on(client, &self.policy, |tx| {
                        let (text, progress) = (text.clone(), progress.clone());
                        async move {
                            tx.batch_execute(&text).await?;
                            tx.batch_execute(&progress).await?;
                            Ok::<_, Error>(())
                        }
                    })
                    .await
                    .map_err(fail)?;
                } else {
                    match retry_statement_on(client, &self.policy, &statement.text).await {
                        Ok(rows) if is_async_ddl(&statement.text) => {
                            let job = rows
                                .first()
                                .and_then(|r| r.get("job_id"))
                                .map(str::to_owned);
                            if let Some(job) = job {
                                self.wait_for_job(client, owner, migration, statement.line, &job)
                                    .await?;
                                renewed_at = Instant::now();
                            }
                        }
                        Ok(_) => {}
                        // The statement a dead runner had applied but not recorded: DDL and
                        // its record cannot commit together on DSQL.
                        Err(e) if index == resume_at && resume_at > 0 && duplicate(&e) => {
                            tracing::warn!(
                                file = migration.file(),
                                line = statement.line,
                                "a resumed migration's first statement was already applied"
                            );
                        }
                        Err(e) => return Err(fail(e)),
                    }
                    retry_statement_on(client, &self.policy, &progress)
                        .await
                        .map_err(database("recording progress"))?;
                }
                report.statements_applied += 1;
            }
            retry_statement_on(
                client,
                &self.policy,
                &format!(
                    "UPDATE {} SET applied_at = now(), duration_ms = {} WHERE version = {}",
                    self.table,
                    started.elapsed().as_millis(),
                    migration.version()
                ),
            )
            .await
            .map_err(database("recording a finished migration"))?;
            report.applied.push(migration.version());
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
             started_at) VALUES ({}, '{}', '{}', {}, 0, now())",
            self.table,
            migration.version(),
            migration.name().replace('\'', "''"),
            migration.checksum(),
            migration.statements().len()
        );
        retry_statement_on(client, &self.policy, &statement)
            .await
            .map(|_| ())
            .map_err(database("recording a started migration"))
    }

    /// Waits for DSQL's job `job` (`sys.wait_for_job`, bounded by the job timeout, renewing
    /// the lease meanwhile), then fails if `sys.jobs` says it did not complete.
    async fn wait_for_job(
        &self,
        client: &mut Client,
        owner: &str,
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
        loop {
            let row = retry_transaction_on(client, &self.policy, |tx| async move {
                Ok::<_, Error>(
                    tx.query_opt(
                        "SELECT status, coalesce(details, '') FROM sys.jobs WHERE job_id = $1",
                        &[&job],
                    )
                    .await?,
                )
            })
            .await
            .map_err(database("reading sys.jobs"))?;
            let (status, details): (String, String) = match &row {
                Some(row) => (row.get::<_, String>(0).to_ascii_lowercase(), row.get(1)),
                None => ("submitted".into(), String::new()),
            };
            match status.as_str() {
                "completed" => return Ok(()),
                "failed" | "cancelled" => return Err(job_error(&status, details)),
                _ => {}
            }
            if Instant::now() >= deadline {
                return Err(job_error(
                    "not finished",
                    format!("after {:?}", self.job_timeout),
                ));
            }
            // `sys.wait_for_job` returns when the job ends; bounded by the lease's renewal.
            let wait = tokio::time::timeout(
                self.lease / 3,
                client.batch_execute(&format!(
                    "CALL sys.wait_for_job('{}')",
                    job.replace('\'', "''")
                )),
            )
            .await;
            if let Ok(Err(e)) = wait {
                tracing::debug!(error = %e, job, "sys.wait_for_job failed; polling sys.jobs");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            self.renew(client, owner).await?;
        }
    }
}

/// A "duplicate" error: another runner created the object, or inserted the row, first.
fn duplicate(error: &Error) -> bool {
    matches!(
        error.code().map(|c| c.code()),
        Some("42P07" | "42710" | "42701" | "42P06" | "23505")
    )
}
