//! Schema migrations that work on DSQL (feature `migrate`): each statement in a transaction of
//! its own, progress recorded statement by statement, a lease instead of an advisory lock, and
//! DSQL's refusals found before anything runs. See [`guide::migrations`](crate::guide::migrations).
//!
//! ```no_run
//! use tokio_postgres_dsql::{DsqlConfig, DsqlConnector, migrate::Migrator};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let connector = DsqlConnector::new(DsqlConfig::from_env()?).await?;
//! // Files embedded at compile time, relative to the crate's Cargo.toml.
//! let migrations = tokio_postgres_dsql::migrations!(
//!     "examples/migrations/pet_clinic/0001_create_tables.sql",
//!     "examples/migrations/pet_clinic/0002_pet_owner_index.sql",
//! )?;
//! let report = Migrator::new(migrations).run(&connector).await?;
//! println!("applied {} statements", report.statements_applied);
//! # Ok(()) }
//! ```

mod check;
mod run;
mod split;

use std::path::Path;
use std::time::Duration;

use sha2::{Digest, Sha256};

pub use check::Finding;
pub use run::{MigrationState, Planned, Repaired, Report, Status};
pub use split::{SqlStatement, split_statements};

use crate::RetryPolicy;

/// One migration: a versioned SQL file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migration {
    version: i64,
    name: String,
    file: String,
    sql: String,
    checksum: String,
    statements: Vec<SqlStatement>,
}

impl Migration {
    /// A migration from its file name (`0001_create_owners.sql`: version 1, name
    /// `create_owners`; a path is fine, its last part is used) and its text.
    pub fn new(file: impl Into<String>, sql: impl Into<String>) -> Result<Migration, MigrateError> {
        let file = file.into();
        let sql = sql.into();
        let base = file.rsplit(['/', '\\']).next().unwrap_or(&file).to_owned();
        let stem = base
            .strip_suffix(".sql")
            .ok_or_else(|| MigrateError::FileName {
                file: file.clone(),
                reason: "a migration file ends in .sql".into(),
            })?;
        let (digits, name) = stem.split_once('_').unwrap_or((stem, ""));
        let version = digits
            .parse::<i64>()
            .ok()
            .filter(|v| *v > 0 && digits.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| MigrateError::FileName {
                file: file.clone(),
                reason: "the name starts with a positive version number, as in \
                         0001_create_owners.sql"
                    .into(),
            })?;
        let statements = split_statements(&sql);
        let checksum = hex::encode(Sha256::digest(sql.as_bytes()));
        Ok(Migration {
            version,
            name: name.to_owned(),
            file: base,
            sql,
            checksum,
            statements,
        })
    }

    /// The version, from the file name.
    pub fn version(&self) -> i64 {
        self.version
    }

    /// The name, from the file name (after the version and `_`, without `.sql`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file name.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The SQL text.
    pub fn sql(&self) -> &str {
        &self.sql
    }

    /// SHA-256 of the text, hex: an applied migration whose text changes is refused.
    pub fn checksum(&self) -> &str {
        &self.checksum
    }

    /// The statements, in order, each run in a transaction of its own.
    pub fn statements(&self) -> &[SqlStatement] {
        &self.statements
    }
}

/// An ordered set of migrations, versions unique.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Migrations(Vec<Migration>);

impl Migrations {
    /// From `(file name, text)` pairs, as [`migrations!`](crate::migrations) embeds them.
    pub fn embedded(files: &[(&str, &str)]) -> Result<Migrations, MigrateError> {
        Self::from_migrations(
            files
                .iter()
                .map(|(file, sql)| Migration::new(*file, *sql))
                .collect::<Result<_, _>>()?,
        )
    }

