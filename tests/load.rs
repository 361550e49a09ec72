//! A ditto pair under load and under attack, end to end: two real `ditto run` daemons on loopback.
//!
//! * 3,000 concurrent echo flows through the pair: every one accelerated (metrics), none reset or
//!   hung, and both daemons' open files back to where they were once the flows closed;
//! * the tunnel port held by 300 idle connections from one address and by connections from 40 more
//!   addresses (all reconnecting as soon as they are closed): a restarted peer's tunnel is up again
//!   within a few seconds;
//! * past a (small) `tunnel.max_flows`, a flow passes through: it works, it is counted with reason
//!   `max-flows`, and the daemon says which limit and what to change;
//! * past the far side's `tunnel.max_flows`, the streams it refuses (busy) pass through from the
//!   near side with every byte the client already sent, half-close included: never a reset.
//!
//! Loopback only (127.0.0.0/8 gives the attackers their own source addresses); no root needed.
//! Figures are printed; run with `--nocapture` to see them.

mod common;

use common::{free_port, key, Proc};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// A pair on loopback: site-b listens for the tunnel, site-a dials it and forwards to `target`.
struct Pair {
    dir: tempfile::TempDir,
    a: Option<Proc>,
    b: Proc,
    cfg_a: PathBuf,
    tunnel: SocketAddr,
    admin_a: SocketAddr,
    admin_b: SocketAddr,
    fwd: SocketAddr,
    restarts: u32,
}

fn spawn(cfg: &Path, log: &Path) -> Proc {
    let f = std::fs::File::create(log).expect("log file");
    Proc(
        common::ditto()
            .args(["run", "--config"])
            .arg(cfg)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .expect("spawn ditto run"),
    )
}

impl Pair {
    /// `a_tunnel`, `b_tunnel`: lines added to each site's `[tunnel]` section.
    fn start(target: SocketAddr, a_tunnel: &str, b_tunnel: &str) -> Pair {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let fp_a = key(d, "a");
        let fp_b = key(d, "b");
        let (tunnel, admin_a, admin_b, fwd) = (free_port(), free_port(), free_port(), free_port());
        let cfg_b = d.join("b.toml");
        std::fs::write(
            &cfg_b,
            format!(
                "[node]\nname = \"site-b\"\nkey = \"b.key\"\nadmin = \"{admin_b}\"\n\n\
                 [tunnel]\nlisten = \"{tunnel}\"\n{b_tunnel}\n\n[[peer]]\nname = \"site-a\"\nfingerprint = \"{fp_a}\"\n"
            ),
        )
        .expect("write config");
        let cfg_a = d.join("a.toml");
        std::fs::write(
            &cfg_a,
            format!(
                "[node]\nname = \"site-a\"\nkey = \"a.key\"\nadmin = \"{admin_a}\"\n\n\
                 [tunnel]\n{a_tunnel}\n\n[[peer]]\nname = \"site-b\"\naddress = \"{tunnel}\"\n\
                 fingerprint = \"{fp_b}\"\n\n[[forward]]\nlisten = \"{fwd}\"\npeer = \"site-b\"\n\
                 target = \"{target}\"\n"
            ),
        )
        .expect("write config");
        let b = spawn(&cfg_b, &d.join("b.log"));
        let a = spawn(&cfg_a, &d.join("a.log"));
        let p = Pair {
            dir,
            a: Some(a),
            b,
            cfg_a,
            tunnel,
            admin_a,
            admin_b,
            fwd,
            restarts: 0,
        };
        let up = common::netns::wait_until(Duration::from_secs(30), || p.tunnel_up());
        assert!(up.is_some(), "tunnel never came up\n{}", p.logs());
        p
    }

