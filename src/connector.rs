//! [`DsqlConnector`]: resolves region and credentials once, then opens connections with a cached
//! token over the connector's shared TLS configuration, retrying DSQL's transient refusals
//! inside a connect deadline.

use std::sync::Arc;

use aws_credential_types::provider::SharedCredentialsProvider;
use tokio::time::Instant;
use tracing::Instrument;

use crate::admission::{self, Refusal, TokenBucket};
use crate::config::{DsqlConfig, SslNegotiation};
use crate::error::AccessDeniedReason;
use crate::session::SessionWatch;
use crate::tls::DsqlTls;
use crate::token::cache::TokenCache;
use crate::token::{Action, AuthToken, TokenSigner};
use crate::{Error, tls};

/// Opens DSQL connections: IAM token (cached), TLS with SNI, the DSQL startup parameters.
///
/// Cheap to clone: clones share the token cache and the TLS configuration (and with it TLS
/// session resumption).
///
/// ```no_run
/// use tokio_postgres_dsql::{DsqlConfig, DsqlConnector};
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = DsqlConfig::builder()
///     .host("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")
///     .build()?;
/// let connector = DsqlConnector::new(config).await?;
/// let client = connector.connect().await?;
/// let row = client.query_one("SELECT 1::int4", &[]).await?;
/// assert_eq!(row.get::<_, i32>(0), 1);
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct DsqlConnector {
    inner: Arc<Inner>,
}

struct Inner {
    config: DsqlConfig,
    endpoint: String,
    region: String,
    /// Everything but the password, which is the current token.
    postgres: tokio_postgres::Config,
    tls: DsqlTls,
    tokens: Arc<TokenCache>,
    /// The client-side connect-rate limit, shared by clones and pools.
    limiter: Option<TokenBucket>,
    /// `host:port`, plus the dialled address when it differs; for error messages and logs.
    described: String,
}

impl std::fmt::Debug for DsqlConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DsqlConnector")
            .field("endpoint", &self.inner.described)
            .field("region", &self.inner.region)
            .field("user", &self.inner.config.user)
            .finish_non_exhaustive()
    }
}

impl DsqlConnector {
    /// Resolves the region and credentials, sets up TLS, and signs a first token, so that a
    /// missing region, missing credentials or an unreadable CA file fail here with an error
    /// that says what to set.
    pub async fn new(config: DsqlConfig) -> Result<Self, Error> {
        let region = crate::config::resolve_region(&config).await?;
        let endpoint = config.endpoint_for(&region);
        let provider = match &config.credentials_provider {
            Some(provider) => provider.clone(),
            None => default_credentials(&region, config.profile.as_deref()).await,
        };
        let tls = DsqlTls::new(tls::client_config(
            &endpoint,
            &config.root_certs,
            config.ssl_mode,
        )?);
        let tokens = Arc::new(TokenCache::new(
            TokenSigner::new(config.token_host(&region), region.clone()),
            Action::for_user(&config.user),
            config.token_duration,
            config.connect.credentials_timeout,
            provider,
            config.time_source.clone(),
        ));
        let limiter = config
            .connect
            .rate_limit
            .map(|(per_second, burst)| TokenBucket::new(per_second, burst));
        let postgres = postgres_config(&config, &endpoint);
        let described = match config.hostaddr {
            Some(addr) => format!("{endpoint}:{} (via {addr})", config.port),
            None => format!("{endpoint}:{}", config.port),
        };
        let connector = DsqlConnector {
            inner: Arc::new(Inner {
                config,
                endpoint,
                region,
                postgres,
                tls,
                tokens,
                limiter,
                described,
            }),
        };
        connector.token().await?;
        Ok(connector)
    }

    /// Opens a connection and spawns its connection task on the current tokio runtime. The
    /// task's error, if the connection ends with one, is logged with `tracing` at `warn`.
    ///
    /// How refusals are handled (see the README's "When DSQL refuses a connection"):
    ///
    /// - `rate exceeded`, `too many open connections`, `waking up`: tried again after a backoff
    ///   with full jitter (at most 2 s), with the same token, until
    ///   [`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline); then
    ///   [`Error::Unavailable`].
    /// - access denied: the cached token is dropped (the next connect asks the credentials
    ///   provider again). `Signature expired` is tried once more at once with a freshly signed
    ///   token; every other reason fails at once with [`Error::AccessDenied`].
    /// - an attempt running past [`connect_timeout`](crate::DsqlConfigBuilder::connect_timeout):
    ///   [`Error::ConnectTimeout`], not retried. TLS failures: [`Error::Tls`].
    pub async fn connect(&self) -> Result<tokio_postgres::Client, Error> {
        let deadline = Instant::now() + self.inner.config.connect.deadline;
        let (client, _watch) = self.connect_within(deadline, Retry::Refusals).await?;
        Ok(client)
    }

