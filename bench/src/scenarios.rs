//! The scenario runner: for each scenario, for each contender, a fresh emulated link, a server,
//! the contender's processes (wrapped in `rusage`), one measured transfer, the emulator's
//! counters and the contender's CPU/memory. Results go to `<out>/<date>.json`, `.md` and SVGs.

use crate::linktest::{run_json, sibling_binary, start_server, wait_port_in, KillOnDrop};
use crate::procs::Usage;
use crate::report;
use crate::topo::{addr, Link, LinkSpec, Role, Topo, TopoGuard};
use crate::traffic::{FetchResult, RrResult};
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Options of `scenarios`.
#[derive(Args, Debug, Clone)]
pub struct ScenarioArgs {
    /// Scenarios to run (default: all but the outages). Known: legacy-window, long-fat-100m,
    /// long-fat-1g, lossy, warm-restart,
    /// cross-peer, warm-repeat,
    /// warm-repeat-db, cold-compressible, interactive, many-flows, no-link-limit, and the outages
    /// outage-10s, outage-60s, outage-300s (`outages` = all three; they take minutes, so they only
    /// run when named).
    pub names: Vec<String>,
    /// Contenders, comma-separated (default: plain,ditto,ssh,zstd,rsync).
    #[arg(long, default_value = "plain,ditto,ssh,zstd,rsync")]
    pub contenders: String,
    /// Size of the synthetic incompressible transfers (legacy-window).
    #[arg(long, default_value = "16MiB")]
    pub bulk_size: String,
    /// Size of the long-fat-100m transfer (long-fat-1g sends 4x this).
    #[arg(long, default_value = "64MiB")]
    pub long_fat_size: String,
    /// Size of the lossy-link transfer.
    #[arg(long, default_value = "4MiB")]
    pub lossy_size: String,
    /// Size of the no-link-limit transfer.
    #[arg(long, default_value = "128MiB")]
    pub nolimit_size: String,
    /// Connections of many-flows.
    #[arg(long, default_value_t = 1000)]
    pub flows: usize,
    /// Bytes per connection of many-flows.
    #[arg(long, default_value = "32KiB")]
    pub flow_size: String,
    /// Size of the download that an outage interrupts.
    #[arg(long, default_value = "32MiB")]
    pub outage_size: String,
    /// Seconds into the measured download at which the outage starts.
    #[arg(long, default_value_t = 5.0)]
    pub outage_after: f64,
    /// Request/response exchanges of the interactive scenario.
    #[arg(long, default_value_t = 50)]
    pub rr_count: usize,
    /// Dataset directory (default: $DITTO_DATA or ~/.cache/ditto-bench; see bench/scripts/datasets.sh).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The ditto binary (default: `ditto` next to this binary).
    #[arg(long)]
    pub ditto: Option<PathBuf>,
    /// How clients reach the ditto pair: `forward` (a `[[forward]]` listener on site A),
    /// `tproxy` or `redirect` (site A intercepts connections to the server's own address).
    #[arg(long, default_value = "forward")]
    pub ditto_mode: String,
    /// Extra lines for both ditto sites' `[tunnel]` section (e.g. "connections = 1"), to compare
    /// settings in one run.
    #[arg(long, default_value = "")]
    pub ditto_tunnel: String,
    /// CPUs for the appliances (both sites' processes: ditto, or the ssh tunnel, or the zstd
    /// pipe), e.g. "1"; clients, servers, the emulated WAN and this bench run on the other CPUs.
    /// Appliances are boxes of their own: on a machine too small to give every host its own
    /// cores, this keeps an appliance's work from taking CPU from the endpoints and the link (and
    /// theirs from it), the same for every contender. Default: everything shares every CPU.
    #[arg(long)]
    pub appliance_cpus: Option<String>,
    /// Where to write results (default: the crate's results/ directory).
    #[arg(long)]
    pub out_dir: Option<PathBuf>,
    /// Namespace prefix (default: unique).
    #[arg(long)]
    pub prefix: Option<String>,
}

/// What a scenario transfers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Workload {
    /// Download of incompressible pseudo-random bytes.
    Rand { bytes: u64 },
    /// Download of a dataset file; `warm` is fetched first (not measured).
    File { name: String, warm: Option<String> },
    /// Request/response exchanges on one connection.
    Rr {
        count: usize,
        req: usize,
        resp: usize,
    },
    /// Many concurrent downloads of pseudo-random bytes.
    Many { conns: usize, bytes_each: u64 },
}

/// One scenario.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Scenario {
    pub name: String,
    pub about: String,
    pub rate: String,
    pub rtt: String,
    pub loss: Option<String>,
    /// SO_RCVBUF of the client socket.
    pub client_rcvbuf: Option<String>,
    pub workload: Workload,
    /// The emulated link goes down in the middle of the measured transfer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outage: Option<Outage>,
    /// Both appliances are restarted between the warm-up file and the measured one (ditto: the
    /// same stores, new processes; the other contenders keep no state to lose).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub restart: bool,
    /// Hub and spokes: site A is a hub with two spoke appliances on site B's side (two ditto
    /// processes in namespace B). The file first goes through spoke 1 (not measured), then the
    /// measured transfer through spoke 2, which never sent it itself. The other contenders have no
    /// second site to remember anything for: their measured transfer is a cold one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cross_peer: bool,
}

/// A WAN outage: every packet in both directions dropped for `secs`, starting `after_s` into the
/// measured transfer.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Outage {
    pub after_s: f64,
    pub secs: f64,
}

/// The contenders.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Contender {
    Plain,
    Ditto,
    Ssh,
    Zstd,
    Rsync,
}

impl Contender {
    pub fn name(self) -> &'static str {
        match self {
            Contender::Plain => "plain",
            Contender::Ditto => "ditto",
            Contender::Ssh => "ssh",
            Contender::Zstd => "zstd",
            Contender::Rsync => "rsync",
        }
    }
    /// Column heading.
    pub fn label(self) -> &'static str {
        match self {
            Contender::Plain => "plain TCP",
            Contender::Ditto => "ditto pair",
            Contender::Ssh => "ssh -C tunnel",
            Contender::Zstd => "zstd -3 pipe",
            Contender::Rsync => "rsync -z",
        }
    }
    fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "plain" => Contender::Plain,
            "ditto" => Contender::Ditto,
            "ssh" => Contender::Ssh,
            "zstd" => Contender::Zstd,
            "rsync" => Contender::Rsync,
            o => bail!("unknown contender {o:?} (plain, ditto, ssh, zstd, rsync)"),
        })
    }
}

/// How clients reach the ditto pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DittoMode {
    /// The client connects to site A's `[[forward]]` listener.
    Forward,
    /// The client connects to the server; site A's nftables `tproxy` rule diverts it.
    Tproxy,
    /// The client connects to the server; site A's nftables nat `redirect` rule diverts it.
    Redirect,
}

impl DittoMode {
    pub fn name(self) -> &'static str {
        match self {
            DittoMode::Forward => "forward",
            DittoMode::Tproxy => "tproxy",
            DittoMode::Redirect => "redirect",
        }
    }
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim() {
            "forward" => DittoMode::Forward,
            "tproxy" => DittoMode::Tproxy,
            "redirect" => DittoMode::Redirect,
            o => bail!("unknown ditto mode {o:?} (forward, tproxy, redirect)"),
        })
    }
    pub fn intercepts(self) -> bool {
        self != DittoMode::Forward
    }
}

