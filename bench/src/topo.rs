//! The benchmark topology, built from network namespaces that carry a unique prefix:
//!
//! ```text
//!  PFX-client        PFX-a             PFX-wan            PFX-b           PFX-server
//!  eth0 10.77.1.2 -- lan0 10.77.1.1                       lan0 10.77.2.1 -- eth0 10.77.2.2
//!                    wan0 10.77.0.1 <== ditto-wanem ==> wan0 10.77.0.2
//! ```
//!
//! The two `wan0` devices are the emulator's TUN devices: the emulator runs inside `PFX-wan`,
//! creates them there and moves them into `PFX-a` and `PFX-b`. All addresses exist only inside
//! these namespaces. `down` is idempotent and also cleans up after a crashed run.

use crate::wanem::StatsReport;
use crate::{sys, units};
use anyhow::{bail, Context, Result};
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The five namespaces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    SiteA,
    Wan,
    SiteB,
    Server,
}

impl Role {
    pub const ALL: [Role; 5] = [
        Role::Client,
        Role::SiteA,
        Role::Wan,
        Role::SiteB,
        Role::Server,
    ];
    fn suffix(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::SiteA => "a",
            Role::Wan => "wan",
            Role::SiteB => "b",
            Role::Server => "server",
        }
    }
}

/// Addresses of the topology (the same in every instance: namespaces isolate them).
pub mod addr {
    pub const CLIENT: &str = "10.77.1.2";
    pub const A_LAN: &str = "10.77.1.1";
    pub const A_WAN: &str = "10.77.0.1";
    pub const B_WAN: &str = "10.77.0.2";
    pub const B_LAN: &str = "10.77.2.1";
    pub const SERVER: &str = "10.77.2.2";
    pub const CLIENT_NET: &str = "10.77.1.0/24";
    pub const SERVER_NET: &str = "10.77.2.0/24";
}

/// One instance of the topology.
#[derive(Clone, Debug)]
pub struct Topo {
    prefix: String,
}

/// Runs a command to completion; its stdout, or an error with its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{:?} failed: {}",
            cmd,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn ip(args: &[&str]) -> Result<String> {
    run(Command::new("ip").args(args))
}

