//! [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction): a checkout per
//! attempt, the connection back in the pool during each backoff, and its transaction
//! ([`PooledTx`]).

use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;

use tokio_postgres::Client;
use tracing::Instrument;

use super::on_connection::*;
use super::policy::Attempts;
use super::{AsOccConflict, RetryPolicy};

/// A transaction inside [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction)'s body: like [`Tx`], it derefs to the
/// [`Client`], and the helper sends `BEGIN`, `COMMIT` and `ROLLBACK`. It owns (a share of) the
/// pooled connection, so the body's future borrows nothing and is `Send` and `'static`
/// whenever what it captures is. It is not `Clone`, and it belongs to its attempt: the
/// connection goes back to the pool as soon as the attempt is over (before any backoff). A
/// `PooledTx` moved somewhere that outlives the body (a spawned task) keeps the connection out
/// of the pool until it is dropped, and its statements run outside the transaction; the
/// helper logs a warning when that happens.
pub struct PooledTx {
    conn: Arc<crate::DsqlPooledConnection<'static>>,
}

impl std::fmt::Debug for PooledTx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledTx")
            .field("endpoint", &self.endpoint())
            .finish_non_exhaustive()
    }
}

impl Deref for PooledTx {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.conn.client()
    }
}

impl PooledTx {
    /// The endpoint the attempt runs on.
    pub fn endpoint(&self) -> &str {
        self.conn.endpoint()
    }

    /// The Region of that endpoint.
    pub fn region(&self) -> &str {
        self.conn.region()
    }
}

impl crate::DsqlPool {
    /// Runs `body` in a transaction on a connection from the pool and commits it, like
    /// [`retry_transaction_on`], re-running the whole transaction on an optimistic-concurrency
    /// conflict, **and** on a connection lost before `COMMIT` was sent (its endpoint failed, it
    /// was cut), on a fresh checkout: with a multi-Region configuration, on the peer once the
    /// failed endpoint is marked down. Each attempt may be bounded by
    /// [`RetryPolicy::attempt_timeout`]. Both kinds of retry count against
    /// `policy.max_attempts` and `policy.deadline`.
    ///
    /// Never re-run: a connection lost with `COMMIT` in flight, or an attempt timing out then
    /// ([`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown): the outcome is
    /// unknown, see the [idempotency-key](crate::guide::pooling) pattern); `COMMIT` rolling
    /// back a failed transaction
    /// ([`Error::TransactionRolledBack`](crate::Error::TransactionRolledBack)); any other
    /// error, returned at once. A checkout that fails returns its [`Error`](crate::Error).
    ///
    /// `body` gets a [`PooledTx`] and returns a future: `|tx| async move { … }`.
    ///
    /// ```no_run
    /// # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy};
    /// # use std::time::Duration;
    /// # async fn f(pool: &DsqlPool, id: uuid::Uuid) -> Result<(), Error> {
    /// let policy = RetryPolicy::default().with_attempt_timeout(Duration::from_secs(5));
    /// pool.retry_transaction(&policy, |tx| async move {
    ///     tx.execute("UPDATE account SET balance = balance - 1 WHERE id = $1", &[&id])
    ///         .await?;
    ///     Ok::<_, Error>(())
    /// })
    /// .await?;
    /// # Ok(()) }
    /// ```
    pub async fn retry_transaction<T, E, F, Fut>(
        &self,
        policy: &RetryPolicy,
        mut body: F,
    ) -> Result<T, E>
    where
        F: FnMut(PooledTx) -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: From<tokio_postgres::Error> + From<crate::Error> + AsOccConflict,
    {
        let mut attempts = Attempts::new(policy);
        loop {
            let conn = self.get_owned().await?;
            let attempt_started = tokio::time::Instant::now();
            let target = conn.target().clone();
            let committing = std::sync::atomic::AtomicBool::new(false);
            let shared = Arc::new(conn);
            let attempt =
                pooled_attempt(&shared, &mut body, &committing).instrument(attempts.span());
            let outcome = match policy.attempt_timeout {
                Some(timeout) => tokio::time::timeout(timeout, attempt)
                    .await
                    .map_err(|_| timeout),
                None => Ok(attempt.await),
            };
            let committing = committing.load(std::sync::atomic::Ordering::SeqCst);
            // The attempt is over: the connection goes back to the pool now (before any
            // backoff), unless the body moved its `PooledTx` somewhere that outlives it.
            let mut conn = match Arc::try_unwrap(shared) {
                Ok(conn) => Some(conn),
                Err(_) => {
                    tracing::warn!(
                        endpoint = %target.endpoint,
                        "a PooledTx outlived its transaction attempt (moved into a task?); its \
                         statements run outside the transaction, and its connection returns \
                         to the pool only when it is dropped"
                    );
                    None
                }
            };
            let why = match outcome {
                Ok(Ok(value)) => {
                    self.connector().report_ok(&target);
                    return Ok(value);
                }
                Err(timeout) => {
                    // A stalled connection is dropped, never given back.
                    if let Some(conn) = &mut conn {
                        conn.discard();
                    }
                    drop(conn);
                    if committing {
                        crate::telemetry::transaction_outcome_unknown();
                        return Err(crate::Error::CommitOutcomeUnknown { source: None }.into());
                    }
                    self.connector()
                        .report_lost(&target, "attempt_timeout", attempt_started);
                    match attempts.after_lost_connection(&target.endpoint, "attempt_timeout") {
                        Some(delay) => {
                            tokio::time::sleep(delay).await;
                            continue;
                        }
                        None => return Err(crate::Error::AttemptTimeout { timeout }.into()),
                    }
                }
                Ok(Err(error)) => {
                    if let Some(conflict) = error.occ_conflict() {
                        drop(conn);
                        match attempts.after_conflict(conflict) {
                            Some(delay) => {
                                tokio::time::sleep(delay).await;
                                continue;
                            }
                            None => return Err(error),
                        }
                    }
                    let lost = conn.as_ref().is_some_and(|conn| conn.is_closed()) && !committing;
                    drop(conn);
                    if !lost {
                        return Err(error);
                    }
                    self.connector()
                        .report_lost(&target, "connection_lost", attempt_started);
                    match attempts.after_lost_connection(&target.endpoint, "connection_lost") {
                        Some(delay) => delay,
                        None => return Err(error),
                    }
                }
            };
            tokio::time::sleep(why).await;
        }
    }
}

/// One attempt of [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction) on
/// `conn`; sets `committing` just before `COMMIT` goes out.
async fn pooled_attempt<T, E, F, Fut>(
    conn: &Arc<crate::DsqlPooledConnection<'static>>,
    body: &mut F,
    committing: &std::sync::atomic::AtomicBool,
) -> Result<T, E>
where
    F: FnMut(PooledTx) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: From<tokio_postgres::Error> + From<crate::Error>,
{
    let client = conn.client();
    let mut transaction = OpenTransaction { client, open: true };
    client.batch_execute("BEGIN").await?;
    let result = body(PooledTx { conn: conn.clone() }).await;
    end_attempt(client, &mut transaction, result, committing).await
}
