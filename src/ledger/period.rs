//! Billing periods: calendar months in a tenant's time zone (UTC unless the tenant sets one), named
//! `YYYY-MM`. Time zone rules come from the IANA database built into the binary, so a log replays to
//! the same periods on any machine.

use jiff::{Timestamp, tz::TimeZone};
use serde::{Deserialize, Serialize};

/// The time zone of billing periods when a tenant has not set one.
pub const DEFAULT_TIME_ZONE: &str = "UTC";

/// One billing period: the month and the Unix milliseconds it covers, `start_ms..end_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Period {
    /// `year * 12 + month - 1`: later months compare greater.
    pub month_index: u32,
    pub start_ms: u64,
    pub end_ms: u64,
}

impl Period {
    /// Before any period: everything starts by rolling into the period of its first event.
    pub const NONE: Period = Period { month_index: 0, start_ms: 0, end_ms: 0 };

    pub fn contains(&self, unix_ms: u64) -> bool {
        (self.start_ms..self.end_ms).contains(&unix_ms)
    }

    /// `YYYY-MM`.
    pub fn name(&self) -> String {
        format!("{:04}-{:02}", self.month_index / 12, self.month_index % 12 + 1)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown time zone {0:?}: expected an IANA name such as `Europe/Paris` or `UTC`")]
pub struct UnknownTimeZone(pub String);

/// Checks a time zone name and returns it in its canonical spelling where the database has one.
pub fn parse_time_zone(name: &str) -> Result<String, UnknownTimeZone> {
    if name.is_empty() || name.len() > 64 {
        return Err(UnknownTimeZone(name.to_owned()));
    }
    let zone = TimeZone::get(name).map_err(|_| UnknownTimeZone(name.to_owned()))?;
    Ok(zone.iana_name().unwrap_or(name).to_owned())
}

/// The period of `time_zone` that contains `unix_ms`. An unknown zone (which validation keeps out of
/// the state) counts as UTC.
pub fn period_at(unix_ms: u64, time_zone: &str) -> Period {
    let zone = TimeZone::get(time_zone).unwrap_or(TimeZone::UTC);
    let millis = i64::try_from(unix_ms).unwrap_or(i64::MAX);
    let Ok(instant) = Timestamp::from_millisecond(millis) else {
        return Period { month_index: u32::MAX, start_ms: unix_ms, end_ms: u64::MAX };
    };
    let local = instant.to_zoned(zone.clone()).date();
    let month_index = local.year() as u32 * 12 + (local.month() as u32 - 1);
    let start = local.first_of_month();
    let start_ms = start.to_zoned(zone.clone()).map_or(0, |z| z.timestamp().as_millisecond().max(0) as u64);
    let end_ms = start
        .checked_add(jiff::Span::new().months(1))
        .ok()
        .and_then(|next| next.to_zoned(zone).ok())
        .map_or(u64::MAX, |z| z.timestamp().as_millisecond().max(0) as u64);
    Period { month_index, start_ms, end_ms }
}

/// The UTC `YYYY-MM` period that contains a Unix time in milliseconds.
pub fn period_of(unix_ms: u64) -> String {
    period_at(unix_ms, DEFAULT_TIME_ZONE).name()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_change_at_midnight_utc_on_the_first() {
        assert_eq!(period_of(0), "1970-01");
        // 2026-11-30T23:59:59.999Z and 2026-12-01T00:00:00Z
        assert_eq!(period_of(1_796_083_199_999), "2026-11");
        assert_eq!(period_of(1_796_083_200_000), "2026-12");
        // 2024-02-29T12:00:00Z, a leap day
        assert_eq!(period_of(1_709_208_000_000), "2024-02");
        let november = period_at(1_796_083_199_999, "UTC");
        assert_eq!((november.start_ms, november.end_ms), (1_793_491_200_000, 1_796_083_200_000));
        assert!(november.contains(1_796_083_199_999) && !november.contains(1_796_083_200_000));
    }

    #[test]
    fn periods_follow_the_time_zone_including_daylight_saving() {
        // Paris is UTC+1 in winter: December starts at 2026-11-30T23:00:00Z.
        let december_paris = 1_796_079_600_000;
        assert_eq!(period_at(december_paris - 1, "Europe/Paris").name(), "2026-11");
        let december = period_at(december_paris, "Europe/Paris");
        assert_eq!((december.name().as_str(), december.start_ms), ("2026-12", december_paris));
        // 2027-01-01T00:00:00+01:00
        assert_eq!(december.end_ms, 1_798_758_000_000);
        // April starts in summer time (UTC+2): 2026-03-31T22:00:00Z.
        let april = period_at(1_774_994_400_000, "Europe/Paris");
        assert_eq!((april.name().as_str(), april.start_ms), ("2026-04", 1_774_994_400_000));
        // New York is behind UTC: still November there when December has begun in UTC.
        assert_eq!(period_at(1_796_083_200_000, "America/New_York").name(), "2026-11");
    }

    #[test]
    fn time_zone_names_are_checked() {
        assert_eq!(parse_time_zone("Europe/Paris").unwrap(), "Europe/Paris");
        assert_eq!(parse_time_zone("UTC").unwrap(), "UTC");
        for bad in ["", "Mars/Olympus", "Europe/Paris; rm -rf /", &"x".repeat(65)] {
            assert_eq!(parse_time_zone(bad), Err(UnknownTimeZone(bad.to_owned())), "{bad:?}");
        }
    }

    #[test]
    fn later_periods_compare_greater() {
        let (a, b) = (period_at(1_796_083_199_999, "UTC"), period_at(1_796_083_200_000, "UTC"));
        assert!(a < b && a.month_index + 1 == b.month_index && a.end_ms == b.start_ms);
        assert!(Period::NONE < a && !Period::NONE.contains(0));
    }
}
