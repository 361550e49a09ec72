//! Parsing of human-friendly rates, durations and sizes ("100mbit", "40ms", "1MiB").

use anyhow::{bail, Context, Result};
use std::time::Duration;

fn split_num(s: &str) -> Result<(f64, String)> {
    let s = s.trim();
    let idx = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(idx);
    if num.is_empty() {
        bail!("{s:?}: expected a number");
    }
    let v: f64 = num.parse().with_context(|| format!("{s:?}: bad number"))?;
    if !v.is_finite() || v < 0.0 {
        bail!("{s:?}: must be a finite non-negative number");
    }
    Ok((v, unit.trim().to_ascii_lowercase()))
}

/// A rate in bits per second: "100mbit", "1gbit", "20M" (=20 Mbit/s), "500kbit", plain number = bit/s.
/// "0", "none" and "unlimited" mean no rate limit (returns 0).
pub fn parse_rate(s: &str) -> Result<u64> {
    let t = s.trim().to_ascii_lowercase();
    if t == "none" || t == "unlimited" || t == "inf" {
        return Ok(0);
    }
    let (v, unit) = split_num(&t)?;
    let mult = match unit.as_str() {
        "" | "bit" | "bps" | "b/s" => 1.0,
        "k" | "kbit" | "kbps" | "kb/s" => 1e3,
        "m" | "mbit" | "mbps" | "mb/s" => 1e6,
        "g" | "gbit" | "gbps" | "gb/s" => 1e9,
        other => bail!("{s:?}: unknown rate unit {other:?} (use bit, kbit, mbit, gbit)"),
    };
    let r = v * mult;
    if r > 1e12 {
        bail!("{s:?}: rate too large");
    }
    Ok(r.round() as u64)
}

/// A duration: "40ms", "1.5ms", "250us", "2s"; a plain number means milliseconds.
pub fn parse_duration(s: &str) -> Result<Duration> {
    let (v, unit) = split_num(s)?;
    let secs = match unit.as_str() {
        "" | "ms" => v / 1e3,
        "s" | "sec" => v,
        "us" | "µs" => v / 1e6,
        "ns" => v / 1e9,
        other => bail!("{s:?}: unknown time unit {other:?} (use s, ms, us)"),
    };
    if secs > 3600.0 {
        bail!("{s:?}: longer than an hour");
    }
    Ok(Duration::from_secs_f64(secs))
}

/// A size in bytes: "1500", "64k"/"64KiB" (1024-based), "1MB" (1000-based), "2MiB", "1G".
pub fn parse_bytes(s: &str) -> Result<u64> {
    let (v, unit) = split_num(s)?;
    let mult: f64 = match unit.as_str() {
        "" | "b" => 1.0,
        "k" | "kib" => 1024.0,
        "kb" => 1e3,
        "m" | "mib" => 1024.0 * 1024.0,
        "mb" => 1e6,
        "g" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "gb" => 1e9,
        other => bail!("{s:?}: unknown size unit {other:?} (use k, KiB, MB, MiB, G)"),
    };
    let b = v * mult;
    if b > 1e13 {
        bail!("{s:?}: too large");
    }
    Ok(b.round() as u64)
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
        assert_eq!(parse_duration("2").ok(), Some(Duration::from_millis(2)));
        assert!(parse_duration("-1ms").is_err());
        assert_eq!(parse_bytes("64KiB").ok(), Some(65536));
        assert_eq!(parse_bytes("1MB").ok(), Some(1_000_000));
        assert!(parse_bytes("").is_err());
        assert_eq!(parse_loss("1%").ok(), Some(0.01));
        assert!(parse_loss("2").is_err());
    }
}