    fn tunnel_up(&self) -> bool {
        common::http_get(self.admin_a, "/status")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|s| s["peers"][0]["up"].as_bool() == Some(true))
    }

    fn pids(&self) -> (u32, u32) {
        (self.a.as_ref().map_or(0, |a| a.0.id()), self.b.0.id())
    }

    /// SIGKILLs site-a and starts it again (a new process, a new session).
    fn restart_a(&mut self) {
        drop(self.a.take());
        self.restarts += 1;
        let log = self.dir.path().join(format!("a-{}.log", self.restarts));
        self.a = Some(spawn(&self.cfg_a, &log));
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }

    fn logs(&self) -> String {
        let mut s = String::new();
        for f in ["a.log", "b.log", "a-1.log"] {
            let l = self.log(f);
            let lines: Vec<&str> = l.lines().collect();
            s += &format!(
                "--- {f} (tail) ---\n{}\n",
                lines[lines.len().saturating_sub(15)..].join("\n")
            );
        }
        s
    }

    /// Both sides' flow, stream-reset, limit and link series: what a failed count is read against.
    fn counters(&self) -> String {
        let mut s = String::new();
        for (side, admin) in [("a", self.admin_a), ("b", self.admin_b)] {
            let m = common::http_get(admin, "/metrics")
                .map(|r| r.1)
                .unwrap_or_default();
            s += &format!("--- site-{side} counters ---\n");
            for l in m.lines().filter(|l| {
                [
                    "ditto_flows_total",
                    "ditto_stream_resets_total",
                    "ditto_limit",
                    "ditto_tunnel_",
                ]
                .iter()
                .any(|p| l.starts_with(p))
            }) {
                s += l;
                s.push('\n');
            }
        }
        s
    }

    fn metric(&self, admin: SocketAddr, series: &str) -> f64 {
        let m = common::http_get(admin, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        common::series_value(&m, series).unwrap_or(0.0)
    }

    /// Site A's `ditto_flows_total{outcome, reason}`.
    fn flows(&self, outcome: &str, reason: &str) -> f64 {
        self.metric(
            self.admin_a,
            &format!("ditto_flows_total{{outcome=\"{outcome}\",reason=\"{reason}\"}}"),
        )
    }

    /// Sum of every `ditto_flows_total{outcome="passthrough",...}` series.
    fn passed_through(&self, admin: SocketAddr) -> f64 {
        let m = common::http_get(admin, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        m.lines()
            .filter(|l| l.starts_with("ditto_flows_total{outcome=\"passthrough\""))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Echoes every byte back as it arrives, for every connection, until the runtime stops.
async fn echo_server() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
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
    addr
}

/// Connects from `src` (any port).
async fn connect_from(src: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpSocket::new_v4()?;
    s.bind(SocketAddr::new(src, 0))?;
    s.connect(to).await
}

fn kind(e: &std::io::Error) -> &'static str {
    use std::io::ErrorKind::*;
    match e.kind() {
        ConnectionReset | ConnectionAborted | BrokenPipe => "reset",
        TimedOut | WouldBlock => "hung",
        ConnectionRefused => "refused",
        UnexpectedEof => "eof",
        _ => "other",
    }
}

/// `n` echo flows at once through `fwd`: each connects, sends 1 KiB, reads it back, then waits for
/// all the others, so that all `n` are open at once, and closes. Source addresses rotate over
/// 127.0.0.1-8 (ports of one address suffice, but a real burst comes from many hosts). Flow `i`
/// sends payload `i % payloads`. Returns each flow's echo time or what went wrong.
fn echo_burst(
    rt: &tokio::runtime::Runtime,
    fwd: SocketAddr,
    n: usize,
    payloads: usize,
    echoed: &Arc<AtomicU64>,
) -> Vec<Result<Duration, String>> {
    rt.block_on(async {
        let all_open = Arc::new(tokio::sync::Barrier::new(n));
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (all_open, echoed) = (all_open.clone(), echoed.clone());
            tasks.push(tokio::spawn(async move {
                let run = async {
                    let start = Instant::now();
                    let src = IpAddr::from([127, 0, 0, 1 + (i % 8) as u8]);
                    let mut s = connect_from(src, fwd).await.map_err(|e| kind(&e))?;
                    let msg = common::payload((i % payloads) as u64, 1024);
                    s.write_all(&msg).await.map_err(|e| kind(&e))?;
                    let mut got = vec![0u8; msg.len()];
                    s.read_exact(&mut got).await.map_err(|e| kind(&e))?;
                    if got != msg {
                        return Err("corrupt");
                    }
                    let took = start.elapsed();
                    echoed.fetch_add(1, Relaxed);
                    all_open.wait().await;
                    s.shutdown().await.map_err(|e| kind(&e))?;
                    let mut rest = Vec::new();
                    s.read_to_end(&mut rest).await.map_err(|e| kind(&e))?;
                    Ok(took)
                };
                match tokio::time::timeout(Duration::from_secs(90), run).await {
                    Ok(r) => r.map_err(str::to_owned),
                    Err(_) => Err("hung".to_owned()),
                }
            }));
        }
        let mut out = Vec::with_capacity(n);
        for t in tasks {
            out.push(t.await.unwrap_or_else(|_| Err("panicked".into())));
        }
        out
    })
}

