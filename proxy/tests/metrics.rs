//! Metrics: the second transfer of the same data shows WAN bytes under 1% of LAN bytes in
//! /metrics; /healthz and /status answer.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_transfer_wan_under_one_percent() {
    init_tracing();
    let (target, log) = start_server().await;
    let p = pair(target).await;
    let size = if cfg!(debug_assertions) {
        4 << 20
    } else {
        32 << 20
    };
    let mut rounds = Vec::new();
    for round in 0..2 {
        let lan0 = scrape(
            &p.a,
            "ditto_lan_bytes_total",
            &[("peer", "site-b"), ("direction", "sent")],
        )
        .await;
        let wan0 = scrape(
            &p.a,
            "ditto_wan_bytes_total",
            &[("peer", "site-b"), ("direction", "sent")],
        )
        .await;
        request(p.a_fwd, size, 0, 4242).await.expect("transfer");
        log.wait("the server's verdict", |l| l.ok > round).await;
        let lan = scrape(
            &p.a,
            "ditto_lan_bytes_total",
            &[("peer", "site-b"), ("direction", "sent")],
        )
        .await
            - lan0;
        let wan = scrape(
            &p.a,
            "ditto_wan_bytes_total",
            &[("peer", "site-b"), ("direction", "sent")],
        )
        .await
            - wan0;
        eprintln!("round {round}: LAN {lan} bytes, WAN {wan} bytes");
        rounds.push((lan, wan));
    }
    assert!(rounds[0].0 >= size as f64, "LAN bytes counted: {rounds:?}");
    assert!(
        rounds[1].1 < rounds[1].0 * 0.01,
        "second pass WAN/LAN: {rounds:?}"
    );
    assert!(scrape(&p.a, "ditto_dedup_saved_bytes_total", &[]).await >= size as f64 * 0.9);
    assert!(scrape(&p.b, "ditto_store_chunks", &[]).await > 0.0);
    assert_eq!(
        scrape(&p.a, "ditto_tunnel_up", &[("peer", "site-b")]).await,
        1.0
    );
    assert!(scrape(&p.a, "ditto_tunnel_rtt_seconds", &[("peer", "site-b")]).await > 0.0);

    let admin = p.a.admin_addr.expect("admin");
    let (code, body) = ditto_proxy::admin::get(admin, "/healthz")
        .await
        .expect("healthz");
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    let (code, body) = ditto_proxy::admin::get(admin, "/status")
        .await
        .expect("status");
    assert_eq!(code, 200);
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(v["node"], "site-a");
    assert_eq!(v["peers"][0]["up"], true);
    assert_eq!(v["peers"][0]["connections"], 2);
    let (code, _) = ditto_proxy::admin::get(admin, "/nope").await.expect("404");
    assert_eq!(code, 404);
    p.a.shutdown().await;
    p.b.shutdown().await;
}
