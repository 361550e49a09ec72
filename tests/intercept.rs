//! Transparent interception end to end, in network namespaces (root; skipped otherwise): real
//! `ditto run` daemons in redirect, tproxy and inline modes carry byte-exact traffic both ways over
//! IPv4 and IPv6, and traffic keeps flowing when ditto is killed, hung, or its peer is gone.
//!
//! Topologies (every test builds its own, with unique namespace names, removed on drop):
//! * routed: client ─ A ─ B ─ server, A and B routers running ditto (10.61.x / fd61:x::);
//! * bridged: client ─ [A: lan0 br0 wan0] ─ [B: wan0 br0 lan0] ─ server, one subnet (10.62.0.x).

mod common;

use common::netns::{
    addr, echo_round, exchange, flows, link, serve_echo, skip_unless_root, status, unique,
    wait_admin, wait_tunnel_up, wait_until, Daemon, Ns,
};
use common::{keygen, payload, serve_reverse, Seen};
use std::io::Read;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const PORT: u16 = 5001;
const T: Duration = Duration::from_secs(20);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn has_table(ns: &Ns, table: &str) -> bool {
    ns.nft_tables()
        .iter()
        .any(|t| t.ends_with(&format!(" {table}")))
}

fn has_fwmark_rule(ns: &Ns) -> bool {
    let v4 = ns.sh("ip -4 rule show");
    let v6 = ns.sh("ip -6 rule show");
    v4.contains("lookup 1881") || v6.contains("lookup 1881")
}

/// One request from `from` to `to`: exact?
fn request(from: &Ns, to: SocketAddr, seed: u64, len: usize) -> std::io::Result<bool> {
    let s = from.connect(to, Duration::from_secs(5))?;
    exchange(s, &payload(seed, len), T)
}

fn assert_exact(from: &Ns, to: SocketAddr, seed: u64, len: usize) {
    match request(from, to, seed, len) {
        Ok(true) => {}
        Ok(false) => panic!("{to}: bytes differ"),
        Err(e) => panic!("{to}: {e}"),
    }
}

/// SIGTERM to `a` while a flow through it from `from` to `to` is half sent: the flow completes,
/// byte-exact (the stop diverts nothing new but still delivers the connections it holds), and `a`
/// exits once it ended.
fn stop_draining(from: &Ns, to: SocketAddr, a: &mut Daemon) {
    use std::io::{Read, Write};
    let mut s = from.connect(to, Duration::from_secs(5)).expect("connect");
    s.set_read_timeout(Some(T)).expect("timeout");
    let data = payload(31, 300_000);
    s.write_all(&data[..150_000]).expect("first half");
    a.signal("TERM");
    std::thread::sleep(Duration::from_millis(300));
    s.write_all(&data[150_000..])
        .unwrap_or_else(|e| panic!("the flow open at the stop: {e}\n{}", a.log()));
    s.shutdown(std::net::Shutdown::Write)
        .unwrap_or_else(|e| panic!("the flow open at the stop: {e}\n{}", a.log()));
    let mut back = Vec::new();
    s.read_to_end(&mut back)
        .unwrap_or_else(|e| panic!("the flow open at the stop: {e}\n{}", a.log()));
    back.reverse();
    assert!(
        back == data,
        "the flow open at the stop got {} wrong bytes",
        back.len()
    );
    assert!(
        wait_until(Duration::from_secs(15), || a.exited()).is_some(),
        "ditto did not exit after its drain:\n{}",
        a.log()
    );
}

/// Four hosts in a chain, client ─ A ─ B ─ server (links lan0/wan0 on the appliances, eth0 on
/// the ends), and a key for each appliance. [`Lab::routed`] and [`Lab::bridged`] address them.
struct Lab {
    c: Ns,
    a: Ns,
    b: Ns,
    s: Ns,
    dir: tempfile::TempDir,
    fp_a: String,
    fp_b: String,
}

