//! `ditto-bench modes`: what transparent interception costs against `forward` mode, and how long
//! traffic stops when site A's ditto dies or hangs under interception (fail-to-wire).
//!
//! In `forward` mode the client connects to site A's `[[forward]]` listener; in `tproxy` and
//! `redirect` mode it connects to the server's own address and site A's nftables rules divert the
//! connection to ditto (`[intercept] interfaces = ["lan0"] ports = [<server port>]`, one `[[route]]`
//! for the server subnet to site B). Every measurement gets a freshly started pair (empty stores,
//! so every transfer is cold) on the same running emulator; the modes take turns within each
//! round, in a rotated order, so that drift of a shared machine hits them alike.
//!
//! Measured, per round and mode:
//! - bulk: one download of incompressible bytes, and one of generated text (compressible, novel),
//!   on a fast link where the appliances' CPU is the bottleneck; one incompressible download on a
//!   typical WAN link;
//! - latency: `--rr-conns` new connections doing `--rr-count` small request/response exchanges
//!   each: every exchange time and every connection's time to the first response.
//!
//! Fail-to-wire: a client opens a new connection every `--probe-interval-ms` (each sends a small
//! request and must get the answer within `--probe-timeout-ms`); after 1.5 s site A's daemon gets
//! SIGKILL or SIGSTOP; the gap is the time from the signal until new connections work again.
//!
//! `--topology bridged` measures `inline` mode instead, on the bridged topology of
//! [`crate::bridged`] (client and server in one subnet, site A and B bridges with the same emulated
//! link between them): in `forward` mode the client connects to site A's `[[forward]]` listener on
//! its bridge address, in `inline` mode to the server, and site A intercepts at its bridge. Site B
//! is the same in both (no `[intercept]`).

use crate::linktest::{run_json, sibling_binary, start_server, KillOnDrop};
use crate::procs::Usage;
use crate::scenarios::{
    civil_date, clear_sites, ditto_available, ditto_configs, ditto_status, ditto_target,
    start_ditto_with, tool_versions, wait_ditto_ready, Ctx, DittoConfigs, DittoMode, Running,
    SERVER_PORT,
};
use crate::topo::{Link, LinkSpec, Role, Topo, TopoGuard};
use crate::traffic::FetchResult;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Options of `modes`.
#[derive(Args, Debug, Clone)]
pub struct ModesArgs {
    /// Modes to compare, comma-separated; `forward` is the baseline. Diagnostics:
    /// `forward+tproxy-rules`, `forward+redirect-rules`, `forward+inline-rules` (site A
    /// intercepts, with its rules installed, but the client uses the forward listener: the rules'
    /// cost on forwarded traffic; fast link only). Default: forward,tproxy,redirect (routed) or
    /// forward,inline (bridged).
    #[arg(long)]
    pub modes: Option<String>,
    /// `routed` (site A and B route between three subnets: forward, tproxy, redirect) or
    /// `bridged` (one subnet, site A and B bridge it: forward, inline).
    #[arg(long, default_value = "routed")]
    pub topology: String,
    /// Parts to run: bulk (fast link: throughput and latency), wan (typical WAN: throughput),
    /// ftw (fail-to-wire).
    #[arg(long, default_value = "bulk,wan,ftw")]
    pub parts: String,
    /// Rounds of the throughput/latency parts: each round runs every mode once.
    #[arg(long, default_value_t = 5)]
    pub rounds: usize,
    /// Rate of the fast link (the appliances are the bottleneck).
    #[arg(long, default_value = "1gbit")]
    pub fast_rate: String,
    /// RTT of the fast link.
    #[arg(long, default_value = "10ms")]
    pub fast_rtt: String,
    /// Incompressible download on the fast link ("0" skips it).
    #[arg(long, default_value = "256MiB")]
    pub fast_rand_size: String,
    /// Generated-text download on the fast link ("0" skips it).
    #[arg(long, default_value = "128MiB")]
    pub fast_text_size: String,
    /// Rate of the typical WAN link.
    #[arg(long, default_value = "100mbit")]
    pub wan_rate: String,
    /// RTT of the typical WAN link.
    #[arg(long, default_value = "40ms")]
    pub wan_rtt: String,
    /// Incompressible download on the typical WAN link.
    #[arg(long, default_value = "32MiB")]
    pub wan_size: String,
    /// New connections of the latency measurement, per round and mode ("0" skips it).
    #[arg(long, default_value_t = 20)]
    pub rr_conns: usize,
    /// Request/response exchanges per connection (100-byte requests, 1000-byte responses).
    #[arg(long, default_value_t = 25)]
    pub rr_count: usize,
    /// Repetitions of each fail-to-wire case.
    #[arg(long, default_value_t = 5)]
    pub ftw_reps: usize,
    /// A new probe connection every this many ms.
    #[arg(long, default_value_t = 20)]
    pub probe_interval_ms: u64,
    /// A probe that has no answer after this many ms failed.
    #[arg(long, default_value_t = 1000)]
    pub probe_timeout_ms: u64,
    /// Site A's `[intercept] watchdog` in the fail-to-wire cases (default: ditto's default, 3s).
    #[arg(long)]
    pub watchdog: Option<String>,
    /// The ditto binary (default: `ditto` next to this binary).
    #[arg(long)]
    pub ditto: Option<PathBuf>,
    /// Where to write results (default: the crate's results/ directory).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Namespace prefix (default: unique).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Measure nothing: recompute the summary tables of this JSON report (and its .md).
    #[arg(long)]
    pub resummarize: Option<PathBuf>,
}

/// One download.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Bulk {
    pub bytes: u64,
    pub secs: f64,
    pub mbps: f64,
    pub wan_bytes: u64,
    pub exact: bool,
}

/// Raw samples of `rr-samples`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RrSamples {
    /// TCP connect time of each connection.
    pub connect_ms: Vec<f64>,
    /// From starting to connect to the end of the first response, per connection.
    pub first_ms: Vec<f64>,
    /// Every later exchange (request written to response read).
    pub exchange_ms: Vec<f64>,
}

/// One started pair in one mode: what it measured.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PairResult {
    /// "fast" or "wan".
    pub link: String,
    pub round: usize,
    pub mode: String,
    /// "ok" or "failed".
    pub status: String,
    pub note: String,
    pub rand: Option<Bulk>,
    pub text: Option<Bulk>,
    pub rr: Option<RrSamples>,
    /// Site A's `ditto_flows_total` counters that are not zero, "outcome/reason=count".
    pub flows: Vec<String>,
    pub side_a: Option<Usage>,
    pub side_b: Option<Usage>,
}

/// One client probe of `connect-probe`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Probe {
    /// Start, microseconds since the Unix epoch.
    pub start_us: u64,
    pub ms: f64,
    pub ok: bool,
    pub err: String,
}

/// One fail-to-wire case run.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FtwResult {
    /// e.g. "tproxy-kill", "redirect-stop", "tproxy-kill-noguard".
    pub case: String,
    pub rep: usize,
    pub status: String,
    pub note: String,
    /// Probes started before the signal that failed (connections ditto held when it died/hung).
    pub inflight_failed: usize,
    pub probes_before: usize,
    pub probes_after: usize,
    /// Probes started at or after the signal that failed.
    pub failed_after: usize,
    /// Start of the last failed probe, ms after the signal.
    pub last_fail_ms: Option<f64>,
    /// Start of the first probe after the last failed one that succeeded, ms after the signal:
    /// traffic was back by then (0 if no probe after the signal failed).
    pub gap_ms: Option<f64>,
    /// When the guard logged that it removed the rules, ms after the signal.
    pub rules_removed_ms: Option<f64>,
    /// When the daemon process was gone, ms after the signal.
    pub daemon_gone_ms: Option<f64>,
    /// Whether ditto's rules were still installed after the case (`ditto cleanup` found them).
    pub rules_left: bool,
}

