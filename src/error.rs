//! The crate's one error type.
//!
//! Every variant says what failed and which input caused it (a configuration field, an endpoint,
//! a host name). The underlying cause, when there is one, is in [`std::error::Error::source`] and
//! is not repeated in `Display`. No variant ever carries an auth token, a secret access key or a
//! session token.

use std::borrow::Cow;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

/// Errors returned by this crate, in five families (in this order below):
///
/// - **setting up**: [`Config`](Error::Config) (the field at fault),
///   [`Credentials`](Error::Credentials), [`TlsConfig`](Error::TlsConfig);
/// - **connecting, and DSQL's refusals**: [`Tls`](Error::Tls),
///   [`AccessDenied`](Error::AccessDenied), [`Unavailable`](Error::Unavailable),
///   [`ConnectTimeout`](Error::ConnectTimeout), [`UnknownRole`](Error::UnknownRole),
///   [`Connect`](Error::Connect);
/// - **statements and transaction outcomes**: [`Query`](Error::Query),
///   [`TransactionRolledBack`](Error::TransactionRolledBack),
///   [`CommitOutcomeUnknown`](Error::CommitOutcomeUnknown),
///   [`AttemptTimeout`](Error::AttemptTimeout);
/// - **the pool**: [`Unusable`](Error::Unusable), [`PoolTimeout`](Error::PoolTimeout);
/// - **the emulator** (feature `emulator`): `Emulator`.
///
/// [`is_transient`](Error::is_transient) says which are worth trying again, and
/// [`code`](Error::code) / [`db_error`](Error::db_error) give the server's SQLSTATE and error
/// when it answered with one.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    // ---- Setting up -------------------------------------------------------------------------
    /// A configuration value is missing, malformed or inconsistent.
    ///
    /// `field` names the builder method, URL parameter or environment variable at fault.
    #[error("invalid configuration: {field}: {reason}")]
    #[non_exhaustive]
    Config {
        /// The field, parameter or variable at fault (e.g. `region`, `port`, `CLUSTER_ENDPOINT`).
        field: Cow<'static, str>,
        /// What is wrong with it and, where it helps, how to fix it.
        reason: String,
    },

    /// AWS credentials could not be loaded, or they cannot sign a token.
    #[error("AWS credentials: {reason}")]
    #[non_exhaustive]
    Credentials {
        /// What went wrong, and where credentials are looked for.
        reason: String,
        /// The credentials provider's own error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// TLS could not be set up for the endpoint (bad CA file, no crypto provider, ...).
    #[error("TLS setup for {host}: {reason}")]
    #[non_exhaustive]
    TlsConfig {
        /// The DSQL host name the TLS configuration is for.
        host: String,
        /// What is wrong.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    // ---- Connecting, and DSQL's refusals -------------------------------------------------
    /// The TLS handshake with the endpoint failed (certificate not trusted, wrong name, refused).
    #[error("TLS handshake with {host} failed")]
    #[non_exhaustive]
    Tls {
        /// The host name the certificate was checked against (the SNI name).
        host: String,
        /// The handshake error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// DSQL refused the IAM auth token: `FATAL 08006 unable to accept connection, access
    /// denied`, with the reason in the server's HINT (kept in [`hint`](Error::hint) and shown in
    /// `Display`). The connector forgets its cached token on every such refusal, so the next
    /// connect asks the credentials provider again; a `Signature expired` refusal has already
    /// been retried once with a fresh token when it reaches you.
    #[error("access denied by {endpoint}: {}", denied_detail(*reason, hint))]
    #[non_exhaustive]
    AccessDenied {
        /// The endpoint that refused the token (and the dialled address, if different).
        endpoint: String,
        /// What the HINT says went wrong.
        reason: AccessDeniedReason,
        /// The server's HINT, e.g. `Wrong user to action mapping. user: admin, action:
        /// DbConnect` (empty if the server sent none).
        hint: String,
        /// The server's error, shared: one refusal is handed to every checkout waiting for
        /// it (see [`db_error`](Error::db_error) for the server's fields).
        #[source]
        source: Arc<tokio_postgres::Error>,
    },

    /// DSQL could not take the connection now (rate exceeded, too many open connections, or a
    /// cluster waking up) and kept refusing until the connect deadline
    /// ([`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline)). These refusals are
    /// retried with backoff and full jitter, never with a new token.
    #[error(
        "{endpoint} could not accept a connection: {reason}; gave up after {attempts} \
         attempt(s) within the connect deadline"
    )]
    #[non_exhaustive]
    Unavailable {
        /// The endpoint (and dialled address, if different).
        endpoint: String,
        /// Which refusal the last attempt got.
        reason: UnavailableReason,
        /// Attempts made, the first included.
        attempts: u32,
        /// The server's error for the last attempt.
        #[source]
        source: tokio_postgres::Error,
    },

    /// Connecting took too long: one attempt (TCP, TLS, startup and authentication) ran past
    /// [`connect_timeout`](crate::DsqlConfigBuilder::connect_timeout), or the whole connect
    /// (retries and waits for the client-side rate limit included) ran past
    /// [`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline).
    #[error("connecting to {endpoint} timed out after {timeout:?} ({during})")]
    #[non_exhaustive]
    ConnectTimeout {
        /// The endpoint (and dialled address, if different).
        endpoint: String,
        /// The bound that ran out.
        timeout: Duration,
        /// What was going on, and which setting bounds it.
        during: &'static str,
    },

    /// The token was accepted, but the database role does not exist (`28000 role "…" does not
    /// exist`): create it as `admin` (`CREATE ROLE … WITH LOGIN`, then `AWS IAM GRANT`), or fix
    /// the configured `user`. Permanent.
    #[error("could not connect to {endpoint}: the role `{role}` does not exist")]
    #[non_exhaustive]
    UnknownRole {
        /// The endpoint (and dialled address, if different).
        endpoint: String,
        /// The role that was asked for.
        role: String,
        /// The server's error, shared like [`Error::AccessDenied`]'s.
        #[source]
        source: Arc<tokio_postgres::Error>,
    },

    /// The connection could not be opened, or the server refused the session for another
    /// reason (I/O error, closed socket, unknown role, unsupported startup parameter, ...).
    #[error("could not connect to {endpoint}{}", server_detail(source))]
    #[non_exhaustive]
    Connect {
        /// The endpoint (and dialled address, if different).
        endpoint: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    // ---- Statements and transaction outcomes ---------------------------------------------
    /// A query failed: the database's error (or a lost connection) while running SQL, for
    /// example inside a [`retry_transaction_on`](crate::retry_transaction_on) body. `Display` shows
    /// the server's severity, code and message; the `tokio_postgres::Error` is the source.
    #[error("query failed{}", server_detail(source))]
    #[non_exhaustive]
    Query {
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// `COMMIT` rolled the transaction back instead of committing it: a statement inside it
    /// failed and the body went on without returning that error (PostgreSQL then answers
    /// `COMMIT` with `ROLLBACK` and no error). Nothing was written. Not retried.
    #[error(
        "the transaction was rolled back at COMMIT: a statement in it failed and the body did \
         not return that error{}",
        source.as_ref().map(server_detail).unwrap_or_default()
    )]
    #[non_exhaustive]
    TransactionRolledBack {
        /// The error the server gave a statement sent after the failure; `None` when the
        /// failure was read from the session's state (the Diesel helper).
        #[source]
        source: Option<tokio_postgres::Error>,
    },

    /// The connection was lost while `COMMIT` was in flight, or (with
    /// [`RetryPolicy::attempt_timeout`](crate::RetryPolicy::attempt_timeout)) `COMMIT` got no
    /// answer in time: the transaction may or may not have been committed. Never retried by
    /// this crate; re-run such work only if it is idempotent (see the
    /// [idempotency-key](crate::guide::pooling) pattern).
    #[error(
        "the connection was lost during COMMIT, or COMMIT got no answer in time: the \
         transaction may or may not have been committed"
    )]
    #[non_exhaustive]
    CommitOutcomeUnknown {
        /// The driver's error; `None` when the attempt timed out with `COMMIT` in flight.
        #[source]
        source: Option<tokio_postgres::Error>,
    },

    /// A transaction attempt ran past
    /// [`RetryPolicy::attempt_timeout`](crate::RetryPolicy::attempt_timeout) before its
    /// `COMMIT` was sent, and no attempt was left to retry it: nothing was committed (the
    /// connection was dropped, which rolls the transaction back).
    #[error("a transaction attempt ran past its attempt_timeout ({timeout:?}) before COMMIT")]
    #[non_exhaustive]
    AttemptTimeout {
        /// The bound that was passed.
        timeout: std::time::Duration,
    },

    /// A Diesel query failed (feature `diesel-async`): a statement in a
    /// [`retry_transaction`](crate::DsqlPool::retry_transaction) body of a Diesel pool, its
    /// `BEGIN` or `COMMIT`, or diesel-async's setup of a new connection. `Display` shows the
    /// SQLSTATE and the server's message; [`crate::diesel::DsqlDieselError`] reads the
    /// SQLSTATE, HINT and conflict from it.
    #[cfg(feature = "diesel-async")]
    #[error("diesel query failed{}", crate::diesel::detail(source))]
    #[non_exhaustive]
    Diesel {
        /// Diesel's error.
        #[source]
        source: ::diesel::result::Error,
    },

    /// A transaction was opened inside a transaction (feature `diesel-async`: a
    /// `conn.transaction(…)` inside a Diesel pool's
    /// [`retry_transaction`](crate::DsqlPool::retry_transaction) body). Diesel sends a
    /// `SAVEPOINT` for it, which DSQL refuses (`0A000 unsupported transaction statement:
    /// SAVEPOINT`). The whole transaction was rolled back; nothing was written. Not retried.
    #[cfg(feature = "diesel-async")]
    #[error(
        "a nested transaction was opened inside a DSQL transaction: it needs a SAVEPOINT, which \
         DSQL does not support (0A000); run its statements in the outer transaction's body. \
         Nothing was written"
    )]
    NestedTransaction,

    /// A Diesel pool's [`retry_transaction`](crate::DsqlPool::retry_transaction) body ended
    /// the transaction itself (a `COMMIT` or `ROLLBACK` sent through `sql_query` or
    /// `batch_execute`, or the transaction manager called directly). What it wrote may or may
    /// not have landed, and statements after that ran outside the transaction: the helper
    /// neither commits nor retries. Let the helper end the transaction.
    #[cfg(feature = "diesel-async")]
    #[error(
        "the transaction body ended the transaction itself (a COMMIT or ROLLBACK inside it): \
         whether its writes landed is not known; not retried"
    )]
    TransactionEndedByBody,

    // ---- The pool ---------------------------------------------------------------------------
    /// A pooled connection cannot be handed out (closed, or past its recycle deadline). The
    /// pool discards it and tries another; users see this only through `bb8`'s error sink.
    #[error("pooled connection unusable: {reason}")]
    #[non_exhaustive]
    Unusable {
        /// Why.
        reason: &'static str,
    },

    /// No pooled connection became available within the pool's `connection_timeout`.
    #[error(
        "timed out waiting for a DSQL connection from the pool (connection_timeout elapsed; \
         new connections failed or every connection was busy, see the logs)"
    )]
    PoolTimeout,

    // ---- The emulator -----------------------------------------------------------------------
    /// The local emulator could not start or do what it was asked (feature `emulator`).
    #[cfg(feature = "emulator")]
    #[error(transparent)]
    Emulator(#[from] crate::emulator::EmulatorError),
}

