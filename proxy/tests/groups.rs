//! Peer groups (scale-out) on loopback: two near nodes, a group of two far nodes.
//!
//! * each destination goes to its rendezvous home, the same from either near node;
//! * a repeat of data sent through near node 1 is warm through near node 2 (the far store's
//!   summaries told it what that store holds);
//! * a far member that stops moves only its own destinations to the other member, with every byte
//!   checked, and they move back when it returns.

mod common;

use common::*;
use ditto_proxy::group::rank;
use ditto_proxy::{Fingerprint, ForwardSpec, GroupSpec, Identity, Node, NodeSpec, PeerSpec};
use std::net::SocketAddr;

const GROUP: &str = "dc2";
const FAR: [&str; 2] = ["b1", "b2"];

fn far_spec(
    id: &Identity,
    near: &[(&str, Fingerprint)],
    tunnel: SocketAddr,
    dir: &std::path::Path,
) -> NodeSpec {
    NodeSpec {
        name: "far".into(),
        identity: id.clone(),
        engine: dedup(Some(dir)),
        tunnel_listen: Some(tunnel),
        groups: Vec::new(),
        peers: near
            .iter()
            .map(|(name, fp)| PeerSpec {
                name: (*name).into(),
                fingerprint: *fp,
                address: None,
                allow: Default::default(),
            })
            .collect(),
        forwards: Vec::new(),
        admin: None,
        intercept: None,
        routes: Vec::new(),
        settings: test_settings(),
    }
}

fn near_spec(id: &Identity, far: &[(Fingerprint, SocketAddr)], targets: &[SocketAddr]) -> NodeSpec {
    NodeSpec {
        name: "near".into(),
        identity: id.clone(),
        engine: dedup(None),
        tunnel_listen: None,
        groups: vec![GroupSpec {
            name: GROUP.into(),
            members: FAR.iter().map(|s| s.to_string()).collect(),
        }],
        peers: far
            .iter()
            .zip(FAR)
            .map(|((fp, addr), name)| PeerSpec {
                name: name.into(),
                fingerprint: *fp,
                address: Some(addr.to_string()),
                allow: Default::default(),
            })
            .collect(),
        forwards: targets
            .iter()
            .map(|t| ForwardSpec {
                listen: any_port(),
                peer: Some(GROUP.into()),
                target: t.to_string(),
                bypass: false,
            })
            .collect(),
        admin: None,
        intercept: None,
        routes: Vec::new(),
        settings: test_settings(),
    }
}

/// Flows the near node homed on each far member so far, and flows moved off their home.
fn group_counts(n: &Node) -> ([u64; 2], u64) {
    let st = n.status();
    let g = st
        .groups
        .iter()
        .find(|g| g.name == GROUP)
        .expect("the group in status");
    let mut c = [0; 2];
    for m in &g.members {
        let i = FAR
            .iter()
            .position(|f| *f == m.peer)
            .expect("a known member");
        c[i] = m.flows;
    }
    (c, g.moved)
}

fn member_up(n: &Node, member: &str) -> bool {
    n.status()
        .groups
        .iter()
        .flat_map(|g| g.members.iter())
        .any(|m| m.peer == member && m.up)
}

fn wan_sent(n: &Node, peer: &str) -> u64 {
    n.status()
        .peers
        .iter()
        .find(|p| p.name == peer)
        .map_or(0, |p| p.wan_bytes_sent)
}