/// The outcome of one scenario x contender.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct RunResult {
    pub scenario: String,
    pub contender: String,
    /// "ok", "n/a" (does not apply or not available) or "failed".
    pub status: String,
    pub note: String,
    pub payload_bytes: u64,
    pub exact: bool,
    pub wall_s: f64,
    pub goodput_mbps: f64,
    /// IP bytes the emulator carried (both directions) during the measured transfer.
    pub wan_bytes: u64,
    /// Of those, packets its bottleneck queue dropped (full), both directions: what the
    /// contender's congestion control overshot by.
    #[serde(default)]
    pub wan_queue_drops: u64,
    pub ttfb_ms: Option<f64>,
    /// Transfers of many connections: the 99th percentile of their first-byte times.
    #[serde(default)]
    pub ttfb_p99_ms: Option<f64>,
    pub rtt_p50_ms: Option<f64>,
    pub rtt_p90_ms: Option<f64>,
    /// Interactive only: median exchange time minus plain TCP's.
    pub added_latency_ms: Option<f64>,
    /// Client-side appliance (site A) or client-side tool.
    pub side_a: Option<Usage>,
    /// Server-side appliance (site B) or server-side daemon.
    pub side_b: Option<Usage>,
}

/// The whole run, as written to JSON.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunReport {
    pub date: String,
    pub started_unix: u64,
    pub machine: String,
    pub tools: Vec<String>,
    pub scenarios: Vec<Scenario>,
    pub results: Vec<RunResult>,
}

pub(crate) const SERVER_PORT: u16 = 5001;
const PROXY_PORT: u16 = 5000;

fn scenarios(args: &ScenarioArgs) -> Result<Vec<Scenario>> {
    let size = |s: &str| crate::units::parse_bytes(s);
    let sc = |name: &str, about: &str, rate: &str, rtt: &str, workload| Scenario {
        name: name.into(),
        about: about.into(),
        rate: rate.into(),
        rtt: rtt.into(),
        loss: None,
        client_rcvbuf: None,
        workload,
        outage: None,
        restart: false,
        cross_peer: false,
    };
    let mut legacy = sc(
        "legacy-window",
        "client with a 64 KiB receive buffer, incompressible data",
        "100mbit",
        "100ms",
        Workload::Rand {
            bytes: size(&args.bulk_size)?,
        },
    );
    legacy.client_rcvbuf = Some("64KiB".into());
    let long_fat = size(&args.long_fat_size)?;
    let long_fat_100m = sc(
        "long-fat-100m",
        "one stream of incompressible data on a long fat pipe, default buffers",
        "100mbit",
        "100ms",
        Workload::Rand { bytes: long_fat },
    );
    let long_fat_1g = sc(
        "long-fat-1g",
        "one stream of incompressible data on a long fat pipe, default buffers",
        "1gbit",
        "50ms",
        Workload::Rand {
            bytes: long_fat.saturating_mul(4),
        },
    );
    let mut lossy = sc(
        "lossy",
        "1% random loss each way, CUBIC, incompressible data",
        "50mbit",
        "100ms",
        Workload::Rand {
            bytes: size(&args.lossy_size)?,
        },
    );
    lossy.loss = Some("0.01".into());
    let outages = [10u32, 60, 300].map(|secs| {
        let mut o = sc(
            &format!("outage-{secs}s"),
            &format!(
                "download of incompressible data; the WAN drops everything for {secs} s, {} s into it",
                args.outage_after
            ),
            "20mbit",
            "80ms",
            Workload::Rand {
                bytes: size(&args.outage_size).unwrap_or(32 << 20),
            },
        );
        o.outage = Some(Outage {
            after_s: args.outage_after,
            secs: f64::from(secs),
        });
        o
    });
    let mut warm_restart = sc(
        "warm-restart",
        "TypeScript 5.4.5 npm tarball after 5.4.4 went through, both appliances restarted in between",
        "20mbit",
        "80ms",
        Workload::File {
            name: "src-v2.tar".into(),
            warm: Some("src-v1.tar".into()),
        },
    );
    warm_restart.restart = true;
    let mut cross_peer = sc(
        "cross-peer",
        "TypeScript 5.4.4 tarball sent to a hub by spoke 2 after spoke 1 sent it there",
        "20mbit",
        "80ms",
        Workload::File {
            name: "src-v1.tar".into(),
            warm: None,
        },
    );
    cross_peer.cross_peer = true;
    Ok(vec![
        legacy,
        long_fat_100m,
        long_fat_1g,
        lossy,
        warm_restart,
        cross_peer,
        sc(
            "warm-repeat",
            "TypeScript 5.4.5 npm tarball after 5.4.4 went through",
            "20mbit",
            "80ms",
            Workload::File {
                name: "src-v2.tar".into(),
                warm: Some("src-v1.tar".into()),
            },
        ),
        sc(
            "warm-repeat-db",
            "pg_dump after a pgbench batch, after the dump before it went through",
            "20mbit",
            "80ms",
            Workload::File {
                name: "db-v2.sql".into(),
                warm: Some("db-v1.sql".into()),
            },
        ),
        sc(
            "cold-compressible",
            "first transfer of the TypeScript 5.4.4 tarball (text-heavy)",
            "50mbit",
            "40ms",
            Workload::File {
                name: "src-v1.tar".into(),
                warm: None,
            },
        ),
        sc(
            "interactive",
            "100-byte requests, 1000-byte responses, one at a time",
            "20mbit",
            "80ms",
            Workload::Rr {
                count: args.rr_count,
                req: 100,
                resp: 1000,
            },
        ),
        sc(
            "many-flows",
            "concurrent connections, each downloading incompressible data",
            "100mbit",
            "40ms",
            Workload::Many {
                conns: args.flows,
                bytes_each: size(&args.flow_size)?,
            },
        ),
        sc(
            "no-link-limit",
            "no rate, delay or loss on the emulated link: the contenders' own ceiling",
            "none",
            "0ms",
            Workload::Rand {
                bytes: size(&args.nolimit_size)?,
            },
        ),
    ]
    .into_iter()
    .chain(outages)
    .collect())
}

/// Shared state of a run.
pub(crate) struct Ctx {
    pub(crate) topo: TopoGuard,
    pub(crate) bench: PathBuf,
    pub(crate) wanem: PathBuf,
    pub(crate) ditto: Option<PathBuf>,
    pub(crate) data: PathBuf,
    pub(crate) ditto_mode: DittoMode,
    /// Extra `[tunnel]` lines of both ditto sites.
    pub(crate) ditto_tunnel: String,
    /// CPUs of the appliances' processes (None: not pinned).
    pub(crate) appliance_cpus: Option<Vec<usize>>,
}

/// The processes of a started contender.
pub(crate) struct Running {
    pub(crate) target: String,
    side_a: Vec<(KillOnDrop, PathBuf)>,
    side_b: Vec<(KillOnDrop, PathBuf)>,
    /// Run after stopping (`ditto cleanup` for an intercepting site A).
    cleanup: Option<Command>,
}

impl Running {
    fn direct() -> Self {
        Running {
            target: format!("{}:{SERVER_PORT}", addr::SERVER),
            side_a: Vec::new(),
            side_b: Vec::new(),
            cleanup: None,
        }
    }