impl Error {
    pub(crate) fn config(field: impl Into<Cow<'static, str>>, reason: impl Into<String>) -> Self {
        Error::Config {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// The configuration field at fault, for [`Error::Config`].
    pub fn field(&self) -> Option<&str> {
        match self {
            Error::Config { field, .. } => Some(field),
            _ => None,
        }
    }

    /// The server's SQLSTATE code, when the server answered with an error. (For an
    /// `Error::Diesel`, feature `diesel-async`, read it with `DsqlDieselError::sqlstate`.)
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Error::AccessDenied { source, .. } | Error::UnknownRole { source, .. } => source.code(),
            Error::Unavailable { source, .. }
            | Error::Connect { source, .. }
            | Error::Query { source, .. }
            | Error::Tls { source, .. } => source.code(),
            Error::TransactionRolledBack {
                source: Some(source),
            } => source.code(),
            _ => None,
        }
    }
}

impl Error {
    /// The server's error (severity, SQLSTATE, message, hint, ...), when the server answered
    /// with one through tokio-postgres (an `Error::Diesel`'s, feature `diesel-async`, is read
    /// with `diesel::DsqlDieselError`).
    pub fn db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            Error::AccessDenied { source, .. } | Error::UnknownRole { source, .. } => {
                source.as_db_error()
            }
            Error::Unavailable { source, .. }
            | Error::Connect { source, .. }
            | Error::Query { source, .. }
            | Error::Tls { source, .. } => source.as_db_error(),
            Error::TransactionRolledBack {
                source: Some(source),
            } => source.as_db_error(),
            Error::CommitOutcomeUnknown {
                source: Some(source),
            } => source.as_db_error(),
            _ => None,
        }
    }

    /// A copy of a permanent refusal (access denied, an unknown role), to hand to every
    /// connect and checkout that would meet it; `None` for any other error.
    pub(crate) fn shared_refusal(&self) -> Option<Error> {
        match self {
            Error::AccessDenied {
                endpoint,
                reason,
                hint,
                source,
            } => Some(Error::AccessDenied {
                endpoint: endpoint.clone(),
                reason: *reason,
                hint: hint.clone(),
                source: source.clone(),
            }),
            Error::UnknownRole {
                endpoint,
                role,
                source,
            } => Some(Error::UnknownRole {
                endpoint: endpoint.clone(),
                role: role.clone(),
                source: source.clone(),
            }),
            _ => None,
        }
    }

    /// The server's HINT for [`Error::AccessDenied`] (DSQL's reason for the refusal), and for
    /// an `Error::Diesel` (feature `diesel-async`) whose server error has one.
    pub fn hint(&self) -> Option<&str> {
        match self {
            Error::AccessDenied { hint, .. } => Some(hint),
            #[cfg(feature = "diesel-async")]
            Error::Diesel {
                source: ::diesel::result::Error::DatabaseError(_, info),
            } => info.hint(),
            _ => None,
        }
    }

    /// Whether the same connect may succeed if tried again later, with no change: DSQL's
    /// admission refusals ([`Error::Unavailable`]), timeouts, I/O failures and a server that is
    /// starting, shutting down or unavailable (SQLSTATE classes `08` and `57P`, `53`, `XX000`).
    /// Access denied, TLS, configuration and other server refusals are not: they need a change
    /// first.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Unavailable { .. }
            | Error::ConnectTimeout { .. }
            | Error::PoolTimeout
            | Error::AttemptTimeout { .. } => true,
            Error::Connect { source, .. } => match source.as_db_error() {
                None => true,
                Some(db) => {
                    let code = db.code().code();
                    code.starts_with("08")
                        || code.starts_with("57P")
                        || code.starts_with("53")
                        || code == "XX000"
                }
            },
            _ => false,
        }
    }
}

