//! [`DsqlConnector`]: resolves region and credentials once, then opens connections with a cached
//! token over the connector's shared TLS configuration, retrying DSQL's transient refusals
//! inside a connect deadline.

use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;
use tokio::time::Instant;

use crate::admission::{Throttle, TokenBucket};
use crate::config::DsqlConfig;
use crate::session::SessionWatch;
use crate::tls::DsqlTls;
use crate::token::cache::TokenCache;
use crate::token::credentials::CachedCredentials;
use crate::token::{Action, AuthToken, TokenSigner};
use crate::{Error, tls};

mod connect;
mod failover;
mod health;
mod probe;
mod refusal;
pub(crate) use refusal::REFUSAL_MEMORY;
mod target;

pub(crate) use connect::Retry;
pub(crate) use failover::Checkout;
pub use failover::EndpointHealth;
use health::Health;
pub(crate) use target::Target;
use target::postgres_config;

/// Opens DSQL connections: IAM token (cached), TLS with SNI, the DSQL startup parameters.
///
/// Cheap to clone: clones share the token caches, the TLS configuration (and with it TLS
/// session resumption) and, with several endpoints, what is known of their health.
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
///
/// ## Several endpoints
///
/// With a multi-Region cluster's endpoints in the configuration
/// ([`DsqlConfigBuilder::peer`](crate::DsqlConfigBuilder::peer), `host=a,b`), each endpoint has
/// its own token cache (tokens signed for its host and Region) and TLS name, and new
/// connections go to the first endpoint, in the configured order, that is not marked down:
///
/// - An endpoint's failures count when an attempt on it fails at the network: TCP refused or
///   reset, a TLS failure, an attempt past `connect_timeout`, a server that closes during
///   startup, or `waking up` until the connect deadline. Never for access denied, an unknown
///   role, `rate exceeded` / `too many open connections`, or anything a query answers: those
///   would fail the same way on the peer. Whether they mark it down, and when it comes back
///   up, is [`FailoverPolicy`](crate::FailoverPolicy)'s: enough failures in a window, at least
///   as many as the successes there; a minimum down time, doubled when it flaps; successes in
///   a row to come up.
/// - A connect whose endpoint is marked down mid-way tries the next endpoint at once, within
///   the same deadline; later connects skip the endpoint (no timeout paid again) while another
///   is up. With every endpoint down, they are tried in order as a last resort.
/// - An endpoint marked down is probed in the background, once its minimum down time has
///   passed, with one connect attempt every
///   [`failback_probe_interval`](crate::DsqlConfigBuilder::failback_probe_interval)
///   (jittered); when the policy marks it up, new connections return to it (failback). The
///   peer sees no login while the preferred endpoint is up.
/// - Pools drop connections to an endpoint marked down at checkout (unless used since it last
///   failed and still answering), and move connections back after a failback, spread over the
///   policy's failback window (see [`DsqlConnectionManager`](crate::DsqlConnectionManager)).
///
/// Marking down, failback and each connect's endpoint are logged with `tracing` and counted
/// (see [`guide::multi_region`](crate::guide::multi_region)).
#[derive(Clone)]
pub struct DsqlConnector {
    inner: Arc<Inner>,
}

struct Inner {
    config: DsqlConfig,
    /// The identity cache in front of the default credentials chain (none for a provider of
    /// the user's own: caching it is the user's choice).
    credentials_cache: Option<Arc<CachedCredentials>>,
    /// One per configured endpoint, the preferred first.
    targets: Vec<Arc<Target>>,
    tls: DsqlTls,
    /// The origin of the health timestamps.
    epoch: Instant,
}

/// A connection just opened, with what the pool keeps of it.
pub(crate) struct Connected {
    pub(crate) client: tokio_postgres::Client,
    pub(crate) session: Arc<SessionWatch>,
    pub(crate) target: Arc<Target>,
}

impl std::fmt::Debug for DsqlConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<_> = self
            .inner
            .targets
            .iter()
            .map(|t| format!("{} [{}]", t.described, t.region))
            .collect();
        f.debug_struct("DsqlConnector")
            .field("endpoints", &endpoints)
            .field("user", &self.inner.config.user)
            .finish_non_exhaustive()
    }
}

