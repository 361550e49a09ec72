//! The packet-level WAN emulator: two TUN devices ("a" and "b"), one forwarding thread per
//! direction, each applying a [`Shaper`] and writing packets out at their scheduled time
//! (timed wait, then a short busy-poll before the deadline).
//!
//! The link can be taken down and brought back at run time (an outage: every packet in both
//! directions is dropped, also those already in flight), by SIGUSR1 / SIGUSR2 to `ditto-wanem` or by
//! [`Emulator::set_down`] when the emulator runs inside another program (the integration tests).

use crate::link::{DirConfig, DirSnapshot, DirStats, Shaper, Verdict};
use crate::{sys, units};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

/// Command-line options of `ditto-wanem`.
#[derive(Args, Debug, Clone)]
pub struct WanemArgs {
    /// Interface name of side A's device (after it is moved into --a-netns).
    #[arg(long, default_value = "wan0")]
    pub a_dev: String,
    /// Interface name of side B's device.
    #[arg(long, default_value = "wan0")]
    pub b_dev: String,
    /// Network namespace (name under /run/netns) to move side A's device into.
    #[arg(long)]
    pub a_netns: Option<String>,
    /// Network namespace to move side B's device into.
    #[arg(long)]
    pub b_netns: Option<String>,
    /// Address (CIDR) to put on side A's device, e.g. 10.77.0.1/30.
    #[arg(long)]
    pub a_addr: Option<String>,
    /// Address (CIDR) to put on side B's device.
    #[arg(long)]
    pub b_addr: Option<String>,
    /// Route (CIDR) to add via side A's device (repeatable).
    #[arg(long)]
    pub a_route: Vec<String>,
    /// Route (CIDR) to add via side B's device (repeatable).
    #[arg(long)]
    pub b_route: Vec<String>,
    /// Bottleneck rate, both directions ("100mbit", "1gbit", "none").
    #[arg(long, default_value = "none")]
    pub rate: String,
    /// One-way delay, both directions ("40ms").
    #[arg(long, default_value = "0ms")]
    pub delay: String,
    /// Jitter (± around the delay, no reordering), both directions.
    #[arg(long, default_value = "0ms")]
    pub jitter: String,
    /// Random loss probability, both directions ("0.01" or "1%").
    #[arg(long, default_value = "0")]
    pub loss: String,
    /// Drop-tail queue limit in bytes ("256KiB"); default: 2 x delay worth of bytes, >= 64 KiB.
    #[arg(long)]
    pub queue: Option<String>,
    /// Path MTU: larger packets are dropped without an ICMP error (0 = none).
    #[arg(long, default_value_t = 0)]
    pub mtu: usize,
    /// MTU of the two TUN devices as seen by the hosts.
    #[arg(long, default_value_t = 1500)]
    pub dev_mtu: usize,
    /// Rate for direction A->B only (overrides --rate).
    #[arg(long)]
    pub ab_rate: Option<String>,
    /// Rate for direction B->A only.
    #[arg(long)]
    pub ba_rate: Option<String>,
    /// One-way delay A->B only.
    #[arg(long)]
    pub ab_delay: Option<String>,
    /// One-way delay B->A only.
    #[arg(long)]
    pub ba_delay: Option<String>,
    /// Loss A->B only.
    #[arg(long)]
    pub ab_loss: Option<String>,
    /// Loss B->A only.
    #[arg(long)]
    pub ba_loss: Option<String>,
    /// Seed of the loss/jitter RNG.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Rewrite this JSON file with the counters every --stats-interval-ms (atomically).
    #[arg(long)]
    pub stats_file: Option<PathBuf>,
    /// Interval of stats-file rewrites.
    #[arg(long, default_value_t = 100)]
    pub stats_interval_ms: u64,
    /// Busy-poll this many microseconds before a deadline instead of sleeping.
    #[arg(long, default_value_t = 0)]
    pub spin_us: u64,
    /// SCHED_FIFO priority of the forwarding threads (0 = normal scheduling). Falls back to
    /// normal scheduling with a warning if not permitted.
    #[arg(long, default_value_t = 10)]
    pub rt_priority: i32,
    /// Exit (SIGTERM) when the parent process dies.
    #[arg(long)]
    pub die_with_parent: bool,
}

