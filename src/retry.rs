//! Optimistic-concurrency retry: DSQL reports write conflicts as SQLSTATE `40001` (`OC000` data,
//! `OC001` schema), usually at `COMMIT`. The fix is to run the whole transaction again.
//!
//! # Which helper
//!
//! | helper | connection | body | use it for |
//! |---|---|---|---|
//! | [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction) | a fresh checkout per attempt, given back during each backoff | `\|tx\| async move { … }` with a [`PooledTx`] | **services**: retries on a conflict *and* on a connection lost before `COMMIT` (on the peer endpoint when one stops answering); honours every [`RetryPolicy`] field |
//! | [`retry_transaction_on`] | the one you pass, held throughout | `\|tx\| async move { … }` with a [`Tx`] | a connection you already hold (a session setting, a test); `Send`, works in `tokio::spawn` |
//! | [`retry_postgres_transaction_on`] | the one you pass | `async \|tx\| { … }` with a `&mut tokio_postgres::Transaction` | code written against `tokio_postgres::Transaction` (`main`, scripts, tests); not `Send` when the closure captures a reference |
//! | [`retry_statement_on`] | the one you pass | one SQL statement, its own transaction | DDL, `CREATE INDEX ASYNC` (returns its rows: the `job_id`) |
//!
//! All of them retry conflicts only (with the policy's backoff), never a `COMMIT` whose outcome
//! is unknown, and bound each attempt by [`RetryPolicy::attempt_timeout`]; only the pool's can
//! replace a connection, so only it retries a lost connection or a timed-out attempt.
//!
//! The two closure forms of the connection-bound helper:
//!
//! - [`retry_transaction_on`]: the body is a closure returning a future, `|tx| async move { … }`,
//!   that gets a [`Tx`] handle. It works everywhere, including inside `tokio::spawn`, axum
//!   handlers and `&self` methods, and needs no `Box::pin` and no type annotation when the call
//!   is the function's tail expression.
//! - [`retry_postgres_transaction_on`]: the body is an async closure, `async |tx| { … }`, that
//!   gets a `&mut tokio_postgres::Transaction`. Fine in `main`, tests and scripts; but a future
//!   that calls it with a closure capturing any reference is not `Send` to today's compiler
//!   (`implementation of Send is not general enough`), so it cannot go into `tokio::spawn`.
//!
//! ```no_run
//! use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//!
//! struct Accounts {
//!     pool: DsqlPool,
//! }
//!
//! impl Accounts {
//!     /// Moves `amount` between two accounts; a conflict re-runs the whole transaction.
//!     async fn transfer(&self, from: i64, to: i64, amount: i64) -> Result<i64, Error> {
//!         let mut conn = self.pool.get().await?;
//!         retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!             tx.execute("UPDATE account SET balance = balance - $1 WHERE id = $2", &[&amount, &from])
//!                 .await?;
//!             tx.execute("UPDATE account SET balance = balance + $1 WHERE id = $2", &[&amount, &to])
//!                 .await?;
//!             let row = tx.query_one("SELECT balance FROM account WHERE id = $1", &[&from]).await?;
//!             Ok(row.get(0))
//!         })
//!         .await
//!     }
//! }
//!
//! # async fn run(accounts: std::sync::Arc<Accounts>) {
//! // The future is Send: it can be spawned, or returned from an axum handler.
//! tokio::spawn(async move { accounts.transfer(1, 2, 10).await });
//! # }
//! ```
//!
//! # What compiles inside `tokio::spawn`
//!
//! | body | inside `tokio::spawn` / an axum handler |
//! |---|---|
//! | `retry_transaction_on(…, \|tx\| async move { … })` capturing `&self`, `&str`, `&AtomicU32`, copies | compiles |
//! | the same capturing an owned `String` or `Vec` | does not: `async move` moves it out of an `FnMut` closure. Fix: `let name = name.as_str();` (or `&vec`) before the closure, and capture the reference |
//! | `retry_postgres_transaction_on(…, async \|tx\| { … })` capturing only owned values (`async move \|tx\|`) | compiles |
//! | `retry_postgres_transaction_on(…, async \|tx\| { … })` capturing any reference (`&self`, a `&str`) | does not: `implementation of Send is not general enough`; the compiler cannot prove the async closure's future `Send` for every lifetime. Fix: use `retry_transaction_on` |
//!
//! State that must survive across attempts goes through references (`&AtomicU32`, a
//! `&Mutex<…>`): `async move` copies a captured `u32`, so `count += 1` inside the body would
//! change a copy. Better still, return values from the body.
//!
//! The rows above, as doctests. Each pair differs only in the point the row is about.
//!
//! ```no_run
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//! struct Owners { pool: DsqlPool, sql: &'static str }
//! impl Owners {
//!     async fn touch(&self, id: i64) -> Result<(), Error> {
//!         let mut conn = self.pool.get().await?;
//!         retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!             tx.execute(self.sql, &[&id]).await?;
//!             Ok(())
//!         })
//!         .await
//!     }
//! }
//! fn spawn(owners: std::sync::Arc<Owners>) {
//!     tokio::spawn(async move { owners.touch(1).await });
//! }
//! ```
//!
//! ```compile_fail
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_postgres_transaction_on};
//! struct Owners { pool: DsqlPool, sql: &'static str }
//! impl Owners {
//!     async fn touch(&self, id: i64) -> Result<(), Error> {
//!         let mut conn = self.pool.get().await?;
//!         retry_postgres_transaction_on(&mut conn, &RetryPolicy::default(), async |tx| {
//!             tx.execute(self.sql, &[&id]).await?;
//!             Ok(())
//!         })
//!         .await
//!         .map_err(|e| e.into_inner())
//!     }
//! }
//! fn spawn(owners: std::sync::Arc<Owners>) {
//!     // error: implementation of `Send` is not general enough
//!     tokio::spawn(async move { owners.touch(1).await });
//! }
//! ```
//!
//! ```no_run
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//! async fn rename(pool: &DsqlPool, id: i64, name: String) -> Result<(), Error> {
//!     let mut conn = pool.get().await?;
//!     let name = name.as_str();
//!     retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!         tx.execute("UPDATE owner SET name = $1 WHERE id = $2", &[&name, &id]).await?;
//!         Ok(())
//!     })
//!     .await
//! }
//! ```
//!
//! ```compile_fail
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_transaction_on};
//! async fn rename(pool: &DsqlPool, id: i64, name: String) -> Result<(), Error> {
//!     let mut conn = pool.get().await?;
//!     // error: cannot move out of `name`, a captured variable in an `FnMut` closure
//!     retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
//!         tx.execute("UPDATE owner SET name = $1 WHERE id = $2", &[&name, &id]).await?;
//!         Ok(())
//!     })
//!     .await
//! }
//! ```
//!
//! ```no_run
//! # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_postgres_transaction_on};
//! // The async-closure form in a spawned task, when the closure owns what it captures.
//! fn spawn(pool: DsqlPool, sql: String) {
//!     tokio::spawn(async move {
//!         let mut conn = pool.get().await?;
//!         retry_postgres_transaction_on(&mut conn, &RetryPolicy::default(), async move |tx| {
//!             tx.execute(&sql, &[]).await?;
//!             Ok::<_, Error>(())
//!         })
//!         .await
//!         .map_err(|e| e.into_inner())
//!     });
//! }
//! ```
//!
//! With your own error type `E`, the body's `?` needs `From<tokio_postgres::Error>` for `E`,
//! `retry_transaction_on` needs `From<`[`Error`]`>` (for a rolled-back or unknown-outcome
//! `COMMIT`), and the helper needs to know which errors are conflicts: implement
//! [`AsOccConflict`] by looking for the database error inside (see its docs for a worked
//! example). This crate's [`Error`] and, with the `anyhow` feature, `anyhow::Error` have all of
//! it already.
//!
//! [`Error`]: crate::Error

