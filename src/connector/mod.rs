//! [`DsqlConnector`]: resolves region and credentials once, then opens connections with a cached
//! token over the connector's shared TLS configuration, retrying DSQL's transient refusals
//! inside a connect deadline.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use aws_credential_types::provider::SharedCredentialsProvider;
use tokio::time::Instant;
use tracing::Instrument;

use crate::admission::{self, Refusal, Throttle, TokenBucket};
use crate::config::{DsqlConfig, SslNegotiation};
use crate::error::{AccessDeniedReason, UnavailableReason};
use crate::session::SessionWatch;
use crate::tls::DsqlTls;
use crate::token::cache::TokenCache;
use crate::token::credentials::CachedCredentials;
use crate::token::{Action, AuthToken, TokenSigner};
use crate::{Error, tls};

mod health;
use health::{AfterFailure, EndpointState};

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
/// - An endpoint is marked down when an attempt on it fails at the network: TCP refused or
///   reset, a TLS failure, an attempt past `connect_timeout`, a server that closes during
///   startup, or `waking up` until the connect deadline. Never for access denied, an unknown
///   role, `rate exceeded` / `too many open connections`, or anything a query answers: those
///   would fail the same way on the peer.
/// - A connect whose endpoint is marked down mid-way tries the next endpoint at once, within
///   the same deadline; later connects skip the endpoint (no timeout paid again) while another
///   is up. With every endpoint down, they are tried in order as a last resort.
/// - An endpoint marked down is probed in the background with one connect attempt every
///   [`failback_probe_interval`](crate::DsqlConfigBuilder::failback_probe_interval) (2 s,
///   jittered); the first that succeeds marks it up, and new connections return to it
///   (failback). The peer sees no login while the preferred endpoint is up.
/// - Pools drop connections to an endpoint marked down at checkout, and move connections back
///   after a failback, spread over a probe interval (see [`DsqlConnectionManager`](crate::DsqlConnectionManager)).
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

/// One endpoint as the connector uses it: its names, `tokio-postgres` settings, tokens and
/// health.
pub(crate) struct Target {
    /// Its place in the configuration (0: preferred).
    pub(crate) index: usize,
    /// The endpoint host (a bare cluster id expanded).
    pub(crate) endpoint: String,
    pub(crate) region: String,
    /// Everything but the password, which is the current token.
    postgres: tokio_postgres::Config,
    tokens: Arc<TokenCache>,
    /// `host:port`, plus the dialled address when it differs; for error messages and logs.
    pub(crate) described: String,
    health: Health,
    /// The last permanent refusal, when it came, and the access key of the refused token
    /// (see [`REFUSAL_MEMORY`]).
    refused: std::sync::Mutex<Option<(Instant, Error, String)>>,
    /// The client-side connect-rate limit for this endpoint, shared by clones and pools: each
    /// peered cluster of a multi-Region pair admits its own 100 a second.
    limiter: Option<TokenBucket>,
    /// The adaptive connect rate after this endpoint's admission refusals.
    throttle: Throttle,
}

impl Target {
    /// The permanent refusal this endpoint gave less than [`REFUSAL_MEMORY`] ago to a token
    /// signed with the same access key as `token`, if any (credentials rotated since are tried).
    fn remembered_refusal(&self, token: &AuthToken) -> Option<Error> {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        match &*refused {
            Some((at, error, key))
                if at.elapsed() < REFUSAL_MEMORY && key == access_key_of(token) =>
            {
                error.shared_refusal()
            }
            _ => None,
        }
    }

    fn remember_refusal(&self, error: &Error, token: &AuthToken) {
        if let Some(copy) = error.shared_refusal() {
            *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                Some((Instant::now(), copy, access_key_of(token).to_owned()));
        }
    }
}

