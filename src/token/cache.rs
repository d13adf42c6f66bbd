//! The token cache behind [`DsqlConnector::token`](crate::DsqlConnector::token).
//!
//! Rules, each tested below with a manual clock:
//!
//! - One token serves every caller until its **refresh point**, 80 % of its life. A hit is one
//!   atomic load, a coarse clock read and a reference-count increment.
//! - No token is ever handed out within its **safety margin** of expiry (a tenth of the
//!   configured token life, at most 30 s), so a connection never starts its handshake with a
//!   token about to lapse. A token that would be born inside its margin (credentials that expire
//!   within it) is refused as a credentials error.
//! - At the refresh point the first caller starts a **background re-sign** and, like every
//!   caller while it runs, gets the current token at once: callers holding a usable token never
//!   wait on the credentials provider. Past the margin (or with no token yet) callers wait for
//!   the one re-sign in flight; only one re-sign ever runs.
//! - Each credentials call is bounded by the **credentials timeout** (default 5 s). A failure
//!   (error or timeout) is shared by every caller that was waiting for that re-sign, and starts
//!   a **backoff** (1 s, doubling to 30 s) during which the provider is not called again: a
//!   caller without a usable token gets the last failure at once. So a failing provider is
//!   called at most once per backoff period, however many callers there are.
//! - Credentials are asked for at each re-sign, so rotated credentials are picked up at the next
//!   refresh point, and at once after [`TokenCache::invalidate`] (which the connector calls when
//!   the server refuses a token). A re-sign that was in flight when `invalidate` was called does
//!   not store its token: it may have been signed with the credentials that were just refused.
//! - A token never outlives the credentials that signed it.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_async::time::SharedTimeSource;
use tracing::Instrument;

use super::{Action, AuthToken, TokenSigner};
use crate::Error;

/// Refresh once this fraction (in percent) of a token's life has passed.
const REFRESH_AT_PERCENT: u32 = 80;
/// Upper bound of the safety margin before expiry.
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(30);
/// The wait before calling a provider again after its first failure; it doubles with each
/// failure in a row, up to [`MAX_FAILURE_BACKOFF`].
const FIRST_FAILURE_BACKOFF: Duration = Duration::from_secs(1);
/// The longest wait between calls to a failing provider.
const MAX_FAILURE_BACKOFF: Duration = Duration::from_secs(30);
/// Refused tokens are forgotten at most this often (each time costs a credentials call).
pub(crate) const MIN_INVALIDATION_INTERVAL: Duration = Duration::from_secs(1);

struct Cached {
    token: AuthToken,
    refresh_at: SystemTime,
    usable_until: SystemTime,
}

/// Publishes a failure if a re-sign ends without an outcome (the credentials provider
/// panicked, or the task was cancelled), so that the callers waiting for it do not wait for
/// ever.
struct Unfinished<'a>(Option<&'a TokenCache>);

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if let Some(cache) = self.0 {
            cache.publish(
                Err(Error::Credentials {
                    reason: "the re-sign ended without an answer from the credentials provider \
                             (it panicked, or its task was cancelled)"
                        .into(),
                    source: None,
                }),
                0,
            );
        }
    }
}

/// The last failed re-sign, kept to answer callers during the backoff.
#[derive(Clone)]
struct Failure {
    reason: String,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
    /// No provider call before this (the monotonic clock: a wall clock stepped back must not
    /// freeze the backoff).
    retry_at: tokio::time::Instant,
    /// The value of the completion counter this failure was published with.
    round: u64,
}

impl Failure {
    fn to_error(&self) -> Error {
        Error::Credentials {
            reason: self.reason.clone(),
            source: self
                .source
                .clone()
                .map(|s| Box::new(SharedSource(s)) as Box<dyn std::error::Error + Send + Sync>),
        }
    }
}

/// A failure's cause, shared by every caller that gets it.
#[derive(Debug)]
struct SharedSource(Arc<dyn std::error::Error + Send + Sync>);

