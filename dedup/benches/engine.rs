//! Engine throughput and wire cost, on one core: `cargo bench -p ditto-dedup`.
//!
//! Prints one line per measurement. Sizes can be changed with DITTO_BENCH_MIB (default 1024). All
//! figures of a run come from the same process, so their ratios are comparable even on a noisy machine.

use ditto_dedup::{
    ChunkId, ChunkParams, ChunkStore, Chunker, Decoder, Encoder, EngineConfig, PeerView,
    StoreConfig,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn data(len: usize) -> Vec<u8> {
    data_of(b"ditto bench", len)
}

fn data_of(key: &[u8], len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    blake3::Hasher::new()
        .update(key)
        .finalize_xof()
        .fill(&mut v);
    v
}

/// Hands `wire` to the decoder and checks what it outputs against `data` from `received` on;
/// returns the decoder's time. Its feedback is left in `fb`.
fn deliver(
    dec: &mut Decoder,
    wire: &mut Vec<u8>,
    fb: &mut Vec<u8>,
    out: &mut Vec<u8>,
    data: &[u8],
    received: &mut usize,
) -> Duration {
    let t = Instant::now();
    dec.receive(wire).expect("receive");
    dec.read(out).expect("read");
    dec.feedback(fb);
    let d = t.elapsed();
    wire.clear();
    assert!(
        out[..] == data[*received..*received + out.len()],
        "decoded bytes differ"
    );
    *received += out.len();
    out.clear();
    d
}

/// Sends `data` as one stream in 1 MiB reads; returns (wire bytes, encoder time, decoder time).
fn transfer(enc: &mut Encoder, dec: &mut Decoder, data: &[u8]) -> (u64, Duration, Duration) {
    let (mut te, mut td) = (Duration::ZERO, Duration::ZERO);
    let mut wire = Vec::new();
    let mut fb = Vec::new();
    let mut out = Vec::new();
    let mut wire_bytes = 0u64;
    let mut received = 0usize;
    let reads: Vec<&[u8]> = data.chunks(1 << 20).collect();
    for (i, piece) in reads.iter().enumerate() {
        let t = Instant::now();
        enc.write(piece, &mut wire);
        if i + 1 == reads.len() {
            enc.finish(&mut wire);
        }
        te += t.elapsed();
        loop {
            wire_bytes += wire.len() as u64;
            td += deliver(dec, &mut wire, &mut fb, &mut out, data, &mut received);
            if fb.is_empty() {
                break;
            }
            let t = Instant::now();
            enc.feedback(&fb, &mut wire).expect("feedback");
            te += t.elapsed();
            fb.clear();
        }
    }
    assert_eq!(received, data.len());
    (wire_bytes, te, td)
}

fn main() {
    // `cargo test --benches` runs this with --bench absent; keep that quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let mib: usize = std::env::var("DITTO_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if quick { 16 } else { 1024 });
    let len = mib << 20;
    let input = data(len);
    println!("input: {mib} MiB of random data, one core");

    // Chunking + fingerprinting.
    let t = Instant::now();
    let mut chunker = Chunker::new(ChunkParams::default());
    let mut n = 0usize;
    let mut x = 0u8;
    for piece in input.chunks(1 << 20) {
        chunker.push(piece, |c| {
            x ^= ChunkId::of(c).0[0];
            n += 1;
        });
    }
    let d = t.elapsed();
    println!(
        "chunk+fingerprint: {:.2} GB/s ({n} chunks, avg {} B) [{x}]",
        gbps(len, d),
        len / n.max(1)
    );

    // Chunking alone, to see the split.
    let t = Instant::now();
    let mut chunker = Chunker::new(ChunkParams::default());
    let mut m = 0usize;
    for piece in input.chunks(1 << 20) {
        chunker.push(piece, |_| m += 1);
    }
    println!("chunk only: {:.2} GB/s", gbps(len, t.elapsed()));

    // Chunking a chatty stream: 64-byte pieces, each one appended to the open chunk.
    let small = &input[..len.min(64 << 20)];
    let t = Instant::now();
    let mut chunker = Chunker::new(ChunkParams::default());
    let mut k = 0usize;
    for piece in small.chunks(64) {
        chunker.push(piece, |_| k += 1);
    }
    println!(
        "chunk only, 64-byte pieces: {:.2} GB/s ({k} chunks)",
        gbps(small.len(), t.elapsed())
    );

    let ram = (len as u64) * 2 + (64 << 20);
    let a = Arc::new(ChunkStore::open(StoreConfig::in_memory(ram)).expect("store"));
    let b = Arc::new(ChunkStore::open(StoreConfig::in_memory(ram)).expect("store"));
    let va = Arc::new(PeerView::new(b.identity()));
    let vb = Arc::new(PeerView::new(a.identity()));
    let (va2, vb2) = (va.clone(), vb.clone());
    let cfg = EngineConfig::default();

    let mut enc = Encoder::new(a.clone(), va.clone(), cfg.clone());
    let mut dec = Decoder::new(b.clone(), vb.clone(), cfg.clone());
    let (w1, te1, td1) = transfer(&mut enc, &mut dec, &input);
    println!(
        "first pass (cold): wire {w1} B for {len} B; encode {:.2} GB/s, decode {:.2} GB/s",
        gbps(len, te1),
        gbps(len, td1)
    );

    let mut enc = Encoder::new(a.clone(), va, cfg.clone());
    let mut dec = Decoder::new(b.clone(), vb, cfg);
    let (w2, te2, td2) = transfer(&mut enc, &mut dec, &input);
    println!(
        "second pass (peer holds it): wire {w2} B ({:.1} KiB) for {mib} MiB; encode {:.2} GB/s, decode {:.2} GB/s",
        w2 as f64 / 1024.0,
        gbps(len, te2),
        gbps(len, td2)
    );
    // A chatty stream: 64-byte messages, each flushed on its own (the client waits for an answer),
    // sent twice (the second time the peer holds every chunk).
    let msgs = &data_of(b"ditto bench: messages", len.min(8 << 20));
    for pass in ["first", "second"] {
        let mut enc = Encoder::new(a.clone(), va2.clone(), EngineConfig::default());
        let mut dec = Decoder::new(b.clone(), vb2.clone(), EngineConfig::default());
        let (mut wire, mut out, mut fb) = (Vec::new(), Vec::new(), Vec::new());
        let (mut te, mut td) = (Duration::ZERO, Duration::ZERO);
        let mut received = 0usize;
        for m in msgs.chunks(64) {
            let t = Instant::now();
            enc.write(m, &mut wire);
            enc.flush(&mut wire);
            te += t.elapsed();
            td += deliver(&mut dec, &mut wire, &mut fb, &mut out, msgs, &mut received);
            if !fb.is_empty() {
                let t = Instant::now();
                enc.feedback(&fb, &mut wire).expect("feedback");
                te += t.elapsed();
                fb.clear();
            }
        }
        assert_eq!(received, msgs.len());
        let n = msgs.len().div_ceil(64) as f64;
        println!(
            "64-byte messages, each flushed, {pass} pass: encode {:.2} us, decode {:.2} us per message",
            te.as_secs_f64() * 1e6 / n,
            td.as_secs_f64() * 1e6 / n
        );
    }

    let st = a.stats();
    println!(
        "index RAM: {:.1} bytes per stored chunk ({} chunks, {} index bytes)",
        st.index_bytes as f64 / st.chunks.max(1) as f64,
        st.chunks,
        st.index_bytes
    );
}
