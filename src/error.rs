//! The crate's one error type.
//!
//! Every variant says what failed and which input caused it (a configuration field, an endpoint,
//! a host name). The underlying cause, when there is one, is in [`std::error::Error::source`] and
//! is not repeated in `Display`. No variant ever carries an auth token, a secret access key or a
//! session token.

use std::borrow::Cow;

/// Errors returned by this crate.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is missing, malformed or inconsistent.
    ///
    /// `field` names the builder method, URL parameter or environment variable at fault.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The field, parameter or variable at fault (e.g. `region`, `port`, `CLUSTER_ENDPOINT`).
        field: Cow<'static, str>,
        /// What is wrong with it and, where it helps, how to fix it.
        reason: String,
    },

    /// AWS credentials could not be loaded, or they cannot sign a token.
    #[error("AWS credentials: {reason}")]
    Credentials {
        /// What went wrong, and where credentials are looked for.
        reason: String,
        /// The credentials provider's own error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// TLS could not be set up for the endpoint (bad CA file, no crypto provider, ...).
    #[error("TLS setup for {host}: {reason}")]
    TlsConfig {
        /// The DSQL host name the TLS configuration is for.
        host: String,
        /// What is wrong.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },

    /// The TLS handshake with the endpoint failed (certificate not trusted, wrong name, refused).
    #[error("TLS handshake with {host} failed")]
    Tls {
        /// The host name the certificate was checked against (the SNI name).
        host: String,
        /// The handshake error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The server refused the IAM auth token.
    #[error("token rejected by {endpoint}: {message}")]
    TokenRejected {
        /// The endpoint that refused the token.
        endpoint: String,
        /// The server's message, e.g. `Wrong user to action mapping. user: admin, action: DbConnect`.
        message: String,
        /// The server's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// The connection could not be opened, or the server refused the session for another reason.
    #[error("could not connect to {endpoint}")]
    Connect {
        /// The endpoint (and dialled address, if different).
        endpoint: String,
        /// The driver's error.
        #[source]
        source: tokio_postgres::Error,
    },

    /// A pooled connection cannot be handed out (closed, or past its recycle deadline). The
    /// pool discards it and tries another; users see this only through `bb8`'s error sink.
    #[error("pooled connection unusable: {reason}")]
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

    /// The local emulator could not start (feature `emulator`).
    #[cfg(feature = "emulator")]
    #[error("DSQL emulator: {reason}")]
    Emulator {
        /// What failed, and what to install or set.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
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

    /// The server's SQLSTATE code, when the server answered with an error.
    pub fn code(&self) -> Option<&tokio_postgres::error::SqlState> {
        match self {
            Error::TokenRejected { source, .. }
            | Error::Connect { source, .. }
            | Error::Tls { source, .. } => source.code(),
            _ => None,
        }
    }
}
