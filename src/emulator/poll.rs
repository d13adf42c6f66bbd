//! Busy polling: after a client's connection moves bytes, the relay's runtime keeps polling its
//! sockets for a while instead of going to sleep at once
//! ([`DsqlEmulatorBuilder::busy_poll`](super::DsqlEmulatorBuilder::busy_poll)).
//!
//! A relay in a process of its own costs each statement two more process wake-ups than a
//! direct connection, and on a virtual machine whose idle CPUs halt at once a wake-up on
//! another CPU costs tens of microseconds (measured: `src/guide/performance.md`). A runtime
//! that is still polling when the next message arrives needs no wake-up. Each turn the poller
//! yields to any other runnable thread on its CPU (`sched_yield`), but that CPU never idles;
//! it sleeps once nothing moved for the window, and the next bytes wake it.
//!
//! It polls only while one connection at a time is active (a suite's statements in turn, on
//! one connection or one after another from a pool): when two connections moved bytes within
//! one window of each other, the relay has work from several clients, which keeps it awake
//! anyway, and polling would only take CPU time from them; it waits a window and looks again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// `last` before any bytes moved.
const NEVER: u64 = u64::MAX;

/// When a client's connection last moved bytes, shared by an emulator's connections and its
/// poller.
#[derive(Debug)]
pub(crate) struct Activity {
    /// The origin of `last`.
    base: Instant,
    /// Nanoseconds after `base` when bytes last moved ([`NEVER`] before any).
    last: AtomicU64,
    /// The poller waits on `wake`: bytes that move must notify it.
    asleep: AtomicBool,
    wake: Notify,
    /// Turns polled (each a look at the sockets without waiting), and times woken.
    polls: AtomicU64,
    wakeups: AtomicU64,
    /// The polling window, in nanoseconds.
    window: u64,
    /// The number of the connection that last moved bytes (0: none yet), and the next one's.
    last_connection: AtomicU64,
    next_connection: AtomicU64,
    /// No polling before this (nanoseconds after `base`): two connections moved bytes within
    /// one window of each other.
    shared_until: AtomicU64,
}

impl Activity {
    /// Activity polled for `window` after bytes move.
    pub(crate) fn new(window: Duration) -> Arc<Self> {
        Arc::new(Activity {
            base: Instant::now(),
            last: AtomicU64::new(NEVER),
            asleep: AtomicBool::new(false),
            wake: Notify::new(),
            polls: AtomicU64::new(0),
            wakeups: AtomicU64::new(0),
            window: u64::try_from(window.as_nanos()).unwrap_or(u64::MAX),
            last_connection: AtomicU64::new(0),
            next_connection: AtomicU64::new(1),
            shared_until: AtomicU64::new(0),
        })
    }

    /// A number of its own for a connection's [`mark`](Self::mark)s.
    pub(crate) fn connection(&self) -> u64 {
        self.next_connection.fetch_add(1, Ordering::Relaxed)
    }