/// Summary of one measure over rounds, per mode.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ThroughputRow {
    pub workload: String,
    pub mode: String,
    pub n: usize,
    pub median_mbps: f64,
    pub min_mbps: f64,
    pub max_mbps: f64,
    /// median(mode) / median(forward).
    pub ratio_of_medians: Option<f64>,
    /// Median over rounds of mode / forward in the same round.
    pub median_round_ratio: Option<f64>,
    /// 95% bootstrap interval of `ratio_of_medians` (rounds resampled): what the run can resolve.
    #[serde(default)]
    pub ratio_ci95: Option<[f64; 2]>,
}

/// Latency of one mode (all samples pooled) and its difference to forward.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LatencyRow {
    pub mode: String,
    pub exchanges: usize,
    pub exchange_p50_ms: f64,
    pub exchange_p99_ms: f64,
    pub added_p50_ms: Option<f64>,
    pub added_p99_ms: Option<f64>,
    /// Median over rounds of (this round's p50 - forward's p50 of the same round).
    pub added_p50_round_median_ms: Option<f64>,
    /// 95% bootstrap intervals of `added_p50_ms` and `added_p99_ms` (samples resampled).
    #[serde(default)]
    pub added_p50_ci95: Option<[f64; 2]>,
    #[serde(default)]
    pub added_p99_ci95: Option<[f64; 2]>,
    pub connections: usize,
    pub first_p50_ms: f64,
    pub first_p99_ms: f64,
    pub added_first_p50_ms: Option<f64>,
    #[serde(default)]
    pub added_first_p50_ci95: Option<[f64; 2]>,
    pub connect_p50_ms: f64,
}

/// Summary of one fail-to-wire case.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FtwRow {
    pub case: String,
    pub n: usize,
    /// min / median / max of gap_ms over the repetitions that recovered.
    pub gap_ms: [f64; 3],
    pub recovered: usize,
    pub failed_after_total: usize,
    pub inflight_failed_total: usize,
    pub rules_removed_ms: Option<[f64; 3]>,
    pub daemon_gone_ms: Option<[f64; 3]>,
}

/// The run as written to JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModesReport {
    pub date: String,
    pub started_unix: u64,
    pub machine: String,
    pub tools: Vec<String>,
    pub command: String,
    /// "routed" or "bridged".
    #[serde(default = "routed_name")]
    pub topology: String,
    pub fast_link: String,
    pub wan_link: String,
    pub rounds: usize,
    pub probe_interval_ms: u64,
    pub probe_timeout_ms: u64,
    pub watchdog: String,
    pub throughput: Vec<ThroughputRow>,
    pub latency: Vec<LatencyRow>,
    pub fail_to_wire: Vec<FtwRow>,
    pub pairs: Vec<PairResult>,
    pub ftw_runs: Vec<FtwResult>,
}

fn routed_name() -> String {
    "routed".into()
}

const TEXT_FILE: &str = "modes-text.txt";

/// The topology a run uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Topology {
    /// [`crate::topo`]: forward, tproxy, redirect.
    Routed,
    /// [`crate::bridged`]: forward, inline.
    Bridged,
}

impl Topology {
    fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "routed" => Topology::Routed,
            "bridged" => Topology::Bridged,
            o => bail!("unknown topology {o:?} (routed, bridged)"),
        })
    }
    fn name(self) -> &'static str {
        match self {
            Topology::Routed => "routed",
            Topology::Bridged => "bridged",
        }
    }
    fn default_modes(self) -> &'static str {
        match self {
            Topology::Routed => "forward,tproxy,redirect",
            Topology::Bridged => "forward,inline",
        }
    }
    fn supports(self, m: Mode) -> bool {
        match self {
            Topology::Routed => m != Mode::Inline,
            Topology::Bridged => matches!(m, Mode::Forward | Mode::Inline),
        }
    }
}

/// How the client reaches the pair: the routed topology's [`DittoMode`]s, and `inline`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Forward,
    Tproxy,
    Redirect,
    Inline,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Forward => "forward",
            Mode::Tproxy => "tproxy",
            Mode::Redirect => "redirect",
            Mode::Inline => "inline",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "forward" => Mode::Forward,
            "tproxy" => Mode::Tproxy,
            "redirect" => Mode::Redirect,
            "inline" => Mode::Inline,
            o => bail!("unknown mode {o:?} (forward, tproxy, redirect, inline)"),
        })
    }
    fn intercepts(self) -> bool {
        self != Mode::Forward
    }
    /// The routed topology's mode (inline has none).
    fn routed(self) -> Result<DittoMode> {
        Ok(match self {
            Mode::Forward => DittoMode::Forward,
            Mode::Tproxy => DittoMode::Tproxy,
            Mode::Redirect => DittoMode::Redirect,
            Mode::Inline => bail!("inline mode needs --topology bridged"),
        })
    }
}

/// A started pair of either topology.
enum Started {
    Routed(Running),
    Bridged(crate::bridged::Pair),
}

impl Started {
    fn start(ctx: &Ctx, ditto: &Path, topo: Topology, tag: &str, v: Variant) -> Result<Self> {
        Ok(match topo {
            Topology::Routed => Started::Routed(start_ditto_with(
                ctx,
                ditto,
                tag,
                v.mode.routed()?,
                v.via_forward,
            )?),
            Topology::Bridged => Started::Bridged(crate::bridged::start_pair(
                ctx,
                ditto,
                tag,
                v.mode == Mode::Inline,
                v.via_forward,
            )?),
        })
    }
    fn target(&self) -> String {
        match self {
            Started::Routed(r) => r.target.clone(),
            Started::Bridged(p) => p.target.clone(),
        }
    }
    fn stop(self) -> (Option<Usage>, Option<Usage>) {
        match self {
            Started::Routed(r) => r.stop(),
            Started::Bridged(p) => p.stop(),
        }
    }
}

/// A way to run the pair: a mode, and whether the client uses the forward listener anyway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Variant {
    mode: Mode,
    via_forward: bool,
}

impl Variant {
    fn name(self) -> String {
        if self.via_forward && self.mode.intercepts() {
            format!("forward+{}-rules", self.mode.name())
        } else {
            self.mode.name().to_string()
        }
    }
    fn parse(s: &str) -> Result<Self> {
        let s = s.trim();
        if let Some(m) = s
            .strip_prefix("forward+")
            .and_then(|r| r.strip_suffix("-rules"))
        {
            let mode = Mode::parse(m)?;
            if !mode.intercepts() {
                bail!("{s:?}: forward+<tproxy|redirect|inline>-rules");
            }
            return Ok(Variant {
                mode,
                via_forward: true,
            });
        }
        Ok(Variant {
            mode: Mode::parse(s)?,
            via_forward: false,
        })
    }
    /// The flow reason site A counts for the client's connections.
    fn reason(self) -> &'static str {
        if self.via_forward {
            "forward"
        } else {
            self.mode.name()
        }
    }
    fn is_diagnostic(self) -> bool {
        self.via_forward && self.mode.intercepts()
    }
}

const FORWARD: Variant = Variant {
    mode: Mode::Forward,
    via_forward: false,
};

fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Writes `bytes` of text-like data: words of a fixed vocabulary drawn with a skewed distribution,
/// so that it compresses (zstd -3: about 2.5x) but holds no repeated chunk-sized runs.
fn write_text(path: &Path, bytes: u64) -> Result<()> {
    let mut rng = crate::link::Rng::new(0x7e47);
    let vocab: Vec<Vec<u8>> = (0..8192)
        .map(|_| {
            let len = 2 + (rng.next_u64() % 9) as usize;
            (0..len)
                .map(|_| b"etaoinshrdlucmfwypvbgkjqxz"[(rng.next_u64() % 26) as usize])
                .collect()
        })
        .collect();
    let mut f = std::io::BufWriter::new(
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?,
    );
    let mut written = 0u64;
    let mut line = Vec::with_capacity(256);
    while written < bytes {
        line.clear();
        for w in 0..(6 + rng.next_u64() % 10) {
            if w > 0 {
                line.push(b' ');
            }
            // Two uniform draws multiplied: small indices (common words) are much more likely.
            let a = rng.next_f64();
            let b = rng.next_f64();
            line.extend_from_slice(&vocab[((a * b) * vocab.len() as f64) as usize]);
        }
        line.push(b'\n');
        let n = line.len().min((bytes - written) as usize);
        f.write_all(&line[..n])?;
        written += n as u64;
    }
    f.flush()?;
    Ok(())
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p / 100.0).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn sorted(v: impl IntoIterator<Item = f64>) -> Vec<f64> {
    let mut v: Vec<f64> = v.into_iter().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    v
}

