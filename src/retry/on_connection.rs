//! The helpers that run on a connection the caller holds: [`retry_transaction_on`],
//! [`retry_postgres_transaction_on`] and [`retry_statement_on`], and what they share with
//! the pooled helper (one attempt's end, the checked `COMMIT`).

use std::future::Future;
use std::ops::Deref;

use tokio_postgres::error::DbError;
use tokio_postgres::{Client, Transaction};
use tracing::Instrument;

use super::policy::Attempts;
use super::{AsOccConflict, RetryError, RetryPolicy, occ_conflict};

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
pub(super) struct OpenTransaction<'c> {
    pub(super) client: &'c Client,
    pub(super) open: bool,
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
/// references (see the [module docs](crate::retry) for what compiles and why). The error type `E` is
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
pub(super) async fn attempt_once<'c, T, E, F, Fut>(
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
pub(super) async fn bounded<R>(
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
pub(super) async fn end_attempt<T, E>(
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
                    Err(crate::Error::TransactionRolledBack {
                        source: Some(source),
                    }
                    .into())
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
pub(super) enum AttemptError<E> {
    /// The body's error, or a definite failure of `BEGIN` or `COMMIT` (a conflict, ...).
    Failed(E),
    /// `COMMIT` rolled back a transaction a statement of which had failed.
    RolledBack(E),
    /// The connection was lost with `COMMIT` in flight.
    OutcomeUnknown(E),
}

pub(super) async fn run_once<T, E, F>(
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
pub(super) enum CommitFailure {
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
pub(super) async fn commit_checked(client: &Client) -> Result<(), CommitFailure> {
    // Biased: the probe must be sent first.
    let (probe, commit) = tokio::join!(
        biased;
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
