//! Pacing a tunnel connection to the WAN's bottleneck.
//!
//! Tunnel connections use BBR, which ignores random loss (what a long, lossy WAN needs) but,
//! while the connection is application-limited, never leaves its STARTUP phase: it keeps pacing
//! at 2.89x its bandwidth estimate with a window of 2.89 bandwidth-delay products. Behind a
//! drop-tail queue of one BDP that overflows the queue for as long as the transfer lasts (a
//! single 64 MiB stream at 100 Mbit/s, 100 ms lost 4,300 packets, 9% of its bytes sent twice),
//! and every stream multiplexed on the connection waits behind each loss.
//!
//! [`Pacer`] watches the connection (a [`Sample`] from `TCP_INFO` every [`TICK`]) and caps its
//! pacing rate (`SO_MAX_PACING_RATE`) only when the bottleneck queue overflows:
//!
//! * **Engage** on loss (over 2% of the bytes delivered in the last ticks retransmitted, new ones
//!   among them) while the round-trip time shows a standing queue and the delivered rate has
//!   stopped growing: cap a tenth below the rate the connection delivered (with a queue
//!   standing, that is the bottleneck's rate, or this connection's share of it), so the queue
//!   drains. Random loss below 2%, or with an empty queue, never engages it, nor does delay alone
//!   (on a fast path a busy CPU looks like a queue).
//! * **Back off** the same way on a further overflow while the connection sends faster than what
//!   gets through (losses while the queue drains, or random ones, do not count).
//! * **Probe**: with no queue and the cap in use, the cap grows 5% a tick, so bandwidth that frees
//!   up is found within a second or two. While a queue stands without loss the cap holds: a paced
//!   sender gets delivered what it sends, so a competing flow does not push it down.
//! * **Release** once the connection has used less than half of the cap for [`RELEASE_AFTER`].
//!
//! The same samples size the connection's send buffer: the kernel grows it only up to
//! `net.ipv4.tcp_wmem`'s maximum (4 MiB by default), which holds one connection to 4 MiB per round
//! trip (about 450 Mbit/s at 50 ms). Past that, [`Pacer::send_buffer`] asks for four
//! bandwidth-delay products (what is in flight, its kernel overhead, and room to grow), up to
//! [`MAX_SEND_BUFFER`]; below it the kernel's own sizing is left alone.
//!
//! **On by default** (`tunnel.pacing = false` turns both off; a fixed `tunnel.socket_buffer`
//! keeps the buffer as set), with a stream window of 16 MiB. Against the defaults before it,
//! alternated (BENCHMARKS.md, "Long fat pipes"): a 64 MiB stream at 100 Mbit/s, 100 ms lost 815
//! packets at the queue instead of 4,400 and ran at 86.5-86.9 instead of 77 Mbit/s; a 256 MiB one
//! at 1 Gbit/s, 50 ms ran at 548-595 instead of 382-384 Mbit/s; a link with 1% random loss kept
//! its 18-23 Mbit/s in 12 runs. Two earlier versions collapsed that lossy run now and then (3.8
//! instead of 20 Mbit/s), which is what the loss threshold and [`MIN_JUDGED`] are for: one capped
//! a nearly idle connection after a single lost ping, and a bulk stream bound to it later crawled.
//!
//! The controller is sans-IO (samples in, cap and buffer size out); [`run`] is the loop around a
//! socket.

use std::time::Duration;

