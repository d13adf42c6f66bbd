//! How the retry helpers retry: the [`RetryPolicy`] (attempts, backoff with jitter, the
//! deadline, the attempt timeout) and the bookkeeping every helper shares.

use std::time::Duration;

use super::OccConflict;
// Items the docs link to.
#[cfg(doc)]
use super::{retry_postgres_transaction_on, retry_statement_on, retry_transaction_on};

/// How [`retry_transaction_on`] and [`retry_postgres_transaction_on`] retry.
///
/// Delays grow exponentially from `base_delay`, capped at `max_delay`; with `jitter` on, each
/// delay is drawn uniformly from its upper half ("equal jitter"), so colliding transactions
/// spread out instead of colliding again.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub struct RetryPolicy {
    /// Attempts in total, the first included. Default 5.
    pub max_attempts: u32,
    /// Delay before the second attempt. Default 10 ms.
    pub base_delay: Duration,
    /// Largest delay. Default 1 s.
    pub max_delay: Duration,
    /// Randomize delays. Default on.
    pub jitter: bool,
    /// Give up retrying once this much time has passed since the first attempt began (an
    /// attempt is not cut short; no retry starts whose delay would end past it). Default none:
    /// only `max_attempts` bounds the retries.
    pub deadline: Option<Duration>,
    /// Bound on one attempt, `BEGIN` to the end of `COMMIT`. An attempt past it is abandoned:
    /// with `COMMIT` in flight, the helpers return
    /// [`Error::CommitOutcomeUnknown`](crate::Error::CommitOutcomeUnknown) (`RetryError::OutcomeUnknown`
    /// for [`retry_postgres_transaction_on`]); before `COMMIT`,
    /// [`DsqlPool::retry_transaction`](crate::DsqlPool::retry_transaction) drops the
    /// connection, reports its endpoint's failure (see
    /// [`FailoverPolicy`](crate::FailoverPolicy)) and retries on another connection (nothing
    /// was committed), while the helpers bound to one connection ([`retry_transaction_on`],
    /// [`retry_postgres_transaction_on`], [`retry_statement_on`]) return
    /// [`Error::AttemptTimeout`](crate::Error::AttemptTimeout): the connection itself may be
    /// what stalled, and they cannot replace it.
    /// DSQL ignores `statement_timeout`, and a silent network (a Region cut off) otherwise
    /// holds a statement until the TCP user timeout; set this a little above your slowest
    /// transaction. Default none.
    pub attempt_timeout: Option<Duration>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_secs(1),
            jitter: true,
            deadline: None,
            attempt_timeout: None,
        }
    }
}

impl RetryPolicy {
    /// Sets the number of attempts, the first included (at least 1):
    /// `RetryPolicy::default().with_max_attempts(10)`.
    #[must_use]
    pub fn with_max_attempts(mut self, max_attempts: u32) -> Self {
        self.max_attempts = max_attempts.max(1);
        self
    }

    /// Sets the delays.
    #[must_use]
    pub fn delays(mut self, base: Duration, max: Duration) -> Self {
        self.base_delay = base;
        self.max_delay = max.max(base);
        self
    }

    /// Sets an overall deadline (see [`deadline`](Self::deadline)).
    #[must_use]
    pub fn with_deadline(mut self, deadline: Duration) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Sets a bound on each attempt (see [`attempt_timeout`](Self::attempt_timeout)).
    #[must_use]
    pub fn with_attempt_timeout(mut self, timeout: Duration) -> Self {
        self.attempt_timeout = Some(timeout);
        self
    }

    /// Turns jitter on or off.
    #[must_use]
    pub fn jitter(mut self, jitter: bool) -> Self {
        self.jitter = jitter;
        self
    }

    /// The delay after failed attempt `attempt` (1-based).
    pub fn delay_after(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(31);
        let delay = self
            .base_delay
            .saturating_mul(1u32 << exponent)
            .min(self.max_delay);
        if self.jitter {
            delay / 2 + (delay / 2).mul_f64(fastrand::f64())
        } else {
            delay
        }
    }
}

/// The bookkeeping the retry helpers share: attempts, the deadline, delays, logs and metrics.
pub(crate) struct Attempts<'p> {
    policy: &'p RetryPolicy,
    /// The attempt running or just finished (1-based).
    attempt: u32,
    started: tokio::time::Instant,
}

impl<'p> Attempts<'p> {
    pub(crate) fn new(policy: &'p RetryPolicy) -> Self {
        Attempts {
            policy,
            attempt: 1,
            started: tokio::time::Instant::now(),
        }
    }

    /// Attempts made so far.
    pub(super) fn made(&self) -> u32 {
        self.attempt
    }

    /// The span of the current attempt.
    pub(crate) fn span(&self) -> tracing::Span {
        tracing::debug_span!("dsql.transaction", attempt = self.attempt)
    }

