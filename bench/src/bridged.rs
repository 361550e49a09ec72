//! The bridged topology of `ditto-bench modes --topology bridged`: the appliances are bumps in
//! the wire, as the appliance image deploys them (`[intercept] mode = "inline"`).
//!
//! ```text
//!  PFX-client         PFX-a                PFX-wan               PFX-b                PFX-server
//!  eth0 10.78.0.1 -- lan0 ┐                                               ┌ lan0 -- eth0 10.78.0.4
//!                         br0 10.78.0.2                      br0 10.78.0.3
//!                    vx0 ┘                                                └ vx0
//!                     └ VXLAN over wan0 10.77.0.1 <= ditto-wanem => wan0 10.77.0.2 ┘
//! ```
//!
//! One subnet (10.78.0.0/24): client and server talk to each other's own address, and each
//! appliance has a management address on its bridge (`br0` = `lan0` + `vx0`) for the tunnel. The
//! emulator is a TUN (layer 3) device pair and cannot be a bridge port itself, so the bridges'
//! WAN ports are VXLAN devices whose UDP packets cross the emulator: the same emulated link
//! (rate, delay) as in the routed topology sits between the two bridges. The emulator's devices
//! get an MTU of [`DEV_MTU`] so that the encapsulated frames carry 1500-byte packets. IP
//! forwarding stays off on the appliances. The namespaces are those of [`Topo`], so
//! [`Topo::down`] removes them.

use crate::linktest::{wait_port_in, KillOnDrop};
use crate::procs::Usage;
use crate::scenarios::{ditto_status, keygen, wait_ditto_ready, Ctx, DittoConfigs, DittoMode};
use crate::topo::{ip, run, Role, Topo};
use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Addresses of the bridged topology.
pub mod addr {
    pub const CLIENT: &str = "10.78.0.1";
    pub const A_BR: &str = "10.78.0.2";
    pub const B_BR: &str = "10.78.0.3";
    pub const SERVER: &str = "10.78.0.4";
    /// The emulator's device addresses (the VXLAN endpoints), as the routed topology has them.
    pub const A_UNDERLAY: &str = "10.77.0.1";
    pub const B_UNDERLAY: &str = "10.77.0.2";
}

/// MTU of the emulator's devices: a 1500-byte packet plus VXLAN's 50 bytes.
pub const DEV_MTU: usize = 1550;

/// The server port (as in the routed topology) and the forward listener's port.
pub const SERVER_PORT: u16 = crate::scenarios::SERVER_PORT;
pub const PROXY_PORT: u16 = 5000;

/// Emulator arguments the bridged topology needs in addition to the link's.
pub fn link_extra() -> Vec<String> {
    vec!["--dev-mtu".into(), DEV_MTU.to_string()]
}

/// Builds the bridged topology (tearing down any leftover of the same prefix first). The
/// emulator, started later with [`Topo::start_link`] and [`link_extra`], provides the underlay.
pub fn up(topo: &Topo) -> Result<()> {
    if !crate::sys::is_root() {
        bail!("building namespaces needs root");
    }
    topo.down().context("cleaning up a previous instance")?;
    let res = build(topo);
    if res.is_err() {
        let _ = topo.down();
    }
    res
}

