//! Metrics through the [`metrics`](https://docs.rs/metrics) facade (feature `metrics`). Every
//! function here compiles to nothing without the feature. The names and labels are listed once,
//! in the table of `src/guide/observability.md`; keep the two in step.

#[cfg(feature = "metrics")]
mod imp {
    use std::time::Duration;

    pub(crate) fn connection_opened(endpoint: &str) {
        metrics::counter!("dsql_connections_opened_total", "endpoint" => endpoint.to_owned())
            .increment(1);
    }

    pub(crate) fn connect_error(endpoint: &str, reason: &'static str) {
        metrics::counter!(
            "dsql_connect_errors_total",
            "endpoint" => endpoint.to_owned(),
            "reason" => reason
        )
        .increment(1);
    }

    pub(crate) fn connect_duration(endpoint: &str, took: Duration) {
        metrics::histogram!("dsql_connect_duration_seconds", "endpoint" => endpoint.to_owned())
            .record(took.as_secs_f64());
    }

    pub(crate) fn token_signed(host: &str) {
        metrics::counter!("dsql_tokens_signed_total", "endpoint" => host.to_owned()).increment(1);
    }

    pub(crate) fn credentials_fetch_error(host: &str) {
        metrics::counter!("dsql_credentials_fetch_errors_total", "endpoint" => host.to_owned())
            .increment(1);
    }

    /// A pool's per-checkout metrics, registered once (with the recorder installed at the time)
    /// so that a checkout allocates nothing.
    #[derive(Clone)]
    pub(crate) struct PoolMetrics {
        idle: metrics::Gauge,
        in_use: metrics::Gauge,
        checkout_wait: metrics::Histogram,
    }

    impl std::fmt::Debug for PoolMetrics {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("PoolMetrics")
        }
    }

    impl PoolMetrics {
        pub(crate) fn new(endpoint: &str) -> Self {
            PoolMetrics {
                idle: metrics::gauge!(
                    "dsql_pool_connections",
                    "endpoint" => endpoint.to_owned(),
                    "state" => "idle"
                ),
                in_use: metrics::gauge!(
                    "dsql_pool_connections",
                    "endpoint" => endpoint.to_owned(),
                    "state" => "in_use"
                ),
                checkout_wait: metrics::histogram!(
                    "dsql_pool_checkout_wait_seconds",
                    "endpoint" => endpoint.to_owned()
                ),
            }
        }

        pub(crate) fn connections(&self, idle: i64, in_use: i64) {
            self.idle.set(idle.max(0) as f64);
            self.in_use.set(in_use.max(0) as f64);
        }

        pub(crate) fn checkout_wait(&self, waited: Duration) {
            self.checkout_wait.record(waited.as_secs_f64());
        }
    }

    pub(crate) fn connection_closed(endpoint: &str, reason: &'static str) {
        metrics::counter!(
            "dsql_pool_connections_closed_total",
            "endpoint" => endpoint.to_owned(),
            "reason" => reason
        )
        .increment(1);
    }

    pub(crate) fn transaction_conflict(code: &'static str) {
        metrics::counter!("dsql_transaction_conflicts_total", "code" => code).increment(1);
    }

    pub(crate) fn transaction_retry() {
        metrics::counter!("dsql_transaction_retries_total").increment(1);
    }

    pub(crate) fn transaction_retries_exhausted() {
        metrics::counter!("dsql_transaction_retries_exhausted_total").increment(1);
    }

    pub(crate) fn transaction_outcome_unknown() {
        metrics::counter!("dsql_transaction_outcome_unknown_total").increment(1);
    }

    /// An endpoint of several was marked down (`up == false`) or up again.
    pub(crate) fn endpoint_marked(endpoint: &str, up: bool) {
        let name = if up {
            "dsql_endpoint_failbacks_total"
        } else {
            "dsql_endpoint_failovers_total"
        };
        metrics::counter!(name, "endpoint" => endpoint.to_owned()).increment(1);
        metrics::gauge!("dsql_endpoint_up", "endpoint" => endpoint.to_owned()).set(if up {
            1.0
        } else {
            0.0
        });
    }
}

#[cfg(not(feature = "metrics"))]
#[allow(clippy::missing_const_for_fn)]
mod imp {
    use std::time::Duration;

    pub(crate) fn connection_opened(_: &str) {}
    pub(crate) fn connect_error(_: &str, _: &'static str) {}
    pub(crate) fn connect_duration(_: &str, _: Duration) {}
    pub(crate) fn token_signed(_: &str) {}
    pub(crate) fn credentials_fetch_error(_: &str) {}
    /// Without the feature: nothing.
    #[derive(Debug, Clone)]
    pub(crate) struct PoolMetrics;

    impl PoolMetrics {
        pub(crate) fn new(_: &str) -> Self {
            PoolMetrics
        }
        pub(crate) fn connections(&self, _: i64, _: i64) {}
        pub(crate) fn checkout_wait(&self, _: Duration) {}
    }
    pub(crate) fn connection_closed(_: &str, _: &'static str) {}
    pub(crate) fn transaction_conflict(_: &'static str) {}
    pub(crate) fn transaction_retry() {}
    pub(crate) fn transaction_retries_exhausted() {}
    pub(crate) fn transaction_outcome_unknown() {}
    pub(crate) fn endpoint_marked(_: &str, _: bool) {}
}

pub(crate) use imp::*;

/// The `reason` label of `dsql_connect_errors_total` for a connect error.
pub(crate) fn connect_error_reason(error: &crate::Error) -> &'static str {
    use crate::{AccessDeniedReason, Error, UnavailableReason};
    match error {
        Error::AccessDenied { reason, .. } => match reason {
            AccessDeniedReason::SignatureExpired => "signature_expired",
            AccessDeniedReason::WrongAction => "wrong_action",
            AccessDeniedReason::NotAuthorized => "not_authorized",
            AccessDeniedReason::Other => "access_denied",
        },
        Error::Unavailable { reason, .. } => match reason {
            UnavailableReason::RateExceeded => "rate_exceeded",
            UnavailableReason::TooManyConnections => "too_many_connections",
            UnavailableReason::WakingUp => "waking_up",
        },
        Error::ConnectTimeout { .. } => "timeout",
        Error::Tls { .. } => "tls",
        Error::UnknownRole { .. } => "unknown_role",
        Error::Credentials { .. } => "credentials",
        Error::Connect { source, .. } if source.as_db_error().is_none() => "io",
        _ => "other",
    }
}
