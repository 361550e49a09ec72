//! `ditto-bench load`: a ditto pair on loopback under many concurrent flows and under attacks on
//! its tunnel port. Two real `ditto run` daemons (default configuration), an echo and a bulk
//! server in this process, and clients here too, spread over source addresses 127.0.0.x:
//!
//! * flows: N at once (`echo`: 1 KiB there and back; `bulk`: a download; `idle`: one byte there and
//!   back, then nothing), opened at a connection rate (or all at once), some of them slow readers;
//!   all held open until every one has its answer, then closed;
//! * attacks on site B's tunnel port while site A is restarted (time until its tunnel is up
//!   again): idle connections from one address, from many addresses, byte-at-a-time handshakes, a
//!   flood of TLS ClientHellos at a fixed rate (CPU of site B meanwhile).
//!
//! Reports successes, failures by kind, p50/p99 connect and first-byte latency, RSS and open files
//! of both daemons over time (and per flow while all are open, and after the burst), as JSON and
//! Markdown.

use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

#[derive(clap::Args, Debug, Clone)]
pub struct LoadArgs {
    /// The `ditto` binary (default: next to this one).
    #[arg(long)]
    pub ditto: Option<PathBuf>,
    /// Concurrent flows (0: attacks only).
    #[arg(long, default_value_t = 5000)]
    pub flows: usize,
    /// What each flow does: echo, bulk, idle, or chatty (`--exchanges` request/response round
    /// trips of 64 bytes, timed each, once straight to the server and once through the pair).
    #[arg(long, default_value = "echo")]
    pub kind: String,
    /// Round trips of each chatty flow.
    #[arg(long, default_value_t = 2000)]
    pub exchanges: usize,
    /// New connections per second (0: all at once).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    /// Bytes each bulk flow downloads.
    #[arg(long, default_value_t = 1 << 20)]
    pub bulk_bytes: u64,
    /// Of the bulk flows, this many read at 64 KiB/s only.
    #[arg(long, default_value_t = 0)]
    pub slow_readers: usize,
    /// Client source addresses 127.0.0.1..=N (ephemeral ports are per source address).
    #[arg(long, default_value_t = 8)]
    pub sources: u8,
    /// Seconds the flows stay open (idle) once all have their answer.
    #[arg(long, default_value_t = 5)]
    pub hold_s: u64,
    /// Seconds to wait after the flows closed before measuring RSS again.
    #[arg(long, default_value_t = 30)]
    pub settle_s: u64,
    /// Flows of a first, small wave (same kind, opened and closed) before the "before" figures,
    /// so that they are of a daemon that has carried traffic: its code paged in, its runtime's
    /// and allocator's first-use tables made (0: measure a daemon that has carried nothing).
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Attacks to run before the flows: idle-one, idle-many, byte, hello-flood (comma-separated).
    #[arg(long, value_delimiter = ',')]
    pub attack: Vec<String>,
    /// Connections of the idle-one and byte attacks (from one address).
    #[arg(long, default_value_t = 5000)]
    pub attack_conns: usize,
    /// Addresses x connections of the idle-many attack.
    #[arg(long, default_value_t = 50)]
    pub attack_sources: u8,
    #[arg(long, default_value_t = 10)]
    pub attack_per_source: usize,
    /// ClientHellos per second of the hello-flood attack.
    #[arg(long, default_value_t = 1000)]
    pub hello_rate: u64,
    /// Write NAME.json and NAME.md (e.g. bench/results/2026-11-30-load-5000).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Extra `[tunnel]` lines for both sites (`;` separates lines).
    #[arg(long, default_value = "")]
    pub tunnel: String,
    /// Soak instead of one burst: waves of `--flows` mixed flows (echo, `--bulk-bytes` of fresh
    /// data, idle) for this many seconds, watching RSS and open files (run by hand: an hour is
    /// 3600).
    #[arg(long, default_value_t = 0)]
    pub soak_s: u64,
    /// Echo servers (each on a port of its own, reached through a forward listener of its own)
    /// the flows are spread over. Connecting from its own address, the far appliance can hold
    /// only as many connections to one address and port as the kernel finds local ports for
    /// (`net.ipv4.ip_local_port_range`: about 17,000 of its 28,232 on this machine): bursts
    /// beyond that need several destinations, as real ones have.
    #[arg(long, default_value_t = 1)]
    pub destinations: usize,
    /// Run only the echo and bulk servers, print their addresses and wait for standard input to
    /// close (what this bench starts as a process of its own: a process may hold only its open
    /// file limit of sockets, and a burst's client and server ends together are two per flow).
    #[arg(long, hide = true)]
    pub serve_only: bool,
}

#[derive(Serialize, Default, Clone, Copy, Debug)]
pub struct Sample {
    pub t_s: f64,
    pub rss_a_kib: u64,
    pub rss_b_kib: u64,
    /// The anonymous part of RSS (heap, stacks): RSS less the program's code and other file
    /// pages, which are paged in as code paths first run and are the page cache's to reclaim.
    pub anon_a_kib: u64,
    pub anon_b_kib: u64,
    pub fds_a: usize,
    pub fds_b: usize,
}

