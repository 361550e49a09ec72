//! Pass-through: flows go straight to their destination, unaccelerated and counted with a reason,
//! when the peer is down, not configured, or a bypass rule says so.

mod common;

use common::*;
use ditto_proxy::{ForwardSpec, Node};

async fn passthrough_count(n: &Node, reason: &str) -> f64 {
    scrape(
        n,
        "ditto_flows_total",
        &[("outcome", "passthrough"), ("reason", reason)],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_when_peer_stopped_or_not_configured() {
    init_tracing();
    let (target, log) = start_server().await;
    let p = pair(target).await;

    // Accelerated while the peer is up.
    request(p.a_fwd, 50_000, 50_000, 1)
        .await
        .expect("accelerated");
    assert_eq!(passthrough_count(&p.a, "peer-down").await, 0.0);
    assert_eq!(
        scrape(&p.a, "ditto_flows_total", &[("outcome", "accelerated")]).await,
        1.0
    );

    // Peer stopped: flows still work, straight to the destination.
    p.b.shutdown().await;
    assert!(p.a.wait_disconnected("site-b", WAIT).await);
    assert_eq!(
        scrape(&p.a, "ditto_tunnel_up", &[("peer", "site-b")]).await,
        0.0
    );
    for i in 0..4 {
        request(p.a_fwd, 200_000, 100_000, 10 + i)
            .await
            .expect("pass-through");
    }
    assert_eq!(passthrough_count(&p.a, "peer-down").await, 4.0);
    // Resets still propagate in pass-through.
    let r = request_reset(p.a_fwd).await;
    assert!(
        matches!(&r, Err(e) if is_reset(e)),
        "expected reset, got {r:?}"
    );
    log.wait("all pass-through requests verified", |l| l.ok >= 6)
        .await;
    assert_eq!(log.get().bad, 0);
    p.a.shutdown().await;

    // No peer configured, and a bypass rule.
    let mut spec = spec_a(
        &p.a_id,
        p.b_id.fingerprint,
        dead_port(),
        target,
        dedup(None),
    );
    spec.peers.clear();
    spec.forwards = vec![
        ForwardSpec {
            listen: any_port(),
            peer: None,
            target: target.to_string(),
            bypass: false,
        },
        ForwardSpec {
            listen: any_port(),
            peer: None,
            target: target.to_string(),
            bypass: true,
        },
    ];
    let n = Node::start(spec).await.expect("start");
    request(n.forward_addrs[0], 1000, 1000, 21)
        .await
        .expect("no-peer");
    request(n.forward_addrs[1], 1000, 1000, 22)
        .await
        .expect("bypass");
    assert_eq!(passthrough_count(&n, "no-peer").await, 1.0);
    assert_eq!(passthrough_count(&n, "bypass-rule").await, 1.0);
    n.shutdown().await;
}
