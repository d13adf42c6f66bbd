//! One endpoint as the connector uses it ([`Target`]): its names, `tokio-postgres` settings,
//! tokens, health, rate limit, and the memory of its last permanent refusal.

use std::sync::Arc;

use tokio::time::Instant;

use super::health::Health;
use crate::Error;
use crate::admission::{Throttle, TokenBucket};
use crate::config::{DsqlConfig, SslNegotiation};
use crate::token::cache::TokenCache;

/// One endpoint as the connector uses it: its names, `tokio-postgres` settings, tokens and
/// health.
pub(crate) struct Target {
    /// Its place in the configuration (0: preferred).
    pub(crate) index: usize,
    /// The endpoint host (a bare cluster id expanded).
    pub(crate) endpoint: String,
    pub(crate) region: String,
    /// Everything but the password, which is the current token.
    pub(super) postgres: tokio_postgres::Config,
    pub(super) tokens: Arc<TokenCache>,
    /// `host:port`, plus the dialled address when it differs; for error messages and logs.
    pub(crate) described: String,
    pub(super) health: Health,
    /// The last permanent refusal, when it came, and the access key of the refused token
    /// (see [`REFUSAL_MEMORY`](super::refusal::REFUSAL_MEMORY)).
    pub(super) refused: std::sync::Mutex<Option<(Instant, Error, String)>>,
    /// The client-side connect-rate limit for this endpoint, shared by clones and pools: each
    /// peered cluster of a multi-Region pair admits its own 100 a second.
    pub(super) limiter: Option<TokenBucket>,
    /// The adaptive connect rate after this endpoint's admission refusals.
    pub(super) throttle: Throttle,
}

/// The `tokio-postgres` settings for every connection to one endpoint (all but the password).
pub(super) fn postgres_config(
    config: &DsqlConfig,
    configured: &crate::config::Endpoint,
    endpoint: &str,
) -> tokio_postgres::Config {
    let mut postgres = tokio_postgres::Config::new();
    postgres
        .host(endpoint)
        .port(configured.port)
        .user(&config.user)
        .dbname(&config.database)
        .application_name(config.application_name())
        // TLS is never off; the certificate check is in the rustls configuration.
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .ssl_negotiation(match config.ssl_negotiation {
            SslNegotiation::Direct => tokio_postgres::config::SslNegotiation::Direct,
            SslNegotiation::Postgres => tokio_postgres::config::SslNegotiation::Postgres,
        });
    if let Some(addr) = configured.hostaddr {
        postgres.hostaddr(addr);
    }
    // The whole attempt is bounded in `connect`; this bounds the TCP connect for users who
    // take this configuration to another pool.
    let net = &config.connect;
    postgres
        .connect_timeout(net.timeout)
        .keepalives(net.keepalives)
        .keepalives_idle(net.keepalives_idle)
        .keepalives_interval(net.keepalives_interval)
        .keepalives_retries(net.keepalives_retries);
    if let Some(timeout) = net.tcp_user_timeout {
        postgres.tcp_user_timeout(timeout);
    }
    let options = config.startup_options();
    if !options.is_empty() {
        postgres.options(startup_options_string(&options));
    }
    postgres
}

/// `-c name=value -c …`, with spaces and backslashes escaped as the server's option parser wants.
pub(crate) fn startup_options_string(options: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in options {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        for c in name
            .chars()
            .chain(std::iter::once('='))
            .chain(value.chars())
        {
            if c == '\\' || c.is_ascii_whitespace() {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_escaped() {
        assert_eq!(
            startup_options_string(&[("search_path", "myschema, public"), ("a", r"b\c")]),
            r"-c search_path=myschema,\ public -c a=b\\c"
        );
    }
}