/// The access key id a token was signed with (its `X-Amz-Credential`, up to the scope).
fn access_key_of(token: &AuthToken) -> &str {
    let text = token.as_str();
    text.split_once("X-Amz-Credential=")
        .map(|(_, rest)| rest.split(['%', '&']).next().unwrap_or_default())
        .unwrap_or_default()
}

/// What the connector knows of an endpoint's health (kept only with several endpoints); the
/// rules are [`FailoverPolicy`](crate::FailoverPolicy)'s.
#[derive(Default)]
struct Health {
    /// Read without a lock on every pick and checkout.
    down: AtomicBool,
    /// When it was last marked up or down, in nanoseconds since the connector's epoch.
    changed_at: AtomicU64,
    /// When a failure was last reported, in nanoseconds since the epoch plus one (0: never).
    failed_at: AtomicU64,
    /// A background probe is running.
    probing: AtomicBool,
    /// The state machine; `down` mirrors its verdict for lock-free reads.
    state: std::sync::Mutex<EndpointState>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A permanent refusal is answered from memory for this long: every connect and checkout in
/// that time gets it at once, without a login of its own (a fixed IAM policy or role is seen
/// within this much).
pub(crate) const REFUSAL_MEMORY: Duration = Duration::from_secs(5);
/// A wait for the client-side rate limit must leave at least this much of the connect
/// deadline (or `connect_timeout`, if shorter) to the attempt it is for.
const MIN_ATTEMPT: Duration = Duration::from_millis(500);

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

/// The health of one endpoint of a [`DsqlConnector`], from
/// [`DsqlConnector::endpoint_health`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct EndpointHealth {
    /// The endpoint host.
    pub endpoint: String,
    /// Its Region.
    pub region: String,
    /// `false` while it is marked down (always `true` with a single endpoint).
    pub up: bool,
    /// When it was last marked down or up; `None` if it never was.
    pub changed_at: Option<std::time::Instant>,
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

    /// Opens a connection and spawns its connection task on the current tokio runtime. The
    /// task's error, if the connection ends with one, is logged with `tracing` at `warn`.
    ///
    /// How refusals are handled (see [`guide::refusals`](crate::guide::refusals)):
    ///
    /// - `rate exceeded`, `too many open connections`, `waking up`: tried again after a backoff
    ///   with full jitter (at most 2 s), with the same token, until
    ///   [`connect_deadline`](crate::DsqlConfigBuilder::connect_deadline); then
    ///   [`Error::Unavailable`].
    /// - access denied: the cached token is dropped (the next connect asks the credentials
    ///   provider again). `Signature expired` is tried once more at once with a freshly signed
    ///   token; every other reason fails at once with [`Error::AccessDenied`].
    /// - an attempt running past [`connect_timeout`](crate::DsqlConfigBuilder::connect_timeout):
    ///   [`Error::ConnectTimeout`], not retried (with several endpoints: the next endpoint is
    ///   tried, see the type's docs). TLS failures: [`Error::Tls`].
    pub async fn connect(&self) -> Result<tokio_postgres::Client, Error> {
        let deadline = after(self.inner.config.connect.deadline);
        let connected = self.connect_within(deadline, Retry::Refusals).await?;
        Ok(connected.client)
    }