impl std::fmt::Display for SharedSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for SharedSource {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

#[derive(Default)]
struct State {
    /// A re-sign is in flight.
    refreshing: bool,
    /// Bumped by `invalidate`.
    generation: u64,
    failure: Option<Failure>,
    failures_in_a_row: u32,
    /// When `invalidate_refused` last forgot a token.
    invalidated_at: Option<tokio::time::Instant>,
}

pub(crate) struct TokenCache {
    signer: TokenSigner,
    action: Action,
    duration: Duration,
    margin: Duration,
    credentials_timeout: Duration,
    provider: SharedCredentialsProvider,
    /// `None`: the system clock, read directly (a cache hit is dominated by the clock read, so
    /// it skips the dynamic call).
    clock: Option<SharedTimeSource>,
    current: ArcSwapOption<Cached>,
    state: Mutex<State>,
    /// Counts finished re-signs (success or failure); waiters watch it.
    finished: tokio::sync::watch::Sender<u64>,
}

impl TokenCache {
    pub(crate) fn new(
        signer: TokenSigner,
        action: Action,
        duration: Duration,
        credentials_timeout: Duration,
        provider: SharedCredentialsProvider,
        clock: Option<SharedTimeSource>,
    ) -> Self {
        TokenCache {
            signer,
            action,
            duration,
            margin: (duration / 10).min(MAX_SAFETY_MARGIN),
            credentials_timeout,
            provider,
            clock,
            current: ArcSwapOption::empty(),
            state: Mutex::new(State::default()),
            finished: tokio::sync::watch::Sender::new(0),
        }
    }

    fn now(&self) -> SystemTime {
        match &self.clock {
            Some(clock) => clock.now(),
            None => SystemTime::now(),
        }
    }

