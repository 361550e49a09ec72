//! `ditto-bench linktest`: builds a throw-away topology, runs the emulator with the given link,
//! measures RTT (request/response probe) and one bulk TCP download, and reports them together
//! with the emulator's counters. Used by the smoke test and to measure the emulator itself.

use crate::topo::{addr, LinkSpec, Role, Topo, TopoGuard};
use crate::traffic::{FetchResult, RrResult, UdpResult};
use crate::wanem::StatsReport;
use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::Duration;

/// Options of `linktest`.
#[derive(Args, Debug, Clone)]
pub struct LinktestArgs {
    /// Bottleneck rate ("20mbit", "1gbit", "none").
    #[arg(long, default_value = "20mbit")]
    pub rate: String,
    /// Round-trip time (split evenly into two one-way delays).
    #[arg(long, default_value = "20ms")]
    pub rtt: String,
    /// Random loss per direction.
    #[arg(long)]
    pub loss: Option<String>,
    /// Queue limit per direction.
    #[arg(long)]
    pub queue: Option<String>,
    /// Bytes to download from server to client.
    #[arg(long, default_value = "4MiB")]
    pub size: String,
    /// Instead of a TCP download, offer UDP at this IP-level rate from server to client for
    /// --udp-secs and report the delivered rate (tests the emulator's capacity).
    #[arg(long)]
    pub udp_rate: Option<String>,
    /// Duration of the UDP test.
    #[arg(long, default_value_t = 5.0)]
    pub udp_secs: f64,
    /// Request/response round trips for the RTT probe.
    #[arg(long, default_value_t = 10)]
    pub probes: usize,
    /// Namespace prefix (default: unique).
    #[arg(long)]
    pub prefix: Option<String>,
    /// Extra emulator argument, e.g. --wanem-arg=--spin-us=50 (repeatable).
    #[arg(long, allow_hyphen_values = true)]
    pub wanem_arg: Vec<String>,
    /// Path of the ditto-bench binary run inside the namespaces (default: this executable).
    #[arg(long)]
    pub bench: Option<PathBuf>,
    /// Path of the ditto-wanem binary (default: next to this one).
    #[arg(long)]
    pub wanem: Option<PathBuf>,
}

/// What `linktest` reports.
#[derive(Debug, Serialize)]
pub struct LinktestReport {
    pub rate: String,
    pub rtt: String,
    pub size_bytes: u64,
    pub rr: RrResult,
    pub fetch: Option<FetchResult>,
    pub udp_sent: Option<UdpResult>,
    pub udp_received: Option<UdpResult>,
    pub emulator: StatsReport,
}

/// The sibling binary `name` next to the current executable (or in its parent, for test binaries
/// under target/*/deps).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("locating current executable")?;
    let dir = exe.parent().context("executable has no directory")?;
    for d in [Some(dir), dir.parent()].into_iter().flatten() {
        let p = d.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("{name} not found next to {}", exe.display())
}

