//! Restarts: transfers stay byte-exact after either node restarts with its store kept (and dedup
//! keeps working across the restart), and after one store is wiped.

mod common;

use common::*;
use ditto_proxy::Node;

fn size() -> usize {
    if cfg!(debug_assertions) {
        2 << 20
    } else {
        16 << 20
    }
}

async fn wan_sent(n: &Node) -> f64 {
    scrape(n, "ditto_wan_bytes_total", &[("direction", "sent")]).await
}

/// Sends the same request (seed 1) A→B and the same response back; returns A's WAN bytes sent.
async fn transfer(p_a: &Node, a_fwd: std::net::SocketAddr, log: &Log) -> f64 {
    let before_ok = log.get().ok;
    let before = wan_sent(p_a).await;
    request(a_fwd, size(), size() / 2, 1)
        .await
        .expect("transfer");
    log.wait("the server's verdict", |l| l.ok > before_ok).await;
    assert_eq!(log.get().bad, 0);
    wan_sent(p_a).await - before
}

/// Whether A's knowledge of its peer's store matches the peer's latest summary index.
fn summary_in_sync(a: &Node) -> bool {
    a.status().peers[0].summary.is_some_and(|s| s.in_sync)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_keep_stores_and_wipes_are_survived() {
    init_tracing();
    let (target, log) = start_server().await;
    let a_dir = tempfile::tempdir().expect("tmp");
    let b_dir = tempfile::tempdir().expect("tmp");
    let a_id = ditto_proxy::Identity::generate().expect("id");
    let b_id = ditto_proxy::Identity::generate().expect("id");
    let start_b = |tunnel| {
        Node::start(spec_b(
            &b_id,
            a_id.fingerprint,
            tunnel,
            target,
            dedup(Some(b_dir.path())),
        ))
    };
    let b = start_b(any_port()).await.expect("b");
    let b_tunnel = b.tunnel_addr.expect("tunnel");
    let start_a = || {
        Node::start(spec_a(
            &a_id,
            b_id.fingerprint,
            b_tunnel,
            target,
            dedup(Some(a_dir.path())),
        ))
    };
    let a = start_a().await.expect("a");
    assert!(a.wait_connections("site-b", 2, WAIT).await);
    let a_fwd = a.forward_addrs[0];

    let first = transfer(&a, a_fwd, &log).await;
    let second = transfer(&a, a_fwd, &log).await;
    assert!(
        second < first / 20.0,
        "second pass sent {second} WAN bytes, first {first}"
    );

    // B restarts with its store: A's belief about B's store is still right.
    b.shutdown().await;
    assert!(a.wait_disconnected("site-b", WAIT).await);
    let b = start_b(b_tunnel).await.expect("b again");
    assert!(a.wait_connections("site-b", 2, WAIT).await);
    // Once A has read B's store summary again (a restarted store describes itself anew).
    eventually("A to be in sync with B's summary", || async {
        summary_in_sync(&a)
    })
    .await;
    let needs0 = scrape(&a, "ditto_dedup_needs_total", &[]).await;
    let after_b = transfer(&a, a_fwd, &log).await;
    let needs = scrape(&a, "ditto_dedup_needs_total", &[]).await - needs0;
    mixed(a_fwd, b.forward_addrs[0], 1).await;
    assert!(
        after_b < first / 20.0,
        "after B's restart: {after_b} WAN bytes, first {first}; {needs} references B could not \
         resolve; A's view of B: {:?}",
        a.status().peers[0].summary
    );

    // A restarts with its store: it starts with no belief about B, so it sends, but correctly.
    a.shutdown().await;
    let a = start_a().await.expect("a again");
    assert!(a.wait_connections("site-b", 2, WAIT).await);
    let a_fwd = a.forward_addrs[0];
    transfer(&a, a_fwd, &log).await;
    let again = transfer(&a, a_fwd, &log).await;
    mixed(a_fwd, b.forward_addrs[0], 2).await;
    assert!(
        again < first / 20.0,
        "after A's restart, second pass: {again}"
    );

    // B's store is wiped: B comes back with a new store identity, A must not trust its old belief.
    b.shutdown().await;
    assert!(a.wait_disconnected("site-b", WAIT).await);
    for e in std::fs::read_dir(b_dir.path()).expect("dir") {
        let path = e.expect("entry").path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path).expect("wipe");
        } else {
            std::fs::remove_file(&path).expect("wipe");
        }
    }
    let b = start_b(b_tunnel).await.expect("b wiped");
    assert!(a.wait_connections("site-b", 2, WAIT).await);
    let wiped = transfer(&a, a_fwd, &log).await;
    assert!(
        wiped > first / 4.0,
        "after a wipe the data must be sent again ({wiped} vs {first})"
    );
    let after = transfer(&a, a_fwd, &log).await;
    mixed(a_fwd, b.forward_addrs[0], 3).await;
    assert!(after < first / 20.0, "and dedup again after that ({after})");
    a.shutdown().await;
    b.shutdown().await;
}
