//! The emulator's own error type: it shares nothing with the connector it checks.

/// Why the emulator could not start or do what it was asked.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EmulatorError {
    /// A setting is out of range or missing; `field` names it as the builder (or the
    /// `dsql-emulator` flag) does.
    #[error("invalid emulator setting `{field}`: {reason}")]
    Config {
        /// The setting at fault (`region`, `max_connection_age`, ...).
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// Starting, running or stopping the emulator (or its PostgreSQL) failed.
    #[error("DSQL emulator: {reason}")]
    Failed {
        /// What failed, and what to install or set.
        reason: String,
        /// The underlying error, if any.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl EmulatorError {
    pub(crate) fn config(field: &'static str, reason: impl Into<String>) -> Self {
        EmulatorError::Config {
            field,
            reason: reason.into(),
        }
    }

    pub(crate) fn failed(reason: impl Into<String>) -> Self {
        EmulatorError::Failed {
            reason: reason.into(),
            source: None,
        }
    }

    /// A failure with its cause.
    pub(crate) fn caused(
        reason: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        EmulatorError::Failed {
            reason: reason.into(),
            source: Some(source.into()),
        }
    }
}