/// How often a connection is sampled.
pub const TICK: Duration = Duration::from_millis(100);
/// A cap left unused (under half of it delivered) this long is lifted.
pub const RELEASE_AFTER: Duration = Duration::from_secs(2);
/// The lowest cap, bytes/s (1 Mbit/s). A guard only: loss is judged only past [`MIN_JUDGED`]
/// bytes in three ticks, so a cap is a tenth below 500 KB/s at the least.
pub const MIN_RATE: u64 = 125_000;
/// The largest send buffer asked for (kernel units: payload and overhead).
pub const MAX_SEND_BUFFER: u64 = 64 << 20;
/// Ticks of delivered rate the cap is taken from (their maximum).
const RATE_TICKS: usize = 3;
/// Ticks kept: the last [`RATE_TICKS`] and the one before them, to tell a rate still ramping up
/// from one that has stopped growing.
const RATE_HISTORY: usize = RATE_TICKS + 1;
/// Retransmitted bytes, over the last [`RATE_TICKS`], above which loss counts as the queue's: more
/// than 1 in 50 of the bytes delivered (BBR v2's threshold for "too much in flight"). A link's
/// random loss stays below it; a queue overflowed at 2.89x the link's rate loses far more.
const LOSS_RATIO: u64 = 50;
/// Bytes delivered over the last [`RATE_TICKS`] below which loss is not judged (about 100
/// segments): on a connection carrying little more than pings, one random loss is a ratio of
/// anything, and a cap set there would later hold back a bulk stream bound to it.
const MIN_JUDGED: u64 = 150_000;

/// What `TCP_INFO` says of a connection at one moment. Counters are cumulative.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// Time of the sample, from any fixed origin.
    pub at: Duration,
    /// Bytes the peer acknowledged or selectively acknowledged (`tcpi_delivered` x MSS).
    pub delivered: u64,
    /// Bytes retransmitted (`tcpi_total_retrans` x MSS).
    pub retrans: u64,
    /// Smoothed round-trip time.
    pub srtt: Duration,
    /// Lowest round-trip time seen (`tcpi_min_rtt`).
    pub min_rtt: Duration,
}

/// What one tick saw.
#[derive(Clone, Copy, Debug, Default)]
struct Tick {
    /// Delivered rate, bytes/s.
    rate: u64,
    delivered: u64,
    retrans: u64,
}

/// The pacing controller of one tunnel connection.
#[derive(Debug, Default)]
pub struct Pacer {
    last: Option<Sample>,
    /// The last ticks, newest last.
    ticks: Vec<Tick>,
    cap: Option<u64>,
    /// Since when the cap has been mostly unused.
    unused_since: Option<Duration>,
    /// Largest bandwidth-delay product seen, bytes.
    bdp: u64,
}

impl Pacer {
    pub fn new() -> Pacer {
        Pacer::default()
    }

    /// The current cap in bytes/s (`None`: the connection paces itself).
    pub fn cap(&self) -> Option<u64> {
        self.cap
    }

    /// The send buffer the connection needs (kernel units, as `SO_SNDBUF` reads) when that is
    /// more than the kernel's autotuning reaches (`autotune_max`, `tcp_wmem`'s maximum): four of
    /// the largest bandwidth-delay products seen, at most [`MAX_SEND_BUFFER`]. Below that the
    /// kernel sizes the buffer itself, and better: setting it stops the kernel's sizing, and a
    /// small buffer set early holds a lossy connection down (retransmissions keep it full, so the
    /// measured product never asks for more). Above it, a buffer that limits the rate makes the
    /// rate, and so this, grow with it.
    pub fn send_buffer(&self, autotune_max: u64) -> Option<u64> {
        let want = self.bdp.saturating_mul(4).min(MAX_SEND_BUFFER);
        (want > autotune_max).then_some(want)
    }

