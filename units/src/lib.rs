//! Sizes, durations and rates as people write them ("256MiB", "40ms", "100mbit"): one set of rules
//! for ditto's config files and for the benchmark tools' command lines.
//!
//! - A value is a non-negative decimal number, then a unit; space between them and the unit's case
//!   do not matter.
//! - Sizes: `B` (or no unit), `KiB`/`K`, `MiB`/`M`, `GiB`/`G`, `TiB`/`T` are powers of 1024; `kB`,
//!   `MB`, `GB`, `TB` powers of 1000. Rounded to the nearest byte.
//! - Durations: `ns`, `us`/`µs`, `ms`, `s`/`sec`, `m`/`min`, `h`. A unit is required, except for 0.
//! - Rates, in bits per second: `bit`/`bps` (or no unit), `kbit`/`k`, `mbit`/`m`, `gbit`/`g` (powers
//!   of 1000, also written `kbps`, `kb/s`, ...); `none`, `unlimited` and `inf` mean no limit (0).

use std::fmt;
use std::time::Duration;

/// What is wrong with a value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnitError {
    what: &'static str,
    input: String,
    why: String,
}

impl fmt::Display for UnitError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "invalid {} {:?}: {}", self.what, self.input, self.why)
    }
}

impl std::error::Error for UnitError {}

fn err(what: &'static str, input: &str, why: impl Into<String>) -> UnitError {
    UnitError {
        what,
        input: input.to_owned(),
        why: why.into(),
    }
}

/// The leading number of `s` and its unit, lower-cased.
fn split(what: &'static str, s: &str) -> Result<(f64, String), UnitError> {
    let t = s.trim();
    let at = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(at);
    if num.is_empty() {
        return Err(err(what, s, "expected a number first"));
    }
    let v: f64 = num
        .parse()
        .map_err(|_| err(what, s, format!("{num:?} is not a number")))?;
    if !v.is_finite() {
        return Err(err(what, s, "not a finite number"));
    }
    Ok((v, unit.trim().to_lowercase()))
}

/// A size in bytes.
pub fn bytes(s: &str) -> Result<u64, UnitError> {
    const WHAT: &str = "size";
    let (v, unit) = split(WHAT, s)?;
    let mult: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "m" | "mib" => 1024.0 * 1024.0,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "t" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        other => {
            return Err(err(
                WHAT,
                s,
                format!("unknown unit {other:?} (use B, KiB, MiB, GiB, TiB, kB, MB, GB, TB)"),
            ))
        }
    };
    let b = (v * mult).round();
    // 2^64 as f64 is exact; anything at or above it does not fit.
    if b >= 18_446_744_073_709_551_616.0 {
        return Err(err(WHAT, s, "too large"));
    }
    Ok(b as u64)
}

/// A duration.
pub fn duration(s: &str) -> Result<Duration, UnitError> {
    const WHAT: &str = "duration";
    let (v, unit) = split(WHAT, s)?;
    let secs = match unit.as_str() {
        "" if v == 0.0 => 0.0,
        "" => return Err(err(WHAT, s, "needs a unit, like \"5s\" or \"200ms\"")),
        "ns" => v / 1e9,
        "us" | "µs" => v / 1e6,
        "ms" => v / 1e3,
        "s" | "sec" => v,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        other => {
            return Err(err(
                WHAT,
                s,
                format!("unknown unit {other:?} (use ns, us, ms, s, min, h)"),
            ))
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| err(WHAT, s, "too long"))
}

/// A rate in bits per second; 0 means no limit.
pub fn rate(s: &str) -> Result<u64, UnitError> {
    const WHAT: &str = "rate";
    if matches!(
        s.trim().to_lowercase().as_str(),
        "none" | "unlimited" | "inf"
    ) {
        return Ok(0);
    }
    let (v, unit) = split(WHAT, s)?;
    let mult = match unit.as_str() {
        "" | "bit" | "bps" | "b/s" => 1.0,
        "k" | "kbit" | "kbps" | "kb/s" => 1e3,
        "m" | "mbit" | "mbps" | "mb/s" => 1e6,
        "g" | "gbit" | "gbps" | "gb/s" => 1e9,
        other => {
            return Err(err(
                WHAT,
                s,
                format!("unknown unit {other:?} (use bit, kbit, mbit, gbit)"),
            ))
        }
    };
    let r = (v * mult).round();
    if r >= 18_446_744_073_709_551_616.0 {
        return Err(err(WHAT, s, "too large"));
    }
    Ok(r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(bytes("4096"), Ok(4096));
        assert_eq!(bytes("256MiB"), Ok(256 << 20));
        assert_eq!(bytes("256m"), Ok(256 << 20));
        assert_eq!(bytes("10 GiB"), Ok(10 << 30));
        assert_eq!(bytes("2T"), Ok(2 << 40));
        assert_eq!(bytes("64k"), Ok(65536));
        assert_eq!(bytes("1MB"), Ok(1_000_000));
        assert_eq!(bytes("1.5 GB"), Ok(1_500_000_000));
        assert_eq!(bytes("1.5kb"), Ok(1500));
        assert_eq!(bytes("0.5B"), Ok(1), "rounded to the nearest byte");
        for bad in [
            "",
            "MiB",
            "-1MiB",
            "12 parsecs",
            "1..2k",
            "99999999999TiB",
            "NaN",
        ] {
            assert!(bytes(bad).is_err(), "{bad:?}");
        }
        let e = bytes("12 parsecs").expect_err("unit").to_string();
        assert!(
            e.contains("invalid size \"12 parsecs\"") && e.contains("MiB"),
            "{e}"
        );
    }

    #[test]
    fn durations() {
        assert_eq!(duration("200ms"), Ok(Duration::from_millis(200)));
        assert_eq!(duration("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(duration("250us"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("250µs"), Ok(Duration::from_micros(250)));
        assert_eq!(duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("2 min"), Ok(Duration::from_secs(120)));
        assert_eq!(duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(duration("0"), Ok(Duration::ZERO));
        for bad in ["5", "-1ms", "ms", "5 fortnights", "1e400s"] {
            assert!(duration(bad).is_err(), "{bad:?}");
        }
        let e = duration("5").expect_err("no unit").to_string();
        assert!(e.contains("needs a unit"), "{e}");
    }

    #[test]
    fn rates() {
        assert_eq!(rate("100mbit"), Ok(100_000_000));
        assert_eq!(rate("1gbit"), Ok(1_000_000_000));
        assert_eq!(rate("20M"), Ok(20_000_000));
        assert_eq!(rate("500 kbps"), Ok(500_000));
        assert_eq!(rate("9600"), Ok(9600));
        assert_eq!(rate("none"), Ok(0));
        assert_eq!(rate("Unlimited"), Ok(0));
        for bad in ["fast", "10 parsecs", "-1mbit", ""] {
            assert!(rate(bad).is_err(), "{bad:?}");
        }
    }
}