impl Lab {
    fn chain(tag: &str) -> Lab {
        let p = unique(tag);
        let (c, a, b, s) = (
            Ns::new(format!("{p}c")),
            Ns::new(format!("{p}a")),
            Ns::new(format!("{p}b")),
            Ns::new(format!("{p}s")),
        );
        link(&c, "eth0", &a, "lan0");
        link(&a, "wan0", &b, "wan0");
        link(&b, "lan0", &s, "eth0");
        let dir = tempfile::tempdir().expect("tempdir");
        let fp_a = keygen(dir.path(), "a");
        let fp_b = keygen(dir.path(), "b");
        Lab {
            c,
            a,
            b,
            s,
            dir,
            fp_a,
            fp_b,
        }
    }
}

const C4: &str = "10.61.1.2";
const S4: &str = "10.61.3.2";
const S6: &str = "fd61:3::2";

impl Lab {
    /// Routed: A and B are routers between three subnets 10.61.{1,2,3}.0/24 (and fd61:{1,2,3}::/64).
    fn routed(tag: &str) -> Lab {
        let lab = Lab::chain(tag);
        let Lab { c, a, b, s, .. } = &lab;
        addr(c, "eth0", &["10.61.1.2/24", "fd61:1::2/64"]);
        addr(a, "lan0", &["10.61.1.1/24", "fd61:1::1/64"]);
        addr(a, "wan0", &["10.61.2.1/24", "fd61:2::1/64"]);
        addr(b, "wan0", &["10.61.2.2/24", "fd61:2::2/64"]);
        addr(b, "lan0", &["10.61.3.1/24", "fd61:3::1/64"]);
        addr(s, "eth0", &["10.61.3.2/24", "fd61:3::2/64"]);
        c.ip(&["route", "add", "default", "via", "10.61.1.1"]);
        c.ip(&["-6", "route", "add", "default", "via", "fd61:1::1"]);
        s.ip(&["route", "add", "default", "via", "10.61.3.1"]);
        s.ip(&["-6", "route", "add", "default", "via", "fd61:3::1"]);
        a.ip(&["route", "add", "10.61.3.0/24", "via", "10.61.2.2"]);
        a.ip(&["-6", "route", "add", "fd61:3::/64", "via", "fd61:2::2"]);
        b.ip(&["route", "add", "10.61.1.0/24", "via", "10.61.2.1"]);
        b.ip(&["-6", "route", "add", "fd61:1::/64", "via", "fd61:2::1"]);
        for r in [a, b] {
            r.sysctl("net.ipv4.ip_forward=1");
            r.sysctl("net.ipv6.conf.all.forwarding=1");
        }
        lab
    }

    /// A's config: intercepts what clients on lan0 send to port 5001 in the server subnet.
    fn config_a(&self, intercept: &str) -> PathBuf {
        let d = self.dir.path();
        let text = format!(
            r#"[node]
name = "a"
key = "{key}"
admin = "127.0.0.1:9090"

[tunnel]
keepalive = "500ms"
connect_timeout = "1s"

[intercept]
{intercept}

[[peer]]
name = "b"
address = "10.61.2.2:7878"
fingerprint = "{fp}"

[[route]]
dest = ["10.61.3.0/24", "fd61:3::/64"]
peer = "b"
"#,
            key = d.join("a.key").display(),
            fp = self.fp_b,
        );
        let p = d.join("a.toml");
        std::fs::write(&p, text).expect("write config");
        p
    }

    fn config_b(&self, preserve_client: bool) -> PathBuf {
        let d = self.dir.path();
        let text = format!(
            r#"[node]
name = "b"
key = "{key}"
admin = "127.0.0.1:9090"

[tunnel]
listen = "[::]:7878"
keepalive = "500ms"

[intercept]
mode = "tproxy"
interfaces = ["lan0"]
ports = [{PORT}]
preserve_client = {preserve_client}

[[peer]]
name = "a"
fingerprint = "{fp}"

[[route]]
dest = ["10.61.1.0/24", "fd61:1::/64"]
peer = "a"
"#,
            key = d.join("b.key").display(),
            fp = self.fp_a,
        );
        let p = d.join("b.toml");
        std::fs::write(&p, text).expect("write config");
        p
    }

