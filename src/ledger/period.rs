//! Billing periods are calendar months in UTC, named `YYYY-MM`.

/// The `YYYY-MM` period that contains a Unix time in milliseconds.
pub fn period_of(unix_ms: u64) -> String {
    let (year, month, _) = civil_from_days((unix_ms / 86_400_000) as i64);
    format!("{year:04}-{month:02}")
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
}
