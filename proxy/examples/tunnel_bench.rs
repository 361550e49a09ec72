//! Loopback measurements of the tunnel, all in one process:
//!
//! * throughput of one bulk flow: a ditto pair (raw codec, and the dedup engine on first-seen
//!   incompressible data and on repeated data) against a pair of plain tokio relays;
//! * added latency of a 100-byte request/response (median of many);
//! * memory per idle flow (RSS growth with 1000 open idle flows through the pair).
//!
//! `cargo run --release -p ditto-proxy --example tunnel_bench [MiB]`

use ditto_proxy::{Engine, ForwardSpec, Identity, Node, NodeSpec, PeerSpec, Settings};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn local() -> SocketAddr {
    ([127, 0, 0, 1], 0).into()
}

/// Sink for bulk (answers one byte at EOF) or echo for small messages, chosen by the first byte.
async fn server() -> SocketAddr {
    let l = TcpListener::bind(local()).await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                if s.read_exact(&mut first).await.is_err() {
                    return;
                }
                // Small buffer for echo so the idle-flow measurement sees ditto's memory, not ours.
                let mut buf = vec![0u8; if first[0] == b'E' { 512 } else { 256 * 1024 }];
                if first[0] == b'E' {
                    loop {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if s.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                }
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        let _ = s.write_all(b"k").await;
                        return;
                    }
                }
            });
        }
    });
    a
}

/// A plain relay: what a pair of proxies without ditto would do.
async fn relay(upstream: SocketAddr) -> SocketAddr {
    let l = TcpListener::bind(local()).await.expect("bind");
    let a = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut c, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut u) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = c.set_nodelay(true);
                let _ = u.set_nodelay(true);
                let _ = tokio::io::copy_bidirectional(&mut c, &mut u).await;
            });
        }
    });
    a
}

fn engine(dedup: bool) -> Engine {
    if !dedup {
        return Engine::raw();
    }
    let store =
        ditto_dedup::ChunkStore::open(ditto_dedup::StoreConfig::in_memory(1 << 30)).expect("store");
    Engine::Dedup {
        store: Arc::new(store),
        config: ditto_dedup::EngineConfig::default(),
    }
}

async fn ditto_pair(target: SocketAddr, dedup: bool) -> (Node, Node, SocketAddr) {
    ditto_pair_via(target, dedup, None).await
}

/// A pair whose tunnel runs through `link` (an emulated WAN in front of B's tunnel port).
async fn ditto_pair_via(
    target: SocketAddr,
    dedup: bool,
    link: Option<ditto_proxy::emu::LinkSpec>,
) -> (Node, Node, SocketAddr) {
    let a_id = Identity::generate().expect("id");
    let b_id = Identity::generate().expect("id");
    let settings = Settings {
        connections: 1,
        ..Settings::default()
    };
    let b = Node::start(NodeSpec {
        name: "b".into(),
        identity: b_id.clone(),
        engine: engine(dedup),
        tunnel_listen: Some(local()),
        groups: Vec::new(),
        peers: vec![PeerSpec {
            name: "a".into(),
            fingerprint: a_id.fingerprint,
            address: None,
            allow: Default::default(),
        }],
        forwards: vec![],
        admin: None,
        intercept: None,
        routes: Vec::new(),
        settings: settings.clone(),
    })
    .await
    .expect("b");
    let b_tunnel = b.tunnel_addr.expect("tunnel");
    let dial = match link {
        Some(spec) => {
            let l = ditto_proxy::emu::Link::start(local(), b_tunnel, spec)
                .await
                .expect("link");
            let a = l.addr;
            // The link lives as long as the process.
            std::mem::forget(l);
            a
        }
        None => b_tunnel,
    };
    let a = Node::start(NodeSpec {
        name: "a".into(),
        identity: a_id,
        engine: engine(dedup),
        tunnel_listen: None,
        groups: Vec::new(),
        peers: vec![PeerSpec {
            name: "b".into(),
            fingerprint: b_id.fingerprint,
            address: Some(dial.to_string()),
            allow: Default::default(),
        }],
        forwards: vec![ForwardSpec {
            listen: local(),
            peer: Some("b".into()),
            target: target.to_string(),
            bypass: false,
        }],
        admin: None,
        intercept: None,
        routes: Vec::new(),
        settings,
    })
    .await
    .expect("a");
    assert!(a.wait_connections("b", 1, Duration::from_secs(10)).await);
    let f = a.forward_addrs[0];
    (a, b, f)
}

