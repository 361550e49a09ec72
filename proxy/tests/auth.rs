//! Peer authentication: unknown keys, wrong pinned keys, plain TCP and garbage on the tunnel port
//! are refused and counted, and the node keeps serving its real peer.

mod common;

use common::*;
use ditto_proxy::{Identity, Node};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn failures(n: &Node) -> f64 {
    scrape(n, "ditto_peer_auth_failures_total", &[]).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_peers_are_refused_and_counted() {
    init_tracing();
    let (target, _log) = start_server().await;
    let p = pair(target).await;
    let b_tunnel = p.b.tunnel_addr.expect("tunnel");

    // 1. An unknown key dialing B with B's correct fingerprint: B refuses it.
    let stranger = Identity::generate().expect("id");
    let mut spec = spec_a(&stranger, p.b_id.fingerprint, b_tunnel, target, dedup(None));
    spec.name = "stranger".into();
    let before = failures(&p.b).await;
    let c = Node::start(spec).await.expect("start stranger");
    eventually("B to count the unknown key", || async {
        failures(&p.b).await > before
    })
    .await;
    eventually("the stranger to count its refusal", || async {
        failures(&c).await >= 1.0
    })
    .await;
    assert!(
        !c.wait_connections("site-b", 1, Duration::from_millis(200))
            .await
    );
    c.shutdown().await;

    // 2. A's own key, but expecting a different key for B (a man in the middle, or a typo):
    //    the dialer refuses B's certificate.
    let mut spec = spec_a(
        &p.a_id,
        Identity::generate().expect("id").fingerprint,
        b_tunnel,
        target,
        dedup(None),
    );
    spec.name = "wrong-pin".into();
    let w = Node::start(spec).await.expect("start");
    eventually("the dialer to refuse a wrong key", || async {
        failures(&w).await >= 1.0
    })
    .await;
    assert!(
        !w.wait_connections("site-b", 1, Duration::from_millis(200))
            .await
    );
    w.shutdown().await;

    // 3. Plain TCP speaking HTTP, 4. random garbage, 5. a TLS-looking record with a huge length,
    // 6. a connection that says nothing and just closes.
    let mut garbage = Gen::bytes(9, 4096);
    garbage[0] = 0x16;
    let probes: Vec<Vec<u8>> = vec![
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        Gen::bytes(3, 100_000),
        garbage,
        vec![0x16, 0x03, 0x01, 0xff, 0xff],
        Vec::new(),
    ];
    for probe in &probes {
        let before = failures(&p.b).await;
        let mut s = tokio::net::TcpStream::connect(b_tunnel)
            .await
            .expect("connect");
        let _ = s.write_all(probe).await;
        let _ = s.shutdown().await;
        // B must close on us (EOF or reset), never keep the connection or crash.
        let mut sink = vec![0u8; 65536];
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        eventually("B to count the bad probe", || async {
            failures(&p.b).await > before
        })
        .await;
    }

    // The real peer is unaffected.
    assert!(p.a.wait_connections("site-b", 2, WAIT).await);
    request(p.a_fwd, 10_000, 10_000, 77)
        .await
        .expect("real peer still served");
    request(p.b_fwd, 10_000, 10_000, 78)
        .await
        .expect("real peer still served");
    p.a.shutdown().await;
    p.b.shutdown().await;
}