    fn servers(&self) -> Seen {
        serve_reverse(self.s.listen(sa(&format!("[::]:{PORT}"))))
    }
}

fn tproxy_a() -> String {
    format!("mode = \"tproxy\"\nlisten = \"[::]:7070\"\ninterfaces = [\"lan0\"]\nports = [{PORT}]")
}

/// Carries v4 and v6 requests client → server through A and B; checks they were accelerated, that
/// the server saw the client's or B's address as configured, and that stop removes the rules.
fn routed_mode(tag: &str, a_intercept: &str, a_reason: &str, preserve: bool) {
    let r = Lab::routed(tag);
    let seen = r.servers();
    // Somebody else's table, which ditto must leave alone.
    r.a.sh("nft add table inet firewall && nft add chain inet firewall input '{ type filter hook input priority 0; policy accept; }'");
    let mut b = Daemon::start(&r.b, &r.config_b(preserve));
    let mut a = Daemon::start(&r.a, &r.config_a(a_intercept));
    wait_tunnel_up(&r.a, &a);
    wait_admin(&r.b, &b);
    assert!(
        has_table(&r.a, "ditto"),
        "rules not installed:\n{}",
        a.log()
    );
    for (i, dst) in [format!("{S4}:{PORT}"), format!("[{S6}]:{PORT}")]
        .iter()
        .enumerate()
    {
        // Twice the same data: the second time it is deduplicated.
        for _round in 0..2 {
            assert_exact(&r.c, sa(dst), i as u64 + 1, 3 << 20);
        }
    }
    // Small and empty requests, and one from server-side data only.
    assert_exact(&r.c, sa(&format!("{S4}:{PORT}")), 9, 1);
    assert_exact(&r.c, sa(&format!("[{S6}]:{PORT}")), 9, 0);
    let accelerated = flows(&r.a, "accelerated", a_reason);
    assert!(
        accelerated >= 6,
        "A accelerated {accelerated} flows:\n{}",
        a.log()
    );
    assert_eq!(flows(&r.a, "passthrough", "peer-down"), 0);
    let peers = seen.peers();
    assert_eq!(peers.len(), 6, "{peers:?}");
    for p in &peers {
        let ip = p.ip().to_canonical().to_string();
        if preserve {
            assert!(
                ip == C4 || ip == "fd61:1::2",
                "server saw {ip}, not the client"
            );
        } else {
            assert!(
                ip == "10.61.3.1" || ip == "fd61:3::1",
                "server saw {ip}, not B"
            );
        }
    }
    // Graceful stop drains the flows open then, takes the rules with it, and tells the guard so
    // (it stays quiet).
    stop_draining(&r.c, sa(&format!("{S4}:{PORT}")), &mut a);
    b.stop("TERM");
    std::thread::sleep(Duration::from_millis(200));
    for d in [&a, &b] {
        assert!(
            !d.log().contains("guard:"),
            "guard acted on a clean stop:\n{}",
            d.log()
        );
    }
    for ns in [&r.a, &r.b] {
        assert!(!has_table(ns, "ditto"), "table left behind");
        assert!(!has_fwmark_rule(ns), "ip rule left behind");
    }
    assert_eq!(r.a.nft_tables(), vec!["inet firewall".to_owned()]);
    assert!(r
        .a
        .sh("nft list chain inet firewall input")
        .contains("policy accept"));
    // And traffic flows without ditto.
    assert_exact(&r.c, sa(&format!("{S4}:{PORT}")), 3, 100_000);
}

#[test]
fn tproxy_routed_v4_v6_preserving_client_addresses() {
    if skip_unless_root() {
        return;
    }
    routed_mode("dtp", &tproxy_a(), "tproxy", true);
}

