//! Diesel on DSQL (feature `diesel-async`): a pool of `diesel_async::AsyncPgConnection`s with
//! every guarantee of [`DsqlPool`], optimistic-concurrency retries for Diesel transactions, and
//! DSQL's answers read from Diesel's errors.
//!
//! diesel-async's `AsyncPgConnection` runs on tokio-postgres, so a connection this crate opens
//! (TLS, IAM token, DSQL's refusals handled) becomes one with no loss. The glue a service needs:
//!
//! ```no_run
//! use diesel::prelude::*;
//! use diesel_async::RunQueryDsl;
//! use tokio_postgres_dsql::{DsqlConfig, DsqlConnector, Error, RetryPolicy};
//!
//! diesel::table! {
//!     notes (id) {
//!         id -> Int8,
//!         likes -> Int8,
//!     }
//! }
//!
//! # async fn run() -> Result<(), Error> {
//! let connector = DsqlConnector::new(DsqlConfig::from_env()?).await?;
//! let pool = connector.diesel_pool().await?; // DsqlPool<AsyncPgConnection>
//!
//! // A checkout is a diesel connection: `&mut conn` goes wherever diesel-async wants one.
//! let mut conn = pool.get().await?;
//! let likes: i64 = notes::table.find(1).select(notes::likes).first(&mut conn).await?;
//! drop(conn);
//!
//! // A transaction re-run on a conflict (40001, OC000/OC001), on a fresh checkout each time.
//! pool.retry_transaction(&RetryPolicy::default(), async |conn| {
//!     diesel::update(notes::table.find(1))
//!         .set(notes::likes.eq(notes::likes + 1))
//!         .execute(conn)
//!         .await?;
//!     Ok::<_, Error>(())
//! })
//! .await?;
//! # let _ = likes; Ok(()) }
//! ```
//!
//! # What the pool keeps from [`DsqlPool`]
//!
//! Everything: recycle deadlines checked at checkout (with jitter) so no connection is handed
//! out past DSQL's one-hour cut, a ping only after an idle spell, a connection returned inside
//! a transaction rolled back (and Diesel's own transaction bookkeeping reset with it) instead
//! of dropped, changed settings reset (`RESET ALL`, then diesel-async's own `SET TIME ZONE
//! 'UTC'` and `SET CLIENT_ENCODING TO 'UTF8'` again, both of which DSQL accepts), the
//! multi-Region failback sweep, metrics and spans, and a checkout that returns the connect
//! error itself at once (a revoked role's [`Error::AccessDenied`] with DSQL's HINT) rather
//! than bb8's `Timed out in bb8` after 10 s.
//!
//! # Transactions
//!
//! [`DsqlPool::retry_transaction`](crate::DsqlPool#method.retry_transaction-1) takes what
//! diesel-async's own `conn.transaction(…)` takes, an `async |conn| { … }` closure, and:
//!
//! - re-runs the whole body on a conflict, at any statement or at `COMMIT`, with the policy's
//!   backoff, and on a connection lost before `COMMIT` (on a fresh checkout: the peer
//!   endpoint, with several);
//! - bounds each attempt by [`RetryPolicy::attempt_timeout`], when the policy sets one;
//! - gives the connection back to the pool during each backoff;
//! - never re-runs a `COMMIT` whose outcome is unknown ([`Error::CommitOutcomeUnknown`]);
//! - checks `COMMIT`: a body that swallowed a failed statement and returned `Ok` gets
//!   [`Error::TransactionRolledBack`], not `Ok` (PostgreSQL answers such a `COMMIT` with
//!   `ROLLBACK` and no error, and diesel-async reports success);
//! - turns a nested `conn.transaction(…)` into [`Error::NestedTransaction`], the whole
//!   transaction rolled back: Diesel sends a `SAVEPOINT`, which DSQL refuses (a connection
//!   whose instrumentation was replaced with `set_instrumentation` gets DSQL's `0A000`);
//! - returns [`Error::TransactionEndedByBody`], never `Ok`, for a body that sent `COMMIT` or
//!   `ROLLBACK` itself, and does not retry it.
//!
//! The closure is called once per attempt (it is cloned for each: capture references and
//! values that are `Clone`, and keep state that must survive attempts behind a reference, an
//! `&AtomicU32` say). Its error type `E` needs `From<diesel::result::Error>` (for `?` on
//! queries), `From<`[`Error`]`>` (for a checkout or `COMMIT` outcome) and [`AsOccConflict`]:
//! this crate's [`Error`] has all three, and so has `anyhow::Error` with the `anyhow` feature.
//!
//! # DSQL's errors
//!
//! [`DsqlDieselError`] reads the SQLSTATE, the HINT and a [`DsqlErrorKind`] (conflict,
//! unsupported by DSQL, a DSQL limit, the connection lost) from a `diesel::result::Error` or
//! from this crate's [`Error::Diesel`], so code matches `0A000` or `40001`, not message text.
//!
//! # One schema
//!
//! The migrations are the schema; [`print_schema`] writes Diesel's `table!` definitions from
//! the database they built (the emulator, after `migrate up`), as `diesel print-schema` would,
//! and [`check_schema`] fails naming the first table and column where a checked-in `schema.rs`
//! and the database disagree. See the Diesel section of the README.