fn build(topo: &Topo) -> Result<()> {
    std::fs::create_dir_all(topo.state_dir())?;
    // A namespace may only default to a congestion control the initial namespace allows (the
    // routed topology does the same).
    let allowed_path = "/proc/sys/net/ipv4/tcp_allowed_congestion_control";
    let allowed =
        std::fs::read_to_string(allowed_path).with_context(|| format!("reading {allowed_path}"))?;
    if !allowed.split_whitespace().any(|c| c == "cubic") {
        eprintln!("ditto-bench: adding cubic to net.ipv4.tcp_allowed_congestion_control so namespaces can use it");
        std::fs::write(allowed_path, format!("{} cubic", allowed.trim()))
            .with_context(|| format!("writing {allowed_path}"))?;
    }
    for r in Role::ALL {
        ip(&["netns", "add", &topo.ns(r)])?;
        ip(&["-n", &topo.ns(r), "link", "set", "lo", "up"])?;
        for kv in [
            "net.ipv4.tcp_congestion_control=cubic",
            "net.ipv4.tcp_no_metrics_save=1",
        ] {
            run(topo.cmd(r, "sysctl").args(["-q", "-w", kv]))?;
        }
    }
    let (c, a, b, s) = (
        topo.ns(Role::Client),
        topo.ns(Role::SiteA),
        topo.ns(Role::SiteB),
        topo.ns(Role::Server),
    );
    ip(&[
        "-n", &c, "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", &a,
    ])?;
    ip(&[
        "-n", &s, "link", "add", "eth0", "type", "veth", "peer", "name", "lan0", "netns", &b,
    ])?;
    for (ns, me, br, peer) in [
        (&a, addr::A_UNDERLAY, addr::A_BR, addr::B_UNDERLAY),
        (&b, addr::B_UNDERLAY, addr::B_BR, addr::A_UNDERLAY),
    ] {
        // The VXLAN device exists before its underlay (the emulator's device) does; it sends to
        // `peer` by route, so it keeps working across emulator restarts.
        ip(&[
            "-n", ns, "link", "add", "vx0", "type", "vxlan", "id", "78", "local", me, "remote",
            peer, "dstport", "4789",
        ])?;
        ip(&["-n", ns, "link", "set", "vx0", "mtu", "1500"])?;
        ip(&["-n", ns, "link", "add", "br0", "type", "bridge"])?;
        for port in ["lan0", "vx0"] {
            ip(&["-n", ns, "link", "set", port, "master", "br0"])?;
            ip(&["-n", ns, "link", "set", port, "up"])?;
        }
        ip(&["-n", ns, "addr", "add", &format!("{br}/24"), "dev", "br0"])?;
        ip(&["-n", ns, "link", "set", "br0", "up"])?;
    }
    for (ns, a4) in [(&c, addr::CLIENT), (&s, addr::SERVER)] {
        ip(&["-n", ns, "addr", "add", &format!("{a4}/24"), "dev", "eth0"])?;
        ip(&["-n", ns, "link", "set", "eth0", "up"])?;
    }
    // As on the routed appliances, minus forwarding (a bridge does not route).
    for r in [Role::SiteA, Role::SiteB] {
        run(topo
            .cmd(r, "sysctl")
            .args(["-q", "-w", "net.ipv4.tcp_slow_start_after_idle=0"]))?;
    }
    Ok(())
}

