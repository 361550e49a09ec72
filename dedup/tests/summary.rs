//! Store summaries between two real on-disk stores, driven in memory: what a learner believes after
//! an exchange, what the exchange costs, and how beliefs survive (or are refused after) restarts,
//! evictions, restores and damaged view files.

use ditto_dedup::summary::{self, Msg, Part, SegInfo};
use ditto_dedup::{ChunkId, ChunkStore, PeerView, Reconciler, StoreConfig, StoreId, Summarizer};
use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn chunk(n: u64, len: usize) -> (ChunkId, Vec<u8>) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(n);
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    (ChunkId::of(&data), data)
}

fn disk_store(dir: &Path, disk: u64, segment: u64) -> Arc<ChunkStore> {
    Arc::new(
        ChunkStore::open(StoreConfig::on_disk(dir, 1 << 20, disk).with_segment_bytes(segment))
            .expect("store"),
    )
}

/// Inserts chunks `range` (4 KiB each) and waits until they are on disk.
fn fill(s: &ChunkStore, range: std::ops::Range<u64>) -> Vec<ChunkId> {
    let ids = range
        .map(|n| {
            let (id, data) = chunk(n, 4096);
            s.insert(&id, &data).expect("insert");
            id
        })
        .collect();
    assert!(s.wait_written(Duration::from_secs(30)));
    ids
}

/// The owner side (describes `store`) and the learner side (a view of it), exchanging messages until
/// neither has anything to say. Returns the bytes the owner sent and the learner sent.
fn exchange(owner: &mut Reconciler, learner: &mut Reconciler, now: Instant) -> (u64, u64) {
    let (o0, l0) = (owner.stats().bytes_sent, learner.stats().bytes_sent);
    let mut to_l = Vec::new();
    let mut to_o = Vec::new();
    owner.poll(now, &mut to_l);
    learner.poll(now, &mut to_o);
    for _ in 0..10_000 {
        if to_l.is_empty() && to_o.is_empty() {
            break;
        }
        for m in std::mem::take(&mut to_l) {
            learner.on_message(&m, now, &mut to_o).expect("learner");
        }
        for m in std::mem::take(&mut to_o) {
            owner.on_message(&m, now, &mut to_l).expect("owner");
        }
    }
    (
        owner.stats().bytes_sent - o0,
        learner.stats().bytes_sent - l0,
    )
}

struct Pair {
    owner: Reconciler,
    learner: Reconciler,
}

/// `store` described to a learner whose view is `view`.
fn pair(store: &Arc<ChunkStore>, view: Arc<PeerView>) -> Pair {
    Pair {
        // The owner's own view of the learner plays no part here.
        owner: Reconciler::new(
            Arc::new(PeerView::new(StoreId(7))),
            Some(Arc::new(Summarizer::new(store.clone()))),
        ),
        learner: Reconciler::new(view, None),
    }
}

#[test]
fn learner_knows_what_the_store_holds_and_pays_under_a_thousandth() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = disk_store(d.path(), 1 << 30, 4 << 20);
    let ids = fill(&s, 0..6000);
    let view = Arc::new(PeerView::new(s.identity()));
    let mut p = pair(&s, view.clone());
    let now = Instant::now();
    let (sent, asked) = exchange(&mut p.owner, &mut p.learner, now);
    assert!(p.learner.in_sync());
    assert!(ids.iter().all(|id| view.knows(id)));
    assert_eq!(view.summarized_chunks(), 6000);
    assert_eq!(p.learner.stats().peer_chunks, 6000);
    let stored = s.stats().bytes;
    let ratio = (sent + asked) as f64 / stored as f64;
    println!(
        "summary of {stored} bytes in {} segments: {sent} + {asked} bytes ({:.4}%)",
        s.segment_states().len(),
        ratio * 100.0
    );
    assert!(
        ratio < 0.001,
        "summary costs {:.4}% of the store",
        ratio * 100.0
    );
    // Chunks the store never held are not believed (40-bit fingerprints: a false positive among
    // 5000 has odds of 1 in 40 million).
    let strangers = (100_000..105_000u64).filter(|&n| view.knows(&chunk(n, 4096).0));
    assert_eq!(strangers.count(), 0);

    // Nothing changed: the next rounds cost nothing; more chunks cost only their share.
    let (sent, asked) = exchange(&mut p.owner, &mut p.learner, now + Duration::from_secs(3));
    assert_eq!((sent, asked), (0, 0));
    let more = fill(&s, 6000..6500);
    let (sent, asked) = exchange(&mut p.owner, &mut p.learner, now + Duration::from_secs(6));
    assert!(more.iter().all(|id| view.knows(id)));
    assert!(
        sent + asked < 500 * 4096 / 1000 + 2048,
        "500 new chunks cost {sent} + {asked} bytes"
    );
}