mod schema;

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use ::diesel::connection::{Instrumentation, InstrumentationEvent};
use ::diesel::result::{DatabaseErrorKind, Error as DieselError};
use diesel_async::{
    AnsiTransactionManager, AsyncConnection, AsyncPgConnection, SimpleAsyncConnection,
    TransactionManager,
};
use tokio::time::Instant;
use tracing::Instrument;

pub use self::schema::{SchemaMismatch, check_schema, print_schema};
use crate::pool::{DsqlConnectionManager, DsqlPool, DsqlPooledConnection, PoolClient, private};
use crate::retry::{AsOccConflict, OccConflict, RetryPolicy};
use crate::session::{SessionWatch, TransactionStatus};
use crate::{DsqlConnector, Error};

/// A pool of Diesel connections ([`DsqlConnector::diesel_pool`]).
pub type DsqlDieselPool = DsqlPool<AsyncPgConnection>;
/// The bb8 manager of a [`DsqlDieselPool`], for [`DsqlConnector::diesel_pool_builder`].
pub type DsqlDieselManager = DsqlConnectionManager<AsyncPgConnection>;
/// A Diesel connection checked out of a [`DsqlDieselPool`]: `&mut conn` is a diesel-async
/// connection.
pub type DsqlDieselConnection<'a> = DsqlPooledConnection<'a, AsyncPgConnection>;

impl PoolClient for AsyncPgConnection {}

impl private::Client for AsyncPgConnection {
    async fn setup(
        client: tokio_postgres::Client,
        session: &Arc<SessionWatch>,
    ) -> Result<Self, Error> {
        let mut conn = AsyncPgConnection::try_from(client)
            .await
            .map_err(|error| match error {
                ::diesel::ConnectionError::CouldntSetupConfiguration(source) => {
                    Error::Diesel { source }
                }
                other => Error::Diesel {
                    source: DieselError::QueryBuilderError(other.into()),
                },
            })?;
        conn.set_instrumentation(Watch {
            session: session.clone(),
            inner: ::diesel::connection::get_default_instrumentation(),
        });
        // diesel-async's own settings are the session's baseline.
        session.settings_reset();
        Ok(conn)
    }

    fn closed(&self) -> bool {
        // The session watch knows (the connection's task has ended).
        false
    }

    async fn run(&mut self, sql: &'static str) -> bool {
        SimpleAsyncConnection::batch_execute(self, sql)
            .await
            .is_ok()
    }

    fn tracks_a_transaction(&mut self) -> bool {
        <AnsiTransactionManager as TransactionManager<AsyncPgConnection>>::
            is_broken_transaction_manager(self)
    }

    fn transaction_ended(&mut self) {
        *self.transaction_state() = AnsiTransactionManager::default();
    }

    /// `RESET ALL`, then what diesel-async sets at every connect.
    const RESET: &'static str = "RESET ALL; SET TIME ZONE 'UTC'; SET CLIENT_ENCODING TO 'UTF8'";
}

/// The instrumentation this crate installs on its Diesel connections: notes a nested
/// transaction (Diesel's `SAVEPOINT`) as it starts, and passes every event on to Diesel's
/// default instrumentation, if one is set. A connection whose instrumentation is replaced
/// (`set_instrumentation`) loses the clear [`Error::NestedTransaction`]: DSQL's own `0A000`
/// comes back instead.
struct Watch {
    session: Arc<SessionWatch>,
    inner: Option<Box<dyn Instrumentation>>,
}

