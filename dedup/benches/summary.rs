//! What a store summary costs, on one core: `cargo bench -p ditto-dedup --bench summary`.
//!
//! A store of DITTO_SUMMARY_GIB (default 10) GiB of 4 KiB chunks in 64 MiB segments (the defaults),
//! with random chunk ids: the owner builds every segment's parts (the code `Summarizer::part` runs
//! once it has listed a segment's chunks from the store index), the learner parses and applies them
//! to a view, and then answers lookups. Prints the times and the bytes sent, as a share of the
//! bytes described.

use ditto_dedup::summary::{self, Msg};
use ditto_dedup::{ChunkId, PeerView, Reconciler, StoreId};
use std::time::Instant;

fn main() {
    let gib: u64 = std::env::var("DITTO_SUMMARY_GIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let chunk = 4096u64;
    let seg_bytes = 64u64 << 20;
    let total = gib << 30;
    let per_seg = (seg_bytes / chunk) as u32;
    let segs = (total / seg_bytes) as u32;
    // Chunk ids as the index holds them (the hashing of chunk data is not part of a summary).
    let mut counter = 0u64;
    let mut id = || {
        counter += 1;
        let mut b = [0u8; 16];
        b.copy_from_slice(&blake3::hash(&counter.to_le_bytes()).as_bytes()[..16]);
        ChunkId(b)
    };
    let store: Vec<Vec<(u32, ChunkId)>> = (0..segs)
        .map(|_| (0..per_seg).map(|i| (i * chunk as u32, id())).collect())
        .collect();

    let t = Instant::now();
    let mut msgs: Vec<Vec<u8>> = Vec::new();
    for (seq, chunks) in store.iter().enumerate() {
        let mut chunks = chunks.clone();
        let mut from = 0u64;
        loop {
            let m = summary::part_of(seq as u32 + 1, from, seg_bytes, &mut chunks);
            let Msg::Part(p) = &m else { break };
            let to = p.to;
            msgs.push(m.encode());
            if to >= seg_bytes {
                break;
            }
            from = to;
        }
    }
    let build = t.elapsed();
    let bytes: usize = msgs.iter().map(Vec::len).sum();

    // The learner's own path: each message parsed, checked and applied by a reconciler.
    let view = std::sync::Arc::new(PeerView::new(StoreId(1)));
    let mut learner = Reconciler::new(view.clone(), None);
    let now = Instant::now();
    let mut answers = Vec::new();
    let t = Instant::now();
    for m in &msgs {
        learner
            .on_message(m, now, &mut answers)
            .expect("a valid part");
    }
    view.settle();
    let apply = t.elapsed();
    let chunks = u64::from(segs) * u64::from(per_seg);
    assert_eq!(view.summarized_chunks() + 1000, chunks + 1000);

    let probes: Vec<ChunkId> = (0..1_000_000).map(|_| id()).collect();
    let t = Instant::now();
    let hits = probes.iter().filter(|p| view.knows(p)).count();
    let lookup = t.elapsed();
    let held = &store[segs as usize / 2];
    let t = Instant::now();
    let known = held.iter().filter(|(_, i)| view.knows(i)).count();
    let lookup_held = t.elapsed();

    println!(
        "summary of a {gib} GiB store ({chunks} chunks of 4 KiB in {segs} segments of 64 MiB):"
    );
    println!(
        "  build {:.3} s, parse + apply {:.3} s (one core); {} parts, {:.2} MB = {:.4}% of the bytes described, {:.2} bytes per chunk",
        build.as_secs_f64(),
        apply.as_secs_f64(),
        msgs.len(),
        bytes as f64 / 1e6,
        100.0 * bytes as f64 / total as f64,
        bytes as f64 / chunks as f64
    );
    println!(
        "  lookups: {:.0} ns for a chunk not held ({hits} false positives in 1,000,000), {:.0} ns for a held one ({known} of {} found); view RAM {:.1} MiB",
        lookup.as_nanos() as f64 / probes.len() as f64,
        lookup_held.as_nanos() as f64 / held.len() as f64,
        held.len(),
        view.ram_bytes() as f64 / (1 << 20) as f64
    );
}
