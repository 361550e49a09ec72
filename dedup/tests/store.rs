//! Integration tests of the chunk store: restart, damage, disk errors, eviction, hints, and a model test.

#[path = "../../tests/common/disk.rs"]
mod disk;
#[path = "../../tests/common/require.rs"]
mod require;

mod common;
use common::chunk;
use disk::{dir_bytes, segments};
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ditto_dedup::store::{ChunkStore, StoreConfig, StoreError, StoreStats};
use ditto_dedup::ChunkId;
use proptest::prelude::*;

/// Record header size of the segment format (see `store/record.rs`).
const HDR: u64 = 32;

fn disk_cfg(dir: &Path) -> StoreConfig {
    // No RAM tier: every read goes to disk and is verified.
    StoreConfig::on_disk(dir, 0, 64 << 20)
}

fn open(cfg: &StoreConfig) -> ChunkStore {
    ChunkStore::open(cfg.clone()).expect("open store")
}

fn get(s: &ChunkStore, id: &ChunkId) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    if s.get_into(id, &mut out) {
        Some(out)
    } else {
        assert!(out.is_empty(), "a miss must leave the output untouched");
        None
    }
}

fn flip_byte(path: &Path, at: u64) {
    let mut b = fs::read(path).expect("read segment");
    b[at as usize] ^= 0x20;
    fs::write(path, b).expect("write segment");
}

/// Inserts `n` chunks of varied sizes (no successor records, so offsets are predictable); returns them
/// with the offset of each record's header in the (single) segment.
/// Inserts and waits for the writer thread: the disk tier holds the chunk (or the write failed).
fn put(s: &ChunkStore, id: &ChunkId, data: &[u8]) {
    s.insert(id, data).expect("insert");
    assert!(s.wait_written(Duration::from_secs(30)), "writer stuck");
}

/// Inserts `n` chunks and waits until they are written.
fn fill(s: &ChunkStore, n: u32) -> Vec<(ChunkId, Vec<u8>, u64)> {
    let mut at = 0;
    let v = (0..n)
        .map(|i| {
            let (id, data) = chunk(i, 100 + (i as usize * 37) % 900);
            s.insert(&id, &data).expect("insert");
            let rec = (id, data, at);
            at += HDR + rec.1.len() as u64;
            rec
        })
        .collect();
    assert!(s.wait_written(Duration::from_secs(30)), "writer stuck");
    v
}

fn assert_all_present(s: &ChunkStore, chunks: &[(ChunkId, Vec<u8>, u64)]) {
    for (id, data, _) in chunks {
        assert!(s.contains(id));
        assert_eq!(get(s, id).as_deref(), Some(&data[..]));
    }
}

#[test]
fn reopen_after_clean_close_uses_snapshot() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = disk_cfg(d.path());
    let s = open(&cfg);
    let ident = s.identity();
    let chunks = fill(&s, 50);
    let slots: Vec<_> = chunks.iter().map(|(id, ..)| s.slot(id)).collect();
    s.close().expect("close");
    assert!(d.path().join("index.snap").exists());

    let s = open(&cfg);
    assert_eq!(s.identity(), ident);
    assert!(
        !d.path().join("index.snap").exists(),
        "a snapshot is consumed by open"
    );
    assert_all_present(&s, &chunks);
    let after: Vec<_> = chunks.iter().map(|(id, ..)| s.slot(id)).collect();
    assert_eq!(slots, after, "slots are stable across a clean restart");
    let st = s.stats();
    assert_eq!(
        (
            st.chunks,
            st.disk_hits,
            st.corrupt_records,
            st.verify_failures
        ),
        (50, 50, 0, 0)
    );
    assert_eq!(
        st.bytes,
        chunks.iter().map(|c| c.1.len() as u64).sum::<u64>()
    );
}

#[test]
fn reopen_after_unclean_drop_scans() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = disk_cfg(d.path());
    let s = open(&cfg);
    let ident = s.identity();
    let chunks = fill(&s, 50);
    drop(s);
    let s = open(&cfg);
    assert_eq!(s.identity(), ident);
    assert_all_present(&s, &chunks);
    // Appending after recovery keeps working, and a second crash loses nothing.
    let (id, data) = chunk(1000, 333);
    put(&s, &id, &data);
    std::mem::forget(s); // not even Drop runs: as close to a process crash as a test gets
    let s = open(&cfg);
    assert_all_present(&s, &chunks);
    assert_eq!(get(&s, &id), Some(data));
    assert_eq!(s.stats().corrupt_records, 0);
}

