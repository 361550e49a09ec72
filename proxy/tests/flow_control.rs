//! Flow control: a LAN receiver that stops reading stalls only its own stream, and what the nodes
//! buffer for it stays bounded by the window and queue limits.

mod common;

use common::*;
use std::sync::atomic::Ordering;
use tokio::io::AsyncReadExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_receiver_stalls_only_its_stream() {
    init_tracing();
    let (target, log) = start_server().await;
    let p = pair(target).await;
    let settings = test_settings();

    // A client that asks for an endless response and never reads it.
    let mut stalled = open_mode(p.a_fwd, Mode::Firehose, 0, 1 << 40, 5).await;
    eventually("the firehose to start", || async {
        FIREHOSE_WRITTEN.load(Ordering::Relaxed) > 1 << 20
    })
    .await;

    // Other flows, both directions, complete meanwhile.
    let mut tasks = Vec::new();
    for i in 0..6u64 {
        let via = if i % 2 == 0 { p.a_fwd } else { p.b_fwd };
        tasks.push(tokio::spawn(request(via, 300_000, 500_000, 100 + i)));
    }
    for t in tasks {
        t.await.expect("join").expect("flow beside the stalled one");
    }
    log.wait("the other flows to be verified", |l| l.ok >= 6)
        .await;

    // Memory stays bounded: the receiving node holds at most one window of DATA for the stalled
    // stream and the sending node at most its queue limit plus one OPEN/quantum of slack. FEEDBACK
    // is not under the window: the stalled flow's sending half takes it as it arrives, so only a
    // little may wait at the moment of the look.
    let a = p.a.buffered_bytes();
    let b = p.b.buffered_bytes();
    let window = settings.window as usize;
    assert!(
        a.data_in <= window,
        "A buffers {} received bytes, window {window}",
        a.data_in
    );
    assert!(
        b.data_in <= window,
        "B buffers {} received bytes",
        b.data_in
    );
    assert!(
        a.feedback_in + b.feedback_in <= 64 * 1024,
        "feedback waiting: {a:?} / {b:?}"
    );
    let send_bound = settings.send_queue_limit + 8 * 64 * 1024 + (4 << 20);
    assert!(
        a.send <= send_bound && b.send <= send_bound,
        "send queues {} / {}",
        a.send,
        b.send
    );
    // End to end, the firehose could write only what buffers hold: windows, queues, the encoder's
    // retention limit and the kernel's socket buffers, nowhere near the terabyte it wants to send.
    let written = FIREHOSE_WRITTEN.load(Ordering::Relaxed);
    eprintln!("stalled flow: A buffers {a:?}, B buffers {b:?}, firehose wrote {written}");
    assert!(
        written < 96 << 20,
        "firehose wrote {written} bytes into a stalled flow"
    );

    // Reading again resumes the stalled stream.
    let before = written;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0usize;
    while got < 4 << 20 {
        let n = stalled.read(&mut buf).await.expect("read");
        assert!(n > 0);
        got += n;
    }
    eventually("the firehose to resume", || async {
        FIREHOSE_WRITTEN.load(Ordering::Relaxed) > before
    })
    .await;
    drop(stalled);
    p.a.shutdown().await;
    p.b.shutdown().await;
}
