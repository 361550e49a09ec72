//! Scale-out, end to end: two appliances per site behind the network's own ECMP and BGP.
//!
//! ```text
//!  c ── ra ══ WAN emulator ══ rb ── servers 10.2.0.1-20 (on rb)
//!       │ \                   │ \
//!       a1  a2                b1  b2
//! ```
//!
//! Site A's router `ra` runs FRR and learns 10.2.0.0/24 by BGP from the near appliances a1 and a2
//! (each runs FRR beside `ditto run`: ditto keeps the prefix in its announce table while it runs,
//! zebra imports that table, bgpd announces it). `ra` spreads client flows over both by ECMP (L4
//! hash); what comes back from an appliance is policy-routed to the WAN. Each near appliance
//! intercepts (tproxy) and sends each destination to its home among the far group b1, b2. Checked:
//!
//! * 100 flows spread over both near appliances (each 35-65%), every byte exact, all accelerated;
//! * data sent through one near appliance is warm through the other;
//! * kill -9 of a near appliance: a flow it carried ends in a reset (never a clean, truncated end),
//!   its prefix is withdrawn within 3 s and new flows are accelerated through the other one; once
//!   it is back, it is announced again.
//!
//! Root and FRR only; skipped otherwise (under CI, missing either fails).

mod common;

use common::frr::{self, Frr};
use common::netns::{
    addr, admin_get, echo_round, link, serve_echo, status, unique, wait_until, Daemon, Ns,
};
use common::wan::Wan;
use serde_json::Value;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const SVC: &str = "10.2.0.0/24";
const PORT: u16 = 5001;
const ANNOUNCE_TABLE: u32 = 188;
const FLOWS: usize = 100;
/// The benchmark's upload sink.
const SINK_PORT: u16 = 5002;

fn skip() -> bool {
    use common::require::skip_without;
    skip_without(common::netns::is_root(), "root (network namespaces)")
        || skip_without(frr::available(), "FRR (Debian package frr: zebra, bgpd)")
}

struct Lab {
    // Daemons first: they stop before the namespaces they run in go.
    near: Vec<Option<Daemon>>,
    far: Vec<Daemon>,
    _frr: Vec<Frr>,
    c: Ns,
    a: Vec<Ns>,
    b: Vec<Ns>,
    wan: Wan,
    _dir: tempfile::TempDir,
    configs: Vec<PathBuf>,
    far_configs: Vec<PathBuf>,
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write config");
    p
}

/// Near appliance `i`: intercepts the service prefix, announces it, sends it to the far group.
fn near_config(dir: &Path, i: usize, fp_b: &[String]) -> PathBuf {
    let mut peers = String::new();
    let mut members = Vec::new();
    for (j, fp) in fp_b.iter().enumerate() {
        peers.push_str(&format!(
            "[[peer]]\nname = \"b{n}\"\naddress = \"10.2{n}.0.2:7878\"\nfingerprint = \"{fp}\"\n\n",
            n = j + 1
        ));
        members.push(format!("\"b{}\"", j + 1));
    }
    let text = format!(
        r#"[node]
name = "a{n}"
key = "{key}"
admin = "127.0.0.1:9090"

[tunnel]
keepalive = "500ms"
connect_timeout = "1s"

[intercept]
mode = "tproxy"
listen = "[::]:7070"
interfaces = ["eth0"]
ports = [{PORT}, {SINK_PORT}]
announce = ["{SVC}"]
announce_table = {ANNOUNCE_TABLE}

{peers}[[group]]
name = "dc2"
members = [{members}]

[[route]]
dest = ["{SVC}"]
peer = "dc2"
"#,
        n = i + 1,
        key = dir.join(format!("a{}.key", i + 1)).display(),
        members = members.join(", "),
    );
    write(dir, &format!("a{}.toml", i + 1), &text)
}