    /// The time for the hit check: the system's coarse clock where there is one. It lags the
    /// precise clock by a few milliseconds and never leads it, so a hit may come that much after
    /// the refresh point, which is still far inside the token's usable life (the refresh point is
    /// at least 10 % of the life before the safety margin).
    fn now_for_hit(&self) -> SystemTime {
        #[cfg(target_os = "linux")]
        if self.clock.is_none() {
            let now = rustix::time::clock_gettime(rustix::time::ClockId::RealtimeCoarse);
            return SystemTime::UNIX_EPOCH
                + Duration::new(
                    now.tv_sec.max(0) as u64,
                    now.tv_nsec.clamp(0, 999_999_999) as u32,
                );
        }
        self.now()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The current token, re-signing when the rules above say so.
    pub(crate) async fn get(self: &Arc<Self>) -> Result<AuthToken, Error> {
        if let Some(cached) = self.current.load().as_ref()
            && self.now_for_hit() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        // Past the refresh point (the coarse clock never leads the precise one).
        let mut finished = self.finished.subscribe();
        let waiting_since = *finished.borrow_and_update();
        loop {
            {
                let mut state = self.lock();
                let now = self.now();
                if let Some(cached) = self.current.load().as_ref()
                    && now < cached.usable_until
                {
                    if now >= cached.refresh_at {
                        self.start_resign(&mut state);
                    }
                    return Ok(cached.token.clone());
                }
                if let Some(failure) = &state.failure
                    && (failure.round > waiting_since
                        || tokio::time::Instant::now() < failure.retry_at)
                {
                    // The re-sign this caller waited for failed, or the provider is in its
                    // backoff: no call now.
                    return Err(failure.to_error());
                }
                self.start_resign(&mut state);
            }
            if finished.changed().await.is_err() {
                // Cannot happen while `self` is alive (it owns the sender).
                return Err(Error::Credentials {
                    reason: "the token cache was dropped".into(),
                    source: None,
                });
            }
        }
    }

    /// Starts a background re-sign unless one is in flight or the provider is backing off.
    fn start_resign(self: &Arc<Self>, state: &mut State) {
        if state.refreshing
            || state
                .failure
                .as_ref()
                .is_some_and(|failure| tokio::time::Instant::now() < failure.retry_at)
        {
            return;
        }
        state.refreshing = true;
        let generation = state.generation;
        let cache = self.clone();
        let span = tracing::debug_span!("dsql.token.resign", host = cache.signer.host());
        tokio::spawn(async move { cache.resign(generation).await }.instrument(span));
    }

    /// Forgets the current token: the next [`get`](Self::get) asks for credentials and re-signs.
    #[cfg(test)]
    pub(crate) fn invalidate(&self) {
        let mut state = self.lock();
        state.generation += 1;
        self.current.store(None);
    }

    /// After the server refused an unknown token (a connect made outside the connector):
    /// forgets the current one, at most once per [`MIN_INVALIDATION_INTERVAL`].
    pub(crate) fn invalidate_current(&self) -> bool {
        match self.current.load().as_ref() {
            Some(cached) => self.invalidate_refused(&cached.token.clone()),
            None => false,
        }
    }

    /// After the server refused `refused`: forgets it if it is still the current token, at
    /// most once per [`MIN_INVALIDATION_INTERVAL`], and says whether it did. Refusals of a
    /// token already replaced (a burst of connects that all used it) change nothing, so they
    /// neither wipe the fresh token nor cancel the re-sign in flight: one refusal costs at
    /// most one credentials call.
    pub(crate) fn invalidate_refused(&self, refused: &AuthToken) -> bool {
        let mut state = self.lock();
        let holds = self
            .current
            .load()
            .as_ref()
            .is_some_and(|cached| cached.token.as_str() == refused.as_str());
        let recent = state
            .invalidated_at
            .is_some_and(|at| at.elapsed() < MIN_INVALIDATION_INTERVAL);
        if !holds || recent {
            return false;
        }
        state.invalidated_at = Some(tokio::time::Instant::now());
        state.generation += 1;
        self.current.store(None);
        true
    }

    /// Asks the provider for credentials, signs a new token and publishes the outcome.
    async fn resign(&self, generation: u64) {
        let mut unfinished = Unfinished(Some(self));
        let outcome = self.sign_fresh().await;
        unfinished.0 = None;
        self.publish(outcome, generation);
    }

    /// Publishes a re-sign's outcome to the cache and to the callers waiting for it.
    fn publish(&self, outcome: Result<Cached, Error>, generation: u64) {
        let mut state = self.lock();
        state.refreshing = false;
        match outcome {
            Ok(cached) => {
                crate::telemetry::token_signed(self.signer.host());
                state.failure = None;
                state.failures_in_a_row = 0;
                if state.generation == generation {
                    tracing::debug!(
                        host = self.signer.host(),
                        action = %self.action,
                        expires_at = ?cached.token.expires_at(),
                        "signed a new DSQL auth token"
                    );
                    self.current.store(Some(Arc::new(cached)));
                } else {
                    tracing::debug!(
                        "the token cache was invalidated during a re-sign; its token is dropped"
                    );
                }
            }
            Err(error) => {
                state.failures_in_a_row += 1;
                let backoff = FIRST_FAILURE_BACKOFF
                    .saturating_mul(1 << (state.failures_in_a_row - 1).min(10))
                    .min(MAX_FAILURE_BACKOFF);
                tracing::warn!(
                    %error,
                    retry_in_secs = backoff.as_secs(),
                    "could not sign a DSQL auth token"
                );
                let (reason, source) = match error {
                    Error::Credentials { reason, source } => (reason, source.map(Arc::from)),
                    other => (other.to_string(), None),
                };
                state.failure = Some(Failure {
                    reason,
                    source,
                    retry_at: tokio::time::Instant::now() + backoff,
                    round: *self.finished.borrow() + 1,
                });
            }
        }
        drop(state);
        self.finished.send_modify(|round| *round += 1);
    }

    async fn sign_fresh(&self) -> Result<Cached, Error> {
        let fetch = tokio::time::timeout(
            self.credentials_timeout,
            self.provider.provide_credentials(),
        )
        .instrument(tracing::debug_span!("dsql.credentials.fetch"));
        let fetched = fetch.await;
        if !matches!(fetched, Ok(Ok(_))) {
            crate::telemetry::credentials_fetch_error(self.signer.host());
        }
        let credentials = match fetched {
            Ok(Ok(credentials)) => credentials,
            Ok(Err(e)) => {
                return Err(Error::Credentials {
                    reason: "the credentials provider failed; the default chain looks at \
                             AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, \
                             SSO, web identity, ECS and EC2 instance roles"
                        .into(),
                    source: Some(Box::new(e)),
                });
            }
            Err(_) => {
                return Err(Error::Credentials {
                    reason: format!(
                        "the credentials provider did not answer within {:?} \
                         (credentials_timeout)",
                        self.credentials_timeout
                    ),
                    source: None,
                });
            }
        };
        let now = self.now();
        let life = self.life(&credentials, now)?;
        let token = self.signer.sign(&credentials, self.action, life, now);
        let usable_until = token.expires_at() - self.margin;
        let refresh_at = (now + life * REFRESH_AT_PERCENT / 100).min(usable_until);
        Ok(Cached {
            refresh_at,
            usable_until,
            token,
        })
    }

    /// The configured life, capped at what is left of temporary credentials; an error if that
    /// leaves no life outside the safety margin.
    fn life(&self, credentials: &Credentials, now: SystemTime) -> Result<Duration, Error> {
        let Some(expiry) = credentials.expiry() else {
            return Ok(self.duration);
        };
        // Whole seconds only, rounded down, so the token never outlives the credentials.
        let left = expiry
            .duration_since(now)
            .map(|left| Duration::from_secs(left.as_secs()))
            .unwrap_or_default();
        if left <= self.margin {
            return Err(Error::Credentials {
                reason: if left.is_zero() {
                    format!(
                        "the credentials for access key {} have expired; the provider returned \
                         credentials that are no longer valid",
                        credentials.access_key_id()
                    )
                } else {
                    format!(
                        "the credentials for access key {} expire in {} s, within the token's \
                         {} s safety margin; the provider must return credentials valid for \
                         longer",
                        credentials.access_key_id(),
                        left.as_secs(),
                        self.margin.as_secs_f64()
                    )
                },
                source: None,
            });
        }
        Ok(self.duration.min(left))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_CREDENTIALS_TIMEOUT;
    use crate::test_support::{CountingProvider, ManualClock};
    use aws_smithy_async::time::TimeSource;
    use std::sync::atomic::Ordering;

    const T0: u64 = 1_724_716_800;

    fn setup(duration_secs: u64, provider: &CountingProvider) -> (Arc<TokenCache>, ManualClock) {
        let clock = ManualClock::at(T0);
        let cache = TokenCache::new(
            TokenSigner::new("abc.dsql.us-east-1.on.aws", "us-east-1"),
            Action::DbConnect,
            Duration::from_secs(duration_secs),
            DEFAULT_CREDENTIALS_TIMEOUT,
            SharedCredentialsProvider::new(provider.clone()),
            Some(SharedTimeSource::new(clock.clone())),
        );
        (Arc::new(cache), clock)
    }

    /// Waits until no re-sign is in flight.
    async fn settle(cache: &TokenCache) {
        loop {
            let mut finished = cache.finished.subscribe();
            if !cache.lock().refreshing {
                return;
            }
            finished.changed().await.unwrap();
        }
    }

    fn key_of(token: &AuthToken) -> &str {
        let start = token.as_str().find("Credential=").unwrap() + "Credential=".len();
        let rest = &token.as_str()[start..];
        &rest[..rest.find("%2F").unwrap()]
    }

    #[tokio::test]
    async fn one_token_until_the_refresh_point_then_a_background_resign() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        assert_eq!(first.expires_at(), clock.now() + Duration::from_secs(900));
        clock.advance(Duration::from_secs(719));
        assert_eq!(cache.get().await.unwrap(), first);
        assert_eq!(provider.calls(), 1);
        clock.advance(Duration::from_secs(1)); // 720 s = 80 %
        // The caller that reaches the refresh point is not kept waiting: it gets the current
        // token while the re-sign runs in the background.
        assert_eq!(cache.get().await.unwrap(), first);
        settle(&cache).await;
        let second = cache.get().await.unwrap();
        assert_ne!(second, first);
        assert_eq!(provider.calls(), 2);
        assert_eq!(second.expires_at(), clock.now() + Duration::from_secs(900));
    }

    #[tokio::test(start_paused = true)]
    async fn never_hands_out_a_token_inside_the_safety_margin() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        // The provider fails from now on: inside the refresh window the old token is still
        // handed out, inside the margin (last 30 s) it is not.
        provider.fail.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(869));
        assert_eq!(cache.get().await.unwrap(), first);
        settle(&cache).await;
        assert_eq!(provider.calls(), 2);
        clock.advance(Duration::from_secs(1)); // 870 s: 30 s left; the 1 s backoff is over
        tokio::time::advance(Duration::from_secs(1)).await;
        let err = cache.get().await.unwrap_err();
        assert!(matches!(err, Error::Credentials { .. }), "{err}");
        assert_eq!(provider.calls(), 3);
        // The provider recovers, but the cache waits out its backoff (now 2 s) first.
        provider.fail.store(false, Ordering::SeqCst);
        assert!(cache.get().await.is_err());
        assert_eq!(provider.calls(), 3);
        clock.advance(Duration::from_secs(2));
        tokio::time::advance(Duration::from_secs(2)).await;
        let fresh = cache.get().await.unwrap();
        assert_eq!(fresh.expires_at(), clock.now() + Duration::from_secs(900));
    }

