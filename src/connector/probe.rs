//! The background probe of an endpoint marked down: one login attempt per jittered interval
//! once its minimum down time has passed, each outcome reported to its state machine.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::time::Instant;

use super::connect::{AttemptError, means_endpoint_down};
use super::{DsqlConnector, Target, after};

impl DsqlConnector {
    /// Probes `target` while it is down: one attempt (bounded by `connect_timeout`) after each
    /// jittered `failback_probe_interval`, each success counting toward marking it up. Holds
    /// no strong reference between attempts, so it ends when the last clone of the connector
    /// is dropped.
    pub(super) fn spawn_probe(&self, target: Arc<Target>) {
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
}
