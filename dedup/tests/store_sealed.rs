//! A chunk store with a key: records sealed on disk, nothing of the chunks in plain text, and a record
//! altered, moved, or copied from another store rejected like a damaged one (dropped and counted).
//! A store opened with another key, without one, or an unencrypted store opened with one starts
//! empty with a new identity; nothing is decoded wrongly. Real files in temporary directories.

#![cfg(unix)]

#[path = "../../tests/common/disk.rs"]
mod disk;
#[path = "../../tests/common/require.rs"]
mod require;

mod common;
use common::chunk;
use disk::segments;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ditto_dedup::store::{ChunkStore, StoreConfig, StoreKey};
use ditto_dedup::{ChunkId, EngineConfig, PeerView};

/// Bytes of a sealed record besides its payload: 28 before it (header), 32 after (sealed id, tag).
const PRE: u64 = 28;
const OVERHEAD: u64 = 60;

fn cfg(dir: &Path, key: &StoreKey) -> StoreConfig {
    // No RAM tier: every read goes to disk and is opened.
    StoreConfig::on_disk(dir, 0, 64 << 20).with_key(key.clone())
}

fn get(s: &ChunkStore, id: &ChunkId) -> Option<Vec<u8>> {
    let mut out = vec![0xAA];
    if s.get_into(id, &mut out) {
        Some(out[1..].to_vec())
    } else {
        assert_eq!(out, [0xAA], "a miss must leave the output untouched");
        None
    }
}

/// Inserts `n` chunks of equal length (no successor records, so record offsets are predictable) and
/// waits until they are written; returns them with the offset of each record in the segment.
fn fill(s: &ChunkStore, first: u32, n: u32, len: usize) -> Vec<(ChunkId, Vec<u8>, u64)> {
    let v = (0..n)
        .map(|i| {
            let (id, data) = chunk(first + i, len);
            s.insert(&id, &data).expect("insert");
            (id, data, u64::from(i) * (OVERHEAD + len as u64))
        })
        .collect();
    assert!(s.wait_written(Duration::from_secs(30)), "writer stuck");
    v
}

fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").path())
        .collect();
    v.sort();
    v
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn assert_nothing_in_plain_text(dir: &Path, chunks: &[(ChunkId, Vec<u8>, u64)]) {
    for f in files(dir) {
        let b = fs::read(&f).expect("read");
        for (id, data, _) in chunks {
            assert!(!contains(&b, &data[8..40]), "{}: chunk bytes", f.display());
            assert!(!contains(&b, id.as_bytes()), "{}: chunk id", f.display());
        }
    }
}

