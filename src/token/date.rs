//! SigV4 date stamps (`yyyymmdd`, `yyyymmddTHHMMSSZ`) from a `SystemTime`, without allocation.

use std::time::{Duration, SystemTime};

/// A UTC time truncated to whole seconds, ready to be written as SigV4 date stamps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    secs: u64,
    year: u32,
    month: u8,
    day: u8,
    hour: u8,
    minute: u8,
    second: u8,
}

impl Stamp {
    /// Times before 1970 are clamped to the epoch (no real signing clock reads them).
    pub(crate) fn new(at: SystemTime) -> Stamp {
        let secs = at
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let days = secs / 86_400;
        let rem = secs % 86_400;
        let (year, month, day) = civil_from_days(days);
        Stamp {
            secs,
            year,
            month,
            day,
            hour: (rem / 3600) as u8,
            minute: (rem % 3600 / 60) as u8,
            second: (rem % 60) as u8,
        }
    }

    /// The instant in whole seconds (what the token's `X-Amz-Date` says).
    pub(crate) fn whole_seconds(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(self.secs)
    }

    /// `yyyymmdd`.
    pub(crate) fn date(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        write_digits(&mut out[0..4], self.year);
        write_digits(&mut out[4..6], self.month.into());
        write_digits(&mut out[6..8], self.day.into());
        out
    }

    /// `yyyymmddTHHMMSSZ`.
    pub(crate) fn date_time(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.date());
        out[8] = b'T';
        write_digits(&mut out[9..11], self.hour.into());
        write_digits(&mut out[11..13], self.minute.into());
        write_digits(&mut out[13..15], self.second.into());
        out[15] = b'Z';
        out
    }
}

/// Writes `value` as exactly `out.len()` decimal digits (years past 9999 wrap; irrelevant here).
fn write_digits(out: &mut [u8], mut value: u32) {
    for slot in out.iter_mut().rev() {
        *slot = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// Days since 1970-01-01 to (year, month, day), Howard Hinnant's `civil_from_days`.
fn civil_from_days(days: u64) -> (u32, u8, u8) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let year = (yoe + era * 400 + u64::from(month <= 2)) as u32;
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stamp(secs: u64) -> String {
        let s = Stamp::new(SystemTime::UNIX_EPOCH + Duration::from_secs(secs));
        String::from_utf8(s.date_time().to_vec()).unwrap()
    }

    #[test]
    fn known_dates() {
        assert_eq!(stamp(0), "19700101T000000Z");
        assert_eq!(stamp(1_724_716_800), "20240827T000000Z");
        assert_eq!(stamp(951_782_400), "20000229T000000Z"); // leap day in a /400 year
        assert_eq!(stamp(4_107_542_399), "21000228T235959Z"); // 2100 is not a leap year
        assert_eq!(stamp(4_107_542_400), "21000301T000000Z");
        assert_eq!(stamp(1_767_225_599), "20251231T235959Z");
    }

    #[test]
    fn agrees_with_aws_smithy_types_on_many_instants() {
        use aws_smithy_types::date_time::{DateTime, Format};
        let mut secs = 0u64;
        while secs < 7_000_000_000 {
            let ours = stamp(secs);
            let theirs = DateTime::from_secs(secs as i64)
                .fmt(Format::DateTime)
                .unwrap()
                .replace(['-', ':'], "");
            assert_eq!(ours, theirs, "at {secs}");
            secs += 86_399 * 7 + 3_601;
        }
    }
}
