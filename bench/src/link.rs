//! The link model, independent of any device: per direction, decide for each arriving packet
//! whether it is dropped (MTU, random loss, full drop-tail queue) and when it is delivered
//! (serialization at the bottleneck rate, one-way delay, jitter without reordering).

use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

/// Settings for one direction of the link.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DirConfig {
    /// One-way propagation delay.
    #[serde(serialize_with = "ser_dur_ms")]
    pub delay: Duration,
    /// Jitter: each packet's delay is drawn uniformly from delay ± jitter (never below zero),
    /// then clamped so that packets never overtake each other.
    #[serde(serialize_with = "ser_dur_ms")]
    pub jitter: Duration,
    /// Bottleneck rate in bit/s; 0 = unlimited (no serialization, no queue).
    pub rate_bps: u64,
    /// Drop-tail queue limit in bytes (bytes waiting for the bottleneck, including the one being
    /// serialized).
    pub queue_bytes: u64,
    /// Random loss probability in [0, 1].
    pub loss: f64,
    /// Packets larger than this are silently dropped (no ICMP); 0 = no limit.
    pub mtu: usize,
}

fn ser_dur_ms<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64() * 1e3)
}

impl DirConfig {
    /// A default queue for the rate: the bytes sent in `2 * delay` (one round trip on a symmetric
    /// link), at least 64 KiB.
    pub fn default_queue(rate_bps: u64, delay: Duration) -> u64 {
        let bdp = (rate_bps as f64 / 8.0 * 2.0 * delay.as_secs_f64()) as u64;
        bdp.max(64 * 1024)
    }
}

/// A small seeded PRNG (SplitMix64), good enough for loss and jitter decisions.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&v[..n]);
        }
    }
}

/// What happens to one packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Deliver at this time (ns on the shaper's clock).
    Deliver(u64),
    DropMtu,
    DropLoss,
    DropQueue,
}

/// The per-direction state machine. Times are nanoseconds on a monotonic clock of the caller.
#[derive(Debug)]
pub struct Shaper {
    cfg: DirConfig,
    rng: Rng,
    /// When the bottleneck finishes serializing the last accepted packet.
    link_free_at: u64,
    /// Delivery time of the last accepted packet (for no-reordering jitter).
    last_deliver: u64,
}

impl Shaper {
    pub fn new(cfg: DirConfig, seed: u64) -> Self {
        Shaper {
            cfg,
            rng: Rng::new(seed),
            link_free_at: 0,
            last_deliver: 0,
        }
    }

    pub fn config(&self) -> &DirConfig {
        &self.cfg
    }

    /// Bytes waiting at the bottleneck at time `now`.
    pub fn backlog(&self, now: u64) -> u64 {
        if self.cfg.rate_bps == 0 || self.link_free_at <= now {
            return 0;
        }
        let ns = (self.link_free_at - now) as u128;
        (ns * self.cfg.rate_bps as u128 / 8 / 1_000_000_000) as u64
    }

    fn ser_ns(&self, len: usize) -> u64 {
        if self.cfg.rate_bps == 0 {
            return 0;
        }
        ((len as u128 * 8 * 1_000_000_000).div_ceil(self.cfg.rate_bps as u128)) as u64
    }

    /// Decides the fate of a packet of `len` bytes that arrives at `now`.
    pub fn admit(&mut self, now: u64, len: usize) -> Verdict {
        if self.cfg.mtu > 0 && len > self.cfg.mtu {
            return Verdict::DropMtu;
        }
        if self.cfg.loss > 0.0 && self.rng.next_f64() < self.cfg.loss {
            return Verdict::DropLoss;
        }
        let done = if self.cfg.rate_bps > 0 {
            if self.backlog(now) + len as u64 > self.cfg.queue_bytes {
                return Verdict::DropQueue;
            }
            let start = self.link_free_at.max(now);
            let done = start + self.ser_ns(len);
            self.link_free_at = done;
            done
        } else {
            now
        };
        let mut delay = self.cfg.delay.as_nanos() as i128;
        if !self.cfg.jitter.is_zero() {
            let j = self.cfg.jitter.as_nanos() as f64;
            delay += ((self.rng.next_f64() * 2.0 - 1.0) * j) as i128;
        }
        let at = (done as i128 + delay.max(0)) as u64;
        let at = at.max(self.last_deliver);
        self.last_deliver = at;
        Verdict::Deliver(at)
    }
}

/// Upper bounds (µs) of the lateness histogram buckets; the last bucket is open-ended.
pub const LATE_BUCKETS_US: [u64; 9] = [10, 50, 100, 250, 500, 1000, 2000, 5000, u64::MAX];

