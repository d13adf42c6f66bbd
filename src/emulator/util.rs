//! Small helpers the emulator needs, written for it: it shares no code with the connector it
//! checks (a bug there must not hide here). `boundary_tests.rs` keeps the line.

use std::sync::{Arc, Mutex};

use rustls::crypto::CryptoProvider;
use tokio::time::Instant;

/// The ALPN protocol id a direct-TLS PostgreSQL client must offer.
pub(crate) const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// DSQL closes connections at this age.
pub(crate) const MAX_CONNECTION_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// The process's rustls provider, else the one this build carries.
pub(crate) fn crypto_provider() -> Option<Arc<CryptoProvider>> {
    if let Some(provider) = CryptoProvider::get_default() {
        return Some(provider.clone());
    }
    #[cfg(feature = "aws-lc-rs")]
    {
        Some(Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
    }
    #[cfg(all(feature = "ring", not(feature = "aws-lc-rs")))]
    {
        Some(Arc::new(rustls::crypto::ring::default_provider()))
    }
    #[cfg(not(any(feature = "aws-lc-rs", feature = "ring")))]
    {
        None
    }
}

/// The Region in a DSQL endpoint name: `<id>.dsql[-suffix].<region>.on.aws`.
pub(crate) fn region_of(endpoint: &str) -> Option<&str> {
    let rest = endpoint.strip_suffix(".on.aws")?;
    let (before, region) = rest.rsplit_once('.')?;
    let (_, service) = before.rsplit_once('.')?;
    (service.starts_with("dsql") && !region.is_empty()).then_some(region)
}

/// Reads a startup `options` value as PostgreSQL does: words split on unescaped white space
/// (`\` escapes the next character), each `-c name=value`, `-cname=value` or `--name=value`.
pub(crate) fn parse_options(s: &str) -> Result<Vec<(String, String)>, String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            word.push(chars.next().ok_or("ends with a lone `\\`")?);
            in_word = true;
        } else if c.is_whitespace() {
            if in_word {
                words.push(std::mem::take(&mut word));
                in_word = false;
            }
        } else {
            word.push(c);
            in_word = true;
        }
    }
    if in_word {
        words.push(word);
    }
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = match word.as_str() {
            "-c" => words.next().ok_or("`-c` needs a name=value after it")?,
            w if w.starts_with("-c") => w[2..].to_owned(),
            w if w.starts_with("--") => w[2..].to_owned(),
            _ => return Err(format!("expected `-c name=value`, found `{word}`")),
        };
        match setting.split_once('=') {
            Some((name, value)) if !name.is_empty() => {
                settings.push((name.to_owned(), value.to_owned()));
            }
            Some(_) => return Err(format!("`{setting}` has no name")),
            None => return Err(format!("`{setting}` has no `=value`")),
        }
    }
    Ok(settings)
}

/// Writes settings as a startup `options` value (`-c name=value ...`, escaped).
pub(crate) fn options_value(settings: &[(&str, &str)]) -> String {
    let mut out = String::new();
    for (name, value) in settings {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str("-c ");
        for c in format!("{name}={value}").chars() {
            if c == '\\' || c.is_ascii_whitespace() {
                out.push('\\');
            }
            out.push(c);
        }
    }
    out
}

/// Which new connections [`drop_new_connections`](super::DsqlEmulator::drop_new_connections)
/// drops: the `n`-th connection accepted since the call is dropped when a SplitMix64 mix of the
/// seed and `n` falls below the share, so the same seed drops the same connections, in accept
/// order, on every run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct DropSchedule {
    /// The share dropped, as a threshold over `u64` (0: none; `u64::MAX`: all).
    threshold: u64,
    seed: u64,
}

impl DropSchedule {
    /// `share` of the connections (clamped to 0..=1; NaN: none), chosen by `seed`.
    pub(crate) fn new(share: f64, seed: u64) -> DropSchedule {
        // NaN drops nothing; everything else is clamped to 0..=1 (infinity: everything).
        let share = if share.is_nan() {
            0.0
        } else {
            share.clamp(0.0, 1.0)
        };
        // `as` saturates: 1.0 gives u64::MAX.
        let threshold = (share * u64::MAX as f64) as u64;
        DropSchedule { threshold, seed }
    }

    /// Whether it drops anything.
    pub(crate) fn is_active(&self) -> bool {
        self.threshold > 0
    }