/// Sends one checked request through `fwd`; returns which far member carried it.
async fn through(near: &Node, fwd: SocketAddr, seed: u64, up: usize) -> usize {
    let (before, _) = group_counts(near);
    request(fwd, up, 20_000, seed)
        .await
        .unwrap_or_else(|e| panic!("request {seed} through the group: {e}"));
    let (after, _) = group_counts(near);
    let d: Vec<u64> = (0..2).map(|i| after[i] - before[i]).collect();
    assert_eq!(d.iter().sum::<u64>(), 1, "one flow, one member: {d:?}");
    d.iter().position(|&x| x == 1).expect("a member")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destinations_have_one_home_that_moves_only_when_it_fails() {
    init_tracing();
    let near_ids = [
        Identity::generate().expect("id"),
        Identity::generate().expect("id"),
    ];
    let far_ids = [
        Identity::generate().expect("id"),
        Identity::generate().expect("id"),
    ];
    let far_fps = [far_ids[0].fingerprint, far_ids[1].fingerprint];
    let near_fps = [
        ("a1", near_ids[0].fingerprint),
        ("a2", near_ids[1].fingerprint),
    ];

    // Three destinations homed on each far member (loopback addresses 127.0.0.x).
    let mut hosts: Vec<(u8, usize)> = Vec::new();
    for x in 2..=250u8 {
        let home = rank(&far_fps, &format!("127.0.0.{x}:1"))[0];
        if hosts.iter().filter(|(_, h)| *h == home).count() < 3 {
            hosts.push((x, home));
        }
        if hosts.len() == 6 {
            break;
        }
    }
    assert_eq!(hosts.len(), 6, "no 3 + 3 split among 249 hosts");
    let mut targets = Vec::new();
    let mut logs = Vec::new();
    for (x, _) in &hosts {
        let (addr, log) = start_server_at(SocketAddr::from(([127, 0, 0, *x], 0))).await;
        targets.push(addr);
        logs.push(log);
    }

    let dirs = [
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    ];
    let mut far = Vec::new();
    for i in 0..2 {
        far.push(Some(
            Node::start(far_spec(&far_ids[i], &near_fps, any_port(), dirs[i].path()))
                .await
                .expect("start far"),
        ));
    }
    let far_addrs: Vec<SocketAddr> = far
        .iter()
        .map(|f| f.as_ref().and_then(|f| f.tunnel_addr).expect("tunnel addr"))
        .collect();
    let far_list = [(far_fps[0], far_addrs[0]), (far_fps[1], far_addrs[1])];
    let a1 = Node::start(near_spec(&near_ids[0], &far_list, &targets))
        .await
        .expect("start a1");
    let a2 = Node::start(near_spec(&near_ids[1], &far_list, &targets))
        .await
        .expect("start a2");
    for n in [&a1, &a2] {
        for m in FAR {
            assert!(n.wait_connections(m, 2, WAIT).await, "{m} never came up");
        }
    }

    // 1. Every destination goes to its home, from either near node.
    for (i, (_, home)) in hosts.iter().enumerate() {
        for (n, near) in [&a1, &a2].into_iter().enumerate() {
            let got = through(
                near,
                near.forward_addrs[i],
                10 * i as u64 + n as u64,
                50_000,
            )
            .await;
            assert_eq!(
                got, *home,
                "destination {} went to {}",
                targets[i], FAR[got]
            );
        }
    }
    assert_eq!(group_counts(&a1), ([3, 3], 0));

    // 2. A repeat through the other near node is warm: a2 learns what the home's store holds
    // from its summaries, and sends references for data only a1 ever sent.
    let (big, home) = (4 << 20, hosts[0].1);
    let cold0 = wan_sent(&a1, FAR[home]);
    through(&a1, a1.forward_addrs[0], 999, big).await;
    let cold = wan_sent(&a1, FAR[home]) - cold0;
    eventually("a2 to learn the far store's chunks", || async {
        let st = a2.status();
        let s = st
            .peers
            .iter()
            .find(|p| p.name == FAR[home])
            .and_then(|p| p.summary);
        s.is_some_and(|s| s.in_sync && s.known_chunks >= 900)
    })
    .await;
    let warm0 = wan_sent(&a2, FAR[home]);
    through(&a2, a2.forward_addrs[0], 999, big).await;
    let warm = wan_sent(&a2, FAR[home]) - warm0;
    eprintln!("4 MiB upload: cold through a1 {cold} WAN bytes, repeat through a2 {warm}");
    assert!(cold > big as u64 * 9 / 10, "cold send only {cold} bytes");
    assert!(
        warm < cold / 10,
        "repeat through a2 not warm: {warm} of {cold}"
    );

    // 3. b1 stops: its destinations move to b2, b2's stay, every byte checked.
    far[0].take().expect("b1").shutdown().await;
    eventually("a1 to see b1 gone", || async { !member_up(&a1, FAR[0]) }).await;
    let (_, moved0) = group_counts(&a1);
    for i in 0..hosts.len() {
        assert_eq!(
            through(&a1, a1.forward_addrs[i], 100 + i as u64, 50_000).await,
            1
        );
    }
    assert_eq!(
        group_counts(&a1).1 - moved0,
        3,
        "only b1's three destinations moved"
    );

    // 4. b1 returns on its address: its destinations come back to it.
    far[0] = Some(
        Node::start(far_spec(
            &far_ids[0],
            &near_fps,
            far_addrs[0],
            dirs[0].path(),
        ))
        .await
        .expect("restart b1"),
    );
    assert!(
        a1.wait_connections(FAR[0], 1, WAIT).await,
        "b1 never came back"
    );
    eventually("a1 to see b1 back", || async { member_up(&a1, FAR[0]) }).await;
    for (i, (_, home)) in hosts.iter().enumerate() {
        assert_eq!(
            through(&a1, a1.forward_addrs[i], 200 + i as u64, 50_000).await,
            *home
        );
    }
    for l in &logs {
        assert_eq!(l.get().bad, 0, "the server saw wrong bytes");
    }
    a1.shutdown().await;
    a2.shutdown().await;
    for f in far.into_iter().flatten() {
        f.shutdown().await;
    }
}