#[derive(Serialize, Default, Debug)]
pub struct Latency {
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

#[derive(Serialize, Default, Debug)]
pub struct FlowsReport {
    pub flows: usize,
    pub kind: String,
    pub rate: u64,
    pub slow_readers: usize,
    pub ok: usize,
    pub failures: BTreeMap<String, usize>,
    pub seconds: f64,
    pub connect: Latency,
    pub first_byte: Latency,
    /// `ditto_flows_total` of site A (outcome/reason -> count) after the run.
    pub site_a_flows: BTreeMap<String, f64>,
    /// Flows of the warm-up wave, and RSS before it (a daemon that has carried nothing).
    pub warmup_flows: usize,
    pub rss_cold_kib: (u64, u64),
    pub rss_before_kib: (u64, u64),
    pub rss_all_open_kib: (u64, u64),
    pub rss_after_kib: (u64, u64),
    /// The anonymous part of the same (see [`Sample`]).
    pub anon_before_kib: (u64, u64),
    pub anon_all_open_kib: (u64, u64),
    pub anon_after_kib: (u64, u64),
    /// `ditto_allocator_bytes` of site A and B (kind -> KiB), before, all open and after.
    pub allocator_kib: [(BTreeMap<String, u64>, BTreeMap<String, u64>); 3],
    /// (RSS all open - RSS before) / flows, both ends together.
    pub bytes_per_idle_flow: f64,
    /// RSS `settle_s` after the flows closed / RSS before, per end.
    pub after_ratio: (f64, f64),
    /// The same of anonymous RSS.
    pub anon_after_ratio: (f64, f64),
    pub fds_before: (usize, usize),
    pub fds_after: (usize, usize),
    /// CPU (user + system) each daemon spent from the wave's start until `settle_s` after its
    /// close, per flow, in milliseconds.
    pub cpu_ms_per_flow: (f64, f64),
}

#[derive(Serialize, Default, Debug)]
pub struct AttackReport {
    pub attack: String,
    /// Connection attempts of the attacker.
    pub connections_opened: u64,
    /// Time from site A's restart until its tunnel was up again (None: not within 60 s).
    pub reconnect_ms: Option<f64>,
    /// CPU seconds site B used per second during the attack.
    pub site_b_cpu: f64,
    /// `ditto_preauth_closed_total` of site B's tunnel listener during the attack, by why.
    pub closed: BTreeMap<String, f64>,
}

#[derive(Serialize, Default, Debug)]
pub struct LoadReport {
    pub version: String,
    pub somaxconn: u32,
    pub nofile: u64,
    pub attacks: Vec<AttackReport>,
    pub flows: Option<FlowsReport>,
    pub soak: Option<crate::soak::SoakReport>,
    pub chatty: Option<ChattyReport>,
    pub samples: Vec<Sample>,
}

/// Round trips of small requests, straight to the server and through the pair.
#[derive(Serialize, Default, Debug)]
pub struct ChattyReport {
    pub flows: usize,
    pub exchanges: usize,
    /// Rounds, alternating direct and through the pair.
    pub rounds: Vec<ChattyRound>,
}

#[derive(Serialize, Default, Debug)]
pub struct ChattyRound {
    pub direct: Latency,
    pub pair: Latency,
    pub failures: usize,
}

struct Daemon {
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Pair {
    dir: PathBuf,
    ditto: PathBuf,
    a: Option<Daemon>,
    b: Daemon,
    admin_a: SocketAddr,
    admin_b: SocketAddr,
    tunnel: SocketAddr,
    /// The forward listener of the first target, and of each.
    fwd: SocketAddr,
    fwd_all: Vec<SocketAddr>,
    starts: u32,
}

fn free_port() -> Result<SocketAddr> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?)
}

/// Starts `ditto run`; spawned from the main thread, which the daemon does not outlive.
fn spawn(ditto: &Path, cfg: &Path, log: &Path) -> Result<Daemon> {
    let f = std::fs::File::create(log)?;
    let mut cmd = Command::new(ditto);
    cmd.args(["run", "--config"])
        .arg(cfg)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(f);
    crate::sys::end_child_with_parent(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting {}", ditto.display()))?;
    Ok(Daemon { child })
}

fn keygen(ditto: &Path, dir: &Path, name: &str) -> Result<String> {
    let out = Command::new(ditto)
        .arg("keygen")
        .arg("--out")
        .arg(dir.join(name))
        .output()?;
    if !out.status.success() {
        bail!("ditto keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// GET on an admin endpoint: the body of a 200 answer.
fn http_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut r = Vec::new();
    s.read_to_end(&mut r).ok()?;
    let r = String::from_utf8_lossy(&r).into_owned();
    let (head, body) = r.split_once("\r\n\r\n")?;
    (head.split_whitespace().nth(1)? == "200").then(|| body.to_owned())
}

/// Tunnel streams the daemon's session with its (only) peer holds, from its status.
fn streams(admin: SocketAddr) -> u64 {
    http_get(admin, "/status")
        .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|s| s["peers"][0]["streams"].as_u64())
        .unwrap_or(0)
}

/// Every series of a metric family (`name{labels}` -> value).
fn metrics(addr: SocketAddr, family: &str) -> BTreeMap<String, f64> {
    let body = http_get(addr, "/metrics").unwrap_or_default();
    body.lines()
        .filter(|l| l.starts_with(family) && l[family.len()..].starts_with('{'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k[family.len()..].to_owned(), v.parse().ok()?))
        })
        .collect()
}