use std::fmt;
use std::future::Future;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::error::DbError;
use tokio_postgres::{Client, Transaction};
use tracing::Instrument;

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
    error.as_db_error().and_then(conflict_of)
}

/// The conflict a server error reports, if it is one.
fn conflict_of(db: &DbError) -> Option<OccConflict> {
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
/// that type in [`retry_transaction_on`] and [`retry_postgres_transaction_on`] bodies.
///
/// A service's error type, with `?` on a pool checkout, inside the body and on the result:
///
/// ```no_run
/// use tokio_postgres_dsql::{AsOccConflict, DsqlPool, OccConflict, RetryPolicy, retry_transaction_on};
///
/// #[derive(Debug)]
/// enum AppError {
///     Dsql(tokio_postgres_dsql::Error),
///     NotEnoughMoney,
/// }
///
/// impl From<tokio_postgres_dsql::Error> for AppError {
///     fn from(e: tokio_postgres_dsql::Error) -> Self {
///         AppError::Dsql(e)
///     }
/// }
///
/// // The body's `?` on queries.
/// impl From<tokio_postgres_dsql::tokio_postgres::Error> for AppError {
///     fn from(e: tokio_postgres_dsql::tokio_postgres::Error) -> Self {
///         AppError::Dsql(e.into())
///     }
/// }
///
/// impl AsOccConflict for AppError {
///     fn occ_conflict(&self) -> Option<OccConflict> {
///         match self {
///             AppError::Dsql(e) => e.occ_conflict(),
///             AppError::NotEnoughMoney => None,
///         }
///     }
/// }
///
/// async fn withdraw(pool: &DsqlPool, id: i64, amount: i64) -> Result<i64, AppError> {
///     let mut conn = pool.get().await?; // a checkout error converts through `Error`
///     retry_transaction_on(&mut conn, &RetryPolicy::default(), |tx| async move {
///         let row = tx.query_one("SELECT balance FROM account WHERE id = $1", &[&id]).await?;
///         let balance: i64 = row.get(0);
///         if balance < amount {
///             return Err(AppError::NotEnoughMoney); // rolled back, not retried
///         }
///         tx.execute("UPDATE account SET balance = $1 WHERE id = $2", &[&(balance - amount), &id])
///             .await?;
///         Ok(balance - amount)
///     })
///     .await
/// }
/// ```
pub trait AsOccConflict {
    /// The conflict this error reports, or `None` if it is not retryable.
    fn occ_conflict(&self) -> Option<OccConflict>;

    /// The database's error this error carries, if any, so that [`RetryError`] can show the
    /// server's message rather than the driver's bare `db error`. Default: none.
    fn database_error(&self) -> Option<&DbError> {
        None
    }
}

impl AsOccConflict for tokio_postgres::Error {
    fn occ_conflict(&self) -> Option<OccConflict> {
        occ_conflict(self)
    }

    fn database_error(&self) -> Option<&DbError> {
        self.as_db_error()
    }
}

impl AsOccConflict for Box<dyn std::error::Error + Send + Sync> {
    /// Looks for the database's error in the cause chain.
    fn occ_conflict(&self) -> Option<OccConflict> {
        self.database_error().and_then(conflict_of)
    }

    fn database_error(&self) -> Option<&DbError> {
        db_error_in(self.as_ref())
    }
}

impl AsOccConflict for crate::Error {
    /// A conflict reported by a query ([`Error::Query`](crate::Error::Query)).
    fn occ_conflict(&self) -> Option<OccConflict> {
        match self {
            crate::Error::Query { source, .. } => occ_conflict(source),
            _ => None,
        }
    }

    fn database_error(&self) -> Option<&DbError> {
        db_error_in(self)
    }
}

#[cfg(feature = "anyhow")]
impl AsOccConflict for anyhow::Error {
    /// Looks for the database's error in the chain (feature `anyhow`).
    fn occ_conflict(&self) -> Option<OccConflict> {
        self.database_error().and_then(conflict_of)
    }

    fn database_error(&self) -> Option<&DbError> {
        self.chain()
            .find_map(|cause| cause.downcast_ref::<DbError>())
    }
}

/// The database's error in `error`'s cause chain, if there is one.
fn db_error_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a DbError> {
    let mut current = Some(error);
    while let Some(cause) = current {
        if let Some(db) = cause.downcast_ref::<DbError>() {
            return Some(db);
        }
        current = cause.source();
    }
    None
}

/// How [`retry_transaction_on`] and [`retry_postgres_transaction_on`] retry.
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
    /// Give up retrying once this much time has passed since the first attempt began (an
    /// attempt is not cut short; no retry starts whose delay would end past it). Default none:
    /// only `max_attempts` bounds the retries.
    pub deadline: Option<Duration>,
    /// Bound on one attempt, `BEGIN` to the end of `COMMIT`. An attempt past it is abandoned:
    /// with `COMMIT` in flight, the helpers return
    /// [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown) (`RetryError::OutcomeUnknown`
    /// for [`retry_postgres_transaction_on`]); before `COMMIT`,
    /// [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction) drops the
    /// connection, reports its endpoint's failure (see
    /// [`FailoverPolicy`](crate::FailoverPolicy)) and retries on another connection (nothing
    /// was committed), while the helpers bound to one connection ([`retry_transaction_on`],
    /// [`retry_postgres_transaction_on`], [`retry_statement_on`]) return
    /// [`Error::AttemptTimeout`](crate::Error::AttemptTimeout): the connection itself may be
    /// what stalled, and they cannot replace it.
    /// DSQL ignores `statement_timeout`, and a silent network (a Region cut off) otherwise
    /// holds a statement until the TCP user timeout; set this a little above your slowest
    /// transaction. Default none.
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            jitter: true,
            deadline: None,
            attempt_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// Sets the number of attempts, the first included (at least 1):
    /// `RetryPolicy::default().with_max_attempts(10)`.
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Sets the delays.
    #[must_use]
    pub fn delays(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max.max(base);
        self
    }

    /// Sets an overall deadline (see [`deadline`](Self::deadline)).
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets a bound on each attempt (see [`attempt_timeout`](Self::attempt_timeout)).
    #[must_use]
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
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

/// Why [`retry_postgres_transaction_on`] gave up.
#[derive(Debug)]
#[non_exhaustive]
pub enum RetryError<E> {
    /// A non-retryable error, returned at once (the transaction was rolled back).
    Failed(E),
    /// `COMMIT` rolled the transaction back: a statement in it failed and the body returned
    /// `Ok` anyway. `E` is the error the server gave a statement sent after the failure
    /// (`25P02`). Nothing was written; not retried.
    RolledBack(E),
    /// The connection was lost with `COMMIT` in flight: the transaction may or may not have
    /// been committed. Not retried (see the [idempotency-key](crate::guide::pooling) pattern).
    OutcomeUnknown(E),
    /// An attempt ran past [`RetryPolicy::attempt_timeout`] and was abandoned (its `ROLLBACK`
    /// queued on the connection); not retried. The error says which:
    /// [`Error::AttemptTimeout`](crate::Error::AttemptTimeout) before `COMMIT` (nothing was
    /// committed), [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown) with
    /// `COMMIT` in flight.
    TimedOut(crate::Error),
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

impl<E: From<crate::Error>> RetryError<E> {
    /// The underlying error (the last conflict when retries were exhausted; a
    /// [`TimedOut`](RetryError::TimedOut) attempt's error converted to `E`).
    pub fn into_inner(self) -> E {
        match self {
            RetryError::Failed(error)
            | RetryError::RolledBack(error)
            | RetryError::OutcomeUnknown(error)
            | RetryError::Exhausted { last: error, .. } => error,
            RetryError::TimedOut(error) => error.into(),
        }
    }
}

impl<E: fmt::Display + AsOccConflict> fmt::Display for RetryError<E> {
    /// Shows the database's severity, code and message, not just the driver's `db error`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RetryError::Failed(error) => write!(f, "transaction failed: {}", describe(error)),
            RetryError::RolledBack(error) => write!(
                f,
                "the transaction was rolled back at COMMIT: a statement in it failed and the \
                 body did not return that error ({})",
                describe(error)
            ),
            RetryError::OutcomeUnknown(error) => write!(
                f,
                "the connection was lost during COMMIT: the transaction may or may not have \
                 been committed ({})",
                describe(error)
            ),
            RetryError::TimedOut(error) => write!(f, "{error}"),
            RetryError::Exhausted {
                attempts,
                conflict,
                last,
            } => write!(
                f,
                "transaction gave up after {attempts} attempts on optimistic-concurrency \
                 conflicts; last conflict ({conflict}): {}",
                describe(last)
            ),
        }
    }
}

