//! The health of one endpoint: [`EndpointState`], a state machine over a sequence of outcomes
//! and the times they happened, as pure logic (no I/O, no clock of its own, no locking), and
//! [`Health`], where the connector keeps it (behind a mutex, with lock-free mirrors for the
//! hot paths). The connector feeds the state machine what its connects, probes and
//! transaction helpers see, and acts on what it answers (log, count, start a probe). The
//! rules are [`FailoverPolicy`]'s:
//!
//! - **Down** after [`down_after_failures`](FailoverPolicy::down_after_failures) failures
//!   within [`failure_window`](FailoverPolicy::failure_window) of the first, when they are at
//!   least as many as the successes seen in that window: a blip among many successes is not
//!   an outage, a lossy link (half of the attempts failing) is.
//! - **One stall is one failure**: attempts that were already in flight when a failure was
//!   counted (a pool's ten connects hanging on one stall) add nothing; only an attempt started
//!   after the last counted failure is new evidence.
//! - **Up** after [`up_after_successes`](FailoverPolicy::up_after_successes) successes in a
//!   row (probes or connects), and not before the endpoint has been down for its minimum down
//!   time; a failure while down starts the count again.
//! - **Flap damping**: down again within [`max_down`](FailoverPolicy::max_down) of coming up
//!   doubles the minimum down time (from [`min_down`](FailoverPolicy::min_down), at most
//!   `max_down`).

use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::Duration;

use tokio::time::Instant;

use crate::FailoverPolicy;

/// What the connector knows of an endpoint's health (kept only with several endpoints); the
/// rules are [`FailoverPolicy`](crate::FailoverPolicy)'s.
#[derive(Default)]
pub(super) struct Health {
    /// Read without a lock on every pick and checkout.
    pub(super) down: AtomicBool,
    /// When it was last marked up or down, in nanoseconds since the connector's epoch.
    pub(super) changed_at: AtomicU64,
    /// When a failure was last reported, in nanoseconds since the epoch plus one (0: never).
    pub(super) failed_at: AtomicU64,
    /// A background probe is running.
    pub(super) probing: AtomicBool,
    /// The state machine; `down` mirrors its verdict for lock-free reads.
    pub(super) state: std::sync::Mutex<EndpointState>,
}

impl Health {
    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, EndpointState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What one endpoint's outcomes have shown so far (see the module docs).
#[derive(Debug, Default, Clone)]
pub(crate) struct EndpointState {
    /// Marked down.
    down: bool,
    /// When the last failure was counted.
    counted_at: Option<Instant>,
    /// Failures and successes since `first_failure` (the window).
    failures: u32,
    successes_in_window: u32,
    first_failure: Option<Instant>,
    /// While down: since when, for how long at least, and successes in a row.
    down_since: Option<Instant>,
    down_for: Duration,
    successes: u32,
    /// When it last came up.
    up_since: Option<Instant>,
}

/// What a failure did to the endpoint's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// It was down already (its run of successes starts again).
    StillDown,
    /// The attempt started before the last counted failure: the same stall, not counted.
    SameStall,
    /// Counted; not enough to mark it down.
    Counted {
        /// Failures in the window so far.
        failures: u32,
        /// Successes in the window so far.
        successes: u32,
    },
    /// Marked down now, for at least this long.
    MarkedDown {
        /// The minimum down time (doubled by flap damping).
        down_for: Duration,
    },
}

impl EndpointState {
    /// Whether it is marked down (the connector reads its lock-free mirror).
    #[cfg(test)]
    pub(crate) fn is_down(&self) -> bool {
        self.down
    }

    /// When a success could mark it up: the end of its minimum down time (`None` while up, or
    /// when nothing bounds it).
    pub(crate) fn served_at(&self) -> Option<Instant> {
        if !self.down {
            return None;
        }
        self.down_since
            .and_then(|since| since.checked_add(self.down_for))
    }