/// Far appliance `i`: accepts every near appliance, keeps a disk store (what summaries describe).
fn far_config(dir: &Path, i: usize, fp_a: &[String]) -> PathBuf {
    let store = dir.join(format!("b{}-store", i + 1));
    let mut peers = String::new();
    for (j, fp) in fp_a.iter().enumerate() {
        peers.push_str(&format!(
            "[[peer]]\nname = \"a{}\"\nfingerprint = \"{fp}\"\n\n",
            j + 1
        ));
    }
    let text = format!(
        r#"[node]
name = "b{n}"
key = "{key}"
admin = "127.0.0.1:9090"
store_dir = "{store}"

[tunnel]
listen = "[::]:7878"
keepalive = "500ms"

{peers}"#,
        n = i + 1,
        key = dir.join(format!("b{}.key", i + 1)).display(),
        store = store.display(),
    );
    write(dir, &format!("b{}.toml", i + 1), &text)
}

impl Lab {
    /// `n` appliances per site (1 or 2), the WAN emulator set to `wan_link`.
    fn new(n: usize, wan_link: &[&str]) -> Lab {
        let wan = Wan::new("so", wan_link);
        let p = unique("so");
        let c = Ns::new(format!("{p}c"));
        let a: Vec<Ns> = (1..=n).map(|i| Ns::new(format!("{p}a{i}"))).collect();
        let b: Vec<Ns> = (1..=n).map(|i| Ns::new(format!("{p}b{i}"))).collect();
        let (ra, rb) = (&wan.a, &wan.b);
        link(&c, "eth0", ra, "c0");
        addr(&c, "eth0", &["10.1.0.2/24"]);
        addr(ra, "c0", &["10.1.0.1/24"]);
        c.ip(&["route", "add", "default", "via", "10.1.0.1"]);
        for (i, ns) in a.iter().enumerate() {
            let dev = format!("a{}", i + 1);
            link(ns, "eth0", ra, &dev);
            addr(ns, "eth0", &[&format!("10.1{}.0.2/24", i + 1)]);
            addr(ra, &dev, &[&format!("10.1{}.0.1/24", i + 1)]);
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("10.1{}.0.1", i + 1),
            ]);
            // Appliances forward what they do not intercept, back out of the interface it came in.
            ns.sysctl("net.ipv4.ip_forward=1");
            ns.sysctl("net.ipv4.conf.all.send_redirects=0");
            ns.sysctl("net.ipv4.conf.eth0.send_redirects=0");
            // What comes back from an appliance goes to the WAN, never to the appliances again.
            ra.ip(&[
                "rule",
                "add",
                "pref",
                &format!("{}", 100 + i),
                "iif",
                &dev,
                "lookup",
                "100",
            ]);
        }
        for (i, ns) in b.iter().enumerate() {
            let dev = format!("b{}", i + 1);
            link(ns, "eth0", rb, &dev);
            addr(ns, "eth0", &[&format!("10.2{}.0.2/24", i + 1)]);
            addr(rb, &dev, &[&format!("10.2{}.0.1/24", i + 1)]);
            ns.ip(&[
                "route",
                "add",
                "default",
                "via",
                &format!("10.2{}.0.1", i + 1),
            ]);
        }
        ra.ip(&["route", "add", "default", "via", "10.64.0.2"]);
        // Only the intercepted prefix: replies to clients from an appliance use the main table.
        ra.ip(&["route", "add", SVC, "via", "10.64.0.2", "table", "100"]);
        rb.ip(&["route", "add", "default", "via", "10.64.0.1"]);
        for r in [ra, rb] {
            r.sysctl("net.ipv4.ip_forward=1");
        }
        // ECMP by the 5-tuple, with a fixed hash seed where the kernel has one.
        ra.sysctl("net.ipv4.fib_multipath_hash_policy=1");
        let _ = ra.try_sh("sysctl -q -w net.ipv4.fib_multipath_hash_seed=12345");
        for x in 1..=20 {
            rb.ip(&["addr", "add", &format!("10.2.0.{x}/32"), "dev", "lo"]);
        }
        serve_echo(rb.listen(SocketAddr::from(([0, 0, 0, 0], PORT))));
        serve_sink(rb.listen(SocketAddr::from(([0, 0, 0, 0], SINK_PORT))));

        let dir = tempfile::tempdir().expect("tempdir");
        // FRR runs as its own user: it reads its configs from here.
        frr::set_mode(dir.path(), 0o755);
        let fp_a: Vec<String> = (1..=n)
            .map(|i| common::keygen(dir.path(), &format!("a{i}")))
            .collect();
        let fp_b: Vec<String> = (1..=n)
            .map(|i| common::keygen(dir.path(), &format!("b{i}")))
            .collect();
        let neighbors: Vec<String> = (1..=n).map(|i| format!("10.1{i}.0.2")).collect();
        let neighbors: Vec<&str> = neighbors.iter().map(String::as_str).collect();
        let mut frrs = vec![Frr::start(
            ra,
            dir.path(),
            "zebra work-queue 0\n",
            &frr::router_bgpd(65000, "10.64.0.1", 65001, &neighbors, SVC, n),
        )];
        for (i, ns) in a.iter().enumerate() {
            frrs.push(Frr::start(
                ns,
                dir.path(),
                &frr::appliance_zebra(ANNOUNCE_TABLE),
                &frr::appliance_bgpd(
                    65001,
                    &format!("10.1{}.0.2", i + 1),
                    &format!("10.1{}.0.1", i + 1),
                    65000,
                    SVC,
                    ANNOUNCE_TABLE,
                ),
            ));
        }
        let far_configs: Vec<PathBuf> = (0..n).map(|i| far_config(dir.path(), i, &fp_a)).collect();
        let far = b
            .iter()
            .zip(&far_configs)
            .map(|(ns, cfg)| Daemon::start(ns, cfg))
            .collect();
        let configs: Vec<PathBuf> = (0..n).map(|i| near_config(dir.path(), i, &fp_b)).collect();
        let near = a
            .iter()
            .zip(&configs)
            .map(|(ns, cfg)| Some(Daemon::start(ns, cfg)))
            .collect();
        Lab {
            near,
            far,
            _frr: frrs,
            c,
            a,
            b,
            wan,
            _dir: dir,
            configs,
            far_configs,
        }
    }

    /// Waits until the site router has a path through every near appliance and every near
    /// appliance reaches every far member.
    fn wait_ready(&self) {
        let want: Vec<String> = (1..=self.a.len()).map(|i| format!("10.1{i}.0.2")).collect();
        let want: Vec<&str> = want.iter().map(String::as_str).collect();
        assert!(
            self.wait_paths(&want, Duration::from_secs(40)).is_some(),
            "ra never learned {SVC} from every appliance: {:?}\n{}",
            self.paths(),
            self.logs()
        );
        let n = self.a.len();
        let up = wait_until(Duration::from_secs(30), || {
            (0..n).all(|i| self.members_up(i) == n)
        });
        assert!(
            up.is_some(),
            "the near appliances never reached every far member\n{}",
            self.logs()
        );
    }

    /// The next hops `ra` routes the service prefix through now.
    fn paths(&self) -> Vec<String> {
        let out = self.wan.a.ip(&["route", "show", SVC]);
        let mut hops: Vec<String> = out
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .filter(|w| w[0] == "via")
            .map(|w| w[1].to_owned())
            .collect();
        hops.sort();
        hops
    }

    fn wait_paths(&self, want: &[&str], within: Duration) -> Option<Duration> {
        wait_until(within, || self.paths() == want)
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for d in self.near.iter().flatten().chain(self.far.iter()) {
            s.push_str(&d.log());
            s.push_str("\n----\n");
        }
        for f in &self._frr {
            s.push_str(&f.log());
            s.push_str("\n----\n");
        }
        s
    }

    /// Flows near appliance `i` has sent to the group, by member.
    fn homed(&self, i: usize) -> u64 {
        status(&self.a[i]).map_or(0, |s| {
            s["groups"][0]["members"].as_array().map_or(0, |m| {
                m.iter().map(|m| m["flows"].as_u64().unwrap_or(0)).sum()
            })
        })
    }

    /// Flows all near appliances homed on far member `j` (0-based), and flows they moved.
    fn member_flows(&self, j: usize) -> (u64, u64) {
        let name = format!("b{}", j + 1);
        let mut t = (0, 0);
        for ns in &self.a {
            if let Some(s) = status(ns) {
                let g = &s["groups"][0];
                t.1 += g["moved"].as_u64().unwrap_or(0);
                if let Some(m) = g["members"].as_array() {
                    t.0 += m
                        .iter()
                        .filter(|m| m["peer"] == Value::String(name.clone()))
                        .map(|m| m["flows"].as_u64().unwrap_or(0))
                        .sum::<u64>();
                }
            }
        }
        t
    }

    /// An open echo connection to `dst` that near appliance `i` carries: source ports from `port0`
    /// are tried (ECMP picks the appliance by them) until one goes through it, at most 16.
    fn open_through(&self, i: usize, dst: &str, port0: u16) -> TcpStream {
        for sport in port0..port0 + 16 {
            let before = self.homed(i);
            let mut s = self.connect(dst, sport).expect("connect");
            s.set_read_timeout(Some(Duration::from_secs(10)))
                .expect("timeout");
            assert!(echo_round(&mut s, b"hello").expect("echo"), "wrong echo");
            if self.homed(i) > before {
                return s;
            }
        }
        panic!("16 source ports, none through a{}", i + 1);
    }

    /// One checked flow to each of the 20 servers from source ports `port0..`; all accelerated.
    fn each_server(&self, port0: u16, seed: u64) {
        for x in 0..20u16 {
            let dst = format!("10.2.0.{}", x + 1);
            let got = self.flow(&dst, port0 + x, &payload(seed + u64::from(x), 5_000));
            assert!(
                got.is_some(),
                "flow to {dst} not accelerated\n{}",
                self.logs()
            );
        }
    }

    fn members_up(&self, i: usize) -> usize {
        status(&self.a[i]).map_or(0, |s| {
            s["groups"][0]["members"].as_array().map_or(0, |m| {
                m.iter().filter(|m| m["up"] == Value::Bool(true)).count()
            })
        })
    }

    /// Chunks of the far stores near appliance `i` knows of from their summaries.
    fn known_chunks(&self, i: usize) -> u64 {
        status(&self.a[i]).map_or(0, |s| {
            s["peers"].as_array().map_or(0, |p| {
                p.iter()
                    .map(|p| p["summary"]["known_chunks"].as_u64().unwrap_or(0))
                    .sum()
            })
        })
    }

    /// A counter without labels, summed over the near (or far) appliances' /metrics.
    fn near_metric(&self, name: &str) -> u64 {
        self.a.iter().map(|ns| metric(ns, name)).sum()
    }

    fn far_metric(&self, name: &str) -> u64 {
        self.b.iter().map(|ns| metric(ns, name)).sum()
    }

    /// WAN bytes near appliance `i` sent, all peers.
    fn wan_sent(&self, i: usize) -> u64 {
        status(&self.a[i]).map_or(0, |s| s["wan_bytes_sent"].as_u64().unwrap_or(0))
    }

    /// A connection from the client to `dst` from source port `sport`.
    fn connect(&self, dst: &str, sport: u16) -> std::io::Result<TcpStream> {
        let to: SocketAddr = format!("{dst}:{PORT}").parse().expect("addr");
        let from = SocketAddr::from(([10, 1, 0, 2], sport));
        self.c.run(move || connect_from(from, to))
    }

    /// One checked echo flow; which near appliance carried it (accelerated), if one did.
    fn flow(&self, dst: &str, sport: u16, data: &[u8]) -> Option<usize> {
        let before = [self.homed(0), self.homed(1)];
        let mut s = self
            .connect(dst, sport)
            .unwrap_or_else(|e| panic!("connect {dst} from port {sport}: {e}\n{}", self.logs()));
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        let ok = echo_round(&mut s, data).unwrap_or_else(|e| panic!("echo {dst}:{sport}: {e}"));
        assert!(ok, "wrong bytes back from {dst} (source port {sport})");
        drop(s);
        let after = [self.homed(0), self.homed(1)];
        (0..2).find(|&i| after[i] > before[i])
    }
}