    /// Stops the processes (SIGTERM via the rusage wrappers) and collects their usage. The
    /// client side goes first, so that tunnels close from the client end and the server side
    /// can reap its per-connection children before it is stopped.
    pub(crate) fn stop(mut self) -> (Option<Usage>, Option<Usage>) {
        let collect = |procs: Vec<(KillOnDrop, PathBuf)>| -> Option<Usage> {
            if procs.is_empty() {
                return None;
            }
            let mut total = Usage::default();
            for (p, file) in procs {
                drop(p);
                match std::fs::read(&file)
                    .map_err(anyhow::Error::from)
                    .and_then(|b| Ok(serde_json::from_slice::<Usage>(&b)?))
                {
                    Ok(u) => {
                        total.user_s += u.user_s;
                        total.sys_s += u.sys_s;
                        total.max_rss_kib = total.max_rss_kib.max(u.max_rss_kib);
                    }
                    Err(e) => {
                        eprintln!("(no usage report {}: {e:#})", file.display());
                        return None;
                    }
                }
            }
            Some(total)
        };
        let a = collect(std::mem::take(&mut self.side_a));
        if let Some(mut c) = self.cleanup.take() {
            // ditto removes its rules when it stops; this only matters if it could not.
            let _ = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(std::time::Duration::from_millis(300));
        let b = collect(std::mem::take(&mut self.side_b));
        (a, b)
    }
}

/// Kills whatever still runs in the appliance namespaces (a contender that ignored SIGTERM),
/// so the next contender finds its ports free.
pub(crate) fn clear_sites(topo: &Topo) {
    for role in [Role::SiteA, Role::SiteB, Role::Client] {
        let out = Command::new("ip")
            .args(["netns", "pids", &topo.ns(role)])
            .stdin(Stdio::null())
            .output();
        if let Ok(out) = out {
            for pid in String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                eprint!("(killing leftover pid {pid} in {}) ", topo.ns(role));
                let _ = crate::sys::kill(pid, libc::SIGKILL);
            }
        }
    }
}

impl Ctx {
    pub(crate) fn dir(&self, sub: &str) -> Result<PathBuf> {
        let d = self.topo.state_dir().join(sub);
        std::fs::create_dir_all(&d)?;
        Ok(d)
    }

    /// Starts `program args` in `role` under the rusage wrapper.
    pub(crate) fn spawn_wrapped(
        &self,
        role: Role,
        tag: &str,
        program: &str,
        args: &[String],
    ) -> Result<(KillOnDrop, PathBuf)> {
        let dir = self.dir("usage")?;
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = dir.join(format!("{tag}-{n}.json"));
        let _ = std::fs::remove_file(&file);
        let log = std::fs::File::create(dir.join(format!("{tag}.log")))?;
        let mut cmd = self.topo.cmd(role, &self.bench);
        if let (Some(cpus), Role::SiteA | Role::SiteB) = (&self.appliance_cpus, role) {
            crate::sys::pin_child(&mut cmd, cpus.clone());
        }
        let child = cmd
            .arg("rusage")
            .arg("--out")
            .arg(&file)
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        Ok((KillOnDrop(child), file))
    }

    fn bench_str(&self) -> String {
        self.bench.to_string_lossy().into_owned()
    }
}