#[test]
fn torn_last_record_is_truncated() {
    for cut in [1u64, 5, 31, 32, 33, 200] {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = disk_cfg(d.path());
        let s = open(&cfg);
        let chunks = fill(&s, 10);
        drop(s);
        let seg = &segments(d.path())[0];
        let len = fs::metadata(seg).expect("meta").len();
        let last_at = chunks[9].2;
        OpenOptions::new()
            .write(true)
            .open(seg)
            .expect("open")
            .set_len(len - cut)
            .expect("truncate");

        let s = open(&cfg);
        assert_all_present(&s, &chunks[..9]);
        assert!(!s.contains(&chunks[9].0), "cut {cut}");
        assert_eq!(get(&s, &chunks[9].0), None);
        assert_eq!(s.stats().corrupt_records, 1);
        assert_eq!(
            fs::metadata(seg).expect("meta").len(),
            last_at,
            "torn tail cut off"
        );
        // New records go where the torn one was, and survive another crash.
        let (id, data) = chunk(77, 500);
        s.insert(&id, &data).expect("insert");
        drop(s);
        let s = open(&cfg);
        assert_all_present(&s, &chunks[..9]);
        assert_eq!(get(&s, &id), Some(data));
        assert_eq!(s.stats().corrupt_records, 0);
    }
}

#[test]
fn garbage_tail_is_truncated() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = disk_cfg(d.path());
    let s = open(&cfg);
    let chunks = fill(&s, 10);
    drop(s);
    let seg = &segments(d.path())[0];
    let len = fs::metadata(seg).expect("meta").len();
    let mut f = OpenOptions::new().append(true).open(seg).expect("open");
    // Garbage that starts like a record header.
    f.write_all(b"dTC\x01\x10\x00\x00\x00 this is not a record, just noise ............")
        .expect("append");
    drop(f);
    let s = open(&cfg);
    assert_all_present(&s, &chunks);
    assert_eq!(s.stats().corrupt_records, 1);
    assert_eq!(fs::metadata(seg).expect("meta").len(), len);
}

#[test]
fn flipped_payload_byte_is_a_verified_miss() {
    for clean in [true, false] {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = disk_cfg(d.path());
        let s = open(&cfg);
        let chunks = fill(&s, 10);
        if clean {
            s.close().expect("close");
        } else {
            drop(s);
        }
        flip_byte(&segments(d.path())[0], chunks[4].2 + HDR + 17);
        let s = open(&cfg);
        if clean {
            // Loaded from the snapshot: found damaged on the read.
            assert!(s.contains(&chunks[4].0));
            let mut out = b"keep".to_vec();
            assert!(!s.get_into(&chunks[4].0, &mut out));
            assert_eq!(out, b"keep");
            assert!(!s.contains(&chunks[4].0), "a damaged entry is dropped");
        } else {
            // Recovery scan hashes every payload.
            assert!(!s.contains(&chunks[4].0));
            assert_eq!(get(&s, &chunks[4].0), None);
        }
        let st = s.stats();
        assert_eq!(st.verify_failures, 1, "clean={clean}");
        assert_eq!(st.misses, 1);
        for (i, c) in chunks.iter().enumerate().filter(|(i, _)| *i != 4) {
            assert_eq!(get(&s, &c.0).as_deref(), Some(&c.1[..]), "chunk {i}");
        }
        // The chunk can be stored again and then read back.
        s.insert(&chunks[4].0, &chunks[4].1).expect("re-insert");
        assert_eq!(get(&s, &chunks[4].0).as_deref(), Some(&chunks[4].1[..]));
    }
}

#[test]
fn flipped_byte_while_open_is_caught_on_read() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(&disk_cfg(d.path()));
    let chunks = fill(&s, 5);
    flip_byte(&segments(d.path())[0], chunks[2].2 + HDR + 3);
    assert_eq!(get(&s, &chunks[2].0), None);
    assert_eq!(s.stats().verify_failures, 1);
    assert!(!s.contains(&chunks[2].0));
    assert_eq!(get(&s, &chunks[3].0).as_deref(), Some(&chunks[3].1[..]));
}