/// A counter without labels from the admin endpoint in `ns` (0 when absent).
fn metric(ns: &Ns, name: &str) -> u64 {
    let m = admin_get(ns, "/metrics").unwrap_or_default();
    common::series_value(&m, name).map_or(0, |v| v as u64)
}

fn payload(seed: u64, n: usize) -> Vec<u8> {
    common::payload(seed, n)
}

/// Upload sink: reads each connection to its end, then answers with the byte count (8 bytes).
fn serve_sink(l: std::net::TcpListener) {
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(mut s) = s else { return };
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 256 * 1024];
                let mut n = 0u64;
                loop {
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(k) => n += k as u64,
                        Err(_) => return,
                    }
                }
                let _ = std::io::Write::write_all(&mut s, &n.to_be_bytes());
            });
        }
    });
}

/// One pass of the benchmark: `data.len()` concurrent uploads from source ports `port0..`, each to
/// its own server; returns (seconds, WAN bytes the near appliances sent).
fn upload_pass(lab: &Lab, data: &[Vec<u8>], port0: u16) -> (f64, u64) {
    let wan0: u64 = (0..lab.a.len()).map(|i| lab.wan_sent(i)).sum();
    let t = Instant::now();
    std::thread::scope(|scope| {
        let uploads: Vec<_> = data
            .iter()
            .enumerate()
            .map(|(k, d)| {
                let to: SocketAddr = format!("10.2.0.{}:{SINK_PORT}", k + 1)
                    .parse()
                    .expect("addr");
                let from = SocketAddr::from(([10, 1, 0, 2], port0 + k as u16));
                let d = d.clone();
                scope.spawn(move || lab.c.run(move || upload(from, to, &d)))
            })
            .collect();
        for u in uploads {
            u.join().expect("upload thread").expect("upload");
        }
    });
    let secs = t.elapsed().as_secs_f64();
    // Counters are read after every flow ended.
    let wan: u64 = (0..lab.a.len()).map(|i| lab.wan_sent(i)).sum();
    (secs, wan - wan0)
}