pub(crate) fn ditto_available(ditto: Option<&Path>) -> std::result::Result<PathBuf, String> {
    let Some(d) = ditto else {
        return Err("not available yet: ditto binary not built".into());
    };
    let ok = Command::new(d)
        .args(["run", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if ok {
        Ok(d.to_path_buf())
    } else {
        Err("not available yet: `ditto run` does not exist in this build".into())
    }
}

/// `ditto keygen --out OUT`: the fingerprint it printed.
pub(crate) fn keygen(ditto: &Path, out: &Path) -> Result<String> {
    let o = Command::new(ditto)
        .arg("keygen")
        .arg("--out")
        .arg(out)
        .stdin(Stdio::null())
        .output()?;
    if !o.status.success() {
        bail!(
            "ditto keygen: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&o.stdout);
    text.split(|c: char| !c.is_ascii_hexdigit())
        .rfind(|t| t.len() >= 32)
        .map(str::to_string)
        .context("ditto keygen printed no hex fingerprint")
}

/// The configuration files of a ditto pair.
pub(crate) struct DittoConfigs {
    pub(crate) a: PathBuf,
    pub(crate) b: PathBuf,
}

/// Writes keys and configurations of a fresh ditto pair under `<state>/ditto-<tag>` (fresh
/// stores, as long as `tag` is new). Site A serves the client in `mode`; site B is the far side
/// and needs nothing for interception. `watchdog` sets site A's `[intercept] watchdog`;
/// `forward_too` adds the `[[forward]]` listener to an intercepting site A.
pub(crate) fn ditto_configs(
    ctx: &Ctx,
    ditto: &Path,
    tag: &str,
    mode: DittoMode,
    watchdog: Option<&str>,
    forward_too: bool,
) -> Result<DittoConfigs> {
    let dir = ctx.dir(&format!("ditto-{tag}"))?;
    let fp_a = keygen(ditto, &dir.join("site-a"))?;
    let fp_b = keygen(ditto, &dir.join("site-b"))?;
    let conf = |me: &str, key: &str, listen: &str, peer: &str, peer_addr: &str, peer_fp: &str| {
        let store = dir.join(format!("store-{me}"));
        format!(
            "[node]\nname = \"{me}\"\nkey = \"{}\"\nadmin = \"127.0.0.1:9090\"\nstore_dir = \"{}\"\n\n\
             [tunnel]\nlisten = \"{listen}:7878\"\n{}\n\n[[peer]]\nname = \"{peer}\"\naddress = \"{peer_addr}:7878\"\n\
             fingerprint = \"{peer_fp}\"\n",
            dir.join(key).display(),
            store.display(),
            ctx.ditto_tunnel
        )
    };
    let mut a = conf(
        "site-a",
        "site-a.key",
        addr::A_WAN,
        "site-b",
        addr::B_WAN,
        &fp_b,
    );
    if mode.intercepts() {
        a += &format!(
            "\n[intercept]\nmode = \"{}\"\ninterfaces = [\"lan0\"]\nports = [{SERVER_PORT}]\n",
            mode.name()
        );
        if let Some(w) = watchdog {
            a += &format!("watchdog = \"{w}\"\n");
        }
        a += &format!(
            "\n[[route]]\ndest = [\"{}\"]\npeer = \"site-b\"\n",
            addr::SERVER_NET
        );
    }
    if !mode.intercepts() || forward_too {
        a += &format!(
            "\n[[forward]]\nlisten = \"{}:{PROXY_PORT}\"\npeer = \"site-b\"\ntarget = \"{}:{SERVER_PORT}\"\n",
            addr::A_LAN,
            addr::SERVER
        );
    }
    let b = conf(
        "site-b",
        "site-b.key",
        addr::B_WAN,
        "site-a",
        addr::A_WAN,
        &fp_a,
    );
    let c = DittoConfigs {
        a: dir.join("site-a.toml"),
        b: dir.join("site-b.toml"),
    };
    std::fs::write(&c.a, a)?;
    std::fs::write(&c.b, b)?;
    Ok(c)
}

/// Where the client connects in `mode`.
pub(crate) fn ditto_target(mode: DittoMode) -> String {
    if mode.intercepts() {
        format!("{}:{SERVER_PORT}", addr::SERVER)
    } else {
        format!("{}:{PROXY_PORT}", addr::A_LAN)
    }
}

/// Starts a fresh ditto pair (both under the rusage wrapper) and waits until it carries flows.
pub(crate) fn start_ditto(ctx: &Ctx, ditto: &Path, tag: &str, mode: DittoMode) -> Result<Running> {
    start_ditto_with(ctx, ditto, tag, mode, false)
}

/// [`start_ditto`]; with `via_forward`, an intercepting site A also has the `[[forward]]`
/// listener and the client uses that (the rules are installed but divert none of its flows).
pub(crate) fn start_ditto_with(
    ctx: &Ctx,
    ditto: &Path,
    tag: &str,
    mode: DittoMode,
    via_forward: bool,
) -> Result<Running> {
    let c = ditto_configs(ctx, ditto, tag, mode, None, via_forward)?;
    let d = ditto.to_string_lossy().into_owned();
    let b = ctx.spawn_wrapped(
        Role::SiteB,
        "ditto-b",
        &d,
        &["run".into(), "--config".into(), c.b.display().to_string()],
    )?;
    let a = ctx.spawn_wrapped(
        Role::SiteA,
        "ditto-a",
        &d,
        &["run".into(), "--config".into(), c.a.display().to_string()],
    )?;
    let mut cleanup = None;
    if mode.intercepts() {
        let mut cmd = ctx.topo.cmd(Role::SiteA, ditto);
        cmd.arg("cleanup").arg("--config").arg(&c.a);
        cleanup = Some(cmd);
    }
    let target = if via_forward {
        ditto_target(DittoMode::Forward)
    } else {
        ditto_target(mode)
    };
    let r = Running {
        target: target.clone(),
        side_a: vec![a],
        side_b: vec![b],
        cleanup,
    };
    // The forward listener opens before the tunnel is up, and a flow that finds no tunnel passes
    // through unaccelerated (by design): wait for the tunnel so the warm-up really warms the stores.
    // An intercepting site A must also have its rules in place (before that, connections to the
    // server simply go straight to it).
    wait_ditto_ready(ctx, ditto, Role::SiteA, mode, 15)?;
    if !mode.intercepts() || via_forward {
        wait_port_in(&ctx.topo, Role::Client, &ctx.bench, &target, 15)?;
    }
    Ok(r)
}

/// The forward listener of the hub (site A) for spoke 1; spoke 2's is [`PROXY_PORT`].
const SPOKE_ONE_PORT: u16 = 5002;
/// Admin endpoint of spoke 2 in namespace B (spoke 1's is the usual 9090).
const SPOKE_TWO_ADMIN: &str = "127.0.0.1:9091";

/// A hub (site A, client side) and two spokes (two ditto processes in namespace B, the server's
/// side), all on disk stores. The hub forwards [`SPOKE_ONE_PORT`] through spoke 1 and
/// [`PROXY_PORT`] (the measured target) through spoke 2.
fn start_ditto_hub(ctx: &Ctx, ditto: &Path, tag: &str) -> Result<Running> {
    let dir = ctx.dir(&format!("ditto-{tag}"))?;
    let fp_h = keygen(ditto, &dir.join("hub"))?;
    let fps = [
        keygen(ditto, &dir.join("spoke-1"))?,
        keygen(ditto, &dir.join("spoke-2"))?,
    ];
    let node = |me: &str, admin: &str| {
        format!(
            "[node]\nname = \"{me}\"\nkey = \"{}\"\nadmin = \"{admin}\"\nstore_dir = \"{}\"\n",
            dir.join(format!("{me}.key")).display(),
            dir.join(format!("store-{me}")).display()
        )
    };
    let mut hub =
        node("hub", "127.0.0.1:9090") + &format!("\n[tunnel]\nlisten = \"{}:7878\"\n", addr::A_WAN);
    for (i, (fp, port)) in fps.iter().zip([SPOKE_ONE_PORT, PROXY_PORT]).enumerate() {
        hub += &format!(
            "\n[[peer]]\nname = \"spoke-{n}\"\nfingerprint = \"{fp}\"\n\n[[forward]]\n\
             listen = \"{}:{port}\"\npeer = \"spoke-{n}\"\ntarget = \"{}:{SERVER_PORT}\"\n",
            addr::A_LAN,
            addr::SERVER,
            n = i + 1
        );
    }
    let spoke = |n: usize, admin: &str| {
        node(&format!("spoke-{n}"), admin)
            + &format!(
                "\n[[peer]]\nname = \"hub\"\naddress = \"{}:7878\"\nfingerprint = \"{fp_h}\"\n",
                addr::A_WAN
            )
    };
    let files = [
        (dir.join("hub.toml"), hub),
        (dir.join("spoke-1.toml"), spoke(1, "127.0.0.1:9090")),
        (dir.join("spoke-2.toml"), spoke(2, SPOKE_TWO_ADMIN)),
    ];
    for (f, text) in &files {
        std::fs::write(f, text)?;
    }
    let d = ditto.to_string_lossy().into_owned();
    let run = |f: &Path| vec!["run".into(), "--config".into(), f.display().to_string()];
    let h = ctx.spawn_wrapped(Role::SiteA, "ditto-hub", &d, &run(&files[0].0))?;
    let s1 = ctx.spawn_wrapped(Role::SiteB, "ditto-spoke-1", &d, &run(&files[1].0))?;
    let s2 = ctx.spawn_wrapped(Role::SiteB, "ditto-spoke-2", &d, &run(&files[2].0))?;
    let r = Running {
        target: format!("{}:{PROXY_PORT}", addr::A_LAN),
        side_a: vec![h],
        side_b: vec![s1, s2],
        cleanup: None,
    };
    wait_ditto_ready(ctx, ditto, Role::SiteA, DittoMode::Forward, 15)?;
    wait_port_in(&ctx.topo, Role::Client, &ctx.bench, &r.target, 15)?;
    Ok(r)
}

/// Spoke 2's status (its admin endpoint in namespace B).
fn spoke_two_status(ctx: &Ctx, ditto: &Path) -> Option<serde_json::Value> {
    let out = ctx
        .topo
        .cmd(Role::SiteB, ditto)
        .args(["status", "--admin", SPOKE_TWO_ADMIN, "--json"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// The cross-peer scenario's first leg: `file` through spoke 1 (not measured), then waits until
/// spoke 2 knows what the hub now holds (the hub's next summary).
fn spoke_one_first(ctx: &Ctx, sc: &Scenario, file: &str) -> Result<()> {
    let d = ditto_available(ctx.ditto.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    let known = || {
        spoke_two_status(ctx, &d)
            .and_then(|v| {
                let s = v.pointer("/peers/0/summary")?;
                Some((
                    s.get("known_chunks")?.as_u64()?,
                    s.get("in_sync")?.as_bool()?,
                ))
            })
            .unwrap_or((0, false))
    };
    let before = known().0;
    let target = format!("{}:{SPOKE_ONE_PORT}", addr::A_LAN);
    let f: FetchResult = run_json(
        &ctx.topo,
        Role::Client,
        &ctx.bench,
        &fetch_args(sc, &target, &ctx.data, Some(file)),
    )?;
    if !f.exact {
        bail!(
            "transfer of {file} through spoke 1 was not byte-exact: {:?}",
            f.errors
        );
    }
    // Chunks average about 4 KiB; a quarter of them is plenty to show the hub's summary arrived.
    let want = before + f.bytes / 16384;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let (n, sync) = known();
        if sync && n >= want {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("spoke 2 never learned what spoke 1 left at the hub ({n} chunks known)");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// Stops both ditto processes (SIGTERM) and starts them again on the same configs and stores,
/// then waits until the tunnel is up and site A knows site B's store again (its summaries are in
/// sync), as a transfer some minutes after a maintenance window would find it.
fn restart_ditto(ctx: &Ctx, tag: &str, running: &mut Running) -> Result<()> {
    let d = ditto_available(ctx.ditto.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
    let dir = ctx.dir(&format!("ditto-{tag}"))?;
    let target = running.target.clone();
    let _ = std::mem::replace(running, Running::direct()).stop();
    let ds = d.to_string_lossy().into_owned();
    let b = ctx.spawn_wrapped(
        Role::SiteB,
        "ditto-b",
        &ds,
        &[
            "run".into(),
            "--config".into(),
            dir.join("site-b.toml").display().to_string(),
        ],
    )?;
    let a = ctx.spawn_wrapped(
        Role::SiteA,
        "ditto-a",
        &ds,
        &[
            "run".into(),
            "--config".into(),
            dir.join("site-a.toml").display().to_string(),
        ],
    )?;
    let mut cleanup = None;
    if ctx.ditto_mode.intercepts() {
        let mut cmd = ctx.topo.cmd(Role::SiteA, &d);
        cmd.arg("cleanup")
            .arg("--config")
            .arg(dir.join("site-a.toml"));
        cleanup = Some(cmd);
    }
    *running = Running {
        target,
        side_a: vec![a],
        side_b: vec![b],
        cleanup,
    };
    wait_ditto_ready(ctx, &d, Role::SiteA, ctx.ditto_mode, 15)?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    // A build without summaries (no `summary` in its status) has nothing to wait for.
    let synced = || {
        ditto_status(ctx, &d, Role::SiteA).is_some_and(|v| match v.pointer("/peers/0/summary") {
            None | Some(serde_json::Value::Null) => v.pointer("/peers/0/up").is_some(),
            Some(s) => s.get("in_sync").and_then(|b| b.as_bool()) == Some(true),
        })
    };
    while !synced() {
        if std::time::Instant::now() > deadline {
            bail!("site A never learned site B's store again after the restart");
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    Ok(())
}

/// `ditto status --json` of the node in `role`.
pub(crate) fn ditto_status(ctx: &Ctx, ditto: &Path, role: Role) -> Option<serde_json::Value> {
    let out = ctx
        .topo
        .cmd(role, ditto)
        .args(["status", "--admin", "127.0.0.1:9090", "--json"])
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// Polls `ditto status` in `role` until every peer reports its tunnel up and, when `mode`
/// intercepts, the interception rules are installed.
pub(crate) fn wait_ditto_ready(
    ctx: &Ctx,
    ditto: &Path,
    role: Role,
    mode: DittoMode,
    secs: u64,
) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    loop {
        let up = ditto_status(ctx, ditto, role)
            .and_then(|v| {
                let peers = v.get("peers")?.as_array()?.clone();
                let tunnel = !peers.is_empty()
                    && peers
                        .iter()
                        .all(|p| p.get("up") == Some(&serde_json::Value::Bool(true)));
                let rules = !mode.intercepts()
                    || v.pointer("/intercept/rules_installed")
                        == Some(&serde_json::Value::Bool(true));
                Some(tunnel && rules)
            })
            .unwrap_or(false);
        if up {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "the ditto tunnel{} did not come up within {secs} s",
                if mode.intercepts() {
                    " (or the interception rules)"
                } else {
                    ""
                }
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn start_ssh(ctx: &Ctx, scenario: &str) -> Result<Running> {
    let dir = ctx.dir(&format!("ssh-{scenario}"))?;
    for k in ["hostkey", "userkey"] {
        let p = dir.join(k);
        let _ = std::fs::remove_file(&p);
        let _ = std::fs::remove_file(p.with_extension("pub"));
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&p)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .context("running ssh-keygen (is openssh-client installed?)")?;
        if !st.success() {
            bail!("ssh-keygen failed");
        }
    }
    std::fs::copy(dir.join("userkey.pub"), dir.join("authorized_keys"))?;
    std::fs::create_dir_all("/run/sshd")
        .context("creating /run/sshd (sshd's privilege separation dir)")?;
    let conf = dir.join("sshd_config");
    std::fs::write(
        &conf,
        format!(
            "Port 2222\nListenAddress {}\nHostKey {}\nAuthorizedKeysFile {}\nPidFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n\
             AllowTcpForwarding yes\nMaxStartups 100\nMaxSessions 100\n",
            addr::B_WAN,
            dir.join("hostkey").display(),
            dir.join("authorized_keys").display(),
            dir.join("sshd.pid").display()
        ),
    )?;
    let b = ctx.spawn_wrapped(
        Role::SiteB,
        "sshd",
        "/usr/sbin/sshd",
        &[
            "-D".into(),
            "-e".into(),
            "-f".into(),
            conf.display().to_string(),
        ],
    )?;
    let mut side_b = vec![b];
    wait_port_in(
        &ctx.topo,
        Role::SiteA,
        &ctx.bench,
        &format!("{}:2222", addr::B_WAN),
        10,
    )
    .context("sshd did not start (is openssh-server installed?)")?;
    let fwd = format!(
        "{}:{PROXY_PORT}:{}:{SERVER_PORT}",
        addr::A_LAN,
        addr::SERVER
    );
    let args: Vec<String> = [
        "-F",
        "/dev/null",
        "-C",
        "-N",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "LogLevel=ERROR",
        "-p",
        "2222",
        "-i",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        dir.join("userkey").display().to_string(),
        "-L".into(),
        fwd,
        format!("root@{}", addr::B_WAN),
    ])
    .collect();
    let a = ctx.spawn_wrapped(Role::SiteA, "ssh", "ssh", &args)?;
    let target = format!("{}:{PROXY_PORT}", addr::A_LAN);
    let r = Running {
        target: target.clone(),
        side_a: vec![a],
        side_b: std::mem::take(&mut side_b),
        cleanup: None,
    };
    wait_port_in(&ctx.topo, Role::Client, &ctx.bench, &target, 15)?;
    Ok(r)
}

fn start_zstd(ctx: &Ctx) -> Result<Running> {
    let bench = ctx.bench_str();
    let relay_b = format!("{}:6000", addr::B_WAN);
    let b = ctx.spawn_wrapped(
        Role::SiteB,
        "zrelay-b",
        &bench,
        &[
            "zrelay".into(),
            "--listen".into(),
            relay_b.clone(),
            "--connect".into(),
            format!("{}:{SERVER_PORT}", addr::SERVER),
            "--mode".into(),
            "compress".into(),
        ],
    )?;
    let target = format!("{}:{PROXY_PORT}", addr::A_LAN);
    let a = ctx.spawn_wrapped(
        Role::SiteA,
        "zrelay-a",
        &bench,
        &[
            "zrelay".into(),
            "--listen".into(),
            target.clone(),
            "--connect".into(),
            relay_b,
            "--mode".into(),
            "decompress".into(),
        ],
    )?;
    let r = Running {
        target: target.clone(),
        side_a: vec![a],
        side_b: vec![b],
        cleanup: None,
    };
    wait_port_in(&ctx.topo, Role::Client, &ctx.bench, &target, 10)?;
    Ok(r)
}

fn file_hash(p: &Path) -> Result<blake3::Hash> {
    let mut h = blake3::Hasher::new();
    let mut f = std::fs::File::open(p).with_context(|| format!("opening {}", p.display()))?;
    std::io::copy(&mut f, &mut h)?;
    Ok(h.finalize())
}

/// rsync pulls the file from an rsync daemon on the server into a directory on the client.
fn run_rsync(
    ctx: &Ctx,
    scenario: &str,
    name: &str,
    warm: Option<&str>,
    link: &Link,
) -> Result<RunResult> {
    let dir = ctx.dir(&format!("rsync-{scenario}"))?;
    let dest = dir.join("dest");
    let _ = std::fs::remove_dir_all(&dest);
    std::fs::create_dir_all(&dest)?;
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nlog file = {}\n[data]\npath = {}\nread only = yes\n",
            dir.join("rsyncd.log").display(),
            ctx.data.display()
        ),
    )?;
    let daemon = ctx.spawn_wrapped(
        Role::Server,
        "rsyncd",
        "rsync",
        &[
            "--daemon".into(),
            "--no-detach".into(),
            format!("--config={}", conf.display()),
            format!("--address={}", addr::SERVER),
            "--port=873".into(),
        ],
    )?;
    wait_port_in(
        &ctx.topo,
        Role::Client,
        &ctx.bench,
        &format!("{}:873", addr::SERVER),
        10,
    )?;
    let out = dest.join("data");
    let pull = |src: &str, usage: &Path| -> Result<f64> {
        let t0 = Instant::now();
        let st = ctx
            .topo
            .cmd(Role::Client, &ctx.bench)
            .arg("rusage")
            .arg("--out")
            .arg(usage)
            .args(["--", "rsync", "-a", "--compress", "--timeout=300"])
            .arg(format!("rsync://{}/data/{src}", addr::SERVER))
            .arg(&out)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()?;
        let u: Usage = serde_json::from_slice(&std::fs::read(usage)?)?;
        if !st.success() || u.exit_code != Some(0) {
            bail!("rsync exited with {:?}", u.exit_code);
        }
        Ok(t0.elapsed().as_secs_f64())
    };
    if let Some(w) = warm {
        pull(w, &dir.join("warm-usage.json"))?;
    }
    let before = link.fresh_stats()?;
    let usage_file = dir.join("usage.json");
    let wall = pull(name, &usage_file)?;
    let after = link.fresh_stats()?;
    let client: Usage = serde_json::from_slice(&std::fs::read(&usage_file)?)?;
    let (_, b) = Running {
        target: String::new(),
        side_a: Vec::new(),
        side_b: vec![daemon],
        cleanup: None,
    }
    .stop();
    let payload = std::fs::metadata(&out)?.len();
    let exact = file_hash(&out)? == file_hash(&ctx.data.join(name))?;
    Ok(RunResult {
        status: "ok".into(),
        payload_bytes: payload,
        exact,
        wall_s: wall,
        goodput_mbps: payload as f64 * 8.0 / wall / 1e6,
        wan_bytes: after.wan_bytes().saturating_sub(before.wan_bytes()),
        side_a: Some(client),
        side_b: b,
        note: "pull from rsync daemon; wall time includes rsync's file-list exchange".into(),
        ..Default::default()
    })
}

/// A transfer may take at most 10x its time at the link rate (30 s at least, 600 s at most).
fn timeout_s(sc: &Scenario, bytes: u64) -> u64 {
    let rate = crate::units::parse_rate(&sc.rate)
        .unwrap_or(0)
        .max(1_000_000);
    // After an outage, plain TCP waits for its next retransmission (backed off up to 120 s).
    let outage = sc
        .outage
        .as_ref()
        .map_or(0, |o| (o.after_s + o.secs) as u64 + 150);
    (30 + 10 * bytes * 8 / rate).min(600) + outage
}

fn fetch_args(sc: &Scenario, target: &str, data: &Path, file: Option<&str>) -> Vec<String> {
    let bytes = match (&sc.workload, file) {
        (_, Some(f)) => std::fs::metadata(data.join(f))
            .map(|m| m.len())
            .unwrap_or(1 << 30),
        (Workload::Rand { bytes }, None) => *bytes,
        (Workload::Many { conns, bytes_each }, None) => *conns as u64 * bytes_each,
        _ => 0,
    };
    let mut v: Vec<String> = vec![
        "fetch".into(),
        "--connect".into(),
        target.into(),
        "--timeout-s".into(),
        timeout_s(sc, bytes).to_string(),
    ];
    if let Some(b) = &sc.client_rcvbuf {
        v.extend(["--rcvbuf".into(), b.clone()]);
    }
    match (&sc.workload, file) {
        (_, Some(f)) => v.extend([
            "--file".into(),
            f.into(),
            "--dir".into(),
            data.display().to_string(),
        ]),
        (Workload::Rand { bytes }, None) => v.extend(["--rand".into(), bytes.to_string()]),
        (Workload::Many { conns, bytes_each }, None) => v.extend([
            "--rand".into(),
            bytes_each.to_string(),
            "--conns".into(),
            conns.to_string(),
        ]),
        _ => {}
    }
    v
}

fn not_applicable(sc: &Scenario, c: Contender) -> Option<String> {
    match (c, &sc.workload) {
        (Contender::Rsync, Workload::File { .. }) => None,
        (Contender::Rsync, _) => Some("rsync copies files; this scenario is a stream".into()),
        (Contender::Zstd, Workload::Rr { .. }) => {
            Some("a zstd pipe only flushes at end of stream, so request/response stalls".into())
        }
        (Contender::Zstd, Workload::Many { conns, .. }) if *conns > 100 => {
            Some(format!("the pipe needs two zstd processes per connection; {conns} connections would exhaust memory"))
        }
        _ => None,
    }
}

fn run_one(ctx: &Ctx, sc: &Scenario, c: Contender) -> Result<RunResult> {
    let spec = LinkSpec {
        rate: Some(sc.rate.clone()),
        rtt: Some(sc.rtt.clone()),
        loss: sc.loss.clone(),
        ..Default::default()
    };
    let link = ctx.topo.start_link(&ctx.wanem, &spec.to_args()?)?;
    let _server = start_server(&ctx.topo, &ctx.bench, SERVER_PORT, Some(&ctx.data))?;
    if c == Contender::Rsync {
        if let Workload::File { name, warm } = &sc.workload {
            return run_rsync(ctx, &sc.name, name, warm.as_deref(), &link);
        }
    }
    let mut running = match c {
        Contender::Plain | Contender::Rsync => Running::direct(),
        Contender::Ditto if sc.cross_peer => {
            let d = ditto_available(ctx.ditto.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
            start_ditto_hub(ctx, &d, &sc.name)?
        }
        Contender::Ditto => {
            let d = ditto_available(ctx.ditto.as_deref()).map_err(|e| anyhow::anyhow!(e))?;
            start_ditto(ctx, &d, &sc.name, ctx.ditto_mode)?
        }
        Contender::Ssh => start_ssh(ctx, &sc.name)?,
        Contender::Zstd => start_zstd(ctx)?,
    };
    // A tunnel (ditto's, ssh's) is long-lived in real use: its TCP connections have left slow start
    // long before a given transfer. Warm them with unrelated random bytes (another seed, so nothing of
    // the measured data is cached) before measuring.
    if matches!(c, Contender::Ditto | Contender::Ssh) {
        let warm: FetchResult = run_json(
            &ctx.topo,
            Role::Client,
            &ctx.bench,
            &[
                "fetch".into(),
                "--connect".into(),
                running.target.clone(),
                "--timeout-s".into(),
                "120".into(),
                "--rand".into(),
                "8MiB".into(),
                "--seed".into(),
                "987654321".into(),
            ],
        )?;
        if !warm.exact {
            bail!(
                "tunnel warm-up transfer was not byte-exact: {:?}",
                warm.errors
            );
        }
    }
    let mut r = RunResult {
        status: "ok".into(),
        ..Default::default()
    };
    let measured = (|| -> Result<()> {
        match &sc.workload {
            Workload::Rr { count, req, resp } => {
                let before = link.fresh_stats()?;
                let rr: RrResult = run_json(
                    &ctx.topo,
                    Role::Client,
                    &ctx.bench,
                    &[
                        "rr".into(),
                        "--connect".into(),
                        running.target.clone(),
                        "--count".into(),
                        count.to_string(),
                        "--req".into(),
                        req.to_string(),
                        "--resp".into(),
                        resp.to_string(),
                    ],
                )?;
                let after = link.fresh_stats()?;
                r.wan_bytes = after.wan_bytes().saturating_sub(before.wan_bytes());
                r.wan_queue_drops = (after.ab.drop_queue_packets + after.ba.drop_queue_packets)
                    .saturating_sub(before.ab.drop_queue_packets + before.ba.drop_queue_packets);
                r.exact = true;
                r.payload_bytes = (*count * (req + resp)) as u64;
                r.ttfb_ms = Some(rr.ttfb_ms);
                r.rtt_p50_ms = Some(rr.rtt_p50_ms);
                r.rtt_p90_ms = Some(rr.rtt_p90_ms);
                r.wall_s = rr.ttfb_ms / 1e3 + rr.rtt_p50_ms * (*count as f64 - 1.0) / 1e3;
                r.note = format!("{count} exchanges of {req} B / {resp} B on one connection");
            }
            _ => {
                let file = match &sc.workload {
                    Workload::File { name, warm } => {
                        if let Some(w) = warm {
                            let f: FetchResult = run_json(
                                &ctx.topo,
                                Role::Client,
                                &ctx.bench,
                                &fetch_args(sc, &running.target, &ctx.data, Some(w)),
                            )?;
                            if !f.exact {
                                bail!("warm-up transfer of {w} was not byte-exact: {:?}", f.errors);
                            }
                            if sc.restart && c == Contender::Ditto {
                                restart_ditto(ctx, &sc.name, &mut running)?;
                                r.note = "both appliances restarted after the warm-up".into();
                            }
                        }
                        if sc.cross_peer && c == Contender::Ditto {
                            spoke_one_first(ctx, sc, name)?;
                            r.note =
                                "through spoke 2, after spoke 1 sent the file to the hub".into();
                        }
                        Some(name.as_str())
                    }
                    _ => None,
                };
                let before = link.fresh_stats()?;
                let f: FetchResult = std::thread::scope(|scope| {
                    let outage = sc.outage.as_ref().map(|o| {
                        let link = &link;
                        scope.spawn(move || outage_during(link, o))
                    });
                    let f = run_json(
                        &ctx.topo,
                        Role::Client,
                        &ctx.bench,
                        &fetch_args(sc, &running.target, &ctx.data, file),
                    );
                    if let Some(h) = outage {
                        match h.join() {
                            Ok(Ok(())) => {}
                            Ok(Err(e)) => return Err(e),
                            Err(_) => bail!("outage thread panicked"),
                        }
                    }
                    f
                })?;
                let after = link.fresh_stats()?;
                r.wan_bytes = after.wan_bytes().saturating_sub(before.wan_bytes());
                r.wan_queue_drops = (after.ab.drop_queue_packets + after.ba.drop_queue_packets)
                    .saturating_sub(before.ab.drop_queue_packets + before.ba.drop_queue_packets);
                r.payload_bytes = f.bytes;
                r.exact = f.exact;
                r.wall_s = f.secs;
                r.goodput_mbps = f.goodput_mbps;
                r.ttfb_ms = f.ttfb_s.map(|t| t * 1e3);
                if f.conns > 1 {
                    r.ttfb_p99_ms = f.ttfb_p99_s.map(|t| t * 1e3);
                }
                if !f.errors.is_empty() {
                    r.note = format!(
                        "{} of {} connections failed: {}",
                        f.conns - f.ok_conns,
                        f.conns,
                        f.errors.join("; ")
                    );
                }
                if !f.exact {
                    r.status = "failed".into();
                    if r.note.is_empty() {
                        r.note = "received bytes differ from the source".into();
                    }
                }
                if let Some(o) = &sc.outage {
                    let dropped = (after.ab.drop_outage_packets + after.ba.drop_outage_packets)
                        .saturating_sub(
                            before.ab.drop_outage_packets + before.ba.drop_outage_packets,
                        );
                    let end = if r.status == "ok" {
                        "completed"
                    } else {
                        "failed"
                    };
                    r.note = format!(
                        "link down {:.0}-{:.0} s ({dropped} packets dropped); {end} after {:.1} s{}{}",
                        o.after_s,
                        o.after_s + o.secs,
                        f.secs,
                        if r.note.is_empty() { "" } else { ": " },
                        r.note
                    );
                }
            }
        }
        Ok(())
    })();
    let (a, b) = running.stop();
    clear_sites(&ctx.topo);
    r.side_a = a;
    r.side_b = b;
    measured?;
    Ok(r)
}

/// Takes the link down `after_s` into the transfer, and back up `secs` later.
fn outage_during(link: &Link, o: &Outage) -> Result<()> {
    std::thread::sleep(std::time::Duration::from_secs_f64(o.after_s));
    link.set_down(true)?;
    std::thread::sleep(std::time::Duration::from_secs_f64(o.secs));
    link.set_down(false)
}

pub(crate) fn civil_date(unix: u64) -> String {
    // Days since 1970-01-01 to (y, m, d), proleptic Gregorian.
    let z = (unix / 86_400) as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

pub(crate) fn tool_versions() -> Vec<String> {
    let first_line = |prog: &str, args: &[&str]| -> Option<String> {
        let o = Command::new(prog)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .ok()?;
        let text = if o.stdout.is_empty() {
            o.stderr
        } else {
            o.stdout
        };
        String::from_utf8_lossy(&text)
            .lines()
            .next()
            .map(|l| l.trim().to_string())
    };
    [
        ("ssh", &["-V"][..]),
        ("zstd", &["--version"][..]),
        ("rsync", &["--version"][..]),
        ("uname", &["-r"][..]),
    ]
    .iter()
    .filter_map(|(p, a)| first_line(p, a).map(|l| format!("{p}: {l}")))
    .collect()
}

/// Runs the selected scenarios and writes the reports.
pub fn run(args: &ScenarioArgs) -> Result<()> {
    if !crate::sys::is_root() {
        bail!("the scenarios need root (network namespaces, TUN devices)");
    }
    let all = scenarios(args)?;
    let selected: Vec<Scenario> = if args.names.is_empty() {
        all.into_iter().filter(|s| s.outage.is_none()).collect()
    } else {
        let mut v = Vec::new();
        for n in &args.names {
            if n == "outages" {
                v.extend(all.iter().filter(|s| s.outage.is_some()).cloned());
                continue;
            }
            match all.iter().find(|s| &s.name == n) {
                Some(s) => v.push(s.clone()),
                None => bail!(
                    "unknown scenario {n:?}; known: {}",
                    all.iter()
                        .map(|s| s.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }
        }
        v
    };
    let contenders: Vec<Contender> = args
        .contenders
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Contender::parse)
        .collect::<Result<_>>()?;
    let data = match &args.data_dir {
        Some(d) => d.clone(),
        None => match std::env::var_os("DITTO_DATA") {
            Some(d) => PathBuf::from(d),
            None => PathBuf::from(std::env::var_os("HOME").context("HOME is not set")?)
                .join(".cache/ditto-bench"),
        },
    };
    for s in &selected {
        if let Workload::File { name, warm } = &s.workload {
            for f in std::iter::once(name).chain(warm.iter()) {
                if !data.join(f).is_file() {
                    bail!(
                        "dataset {} missing: run bench/scripts/datasets.sh first",
                        data.join(f).display()
                    );
                }
            }
        }
    }
    let bench = std::env::current_exe()?;
    let wanem = sibling_binary("ditto-wanem")?;
    let ditto = match &args.ditto {
        Some(p) => Some(p.clone()),
        None => sibling_binary("ditto").ok(),
    };
    let out_dir = args
        .out_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("results"));
    let topo = match &args.prefix {
        Some(p) => Topo::new(p)?,
        None => Topo::unique("dsc")?,
    };
    Topo::reap_stale(&["dsc", "dlt", "dts"]);
    let all_cpus = crate::sys::allowed_cpus().context("reading this process's CPUs")?;
    let mut layout = String::new();
    let appliance_cpus = match &args.appliance_cpus {
        None => None,
        Some(list) => {
            let mine = crate::sys::parse_cpu_list(list).map_err(anyhow::Error::msg)?;
            if let Some(c) = mine.iter().find(|c| !all_cpus.contains(c)) {
                bail!("--appliance-cpus: CPU {c} is not one this process may use ({all_cpus:?})");
            }
            let world: Vec<usize> = all_cpus
                .iter()
                .copied()
                .filter(|c| !mine.contains(c))
                .collect();
            if world.is_empty() {
                bail!("--appliance-cpus leaves no CPU for the clients, servers and the link");
            }
            // Before the emulator and any endpoint starts: they inherit it.
            crate::sys::set_cpus(&world).context("pinning the bench to the other CPUs")?;
            layout = format!("; appliances on CPUs {mine:?}, endpoints and the link on {world:?}");
            Some(mine)
        }
    };
    let ctx = Ctx {
        topo: TopoGuard(topo),
        bench,
        wanem,
        ditto,
        data,
        ditto_mode: DittoMode::parse(&args.ditto_mode)?,
        ditto_tunnel: args.ditto_tunnel.replace("\\n", "\n"),
        appliance_cpus,
    };
    ctx.topo.up()?;
    let started = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let total = selected.len() * contenders.len();
    let mut results = Vec::new();
    let mut i = 0;
    let t_all = Instant::now();
    for sc in &selected {
        let mut plain_rtt = None;
        for &c in &contenders {
            i += 1;
            eprint!("[{i}/{total}] {} / {} ... ", sc.name, c.label());
            let t0 = Instant::now();
            let mut r = if let Some(why) = not_applicable(sc, c) {
                RunResult {
                    status: "n/a".into(),
                    note: why,
                    ..Default::default()
                }
            } else if c == Contender::Ditto && ditto_available(ctx.ditto.as_deref()).is_err() {
                RunResult {
                    status: "n/a".into(),
                    note: ditto_available(ctx.ditto.as_deref())
                        .err()
                        .unwrap_or_default(),
                    ..Default::default()
                }
            } else {
                match run_one(&ctx, sc, c) {
                    Ok(r) => r,
                    Err(e) => RunResult {
                        status: "failed".into(),
                        note: format!("{e:#}"),
                        ..Default::default()
                    },
                }
            };
            r.scenario = sc.name.clone();
            r.contender = c.name().into();
            if c == Contender::Ditto && ctx.ditto_mode.intercepts() && r.status != "n/a" {
                r.note = format!("{} mode; {}", ctx.ditto_mode.name(), r.note)
                    .trim_end_matches("; ")
                    .to_string();
            }
            if let Some(p50) = r.rtt_p50_ms {
                if c == Contender::Plain {
                    plain_rtt = Some(p50);
                }
                r.added_latency_ms = plain_rtt.map(|p| p50 - p);
            }
            match r.status.as_str() {
                "ok" if r.rtt_p50_ms.is_some() => eprintln!(
                    "median exchange {:.1} ms, first byte {:.1} ms, WAN {} B ({:.1} s)",
                    r.rtt_p50_ms.unwrap_or(0.0),
                    r.ttfb_ms.unwrap_or(0.0),
                    r.wan_bytes,
                    t0.elapsed().as_secs_f64()
                ),
                "ok" => eprintln!(
                    "{:.1} Mbit/s, {:.2} s, WAN {:.2} MB ({} packets dropped at the queue) for {:.2} MB{}{} ({:.1} s)",
                    r.goodput_mbps,
                    r.wall_s,
                    r.wan_bytes as f64 / 1e6,
                    r.wan_queue_drops,
                    r.payload_bytes as f64 / 1e6,
                    if r.exact { "" } else { " NOT EXACT" },
                    match (r.ttfb_ms, r.ttfb_p99_ms) {
                        (Some(m), Some(p)) => format!(", first byte p50 {m:.0} ms, p99 {p:.0} ms"),
                        _ => String::new(),
                    },
                    t0.elapsed().as_secs_f64()
                ),
                s => eprintln!("{s}: {}", r.note),
            }
            results.push(r);
        }
    }
    eprintln!("all done in {:.0} s", t_all.elapsed().as_secs_f64());
    let report = RunReport {
        date: civil_date(started),
        started_unix: started,
        machine: format!(
            "{} cores, {}{layout}",
            all_cpus.len(),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
        ),
        tools: tool_versions(),
        scenarios: selected,
        results,
    };
    drop(ctx);
    let files = report::write(&report, &out_dir)?;
    for f in files {
        eprintln!("wrote {}", f.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(951_782_400), "2000-02-29");
        assert_eq!(civil_date(1_700_000_000), "2023-11-14");
    }

    #[test]
    fn contender_names_round_trip() {
        for c in [
            Contender::Plain,
            Contender::Ditto,
            Contender::Ssh,
            Contender::Zstd,
            Contender::Rsync,
        ] {
            assert_eq!(Contender::parse(c.name()).ok(), Some(c));
        }
        assert!(Contender::parse("scp").is_err());
    }
}