    /// Takes a sample; returns the new cap when it changed (`Some(None)`: lifted).
    pub fn on_sample(&mut self, s: Sample) -> Option<Option<u64>> {
        let prev = self.last.replace(s)?;
        let dt = s.at.saturating_sub(prev.at);
        if dt.is_zero() {
            return None;
        }
        let bytes = s.delivered.saturating_sub(prev.delivered);
        let rate = u64::try_from(u128::from(bytes) * 1_000_000 / dt.as_micros().max(1))
            .unwrap_or(u64::MAX);
        if self.ticks.len() == RATE_HISTORY {
            self.ticks.remove(0);
        }
        self.ticks.push(Tick {
            rate,
            delivered: bytes,
            retrans: s.retrans.saturating_sub(prev.retrans),
        });
        let last = &self.ticks[self.ticks.len().saturating_sub(RATE_TICKS)..];
        let recent = last.iter().map(|t| t.rate).max().unwrap_or(0);
        let delivered: u64 = last.iter().map(|t| t.delivered).sum();
        let retrans: u64 = last.iter().map(|t| t.retrans).sum();
        // The rate stopped growing: the last ticks brought less than a quarter more than the one
        // before them (BBR's own test for a full pipe). While it still ramps up, a standing queue
        // and losses are the ramp's (or random), and its rate no measure of the bottleneck.
        let plateau = self.ticks.len() == RATE_HISTORY
            && u128::from(recent) * 4 <= u128::from(self.ticks[0].rate) * 5;
        let bdp = u128::from(recent) * s.srtt.as_micros() / 1_000_000;
        self.bdp = self.bdp.max(u64::try_from(bdp).unwrap_or(u64::MAX));
        let lost = delivered >= MIN_JUDGED
            && self.ticks.last().is_some_and(|t| t.retrans > 0)
            && u128::from(retrans) * u128::from(LOSS_RATIO) > u128::from(delivered);
        // A standing queue: the smoothed RTT a quarter (at least 2 ms) above the path's own.
        let queue = s.srtt > s.min_rtt + (s.min_rtt / 4).max(Duration::from_millis(2));
        // Overflowing: loss with a queue standing. (Delay alone never lowers the cap: on a fast
        // path a busy CPU shows as queueing, and following the delivered rate down there would
        // throttle the connection to whatever a slow moment delivered.)
        let overflow = lost && queue && plateau;
        let before = self.cap;
        self.cap = match self.cap {
            // A tenth below what got through, so the queue drains.
            None if overflow => Some((recent - recent / 10).max(MIN_RATE)),
            None => None,
            Some(c) => {
                let unused = rate < c / 2;
                let released = if unused {
                    let since = *self.unused_since.get_or_insert(s.at);
                    s.at.saturating_sub(since) >= RELEASE_AFTER
                } else {
                    self.unused_since = None;
                    false
                };
                if released {
                    self.unused_since = None;
                    self.ticks.clear();
                    None
                } else if overflow && recent < c - c / 20 {
                    // Sending faster than gets through: the overflow is ours. (A loss while
                    // everything sent gets through, the queue draining, is not.)
                    Some((recent - recent / 10).max(MIN_RATE))
                } else if !queue && rate >= c - c / 10 {
                    // In use and no queue: look for more.
                    Some(c.saturating_add(c / 20))
                } else {
                    Some(c)
                }
            }
        };
        (self.cap != before).then_some(self.cap)
    }
}

/// `TCP_INFO`, `SO_MAX_PACING_RATE` and `SO_SNDBUFFORCE`: the socket calls no safe wrapper offers.
#[allow(unsafe_code)]
mod sys {
    use std::os::fd::{AsRawFd, BorrowedFd};

    /// Offsets in the kernel's `struct tcp_info` (include/uapi/linux/tcp.h; the layout only ever
    /// grows at its end).
    const SND_MSS: usize = 16;
    const RTT: usize = 68;
    const TOTAL_RETRANS: usize = 100;
    const MIN_RTT: usize = 148;
    const DELIVERED: usize = 192;
    const END: usize = DELIVERED + 4;