impl Topo {
    /// A topology with the given prefix (letters, digits, '-', '_'; at most 32 characters).
    pub fn new(prefix: &str) -> Result<Self> {
        if prefix.is_empty()
            || prefix.len() > 32
            || !prefix
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!("bad prefix {prefix:?}: use 1-32 letters, digits, '-' or '_'");
        }
        Ok(Topo {
            prefix: prefix.to_string(),
        })
    }

    /// A topology with a prefix unique to this process and call: `TAG` + pid + time + counter.
    pub fn unique(tag: &str) -> Result<Self> {
        static N: AtomicU32 = AtomicU32::new(0);
        let t = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0)
            % 1_000_000_000;
        let n = N.fetch_add(1, Ordering::Relaxed);
        Topo::new(&format!("{tag}{}x{t}x{n}", std::process::id()))
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Tears down leftovers of crashed runs: topologies whose prefix was made by [`Topo::unique`]
    /// (`TAG<pid>x<time>x<n>`) for one of `tags`, by a process that no longer exists.
    pub fn reap_stale(tags: &[&str]) {
        let Ok(entries) = std::fs::read_dir("/run/netns") else {
            return;
        };
        let mut prefixes = std::collections::BTreeSet::new();
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some((prefix, _)) = name.rsplit_once('-') else {
                continue;
            };
            for tag in tags {
                let Some(rest) = prefix.strip_prefix(tag) else {
                    continue;
                };
                let mut parts = rest.split('x');
                let pid = parts.next().and_then(|p| p.parse::<u32>().ok());
                if let (Some(pid), 2) = (pid, parts.filter(|p| p.parse::<u64>().is_ok()).count()) {
                    if !Path::new(&format!("/proc/{pid}")).exists() {
                        prefixes.insert(prefix.to_string());
                    }
                }
            }
        }
        for p in prefixes {
            if let Ok(t) = Topo::new(&p) {
                eprintln!("ditto-bench: removing leftover topology {p} of a finished process");
                let _ = t.down();
            }
        }
    }

    /// The namespace name of a role.
    pub fn ns(&self, role: Role) -> String {
        format!("{}-{}", self.prefix, role.suffix())
    }

    /// Scratch directory for this instance (stats files, logs, keys); removed by `down`.
    pub fn state_dir(&self) -> PathBuf {
        std::env::temp_dir().join(format!("ditto-bench-{}", self.prefix))
    }

    /// A command that runs `program` inside the namespace of `role`.
    pub fn cmd(&self, role: Role, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.arg("netns").arg("exec").arg(self.ns(role)).arg(program);
        c
    }

    fn exists(&self, role: Role) -> bool {
        Path::new("/run/netns").join(self.ns(role)).exists()
    }

    /// Builds the topology (tearing down any leftover of the same prefix first).
    pub fn up(&self) -> Result<()> {
        if !sys::is_root() {
            bail!("building namespaces needs root");
        }
        self.down().context("cleaning up a previous instance")?;
        let res = self.build();
        if res.is_err() {
            let _ = self.down();
        }
        res
    }

    fn build(&self) -> Result<()> {
        std::fs::create_dir_all(self.state_dir())?;
        allow_congestion_control("cubic")?;
        for r in Role::ALL {
            ip(&["netns", "add", &self.ns(r)])?;
            ip(&["-n", &self.ns(r), "link", "set", "lo", "up"])?;
            for (k, v) in [
                ("net.ipv4.tcp_congestion_control", "cubic"),
                ("net.ipv4.tcp_no_metrics_save", "1"),
            ] {
                run(self
                    .cmd(r, "sysctl")
                    .args(["-q", "-w", &format!("{k}={v}")]))?;
            }
        }
        let (c, a, b, s) = (
            self.ns(Role::Client),
            self.ns(Role::SiteA),
            self.ns(Role::SiteB),
            self.ns(Role::Server),
        );
        ip(&[
            "-n", &c, "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", &a,
        ])?;
        ip(&[
            "-n", &s, "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", &b,
        ])?;
        for (ns, dev, cidr) in [
            (&c, "eth0", format!("{}/24", addr::CLIENT)),
            (&a, "lan0", format!("{}/24", addr::A_LAN)),
            (&b, "lan0", format!("{}/24", addr::B_LAN)),
            (&s, "eth0", format!("{}/24", addr::SERVER)),
        ] {
            ip(&["-n", ns, "addr", "add", &cidr, "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        ip(&["-n", &c, "route", "add", "default", "via", addr::A_LAN])?;
        ip(&["-n", &s, "route", "add", "default", "via", addr::B_LAN])?;
        // The appliances are tuned as the README's deployment steps say: forwarding on, and warm
        // tunnel connections keep their congestion window across idle periods.
        for r in [Role::SiteA, Role::SiteB] {
            for kv in [
                "net.ipv4.ip_forward=1",
                "net.ipv4.tcp_slow_start_after_idle=0",
            ] {
                run(self.cmd(r, "sysctl").args(["-q", "-w", kv]))?;
            }
        }
        Ok(())
    }

    /// Removes everything of this instance: stops processes inside its namespaces (by pid),
    /// deletes the namespaces and the scratch directory. Safe to call repeatedly.
    pub fn down(&self) -> Result<()> {
        let mut pids = Vec::new();
        for r in Role::ALL {
            if self.exists(r) {
                if let Ok(out) = ip(&["netns", "pids", &self.ns(r)]) {
                    pids.extend(out.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
                }
            }
        }
        for &p in &pids {
            let _ = sys::kill(p, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline
            && pids
                .iter()
                .any(|p| Path::new(&format!("/proc/{p}")).exists())
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        for &p in &pids {
            let _ = sys::kill(p, libc::SIGKILL);
        }
        let mut errors = Vec::new();
        for r in Role::ALL {
            if self.exists(r) {
                if let Err(e) = ip(&["netns", "del", &self.ns(r)]) {
                    errors.push(format!("{e:#}"));
                }
            }
        }
        let dir = self.state_dir();
        if dir.exists() {
            let _ = std::fs::remove_dir_all(&dir);
        }
        if !errors.is_empty() {
            bail!("teardown: {}", errors.join("; "));
        }
        Ok(())
    }

    /// Starts the emulator (binary `wanem`) in the WAN namespace with `link_args` (e.g.
    /// `["--rate", "20mbit", "--delay", "10ms"]`), wires its devices into site A and B and waits
    /// until it is forwarding.
    pub fn start_link(&self, wanem: &Path, extra: &[String]) -> Result<Link> {
        let stats_file = unique_path(self.state_dir().join("wanem"));
        std::fs::create_dir_all(self.state_dir())?;
        let mut cmd = self.cmd(Role::Wan, wanem);
        link_args(self, &mut cmd);
        cmd.arg("--stats-file")
            .arg(&stats_file)
            .arg("--die-with-parent")
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .with_context(|| format!("starting {}", wanem.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let stderr = child.stderr.take().context("no stderr")?;
        let (tx, rx) = mpsc::channel();
        let out_thread = std::thread::spawn(move || {
            let mut rest = String::new();
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if line.starts_with("ready") {
                    let _ = tx.send(line);
                    break;
                }
                rest.push_str(&line);
                rest.push('\n');
            }
            for line in lines.map_while(|l| l.ok()) {
                rest.push_str(&line);
                rest.push('\n');
            }
            rest
        });
        let err_thread = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = BufReader::new(stderr).read_to_string(&mut s);
            s
        });
        let mut link = Link {
            child: Some(child),
            stats_file,
            out_thread: Some(out_thread),
            err_thread: Some(err_thread),
        };
        match rx.recv_timeout(Duration::from_secs(10)) {
            Ok(_) => Ok(link),
            Err(_) => {
                let (_, err) = link.finish();
                bail!("emulator did not come up: {}", err.trim())
            }
        }
    }
}

/// A namespace other than the initial one may only default to a congestion control that the
/// initial namespace lists in `tcp_allowed_congestion_control`; add `cc` there if it is missing
/// (this only widens what unprivileged sockets may choose).
fn allow_congestion_control(cc: &str) -> Result<()> {
    let path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
    let allowed = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    if allowed.split_whitespace().any(|c| c == cc) {
        return Ok(());
    }
    let available = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_congestion_control")
        .unwrap_or_default();
    if !available.split_whitespace().any(|c| c == cc) {
        bail!("congestion control {cc} is not available in this kernel");
    }
    eprintln!("ditto-bench: adding {cc} to net.ipv4.tcp_allowed_congestion_control so namespaces can use it");
    std::fs::write(path, format!("{} {cc}", allowed.trim()))
        .with_context(|| format!("writing {path}"))
}

/// Adds the emulator arguments that wire its devices into site A and site B of `topo`.
pub fn link_args(topo: &Topo, cmd: &mut Command) {
    cmd.args([
        "--a-netns",
        &topo.ns(Role::SiteA),
        "--b-netns",
        &topo.ns(Role::SiteB),
    ])
    .args([
        "--a-addr",
        &format!("{}/30", addr::A_WAN),
        "--b-addr",
        &format!("{}/30", addr::B_WAN),
    ])
    .args(["--a-route", addr::SERVER_NET, "--b-route", addr::CLIENT_NET]);
}

fn unique_path(p: PathBuf) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let stem = p
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("wanem")
        .to_string();
    p.with_file_name(format!("{stem}-{}-{n}.json", std::process::id()))
}

/// A running emulator. Dropping it stops it.
pub struct Link {
    child: Option<Child>,
    stats_file: PathBuf,
    out_thread: Option<std::thread::JoinHandle<String>>,
    err_thread: Option<std::thread::JoinHandle<String>>,
}

impl Link {
    /// The counters as of the last stats-file rewrite (at most ~100 ms old).
    pub fn stats(&self) -> Result<StatsReport> {
        StatsReport::read(&self.stats_file)
    }

    /// Counters that include everything forwarded so far: waits for one more stats rewrite.
    pub fn fresh_stats(&self) -> Result<StatsReport> {
        let before = self.stats()?.uptime_s;
        let deadline = Instant::now() + Duration::from_secs(2);
        loop {
            std::thread::sleep(Duration::from_millis(30));
            let s = self.stats()?;
            if s.uptime_s > before + 0.05 || Instant::now() > deadline {
                return Ok(s);
            }
        }
    }

    /// Takes the emulated link down (SIGUSR1: every packet dropped, both directions, until it is
    /// back) or brings it back up (SIGUSR2).
    pub fn set_down(&self, down: bool) -> Result<()> {
        let child = self.child.as_ref().context("the emulator is not running")?;
        let sig = if down { libc::SIGUSR1 } else { libc::SIGUSR2 };
        sys::kill(child.id(), sig).context("signalling the emulator")
    }

    fn finish(&mut self) -> (String, String) {
        if let Some(mut child) = self.child.take() {
            let _ = sys::kill(child.id(), libc::SIGTERM);
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(10))
                    }
                    _ => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                }
            }
        }
        let out = self
            .out_thread
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        let err = self
            .err_thread
            .take()
            .and_then(|h| h.join().ok())
            .unwrap_or_default();
        (out, err)
    }

    /// Stops the emulator and returns its final counters.
    pub fn stop(mut self) -> Result<StatsReport> {
        let (_out, err) = self.finish();
        let report = StatsReport::read(&self.stats_file)
            .with_context(|| format!("emulator stderr: {}", err.trim()))?;
        Ok(report)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.finish();
    }
}