/// A child process that is killed (SIGTERM, then SIGKILL) when dropped.
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = crate::sys::kill(self.0.id(), libc::SIGTERM);
        for _ in 0..300 {
            if matches!(self.0.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a tool subcommand of `bench` inside a namespace and parses its JSON stdout.
pub fn run_json<T: serde::de::DeserializeOwned>(
    topo: &Topo,
    role: Role,
    bench: &Path,
    args: &[String],
) -> Result<T> {
    let out = topo
        .cmd(role, bench)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {} {}", bench.display(), args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout)
        .with_context(|| format!("parsing output of {}", args.join(" ")))
}

/// Starts `bench serve` in the server namespace and waits until it accepts connections.
pub fn start_server(
    topo: &Topo,
    bench: &Path,
    port: u16,
    dir: Option<&Path>,
) -> Result<KillOnDrop> {
    let listen = format!("{}:{port}", addr::SERVER);
    let mut cmd = topo.cmd(Role::Server, bench);
    cmd.args(["serve", "--listen", &listen])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(d) = dir {
        cmd.arg("--dir").arg(d);
    }
    let child = KillOnDrop(cmd.spawn().context("starting server")?);
    wait_port_in(topo, Role::Server, bench, &listen, 10)?;
    Ok(child)
}

/// Waits (from inside namespace `role`) until `target` accepts TCP connections.
pub fn wait_port_in(topo: &Topo, role: Role, bench: &Path, target: &str, secs: u64) -> Result<()> {
    let st = topo
        .cmd(role, bench)
        .args([
            "wait-port",
            "--addr",
            target,
            "--timeout-s",
            &secs.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .status()
        .context("running wait-port")?;
    if !st.success() {
        bail!("{target} did not start listening within {secs} s");
    }
    Ok(())
}

/// Runs the link test on a fresh topology.
pub fn run(args: &LinktestArgs) -> Result<LinktestReport> {
    let bench = match &args.bench {
        Some(p) => p.clone(),
        None => std::env::current_exe().context("locating ditto-bench")?,
    };
    let wanem = match &args.wanem {
        Some(p) => p.clone(),
        None => sibling_binary("ditto-wanem")?,
    };
    let size = crate::units::parse_bytes(&args.size)?;
    let topo = match &args.prefix {
        Some(p) => Topo::new(p)?,
        None => Topo::unique("dlt")?,
    };
    Topo::reap_stale(&["dlt"]);
    let guard = TopoGuard(topo);
    guard.up()?;
    let spec = LinkSpec {
        rate: Some(args.rate.clone()),
        rtt: Some(args.rtt.clone()),
        loss: args.loss.clone(),
        queue: args.queue.clone(),
        ..Default::default()
    };
    let mut link_args = spec.to_args()?;
    link_args.extend(args.wanem_arg.iter().cloned());
    let link = guard.start_link(&wanem, &link_args)?;
    let _server = start_server(&guard, &bench, 5001, None)?;
    let target = format!("{}:5001", addr::SERVER);
    let rr: RrResult = run_json(
        &guard,
        Role::Client,
        &bench,
        &[
            "rr".into(),
            "--connect".into(),
            target.clone(),
            "--count".into(),
            args.probes.to_string(),
        ],
    )?;
    let (mut fetch, mut udp_sent, mut udp_received) = (None, None, None);
    if let Some(udp_rate) = &args.udp_rate {
        let (s, r) = udp_test(&guard, &bench, udp_rate, args.udp_secs)?;
        udp_sent = Some(s);
        udp_received = Some(r);
    } else {
        fetch = Some(run_json(
            &guard,
            Role::Client,
            &bench,
            &[
                "fetch".into(),
                "--connect".into(),
                target,
                "--rand".into(),
                size.to_string(),
            ],
        )?);
    }
    let emulator = link.stop()?;
    drop(guard);
    Ok(LinktestReport {
        rate: args.rate.clone(),
        rtt: args.rtt.clone(),
        size_bytes: size,
        rr,
        fetch,
        udp_sent,
        udp_received,
        emulator,
    })
}

fn udp_test(topo: &Topo, bench: &Path, rate: &str, secs: f64) -> Result<(UdpResult, UdpResult)> {
    let sink_addr = format!("{}:5002", addr::CLIENT);
    let mut sink = topo
        .cmd(Role::Client, bench)
        .args([
            "udp-sink",
            "--addr",
            &sink_addr,
            "--secs",
            &secs.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting udp-sink")?;
    let mut out = std::io::BufReader::new(sink.stdout.take().context("no stdout")?);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line)?;
    let mut sink = KillOnDrop(sink);
    let sent: UdpResult = run_json(
        topo,
        Role::Server,
        bench,
        &[
            "udp-blast".into(),
            "--addr".into(),
            sink_addr,
            "--rate".into(),
            rate.into(),
            "--secs".into(),
            secs.to_string(),
        ],
    )?;
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut out, &mut rest)?;
    let _ = sink.0.wait();
    let received: UdpResult = serde_json::from_str(&rest).context("parsing udp-sink output")?;
    Ok((sent, received))
}