    /// The delay before the next attempt (a retry), or `None` when the attempts or the deadline
    /// are spent (exhausted); counted either way, and logged by `log`, which gets the attempt
    /// that failed and the delay, or whether the deadline (not the count) ran out.
    pub(super) fn next(
        &mut self,
        log: impl FnOnce(u32, Result<Duration, bool>),
    ) -> Option<Duration> {
        let delay = self.policy.delay_after(self.attempt);
        let out_of_time = self
            .policy
            .deadline
            .is_some_and(|deadline| self.started.elapsed().saturating_add(delay) >= deadline);
        if self.attempt >= self.policy.max_attempts.max(1) || out_of_time {
            log(self.attempt, Err(out_of_time));
            crate::telemetry::transaction_retries_exhausted();
            return None;
        }
        log(self.attempt, Ok(delay));
        crate::telemetry::transaction_retry();
        self.attempt += 1;
        Some(delay)
    }

    /// After a connection lost (or an attempt timed out) before `COMMIT`: the delay before the
    /// next attempt, on another connection, or `None` when the attempts or the deadline are
    /// spent.
    pub(crate) fn after_lost_connection(
        &mut self,
        endpoint: &str,
        why: &'static str,
    ) -> Option<Duration> {
        self.next(|attempt, outcome| match outcome {
            Ok(delay) => tracing::info!(
                attempt,
                endpoint,
                why,
                delay_ms = delay.as_millis() as u64,
                "connection lost before COMMIT (nothing committed); retrying on another connection"
            ),
            Err(out_of_time) => tracing::warn!(
                attempts = attempt,
                endpoint,
                why,
                out_of_time,
                "transaction gave up after losing its connection before COMMIT"
            ),
        })
    }

    /// After a conflict: the delay before the next attempt, or `None` when the attempts or the
    /// deadline are spent.
    pub(crate) fn after_conflict(&mut self, conflict: OccConflict) -> Option<Duration> {
        crate::telemetry::transaction_conflict(conflict.code());
        self.next(|attempt, outcome| match outcome {
            Ok(delay) => tracing::debug!(
                attempt,
                code = conflict.code(),
                delay_ms = delay.as_millis() as u64,
                "optimistic-concurrency conflict; retrying the transaction"
            ),
            Err(out_of_time) => tracing::warn!(
                attempts = attempt,
                code = conflict.code(),
                out_of_time,
                "transaction gave up on optimistic-concurrency conflicts"
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_and_are_capped() {
        let policy = RetryPolicy::default()
            .delays(Duration::from_millis(10), Duration::from_millis(100))
            .jitter(false);
        let delays: Vec<_> = (1..=6).map(|a| policy.delay_after(a).as_millis()).collect();
        assert_eq!(delays, vec![10, 20, 40, 80, 100, 100]);
        assert_eq!(policy.delay_after(u32::MAX), Duration::from_millis(100));
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let policy =
            RetryPolicy::default().delays(Duration::from_millis(100), Duration::from_secs(1));
        let samples: Vec<Duration> = (0..2000).map(|_| policy.delay_after(1)).collect();
        assert!(
            samples
                .iter()
                .all(|d| *d >= Duration::from_millis(50) && *d <= Duration::from_millis(100))
        );
        let min = samples.iter().min().unwrap();
        let max = samples.iter().max().unwrap();
        assert!(*max - *min > Duration::from_millis(40), "{min:?}..{max:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_stops_retries_that_would_end_past_it() {
        let policy = RetryPolicy::default()
            .with_max_attempts(100)
            .delays(Duration::from_millis(10), Duration::from_millis(10))
            .jitter(false)
            .with_deadline(Duration::from_millis(35));
        let mut attempts = Attempts::new(&policy);
        assert_eq!(
            attempts.after_conflict(OccConflict::Data),
            Some(Duration::from_millis(10))
        );
        tokio::time::advance(Duration::from_millis(20)).await;
        assert!(attempts.after_conflict(OccConflict::Data).is_some()); // 20 + 10 < 35
        tokio::time::advance(Duration::from_millis(10)).await;
        assert_eq!(attempts.after_conflict(OccConflict::Data), None); // 30 + 10 >= 35
        assert_eq!(attempts.made(), 3);
        // Without a deadline only the attempt count stops it.
        let policy = RetryPolicy::default().with_max_attempts(2);
        let mut attempts = Attempts::new(&policy);
        tokio::time::advance(Duration::from_secs(3600)).await;
        assert!(attempts.after_conflict(OccConflict::Schema).is_some());
        assert_eq!(attempts.after_conflict(OccConflict::Schema), None);
    }

    #[test]
    fn the_longest_delays_and_deadlines_do_not_overflow() {
        let policy = RetryPolicy::default()
            .delays(Duration::MAX, Duration::MAX)
            .jitter(false)
            .with_deadline(Duration::MAX);
        assert_eq!(policy.delay_after(u32::MAX), Duration::MAX);
        let mut attempts = Attempts::new(&policy);
        // The delay would end past any deadline: exhausted, not a panic.
        assert_eq!(attempts.after_conflict(OccConflict::Data), None);
    }

    #[test]
    fn defaults_are_documented_values() {
        let policy = RetryPolicy::default();
        assert_eq!(policy.max_attempts, 5);
        assert_eq!(policy.base_delay, Duration::from_millis(10));
        assert_eq!(policy.max_delay, Duration::from_secs(1));
        assert!(policy.jitter);
        assert_eq!(policy.deadline, None);
        assert_eq!(RetryPolicy::default().with_max_attempts(0).max_attempts, 1);
    }
}