/// Tears the topology down when dropped (also on panic).
pub struct TopoGuard(pub Topo);

impl Drop for TopoGuard {
    fn drop(&mut self) {
        if let Err(e) = self.0.down() {
            eprintln!("ditto-bench: teardown of {}: {e:#}", self.0.prefix());
        }
    }
}

impl std::ops::Deref for TopoGuard {
    type Target = Topo;
    fn deref(&self) -> &Topo {
        &self.0
    }
}

/// Helper for CLI link settings: rate/delay/loss/queue/mtu as emulator arguments.
#[derive(Clone, Debug, Default)]
pub struct LinkSpec {
    pub rate: Option<String>,
    pub rtt: Option<String>,
    pub loss: Option<String>,
    pub queue: Option<String>,
    pub jitter: Option<String>,
    pub mtu: Option<usize>,
}

impl LinkSpec {
    /// Emulator arguments; the RTT is split into two equal one-way delays.
    pub fn to_args(&self) -> Result<Vec<String>> {
        let mut v = Vec::new();
        if let Some(r) = &self.rate {
            units::parse_rate(r)?;
            v.extend(["--rate".to_string(), r.clone()]);
        }
        if let Some(rtt) = &self.rtt {
            let d = units::parse_duration(rtt)?;
            v.extend(["--delay".to_string(), format!("{}us", d.as_micros() / 2)]);
        }
        for (flag, val) in [
            ("--loss", &self.loss),
            ("--queue", &self.queue),
            ("--jitter", &self.jitter),
        ] {
            if let Some(x) = val {
                v.extend([flag.to_string(), x.clone()]);
            }
        }
        if let Some(m) = self.mtu {
            v.extend(["--mtu".to_string(), m.to_string()]);
        }
        Ok(v)
    }
}