/// RSS after a burst may be at most this much of what it was before it (the issue asks 1.5x; a
/// node keeping its runtime workers' allocator caches was at 1.4-2x, one that flushes them at
/// about 1.1x).
const RSS_AFTER_BURST: f64 = 1.25;

#[test]
fn three_thousand_concurrent_echo_flows_all_accelerated() {
    const FLOWS: usize = 3000;
    let nofile = ditto_bench::sys::raise_nofile();
    if common::require::skip_without(
        nofile >= 4 * FLOWS as u64,
        "an open file limit of 12,000 (ulimit -Hn)",
    ) {
        return;
    }
    let rt = rt();
    let target = rt.block_on(echo_server());
    let pair = Pair::start(target, "", "");
    let (pa, pb) = pair.pids();
    let echoed = Arc::new(AtomicU64::new(0));
    // A hundred flows first, so that "before" is a node that has carried traffic (its code paged
    // in, its first-use tables made), not one that has carried nothing. The burst sends the same
    // hundred payloads again, so that what the nodes keep afterwards is not new chunks in their
    // stores (a cache that fills is no leak) but what the flows themselves left behind.
    const PAYLOADS: usize = 100;
    let warm = echo_burst(&rt, pair.fwd, PAYLOADS, PAYLOADS, &echoed);
    assert!(warm.iter().all(|r| r.is_ok()), "warm-up: {warm:?}");
    std::thread::sleep(Duration::from_secs(2));
    let base = (fds(pa), fds(pb));
    let rss = |pid: u32| common::rss_kib(pid).expect("VmRSS of a running daemon");
    let rss_before = (rss(pa), rss(pb));
    let alloc_before = (Allocator::of(pair.admin_a), Allocator::of(pair.admin_b));
    assert!(
        alloc_before.0.allocated > 0 && alloc_before.1.allocated > 0,
        "no ditto_allocator_bytes"
    );
    let t0 = Instant::now();
    let results = echo_burst(&rt, pair.fwd, FLOWS, PAYLOADS, &echoed);
    let elapsed = t0.elapsed();
    let mut failures = std::collections::BTreeMap::<String, usize>::new();
    let mut lat: Vec<Duration> = Vec::new();
    for r in &results {
        match r {
            Ok(d) => lat.push(*d),
            Err(k) => *failures.entry(k.clone()).or_default() += 1,
        }
    }
    lat.sort();
    let pct = |p: f64| lat.get(((lat.len() as f64 * p) as usize).min(lat.len().saturating_sub(1)));
    println!(
        "{FLOWS} concurrent echo flows: {} ok in {:.2} s, failures {failures:?}, \
         echo latency p50 {:?} p99 {:?}",
        lat.len(),
        elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99)
    );
    assert!(
        failures.is_empty(),
        "failures by kind: {failures:?} (echoed {})\n{}",
        echoed.load(Relaxed),
        pair.logs()
    );
    let accelerated = pair.metric(
        pair.admin_a,
        "ditto_flows_total{outcome=\"accelerated\",reason=\"forward\"}",
    );
    let far = pair.metric(
        pair.admin_b,
        "ditto_flows_total{outcome=\"accelerated\",reason=\"from-peer\"}",
    );
    let all = (FLOWS + warm.len()) as f64;
    assert_eq!(
        (accelerated, far, pair.passed_through(pair.admin_a)),
        (all, all, 0.0),
        "(accelerated at A, at B, passed through at A)\n{}",
        pair.logs()
    );
    // Every socket of every flow is closed again, at both ends.
    let back = common::netns::wait_until(Duration::from_secs(30), || {
        fds(pa) <= base.0 + 2 && fds(pb) <= base.1 + 2
    });
    println!(
        "open files: site-a {} -> {}, site-b {} -> {}",
        base.0,
        fds(pa),
        base.1,
        fds(pb)
    );
    assert!(
        back.is_some(),
        "open files not back to baseline: site-a {} (was {}), site-b {} (was {})",
        fds(pa),
        base.0,
        fds(pb),
        base.1
    );
    // And the memory the burst took is given back: RSS, and in the allocator's own figures
    // (`ditto_allocator_bytes`), live objects (a flow that leaves state behind) and pages kept
    // beyond them (caches of idle threads, which held 3-6 MiB here before they were flushed). The
    // allocator returns freed pages over about 10 s; bounded wait.
    // Nothing asks the daemons anything meanwhile: requests make their threads allocate, and an
    // allocating thread trims its cache by itself, which would hide an idle one that never does.
    let limit = |before: u64| (before as f64 * RSS_AFTER_BURST) as u64;
    std::thread::sleep(Duration::from_secs(15));
    let rss_back = common::netns::wait_until(Duration::from_secs(45), || {
        rss(pa) <= limit(rss_before.0) && rss(pb) <= limit(rss_before.1)
    });
    let kept = |admin, before: &Allocator| {
        let now = Allocator::of(admin);
        now.allocated <= before.allocated + LIVE_PER_FLOW * FLOWS as u64
            && now.slack() <= before.slack() + SLACK_GROWTH
    };
    let settled = rss_back.is_some()
        && kept(pair.admin_a, &alloc_before.0)
        && kept(pair.admin_b, &alloc_before.1);
    let alloc_after = (Allocator::of(pair.admin_a), Allocator::of(pair.admin_b));
    let report = format!(
        "RSS: site-a {} -> {} KiB, site-b {} -> {} KiB; allocator live / kept beyond live: \
         site-a {:?} -> {:?}, site-b {:?} -> {:?} KiB ({:.1} s after the burst)",
        rss_before.0,
        rss(pa),
        rss_before.1,
        rss(pb),
        alloc_before.0.kib(),
        alloc_after.0.kib(),
        alloc_before.1.kib(),
        alloc_after.1.kib(),
        t0.elapsed().as_secs_f64()
    );
    println!("{report}");
    assert!(
        settled,
        "memory not given back after the burst (RSS at most {RSS_AFTER_BURST}x, live objects at \
         most {LIVE_PER_FLOW} bytes per flow more, pages kept beyond them at most \
         {SLACK_GROWTH} bytes more): {report}"
    );
}