/// Starts the `serve` tool on the server's bridged address.
pub fn start_server(topo: &Topo, bench: &Path, dir: Option<&Path>) -> Result<KillOnDrop> {
    let listen = format!("{}:{SERVER_PORT}", addr::SERVER);
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

/// Where the client connects: the server itself (inline) or site A's forward listener.
pub fn target(to_server: bool) -> String {
    if to_server {
        format!("{}:{SERVER_PORT}", addr::SERVER)
    } else {
        format!("{}:{PROXY_PORT}", addr::A_BR)
    }
}

/// Writes keys and configurations of a fresh pair under `<state>/ditto-<tag>`. Site B is the
/// same in every mode: a tunnel listener, no `[intercept]` (it connects to the server from its
/// bridge address). Site A has `[intercept] mode = "inline"` (with `inline`) and/or the
/// `[[forward]]` listener (with `forward`).
pub(crate) fn configs(
    ctx: &Ctx,
    ditto: &Path,
    tag: &str,
    inline: bool,
    forward: bool,
    watchdog: Option<&str>,
) -> Result<DittoConfigs> {
    let dir = ctx.dir(&format!("ditto-{tag}"))?;
    let fp_a = keygen(ditto, &dir.join("site-a"))?;
    let fp_b = keygen(ditto, &dir.join("site-b"))?;
    let conf = |me: &str, listen: &str, peer: &str, peer_addr: &str, peer_fp: &str| {
        format!(
            "[node]\nname = \"{me}\"\nkey = \"{}\"\nadmin = \"127.0.0.1:9090\"\nstore_dir = \"{}\"\n\n\
             [tunnel]\nlisten = \"{listen}:7878\"\n\n[[peer]]\nname = \"{peer}\"\naddress = \"{peer_addr}:7878\"\n\
             fingerprint = \"{peer_fp}\"\n",
            dir.join(format!("{me}.key")).display(),
            dir.join(format!("store-{me}")).display()
        )
    };
    let mut a = conf("site-a", addr::A_BR, "site-b", addr::B_BR, &fp_b);
    if inline {
        a += &format!(
            "\n[intercept]\nmode = \"inline\"\nbridge = \"br0\"\nports = [{SERVER_PORT}]\n"
        );
        if let Some(w) = watchdog {
            a += &format!("watchdog = \"{w}\"\n");
        }
        a += &format!(
            "\n[[route]]\ndest = [\"{}/32\"]\npeer = \"site-b\"\n",
            addr::SERVER
        );
    }
    if forward {
        a += &format!(
            "\n[[forward]]\nlisten = \"{}:{PROXY_PORT}\"\npeer = \"site-b\"\ntarget = \"{}:{SERVER_PORT}\"\n",
            addr::A_BR,
            addr::SERVER
        );
    }
    let b = conf("site-b", addr::B_BR, "site-a", addr::A_BR, &fp_a);
    let c = DittoConfigs {
        a: dir.join("site-a.toml"),
        b: dir.join("site-b.toml"),
    };
    std::fs::write(&c.a, a)?;
    std::fs::write(&c.b, b)?;
    Ok(c)
}

/// Waits until site A's tunnel is up and, with `inline`, its rules are installed.
pub(crate) fn wait_ready(ctx: &Ctx, ditto: &Path, inline: bool, secs: u64) -> Result<()> {
    wait_ditto_ready(ctx, ditto, Role::SiteA, DittoMode::Forward, secs)?;
    if !inline {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let v = ditto_status(ctx, ditto, Role::SiteA);
        if v.as_ref()
            .and_then(|v| v.pointer("/intercept/rules_installed"))
            == Some(&serde_json::Value::Bool(true))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("site A's inline rules were not installed within {secs} s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A started pair (both daemons under the rusage wrapper).
pub(crate) struct Pair {
    pub(crate) target: String,
    a: Option<(KillOnDrop, PathBuf)>,
    b: Option<(KillOnDrop, PathBuf)>,
    cleanup: Option<Command>,
}

/// Starts a fresh pair: site A inline (`inline`), with the forward listener (`forward`); the
/// client uses the forward listener when `via_forward`, else the server's address.
pub(crate) fn start_pair(
    ctx: &Ctx,
    ditto: &Path,
    tag: &str,
    inline: bool,
    via_forward: bool,
) -> Result<Pair> {
    let c = configs(ctx, ditto, tag, inline, !inline || via_forward, None)?;
    let d = ditto.to_string_lossy().into_owned();
    let args = |p: &Path| vec!["run".into(), "--config".into(), p.display().to_string()];
    let b = ctx.spawn_wrapped(Role::SiteB, "ditto-b", &d, &args(&c.b))?;
    let a = ctx.spawn_wrapped(Role::SiteA, "ditto-a", &d, &args(&c.a))?;
    let mut cleanup = None;
    if inline {
        let mut cmd = ctx.topo.cmd(Role::SiteA, ditto);
        cmd.arg("cleanup").arg("--config").arg(&c.a);
        cleanup = Some(cmd);
    }
    let pair = Pair {
        target: target(inline && !via_forward),
        a: Some(a),
        b: Some(b),
        cleanup,
    };
    wait_ready(ctx, ditto, inline, 15)?;
    if !inline || via_forward {
        wait_port_in(&ctx.topo, Role::Client, &ctx.bench, &pair.target, 15)?;
    }
    Ok(pair)
}

impl Pair {
    /// Stops site A, then site B (SIGTERM through the rusage wrappers), and returns their usage.
    pub(crate) fn stop(mut self) -> (Option<Usage>, Option<Usage>) {
        let collect = |p: Option<(KillOnDrop, PathBuf)>| -> Option<Usage> {
            let (p, file) = p?;
            drop(p);
            match std::fs::read(&file)
                .map_err(anyhow::Error::from)
                .and_then(|b| Ok(serde_json::from_slice::<Usage>(&b)?))
            {
                Ok(u) => Some(u),
                Err(e) => {
                    eprintln!("(no usage report {}: {e:#})", file.display());
                    None
                }
            }
        };
        let a = collect(self.a.take());
        if let Some(mut c) = self.cleanup.take() {
            let _ = c
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        std::thread::sleep(Duration::from_millis(300));
        let b = collect(self.b.take());
        (a, b)
    }
}
