//! A failing disk tier: write failures turn it off with a backoff and back on when a retry succeeds,
//! chunks stored meanwhile live in the RAM tier only, damaged segments are dropped. Real faults where a
//! test can make them: a full tmpfs (root only; skipped otherwise), bytes overwritten in segment files,
//! a segment file truncated under a running store.

#![cfg(unix)]

#[path = "../../tests/common/disk.rs"]
mod disk;
#[path = "../../tests/common/require.rs"]
mod require;

mod common;
use common::chunk;
use disk::{dir_bytes, segments, Tmpfs};
use std::fs::{self, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use ditto_dedup::store::{
    ChunkStore, FaultKind, StoreConfig, StoreError, RETRY_FIRST, RETRY_MAX, SEGMENT_DAMAGE_LIMIT,
};
use ditto_dedup::ChunkId;

/// Record header size of the segment format (see `store/record.rs`).
const HDR: u64 = 32;

/// Inserts and waits for the writer thread, so that the disk tier's state reflects the chunk.
fn put(s: &ChunkStore, id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
    let res = s.insert(id, data);
    assert!(s.wait_written(Duration::from_secs(30)), "writer stuck");
    res
}

fn get(s: &ChunkStore, id: &ChunkId) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    s.get_into(id, &mut out).then_some(out)
}

/// Whether the store returns exactly `data` for `id` (no multi-megabyte dump when it does not).
fn holds(s: &ChunkStore, id: &ChunkId, data: &[u8]) -> bool {
    get(s, id).as_deref() == Some(data)
}

#[test]
fn write_failure_turns_the_disk_tier_off_with_backoff_until_a_retry_succeeds() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::on_disk(d.path(), 1 << 20, 64 << 20);
    let s = ChunkStore::open(cfg.clone()).expect("open");
    let before: Vec<_> = (0..5).map(|i| chunk(i, 1000)).collect();
    for (id, data) in &before {
        put(&s, id, data).expect("insert");
    }
    assert!(s.degraded().is_none());

    // A write fails like a full disk: the chunk is kept in the RAM tier, the tier goes off.
    s.inject_write_failures(1);
    let (a, da) = chunk(100, 1000);
    put(&s, &a, &da).expect("kept in the RAM tier while the disk is off");
    let deg = s.degraded().expect("disk tier off");
    assert_eq!(deg.kind, FaultKind::DiskFull);
    assert!(
        deg.reason.contains("os error 28") && deg.reason.contains("seg-00000001.dat"),
        "{deg:?}"
    );
    assert_eq!(deg.failures, 1);
    assert!(
        deg.retry_in <= RETRY_FIRST && deg.retry_in > RETRY_FIRST / 2,
        "{deg:?}"
    );
    let st = s.stats();
    assert!(st.degraded);
    assert_eq!((st.write_errors, st.read_errors, st.unpersisted), (1, 0, 1));
    assert!(holds(&s, &a, &da));

    // While off, nothing is written: not even an attempt (no further errors), and no bytes.
    let on_disk = dir_bytes(d.path());
    let during: Vec<_> = (200..210).map(|i| chunk(i, 1000)).collect();
    for (id, data) in &during {
        put(&s, id, data).expect("insert while off");
        s.set_successor(&a, id);
    }
    s.flush().expect("flush while off");
    assert_eq!(dir_bytes(d.path()), on_disk);
    let st = s.stats();
    assert_eq!((st.write_errors, st.unpersisted), (1, 11));
    for (id, data) in before.iter().chain(&during) {
        assert!(holds(&s, id, data));
    }

    // Each failed retry doubles the wait, up to RETRY_MAX.
    let mut want = RETRY_FIRST;
    for n in 2..12u32 {
        s.inject_write_failures(1);
        s.retry_disk_now();
        let (id, data) = chunk(300 + n, 500);
        put(&s, &id, &data).expect("kept in RAM");
        want = (want * 2).min(RETRY_MAX);
        let deg = s.degraded().expect("still off");
        assert_eq!(deg.failures, n);
        assert!(
            deg.retry_in <= want && deg.retry_in > want - Duration::from_millis(500),
            "after {n} failures: {deg:?}"
        );
    }
    assert_eq!(want, RETRY_MAX);

    // A retry that succeeds turns the tier back on; chunks go to disk again.
    s.retry_disk_now();
    let after: Vec<_> = (400..405).map(|i| chunk(i, 1000)).collect();
    for (id, data) in &after {
        put(&s, id, data).expect("insert after recovery");
    }
    assert!(s.degraded().is_none());
    assert!(!s.stats().degraded);
    assert!(dir_bytes(d.path()) >= on_disk + 5 * 1000);
    let slots: Vec<_> = after.iter().map(|(id, _)| s.slot(id)).collect();

    // Failing again soon after coming back (a disk hovering at full) does not start over at
    // RETRY_FIRST: the wait stays where it had got to.
    s.inject_write_failures(1);
    let (id, data) = chunk(500, 500);
    put(&s, &id, &data).expect("kept in RAM");
    let deg = s.degraded().expect("off again");
    assert_eq!(deg.failures, 1);
    assert!(deg.retry_in > RETRY_MAX / 2, "{deg:?}");
    s.retry_disk_now();
    let (id, data) = chunk(501, 500);
    put(&s, &id, &data).expect("insert");
    assert!(s.degraded().is_none());

    // A clean restart keeps what reached the disk, in the same slots (the snapshot was usable), and
    // forgets what only the RAM tier held.
    s.close().expect("close");
    let s = ChunkStore::open(cfg).expect("reopen");
    for (id, data) in before.iter().chain(&after) {
        assert!(holds(&s, id, data));
    }
    assert_eq!(
        after.iter().map(|(id, _)| s.slot(id)).collect::<Vec<_>>(),
        slots
    );
    assert!(!s.contains(&a));
    for (id, _) in &during {
        assert!(!s.contains(id));
    }
    let st = s.stats();
    assert_eq!((st.corrupt_records, st.verify_failures), (0, 0));
}