/// Live objects a finished flow may leave behind, at most (200-250 bytes measured: its stream's
/// tombstone, table capacity, tunnel read buffers still referenced; a flow's own state is
/// kilobytes).
const LIVE_PER_FLOW: u64 = 512;
/// Pages the allocator may keep beyond its live objects after a burst, more than before it.
const SLACK_GROWTH: u64 = 1 << 20;

/// A node's `ditto_allocator_bytes`: live objects, and the pages holding them.
#[derive(Default)]
struct Allocator {
    allocated: u64,
    active: u64,
}

impl Allocator {
    fn of(admin: SocketAddr) -> Allocator {
        let m = common::http_get(admin, "/metrics")
            .map(|r| r.1)
            .unwrap_or_default();
        let get = |kind: &str| {
            common::series_value(&m, &format!("ditto_allocator_bytes{{kind=\"{kind}\"}}"))
                .unwrap_or(0.0) as u64
        };
        Allocator {
            allocated: get("allocated"),
            active: get("active"),
        }
    }

    /// Pages the allocator keeps beyond its live objects.
    fn slack(&self) -> u64 {
        self.active.saturating_sub(self.allocated)
    }

    fn kib(&self) -> (u64, u64) {
        (self.allocated >> 10, self.slack() >> 10)
    }
}