impl DsqlConnector {
    /// Resolves the region and credentials, sets up TLS, and signs a first token for each
    /// endpoint, so that a missing region, missing credentials or an unreadable CA file fail
    /// here with an error that says what to set. Nothing is sent to any endpoint.
    pub async fn new(config: DsqlConfig) -> Result<Self, Error> {
        let first_region = crate::config::resolve_region(&config, &config.endpoints[0]).await?;
        let (provider, credentials_cache) = match &config.credentials_provider {
            Some(provider) => (provider.clone(), None),
            None => {
                let chain = default_credentials(&first_region, config.profile.as_deref()).await;
                let cache = CachedCredentials::new(chain);
                (cache.provider(), Some(cache))
            }
        };
        let tls = DsqlTls::new(tls::client_config(
            &config.endpoints[0].host_in(&first_region),
            &config.root_certs,
            config.ssl_mode,
            config
                .amzn_cluster_id
                .as_deref()
                .map(|id| (id, first_region.as_str())),
        )?);
        let mut targets = Vec::with_capacity(config.endpoints.len());
        for (index, configured) in config.endpoints.iter().enumerate() {
            let region = match index {
                0 => first_region.clone(),
                _ => crate::config::resolve_region(&config, configured).await?,
            };
            let endpoint = configured.host_in(&region);
            let tokens = Arc::new(TokenCache::new(
                TokenSigner::new(config.token_host(configured, &region), region.clone()),
                Action::for_user(&config.user),
                config.token_duration,
                config.connect.credentials_timeout,
                provider.clone(),
                config.time_source.clone(),
            ));
            let described = match configured.hostaddr {
                Some(addr) => format!("{endpoint}:{} (via {addr})", configured.port),
                None => format!("{endpoint}:{}", configured.port),
            };
            targets.push(Arc::new(Target {
                index,
                postgres: postgres_config(&config, configured, &endpoint),
                endpoint,
                region,
                tokens,
                described,
                health: Health::default(),
                refused: std::sync::Mutex::new(None),
                limiter: config
                    .connect
                    .rate_limit
                    .map(|(per_second, burst)| TokenBucket::new(per_second, burst)),
                throttle: Throttle::default(),
            }));
        }
        let connector = DsqlConnector {
            inner: Arc::new(Inner {
                config,
                credentials_cache,
                targets,
                tls,
                epoch: Instant::now(),
            }),
        };
        for target in &connector.inner.targets {
            target.tokens.get().await?;
        }
        Ok(connector)
    }

    /// The current auth token for the preferred endpoint: one token serves all connections
    /// until 80 % of its life, and none is handed out close to its expiry. A cache hit takes no
    /// lock.
    pub async fn token(&self) -> Result<AuthToken, Error> {
        self.inner.targets[0].tokens.get().await
    }

    /// The current auth token for one of the configured endpoints (by its host), signed for
    /// that endpoint's host and Region; `None` if `endpoint` is not one of them.
    pub async fn token_for(&self, endpoint: &str) -> Option<Result<AuthToken, Error>> {
        let target = self.inner.targets.iter().find(|t| t.endpoint == endpoint)?;
        Some(target.tokens.get().await)
    }

    /// The configuration this connector was built from.
    pub fn config(&self) -> &DsqlConfig {
        &self.inner.config
    }

    /// The preferred endpoint's host (a bare cluster id expanded with the region).
    pub fn endpoint(&self) -> &str {
        &self.inner.targets[0].endpoint
    }

    /// The Region tokens for the preferred endpoint are signed for.
    pub fn region(&self) -> &str {
        &self.inner.targets[0].region
    }

    /// The `tokio-postgres` TLS hook this connector uses, for other pools or drivers.
    pub fn tls(&self) -> DsqlTls {
        self.inner.tls.clone()
    }

    /// The `tokio-postgres` configuration used for each connection to the preferred endpoint,
    /// without a password.
    pub fn postgres_config(&self) -> &tokio_postgres::Config {
        &self.inner.targets[0].postgres
    }
}

/// `now + duration`, or a time far enough away when that does not fit the clock.
pub(crate) fn after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// `aws-config`'s default credentials chain: environment, profile (SSO, assume-role, process),
/// web identity, ECS, EC2 instance metadata (wrapped in [`CachedCredentials`] by the caller).
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
