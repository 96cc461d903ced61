//! Durations as users write them, in every flag and in ImagePrunePolicy fields: whole
//! numbers with units, `7d`, `1d12h`, `90m`, `15s`, `500ms`. One grammar for the whole
//! product, so a value that works in one place works in every other.

use std::time::Duration;

/// Why a duration cannot be used.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// Not whole numbers with units.
    #[error(
        "duration {0:?} is not valid: write whole numbers with d, h, m, s or ms, e.g. 7d, 1d12h, 15s or 500ms"
    )]
    Syntax(String),
    /// A fraction of a second where whole seconds are counted.
    #[error("duration {0:?} is not a whole number of seconds")]
    Fraction(String),
}

/// Parses whole numbers with units (`d`, `h`, `m`, `s`, `ms`), summed: `1d12h` is 36 hours.
pub fn parse(s: &str) -> Result<Duration, DurationError> {
    let bad = || DurationError::Syntax(s.to_string());
    let mut rest = s;
    let mut total_ms: u64 = 0;
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest.find(|c: char| !c.is_ascii_digit()).ok_or_else(bad)?;
        let n: u64 = rest[..digits].parse().map_err(|_| bad())?;
        rest = &rest[digits..];
        let (unit_ms, len) = match rest.as_bytes() {
            [b'm', b's', ..] => (1, 2),
            [b'd', ..] => (86_400_000, 1),
            [b'h', ..] => (3_600_000, 1),
            [b'm', ..] => (60_000, 1),
            [b's', ..] => (1_000, 1),
            _ => return Err(bad()),
        };
        rest = &rest[len..];
        total_ms = n
            .checked_mul(unit_ms)
            .and_then(|v| total_ms.checked_add(v))
            .ok_or_else(bad)?;
    }
    Ok(Duration::from_millis(total_ms))
}

/// [`parse`] for values counted in whole seconds (policy fields, the agent's ages and
/// offsets): `1500ms` is refused rather than silently rounded.
pub fn parse_seconds(s: &str) -> Result<i64, DurationError> {
    let d = parse(s)?;
    if d.subsec_nanos() != 0 {
        return Err(DurationError::Fraction(s.to_string()));
    }
    i64::try_from(d.as_secs()).map_err(|_| DurationError::Syntax(s.to_string()))
}

/// [`parse`] for intervals, which must not be zero (a zero interval would spin).
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    match parse(s).map_err(|e| e.to_string())? {
        d if d.is_zero() => Err(format!("{s:?} is zero: an interval must be positive")),
        d => Ok(d),
    }
}

/// [`parse_seconds`] for clap flags, which want the number as `u32` seconds.
pub fn parse_flag_seconds(s: &str) -> Result<u32, String> {
    let secs = parse_seconds(s).map_err(|e| e.to_string())?;
    u32::try_from(secs).map_err(|_| format!("{s:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = 60;
    const HOUR: u64 = 3_600;
    const DAY: u64 = 86_400;

    #[test]
    fn units_sum_up() {
        let secs = |s| parse(s).map(|d| d.as_secs());
        assert_eq!(secs("7d"), Ok(7 * DAY));
        assert_eq!(secs("36h"), Ok(36 * HOUR));
        assert_eq!(secs("1d12h"), Ok(DAY + 12 * HOUR));
        assert_eq!(secs("90m"), Ok(90 * MIN));
        assert_eq!(secs("1m30s"), Ok(90));
        assert_eq!(secs("30s"), Ok(30));
        assert_eq!(secs("0s"), Ok(0));
        assert_eq!(parse("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse("1s500ms"), Ok(Duration::from_millis(1_500)));
    }

    #[test]
    fn anything_else_is_refused_with_the_grammar() {
        for bad in [
            "",
            "7",
            "300",
            "d",
            "7w",
            "-1d",
            "1.5h",
            "7 d",
            "15S",
            "5mss",
            "99999999999999999999d",
            "9999999999999999d",
        ] {
            let e = parse(bad).unwrap_err().to_string();
            assert!(
                e.contains("not valid") && e.contains("e.g. 7d"),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn seconds_refuse_fractions_and_intervals_refuse_zero() {
        assert_eq!(parse_seconds("2m"), Ok(120));
        assert_eq!(
            parse_seconds("1500ms").unwrap_err().to_string(),
            "duration \"1500ms\" is not a whole number of seconds"
        );
        assert_eq!(parse_seconds("2000ms"), Ok(2));
        assert_eq!(parse_interval("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_interval("0s").unwrap_err().contains("positive"));
        assert!(parse_interval("x").unwrap_err().contains("not valid"));
        assert_eq!(parse_flag_seconds("5m"), Ok(300));
        assert!(
            parse_flag_seconds("200000d")
                .unwrap_err()
                .contains("too long")
        );
    }
}