impl Instrumentation for Watch {
    fn on_connection_event(&mut self, event: InstrumentationEvent<'_>) {
        if let InstrumentationEvent::BeginTransaction { depth, .. } = &event
            && depth.get() > 1
        {
            self.session.note_nested();
        }
        if let Some(inner) = &mut self.inner {
            inner.on_connection_event(event);
        }
    }
}

impl DsqlConnector {
    /// One Diesel connection, opened with the retries a pool's connects get
    /// ([`connect_with_retries`](Self::connect_with_retries)), with diesel-async's setup run.
    /// For a service, prefer [`diesel_pool`](Self::diesel_pool).
    pub async fn diesel_connect(&self) -> Result<AsyncPgConnection, Error> {
        crate::pool::open_set_up::<AsyncPgConnection>(self)
            .await
            .map(|(conn, ..)| conn)
    }

    /// A bb8 pool of Diesel connections with [`pool`](Self::pool)'s defaults and guarantees
    /// (see the [module docs](crate::diesel)). Opens one connection before returning, so a bad
    /// configuration fails here with the connect error itself.
    pub async fn diesel_pool(&self) -> Result<DsqlDieselPool, Error> {
        self.diesel_pool_with(|builder| builder).await
    }

    /// [`diesel_pool`](Self::diesel_pool) with the defaults changed by `tune`, e.g.
    /// `connector.diesel_pool_with(|b| b.max_size(32)).await?`.
    pub async fn diesel_pool_with(
        &self,
        tune: impl FnOnce(bb8::Builder<DsqlDieselManager>) -> bb8::Builder<DsqlDieselManager>,
    ) -> Result<DsqlDieselPool, Error> {
        let manager = DsqlDieselManager::with_connector(self.clone());
        let pool = tune(self.diesel_pool_builder())
            .build(manager.clone())
            .await?;
        Ok(DsqlPool::new(pool, &manager))
    }

    /// The builder behind [`diesel_pool`](Self::diesel_pool), with the same defaults as
    /// [`pool_builder`](Self::pool_builder), to tune before
    /// `build(DsqlDieselManager::with_connector(connector))` and [`DsqlPool::new`].
    pub fn diesel_pool_builder(&self) -> bb8::Builder<DsqlDieselManager> {
        self.pool_builder_for()
    }
}

/// The bounds of a [`retry_transaction`](DsqlPool#method.retry_transaction-1) body: an async
/// closure whose future is `Send` (what diesel-async's own `AsyncFunc` asserts for
/// `conn.transaction`). Implemented for every such closure; nothing to implement.
pub trait DieselBody<T, R>:
    AsyncFnOnce(T) -> R + FnOnce(T) -> <Self as DieselBody<T, R>>::Fut
{
    /// The closure's future.
    type Fut: Future<Output = R>;
}

impl<F, T, Fut, R> DieselBody<T, R> for F
where
    F: AsyncFnOnce(T) -> R + FnOnce(T) -> Fut,
    Fut: Future<Output = R>,
{
    type Fut = Fut;
}