#[test]
fn sealed_store_round_trips_and_keeps_nothing_in_plain_text() {
    let d = tempfile::tempdir().expect("tempdir");
    let dir = d.path().join("store");
    let key = StoreKey::generate();
    let s = ChunkStore::open(cfg(&dir, &key)).expect("open");
    let id0 = s.identity();
    let chunks = fill(&s, 0, 20, 1000);
    s.set_successor(&chunks[0].0, &chunks[1].0);
    for (id, data, _) in &chunks {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    s.close().expect("close");
    // The segment, the meta file and the snapshot hold no chunk bytes and no chunk ids.
    assert!(files(&dir).iter().any(|f| f.ends_with("index.snap")));
    assert_nothing_in_plain_text(&dir, &chunks);
    // Modes: the directory 0700, every file 0600.
    let mode = |p: &Path| fs::metadata(p).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700);
    for f in files(&dir) {
        assert_eq!(mode(&f), 0o600, "{}", f.display());
    }

    // Clean reopen: from the sealed snapshot.
    let s = ChunkStore::open(cfg(&dir, &key)).expect("reopen");
    assert_eq!(s.identity(), id0);
    for (id, data, _) in &chunks {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    assert_eq!(s.successor(&chunks[0].0), Some(chunks[1].0));
    drop(s);

    // Unclean reopen: the scan opens every record.
    let s = ChunkStore::open(cfg(&dir, &key)).expect("reopen after drop");
    assert_eq!(s.identity(), id0);
    assert_eq!(s.stats().chunks, 20);
    for (id, data, _) in &chunks {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    assert_eq!(s.successor(&chunks[0].0), Some(chunks[1].0));
    let st = s.stats();
    assert_eq!((st.verify_failures, st.corrupt_records), (0, 0));
}

#[test]
fn altered_record_is_rejected_on_read_and_on_scan() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = StoreKey::generate();
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("open");
    let chunks = fill(&s, 0, 6, 500);
    let seg = segments(d.path())[0].clone();
    // One payload byte of chunk 2, while the store is open: a verified miss.
    let mut b = fs::read(&seg).expect("read");
    b[(chunks[2].2 + PRE + 7) as usize] ^= 1;
    // And one tag byte of chunk 4.
    b[(chunks[4].2 + PRE + 500 + 16 + 3) as usize] ^= 0x80;
    fs::write(&seg, &b).expect("write");
    assert_eq!(get(&s, &chunks[2].0), None);
    assert_eq!(get(&s, &chunks[4].0), None);
    assert_eq!(s.stats().verify_failures, 2);
    assert!(!s.contains(&chunks[2].0), "a damaged chunk is dropped");
    for i in [0, 1, 3, 5] {
        assert_eq!(get(&s, &chunks[i].0).as_deref(), Some(&chunks[i].1[..]));
    }
    drop(s);
    // On the scan: the same two records are skipped and counted.
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("reopen");
    let st = s.stats();
    assert_eq!((st.chunks, st.verify_failures), (4, 2));
    assert!(!s.contains(&chunks[2].0) && !s.contains(&chunks[4].0));
}

#[test]
fn record_moved_within_the_store_is_rejected() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = StoreKey::generate();
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("open");
    let chunks = fill(&s, 0, 6, 700);
    let seg = segments(d.path())[0].clone();
    let rec = (OVERHEAD + 700) as usize;
    let mut b = fs::read(&seg).expect("read");
    // Chunk 1's record copied over chunk 3's place (same length: every byte is a valid record).
    let one = b[chunks[1].2 as usize..][..rec].to_vec();
    b[chunks[3].2 as usize..][..rec].copy_from_slice(&one);
    fs::write(&seg, &b).expect("write");
    // Read while open: chunk 3's place no longer opens.
    assert_eq!(get(&s, &chunks[3].0), None);
    assert_eq!(s.stats().verify_failures, 1);
    assert_eq!(get(&s, &chunks[1].0).as_deref(), Some(&chunks[1].1[..]));
    drop(s);

    // A replayed record appended at the end (as if written again later): rejected by the scan.
    let mut b = fs::read(&seg).expect("read");
    let zero = b[..rec].to_vec();
    b.extend_from_slice(&zero);
    fs::write(&seg, &b).expect("write");
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("reopen");
    let st = s.stats();
    // The copy at 3's place and the replay at the end do not open.
    assert_eq!(st.verify_failures, 2, "{st:?}");
    assert_eq!(st.chunks, 5);
    for i in [0, 1, 2, 4, 5] {
        assert_eq!(get(&s, &chunks[i].0).as_deref(), Some(&chunks[i].1[..]));
    }
    // A moved segment file (renamed to another sequence number) does not open either.
    s.close().expect("close");
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("reopen");
    s.insert(&chunk(99, 100).0, &chunk(99, 100).1)
        .expect("insert");
    assert!(s.wait_written(Duration::from_secs(30)));
    drop(s);
    let segs = segments(d.path());
    let moved = seg.with_file_name("seg-00000007.dat");
    fs::rename(&segs[0], &moved).expect("rename");
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("reopen");
    for (id, _, _) in &chunks {
        assert_eq!(get(&s, id), None);
    }
    assert!(s.stats().verify_failures >= 5, "{:?}", s.stats());
}