/// `error`'s message, followed by the database's severity, code and message when it carries a
/// server error whose message it does not already show (`tokio_postgres::Error` displays as a
/// bare `db error`).
fn describe<E: fmt::Display + AsOccConflict>(error: &E) -> String {
    let shown = error.to_string();
    match error.database_error() {
        Some(db) if !shown.contains(db.message()) => {
            format!("{shown}: {}", crate::error::server_words(db))
        }
        _ => shown,
    }
}

impl<E: std::error::Error + AsOccConflict + 'static> std::error::Error for RetryError<E> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RetryError::Failed(error)
            | RetryError::RolledBack(error)
            | RetryError::OutcomeUnknown(error)
            | RetryError::Exhausted { last: error, .. } => Some(error),
            RetryError::TimedOut(error) => Some(error),
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
pub async fn retry_postgres_transaction_on<C, T, E, F>(
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
    let mut attempts = Attempts::new(policy);
    loop {
        let committing = std::sync::atomic::AtomicBool::new(false);
        let attempt = run_once(client, &mut body, &committing).instrument(attempts.span());
        let outcome = match bounded(policy, attempt, &committing).await {
            Ok(outcome) => outcome,
            Err(timed_out) => return Err(RetryError::TimedOut(timed_out)),
        };
        let error = match outcome {
            Ok(value) => return Ok(value),
            Err(AttemptError::Failed(error)) => error,
            Err(AttemptError::RolledBack(error)) => return Err(RetryError::RolledBack(error)),
            Err(AttemptError::OutcomeUnknown(error)) => {
                crate::telemetry::transaction_outcome_unknown();
                return Err(RetryError::OutcomeUnknown(error));
            }
        };
        let Some(conflict) = error.occ_conflict() else {
            return Err(RetryError::Failed(error));
        };
        match attempts.after_conflict(conflict) {
            Some(delay) => tokio::time::sleep(delay).await,
            None => {
                return Err(RetryError::Exhausted {
                    attempts: attempts.made(),
                    conflict,
                    last: error,
                });
            }
        }
    }
}