impl From<tokio_postgres::Error> for Error {
    /// A query's error: [`Error::Query`].
    fn from(source: tokio_postgres::Error) -> Self {
        Error::Query { source }
    }
}

#[cfg(feature = "diesel-async")]
impl From<::diesel::result::Error> for Error {
    /// A Diesel query's error: [`Error::Diesel`].
    fn from(source: ::diesel::result::Error) -> Self {
        Error::Diesel { source }
    }
}

/// Why DSQL denied access, read from the HINT of its `08006 access denied` refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AccessDeniedReason {
    /// `Signature expired: …`: the token is past its expiry by the server's clock. The
    /// connector retries once with a freshly signed token; when this reaches you, the fresh
    /// token was refused too, which points at this host's clock.
    SignatureExpired,
    /// `Wrong user to action mapping. …`: `admin` needs a `DbConnectAdmin` token, every other
    /// role a `DbConnect` token. Permanent.
    WrongAction,
    /// `User: arn:… is not authorized to perform: dsql:DbConnect…` (or `… to access this
    /// resource`): the IAM policy or the role's `AWS IAM GRANT` is missing. Permanent.
    NotAuthorized,
    /// Any other hint (unknown access key, bad signature, wrong Region, ...). Permanent.
    Other,
}

impl AccessDeniedReason {
    /// Classifies a HINT.
    pub fn from_hint(hint: &str) -> Self {
        if hint.starts_with("Signature expired") {
            AccessDeniedReason::SignatureExpired
        } else if hint.starts_with("Wrong user to action mapping") {
            AccessDeniedReason::WrongAction
        } else if hint.contains("is not authorized") {
            AccessDeniedReason::NotAuthorized
        } else {
            AccessDeniedReason::Other
        }
    }
}