    /// A failure at the network, seen at `now`, of an attempt (or transaction) that started at
    /// `started`.
    pub(crate) fn failure(
        &mut self,
        policy: &FailoverPolicy,
        now: Instant,
        started: Instant,
    ) -> AfterFailure {
        if self.down {
            self.successes = 0;
            return AfterFailure::StillDown;
        }
        if self.counted_at.is_some_and(|at| started < at) {
            return AfterFailure::SameStall;
        }
        self.counted_at = Some(now);
        let window_over = self
            .first_failure
            .is_none_or(|first| now.saturating_duration_since(first) > policy.failure_window);
        if window_over {
            self.first_failure = Some(now);
            self.failures = 0;
            self.successes_in_window = 0;
        }
        self.failures += 1;
        if self.failures < policy.down_after_failures || self.failures < self.successes_in_window {
            return AfterFailure::Counted {
                failures: self.failures,
                successes: self.successes_in_window,
            };
        }
        let flapping = self
            .up_since
            .is_some_and(|up| now.saturating_duration_since(up) < policy.max_down);
        self.down_for = if flapping {
            self.down_for
                .saturating_mul(2)
                .clamp(policy.min_down, policy.max_down)
        } else {
            policy.min_down
        };
        self.down = true;
        self.down_since = Some(now);
        self.successes = 0;
        self.failures = 0;
        self.successes_in_window = 0;
        self.first_failure = None;
        AfterFailure::MarkedDown {
            down_for: self.down_for,
        }
    }

    /// A success (a connect or a probe) at `now`. While up, it counts among the successes of
    /// the failure window (or clears an old window); while down, toward marking it up.
    /// Returns `true` when it marked the endpoint up.
    pub(crate) fn success(&mut self, policy: &FailoverPolicy, now: Instant) -> bool {
        if !self.down {
            if self
                .first_failure
                .is_some_and(|first| now.saturating_duration_since(first) <= policy.failure_window)
            {
                self.successes_in_window += 1;
            } else {
                self.failures = 0;
                self.successes_in_window = 0;
                self.first_failure = None;
            }
            return false;
        }
        self.successes += 1;
        let served = self
            .down_since
            .is_none_or(|since| now.saturating_duration_since(since) >= self.down_for);
        if self.successes < policy.up_after_successes || !served {
            return false;
        }
        self.down = false;
        self.up_since = Some(now);
        self.down_since = None;
        self.successes = 0;
        true
    }

