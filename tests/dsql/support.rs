//! Fixtures shared by the integration tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, future};
use tokio_postgres_dsql::emulator::DsqlEmulator;
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
    schema
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