impl DsqlPool<AsyncPgConnection> {
    /// Runs `body` in a transaction on a Diesel connection from the pool and commits it,
    /// re-running the whole transaction on an optimistic-concurrency conflict and on a
    /// connection lost before `COMMIT` was sent, on a fresh checkout each time, as
    /// [`DsqlPool::retry_transaction`](DsqlPool#method.retry_transaction) does for
    /// tokio-postgres bodies. See the [module docs](crate::diesel#transactions) for what it
    /// does and never does.
    ///
    /// ```no_run
    /// # use tokio_postgres_dsql::{Error, RetryPolicy, diesel::DsqlDieselPool};
    /// # use diesel_async::RunQueryDsl;
    /// # async fn f(pool: &DsqlDieselPool, id: i64) -> Result<usize, Error> {
    /// pool.retry_transaction(&RetryPolicy::default(), async |conn| {
    ///     let n = diesel::sql_query("UPDATE note SET likes = likes + 1 WHERE id = $1")
    ///         .bind::<diesel::sql_types::Int8, _>(id)
    ///         .execute(conn)
    ///         .await?;
    ///     Ok(n)
    /// })
    /// .await
    /// # }
    /// ```
    pub async fn retry_transaction<'a, R, E, F>(
        &self,
        policy: &RetryPolicy,
        body: F,
    ) -> Result<R, E>
    where
        F: for<'r> AsyncFnOnce(&'r mut AsyncPgConnection) -> Result<R, E>
            + for<'r> DieselBody<&'r mut AsyncPgConnection, Result<R, E>, Fut: Send>
            + Clone
            + Send
            + 'a,
        E: From<DieselError> + From<Error> + AsOccConflict + Send,
        R: Send,
    {
        let mut attempts = crate::retry::policy::Attempts::new(policy);
        loop {
            let mut conn = self.get_owned().await?;
            let attempt_started = Instant::now();
            let target = conn.target().clone();
            let session = conn.session().clone();
            let committing = AtomicBool::new(false);
            let attempt =
                attempt(&mut conn, &session, body.clone(), &committing).instrument(attempts.span());
            let outcome = match policy.attempt_timeout {
                Some(timeout) => tokio::time::timeout(timeout, attempt)
                    .await
                    .map_err(|_| timeout),
                None => Ok(attempt.await),
            };
            let committing = committing.load(Ordering::SeqCst);
            let why = match outcome {
                Ok(Ok(value)) => {
                    self.connector().report_ok(&target);
                    return Ok(value);
                }
                Err(timeout) => {
                    // A stalled connection is dropped, never given back.
                    conn.discard();
                    drop(conn);
                    if committing {
                        crate::telemetry::transaction_outcome_unknown();
                        return Err(Error::CommitOutcomeUnknown { source: None }.into());
                    }
                    self.connector()
                        .report_lost(&target, "attempt_timeout", attempt_started);
                    match attempts.after_lost_connection(&target.endpoint, "attempt_timeout") {
                        Some(delay) => delay,
                        None => return Err(Error::AttemptTimeout { timeout }.into()),
                    }
                }
                Ok(Err(error)) => {
                    let lost = conn.is_closed() && !committing;
                    // The body's error (or the nested transaction's) leaves the transaction
                    // open: rolled back here, outside the attempt's timeout, so that a stalled
                    // ROLLBACK can never turn the body's final error into a retry.
                    if !lost {
                        end_transaction(&mut conn, &session).await;
                    }
                    drop(conn);
                    if let Some(conflict) = error.occ_conflict() {
                        match attempts.after_conflict(conflict) {
                            Some(delay) => delay,
                            None => return Err(error),
                        }
                    } else if lost {
                        self.connector()
                            .report_lost(&target, "connection_lost", attempt_started);
                        match attempts.after_lost_connection(&target.endpoint, "connection_lost") {
                            Some(delay) => delay,
                            None => return Err(error),
                        }
                    } else {
                        return Err(error);
                    }
                }
            };
            tokio::time::sleep(why).await;
        }
    }
}

/// One attempt: `BEGIN` through Diesel's transaction manager (so a nested `transaction()`
/// is a savepoint, which is noticed), the body, then a checked `COMMIT` or a `ROLLBACK`.
/// `committing` is set just before `COMMIT` goes out.
async fn attempt<R, E, F>(
    conn: &mut AsyncPgConnection,
    session: &SessionWatch,
    body: F,
    committing: &AtomicBool,
) -> Result<R, E>
where
    F: for<'r> AsyncFnOnce(&'r mut AsyncPgConnection) -> Result<R, E>
        + for<'r> DieselBody<&'r mut AsyncPgConnection, Result<R, E>, Fut: Send>,
    E: From<DieselError> + From<Error>,
{
    session.take_nested();
    <AnsiTransactionManager as TransactionManager<AsyncPgConnection>>::begin_transaction(conn)
        .await?;
    let result = body(conn).await;
    // On an error the transaction is left open for the caller to roll back.
    if session.take_nested() {
        return Err(Error::NestedTransaction.into());
    }
    let value = result?;
    if session.status() == TransactionStatus::Idle {
        // The body sent COMMIT or ROLLBACK itself: nothing is left to commit, and what it
        // wrote may or may not have landed.
        <AsyncPgConnection as private::Client>::transaction_ended(conn);
        return Err(Error::TransactionEndedByBody.into());
    }
    committing.store(true, Ordering::SeqCst);
    let outcome = commit_checked(conn, session).await;
    <AsyncPgConnection as private::Client>::transaction_ended(conn);
    match outcome {
        Ok(()) => Ok(value),
        Err(Commit::Failed(error)) => Err(error.into()),
        Err(Commit::RolledBack) => Err(Error::TransactionRolledBack { source: None }.into()),
        Err(Commit::OutcomeUnknown(error)) => {
            crate::telemetry::transaction_outcome_unknown();
            tracing::warn!(error = %detail(&error), "a Diesel COMMIT's outcome is unknown");
            Err(Error::CommitOutcomeUnknown { source: None }.into())
        }
    }
}

