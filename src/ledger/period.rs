//! Billing periods are calendar months in UTC, named `YYYY-MM`; usage is reported by day, `YYYY-MM-DD`.
//! Every conversion from a time to a period or a day is made here, so that periods can later follow a
//! tenant's time zone by changing this module alone.

const MS_PER_DAY: u64 = 86_400_000;

/// The `YYYY-MM` period that contains a Unix time in milliseconds.
pub fn period_of(unix_ms: u64) -> String {
    let (year, month, _) = civil_from_days((unix_ms / MS_PER_DAY) as i64);
    format!("{year:04}-{month:02}")
}

/// The `YYYY-MM-DD` day that contains a Unix time in milliseconds.
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
    fn periods_change_at_midnight_utc_on_the_first() {
        assert_eq!(period_of(0), "1970-01");
        // 2026-11-30T23:59:59.999Z and 2026-12-01T00:00:00Z
        assert_eq!(period_of(1_796_083_199_999), "2026-11");
        assert_eq!(period_of(1_796_083_200_000), "2026-12");
        // 2024-02-29T12:00:00Z, a leap day
        assert_eq!(period_of(1_709_208_000_000), "2024-02");
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
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
}