    /// (snd_mss, srtt µs, total_retrans, min_rtt µs, delivered segments).
    pub fn tcp_info(fd: BorrowedFd<'_>) -> std::io::Result<(u32, u32, u32, u32, u32)> {
        let mut buf = [0u8; 256];
        let mut len = buf.len() as libc::socklen_t;
        // SAFETY: the kernel writes at most `len` bytes into `buf`, which is that large, and
        // stores the length it wrote in `len`; `fd` is a live socket for the call's duration.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::IPPROTO_TCP,
                libc::TCP_INFO,
                buf.as_mut_ptr().cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if (len as usize) < END {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "TCP_INFO without tcpi_delivered (kernel older than 4.18)",
            ));
        }
        let u = |o: usize| u32::from_ne_bytes([buf[o], buf[o + 1], buf[o + 2], buf[o + 3]]);
        Ok((
            u(SND_MSS),
            u(RTT),
            u(TOTAL_RETRANS),
            u(MIN_RTT),
            u(DELIVERED),
        ))
    }

    /// The send buffer (`SO_SNDBUF`, kernel units).
    pub fn send_buffer(fd: BorrowedFd<'_>) -> std::io::Result<u64> {
        socket2::SockRef::from(&fd)
            .send_buffer_size()
            .map(|n| n as u64)
    }

    /// Sets the send buffer to `bytes` (kernel units) past `net.core.wmem_max`
    /// (`SO_SNDBUFFORCE`, which needs CAP_NET_ADMIN), or as far as that allows (`SO_SNDBUF`).
    pub fn set_send_buffer(fd: BorrowedFd<'_>, bytes: u64) -> std::io::Result<()> {
        // The kernel doubles what it is given (its overhead); give half.
        let half = libc::c_int::try_from(bytes / 2).unwrap_or(libc::c_int::MAX);
        // SAFETY: passes a pointer to a live c_int and its size; `fd` is a live socket.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUFFORCE,
                (&half as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        socket2::SockRef::from(&fd).set_send_buffer_size(half as usize)
    }

    /// Sets the most the connection may send per second (`u64::MAX`: no cap).
    pub fn set_max_pacing_rate(fd: BorrowedFd<'_>, rate: u64) -> std::io::Result<()> {
        // SAFETY: passes a pointer to a live u64 and its size; `fd` is a live socket.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_MAX_PACING_RATE,
                (&rate as *const u64).cast(),
                std::mem::size_of::<u64>() as libc::socklen_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Reads a [`Sample`] of the connection behind `fd`.
pub fn sample(fd: std::os::fd::BorrowedFd<'_>, at: Duration) -> std::io::Result<Sample> {
    let (mss, srtt, retrans, min_rtt, delivered) = sys::tcp_info(fd)?;
    Ok(Sample {
        at,
        delivered: u64::from(delivered) * u64::from(mss),
        retrans: u64::from(retrans) * u64::from(mss),
        srtt: Duration::from_micros(u64::from(srtt)),
        min_rtt: Duration::from_micros(u64::from(min_rtt)),
    })
}

/// The most the kernel's autotuning gives a send buffer: `net.ipv4.tcp_wmem`'s maximum (its
/// default, 4 MiB, when that cannot be read).
fn autotune_max() -> u64 {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|s| s.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(4 << 20)
}

/// Samples the connection behind `fd` until the future is dropped: paces it, and sizes its send
/// buffer if `size_buffer`, keeping `gauge` (the sum of a peer's caps) in step. Never returns; a
/// socket the calls fail on is left to the kernel.
pub async fn run(
    fd: std::os::fd::OwnedFd,
    size_buffer: bool,
    gauge: prometheus::IntGauge,
    peer: &str,
    link: u64,
) -> std::convert::Infallible {
    use std::os::fd::AsFd;
    /// This connection's cap in the peer's gauge, taken out again when the connection ends.
    struct Share(prometheus::IntGauge, i64);
    impl Drop for Share {
        fn drop(&mut self) {
            self.0.sub(self.1);
        }
    }
    let mut share = Share(gauge, 0);
    let origin = tokio::time::Instant::now();
    let mut pacer = Pacer::new();
    let autotune_max = autotune_max();
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let s = match sample(fd.as_fd(), origin.elapsed()) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(peer, link, "pacing off for this connection: {e}");
                return std::future::pending().await;
            }
        };
        let change = pacer.on_sample(s);
        if let Some(want) = pacer.send_buffer(autotune_max).filter(|_| size_buffer) {
            // Grow only, by a quarter at least.
            match sys::send_buffer(fd.as_fd()) {
                Ok(have) if want > have + have / 4 => {
                    if let Err(e) = sys::set_send_buffer(fd.as_fd(), want) {
                        tracing::debug!(peer, link, "SO_SNDBUF {want}: {e}");
                    }
                }
                _ => {}
            }
        }
        let Some(cap) = change else {
            continue;
        };
        if let Err(e) = sys::set_max_pacing_rate(fd.as_fd(), cap.unwrap_or(u64::MAX)) {
            tracing::debug!(peer, link, "SO_MAX_PACING_RATE: {e}");
            return std::future::pending().await;
        }
        let now = cap.map_or(0, |c| i64::try_from(c).unwrap_or(i64::MAX));
        share.0.add(now - share.1);
        share.1 = now;
        match cap {
            Some(c) => tracing::trace!(peer, link, rate = c, "pacing capped"),
            None => tracing::trace!(peer, link, "pacing cap lifted"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection on a path of `min_rtt` 100 ms: `rate` bytes/s delivered over the tick,
    /// `lost_pct` percent of that retransmitted, `srtt` in ms.
    struct Path {
        s: Sample,
        p: Pacer,
    }

    impl Path {
        fn new() -> Path {
            let mut p = Path {
                s: Sample {
                    min_rtt: Duration::from_millis(100),
                    srtt: Duration::from_millis(100),
                    ..Sample::default()
                },
                p: Pacer::new(),
            };
            assert_eq!(p.p.on_sample(p.s), None);
            p
        }
        /// A path that has been delivering `rate` for a while, with no queue.
        fn steady(rate: u64) -> Path {
            let mut p = Path::new();
            for _ in 0..RATE_HISTORY {
                assert_eq!(p.tick(rate, 0, 100), None);
            }
            p
        }
        fn tick(&mut self, rate: u64, lost_pct: u64, srtt_ms: u64) -> Option<Option<u64>> {
            self.s.at += TICK;
            self.s.delivered += rate / 10;
            self.s.retrans += rate / 10 * lost_pct / 100;
            self.s.srtt = Duration::from_millis(srtt_ms);
            self.p.on_sample(self.s)
        }
    }

    #[test]
    fn random_loss_with_no_queue_never_caps() {
        let mut p = Path::new();
        for _ in 0..100 {
            assert_eq!(p.tick(6_000_000, 3, 101), None);
        }
        assert_eq!(p.p.cap(), None);
    }

    #[test]
    fn random_loss_below_two_percent_never_caps_even_with_a_queue() {
        let mut p = Path::steady(6_000_000);
        for _ in 0..100 {
            assert_eq!(p.tick(6_000_000, 1, 190), None);
        }
    }

    #[test]
    fn a_nearly_idle_connection_never_caps() {
        // Pings and a little more: one lost segment is a large share of it.
        let mut p = Path::steady(300_000);
        for _ in 0..20 {
            assert_eq!(p.tick(300_000, 20, 190), None);
        }
        // Busy enough to judge: the same share caps.
        let mut p = Path::steady(600_000);
        assert_eq!(p.tick(600_000, 20, 190), Some(Some(540_000)));
    }

    #[test]
    fn a_standing_queue_without_loss_never_caps() {
        let mut p = Path::new();
        for _ in 0..100 {
            assert_eq!(p.tick(12_000_000, 0, 190), None);
        }
    }

    #[test]
    fn loss_and_a_queue_while_the_rate_still_ramps_up_never_cap() {
        // BBR's startup on a randomly lossy link: the rate doubles a round trip, a queue stands
        // and random losses come.
        let mut p = Path::new();
        let mut rate = 100_000;
        for _ in 0..8 {
            assert_eq!(p.tick(rate, 5, 190), None);
            rate *= 2;
        }
        // Once it stops growing, the same signs mean the queue overflows.
        for _ in 0..3 {
            assert_eq!(p.tick(rate, 0, 190), None);
        }
        assert_eq!(p.tick(rate, 10, 190), Some(Some(rate - rate / 10)));
    }

    #[test]
    fn an_overflowing_queue_caps_below_the_delivered_rate() {
        let mut p = Path::steady(11_000_000);
        p.tick(12_000_000, 0, 190);
        assert_eq!(p.tick(11_500_000, 40, 195), Some(Some(10_800_000)));
        // A queue standing without loss (draining, or another flow's): held.
        assert_eq!(p.tick(10_800_000, 0, 180), None);
        assert_eq!(p.tick(10_000_000, 0, 180), None);
        // Losses while all that is sent gets through (the queue draining, or random ones): held.
        for _ in 0..3 {
            assert_eq!(p.tick(10_800_000, 7, 190), None);
        }
        // Overflowing while sending faster than gets through: a tenth below what got through.
        for _ in 0..2 {
            assert_eq!(p.tick(9_000_000, 0, 190), None);
        }
        assert_eq!(p.tick(9_000_000, 7, 190), Some(Some(8_100_000)));
    }

    #[test]
    fn delay_alone_never_lowers_the_cap() {
        let mut p = Path::steady(10_000_000);
        p.tick(10_000_000, 10, 190);
        assert_eq!(p.p.cap(), Some(9_000_000));
        for _ in 0..10 {
            assert_eq!(p.tick(5_000_000, 0, 300), None);
        }
    }

    #[test]
    fn with_no_queue_a_used_cap_grows_and_an_unused_one_is_lifted() {
        let mut p = Path::steady(10_000_000);
        p.tick(10_000_000, 10, 190);
        assert_eq!(p.p.cap(), Some(9_000_000));
        assert_eq!(p.tick(9_000_000, 0, 101), Some(Some(9_450_000)));
        assert_eq!(p.tick(9_400_000, 0, 101), Some(Some(9_922_500)));
        // Used a little: held.
        assert_eq!(p.tick(7_000_000, 0, 101), None);
        // Mostly unused for RELEASE_AFTER: lifted.
        let ticks = RELEASE_AFTER.as_millis() / TICK.as_millis();
        for _ in 0..ticks {
            assert_eq!(p.tick(1_000_000, 0, 100), None);
        }
        assert_eq!(p.tick(1_000_000, 0, 100), Some(None));
        assert_eq!(p.p.cap(), None);
    }

    #[test]
    fn the_send_buffer_is_four_of_the_largest_bdp_seen_beyond_the_kernels_own() {
        const KERNEL: u64 = 4 << 20;
        let mut p = Path::new();
        assert_eq!(p.p.send_buffer(KERNEL), None);
        // Within what the kernel's autotuning reaches: left to it.
        p.tick(10_000_000, 0, 100);
        assert_eq!(p.p.send_buffer(KERNEL), None);
        assert_eq!(p.p.send_buffer(1 << 20), Some(4_000_000));
        p.tick(20_000_000, 0, 150);
        assert_eq!(p.p.send_buffer(KERNEL), Some(12_000_000));
        // A slower spell does not shrink it, and it never exceeds the maximum.
        for _ in 0..4 {
            p.tick(1_000_000, 0, 100);
        }
        assert_eq!(p.p.send_buffer(KERNEL), Some(12_000_000));
        p.tick(1_000_000_000, 0, 200);
        assert_eq!(p.p.send_buffer(KERNEL), Some(MAX_SEND_BUFFER));
    }

    #[test]
    fn samples_out_of_order_or_at_one_instant_change_nothing() {
        let mut p = Path::new();
        let s = p.s;
        assert_eq!(p.p.on_sample(s), None);
        p.s.at = Duration::ZERO;
        p.s.retrans += 10;
        p.s.srtt = Duration::from_millis(300);
        assert_eq!(p.p.on_sample(p.s), None);
    }
}