    /// Whether the `n`-th connection since the schedule was set is dropped.
    pub(crate) fn drops(&self, n: u64) -> bool {
        if self.threshold == u64::MAX {
            return true;
        }
        // SplitMix64 (Steele, Lea, Flood 2014) over seed + n: every bit of both mixed in.
        let mut z = self
            .seed
            .wrapping_add(n.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        z < self.threshold
    }
}

/// `now + duration`, or a time a year away when that does not fit the clock (a huge duration
/// given to a fault must not panic).
pub(crate) fn after(duration: std::time::Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(duration)
        .unwrap_or_else(|| now + std::time::Duration::from_secs(86_400 * 365))
}

/// DSQL's admission of new connections: `rate` a second, bursts of `burst`; refuses when empty.
#[derive(Debug)]
pub(crate) struct Bucket {
    state: Mutex<(f64, f64, f64, Instant)>,
}

impl Bucket {
    /// A full bucket. `rate` must be positive and `burst` at least 1 (callers check).
    pub(crate) fn new(rate: f64, burst: u32) -> Self {
        let burst = f64::from(burst);
        Bucket {
            state: Mutex::new((rate, burst, burst, Instant::now())),
        }
    }

    /// Changes the rate and burst, keeping the tokens there are (at most the new burst).
    pub(crate) fn set(&self, rate: f64, burst: u32) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        refill(&mut state, Instant::now());
        state.0 = rate;
        state.1 = f64::from(burst);
        state.2 = state.2.min(state.1);
    }

    /// Takes a token if there is one now.
    pub(crate) fn try_take(&self, now: Instant) -> bool {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        refill(&mut state, now);
        let took = state.2 >= 1.0;
        if took {
            state.2 -= 1.0;
        }
        took
    }
}

fn refill(state: &mut (f64, f64, f64, Instant), now: Instant) {
    let (rate, burst, tokens, updated) = state;
    let elapsed = now.saturating_duration_since(*updated).as_secs_f64();
    *tokens = (*tokens + elapsed * *rate).min(*burst);
    *updated = (*updated).max(now);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn options_round_trip() {
        let value = options_value(&[("search_path", "my schema"), ("a", "b\\c")]);
        assert_eq!(value, "-c search_path=my\\ schema -c a=b\\\\c");
        assert_eq!(
            parse_options(&value).unwrap(),
            vec![
                ("search_path".to_owned(), "my schema".to_owned()),
                ("a".to_owned(), "b\\c".to_owned())
            ]
        );
        assert_eq!(
            parse_options("-cx=1 --y=2").unwrap(),
            vec![("x".into(), "1".into()), ("y".into(), "2".into())]
        );
        for bad in ["-c", "x=1", "-c =1", "-c x", "a\\"] {
            assert!(parse_options(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn regions_from_endpoint_names() {
        assert_eq!(region_of("abc.dsql.us-east-1.on.aws"), Some("us-east-1"));
        assert_eq!(
            region_of("abc.dsql-fnh4.eu-west-2.on.aws"),
            Some("eu-west-2")
        );
        assert_eq!(region_of("dsql.us-east-1.on.aws"), None);
        assert_eq!(region_of("abc.rds.us-east-1.on.aws"), None);
        assert_eq!(region_of("localhost"), None);
    }

    #[test]
    fn bucket_refuses_when_empty_and_refills() {
        let bucket = Bucket::new(10.0, 2);
        let start = Instant::now();
        assert!(bucket.try_take(start));
        assert!(bucket.try_take(start));
        assert!(!bucket.try_take(start));
        assert!(bucket.try_take(start + Duration::from_millis(100)));
        assert!(!bucket.try_take(start + Duration::from_millis(100)));
    }

    #[test]
    fn a_drop_schedule_drops_the_same_connections_for_the_same_seed() {
        let drops = |share: f64, seed: u64| -> Vec<bool> {
            let schedule = DropSchedule::new(share, seed);
            (0..10_000).map(|n| schedule.drops(n)).collect()
        };
        assert_eq!(drops(0.5, 29), drops(0.5, 29), "same seed, same drops");
        assert_ne!(drops(0.5, 29), drops(0.5, 30), "another seed, other drops");
        // The share holds over many connections, and no long runs hide in it.
        for (share, seed) in [(0.5, 29), (0.1, 7), (0.9, 1 << 40)] {
            let dropped = drops(share, seed).iter().filter(|d| **d).count();
            let expected = share * 10_000.0;
            assert!(
                (dropped as f64 - expected).abs() < 300.0,
                "share {share} seed {seed}: {dropped} of 10 000"
            );
        }
        let half = drops(0.5, 29);
        let longest = half
            .chunk_by(|a, b| a == b)
            .map(|run| run.len())
            .max()
            .unwrap();
        assert!(longest < 30, "a run of {longest}");
        // The ends: nothing, everything; bad input drops nothing.
        assert!(drops(0.0, 1).iter().all(|d| !d));
        assert!(drops(1.0, 1).iter().all(|d| *d));
        assert!(drops(7.0, 1).iter().all(|d| *d), "clamped to 1");
        assert!(drops(f64::INFINITY, 1).iter().all(|d| *d), "clamped to 1");
        // The fleet test relies on this: seed 29 at one half keeps the first three connections
        // and drops the fourth.
        assert_eq!(half[..4], [false, false, false, true]);
        assert!(!DropSchedule::new(f64::NAN, 1).is_active());
        assert!(!DropSchedule::new(-1.0, 1).is_active());
    }
}
