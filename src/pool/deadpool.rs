//! A `deadpool` manager for DSQL connections (feature `deadpool`), for services that pool with
//! `deadpool` (as `deadpool-postgres` users do) rather than `bb8`.
//!
//! It wraps a [`DsqlConnectionManager`] and applies the very same rules: a token per physical
//! connection through the connector, transient connect failures retried inside the connect
//! deadline and permanent ones returned at once, a recycle deadline with jitter enforced at
//! checkout, no I/O on a busy checkout, a bounded ping after idle, and the dirty-session reset.
//! Differences that come from deadpool itself: deadpool checks a connection only when it hands
//! it out (there is no hook when it comes back), so "idle" is measured from the last checkout;
//! it keeps no minimum of idle connections and reaps none (a connection past its deadline is
//! replaced at its next checkout); and the `dsql_pool_connections` gauges are not reported
//! (use `pool.status()`). Connect errors come back from `get()` as they are.

use std::time::Duration;

use deadpool::managed::{Manager, Metrics, PoolError, RecycleError, RecycleResult};

use super::{DEFAULT_MAX_SIZE, DsqlConnection, DsqlConnectionManager};
use crate::retry::AsClient;
use crate::{DsqlConnector, Error};

/// A `deadpool` pool of DSQL connections: `pool.get().await` gives a connection that derefs to
/// a [`DsqlConnection`] (and so to a `tokio_postgres::Client`).
pub type DsqlDeadpool = deadpool::managed::Pool<DsqlDeadpoolManager>;

/// Default time a `deadpool` checkout waits for a connection: 10 s, as the bb8 pool's
/// `connection_timeout`.
pub const DEFAULT_DEADPOOL_WAIT_TIMEOUT: Duration = Duration::from_secs(10);

/// The `deadpool` manager: [`DsqlConnectionManager`]'s rules behind deadpool's
/// [`Manager`] trait. Made for you by [`DsqlConnector::deadpool`]; build one yourself (from a
/// tuned [`DsqlConnectionManager`]) for [`DsqlConnector::deadpool_builder`].
#[derive(Debug, Clone)]
pub struct DsqlDeadpoolManager {
    inner: DsqlConnectionManager,
}

impl DsqlDeadpoolManager {
    /// A manager applying `rules` (its jitter, `ping_after_idle`, `ping_timeout`).
    pub fn new(rules: DsqlConnectionManager) -> Self {
        DsqlDeadpoolManager { inner: rules }
    }

    /// The rules it applies.
    pub fn rules(&self) -> &DsqlConnectionManager {
        &self.inner
    }
}

impl Manager for DsqlDeadpoolManager {
    type Type = DsqlConnection;
    type Error = Error;

    async fn create(&self) -> Result<DsqlConnection, Error> {
        self.inner.open().await
    }

    async fn recycle(&self, conn: &mut DsqlConnection, _: &Metrics) -> RecycleResult<Error> {
        self.inner
            .check_out(conn, false)
            .await
            .map_err(RecycleError::Backend)
    }
}

impl From<PoolError<Error>> for Error {
    /// A `deadpool` checkout's failure as this crate's error: the connect error itself, or
    /// [`Error::PoolTimeout`].
    fn from(error: PoolError<Error>) -> Error {
        match error {
            PoolError::Backend(error) => error,
            PoolError::Timeout(_) => Error::PoolTimeout,
            PoolError::Closed => Error::Unusable {
                reason: "the pool was closed",
            },
            PoolError::NoRuntimeSpecified => Error::Unusable {
                reason: "the deadpool pool has no runtime (use Runtime::Tokio1)",
            },
            PoolError::PostCreateHook(_) => Error::Unusable {
                reason: "a post_create hook refused the connection",
            },
        }
    }
}

impl AsClient for deadpool::managed::Object<DsqlDeadpoolManager> {
    fn as_client(&mut self) -> &mut tokio_postgres::Client {
        self
    }
}

impl DsqlConnector {
    /// A `deadpool` pool with the same DSQL defaults as [`pool`](Self::pool) where deadpool has
    /// the setting: at most [`DEFAULT_MAX_SIZE`] (10) connections, a checkout waits at most
    /// [`DEFAULT_DEADPOOL_WAIT_TIMEOUT`] (10 s), the tokio runtime for timeouts, and the
    /// [`DsqlConnectionManager`] rules (recycle deadline with jitter, ping after 60 s idle
    /// within 2 s, dirty-session reset). Opens nothing until the first checkout.
    pub fn deadpool(&self) -> Result<DsqlDeadpool, Error> {
        self.deadpool_builder(DsqlDeadpoolManager::new(DsqlConnectionManager::new(
            self.clone(),
        )))
        .build()
        // The only build error is a missing runtime, and the builder sets one.
        .map_err(|_| Error::Unusable {
            reason: "the deadpool pool has no runtime",
        })
    }

    /// The builder behind [`deadpool`](Self::deadpool), with the same defaults, to tune before
    /// `build()`.
    pub fn deadpool_builder(
        &self,
        manager: DsqlDeadpoolManager,
    ) -> deadpool::managed::PoolBuilder<DsqlDeadpoolManager> {
        DsqlDeadpool::builder(manager)
            .max_size(DEFAULT_MAX_SIZE as usize)
            .wait_timeout(Some(DEFAULT_DEADPOOL_WAIT_TIMEOUT))
            .runtime(deadpool::Runtime::Tokio1)
    }
}
