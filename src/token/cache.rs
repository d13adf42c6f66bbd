//! The token cache behind [`DsqlConnector::token`](crate::DsqlConnector::token).
//!
//! Rules, each tested below with a manual clock:
//!
//! - One token serves every caller until its **refresh point**, 80 % of its life. A hit is one
//!   atomic load, a coarse clock read and a reference-count increment.
//! - No token is handed out within its **safety margin** of expiry (10 % of its life, at most
//!   30 s), so a connection never starts its handshake with a token about to lapse.
//! - Between the refresh point and the margin, the first caller re-signs while every other caller
//!   keeps getting the current token without waiting. Past the margin (or with no token yet),
//!   callers wait for the one re-sign in progress; only one caller ever re-signs.
//! - Credentials are asked for at each re-sign, so rotated credentials are picked up at the next
//!   refresh point, and at once after [`TokenCache::invalidate`] (which the connector calls when
//!   the server rejects a token). A token never outlives the credentials that signed it.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};
use aws_smithy_async::time::SharedTimeSource;

use super::{Action, AuthToken, TokenSigner};
use crate::Error;

/// Refresh once this fraction (in percent) of a token's life has passed.
const REFRESH_AT_PERCENT: u32 = 80;
/// Upper bound of the safety margin before expiry.
const MAX_SAFETY_MARGIN: Duration = Duration::from_secs(30);

struct Cached {
    token: AuthToken,
    refresh_at: SystemTime,
    usable_until: SystemTime,
}

pub(crate) struct TokenCache {
    signer: TokenSigner,
    action: Action,
    duration: Duration,
    provider: SharedCredentialsProvider,
    /// `None`: the system clock, read directly (a cache hit is dominated by the clock read, so
    /// it skips the dynamic call).
    clock: Option<SharedTimeSource>,
    current: ArcSwapOption<Cached>,
    resign: tokio::sync::Mutex<()>,
}