    /// [`connect`](Self::connect) with an explicit deadline; with [`Retry::Transient`], I/O
    /// failures, attempt timeouts and a server that is starting or shutting down are retried
    /// with backoff too (the pool's connects, which have no caller to retry them).
    pub(crate) async fn connect_within(
        &self,
        deadline: Instant,
        retry: Retry,
    ) -> Result<Connected, Error> {
        let config = &self.inner.config;
        let span = tracing::info_span!(
            "dsql.connect",
            endpoint = tracing::field::Empty,
            user = %config.user,
            region = tracing::field::Empty,
            negotiation = ?config.ssl_negotiation,
            attempts = tracing::field::Empty,
            outcome = tracing::field::Empty,
            duration_ms = tracing::field::Empty,
        );
        let started = Instant::now();
        let mut attempts = 0;
        let mut last = self.serving().clone();
        let result = self
            .attempts(deadline, retry, &mut attempts, &mut last)
            .instrument(span.clone())
            .await;
        let took = started.elapsed();
        span.record("endpoint", last.described.as_str());
        span.record("region", last.region.as_str());
        span.record("attempts", attempts);
        span.record("duration_ms", took.as_millis() as u64);
        match &result {
            Ok(_) => {
                span.record("outcome", "connected");
                crate::telemetry::connection_opened(&last.endpoint);
                crate::telemetry::connect_duration(&last.endpoint, took);
            }
            Err(error) => {
                let reason = crate::telemetry::connect_error_reason(error);
                span.record("outcome", reason);
                crate::telemetry::connect_error(&last.endpoint, reason);
            }
        }
        result
    }

    /// The attempts of [`connect_within`](Self::connect_within), counted in `attempts`; `last`
    /// is the endpoint of the last attempt.
    async fn attempts(
        &self,
        deadline: Instant,
        retry: Retry,
        attempts: &mut u32,
        last: &mut Arc<Target>,
    ) -> Result<Connected, Error> {
        let several = self.inner.targets.len() > 1;
        let mut backoffs = 0;
        let mut resigned = false;
        // Endpoints that failed at the network during this connect.
        let mut failed_here = vec![false; self.inner.targets.len()];
        // The last transient refusal, retried after a backoff.
        let mut last_refusal: Option<Error> = None;
        loop {
            let target = self.pick(&failed_here).clone();
            *last = target.clone();
            let attempt_started = Instant::now();
            let outcome = match self.token_within(&target, deadline).await {
                Err(error) => Err(error),
                Ok(token) => {
                    if let Some(refusal) = target.remembered_refusal(&token) {
                        return Err(refusal);
                    }
                    if let Err(timeout) = self.wait_for_rate_limit(deadline, &target).await {
                        // A refusal being retried says more than the limiter's timeout.
                        return Err(last_refusal.unwrap_or(timeout));
                    }
                    *attempts += 1;
                    self.attempt(&target, token, deadline).await
                }
            };
            let error = match outcome {
                Ok((client, session)) => {
                    self.record_success(&target, "a connect succeeded");
                    if target.throttle.admitted() {
                        tracing::info!(
                            endpoint = %target.described,
                            "DSQL admits connections again; the connect throttle is lifted"
                        );
                    }
                    return Ok(Connected {
                        client,
                        session,
                        target,
                    });
                }
                Err(AttemptError::Refused(source, token)) => {
                    let error = self.connect_error(&target, source, *attempts);
                    if !matches!(
                        &error,
                        Error::AccessDenied {
                            reason: AccessDeniedReason::SignatureExpired,
                            ..
                        }
                    ) || resigned
                    {
                        target.remember_refusal(&error, &token);
                    }
                    if matches!(error, Error::AccessDenied { .. }) {
                        // The credentials may have been rotated or revoked, or the token is
                        // stale: forget it, unless it was replaced already.
                        if target.tokens.invalidate_refused(&token)
                            && let Some(cache) = &self.inner.credentials_cache
                        {
                            cache.forget();
                        }
                    }
                    error
                }
                Err(AttemptError::TimedOut(error)) => error,
                // The deadline cut the attempt short: the deadline's doing, not the endpoint's
                // (nothing is recorded against it). After a refusal that was being retried,
                // that refusal says more than the timeout.
                Err(AttemptError::DeadlinePassed(error)) => {
                    return Err(last_refusal.unwrap_or(error));
                }
            };
            let retry_after_backoff = match &error {
                Error::AccessDenied { reason, .. } => {
                    if *reason == AccessDeniedReason::SignatureExpired && !resigned {
                        resigned = true;
                        tracing::info!(
                            endpoint = %target.described,
                            "DSQL refused the token as expired; retrying once with a fresh one"
                        );
                        continue;
                    }
                    false
                }
                Error::UnknownRole { .. } => false,
                Error::Unavailable { reason, .. } => {
                    if matches!(
                        reason,
                        UnavailableReason::RateExceeded | UnavailableReason::TooManyConnections
                    ) && let Some(rate) = target.throttle.refused(Instant::now())
                    {
                        tracing::info!(
                            endpoint = %target.described,
                            %reason,
                            per_second = rate,
                            "DSQL refused for its admission limits; new connections to this \
                             endpoint are throttled"
                        );
                    }
                    true
                }
                other if means_endpoint_down(other) => {
                    self.record_failure(&target, other, attempt_started);
                    if several {
                        failed_here[target.index] = true;
                        if failed_here.iter().any(|failed| !failed) {
                            // This connect tries the next endpoint at once, whether or not
                            // this endpoint is marked down for the others yet.
                            continue;
                        }
                    }
                    retry == Retry::Transient && other.is_transient()
                }
                other => retry == Retry::Transient && other.is_transient(),
            };
            if !retry_after_backoff {
                return Err(error);
            }
            backoffs += 1;
            let delay = match &error {
                Error::Unavailable { reason, .. } => admission::backoff_after(*reason, backoffs),
                _ => admission::backoff(backoffs),
            };
            if Instant::now()
                .checked_add(delay)
                .is_none_or(|at| at >= deadline)
            {
                if let Error::Unavailable {
                    reason: UnavailableReason::WakingUp,
                    ..
                } = &error
                {
                    // Still waking up after the whole connect deadline: one failure of the
                    // endpoint, for practical purposes.
                    self.record_failure(&target, &error, attempt_started);
                }
                return Err(error);
            }
            // Another round over every endpoint.
            failed_here.fill(false);
            tracing::debug!(
                endpoint = %target.described,
                %error,
                attempt = *attempts,
                delay_ms = delay.as_millis() as u64,
                "could not connect to DSQL; retrying after a backoff"
            );
            last_refusal = matches!(error, Error::Unavailable { .. }).then_some(error);
            tokio::time::sleep(delay).await;
        }
    }

