//! Optimistic-concurrency retry: DSQL reports write conflicts as SQLSTATE `40001` (`OC000` data,
//! `OC001` schema), usually at `COMMIT`. The fix is to run the whole transaction again.
//!
//! ```no_run
//! use tokio_postgres_dsql::{DsqlConnector, RetryPolicy, transaction_with_retry};
//! # async fn run(connector: DsqlConnector) -> Result<(), Box<dyn std::error::Error>> {
//! let pool = connector.pool().await?;
//! let mut conn = pool.get().await?;
//! let balance: i64 = transaction_with_retry(&mut conn, &RetryPolicy::default(), async |tx| {
//!     tx.execute("UPDATE account SET balance = balance - 10 WHERE id = 1", &[]).await?;
//!     let row = tx.query_one("SELECT balance FROM account WHERE id = 1", &[]).await?;
//!     Ok::<_, tokio_postgres::Error>(row.get(0))
//! })
//! .await?;
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use tokio_postgres::{Client, Transaction};

/// Which optimistic-concurrency conflict an error reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum OccConflict {
    /// `OC000`: the data changed under the transaction.
    Data,
    /// `OC001`: the schema changed under the transaction.
    Schema,
    /// SQLSTATE `40001` without a DSQL code (e.g. PostgreSQL's own serialization failure).
    Unknown,
}

impl OccConflict {
    /// The DSQL code (`OC000`, `OC001`) or the SQLSTATE (`40001`).
    pub fn code(self) -> &'static str {
        match self {
            OccConflict::Data => "OC000",
            OccConflict::Schema => "OC001",
            OccConflict::Unknown => "40001",
        }
    }
}

impl fmt::Display for OccConflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// The conflict a `tokio-postgres` error reports, if it is one: SQLSTATE `40001` (with `OC000`
/// or `OC001` in the message, or neither), or the literal SQLSTATEs `OC000` / `OC001` that some
/// endpoints send. Nothing else is retryable.
pub fn occ_conflict(error: &tokio_postgres::Error) -> Option<OccConflict> {
    let db = error.as_db_error()?;
    match db.code().code() {
        "OC000" => Some(OccConflict::Data),
        "OC001" => Some(OccConflict::Schema),
        "40001" if db.message().contains("OC000") => Some(OccConflict::Data),
        "40001" if db.message().contains("OC001") => Some(OccConflict::Schema),
        "40001" => Some(OccConflict::Unknown),
        _ => None,
    }
}

/// Errors that can say whether they are an optimistic-concurrency conflict. Implement it for
/// your own error type (usually by delegating to the `tokio_postgres::Error` it wraps) to use
/// that type in [`transaction_with_retry`] closures.
pub trait AsOccConflict {
    /// The conflict this error reports, or `None` if it is not retryable.
    fn occ_conflict(&self) -> Option<OccConflict>;
}

impl AsOccConflict for tokio_postgres::Error {
    fn occ_conflict(&self) -> Option<OccConflict> {
        occ_conflict(self)
    }
}

impl AsOccConflict for Box<dyn std::error::Error + Send + Sync> {
    /// Looks for a `tokio_postgres::Error` in the cause chain.
    fn occ_conflict(&self) -> Option<OccConflict> {
        let mut current: Option<&(dyn std::error::Error + 'static)> = Some(self.as_ref());
        while let Some(error) = current {
            if let Some(pg) = error.downcast_ref::<tokio_postgres::Error>() {
                return occ_conflict(pg);
            }
            current = error.source();
        }
        None
    }
}

/// How [`transaction_with_retry`] retries.
///
/// Delays grow exponentially from `base_delay`, capped at `max_delay`; with `jitter` on, each
/// delay is drawn uniformly from its upper half ("equal jitter"), so colliding transactions
/// spread out instead of colliding again.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, the first included. Default 5.
    pub max_attempts: u32,
    /// Delay before the second attempt. Default 10 ms.
    pub base_delay: Duration,
    /// Largest delay. Default 1 s.
    pub max_delay: Duration,
    /// Randomize delays. Default on.
    pub jitter: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            jitter: true,
        }
    }
}

impl RetryPolicy {
    /// The default policy with `max_attempts` attempts (at least 1).
    pub fn with_max_attempts(max_attempts: u32) -> Self {
        RetryPolicy {
            max_attempts: max_attempts.max(1),
            ..RetryPolicy::default()
        }
    }

    /// Sets the delays.
    #[must_use]
    pub fn delays(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max.max(base);
        self
    }