/// Counters of one direction, shared between the forwarding thread and the stats reporter.
#[derive(Debug, Default)]
pub struct DirStats {
    pub rx_packets: AtomicU64,
    pub rx_bytes: AtomicU64,
    pub tx_packets: AtomicU64,
    pub tx_bytes: AtomicU64,
    pub drop_queue_packets: AtomicU64,
    pub drop_queue_bytes: AtomicU64,
    pub drop_loss_packets: AtomicU64,
    pub drop_loss_bytes: AtomicU64,
    pub drop_mtu_packets: AtomicU64,
    pub drop_mtu_bytes: AtomicU64,
    /// Dropped because the link was down (an outage: on arrival, or due while down).
    pub drop_outage_packets: AtomicU64,
    pub drop_outage_bytes: AtomicU64,
    pub write_errors: AtomicU64,
    pub queue_max_bytes: AtomicU64,
    pub late_sum_ns: AtomicU64,
    pub late_max_ns: AtomicU64,
    pub late_hist: [AtomicU64; LATE_BUCKETS_US.len()],
    /// Emulator-clock times (ns + 1, 0 = none yet) of the first and last delivered packet.
    pub tx_first_ns: AtomicU64,
    pub tx_last_ns: AtomicU64,
}

/// A plain copy of [`DirStats`] for reports.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct DirSnapshot {
    pub rx_packets: u64,
    pub rx_bytes: u64,
    pub tx_packets: u64,
    pub tx_bytes: u64,
    pub drop_queue_packets: u64,
    pub drop_queue_bytes: u64,
    pub drop_loss_packets: u64,
    pub drop_loss_bytes: u64,
    pub drop_mtu_packets: u64,
    pub drop_mtu_bytes: u64,
    #[serde(default)]
    pub drop_outage_packets: u64,
    #[serde(default)]
    pub drop_outage_bytes: u64,
    pub write_errors: u64,
    pub queue_max_bytes: u64,
    /// Delivery lateness (actual write time minus scheduled time): mean, max, 99th percentile
    /// (upper bound of the histogram bucket that holds it; the maximum if that bucket is the
    /// open-ended last one), in microseconds.
    pub late_mean_us: f64,
    pub late_max_us: f64,
    pub late_p99_us_le: u64,
    pub late_over_1ms: u64,
    pub late_hist: Vec<u64>,
    /// Delivered IP bytes per second between the first and the last delivered packet, Mbit/s.
    pub tx_mbps: f64,
}

impl DirStats {
    /// Records a delivery of `len` bytes at `now` (emulator clock, ns).
    pub fn record_tx(&self, now: u64, len: usize) {
        self.tx_packets.fetch_add(1, Relaxed);
        self.tx_bytes.fetch_add(len as u64, Relaxed);
        if self.tx_first_ns.load(Relaxed) == 0 {
            self.tx_first_ns.store(now + 1, Relaxed);
        }
        self.tx_last_ns.store(now + 1, Relaxed);
    }

    /// Records a packet of `len` bytes dropped by an outage.
    pub fn record_outage_drop(&self, len: usize) {
        self.drop_outage_packets.fetch_add(1, Relaxed);
        self.drop_outage_bytes.fetch_add(len as u64, Relaxed);
    }

