//! Billing periods: calendar months in a tenant's time zone (UTC unless the tenant sets one), named
//! `YYYY-MM`; usage is reported by UTC day, `YYYY-MM-DD`. Time zone rules come from the IANA database built into the binary, so a log replays to
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

    /// `YYYY-MM`. Built by hand: every balance answered names its period, and `format!` with padding
    /// costs several times the seven bytes it writes.
    pub fn name(&self) -> String {
        let (year, month) = (self.month_index / 12, self.month_index % 12 + 1);
        if year > 9_999 {
            return format!("{year}-{month:02}");
        }
        let digit = |n: u32| char::from(b'0' + (n % 10) as u8);
        let mut name = String::with_capacity(7);
        name.extend([digit(year / 1_000), digit(year / 100), digit(year / 10), digit(year), '-']);
        name.extend([digit(month / 10), digit(month)]);
        name
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

const MS_PER_DAY: u64 = 86_400_000;

/// The UTC `YYYY-MM-DD` day that contains a Unix time in milliseconds: usage is reported by UTC day.
pub fn day_of(unix_ms: u64) -> String {
    let (year, month, day) = civil_from_days((unix_ms / MS_PER_DAY) as i64);
    format!("{year:04}-{month:02}-{day:02}")
}

/// The period of a `YYYY-MM-DD` day.
pub fn period_of_day(day: &str) -> &str {
    &day[..7]
}

/// Whether `text` is a real calendar day written `YYYY-MM-DD` (years 0001 to 9999).
pub fn is_day(text: &str) -> bool {
    let bytes = text.as_bytes();
    if bytes.len() != 10 || bytes[4] != b'-' || bytes[7] != b'-' {
        return false;
    }
    let digits = |range: std::ops::Range<usize>| {
        bytes[range.clone()].iter().all(u8::is_ascii_digit).then(|| text[range].parse::<u32>().ok()).flatten()
    };
    match (digits(0..4), digits(5..7), digits(8..10)) {
        (Some(year), Some(month), Some(day)) => {
            year >= 1 && (1..=12).contains(&month) && day >= 1 && day <= days_in_month(year as i64, month)
        }
        _ => false,
    }
}

/// The period `months` months after (or, negative, before) a `YYYY-MM` period.
pub fn shift_period(period: &str, months: i64) -> String {
    let year: i64 = period[..4].parse().expect("a YYYY-MM period");
    let month: i64 = period[5..7].parse().expect("a YYYY-MM period");
    let index = year * 12 + (month - 1) + months;
    format!("{:04}-{:02}", index.div_euclid(12), index.rem_euclid(12) + 1)
}

/// The first day of a `YYYY-MM` period.
pub fn first_day(period: &str) -> String {
    format!("{period}-01")
}

/// The last day of a `YYYY-MM` period.
pub fn last_day(period: &str) -> String {
    let year: i64 = period[..4].parse().expect("a YYYY-MM period");
    let month: u32 = period[5..7].parse().expect("a YYYY-MM period");
    format!("{period}-{:02}", days_in_month(year, month))
}

fn days_in_month(year: i64, month: u32) -> u32 {
    match month {
        4 | 6 | 9 | 11 => 30,
        2 if year % 4 == 0 && (year % 100 != 0 || year % 400 == 0) => 29,
        2 => 28,
        _ => 31,
    }
}

/// Converts days since 1970-01-01 to a proleptic Gregorian (year, month, day), after Howard Hinnant's
/// `civil_from_days`, which is exact for every day a u64 of milliseconds can name.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era = (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 { month_index + 3 } else { month_index - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_padded_to_four_and_two_digits() {
        let name = |year: u32, month: u32| Period { month_index: year * 12 + month - 1, ..Period::NONE }.name();
        assert_eq!(name(0, 1), "0000-01");
        assert_eq!(name(7, 9), "0007-09");
        assert_eq!(name(2026, 10), "2026-10");
        assert_eq!(name(9_999, 12), "9999-12");
        assert_eq!(name(10_000, 1), "10000-01");
    }

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

    #[test]
    fn days_change_at_midnight_utc() {
        assert_eq!(day_of(0), "1970-01-01");
        assert_eq!(day_of(1_796_083_199_999), "2026-11-30");
        assert_eq!(day_of(1_796_083_200_000), "2026-12-01");
        assert_eq!(day_of(1_709_208_000_000), "2024-02-29");
        assert_eq!(period_of_day("2024-02-29"), "2024-02");
    }

    #[test]
    fn only_real_calendar_days_are_days() {
        for good in ["2024-02-29", "2026-12-31", "0001-01-01", "2026-04-30"] {
            assert!(is_day(good), "{good}");
        }
        for bad in ["2023-02-29", "2026-04-31", "2026-13-01", "2026-00-10", "2026-1-01", "2026/01/01", "", "+026-01-01"]
        {
            assert!(!is_day(bad), "{bad}");
        }
    }

    #[test]
    fn periods_shift_across_years() {
        assert_eq!(shift_period("2026-01", -1), "2025-12");
        assert_eq!(shift_period("2026-03", -2), "2026-01");
        assert_eq!(shift_period("2026-11", -11), "2025-12");
        assert_eq!(shift_period("2026-12", 1), "2027-01");
        assert_eq!(last_day("2024-02"), "2024-02-29");
        assert_eq!(first_day("2024-02"), "2024-02-01");
    }

    #[test]
    fn civil_days_are_exact_on_a_leap_day() {
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
    }
}