#[test]
fn record_copied_from_another_store_is_rejected() {
    let (da, db) = (
        tempfile::tempdir().expect("tempdir"),
        tempfile::tempdir().expect("tempdir"),
    );
    // The same key: what differs is the store (its identity).
    let key = StoreKey::generate();
    let a = ChunkStore::open(cfg(da.path(), &key)).expect("open a");
    let mine = fill(&a, 0, 3, 600);
    drop(a);
    let b = ChunkStore::open(cfg(db.path(), &key)).expect("open b");
    let theirs = fill(&b, 50, 4, 600);
    drop(b);
    // b's record at the very place it would be in a (the next record after a's three).
    let seg_a = segments(da.path())[0].clone();
    let seg_b = segments(db.path())[0].clone();
    let rec = (OVERHEAD + 600) as usize;
    let from_b = fs::read(&seg_b).expect("read b")[theirs[3].2 as usize..][..rec].to_vec();
    let mut bytes = fs::read(&seg_a).expect("read a");
    assert_eq!(bytes.len(), 3 * rec);
    bytes.extend_from_slice(&from_b);
    fs::write(&seg_a, &bytes).expect("write a");
    let a = ChunkStore::open(cfg(da.path(), &key)).expect("reopen a");
    let st = a.stats();
    assert_eq!((st.chunks, st.verify_failures), (3, 1), "{st:?}");
    assert!(!a.contains(&theirs[3].0));
    for (id, data, _) in &mine {
        assert_eq!(get(&a, id).as_deref(), Some(&data[..]));
    }
}

#[test]
fn torn_tail_and_garbage_are_handled_like_in_a_plain_store() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = StoreKey::generate();
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("open");
    let chunks = fill(&s, 0, 5, 300);
    drop(s);
    let seg = segments(d.path())[0].clone();
    let rec = OVERHEAD + 300;
    for cut in [1u64, 16, 17, 43, 44, 200] {
        let full = fs::read(&seg).expect("read");
        fs::write(&seg, &full[..full.len() - cut as usize]).expect("cut");
        let s = ChunkStore::open(cfg(d.path(), &key)).expect("reopen");
        assert_eq!(s.stats().chunks, 4, "cut {cut}");
        assert_eq!(
            fs::metadata(&seg).expect("stat").len(),
            4 * rec,
            "truncated"
        );
        for (id, data, _) in &chunks[..4] {
            assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
        }
        // Put the last chunk back for the next round (written at the same offset, a new nonce).
        s.insert(&chunks[4].0, &chunks[4].1).expect("insert");
        assert!(s.wait_written(Duration::from_secs(30)));
        drop(s);
    }
    // Garbage over a record's header: resynchronised on the next record, the rest kept.
    let mut b = fs::read(&seg).expect("read");
    let at = 2 * rec as usize;
    let junk = b"dT garbage dTC\x02 not a record at all.....";
    b[at..at + junk.len()].copy_from_slice(junk);
    fs::write(&seg, &b).expect("write");
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("reopen");
    let st = s.stats();
    assert_eq!(
        (st.chunks, st.corrupt_records, st.verify_failures),
        (4, 1, 0),
        "{st:?}"
    );
    for i in [0, 1, 3, 4] {
        assert_eq!(get(&s, &chunks[i].0).as_deref(), Some(&chunks[i].1[..]));
    }
    drop(s);
    // Bytes inserted between records move the records after them: those no longer open (a record
    // opens only at its own offset) and are dropped, counted.
    let mut b = fs::read(&seg).expect("read");
    let tail = b.split_off(at + rec as usize);
    b.extend_from_slice(b"inserted");
    b.extend_from_slice(&tail);
    fs::write(&seg, &b).expect("write");
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("reopen");
    let st = s.stats();
    assert_eq!((st.chunks, st.verify_failures), (2, 2), "{st:?}");
}