#[test]
fn chunks_kept_in_ram_while_off_leave_the_store_when_the_ram_tier_evicts_them() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(StoreConfig::on_disk(d.path(), 10_000, 1 << 20)).expect("open");
    let (first, dfirst) = chunk(0, 1000);
    put(&s, &first, &dfirst).expect("insert");
    s.inject_write_failures(1);
    let chunks: Vec<_> = (1..=20).map(|i| chunk(i, 1000)).collect();
    for (id, data) in &chunks {
        put(&s, id, data).expect("insert");
    }
    assert!(s.degraded().is_some());
    // The RAM tier holds 10 of them; the others are gone, not dangling.
    for (i, (id, data)) in chunks.iter().enumerate() {
        if i < 10 {
            assert!(!s.contains(id), "chunk {i}");
            assert_eq!(get(&s, id), None);
        } else {
            assert!(holds(&s, id, data), "chunk {i}");
        }
    }
    let st = s.stats();
    assert_eq!((st.chunks, st.evictions), (11, 10), "{st:?}");
    // The chunk on disk survives the RAM tier's churn. Caching it evicts the least recently used
    // chunk kept in RAM only, which leaves the store.
    assert!(holds(&s, &first, &dfirst));
    assert!(!s.contains(&chunks[10].0));
    assert_eq!(s.stats().chunks, 10);
}

#[test]
fn without_a_ram_tier_chunks_are_not_stored_while_off() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(StoreConfig::on_disk(d.path(), 0, 1 << 20)).expect("open");
    s.inject_write_failures(1);
    let (a, da) = chunk(1, 1000);
    // Queued at once (no RAM tier: only the queue holds it); the write fails and it is gone.
    put(&s, &a, &da).expect("queued");
    let (b, db) = chunk(2, 1000);
    let err = put(&s, &b, &db).expect_err("tier off");
    assert!(
        matches!(err, StoreError::Degraded(_)) && err.to_string().contains("os error 28"),
        "{err}"
    );
    assert!(!s.contains(&a) && !s.contains(&b));
    assert_eq!(s.stats().write_errors, 1);
}

/// Fills `seg`'s bytes from `at` for `len` bytes with a pattern (a damaged region of the disk).
fn overwrite(seg: &Path, at: u64, len: usize) {
    let f = OpenOptions::new()
        .write(true)
        .open(seg)
        .expect("open segment");
    f.write_all_at(&vec![0x5a; len], at).expect("overwrite");
}

#[test]
fn a_segment_is_dropped_after_repeated_damage_and_others_are_untouched() {
    let d = tempfile::tempdir().expect("tempdir");
    // No RAM tier: every read goes to disk. Segments of 16 KiB: 15 chunks each.
    let cfg = StoreConfig::on_disk(d.path(), 0, 1 << 20).with_segment_bytes(16 << 10);
    let s = ChunkStore::open(cfg).expect("open");
    let chunks: Vec<_> = (0..60).map(|i| chunk(i, 1000)).collect();
    for (id, data) in &chunks {
        put(&s, id, data).expect("insert");
    }
    let segs = segments(d.path());
    assert!(segs.len() >= 4, "{segs:?}");
    let per_seg = 15usize;

    // One damaged byte in segment 2: that chunk is dropped, the segment stays.
    let rec = HDR + 1000;
    let mut b = fs::read(&segs[1]).expect("read");
    b[(3 * rec + HDR + 10) as usize] ^= 1;
    fs::write(&segs[1], b).expect("write");
    for (i, (id, data)) in chunks[per_seg..2 * per_seg].iter().enumerate() {
        let got = get(&s, id);
        if i == 3 {
            assert_eq!(got, None);
        } else {
            assert_eq!(got.as_deref(), Some(&data[..]), "chunk {i} of segment 2");
        }
    }
    assert_eq!(s.stats().verify_failures, 1);
    assert!(segs[1].exists());

    // The middle of segment 1 overwritten: at the damage limit the whole segment goes.
    overwrite(&segs[0], 2 * rec + 100, 9 * rec as usize);
    let mut bad = 0;
    for (id, data) in &chunks[..per_seg] {
        match get(&s, id) {
            Some(got) => assert_eq!(&got, data, "never wrong bytes"),
            None => bad += 1,
        }
    }
    let st = s.stats();
    assert_eq!(st.segments_dropped, 1, "{st:?}");
    assert_eq!(st.verify_failures, 1 + u64::from(SEGMENT_DAMAGE_LIMIT));
    assert!(!segs[0].exists(), "the damaged segment's file is deleted");
    // Chunks 0 and 1 read fine before the limit; the rest of segment 1 went with it.
    assert_eq!(bad, per_seg - 2);
    for (id, _) in &chunks[..per_seg] {
        assert!(!s.contains(id));
    }
    for (id, data) in &chunks[2 * per_seg..] {
        assert!(holds(&s, id, data));
    }

    // A segment file cut short under the running store: read errors, then the same limit.
    let f = OpenOptions::new().write(true).open(&segs[2]).expect("open");
    f.set_len(rec).expect("truncate");
    for (id, _) in &chunks[2 * per_seg..3 * per_seg] {
        let _ = get(&s, id);
    }
    let st = s.stats();
    assert_eq!(st.read_errors, u64::from(SEGMENT_DAMAGE_LIMIT), "{st:?}");
    assert_eq!(st.segments_dropped, 2);

    // The store keeps working: new chunks are stored and read back.
    let (n, dn) = chunk(1000, 1000);
    put(&s, &n, &dn).expect("insert");
    assert!(holds(&s, &n, &dn));
    assert!(s.degraded().is_none());
}

