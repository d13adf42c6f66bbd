//! An identity cache in front of `aws-config`'s default credentials chain.
//!
//! `DefaultCredentialsChain` (aws-config 1.x) has no cache of its own: each call may be an IMDS,
//! ECS or STS round trip. The token cache already asks for credentials only when it re-signs
//! (every 80 % of a token's life, or after a refused token), but a connector has one token
//! cache per endpoint, and a refused token costs a call. This cache keeps the credentials until
//! [`REFRESH_BEFORE_EXPIRY`] before they expire (credentials without an expiry:
//! [`KEEP_WITHOUT_EXPIRY`]), and forgets them when the server refuses a token signed with them
//! (at most once a second, the token cache's pace).

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider, future};
use tokio::time::Instant;

/// Temporary credentials are fetched again this long before they expire.
pub(crate) const REFRESH_BEFORE_EXPIRY: Duration = Duration::from_secs(5 * 60);
/// Credentials without an expiry (environment, a static profile) are kept this long.
pub(crate) const KEEP_WITHOUT_EXPIRY: Duration = Duration::from_secs(15 * 60);

/// The cache; share it with [`CachedCredentials::provider`].
#[derive(Debug)]
pub(crate) struct CachedCredentials {
    inner: SharedCredentialsProvider,
    cached: Mutex<Option<(Credentials, Instant)>>,
}

impl CachedCredentials {
    pub(crate) fn new(inner: SharedCredentialsProvider) -> Arc<Self> {
        Arc::new(CachedCredentials {
            inner,
            cached: Mutex::new(None),
        })
    }

    /// A provider that answers from this cache.
    pub(crate) fn provider(self: &Arc<Self>) -> SharedCredentialsProvider {
        SharedCredentialsProvider::new(Handle(self.clone()))
    }

    /// Drops the cached credentials: the next call asks the chain.
    pub(crate) fn forget(&self) {
        *self.lock() = None;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<(Credentials, Instant)>> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn fresh(&self, now: SystemTime) -> Option<Credentials> {
        let cached = self.lock();
        let (credentials, fetched) = cached.as_ref()?;
        let fresh = match credentials.expiry() {
            Some(expiry) => expiry
                .duration_since(now)
                .is_ok_and(|left| left > REFRESH_BEFORE_EXPIRY),
            None => fetched.elapsed() < KEEP_WITHOUT_EXPIRY,
        };
        fresh.then(|| credentials.clone())
    }

    async fn get(&self) -> aws_credential_types::provider::Result {
        if let Some(credentials) = self.fresh(SystemTime::now()) {
            return Ok(credentials);
        }
        let credentials = self.inner.provide_credentials().await?;
        *self.lock() = Some((credentials.clone(), Instant::now()));
        Ok(credentials)
    }
}

#[derive(Debug)]
struct Handle(Arc<CachedCredentials>);

impl ProvideCredentials for Handle {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(self.0.get())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_support::CountingProvider;

    #[tokio::test(start_paused = true)]
    async fn credentials_are_kept_until_near_expiry_or_forgotten() {
        let provider = CountingProvider::new(Credentials::from_keys("AK", "s", None));
        let cache = CachedCredentials::new(SharedCredentialsProvider::new(provider.clone()));
        let cached = cache.provider();
        for _ in 0..10 {
            cached.provide_credentials().await.unwrap();
        }
        assert_eq!(provider.calls(), 1);
        tokio::time::advance(KEEP_WITHOUT_EXPIRY).await;
        cached.provide_credentials().await.unwrap();
        assert_eq!(provider.calls(), 2);
        cache.forget();
        cached.provide_credentials().await.unwrap();
        assert_eq!(provider.calls(), 3);
        // Temporary credentials: fetched again inside five minutes of their expiry.
        let soon = SystemTime::now() + REFRESH_BEFORE_EXPIRY - Duration::from_secs(1);
        provider.set(Credentials::new(
            "AK",
            "s",
            Some("t".into()),
            Some(soon),
            "test",
        ));
        cache.forget();
        cached.provide_credentials().await.unwrap();
        cached.provide_credentials().await.unwrap();
        assert_eq!(provider.calls(), 5);
    }
}