#[test]
fn flipped_header_byte() {
    for at in [0u64, 5, 12, 30] {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = disk_cfg(d.path());
        let s = open(&cfg);
        let chunks = fill(&s, 10);
        drop(s);
        flip_byte(&segments(d.path())[0], chunks[3].2 + at);
        let s = open(&cfg);
        assert!(!s.contains(&chunks[3].0), "header byte {at}");
        assert_eq!(get(&s, &chunks[3].0), None);
        assert_eq!(s.stats().corrupt_records, 1);
        let rest: Vec<_> = chunks
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != 3)
            .map(|(_, c)| c.clone())
            .collect();
        assert_all_present(&s, &rest);
    }
    // After a clean close the snapshot is trusted for locations; the payload is still verified.
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = disk_cfg(d.path());
    let s = open(&cfg);
    let chunks = fill(&s, 10);
    s.close().expect("close");
    flip_byte(&segments(d.path())[0], chunks[3].2 + 10);
    let s = open(&cfg);
    assert_all_present(&s, &chunks);
}

#[test]
fn injected_write_failure_leaves_store_consistent() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = disk_cfg(d.path());
    let s = open(&cfg);
    let chunks = fill(&s, 5);
    let (a, da) = chunk(100, 700);
    s.set_successor(&chunks[0].0, &chunks[1].0);
    s.inject_write_failures(1);
    // Queued at once; the writer thread's write fails. Without a RAM tier the chunk is then gone.
    put(&s, &a, &da);
    assert!(!s.contains(&a));
    assert_eq!(get(&s, &a), None);
    let st = s.stats();
    assert_eq!((st.io_errors, st.write_errors, st.read_errors), (1, 1, 0));
    assert!(st.degraded && s.degraded().is_some());
    assert_all_present(&s, &chunks);
    // Once the disk tier is retried, inserts succeed, and the half-written record left no trace.
    s.retry_disk_now();
    let (b, db) = chunk(101, 800);
    put(&s, &b, &db);
    assert!(s.degraded().is_none());
    put(&s, &a, &da);
    drop(s);
    let s = open(&cfg);
    assert_all_present(&s, &chunks);
    assert_eq!(get(&s, &a), Some(da));
    assert_eq!(get(&s, &b), Some(db));
    assert_eq!(s.stats().corrupt_records, 0);
}

#[test]
fn os_error_creating_segment_is_an_err_and_recoverable() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::on_disk(d.path(), 0, 1 << 20).with_segment_bytes(4096);
    let s = open(&cfg);
    let (first, dfirst) = chunk(0, 3000);
    put(&s, &first, &dfirst);
    // Put a directory where the next segment file must be created: a real EEXIST/EISDIR from the OS.
    let blocker = d.path().join("seg-00000002.dat");
    fs::create_dir(&blocker).expect("mkdir");
    let (a, da) = chunk(1, 3000);
    // Queued at once; the writer thread cannot start the next segment and turns the tier off.
    put(&s, &a, &da);
    assert!(!s.contains(&a));
    assert_eq!(get(&s, &first), Some(dfirst.clone()));
    assert!(s.degraded().is_some());
    fs::remove_dir(&blocker).expect("rmdir");
    s.retry_disk_now();
    put(&s, &a, &da);
    assert!(s.degraded().is_none());
    assert_eq!(get(&s, &a), Some(da.clone()));
    drop(s);
    let s = open(&cfg);
    assert_eq!(get(&s, &first), Some(dfirst));
    assert_eq!(get(&s, &a), Some(da));
}

