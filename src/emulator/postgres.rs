//! One PostgreSQL for many endpoints: [`SharedPostgres`].

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use super::workdir::WorkDir;
use super::{EmulatorError, certs, sql, upstream};

/// The prefix of the database every endpoint's own database is copied from: DSQL's `sys`
/// objects and the event triggers of the rules are made once, in it.
const TEMPLATE: &str = "dsql_emulator_template";

/// How long creating or dropping an endpoint's database may take.
const DATABASE_TIMEOUT: Duration = Duration::from_secs(30);

/// One PostgreSQL serving many emulator endpoints, each in a database of its own: the fast
/// way to give every test its own DSQL.
///
/// The server starts once (`initdb` and start-up, about a second); each endpoint from
/// [`endpoint`](Self::endpoint) then starts in tens of milliseconds, with a database copied
/// from a prepared template (clients still say `dbname=postgres`), its own name, port, token
/// checks, counters, faults, admission limits and conflict bookkeeping. Tests that run in
/// parallel on their own endpoints see neither each other's tables nor each other's
/// conflicts, `OC001`s or faults. Roles are the exception: PostgreSQL keeps them per server,
/// so a `CREATE ROLE` is seen by every endpoint (give each test's roles their own names).
///
/// Cheap to clone; the server stops when the last clone and the last endpoint are dropped.
/// [`SharedPostgres::global`] is one for the whole process, for tests:
///
/// ```no_run
/// use tokio_postgres_dsql::emulator::{DsqlEmulator, SharedPostgres};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// // In each test: an endpoint of its own over the process's one PostgreSQL.
/// let emulator: DsqlEmulator = SharedPostgres::global()?.endpoint().start().await?;
/// # Ok(()) }
/// ```
///
/// The server runs as a child of this process and is stopped when the process ends, however
/// it ends: a watchdog process stops it when this one's pipe to it closes (also on `SIGKILL`
/// or a panic that aborts), so a `static` that is never dropped leaves nothing running.
#[derive(Clone)]
pub struct SharedPostgres {
    inner: Arc<Inner>,
}

pub(super) struct Inner {
    /// The server, at its `postgres` database.
    target: upstream::Target,
    /// The prepared database endpoints copy.
    template: String,
    /// Whether the server is someone else's (then the template is dropped with this).
    external: bool,
    /// One CA for every endpoint (one file for clients to trust).
    pub(super) authority: Arc<certs::Authority>,
    /// The server's major version, when it could be read.
    pub(super) upstream_major: Option<u32>,
    databases: AtomicUsize,
    // Field order matters on drop: the cluster stops before its directory is removed.
    _cluster: Mutex<Option<upstream::LocalCluster>>,
    _work_dir: WorkDir,
}

impl std::fmt::Debug for SharedPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedPostgres")
            .field("upstream", &self.inner.target.url("admin"))
            .finish_non_exhaustive()
    }
}

/// Configures and starts a [`SharedPostgres`].
#[derive(Debug, Default)]
#[must_use]
pub struct SharedPostgresBuilder {
    pg_bin: Option<PathBuf>,
    upstream_url: Option<String>,
}

impl SharedPostgresBuilder {
    /// The directory with `initdb` and `postgres`. Default: `PG_BIN`, `PATH`, then the newest
    /// `/usr/lib/postgresql/*/bin`.
    pub fn pg_bin(mut self, dir: impl Into<PathBuf>) -> Self {
        self.pg_bin = Some(dir.into());
        self
    }

    /// Uses this existing PostgreSQL instead of starting one: it must trust the emulator's
    /// connections and have a superuser `admin` (endpoints create and drop databases there).
    /// Default: `DSQL_EMULATOR_UPSTREAM`, else a private server.
    pub fn upstream_url(mut self, url: impl Into<String>) -> Self {
        self.upstream_url = Some(url.into());
        self
    }

    /// Starts the server and prepares the template, without blocking the async runtime.
    pub async fn start(self) -> Result<SharedPostgres, EmulatorError> {
        tokio::task::spawn_blocking(move || self.start_blocking())
            .await
            .map_err(|e| EmulatorError::caused("the start-up task failed", e))?
    }