/// The bookkeeping the retry helpers share: attempts, the deadline, delays, logs and metrics.
struct Attempts<'p> {
    policy: &'p RetryPolicy,
    /// The attempt running or just finished (1-based).
    attempt: u32,
    started: tokio::time::Instant,
}

impl<'p> Attempts<'p> {
    fn new(policy: &'p RetryPolicy) -> Self {
        Attempts {
            policy,
            attempt: 1,
            started: tokio::time::Instant::now(),
        }
    }

    /// Attempts made so far.
    fn made(&self) -> u32 {
        self.attempt
    }

    /// The span of the current attempt.
    fn span(&self) -> tracing::Span {
        tracing::debug_span!("dsql.transaction", attempt = self.attempt)
    }

    /// The delay before the next attempt (a retry), or `None` when the attempts or the deadline
    /// are spent (exhausted); counted either way, and logged by `log`, which gets the attempt
    /// that failed and the delay, or whether the deadline (not the count) ran out.
    fn next(&mut self, log: impl FnOnce(u32, Result<Duration, bool>)) -> Option<Duration> {
        let delay = self.policy.delay_after(self.attempt);
        let out_of_time = self
            .policy
            .deadline
            .is_some_and(|deadline| self.started.elapsed().saturating_add(delay) >= deadline);
        if self.attempt >= self.policy.max_attempts.max(1) || out_of_time {
            log(self.attempt, Err(out_of_time));
            crate::telemetry::transaction_retries_exhausted();
            return None;
        }
        log(self.attempt, Ok(delay));
        crate::telemetry::transaction_retry();
        self.attempt += 1;
        Some(delay)
    }