impl Pair {
    /// `stores`: each site gets an on-disk store of its own with small tiers (64 MiB of RAM,
    /// 512 MiB of disk), so that a soak's fresh data cycles both within minutes.
    fn start(
        ditto: &Path,
        dir: &Path,
        targets: &[SocketAddr],
        tunnel_extra: &str,
        stores: bool,
    ) -> Result<Pair> {
        let fp_a = keygen(ditto, dir, "a")?;
        let fp_b = keygen(ditto, dir, "b")?;
        let (tunnel, admin_a, admin_b) = (free_port()?, free_port()?, free_port()?);
        let mut fwd_all = Vec::new();
        let mut forwards = String::new();
        for t in targets {
            let l = free_port()?;
            fwd_all.push(l);
            forwards +=
                &format!("\n[[forward]]\nlisten = \"{l}\"\npeer = \"site-b\"\ntarget = \"{t}\"\n");
        }
        let fwd = *fwd_all.first().context("no target")?;
        let extra = tunnel_extra.replace(';', "\n");
        let store = |site: &str| {
            if stores {
                format!(
                    "store_dir = \"{}\"\nstore_ram = \"64MiB\"\nstore_disk = \"512MiB\"\n",
                    dir.join(format!("store-{site}")).display()
                )
            } else {
                String::new()
            }
        };
        let (store_a, store_b) = (store("a"), store("b"));
        std::fs::write(
            dir.join("b.toml"),
            format!(
                "[node]\nname = \"site-b\"\nkey = \"b.key\"\nadmin = \"{admin_b}\"\n{store_b}\n\
                 [tunnel]\nlisten = \"{tunnel}\"\n{extra}\n\n[[peer]]\nname = \"site-a\"\n\
                 fingerprint = \"{fp_a}\"\n"
            ),
        )?;
        std::fs::write(
            dir.join("a.toml"),
            format!(
                "[node]\nname = \"site-a\"\nkey = \"a.key\"\nadmin = \"{admin_a}\"\n{store_a}\n\
                 [tunnel]\n{extra}\n\n[[peer]]\nname = \"site-b\"\naddress = \"{tunnel}\"\n\
                 fingerprint = \"{fp_b}\"\n{forwards}"
            ),
        )?;
        let b = spawn(ditto, &dir.join("b.toml"), &dir.join("b.log"))?;
        let mut p = Pair {
            dir: dir.to_owned(),
            ditto: ditto.to_owned(),
            a: None,
            b,
            admin_a,
            admin_b,
            tunnel,
            fwd,
            fwd_all,
            starts: 0,
        };
        p.start_a()?;
        if p.wait_up(Duration::from_secs(30)).is_none() {
            bail!("tunnel never came up (logs in {})", dir.display());
        }
        Ok(p)
    }

    fn start_a(&mut self) -> Result<()> {
        drop(self.a.take());
        self.starts += 1;
        let log = self.dir.join(format!("a-{}.log", self.starts));
        self.a = Some(spawn(&self.ditto, &self.dir.join("a.toml"), &log)?);
        Ok(())
    }

    fn up(&self) -> bool {
        http_get(self.admin_a, "/status")
            .and_then(|b| serde_json::from_str::<serde_json::Value>(&b).ok())
            .is_some_and(|s| s["peers"][0]["up"].as_bool() == Some(true))
    }

    fn wait_up(&self, timeout: Duration) -> Option<Duration> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.up() {
                return Some(t0.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    fn pids(&self) -> (u32, u32) {
        (
            self.a.as_ref().map_or(0, |a| a.child.id()),
            self.b.child.id(),
        )
    }
}

fn proc_status(pid: u32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(key))?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:")
}

fn anon_kib(pid: u32) -> u64 {
    proc_status(pid, "RssAnon:")
}

/// RSS and its anonymous part of both daemons, and what their allocator says
/// (`ditto_allocator_bytes`: kind -> KiB).
#[derive(Clone, Default)]
struct Rss {
    total: (u64, u64),
    anon: (u64, u64),
    allocator: (BTreeMap<String, u64>, BTreeMap<String, u64>),
}

impl Rss {
    fn of(pair: &Pair) -> Rss {
        let (a, b) = pair.pids();
        let allocator = |admin| {
            metrics(admin, "ditto_allocator_bytes")
                .into_iter()
                .map(|(k, v)| {
                    let kind = k.trim_start_matches("{kind=\"").trim_end_matches("\"}");
                    (kind.to_owned(), (v / 1024.0) as u64)
                })
                .collect()
        };
        Rss {
            total: (rss_kib(a), rss_kib(b)),
            anon: (anon_kib(a), anon_kib(b)),
            allocator: (allocator(pair.admin_a), allocator(pair.admin_b)),
        }
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// CPU seconds (user + system) of a process so far.
fn cpu_s(pid: u32) -> f64 {
    let Ok(s) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name (which may hold spaces) start at its closing parenthesis.
    let Some(rest) = s.rsplit_once(')').map(|r| r.1) else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| f.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY-free: sysconf(_SC_CLK_TCK) is 100 on Linux.
    ticks / 100.0
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

fn latency(mut v: Vec<f64>) -> Latency {
    Latency {
        p50_ms: percentile(&mut v, 0.5),
        p99_ms: percentile(&mut v, 0.99),
        max_ms: v.iter().copied().fold(0.0, f64::max),
    }
}

/// Starts `ditto-bench load --serve-only` and reads the echo and bulk servers' addresses. The
/// process ends when the returned handle is dropped.
fn servers_process(echo: usize, bulk_bytes: u64) -> Result<(Daemon, Vec<SocketAddr>, SocketAddr)> {
    let mut child = Command::new(std::env::current_exe()?)
        .args(["load", "--serve-only", "--destinations"])
        .arg(echo.to_string())
        .arg("--bulk-bytes")
        .arg(bulk_bytes.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the servers' process")?;
    let mut line = String::new();
    if let Some(out) = child.stdout.take() {
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
    }
    let proc = Daemon { child };
    let parsed: Result<Vec<SocketAddr>, _> = line.split_whitespace().map(str::parse).collect();
    match parsed {
        Ok(mut v) if v.len() >= 2 => {
            let bulk = v.pop().context("bulk address")?;
            Ok((proc, v, bulk))
        }
        _ => bail!("the servers' process said {line:?}, not its servers' addresses"),
    }
}

/// `net.core.somaxconn` (0 if unreadable).
fn somaxconn() -> u32 {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// `echo` echo servers and a bulk server (sends `bulk` bytes, then closes).
async fn servers(echo: usize, bulk: u64) -> Result<(Vec<SocketAddr>, SocketAddr)> {
    // A backlog as deep as the kernel allows: the far appliance opens a whole burst's connections
    // to these at once, and a SYN dropped here would be counted against the pair (1 s retransmit).
    let listen = || -> std::io::Result<TcpListener> {
        let s = TcpSocket::new_v4()?;
        s.bind("127.0.0.1:0".parse().map_err(std::io::Error::other)?)?;
        s.listen(somaxconn().max(128))
    };
    let mut echo_addrs = Vec::new();
    for _ in 0..echo.max(1) {
        let echo = listen()?;
        echo_addrs.push(echo.local_addr()?);
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = echo.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                tokio::spawn(async move {
                    let (mut r, mut w) = s.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    let _ = w.shutdown().await;
                });
            }
        });
    }
    let bulk_l = listen()?;
    let ba = bulk_l.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = bulk_l.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            tokio::spawn(async move {
                let buf = vec![0x5a_u8; 64 << 10];
                let mut left = bulk;
                while left > 0 {
                    let n = left.min(buf.len() as u64) as usize;
                    if s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                    left -= n as u64;
                }
                let _ = s.shutdown().await;
            });
        }
    });
    Ok((echo_addrs, ba))
}