    #[tokio::test]
    async fn short_lives_use_a_proportional_margin() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(10, &provider);
        let first = cache.get().await.unwrap();
        provider.fail.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(8)); // refresh point, fails, 2 s left > 1 s margin
        assert_eq!(cache.get().await.unwrap(), first);
        settle(&cache).await;
        clock.advance(Duration::from_secs(1)); // 1 s left = margin
        assert!(cache.get().await.is_err());
    }

    #[tokio::test]
    async fn life_is_capped_at_the_credentials_expiry() {
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + 300);
        let creds = Credentials::new("AK1", "s1", Some("session".into()), Some(expiry), "test");
        let provider = CountingProvider::new(creds);
        let (cache, clock) = setup(900, &provider);
        let token = cache.get().await.unwrap();
        assert_eq!(token.expires_at(), expiry);
        assert!(token.as_str().contains("X-Amz-Expires=300&"));
        // 80 % of 300 s.
        clock.advance(Duration::from_secs(239));
        assert_eq!(cache.get().await.unwrap(), token);
        clock.advance(Duration::from_secs(1));
        assert_eq!(cache.get().await.unwrap(), token);
        settle(&cache).await;
        let renewed = cache.get().await.unwrap();
        assert!(renewed.as_str().contains("X-Amz-Expires=60&"));
    }

    #[tokio::test]
    async fn credentials_expiring_inside_the_margin_sign_no_token() {
        // 20 s left, and the margin of a 900 s token is 30 s: a token signed now would be
        // inside its own margin from birth.
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + 20);
        let creds = Credentials::new("AK1", "s1", Some("session".into()), Some(expiry), "test");
        let provider = CountingProvider::new(creds);
        let (cache, _clock) = setup(900, &provider);
        let err = cache.get().await.unwrap_err();
        assert!(err.to_string().contains("expire in 20 s"), "{err}");
    }

    #[tokio::test]
    async fn expired_credentials_are_an_error_without_secrets() {
        let expiry = SystemTime::UNIX_EPOCH + Duration::from_secs(T0);
        let creds = Credentials::new("AK1", "s3cr3t", Some("tok3n".into()), Some(expiry), "test");
        let provider = CountingProvider::new(creds);
        let (cache, _clock) = setup(900, &provider);
        let err = cache.get().await.unwrap_err();
        let shown = format!("{err} {err:?}");
        assert!(
            shown.contains("AK1") && shown.contains("expired"),
            "{shown}"
        );
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("tok3n"),
            "{shown}"
        );
    }

    #[tokio::test]
    async fn rotated_credentials_are_used_at_the_next_refresh_and_after_invalidate() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        assert_eq!(key_of(&cache.get().await.unwrap()), "AK1");
        provider.set(Credentials::from_keys("AK2", "s2", None));
        // Not before the refresh point: the provider is not asked on a hit.
        assert_eq!(key_of(&cache.get().await.unwrap()), "AK1");
        clock.advance(Duration::from_secs(720));
        cache.get().await.unwrap();
        settle(&cache).await;
        assert_eq!(key_of(&cache.get().await.unwrap()), "AK2");
        provider.set(Credentials::from_keys("AK3", "s3", None));
        cache.invalidate();
        assert_eq!(key_of(&cache.get().await.unwrap()), "AK3");
    }

    #[tokio::test]
    async fn a_hung_provider_does_not_delay_callers_holding_a_usable_token() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        clock.advance(Duration::from_secs(800)); // past the refresh point, still usable
        let gate = provider.hold();
        // Many callers at once: one re-sign starts (one provider call), nobody waits.
        let callers: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get().await.unwrap() })
            })
            .collect();
        for caller in callers {
            assert_eq!(caller.await.unwrap(), first);
        }
        provider.wait_until_called(2).await;
        for _ in 0..50 {
            assert_eq!(cache.get().await.unwrap(), first);
        }
        assert_eq!(provider.calls(), 2);
        gate.release();
        settle(&cache).await;
        let second = cache.get().await.unwrap();
        assert_ne!(second, first);
        assert_eq!(provider.calls(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn past_the_margin_a_hung_provider_times_out_with_an_error_naming_it() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        cache.get().await.unwrap();
        clock.advance(Duration::from_secs(880)); // inside the margin
        let _gate = provider.hold();
        let started = tokio::time::Instant::now();
        let err = cache.get().await.unwrap_err();
        assert!(
            err.to_string()
                .contains("credentials provider did not answer within 5s"),
            "{err}"
        );
        // Paused time: exactly the credentials timeout went by.
        assert_eq!(started.elapsed(), DEFAULT_CREDENTIALS_TIMEOUT);
    }

    #[tokio::test]
    async fn without_a_usable_token_callers_wait_for_a_single_resign() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, _clock) = setup(900, &provider);
        let gate = provider.hold();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get().await.unwrap() })
            })
            .collect();
        provider.wait_until_called(1).await;
        tokio::task::yield_now().await;
        gate.release();
        let mut tokens = Vec::new();
        for caller in callers {
            tokens.push(caller.await.unwrap());
        }
        assert!(tokens.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(provider.calls(), 1);
    }

    #[tokio::test]
    async fn one_failure_is_shared_by_every_waiter() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        provider.fail.store(true, Ordering::SeqCst);
        let (cache, _clock) = setup(900, &provider);
        let gate = provider.hold();
        let callers: Vec<_> = (0..20)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.get().await })
            })
            .collect();
        provider.wait_until_called(1).await;
        gate.release();
        for caller in callers {
            let err = caller.await.unwrap().unwrap_err();
            assert!(err.to_string().contains("provider failed"), "{err}");
            assert!(std::error::Error::source(&err).is_some());
        }
        assert_eq!(provider.calls(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_provider_is_called_once_per_backoff_period() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        provider.fail.store(true, Ordering::SeqCst);
        let (cache, clock) = setup(900, &provider);
        for _ in 0..100 {
            assert!(cache.get().await.is_err());
        }
        assert_eq!(provider.calls(), 1, "100 gets, one call");
        // The backoff runs on the monotonic clock: a wall clock stepped back does not freeze
        // it.
        clock.set(T0 - 3600);
        // Backoffs of 1 s, 2 s, 4 s, ...: one more call at each.
        tokio::time::advance(Duration::from_secs(1)).await;
        for _ in 0..100 {
            assert!(cache.get().await.is_err());
        }
        assert_eq!(provider.calls(), 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cache.get().await.is_err());
        assert_eq!(provider.calls(), 2, "still inside the 2 s backoff");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(cache.get().await.is_err());
        assert_eq!(provider.calls(), 3);
        provider.fail.store(false, Ordering::SeqCst);
        tokio::time::advance(Duration::from_secs(4)).await;
        cache.get().await.unwrap();
        assert_eq!(provider.calls(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_refused_token_is_forgotten_at_most_once_a_second() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        assert!(cache.invalidate_refused(&first));
        clock.advance(Duration::from_secs(1));
        let second = cache.get().await.unwrap();
        assert_ne!(first, second);
        // Late refusals of the first token leave the second alone.
        for _ in 0..15 {
            assert!(!cache.invalidate_refused(&first));
        }
        assert_eq!(cache.get().await.unwrap(), second);
        // The second refused within a second of the last invalidation: kept.
        assert!(!cache.invalidate_refused(&second));
        tokio::time::advance(MIN_INVALIDATION_INTERVAL).await;
        assert!(cache.invalidate_refused(&second));
        assert_eq!(provider.calls(), 2);
    }

    #[derive(Debug)]
    struct PanickingProvider;

    impl ProvideCredentials for PanickingProvider {
        fn provide_credentials<'a>(
            &'a self,
        ) -> aws_credential_types::provider::future::ProvideCredentials<'a>
        where
            Self: 'a,
        {
            aws_credential_types::provider::future::ProvideCredentials::new(async {
                panic!("a provider bug")
            })
        }
    }

    #[tokio::test]
    async fn a_panicking_provider_gives_an_error_not_a_hang() {
        let cache = Arc::new(TokenCache::new(
            TokenSigner::new("abc.dsql.us-east-1.on.aws", "us-east-1"),
            Action::DbConnect,
            Duration::from_secs(900),
            DEFAULT_CREDENTIALS_TIMEOUT,
            SharedCredentialsProvider::new(PanickingProvider),
            Some(SharedTimeSource::new(ManualClock::at(T0))),
        ));
        let err = tokio::time::timeout(Duration::from_secs(10), cache.get())
            .await
            .expect("no hang")
            .unwrap_err();
        assert!(err.to_string().contains("panicked"), "{err}");
    }

    #[tokio::test]
    async fn an_invalidate_during_a_resign_is_not_undone() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        clock.advance(Duration::from_secs(800));
        let gate = provider.hold();
        assert_eq!(cache.get().await.unwrap(), first);
        provider.wait_until_called(2).await;
        // The server refuses a token while the re-sign (with the old credentials) is in flight.
        cache.invalidate();
        gate.release();
        settle(&cache).await;
        assert!(
            cache.current.load().is_none(),
            "the in-flight re-sign stored its token after invalidate"
        );
        provider.set(Credentials::from_keys("AK2", "s2", None));
        assert_eq!(key_of(&cache.get().await.unwrap()), "AK2");
        assert_eq!(provider.calls(), 3);
    }
}