/// Idle connections to `to` from `src`, `n` at once, each reopened as soon as the server closes it
/// (at most every 50 ms), until `stop`. Returns how many connects succeeded.
async fn hold_idle(src: IpAddr, to: SocketAddr, n: usize, stop: Arc<AtomicBool>) -> u64 {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut opened = 0u64;
            let mut buf = [0u8; 64];
            while !stop.load(Relaxed) {
                if let Ok(mut s) = connect_from(src, to).await {
                    opened += 1;
                    // Idle: wait for the server to close (or for the test to end).
                    loop {
                        match tokio::time::timeout(Duration::from_millis(200), s.read(&mut buf))
                            .await
                        {
                            Ok(Ok(0) | Err(_)) => break,
                            Ok(Ok(_)) => {}
                            Err(_) if stop.load(Relaxed) => break,
                            Err(_) => {}
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            opened
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.unwrap_or(0);
    }
    total
}

#[test]
fn idle_unauthenticated_connections_do_not_keep_a_restarting_peer_out() {
    const ONE_SOURCE: usize = 300;
    const SOURCES: u8 = 40;
    const PER_SOURCE: usize = 10;
    ditto_bench::sys::raise_nofile();
    let rt = rt();
    let target = rt.block_on(echo_server());
    let mut pair = Pair::start(target, "", "");
    let stop = Arc::new(AtomicBool::new(false));
    // 300 from 127.0.0.2, and 10 each from 127.0.1.1-40: more than the global cap (256) in all.
    let mut attackers = Vec::new();
    attackers.push(rt.spawn(hold_idle(
        IpAddr::from([127, 0, 0, 2]),
        pair.tunnel,
        ONE_SOURCE,
        stop.clone(),
    )));
    for i in 1..=SOURCES {
        attackers.push(rt.spawn(hold_idle(
            IpAddr::from([127, 0, 1, i]),
            pair.tunnel,
            PER_SOURCE,
            stop.clone(),
        )));
    }
    // Let the attack settle in: every slot it can get is taken.
    std::thread::sleep(Duration::from_secs(3));
    let t0 = Instant::now();
    pair.restart_a();
    let up = common::netns::wait_until(Duration::from_secs(30), || pair.tunnel_up());
    stop.store(true, Relaxed);
    let opened: u64 = rt.block_on(async {
        let mut n = 0;
        for a in attackers {
            n += a.await.unwrap_or(0);
        }
        n
    });
    let closed = |why: &str| {
        pair.metric(
            pair.admin_b,
            &format!("ditto_preauth_closed_total{{listener=\"tunnel\",why=\"{why}\"}}"),
        )
    };
    println!(
        "restarted peer's tunnel up after {:?} (attack: {opened} connections opened; closed by \
         site-b: {} per-source, {} evicted, {} timed out)",
        up,
        closed("per-source"),
        closed("evicted"),
        closed("timeout")
    );
    let up = up.unwrap_or_else(|| panic!("tunnel not back within 30 s\n{}", pair.logs()));
    assert!(
        up < Duration::from_secs(5),
        "tunnel back only after {up:?} (started {:?} ago)\n{}",
        t0.elapsed(),
        pair.logs()
    );
    assert!(
        closed("per-source") > 0.0 && closed("evicted") > 0.0,
        "the attack should have hit both caps\n{}",
        pair.logs()
    );
    assert!(pair
        .log("b.log")
        .contains("unauthenticated tunnel connections"));
}

#[test]
fn flows_past_max_flows_pass_through_counted_and_logged() {
    const MAX: usize = 3;
    let rt = rt();
    let target = rt.block_on(echo_server());
    let pair = Pair::start(target, &format!("max_flows = {MAX}"), "");
    rt.block_on(async {
        // MAX flows held open (accelerated), then two more: they work, unaccelerated.
        let mut held = Vec::new();
        for i in 0..MAX + 2 {
            let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(pair.fwd))
                .await
                .expect("connect in time")
                .expect("connect");
            let msg = common::payload(i as u64, 100);
            s.write_all(&msg).await.expect("write");
            let mut got = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("flow {i} hung\n{}", pair.logs()))
                .unwrap_or_else(|e| panic!("flow {i}: {e}\n{}", pair.logs()));
            assert_eq!(got, msg, "flow {i}");
            held.push(s);
        }
        // Site-b's own flows still hold its limit: had one of them ended, a stream from site-a
        // could have been taken, and the counts below would not say why.
        for (i, s) in held.iter_mut().take(MAX).enumerate() {
            s.write_all(b"live").await.expect("write");
            let mut got = [0u8; 4];
            let r = tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got)).await;
            assert!(
                matches!(r, Ok(Ok(_))) && &got == b"live",
                "site-b flow {i} died while held: {r:?}\n{}{}",
                pair.counters(),
                pair.logs()
            );
        }
    });
    let m = |o: &str, r: &str| pair.flows(o, r);
    assert_eq!(
        (m("accelerated", "forward"), m("passthrough", "max-flows")),
        (MAX as f64, 2.0),
        "{}",
        pair.logs()
    );
    let log = pair.log("a.log");
    assert!(
        log.contains("flow limit reached (3)") && log.contains("tunnel.max_flows"),
        "no warning naming the limit in site-a's log:\n{log}"
    );
    // One line, not one per flow.
    assert_eq!(log.matches("flow limit reached").count(), 1, "{log}");
}

