//! UTC calendar arithmetic for quota windows: which day and month an instant falls in, when
//! they end, and how they are written (`2026-11-25`, `2026-11`, RFC 3339).
//!
//! Owns only pure date math (Howard Hinnant's `days_from_civil` / `civil_from_days`), so the
//! crate needs no date library. It must not read the clock: callers pass the instant, which is
//! what lets tests put a window boundary exactly where they want it.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

const SECS_PER_DAY: i64 = 86_400;

/// Seconds since the Unix epoch; instants before it count as the epoch itself, since a clock
/// that far off cannot be metered meaningfully anyway.
pub fn unix_secs(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// The instant `secs` after the Unix epoch (clamped at the epoch).
pub fn from_unix_secs(secs: i64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(secs).unwrap_or(0))
}

/// One UTC calendar day, as days since 1970-01-01.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcDay(i64);

impl UtcDay {
    pub fn containing(time: SystemTime) -> UtcDay {
        UtcDay(unix_secs(time).div_euclid(SECS_PER_DAY))
    }

    pub fn from_ymd(year: i64, month: u32, day: u32) -> UtcDay {
        UtcDay(days_from_civil(year, month, day))
    }

    /// Parses `YYYY-MM-DD` as stored in the database; `None` for anything else.
    pub fn parse(text: &str) -> Option<UtcDay> {
        let mut parts = text.splitn(3, '-');
        let year: i64 = parts.next()?.parse().ok()?;
        let month: u32 = parts.next()?.parse().ok()?;
        let day: u32 = parts.next()?.parse().ok()?;
        let parsed = UtcDay::from_ymd(year, month, day);
        // Reject dates that do not round-trip, like 2026-02-30.
        (parsed.ymd() == (year, month, day)).then_some(parsed)
    }

    pub fn ymd(self) -> (i64, u32, u32) {
        civil_from_days(self.0)
    }

    /// The first second of this day, in Unix seconds.
    pub fn start_secs(self) -> i64 {
        self.0.saturating_mul(SECS_PER_DAY)
    }

    pub fn next(self) -> UtcDay {
        UtcDay(self.0 + 1)
    }

    pub fn minus_days(self, days: i64) -> UtcDay {
        UtcDay(self.0 - days)
    }

    pub fn month(self) -> UtcMonth {
        let (year, month, _) = self.ymd();
        UtcMonth { year, month }
    }
}

impl fmt::Display for UtcDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (y, m, d) = self.ymd();
        write!(f, "{y:04}-{m:02}-{d:02}")
    }
}

/// One UTC calendar month. Ordered by year, then month.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UtcMonth {
    year: i64,
    month: u32,
}

impl UtcMonth {
    pub fn first_day(self) -> UtcDay {
        UtcDay::from_ymd(self.year, self.month, 1)
    }

    pub fn next(self) -> UtcMonth {
        if self.month == 12 {
            UtcMonth {
                year: self.year + 1,
                month: 1,
            }
        } else {
            UtcMonth {
                year: self.year,
                month: self.month + 1,
            }
        }
    }

    /// The last day of this month.
    pub fn last_day(self) -> UtcDay {
        self.next().first_day().minus_days(1)
    }
}

impl fmt::Display for UtcMonth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04}-{:02}", self.year, self.month)
    }
}

/// `2026-11-25T00:00:00Z` for Unix seconds; used in messages a person reads.
pub fn rfc3339(secs: i64) -> String {
    let day = UtcDay(secs.div_euclid(SECS_PER_DAY));
    let in_day = secs.rem_euclid(SECS_PER_DAY);
    format!(
        "{day}T{:02}:{:02}:{:02}Z",
        in_day / 3600,
        in_day % 3600 / 60,
        in_day % 60
    )
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Hinnant, `days_from_civil`).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let month = i64::from(month);
    let day = i64::from(day);
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of days since 1970-01-01 (Hinnant, `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    // Both are small positive numbers by construction (1..=31 and 1..=12).
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_and_known_dates_convert_both_ways() {
        assert_eq!(UtcDay::from_ymd(1970, 1, 1), UtcDay(0));
        assert_eq!(UtcDay::from_ymd(2000, 3, 1).ymd(), (2000, 3, 1));
        assert_eq!(UtcDay::from_ymd(2026, 11, 30).to_string(), "2026-11-30");
        // 2026-11-30T23:59:59Z
        let t = from_unix_secs(1_796_083_199);
        assert_eq!(UtcDay::containing(t).to_string(), "2026-11-30");
        assert_eq!(rfc3339(1_796_083_199), "2026-11-30T23:59:59Z");
        assert_eq!(UtcDay::containing(t).month().next().to_string(), "2026-12");
    }

    #[test]
    fn every_day_for_four_centuries_round_trips() {
        let start = UtcDay::from_ymd(1900, 1, 1).0;
        let mut previous = civil_from_days(start - 1);
        for d in start..start + 146_097 {
            let ymd = civil_from_days(d);
            assert_eq!(days_from_civil(ymd.0, ymd.1, ymd.2), d);
            assert!(ymd > previous, "{ymd:?} after {previous:?}");
            previous = ymd;
        }
    }

    #[test]
    fn month_edges_include_leap_days() {
        let feb_2028 = UtcDay::from_ymd(2028, 2, 10).month();
        assert_eq!(feb_2028.last_day().to_string(), "2028-02-29");
        let dec = UtcDay::from_ymd(2026, 12, 31).month();
        assert_eq!(dec.next().first_day().to_string(), "2027-01-01");
        assert!(dec < dec.next());
    }

    #[test]
    fn parse_accepts_stored_days_only() {
        assert_eq!(
            UtcDay::parse("2026-11-25"),
            Some(UtcDay::from_ymd(2026, 11, 25))
        );
        assert_eq!(UtcDay::parse("2026-02-30"), None);
        assert_eq!(UtcDay::parse("2026-11"), None);
        assert_eq!(UtcDay::parse("x"), None);
    }
}
