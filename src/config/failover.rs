//! [`FailoverPolicy`]: when the connector takes an endpoint of a multi-Region cluster for down,
//! and when for up again.

use std::time::Duration;

/// How a connector with several endpoints decides that one is down and up again, and how fast
/// pools move back to it (see [`guide::multi_region`](crate::guide::multi_region) for the state machine and
/// the fleet figures behind the defaults).
///
/// - **Down** after [`down_after_failures`](Self::down_after_failures) failures at the network
///   (TCP refused or reset, TLS, an attempt that ran its whole `connect_timeout`, a server
///   closing during startup; lost connections and attempt timeouts reported by
///   [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction)) within
///   [`failure_window`](Self::failure_window) of the first, when they are at least as many as
///   the successes in that window: a blip among many successes is not an outage, a link that
///   loses half its connects is. Attempts in flight together count once (only an attempt
///   started after the last counted failure is new evidence), so one stall that fails a pool's
///   ten connects at once is one failure. Never because a
///   connect deadline or a wait for the client-side rate limit cut an attempt short, and never
///   for a refusal the peer would give too (access denied, an unknown role, `rate exceeded`,
///   `too many open connections`). One failed connect still tries the peer at once for itself.
/// - **Down for at least** [`min_down`](Self::min_down), doubled each time the endpoint goes
///   down again within [`max_down`](Self::max_down) of coming up (flap damping), up to
///   `max_down`.
/// - **Up** after [`up_after_successes`](Self::up_after_successes) background probes in a row
///   succeed (one every `failback_probe_interval`, jittered) once the minimum down time has
///   passed.
/// - **Failback** moves pooled connections back over
///   [`failback_window`](Self::failback_window): each connection on the peer is replaced at a
///   checkout after its own uniformly drawn share of the window, so a fleet of `n` connections
///   opens about `n / window` new connections a second on the recovered endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct FailoverPolicy {
    /// Failures that mark an endpoint down (with at most as many successes among them).
    /// Default 3.
    pub down_after_failures: u32,
    /// The window they must fall in. Default 10 s.
    pub failure_window: Duration,
    /// The shortest time an endpoint stays down. Default 5 s.
    pub min_down: Duration,
    /// The longest minimum down time flap damping reaches, and how long an endpoint must stay
    /// up for the damping to be forgotten. Default 60 s.
    pub max_down: Duration,
    /// Probe successes in a row that mark it up. Default 3.
    pub up_after_successes: u32,
    /// The spread over which pools move back to a recovered endpoint. Default 60 s: 6 000
    /// connections at DSQL's 100 new connections a second.
    pub failback_window: Duration,
}

/// Default [`FailoverPolicy::down_after_failures`].
pub const DEFAULT_DOWN_AFTER_FAILURES: u32 = 3;
/// Default [`FailoverPolicy::failure_window`].
pub const DEFAULT_FAILURE_WINDOW: Duration = Duration::from_secs(10);
/// Default [`FailoverPolicy::min_down`].
pub const DEFAULT_MIN_DOWN: Duration = Duration::from_secs(5);
/// Default [`FailoverPolicy::max_down`].
pub const DEFAULT_MAX_DOWN: Duration = Duration::from_secs(60);
/// Default [`FailoverPolicy::up_after_successes`].
pub const DEFAULT_UP_AFTER_SUCCESSES: u32 = 3;
/// Default [`FailoverPolicy::failback_window`].
pub const DEFAULT_FAILBACK_WINDOW: Duration = Duration::from_secs(60);

impl Default for FailoverPolicy {
    fn default() -> Self {
        FailoverPolicy {
            down_after_failures: DEFAULT_DOWN_AFTER_FAILURES,
            failure_window: DEFAULT_FAILURE_WINDOW,
            min_down: DEFAULT_MIN_DOWN,
            max_down: DEFAULT_MAX_DOWN,
            up_after_successes: DEFAULT_UP_AFTER_SUCCESSES,
            failback_window: DEFAULT_FAILBACK_WINDOW,
        }
    }
}

impl FailoverPolicy {
    /// Sets [`down_after_failures`](Self::down_after_failures) and
    /// [`failure_window`](Self::failure_window).
    #[must_use]
    pub fn down_after(mut self, failures: u32, window: Duration) -> Self {
        self.down_after_failures = failures;
        self.failure_window = window;
        self
    }

    /// Sets [`min_down`](Self::min_down) and [`max_down`](Self::max_down).
    #[must_use]
    pub fn down_for(mut self, min: Duration, max: Duration) -> Self {
        self.min_down = min;
        self.max_down = max;
        self
    }

    /// Sets [`up_after_successes`](Self::up_after_successes).
    #[must_use]
    pub fn up_after(mut self, successes: u32) -> Self {
        self.up_after_successes = successes;
        self
    }

    /// Sets [`failback_window`](Self::failback_window).
    #[must_use]
    pub fn failback_window(mut self, window: Duration) -> Self {
        self.failback_window = window;
        self
    }

    /// Names the first setting out of range.
    pub(crate) fn check(&self) -> Result<(), crate::Error> {
        let bad = |field: &'static str, reason: &str| Err(crate::Error::config(field, reason));
        if self.down_after_failures == 0 {
            return bad("failover.down_after_failures", "must be at least 1");
        }
        if self.up_after_successes == 0 {
            return bad("failover.up_after_successes", "must be at least 1");
        }
        for (field, value) in [
            ("failover.failure_window", self.failure_window),
            ("failover.min_down", self.min_down),
            ("failover.max_down", self.max_down),
            ("failover.failback_window", self.failback_window),
        ] {
            if value > super::MAX_DURATION {
                return bad(field, "must be at most 3600 s");
            }
        }
        if self.failure_window.is_zero() {
            return bad("failover.failure_window", "must be more than 0");
        }
        if self.max_down < self.min_down {
            return bad("failover.max_down", "must be at least min_down");
        }
        Ok(())
    }
}