    /// Every `*.sql` file of `dir`, read now.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Migrations, MigrateError> {
        let dir = dir.as_ref();
        let read_error = |e: std::io::Error| MigrateError::Read {
            path: dir.display().to_string(),
            source: e,
        };
        let mut migrations = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(read_error)? {
            let path = entry.map_err(read_error)?.path();
            if path.extension().is_some_and(|e| e == "sql") {
                let sql = std::fs::read_to_string(&path).map_err(|e| MigrateError::Read {
                    path: path.display().to_string(),
                    source: e,
                })?;
                migrations.push(Migration::new(path.display().to_string(), sql)?);
            }
        }
        Self::from_migrations(migrations)
    }

    /// From migrations in any order; refuses two with one version.
    pub fn from_migrations(mut migrations: Vec<Migration>) -> Result<Migrations, MigrateError> {
        migrations.sort_by_key(|m| m.version);
        if let Some(pair) = migrations.windows(2).find(|p| p[0].version == p[1].version) {
            return Err(MigrateError::FileName {
                file: pair[1].file.clone(),
                reason: format!("version {} is also {}", pair[1].version, pair[0].file),
            });
        }
        Ok(Migrations(migrations))
    }

    /// The migrations, by version.
    pub fn iter(&self) -> impl Iterator<Item = &Migration> {
        self.0.iter()
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Embeds migration files at compile time, paths relative to the calling crate's `Cargo.toml`:
/// `migrations!("migrations/0001_create_owners.sql", …)` gives a
/// `Result<Migrations, MigrateError>`.
#[macro_export]
macro_rules! migrations {
    ($($path:literal),+ $(,)?) => {
        $crate::migrate::Migrations::embedded(&[
            $(($path, include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/", $path)))),+
        ])
    };
}

/// Runs migrations against DSQL (or the emulator): see the module docs.
#[derive(Debug, Clone)]
#[must_use]
pub struct Migrator {
    migrations: Migrations,
    table: String,
    lease: Duration,
    lock_timeout: Duration,
    job_timeout: Duration,
    policy: RetryPolicy,
    renew: bool,
}

impl Migrator {
    /// A migrator with the defaults: history in `dsql_migrations`, its lease in
    /// `dsql_migrations_lock`, a 30 s lease, waiting up to 10 minutes for another runner and
    /// 30 minutes for an index build, and 20 attempts a statement on conflicts.
    pub fn new(migrations: Migrations) -> Migrator {
        Migrator {
            migrations,
            table: "dsql_migrations".into(),
            lease: Duration::from_secs(30),
            lock_timeout: Duration::from_secs(600),
            job_timeout: Duration::from_secs(1800),
            policy: RetryPolicy::default().with_max_attempts(20),
            renew: true,
        }
    }

    /// The history table (a plain name, `[a-z_][a-z0-9_]*`; the lease table is it +
    /// `_lock`). Default `dsql_migrations`.
    pub fn history_table(mut self, name: impl Into<String>) -> Self {
        self.table = name.into();
        self
    }

    /// How long the lease is held without renewal: a runner that dies (or stalls) frees it
    /// after this. A task of the runner's own renews it every third of it, on a connection of
    /// its own, whatever statement runs meanwhile. For DML the lease decides who works, and each
    /// statement's progress record guards that it is applied once; for DDL, which DSQL cannot
    /// fence, a runner whose lease lapsed may still send the statement it was about to send (see
    /// the module docs). Default 30 s; at least 1 s.
    pub fn lease(mut self, lease: Duration) -> Self {
        self.lease = lease.max(Duration::from_secs(1));
        self
    }

    /// Turns the lease's renewal off: for tests that need a runner whose lease lapses while
    /// it works (a process paused by a GC or a VM stall). Not for production.
    #[doc(hidden)]
    pub fn renew_lease(mut self, on: bool) -> Self {
        self.renew = on;
        self
    }

    /// How long a runner waits for another one's lease before failing. Default 10 minutes.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// How long an asynchronous index build may take. Default 30 minutes.
    pub fn job_timeout(mut self, timeout: Duration) -> Self {
        self.job_timeout = timeout;
        self
    }

    /// The retry policy for each statement's transaction (conflicts, `OC001`).
    pub fn retry_policy(mut self, policy: RetryPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// The migrations.
    pub fn migrations(&self) -> &Migrations {
        &self.migrations
    }

    /// Checks every statement for what DSQL refuses that the text shows (`SERIAL`, a
    /// synchronous `CREATE INDEX`, `TRUNCATE`, transaction control, several DDL in one
    /// statement, …), without a connection. [`run`](Self::run) does this first.
    pub fn check(&self) -> Result<(), MigrateError> {
        if !valid_name(&self.table) {
            return Err(MigrateError::FileName {
                file: self.table.clone(),
                reason: "the history table name is [a-z_][a-z0-9_]*".into(),
            });
        }
        for migration in self.migrations.iter() {
            for statement in migration.statements() {
                if let Some(finding) = check::check_statement(&statement.text, statement.line)
                    .into_iter()
                    .next()
                {
                    return Err(MigrateError::Refused {
                        file: migration.file.clone(),
                        line: finding.line,
                        reason: finding.reason,
                    });
                }
            }
        }
        Ok(())
    }
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_lowercase() || b == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        && name.len() <= 50
}

/// Why migrations did not run, naming the file (and line) at fault.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// A file name is not `<version>_<name>.sql`, or two files share a version.
    #[error("migration {file}: {reason}")]
    FileName {
        /// The file.
        file: String,
        /// What is wrong.
        reason: String,
    },
    /// A migration folder or file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The path.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A statement DSQL would refuse, found before anything ran.
    #[error("{file}:{line}: {reason}")]
    Refused {
        /// The file.
        file: String,
        /// The line the refused part is on.
        line: usize,
        /// What DSQL refuses and what to write instead.
        reason: String,
    },
    /// An applied migration's text changed since (checksums differ): a whole applied file,
    /// or a statement a partly applied file had applied already (its later statements may be
    /// edited; [`Migrator::repair`] accepts an edited applied part).
    #[error(
        "{file} (version {version}) was applied with checksum {applied}, and its applied \
         text has changed since ({now}); add a new migration instead of editing an applied \
         one (or, for a file that failed part-way, see Migrator::repair)"
    )]
    Changed {
        /// The file.
        file: String,
        /// Its version.
        version: i64,
        /// The checksum recorded when it was applied.
        applied: String,
        /// The checksum of the text now.
        now: String,
    },
    /// A statement failed: the file, the line, and what the server said.
    #[error(
        "{file}:{line}: statement {index} of the file failed: {}",
        crate::migrate::run::server_says(source)
    )]
    Statement {
        /// The file.
        file: String,
        /// The statement's first line.
        line: usize,
        /// Its position in the file, from 1.
        index: usize,
        /// What failed.
        #[source]
        source: crate::Error,
    },
    /// An asynchronous index build (`CREATE INDEX ASYNC`) failed or did not finish in time.
    #[error("{file}:{line}: index job {job_id} {status}: {details}")]
    Job {
        /// The file.
        file: String,
        /// The statement's first line.
        line: usize,
        /// DSQL's job id (`sys.jobs`).
        job_id: String,
        /// The job's status (`failed`, `cancelled`, or `not finished` after the job timeout).
        status: String,
        /// What `sys.jobs` says about it.
        details: String,
    },
    /// Another runner held the lease for longer than the lock timeout.
    #[error(
        "another runner ({owner}) held the migration lease for longer than the lock timeout \
         ({timeout:?})"
    )]
    LockTimeout {
        /// The other runner.
        owner: String,
        /// The bound that was passed.
        timeout: Duration,
    },
    /// This runner's lease expired and another took it, mid-run: it stopped before its next
    /// statement (the other runner goes on from the record; a DDL statement this runner sent
    /// but could not record is taken as applied by the resume).
    #[error(
        "the migration lease was lost to {owner} (it expired: this runner was paused or cut \
         off longer than the lease); this runner stopped"
    )]
    LeaseLost {
        /// Who holds it now.
        owner: String,
    },
    /// The history says a version is applied that no file has (a newer release ran here?).
    #[error("version {version} ({name}) is applied but no migration file has it")]
    Unknown {
        /// The version.
        version: i64,
        /// Its recorded name.
        name: String,
    },
    /// Connecting, or the history and lease bookkeeping, failed.
    #[error("migrations: {context}")]
    Database {
        /// What was being done.
        context: String,
        /// What failed.
        #[source]
        source: crate::Error,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_give_version_and_name() {
        let m =
            Migration::new("migrations/0012_add_pets.sql", "CREATE TABLE pet (id uuid)").unwrap();
        assert_eq!(
            (m.version(), m.name(), m.file()),
            (12, "add_pets", "0012_add_pets.sql")
        );
        assert_eq!(m.checksum().len(), 64);
        for bad in [
            "create.sql",
            "0001_x.txt",
            "0_x.sql",
            "-1_x.sql",
            "1a_x.sql",
        ] {
            let err = Migration::new(bad, "").unwrap_err();
            assert!(err.to_string().contains(bad), "{err}");
        }
        let err = Migrations::embedded(&[("0001_a.sql", ""), ("1_b.sql", "")]).unwrap_err();
        assert!(err.to_string().contains("0001_a.sql"), "{err}");
    }

    #[test]
    fn check_names_file_and_line() {
        let migrations = Migrations::embedded(&[
            ("0001_ok.sql", "CREATE TABLE a (id uuid PRIMARY KEY);"),
            (
                "0002_bad.sql",
                "CREATE TABLE b (id uuid PRIMARY KEY);\n\nCREATE INDEX b_i\n  ON b (id);",
            ),
        ])
        .unwrap();
        let err = Migrator::new(migrations).check().unwrap_err();
        assert_eq!(
            err.to_string(),
            "0002_bad.sql:3: DSQL builds indexes asynchronously: write CREATE INDEX ASYNC (the \
             runner waits for its job)"
        );
        let bad_table = Migrator::new(Migrations::default())
            .history_table("Bad-Name")
            .check();
        assert!(bad_table.is_err());
    }
}