#[test]
fn evicted_segments_are_forgotten() {
    let d = tempfile::tempdir().expect("tempdir");
    // 8 MiB of disk in 1 MiB segments: the oldest go as new chunks arrive.
    let s = disk_store(d.path(), 8 << 20, 1 << 20);
    let first = fill(&s, 0..1000);
    let view = Arc::new(PeerView::new(s.identity()));
    let mut p = pair(&s, view.clone());
    let now = Instant::now();
    exchange(&mut p.owner, &mut p.learner, now);
    assert!(first.iter().all(|id| view.knows(id)));
    let later = fill(&s, 1000..3000);
    exchange(&mut p.owner, &mut p.learner, now + Duration::from_secs(3));
    let held: Vec<bool> = first.iter().map(|id| s.contains(id)).collect();
    assert!(held.iter().any(|h| !h), "the store evicted nothing");
    for (id, h) in first.iter().zip(&held) {
        assert_eq!(view.knows(id), *h, "belief differs from the store");
    }
    assert!(later.iter().rev().take(100).all(|id| view.knows(id)));
    assert_eq!(view.summarized_chunks(), s.stats().chunks);
}

#[test]
fn a_need_overrides_the_summary_until_sent_again() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = disk_store(d.path(), 1 << 30, 4 << 20);
    let ids = fill(&s, 0..10);
    let view = Arc::new(PeerView::new(s.identity()));
    let mut p = pair(&s, view.clone());
    exchange(&mut p.owner, &mut p.learner, Instant::now());
    assert!(view.knows(&ids[3]));
    view.forget(&ids[3]);
    assert!(!view.knows(&ids[3]));
    view.believe(&ids[3]);
    assert!(view.knows(&ids[3]));
    assert!(view.knows(&ids[3]));
}

#[test]
fn view_survives_a_restart_and_only_changes_are_asked_again() {
    let d = tempfile::tempdir().expect("tempdir");
    let vdir = tempfile::tempdir().expect("tempdir");
    let s = disk_store(d.path(), 1 << 30, 4 << 20);
    let ids = fill(&s, 0..3000);
    let now = Instant::now();
    let first_cost = {
        let view = PeerView::open(s.identity(), vdir.path());
        let mut p = pair(&s, view);
        let (a, b) = exchange(&mut p.owner, &mut p.learner, now);
        a + b
    };
    // The learner restarts: its view comes back from the file.
    let view = PeerView::open(s.identity(), vdir.path());
    assert!(!view.load_report().damaged);
    assert!(ids.iter().all(|id| view.knows(id)));
    // The owner restarts too (its store closed and opened again), then the exchange: only the index.
    drop(s);
    let s = disk_store(d.path(), 1 << 30, 4 << 20);
    let mut p = pair(&s, view.clone());
    let (a, b) = exchange(&mut p.owner, &mut p.learner, now);
    assert!(p.learner.in_sync());
    assert!(
        (a + b) * 10 < first_cost,
        "after the restart the exchange cost {} bytes, the first {first_cost}",
        a + b
    );
    let more = fill(&s, 3000..3100);
    exchange(&mut p.owner, &mut p.learner, now + Duration::from_secs(3));
    assert!(more.iter().all(|id| view.knows(id)));
}

#[test]
fn a_changed_segment_is_not_believed() {
    // A store restored from a backup: same segment numbers and lengths, other chunks.
    let view = PeerView::new(StoreId(1));
    let keys: Vec<u64> = (1..=100u64).map(|i| i << 20).collect();
    let fold = keys.iter().fold(0u64, |a, k| a.wrapping_add(*k));
    let (k, bits) = summary::encode_keys(&keys);
    let part = Part {
        seq: 3,
        from: 0,
        to: 1000,
        fold_before: 0,
        fold,
        count: 100,
        k,
        bits,
    };
    view.apply_part(&part);
    assert_eq!(view.summarized_chunks(), 100);
    let same = SegInfo {
        seq: 3,
        len: 1000,
        keys: 100,
        fold,
    };
    assert!(view.apply_index(&[same]).is_empty());
    assert_eq!(view.summarized_chunks(), 100);
    let other = SegInfo { fold: 99, ..same };
    assert_eq!(view.apply_index(&[other]), vec![(3, 0)]);
    assert_eq!(view.summarized_chunks(), 0);
    // A continuation that does not follow what we hold is refused and the segment forgotten.
    view.apply_part(&part);
    let next = Part {
        from: 1000,
        to: 2000,
        fold_before: 12345,
        ..part.clone()
    };
    assert_eq!(view.apply_part(&next), ditto_dedup::peer::Applied::Mismatch);
    assert_eq!(view.summarized_chunks(), 0);
}

