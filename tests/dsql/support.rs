//! Fixtures shared by the integration tests.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, future};
use tokio_postgres_dsql::emulator::{DsqlEmulator, DsqlEmulatorBuilder};
use tokio_postgres_dsql::{DsqlConfigBuilder, DsqlConnector};

/// A second access key the shared emulator accepts, with a session token.
pub fn second_credentials() -> Credentials {
    Credentials::new(
        "ASIASECONDKEYEXAMPLE",
        "second/secret+with=reserved",
        Some("session/token+with=reserved&chars".into()),
        None,
        "test",
    )
}

/// One emulator (and one PostgreSQL) for every test that does not change its settings. It runs
/// on its own threads, so it outlives each test's runtime; its watchdog stops PostgreSQL when
/// the test binary exits.
pub fn emulator() -> &'static DsqlEmulator {
    static EMULATOR: OnceLock<DsqlEmulator> = OnceLock::new();
    EMULATOR.get_or_init(|| {
        DsqlEmulator::builder()
            .credentials(Credentials::new(
                "AKIAFIRSTKEYEXAMPLE0",
                "first/secret+=",
                None,
                None,
                "test",
            ))
            .credentials(second_credentials())
            .start_blocking()
            .expect("the emulator starts (PostgreSQL server binaries are needed)")
    })
}

/// Credentials no emulator knows: their tokens are refused (`The security token included in
/// the request is invalid`).
pub fn stranger() -> Credentials {
    Credentials::new("AKIAUNKNOWNKEYEXAMPL", "whatever", None, None, "test")
}

/// An emulator of its own (its own counters, limits, clock and faults) in front of the shared
/// emulator's PostgreSQL, accepting the shared emulator's first credentials.
pub async fn own_emulator(
    tune: impl FnOnce(DsqlEmulatorBuilder) -> DsqlEmulatorBuilder,
) -> DsqlEmulator {
    tune(
        DsqlEmulator::builder()
            .upstream_url(emulator().upstream_url("admin"))
            .credentials(emulator().credentials().clone()),
    )
    .start()
    .await
    .expect("the emulator starts")
}

/// An emulator endpoint of the test's own over the process's shared PostgreSQL (its own
/// database, counters and faults).
pub async fn own_endpoint() -> DsqlEmulator {
    tokio_postgres_dsql::emulator::SharedPostgres::global()
        .expect("the shared PostgreSQL starts")
        .endpoint()
        .start()
        .await
        .expect("an endpoint starts")
}

/// [`own_endpoint`], relayed on the calling test's runtime (`DsqlEmulatorBuilder::relay_on`).
pub async fn own_endpoint_relayed_here() -> DsqlEmulator {
    tokio_postgres_dsql::emulator::SharedPostgres::global()
        .expect("the shared PostgreSQL starts")
        .endpoint()
        .relay_on(tokio::runtime::Handle::current())
        .start()
        .await
        .expect("an endpoint starts")
}

/// A client for `user` on `emulator`.
pub async fn connect_to(
    emulator: &DsqlEmulator,
    user: &str,
) -> Result<tokio_postgres_dsql::tokio_postgres::Client, tokio_postgres_dsql::Error> {
    DsqlConnector::new(emulator.config_for(user).build().expect("valid config"))
        .await
        .expect("connector")
        .connect()
        .await
}

/// `psql` for `emulator` as `user` with `token` as the password, over verify-full TLS, with
/// nothing from the caller's environment but `PATH`.
pub fn psql_on(
    emulator: &DsqlEmulator,
    user: &str,
    token: &tokio_postgres_dsql::AuthToken,
) -> std::process::Command {
    let mut psql = std::process::Command::new("psql");
    psql.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("PGHOST", emulator.endpoint())
        .env("PGHOSTADDR", "127.0.0.1")
        .env("PGPORT", emulator.port().to_string())
        .env("PGUSER", user)
        .env("PGDATABASE", "postgres")
        .env("PGSSLMODE", "verify-full")
        .env("PGSSLROOTCERT", emulator.ca_cert_path())
        .env("PGPASSWORD", token.as_str());
    psql
}

/// A connector for `user` on the shared emulator, with `tune` applied to its configuration.
pub async fn connector(
    user: &str,
    tune: impl FnOnce(DsqlConfigBuilder) -> DsqlConfigBuilder,
) -> DsqlConnector {
    let config = tune(emulator().config_for(user))
        .build()
        .expect("valid config");
    DsqlConnector::new(config).await.expect("connector")
}

