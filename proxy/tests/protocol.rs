//! An authenticated peer that breaks the frame protocol gets its connection closed (logged and
//! counted), never a crash, and the node keeps serving; a peer with another protocol version is
//! refused with a clear error.

mod common;

use common::*;
use ditto_proxy::frame::{self, FrameType};
use ditto_proxy::hello::{self, Hello, PROTOCOL_VERSION};
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

fn hello(version: u16) -> Hello {
    Hello {
        version,
        store_id: 1,
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
    hello::exchange(&mut s, &hello(PROTOCOL_VERSION))
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

    let mut cases: Vec<Vec<u8>> = Vec::new();
    // Unknown frame type.
    cases.push(vec![0xEE, 0, 0, 0, 1, 0, 0, 0, 0]);
    // Length far beyond the limit (must be refused from the header alone).
    let mut c = vec![FrameType::Data as u8, 0, 0, 0, 1];
    c.extend_from_slice(&u32::MAX.to_be_bytes());
    cases.push(c);
    // PING on a stream, DATA on stream 0.
    let mut c = Vec::new();
    frame::put_frame(&mut c, FrameType::Ping, 5, &[0; 8]);
    cases.push(c);
    let mut c = Vec::new();
    frame::put_frame(&mut c, FrameType::Data, 0, b"x");
    cases.push(c);
    // OPEN with the acceptor's parity (the dialer must use odd ids), and a reused id.
    let to = frame::OpenTarget {
        dest: target.to_string(),
        client: None,
    };
    let mut c = Vec::new();
    frame::put_frame(
        &mut c,
        FrameType::Open,
        2,
        &frame::open_payload(&to, b"").expect("open"),
    );
    cases.push(c);
    let mut c = Vec::new();
    let open = frame::open_payload(&to, b"").expect("open");
    frame::put_frame(&mut c, FrameType::Open, 1, &open);
    frame::put_frame(&mut c, FrameType::Open, 1, &open);
    cases.push(c);
    // (DATA beyond the granted window is covered by mux's unit tests: here the stream task would
    // consume and reset the stream first, racing the check.)
    // An OPEN whose destination is not UTF-8.
    let mut c = Vec::new();
    frame::put_frame(&mut c, FrameType::Open, 1, &[2, 0xff, 0xfe]);
    cases.push(c);

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
    hello::exchange(&mut s, &hello(PROTOCOL_VERSION))
        .await
        .expect("hello");
    let mut c = Vec::new();
    frame::put_frame(&mut c, FrameType::Open, 1, &open);
    frame::put_frame(&mut c, FrameType::Data, 1, &Gen::bytes(5, 1000));
    s.write_all(&c).await.expect("write");
    s.flush().await.expect("flush");
    let mut hdr = [0u8; 9];
    let rst = tokio::time::timeout(WAIT, async {
        loop {
            s.read_exact(&mut hdr).await.expect("frame header");
            let len = u32::from_be_bytes([hdr[5], hdr[6], hdr[7], hdr[8]]) as usize;
            let mut payload = vec![0u8; len];
            s.read_exact(&mut payload).await.expect("payload");
            if hdr[0] == FrameType::Rst as u8 {
                return payload;
            }
        }
    })
    .await
    .expect("RST for a stream of garbage");
    assert_eq!(rst, vec![frame::ResetReason::Protocol as u8]);
    drop(s);

    // Another protocol version: refused with a version error, counted as an auth failure.
    let before = scrape(&p.b, "ditto_peer_auth_failures_total", &[]).await;
    let mut s = connect(&p.a_id, &p.b, b_fp).await;
    let _ = s.write_all(&hello(PROTOCOL_VERSION + 1).encode()).await;
    let _ = s.flush().await;
    let mut sink = [0u8; 256];
    let _ = tokio::time::timeout(WAIT, async {
        while let Ok(n) = s.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    })
    .await;
    eventually("the version mismatch to be counted", || async {
        scrape(&p.b, "ditto_peer_auth_failures_total", &[]).await > before
    })
    .await;

    // The real peer is still served.
    assert!(p.a.wait_connections("site-b", 2, WAIT).await);
    request(p.a_fwd, 100_000, 100_000, 3)
        .await
        .expect("still served");
    p.a.shutdown().await;
    p.b.shutdown().await;
}