#[test]
fn tproxy_routed_v4_v6_from_the_far_appliance() {
    if skip_unless_root() {
        return;
    }
    routed_mode("dtf", &tproxy_a(), "tproxy", false);
}

#[test]
fn redirect_routed_v4_v6() {
    if skip_unless_root() {
        return;
    }
    let a = format!(
        "mode = \"redirect\"\nlisten = \"[::]:7070\"\ninterfaces = [\"lan0\"]\nports = [{PORT}]"
    );
    routed_mode("drd", &a, "redirect", false);
}

const BC4: &str = "10.62.0.1";
const BC6: &str = "fd62::1";
const BS4: &str = "10.62.0.4";
const BS6: &str = "fd62::4";

impl Lab {
    /// Bridged: one subnet 10.62.0.0/24 (fd62::/64); A and B bridge lan0 and wan0 as br0 and have a
    /// management address on it for the tunnel: bumps in the wire.
    fn bridged(tag: &str) -> Lab {
        let lab = Lab::chain(tag);
        for (ns, ip4, ip6) in [
            (&lab.a, "10.62.0.2/24", "fd62::2/64"),
            (&lab.b, "10.62.0.3/24", "fd62::3/64"),
        ] {
            ns.ip(&["link", "add", "br0", "type", "bridge"]);
            ns.ip(&["link", "set", "lan0", "master", "br0"]);
            ns.ip(&["link", "set", "wan0", "master", "br0"]);
            ns.ip(&["link", "set", "br0", "up"]);
            // Forwarding stays off on a bridge appliance.
            addr(ns, "br0", &[ip4, ip6]);
        }
        addr(&lab.c, "eth0", &["10.62.0.1/24", "fd62::1/64"]);
        addr(&lab.s, "eth0", &["10.62.0.4/24", "fd62::4/64"]);
        lab
    }

    /// The config of inline appliance `me` ("a" dials "b").
    fn config_inline(&self, me: &str, extra: &str) -> PathBuf {
        let d = self.dir.path();
        let (peer, fp, tunnel, dest) = if me == "a" {
            ("b", &self.fp_b, "", format!("\"{BS4}\", \"{BS6}\""))
        } else {
            (
                "a",
                &self.fp_a,
                "listen = \"[::]:7878\"",
                format!("\"{BC4}\", \"{BC6}\""),
            )
        };
        let address = if me == "a" {
            "address = \"10.62.0.3:7878\""
        } else {
            ""
        };
        let text = format!(
            r#"[node]
name = "{me}"
key = "{key}"
admin = "127.0.0.1:9090"

[tunnel]
{tunnel}
keepalive = "500ms"
connect_timeout = "1s"

[intercept]
mode = "inline"
bridge = "br0"
ports = [{PORT}]
{extra}

[[peer]]
name = "{peer}"
{address}
fingerprint = "{fp}"

[[route]]
dest = [{dest}]
peer = "{peer}"
"#,
            key = d.join(format!("{me}.key")).display(),
        );
        let p = d.join(format!("{me}.toml"));
        std::fs::write(&p, text).expect("write config");
        p
    }
}