/// How long the `ROLLBACK` after a failed attempt may take before its connection is discarded
/// instead of given back.
const ROLLBACK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Rolls back what a failed attempt left open (a failure, e.g. the connection gone, changes
/// nothing for the caller; one that stalls discards the connection) and resets Diesel's
/// bookkeeping.
async fn end_transaction(
    conn: &mut DsqlPooledConnection<'static, AsyncPgConnection>,
    session: &SessionWatch,
) {
    if session.status() != TransactionStatus::Idle {
        let rollback = SimpleAsyncConnection::batch_execute(&mut **conn, "ROLLBACK");
        if tokio::time::timeout(ROLLBACK_TIMEOUT, rollback)
            .await
            .is_err()
        {
            conn.discard();
        }
    }
    <AsyncPgConnection as private::Client>::transaction_ended(conn);
}

/// Why a checked Diesel `COMMIT` did not commit.
enum Commit {
    /// The server refused it (a conflict, a constraint): nothing was written.
    Failed(DieselError),
    /// The transaction had failed before: `COMMIT` rolled it back.
    RolledBack,
    /// The connection was lost with `COMMIT` in flight, or the server ended the session.
    OutcomeUnknown(DieselError),
}

/// `COMMIT`, with a `SELECT 1` pipelined just before it: in a failed transaction the probe
/// fails (`25P02`) and PostgreSQL answers `COMMIT` with a rollback and no error. No extra
/// round trip.
async fn commit_checked(conn: &AsyncPgConnection, session: &SessionWatch) -> Result<(), Commit> {
    let mut probe_on = conn;
    let mut commit_on = conn;
    // Biased: the probe must be sent first.
    let (probe, commit) = tokio::join!(
        biased;
        SimpleAsyncConnection::batch_execute(&mut probe_on, "SELECT 1"),
        SimpleAsyncConnection::batch_execute(&mut commit_on, "COMMIT")
    );
    match (probe, commit) {
        (_, Err(error)) => {
            let definite = sqlstate_of(&error)
                .is_some_and(|code| !outcome_unknown_code(&code) && !session.fatal_seen());
            if definite {
                Err(Commit::Failed(error))
            } else {
                Err(Commit::OutcomeUnknown(error))
            }
        }
        (Err(error), Ok(())) if sqlstate_of(&error).is_some() => Err(Commit::RolledBack),
        _ => Ok(()),
    }
}

/// Whether a SQLSTATE answering `COMMIT` leaves its outcome unknown (as
/// [`crate::retry`]'s helpers judge it: classes `08`, `57P`, `XX`).
fn outcome_unknown_code(code: &str) -> bool {
    code.starts_with("08") || code.starts_with("57P") || code.starts_with("XX")
}

fn sqlstate_of(error: &DieselError) -> Option<String> {
    match error {
        DieselError::DatabaseError(_, info) => info.sqlstate().map(|s| s.as_str().to_owned()),
        _ => None,
    }
}

/// The SQLSTATE and message of a Diesel error, for `Display`.
pub(crate) fn detail(error: &DieselError) -> String {
    match error {
        DieselError::DatabaseError(_, info) => match info.sqlstate() {
            Some(code) => format!(": {} {}", code.as_str(), info.message()),
            None => format!(": {}", info.message()),
        },
        other => format!(": {other}"),
    }
}

/// What kind of answer a DSQL error is ([`DsqlDieselError::dsql_kind`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DsqlErrorKind {
    /// An optimistic-concurrency conflict (`40001`, DSQL's `OC000` / `OC001`): run the whole
    /// transaction again ([`retry_transaction`](DsqlPool#method.retry_transaction-1) does).
    Conflict(OccConflict),
    /// `0A000`: DSQL does not support this statement or feature (a `SAVEPOINT`, a synchronous
    /// `CREATE INDEX`, `TRUNCATE`, …). Change the SQL; retrying cannot help. (`SERIAL` is
    /// refused differently: `42704 type "serial" does not exist`, an [`Other`](Self::Other).)
    Unsupported,
    /// `54000` (or another class `54` code): one of DSQL's limits (rows or bytes in one
    /// transaction, objects in a cluster). Split the work.
    LimitExceeded,
    /// The connection failed or the server ended the session, or failed internally (classes
    /// `08`, `57P` and `XX`, or a connection error with no SQLSTATE at all).
    ConnectionLost,
    /// Any other error the server answered (a constraint, a syntax error, …).
    Other,
}