async fn connect_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

pub(crate) fn kind_of(e: &std::io::Error) -> String {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset".into(),
        ConnectionRefused => "refused".into(),
        UnexpectedEof => "early-eof".into(),
        TimedOut => "hung".into(),
        AddrNotAvailable | AddrInUse => "no-source-port".into(),
        _ if e.raw_os_error() == Some(24) => "no-fd".into(),
        k => format!("{k:?}"),
    }
}

struct FlowResult {
    connect_ms: f64,
    first_byte_ms: f64,
}

/// What one wave of flows gave.
struct Wave {
    results: Vec<Result<FlowResult, String>>,
    /// Until every flow had its answer (or failed).
    seconds: f64,
}

/// Opens `n` flows (at `args.rate` per second, or all at once), waits until every one has its
/// answer, holds them all open `hold_s` more, calls `all_open`, then closes them.
fn wave(
    rt: &tokio::runtime::Runtime,
    args: &LoadArgs,
    fwd: &[SocketAddr],
    n: usize,
    hold_s: u64,
    all_open: impl FnOnce(),
) -> Wave {
    let all = Arc::new(tokio::sync::Barrier::new(n + 1));
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    for i in 0..n {
        if args.rate > 0 {
            let due = started + Duration::from_secs_f64(i as f64 / args.rate as f64);
            if let Some(d) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(d);
            }
        }
        let (a, all, release) = (args.clone(), all.clone(), release.clone());
        let to = fwd[i % fwd.len()];
        tasks.push(rt.spawn(async move { one_flow(i, &a, to, all, release).await }));
    }
    // Wait until every flow has its answer (or failed), bounded.
    let answered = rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(180), all.wait())
            .await
            .is_ok()
    });
    let seconds = started.elapsed().as_secs_f64();
    eprintln!("{n} flows, all answered: {answered} in {seconds:.2} s");
    std::thread::sleep(Duration::from_secs(hold_s));
    all_open();
    let _ = release_tx.send(true);
    let results = rt.block_on(async {
        let mut out = Vec::with_capacity(tasks.len());
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        for t in tasks {
            out.push(match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok(r)) => r,
                Ok(Err(_)) => Err("panicked".into()),
                Err(_) => Err("hung".into()),
            });
        }
        out
    });
    Wave { results, seconds }
}

/// `args.flows` clients at once, each doing `args.exchanges` round trips of 64 bytes with the
/// echo server at `to`, one at a time. Returns the latency of all round trips and the failed
/// clients.
fn chatty_wave(rt: &tokio::runtime::Runtime, args: &LoadArgs, to: SocketAddr) -> (Latency, usize) {
    let exchanges = args.exchanges;
    let tasks: Vec<_> = (0..args.flows)
        .map(|i| {
            rt.spawn(async move {
                let run = async {
                    let mut s = TcpStream::connect(to).await?;
                    s.set_nodelay(true)?;
                    let mut times = Vec::with_capacity(exchanges);
                    let mut msg = [0u8; 64];
                    let mut back = [0u8; 64];
                    for k in 0..exchanges {
                        msg.fill((i + k) as u8);
                        let t = Instant::now();
                        s.write_all(&msg).await?;
                        s.read_exact(&mut back).await?;
                        times.push(t.elapsed().as_secs_f64() * 1e3);
                        if back != msg {
                            return Err(std::io::Error::other("corrupt"));
                        }
                    }
                    Ok::<_, std::io::Error>(times)
                };
                tokio::time::timeout(Duration::from_secs(120), run).await
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut failed = 0;
    for t in tasks {
        match rt.block_on(t) {
            Ok(Ok(Ok(times))) => all.extend(times),
            _ => failed += 1,
        }
    }
    (latency(all), failed)
}

/// One flow: connect, get the first byte of the answer, get all of it, wait for `all`, close.
async fn one_flow(
    i: usize,
    args: &LoadArgs,
    to: SocketAddr,
    all: Arc<tokio::sync::Barrier>,
    mut release: tokio::sync::watch::Receiver<bool>,
) -> Result<FlowResult, String> {
    let answer = tokio::time::timeout(Duration::from_secs(120), answer(i, args, to)).await;
    let r = match answer {
        Ok(r) => r,
        Err(_) => Err("hung".to_owned()),
    };
    all.wait().await;
    let (mut s, f) = r?;
    let _ = release.wait_for(|v| *v).await;
    s.shutdown().await.map_err(|e| kind_of(&e))?;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut rest)).await;
    Ok(f)
}

/// Connects and reads the whole answer.
async fn answer(
    i: usize,
    args: &LoadArgs,
    to: SocketAddr,
) -> Result<(TcpStream, FlowResult), String> {
    let src = IpAddr::from([127, 0, 0, 1 + (i % usize::from(args.sources.max(1))) as u8]);
    let t0 = Instant::now();
    let mut s = connect_from(src, to).await.map_err(|e| kind_of(&e))?;
    let connect_ms = t0.elapsed().as_secs_f64() * 1e3;
    let e = |e: std::io::Error| kind_of(&e);
    let mut first = [0u8; 1];
    let first_byte_ms;
    match args.kind.as_str() {
        "bulk" => {
            s.read_exact(&mut first).await.map_err(e)?;
            first_byte_ms = t0.elapsed().as_secs_f64() * 1e3;
            let slow = i < args.slow_readers;
            let mut buf = vec![0u8; 64 << 10];
            let mut got = 1u64;
            loop {
                let n = if slow {
                    let n = s.read(&mut buf[..6554]).await.map_err(e)?;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    n
                } else {
                    s.read(&mut buf).await.map_err(e)?
                };
                if n == 0 {
                    break;
                }
                got += n as u64;
            }
            if got != args.bulk_bytes {
                return Err("short".into());
            }
        }
        _ => {
            let len = if args.kind == "idle" { 1 } else { 1024 };
            let msg = vec![(i % 251) as u8; len];
            s.write_all(&msg).await.map_err(e)?;
            s.read_exact(&mut first).await.map_err(e)?;
            first_byte_ms = t0.elapsed().as_secs_f64() * 1e3;
            let mut rest = vec![0u8; len - 1];
            s.read_exact(&mut rest).await.map_err(e)?;
            if first[0] != msg[0] || rest.iter().any(|&b| b != msg[0]) {
                return Err("corrupt".into());
            }
        }
    }
    Ok((
        s,
        FlowResult {
            connect_ms,
            first_byte_ms,
        },
    ))
}

fn sampler(
    pids: Arc<Mutex<(u32, u32)>>,
    t0: Instant,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        while !stop.load(Relaxed) {
            let (a, b) = *pids.lock().unwrap_or_else(|e| e.into_inner());
            v.push(Sample {
                t_s: t0.elapsed().as_secs_f64(),
                rss_a_kib: rss_kib(a),
                rss_b_kib: rss_kib(b),
                anon_a_kib: anon_kib(a),
                anon_b_kib: anon_kib(b),
                fds_a: fds(a),
                fds_b: fds(b),
            });
            std::thread::sleep(Duration::from_millis(250));
        }
        v
    })
}

