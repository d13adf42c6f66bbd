//! What the retry helpers report: which optimistic-concurrency conflict an error is
//! ([`OccConflict`], [`AsOccConflict`]), and why a helper gave up ([`RetryError`]).

use std::fmt;

use tokio_postgres::error::DbError;
// Items the docs link to.
#[cfg(doc)]
use super::{RetryPolicy, retry_postgres_transaction_on, retry_statement_on, retry_transaction_on};

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
    conflict_in(db.code().code(), db.message())
}

/// The conflict a server error with this SQLSTATE and message reports, if it is one.
pub(crate) fn conflict_in(code: &str, message: &str) -> Option<OccConflict> {
    match code {
        "OC000" => Some(OccConflict::Data),
        "OC001" => Some(OccConflict::Schema),
        "40001" if message.contains("OC000") => Some(OccConflict::Data),
        "40001" if message.contains("OC001") => Some(OccConflict::Schema),
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
    /// A conflict reported by a query ([`Error::Query`](crate::Error::Query), or a Diesel
    /// query's `Error::Diesel`).
    fn occ_conflict(&self) -> Option<OccConflict> {
        match self {
            crate::Error::Query { source, .. } => occ_conflict(source),
            #[cfg(feature = "diesel-async")]
            crate::Error::Diesel { source } => source.occ_conflict(),
            _ => None,
        }
    }

    fn database_error(&self) -> Option<&DbError> {
        db_error_in(self)
    }
}

#[cfg(feature = "anyhow")]
impl AsOccConflict for anyhow::Error {
    /// Looks for the database's error in the chain (feature `anyhow`), a Diesel error's too
    /// (feature `diesel-async`).
    fn occ_conflict(&self) -> Option<OccConflict> {
        #[cfg(feature = "diesel-async")]
        if let Some(conflict) = self
            .chain()
            .find_map(|cause| cause.downcast_ref::<::diesel::result::Error>())
            .and_then(AsOccConflict::occ_conflict)
        {
            return Some(conflict);
        }
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

#[cfg(test)]
mod tests {
    use super::*;

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
