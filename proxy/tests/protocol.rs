//! An authenticated peer that breaks the frame protocol gets its connection closed (logged and
//! counted), never a crash, and the node keeps serving; a peer with another protocol version is
//! refused with a clear error.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use ditto_proxy::frame::{self, kind, Frame, ResetReason};
use ditto_proxy::hello::{self, Hello, VERSIONS};
use ditto_proxy::{tls, Identity, Node};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

async fn connect(a_id: &Identity, b: &Node, b_fp: ditto_proxy::Fingerprint) -> Tls {
    let tcp = tokio::net::TcpStream::connect(b.tunnel_addr.expect("tunnel"))
        .await
        .expect("tcp");
    let connector =
        tokio_rustls::TlsConnector::from(tls::client_config(a_id, b_fp).expect("config"));
    connector
        .connect(ServerName::try_from("ditto").expect("name"), tcp)
        .await
        .expect("TLS")
}

fn hello(versions: &[u16]) -> Hello {
    Hello {
        versions: versions.to_vec(),
        store_id: 1,
        // The lowest session id: this side's stream ids are odd.
        session_id: 1,
        window: 1 << 20,
        max_streams: 16,
        codec: "dedup/1".into(),
        chunking: "test".into(),
        name: "intruder".into(),
    }
}

/// Sends `bytes` after a valid hello and expects the node to close the connection.
async fn expect_closed(a_id: &Identity, b: &Node, b_fp: ditto_proxy::Fingerprint, bytes: &[u8]) {
    let mut s = connect(a_id, b, b_fp).await;
    hello::exchange(&mut s, &hello(VERSIONS))
        .await
        .expect("hello");
    let _ = s.write_all(bytes).await;
    let _ = s.flush().await;
    let mut sink = vec![0u8; 65536];
    let r = tokio::time::timeout(WAIT, async {
        loop {
            match s.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(r.is_ok(), "the node kept a connection that sent bad frames");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_the_connection_only() {
    init_tracing();
    let (target, _log) = start_server().await;
    let p = pair(target).await;
    let b_fp = p.b_id.fingerprint;
    // The intruder holds site-a's key. With the real site-a up too, each would take over the
    // other's session in turn (a peer is one process): site-a steps aside while the intruder talks.
    let b_tunnel = p.b.tunnel_addr.expect("tunnel");
    p.a.shutdown().await;

    let frames = |fs: &[Frame]| {
        let mut c = Vec::new();
        for f in fs {
            f.encode(&mut c);
        }
        c
    };
    let to = frame::OpenTarget {
        dest: target.to_string(),
        client: None,
    };
    let open = Frame::Open {
        stream: 1,
        target: to.clone(),
    };
    let data = |offset: u64, len: usize| Frame::Data {
        stream: 1,
        offset,
        bytes: Bytes::from(Gen::bytes(5, len)),
    };
    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Unknown frame type.
    cases.push(vec![0xEE, 0, 0, 0, 1, 0, 0, 0, 0]);
    // Length far beyond the limit (must be refused from the header alone).
    let mut c = vec![kind::DATA, 0, 0, 0, 1];
    c.extend_from_slice(&u32::MAX.to_be_bytes());
    cases.push(c);
    // PING on a stream, DATA on stream 0.
    cases.push(vec![
        kind::PING,
        0,
        0,
        0,
        5,
        0,
        0,
        0,
        8,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
    ]);
    cases.push(vec![
        kind::DATA,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        9,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        0,
        1,
    ]);
    // OPEN with the node's own parity (this side has the lower session id: its ids are odd).
    cases.push(frames(&[Frame::Open {
        stream: 2,
        target: to.clone(),
    }]));
    // DATA that leaves a gap, and DATA beyond the granted window.
    cases.push(frames(&[open.clone(), data(100, 10)]));
    cases.push(frames(&[open.clone(), data(300_000, 10)]));
    // An acknowledgement of bytes never sent.
    cases.push(frames(&[
        open.clone(),
        Frame::Ack {
            stream: 1,
            data: 0,
            data_limit: 1 << 20,
            feedback: 5,
            fin: false,
            done: false,
        },
    ]));
    // An OPEN whose destination is not UTF-8.
    cases.push(vec![kind::OPEN, 0, 0, 0, 1, 0, 0, 0, 4, 2, 0xff, 0xfe, 0]);

    for (i, bytes) in cases.iter().enumerate() {
        let before = scrape(&p.b, "ditto_tunnel_protocol_errors_total", &[]).await;
        expect_closed(&p.a_id, &p.b, b_fp, bytes).await;
        eventually(&format!("case {i} to be counted"), || async {
            scrape(&p.b, "ditto_tunnel_protocol_errors_total", &[]).await > before
        })
        .await;
    }

    // Garbage stream bytes inside a valid frame sequence only reset that stream.
    let mut s = connect(&p.a_id, &p.b, b_fp).await;
    hello::exchange(&mut s, &hello(VERSIONS))
        .await
        .expect("hello");
    s.write_all(&frames(&[open.clone(), data(0, 1000)]))
        .await
        .expect("write");
    s.flush().await.expect("flush");
    let rst = tokio::time::timeout(WAIT, async {
        let mut buf = BytesMut::new();
        loop {
            while let Some(f) = frame::decode(&mut buf).expect("the node sends valid frames") {
                if let Frame::Rst { stream: 1, reason } = f {
                    return reason;
                }
            }
            let n = s.read_buf(&mut buf).await.expect("read");
            assert!(n > 0, "closed before RST");
        }
    })
    .await
    .expect("RST for a stream of garbage");
    assert_eq!(rst, ResetReason::Protocol);
    drop(s);

    // No protocol version in common: the connection is closed, and the peer marked as such (its
    // flows would pass through with reason `version`).
    let mut s = connect(&p.a_id, &p.b, b_fp).await;
    let _ = s.write_all(&hello(&[99]).encode()).await;
    let _ = s.flush().await;
    let mut sink = [0u8; 256];
    let closed = tokio::time::timeout(WAIT, async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "a peer without a common version was kept");
    eventually("the version mismatch to show", || async {
        p.b.status().peers.iter().any(|x| x.version_mismatch)
    })
    .await;

    // The real peer is still served.
    let a = ditto_proxy::Node::start(spec_a(&p.a_id, b_fp, b_tunnel, target, dedup(None)))
        .await
        .expect("site-a again");
    assert!(a.wait_connections("site-b", 2, WAIT).await);
    request(a.forward_addrs[0], 100_000, 100_000, 3)
        .await
        .expect("still served");
    a.shutdown().await;
    p.b.shutdown().await;
}
