//! Guides: the depth behind the README, one topic a page, kept beside the code as Markdown
//! (`src/guide/*.md`) and rendered here with the API. Their Rust examples are compiled and run
//! as doctests, like the README's.
//!
//! | guide | what it covers |
//! |---|---|
//! | [`architecture`] | what each module owns; the path of a connect and of a query through the emulator; what each kind of test keeps |
//! | [`configuration`] | every option, its URL / conninfo key, environment variable and default; the feature flags |
//! | [`pooling`] | the bb8 pool's guarantees; the four retry helpers; the honest `COMMIT`; idempotency keys |
//! | [`service`] | an axum service (`examples/service.rs`); the `deadpool` pool; the versions in the public API |
//! | [`diesel`] | feature `diesel-async`: the pool of Diesel connections, `retry_transaction` for Diesel bodies, DSQL's errors from Diesel's, one schema |
//! | [`refusals`] | DSQL's connection refusals as typed errors; refusals shared, not repeated; the cluster's connection rate |
//! | [`multi_region`] | peer endpoints, endpoint health, failover and failback; the fleet simulation |
//! | [`observability`] | `tracing` spans; the `dsql_*` metrics; a Prometheus endpoint |
//! | [`migrations`] | the DSQL-aware migration runner (feature `migrate`) |
//! | [`emulator`] | the local DSQL emulator (feature `emulator`): faults, `SharedPostgres`, `dsql-emulator` for any language, the conformance corpus |
//! | [`sql_rules`] | the emulator's SQL rules: DSQL's refusals, first committer wins, limits |
//! | [`dsql_notes`] | what a client notices of DSQL; the pet clinic sample |
//! | [`testing`] | the suite on PostgreSQL 15, 16 and 17; a live cluster; interop |
//! | [`performance`] | every benchmark figure, its baseline and how it was measured |

#[doc = include_str!("architecture.md")]
pub mod architecture {}

#[doc = include_str!("configuration.md")]
pub mod configuration {}

#[doc = include_str!("pooling.md")]
pub mod pooling {}

#[doc = include_str!("service.md")]
pub mod service {}

#[doc = include_str!("diesel.md")]
#[cfg(feature = "diesel-async")]
pub mod diesel {}

#[doc = include_str!("refusals.md")]
pub mod refusals {}

#[doc = include_str!("multi_region.md")]
pub mod multi_region {}

#[doc = include_str!("observability.md")]
pub mod observability {}

#[doc = include_str!("migrations.md")]
pub mod migrations {}

#[doc = include_str!("emulator.md")]
pub mod emulator {}

#[doc = include_str!("sql_rules.md")]
pub mod sql_rules {}

#[doc = include_str!("dsql_notes.md")]
pub mod dsql_notes {}

#[doc = include_str!("testing.md")]
pub mod testing {}

#[doc = include_str!("performance.md")]
pub mod performance {}