    fn now(&self) -> u64 {
        u64::try_from(self.base.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Notes that connection `connection` moved bytes now (and wakes the poller if it sleeps).
    pub(crate) fn mark(&self, connection: u64) {
        let now = self.now();
        let previous = self.last_connection.swap(connection, Ordering::Relaxed);
        if previous != connection
            && previous != 0
            && self.within(now, self.last.load(Ordering::Relaxed))
        {
            self.shared_until
                .store(now.saturating_add(self.window), Ordering::Relaxed);
        }
        // (Sequentially consistent with the poller's `asleep` then `last`: one of the two sees
        // the other's store, so a poller going to sleep is either notified or sees the bytes.)
        self.last.store(now, Ordering::SeqCst);
        if self.asleep.load(Ordering::SeqCst) {
            self.wake.notify_one();
        }
    }

    /// Notes that connection `connection` closed: a connection opened after it, within the
    /// window, is not taken for a second active one.
    pub(crate) fn closed(&self, connection: u64) {
        let _ = self.last_connection.compare_exchange(
            connection,
            0,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Whether `at` (a time of `last`) is within the window before `now`.
    fn within(&self, now: u64, at: u64) -> bool {
        at != NEVER && now.saturating_sub(at) < self.window
    }

    /// Whether bytes moved within the window.
    fn recent(&self) -> bool {
        self.within(self.now(), self.last.load(Ordering::SeqCst))
    }

    /// While several connections are active: how long until the poller looks again.
    fn shared_for(&self) -> Option<Duration> {
        let left = self
            .shared_until
            .load(Ordering::Relaxed)
            .saturating_sub(self.now());
        (left > 0).then(|| Duration::from_nanos(left))
    }

    /// Turns polled so far.
    pub(crate) fn polls(&self) -> u64 {
        self.polls.load(Ordering::Relaxed)
    }

    /// Times the poller was woken from its sleep so far (about: bytes that move while it wakes
    /// can count once more).
    pub(crate) fn wakeups(&self) -> u64 {
        self.wakeups.load(Ordering::Relaxed)
    }

    /// The poller, a task on the relay's runtime: while bytes moved within the window, on one
    /// connection at a time, each turn lets the runtime look at its sockets without waiting (a
    /// task that yields makes it poll them with a zero timeout) and yields to any other
    /// runnable thread on its CPU; while several connections are active it looks again later;
    /// otherwise it sleeps until bytes move. Runs until the runtime stops.
    pub(crate) async fn run(self: Arc<Self>) {
        loop {
            if let Some(wait) = self.shared_for() {
                tokio::time::sleep(wait).await;
                continue;
            }
            if self.recent() {
                self.polls.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
                tokio::task::yield_now().await;
                continue;
            }
            self.asleep.store(true, Ordering::SeqCst);
            // (Bytes that moved between the look above and `asleep` being set left no permit:
            // look again before waiting. A notification after this point leaves one.)
            if !self.recent() {
                self.wake.notified().await;
                self.wakeups.fetch_add(1, Ordering::Relaxed);
            }
            self.asleep.store(false, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    #[test]
    fn recent_within_the_window_only() {
        let activity = Activity::new(HOUR);
        assert!(!activity.recent(), "nothing moved yet");
        let one = activity.connection();
        activity.mark(one);
        assert!(activity.recent());
        let activity = Activity::new(Duration::ZERO);
        activity.mark(activity.connection());
        assert!(!activity.recent());
    }

    #[test]
    fn two_connections_within_one_window_stop_the_polling() {
        let activity = Activity::new(HOUR);
        let (one, two) = (activity.connection(), activity.connection());
        assert_ne!(one, two);
        activity.mark(one);
        activity.mark(one);
        assert_eq!(activity.shared_for(), None, "one connection polls");
        activity.mark(two);
        assert!(
            activity.shared_for().is_some(),
            "two within the window do not"
        );
        // A connection that closed is not a second active one for the next.
        let activity = Activity::new(HOUR);
        let (one, two) = (activity.connection(), activity.connection());
        activity.mark(one);
        activity.closed(one);
        activity.mark(two);
        assert_eq!(activity.shared_for(), None);
        // Once the window has passed since the last bytes, another connection alone polls.
        let activity = Activity::new(Duration::ZERO);
        let (one, two) = (activity.connection(), activity.connection());
        activity.mark(one);
        activity.mark(two);
        assert_eq!(activity.shared_for(), None);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn sleeps_when_nothing_moved_and_wakes_on_bytes() {
        let activity = Activity::new(HOUR);
        let poller = tokio::spawn(activity.clone().run());
        // Nothing moved yet: it sleeps, without a turn.
        while !activity.asleep.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert_eq!(activity.polls(), 0);
        // Bytes moved just now: the poller polls. Let it take a few turns.
        activity.mark(activity.connection());
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(activity.polls() > 0, "it polled while bytes had moved");
        poller.abort();

        // A zero window: it sleeps at once, and a mark wakes it.
        let activity = Activity::new(Duration::ZERO);
        let poller = tokio::spawn(activity.clone().run());
        while !activity.asleep.load(Ordering::SeqCst) {
            tokio::task::yield_now().await;
        }
        assert_eq!(activity.polls(), 0);
        activity.mark(activity.connection());
        while activity.wakeups() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(activity.polls(), 0, "a zero window never polls");
        poller.abort();
    }
}
