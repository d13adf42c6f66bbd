//! Amazon Aurora DSQL for `tokio-postgres`.
//!
//! DSQL is a serverless, distributed, PostgreSQL-compatible database. Its password is a
//! short-lived IAM auth token (a SigV4 presigned URL), TLS is mandatory and routed by SNI,
//! connections last at most an hour, and write conflicts surface at `COMMIT` as SQLSTATE
//! `40001`. This crate handles those rules so a tokio service can use plain `tokio-postgres`:
//!
//! - [`DsqlConfig`]: a builder, `postgres://` URLs and `key=value` strings, or the environment.
//! - [`TokenSigner`]: a pure, synchronous token signer that reproduces `aws-sdk-dsql`'s tokens
//!   and reuses the SigV4 signing key.
//! - [`DsqlConnector`]: region and credentials (`aws-config`'s default chain or your provider),
//!   one cached token shared by all connections, rustls with verify-full and SNI, direct TLS;
//!   DSQL's refusals as typed errors ([`Error::AccessDenied`], [`Error::Unavailable`]), the
//!   transient ones retried with backoff inside a connect deadline.
//! - [`DsqlConnector::pool`]: a [`DsqlPool`] (`bb8`) whose connections are recycled before
//!   DSQL's one-hour cut, with jitter, and whose checkouts return the connect error itself.
//! - [`retry_transaction_on`]: re-runs a whole transaction on an optimistic-concurrency conflict
//!   (`40001`, `OC000`/`OC001`), with backoff and jitter; its future is `Send`, for spawned
//!   tasks and handlers ([`retry_postgres_transaction_on`] is the async-closure form).
//! - `emulator::DsqlEmulator` (feature `emulator`): a local DSQL endpoint in front of a real
//!   PostgreSQL that verifies tokens like the service, for offline tests.
//!
//! ```no_run
//! use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let connector = DsqlConnector::new(DsqlConfig::from_env()?).await?;
//! let client = connector.connect().await?;
//! for row in client.query("SELECT now()::text", &[]).await? {
//!     println!("{}", row.get::<_, String>(0));
//! }
//! # Ok(()) }
//! ```
//!
//! # Features
//!
//! | feature | default | what it does |
//! |---|---|---|
//! | `aws-lc-rs` | yes | rustls crypto provider used when the application has not installed one |
//! | `ring` | no | the same with `ring` (used only when `aws-lc-rs` is off) |
//! | `emulator` | no | a local DSQL emulator in front of a real PostgreSQL, for tests |
//! | `anyhow` | no | [`AsOccConflict`] for `anyhow::Error` |
//! | `metrics` | no | metrics through the `metrics` facade (the README lists them) |
//! | `deadpool` | no | a `deadpool` pool ([`DsqlConnector::deadpool`]) besides the bb8 one |
//! | `with-uuid-1`, `with-time-0_3`, `with-chrono-0_4`, `with-serde_json-1` | no | tokio-postgres's support for those crates' types |
//!
//! The library never installs a process-wide crypto provider: if your application calls
//! `rustls::crypto::CryptoProvider::install_default`, that provider is used.

#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod admission;
pub mod config;
mod connector;
#[cfg(feature = "emulator")]
pub mod emulator;
mod error;
#[cfg(feature = "migrate")]
pub mod migrate;
pub mod pool;
pub mod retry;
mod session;
mod telemetry;
pub mod tls;
pub mod token;

#[cfg(test)]
mod test_support;

pub use config::{
    DsqlConfig, DsqlConfigBuilder, Endpoint, FailoverPolicy, Peer, RootCerts, SslMode,
    SslNegotiation,
};
pub use connector::{DsqlConnector, EndpointHealth};
pub use error::{AccessDeniedReason, Error, UnavailableReason};
pub use pool::{DsqlConnection, DsqlConnectionManager, DsqlPool, DsqlPooledConnection};
#[cfg(feature = "deadpool")]
pub use pool::{DsqlDeadpool, DsqlDeadpoolManager};
pub use retry::{
    AsClient, AsOccConflict, OccConflict, PooledTx, RetryError, RetryPolicy, Tx,
    retry_postgres_transaction_on, retry_statement_on, retry_transaction_on,
};

// The crates whose types appear in this crate's API, so that a service can name them without
// depending on them (and on the right versions) itself.
pub use aws_credential_types;
pub use aws_credential_types::Credentials;
pub use aws_credential_types::provider::ProvideCredentials;
pub use aws_smithy_async;
pub use bb8;
#[cfg(feature = "deadpool")]
pub use deadpool;
#[cfg(feature = "metrics")]
pub use metrics;
pub use rustls;
pub use tokio_postgres;

pub use tls::DsqlTls;
pub use token::{Action, AuthToken, TokenSigner};

/// The README's examples, compiled and run as doctests (they use the emulator).
#[cfg(all(doctest, feature = "emulator"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;

#[cfg(test)]
mod readme_tests {
    /// Every crate a README snippet names at the start of a path (`name::…`) must be listed in
    /// one of the README's dependency blocks (`tokio-postgres-dsql` and `tokio` for every
    /// snippet; the Prometheus exporter for its own). Everything else must come through this
    /// crate's re-exports, or the snippets would not compile in a service that copies the
    /// blocks.
    #[test]
    fn readme_snippets_use_only_the_dependencies_the_readme_lists() {
        let readme = include_str!("../README.md");
        let mut roots = std::collections::BTreeSet::new();
        let mut in_rust = false;
        for line in readme.lines() {
            if line.starts_with("```") {
                in_rust = line.starts_with("```rust");
                continue;
            }
            if !in_rust {
                continue;
            }
            let bytes = line.as_bytes();
            for (at, _) in line.match_indices("::") {
                let start = line[..at]
                    .rfind(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .map_or(0, |i| i + 1);
                let name = &line[start..at];
                let before = start.checked_sub(1).map(|i| bytes[i]);
                let is_path_start = !matches!(before, Some(b':') | Some(b'.'));
                if is_path_start
                    && name.starts_with(|c: char| c.is_ascii_lowercase())
                    && !name.is_empty()
                {
                    roots.insert(name.to_owned());
                }
            }
        }
        // The crates the README's dependency blocks list, as Rust names.
        let mut allowed = vec!["std".to_owned()];
        let mut in_toml = false;
        for line in readme.lines() {
            if line.starts_with("```") {
                in_toml = line == "```toml";
                continue;
            }
            if in_toml && let Some((name, _)) = line.split_once(" = ") {
                allowed.push(name.trim().replace('-', "_"));
            }
        }
        let extra: Vec<_> = roots.iter().filter(|r| !allowed.contains(r)).collect();
        assert!(extra.is_empty(), "README snippets name {extra:?}");
        assert!(roots.contains("tokio_postgres_dsql"), "{roots:?}");
        assert!(
            readme.contains("[dependencies]\ntokio-postgres-dsql = ")
                && readme.contains("\ntokio = { version = \"1\""),
            "the dependency block changed: update `allowed` with it"
        );
    }
}