#[test]
fn inline_bridge_v4_v6_preserving_client_addresses() {
    if skip_unless_root() {
        return;
    }
    let r = Lab::bridged("dil");
    let seen = serve_reverse(r.s.listen(sa(&format!("[::]:{PORT}"))));
    // Before ditto: the bridges carry traffic by themselves.
    assert_exact(&r.c, sa(&format!("{BS4}:{PORT}")), 1, 10_000);
    let mut b = Daemon::start(&r.b, &r.config_inline("b", ""));
    let mut a = Daemon::start(&r.a, &r.config_inline("a", ""));
    wait_tunnel_up(&r.a, &a);
    wait_admin(&r.b, &b);
    for ns in [&r.a, &r.b] {
        assert!(has_table(ns, "ditto"), "inet table missing");
        assert!(
            ns.nft_tables().iter().any(|t| t == "bridge ditto"),
            "bridge table missing"
        );
    }
    for (i, dst) in [format!("{BS4}:{PORT}"), format!("[{BS6}]:{PORT}")]
        .iter()
        .enumerate()
    {
        for _round in 0..2 {
            assert_exact(&r.c, sa(dst), i as u64 + 10, 3 << 20);
        }
    }
    let accelerated = flows(&r.a, "accelerated", "inline");
    assert!(
        accelerated >= 4,
        "A accelerated {accelerated}:\n{}",
        a.log()
    );
    // Servers see the real clients (the only address the far bridge could use).
    let peers = seen.peers();
    assert_eq!(peers.len(), 5, "{peers:?}");
    for p in &peers {
        let ip = p.ip().to_canonical().to_string();
        assert!(ip == BC4 || ip == BC6, "server saw {ip}");
    }
    // Other TCP ports and other protocols are bridged untouched.
    let other = serve_reverse(r.s.listen(sa("[::]:5002")));
    assert_exact(&r.c, sa(&format!("{BS4}:5002")), 3, 10_000);
    assert_eq!(other.peers().len(), 1);
    assert_eq!(flows(&r.a, "accelerated", "inline"), accelerated);
    for server in [format!("{BS4}:5003"), format!("[{BS6}]:5003")] {
        assert!(
            udp_echo(&r.c, &r.s, sa(&server)),
            "UDP to {server} not bridged"
        );
    }
    stop_draining(&r.c, sa(&format!("{BS4}:{PORT}")), &mut a);
    b.stop("TERM");
    for ns in [&r.a, &r.b] {
        assert!(
            ns.nft_tables().is_empty(),
            "tables left: {:?}",
            ns.nft_tables()
        );
        assert!(!has_fwmark_rule(ns), "ip rule left behind");
    }
    assert_exact(&r.c, sa(&format!("[{BS6}]:{PORT}")), 4, 100_000);
}

/// A UDP datagram from `c` to an echo socket in `s` at `server`, and its echo back.
fn udp_echo(c: &Ns, s: &Ns, server: SocketAddr) -> bool {
    let srv = s.run(move || std::net::UdpSocket::bind(server).expect("udp bind"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        if let Ok((n, from)) = srv.recv_from(&mut buf) {
            let _ = srv.send_to(&buf[..n], from);
        }
    });
    let any = if server.is_ipv4() {
        sa("0.0.0.0:0")
    } else {
        sa("[::]:0")
    };
    let cli = c.run(move || std::net::UdpSocket::bind(any).expect("udp bind"));
    let _ = cli.set_read_timeout(Some(Duration::from_secs(5)));
    let mut buf = [0u8; 64];
    cli.send_to(b"datagram", server).is_ok()
        && cli.recv(&mut buf).is_ok_and(|n| &buf[..n] == b"datagram")
}

/// Time until a new connection from `from` to `to` carries a request exactly, polling.
fn time_to_traffic(from: &Ns, to: SocketAddr, within: Duration) -> Option<Duration> {
    wait_until(within, || {
        let s = match from.connect(to, Duration::from_millis(500)) {
            Ok(s) => s,
            Err(_) => return false,
        };
        exchange(s, &payload(77, 20_000), Duration::from_secs(2)).unwrap_or(false)
    })
}