    /// Starts the server and prepares the template, blocking the current thread (about a
    /// second).
    pub fn start_blocking(self) -> Result<SharedPostgres, EmulatorError> {
        let work_dir = WorkDir::create()?;
        let (target, cluster) =
            upstream::target_or_cluster(self.upstream_url, &work_dir.path, self.pg_bin.as_deref())?;
        // Endpoints get databases of their own beside `postgres`.
        let target = target.with_database("postgres");
        let admin = |target: &upstream::Target, sql: &str, what: &str| {
            upstream::execute(target.url("admin"), sql, DATABASE_TIMEOUT).map_err(
                |(reason, source)| EmulatorError::Failed {
                    reason: format!(
                        "cannot {what} ({reason}); the upstream's `admin` must be a superuser"
                    ),
                    source,
                },
            )
        };
        // Its own name: several processes may share an external server.
        let template = format!("{TEMPLATE}_{:08x}", fastrand::u32(..));
        admin(
            &target,
            &format!("CREATE DATABASE {template}"),
            "create the template database",
        )?;
        sql::prepare_upstream(target.with_database(&template).url("admin"))?;
        let upstream_major = sql::upstream_major(target.url("admin"));
        if let Some(note) = upstream_major.and_then(sql::version_note) {
            tracing::warn!("{note}");
        }
        Ok(SharedPostgres {
            inner: Arc::new(Inner {
                upstream_major,
                external: cluster.is_none(),
                template,
                target,
                authority: certs::Authority::generate()?,
                databases: AtomicUsize::new(0),
                _cluster: Mutex::new(cluster),
                _work_dir: work_dir,
            }),
        })
    }
}

impl SharedPostgres {
    /// A builder with every option at its default.
    pub fn builder() -> SharedPostgresBuilder {
        SharedPostgresBuilder::default()
    }

    /// Starts a server with the defaults.
    pub async fn start() -> Result<SharedPostgres, EmulatorError> {
        Self::builder().start().await
    }

    /// The process's one shared server, started on first use (with the defaults: `PG_BIN`,
    /// `DSQL_EMULATOR_UPSTREAM`) and never dropped; it stops when the process ends. Blocks the
    /// first caller for about a second; callable from sync code and from inside any runtime
    /// (the server does not belong to the runtime that started it). A failure to start is
    /// remembered and returned to every caller.
    pub fn global() -> Result<&'static SharedPostgres, EmulatorError> {
        static GLOBAL: OnceLock<Result<SharedPostgres, String>> = OnceLock::new();
        GLOBAL
            .get_or_init(|| {
                std::thread::spawn(|| SharedPostgres::builder().start_blocking())
                    .join()
                    .unwrap_or_else(|_| Err(EmulatorError::failed("the start-up thread panicked")))
                    .map_err(|e| error_chain(&e))
            })
            .as_ref()
            .map_err(|e| EmulatorError::failed(e.clone()))
    }

    /// Waits (at most `timeout`) until nothing else holds this server any more: every
    /// endpoint made over it is dropped and its database with it (other clones of this handle
    /// count too) (an endpoint's database is dropped in
    /// the background, so that a test's end does not wait for it). A process about to exit
    /// calls this so that nothing of its endpoints outlives it on a server of someone else's.
    /// Returns whether it got there in time.
    pub fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let now = std::time::Instant::now();
        let until = now
            .checked_add(timeout)
            .unwrap_or(now + std::time::Duration::from_secs(86_400));
        while Arc::strong_count(&self.inner) > 1 {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        true
    }

    /// A connection string to the server's `postgres` database as `user`, bypassing every
    /// endpoint.
    pub fn upstream_url(&self, user: &str) -> String {
        self.inner.target.url(user)
    }

    pub(super) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

fn error_chain(error: &EmulatorError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

impl Inner {
    /// Creates a database for an endpoint, copied from the template.
    pub(super) fn create_database(
        self: &Arc<Self>,
        cluster_id: &str,
    ) -> Result<Database, EmulatorError> {
        // Unique across processes too: several may share an external server, one after the
        // other or at once.
        let name = format!(
            "dsql_{cluster_id}_{}_{:08x}",
            self.databases.fetch_add(1, Ordering::Relaxed),
            fastrand::u32(..)
        );
        upstream::execute(
            self.target.url("admin"),
            &format!(
                "CREATE DATABASE {name} TEMPLATE {} STRATEGY FILE_COPY",
                self.template
            ),
            DATABASE_TIMEOUT,
        )
        .map_err(|(reason, source)| EmulatorError::Failed {
            reason: format!("cannot create the endpoint's database ({reason})"),
            source,
        })?;
        Ok(Database {
            owner: self.clone(),
            target: self.target.with_database(&name),
        })
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if self.external {
            let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.template);
            if let Err((reason, _)) =
                upstream::execute(self.target.url("admin"), &sql, DATABASE_TIMEOUT)
            {
                tracing::debug!(reason, "emulator: the template database was not dropped");
            }
        }
    }
}

/// An endpoint's database on a [`SharedPostgres`]: dropped (in the background) with it.
pub(super) struct Database {
    owner: Arc<Inner>,
    pub(super) target: upstream::Target,
}

impl Drop for Database {
    fn drop(&mut self) {
        let url = self.owner.target.url("admin");
        let sql = format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.target.database
        );
        let owner = self.owner.clone();
        // Not waited for: a test's end must not wait for the server. The thread holds the
        // server until it is done.
        std::thread::spawn(move || {
            if let Err((reason, _)) = upstream::execute(url, &sql, DATABASE_TIMEOUT) {
                tracing::debug!(reason, "emulator: an endpoint's database was not dropped");
            }
            drop(owner);
        });
    }
}
