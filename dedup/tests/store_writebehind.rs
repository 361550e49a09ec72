//! Write-behind: a slow disk never slows `insert` nor the store's readers; past the queue bound chunks
//! are kept in RAM only and counted; no chunk that was not written is in the store after a restart;
//! closing waits for a slow disk only for a bounded time. The disk is slowed by the store's test hook
//! (`simulate_slow_disk`), which delays the writer thread like a device of that speed would.

mod common;
use common::chunk;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ditto_dedup::store::{ChunkStore, StoreConfig, DRAIN_TIMEOUT};
use ditto_dedup::ChunkId;

const MS: Duration = Duration::from_millis(1);

fn get(s: &ChunkStore, id: &ChunkId) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    s.get_into(id, &mut out).then_some(out)
}

/// How long the simulated device needs for `bytes` at `per_4k`.
fn disk_time(bytes: usize, per_4k: Duration) -> Duration {
    per_4k * bytes.div_ceil(4096) as u32
}

#[test]
fn a_slow_disk_costs_writes_not_insert_time_and_skipped_chunks_do_not_survive() {
    let d = tempfile::tempdir().expect("tempdir");
    // A RAM tier that holds everything, a 1 MiB queue, a disk of about 4 MB/s.
    let cfg = StoreConfig::on_disk(d.path(), 64 << 20, 1 << 30).with_write_queue_bytes(1 << 20);
    let s = ChunkStore::open(cfg.clone()).expect("open");
    s.simulate_slow_disk(MS, 50 * MS, Duration::ZERO);
    let chunks: Vec<_> = (0..2000).map(|i| chunk(i, 8 << 10)).collect();
    let bytes: usize = chunks.iter().map(|c| c.1.len()).sum();
    let t = Instant::now();
    for (id, data) in &chunks {
        s.insert(id, data).expect("insert");
    }
    let took = t.elapsed();
    let disk = disk_time(bytes, MS);
    assert!(
        took * 4 < disk,
        "16 MiB of inserts took {took:?}: throttled toward the disk's own {disk:?}"
    );
    let st = s.stats();
    assert!(
        st.writes_skipped > 1000,
        "the queue holds ~128 chunks: {st:?}"
    );
    assert!(st.write_queue_bytes <= 1 << 20, "{st:?}");
    // Every chunk is served (from RAM), byte-exact, written or not.
    for (id, data) in &chunks {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    assert!(s.wait_written(Duration::from_secs(30)), "the queue drains");
    let skipped = s.stats().writes_skipped;
    s.close().expect("close");

    // After a restart the store holds exactly the chunks that were written, and they read back.
    let s = ChunkStore::open(cfg).expect("reopen");
    let mut held = 0u64;
    for (id, data) in &chunks {
        if s.contains(id) {
            held += 1;
            assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
        }
    }
    assert_eq!(held, chunks.len() as u64 - skipped);
    let st = s.stats();
    assert_eq!(st.chunks, held);
    assert_eq!(st.verify_failures + st.corrupt_records + st.io_errors, 0);
}

#[test]
fn queued_chunks_are_served_even_without_a_ram_tier() {
    let d = tempfile::tempdir().expect("tempdir");
    let s = ChunkStore::open(StoreConfig::on_disk(d.path(), 0, 1 << 30)).expect("open");
    // 20 ms per 4 KiB: the writer is still on the first chunks when the reads come.
    s.simulate_slow_disk(20 * MS, Duration::ZERO, Duration::ZERO);
    let chunks: Vec<_> = (0..50).map(|i| chunk(i, 4000)).collect();
    for (id, data) in &chunks {
        s.insert(id, data).expect("insert");
    }
    assert!(s.stats().write_queue_chunks > 0);
    for (id, data) in &chunks {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    assert_eq!(s.stats().misses, 0);
}

#[test]
fn readers_never_wait_for_the_writer() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::on_disk(d.path(), 64 << 20, 1 << 30).with_write_queue_bytes(8 << 20);
    let s = Arc::new(ChunkStore::open(cfg).expect("open"));
    // One batch (256 KiB) takes 256 ms on this disk: a reader waiting behind a write would see that.
    let per_4k = 4 * MS;
    s.simulate_slow_disk(per_4k, Duration::ZERO, Duration::ZERO);
    let (hot, hot_data) = chunk(u32::MAX, 1000);
    s.insert(&hot, &hot_data).expect("insert");
    let writer = {
        let s = Arc::clone(&s);
        std::thread::spawn(move || {
            for i in 0..1000 {
                let (id, data) = chunk(i, 8 << 10);
                s.insert(&id, &data).expect("insert");
            }
        })
    };
    let mut worst = Duration::ZERO;
    let until = Instant::now() + Duration::from_millis(1500);
    let mut out = Vec::new();
    while Instant::now() < until {
        let t = Instant::now();
        out.clear();
        assert!(s.get_into(&hot, &mut out));
        let _ = s.contains(&hot);
        worst = worst.max(t.elapsed());
        std::thread::sleep(MS);
    }
    writer.join().expect("inserting thread");
    let batch = disk_time(ditto_dedup::store::WRITE_BATCH_BYTES, per_4k);
    assert!(
        worst * 2 < batch,
        "a reader waited {worst:?} while the writer thread wrote batches of {batch:?}"
    );
    assert!(
        s.stats().write_queue_chunks > 0 || s.stats().writes_skipped > 0,
        "the disk was the bottleneck during the test"
    );
}

static SECTION_RUNS: AtomicU64 = AtomicU64::new(0);

fn counting_section(read: &mut dyn FnMut()) {
    SECTION_RUNS.fetch_add(1, Ordering::SeqCst);
    read();
}

#[test]
fn disk_reads_that_wait_for_the_device_run_in_the_blocking_section() {
    let d = tempfile::tempdir().expect("tempdir");
    // No RAM tier: every read goes to disk.
    let s = ChunkStore::open(StoreConfig::on_disk(d.path(), 0, 1 << 30)).expect("open");
    s.set_blocking_section(counting_section);
    let chunks: Vec<_> = (0..20).map(|i| chunk(i, 3000)).collect();
    for (id, data) in &chunks {
        s.insert(id, data).expect("insert");
    }
    assert!(s.wait_written(Duration::from_secs(30)));
    // The page cache holds what was just written: on Linux those reads never block (RWF_NOWAIT),
    // unless the file system cannot tell (then they run in the section too, which is only slower).
    for (id, data) in &chunks {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    let cached = s.stats().blocking_reads;
    eprintln!(
        "page-cached reads that ran in the blocking section: {cached} of {}",
        chunks.len()
    );
    assert_eq!(SECTION_RUNS.load(Ordering::SeqCst), cached);
    // A device that makes every read wait: each one runs in the section.
    s.simulate_slow_disk(Duration::ZERO, Duration::ZERO, 2 * MS);
    for (id, data) in &chunks {
        assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
    }
    let st = s.stats();
    assert_eq!(st.blocking_reads, cached + chunks.len() as u64, "{st:?}");
    assert_eq!(SECTION_RUNS.load(Ordering::SeqCst), st.blocking_reads);
    assert_eq!(st.disk_hits, 2 * chunks.len() as u64);
}

#[test]
fn closing_waits_for_a_slow_disk_only_so_long() {
    let d = tempfile::tempdir().expect("tempdir");
    let cfg = StoreConfig::on_disk(d.path(), 64 << 20, 1 << 30).with_write_queue_bytes(16 << 20);
    let s = ChunkStore::open(cfg.clone()).expect("open");
    // 10 ms per 4 KiB (400 kB/s): the 8 MiB queue would take over 20 s to write.
    s.simulate_slow_disk(10 * MS, Duration::ZERO, Duration::ZERO);
    let chunks: Vec<_> = (0..1000).map(|i| chunk(i, 8 << 10)).collect();
    for (id, data) in &chunks {
        s.insert(id, data).expect("insert");
    }
    assert_eq!(s.stats().writes_skipped, 0);
    let t = Instant::now();
    drop(s);
    let took = t.elapsed();
    assert!(
        took < DRAIN_TIMEOUT + Duration::from_secs(2),
        "drop took {took:?}"
    );
    // What was written survives (found by the recovery scan); nothing else is claimed.
    let s = ChunkStore::open(cfg).expect("reopen");
    let mut held = 0;
    for (id, data) in &chunks {
        if s.contains(id) {
            held += 1;
            assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
        }
    }
    assert!(held > 0 && held < chunks.len(), "{held} chunks survived");
    let st = s.stats();
    assert_eq!(st.verify_failures + st.corrupt_records, 0, "{st:?}");
}

const CHILD_DIR: &str = "DITTO_STORE_CRASH_CHILD_DIR";

/// A process killed (SIGKILL) while its writer thread is busy loses at most the queue: after a
/// restart every chunk the store holds reads back exactly, and the recovery scan finds no damage.
#[test]
fn a_crash_while_writing_loses_at_most_the_queue() {
    let chunks: Vec<_> = (0..1500).map(|i| chunk(i, 8 << 10)).collect();
    if let Ok(dir) = std::env::var(CHILD_DIR) {
        // The child: insert everything into a slow store, say so, and wait to be killed.
        let s = ChunkStore::open(StoreConfig::on_disk(dir, 64 << 20, 1 << 30)).expect("open");
        s.simulate_slow_disk(MS, Duration::ZERO, Duration::ZERO);
        for (id, data) in &chunks {
            s.insert(id, data).expect("insert");
        }
        println!("inserted");
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    use std::io::BufRead;
    let d = tempfile::tempdir().expect("tempdir");
    let mut child = std::process::Command::new(std::env::current_exe().expect("test binary"))
        .args([
            "--exact",
            "a_crash_while_writing_loses_at_most_the_queue",
            "--nocapture",
        ])
        .env(CHILD_DIR, d.path())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn the child");
    let out = child.stdout.take().expect("stdout");
    let saw = std::io::BufReader::new(out)
        .lines()
        .map_while(Result::ok)
        .any(|l| l.contains("inserted"));
    // Let the writer thread get some batches out, then kill the process in the middle of its work.
    std::thread::sleep(Duration::from_millis(400));
    child.kill().expect("kill");
    child.wait().expect("wait");
    assert!(saw, "the child did not get through its inserts");
    let s = ChunkStore::open(StoreConfig::on_disk(d.path(), 64 << 20, 1 << 30)).expect("reopen");
    let mut held = 0;
    for (id, data) in &chunks {
        if s.contains(id) {
            held += 1;
            assert_eq!(get(&s, id).as_deref(), Some(&data[..]));
        }
    }
    let st = s.stats();
    assert!(
        held > 0 && held < chunks.len(),
        "{held} chunks survived: {st:?}"
    );
    assert_eq!(st.verify_failures, 0, "{st:?}");
    // At most a torn tail (a write cut by the kill), which recovery truncates.
    assert!(st.corrupt_records <= 1, "{st:?}");
}