/// Creates `role` (LOGIN) and its schema `<role>_schema` as `admin`, as a DSQL admin would, and
/// returns the schema name. Safe to call repeatedly.
pub async fn ensure_role(role: &str) -> String {
    let schema = format!("{role}_schema");
    ensure_role_with_schema(role, &schema).await;
    schema
}

/// Creates `role` (LOGIN) and `schema`, with usage and create on it for the role, as `admin`
/// through the emulator. Safe to call repeatedly.
pub async fn ensure_role_with_schema(role: &str, schema: &str) {
    let admin = connector("admin", |b| b)
        .await
        .connect()
        .await
        .expect("admin connects");
    for statement in [
        format!("CREATE ROLE {role} WITH LOGIN"),
        format!("CREATE SCHEMA {schema}"),
        format!("GRANT USAGE, CREATE ON SCHEMA {schema} TO {role}"),
    ] {
        if let Err(e) = admin.batch_execute(&statement).await {
            let code = e.code().map(|c| c.code().to_owned());
            assert!(
                matches!(code.as_deref(), Some("42710") | Some("42P06")),
                "{statement}: {e}"
            );
        }
    }
}

/// An example binary built by `cargo test` next to this test binary
/// (`target/<profile>/examples/<name>`).
pub fn example_binary(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().and_then(|deps| deps.parent()).unwrap();
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing: `cargo test` builds the examples; run the whole suite",
        path.display()
    );
    path
}

/// The environment a program needs to reach the shared emulator through
/// `DsqlConfig::from_env()` and the default credentials chain, as `user`.
pub fn emulator_environment(user: &str) -> Vec<(&'static str, String)> {
    let e = emulator();
    vec![
        ("PATH", std::env::var("PATH").unwrap_or_default()),
        ("CLUSTER_ENDPOINT", e.endpoint().to_owned()),
        ("CLUSTER_USER", user.to_owned()),
        ("AWS_REGION", e.region().to_owned()),
        (
            "AWS_ACCESS_KEY_ID",
            e.credentials().access_key_id().to_owned(),
        ),
        (
            "AWS_SECRET_ACCESS_KEY",
            e.credentials().secret_access_key().to_owned(),
        ),
        // No profile files or instance metadata: the environment's keys only.
        ("AWS_CONFIG_FILE", "/nonexistent".to_owned()),
        ("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent".to_owned()),
        ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ("PGHOSTADDR", "127.0.0.1".to_owned()),
        ("PGPORT", e.port().to_string()),
        ("PGSSLROOTCERT", e.ca_cert_path().display().to_string()),
    ]
}

/// A provider that counts calls and whose credentials can be swapped.
#[derive(Debug, Clone)]
pub struct SwitchableProvider {
    current: Arc<Mutex<Credentials>>,
    calls: Arc<AtomicUsize>,
}

impl SwitchableProvider {
    pub fn new(credentials: Credentials) -> Self {
        SwitchableProvider {
            current: Arc::new(Mutex::new(credentials)),
            calls: Arc::default(),
        }
    }

    pub fn set(&self, credentials: Credentials) {
        *self.current.lock().unwrap() = credentials;
    }

    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }
}

impl ProvideCredentials for SwitchableProvider {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        self.calls.fetch_add(1, Ordering::SeqCst);
        future::ProvideCredentials::ready(Ok(self.current.lock().unwrap().clone()))
    }
}

/// A clock the test moves by hand.
#[derive(Debug, Clone)]
pub struct HandClock(Arc<Mutex<SystemTime>>);

impl HandClock {
    pub fn at(time: SystemTime) -> Self {
        HandClock(Arc::new(Mutex::new(time)))
    }

    pub fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }
}

