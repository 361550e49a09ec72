//! Throughput of the disk-backed chunk store's hot paths (insert, verified disk read, RAM hit), plain
//! and sealed (a store with a key) in one run. Not part of the normal test run:
//!
//! `cargo test --release -p ditto-dedup --test store_bench -- --ignored --nocapture`
//!
//! `DITTO_BENCH_MIB` sets the data size (default 256), `DITTO_BENCH_ROUNDS` the rounds (default 3).
//! Rounds alternate plain and sealed; prints the best round of each and the sealed/plain ratios.

use std::time::{Duration, Instant};

use ditto_dedup::store::{ChunkStore, StoreConfig, StoreKey};
use ditto_dedup::ChunkId;

const CHUNK: usize = 8 << 10;

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn chunks(total: usize) -> Vec<(ChunkId, Vec<u8>)> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..total / CHUNK)
        .map(|_| {
            let data: Vec<u8> = (0..CHUNK)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            (ChunkId::of(&data), data)
        })
        .collect()
}

/// Best (insert until written, insert calls alone, disk hit, RAM hit) GB/s of the rounds.
#[derive(Default, Clone, Copy)]
struct Best {
    ins: f64,
    calls: f64,
    disk: f64,
    ram: f64,
}

fn round(input: &[(ChunkId, Vec<u8>)], key: Option<&StoreKey>, best: &mut Best) {
    let bytes = input.len() * CHUNK;
    let d = tempfile::tempdir().expect("tempdir");
    // A RAM tier of a quarter of the data: inserts and disk hits keep evicting from it. A write
    // queue that never fills, so that every chunk is written; insert time includes the writer
    // thread's writing everything.
    let mut cfg = StoreConfig::on_disk(d.path(), (bytes / 4) as u64, (bytes * 2) as u64)
        .with_write_queue_bytes(bytes as u64);
    if let Some(k) = key {
        cfg = cfg.with_key(k.clone());
    }
    let s = ChunkStore::open(cfg).expect("open");
    let t = Instant::now();
    for (id, data) in input {
        s.insert(id, data).expect("insert");
    }
    best.calls = best.calls.max(gbps(bytes, t.elapsed()));
    assert!(s.wait_written(Duration::from_secs(600)));
    best.ins = best.ins.max(gbps(bytes, t.elapsed()));
    assert_eq!(s.stats().writes_skipped, 0);

    // Oldest first: every read misses the RAM tier, goes to disk and is verified (or opened).
    let mut out = Vec::with_capacity(CHUNK);
    let t = Instant::now();
    for (id, _) in input {
        out.clear();
        assert!(s.get_into(id, &mut out));
    }
    best.disk = best.disk.max(gbps(bytes, t.elapsed()));

    // The last quarter is now in RAM.
    let hot = &input[input.len() * 3 / 4 + 1..];
    let t = Instant::now();
    for _ in 0..4 {
        for (id, _) in hot {
            out.clear();
            assert!(s.get_into(id, &mut out));
        }
    }
    best.ram = best.ram.max(gbps(hot.len() * CHUNK * 4, t.elapsed()));
    let st = s.stats();
    assert_eq!(st.verify_failures + st.io_errors, 0);
}

#[test]
#[ignore = "a measurement; run with --ignored --release"]
fn store_disk_throughput() {
    let mib: usize = std::env::var("DITTO_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let input = chunks(mib << 20);
    let rounds: usize = std::env::var("DITTO_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let key = StoreKey::generate();
    let (mut plain, mut sealed) = (Best::default(), Best::default());
    for _ in 0..rounds {
        round(&input, None, &mut plain);
        round(&input, Some(&key), &mut sealed);
    }
    for (name, b) in [("plain", plain), ("sealed", sealed)] {
        println!(
            "store {name} ({mib} MiB of {CHUNK} B chunks, best of {rounds}): insert {:.2} GB/s \
             (the insert calls alone {:.2} GB/s), disk hit (verified) {:.2} GB/s, RAM hit {:.2} GB/s",
            b.ins, b.calls, b.disk, b.ram
        );
    }
    println!(
        "sealed/plain: insert {:.3} (calls alone {:.3}), disk hit {:.3}, RAM hit {:.3}",
        sealed.ins / plain.ins,
        sealed.calls / plain.calls,
        sealed.disk / plain.disk,
        sealed.ram / plain.ram
    );
}