fn data(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

async fn bulk(addr: SocketAddr, payload: &[u8]) -> f64 {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(b"B").await.expect("w");
    for c in payload.chunks(256 * 1024) {
        s.write_all(c).await.expect("w");
    }
    s.shutdown().await.expect("shutdown");
    let mut k = Vec::new();
    s.read_to_end(&mut k).await.expect("r");
    assert_eq!(k, b"k");
    payload.len() as f64 / t.elapsed().as_secs_f64() / 1e6
}

async fn latency(addr: SocketAddr, rounds: usize) -> Duration {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    s.write_all(b"E").await.expect("w");
    let msg = [7u8; 100];
    let mut back = [0u8; 100];
    let mut v = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t = Instant::now();
        s.write_all(&msg).await.expect("w");
        s.read_exact(&mut back).await.expect("r");
        v.push(t.elapsed());
    }
    v.sort();
    v[v.len() / 2]
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let payload = data(mib << 20, 1);
    let target = server().await;
    let plain = relay(relay(target).await).await;
    let (ra, rb, raw_fwd) = ditto_pair(target, false).await;
    let (da, db, dedup_fwd) = ditto_pair(target, true).await;

    // Idle flows first, while the allocator has no freed memory to hand back.
    let flows = 1000;
    // Both sets stay open, so the second measurement cannot reuse memory the first one freed.
    let mut keep = Vec::new();
    for (name, fwd) in [("raw codec", raw_fwd), ("dedup engine", dedup_fwd)] {
        let before = rss_kib();
        let mut open = Vec::with_capacity(flows);
        for _ in 0..flows {
            let mut s = TcpStream::connect(fwd).await.expect("connect");
            s.write_all(b"E.").await.expect("w");
            let mut b = [0u8; 1];
            s.read_exact(&mut b).await.expect("r");
            open.push(s);
        }
        let after = rss_kib();
        println!(
            "idle flows ({name}): {flows} open through the pair add {} KiB RSS: {:.1} KiB per flow \
             (both nodes, client and server sockets included)",
            after.saturating_sub(before),
            after.saturating_sub(before) as f64 / flows as f64
        );
        keep.push(open);
    }
    println!(
        "bulk, one flow, {mib} MiB incompressible (MB/s, loopback, 2 cores shared by both ends):"
    );
    println!(
        "  plain relay pair        {:8.0}",
        bulk(plain, &payload).await
    );
    println!(
        "  ditto pair, raw codec   {:8.0}",
        bulk(raw_fwd, &payload).await
    );
    println!(
        "  ditto pair, dedup 1st   {:8.0}",
        bulk(dedup_fwd, &payload).await
    );
    println!(
        "  ditto pair, dedup 2nd   {:8.0}",
        bulk(dedup_fwd, &payload).await
    );

    let rounds = 2000;
    let direct = latency(target, rounds).await;
    let lp = latency(plain, rounds).await;
    let lr = latency(raw_fwd, rounds).await;
    let ld = latency(dedup_fwd, rounds).await;
    println!("100-byte request/response, median of {rounds}:");
    println!("  direct {direct:?}, plain relay pair {lp:?}, ditto raw {lr:?}, ditto dedup {ld:?}");
    println!(
        "  added by ditto (dedup) over direct: {:?}",
        ld.saturating_sub(direct)
    );

    // Interactive latency on an emulated 50 Mbit/s, 40 ms WAN, idle and beside a bulk upload.
    let spec = ditto_proxy::emu::LinkSpec::new(50.0, Duration::from_millis(40));
    let plain_wan = ditto_proxy::emu::Link::start(local(), target, spec)
        .await
        .expect("link");
    let (wa, wb, wan_fwd) = ditto_pair_via(target, true, Some(spec)).await;
    println!(
        "100-byte request/response over an emulated 50 Mbit/s, 40 ms RTT link (median of 40):"
    );
    for (name, addr) in [("plain", plain_wan.addr), ("ditto", wan_fwd)] {
        let idle = latency(addr, 40).await;
        let bulk_data = data(24 << 20, 99);
        let bulk_task = tokio::spawn(async move { bulk(addr, &bulk_data).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let loaded = latency(addr, 40).await;
        let mbs = bulk_task.await.expect("bulk");
        println!("  {name}: idle {idle:?}, beside a bulk upload {loaded:?} (bulk {mbs:.1} MB/s)");
    }
    wa.shutdown().await;
    wb.shutdown().await;

    for n in [ra, rb, da, db] {
        n.shutdown().await;
    }
}