/// A TLS 1.3 ClientHello offering x25519, Ed25519/ECDSA/RSA-PSS signatures and ALPN "ditto/1":
/// enough for a server to answer with its key share, certificate and signature.
fn client_hello(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut rnd = |n: usize| -> Vec<u8> {
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    };
    let mut ext = Vec::new();
    let mut push_ext = |ty: u16, body: &[u8]| {
        ext.extend_from_slice(&ty.to_be_bytes());
        ext.extend_from_slice(&(body.len() as u16).to_be_bytes());
        ext.extend_from_slice(body);
    };
    push_ext(0x002b, &[2, 0x03, 0x04]);
    push_ext(0x000a, &[0, 2, 0x00, 0x1d]);
    push_ext(0x000d, &[0, 6, 0x08, 0x07, 0x04, 0x03, 0x08, 0x04]);
    let mut ks = vec![0, 36, 0x00, 0x1d, 0, 32];
    ks.extend(rnd(32));
    push_ext(0x0033, &ks);
    let alpn = b"ditto/1";
    let mut a = vec![0, (alpn.len() + 1) as u8, alpn.len() as u8];
    a.extend_from_slice(alpn);
    push_ext(0x0010, &a);
    let mut body = vec![0x03, 0x03];
    body.extend(rnd(32));
    body.push(32);
    body.extend(rnd(32));
    body.extend_from_slice(&[0, 2, 0x13, 0x01, 1, 0]);
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend(ext);
    let mut hs = vec![1, 0];
    hs.extend_from_slice(&(body.len() as u16).to_be_bytes());
    hs.extend(body);
    let mut rec = vec![0x16, 0x03, 0x01];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend(hs);
    rec
}