#[test]
fn wrong_or_missing_key_starts_an_empty_store_never_wrong_bytes() {
    let d = tempfile::tempdir().expect("tempdir");
    let key = StoreKey::generate();
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("open");
    let id0 = s.identity();
    let chunks = fill(&s, 0, 5, 400);
    s.close().expect("close");

    // Another key: a new, empty store; the old files are gone.
    let other = StoreKey::generate();
    let s = ChunkStore::open(cfg(d.path(), &other)).expect("open with another key");
    assert_ne!(s.identity(), id0);
    assert_eq!(s.stats().chunks, 0);
    for (id, _, _) in &chunks {
        assert_eq!(get(&s, id), None);
    }
    let id1 = s.identity();
    let more = fill(&s, 10, 3, 400);
    drop(s);

    // No key at all: the sealed store is not read either.
    let s =
        ChunkStore::open(StoreConfig::on_disk(d.path(), 0, 64 << 20)).expect("open without key");
    assert_ne!(s.identity(), id1);
    assert_eq!(s.stats().chunks, 0);
    let plain = fill(&s, 20, 3, 400);
    s.close().expect("close");

    // An unencrypted store opened with a key: started anew, nothing of it kept.
    let s = ChunkStore::open(cfg(d.path(), &key)).expect("open plain with key");
    assert_eq!(s.stats().chunks, 0);
    for (id, _, _) in more.iter().chain(&plain) {
        assert_eq!(get(&s, id), None);
    }
    let st = s.stats();
    assert_eq!((st.verify_failures, st.corrupt_records), (0, 0));
    drop(s);
    assert_nothing_in_plain_text(d.path(), &plain);
}

#[test]
fn store_key_file_is_created_once_with_mode_0600() {
    let d = tempfile::tempdir().expect("tempdir");
    let path = d.path().join("node.store.key");
    let (k1, created) = StoreKey::load_or_create(&path).expect("create");
    assert!(created);
    assert_eq!(
        fs::metadata(&path).expect("stat").permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(fs::read(&path).expect("read").len(), 32);
    let (k2, created) = StoreKey::load_or_create(&path).expect("load");
    assert!(!created);
    assert_eq!(k1, k2);
    fs::write(&path, b"short").expect("write");
    assert!(
        StoreKey::load_or_create(&path).is_err(),
        "a bad key file is an error, not replaced"
    );
}

#[test]
fn damaged_sealed_store_keeps_traffic_byte_exact() {
    let da = tempfile::tempdir().expect("tempdir");
    let db = tempfile::tempdir().expect("tempdir");
    let (ka, kb) = (StoreKey::generate(), StoreKey::generate());
    let open = |d: &Path, k: &StoreKey| {
        Arc::new(
            ChunkStore::open(StoreConfig::on_disk(d, 0, 256 << 20).with_key(k.clone()))
                .expect("open"),
        )
    };
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(16);
    let data = common::random_bytes(&mut rng, 4 << 20);
    let (a, b) = (open(da.path(), &ka), open(db.path(), &kb));
    let (ida, idb) = (a.identity(), b.identity());
    // What the sender believes the receiver holds, kept across the restart.
    let va = Arc::new(PeerView::new(idb));
    let vb = Arc::new(PeerView::new(ida));
    let mut link = common::Link::new(&a, &b, va.clone(), vb.clone(), EngineConfig::default(), 1);
    link.send(&data, 64 << 10, 0.05, false);
    assert!(link.received == data);
    drop(link);
    for s in [a, b] {
        Arc::try_unwrap(s)
            .ok()
            .expect("sole owner")
            .close()
            .expect("close");
    }
    // Every 50th byte of the receiver's segments altered: its chunks no longer open.
    for seg in segments(db.path()) {
        let mut b = fs::read(&seg).expect("read");
        for i in (0..b.len()).step_by(50) {
            b[i] ^= 0x5a;
        }
        fs::write(&seg, &b).expect("write");
    }
    let (a, b) = (open(da.path(), &ka), open(db.path(), &kb));
    assert_eq!((a.identity(), b.identity()), (ida, idb));
    assert!(va.count() > 0);
    let mut link = common::Link::new(&a, &b, va, vb, EngineConfig::default(), 2);
    link.send(&data, 64 << 10, 0.05, false);
    assert!(link.received == data, "decoded bytes differ");
    let st = b.stats();
    assert!(st.verify_failures > 0, "{st:?}");
    assert_eq!(st.disk_hits, 0, "no damaged chunk was used");
    assert!(link.dec.stats().needs_sent > 0);
}