/// A connection to `to` from the chosen source address and port (ECMP hashes on it).
fn connect_from(from: SocketAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&from.into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(5))?;
    Ok(TcpStream::from(s))
}

/// Uploads `data` from `from` to `to` (from inside the client's namespace); checks the sink's count.
fn upload(from: SocketAddr, to: SocketAddr, data: &[u8]) -> std::io::Result<()> {
    let mut s = connect_from(from, to)?;
    std::io::Write::write_all(&mut s, data)?;
    s.shutdown(std::net::Shutdown::Write)?;
    let mut n = [0u8; 8];
    s.read_exact(&mut n)?;
    if u64::from_be_bytes(n) != data.len() as u64 {
        return Err(std::io::Error::other("the sink counted other bytes"));
    }
    Ok(())
}

/// The scale-out benchmark (release build: `cargo test --release --test scale_out -- --ignored
/// --nocapture`): aggregate upload throughput of 8 concurrent flows with 1 and 2 appliances per
/// site, with no link limit and on an emulated 1 Gbit/s link, and the WAN bytes of the same
/// uploads repeated (through whichever near appliance ECMP picks this time) against a single pair.
#[test]
#[ignore]
fn scale_out_benchmark() {
    if skip() {
        return;
    }
    const FLOWS: usize = 8;
    const EACH: usize = 32 << 20;
    let data: Vec<Vec<u8>> = (0..FLOWS).map(|k| payload(7000 + k as u64, EACH)).collect();
    let total = (FLOWS * EACH) as f64;
    println!("| link | appliances per site | pass 1 Mbit/s | pass 1 WAN MB | repeat Mbit/s | repeat WAN MB | repeat / pass 1 |");
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (name, link) in [
        ("no limit, 1 ms", &["--delay", "1ms"][..]),
        (
            "1 Gbit/s, 10 ms",
            &["--rate", "1gbit", "--delay", "10ms"][..],
        ),
    ] {
        for n in [1, 2] {
            let lab = Lab::new(n, link);
            lab.wait_ready();
            let (t1, w1) = upload_pass(&lab, &data, 50_000);
            // The far stores' summaries reach every near appliance (at most 2 s after a change).
            std::thread::sleep(Duration::from_secs(4));
            let needs0 = lab.near_metric("ditto_dedup_needs_total");
            let (t2, w2) = upload_pass(&lab, &data, 51_000);
            eprintln!(
                "  ({name}, {n} per site: repeat asked back {} references; far stores skipped {} \
                 writes in all)",
                lab.near_metric("ditto_dedup_needs_total") - needs0,
                lab.far_metric("ditto_store_writes_skipped_total"),
            );
            println!(
                "| {name} | {n} | {:.0} | {:.1} | {:.0} | {:.2} | {:.4} |",
                total * 8.0 / t1 / 1e6,
                w1 as f64 / 1e6,
                total * 8.0 / t2 / 1e6,
                w2 as f64 / 1e6,
                w2 as f64 / w1 as f64
            );
        }
    }
}

