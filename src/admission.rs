//! Connection admission: how a connect failure is classified, how long to wait before trying
//! again, and the token bucket behind both the client-side connect-rate limit and the
//! emulator's admission control.
//!
//! DSQL refuses connections in two families (`DSQL_FACTS` §3):
//!
//! - **access denied** (`FATAL 08006 unable to accept connection, access denied`, the reason in
//!   HINT): permanent, except `Signature expired`, which is worth one retry with a fresh token;
//! - **unavailable**: `53400` rate exceeded, `53300` too many open connections, and a cluster
//!   waking up. Transient: retried with exponential backoff and full jitter inside the connect
//!   deadline, never with a new token (a new token does not make the cluster admit anyone
//!   sooner, and signing one costs a credentials call).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::{AccessDeniedReason, UnavailableReason};

/// What a server's refusal at connect means for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The token was refused.
    AccessDenied(AccessDeniedReason),
    /// The cluster cannot take the connection now.
    Unavailable(UnavailableReason),
}

/// Classifies a server error received while connecting from its SQLSTATE, message and hint.
/// `None`: not one of DSQL's connect refusals (e.g. an unknown role or parameter).
pub(crate) fn classify(code: &str, message: &str, hint: Option<&str>) -> Option<Refusal> {
    let message = message.to_ascii_lowercase();
    if message.contains("access denied") {
        return Some(Refusal::AccessDenied(AccessDeniedReason::from_hint(
            hint.unwrap_or_default(),
        )));
    }
    if code == "53400" || message.contains("rate exceeded") {
        return Some(Refusal::Unavailable(UnavailableReason::RateExceeded));
    }
    if code == "53300" || message.contains("too many open connections") {
        return Some(Refusal::Unavailable(UnavailableReason::TooManyConnections));
    }
    if message.contains("waking up") {
        return Some(Refusal::Unavailable(UnavailableReason::WakingUp));
    }
    None
}

/// The first backoff delay's upper bound after an `Unavailable` refusal.
pub(crate) const BACKOFF_BASE: Duration = Duration::from_millis(100);
/// The largest backoff delay: short enough that a burst of refused clients drains well inside
/// the default 30 s connect deadline, long enough to spread them over several seconds.
pub(crate) const BACKOFF_CAP: Duration = Duration::from_secs(2);

/// The delay after the `refusals`-th refusal (1-based): "full jitter", uniformly random between
/// zero and `min(cap, base * 2^(refusals-1))`, so clients refused together do not come back
/// together.
pub(crate) fn backoff(refusals: u32) -> Duration {
    jittered(BACKOFF_BASE, BACKOFF_CAP, refusals)
}

/// The first delay's upper bound and the largest delay after each kind of refusal. A cluster
/// waking up takes seconds (DSQL_FACTS: "a minute or more"); `rate exceeded` means the whole
/// cluster's budget (100 a second) is spent, so a fleet must spread over seconds, not retry
/// within one; `too many open connections` frees only as other clients close theirs.
pub(crate) fn backoff_bounds(reason: UnavailableReason) -> (Duration, Duration) {
    match reason {
        UnavailableReason::WakingUp => (Duration::from_secs(1), Duration::from_secs(10)),
        UnavailableReason::RateExceeded => (Duration::from_millis(250), Duration::from_secs(5)),
        UnavailableReason::TooManyConnections => {
            (Duration::from_millis(500), Duration::from_secs(10))
        }
    }
}

/// The delay after the `refusals`-th refusal for `reason` (full jitter under
/// [`backoff_bounds`]).
pub(crate) fn backoff_after(reason: UnavailableReason, refusals: u32) -> Duration {
    let (base, cap) = backoff_bounds(reason);
    jittered(base, cap, refusals)
}

fn jittered(base: Duration, cap: Duration, refusals: u32) -> Duration {
    let ceiling = base
        .saturating_mul(1u32 << refusals.saturating_sub(1).min(20))
        .min(cap);
    ceiling.mul_f64(fastrand::f64())
}

/// The connect rate a connector falls back to for an endpoint once it refuses with `53400` or
/// `53300`: two a second, twice a fleet's share of DSQL's 100 a second for a hundred instances
/// (one halving away from it).
pub(crate) const THROTTLE_START: f64 = 2.0;
/// The slowest throttled rate.
pub(crate) const THROTTLE_MIN: f64 = 0.1;
/// Each successful connect while throttled adds this much a second (additive increase).
pub(crate) const THROTTLE_STEP: f64 = 0.5;
/// The throttle lifts once its rate reaches this.
pub(crate) const THROTTLE_CEILING: f64 = 50.0;
/// The rate is halved at most this often (one wave of refusals is one signal).
pub(crate) const THROTTLE_DECREASE_EVERY: Duration = Duration::from_secs(1);