fn learned_view(vdir: &Path) -> (tempfile::TempDir, Arc<ChunkStore>, Vec<ChunkId>) {
    let d = tempfile::tempdir().expect("tempdir");
    let s = disk_store(d.path(), 1 << 30, 1 << 20);
    let ids = fill(&s, 0..2000);
    let view = PeerView::open(s.identity(), vdir);
    let mut p = pair(&s, view);
    exchange(&mut p.owner, &mut p.learner, Instant::now());
    (d, s, ids)
}

fn view_file(vdir: &Path) -> std::path::PathBuf {
    std::fs::read_dir(vdir)
        .expect("ok")
        .map(|e| e.expect("ok").path())
        .find(|p| p.extension().is_some_and(|e| e == "view"))
        .expect("view file")
}

#[test]
fn a_torn_view_file_keeps_only_whole_records() {
    let vdir = tempfile::tempdir().expect("tempdir");
    let (_d, s, ids) = learned_view(vdir.path());
    let f = view_file(vdir.path());
    let len = std::fs::metadata(&f).expect("ok").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&f)
        .expect("ok");
    file.set_len(len - 100).expect("ok");
    let view = PeerView::open(s.identity(), vdir.path());
    let rep = view.load_report().clone();
    assert!(rep.damaged && rep.records > 0, "{rep:?}");
    let known = ids.iter().filter(|id| view.knows(id)).count();
    assert!(known > 0 && known < ids.len(), "{known} of {}", ids.len());
    // The file was cut back to whole records: the next open finds it clean.
    drop(view);
    let again = PeerView::open(s.identity(), vdir.path());
    assert!(!again.load_report().damaged);
}

#[test]
fn an_altered_view_file_is_not_believed() {
    let vdir = tempfile::tempdir().expect("tempdir");
    let (_d, s, ids) = learned_view(vdir.path());
    let f = view_file(vdir.path());
    let mut b = std::fs::read(&f).expect("ok");
    // Flip one bit in every record after the first few hundred bytes (fingerprint bits included).
    let at = b.len() / 3;
    b[at] ^= 0x10;
    std::fs::write(&f, &b).expect("ok");
    let view = PeerView::open(s.identity(), vdir.path());
    assert!(view.load_report().damaged);
    let known = ids.iter().filter(|id| view.knows(id)).count();
    assert!(known < ids.len());
    // Nothing it believes is wrong: every believed chunk is one the store holds.
    for n in 100_000..102_000u64 {
        assert!(!view.knows(&chunk(n, 4096).0));
    }
    // A header of another store: the whole file is dropped.
    let mut b = std::fs::read(&f).expect("ok");
    b[10] ^= 1;
    std::fs::write(&f, &b).expect("ok");
    let view = PeerView::open(s.identity(), vdir.path());
    assert!(view.load_report().damaged);
    assert_eq!(view.summarized_chunks(), 0);
}

#[test]
fn malformed_messages_are_refused_and_counted() {
    let view = Arc::new(PeerView::new(StoreId(1)));
    let mut r = Reconciler::new(view.clone(), None);
    let mut out = Vec::new();
    let now = Instant::now();
    for bad in [
        vec![],
        vec![0xff; 10],
        vec![3, 0, 0],
        Msg::Index {
            first: false,
            last: true,
            entries: vec![],
        }
        .encode(),
    ] {
        assert!(r.on_message(&bad, now, &mut out).is_err());
    }
    assert_eq!(r.stats().rejected, 4);
    assert_eq!(view.summarized_chunks(), 0);
}

proptest! {
    #[test]
    fn rice_coding_round_trips(mut keys in proptest::collection::vec(0u64..(1 << summary::FP_BITS), 0..3000)) {
        keys.sort_unstable();
        keys.dedup();
        let (k, bits) = summary::encode_keys(&keys);
        prop_assert_eq!(summary::decode_keys(keys.len() as u32, k, &bits).expect("ok"), keys);
    }

    #[test]
    fn parsing_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = Msg::parse(&b);
        let mut r = Reconciler::new(Arc::new(PeerView::new(StoreId(1))), None);
        let _ = r.on_message(&b, Instant::now(), &mut Vec::new());
    }
}