#[test]
fn damage_in_the_current_segment_seals_and_drops_it() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(StoreConfig::on_disk(d.path(), 0, 1 << 20)).expect("open");
    let chunks: Vec<_> = (0..12).map(|i| chunk(i, 1000)).collect();
    for (id, data) in &chunks {
        put(&s, id, data).expect("insert");
    }
    let seg = segments(d.path())[0].clone();
    overwrite(&seg, HDR + 10, 11 * (HDR as usize + 1000));
    for (id, _) in &chunks {
        let _ = get(&s, id);
    }
    let st = s.stats();
    assert_eq!(st.segments_dropped, 1, "{st:?}");
    assert_eq!(st.chunks, 0);
    assert!(!seg.exists());
    let (n, dn) = chunk(99, 1000);
    put(&s, &n, &dn).expect("insert into the next segment");
    assert!(holds(&s, &n, &dn));
}

#[test]
fn real_disk_full_on_a_small_tmpfs_then_space_freed() {
    let Some(fs_) = Tmpfs::mount("1m") else {
        return;
    };
    let dir = fs_.path().join("store");
    fs::create_dir(&dir).expect("mkdir");
    let filler = fs_.path().join("filler");
    fs::write(&filler, vec![1u8; 512 << 10]).expect("filler");
    // A disk tier configured far larger than the file system: it fills up.
    let cfg = StoreConfig::on_disk(&dir, 256 << 10, 64 << 20);
    let s = ChunkStore::open(cfg.clone()).expect("open");
    let mut chunks = Vec::new();
    for i in 0..200u32 {
        let (id, data) = chunk(i, 16 << 10);
        put(&s, &id, &data).expect("insert (to disk, or to RAM once full)");
        chunks.push((id, data));
        if s.degraded().is_some() {
            break;
        }
    }
    let deg = s.degraded().expect("the disk filled up");
    assert_eq!(deg.kind, FaultKind::DiskFull, "{deg:?}");
    assert!(deg.reason.contains("No space left on device"), "{deg:?}");
    let st = s.stats();
    assert_eq!(st.write_errors, 1, "{st:?}");
    assert!(chunks.len() > 20, "only {} chunks fit", chunks.len());
    // Everything reads back exactly: the last chunk from RAM (the tier was off when it came), the
    // others from disk, verified.
    for (i, (id, data)) in chunks.iter().enumerate().rev() {
        assert!(
            holds(&s, id, data),
            "chunk {i} of {}: {:?}",
            chunks.len(),
            s.stats()
        );
    }
    assert!(s.stats().disk_hits >= 10, "{:?}", s.stats());
    let (ram_only, _) = chunks.pop().expect("the chunk that met the full disk");

    // Space comes back; after the real wait, the next insert turns the tier back on.
    fs::remove_file(&filler).expect("free space");
    std::thread::sleep(deg.retry_in + Duration::from_millis(50));
    let t = Instant::now();
    let (id, data) = chunk(1000, 16 << 10);
    put(&s, &id, &data).expect("insert");
    assert!(s.degraded().is_none(), "retried and recovered");
    assert!(t.elapsed() < Duration::from_secs(1));
    chunks.push((id, data));

    // The failed, partly written record left nothing behind: a crash-recovery scan finds no damage,
    // and everything written to disk is there.
    drop(s);
    let s = ChunkStore::open(cfg).expect("reopen");
    let st = s.stats();
    assert_eq!((st.corrupt_records, st.verify_failures), (0, 0), "{st:?}");
    assert_eq!(st.chunks, chunks.len() as u64);
    for (id, data) in &chunks {
        assert!(holds(&s, id, data));
    }
    assert!(!s.contains(&ram_only));
}