/// An adaptive connect rate for one endpoint (AIMD, as TCP paces itself): off until the cluster
/// refuses for its admission limits, then [`THROTTLE_START`] a second, halved on each further
/// wave of refusals, raised by [`THROTTLE_STEP`] with each connect that gets in, and lifted at
/// [`THROTTLE_CEILING`]. A fleet whose instances each do this converges on the cluster's
/// budget without knowing its own size; `connect_rate_limit` still caps it from above.
#[derive(Debug)]
pub(crate) struct Throttle {
    bucket: TokenBucket,
    state: Mutex<ThrottleState>,
}

#[derive(Debug, Default)]
struct ThrottleState {
    rate: Option<f64>,
    decreased_at: Option<Instant>,
}

impl Default for Throttle {
    fn default() -> Self {
        Throttle {
            bucket: TokenBucket::new(THROTTLE_START, 1),
            state: Mutex::new(ThrottleState::default()),
        }
    }
}

impl Throttle {
    fn lock(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The bucket to reserve from while throttled; `None` when not throttled.
    pub(crate) fn bucket(&self) -> Option<&TokenBucket> {
        self.lock().rate.map(|_| &self.bucket)
    }

    /// The current throttled rate, if any.
    #[cfg(test)]
    pub(crate) fn rate(&self) -> Option<f64> {
        self.lock().rate
    }

    /// The cluster refused for its admission limits: start, or halve, the throttle. Returns
    /// the new rate when it changed.
    pub(crate) fn refused(&self, now: Instant) -> Option<f64> {
        let mut state = self.lock();
        if state
            .decreased_at
            .is_some_and(|at| now.saturating_duration_since(at) < THROTTLE_DECREASE_EVERY)
        {
            return None;
        }
        let rate = match state.rate {
            None => THROTTLE_START,
            Some(rate) => (rate / 2.0).max(THROTTLE_MIN),
        };
        state.rate = Some(rate);
        state.decreased_at = Some(now);
        self.bucket.set(rate, 1);
        self.bucket.drain();
        Some(rate)
    }

    /// A connect got in: raise the throttle; returns `true` when that lifted it.
    pub(crate) fn admitted(&self) -> bool {
        let mut state = self.lock();
        let Some(rate) = state.rate else {
            return false;
        };
        let rate = rate + THROTTLE_STEP;
        if rate >= THROTTLE_CEILING {
            state.rate = None;
            state.decreased_at = None;
            return true;
        }
        state.rate = Some(rate);
        self.bucket.set(rate, 1);
        false
    }
}

/// A token bucket: `rate` tokens a second, at most `burst` stored.
#[derive(Debug)]
pub(crate) struct TokenBucket {
    state: Mutex<BucketState>,
}

#[derive(Debug)]
struct BucketState {
    rate: f64,
    burst: f64,
    /// May be negative: tokens promised to callers that are waiting for them.
    tokens: f64,
    updated: Instant,
}

impl BucketState {
    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        self.updated = self.updated.max(now);
    }
}