/// Runs one attack until `stop`; returns the connections it opened.
async fn attack(kind: String, args: LoadArgs, to: SocketAddr, stop: Arc<AtomicBool>) -> u64 {
    let opened = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    let conn = |src: IpAddr, trickle: bool| {
        let (stop, opened) = (stop.clone(), opened.clone());
        tokio::spawn(async move {
            let hello = client_hello(u64::from(u32::from(match src {
                IpAddr::V4(a) => a,
                IpAddr::V6(_) => std::net::Ipv4Addr::LOCALHOST,
            })));
            let mut buf = [0u8; 4096];
            while !stop.load(Relaxed) {
                // Attempts: a connect the server resets at once may fail here after all.
                opened.fetch_add(1, Relaxed);
                if let Ok(mut s) = connect_from(src, to).await {
                    let mut sent = 0;
                    loop {
                        if trickle && sent < hello.len() {
                            if s.write_all(&hello[sent..=sent]).await.is_err() {
                                break;
                            }
                            sent += 1;
                        }
                        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf))
                            .await
                        {
                            Ok(Ok(0) | Err(_)) => break,
                            _ if stop.load(Relaxed) => break,
                            _ => {}
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    match kind.as_str() {
        "idle-one" | "byte" => {
            for _ in 0..args.attack_conns {
                tasks.push(conn(IpAddr::from([127, 0, 2, 1]), kind == "byte"));
            }
        }
        "idle-many" => {
            for a in 0..args.attack_sources {
                for _ in 0..args.attack_per_source {
                    tasks.push(conn(IpAddr::from([127, 0, 3, a.wrapping_add(1)]), false));
                }
            }
        }
        "hello-flood" => {
            let (stop, opened) = (stop.clone(), opened.clone());
            let rate = args.hello_rate.max(1);
            tasks.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    tick.tick().await;
                    n += 1;
                    let src = IpAddr::from([127, 0, 4, 1 + (n % 200) as u8]);
                    let opened = opened.clone();
                    tokio::spawn(async move {
                        opened.fetch_add(1, Relaxed);
                        let Ok(mut s) = connect_from(src, to).await else {
                            return;
                        };
                        if s.write_all(&client_hello(n)).await.is_ok() {
                            let mut buf = [0u8; 8192];
                            let _ =
                                tokio::time::timeout(Duration::from_millis(500), s.read(&mut buf))
                                    .await;
                        }
                    });
                }
            }));
        }
        _ => {}
    }
    for t in tasks {
        let _ = t.await;
    }
    opened.load(Relaxed)
}

pub fn run(args: &LoadArgs) -> Result<()> {
    let nofile = crate::sys::raise_nofile();
    let ditto = match &args.ditto {
        Some(p) => p.clone(),
        None => crate::linktest::sibling_binary("ditto")?,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    if args.serve_only {
        let (echo, bulk) = rt.block_on(servers(args.destinations, args.bulk_bytes))?;
        for e in echo {
            print!("{e} ");
        }
        println!("{bulk}");
        std::io::stdout().flush()?;
        // Until the bench that started us closes our standard input (or dies).
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
        return Ok(());
    }
    let dir = std::env::temp_dir().join(format!("ditto-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    // Client ends here, server ends in a process of their own: each within the open file limit.
    if args.flows as u64 + 200 > nofile {
        bail!(
            "{} flows need more than this process's open file limit of {nofile} \
             (the client ends of the flows are held here)",
            args.flows
        );
    }
    let (_servers, echo, bulk) = servers_process(args.destinations, args.bulk_bytes)?;
    let targets = if args.soak_s > 0 {
        vec![rt.block_on(crate::soak::server())?]
    } else if args.kind == "bulk" {
        vec![bulk]
    } else {
        echo
    };
    let mut pair = Pair::start(&ditto, &dir, &targets, &args.tunnel, args.soak_s > 0)?;
    eprintln!("pair up (logs in {})", dir.display());
    let mut report = LoadReport {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        somaxconn: somaxconn(),
        nofile,
        ..Default::default()
    };
    let t0 = Instant::now();
    let pids = Arc::new(Mutex::new(pair.pids()));
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let samples = sampler(pids.clone(), t0, stop_sampling.clone());

    let mut closed_before = BTreeMap::<String, f64>::new();
    for a in &args.attack {
        let stop = Arc::new(AtomicBool::new(false));
        let b_pid = pair.pids().1;
        let cpu0 = (cpu_s(b_pid), Instant::now());
        let h = rt.spawn(attack(a.clone(), args.clone(), pair.tunnel, stop.clone()));
        std::thread::sleep(Duration::from_secs(3));
        pair.start_a()?;
        *pids.lock().unwrap_or_else(|e| e.into_inner()) = pair.pids();
        let up = pair.wait_up(Duration::from_secs(60));
        // The attack goes on a while longer, for the CPU figure.
        std::thread::sleep(Duration::from_secs(2));
        let cpu = (cpu_s(b_pid) - cpu0.0) / cpu0.1.elapsed().as_secs_f64();
        stop.store(true, Relaxed);
        let opened = rt.block_on(h).unwrap_or(0);
        let now: BTreeMap<String, f64> = metrics(pair.admin_b, "ditto_preauth_closed_total")
            .into_iter()
            .filter(|(k, _)| k.contains("tunnel"))
            .collect();
        let closed = now
            .iter()
            .map(|(k, v)| (k.clone(), v - closed_before.get(k).copied().unwrap_or(0.0)))
            .collect();
        closed_before = now;
        let r = AttackReport {
            attack: a.clone(),
            connections_opened: opened,
            reconnect_ms: up.map(|d| d.as_secs_f64() * 1e3),
            site_b_cpu: cpu,
            closed,
        };
        eprintln!("{r:?}");
        report.attacks.push(r);
        if up.is_none() {
            pair.wait_up(Duration::from_secs(30));
        }
        std::thread::sleep(Duration::from_secs(3));
    }

    if args.kind == "chatty" {
        let mut r = ChattyReport {
            flows: args.flows,
            exchanges: args.exchanges,
            rounds: Vec::new(),
        };
        for _ in 0..3 {
            let (direct, f1) = chatty_wave(&rt, args, targets[0]);
            let (through, f2) = chatty_wave(&rt, args, pair.fwd);
            eprintln!(
                "chatty: direct p50 {:.3} ms, through the pair p50 {:.3} ms",
                direct.p50_ms, through.p50_ms
            );
            r.rounds.push(ChattyRound {
                direct,
                pair: through,
                failures: f1 + f2,
            });
        }
        report.chatty = Some(r);
    } else if args.soak_s > 0 {
        let (pa, pb) = pair.pids();
        report.soak = Some(crate::soak::run(
            &rt,
            pair.fwd,
            args.flows,
            args.bulk_bytes,
            Duration::from_secs(args.hold_s),
            args.soak_s,
            || crate::soak::Measure {
                rss_kib: (rss_kib(pa), rss_kib(pb)),
                fds: (fds(pa), fds(pb)),
                streams: (streams(pair.admin_a), streams(pair.admin_b)),
            },
        ));
    } else if args.flows > 0 {
        std::thread::sleep(Duration::from_secs(1));
        let pids = pair.pids();
        let cold = Rss::of(&pair);
        let warmup = args.warmup.min(args.flows);
        if warmup > 0 {
            let w = wave(&rt, args, &pair.fwd_all, warmup, 0, || ());
            eprintln!(
                "warm-up: {} of {warmup} flows succeeded",
                w.results.iter().filter(|r| r.is_ok()).count()
            );
            std::thread::sleep(Duration::from_secs(args.settle_s.min(10)));
        }
        let before = Rss::of(&pair);
        let fds_before = (fds(pids.0), fds(pids.1));
        let cpu_before = (cpu_s(pids.0), cpu_s(pids.1));
        let mut open = Rss::default();
        let w = wave(&rt, args, &pair.fwd_all, args.flows, args.hold_s, || {
            open = Rss::of(&pair);
            eprintln!("RSS all open {:?} KiB", open.total);
        });
        std::thread::sleep(Duration::from_secs(args.settle_s));
        let after = Rss::of(&pair);
        let fds_after = (fds(pids.0), fds(pids.1));
        let per_flow = |cpu: f64, before: f64| (cpu - before) * 1000.0 / args.flows as f64;
        let cpu_ms_per_flow = (
            per_flow(cpu_s(pids.0), cpu_before.0),
            per_flow(cpu_s(pids.1), cpu_before.1),
        );
        let mut failures = BTreeMap::new();
        let (mut conn, mut first) = (Vec::new(), Vec::new());
        for r in w.results {
            match r {
                Ok(f) => {
                    conn.push(f.connect_ms);
                    first.push(f.first_byte_ms);
                }
                Err(k) => *failures.entry(k).or_insert(0) += 1,
            }
        }
        let ratio = |after: (u64, u64), before: (u64, u64)| {
            (
                after.0 as f64 / before.0.max(1) as f64,
                after.1 as f64 / before.1.max(1) as f64,
            )
        };
        report.flows = Some(FlowsReport {
            flows: args.flows,
            kind: args.kind.clone(),
            rate: args.rate,
            slow_readers: args.slow_readers,
            ok: conn.len(),
            failures,
            seconds: w.seconds,
            connect: latency(conn),
            first_byte: latency(first),
            site_a_flows: metrics(pair.admin_a, "ditto_flows_total"),
            warmup_flows: warmup,
            rss_cold_kib: cold.total,
            rss_before_kib: before.total,
            rss_all_open_kib: open.total,
            rss_after_kib: after.total,
            anon_before_kib: before.anon,
            anon_all_open_kib: open.anon,
            anon_after_kib: after.anon,
            allocator_kib: [before.allocator, open.allocator, after.allocator],
            bytes_per_idle_flow: ((open.total.0 + open.total.1) as f64
                - (before.total.0 + before.total.1) as f64)
                * 1024.0
                / args.flows as f64,
            after_ratio: ratio(after.total, before.total),
            anon_after_ratio: ratio(after.anon, before.anon),
            fds_before,
            fds_after,
            cpu_ms_per_flow,
        });
    }
    stop_sampling.store(true, Relaxed);
    report.samples = samples.join().unwrap_or_default();
    let json = serde_json::to_string_pretty(&report)?;
    let md = markdown(&report, args);
    println!("{md}");
    if let Some(out) = &args.out {
        std::fs::write(out.with_extension("json"), &json)?;
        std::fs::write(out.with_extension("md"), &md)?;
        std::fs::write(out.with_extension("svg"), chart(&report.samples))?;
        eprintln!("wrote {}.json, .md and .svg", out.display());
    }
    drop(pair);
    if report
        .flows
        .as_ref()
        .is_some_and(|f| !f.failures.is_empty())
    {
        eprintln!(
            "flows failed: the daemons' logs are kept in {}",
            dir.display()
        );
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}

fn markdown(r: &LoadReport, args: &LoadArgs) -> String {
    let mut s = format!(
        "# ditto-bench load\n\nditto {}, a pair on loopback, default configuration{}; \
         net.core.somaxconn {}, open file limit {}.\n\n",
        r.version,
        if args.tunnel.is_empty() {
            String::new()
        } else {
            format!(" plus `{}`", args.tunnel)
        },
        r.somaxconn,
        r.nofile
    );
    if let Some(f) = &r.flows {
        s += &format!(
            "## {} concurrent {} flows{}\n\n| | |\n|---|---|\n\
             | succeeded | {} |\n| failed, by kind | {:?} |\n| all answered after | {:.2} s |\n\
             | connect p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
             | first byte p50 / p99 / max | {:.1} / {:.1} / {:.1} ms |\n\
             | site A flows | {} |\n\
             | RSS A, B at start, before a warm-up wave of {} flows | {} / {} KiB |\n\
             | RSS A, B before | {} / {} KiB (anonymous {} / {}) |\n\
             | RSS A, B all open | {} / {} KiB (anonymous {} / {}) |\n\
             | RSS per idle flow, both ends | {:.0} bytes ({:.1} KiB) |\n\
             | RSS A, B {} s after close | {} / {} KiB ({:.2}x / {:.2}x of before) |\n\
             | anonymous RSS A, B {} s after close | {} / {} KiB ({:.2}x / {:.2}x of before) |\n\
             | open files A, B before / after | {} / {} -> {} / {} |\n\
             | CPU per flow, A / B (wave and settling) | {:.3} / {:.3} ms |\n\n",
            f.flows,
            f.kind,
            if f.rate > 0 {
                format!(", {} new per second", f.rate)
            } else {
                ", all at once".into()
            },
            f.ok,
            f.failures,
            f.seconds,
            f.connect.p50_ms,
            f.connect.p99_ms,
            f.connect.max_ms,
            f.first_byte.p50_ms,
            f.first_byte.p99_ms,
            f.first_byte.max_ms,
            f.site_a_flows
                .iter()
                .filter(|(_, v)| **v > 0.0)
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", "),
            f.warmup_flows,
            f.rss_cold_kib.0,
            f.rss_cold_kib.1,
            f.rss_before_kib.0,
            f.rss_before_kib.1,
            f.anon_before_kib.0,
            f.anon_before_kib.1,
            f.rss_all_open_kib.0,
            f.rss_all_open_kib.1,
            f.anon_all_open_kib.0,
            f.anon_all_open_kib.1,
            f.bytes_per_idle_flow,
            f.bytes_per_idle_flow / 1024.0,
            args.settle_s,
            f.rss_after_kib.0,
            f.rss_after_kib.1,
            f.after_ratio.0,
            f.after_ratio.1,
            args.settle_s,
            f.anon_after_kib.0,
            f.anon_after_kib.1,
            f.anon_after_ratio.0,
            f.anon_after_ratio.1,
            f.fds_before.0,
            f.fds_before.1,
            f.fds_after.0,
            f.fds_after.1,
            f.cpu_ms_per_flow.0,
            f.cpu_ms_per_flow.1,
        );
    }
    if let Some(f) = &r.flows {
        s += "Allocator (jemalloc) figures, `ditto_allocator_bytes`, KiB, before / all open / after:\n\n\
              | site | kind | before | all open | after |\n|---|---|---|---|---|\n";
        for (site, pick) in [("A", 0), ("B", 1)] {
            let at = |i: usize| {
                let (a, b) = &f.allocator_kib[i];
                if pick == 0 {
                    a
                } else {
                    b
                }
            };
            for kind in at(0).keys() {
                let v = |i: usize| at(i).get(kind).map_or("-".into(), |v| v.to_string());
                s += &format!("| {site} | {kind} | {} | {} | {} |\n", v(0), v(1), v(2));
            }
        }
        s += "\n";
    }
    if let Some(c) = &r.chatty {
        s += &format!(
            "## {} chatty clients at once, {} round trips of 64 bytes each\n\n\
             | round | direct p50 / p99 | through the pair p50 / p99 | added at the median | failed |\n\
             |---|---|---|---|---|\n",
            c.flows, c.exchanges
        );
        for (i, x) in c.rounds.iter().enumerate() {
            s += &format!(
                "| {} | {:.3} / {:.3} ms | {:.3} / {:.3} ms | {:.3} ms | {} |\n",
                i + 1,
                x.direct.p50_ms,
                x.direct.p99_ms,
                x.pair.p50_ms,
                x.pair.p99_ms,
                x.pair.p50_ms - x.direct.p50_ms,
                x.failures
            );
        }
        s += "\n";
    }
    if let Some(soak) = &r.soak {
        s += &crate::soak::markdown(soak);
    }
    if !r.attacks.is_empty() {
        s += "## Attacks on site B's tunnel port while site A restarts\n\n\
              | attack | connection attempts | site A's tunnel up after | site B CPU | closed by site B |\n\
              |---|---|---|---|---|\n";
        for a in &r.attacks {
            s += &format!(
                "| {} | {} | {} | {:.0}% | {} |\n",
                a.attack,
                a.connections_opened,
                a.reconnect_ms
                    .map_or("not within 60 s".into(), |m| format!("{m:.0} ms")),
                a.site_b_cpu * 100.0,
                a.closed
                    .iter()
                    .map(|(k, v)| format!("{} {v}", k.replace("listener=\"tunnel\",", "")))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        s += "\n";
    }
    if let (Some(first), Some(peak)) = (
        r.samples.first(),
        r.samples.iter().max_by_key(|x| x.rss_a_kib + x.rss_b_kib),
    ) {
        let last = r.samples.last().copied().unwrap_or_default();
        s += &format!(
            "## Over time ({} samples, every 250 ms; all in the JSON)\n\n\
             | | t | RSS A | RSS B | open files A | open files B |\n|---|---|---|---|---|---|\n\
             | first | {:.1} s | {} KiB | {} KiB | {} | {} |\n\
             | peak RSS | {:.1} s | {} KiB | {} KiB | {} | {} |\n\
             | last | {:.1} s | {} KiB | {} KiB | {} | {} |\n",
            r.samples.len(),
            first.t_s,
            first.rss_a_kib,
            first.rss_b_kib,
            first.fds_a,
            first.fds_b,
            peak.t_s,
            peak.rss_a_kib,
            peak.rss_b_kib,
            peak.fds_a,
            peak.fds_b,
            last.t_s,
            last.rss_a_kib,
            last.rss_b_kib,
            last.fds_a,
            last.fds_b,
        );
    }
    s
}

/// RSS and open files of both daemons over the run, as an SVG line chart (two panels).
fn chart(samples: &[Sample]) -> String {
    use std::fmt::Write as _;
    let (w, h, pad) = (760.0, 200.0, 50.0);
    let t_max = samples.last().map_or(1.0, |s| s.t_s).max(1.0);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n",
        w + 2.0 * pad,
        2.0 * (h + 2.0 * pad)
    );
    type Series = (&'static str, &'static str, fn(&Sample) -> f64);
    let panels: [(&str, &[Series]); 2] = [
        (
            "RSS (light: its anonymous part), MiB",
            &[
                ("site A", "#1f77b4", |s| s.rss_a_kib as f64 / 1024.0),
                ("site B", "#d62728", |s| s.rss_b_kib as f64 / 1024.0),
                ("anon A", "#9ecae1", |s| s.anon_a_kib as f64 / 1024.0),
                ("anon B", "#fc9272", |s| s.anon_b_kib as f64 / 1024.0),
            ],
        ),
        (
            "open files",
            &[
                ("site A", "#1f77b4", |s| s.fds_a as f64),
                ("site B", "#d62728", |s| s.fds_b as f64),
            ],
        ),
    ];
    for (p, (title, series)) in panels.iter().enumerate() {
        let top = p as f64 * (h + 2.0 * pad) + pad;
        let y_max = samples
            .iter()
            .flat_map(|s| series.iter().map(move |(_, _, f)| f(s)))
            .fold(1.0_f64, f64::max)
            * 1.1;
        let _ = writeln!(
            svg,
            "<text x=\"{pad}\" y=\"{}\" font-weight=\"bold\">{title} (max {:.0}) over {:.0} s</text>\n\
             <rect x=\"{pad}\" y=\"{top}\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#888\"/>",
            top - 8.0,
            y_max / 1.1,
            t_max
        );
        for (i, (name, color, f)) in series.iter().enumerate() {
            let pts: Vec<String> = samples
                .iter()
                .map(|s| {
                    format!(
                        "{:.1},{:.1}",
                        pad + s.t_s / t_max * w,
                        top + h - f(s) / y_max * h
                    )
                })
                .collect();
            let _ = writeln!(
                svg,
                "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\n\
                 <text x=\"{}\" y=\"{}\" fill=\"{color}\">{name}</text>",
                pts.join(" "),
                pad + w - 60.0 * series.len() as f64 + 60.0 * i as f64,
                top + h + 20.0
            );
        }
        let _ = writeln!(
            svg,
            "<text x=\"{pad}\" y=\"{}\">0 s</text><text x=\"{}\" y=\"{}\">{:.0} s</text>",
            top + h + 20.0,
            pad + w - 30.0,
            top + h + 36.0,
            t_max
        );
    }
    svg.push_str("</svg>\n");
    svg
}
