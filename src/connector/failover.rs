//! What the connector does with its endpoints' health: which endpoint a connect picks, the
//! outcomes it reports to each endpoint's state machine ([`health`](super::health), pure
//! logic), what it logs and counts when an endpoint is marked down or up, and what a pool's
//! checkout does with a connection by its endpoint's health.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use super::health::AfterFailure;
use super::{DsqlConnector, Target};

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

impl DsqlConnector {
    /// The endpoint new connections go to: the first not marked down (or the preferred one,
    /// if all are), skipping those that failed during this connect while another remains.
    pub(super) fn pick(&self, failed_here: &[bool]) -> &Arc<Target> {
        let targets = &self.inner.targets;
        let candidates = || targets.iter().filter(|t| !failed_here[t.index]);
        candidates()
            .find(|t| !t.health.down.load(Ordering::Acquire))
            .or_else(|| candidates().next())
            .unwrap_or(&targets[0])
    }

    /// The endpoint new connections go to now.
    pub(super) fn serving(&self) -> &Arc<Target> {
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
    pub(super) fn record_success(&self, target: &Target, how: &'static str) {
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

    pub(super) fn since_epoch(&self) -> u64 {
        self.inner.epoch.elapsed().as_nanos() as u64
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
}