/// DSQL's answer read from a Diesel error: implemented for `diesel::result::Error` and for
/// this crate's [`Error`] (whose [`Error::Diesel`] carries one).
///
/// ```
/// use tokio_postgres_dsql::diesel::{DsqlDieselError, DsqlErrorKind};
///
/// fn explain(error: &diesel::result::Error) -> &'static str {
///     match error.dsql_kind() {
///         Some(DsqlErrorKind::Unsupported) => "DSQL does not support this",
///         Some(DsqlErrorKind::Conflict(_)) => "retry the transaction",
///         _ if error.sqlstate().as_deref() == Some("23505") => "already exists",
///         _ => "failed",
///     }
/// }
/// assert_eq!(explain(&diesel::result::Error::NotFound), "failed");
/// ```
pub trait DsqlDieselError {
    /// The SQLSTATE the server answered (`"0A000"`, `"40001"`, …), if it answered.
    fn sqlstate(&self) -> Option<String>;

    /// The server's HINT, if any.
    fn hint(&self) -> Option<&str>;

    /// The server's message, if it answered.
    fn server_message(&self) -> Option<&str>;

    /// What kind of answer it is; `None` when the error is not the server's (a row not found,
    /// a deserialisation error) and the connection did not fail.
    fn dsql_kind(&self) -> Option<DsqlErrorKind>;
}

impl DsqlDieselError for DieselError {
    fn sqlstate(&self) -> Option<String> {
        sqlstate_of(self)
    }

    fn hint(&self) -> Option<&str> {
        match self {
            DieselError::DatabaseError(_, info) => info.hint(),
            _ => None,
        }
    }

    fn server_message(&self) -> Option<&str> {
        match self {
            DieselError::DatabaseError(_, info) if info.sqlstate().is_some() => {
                Some(info.message())
            }
            _ => None,
        }
    }

    fn dsql_kind(&self) -> Option<DsqlErrorKind> {
        let DieselError::DatabaseError(kind, info) = self else {
            return None;
        };
        let Some(code) = info.sqlstate() else {
            return match kind {
                DatabaseErrorKind::UnableToSendCommand | DatabaseErrorKind::ClosedConnection => {
                    Some(DsqlErrorKind::ConnectionLost)
                }
                _ => None,
            };
        };
        Some(kind_of(code.as_str(), info.message()))
    }
}

/// The kind of a server's answer, from its SQLSTATE and message.
fn kind_of(code: &str, message: &str) -> DsqlErrorKind {
    if let Some(conflict) = crate::retry::error::conflict_in(code, message) {
        DsqlErrorKind::Conflict(conflict)
    } else if code == "0A000" {
        DsqlErrorKind::Unsupported
    } else if code.starts_with("54") {
        DsqlErrorKind::LimitExceeded
    } else if outcome_unknown_code(code) {
        DsqlErrorKind::ConnectionLost
    } else {
        DsqlErrorKind::Other
    }
}

impl DsqlDieselError for Error {
    /// The Diesel error's SQLSTATE ([`Error::Diesel`]), or the server's ([`Error::code`]).
    fn sqlstate(&self) -> Option<String> {
        match self {
            Error::Diesel { source } => source.sqlstate(),
            other => other.code().map(|code| code.code().to_owned()),
        }
    }

    fn hint(&self) -> Option<&str> {
        match self {
            Error::Diesel { source } => DsqlDieselError::hint(source),
            other => other
                .db_error()
                .and_then(|db| db.hint())
                .or_else(|| other.hint()),
        }
    }

    fn server_message(&self) -> Option<&str> {
        match self {
            Error::Diesel { source } => source.server_message(),
            other => other.db_error().map(|db| db.message()),
        }
    }