    pub fn record_late(&self, late_ns: u64) {
        self.late_sum_ns.fetch_add(late_ns, Relaxed);
        self.late_max_ns.fetch_max(late_ns, Relaxed);
        let us = late_ns / 1000;
        let idx = LATE_BUCKETS_US
            .iter()
            .position(|&b| us < b)
            .unwrap_or(LATE_BUCKETS_US.len() - 1);
        self.late_hist[idx].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> DirSnapshot {
        let hist: Vec<u64> = self.late_hist.iter().map(|h| h.load(Relaxed)).collect();
        let n: u64 = hist.iter().sum();
        let mut p99 = 0;
        let mut acc = 0;
        for (i, &h) in hist.iter().enumerate() {
            acc += h;
            if n > 0 && acc * 100 >= n * 99 {
                p99 = LATE_BUCKETS_US[i];
                break;
            }
        }
        let over: u64 = hist[LATE_BUCKETS_US.iter().position(|&b| b == 1000).unwrap_or(5) + 1..]
            .iter()
            .sum();
        DirSnapshot {
            rx_packets: self.rx_packets.load(Relaxed),
            rx_bytes: self.rx_bytes.load(Relaxed),
            tx_packets: self.tx_packets.load(Relaxed),
            tx_bytes: self.tx_bytes.load(Relaxed),
            drop_queue_packets: self.drop_queue_packets.load(Relaxed),
            drop_queue_bytes: self.drop_queue_bytes.load(Relaxed),
            drop_loss_packets: self.drop_loss_packets.load(Relaxed),
            drop_loss_bytes: self.drop_loss_bytes.load(Relaxed),
            drop_mtu_packets: self.drop_mtu_packets.load(Relaxed),
            drop_mtu_bytes: self.drop_mtu_bytes.load(Relaxed),
            drop_outage_packets: self.drop_outage_packets.load(Relaxed),
            drop_outage_bytes: self.drop_outage_bytes.load(Relaxed),
            write_errors: self.write_errors.load(Relaxed),
            queue_max_bytes: self.queue_max_bytes.load(Relaxed),
            late_mean_us: if n > 0 {
                self.late_sum_ns.load(Relaxed) as f64 / n as f64 / 1e3
            } else {
                0.0
            },
            late_max_us: self.late_max_ns.load(Relaxed) as f64 / 1e3,
            late_p99_us_le: if p99 == u64::MAX {
                (self.late_max_ns.load(Relaxed) / 1000).max(5000)
            } else {
                p99
            },
            late_over_1ms: over,
            late_hist: hist,
            tx_mbps: {
                let (f, l) = (
                    self.tx_first_ns.load(Relaxed),
                    self.tx_last_ns.load(Relaxed),
                );
                let bytes = self.tx_bytes.load(Relaxed);
                if l > f {
                    bytes as f64 * 8.0 / ((l - f) as f64 / 1e9) / 1e6
                } else {
                    0.0
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(rate: u64, delay_ms: u64, queue: u64) -> DirConfig {
        DirConfig {
            delay: Duration::from_millis(delay_ms),
            jitter: Duration::ZERO,
            rate_bps: rate,
            queue_bytes: queue,
            loss: 0.0,
            mtu: 0,
        }
    }

    #[test]
    fn serialization_and_delay() {
        // 1500 bytes at 12 Mbit/s = 1 ms.
        let mut s = Shaper::new(cfg(12_000_000, 10, 1 << 20), 1);
        assert_eq!(s.admit(0, 1500), Verdict::Deliver(11_000_000));
        // Arrives at the same instant: waits for the first one to finish.
        assert_eq!(s.admit(0, 1500), Verdict::Deliver(12_000_000));
        assert_eq!(s.backlog(0), 3000);
        // Arrives after the link went idle: no queueing.
        assert_eq!(s.admit(5_000_000, 1500), Verdict::Deliver(16_000_000));
    }

    #[test]
    fn drop_tail_and_mtu() {
        let mut s = Shaper::new(cfg(12_000_000, 0, 3000), 1);
        s.cfg.mtu = 1400;
        assert_eq!(s.admit(0, 1500), Verdict::DropMtu);
        assert!(matches!(s.admit(0, 1400), Verdict::Deliver(_)));
        assert!(matches!(s.admit(0, 1400), Verdict::Deliver(_)));
        assert_eq!(s.admit(0, 1400), Verdict::DropQueue);
    }

    #[test]
    fn loss_rate_and_jitter_order() {
        let mut c = cfg(0, 20, 0);
        c.loss = 0.1;
        c.jitter = Duration::from_millis(5);
        let mut s = Shaper::new(c, 42);
        let mut lost = 0;
        let mut last = 0;
        for i in 0..100_000u64 {
            match s.admit(i * 10_000, 100) {
                Verdict::DropLoss => lost += 1,
                Verdict::Deliver(at) => {
                    assert!(at >= last, "reordered");
                    assert!(at >= i * 10_000 + 15_000_000 || at == last);
                    last = at;
                }
                v => panic!("unexpected {v:?}"),
            }
        }
        assert!((9_000..11_000).contains(&lost), "lost {lost}");
    }

    #[test]
    fn same_seed_same_decisions() {
        let mut c = cfg(0, 0, 0);
        c.loss = 0.5;
        let run = |seed| {
            let mut s = Shaper::new(c.clone(), seed);
            (0..64)
                .map(|i| s.admit(i, 10) == Verdict::DropLoss)
                .collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn lateness_snapshot() {
        let st = DirStats::default();
        for _ in 0..99 {
            st.record_late(5_000);
        }
        st.record_late(3_000_000);
        let s = st.snapshot();
        assert_eq!(s.late_p99_us_le, 10);
        assert_eq!(s.late_over_1ms, 1);
        assert!((s.late_max_us - 3000.0).abs() < 1e-6);
    }
}