    /// The token for an attempt on `target`, within `deadline` (a slow re-sign is bounded by
    /// `credentials_timeout`; one that outlasts the deadline is the deadline's doing).
    async fn token_within(
        &self,
        target: &Target,
        deadline: Instant,
    ) -> Result<AuthToken, AttemptError> {
        match tokio::time::timeout_at(deadline, target.tokens.get()).await {
            Ok(token) => token.map_err(AttemptError::TimedOut),
            Err(_) => Err(AttemptError::DeadlinePassed(Error::ConnectTimeout {
                endpoint: target.described.clone(),
                timeout: self.inner.config.connect.deadline,
                during: "the connect deadline (connect_deadline) ran out while a token was \
                         signed (credentials_timeout bounds the credentials call)",
            })),
        }
    }

    /// One connect attempt to `target` with `token`, bounded by `connect_timeout` and
    /// `deadline`; spawns the connection task when it succeeds.
    async fn attempt(
        &self,
        target: &Target,
        token: AuthToken,
        deadline: Instant,
    ) -> Result<(tokio_postgres::Client, Arc<SessionWatch>), AttemptError> {
        let settings = &self.inner.config.connect;
        let mut postgres = target.postgres.clone();
        postgres.password(token.as_str());
        let left = deadline.saturating_duration_since(Instant::now());
        let bound = settings.timeout.min(left);
        let (tls, watch) = self.inner.tls.watched();
        match tokio::time::timeout(bound, postgres.connect(tls)).await {
            Ok(Ok((client, connection))) => {
                let endpoint = target.described.clone();
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        tracing::warn!(%endpoint, %error, "DSQL connection ended with an error");
                    }
                });
                Ok((client, watch))
            }
            Ok(Err(source)) => Err(AttemptError::Refused(source, token)),
            // An attempt the deadline left (nearly) all of `connect_timeout` ran out on the
            // endpoint's silence, not on the deadline (a deadline derived from
            // `connect_timeout` alone is exactly one attempt per endpoint).
            Err(_) if bound < settings.timeout.mul_f64(0.9) => {
                Err(AttemptError::DeadlinePassed(Error::ConnectTimeout {
                    endpoint: target.described.clone(),
                    timeout: bound,
                    during: "the connect deadline (connect_deadline) ran out during an attempt",
                }))
            }
            Err(_) => Err(AttemptError::TimedOut(Error::ConnectTimeout {
                endpoint: target.described.clone(),
                timeout: settings.timeout,
                during: "one attempt: TCP, TLS, startup and authentication (connect_timeout)",
            })),
        }
    }

    /// The endpoint new connections go to: the first not marked down (or the preferred one,
    /// if all are), skipping those that failed during this connect while another remains.
    fn pick(&self, failed_here: &[bool]) -> &Arc<Target> {
        let targets = &self.inner.targets;
        let candidates = || targets.iter().filter(|t| !failed_here[t.index]);
        candidates()
            .find(|t| !t.health.down.load(Ordering::Acquire))
            .or_else(|| candidates().next())
            .unwrap_or(&targets[0])
    }

    /// The endpoint new connections go to now.
    fn serving(&self) -> &Arc<Target> {
        let targets = &self.inner.targets;
        targets
            .iter()
            .find(|t| !t.health.down.load(Ordering::Acquire))
            .unwrap_or(&targets[0])
    }

    /// Records a failure of `target` at the network (a connect, a probe, or a transaction
    /// helper's lost connection or attempt timeout) and marks it down when the policy says so
    /// (only with several endpoints). Returns whether it is down now.
    pub(crate) fn record_failure(
        &self,
        target: &Arc<Target>,
        error: &dyn std::fmt::Display,
        started: Instant,
    ) -> bool {
        if self.inner.targets.len() < 2 {
            return false;
        }
        let policy = &self.inner.config.failover;
        let now = Instant::now();
        target
            .health
            .failed_at
            .store(self.since_epoch() + 1, Ordering::Release);
        let mut state = target.health.lock();
        let down_for = match state.failure(policy, now, started) {
            AfterFailure::StillDown => return true,
            AfterFailure::SameStall => return false,
            AfterFailure::Counted {
                failures,
                successes,
            } => {
                tracing::debug!(
                    endpoint = %target.described,
                    failures,
                    successes,
                    %error,
                    "DSQL endpoint failed; not marked down yet"
                );
                return false;
            }
            AfterFailure::MarkedDown { down_for } => down_for,
        };
        target.health.down.store(true, Ordering::Release);
        drop(state);
        target
            .health
            .changed_at
            .store(self.since_epoch(), Ordering::Release);
        let next = self.serving();
        tracing::warn!(
            endpoint = %target.described,
            region = %target.region,
            serving = %next.described,
            failures = policy.down_after_failures,
            down_for_ms = down_for.as_millis() as u64,
            %error,
            "DSQL endpoint marked down; new connections go to the next endpoint"
        );
        crate::telemetry::endpoint_marked(&target.endpoint, false);
        if !target.health.probing.swap(true, Ordering::AcqRel) {
            self.spawn_probe(target.clone());
        }
        true
    }

    /// Records a success on `target`: clears its failures, and while it is down counts toward
    /// marking it up (failback) once its minimum down time has passed.
    fn record_success(&self, target: &Target, how: &'static str) {
        if self.inner.targets.len() < 2 {
            return;
        }
        let policy = &self.inner.config.failover;
        let now = Instant::now();
        let mut state = target.health.lock();
        if !state.success(policy, now) {
            return;
        }
        target.health.down.store(false, Ordering::Release);
        drop(state);
        target
            .health
            .changed_at
            .store(self.since_epoch(), Ordering::Release);
        tracing::info!(
            endpoint = %target.described,
            region = %target.region,
            how,
            successes = policy.up_after_successes,
            failback_window_ms = policy.failback_window.as_millis() as u64,
            "DSQL endpoint is up again; new connections return to it"
        );
        crate::telemetry::endpoint_marked(&target.endpoint, true);
    }

    fn since_epoch(&self) -> u64 {
        self.inner.epoch.elapsed().as_nanos() as u64
    }

    /// Probes `target` while it is down: one attempt (bounded by `connect_timeout`) after each
    /// jittered `failback_probe_interval`, each success counting toward marking it up. Holds
    /// no strong reference between attempts, so it ends when the last clone of the connector
    /// is dropped.
    fn spawn_probe(&self, target: Arc<Target>) {
        let connector = Arc::downgrade(&self.inner);
        let interval = self.inner.config.failback_probe_interval;
        tokio::spawn(async move {
            loop {
                // No probe before the minimum down time has passed: it could not mark the
                // endpoint up, and every probe is a login against the cluster's budget.
                let served_at = target.health.lock().served_at();
                if let Some(at) = served_at {
                    tokio::time::sleep_until(at).await;
                }
                tokio::time::sleep(interval.mul_f64(0.5 + fastrand::f64())).await;
                let Some(inner) = connector.upgrade() else {
                    return;
                };
                let connector = DsqlConnector { inner };
                if target.health.down.load(Ordering::Acquire) {
                    // A probe is a login like any other: it takes a slot of the endpoint's
                    // client-side rate limit, and waits at most one interval for it.
                    if let Some(limiter) = &target.limiter {
                        let now = Instant::now();
                        match limiter.reserve(now, now + interval) {
                            Some(slot) => {
                                tokio::time::sleep(slot.wait()).await;
                                slot.keep();
                            }
                            None => continue,
                        }
                    }
                    let deadline = after(connector.inner.config.connect.timeout);
                    let probe_started = Instant::now();
                    let attempt = async {
                        let token = connector.token_within(&target, deadline).await?;
                        connector.attempt(&target, token, deadline).await
                    };
                    match attempt.await {
                        Ok((client, _)) => {
                            drop(client);
                            connector.record_success(&target, "background probes connected");
                        }
                        Err(error) => {
                            let error = match error {
                                AttemptError::Refused(source, _) => {
                                    connector.connect_error(&target, source, 1)
                                }
                                AttemptError::TimedOut(error)
                                | AttemptError::DeadlinePassed(error) => error,
                            };
                            if means_endpoint_down(&error) {
                                connector.record_failure(&target, &error, probe_started);
                            }
                            tracing::debug!(
                                endpoint = %target.described,
                                %error,
                                "DSQL endpoint still down"
                            );
                        }
                    }
                    if target.health.down.load(Ordering::Acquire) {
                        continue;
                    }
                }
                // Up: stop, unless it went down again meanwhile with no other probe started.
                target.health.probing.store(false, Ordering::Release);
                if !target.health.down.load(Ordering::Acquire)
                    || target.health.probing.swap(true, Ordering::AcqRel)
                {
                    return;
                }
            }
        });
    }

    /// Each endpoint and whether it is up, the preferred one first.
    pub fn endpoint_health(&self) -> Vec<EndpointHealth> {
        self.inner
            .targets
            .iter()
            .map(|t| {
                let changed = t.health.changed_at.load(Ordering::Acquire);
                EndpointHealth {
                    endpoint: t.endpoint.clone(),
                    region: t.region.clone(),
                    up: !t.health.down.load(Ordering::Acquire),
                    changed_at: (changed > 0)
                        .then(|| self.inner.epoch.into_std() + Duration::from_nanos(changed)),
                }
            })
            .collect()
    }

    /// The index of the endpoint new connections go to now (0: the preferred one).
    pub(crate) fn serving_index(&self) -> usize {
        self.serving().index
    }

    /// The endpoint new connections go to now: the first one not marked down.
    pub fn serving_endpoint(&self) -> &str {
        &self.serving().endpoint
    }

    /// For a pool's checkout: what to do with a connection to `target`, last used at
    /// `last_used` (see [`Checkout`]). `failback_after` is the connection's own share of the
    /// failback window.
    pub(crate) fn checkout_rule(
        &self,
        target: &Target,
        opened_at: Instant,
        last_used: Instant,
        failback_after: Duration,
    ) -> Checkout {
        if self.inner.targets.len() < 2 {
            return Checkout::Keep;
        }
        let used = last_used
            .saturating_duration_since(self.inner.epoch)
            .as_nanos() as u64;
        if target.health.down.load(Ordering::Acquire) {
            // A connection not used since its endpoint last failed is not trusted; one used
            // since is checked with a ping, and kept if it answers.
            let failed_at = target.health.failed_at.load(Ordering::Acquire);
            return if failed_at > 0 && used < failed_at - 1 {
                Checkout::Leave("endpoint_down")
            } else {
                Checkout::Check
            };
        }
        // Due once the better endpoint has been up, and this connection open, for its share
        // of the window (a connection opened here after the failback began waits its share
        // too, so a connect that failed over again does not churn).
        let now = self.since_epoch();
        let opened = opened_at
            .saturating_duration_since(self.inner.epoch)
            .as_nanos() as u64;
        let back = self.inner.targets[..target.index].iter().any(|better| {
            let since = better.health.changed_at.load(Ordering::Acquire).max(opened);
            !better.health.down.load(Ordering::Acquire)
                && now.saturating_sub(since) >= failback_after.as_nanos() as u64
        });
        if back {
            Checkout::Leave("failback")
        } else {
            Checkout::Keep
        }
    }

    /// Whether pools may be moving back to an endpoint now: one other than the last is up and
    /// came up less than a failback window (plus a little) ago.
    pub(crate) fn failback_in_progress(&self) -> bool {
        let targets = &self.inner.targets;
        let window = self.inner.config.failover.failback_window + Duration::from_secs(5);
        let now = self.since_epoch();
        targets[..targets.len().saturating_sub(1)].iter().any(|t| {
            let changed = t.health.changed_at.load(Ordering::Acquire);
            changed > 0
                && !t.health.down.load(Ordering::Acquire)
                && now.saturating_sub(changed) < window.as_nanos() as u64
        })
    }

    /// For the transaction helpers: a transaction committed on `target`. While it is up, this
    /// counts among the successes its failures are weighed against (a few timeouts among many
    /// commits are not an outage); it never marks a down endpoint up (probes do).
    pub(crate) fn report_ok(&self, target: &Target) {
        if self.inner.targets.len() < 2 || target.health.down.load(Ordering::Acquire) {
            return;
        }
        target
            .health
            .lock()
            .committed(&self.inner.config.failover, Instant::now());
    }

    /// For the transaction helpers: a connection to `target` was lost, or an attempt on it
    /// timed out, before `COMMIT`; counts as a failure of its endpoint.
    pub(crate) fn report_lost(&self, target: &Arc<Target>, why: &'static str, started: Instant) {
        self.record_failure(target, &why, started);
    }

    /// Waits for the client-side rate limit, if one is set, or fails if the wait would pass the
    /// deadline.
    async fn wait_for_rate_limit(&self, deadline: Instant, target: &Target) -> Result<(), Error> {
        let now = Instant::now();
        // The attempt after the wait needs time of its own.
        let room = MIN_ATTEMPT.min(self.inner.config.connect.timeout);
        let latest = deadline.checked_sub(room).unwrap_or(now);
        // The configured limit, then the adaptive throttle while the endpoint refuses for its
        // admission limits. Cancelled during a sleep, a reservation gives its token back.
        for bucket in [target.limiter.as_ref(), target.throttle.bucket()]
            .into_iter()
            .flatten()
        {
            match bucket.reserve(Instant::now(), latest) {
                Some(reservation) => {
                    tokio::time::sleep(reservation.wait()).await;
                    reservation.keep();
                }
                None => {
                    return Err(Error::ConnectTimeout {
                        endpoint: target.described.clone(),
                        timeout: self.inner.config.connect.deadline,
                        during: "the wait for the client-side connect rate limit would leave \
                                 too little of the connect deadline for an attempt \
                                 (connect_rate_limit or the throttle after rate exceeded, \
                                 connect_deadline)",
                    });
                }
            }
        }
        Ok(())
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

    /// Turns the error of a connect made outside the connector (with
    /// [`postgres_config`](Self::postgres_config), [`tls`](Self::tls) and a
    /// [`token`](Self::token), e.g. by another pool) into this crate's typed error, exactly as
    /// [`connect`](Self::connect) does: [`Error::AccessDenied`] with the HINT's reason,
    /// [`Error::Unavailable`], [`Error::Tls`] or [`Error::Connect`]. On access denied the cached
    /// token is dropped, so the next [`token`](Self::token) asks the credentials provider again.
    /// (The preferred endpoint's: that is what those three describe.)
    pub fn classify_connect_error(&self, source: tokio_postgres::Error) -> Error {
        let target = &self.inner.targets[0];
        let error = self.connect_error(target, source, 1);
        if matches!(error, Error::AccessDenied { .. }) {
            target.tokens.invalidate_current();
        }
        error
    }

    /// Classifies a failed attempt on `target` (see [`admission::classify`]).
    fn connect_error(
        &self,
        target: &Target,
        source: tokio_postgres::Error,
        attempts: u32,
    ) -> Error {
        let endpoint = target.described.clone();
        if let Some(db) = source.as_db_error() {
            match admission::classify(db.code().code(), db.message(), db.hint()) {
                Some(Refusal::AccessDenied(reason)) => {
                    let hint = db.hint().unwrap_or_default().to_owned();
                    return Error::AccessDenied {
                        endpoint,
                        reason,
                        hint,
                        source: Arc::new(source),
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
                    source: Arc::new(source),
                };
            }
        }
        if is_tls_failure(&source) {
            return Error::Tls {
                host: target.endpoint.clone(),
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

/// What a pool's checkout does with a connection, by its endpoint's health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Checkout {
    /// Hand it out (after the usual checks).
    Keep,
    /// Its endpoint is marked down, but it was used since the endpoint last failed: ping it.
    Check,
    /// Replace it, for this reason (a metric label).
    Leave(&'static str),
}

/// `now + duration`, or a time far enough away when that does not fit the clock.
pub(crate) fn after(duration: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + Duration::from_secs(86_400 * 365))
}

/// How one connect attempt failed.
enum AttemptError {
    /// The server or the network refused it, with this token: classified by
    /// [`DsqlConnector::connect_error`].
    Refused(tokio_postgres::Error, AuthToken),
    /// It ran out of `connect_timeout` (or no token could be had): already this crate's error.
    TimedOut(Error),
    /// The connect deadline ran out during it.
    DeadlinePassed(Error),
}

/// Whether a failed attempt says its endpoint is down: the network failed (TCP, TLS, a silent
/// server, a server closing or restarting), not DSQL's answer to this client.
fn means_endpoint_down(error: &Error) -> bool {
    match error {
        Error::Tls { .. } | Error::ConnectTimeout { .. } => true,
        Error::Connect { .. } => error.is_transient(),
        _ => false,
    }
}

/// The `tokio-postgres` settings for every connection to one endpoint (all but the password).
fn postgres_config(
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