    fn dsql_kind(&self) -> Option<DsqlErrorKind> {
        match self {
            Error::Diesel { source } => source.dsql_kind(),
            Error::NestedTransaction => Some(DsqlErrorKind::Unsupported),
            other => {
                if let Some(conflict) = other.occ_conflict() {
                    Some(DsqlErrorKind::Conflict(conflict))
                } else if let Some(db) = other.db_error() {
                    Some(kind_of(db.code().code(), db.message()))
                } else if let Error::Query { source, .. } = other {
                    // No answer from the server: the connection failed under the query.
                    let io = std::error::Error::source(source)
                        .is_some_and(|cause| cause.is::<std::io::Error>());
                    (source.is_closed() || io).then_some(DsqlErrorKind::ConnectionLost)
                } else {
                    None
                }
            }
        }
    }
}

impl AsOccConflict for DieselError {
    /// A conflict reported by the server (`40001` with `OC000` / `OC001`, or those codes).
    fn occ_conflict(&self) -> Option<OccConflict> {
        match self.dsql_kind() {
            Some(DsqlErrorKind::Conflict(conflict)) => Some(conflict),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Info {
        code: &'static str,
        message: &'static str,
        hint: Option<&'static str>,
    }

    impl ::diesel::result::DatabaseErrorInformation for Info {
        fn message(&self) -> &str {
            self.message
        }
        fn details(&self) -> Option<&str> {
            None
        }
        fn hint(&self) -> Option<&str> {
            self.hint
        }
        fn table_name(&self) -> Option<&str> {
            None
        }
        fn column_name(&self) -> Option<&str> {
            None
        }
        fn constraint_name(&self) -> Option<&str> {
            None
        }
        fn statement_position(&self) -> Option<i32> {
            None
        }
        fn sqlstate(&self) -> Option<::diesel::result::SqlState> {
            self.code.parse().ok()
        }
    }

    fn db(code: &'static str, message: &'static str) -> DieselError {
        DieselError::DatabaseError(
            DatabaseErrorKind::Unknown,
            Box::new(Info {
                code,
                message,
                hint: Some("a hint"),
            }),
        )
    }

    #[test]
    fn dsql_answers_are_classified_from_diesel_errors() {
        let cases = [
            (
                db("40001", "change conflicts with another transaction (OC000)"),
                Some(DsqlErrorKind::Conflict(OccConflict::Data)),
            ),
            (
                db(
                    "40001",
                    "schema has been updated by another transaction (OC001)",
                ),
                Some(DsqlErrorKind::Conflict(OccConflict::Schema)),
            ),
            (
                db("0A000", "unsupported transaction statement: SAVEPOINT"),
                Some(DsqlErrorKind::Unsupported),
            ),
            (
                db("54000", "transaction row limit exceeded"),
                Some(DsqlErrorKind::LimitExceeded),
            ),
            (
                db("57P01", "terminating connection"),
                Some(DsqlErrorKind::ConnectionLost),
            ),
            (
                db("XX000", "internal error"),
                Some(DsqlErrorKind::ConnectionLost),
            ),
            (db("23505", "duplicate key"), Some(DsqlErrorKind::Other)),
            (DieselError::NotFound, None),
        ];
        for (error, kind) in cases {
            assert_eq!(error.dsql_kind(), kind, "{error:?}");
            let wrapped = Error::from(error);
            assert_eq!(wrapped.dsql_kind(), kind, "{wrapped:?}");
            assert_eq!(
                wrapped.occ_conflict(),
                match kind {
                    Some(DsqlErrorKind::Conflict(c)) => Some(c),
                    _ => None,
                }
            );
        }
        let error = db("0A000", "unsupported transaction statement: SAVEPOINT");
        assert_eq!(error.sqlstate().as_deref(), Some("0A000"));
        assert_eq!(DsqlDieselError::hint(&error), Some("a hint"));
        let wrapped = Error::from(error);
        assert_eq!(
            wrapped.to_string(),
            "diesel query failed: 0A000 unsupported transaction statement: SAVEPOINT"
        );
        let lost = DieselError::DatabaseError(
            DatabaseErrorKind::UnableToSendCommand,
            Box::new(String::from("connection closed")),
        );
        assert_eq!(lost.dsql_kind(), Some(DsqlErrorKind::ConnectionLost));
        assert!(lost.sqlstate().is_none());
    }

    #[test]
    fn outcome_unknown_classes() {
        for code in ["08006", "57P01", "XX000"] {
            assert!(outcome_unknown_code(code), "{code}");
        }
        for code in ["40001", "23505", "0A000", "25P02"] {
            assert!(!outcome_unknown_code(code), "{code}");
        }
    }
}
