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
//!   one cached token shared by all connections, rustls with verify-full and SNI, direct TLS.
//! - [`DsqlConnector::pool`]: a `bb8` pool whose connections are recycled before DSQL's one-hour
//!   cut, with jitter, and never handed out closed or past their deadline.
//! - [`transaction_with_retry`]: re-runs a whole transaction on an optimistic-concurrency
//!   conflict (`40001`, `OC000`/`OC001`), with backoff and jitter.
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
pub mod pool;
pub mod retry;
pub mod tls;
pub mod token;

#[cfg(test)]
mod test_support;

pub use config::{DsqlConfig, DsqlConfigBuilder, RootCerts, SslMode, SslNegotiation};
pub use connector::DsqlConnector;
pub use error::{AccessDeniedReason, Error, UnavailableReason};
pub use pool::{DsqlConnection, DsqlConnectionManager};
pub use retry::{
    AsClient, AsOccConflict, OccConflict, RetryError, RetryPolicy, transaction_with_retry,
};
pub use tls::DsqlTls;
pub use token::{Action, AuthToken, TokenSigner};

/// The README's examples, compiled and run as doctests (they use the emulator).
#[cfg(all(doctest, feature = "emulator"))]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