/// Why DSQL could not take a connection now. All are transient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum UnavailableReason {
    /// `53400 Unable to accept connection, rate exceeded.`: the cluster's new-connection token
    /// bucket (100/s, burst 1 000) is empty.
    RateExceeded,
    /// `53300 Unable to accept connection, too many open connections.`: the cluster has its
    /// maximum of open connections (10 000).
    TooManyConnections,
    /// `unable to accept connection, waking up cluster, please retry later`: a cluster scaled to
    /// zero is starting.
    WakingUp,
}

impl fmt::Display for UnavailableReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UnavailableReason::RateExceeded => "new-connection rate exceeded (53400)",
            UnavailableReason::TooManyConnections => "too many open connections (53300)",
            UnavailableReason::WakingUp => "the cluster is waking up",
        })
    }
}

/// How `Display` shows an access-denied HINT, with advice where there is one.
fn denied_detail(reason: AccessDeniedReason, hint: &str) -> String {
    let hint = if hint.is_empty() {
        "(the server gave no reason)"
    } else {
        hint
    };
    match reason {
        AccessDeniedReason::SignatureExpired => format!(
            "{hint} (a freshly signed token was refused too: check this host's clock, tokens \
             are dated with it)"
        ),
        AccessDeniedReason::WrongAction => format!(
            "{hint} (admin connects with DbConnectAdmin tokens, other roles with DbConnect)"
        ),
        AccessDeniedReason::NotAuthorized => format!(
            "{hint} (grant dsql:DbConnect or dsql:DbConnectAdmin in IAM, and `AWS IAM GRANT` \
             the role to the IAM identity)"
        ),
        AccessDeniedReason::Other => hint.to_owned(),
    }
}