impl aws_smithy_async::time::TimeSource for HandClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// A TCP relay on 127.0.0.1 in front of `target` that can be switched to a black hole: it
/// then accepts connections and never answers (nor closes them), like a peer behind a dead
/// route. Its connections end when it is dropped.
pub struct Relay {
    address: SocketAddr,
    forwarding: Arc<AtomicBool>,
    accepted: Arc<AtomicUsize>,
    freeze: tokio::sync::watch::Sender<u64>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    pub async fn start(target: SocketAddr, forwarding: bool) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let forwarding = Arc::new(AtomicBool::new(forwarding));
        let accepted = Arc::new(AtomicUsize::new(0));
        let freeze = tokio::sync::watch::Sender::new(0u64);
        let task = tokio::spawn({
            let (forwarding, accepted) = (forwarding.clone(), accepted.clone());
            let freeze = freeze.clone();
            async move {
                let mut connections = tokio::task::JoinSet::new();
                while let Ok((mut socket, _)) = listener.accept().await {
                    accepted.fetch_add(1, Ordering::SeqCst);
                    if forwarding.load(Ordering::SeqCst) {
                        let mut frozen = freeze.subscribe();
                        connections.spawn(async move {
                            if let Ok(mut upstream) = tokio::net::TcpStream::connect(target).await {
                                tokio::select! {
                                    _ = tokio::io::copy_bidirectional(&mut socket, &mut upstream) => {}
                                    // Frozen: both sockets stay open, nothing goes through.
                                    _ = frozen.changed() => std::future::pending::<()>().await,
                                }
                            }
                        });
                    } else {
                        // Hold the socket open, read nothing, answer nothing.
                        connections.spawn(async move {
                            std::future::pending::<()>().await;
                            drop(socket);
                        });
                    }
                }
            }
        });
        Relay {
            address,
            forwarding,
            accepted,
            freeze,
            task,
        }
    }

    pub fn port(&self) -> u16 {
        self.address.port()
    }

    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections forwarded so far stop forwarding without closing (a half-open path); new
    /// ones are forwarded as before.
    pub fn freeze_existing(&self) {
        self.freeze.send_modify(|generation| *generation += 1);
    }

    pub fn set_forwarding(&self, on: bool) {
        self.forwarding.store(on, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Runs each statement alone, in autocommit (DSQL wants each DDL in a transaction of its own,
/// and refuses a simple query that mixes two).
pub async fn each(client: &tokio_postgres_dsql::tokio_postgres::Client, statements: &[&str]) {
    for statement in statements {
        client
            .batch_execute(statement)
            .await
            .unwrap_or_else(|e| panic!("{statement}: {e}"));
    }
}

/// A connection straight to the shared emulator's PostgreSQL, bypassing the emulator and its
/// SQL rules: for test fixtures DSQL itself would refuse (triggers, PL/pgSQL).
pub async fn upstream() -> tokio_postgres_dsql::tokio_postgres::Client {
    let (client, connection) = tokio_postgres_dsql::tokio_postgres::connect(
        &emulator().upstream_url("admin"),
        tokio_postgres_dsql::tokio_postgres::NoTls,
    )
    .await
    .expect("the upstream PostgreSQL");
    tokio::spawn(connection);
    client
}

/// Creates `table (id int)` whose inserts fail with DSQL's conflict (`40001`, the message
/// carrying `code`: `OC000` or `OC001`) the first `conflicts` times: at `COMMIT` when
/// `at_commit` (a deferred constraint trigger), else at the statement. A sequence
/// `<table>_attempts`, which rollbacks do not undo, counts the attempts. A deterministic
/// stand-in for a real conflict (tests/dsql/sql_rules.rs has real ones), made straight in the
/// upstream PostgreSQL since DSQL has neither triggers nor PL/pgSQL; `_client` is unused.
pub async fn conflicting_table(
    _client: &tokio_postgres_dsql::tokio_postgres::Client,
    table: &str,
    conflicts: u32,
    code: &str,
    at_commit: bool,
) {
    let message = match code {
        "OC001" => "schema has been updated by another transaction, please retry: (OC001)",
        _ => "change conflicts with another transaction, please retry: (OC000)",
    };
    let trigger = if at_commit {
        "CONSTRAINT TRIGGER {t}_conflict AFTER INSERT ON {t} DEFERRABLE INITIALLY DEFERRED"
    } else {
        "TRIGGER {t}_conflict AFTER INSERT ON {t}"
    }
    .replace("{t}", table);
    upstream()
        .await
        .batch_execute(&format!(
            "DROP TABLE IF EXISTS {table}; DROP SEQUENCE IF EXISTS {table}_attempts; \
             CREATE SEQUENCE {table}_attempts; CREATE TABLE {table} (id int); \
             CREATE OR REPLACE FUNCTION {table}_conflict() RETURNS trigger LANGUAGE plpgsql AS $$ \
             BEGIN \
               IF nextval('{table}_attempts') <= {conflicts} THEN \
                 RAISE EXCEPTION USING ERRCODE = '40001', MESSAGE = '{message}'; \
               END IF; \
               RETURN NULL; \
             END $$; \
             CREATE {trigger} FOR EACH ROW EXECUTE FUNCTION {table}_conflict()"
        ))
        .await
        .unwrap();
}