    /// After a connection lost (or an attempt timed out) before `COMMIT`: the delay before the
    /// next attempt, on another connection, or `None` when the attempts or the deadline are
    /// spent.
    fn after_lost_connection(&mut self, endpoint: &str, why: &'static str) -> Option<Duration> {
        self.next(|attempt, outcome| match outcome {
            Ok(delay) => tracing::info!(
                attempt,
                endpoint,
                why,
                delay_ms = delay.as_millis() as u64,
                "connection lost before COMMIT (nothing committed); retrying on another connection"
            ),
            Err(out_of_time) => tracing::warn!(
                attempts = attempt,
                endpoint,
                why,
                out_of_time,
                "transaction gave up after losing its connection before COMMIT"
            ),
        })
    }

    /// After a conflict: the delay before the next attempt, or `None` when the attempts or the
    /// deadline are spent.
    fn after_conflict(&mut self, conflict: OccConflict) -> Option<Duration> {
        crate::telemetry::transaction_conflict(conflict.code());
        self.next(|attempt, outcome| match outcome {
            Ok(delay) => tracing::debug!(
                attempt,
                code = conflict.code(),
                delay_ms = delay.as_millis() as u64,
                "optimistic-concurrency conflict; retrying the transaction"
            ),
            Err(out_of_time) => tracing::warn!(
                attempts = attempt,
                code = conflict.code(),
                out_of_time,
                "transaction gave up on optimistic-concurrency conflicts"
            ),
        })
    }
}

/// Runs one statement in its own transaction (no `BEGIN`: the statement's implicit one), again
/// on an optimistic-concurrency conflict, with `policy`'s backoff, and returns the rows it
/// answered. Made for DDL, which DSQL wants alone in its transaction (`CREATE TABLE`, `ALTER
/// TABLE`, a `GRANT`) and for `CREATE INDEX ASYNC`, whose one row carries the `job_id` to
/// wait for (`CALL sys.wait_for_job($1)`: a procedure); call it on a connection outside any
/// transaction.
/// The statement goes as a simple query (no parameters), so values come back as text. Any
/// other error is returned at once as [`Error::Query`](crate::Error::Query); when the attempts
/// run out, the last conflict. [`RetryPolicy::attempt_timeout`] bounds each attempt (past it,
/// [`Error::AttemptTimeout`](crate::Error::AttemptTimeout), not retried: the statement's
/// outcome is unknown).
///
/// ```no_run
/// # use tokio_postgres_dsql::{DsqlPool, Error, RetryPolicy, retry_statement_on};
/// # async fn f(pool: &DsqlPool) -> Result<(), Error> {
/// let mut conn = pool.get().await?;
/// let policy = RetryPolicy::default();
/// let rows = retry_statement_on(&mut conn, &policy, "CREATE INDEX ASYNC ON pet (owner_id)")
///     .await?;
/// let job_id = rows[0].get("job_id").unwrap_or_default().to_owned();
/// conn.execute("CALL sys.wait_for_job($1)", &[&job_id]).await?;
/// # Ok(()) }
/// ```
pub async fn retry_statement_on<C>(
    client: &mut C,
    policy: &RetryPolicy,
    statement: &str,
) -> Result<Vec<tokio_postgres::SimpleQueryRow>, crate::Error>
where
    C: AsClient + ?Sized,
{
    let client = client.as_client();
    let mut attempts = Attempts::new(policy);
    let never = std::sync::atomic::AtomicBool::new(false);
    loop {
        let attempt = client.simple_query(statement).instrument(attempts.span());
        let error = match bounded(policy, attempt, &never).await? {
            Ok(messages) => {
                return Ok(messages
                    .into_iter()
                    .filter_map(|message| match message {
                        tokio_postgres::SimpleQueryMessage::Row(row) => Some(row),
                        _ => None,
                    })
                    .collect());
            }
            Err(error) => error,
        };
        let Some(conflict) = occ_conflict(&error) else {
            return Err(error.into());
        };
        match attempts.after_conflict(conflict) {
            Some(delay) => tokio::time::sleep(delay).await,
            None => return Err(error.into()),
        }
    }
}

