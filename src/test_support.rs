//! Fixtures shared by the unit tests: a manual clock and an instrumented credentials provider.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_credential_types::provider::{self, ProvideCredentials, future};
use aws_smithy_async::time::TimeSource;

/// A clock that moves only when told to.
#[derive(Debug, Clone)]
pub(crate) struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    pub(crate) fn at(epoch_secs: u64) -> Self {
        ManualClock(Arc::new(Mutex::new(
            SystemTime::UNIX_EPOCH + Duration::from_secs(epoch_secs),
        )))
    }

    pub(crate) fn advance(&self, by: Duration) {
        *self.0.lock().unwrap() += by;
    }

    pub(crate) fn set(&self, epoch_secs: u64) {
        *self.0.lock().unwrap() = SystemTime::UNIX_EPOCH + Duration::from_secs(epoch_secs);
    }
}

impl TimeSource for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap()
    }
}

/// A provider that counts its calls, can be made to fail, and can be held mid-call.
#[derive(Debug, Clone)]
pub(crate) struct CountingProvider {
    credentials: Arc<Mutex<Credentials>>,
    calls: Arc<AtomicUsize>,
    pub(crate) fail: Arc<AtomicBool>,
    gate: Arc<tokio::sync::RwLock<()>>,
    called: Arc<tokio::sync::Notify>,
}

/// While alive, calls to the provider wait.
pub(crate) struct Hold(#[allow(dead_code)] tokio::sync::OwnedRwLockWriteGuard<()>);

impl Hold {
    pub(crate) fn release(self) {}
}

impl CountingProvider {
    pub(crate) fn new(credentials: Credentials) -> Self {
        CountingProvider {
            credentials: Arc::new(Mutex::new(credentials)),
            calls: Arc::default(),
            fail: Arc::default(),
            gate: Arc::default(),
            called: Arc::default(),
        }
    }

    pub(crate) fn set(&self, credentials: Credentials) {
        *self.credentials.lock().unwrap() = credentials;
    }

    pub(crate) fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    pub(crate) fn hold(&self) -> Hold {
        Hold(
            self.gate
                .clone()
                .try_write_owned()
                .expect("not already held"),
        )
    }

    pub(crate) async fn wait_until_called(&self, n: usize) {
        loop {
            let notified = self.called.notified();
            if self.calls() >= n {
                return;
            }
            notified.await;
        }
    }
}

impl ProvideCredentials for CountingProvider {
    fn provide_credentials<'a>(&'a self) -> future::ProvideCredentials<'a>
    where
        Self: 'a,
    {
        future::ProvideCredentials::new(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            self.called.notify_waiters();
            let _pass = self.gate.read().await;
            if self.fail.load(Ordering::SeqCst) {
                return Err(provider::error::CredentialsError::not_loaded(
                    "test provider told to fail",
                ));
            }
            Ok(self.credentials.lock().unwrap().clone())
        })
    }
}