#[test]
fn disk_eviction_drops_oldest_segment_first() {
    let d = tempfile::tempdir().expect("tempdir");
    let cap = 64 << 10;
    let cfg = StoreConfig::on_disk(d.path(), 8 << 10, cap).with_segment_bytes(8 << 10);
    let s = open(&cfg);
    let mut ids: Vec<(ChunkId, Vec<u8>)> = Vec::new();
    for i in 0..300u32 {
        let (id, data) = chunk(i, 1000);
        put(&s, &id, &data);
        if let Some((prev, _)) = ids.last() {
            s.set_successor(prev, &id);
        }
        ids.push((id, data));
        let st = s.stats();
        assert!(st.disk_bytes <= cap, "tier over capacity: {st:?}");
        assert!(dir_bytes(d.path()) <= cap);
    }
    let st = s.stats();
    assert!(st.evictions > 200, "{st:?}");
    assert_eq!(st.chunks + st.evictions, 300);
    let present: Vec<bool> = ids.iter().map(|(id, _)| s.contains(id)).collect();
    // Exactly a suffix of the insertion order survives.
    let first = present.iter().position(|&p| p).expect("something survives");
    assert!(present[first..].iter().all(|&p| p), "{present:?}");
    assert!(
        300 - first >= 40,
        "recent chunks stay: only {} left",
        300 - first
    );
    for (id, data) in &ids[first..] {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    assert_eq!(get(&s, &ids[0].0), None);
    assert!(!segments(d.path())[0].ends_with("seg-00000001.dat"));
    // A chunk that cannot fit the whole tier is refused without evicting anything.
    let before = s.stats();
    let (huge, dhuge) = chunk(5000, cap as usize);
    assert!(matches!(
        s.insert(&huge, &dhuge),
        Err(StoreError::TooLarge { .. })
    ));
    assert_eq!(s.stats().chunks, before.chunks);
    // Reopening with a smaller tier evicts down to it.
    s.close().expect("close");
    let small = StoreConfig::on_disk(d.path(), 0, 16 << 10).with_segment_bytes(4 << 10);
    let s = open(&small);
    assert!(s.stats().disk_bytes <= 16 << 10);
    assert!(dir_bytes(d.path()) <= 16 << 10);
    assert!(s.contains(&ids[299].0));
    assert_eq!(get(&s, &ids[299].0).as_deref(), Some(&ids[299].1[..]));
}

#[test]
fn ram_only_store_evicts_lru_within_ram_bytes() {
    let s = open(&StoreConfig::in_memory(10_000));
    let chunks: Vec<_> = (0..10).map(|i| chunk(i, 1000)).collect();
    for (id, data) in &chunks {
        s.insert(id, data).expect("insert");
    }
    assert!(get(&s, &chunks[0].0).is_some()); // chunk 0 becomes most recently used
    let (x, dx) = chunk(10, 1000);
    s.insert(&x, &dx).expect("insert");
    assert!(s.contains(&chunks[0].0));
    assert!(!s.contains(&chunks[1].0), "least recently used goes first");
    assert_eq!(get(&s, &chunks[1].0), None);
    let st = s.stats();
    assert!(st.ram_bytes <= 10_000 && st.bytes == st.ram_bytes, "{st:?}");
    assert_eq!((st.chunks, st.evictions, st.disk_bytes), (10, 1, 0));
    let (big, dbig) = chunk(11, 10_001);
    assert!(matches!(
        s.insert(&big, &dbig),
        Err(StoreError::TooLarge { .. })
    ));
    assert!(s.close().is_ok());
}

#[test]
fn successor_hints_survive_reopen() {
    for clean in [true, false] {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = disk_cfg(d.path());
        let s = open(&cfg);
        let chunks = fill(&s, 300);
        // Enough hints to overflow the write buffer at least once.
        for w in chunks.windows(2) {
            s.set_successor(&w[0].0, &w[1].0);
        }
        s.set_successor(&chunks[0].0, &chunks[7].0); // changed: the last value wins
        assert_eq!(s.successor(&chunks[0].0), Some(chunks[7].0));
        assert_eq!(s.successor(&chunks[299].0), None);
        s.set_successor(&chunks[299].0, &chunk(999, 10).0); // unknown successor: ignored
        assert_eq!(s.successor(&chunks[299].0), None);
        if clean {
            s.close().expect("close");
        } else {
            drop(s);
        }
        let s = open(&cfg);
        assert_eq!(
            s.successor(&chunks[0].0),
            Some(chunks[7].0),
            "clean={clean}"
        );
        for w in chunks[1..].windows(2) {
            assert_eq!(s.successor(&w[0].0), Some(w[1].0));
        }
    }
}

#[test]
fn garbled_or_missing_meta_starts_a_new_empty_store() {
    for garble in [true, false] {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = disk_cfg(d.path());
        let s = open(&cfg);
        let ident = s.identity();
        let chunks = fill(&s, 5);
        s.close().expect("close");
        fs::write(d.path().join("unrelated.txt"), b"not ours").expect("write");
        let meta = d.path().join("store.meta");
        if garble {
            fs::write(&meta, b"garbage").expect("garble");
        } else {
            fs::remove_file(&meta).expect("rm");
        }
        let s = open(&cfg);
        assert_ne!(s.identity(), ident);
        assert_eq!(s.stats().chunks, 0);
        assert!(!s.contains(&chunks[0].0));
        assert!(!d.path().join("index.snap").exists());
        assert_eq!(dir_bytes(d.path()), 0, "old segments removed");
        assert!(
            d.path().join("unrelated.txt").exists(),
            "foreign files are left alone"
        );
        let ident2 = s.identity();
        drop(s);
        assert_eq!(open(&cfg).identity(), ident2);
    }
}

#[test]
fn bad_config_is_rejected() {
    assert!(matches!(
        ChunkStore::open(StoreConfig::in_memory(0)),
        Err(StoreError::Config(_))
    ));
    let d = tempfile::tempdir().expect("tempdir");
    assert!(matches!(
        ChunkStore::open(StoreConfig::on_disk(d.path(), 0, 0)),
        Err(StoreError::Config(_))
    ));
    let file = d.path().join("file");
    fs::write(&file, b"x").expect("write");
    assert!(matches!(
        ChunkStore::open(StoreConfig::on_disk(&file, 0, 1 << 20)),
        Err(StoreError::Io { .. })
    ));
}

/// Measures the index RAM per stored chunk (target: at most 64 bytes). Prints e.g.
/// `index: 45.3 bytes/chunk`; run with `--nocapture` to see it.
#[test]
fn index_bytes_per_chunk() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = open(&StoreConfig::on_disk(d.path(), 0, 1 << 30));
    let mut worst: f64 = 0.0;
    for i in 0..60_000u32 {
        let data = i.to_le_bytes();
        s.insert(&ChunkId::of(&data), &data).expect("insert");
        if i % 5000 == 4999 {
            let st: StoreStats = s.stats();
            let per = st.index_bytes as f64 / st.chunks as f64;
            println!("index: {per:.1} bytes/chunk at {} chunks", st.chunks);
            worst = worst.max(per);
        }
    }
    assert!(worst <= 64.0, "index uses {worst:.1} bytes per chunk");
}