/// A transaction inside [`retry_transaction_on`]'s body. It derefs to the
/// [`Client`], so every query method is there (`tx.execute(…)`,
/// `tx.query_one(…)`, and `&*tx` where a `GenericClient` is wanted). It is `Copy` and lives for
/// the whole call, which is what lets the body be a plain `|tx| async move { … }` closure whose
/// future is `Send`.
///
/// The transaction is opened with `BEGIN` before the body runs and ended by the helper:
/// `COMMIT` when the body returns `Ok`, `ROLLBACK` when it returns `Err`, and a `ROLLBACK` queued
/// on the connection if the whole call is dropped (cancelled) midway, as
/// `tokio_postgres::Transaction` does, so the connection never goes back to a pool inside a
/// transaction. Do not send `COMMIT` or `ROLLBACK` through it yourself.
#[derive(Debug, Clone, Copy)]
pub struct Tx<'c> {
    client: &'c Client,
}

impl Deref for Tx<'_> {
    type Target = Client;

    fn deref(&self) -> &Client {
        self.client
    }
}

impl<'c> Tx<'c> {
    /// The client the transaction runs on.
    pub fn client(&self) -> &'c Client {
        self.client
    }
}

/// Rolls back an open transaction if the call is dropped before it ends it.
struct OpenTransaction<'c> {
    client: &'c Client,
    open: bool,
}

impl Drop for OpenTransaction<'_> {
    fn drop(&mut self) {
        if self.open {
            // What `tokio_postgres::Transaction`'s own `Drop` does: queue a `ROLLBACK` on the
            // connection without waiting for it (this is a `pub`, if hidden, tokio-postgres API).
            self.client.__private_api_rollback(None);
        }
    }
}

/// Runs `body` in a transaction and commits it, re-running the whole transaction on an
/// optimistic-concurrency conflict at any statement or at `COMMIT`, with backoff, up to
/// `policy.max_attempts` times. Any other error rolls back and is returned at once; when the
/// attempts run out, the last conflict is returned (and logged with `tracing` at `warn`).
///
/// `client` is a plain [`Client`], a [`DsqlConnection`](crate::DsqlConnection) or a pooled
/// connection of either ([`AsClient`]). `body` gets a [`Tx`] and returns a future: write it as
/// `|tx| async move { … }`. The future returned by this function is `Send` whenever the body's
/// is, so it works inside `tokio::spawn` and axum handlers, capturing `&self` and other
/// references (see the [module docs](self) for what compiles and why). The error type `E` is
/// yours: it needs `From<tokio_postgres::Error>` (for `?` in the body and for `BEGIN`/`COMMIT`),
/// `From<`[`Error`](crate::Error)`>` (for the two outcomes below) and [`AsOccConflict`]; as a
/// function's tail expression, `E` is inferred from the function's return type, so the body
/// needs no `Ok::<_, E>`.
///
/// `COMMIT` is checked: if a statement failed and the body returned `Ok` anyway, PostgreSQL
/// answers `COMMIT` with a rollback and no error, and this returns
/// [`Error::TransactionRolledBack`](crate::Error::TransactionRolledBack). If the connection is
/// lost with `COMMIT` in flight, it returns
/// [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown) and does not re-run the
/// body (see the [idempotency-key](crate::guide::pooling) pattern). Neither is retried.
pub async fn retry_transaction_on<'c, C, T, E, F, Fut>(
    client: &'c mut C,
    policy: &RetryPolicy,
    mut body: F,
) -> Result<T, E>
where
    C: AsClient + ?Sized,
    F: FnMut(Tx<'c>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: From<tokio_postgres::Error> + From<crate::Error> + AsOccConflict,
{
    let client: &'c Client = client.as_client();
    let mut attempts = Attempts::new(policy);
    loop {
        let committing = std::sync::atomic::AtomicBool::new(false);
        let attempt = attempt_once(client, &mut body, &committing).instrument(attempts.span());
        let error = match bounded(policy, attempt, &committing).await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(error)) => error,
            Err(timed_out) => return Err(timed_out.into()),
        };
        let Some(conflict) = error.occ_conflict() else {
            return Err(error);
        };
        match attempts.after_conflict(conflict) {
            Some(delay) => tokio::time::sleep(delay).await,
            None => return Err(error),
        }
    }
}