/// Both directions' settings.
#[derive(Clone, Debug, Serialize)]
pub struct LinkConfig {
    pub ab: DirConfig,
    pub ba: DirConfig,
}

/// `WanemArgs::parse_from` for programs that embed the emulator.
#[derive(clap::Parser, Debug)]
struct EmbeddedCli {
    #[command(flatten)]
    args: WanemArgs,
}

impl WanemArgs {
    /// The options from command-line style arguments (without the program name), with the same
    /// defaults as `ditto-wanem`, e.g. `["--rate", "20mbit", "--delay", "40ms"]`.
    pub fn from_args<I, S>(args: I) -> Result<WanemArgs>
    where
        I: IntoIterator<Item = S>,
        S: Into<std::ffi::OsString> + Clone,
    {
        use clap::Parser;
        let argv = std::iter::once(std::ffi::OsString::from("ditto-wanem"))
            .chain(args.into_iter().map(Into::into));
        Ok(EmbeddedCli::try_parse_from(argv)?.args)
    }

    /// Resolves the options to per-direction settings.
    pub fn link_config(&self) -> Result<LinkConfig> {
        let dir = |rate: &Option<String>,
                   delay: &Option<String>,
                   loss: &Option<String>|
         -> Result<DirConfig> {
            let rate_bps = units::parse_rate(rate.as_deref().unwrap_or(&self.rate))?;
            let delay = units::parse_duration(delay.as_deref().unwrap_or(&self.delay))?;
            let loss = units::parse_loss(loss.as_deref().unwrap_or(&self.loss))?;
            let queue_bytes = match &self.queue {
                Some(q) => units::parse_bytes(q)?,
                None => DirConfig::default_queue(rate_bps, delay),
            };
            if rate_bps > 0 && queue_bytes < self.dev_mtu as u64 {
                bail!(
                    "queue of {queue_bytes} bytes cannot hold one {}-byte packet",
                    self.dev_mtu
                );
            }
            Ok(DirConfig {
                delay,
                jitter: units::parse_duration(&self.jitter)?,
                rate_bps,
                queue_bytes,
                loss,
                mtu: self.mtu,
            })
        };
        Ok(LinkConfig {
            ab: dir(&self.ab_rate, &self.ab_delay, &self.ab_loss)?,
            ba: dir(&self.ba_rate, &self.ba_delay, &self.ba_loss)?,
        })
    }
}

/// What the stats file holds.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatsReport {
    pub pid: u32,
    pub uptime_s: f64,
    pub running: bool,
    /// A -> B direction.
    pub ab: DirSnapshot,
    /// B -> A direction.
    pub ba: DirSnapshot,
}

impl StatsReport {
    /// Reads a stats file written by a running or finished emulator.
    pub fn read(path: &Path) -> Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
    }

    /// IP bytes offered to the WAN in both directions.
    pub fn wan_bytes(&self) -> u64 {
        self.ab.rx_bytes + self.ba.rx_bytes
    }
}

fn run_ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed?)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

struct Side<'a> {
    tmp: String,
    dev: &'a str,
    netns: Option<&'a str>,
    addr: Option<&'a str>,
    routes: &'a [String],
}

fn configure(side: &Side<'_>, dev_mtu: usize) -> Result<()> {
    let mut ns_args: Vec<&str> = Vec::new();
    if let Some(ns) = side.netns {
        run_ip(&["link", "set", "dev", &side.tmp, "netns", ns])?;
        ns_args = vec!["-n", ns];
    }
    let ip = |rest: &[&str]| -> Result<()> {
        let mut v = ns_args.clone();
        v.extend_from_slice(rest);
        run_ip(&v)
    };
    if side.tmp != side.dev {
        ip(&["link", "set", "dev", &side.tmp, "name", side.dev])?;
    }
    let mtu = dev_mtu.to_string();
    ip(&[
        "link",
        "set",
        "dev",
        side.dev,
        "mtu",
        &mtu,
        "txqueuelen",
        "10000",
    ])?;
    if let Some(addr) = side.addr {
        ip(&["addr", "add", addr, "dev", side.dev])?;
    }
    ip(&["link", "set", "dev", side.dev, "up"])?;
    for r in side.routes {
        ip(&["route", "replace", r, "dev", side.dev])?;
    }
    Ok(())
}