    /// A transaction committed at `now` (the transaction helpers' report). While up and inside
    /// a failure window, it counts among that window's successes; it never marks a down
    /// endpoint up (only connects and probes do).
    pub(crate) fn committed(&mut self, policy: &FailoverPolicy, now: Instant) {
        if self.down {
            return;
        }
        if self
            .first_failure
            .is_some_and(|first| now.saturating_duration_since(first) <= policy.failure_window)
        {
            self.successes_in_window = self.successes_in_window.saturating_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One outcome of a sequence, at a time in milliseconds from the start.
    #[derive(Debug, Clone, Copy)]
    enum Step {
        /// A failure at `at` of an attempt that started at `started`.
        Fail { at: u64, started: u64 },
        /// A connect or probe success.
        Ok { at: u64 },
        /// A committed transaction.
        Commit { at: u64 },
    }
    use Step::*;

    fn fail(at: u64) -> Step {
        Fail { at, started: at }
    }

    /// The default policy (3 failures in 10 s, at least 5 s down, 60 s damping, 3 successes).
    fn policy() -> FailoverPolicy {
        FailoverPolicy::default()
    }

    /// Runs `steps` from a fresh state; returns each mark (`(ms, true)`: down, `false`: up).
    fn run(policy: &FailoverPolicy, steps: &[Step]) -> (EndpointState, Vec<(u64, bool)>) {
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut state = EndpointState::default();
        let mut marks = Vec::new();
        for step in steps {
            match *step {
                Fail { at, started } => {
                    if let AfterFailure::MarkedDown { .. } =
                        state.failure(policy, ms(at), ms(started))
                    {
                        marks.push((at, true));
                    }
                }
                Ok { at } => {
                    if state.success(policy, ms(at)) {
                        marks.push((at, false));
                    }
                }
                Commit { at } => state.committed(policy, ms(at)),
            }
        }
        (state, marks)
    }

    #[test]
    fn a_blip_among_many_successes_does_not_mark_it_down() {
        // Ten commits and connects, then three failures, all in one window: 3 < 10.
        let mut steps: Vec<Step> = vec![fail(0)];
        steps.extend((1..=10).map(|i| Ok { at: i * 100 }));
        steps.extend([fail(1_100), fail(1_200)]);
        let (state, marks) = run(&policy(), &steps);
        assert!(marks.is_empty(), "{marks:?}");
        assert!(!state.is_down());
    }

    #[test]
    fn commits_count_against_failures_like_connects() {
        let mut steps: Vec<Step> = vec![fail(0)];
        steps.extend((1..=5).map(|i| Commit { at: i * 100 }));
        steps.extend([fail(600), fail(700), fail(800)]);
        let (_, marks) = run(&policy(), &steps);
        assert!(marks.is_empty(), "4 failures against 5 commits: {marks:?}");
        let (_, marks) = run(&policy(), &[steps, vec![fail(1_000)]].concat());
        assert_eq!(marks, [(1_000, true)], "5 failures against 5 commits");
    }

    #[test]
    fn half_of_the_attempts_lost_marks_it_down() {
        // 50 % loss, alternating: the third failure meets two successes (3 >= 2).
        let steps = [
            fail(0),
            Ok { at: 100 },
            fail(200),
            Ok { at: 300 },
            fail(400),
        ];
        let (state, marks) = run(&policy(), &steps);
        assert_eq!(marks, [(400, true)]);
        assert!(state.is_down());
        // Whatever the order of a 50 % loss, once as many failures as successes have come,
        // three at least, it is down: every order of 3 failures and 3 successes in a window.
        for order in 0u32..64 {
            if order.count_ones() != 3 {
                continue;
            }
            let steps: Vec<Step> = (0..6u64)
                .map(|i| {
                    if order & (1 << i) != 0 {
                        fail(i * 100)
                    } else {
                        Ok { at: i * 100 }
                    }
                })
                .collect();
            let (state, marks) = run(&policy(), &steps);
            assert!(state.is_down(), "order {order:06b}: {marks:?}");
            assert_eq!(marks.len(), 1, "order {order:06b}: {marks:?}");
        }
    }

    #[test]
    fn a_steady_third_of_the_attempts_lost_keeps_it_up() {
        // One failure in three attempts, evenly spread, for a whole window: each failure meets
        // more successes than failures. (A burst of three failures would still mark it down,
        // whatever the loss over the window.)
        let steps: Vec<Step> = (0..90u64)
            .map(|i| {
                if i % 3 == 0 {
                    fail(i * 100)
                } else {
                    Ok { at: i * 100 }
                }
            })
            .collect();
        let (state, marks) = run(&policy(), &steps);
        assert!(marks.is_empty(), "{marks:?}");
        assert!(!state.is_down());
    }

    #[test]
    fn a_stall_that_times_out_many_attempts_at_once_is_one_failure() {
        // Ten attempts start at 0 and all time out at 3 000: one failure. Then a stall of
        // attempts started after it (a second failure) and one of attempts started before the
        // last counted failure (nothing); a third, started after, marks it down.
        let mut steps: Vec<Step> = (0..10)
            .map(|_| Fail {
                at: 3_000,
                started: 0,
            })
            .collect();
        let (state, marks) = run(&policy(), &steps);
        assert!(marks.is_empty() && !state.is_down(), "{marks:?}");
        steps.extend((0..10).map(|_| Fail {
            at: 6_000,
            started: 3_000,
        }));
        steps.extend((0..10).map(|_| Fail {
            at: 6_500,
            started: 4_000,
        }));
        let (_, marks) = run(&policy(), &steps);
        assert!(
            marks.is_empty(),
            "started before the last counted failure: {marks:?}"
        );
        steps.push(Fail {
            at: 9_000,
            started: 6_600,
        });
        let (_, marks) = run(&policy(), &steps);
        assert_eq!(marks, [(9_000, true)]);
    }

    #[test]
    fn failures_spread_wider_than_the_window_never_mark_it_down() {
        let steps: Vec<Step> = (0..20u64).map(|i| fail(i * 5_100)).collect();
        let (state, marks) = run(&policy(), &steps);
        // A new window at every second failure (each more than 10 s after its window's first).
        assert!(marks.is_empty(), "{marks:?}");
        assert!(!state.is_down());
    }

    #[test]
    fn it_stays_down_for_the_minimum_down_time_and_comes_up_after_three_successes() {
        let mut steps = vec![fail(0), fail(100), fail(200)];
        // Probes succeed from 400 ms: too early to come up, however many.
        steps.extend((1..=10).map(|i| Ok { at: i * 400 }));
        let (state, marks) = run(&policy(), &steps);
        assert_eq!(marks, [(200, true)]);
        assert!(state.is_down());
        assert_eq!(
            state
                .served_at()
                .map(|at| at.duration_since(state.down_since.unwrap())),
            Some(Duration::from_secs(5))
        );
        // From 5.2 s, the next success (the run of successes is long) marks it up.
        steps.push(Ok { at: 5_200 });
        let (state, marks) = run(&policy(), &steps);
        assert_eq!(marks, [(200, true), (5_200, false)]);
        assert!(!state.is_down());
    }

    #[test]
    fn a_failure_while_down_restarts_the_run_of_successes() {
        let steps = [
            fail(0),
            fail(100),
            fail(200),
            Ok { at: 6_000 },
            Ok { at: 6_100 },
            fail(6_200),
            Ok { at: 6_300 },
            Ok { at: 6_400 },
        ];
        let (state, marks) = run(&policy(), &steps);
        assert_eq!(marks, [(200, true)]);
        assert!(state.is_down());
        let (_, marks) = run(&policy(), &[&steps[..], &[Ok { at: 6_500 }]].concat());
        assert_eq!(marks, [(200, true), (6_500, false)]);
    }

    #[test]
    fn commits_never_mark_a_down_endpoint_up_nor_count_toward_it() {
        let mut steps = vec![fail(0), fail(100), fail(200)];
        steps.extend((0..20).map(|i| Commit { at: 6_000 + i * 10 }));
        let (state, marks) = run(&policy(), &steps);
        assert_eq!(marks, [(200, true)]);
        assert!(state.is_down());
        // Two probe successes after them: still down (three in a row are needed, commits
        // are not among them); the third marks it up.
        steps.extend([Ok { at: 6_500 }, Ok { at: 6_600 }]);
        let (state, marks) = run(&policy(), &steps);
        assert!(state.is_down(), "{marks:?}");
        steps.push(Ok { at: 6_700 });
        let (_, marks) = run(&policy(), &steps);
        assert_eq!(marks, [(200, true), (6_700, false)]);
    }

    #[test]
    fn flapping_doubles_the_minimum_down_time_up_to_the_maximum() {
        // Down, up after 5 s, down again at once: 10 s; again: 20, 40, then 60 (the maximum).
        let policy = policy();
        let t0 = Instant::now();
        let ms = |m: u64| t0 + Duration::from_millis(m);
        let mut state = EndpointState::default();
        let mut at = 0u64;
        let mut downs = Vec::new();
        for _ in 0..6 {
            let mut marked = None;
            for _ in 0..3 {
                if let AfterFailure::MarkedDown { down_for } =
                    state.failure(&policy, ms(at), ms(at))
                {
                    marked = Some(down_for);
                }
                at += 10;
            }
            let down_for = marked.expect("three failures in a row mark it down");
            downs.push(down_for.as_secs());
            // Successes just before the (doubled) minimum down time has passed: still down.
            let down_at = at - 10;
            for _ in 0..3 {
                state.success(&policy, ms(down_at + down_for.as_millis() as u64 - 100));
            }
            assert!(state.is_down(), "up before {down_for:?} had passed");
            at = down_at + down_for.as_millis() as u64;
            for _ in 0..3 {
                state.success(&policy, ms(at));
                at += 10;
            }
            assert!(!state.is_down(), "up after its down time and 3 successes");
        }
        assert_eq!(downs, [5, 10, 20, 40, 60, 60]);
        // Up for longer than max_down: the damping is forgotten.
        at += 61_000;
        for _ in 0..3 {
            state.failure(&policy, ms(at), ms(at));
            at += 10;
        }
        assert_eq!(
            state.served_at().map(|s| s.duration_since(ms(at - 10))),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn a_loss_shorter_than_the_minimum_down_time_marks_a_pod_down_at_most_once() {
        // The fleet simulation's lossy scenario, as the policy sees one pod's attempts: any
        // sequence of outcomes within 4 s (the outage and the loss after it) followed by
        // successes only can mark the endpoint down once and up once, never down for less
        // than 5 s. Every sequence of 12 outcomes 300 ms apart, then successes.
        let policy = policy();
        for pattern in 0u32..(1 << 12) {
            let mut steps: Vec<Step> = (0..12u64)
                .map(|i| {
                    if pattern & (1 << i) != 0 {
                        fail(i * 300)
                    } else {
                        Ok { at: i * 300 }
                    }
                })
                .collect();
            steps.extend((0..40u64).map(|i| Ok {
                at: 4_000 + i * 250,
            }));
            let (state, marks) = run(&policy, &steps);
            assert!(!state.is_down(), "pattern {pattern:012b}: {marks:?}");
            assert!(marks.len() <= 2, "pattern {pattern:012b}: {marks:?}");
            if let [(down, true), (up, false)] = marks[..] {
                assert!(up - down >= 5_000, "pattern {pattern:012b}: {marks:?}");
            }
        }
    }
}