fn median(v: impl IntoIterator<Item = f64>) -> Option<f64> {
    let s = sorted(v);
    if s.is_empty() {
        return None;
    }
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

fn min_med_max(v: &[f64]) -> Option<[f64; 3]> {
    let s = sorted(v.iter().copied());
    Some([*s.first()?, median(s.iter().copied())?, *s.last()?])
}

/// A 95% percentile-bootstrap interval of `stat` over `iters` resamplings (with replacement,
/// each sample set on its own); deterministic.
fn bootstrap(
    samples: &[&[f64]],
    iters: usize,
    stat: impl Fn(&[Vec<f64>]) -> Option<f64>,
) -> Option<[f64; 2]> {
    if samples.iter().any(|s| s.len() < 2) {
        return None;
    }
    let mut rng = crate::link::Rng::new(0xb007);
    let mut stats = Vec::with_capacity(iters);
    for _ in 0..iters {
        let re: Vec<Vec<f64>> = samples
            .iter()
            .map(|s| {
                (0..s.len())
                    .map(|_| s[(rng.next_u64() % s.len() as u64) as usize])
                    .collect()
            })
            .collect();
        if let Some(x) = stat(&re) {
            stats.push(x);
        }
    }
    let s = sorted(stats);
    (!s.is_empty()).then(|| [pct(&s, 2.5), pct(&s, 97.5)])
}

/// The modes in the order round `r` runs them (rotated, so none is always first).
fn rotated<T: Copy>(items: &[T], r: usize) -> Vec<T> {
    (0..items.len())
        .map(|i| items[(i + r) % items.len()])
        .collect()
}

/// Site A's non-zero flow counters.
fn flows_of(ctx: &Ctx, ditto: &Path) -> Vec<String> {
    let Some(v) = ditto_status(ctx, ditto, Role::SiteA) else {
        return vec!["(no status)".into()];
    };
    v.get("flows")
        .and_then(|f| f.as_array())
        .map(|a| {
            a.iter()
                .filter(|f| f.get("count").and_then(|c| c.as_u64()).unwrap_or(0) > 0)
                .map(|f| {
                    format!(
                        "{}/{}={}",
                        f.get("outcome").and_then(|x| x.as_str()).unwrap_or("?"),
                        f.get("reason").and_then(|x| x.as_str()).unwrap_or("?"),
                        f.get("count").and_then(|x| x.as_u64()).unwrap_or(0)
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Count of `outcome/reason` in a `flows_of` list.
fn flow_count(flows: &[String], key: &str) -> u64 {
    flows
        .iter()
        .filter_map(|f| f.strip_prefix(key)?.strip_prefix('=')?.parse::<u64>().ok())
        .sum()
}

fn fetch(ctx: &Ctx, link: &Link, args: Vec<String>) -> Result<Bulk> {
    let before = link.fresh_stats()?;
    let f: FetchResult = run_json(&ctx.topo, Role::Client, &ctx.bench, &args)?;
    let after = link.fresh_stats()?;
    if !f.exact {
        bail!("download not byte-exact: {}", f.errors.join("; "));
    }
    Ok(Bulk {
        bytes: f.bytes,
        secs: f.secs,
        mbps: f.goodput_mbps,
        wan_bytes: after.wan_bytes().saturating_sub(before.wan_bytes()),
        exact: f.exact,
    })
}

fn fetch_rand(target: &str, size: u64, seed: u64) -> Vec<String> {
    [
        "fetch",
        "--connect",
        target,
        "--timeout-s",
        "300",
        "--rand",
        &size.to_string(),
        "--seed",
        &seed.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// What one pair measures.
struct PairPlan {
    link: &'static str,
    rand: u64,
    text: u64,
    rr_conns: usize,
    rr_count: usize,
}

/// Starts a pair in `mode`, warms its tunnel, runs the plan's measurements, stops it.
fn measure_pair(
    ctx: &Ctx,
    ditto: &Path,
    topo: Topology,
    link: &Link,
    plan: &PairPlan,
    round: usize,
    v: Variant,
) -> PairResult {
    let mut r = PairResult {
        link: plan.link.into(),
        round,
        mode: v.name(),
        status: "ok".into(),
        ..Default::default()
    };
    let tag = format!("{}-r{round}-{}", plan.link, v.name().replace('+', "-"));
    let running = match Started::start(ctx, ditto, topo, &tag, v) {
        Ok(x) => x,
        Err(e) => {
            r.status = "failed".into();
            r.note = format!("starting the pair: {e:#}");
            clear_sites(&ctx.topo);
            return r;
        }
    };
    let target = running.target();
    let mut conns = 0u64;
    let measured = (|| -> Result<()> {
        // As the scenarios do: the tunnel is long-lived in real use, so warm it (other bytes).
        fetch(ctx, link, fetch_rand(&target, 8 << 20, 987_654_321)).context("tunnel warm-up")?;
        conns += 1;
        if plan.rand > 0 {
            r.rand = Some(fetch(ctx, link, fetch_rand(&target, plan.rand, 1))?);
            conns += 1;
        }
        if plan.text > 0 {
            let mut a = vec![
                "fetch".to_string(),
                "--connect".into(),
                target.clone(),
                "--timeout-s".into(),
                "300".into(),
                "--file".into(),
                TEXT_FILE.into(),
                "--dir".into(),
            ];
            a.push(ctx.data.display().to_string());
            r.text = Some(fetch(ctx, link, a)?);
            conns += 1;
        }
        if plan.rr_conns > 0 {
            let s: RrSamples = run_json(
                &ctx.topo,
                Role::Client,
                &ctx.bench,
                &[
                    "rr-samples".into(),
                    "--connect".into(),
                    target.clone(),
                    "--conns".into(),
                    plan.rr_conns.to_string(),
                    "--count".into(),
                    plan.rr_count.to_string(),
                ],
            )?;
            conns += plan.rr_conns as u64;
            r.rr = Some(s);
        }
        Ok(())
    })();
    r.flows = flows_of(ctx, ditto);
    let (a, b) = running.stop();
    clear_sites(&ctx.topo);
    r.side_a = a;
    r.side_b = b;
    if let Err(e) = measured {
        r.status = "failed".into();
        r.note = format!("{e:#}");
        return r;
    }
    // Every connection must have gone through the tunnel, diverted by the mode's rule.
    let passthrough: u64 = r
        .flows
        .iter()
        .filter(|f| f.starts_with("passthrough/"))
        .filter_map(|f| f.rsplit('=').next()?.parse::<u64>().ok())
        .sum();
    if passthrough > 0 {
        r.status = "failed".into();
        r.note = format!("{passthrough} flow(s) passed through unaccelerated");
    } else {
        let n = flow_count(&r.flows, &format!("accelerated/{}", v.reason()));
        if n < conns {
            r.status = "failed".into();
            r.note = format!(
                "only {n} of {conns} connections were accelerated as {}",
                v.reason()
            );
        }
    }
    r
}

/// Parses the leading RFC 3339 UTC timestamp of a log line ("2026-11-26T10:41:43.536336Z").
fn log_time_us(line: &str) -> Option<u64> {
    // Strip ANSI colour sequences first.
    let mut clean = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            clean.push(c);
        }
    }
    let ts = clean.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = ts.split_once('T')?;
    let mut d = date.split('-').map(|x| x.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (hh, mm) = (
        t.next()?.parse::<u64>().ok()?,
        t.next()?.parse::<u64>().ok()?,
    );
    let secs: f64 = t.next()?.parse().ok()?;
    // Days since the epoch of a proleptic Gregorian date.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    Some((days * 86_400 + hh * 3600 + mm * 60) * 1_000_000 + (secs * 1e6).round() as u64)
}

/// One fail-to-wire case: a fresh pair in `mode` (site A started directly, so its pid is ours to
/// signal), probes, the signal at 1.5 s, probes until `post` after it.
#[allow(clippy::too_many_arguments)]
fn ftw_case(
    ctx: &Ctx,
    ditto: &Path,
    topo: Topology,
    args: &ModesArgs,
    mode: Mode,
    signal: i32,
    guard: bool,
    rep: usize,
    post: Duration,
) -> FtwResult {
    let case = format!(
        "{}-{}{}",
        mode.name(),
        if signal == libc::SIGKILL {
            "kill"
        } else {
            "stop"
        },
        if guard { "" } else { "-noguard" }
    );
    let mut r = FtwResult {
        case: case.clone(),
        rep,
        status: "ok".into(),
        ..Default::default()
    };
    let tag = format!("ftw-{case}-{rep}");
    let watchdog = if guard {
        args.watchdog.as_deref()
    } else {
        Some("0s")
    };
    let res = (|| -> Result<()> {
        let c: DittoConfigs = match topo {
            Topology::Routed => ditto_configs(ctx, ditto, &tag, mode.routed()?, watchdog, false)?,
            Topology::Bridged => crate::bridged::configs(ctx, ditto, &tag, true, false, watchdog)?,
        };
        let target = match topo {
            Topology::Routed => ditto_target(mode.routed()?),
            Topology::Bridged => crate::bridged::target(true),
        };
        let dir = ctx.dir(&format!("ditto-{tag}"))?;
        let spawn = |role: Role, conf: &Path, log: &str| -> Result<KillOnDrop> {
            let log = std::fs::File::create(dir.join(log))?;
            Ok(KillOnDrop(
                ctx.topo
                    .cmd(role, ditto)
                    .arg("run")
                    .arg("--config")
                    .arg(conf)
                    .stdin(Stdio::null())
                    .stdout(log.try_clone()?)
                    .stderr(log)
                    .spawn()
                    .context("starting ditto")?,
            ))
        };
        let _b = spawn(Role::SiteB, &c.b, "b.log")?;
        let mut a = spawn(Role::SiteA, &c.a, "a.log")?;
        let pid = a.0.id();
        // `ip netns exec` execs the program: the child is the daemon itself.
        std::thread::sleep(Duration::from_millis(50));
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        if comm.trim() != "ditto" {
            bail!("pid {pid} is {:?}, not the ditto daemon", comm.trim());
        }
        match topo {
            Topology::Routed => wait_ditto_ready(ctx, ditto, Role::SiteA, mode.routed()?, 15)?,
            Topology::Bridged => crate::bridged::wait_ready(ctx, ditto, true, 15)?,
        }
        let pre = Duration::from_millis(1500);
        let total = pre + post;
        let mut prober = ctx
            .topo
            .cmd(Role::Client, &ctx.bench)
            .args([
                "connect-probe",
                "--connect",
                &target,
                "--interval-ms",
                &args.probe_interval_ms.to_string(),
                "--timeout-ms",
                &args.probe_timeout_ms.to_string(),
                "--duration-ms",
                &total.as_millis().to_string(),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting connect-probe")?;
        let out_pipe = prober.stdout.take().context("no stdout")?;
        let reader = std::thread::spawn(move || {
            let mut s = String::new();
            let mut p = out_pipe;
            let _ = p.read_to_string(&mut s);
            s
        });
        let t_spawn = Instant::now();
        std::thread::sleep(pre - Duration::from_millis(300));
        let flows_before = flows_of(ctx, ditto);
        let diverted = flow_count(&flows_before, &format!("accelerated/{}", mode.name()));
        std::thread::sleep(pre.saturating_sub(t_spawn.elapsed()));
        let t0 = unix_us();
        crate::sys::kill(pid, signal).context("signalling the daemon")?;
        let deadline = Instant::now() + post + Duration::from_millis(args.probe_timeout_ms + 2000);
        loop {
            if r.daemon_gone_ms.is_none() && matches!(a.0.try_wait(), Ok(Some(_))) {
                r.daemon_gone_ms = Some(unix_us().saturating_sub(t0) as f64 / 1e3);
            }
            if matches!(prober.try_wait(), Ok(Some(_))) {
                break;
            }
            if Instant::now() > deadline {
                let _ = prober.kill();
                let _ = prober.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let out = reader.join().unwrap_or_default();
        let probes: Vec<Probe> = serde_json::from_str(&out).context("connect-probe output")?;
        if signal == libc::SIGSTOP && r.daemon_gone_ms.is_none() {
            // The guard did not kill the hung daemon: let it go so it can be stopped.
            let _ = crate::sys::kill(pid, libc::SIGCONT);
        }
        let log = std::fs::read_to_string(dir.join("a.log")).unwrap_or_default();
        r.rules_removed_ms = log
            .lines()
            .find(|l| l.contains("guard:") && l.contains("removed"))
            .and_then(log_time_us)
            .map(|t| (t as f64 - t0 as f64) / 1e3);
        let (before, after): (Vec<&Probe>, Vec<&Probe>) =
            probes.iter().partition(|p| p.start_us < t0);
        r.probes_before = before.len();
        r.probes_after = after.len();
        r.inflight_failed = before.iter().filter(|p| !p.ok).count();
        let rel = |p: &Probe| (p.start_us as f64 - t0 as f64) / 1e3;
        r.failed_after = after.iter().filter(|p| !p.ok).count();
        let last_fail = after.iter().filter(|p| !p.ok).map(|p| p.start_us).max();
        r.last_fail_ms = last_fail.map(|t| (t as f64 - t0 as f64) / 1e3);
        r.gap_ms = match last_fail {
            None => after.iter().any(|p| p.ok).then_some(0.0),
            Some(lf) => after
                .iter()
                .filter(|p| p.ok && p.start_us > lf)
                .map(|p| rel(p))
                .reduce(f64::min),
        };
        let early_failures = before
            .iter()
            .filter(|p| !p.ok && p.start_us + args.probe_timeout_ms * 1000 < t0)
            .count();
        if early_failures > 0 || before.is_empty() {
            r.status = "failed".into();
            r.note = format!(
                "{early_failures} of {} probes failed before the signal",
                before.len()
            );
        } else if diverted == 0 {
            r.status = "failed".into();
            r.note = format!("no probe was intercepted before the signal ({flows_before:?})");
        } else if r.gap_ms.is_none() {
            r.status = "failed".into();
            r.note = "new connections did not recover within the window".into();
        }
        if let Some(e) = probes.iter().find(|p| !p.ok && p.start_us >= t0) {
            r.note = format!("{} first failure after the signal: {}", r.note, e.err)
                .trim()
                .to_string();
        }
        drop(a);
        let cl = ctx
            .topo
            .cmd(Role::SiteA, ditto)
            .arg("cleanup")
            .arg("--config")
            .arg(&c.a)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()?;
        r.rules_left = String::from_utf8_lossy(&cl.stdout).contains("removed ditto's");
        Ok(())
    })();
    clear_sites(&ctx.topo);
    if let Err(e) = res {
        r.status = "failed".into();
        r.note = format!("{e:#}");
    }
    r
}

fn throughput_rows(pairs: &[PairResult], modes: &[Variant]) -> Vec<ThroughputRow> {
    let mut rows = Vec::new();
    type Get = fn(&PairResult) -> Option<f64>;
    let workloads: [(&str, &str, Get); 3] = [
        ("fast", "fast link, incompressible", |p| {
            p.rand.as_ref().map(|b| b.mbps)
        }),
        ("fast", "fast link, text", |p| {
            p.text.as_ref().map(|b| b.mbps)
        }),
        ("wan", "typical WAN, incompressible", |p| {
            p.rand.as_ref().map(|b| b.mbps)
        }),
    ];
    for (link, name, get) in workloads {
        let ok = |m: Variant| -> Vec<(usize, f64)> {
            pairs
                .iter()
                .filter(|p| p.link == link && p.mode == m.name() && p.status == "ok")
                .filter_map(|p| Some((p.round, get(p)?)))
                .collect()
        };
        let base = ok(FORWARD);
        let base_med = median(base.iter().map(|x| x.1));
        for &m in modes {
            let v = ok(m);
            let Some([min, med, max]) = min_med_max(&v.iter().map(|x| x.1).collect::<Vec<_>>())
            else {
                continue;
            };
            let round_ratios = v.iter().filter_map(|(r, x)| {
                let b = base.iter().find(|b| b.0 == *r)?.1;
                Some(x / b)
            });
            rows.push(ThroughputRow {
                workload: name.into(),
                mode: m.name(),
                n: v.len(),
                median_mbps: med,
                min_mbps: min,
                max_mbps: max,
                ratio_of_medians: base_med.map(|b| med / b),
                median_round_ratio: median(round_ratios),
                ratio_ci95: bootstrap(
                    &[
                        &v.iter().map(|x| x.1).collect::<Vec<_>>(),
                        &base.iter().map(|x| x.1).collect::<Vec<_>>(),
                    ],
                    2000,
                    |s| Some(median(s[0].iter().copied())? / median(s[1].iter().copied())?),
                ),
            });
        }
    }
    rows
}

fn latency_rows(pairs: &[PairResult], modes: &[Variant]) -> Vec<LatencyRow> {
    let of = |m: Variant| -> Vec<&PairResult> {
        pairs
            .iter()
            .filter(|p| {
                p.link == "fast" && p.mode == m.name() && p.status == "ok" && p.rr.is_some()
            })
            .collect()
    };
    let pooled = |ps: &[&PairResult], f: fn(&RrSamples) -> &Vec<f64>| {
        sorted(
            ps.iter()
                .filter_map(|p| p.rr.as_ref())
                .flat_map(|r| f(r).iter().copied()),
        )
    };
    let base = of(FORWARD);
    let base_ex = pooled(&base, |r| &r.exchange_ms);
    let base_first = pooled(&base, |r| &r.first_ms);
    let mut rows = Vec::new();
    for &m in modes {
        let ps = of(m);
        if ps.is_empty() {
            continue;
        }
        let ex = pooled(&ps, |r| &r.exchange_ms);
        let first = pooled(&ps, |r| &r.first_ms);
        let conn = pooled(&ps, |r| &r.connect_ms);
        let has_base = !base_ex.is_empty();
        let per_round = ps.iter().filter_map(|p| {
            let b = base.iter().find(|b| b.round == p.round)?;
            let pm = median(p.rr.as_ref()?.exchange_ms.iter().copied())?;
            let bm = median(b.rr.as_ref()?.exchange_ms.iter().copied())?;
            Some(pm - bm)
        });
        rows.push(LatencyRow {
            mode: m.name(),
            exchanges: ex.len(),
            exchange_p50_ms: pct(&ex, 50.0),
            exchange_p99_ms: pct(&ex, 99.0),
            added_p50_ms: has_base.then(|| pct(&ex, 50.0) - pct(&base_ex, 50.0)),
            added_p99_ms: has_base.then(|| pct(&ex, 99.0) - pct(&base_ex, 99.0)),
            added_p50_round_median_ms: median(per_round),
            added_p50_ci95: bootstrap(&[&ex, &base_ex], 400, |s| {
                let (a, b) = (sorted(s[0].iter().copied()), sorted(s[1].iter().copied()));
                Some(pct(&a, 50.0) - pct(&b, 50.0))
            }),
            added_p99_ci95: bootstrap(&[&ex, &base_ex], 400, |s| {
                let (a, b) = (sorted(s[0].iter().copied()), sorted(s[1].iter().copied()));
                Some(pct(&a, 99.0) - pct(&b, 99.0))
            }),
            connections: first.len(),
            first_p50_ms: pct(&first, 50.0),
            first_p99_ms: pct(&first, 99.0),
            added_first_p50_ms: (!base_first.is_empty())
                .then(|| pct(&first, 50.0) - pct(&base_first, 50.0)),
            added_first_p50_ci95: bootstrap(&[&first, &base_first], 1000, |s| {
                let (a, b) = (sorted(s[0].iter().copied()), sorted(s[1].iter().copied()));
                Some(pct(&a, 50.0) - pct(&b, 50.0))
            }),
            connect_p50_ms: pct(&conn, 50.0),
        });
    }
    rows
}

fn ftw_rows(runs: &[FtwResult]) -> Vec<FtwRow> {
    let mut cases: Vec<String> = Vec::new();
    for r in runs {
        if !cases.contains(&r.case) {
            cases.push(r.case.clone());
        }
    }
    cases
        .into_iter()
        .map(|c| {
            let rs: Vec<&FtwResult> = runs.iter().filter(|r| r.case == c).collect();
            let ok: Vec<&&FtwResult> = rs.iter().filter(|r| r.status == "ok").collect();
            let gaps: Vec<f64> = ok.iter().filter_map(|r| r.gap_ms).collect();
            let removed: Vec<f64> = ok.iter().filter_map(|r| r.rules_removed_ms).collect();
            let gone: Vec<f64> = ok.iter().filter_map(|r| r.daemon_gone_ms).collect();
            FtwRow {
                case: c,
                n: rs.len(),
                gap_ms: min_med_max(&gaps).unwrap_or([f64::NAN; 3]),
                recovered: gaps.len(),
                failed_after_total: ok.iter().map(|r| r.failed_after).sum(),
                inflight_failed_total: ok.iter().map(|r| r.inflight_failed).sum(),
                rules_removed_ms: min_med_max(&removed),
                daemon_gone_ms: min_med_max(&gone),
            }
        })
        .collect()
}

fn f1(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("-".into(), |v| format!("{v:.1}"))
}

fn f3(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("-".into(), |v| format!("{v:.3}"))
}

fn signed(x: Option<f64>) -> String {
    x.filter(|v| v.is_finite())
        .map_or("-".into(), |v| format!("{v:+.3}"))
}

fn interval(x: Option<[f64; 2]>, digits: usize) -> String {
    match x {
        Some([a, b]) if a.is_finite() && b.is_finite() => {
            format!("{a:.digits$} .. {b:.digits$}")
        }
        _ => "-".into(),
    }
}

fn triple(x: Option<[f64; 3]>) -> String {
    match x {
        Some([a, b, c]) if a.is_finite() => format!("{a:.0} / {b:.0} / {c:.0}"),
        _ => "-".into(),
    }
}

/// The Markdown report.
pub fn markdown(r: &ModesReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## Interception overhead and fail-to-wire: run {} ({})\n",
        r.date, r.machine
    );
    let _ = writeln!(s, "Command: `{}`\n", r.command);
    let _ = writeln!(
        s,
        "Fast link: {}; typical WAN: {}; {} rounds, modes interleaved (rotated order per round), a fresh ditto pair (empty stores) per measurement.\n",
        r.fast_link, r.wan_link, r.rounds
    );
    if r.topology == "bridged" {
        let _ = writeln!(
            s,
            "Topology: bridged (client, server and both appliances' bridges in one subnet; the bridges' WAN ports are VXLAN devices across the emulator; site B has no `[intercept]`).\n"
        );
    }
    if !r.throughput.is_empty() {
        let _ = writeln!(
            s,
            "**Cold download goodput, Mbit/s** (ratio = mode / forward; target >= 0.95)\n"
        );
        let _ = writeln!(
            s,
            "| workload | mode | n | median | min | max | ratio of medians | 95% interval | median per-round ratio |\n|---|---|---:|---:|---:|---:|---:|---|---:|"
        );
        for t in &r.throughput {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {:.1} | {:.1} | {:.1} | {} | {} | {} |",
                t.workload,
                t.mode,
                t.n,
                t.median_mbps,
                t.min_mbps,
                t.max_mbps,
                f3(t.ratio_of_medians),
                interval(t.ratio_ci95, 3),
                f3(t.median_round_ratio)
            );
        }
    }
    if !r.latency.is_empty() {
        let _ = writeln!(
            s,
            "\n**Request/response latency on the fast link, ms** (all samples of all rounds pooled; added = mode - forward; target: added median <= 0.2 ms)\n"
        );
        let _ = writeln!(
            s,
            "| mode | exchanges | p50 | p99 | added p50 (95% interval) | added p99 (95% interval) | added p50, median of rounds | new connections | first response p50 | added (95% interval) | connect p50 |\n|---|---:|---:|---:|---|---|---:|---:|---:|---|---:|"
        );
        for l in &r.latency {
            let with_ci = |x: Option<f64>, ci: Option<[f64; 2]>, digits: usize| {
                format!("{} ({})", signed(x), interval(ci, digits))
            };
            let _ = writeln!(
                s,
                "| {} | {} | {:.3} | {:.3} | {} | {} | {} | {} | {:.2} | {} | {:.3} |",
                l.mode,
                l.exchanges,
                l.exchange_p50_ms,
                l.exchange_p99_ms,
                with_ci(l.added_p50_ms, l.added_p50_ci95, 3),
                with_ci(l.added_p99_ms, l.added_p99_ci95, 2),
                signed(l.added_p50_round_median_ms),
                l.connections,
                l.first_p50_ms,
                with_ci(l.added_first_p50_ms, l.added_first_p50_ci95, 2),
                l.connect_p50_ms
            );
        }
    }
    if !r.fail_to_wire.is_empty() {
        let _ = writeln!(
            s,
            "\n**Fail-to-wire** (a new connection every {} ms, each must answer within {} ms; signal to site A's daemon at 1.5 s; watchdog {}). Gap = from the signal to the first successful probe after the last failed one (0: no new connection failed); times min / median / max, ms\n",
            r.probe_interval_ms, r.probe_timeout_ms, r.watchdog
        );
        let _ = writeln!(
            s,
            "| case | runs | recovered | gap | new connections failed (all runs) | in-flight broken | guard removed rules | daemon gone |\n|---|---:|---:|---|---:|---:|---|---|"
        );
        for f in &r.fail_to_wire {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                f.case,
                f.n,
                f.recovered,
                triple(Some(f.gap_ms)),
                f.failed_after_total,
                f.inflight_failed_total,
                triple(f.rules_removed_ms),
                triple(f.daemon_gone_ms)
            );
        }
    }
    let _ = writeln!(s, "\n**Every measurement**\n");
    let _ = writeln!(
        s,
        "| link | round | mode | status | incompressible Mbit/s | text Mbit/s | text WAN/payload | exchange p50 ms | CPU A s | CPU B s | flows at site A | note |\n|---|---:|---|---|---:|---:|---:|---:|---:|---:|---|---|"
    );
    for p in &r.pairs {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            p.link,
            p.round,
            p.mode,
            p.status,
            f1(p.rand.as_ref().map(|b| b.mbps)),
            f1(p.text.as_ref().map(|b| b.mbps)),
            f3(p.text
                .as_ref()
                .map(|b| b.wan_bytes as f64 / b.bytes.max(1) as f64)),
            f3(p.rr
                .as_ref()
                .and_then(|r| median(r.exchange_ms.iter().copied()))),
            f1(p.side_a.as_ref().map(|u| u.user_s + u.sys_s)),
            f1(p.side_b.as_ref().map(|u| u.user_s + u.sys_s)),
            p.flows.join(" "),
            p.note.replace('|', "\\|")
        );
    }
    if !r.ftw_runs.is_empty() {
        let _ = writeln!(s, "\n**Every fail-to-wire run** (ms after the signal)\n");
        let _ = writeln!(
            s,
            "| case | rep | status | probes before / after | failed after | last failed | gap | guard removed rules | daemon gone | rules left | note |\n|---|---:|---|---|---:|---:|---:|---:|---:|---|---|"
        );
        for f in &r.ftw_runs {
            let _ = writeln!(
                s,
                "| {} | {} | {} | {} / {} | {} | {} | {} | {} | {} | {} | {} |",
                f.case,
                f.rep,
                f.status,
                f.probes_before,
                f.probes_after,
                f.failed_after,
                f1(f.last_fail_ms),
                f1(f.gap_ms),
                f1(f.rules_removed_ms),
                f1(f.daemon_gone_ms),
                if f.rules_left { "yes" } else { "no" },
                f.note.replace('|', "\\|")
            );
        }
    }
    s
}

/// The summary tables from the raw measurements.
fn summarize(r: &mut ModesReport) {
    // Microseconds are plenty (timer and scheduling noise are larger); keeps the JSON small.
    for rr in r.pairs.iter_mut().filter_map(|p| p.rr.as_mut()) {
        for v in [&mut rr.connect_ms, &mut rr.first_ms, &mut rr.exchange_ms] {
            for x in v.iter_mut() {
                *x = (*x * 1e3).round() / 1e3;
            }
        }
    }
    let mut modes: Vec<Variant> = Vec::new();
    for p in &r.pairs {
        if let Ok(v) = Variant::parse(&p.mode) {
            if !modes.contains(&v) {
                modes.push(v);
            }
        }
    }
    // The baseline first, then in the order they ran.
    modes.sort_by_key(|v| *v != FORWARD);
    r.throughput = throughput_rows(&r.pairs, &modes);
    r.latency = latency_rows(&r.pairs, &modes);
    r.fail_to_wire = ftw_rows(&r.ftw_runs);
}

fn resummarize(path: &Path) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut r: ModesReport =
        serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    summarize(&mut r);
    std::fs::write(path, serde_json::to_string_pretty(&r)?)?;
    let md = path.with_extension("md");
    std::fs::write(&md, markdown(&r))?;
    eprintln!("rewrote {} and {}", path.display(), md.display());
    print!("{}", markdown(&r));
    Ok(())
}

/// Runs the comparison and writes `<date>-modes.json` / `.md`.
pub fn run(args: &ModesArgs) -> Result<()> {
    if let Some(p) = &args.resummarize {
        return resummarize(p);
    }
    if !crate::sys::is_root() {
        bail!("the modes benchmark needs root (network namespaces, TUN devices, nftables)");
    }
    let topology = Topology::parse(&args.topology)?;
    let modes: Vec<Variant> = args
        .modes
        .as_deref()
        .unwrap_or(topology.default_modes())
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Variant::parse)
        .collect::<Result<_>>()?;
    if modes.is_empty() {
        bail!("no modes given");
    }
    if let Some(v) = modes.iter().find(|v| !topology.supports(v.mode)) {
        bail!(
            "mode {} is not measured on the {} topology (routed: forward, tproxy, redirect; bridged: forward, inline)",
            v.name(),
            topology.name()
        );
    }
    let parts: Vec<&str> = args.parts.split(',').map(str::trim).collect();
    for p in &parts {
        if !["bulk", "wan", "ftw"].contains(p) {
            bail!("unknown part {p:?} (bulk, wan, ftw)");
        }
    }
    let size = crate::units::parse_bytes;
    let (fast_rand, fast_text, wan_size) = (
        size(&args.fast_rand_size)?,
        size(&args.fast_text_size)?,
        size(&args.wan_size)?,
    );
    let post_stop = match &args.watchdog {
        Some(w) => crate::units::parse_duration(w)?,
        None => Duration::from_secs(3),
    } + Duration::from_millis(2500);
    let bench = std::env::current_exe()?;
    let wanem = sibling_binary("ditto-wanem")?;
    let ditto = match &args.ditto {
        Some(p) => p.clone(),
        None => sibling_binary("ditto")?,
    };
    let ditto = ditto_available(Some(&ditto)).map_err(|e| anyhow::anyhow!(e))?;
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"));
    let topo = match &args.prefix {
        Some(p) => Topo::new(p)?,
        None => Topo::unique("dmo")?,
    };
    Topo::reap_stale(&["dmo"]);
    let data = topo.state_dir().join("data");
    let ctx = Ctx {
        topo: TopoGuard(topo),
        bench,
        wanem,
        ditto: Some(ditto.clone()),
        data,
        ditto_mode: DittoMode::Forward,
        ditto_tunnel: String::new(),
        appliance_cpus: None,
    };
    match topology {
        Topology::Routed => ctx.topo.up()?,
        Topology::Bridged => crate::bridged::up(&ctx.topo)?,
    }
    std::fs::create_dir_all(&ctx.data)?;
    if parts.contains(&"bulk") && fast_text > 0 {
        write_text(&ctx.data.join(TEXT_FILE), fast_text)?;
    }
    let _server = match topology {
        Topology::Routed => start_server(&ctx.topo, &ctx.bench, SERVER_PORT, Some(&ctx.data))?,
        Topology::Bridged => crate::bridged::start_server(&ctx.topo, &ctx.bench, Some(&ctx.data))?,
    };
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let t_all = Instant::now();
    let mut pairs = Vec::new();
    let mut ftw = Vec::new();
    let link_of = |rate: &str, rtt: &str| -> Result<Link> {
        let spec = LinkSpec {
            rate: Some(rate.into()),
            rtt: Some(rtt.into()),
            ..Default::default()
        };
        let mut a = spec.to_args()?;
        if topology == Topology::Bridged {
            a.extend(crate::bridged::link_extra());
        }
        ctx.topo.start_link(&ctx.wanem, &a)
    };
    let report_pair = |p: &PairResult| {
        let mut parts = Vec::new();
        if let Some(b) = &p.rand {
            parts.push(format!("incompressible {:.1} Mbit/s", b.mbps));
        }
        if let Some(b) = &p.text {
            parts.push(format!("text {:.1} Mbit/s", b.mbps));
        }
        if let Some(r) = &p.rr {
            parts.push(format!(
                "exchange p50 {:.3} ms",
                median(r.exchange_ms.iter().copied()).unwrap_or(f64::NAN)
            ));
        }
        if p.status == "ok" {
            eprintln!("{}", parts.join(", "));
        } else {
            eprintln!("{}: {}", p.status, p.note);
        }
    };
    if parts.contains(&"bulk") || parts.contains(&"ftw") {
        let link = link_of(&args.fast_rate, &args.fast_rtt)?;
        if parts.contains(&"bulk") {
            let plan = PairPlan {
                link: "fast",
                rand: fast_rand,
                text: fast_text,
                rr_conns: args.rr_conns,
                rr_count: args.rr_count,
            };
            for round in 0..args.rounds {
                for m in rotated(&modes, round) {
                    eprint!("[fast {}/{}] {} ... ", round + 1, args.rounds, m.name());
                    let p = measure_pair(&ctx, &ditto, topology, &link, &plan, round, m);
                    report_pair(&p);
                    pairs.push(p);
                }
            }
        }
        if parts.contains(&"ftw") {
            let mut cases: Vec<(Mode, i32, bool)> = Vec::new();
            let intercepting: Vec<Mode> = modes
                .iter()
                .filter(|v| v.mode.intercepts() && !v.via_forward)
                .map(|v| v.mode)
                .collect();
            for sig in [libc::SIGKILL, libc::SIGSTOP] {
                for &m in &intercepting {
                    cases.push((m, sig, true));
                }
            }
            for m in [Mode::Tproxy, Mode::Inline] {
                if intercepting.contains(&m) {
                    // The rules' own fail-open, without the guard removing them.
                    cases.push((m, libc::SIGKILL, false));
                }
            }
            for rep in 0..args.ftw_reps {
                for (m, sig, guard) in rotated(&cases, rep) {
                    let post = if sig == libc::SIGSTOP {
                        post_stop
                    } else {
                        Duration::from_millis(2500)
                    };
                    let r = ftw_case(&ctx, &ditto, topology, args, m, sig, guard, rep, post);
                    eprintln!(
                        "[ftw {}/{}] {}: {} gap {} ms, {} new connections failed, guard removed rules at {} ms{}",
                        rep + 1,
                        args.ftw_reps,
                        r.case,
                        r.status,
                        f1(r.gap_ms),
                        r.failed_after,
                        f1(r.rules_removed_ms),
                        if r.note.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", r.note)
                        }
                    );
                    ftw.push(r);
                }
            }
        }
        drop(link);
    }
    if parts.contains(&"wan") {
        let link = link_of(&args.wan_rate, &args.wan_rtt)?;
        let plan = PairPlan {
            link: "wan",
            rand: wan_size,
            text: 0,
            rr_conns: 0,
            rr_count: 0,
        };
        let base: Vec<Variant> = modes
            .iter()
            .copied()
            .filter(|v| !v.is_diagnostic())
            .collect();
        for round in 0..args.rounds {
            for m in rotated(&base, round) {
                eprint!("[wan {}/{}] {} ... ", round + 1, args.rounds, m.name());
                let p = measure_pair(&ctx, &ditto, topology, &link, &plan, round, m);
                report_pair(&p);
                pairs.push(p);
            }
        }
        drop(link);
    }
    eprintln!("all done in {:.0} s", t_all.elapsed().as_secs_f64());
    let command = std::iter::once("ditto-bench".to_string())
        .chain(std::env::args().skip(1))
        .collect::<Vec<_>>()
        .join(" ");
    let mut report = ModesReport {
        date: civil_date(started),
        started_unix: started,
        machine: format!(
            "{} cores, {}",
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(0),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        ),
        tools: tool_versions()
            .into_iter()
            .chain(
                Command::new("nft")
                    .arg("--version")
                    .output()
                    .ok()
                    .map(|o| format!("nft: {}", String::from_utf8_lossy(&o.stdout).trim())),
            )
            .collect(),
        command,
        topology: topology.name().into(),
        fast_link: format!("{}, RTT {}", args.fast_rate, args.fast_rtt),
        wan_link: format!("{}, RTT {}", args.wan_rate, args.wan_rtt),
        rounds: args.rounds,
        probe_interval_ms: args.probe_interval_ms,
        probe_timeout_ms: args.probe_timeout_ms,
        watchdog: args
            .watchdog
            .clone()
            .unwrap_or_else(|| "3s (default)".into()),
        throughput: Vec::new(),
        latency: Vec::new(),
        fail_to_wire: Vec::new(),
        pairs,
        ftw_runs: ftw,
    };
    summarize(&mut report);
    drop(ctx);
    std::fs::create_dir_all(&out_dir)?;
    // The bridged topology is there for inline mode.
    let base = match topology {
        Topology::Routed => format!("{}-modes", report.date),
        Topology::Bridged => format!("{}-modes-inline", report.date),
    };
    let mut stem = base.clone();
    let mut n = 1;
    while out_dir.join(format!("{stem}.json")).exists() {
        n += 1;
        stem = format!("{base}-{n}");
    }
    for (name, text) in [
        (
            format!("{stem}.json"),
            serde_json::to_string_pretty(&report)?,
        ),
        (format!("{stem}.md"), markdown(&report)),
    ] {
        let p = out_dir.join(name);
        std::fs::write(&p, text).with_context(|| format!("writing {}", p.display()))?;
        eprintln!("wrote {}", p.display());
    }
    print!("{}", markdown(&report));
    Ok(())
}

fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .with_context(|| format!("bad address {addr:?}"))?
        .next()
        .with_context(|| format!("{addr:?} resolves to nothing"))
}

/// Options of `rr-samples`.
#[derive(Args, Debug, Clone)]
pub struct RrSamplesArgs {
    /// Server (or proxy) address.
    #[arg(long)]
    pub connect: String,
    /// Connections, one after another.
    #[arg(long, default_value_t = 20)]
    pub conns: usize,
    /// Exchanges per connection.
    #[arg(long, default_value_t = 25)]
    pub count: usize,
    #[arg(long, default_value_t = 100)]
    pub req: usize,
    #[arg(long, default_value_t = 1000)]
    pub resp: usize,
    #[arg(long, default_value_t = 30)]
    pub timeout_s: u64,
}

/// `rr-samples`: request/response exchanges on new connections against a `serve` (ECHO), every
/// sample reported.
pub fn rr_samples(args: &RrSamplesArgs) -> Result<RrSamples> {
    if args.conns == 0
        || args.count == 0
        || !(1..=1 << 20).contains(&args.req)
        || !(1..=1 << 20).contains(&args.resp)
    {
        bail!("conns, count, req and resp must be positive (req/resp at most 1 MiB)");
    }
    let addr = resolve(&args.connect)?;
    let timeout = Duration::from_secs(args.timeout_s);
    let mut out = RrSamples::default();
    let req = vec![b'q'; args.req];
    let mut resp = vec![0u8; args.resp];
    for _ in 0..args.conns {
        let t0 = Instant::now();
        let mut s = TcpStream::connect_timeout(&addr, timeout)
            .with_context(|| format!("connecting to {addr}"))?;
        out.connect_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(format!("ECHO {} {}\n", args.req, args.resp).as_bytes())?;
        for i in 0..args.count {
            let t = Instant::now();
            s.write_all(&req)?;
            s.read_exact(&mut resp).context("reading response")?;
            if i == 0 {
                out.first_ms.push(t0.elapsed().as_secs_f64() * 1e3);
            } else {
                out.exchange_ms.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 64];
        while matches!(s.read(&mut sink), Ok(n) if n > 0) {}
    }
    Ok(out)
}

/// Options of `connect-probe`.
#[derive(Args, Debug, Clone)]
pub struct ProbeArgs {
    /// Server address (a `serve`).
    #[arg(long)]
    pub connect: String,
    /// A new connection every this many ms.
    #[arg(long, default_value_t = 20)]
    pub interval_ms: u64,
    /// A probe without its answer after this many ms failed.
    #[arg(long, default_value_t = 1000)]
    pub timeout_ms: u64,
    /// Start probes for this long.
    #[arg(long, default_value_t = 5000)]
    pub duration_ms: u64,
}

fn probe_once(addr: SocketAddr, timeout: Duration) -> Result<()> {
    let t0 = Instant::now();
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    let left = || {
        timeout
            .checked_sub(t0.elapsed())
            .filter(|d| !d.is_zero())
            .context("timed out")
    };
    s.set_nodelay(true)?;
    s.set_write_timeout(Some(left()?))?;
    s.write_all(b"ECHO 8 8\nprobe..!")?;
    s.set_read_timeout(Some(left()?))?;
    let mut b = [0u8; 8];
    s.read_exact(&mut b).context("reading the answer")?;
    Ok(())
}

/// `connect-probe`: opens a new connection every interval (each in its own thread, so a hanging
/// one does not delay the next) and reports every probe.
pub fn connect_probe(args: &ProbeArgs) -> Result<Vec<Probe>> {
    let addr = resolve(&args.connect)?;
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let interval = Duration::from_millis(args.interval_ms.max(1));
    let t0 = Instant::now();
    let mut handles = Vec::new();
    let mut k = 0u32;
    while t0.elapsed() < Duration::from_millis(args.duration_ms) {
        let due = t0 + interval * k;
        if let Some(d) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(d);
        }
        k += 1;
        let h = std::thread::Builder::new()
            .stack_size(128 * 1024)
            .spawn(move || {
                let start_us = unix_us();
                let t = Instant::now();
                let res = probe_once(addr, timeout);
                Probe {
                    start_us,
                    ms: t.elapsed().as_secs_f64() * 1e3,
                    ok: res.is_ok(),
                    err: res.err().map(|e| format!("{e:#}")).unwrap_or_default(),
                }
            })?;
        handles.push(h);
    }
    Ok(handles.into_iter().filter_map(|h| h.join().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_timestamps_parse() {
        // 2023-11-14T22:13:20Z is 1_700_000_000.
        assert_eq!(
            log_time_us("2023-11-14T22:13:20.250000Z  WARN guard: x"),
            Some(1_700_000_000_250_000)
        );
        assert_eq!(
            log_time_us("\u{1b}[2m2000-02-29T00:00:00.000001Z\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m"),
            Some(951_782_400_000_001)
        );
        assert_eq!(log_time_us("no time here"), None);
    }

    #[test]
    fn rotation_and_stats() {
        assert_eq!(rotated(&[1, 2, 3], 0), vec![1, 2, 3]);
        assert_eq!(rotated(&[1, 2, 3], 4), vec![2, 3, 1]);
        assert_eq!(median([3.0, 1.0, 2.0, 10.0]), Some(2.5));
        assert_eq!(min_med_max(&[5.0, 1.0, 3.0]), Some([1.0, 3.0, 5.0]));
        let s = sorted((1..=100).map(f64::from));
        assert_eq!(pct(&s, 50.0), 51.0);
        assert_eq!(pct(&s, 99.0), 99.0);
    }

    #[test]
    fn modes_and_topologies() {
        let v = Variant::parse("forward+inline-rules").expect("diagnostic");
        assert_eq!(v.mode, Mode::Inline);
        assert!(v.via_forward && v.is_diagnostic());
        assert_eq!(v.name(), "forward+inline-rules");
        assert_eq!(v.reason(), "forward");
        assert_eq!(Variant::parse("inline").expect("inline").reason(), "inline");
        assert!(Variant::parse("forward+forward-rules").is_err());
        assert!(Mode::Inline.routed().is_err());
        for t in [Topology::Routed, Topology::Bridged] {
            for m in t.default_modes().split(',') {
                assert!(t.supports(Variant::parse(m).expect("default mode").mode));
            }
        }
        assert!(!Topology::Routed.supports(Mode::Inline));
        assert!(!Topology::Bridged.supports(Mode::Tproxy));
    }

    #[test]
    fn flow_counts() {
        let f = vec![
            "accelerated/tproxy=12".to_string(),
            "passthrough/no-route=1".to_string(),
        ];
        assert_eq!(flow_count(&f, "accelerated/tproxy"), 12);
        assert_eq!(flow_count(&f, "accelerated/redirect"), 0);
    }

    #[test]
    fn text_compresses_but_is_not_repetitive() {
        let dir = std::env::temp_dir().join(format!("ditto-modes-text-{}", std::process::id()));
        std::fs::create_dir_all(&dir).ok();
        let p = dir.join("t.txt");
        write_text(&p, 300_000).ok();
        let b = std::fs::read(&p).unwrap_or_default();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(b.len(), 300_000);
        assert!(b
            .iter()
            .all(|c| c.is_ascii_lowercase() || *c == b' ' || *c == b'\n'));
        // No 64-byte window repeats at 4 KiB offsets.
        let mut seen = std::collections::HashSet::new();
        for w in b.chunks(4096) {
            assert!(seen.insert(&w[..64.min(w.len())]));
        }
    }
}