struct Packet {
    at: u64,
    len: usize,
    buf: Vec<u8>,
}

/// Everything one forwarding thread needs.
struct Forwarder {
    input: Arc<File>,
    output: Arc<File>,
    shaper: Shaper,
    stats: Arc<DirStats>,
    stop: Arc<AtomicBool>,
    /// The link is down: drop everything.
    down: Arc<AtomicBool>,
    epoch: Instant,
    spin: Duration,
    buf_len: usize,
    rt_priority: i32,
}

/// Forwards packets read from `input` to `output` until `stop` is set or a device fails.
fn forward(f: Forwarder) -> Result<()> {
    let Forwarder {
        input,
        output,
        mut shaper,
        stats,
        stop,
        down,
        epoch,
        spin,
        buf_len,
        rt_priority,
    } = f;
    sys::set_min_timer_slack();
    if rt_priority > 0 {
        if let Err(e) = sys::set_realtime(rt_priority) {
            eprintln!("ditto-wanem: no real-time scheduling ({e}); timing will be less precise under load");
        }
    }
    let now_ns = || epoch.elapsed().as_nanos() as u64;
    let spin_ns = spin.as_nanos() as u64;
    let mut queue: VecDeque<Packet> = VecDeque::with_capacity(4096);
    let mut pool: Vec<Vec<u8>> = Vec::new();
    let mut scratch = vec![0u8; 65536];
    let mut inp = &*input;
    let mut out = &*output;
    loop {
        if stop.load(Relaxed) {
            return Ok(());
        }
        // Read once per round (after any wait): the only cost of outages on the forwarding path.
        let is_down = down.load(Relaxed);
        // 1. Deliver what is due (or drop it: the link went down while it was in flight).
        let now = now_ns();
        while let Some(p) = queue.front() {
            if p.at > now {
                break;
            }
            if is_down {
                stats.record_outage_drop(p.len);
            } else {
                let t = now_ns();
                match out.write(&p.buf[..p.len]) {
                    Ok(_) => {
                        stats.record_tx(t, p.len);
                        stats.record_late(t.saturating_sub(p.at));
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => {
                        stats.write_errors.fetch_add(1, Relaxed);
                    }
                }
            }
            if let Some(p) = queue.pop_front() {
                pool.push(p.buf);
            }
        }
        // 2. Take in what has arrived (bounded batch so deliveries are not starved).
        let mut got = 0;
        while got < 64 {
            match inp.read(&mut scratch) {
                Ok(0) => bail!("device closed"),
                Ok(len) => {
                    got += 1;
                    let t = now_ns();
                    stats.rx_packets.fetch_add(1, Relaxed);
                    stats.rx_bytes.fetch_add(len as u64, Relaxed);
                    if is_down {
                        stats.record_outage_drop(len);
                        continue;
                    }
                    match shaper.admit(t, len) {
                        Verdict::Deliver(at) => {
                            let mut buf = pool.pop().unwrap_or_else(|| Vec::with_capacity(buf_len));
                            buf.clear();
                            buf.extend_from_slice(&scratch[..len]);
                            queue.push_back(Packet { at, len, buf });
                            stats.queue_max_bytes.fetch_max(shaper.backlog(t), Relaxed);
                        }
                        Verdict::DropMtu => {
                            stats.drop_mtu_packets.fetch_add(1, Relaxed);
                            stats.drop_mtu_bytes.fetch_add(len as u64, Relaxed);
                        }
                        Verdict::DropLoss => {
                            stats.drop_loss_packets.fetch_add(1, Relaxed);
                            stats.drop_loss_bytes.fetch_add(len as u64, Relaxed);
                        }
                        Verdict::DropQueue => {
                            stats.drop_queue_packets.fetch_add(1, Relaxed);
                            stats.drop_queue_bytes.fetch_add(len as u64, Relaxed);
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("reading from TUN device"),
            }
        }
        if got > 0 {
            continue;
        }
        // 3. Nothing to read: wait for input or the next deadline (sleep, then busy-poll).
        let wait_ns = match queue.front() {
            Some(p) => p.at.saturating_sub(now_ns()),
            None => 100_000_000,
        };
        if wait_ns == 0 {
            continue;
        }
        if wait_ns > spin_ns {
            sys::wait_readable(&input, Duration::from_nanos(wait_ns - spin_ns))
                .context("waiting on TUN device")?;
        } else {
            std::hint::spin_loop();
        }
    }
}

/// A running emulator: two TUN devices wired into their namespaces and one forwarding thread per
/// direction. Dropping it stops the threads, which removes the devices.
pub struct Emulator {
    link: LinkConfig,
    epoch: Instant,
    stop: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    st_ab: Arc<DirStats>,
    st_ba: Arc<DirStats>,
    workers: Vec<thread::JoinHandle<Result<()>>>,
}

impl Emulator {
    /// Creates and configures the devices (in the calling thread's network namespace, then moved
    /// into --a-netns / --b-netns), blocks `block_signals` in the calling thread (so that the
    /// forwarding threads inherit the mask; the `ip` children do not) and starts forwarding.
    pub fn start(args: &WanemArgs, block_signals: &[i32]) -> Result<Emulator> {
        static INSTANCE: AtomicU32 = AtomicU32::new(0);
        let link = args.link_config()?;
        // Unique names also with several emulators in one process: "dw<pid>-<n>a" (<= 15 bytes).
        let tag = format!(
            "dw{}-{}",
            std::process::id(),
            INSTANCE.fetch_add(1, Relaxed) % 1000
        );
        let tmp_a = format!("{tag}a");
        let tmp_b = format!("{tag}b");
        let tun_a = Arc::new(
            sys::open_tun(&tmp_a).with_context(|| format!("creating TUN device {tmp_a}"))?,
        );
        let tun_b = Arc::new(
            sys::open_tun(&tmp_b).with_context(|| format!("creating TUN device {tmp_b}"))?,
        );
        let side_a = Side {
            tmp: tmp_a,
            dev: &args.a_dev,
            netns: args.a_netns.as_deref(),
            addr: args.a_addr.as_deref(),
            routes: &args.a_route,
        };
        let side_b = Side {
            tmp: tmp_b,
            dev: &args.b_dev,
            netns: args.b_netns.as_deref(),
            addr: args.b_addr.as_deref(),
            routes: &args.b_route,
        };
        if side_a.netns.is_none() && side_b.netns.is_none() && side_a.dev == side_b.dev {
            bail!(
                "both devices would be named {:?} in the same namespace",
                side_a.dev
            );
        }
        configure(&side_a, args.dev_mtu).context("configuring side A")?;
        configure(&side_b, args.dev_mtu).context("configuring side B")?;
        if !block_signals.is_empty() {
            sys::block_signals(block_signals).context("blocking signals")?;
        }

        let epoch = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let down = Arc::new(AtomicBool::new(false));
        let st_ab = Arc::new(DirStats::default());
        let st_ba = Arc::new(DirStats::default());
        let spin = Duration::from_micros(args.spin_us);
        let buf_len = args.dev_mtu.max(1500) + 64;
        let rt_prio = args.rt_priority.clamp(0, 99);
        let mut emu = Emulator {
            link: link.clone(),
            epoch,
            stop: stop.clone(),
            down: down.clone(),
            st_ab: st_ab.clone(),
            st_ba: st_ba.clone(),
            workers: Vec::new(),
        };
        for (name, input, output, cfg, st, seed) in [
            ("wanem-ab", &tun_a, &tun_b, link.ab, &st_ab, args.seed),
            (
                "wanem-ba",
                &tun_b,
                &tun_a,
                link.ba,
                &st_ba,
                args.seed.wrapping_add(0x5151),
            ),
        ] {
            let f = Forwarder {
                input: input.clone(),
                output: output.clone(),
                shaper: Shaper::new(cfg, seed),
                stats: st.clone(),
                stop: stop.clone(),
                down: down.clone(),
                epoch,
                spin,
                buf_len,
                rt_priority: rt_prio,
            };
            let h = thread::Builder::new()
                .name(name.into())
                .spawn(move || forward(f))
                .context("spawning forwarding thread")?;
            emu.workers.push(h);
        }
        Ok(emu)
    }

    /// The per-direction settings in force.
    pub fn link(&self) -> &LinkConfig {
        &self.link
    }

    /// Takes the link down (drop every packet, both directions, also those in flight) or brings
    /// it back up.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Relaxed);
    }

    pub fn is_down(&self) -> bool {
        self.down.load(Relaxed)
    }

    /// The counters now.
    pub fn report(&self) -> StatsReport {
        StatsReport {
            pid: std::process::id(),
            uptime_s: self.epoch.elapsed().as_secs_f64(),
            running: !self.stop.load(Relaxed),
            ab: self.st_ab.snapshot(),
            ba: self.st_ba.snapshot(),
        }
    }

    /// True once a forwarding thread has ended (a device failed).
    pub fn failed(&self) -> bool {
        self.workers.iter().any(|w| w.is_finished())
    }

    /// Stops forwarding; the final counters, or why a forwarding thread stopped early.
    pub fn stop(mut self) -> Result<StatsReport> {
        match self.halt() {
            Some(e) => Err(e),
            None => Ok(self.report()),
        }
    }

    fn halt(&mut self) -> Option<anyhow::Error> {
        self.stop.store(true, Relaxed);
        let mut failure = None;
        for w in self.workers.drain(..) {
            match w.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failure = Some(e),
                Err(_) => failure = Some(anyhow::anyhow!("forwarding thread panicked")),
            }
        }
        failure.map(|e| e.context("forwarding stopped"))
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop.store(true, Relaxed);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Runs the emulator until SIGINT/SIGTERM (or a device failure); SIGUSR1 takes the link down,
/// SIGUSR2 brings it back. Prints "ready" on stdout once both devices are configured, and the
/// final counters on exit.
pub fn run(args: WanemArgs) -> Result<StatsReport> {
    if args.die_with_parent {
        sys::die_with_parent();
    }
    let signals = [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGUSR2];
    let emu = Emulator::start(&args, &signals)?;
    let write_stats = |r: &StatsReport| -> Result<()> {
        if let Some(path) = &args.stats_file {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, serde_json::to_vec_pretty(r)?)?;
            std::fs::rename(&tmp, path)?;
        }
        Ok(())
    };
    write_stats(&emu.report()).context("writing stats file")?;
    println!("ready {}", serde_json::to_string(emu.link())?);
    std::io::stdout().flush().ok();

    let interval = Duration::from_millis(args.stats_interval_ms.clamp(10, 60_000));
    loop {
        match sys::wait_signal(&signals, interval) {
            Some(libc::SIGUSR1) => {
                emu.set_down(true);
                eprintln!("ditto-wanem: link down (SIGUSR1)");
            }
            Some(libc::SIGUSR2) => {
                emu.set_down(false);
                eprintln!("ditto-wanem: link up (SIGUSR2)");
            }
            Some(sig) => {
                eprintln!("ditto-wanem: signal {sig}, stopping");
                break;
            }
            None => {}
        }
        if emu.failed() {
            break;
        }
        write_stats(&emu.report()).context("writing stats file")?;
    }
    let mut emu = emu;
    let failure = emu.halt();
    let final_report = emu.report();
    write_stats(&final_report).ok();
    println!("{}", serde_json::to_string_pretty(&final_report)?);
    match failure {
        Some(e) => Err(e),
        None => Ok(final_report),
    }
}