/// `: <severity> <code>: <message>` when the server answered, so `Display` shows the
/// database's own words instead of the driver's bare `db error`.
fn server_detail(source: &tokio_postgres::Error) -> String {
    source
        .as_db_error()
        .map(|db| format!(": {}", server_words(db)))
        .unwrap_or_default()
}

/// The server's severity, SQLSTATE and message, as every `Display` here shows them.
pub(crate) fn server_words(db: &tokio_postgres::error::DbError) -> String {
    format!("{} {}: {}", db.severity(), db.code().code(), db.message())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hints_are_classified() {
        use AccessDeniedReason::*;
        for (hint, reason) in [
            (
                "Signature expired: 20260101T000000Z is now earlier than 20260101T001500Z",
                SignatureExpired,
            ),
            (
                "Wrong user to action mapping. user: admin, action: DbConnect",
                WrongAction,
            ),
            (
                "User: arn:aws:iam::123456789012:user/x is not authorized to perform: \
                 dsql:DbConnectAdmin on resource: arn:aws:dsql:us-east-1:123456789012:cluster/abc",
                NotAuthorized,
            ),
            (
                "User: arn:aws:iam::1:role/r is not authorized to access this resource",
                NotAuthorized,
            ),
            (
                "The security token included in the request is invalid",
                Other,
            ),
            ("", Other),
        ] {
            assert_eq!(AccessDeniedReason::from_hint(hint), reason, "{hint}");
        }
    }

    #[test]
    fn denied_detail_gives_advice() {
        let shown = denied_detail(AccessDeniedReason::SignatureExpired, "Signature expired: x");
        assert!(
            shown.starts_with("Signature expired: x") && shown.contains("clock"),
            "{shown}"
        );
        assert_eq!(denied_detail(AccessDeniedReason::Other, "why"), "why");
        assert!(denied_detail(AccessDeniedReason::Other, "").contains("no reason"));
    }
}