    /// [`connect`](Self::connect) with an explicit deadline; with [`Retry::Transient`], I/O
    /// failures, attempt timeouts and a server that is starting or shutting down are retried
    /// with backoff too (the pool's connects, which have no caller to retry them).
    pub(crate) async fn connect_within(
        &self,
        deadline: Instant,
        retry: Retry,
    ) -> Result<(tokio_postgres::Client, Arc<SessionWatch>), Error> {
        let config = &self.inner.config;
        let span = tracing::info_span!(
            "dsql.connect",
            endpoint = %self.inner.described,
            user = %config.user,
            region = %self.inner.region,
            negotiation = ?config.ssl_negotiation,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let started = Instant::now();
        let mut attempts = 0;
        let result = self
            .attempts(deadline, retry, &mut attempts)
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        span.record("attempts", attempts);
        span.record("duration_ms", took.as_millis() as u64);
        match &result {
            Ok(_) => {
                span.record("outcome", "connected");
                crate::telemetry::connection_opened(&self.inner.endpoint);
                crate::telemetry::connect_duration(&self.inner.endpoint, took);
            }
            Err(error) => {
                let reason = crate::telemetry::connect_error_reason(error);
                span.record("outcome", reason);
                crate::telemetry::connect_error(&self.inner.endpoint, reason);
            }
        }
        result
    }

    /// The attempts of [`connect_within`](Self::connect_within), counted in `attempts`.
    async fn attempts(
        &self,
        deadline: Instant,
        retry: Retry,
        attempts: &mut u32,
    ) -> Result<(tokio_postgres::Client, Arc<SessionWatch>), Error> {
        let settings = &self.inner.config.connect;
        let mut backoffs = 0;
        let mut resigned = false;
        loop {
            self.wait_for_rate_limit(deadline).await?;
            *attempts += 1;
            let token = self.token().await?;
            let mut postgres = self.inner.postgres.clone();
            postgres.password(token.as_str());
            let left = deadline.saturating_duration_since(Instant::now());
            let bound = settings.timeout.min(left);
            let (tls, watch) = self.inner.tls.watched();
            let error = match tokio::time::timeout(bound, postgres.connect(tls)).await {
                Ok(Ok((client, connection))) => {
                    let endpoint = self.inner.described.clone();
                    tokio::spawn(async move {
                        if let Err(error) = connection.await {
                            tracing::warn!(%endpoint, %error, "DSQL connection ended with an error");
                        }
                    });
                    return Ok((client, watch));
                }
                Ok(Err(source)) => self.connect_error(source, *attempts),
                Err(_) => Error::ConnectTimeout {
                    endpoint: self.inner.described.clone(),
                    timeout: bound,
                    during: if bound < settings.timeout {
                        "the connect deadline (connect_deadline) ran out during an attempt"
                    } else {
                        "one attempt: TCP, TLS, startup and authentication (connect_timeout)"
                    },
                },
            };
            let retry_after_backoff = match &error {
                Error::AccessDenied { reason, .. } => {
                    // The credentials may have been rotated or revoked, or the token is stale:
                    // ask the provider again next time.
                    self.inner.tokens.invalidate();
                    if *reason == AccessDeniedReason::SignatureExpired && !resigned {
                        resigned = true;
                        tracing::info!(
                            endpoint = %self.inner.described,
                            "DSQL refused the token as expired; retrying once with a fresh one"
                        );
                        continue;
                    }
                    false
                }
                Error::Unavailable { .. } => true,
                other => retry == Retry::Transient && other.is_transient(),
            };
            if !retry_after_backoff {
                return Err(error);
            }
            backoffs += 1;
            let delay = admission::backoff(backoffs);
            if Instant::now() + delay >= deadline {
                return Err(error);
            }
            tracing::debug!(
                endpoint = %self.inner.described,
                %error,
                attempt = *attempts,
                delay_ms = delay.as_millis() as u64,
                "could not connect to DSQL; retrying after a backoff"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// Waits for the client-side rate limit, if one is set, or fails if the wait would pass the
    /// deadline.
    async fn wait_for_rate_limit(&self, deadline: Instant) -> Result<(), Error> {
        let Some(limiter) = &self.inner.limiter else {
            return Ok(());
        };
        let now = Instant::now();
        match limiter.reserve(now, deadline) {
            Some(wait) if wait.is_zero() => Ok(()),
            Some(wait) => {
                tokio::time::sleep(wait).await;
                Ok(())
            }
            None => Err(Error::ConnectTimeout {
                endpoint: self.inner.described.clone(),
                timeout: self.inner.config.connect.deadline,
                during: "the wait for the client-side connect rate limit would pass the \
                         connect deadline (connect_rate_limit, connect_deadline)",
            }),
        }
    }

    /// The current auth token: one token serves all connections until 80 % of its life, and
    /// none is handed out close to its expiry. A cache hit takes no lock.
    pub async fn token(&self) -> Result<AuthToken, Error> {
        self.inner.tokens.get().await
    }

    /// The configuration this connector was built from.
    pub fn config(&self) -> &DsqlConfig {
        &self.inner.config
    }

    /// The endpoint host (a bare cluster id expanded with the region).
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The region tokens are signed for.
    pub fn region(&self) -> &str {
        &self.inner.region
    }

    /// The `tokio-postgres` TLS hook this connector uses, for other pools or drivers.
    pub fn tls(&self) -> DsqlTls {
        self.inner.tls.clone()
    }

    /// The `tokio-postgres` configuration used for each connection, without a password.
    pub fn postgres_config(&self) -> &tokio_postgres::Config {
        &self.inner.postgres
    }

    /// Turns the error of a connect made outside the connector (with
    /// [`postgres_config`](Self::postgres_config), [`tls`](Self::tls) and a
    /// [`token`](Self::token), e.g. by another pool) into this crate's typed error, exactly as
    /// [`connect`](Self::connect) does: [`Error::AccessDenied`] with the HINT's reason,
    /// [`Error::Unavailable`], [`Error::Tls`] or [`Error::Connect`]. On access denied the cached
    /// token is dropped, so the next [`token`](Self::token) asks the credentials provider again.
    pub fn classify_connect_error(&self, source: tokio_postgres::Error) -> Error {
        let error = self.connect_error(source, 1);
        if matches!(error, Error::AccessDenied { .. }) {
            self.inner.tokens.invalidate();
        }
        error
    }

    /// Classifies a failed attempt (see [`admission::classify`]).
    fn connect_error(&self, source: tokio_postgres::Error, attempts: u32) -> Error {
        let endpoint = self.inner.described.clone();
        if let Some(db) = source.as_db_error() {
            match admission::classify(db.code().code(), db.message(), db.hint()) {
                Some(Refusal::AccessDenied(reason)) => {
                    let hint = db.hint().unwrap_or_default().to_owned();
                    return Error::AccessDenied {
                        endpoint,
                        reason,
                        hint,
                        source,
                    };
                }
                Some(Refusal::Unavailable(reason)) => {
                    return Error::Unavailable {
                        endpoint,
                        reason,
                        attempts,
                        source,
                    };
                }
                None => {}
            }
            if db.code().code() == "28000" && db.message().ends_with("does not exist") {
                return Error::UnknownRole {
                    endpoint,
                    role: self.inner.config.user.clone(),
                    source,
                };
            }
        }
        if is_tls_failure(&source) {
            return Error::Tls {
                host: self.inner.endpoint.clone(),
                source,
            };
        }
        Error::Connect { endpoint, source }
    }
}

/// Which failed attempts [`DsqlConnector::connect_within`] tries again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Retry {
    /// DSQL's transient refusals (and one expired signature).
    Refusals,
    /// Those, and every other transient failure ([`Error::is_transient`]).
    Transient,
}

/// The `tokio-postgres` settings for every connection (all but the password).
fn postgres_config(config: &DsqlConfig, endpoint: &str) -> tokio_postgres::Config {
    let mut postgres = tokio_postgres::Config::new();
    postgres
        .host(endpoint)
        .port(config.port)
        .user(&config.user)
        .dbname(&config.database)
        .application_name(config.application_name())
        // TLS is never off; the certificate check is in the rustls configuration.
        .ssl_mode(tokio_postgres::config::SslMode::Require)
        .ssl_negotiation(match config.ssl_negotiation {
            SslNegotiation::Direct => tokio_postgres::config::SslNegotiation::Direct,
            SslNegotiation::Postgres => tokio_postgres::config::SslNegotiation::Postgres,
        });
    if let Some(addr) = config.hostaddr {
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

fn is_tls_failure(error: &tokio_postgres::Error) -> bool {
    // tokio-postgres does not expose its error kinds. The cause chain holds the rustls error for
    // certificate and handshake failures; a plain I/O error (a reset, an early end of stream)
    // during the handshake is the network's, not TLS's. Otherwise its TLS kind displays as
    // below (this also covers a server that answers SSLRequest with `N`).
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<rustls::Error>() || cause.is::<rustls::pki_types::InvalidDnsNameError>() {
            return true;
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            return io
                .get_ref()
                .is_some_and(|inner| inner.is::<rustls::Error>());
        }
        source = cause.source();
    }
    error
        .to_string()
        .starts_with("error performing TLS handshake")
}

/// `aws-config`'s default credentials chain: environment, profile (SSO, assume-role, process),
/// web identity, ECS, EC2 instance metadata.
async fn default_credentials(region: &str, profile: Option<&str>) -> SharedCredentialsProvider {
    let mut builder = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
        .region(aws_config::Region::new(region.to_owned()));
    if let Some(profile) = profile {
        builder = builder.profile_name(profile);
    }
    SharedCredentialsProvider::new(builder.build().await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::{CountingProvider, ManualClock};
    use aws_credential_types::Credentials;
    use std::time::Duration;

    #[test]
    fn options_are_escaped() {
        assert_eq!(
            startup_options_string(&[("search_path", "myschema, public"), ("a", r"b\c")]),
            r"-c search_path=myschema,\ public -c a=b\\c"
        );
    }

    #[tokio::test]
    async fn new_fails_fast_without_credentials_and_says_so() {
        let provider = CountingProvider::new(Credentials::from_keys("AK", "s3cr3t", None));
        provider
            .fail
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let config = DsqlConfig::builder()
            .host("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws")
            .credentials_provider(provider)
            .build()
            .unwrap();
        let err = DsqlConnector::new(config).await.unwrap_err();
        assert!(matches!(err, Error::Credentials { .. }), "{err:?}");
        assert!(err.to_string().contains("AWS_ACCESS_KEY_ID"), "{err}");
    }

    #[tokio::test]
    async fn startup_carries_search_path_application_name_and_the_admin_action() {
        let clock = ManualClock::at(1_724_716_800);
        let config = DsqlConfig::builder()
            .host("abcdefghijklmnopqrstuvwxyz")
            .region("eu-west-1")
            .user("admin")
            .search_path("myschema")
            .application_name("svc")
            .hostaddr("127.0.0.1".parse().unwrap())
            .credentials_provider(Credentials::from_keys("AK", "s3cr3t", None))
            .time_source(clock)
            .build()
            .unwrap();
        let connector = DsqlConnector::new(config).await.unwrap();
        assert_eq!(
            connector.endpoint(),
            "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws"
        );
        let pg = connector.postgres_config();
        assert_eq!(pg.get_options(), Some("-c search_path=myschema"));
        assert_eq!(
            pg.get_application_name(),
            Some(concat!(
                "svc:tokio-postgres-dsql/",
                env!("CARGO_PKG_VERSION")
            ))
        );
        assert_eq!(pg.get_password(), None);
        assert_eq!(pg.get_connect_timeout(), Some(&Duration::from_secs(10)));
        assert!(pg.get_keepalives());
        assert_eq!(pg.get_keepalives_idle(), Duration::from_secs(60));
        assert_eq!(pg.get_keepalives_interval(), Some(Duration::from_secs(15)));
        assert_eq!(pg.get_keepalives_retries(), Some(3));
        assert_eq!(pg.get_tcp_user_timeout(), Some(&Duration::from_secs(30)));
        let token = connector.token().await.unwrap();
        assert!(token.as_str().starts_with(
            "abcdefghijklmnopqrstuvwxyz.dsql.eu-west-1.on.aws/?Action=DbConnectAdmin&"
        ));
        let shown = format!("{connector:?}");
        assert!(
            shown.contains("127.0.0.1") && !shown.contains("s3cr3t"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn privatelink_signs_for_the_cluster_endpoint() {
        let config = DsqlConfig::builder()
            .host("vpce-0123-abcd.dsql-fnh4.us-east-1.vpce.amazonaws.com")
            .region("us-east-1")
            .user("app")
            .amzn_cluster_id("abcdefghijklmnopqrstuvwxyz")
            .ssl_mode(crate::SslMode::Require)
            .credentials_provider(Credentials::from_keys("AK", "s", None))
            .build()
            .unwrap();
        let connector = DsqlConnector::new(config).await.unwrap();
        let token = connector.token().await.unwrap();
        assert!(
            token
                .as_str()
                .starts_with("abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws/?Action=DbConnect&")
        );
        assert_eq!(
            connector.postgres_config().get_options(),
            Some("-c amzn-cluster-id=abcdefghijklmnopqrstuvwxyz")
        );
    }
}
