//! The run's date: `{date}` in a config (data and checkpoint URLs, anything) becomes the UTC
//! date the job was submitted, `YYYY-MM-DD`, so tonight's job reads tonight's data.

/// The placeholder.
pub const PLACEHOLDER: &str = "{date}";

/// `(year, month, day)` of a day counted from 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// `YYYY-MM-DD` of Unix milliseconds (UTC).
pub fn iso(unix_ms: u64) -> String {
    let (y, m, d) = civil((unix_ms / 86_400_000) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Today, UTC, `YYYY-MM-DD`.
pub fn today() -> String {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    iso(ms)
}

/// Checks a `--date` value: a real calendar date written `YYYY-MM-DD`.
pub fn check(date: &str) -> Result<(), String> {
    let bad = || format!("--date `{date}`: use YYYY-MM-DD, e.g. 2026-11-28");
    let parts: Vec<&str> = date.split('-').collect();
    if parts.len() != 3
        || parts[0].len() != 4
        || parts[1].len() != 2
        || parts[2].len() != 2
        || !date.bytes().all(|b| b.is_ascii_digit() || b == b'-')
    {
        return Err(bad());
    }
    let (y, m, d): (i64, u32, u32) = (
        parts[0].parse().map_err(|_| bad())?,
        parts[1].parse().map_err(|_| bad())?,
        parts[2].parse().map_err(|_| bad())?,
    );
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d == 0 || d > days[(m - 1) as usize] {
        return Err(bad());
    }
    Ok(())
}

/// `text` with every `{date}` replaced by `date`.
pub fn apply(text: &str, date: &str) -> String {
    text.replace(PLACEHOLDER, date)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(iso(0), "1970-01-01");
        assert_eq!(iso(1_795_824_000_000), "2026-11-28");
        assert_eq!(iso(951_782_400_000), "2000-02-29");
        check("2024-02-29").unwrap();
        for bad in [
            "2023-02-29",
            "2026-13-01",
            "2026-1-01",
            "26-11-28",
            "2026-11-28x",
            "",
        ] {
            assert!(check(bad).is_err(), "{bad}");
        }
        assert_eq!(
            apply("train = [\"s3://b/{date}/*.jsonl\"]", "2026-11-28"),
            "train = [\"s3://b/2026-11-28/*.jsonl\"]"
        );
    }
}