#[test]
fn near_appliances_share_flows_by_ecmp_and_fail_over_by_bgp() {
    if skip() {
        return;
    }
    let mut lab = Lab::new(2, &["--rate", "500mbit", "--delay", "5ms"]);
    let both = ["10.11.0.2", "10.12.0.2"];
    lab.wait_ready();

    // 1. Flows spread over both near appliances, every byte checked, all accelerated.
    let mut via = [Vec::new(), Vec::new()];
    for i in 0..FLOWS {
        let dst = format!("10.2.0.{}", i % 20 + 1);
        let sport = 41_000 + i as u16;
        let data = payload(i as u64, 2_000 + i * 10);
        match lab.flow(&dst, sport, &data) {
            Some(n) => via[n].push(sport),
            None => panic!("flow {i} to {dst} was not accelerated\n{}", lab.logs()),
        }
    }
    eprintln!(
        "{FLOWS} flows: a1 carried {}, a2 {}",
        via[0].len(),
        via[1].len()
    );
    for v in &via {
        assert!(
            (FLOWS * 35 / 100..=FLOWS * 65 / 100).contains(&v.len()),
            "uneven ECMP spread: a1 {} / a2 {}",
            via[0].len(),
            via[1].len()
        );
    }

    // 2. Warm through the other appliance: 2 MiB to one server through whichever appliance ECMP
    // picks (cold), then the same bytes again until a flow goes through the other one, once that
    // one has heard from the far stores what they hold.
    let big = payload(4242, 2 << 20);
    let (x0, y0) = (lab.wan_sent(0), lab.wan_sent(1));
    let first = lab.flow("10.2.0.9", 45_000, &big).expect("accelerated");
    let cold = [lab.wan_sent(0) - x0, lab.wan_sent(1) - y0][first];
    let other = 1 - first;
    let learned = wait_until(Duration::from_secs(30), || lab.known_chunks(other) >= 400);
    assert!(
        learned.is_some(),
        "a{} never learned the far stores' chunks\n{}",
        other + 1,
        lab.logs()
    );
    let mut warm = None;
    for sport in 45_001..45_017 {
        let before = lab.wan_sent(other);
        if lab.flow("10.2.0.9", sport, &big) == Some(other) {
            warm = Some(lab.wan_sent(other) - before);
            break;
        }
    }
    let warm = warm.expect("16 source ports, none through the other appliance");
    eprintln!(
        "2 MiB: cold through a{} {cold} WAN bytes, again through a{} {warm}",
        first + 1,
        other + 1
    );
    assert!(cold > 1 << 20, "cold send only {cold} WAN bytes");
    assert!(
        warm < cold / 10,
        "not warm through the other appliance: {warm} of {cold}"
    );

    // 3. A far member goes away: only its destinations move, to the other member, and come back
    // when it returns; every flow accelerated and byte-exact throughout.
    let (b1_0, moved0) = lab.member_flows(0);
    let (b2_0, _) = lab.member_flows(1);
    lab.far[0].kill();
    let gone = wait_until(Duration::from_secs(10), || {
        lab.members_up(0) == 1 && lab.members_up(1) == 1
    });
    assert!(gone.is_some(), "b1's death never seen\n{}", lab.logs());
    lab.each_server(46_000, 3000);
    let (b1_1, moved1) = lab.member_flows(0);
    let (b2_1, _) = lab.member_flows(1);
    let moved = moved1 - moved0;
    assert_eq!(
        (b1_1 - b1_0, b2_1 - b2_0),
        (0, 20),
        "with b1 gone, b2 carries all"
    );
    assert!(
        (1..20).contains(&moved),
        "{moved} of 20 destinations moved: b1 was home to some, not all"
    );
    lab.far[0] = Daemon::start(&lab.b[0], &lab.far_configs[0]);
    let back = wait_until(Duration::from_secs(30), || {
        lab.members_up(0) == 2 && lab.members_up(1) == 2
    });
    assert!(back.is_some(), "b1 never came back\n{}", lab.logs());
    lab.each_server(46_100, 3100);
    let (b1_2, moved2) = lab.member_flows(0);
    assert_eq!(moved2, moved1, "flows moved with every member up");
    assert_eq!(
        b1_2 - b1_1,
        moved,
        "b1 got back exactly the destinations that had moved"
    );
    eprintln!("b1 away: {moved} of 20 destinations moved to b2, and back when it returned");

    // 4. kill -9 of a1 while it carries a flow.
    let mut held = lab.open_through(0, "10.2.0.3", 47_000);
    let t0 = Instant::now();
    lab.near[0].as_mut().expect("a1").kill();
    // The flow a1 carried ends in a reset: never an orderly end of a stream cut short. (Only a
    // read: the first call after a reset reports it, later ones see a closed socket.)
    let mut buf = [0u8; 64];
    match held.read(&mut buf) {
        Err(e) => eprintln!("the flow a1 carried ended with: {e}"),
        Ok(n) => panic!("the flow a1 carried ended without a reset (read {n} bytes)"),
    }
    let withdrawn = lab.wait_paths(&["10.12.0.2"], Duration::from_secs(3));
    assert!(
        withdrawn.is_some(),
        "a1's prefix still announced 3 s after it died: {:?}\n{}",
        lab.paths(),
        lab.logs()
    );
    eprintln!("a1 killed: withdrawn from ra after {:?}", t0.elapsed());
    for i in 0..20u16 {
        let dst = format!("10.2.0.{}", i + 1);
        let got = lab.flow(&dst, 48_000 + i, &payload(900 + u64::from(i), 3_000));
        assert_eq!(
            got,
            Some(1),
            "flow to {dst} after a1 died not accelerated by a2"
        );
    }
    eprintln!(
        "20 new flows accelerated through a2, {:?} after the kill",
        t0.elapsed()
    );

    // 5. a1 returns and is announced again.
    lab.near[0] = Some(Daemon::start(&lab.a[0], &lab.configs[0]));
    assert!(
        lab.wait_paths(&both, Duration::from_secs(30)).is_some(),
        "a1 never announced again: {:?}\n{}",
        lab.paths(),
        lab.logs()
    );

    // 6. A graceful stop (SIGTERM) drains: a flow a1 carries goes on until its client ends it, and
    // only then is the prefix withdrawn (withdrawn first, the flow's packets would go to a2).
    let mut draining = lab.open_through(0, "10.2.0.4", 49_000);
    lab.near[0].as_ref().expect("a1").signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        lab.paths(),
        both,
        "a1 withdrawn while a flow was still draining"
    );
    let more = payload(77, 200_000);
    assert!(
        echo_round(&mut draining, &more).expect("the draining flow"),
        "wrong bytes from the draining flow"
    );
    drop(draining);
    assert!(
        lab.wait_paths(&["10.12.0.2"], Duration::from_secs(5))
            .is_some(),
        "a1 still announced after its drain: {:?}\n{}",
        lab.paths(),
        lab.logs()
    );
    let a1 = lab.near[0].as_mut().expect("a1");
    assert!(
        wait_until(Duration::from_secs(10), || a1.exited()).is_some(),
        "a1 did not exit after its drain:\n{}",
        a1.log()
    );
}