    /// Turns jitter on or off.
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay after failed attempt `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(31);
        let delay = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        if self.jitter {
            delay / 2 + (delay / 2).mul_f64(fastrand::f64())
        } else {
            delay
        }
    }
}

/// Why [`transaction_with_retry`] gave up.
#[derive(Debug)]
#[non_exhaustive]
pub enum RetryError<E> {
    /// A non-retryable error, returned at once (the transaction was rolled back).
    Failed(E),
    /// Every attempt hit an optimistic-concurrency conflict.
    Exhausted {
        /// How many attempts were made.
        attempts: u32,
        /// The last conflict's kind.
        conflict: OccConflict,
        /// The last conflict's error.
        last: E,
    },
}

impl<E> RetryError<E> {
    /// The underlying error (the last conflict when retries were exhausted).
    pub fn into_inner(self) -> E {
        match self {
            RetryError::Failed(error) | RetryError::Exhausted { last: error, .. } => error,
        }
    }
}

impl<E: fmt::Display> fmt::Display for RetryError<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryError::Failed(error) => write!(f, "transaction failed: {error}"),
            RetryError::Exhausted {
                attempts,
                conflict,
                last,
            } => write!(
                f,
                "transaction gave up after {attempts} attempts on optimistic-concurrency \
                 conflicts; last conflict ({conflict}): {last}"
            ),
        }
    }
}

impl<E: std::error::Error + 'static> std::error::Error for RetryError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RetryError::Failed(error) | RetryError::Exhausted { last: error, .. } => Some(error),
        }
    }
}

/// Anything a transaction can be opened on: a [`Client`], a [`DsqlConnection`](crate::DsqlConnection),
/// or a `bb8` pooled connection of either (so `&mut pool.get().await?` works as is).
pub trait AsClient {
    /// The client to open transactions on.
    fn as_client(&mut self) -> &mut Client;
}

impl AsClient for Client {
    fn as_client(&mut self) -> &mut Client {
        self
    }
}

impl AsClient for crate::DsqlConnection {
    fn as_client(&mut self) -> &mut Client {
        self
    }
}

impl<M> AsClient for bb8::PooledConnection<'_, M>
where
    M: bb8::ManageConnection,
    M::Connection: AsClient,
{
    fn as_client(&mut self) -> &mut Client {
        (**self).as_client()
    }
}

/// Runs `body` in a transaction and commits it, re-running the whole transaction on an
/// optimistic-concurrency conflict at any statement or at `COMMIT`, with backoff, up to
/// `policy.max_attempts` times. Any other error rolls back and returns at once.
///
/// `client` is a plain [`Client`] or a pooled connection (see [`AsClient`]). `body` is an async closure that may be called several times; its
/// error type is yours, as long as it converts from `tokio_postgres::Error` and says whether it
/// is a conflict ([`AsOccConflict`]). Each retry is logged with `tracing` at `debug`.
pub async fn transaction_with_retry<C, T, E, F>(
    client: &mut C,
    policy: &RetryPolicy,
    mut body: F,
) -> Result<T, RetryError<E>>
where
    C: AsClient + ?Sized,
    F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    E: From<tokio_postgres::Error> + AsOccConflict,
{
    let client = client.as_client();
    let max_attempts = policy.max_attempts.max(1);
    let mut attempt = 1;
    loop {
        let error = match run_once(client, &mut body).await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        let Some(conflict) = error.occ_conflict() else {
            return Err(RetryError::Failed(error));
        };
        if attempt >= max_attempts {
            return Err(RetryError::Exhausted {
                attempts: attempt,
                conflict,
                last: error,
            });
        }
        let delay = policy.delay_after(attempt);
        tracing::debug!(
            attempt,
            code = conflict.code(),
            delay_ms = delay.as_millis() as u64,
            "optimistic-concurrency conflict; retrying the transaction"
        );
        tokio::time::sleep(delay).await;
        attempt += 1;
    }
}

async fn run_once<T, E, F>(client: &mut Client, body: &mut F) -> Result<T, E>
where
    F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    E: From<tokio_postgres::Error>,
{
    let mut transaction = client.transaction().await?;
    match body(&mut transaction).await {
        Ok(value) => {
            transaction.commit().await?;
            Ok(value)
        }
        Err(error) => {
            // A failed rollback (e.g. the connection is gone) changes nothing for the caller.
            let _ = transaction.rollback().await;
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let policy = RetryPolicy::default()
            .delays(Duration::from_millis(10), Duration::from_millis(100))
            .jitter(false);
        let delays: Vec<_> = (1..=6).map(|a| policy.delay_after(a).as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 100, 100]);
        assert_eq!(policy.delay_after(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let policy =
            RetryPolicy::default().delays(Duration::from_millis(100), Duration::from_secs(1));
        let samples: Vec<Duration> = (0..2000).map(|_| policy.delay_after(1)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= Duration::from_millis(50) && *d <= Duration::from_millis(100))
        );
        let min = samples.iter().min().unwrap();
        let max = samples.iter().max().unwrap();
        assert!(*max - *min > Duration::from_millis(40), "{min:?}..{max:?}");
    }

    #[test]
    fn defaults_are_documented_values() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_attempts, 5);
        assert_eq!(policy.base_delay, Duration::from_millis(10));
        assert_eq!(policy.max_delay, Duration::from_secs(1));
        assert!(policy.jitter);
        assert_eq!(RetryPolicy::with_max_attempts(0).max_attempts, 1);
    }

    #[test]
    fn exhausted_error_names_attempts_and_conflict() {
        let error: RetryError<&str> = RetryError::Exhausted {
            attempts: 3,
            conflict: OccConflict::Data,
            last: "change conflicts with another transaction",
        };
        let shown = error.to_string();
        assert!(
            shown.contains("3 attempts") && shown.contains("OC000"),
            "{shown}"
        );
        assert!(shown.contains("change conflicts"), "{shown}");
    }
}
