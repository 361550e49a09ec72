//! Byte-exact transfers through a node pair: many concurrent flows of mixed sizes in both
//! directions, half-close, resets both ways, refused destinations, interactive latency.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Sizes from 1 byte up; the largest is ~20 MB in release builds, smaller in debug ones.
fn sizes() -> Vec<usize> {
    let big = if cfg!(debug_assertions) {
        8 << 20
    } else {
        20 << 20
    };
    vec![
        0,
        1,
        2,
        100,
        1500,
        4096,
        65_535,
        65_536,
        65_537,
        300_000,
        1 << 20,
        big,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_flows_both_ways() {
    init_tracing();
    let (target, log) = start_server().await;
    let p = pair(target).await;
    let sizes = sizes();
    let mut tasks = Vec::new();
    let mut n = 0u64;
    for (i, &req) in sizes.iter().enumerate() {
        let resp = sizes[sizes.len() - 1 - i];
        for via in [p.a_fwd, p.b_fwd] {
            n += 1;
            let seed = n * 7919;
            tasks.push(tokio::spawn(async move {
                request(via, req, resp, seed)
                    .await
                    .map_err(|e| format!("{req}/{resp} via {via}: {e}"))
            }));
        }
    }
    for t in tasks {
        t.await.expect("join").expect("transfer");
    }
    // The client can finish before the server task records its verdict.
    log.wait("every request verified by the server", |l| {
        l.ok + l.bad + l.resets_seen == n
    })
    .await;
    assert_eq!(log.get().ok, n, "server log {:?}", log.get());
    p.a.shutdown().await;
    p.b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resets_and_refusals_propagate() {
    init_tracing();
    let (target, log) = start_server().await;
    let p = pair(target).await;

    // Server resets → client sees a reset, not a clean EOF.
    for via in [p.a_fwd, p.b_fwd] {
        let r = request_reset(via).await;
        assert!(
            matches!(&r, Err(e) if is_reset(e)),
            "expected reset, got {r:?}"
        );
    }

    // Client resets mid-request → server sees a reset.
    // (Once the server has the connection: a reset before that correctly never reaches it.)
    let before = log.get();
    let mut s = tokio::net::TcpStream::connect(p.a_fwd)
        .await
        .expect("connect");
    let mut head = vec![0u8];
    head.extend_from_slice(&(1u64 << 30).to_be_bytes());
    head.extend_from_slice(&0u64.to_be_bytes());
    head.extend_from_slice(&1u64.to_be_bytes());
    s.write_all(&head).await.expect("write");
    s.write_all(&Gen::bytes(1, 100_000)).await.expect("write");
    log.wait("the server to accept", |l| l.accepted > before.accepted)
        .await;
    ditto_proxy::sock::reset(s);
    log.wait("the server to see the client's reset", |l| {
        l.resets_seen > before.resets_seen
    })
    .await;

    // A destination that refuses → the client connection is reset.
    let dead = dead_port();
    let b_id = &p.b_id;
    let mut spec = spec_a(
        &p.a_id,
        b_id.fingerprint,
        p.b.tunnel_addr.expect("tunnel"),
        dead,
        dedup(None),
    );
    spec.name = "site-a2".into();
    let a2 = ditto_proxy::Node::start(spec).await.expect("a2");
    assert!(a2.wait_connections("site-b", 1, WAIT).await);
    // On loopback the reset can arrive before the client's connect() even returns.
    let r = async {
        let mut c = tokio::net::TcpStream::connect(a2.forward_addrs[0]).await?;
        c.write_all(b"hello").await?;
        let mut buf = [0u8; 8];
        c.read(&mut buf).await
    }
    .await;
    assert!(
        matches!(&r, Err(e) if is_reset(e)),
        "expected reset for refused destination, got {r:?}"
    );
    a2.shutdown().await;

    p.a.shutdown().await;
    p.b.shutdown().await;
}

/// Server-first protocol (nothing sent by the client before the server speaks) and an interactive
/// echo running next to a bulk transfer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interactive_echo_beside_bulk() {
    init_tracing();
    let (target, _log) = start_server().await;
    let p = pair(target).await;
    let bulk_len = if cfg!(debug_assertions) {
        8 << 20
    } else {
        64 << 20
    };
    let bulk = tokio::spawn(request(p.a_fwd, bulk_len, 0, 42));
    let mut s = tokio::net::TcpStream::connect(p.a_fwd)
        .await
        .expect("connect");
    let mut head = vec![Mode::Echo as u8];
    head.extend_from_slice(&[0u8; 24]);
    s.write_all(&head).await.expect("head");
    let mut worst = Duration::ZERO;
    for i in 0..50u32 {
        let msg = [i as u8; 100];
        let t = Instant::now();
        s.write_all(&msg).await.expect("write");
        let mut got = [0u8; 100];
        s.read_exact(&mut got).await.expect("read");
        assert_eq!(got, msg);
        worst = worst.max(t.elapsed());
    }
    s.shutdown().await.expect("shutdown");
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.expect("eof");
    assert!(rest.is_empty());
    bulk.await.expect("join").expect("bulk");
    eprintln!("worst echo round trip beside bulk: {worst:?}");
    p.a.shutdown().await;
    p.b.shutdown().await;
}