#[test]
fn marks_expire_once_summaries_cover_them() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = disk_store(d.path(), 1 << 30, 4 << 20);
    fill(&s, 0..10);
    let view = Arc::new(PeerView::new(s.identity()));
    let mut p = pair(&s, view.clone());
    // Two chunks we "sent": one the peer stored, one it lost (never on its disk).
    let (kept, data) = chunk(500, 4096);
    let lost = chunk(501, 4096).0;
    view.believe(&kept);
    view.believe(&lost);
    let t0 = Instant::now();
    exchange(&mut p.owner, &mut p.learner, t0);
    s.insert(&kept, &data).expect("ok");
    assert!(s.wait_written(Duration::from_secs(10)));
    // The first rotation (at the first sync) keeps the marks one more generation.
    assert!(view.knows(&kept) && view.knows(&lost));
    let t1 = t0 + summary::ROTATE_MIN;
    exchange(&mut p.owner, &mut p.learner, t1);
    assert!(view.knows(&kept), "the summary lists it");
    assert!(
        !view.knows(&lost),
        "a mark older than two in-sync indexes is dropped"
    );
    assert_eq!(view.count(), 0);
}

#[test]
fn a_sealed_view_opens_only_with_its_store_key() {
    use ditto_dedup::store::StoreKey;
    let peer_dir = tempfile::tempdir().expect("tempdir");
    let peer = disk_store(peer_dir.path(), 1 << 30, 4 << 20);
    let ids = fill(&peer, 0..2000);
    let ours_dir = tempfile::tempdir().expect("tempdir");
    let key = StoreKey::generate();
    let open_ours = |key: &StoreKey| {
        Arc::new(
            ChunkStore::open(
                StoreConfig::on_disk(ours_dir.path(), 1 << 20, 1 << 30).with_key(key.clone()),
            )
            .expect("our store"),
        )
    };
    let ours = open_ours(&key);
    let view = PeerView::open_for(&ours, peer.identity());
    let mut p = pair(&peer, view.clone());
    exchange(&mut p.owner, &mut p.learner, Instant::now());
    drop((p, view));
    // The parts as sent (their coded fingerprints) are nowhere in the file.
    let f = view_file(&ours_dir.path().join("peers"));
    let bytes = std::fs::read(&f).expect("ok");
    let mut chunks = Vec::new();
    peer.segment_chunks(1, &mut chunks).expect("segment 1");
    let Msg::Part(part) = summary::part_of(1, 0, u64::MAX, &mut chunks) else {
        panic!("a part")
    };
    let probe = &part.bits[..32];
    assert!(
        !bytes.windows(probe.len()).any(|w| w == probe),
        "plain fingerprints in the view file"
    );
    // With its key it opens; with another key it is dropped, never believed.
    let again = PeerView::open_for(&ours, peer.identity());
    assert!(again.wait_loaded(Duration::from_secs(30)));
    assert!(!again.load_report().damaged);
    assert!(ids.iter().all(|id| again.knows(id)));
    drop((again, ours));
    let other = open_ours(&StoreKey::generate());
    let wrong = PeerView::open_for(&other, peer.identity());
    assert!(wrong.wait_loaded(Duration::from_secs(30)));
    assert!(wrong.load_report().damaged);
    assert_eq!(wrong.summarized_chunks(), 0);
}

/// A learner that lost the owner's index (a new reconciler on its side, the owner unaware) is in
/// sync again once the owner refreshes its unchanged index, and the refresh alone costs the owner
/// nothing in between.
#[test]
fn an_unchanged_index_is_announced_again_after_a_while() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = disk_store(d.path(), 1 << 30, 4 << 20);
    let ids = fill(&s, 0..500);
    let view = Arc::new(PeerView::new(s.identity()));
    let mut p = pair(&s, view.clone());
    let now = Instant::now();
    exchange(&mut p.owner, &mut p.learner, now);
    assert!(p.learner.in_sync());
    let mut lost = Reconciler::new(Arc::new(PeerView::new(s.identity())), None);
    let mut quiet = Vec::new();
    p.owner.poll(now + summary::INDEX_INTERVAL * 3, &mut quiet);
    assert!(
        quiet.is_empty(),
        "an unchanged index is not sent again at once"
    );
    exchange(&mut p.owner, &mut lost, now + summary::INDEX_INTERVAL * 3);
    assert!(!lost.in_sync());
    exchange(
        &mut p.owner,
        &mut lost,
        now + summary::INDEX_REFRESH + summary::INDEX_INTERVAL,
    );
    assert!(lost.in_sync());
    assert!(ids.iter().all(|id| lost.view().knows(id)));
}