#[test]
fn concurrent_use_from_many_threads() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = Arc::new(open(
        &StoreConfig::on_disk(d.path(), 64 << 10, 8 << 20).with_segment_bytes(256 << 10),
    ));
    let threads: Vec<_> = (0..4u32)
        .map(|t| {
            let s = Arc::clone(&s);
            std::thread::spawn(move || {
                let mut prev = None;
                for i in 0..200 {
                    let (id, data) = chunk(
                        i % 150,
                        300 + (i as usize % 7) * 50 * (t as usize + 1) % 400,
                    );
                    let _ = s.insert(&id, &data);
                    if let Some(p) = prev {
                        s.set_successor(&p, &id);
                    }
                    if let Some(got) = get(&s, &id) {
                        assert_eq!(ChunkId::of(&got), id);
                    }
                    prev = Some(id);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("thread");
    }
    assert_eq!(s.stats().verify_failures, 0);
}

#[derive(Debug, Clone)]
enum Op {
    Insert(u32, usize),
    Get(u32),
    Succ(u32, u32),
    Reopen { clean: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u32..40, 0usize..3000).prop_map(|(k, len)| Op::Insert(k, len)),
        4 => (0u32..40).prop_map(Op::Get),
        1 => (0u32..40, 0u32..40).prop_map(|(a, b)| Op::Succ(a, b)),
        1 => any::<bool>().prop_map(|clean| Op::Reopen { clean }),
    ]
}

/// Chunk contents for key `k`: its length is part of the name so that one key has one content.
fn model_chunk(k: u32, len: usize) -> (ChunkId, Vec<u8>) {
    chunk(k, 1 + (k as usize * 131 + len) % 3000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Large tiers: everything inserted stays, across restarts, and reads return exactly the bytes.
    #[test]
    fn model_without_eviction(ops in proptest::collection::vec(op(), 1..60)) {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig::on_disk(d.path(), 4096, 64 << 20).with_segment_bytes(16 << 10);
        let mut s = open(&cfg);
        let mut model: HashMap<u32, (ChunkId, Vec<u8>)> = HashMap::new();
        for op in ops {
            match op {
                Op::Insert(k, len) => {
                    let (id, data) = model.get(&k).cloned().unwrap_or_else(|| model_chunk(k, len));
                    s.insert(&id, &data).expect("insert");
                    model.insert(k, (id, data));
                }
                Op::Get(k) => {
                    let (id, _) = model_chunk(k, 0);
                    let want = model.get(&k).map(|m| m.1.clone());
                    let id = model.get(&k).map_or(id, |m| m.0);
                    prop_assert_eq!(get(&s, &id), want);
                }
                Op::Succ(a, b) => {
                    if let (Some(x), Some(y)) = (model.get(&a), model.get(&b)) {
                        s.set_successor(&x.0, &y.0);
                        prop_assert_eq!(s.successor(&x.0), Some(y.0));
                    }
                }
                Op::Reopen { clean } => {
                    if clean { s.close().expect("close") } else { drop(s) }
                    s = open(&cfg);
                }
            }
        }
        prop_assert_eq!(s.stats().chunks, model.len() as u64);
        for (id, data) in model.values() {
            prop_assert_eq!(get(&s, id), Some(data.clone()));
        }
    }

    /// Small tiers, write failures and random damage to the files between runs: reads may miss, but
    /// never return wrong bytes, and the store never panics.
    #[test]
    fn model_with_eviction_and_damage(
        ops in proptest::collection::vec(op(), 1..60),
        damage in proptest::collection::vec((any::<u64>(), 0u8..4), 0..6),
        fault_every in 3usize..20,
    ) {
        let d = tempfile::tempdir().expect("tempdir");
        let cfg = StoreConfig::on_disk(d.path(), 2048, 24 << 10).with_segment_bytes(4 << 10);
        let mut s = open(&cfg);
        let mut model: HashMap<u32, (ChunkId, Vec<u8>)> = HashMap::new();
        let mut damage = damage.into_iter();
        for (n, op) in ops.into_iter().enumerate() {
            match op {
                Op::Insert(k, len) => {
                    let (id, data) = model.get(&k).cloned().unwrap_or_else(|| model_chunk(k, len));
                    if n % fault_every == 0 {
                        s.inject_write_failures(1);
                    } else if n % 3 != 0 {
                        // Mostly retry at once after a failure, sometimes insert while the tier is off.
                        s.retry_disk_now();
                    }
                    let res = s.insert(&id, &data);
                    prop_assert!(s.wait_written(Duration::from_secs(30)));
                    s.inject_write_failures(0);
                    // Err means not stored. Ok means queued: a write that then fails keeps the chunk
                    // only if the RAM tier holds it.
                    if res.is_err() {
                        prop_assert!(!s.contains(&id));
                    }
                    model.insert(k, (id, data));
                }
                Op::Get(k) => {
                    if let Some((id, data)) = model.get(&k) {
                        if let Some(got) = get(&s, id) {
                            prop_assert_eq!(&got, data);
                        }
                    }
                }
                Op::Succ(a, b) => {
                    if let (Some(x), Some(y)) = (model.get(&a), model.get(&b)) {
                        s.set_successor(&x.0, &y.0);
                    }
                }
                Op::Reopen { clean } => {
                    if clean { s.close().expect("close") } else { drop(s) }
                    if let Some((pos, kind)) = damage.next() {
                        let segs = segments(d.path());
                        if !segs.is_empty() {
                            let p = &segs[pos as usize % segs.len()];
                            let mut b = fs::read(p).expect("read");
                            match kind {
                                0 if !b.is_empty() => { let i = (pos >> 8) as usize % b.len(); b[i] ^= 1 << (pos % 8); }
                                1 => { let keep = b.len().saturating_sub((pos >> 8) as usize % 100); b.truncate(keep); }
                                2 => b.extend_from_slice(&pos.to_le_bytes().repeat(5)),
                                _ => { let i = (pos >> 8) as usize % (b.len() + 1); b.splice(i..i, *b"dTC\x01"); }
                            }
                            fs::write(p, b).expect("write");
                        }
                    }
                    s = open(&cfg);
                }
            }
            let st = s.stats();
            prop_assert!(st.disk_bytes <= 24 << 10);
        }
        for (id, data) in model.values() {
            if let Some(got) = get(&s, id) {
                prop_assert_eq!(&got, data);
            }
        }
        // Still writable after all that.
        let (id, data) = chunk(4242, 1234);
        s.insert(&id, &data).expect("insert at the end");
        prop_assert_eq!(get(&s, &id), Some(data));
    }
}