#[test]
fn flows_the_far_side_refuses_pass_through_with_their_bytes() {
    const MAX: usize = 2;
    let rt = rt();
    let target = rt.block_on(echo_server());
    // Site-b's own clients (through a forward of its own) hold its flow limit: the streams site-a
    // opens are refused there (busy), which site-a cannot see coming (its peer's stream limit is
    // not reached).
    let fwd_b = free_port();
    let pair = Pair::start(
        target,
        "",
        &format!(
            "max_flows = {MAX}\n\n[[forward]]\nlisten = \"{fwd_b}\"\npeer = \"site-a\"\n\
             target = \"{target}\""
        ),
    );
    rt.block_on(async {
        let mut held = Vec::new();
        for i in 0..MAX {
            let mut s = TcpStream::connect(fwd_b).await.expect("connect");
            s.write_all(b"hold").await.expect("write");
            let mut got = [0u8; 4];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("site-b flow {i} hung\n{}", pair.logs()))
                .expect("site-b flow");
            held.push(s);
        }
        for i in 0..3 {
            let mut s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(pair.fwd))
                .await
                .expect("connect in time")
                .expect("connect");
            // Several writes (the first may travel in the OPEN, the rest after it), 40 KiB in
            // all; the last refused flow half-closes before anything comes back.
            let msg = common::payload(i as u64, 40 * 1024);
            for part in msg.chunks(10 * 1024) {
                s.write_all(part).await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if i == 2 {
                s.shutdown().await.expect("half-close");
            }
            let mut got = vec![0u8; msg.len()];
            tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut got))
                .await
                .unwrap_or_else(|_| panic!("flow {i} hung\n{}", pair.logs()))
                .unwrap_or_else(|e| panic!("flow {i}: {e}\n{}", pair.logs()));
            assert!(got == msg, "flow {i}: the echo differs from what was sent");
            if i == 2 {
                let mut rest = Vec::new();
                let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest))
                    .await
                    .expect("the half-closed flow ends")
                    .expect("ends cleanly, not reset");
                assert_eq!(n, 0);
            }
            held.push(s);
        }
    });
    let m = |o: &str, r: &str| pair.flows(o, r);
    assert_eq!(
        (m("accelerated", "forward"), m("passthrough", "peer-busy")),
        // Opened through the tunnel, refused there, carried on directly.
        (3.0, 3.0),
        "{}{}",
        pair.counters(),
        pair.logs()
    );
    let resets = pair.metric(pair.admin_a, "ditto_stream_resets_total{reason=\"busy\"}");
    assert_eq!(resets, 0.0, "no client was reset\n{}", pair.logs());
    let log = pair.log("a.log");
    assert!(
        log.contains("peer's flow limit reached: ") && log.contains("(on the peer)"),
        "no warning naming the peer's limit in site-a's log:\n{log}"
    );
}
