//! Shared bench fixtures: an emulator with its own PostgreSQL, and connectors for it.

#![allow(dead_code)] // each bench uses part of this

use std::time::Duration;

use tokio_postgres_dsql::emulator::DsqlEmulator;
use tokio_postgres_dsql::{DsqlConfigBuilder, DsqlConnector};

/// The custom role the benches connect as, with its schema.
pub const APP_ROLE: &str = "bench_app";
pub const APP_SCHEMA: &str = "bench_schema";

/// A multi-threaded runtime sized to the machine (2 workers on the reference machine).
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Starts an emulator and creates the custom role and its schema through it.
pub fn emulator(rt: &tokio::runtime::Runtime) -> DsqlEmulator {
    let emulator = DsqlEmulator::builder()
        .start_blocking()
        .expect("the emulator needs the PostgreSQL server binaries");
    rt.block_on(async {
        let admin = connector(&emulator, "admin", |b| b)
            .await
            .connect()
            .await
            .unwrap();
        for statement in [
            format!("CREATE ROLE {APP_ROLE} WITH LOGIN"),
            format!("CREATE SCHEMA {APP_SCHEMA}"),
            format!("GRANT USAGE, CREATE ON SCHEMA {APP_SCHEMA} TO {APP_ROLE}"),
        ] {
            admin.batch_execute(&statement).await.unwrap();
        }
    });
    emulator
}

pub async fn connector(
    emulator: &DsqlEmulator,
    user: &str,
    tune: impl FnOnce(DsqlConfigBuilder) -> DsqlConfigBuilder,
) -> DsqlConnector {
    let config = tune(
        emulator
            .config_for(user)
            .token_duration(Duration::from_secs(3600)),
    )
    .build()
    .unwrap();
    DsqlConnector::new(config).await.unwrap()
}

/// True when criterion runs in `--test` mode (CI): skip the extra hand-timed reports.
pub fn test_mode() -> bool {
    std::env::args().any(|a| a == "--test")
}