impl TokenCache {
    pub(crate) fn new(
        signer: TokenSigner,
        action: Action,
        duration: Duration,
        provider: SharedCredentialsProvider,
        clock: Option<SharedTimeSource>,
    ) -> Self {
        TokenCache {
            signer,
            action,
            duration,
            provider,
            clock,
            current: ArcSwapOption::empty(),
            resign: tokio::sync::Mutex::new(()),
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

    /// The current token, re-signing when the rules above say so.
    pub(crate) async fn get(&self) -> Result<AuthToken, Error> {
        if let Some(cached) = self.current.load().as_ref()
            && self.now_for_hit() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        // Past the refresh point (the coarse clock never leads the precise one). The slow path
        // owns its `Arc` rather than holding an `arc-swap` guard across the await below.
        let now = self.now();
        if let Some(cached) = self.current.load_full()
            && now < cached.usable_until
        {
            if now < cached.refresh_at {
                // Another caller re-signed since the check above.
                return Ok(cached.token.clone());
            }
            // Still safe: re-sign unless someone already is.
            let Ok(_guard) = self.resign.try_lock() else {
                return Ok(cached.token.clone());
            };
            return match self.resign_locked().await {
                Ok(token) => Ok(token),
                Err(error) => {
                    tracing::warn!(
                        error = %error,
                        "could not re-sign the DSQL auth token; using the current one until it nears expiry"
                    );
                    Ok(cached.token.clone())
                }
            };
        }
        let _guard = self.resign.lock().await;
        // Whoever held the lock may have re-signed already.
        if let Some(cached) = self.current.load().as_ref()
            && self.now() < cached.refresh_at
        {
            return Ok(cached.token.clone());
        }
        self.resign_locked().await
    }

    /// Forgets the current token: the next [`get`](Self::get) asks for credentials and re-signs.
    pub(crate) fn invalidate(&self) {
        self.current.store(None);
    }

    /// Asks the provider for credentials and signs a new token. Call with `resign` held.
    async fn resign_locked(&self) -> Result<AuthToken, Error> {
        let credentials =
            self.provider
                .provide_credentials()
                .await
                .map_err(|e| Error::Credentials {
                    reason: "the credentials provider failed; the default chain looks at \
                         AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE and ~/.aws, SSO, \
                         web identity, ECS and EC2 instance roles"
                        .into(),
                    source: Some(Box::new(e)),
                })?;
        let now = self.now();
        let life = self.life(&credentials, now)?;
        let token = self.signer.sign(&credentials, self.action, life, now);
        let issued = token.expires_at() - life;
        let margin = (life / 10).min(MAX_SAFETY_MARGIN);
        let cached = Cached {
            refresh_at: issued + life * REFRESH_AT_PERCENT / 100,
            usable_until: token.expires_at() - margin,
            token: token.clone(),
        };
        tracing::debug!(
            host = self.signer.host(),
            action = %self.action,
            expires_in_secs = life.as_secs(),
            "signed a new DSQL auth token"
        );
        self.current.store(Some(Arc::new(cached)));
        Ok(token)
    }

    /// The configured life, capped at what is left of temporary credentials.
    fn life(&self, credentials: &Credentials, now: SystemTime) -> Result<Duration, Error> {
        let Some(expiry) = credentials.expiry() else {
            return Ok(self.duration);
        };
        match expiry.duration_since(now) {
            Ok(left) if left >= Duration::from_secs(1) => {
                // Whole seconds only, rounded down, so the token never outlives the credentials.
                Ok(self.duration.min(Duration::from_secs(left.as_secs())))
            }
            _ => Err(Error::Credentials {
                reason: format!(
                    "the credentials for access key {} have expired; the provider returned \
                     credentials that are no longer valid",
                    credentials.access_key_id()
                ),
                source: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
            SharedCredentialsProvider::new(provider.clone()),
            Some(SharedTimeSource::new(clock.clone())),
        );
        (Arc::new(cache), clock)
    }

    #[tokio::test]
    async fn one_token_until_the_refresh_point() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        assert_eq!(first.expires_at(), clock.now() + Duration::from_secs(900));
        clock.advance(Duration::from_secs(719));
        assert_eq!(cache.get().await.unwrap(), first);
        assert_eq!(provider.calls(), 1);
        clock.advance(Duration::from_secs(1)); // 720 s = 80 %
        let second = cache.get().await.unwrap();
        assert_ne!(second, first);
        assert_eq!(provider.calls(), 2);
        assert_eq!(second.expires_at(), clock.now() + Duration::from_secs(900));
    }

    #[tokio::test]
    async fn never_hands_out_a_token_inside_the_safety_margin() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        // The provider fails from now on: inside the refresh window the old token is still
        // handed out, inside the margin (last 30 s) it is not.
        provider.fail.store(true, Ordering::SeqCst);
        clock.advance(Duration::from_secs(869));
        assert_eq!(cache.get().await.unwrap(), first);
        clock.advance(Duration::from_secs(1)); // 870 s: 30 s left
        let err = cache.get().await.unwrap_err();
        assert!(matches!(err, Error::Credentials { .. }), "{err}");
        provider.fail.store(false, Ordering::SeqCst);
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
        let renewed = cache.get().await.unwrap();
        assert!(renewed.as_str().contains("X-Amz-Expires=60&"));
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
        assert!(
            cache
                .get()
                .await
                .unwrap()
                .as_str()
                .contains("Credential=AK1%2F")
        );
        provider.set(Credentials::from_keys("AK2", "s2", None));
        // Not before the refresh point: the provider is not asked on a hit.
        assert!(
            cache
                .get()
                .await
                .unwrap()
                .as_str()
                .contains("Credential=AK1%2F")
        );
        clock.advance(Duration::from_secs(720));
        assert!(
            cache
                .get()
                .await
                .unwrap()
                .as_str()
                .contains("Credential=AK2%2F")
        );
        provider.set(Credentials::from_keys("AK3", "s3", None));
        cache.invalidate();
        assert!(
            cache
                .get()
                .await
                .unwrap()
                .as_str()
                .contains("Credential=AK3%2F")
        );
    }

    #[tokio::test]
    async fn while_one_caller_resigns_the_others_get_the_current_token() {
        let provider = CountingProvider::new(Credentials::from_keys("AK1", "s1", None));
        let (cache, clock) = setup(900, &provider);
        let first = cache.get().await.unwrap();
        clock.advance(Duration::from_secs(800)); // past the refresh point, still usable
        let gate = provider.hold();
        let refresher = tokio::spawn({
            let cache = cache.clone();
            async move { cache.get().await.unwrap() }
        });
        provider.wait_until_called(2).await;
        // The refresher is stuck in the provider; 50 other callers are not.
        for _ in 0..50 {
            assert_eq!(cache.get().await.unwrap(), first);
        }
        gate.release();
        let second = refresher.await.unwrap();
        assert_ne!(second, first);
        assert_eq!(cache.get().await.unwrap(), second);
        assert_eq!(provider.calls(), 2);
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
}
