//! CI smoke test of the emulator and the topology: needs root (namespaces, TUN); skipped otherwise
//! (a failure under CI, see `tests/common/require.rs`). Every run uses its own namespace prefix, so
//! parallel runs of this test do not collide, and the topology is removed by a drop guard even on
//! failure.

use ditto_bench::linktest::{self, LinktestArgs};
use ditto_bench::sys;
use ditto_bench::topo::{Role, Topo, TopoGuard};
use std::path::{Path, PathBuf};

fn bins() -> (PathBuf, PathBuf) {
    (
        PathBuf::from(env!("CARGO_BIN_EXE_ditto-bench")),
        PathBuf::from(env!("CARGO_BIN_EXE_ditto-wanem")),
    )
}

#[path = "../../tests/common/require.rs"]
mod require;

fn skip() -> bool {
    require::skip_without(sys::is_root(), "root (network namespaces and TUN devices)")
}

fn ns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

#[test]
fn topology_up_down_is_idempotent() {
    if skip() {
        return;
    }
    let topo = Topo::unique("dts").expect("prefix");
    let names: Vec<String> = Role::ALL.iter().map(|&r| topo.ns(r)).collect();
    {
        let guard = TopoGuard(topo.clone());
        guard.up().expect("first up");
        guard.up().expect("second up (rebuilds)");
        for n in &names {
            assert!(ns_exists(n), "{n} missing");
        }
    }
    for n in &names {
        assert!(!ns_exists(n), "{n} left behind");
    }
    topo.down().expect("down on nothing is fine");
}

#[test]
fn emulated_link_carries_tcp_within_bounds() {
    if skip() {
        return;
    }
    let (bench, wanem) = bins();
    let size: u64 = 4 << 20;
    let args = LinktestArgs {
        rate: "20mbit".into(),
        rtt: "20ms".into(),
        loss: None,
        queue: None,
        size: size.to_string(),
        udp_rate: None,
        udp_secs: 0.0,
        probes: 10,
        prefix: None,
        wanem_arg: Vec::new(),
        bench: Some(bench),
        wanem: Some(wanem),
    };
    let t0 = std::time::Instant::now();
    let r = linktest::run(&args).expect("linktest");
    eprintln!("smoke: {}", serde_json::to_string(&r).unwrap_or_default());
    let fetch = r.fetch.expect("fetch result");
    assert_eq!(fetch.bytes, size, "byte count");
    assert!(fetch.exact, "payload differs from what the server sent");
    // 20 Mbit/s of IP packets carry at most ~19.3 Mbit/s of TCP payload.
    assert!(
        fetch.goodput_mbps < 20.5,
        "faster than the link: {} Mbit/s",
        fetch.goodput_mbps
    );
    assert!(
        fetch.goodput_mbps > 5.0,
        "far too slow: {} Mbit/s",
        fetch.goodput_mbps
    );
    assert!(
        r.rr.rtt_p50_ms >= 19.0,
        "RTT below the emulated 20 ms: {}",
        r.rr.rtt_p50_ms
    );
    assert!(
        r.rr.rtt_p50_ms < 80.0,
        "RTT far above 20 ms: {}",
        r.rr.rtt_p50_ms
    );
    let e = &r.emulator;
    assert!(
        e.ba.rx_bytes >= size,
        "emulator saw {} B server->client",
        e.ba.rx_bytes
    );
    assert!(
        e.ba.tx_bytes >= size,
        "emulator delivered {} B server->client",
        e.ba.tx_bytes
    );
    assert!(
        e.ab.rx_packets > 0 && e.ab.tx_packets > 0,
        "no client->server packets (ACKs)"
    );
    assert!(t0.elapsed().as_secs() < 60, "took {:?}", t0.elapsed());
}

#[test]
fn outage_signals_drop_everything_until_the_link_is_back() {
    if skip() {
        return;
    }
    let (_, wanem) = bins();
    let topo = Topo::unique("dts").expect("prefix");
    let guard = TopoGuard(topo.clone());
    guard.up().expect("topology");
    let link = guard.start_link(&wanem, &[]).expect("emulator");
    // Ten UDP datagrams from site A across the link (bash's /dev/udp: nothing listens, it does
    // not matter, the emulator counts them on the way).
    let send = || {
        let st = topo
            .cmd(Role::SiteA, "bash")
            .args([
                "-c",
                &format!(
                    "for i in 1 2 3 4 5 6 7 8 9 10; do echo x > /dev/udp/{}/9; done",
                    ditto_bench::topo::addr::B_WAN
                ),
            ])
            .status()
            .expect("bash");
        assert!(st.success(), "sending datagrams");
    };
    let counts = || {
        let s = link.fresh_stats().expect("stats");
        (s.ab.tx_packets, s.ab.drop_outage_packets)
    };
    send();
    let (tx0, drop0) = counts();
    assert!(
        tx0 >= 10 && drop0 == 0,
        "link up: tx {tx0}, outage drops {drop0}"
    );
    link.set_down(true).expect("SIGUSR1");
    std::thread::sleep(std::time::Duration::from_millis(300));
    send();
    let (tx1, drop1) = counts();
    assert_eq!(tx1, tx0, "delivered while down");
    assert!(drop1 >= 10, "outage drops {drop1}");
    link.set_down(false).expect("SIGUSR2");
    std::thread::sleep(std::time::Duration::from_millis(300));
    send();
    let (tx2, drop2) = counts();
    assert!(tx2 >= tx1 + 10, "link back up: tx {tx2} after {tx1}");
    assert_eq!(drop2, drop1, "dropped after the link came back");
}
