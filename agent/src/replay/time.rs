//! Moments in a capture, as a user names them (`--at`), and as the outputs
//! print them.

use std::time::{Duration, UNIX_EPOCH};

use crate::error::{Error, Result};

/// A moment given on the command line, before the capture's start is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Moment {
    /// Nanoseconds since the epoch.
    At(u64),
    /// Nanoseconds after the capture's first frame.
    Offset(u64),
}

impl Moment {
    /// `+DUR` (`+90s`, `+1m30s`, `+2.5`: after the first frame), epoch
    /// seconds (`1733580185.25`), or RFC 3339 in UTC (`2026-12-07T12:03:05.5Z`).
    pub fn parse(s: &str) -> Result<Moment> {
        let bad = || {
            Error::Usage(format!(
                "{s:?} is no moment: give +DURATION after the capture's start (+90s, +1m30s, +2.5), epoch seconds (1733580185.25) or a UTC time (2026-12-07T12:03:05Z)"
            ))
        };
        if let Some(off) = s.strip_prefix('+') {
            return duration(off)
                .map(|d| Moment::Offset(d.as_nanos() as u64))
                .ok_or_else(bad);
        }
        if s.starts_with(|c: char| c.is_ascii_digit()) && !s.contains(['-', ':']) {
            return decimal_ns(s).map(Moment::At).ok_or_else(bad);
        }
        let t = humantime::parse_rfc3339_weak(s.trim_end_matches('Z')).map_err(|_| bad())?;
        let d = t.duration_since(UNIX_EPOCH).map_err(|_| bad())?;
        Ok(Moment::At(d.as_nanos() as u64))
    }

    /// Nanoseconds since the epoch, for a capture starting at `start_ns`.
    pub fn resolve(self, start_ns: u64) -> u64 {
        match self {
            Moment::At(ns) => ns,
            Moment::Offset(ns) => start_ns.saturating_add(ns),
        }
    }
}

/// `SECONDS[.FRACTION]` in nanoseconds, exactly (an f64 has no room for
/// nanoseconds of today's epoch seconds).
fn decimal_ns(s: &str) -> Option<u64> {
    let (secs, frac) = s.split_once('.').unwrap_or((s, ""));
    if frac.len() > 9 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let secs: u64 = secs.parse().ok()?;
    let frac: u64 = format!("{frac:0<9}").parse().ok()?;
    secs.checked_mul(1_000_000_000)?.checked_add(frac)
}

/// A duration: plain seconds (`2.5`) or humantime's (`500ms`, `1m30s`).
pub fn duration(s: &str) -> Option<Duration> {
    if let Ok(secs) = s.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(s).ok()
}

/// Epoch seconds with six decimals, as Zeek's logs print times.
pub fn epoch(ns: u64) -> String {
    format!("{}.{:06}", ns / 1_000_000_000, (ns % 1_000_000_000) / 1000)
}

/// Seconds with six decimals, for durations.
pub fn seconds(ns: u64) -> String {
    epoch(ns)
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(ns: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(ns)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moments_parse_in_each_form() {
        assert_eq!(
            Moment::parse("+1m30s").unwrap(),
            Moment::Offset(90_000_000_000)
        );
        assert_eq!(
            Moment::parse("+2.5").unwrap(),
            Moment::Offset(2_500_000_000)
        );
        assert_eq!(
            Moment::parse("1733580185.25").unwrap(),
            Moment::At(1_733_580_185_250_000_000)
        );
        assert_eq!(
            Moment::parse("2024-12-07T14:03:05.25Z").unwrap(),
            Moment::At(1_733_580_185_250_000_000)
        );
        assert!(Moment::parse("yesterday").is_err());
        assert!(Moment::parse("+-3").is_err());
        assert_eq!(epoch(1_733_580_185_250_000_000), "1733580185.250000");
    }
}
