//! Rates, durations and sizes on the benchmark tools' command lines ("100mbit", "40ms", "1MiB"):
//! the workspace's rules (`ditto-units`, the same as in ditto's config), with the limits of an
//! emulated link.

use anyhow::{bail, Context, Result};
use std::time::Duration;

/// A rate in bits per second: "100mbit", "1gbit", "20M" (=20 Mbit/s), "500kbit", plain number = bit/s.
/// "0", "none" and "unlimited" mean no rate limit (returns 0).
pub fn parse_rate(s: &str) -> Result<u64> {
    let r = ditto_units::rate(s)?;
    if r > 1_000_000_000_000 {
        bail!("{s:?}: rate too large");
    }
    Ok(r)
}

/// A duration: "40ms", "1.5ms", "250us", "2s" (a unit is required, except for 0).
pub fn parse_duration(s: &str) -> Result<Duration> {
    let d = ditto_units::duration(s)?;
    if d > Duration::from_secs(3600) {
        bail!("{s:?}: longer than an hour");
    }
    Ok(d)
}

/// A size in bytes: "1500", "64k"/"64KiB" (1024-based), "1MB" (1000-based), "2MiB", "1G".
pub fn parse_bytes(s: &str) -> Result<u64> {
    Ok(ditto_units::bytes(s)?)
}

/// Parses a loss probability: "0.01", "1%".
pub fn parse_loss(s: &str) -> Result<f64> {
    let t = s.trim();
    let v = if let Some(p) = t.strip_suffix('%') {
        p.trim()
            .parse::<f64>()
            .with_context(|| format!("{s:?}: bad percentage"))?
            / 100.0
    } else {
        t.parse::<f64>()
            .with_context(|| format!("{s:?}: bad probability"))?
    };
    if !(0.0..=1.0).contains(&v) {
        bail!("{s:?}: loss must be between 0 and 1 (or 0%..100%)");
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates() {
        assert_eq!(parse_rate("100mbit").ok(), Some(100_000_000));
        assert_eq!(parse_rate("1gbit").ok(), Some(1_000_000_000));
        assert_eq!(parse_rate("20M").ok(), Some(20_000_000));
        assert_eq!(parse_rate("none").ok(), Some(0));
        assert!(parse_rate("fast").is_err());
        assert!(parse_rate("10 parsecs").is_err());
    }

    #[test]
    fn durations_sizes_loss() {
        assert_eq!(parse_duration("40ms").ok(), Some(Duration::from_millis(40)));
        assert_eq!(
            parse_duration("250us").ok(),
            Some(Duration::from_micros(250))
        );
        assert!(parse_duration("2").is_err(), "a unit is required");
        assert!(parse_duration("2h").is_err(), "longer than an hour");
        assert!(parse_duration("-1ms").is_err());
        assert_eq!(parse_bytes("64KiB").ok(), Some(65536));
        assert_eq!(parse_bytes("1MB").ok(), Some(1_000_000));
        assert!(parse_bytes("").is_err());
        assert_eq!(parse_loss("1%").ok(), Some(0.01));
        assert!(parse_loss("2").is_err());
    }
}