/// One attempt of [`retry_transaction_on`]: `BEGIN`, the body, then `COMMIT` (checked) or
/// `ROLLBACK`.
async fn attempt_once<'c, T, E, F, Fut>(
    client: &'c Client,
    body: &mut F,
    committing: &std::sync::atomic::AtomicBool,
) -> Result<T, E>
where
    F: FnMut(Tx<'c>) -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: From<tokio_postgres::Error> + From<crate::Error>,
{
    let mut transaction = OpenTransaction { client, open: true };
    client.batch_execute("BEGIN").await?;
    let result = body(Tx { client }).await;
    end_attempt(client, &mut transaction, result, committing).await
}

/// Runs one attempt on a connection the helper cannot replace, bounded by the policy's
/// `attempt_timeout`: past it, the attempt is abandoned (its transaction's `ROLLBACK` is queued
/// on the connection) and the error says whether `COMMIT` was in flight. Not retried: the
/// connection itself may be what stalled.
async fn bounded<R>(
    policy: &RetryPolicy,
    attempt: impl Future<Output = R>,
    committing: &std::sync::atomic::AtomicBool,
) -> Result<R, crate::Error> {
    let Some(timeout) = policy.attempt_timeout else {
        return Ok(attempt.await);
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => Ok(result),
        Err(_) if committing.load(std::sync::atomic::Ordering::SeqCst) => {
            crate::telemetry::transaction_outcome_unknown();
            Err(crate::Error::CommitOutcomeUnknown { source: None })
        }
        Err(_) => Err(crate::Error::AttemptTimeout { timeout }),
    }
}

/// Ends an attempt of [`retry_transaction_on`] or [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction):
/// the body's `Ok` is committed (checked), its `Err` rolled back.
async fn end_attempt<T, E>(
    client: &Client,
    transaction: &mut OpenTransaction<'_>,
    result: Result<T, E>,
    committing: &std::sync::atomic::AtomicBool,
) -> Result<T, E>
where
    E: From<tokio_postgres::Error> + From<crate::Error>,
{
    match result {
        Ok(value) => {
            committing.store(true, std::sync::atomic::Ordering::SeqCst);
            let outcome = commit_checked(client).await;
            // Committed or not, the server has ended the transaction.
            transaction.open = false;
            match outcome {
                Ok(()) => Ok(value),
                Err(CommitFailure::Failed(e)) => Err(e.into()),
                Err(CommitFailure::RolledBack(source)) => {
                    Err(crate::Error::TransactionRolledBack { source }.into())
                }
                Err(CommitFailure::OutcomeUnknown(source)) => {
                    crate::telemetry::transaction_outcome_unknown();
                    Err(crate::Error::CommitOutcomeUnknown {
                        source: Some(source),
                    }
                    .into())
                }
            }
        }
        Err(error) => {
            // A failed rollback (e.g. the connection is gone) changes nothing for the caller.
            let _ = client.batch_execute("ROLLBACK").await;
            transaction.open = false;
            Err(error)
        }
    }
}

/// How one attempt of [`retry_postgres_transaction_on`] ended, when not with a value.
enum AttemptError<E> {
    /// The body's error, or a definite failure of `BEGIN` or `COMMIT` (a conflict, ...).
    Failed(E),
    /// `COMMIT` rolled back a transaction a statement of which had failed.
    RolledBack(E),
    /// The connection was lost with `COMMIT` in flight.
    OutcomeUnknown(E),
}

async fn run_once<T, E, F>(
    client: &mut Client,
    body: &mut F,
    committing: &std::sync::atomic::AtomicBool,
) -> Result<T, AttemptError<E>>
where
    F: AsyncFnMut(&mut Transaction<'_>) -> Result<T, E>,
    E: From<tokio_postgres::Error>,
{
    let mut transaction = client
        .transaction()
        .await
        .map_err(|e| AttemptError::Failed(e.into()))?;
    match body(&mut transaction).await {
        Ok(value) => {
            committing.store(true, std::sync::atomic::Ordering::SeqCst);
            let outcome = commit_checked(transaction.client()).await;
            // The transaction is over either way; skip the `ROLLBACK` its `Drop` would send.
            // (It holds only references: forgetting it leaks nothing.)
            std::mem::forget(transaction);
            match outcome {
                Ok(()) => Ok(value),
                Err(CommitFailure::Failed(e)) => Err(AttemptError::Failed(e.into())),
                Err(CommitFailure::RolledBack(e)) => Err(AttemptError::RolledBack(e.into())),
                Err(CommitFailure::OutcomeUnknown(e)) => {
                    Err(AttemptError::OutcomeUnknown(e.into()))
                }
            }
        }
        Err(error) => {
            // A failed rollback (e.g. the connection is gone) changes nothing for the caller.
            let _ = transaction.rollback().await;
            Err(AttemptError::Failed(error))
        }
    }
}

/// Why a checked `COMMIT` did not commit.
enum CommitFailure {
    /// The server refused it (a conflict, a constraint): nothing was written.
    Failed(tokio_postgres::Error),
    /// The transaction had failed before: `COMMIT` rolled it back.
    RolledBack(tokio_postgres::Error),
    /// The connection was lost with `COMMIT` in flight.
    OutcomeUnknown(tokio_postgres::Error),
}

/// Commits the open transaction on `client` and checks that it committed. PostgreSQL answers
/// `COMMIT` in a failed transaction with the tag `ROLLBACK` and no error, and tokio-postgres
/// does not show tags, so a `SELECT 1` is pipelined just before it: in a failed transaction it
/// fails (`25P02`). The two go out together, so this costs no extra round trip.
async fn commit_checked(client: &Client) -> Result<(), CommitFailure> {
    let (probe, commit) = tokio::join!(
        client.batch_execute("SELECT 1"),
        client.batch_execute("COMMIT")
    );
    match (probe, commit) {
        (_, Err(e)) if e.as_db_error().is_some_and(|db| !outcome_unknown(db)) => {
            Err(CommitFailure::Failed(e))
        }
        (_, Err(e)) => Err(CommitFailure::OutcomeUnknown(e)),
        (Err(e), Ok(())) if e.as_db_error().is_some() => Err(CommitFailure::RolledBack(e)),
        _ => Ok(()),
    }
}

/// Whether a server error answering `COMMIT` leaves its outcome unknown: the session or the
/// server is going away (severity `FATAL` or `PANIC`), the connection failed (class `08`),
/// the server is shutting down or restarting (class `57P`), or it failed internally (class
/// `XX`, DSQL's `XX000 server unavailable`). The commit may have been made durable before
/// the answer was lost. A conflict (`40001`), a constraint or any other `ERROR` is definite:
/// nothing was written.
pub(crate) fn outcome_unknown(db: &DbError) -> bool {
    let code = db.code().code();
    matches!(
        db.parsed_severity(),
        Some(tokio_postgres::error::Severity::Fatal | tokio_postgres::error::Severity::Panic)
    ) || matches!(db.severity(), "FATAL" | "PANIC")
        || code.starts_with("08")
        || code.starts_with("57P")
        || code.starts_with("XX")
}

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

    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_retries_that_would_end_past_it() {
        let policy = RetryPolicy::default()
            .with_max_attempts(100)
            .delays(Duration::from_millis(10), Duration::from_millis(10))
            .jitter(false)
            .with_deadline(Duration::from_millis(35));
        let mut attempts = Attempts::new(&policy);
        assert_eq!(
            attempts.after_conflict(OccConflict::Data),
            Some(Duration::from_millis(10))
        );
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(attempts.after_conflict(OccConflict::Data).is_some()); // 20 + 10 < 35
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(attempts.after_conflict(OccConflict::Data), None); // 30 + 10 >= 35
        assert_eq!(attempts.made(), 3);
        // Without a deadline only the attempt count stops it.
        let policy = RetryPolicy::default().with_max_attempts(2);
        let mut attempts = Attempts::new(&policy);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(attempts.after_conflict(OccConflict::Schema).is_some());
        assert_eq!(attempts.after_conflict(OccConflict::Schema), None);
    }

    #[test]
    fn the_longest_delays_and_deadlines_do_not_overflow() {
        let policy = RetryPolicy::default()
            .delays(Duration::MAX, Duration::MAX)
            .jitter(false)
            .with_deadline(Duration::MAX);
        assert_eq!(policy.delay_after(u32::MAX), Duration::MAX);
        let mut attempts = Attempts::new(&policy);
        // The delay would end past any deadline: exhausted, not a panic.
        assert_eq!(attempts.after_conflict(OccConflict::Data), None);
    }

    #[test]
    fn defaults_are_documented_values() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_attempts, 5);
        assert_eq!(policy.base_delay, Duration::from_millis(10));
        assert_eq!(policy.max_delay, Duration::from_secs(1));
        assert!(policy.jitter);
        assert_eq!(policy.deadline, None);
        assert_eq!(RetryPolicy::default().with_max_attempts(0).max_attempts, 1);
    }

    #[test]
    fn exhausted_error_names_attempts_and_conflict() {
        let error = RetryError::Exhausted {
            attempts: 3,
            conflict: OccConflict::Data,
            last: Box::<dyn std::error::Error + Send + Sync>::from(
                "change conflicts with another transaction",
            ),
        };
        let shown = error.to_string();
        assert!(
            shown.contains("3 attempts") && shown.contains("OC000"),
            "{shown}"
        );
        assert!(shown.contains("change conflicts"), "{shown}");
    }
}