#[test]
fn killed_inline_appliance_fails_open_even_without_its_guard() {
    if skip_unless_root() {
        return;
    }
    let r = Lab::bridged("dik");
    let _seen = serve_reverse(r.s.listen(sa(&format!("[::]:{PORT}"))));
    let _b = Daemon::start(&r.b, &r.config_inline("b", ""));
    // No guard: what keeps traffic flowing is the rules' dependence on ditto's sockets alone.
    let mut a = Daemon::start(&r.a, &r.config_inline("a", "watchdog = \"0s\""));
    wait_tunnel_up(&r.a, &a);
    assert_exact(&r.c, sa(&format!("{BS4}:{PORT}")), 1, 100_000);
    let before = flows(&r.b, "accelerated", "from-peer");
    assert!(before >= 1);
    a.kill();
    assert!(
        has_table(&r.a, "ditto"),
        "rules should still be there: no guard"
    );
    let t = time_to_traffic(&r.c, sa(&format!("{BS4}:{PORT}")), Duration::from_secs(3));
    let t = t.expect("no traffic within 3 s after SIGKILL");
    eprintln!("inline, SIGKILL, no guard: traffic after {t:?}");
    assert_exact(&r.c, sa(&format!("[{BS6}]:{PORT}")), 2, 100_000);
    // Those flows crossed A's bridge untouched; B, whose routes do not cover the server, passes
    // them on. None went through the tunnel.
    assert_eq!(flows(&r.b, "accelerated", "from-peer"), before);
    assert!(flows(&r.b, "passthrough", "no-route") >= 2);
}