impl TokenBucket {
    /// A full bucket. `rate` must be positive and `burst` at least 1 (callers check).
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        TokenBucket {
            state: Mutex::new(BucketState {
                rate,
                burst: f64::from(burst),
                tokens: f64::from(burst),
                updated: Instant::now(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BucketState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the rate and burst, keeping the tokens there are (at most the new burst).
    pub(crate) fn set(&self, rate: f64, burst: u32) {
        let mut state = self.lock();
        state.refill(Instant::now());
        state.rate = rate;
        state.burst = f64::from(burst);
        state.tokens = state.tokens.min(state.burst);
    }

    /// Takes a token if one is there now (the server side: refuse when empty).
    #[cfg(test)]
    pub(crate) fn try_take(&self, now: Instant) -> bool {
        let mut state = self.lock();
        state.refill(now);
        if state.tokens >= 1.0 {
            state.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Reserves the next token and says how long to wait for it (the client side: callers
    /// queue in arrival order). `None`, with nothing reserved, if the token would come after
    /// `latest`. The token goes back to the bucket if the reservation is dropped before
    /// [`Reservation::keep`] (a connect cancelled while it waits).
    pub(crate) fn reserve(&self, now: Instant, latest: Instant) -> Option<Reservation<'_>> {
        let mut state = self.lock();
        state.refill(now);
        let wait = if state.tokens >= 1.0 {
            Duration::ZERO
        } else {
            // Beyond any `Duration` (a rate the builder refuses): never, which is after `latest`.
            match Duration::try_from_secs_f64((1.0 - state.tokens) / state.rate) {
                Ok(wait) => wait,
                Err(_) => return None,
            }
        };
        if now.checked_add(wait).is_none_or(|at| at > latest) {
            return None;
        }
        state.tokens -= 1.0;
        Some(Reservation {
            bucket: self,
            wait,
            kept: false,
        })
    }

    /// Empties the bucket (keeping reservations already promised): the next token comes after
    /// a full interval at the current rate.
    pub(crate) fn drain(&self) {
        let mut state = self.lock();
        state.refill(Instant::now());
        state.tokens = state.tokens.min(0.0);
    }

    /// Returns a token a reservation did not use.
    fn give_back(&self) {
        let mut state = self.lock();
        state.tokens = (state.tokens + 1.0).min(state.burst);
    }
}

/// A token promised by [`TokenBucket::reserve`]: returned to the bucket when dropped unless
/// kept.
#[derive(Debug)]
pub(crate) struct Reservation<'a> {
    bucket: &'a TokenBucket,
    wait: Duration,
    kept: bool,
}

impl Reservation<'_> {
    /// How long to wait for the token.
    pub(crate) fn wait(&self) -> Duration {
        self.wait
    }

    /// The token is used (its wait is over and the attempt goes out).
    pub(crate) fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        if !self.kept {
            self.bucket.give_back();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_whose_next_token_is_beyond_any_duration_never_panics() {
        // The builder refuses such rates; the limiter must not panic on one regardless.
        for rate in [1e-20, f64::MIN_POSITIVE] {
            let bucket = TokenBucket::new(rate, 1);
            let now = Instant::now();
            bucket.reserve(now, now).unwrap().keep();
            assert!(
                bucket
                    .reserve(now, now + Duration::from_secs(3600))
                    .is_none()
            );
        }
    }

    #[test]
    fn dsql_refusals_are_classified() {
        use AccessDeniedReason as D;
        use UnavailableReason as U;
        let denied = "unable to accept connection, access denied";
        for (code, message, hint, expected) in [
            (
                "08006",
                denied,
                Some("Signature expired: x"),
                Some(Refusal::AccessDenied(D::SignatureExpired)),
            ),
            (
                "08006",
                denied,
                Some("Wrong user to action mapping. user: admin, action: DbConnect"),
                Some(Refusal::AccessDenied(D::WrongAction)),
            ),
            ("08006", denied, None, Some(Refusal::AccessDenied(D::Other))),
            (
                "53400",
                "Unable to accept connection, rate exceeded.",
                None,
                Some(Refusal::Unavailable(U::RateExceeded)),
            ),
            (
                "53300",
                "Unable to accept connection, too many open connections.",
                None,
                Some(Refusal::Unavailable(U::TooManyConnections)),
            ),
            (
                "08006",
                "unable to accept connection, waking up cluster, please retry later",
                None,
                Some(Refusal::Unavailable(U::WakingUp)),
            ),
            (
                "53300",
                "sorry, too many clients already",
                None,
                Some(Refusal::Unavailable(U::TooManyConnections)),
            ),
            ("28000", "role \"nobody\" does not exist", None, None),
            (
                "0A000",
                "setting configuration parameter \"x\" not supported",
                None,
                None,
            ),
        ] {
            assert_eq!(classify(code, message, hint), expected, "{code} {message}");
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_a_growing_capped_ceiling() {
        for refusals in 1..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << (refusals - 1).min(20))
                .min(BACKOFF_CAP);
            let samples: Vec<Duration> = (0..500).map(|_| backoff(refusals)).collect();
            assert!(samples.iter().all(|d| *d <= ceiling), "{refusals}");
            // Spread over the whole range, from near zero to near the ceiling.
            let min = samples.iter().min().unwrap();
            let max = samples.iter().max().unwrap();
            assert!(*min < ceiling / 10 && *max > ceiling * 9 / 10, "{refusals}");
        }
        assert_eq!(BACKOFF_CAP, Duration::from_secs(2));
    }

    #[test]
    fn bucket_refuses_when_empty_and_refills_at_its_rate() {
        let bucket = TokenBucket::new(5.0, 2);
        let t0 = Instant::now();
        assert!(bucket.try_take(t0));
        assert!(bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
        assert!(!bucket.try_take(t0 + Duration::from_millis(150)));
        assert!(bucket.try_take(t0 + Duration::from_millis(200)));
        // Never more than the burst, however long it rests.
        let later = t0 + Duration::from_secs(3600);
        assert!(bucket.try_take(later) && bucket.try_take(later));
        assert!(!bucket.try_take(later));
    }

    #[test]
    fn reservations_queue_in_order_and_respect_the_latest_time() {
        let bucket = TokenBucket::new(4.0, 1);
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        let waits: Vec<Duration> = (0..5)
            .map(|_| {
                let reservation = bucket.reserve(t0, far).unwrap();
                let wait = reservation.wait();
                reservation.keep();
                wait
            })
            .collect();
        let millis: Vec<u128> = waits.iter().map(|w| w.as_millis()).collect();
        assert_eq!(millis, vec![0, 250, 500, 750, 1000]);
        // The sixth would wait 1.25 s: refused with a 1 s limit, and nothing is reserved.
        assert!(bucket.reserve(t0, t0 + Duration::from_secs(1)).is_none());
        assert_eq!(
            bucket.reserve(t0, far).unwrap().wait().as_millis(),
            1250,
            "the refused reservation took no token"
        );
    }

    #[test]
    fn a_dropped_reservation_gives_its_token_back() {
        let bucket = TokenBucket::new(4.0, 1);
        let t0 = Instant::now();
        let far = t0 + Duration::from_secs(60);
        bucket.reserve(t0, far).unwrap().keep();
        let cancelled = [
            bucket.reserve(t0, far).unwrap(),
            bucket.reserve(t0, far).unwrap(),
        ];
        assert_eq!(cancelled[1].wait().as_millis(), 500);
        drop(cancelled);
        assert_eq!(bucket.reserve(t0, far).unwrap().wait().as_millis(), 250);
        // Never past the burst.
        let bucket = TokenBucket::new(4.0, 1);
        drop(bucket.reserve(t0, far));
        drop(bucket.reserve(t0, far));
        bucket.reserve(t0, far).unwrap().keep();
        assert_eq!(bucket.reserve(t0, far).unwrap().wait().as_millis(), 250);
    }

    #[tokio::test(start_paused = true)]
    async fn the_throttle_halves_once_a_wave_and_climbs_back_with_each_admission() {
        let throttle = Throttle::default();
        assert!(throttle.bucket().is_none());
        let t0 = Instant::now();
        assert_eq!(throttle.refused(t0), Some(THROTTLE_START));
        // A wave of refusals within a second is one signal.
        assert_eq!(throttle.refused(t0 + Duration::from_millis(500)), None);
        assert_eq!(throttle.refused(t0 + Duration::from_secs(1)), Some(1.0));
        for _ in 0..4 {
            assert!(!throttle.admitted());
        }
        assert_eq!(throttle.rate(), Some(3.0));
        // Drained on a refusal: the next slot is a full interval away.
        let later = t0 + Duration::from_secs(2);
        assert_eq!(throttle.refused(later), Some(1.5));
        let far = later + Duration::from_secs(60);
        let slot = throttle
            .bucket()
            .unwrap()
            .reserve(Instant::now(), far)
            .unwrap();
        assert!(
            slot.wait() >= Duration::from_millis(600),
            "{:?}",
            slot.wait()
        );
        // Never below the floor; lifted at the ceiling.
        for n in 0..20 {
            throttle.refused(later + Duration::from_secs(2 + n));
        }
        assert_eq!(throttle.rate(), Some(THROTTLE_MIN));
        while !throttle.admitted() {}
        assert!(throttle.bucket().is_none());
    }

    #[test]
    fn each_refusal_backs_off_within_its_own_bounds() {
        for reason in [
            UnavailableReason::WakingUp,
            UnavailableReason::RateExceeded,
            UnavailableReason::TooManyConnections,
        ] {
            let (base, cap) = backoff_bounds(reason);
            assert!(base >= Duration::from_millis(250) && cap >= Duration::from_secs(5));
            for refusals in 1..30 {
                assert!(backoff_after(reason, refusals) <= cap);
            }
            assert!(backoff_after(reason, 1) <= base);
        }
        assert_eq!(
            backoff_bounds(UnavailableReason::WakingUp),
            (Duration::from_secs(1), Duration::from_secs(10))
        );
    }

    #[test]
    fn set_changes_the_rate_and_clamps_the_tokens() {
        let bucket = TokenBucket::new(100.0, 1000);
        bucket.set(5.0, 2);
        let t0 = Instant::now();
        assert!(bucket.try_take(t0) && bucket.try_take(t0));
        assert!(!bucket.try_take(t0));
    }
}