#[test]
fn killed_tproxy_appliance_fails_open_even_without_its_guard() {
    if skip_unless_root() {
        return;
    }
    let r = Lab::routed("dtk");
    let _seen = r.servers();
    let _b = Daemon::start(&r.b, &r.config_b(false));
    let a_cfg = format!("{}\nwatchdog = \"0s\"", tproxy_a());
    let mut a = Daemon::start(&r.a, &r.config_a(&a_cfg));
    wait_tunnel_up(&r.a, &a);
    assert_exact(&r.c, sa(&format!("{S4}:{PORT}")), 1, 100_000);
    a.kill();
    assert!(
        has_table(&r.a, "ditto"),
        "rules should still be there: no guard"
    );
    let t = time_to_traffic(&r.c, sa(&format!("[{S6}]:{PORT}")), Duration::from_secs(3))
        .expect("no traffic within 3 s after SIGKILL");
    eprintln!("tproxy, SIGKILL, no guard: traffic after {t:?}");
    assert_exact(&r.c, sa(&format!("{S4}:{PORT}")), 2, 100_000);
    // Clean up by hand, as ExecStopPost would.
    let out = common::run_ok(
        r.a.cmd(env!("CARGO_BIN_EXE_ditto"))
            .args(["cleanup", "--config"])
            .arg(r.dir.path().join("a.toml")),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed"));
    assert!(!has_table(&r.a, "ditto") && !has_fwmark_rule(&r.a));
    let again = common::run_ok(r.a.cmd(env!("CARGO_BIN_EXE_ditto")).arg("cleanup"));
    assert!(String::from_utf8_lossy(&again.stdout).contains("no interception rules"));
}

#[test]
fn killed_redirect_appliance_guard_restores_traffic_within_3s() {
    if skip_unless_root() {
        return;
    }
    let r = Lab::routed("drk");
    let _seen = r.servers();
    let _b = Daemon::start(&r.b, &r.config_b(false));
    let a_cfg = format!("mode = \"redirect\"\ninterfaces = [\"lan0\"]\nports = [{PORT}]");
    let mut a = Daemon::start(&r.a, &r.config_a(&a_cfg));
    wait_tunnel_up(&r.a, &a);
    assert_exact(&r.c, sa(&format!("{S4}:{PORT}")), 1, 100_000);
    let start = Instant::now();
    a.kill();
    let t = time_to_traffic(&r.c, sa(&format!("{S4}:{PORT}")), Duration::from_secs(3))
        .map(|_| start.elapsed())
        .expect("no traffic within 3 s after SIGKILL");
    eprintln!("redirect, SIGKILL: traffic after {t:?}");
    // The guard deletes the table first (that restores traffic), then the policy routing.
    let gone = || !has_table(&r.a, "ditto") && !has_fwmark_rule(&r.a);
    assert!(wait_until(Duration::from_secs(2), gone).is_some());
    assert_exact(&r.c, sa(&format!("[{S6}]:{PORT}")), 2, 100_000);
}

#[test]
fn hung_appliance_guard_removes_rules_and_kills_it() {
    if skip_unless_root() {
        return;
    }
    let r = Lab::routed("dhg");
    let _seen = r.servers();
    let _b = Daemon::start(&r.b, &r.config_b(false));
    let a_cfg = format!("{}\nwatchdog = \"1s\"", tproxy_a());
    let mut a = Daemon::start(&r.a, &r.config_a(&a_cfg));
    wait_tunnel_up(&r.a, &a);
    assert_exact(&r.c, sa(&format!("{S4}:{PORT}")), 1, 100_000);
    let start = Instant::now();
    a.signal("STOP");
    let t = time_to_traffic(&r.c, sa(&format!("{S4}:{PORT}")), Duration::from_secs(5))
        .map(|_| start.elapsed())
        .expect("no traffic within 5 s after SIGSTOP (watchdog 1 s)");
    eprintln!("tproxy, SIGSTOP, watchdog 1 s: traffic after {t:?}");
    assert!(!has_table(&r.a, "ditto"), "guard did not remove the rules");
    assert!(
        wait_until(Duration::from_secs(3), || a.exited()).is_some(),
        "guard did not kill the hung daemon"
    );
}

#[test]
fn peer_unreachable_flows_pass_through_until_the_tunnel_is_back() {
    if skip_unless_root() {
        return;
    }
    let r = Lab::routed("dpu");
    let _seen = r.servers();
    let a = Daemon::start(&r.a, &r.config_a(&tproxy_a()));
    wait_admin(&r.a, &a);
    for (i, dst) in [format!("{S4}:{PORT}"), format!("[{S6}]:{PORT}")]
        .iter()
        .enumerate()
    {
        let ok = request(&r.c, sa(dst), i as u64, 1 << 20);
        assert!(matches!(ok, Ok(true)), "{dst}: {ok:?}\n{}", a.log());
    }
    assert_eq!(flows(&r.a, "passthrough", "peer-down"), 2);
    assert_eq!(flows(&r.a, "accelerated", "tproxy"), 0);
    // The tunnel keeps retrying: once B is there, new flows are accelerated.
    let _b = Daemon::start(&r.b, &r.config_b(false));
    wait_tunnel_up(&r.a, &a);
    assert_exact(&r.c, sa(&format!("{S4}:{PORT}")), 5, 1 << 20);
    assert_eq!(flows(&r.a, "accelerated", "tproxy"), 1);
}

#[test]
fn connections_survive_ditto_start_and_held_ones_reset_when_it_dies() {
    if skip_unless_root() {
        return;
    }
    let r = Lab::bridged("dcs");
    serve_echo(r.s.listen(sa(&format!("[::]:{PORT}"))));
    let to = sa(&format!("{BS4}:{PORT}"));
    // A connection that exists before ditto starts ...
    let mut early = r.c.connect(to, Duration::from_secs(5)).expect("connect");
    early.set_read_timeout(Some(T)).expect("timeout");
    assert!(echo_round(&mut early, &payload(1, 100_000)).expect("echo"));
    let _b = Daemon::start(&r.b, &r.config_inline("b", ""));
    let mut a = Daemon::start(&r.a, &r.config_inline("a", ""));
    wait_tunnel_up(&r.a, &a);
    // ... is not disturbed by its start,
    assert!(echo_round(&mut early, &payload(2, 1 << 20)).expect("echo after start"));
    // while a new one is accelerated.
    let mut held = r.c.connect(to, Duration::from_secs(5)).expect("connect");
    held.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    assert!(echo_round(&mut held, &payload(3, 100_000)).expect("echo held"));
    assert_eq!(flows(&r.a, "accelerated", "inline"), 1);
    a.kill();
    // The connection ditto held ends with a reset: not a hang, not a clean end.
    let mut buf = [0u8; 16];
    match held.read(&mut buf) {
        Err(e) => assert!(
            matches!(
                e.kind(),
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
            ),
            "held connection: {e}"
        ),
        Ok(n) => panic!("held connection read {n} bytes after ditto died, expected a reset"),
    }
    // The early one never went through ditto: it still works.
    assert!(echo_round(&mut early, &payload(4, 100_000)).expect("echo after kill"));
}

#[test]
fn tunnel_mss_clamp_gets_through_a_black_hole_path() {
    if skip_unless_root() {
        return;
    }
    // a ─ r ─ b, where r's link toward b has MTU 1400 and r drops the ICMP that would tell a
    // about it; b's interface says 1500, so b's big packets are dropped silently at r too.
    let p = unique("dmt");
    let (a, rt, b) = (
        Ns::new(format!("{p}a")),
        Ns::new(format!("{p}r")),
        Ns::new(format!("{p}b")),
    );
    link(&a, "wan0", &rt, "ra");
    link(&rt, "rb", &b, "wan0");
    rt.ip(&["link", "set", "rb", "mtu", "1400"]);
    addr(&a, "wan0", &["10.63.1.1/24"]);
    addr(&rt, "ra", &["10.63.1.2/24"]);
    addr(&rt, "rb", &["10.63.2.2/24"]);
    addr(&b, "wan0", &["10.63.2.1/24"]);
    a.ip(&["route", "add", "default", "via", "10.63.1.2"]);
    b.ip(&["route", "add", "default", "via", "10.63.2.2"]);
    rt.sysctl("net.ipv4.ip_forward=1");
    rt.sh("nft add table inet filt && nft add chain inet filt out '{ type filter hook output priority 0; }' && nft add rule inet filt out icmp type destination-unreachable drop");
    serve_reverse(b.listen(sa("0.0.0.0:5001")));
    let dir = tempfile::tempdir().expect("tempdir");
    let fp_a = keygen(dir.path(), "a");
    let fp_b = keygen(dir.path(), "b");
    let cfg = |me: &str, body: String| {
        let p = dir.path().join(format!("{me}.toml"));
        std::fs::write(&p, body).expect("write");
        p
    };
    let run_pair = |mtu: &str| -> (Daemon, Daemon) {
        let bc = cfg(
            "b",
            format!(
                "[node]\nname = \"b\"\nkey = \"{}\"\nadmin = \"127.0.0.1:9090\"\n[tunnel]\nlisten = \"0.0.0.0:7878\"\nkeepalive = \"500ms\"\n[[peer]]\nname = \"a\"\nfingerprint = \"{fp_a}\"\n",
                dir.path().join("b.key").display()
            ),
        );
        let ac = cfg(
            "a",
            format!(
                "[node]\nname = \"a\"\nkey = \"{}\"\nadmin = \"127.0.0.1:9090\"\n[tunnel]\nkeepalive = \"500ms\"\nconnect_timeout = \"2s\"\n{mtu}\n[[peer]]\nname = \"b\"\naddress = \"10.63.2.1:7878\"\nfingerprint = \"{fp_b}\"\n[[forward]]\nlisten = \"127.0.0.1:6000\"\npeer = \"b\"\ntarget = \"127.0.0.1:5001\"\n",
                dir.path().join("a.key").display()
            ),
        );
        (Daemon::start(&b, &bc), Daemon::start(&a, &ac))
    };
    let tunnel_carries = |a: &Ns| -> bool {
        let up = wait_until(Duration::from_secs(6), || {
            status(a).is_some_and(|s| s["peers"][0]["up"].as_bool() == Some(true))
        });
        up.is_some()
            && a.connect(sa("127.0.0.1:6000"), Duration::from_secs(2))
                .and_then(|s| exchange(s, &payload(1, 2 << 20), Duration::from_secs(6)))
                .unwrap_or(false)
    };
    // Without the clamp, the path black-holes the tunnel (this is what makes the test able to fail).
    let (mut bd, mut ad) = run_pair("");
    assert!(
        !tunnel_carries(&a),
        "the path was supposed to be a black hole"
    );
    ad.kill();
    bd.kill();
    let (_bd, ad) = run_pair("mtu = 1400");
    assert!(tunnel_carries(&a), "clamped tunnel failed:\n{}", ad.log());
}
