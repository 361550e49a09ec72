//! The chunk store: chunk contents by [`ChunkId`], in a RAM tier and an optional disk tier.
//!
//! # Tiers
//! - **RAM tier**: an LRU of chunk contents bounded by `ram_bytes` of payload. With a disk tier it is a
//!   write-through cache (inserts and disk hits are cached); without one it *is* the store, and a chunk
//!   evicted from it is gone (`contains` becomes false).
//! - **Disk tier** (`dir` set): append-only segment files of records (see the `record` module), sealed
//!   at `segment_bytes`; the oldest segment is deleted whole when the tier would exceed `disk_bytes`.
//!
//! # Index
//! Every stored chunk has one slot in an in-RAM index (id, location, length, successor slot). Measured
//! index RAM ([`StoreStats::index_bytes`] / chunks, including the per-segment slot lists): 44-55 bytes
//! per chunk depending on where the vectors are in their growth (45 at 200k chunks), independent of
//! chunk size; the `index_bytes_per_chunk` test asserts at most 64.
//!
//! # What is verified where
//! - RAM-tier hits are trusted: the bytes were verified (or supplied by the caller) when cached.
//! - Every disk read is re-hashed with blake3 (a sealed store: its record is opened, which
//!   authenticates id, payload and place); a mismatch or read error drops the entry, counts a
//!   `verify_failures` (or `read_errors`) and is reported as a miss. `get_into` never yields wrong bytes.
//!   After [`SEGMENT_DAMAGE_LIMIT`] damaged chunks in one segment, the rest of it is not trusted either:
//!   the whole segment is dropped (`segments_dropped`).
//! - Opening after an unclean shutdown scans every segment: record headers are checked, chunk payloads
//!   are hashed, garbage is skipped by resynchronising on the next valid header, and a torn tail of the
//!   newest segment is truncated. A clean [`ChunkStore::close`] writes an index snapshot so that the
//!   next open skips the scan; it is used only if every segment file still has exactly the recorded
//!   length (payloads are then verified lazily, on read).
//!
//! # Encryption at rest
//! With a key ([`StoreConfig::key`], a [`StoreKey`]) the disk tier holds nothing in plain text but
//! record framing (tags, lengths, nonces) and the store's identity: every record is sealed with
//! AES-256-GCM under a key derived from the store key and the [`StoreId`], with the record's segment
//! number and offset as associated data (formats in the `record` and `seal` modules), and the index
//! snapshot is sealed whole (chunk ids name contents: a reader holding a candidate file could test
//! whether it crossed the link). A record that was altered, moved or replayed within the store, or
//! copied from another store, does not open: it is handled exactly like a damaged chunk (dropped,
//! `verify_failures`; segment damage counting as above). The meta file holds a key check: a store
//! sealed with another key (the key file lost or replaced), a sealed store opened without a key, and
//! a plain store (from before encryption) opened with one are each wiped and started empty with a new
//! [`StoreId`], with one warning naming the reason; their bytes are never decoded. Without a key the
//! records are plain (`StoreConfig::key` = `None`: tests and benchmarks; the daemon always sets one). Sealing
//! runs in the writer thread outside the lock, opening in `get_into` outside the lock.
//! The directory is created with mode 0700, its files with mode 0600 ([`private_dir`],
//! [`create_private`]).
//!
//! # When the disk fails
//! A failed write (no space left, I/O error, read-only file system: [`FaultKind`]) leaves the store
//! consistent and turns the disk tier *off* ([`ChunkStore::degraded`]) instead of failing again on every
//! chunk: nothing is written to disk for [`RETRY_FIRST`], doubled after each failed retry up to
//! [`RETRY_MAX`]; the chunks inserted after the wait are queued again, and a write that succeeds turns
//! the tier back on. Chunks still queued when a write fails are kept in the RAM tier only. A tier that fails again within [`RETRY_MAX`] of coming back (a disk hovering at full)
//! continues the doubling rather than starting over. Meanwhile chunks already on disk are still read,
//! and new chunks are kept in the RAM tier only: an index entry without a disk location, dropped as
//! soon as the RAM tier evicts the chunk, and never written to a snapshot. A chunk that does not fit
//! the RAM tier is not stored ([`StoreError::Degraded`]), so the engine sends it without dedup. Each
//! change of state is logged once (`tracing`, target `ditto_dedup::store`) with the error and the file.
//!
//! # Write-behind: the store is never on the caller's path
//! `insert` never touches the disk. With a disk tier, a new chunk goes to the RAM tier and to a bounded
//! write queue (`write_queue_bytes` of payload) at once, and its index entry is *queued*: `contains`,
//! `slot`, `lookup` and `get_into` answer for it like for any other chunk (served from the RAM tier, or
//! from the queue if the RAM tier already evicted it). A thread of the store's own (`ditto-store-wr`)
//! writes queued chunks in batches of up to [`WRITE_BATCH_BYTES`] with one positional write, outside
//! the lock, and then points their entries at the records. When the disk cannot keep up and the queue
//! is full, a new chunk is not queued: it is kept in the RAM tier only, exactly like a chunk stored
//! while the disk tier is off (`writes_skipped` counts them), or not stored if it does not fit (then
//! [`StoreError::WriteQueueFull`]). A slow disk costs dedup savings, never the caller's time.
//! Successor hints are buffered and written by the same thread.
//!
//! # Reads
//! `get_into` reads a disk-only chunk with one positional read, outside the lock. On Linux it first
//! asks for the bytes only if the page cache holds them (`RWF_NOWAIT`), which never blocks (on tmpfs
//! every read is served inline); a read that
//! would wait for the device runs inside the *blocking section* the owner installed with
//! [`ChunkStore::set_blocking_section`] (the proxy passes one that moves the calling async worker's
//! other tasks to another thread first), or inline if none was installed. `blocking_reads` counts them.
//!
//! # What survives a restart
//! Chunks whose record the writer thread wrote are on disk (in the page cache); they survive a process
//! crash. Queued chunks and chunks kept in RAM only (queue full, or disk tier off) do not: a crash
//! loses at most the queue. An index entry points at a record only after the record was fully written,
//! so neither the index nor a snapshot ever names a record that is not on disk (a crash in the middle
//! of a write leaves a torn tail that recovery truncates). [`ChunkStore::close`] and dropping the store
//! wait at most [`DRAIN_TIMEOUT`] for the queue; writes still queued then are dropped (counted in
//! `writes_skipped`, logged) and those chunks are not in the snapshot. Only
//! [`ChunkStore::flush`]/[`ChunkStore::close`] fsync, so a power loss may lose recent records, which
//! recovery then drops (never returns). A crash may lose the latest successor hints. Hints are not
//! written while the disk tier is off. A missing or garbled meta file wipes the store's files and starts
//! empty with a new [`StoreId`]; so does a key that does not match (see *Encryption at rest*).
//!
//! # Locking
//! One mutex guards all state; no file I/O runs under it except creating and deleting segment files
//! (once per segment). `contains`, `slot`, `successor`, `set_successor` and RAM hits of `get_into` are
//! one short critical section without allocation; `insert` adds a copy of the chunk to the queue.
//! A disk read in `get_into` runs outside the lock (on a shared handle of the segment file) and
//! re-locks briefly to cache the chunk. The writer thread takes the lock to pick a batch and to commit
//! it, never while writing.

mod disk;
mod index;
mod listing;
mod ram;
pub(crate) mod record;
pub(crate) mod seal;

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ChunkId;
use index::{loc_offset, loc_seg, on_disk, pack_loc, Index, LOC_QUEUED, LOC_RAM};
use ram::RamTier;
use record::{Format, Record};
use seal::Sealer;

pub use disk::{create_private, private_dir, warn_if_readable_by_others};
pub use listing::SegmentState;
pub use record::MAX_CHUNK_LEN;
pub use seal::{StoreKey, STORE_KEY_LEN};

/// Default size at which a segment file is sealed.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Upper bound on the effective segment size (payload offsets are 32-bit).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// Buffered successor records are written once they reach this many bytes.
const PENDING_FLUSH: usize = 4096;
/// Successor records buffered beyond this (a writer far behind) are dropped: they are only hints.
const PENDING_MAX: usize = 64 << 10;
/// Longest prefix of a segment file that recovery reads; anything beyond is treated as a garbage tail.
const MAX_SEGMENT_FILE: u64 = MAX_SEGMENT_BYTES + 2 * MAX_CHUNK_LEN as u64;
/// How long the disk tier stays off after a write failure; doubled after each failed retry.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to write to a failing disk tier.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
/// Default bound of the write-behind queue, in payload bytes.
pub const DEFAULT_WRITE_QUEUE_BYTES: u64 = 32 << 20;
/// Largest batch of records the writer thread writes at once (small enough that a slow disk finishes
/// one soon after a stop is asked for).
pub const WRITE_BATCH_BYTES: usize = 256 << 10;
/// How long `close` and dropping the store wait for queued writes before dropping them.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(3);
/// Shortest interval between two log lines about writes skipped for a full queue.
const SKIP_LOG_EVERY: Duration = Duration::from_secs(60);

/// How the store runs a disk read that may wait for the device: it calls the function with the read.
/// See [`ChunkStore::set_blocking_section`].
pub type BlockingSection = fn(&mut dyn FnMut());

/// Damaged chunks (failed or mismatching reads) after which the rest of their segment is no longer
/// trusted: the whole segment is dropped.
pub const SEGMENT_DAMAGE_LIMIT: u32 = 8;

/// Where and how much to store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoreConfig {
    /// Directory of the disk tier; `None` = RAM only.
    pub dir: Option<PathBuf>,
    /// RAM tier capacity in payload bytes.
    pub ram_bytes: u64,
    /// Disk tier capacity: the segment files never total more than this.
    pub disk_bytes: u64,
    /// Size at which a segment is sealed and a new one started. The effective value is capped at a
    /// quarter of `disk_bytes` (so eviction frees at most about a quarter of the tier at once) and at
    /// [`MAX_SEGMENT_BYTES`].
    pub segment_bytes: u64,
    /// Bound of the write-behind queue in payload bytes: past it, new chunks are kept in the RAM tier
    /// only (see the module documentation). At least one chunk is always queued.
    pub write_queue_bytes: u64,
    /// Key the disk tier is sealed with (see *Encryption at rest* in the module documentation);
    /// `None`: plain records.
    pub key: Option<StoreKey>,
}

impl StoreConfig {
    /// A store without a disk tier.
    pub fn in_memory(ram_bytes: u64) -> Self {
        StoreConfig {
            dir: None,
            ram_bytes,
            disk_bytes: 0,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            write_queue_bytes: DEFAULT_WRITE_QUEUE_BYTES,
            key: None,
        }
    }

    /// A store with a disk tier in `dir` (created if missing).
    pub fn on_disk(dir: impl Into<PathBuf>, ram_bytes: u64, disk_bytes: u64) -> Self {
        StoreConfig {
            dir: Some(dir.into()),
            ram_bytes,
            disk_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            write_queue_bytes: DEFAULT_WRITE_QUEUE_BYTES,
            key: None,
        }
    }

    /// Same, with another segment size.
    pub fn with_segment_bytes(mut self, segment_bytes: u64) -> Self {
        self.segment_bytes = segment_bytes;
        self
    }

    /// Same, with another write-behind queue bound.
    pub fn with_write_queue_bytes(mut self, write_queue_bytes: u64) -> Self {
        self.write_queue_bytes = write_queue_bytes;
        self
    }

    /// Same, with the disk tier sealed with `key`.
    pub fn with_key(mut self, key: StoreKey) -> Self {
        self.key = Some(key);
        self
    }
}

/// Identity of a store's contents; a fresh random value when a store is created or found unusable and
/// wiped. A peer that remembers which chunks this store held must forget them when the identity changes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct StoreId(pub u128);

/// Counters and sizes. Counters count since `open`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Payload bytes of all stored chunks.
    pub bytes: u64,
    /// Stored chunks (index entries).
    pub chunks: u64,
    /// Payload bytes held by the RAM tier.
    pub ram_bytes: u64,
    /// Chunks held by the RAM tier.
    pub ram_chunks: u64,
    /// Bytes of all segment files (records including headers and successor records).
    pub disk_bytes: u64,
    /// Segment files.
    pub segments: u64,
    /// `get_into` served from RAM.
    pub ram_hits: u64,
    /// `get_into` served from disk (verified).
    pub disk_hits: u64,
    /// `get_into` that returned false, for any reason.
    pub misses: u64,
    /// blake3 mismatches: on a disk read, or on a chunk record found by the recovery scan.
    pub verify_failures: u64,
    /// Failed reads, writes, file creations and removals (each failed insert counts one):
    /// `read_errors + write_errors`.
    pub io_errors: u64,
    /// Failed reads (of a chunk, or of a segment by the recovery scan) and segments that could not be
    /// opened.
    pub read_errors: u64,
    /// Failed writes, fsyncs, file creations, truncations and removals.
    pub write_errors: u64,
    /// Whether the disk tier is off after write failures (see [`ChunkStore::degraded`]).
    pub degraded: bool,
    /// Inserts that found the disk tier off: the chunk was kept in the RAM tier only, or not stored.
    pub unpersisted: u64,
    /// Chunks not written to disk because the write-behind queue was full (the disk did not keep up)
    /// or still held them when the store closed: kept in the RAM tier only, or not stored.
    pub writes_skipped: u64,
    /// Chunks waiting in the write-behind queue now.
    pub write_queue_chunks: u64,
    /// Payload bytes waiting in the write-behind queue now.
    pub write_queue_bytes: u64,
    /// Disk reads that were not served from the page cache and ran in the blocking section.
    pub blocking_reads: u64,
    /// Segments dropped whole after [`SEGMENT_DAMAGE_LIMIT`] damaged chunks.
    pub segments_dropped: u64,
    /// Chunks removed for capacity (oldest segment deleted, or RAM-only LRU eviction).
    pub evictions: u64,
    /// Garbled headers, garbage and torn tails skipped by the recovery scan.
    pub corrupt_records: u64,
    /// Estimated heap bytes of the index (slot array, hash table, per-segment slot lists); the RAM
    /// tier's own bookkeeping is not included.
    pub index_bytes: u64,
}

/// Errors of the chunk store. A failed `insert` leaves the store consistent: the chunk is not stored.
#[derive(thiserror::Error, Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// A file operation failed (ENOSPC, EIO, permissions, ...).
    #[error("chunk store I/O error on {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The chunk is larger than [`MAX_CHUNK_LEN`] or than a whole tier.
    #[error("chunk of {len} bytes cannot be stored (limit {limit} bytes)")]
    TooLarge { len: usize, limit: u64 },
    /// The configuration cannot work.
    #[error("invalid chunk store configuration: {0}")]
    Config(&'static str),
    /// The disk tier is off after write failures (the reason is given) and the chunk does not fit the
    /// RAM tier either: it is not stored.
    #[error("chunk not stored: the chunk store disk tier is off ({0})")]
    Degraded(String),
    /// The disk does not keep up (the write-behind queue is full) and the chunk does not fit the RAM
    /// tier: it is not stored.
    #[error("chunk not stored: the chunk store's write queue is full and the RAM tier too small")]
    WriteQueueFull,
}

/// What kind of failure turned the disk tier off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultKind {
    /// No space left on the device (or the disk quota is exhausted).
    DiskFull,
    /// The file system is read-only, or the store directory is not writable.
    ReadOnly,
    /// Any other I/O error (EIO, ...).
    Io,
}

impl FaultKind {
    /// Every kind, for metric labels.
    pub const ALL: [FaultKind; 3] = [FaultKind::DiskFull, FaultKind::ReadOnly, FaultKind::Io];

    /// A short label: `disk-full`, `read-only` or `io-error`.
    pub fn as_str(self) -> &'static str {
        match self {
            FaultKind::DiskFull => "disk-full",
            FaultKind::ReadOnly => "read-only",
            FaultKind::Io => "io-error",
        }
    }

    fn of(e: &std::io::Error) -> FaultKind {
        // Raw codes: ENOSPC and EROFS are 28 and 30 on Linux, the BSDs and macOS; EDQUOT differs.
        #[cfg(unix)]
        match e.raw_os_error() {
            Some(28) => return FaultKind::DiskFull,
            #[cfg(target_os = "linux")]
            Some(122) => return FaultKind::DiskFull,
            #[cfg(not(target_os = "linux"))]
            Some(69) => return FaultKind::DiskFull,
            Some(30) => return FaultKind::ReadOnly,
            _ => {}
        }
        // ERROR_HANDLE_DISK_FULL, ERROR_DISK_FULL.
        #[cfg(windows)]
        if matches!(e.raw_os_error(), Some(39 | 112)) {
            return FaultKind::DiskFull;
        }
        if e.kind() == std::io::ErrorKind::PermissionDenied {
            FaultKind::ReadOnly
        } else {
            FaultKind::Io
        }
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The disk tier's state while it is off ([`ChunkStore::degraded`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Degraded {
    pub kind: FaultKind,
    /// The latest write error, with the file it concerned.
    pub reason: String,
    /// How long the tier has been off.
    pub since: Duration,
    /// Time until the next write is attempted (zero: the next insert tries).
    pub retry_in: Duration,
    /// Failed attempts, the first failure included.
    pub failures: u32,
}

/// A content-addressed chunk store shared by many streams (`Send + Sync`, use it through an `Arc`).
pub struct ChunkStore {
    id: StoreId,
    shared: Arc<Shared>,
    /// The write-behind thread (with a disk tier).
    writer: Option<JoinHandle<()>>,
}

/// What the store and its writer thread share.
struct Shared {
    inner: Mutex<Inner>,
    /// Wakes the writer thread: work was queued, hints should be written, or it should stop.
    work: Condvar,
    /// Wakes waiters for the queue to be written (`flush`, `wait_written`, stop).
    idle: Condvar,
    blocking: OnceLock<BlockingSection>,
    /// The disk tier is on a file system in RAM (tmpfs): reads never wait for a device.
    in_ram: bool,
    /// Seals and opens records of a store with a key.
    sealer: Option<Sealer>,
    /// The store key (other files kept beside the store, the peer views, are sealed with it too).
    key: Option<StoreKey>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is kept consistent at every point a panic could unwind from, so a poisoned lock is
        // still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One chunk waiting to be written.
struct Job {
    slot: u32,
    id: ChunkId,
    /// Shared with the RAM tier.
    data: Arc<[u8]>,
}

/// The write-behind queue.
#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// Payload bytes in `jobs`.
    bytes: u64,
    cap: u64,
    /// The writer thread has a batch (the first jobs) in flight.
    busy: bool,
    /// The writer thread waits for work.
    sleeping: bool,
    /// Someone waits for the buffered hints to be written.
    want_hints: bool,
    /// Stop once the queue is written, or at the deadline (then drop what is left).
    stop: Option<Instant>,
    /// The writer thread has stopped.
    stopped: bool,
    /// When writes skipped for a full queue were last logged, and how many were skipped by then.
    skip_logged: Option<(Instant, u64)>,
}

/// A simulated slow device (test hook): delays the writer thread and blocking reads.
#[derive(Clone, Copy, Default)]
struct SlowDisk {
    per_4k_write: Duration,
    fsync: Duration,
    read: Duration,
}

#[derive(Default)]
struct Counters {
    ram_hits: u64,
    disk_hits: u64,
    misses: u64,
    verify_failures: u64,
    read_errors: u64,
    write_errors: u64,
    evictions: u64,
    corrupt_records: u64,
    unpersisted: u64,
    segments_dropped: u64,
    writes_skipped: u64,
    blocking_reads: u64,
}

/// The disk tier is off: no writes before `retry_at`.
struct Off {
    kind: FaultKind,
    reason: String,
    since: Instant,
    retry_at: Instant,
    backoff: Duration,
    failures: u32,
    /// `Counters::unpersisted` when the tier went off.
    unpersisted_before: u64,
}

struct Segment {
    seq: u32,
    file: Arc<File>,
    /// Bytes written (the logical end; anything past it is garbage from a failed write).
    len: u64,
    /// Slots whose chunk record was written here. May hold stale slots (dropped or relocated entries):
    /// eviction checks that the entry still points into this segment.
    slots: Vec<u32>,
    /// Chunks found damaged on read since open.
    damage: u32,
}

struct Disk {
    dir: PathBuf,
    /// Plain or sealed records.
    fmt: Format,
    /// Sealed segments, oldest first.
    sealed: VecDeque<Segment>,
    /// The segment being appended to.
    cur: Segment,
    /// Sum of `len` over all segments.
    total: u64,
    cap: u64,
    seg_limit: u64,
    /// Encoded successor records not yet written.
    pending: Vec<u8>,
    /// Reused write buffer.
    wbuf: Vec<u8>,
    /// Test hook: this many upcoming writes fail after writing half their bytes.
    faults: u32,
}

struct Inner {
    index: Index,
    ram: RamTier,
    disk: Option<Disk>,
    /// Set while the disk tier is off after write failures.
    off: Option<Off>,
    /// When the disk tier last came back on, and the wait it had reached: a tier that fails again
    /// soon (a disk hovering at full) continues that backoff instead of starting over.
    last_on: Option<(Instant, Duration)>,
    c: Counters,
    q: Queue,
    slow: SlowDisk,
}

/// A batch the writer thread writes outside the lock.
struct Batch {
    file: Arc<File>,
    path: PathBuf,
    seq: u32,
    /// Where in the segment `wbuf` goes.
    off: u64,
    wbuf: Vec<u8>,
    /// Jobs at the front of the queue this batch covers.
    jobs: usize,
    /// Chunk records in `wbuf`: slot, id, payload offset in `wbuf`.
    recs: Vec<(u32, ChunkId, u64)>,
    /// Injected failure (test hook).
    fault: bool,
    slow: SlowDisk,
}

impl Batch {
    /// Seals the batch's records if the store has a key, then writes the batch; on failure cuts off
    /// what was written past the old end, if possible.
    fn write(&mut self, sealer: Option<&Sealer>) -> std::io::Result<()> {
        if let Some(sealer) = sealer {
            record::seal_all(sealer, &mut self.wbuf, self.seq, self.off);
        }
        let res = if self.fault {
            let half = &self.wbuf[..self.wbuf.len() / 2];
            disk::write_at(&self.file, half, self.off).and_then(|()| Err(disk_full_error()))
        } else {
            disk::write_at(&self.file, &self.wbuf, self.off)
        };
        if !self.slow.per_4k_write.is_zero() {
            std::thread::sleep(self.slow.per_4k_write * self.wbuf.len().div_ceil(4096) as u32);
        }
        if res.is_err() {
            let _ = self.file.set_len(self.off);
        }
        res
    }
}

impl Disk {
    fn segment(&self, seq: u32) -> Option<&Segment> {
        if seq == self.cur.seq {
            return Some(&self.cur);
        }
        let i = self.sealed.binary_search_by_key(&seq, |s| s.seq).ok()?;
        self.sealed.get(i)
    }

    fn path(&self, seq: u32) -> PathBuf {
        disk::seg_path(&self.dir, seq)
    }

    /// Seals the current segment and starts the next one.
    fn rotate(&mut self) -> Result<(), StoreError> {
        let seq = self
            .cur
            .seq
            .checked_add(1)
            .filter(|&s| s != u32::MAX)
            .ok_or(StoreError::Config("segment numbers exhausted"))?;
        let path = self.path(seq);
        let file = disk::create_segment(&path).map_err(|e| disk::io_err(&path, e))?;
        let new = Segment {
            seq,
            file: Arc::new(file),
            len: 0,
            slots: Vec::new(),
            damage: 0,
        };
        let old = std::mem::replace(&mut self.cur, new);
        self.sealed.push_back(old);
        Ok(())
    }

    fn segment_mut(&mut self, seq: u32) -> Option<&mut Segment> {
        if seq == self.cur.seq {
            return Some(&mut self.cur);
        }
        let i = self.sealed.binary_search_by_key(&seq, |s| s.seq).ok()?;
        self.sealed.get_mut(i)
    }
}

/// The error an injected write failure reports: the platform's "no space left on device".
fn disk_full_error() -> std::io::Error {
    #[cfg(unix)]
    return std::io::Error::from_raw_os_error(28);
    #[cfg(windows)]
    return std::io::Error::from_raw_os_error(112);
    #[cfg(not(any(unix, windows)))]
    return std::io::Error::other("no space left on device (injected)");
}

impl Inner {
    /// Removes a live entry from the index and the RAM tier.
    fn drop_slot(&mut self, slot: u32) {
        let e = self.index.remove(slot);
        self.ram.remove(&e.id);
    }

    /// Caches a chunk in the RAM tier. A chunk the RAM tier evicts to make room is gone from the store
    /// if the RAM tier was its only copy (a RAM-only store, or a disk tier that was off).
    fn cache(&mut self, id: &ChunkId, data: &[u8]) -> bool {
        let Inner { index, ram, c, .. } = self;
        ram.put(*id, data, |old| Self::evicted(index, c, old))
    }

    /// Same, with bytes shared with the write queue.
    fn cache_shared(&mut self, id: &ChunkId, data: Arc<[u8]>) -> bool {
        let Inner { index, ram, c, .. } = self;
        ram.put_shared(*id, data, |old| Self::evicted(index, c, old))
    }

    /// The RAM tier evicted `old`: if that was its only copy, it leaves the store.
    fn evicted(index: &mut Index, c: &mut Counters, old: ChunkId) {
        if let Some(s) = index.find(&old) {
            if index.entry(s).loc == LOC_RAM {
                index.remove(s);
                c.evictions += 1;
            }
        }
    }

    /// Handles a failed write to the disk tier: turns the tier off, or keeps it off for longer.
    fn disk_failed(&mut self, e: &StoreError) {
        let (kind, reason) = match e {
            StoreError::Io { path, source } => {
                let name = path.file_name().unwrap_or(path.as_os_str());
                (
                    FaultKind::of(source),
                    format!("{source} writing {}", name.to_string_lossy()),
                )
            }
            other => (FaultKind::Io, other.to_string()),
        };
        let now = Instant::now();
        if let Some(off) = self.off.as_mut() {
            off.failures += 1;
            off.backoff = (off.backoff * 2).min(RETRY_MAX);
            off.retry_at = now + off.backoff;
            if off.kind != kind {
                tracing::warn!(
                    "chunk store disk tier still off, now for another reason: {reason}; retrying in {}s",
                    off.backoff.as_secs()
                );
            } else {
                tracing::debug!(
                    "chunk store disk tier: retry failed: {reason}; retrying in {}s",
                    off.backoff.as_secs()
                );
            }
            off.kind = kind;
            off.reason = reason;
            return;
        }
        let backoff = match self.last_on {
            Some((on, b)) if now.duration_since(on) < RETRY_MAX => (b * 2).min(RETRY_MAX),
            _ => RETRY_FIRST,
        };
        let meanwhile = if self.ram.capacity() > 0 {
            "new chunks are kept in RAM only (dedup limited to what the RAM tier holds), chunks already \
             on disk keep deduplicating"
        } else {
            "new chunks are not stored and are sent without dedup, chunks already on disk keep \
             deduplicating"
        };
        tracing::warn!(
            "chunk store disk tier disabled: {reason}; retrying in {}s; {meanwhile}",
            backoff.as_secs()
        );
        if let Some(disk) = self.disk.as_mut() {
            disk.pending.clear();
        }
        self.off = Some(Off {
            kind,
            reason,
            since: now,
            retry_at: now + backoff,
            backoff,
            failures: 1,
            unpersisted_before: self.c.unpersisted,
        });
    }

    /// A write to the disk tier succeeded: turn it back on if it was off.
    fn disk_ok(&mut self) {
        if let Some(off) = self.off.take() {
            self.last_on = Some((Instant::now(), off.backoff));
            tracing::info!(
                "chunk store disk tier re-enabled after {:.1}s ({} failed attempts, last: {}); {} chunks \
                 met the tier off and were kept in RAM only or not stored",
                off.since.elapsed().as_secs_f64(),
                off.failures,
                off.reason,
                self.c.unpersisted - off.unpersisted_before
            );
        }
    }

    /// Whether the disk tier is off and no retry is due.
    fn disk_off(&self) -> bool {
        self.off
            .as_ref()
            .is_some_and(|off| Instant::now() < off.retry_at)
    }

    /// Stores a chunk without writing it to the disk tier, which is off: in the RAM tier only, where it
    /// lives until evicted. `err` is returned if it does not fit.
    fn insert_unpersisted(
        &mut self,
        id: &ChunkId,
        data: &[u8],
        err: impl FnOnce(&Self) -> StoreError,
    ) -> Result<(), StoreError> {
        self.c.unpersisted += 1;
        if data.len() as u64 > self.ram.capacity() {
            return Err(err(self));
        }
        self.index.insert(*id, LOC_RAM, data.len() as u32);
        self.cache(id, data);
        Ok(())
    }

    /// Counts a damaged chunk (failed or mismatching read) of segment `seq`; logs the first of each
    /// segment and drops the whole segment at [`SEGMENT_DAMAGE_LIMIT`].
    fn segment_damaged(&mut self, seq: u32, what: &str) {
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        let seg = if disk.cur.seq == seq {
            &mut disk.cur
        } else {
            match disk.sealed.binary_search_by_key(&seq, |s| s.seq) {
                Ok(i) => &mut disk.sealed[i],
                Err(_) => return,
            }
        };
        seg.damage += 1;
        if seg.damage == 1 {
            tracing::warn!(
                "chunk store: damaged chunk in {} ({what}); dropped it, its bytes will be sent in full",
                disk::seg_name(seq)
            );
        }
        if seg.damage >= SEGMENT_DAMAGE_LIMIT {
            self.drop_segment(seq, what);
        }
    }

    /// Drops a damaged segment: all its chunks leave the index, and the file is deleted (the current
    /// segment is sealed first; if that fails its chunks are dropped and the file stays).
    fn drop_segment(&mut self, seq: u32, what: &str) {
        let sealed = match self.disk.as_mut() {
            Some(disk) if disk.cur.seq == seq => disk.rotate(),
            Some(_) => Ok(()),
            None => return,
        };
        if let Err(e) = sealed {
            if matches!(e, StoreError::Io { .. }) {
                self.c.write_errors += 1;
                self.disk_failed(&e);
            }
        }
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        let (slots, file) = match disk.sealed.binary_search_by_key(&seq, |s| s.seq) {
            Ok(i) => {
                let Some(seg) = disk.sealed.remove(i) else {
                    return;
                };
                disk.total -= seg.len;
                let path = disk.path(seq);
                drop(seg.file);
                if std::fs::remove_file(&path).is_ok() {
                    (seg.slots, "file deleted")
                } else {
                    self.c.write_errors += 1;
                    (seg.slots, "the file could not be deleted")
                }
            }
            Err(_) if disk.cur.seq == seq => (
                std::mem::take(&mut disk.cur.slots),
                "the file stays: no new segment could be started",
            ),
            Err(_) => return,
        };
        let mut dropped = 0u64;
        for slot in slots {
            if self
                .index
                .live(slot)
                .is_some_and(|e| on_disk(e.loc) && loc_seg(e.loc) == seq)
            {
                self.drop_slot(slot);
                dropped += 1;
            }
        }
        self.c.segments_dropped += 1;
        tracing::warn!(
            "chunk store: dropped segment {} after {SEGMENT_DAMAGE_LIMIT} damaged chunks (last: {what}); \
             its other {dropped} chunks are no longer used ({file})",
            disk::seg_name(seq),
        );
    }

    fn evict_oldest_segment(&mut self) -> bool {
        let Some(disk) = self.disk.as_mut() else {
            return false;
        };
        let Some(seg) = disk.sealed.pop_front() else {
            return false;
        };
        disk.total -= seg.len;
        let path = disk.path(seg.seq);
        drop(seg.file);
        if std::fs::remove_file(&path).is_err() {
            self.c.write_errors += 1;
        }
        for &slot in &seg.slots {
            if self
                .index
                .live(slot)
                .is_some_and(|e| on_disk(e.loc) && loc_seg(e.loc) == seg.seq)
            {
                self.drop_slot(slot);
                self.c.evictions += 1;
            }
        }
        true
    }

    /// Makes room for appending `n` bytes: seals the current segment if it would grow past the segment
    /// size, and deletes the oldest segments while the tier would exceed its capacity.
    fn make_room(&mut self, n: u64) -> Result<(), StoreError> {
        let Some(disk) = self.disk.as_mut() else {
            return Ok(());
        };
        if disk.cur.len > 0 && disk.cur.len + n > disk.seg_limit {
            disk.rotate()?;
        }
        loop {
            let Some(disk) = self.disk.as_mut() else {
                return Ok(());
            };
            if disk.total + n <= disk.cap {
                return Ok(());
            }
            if !disk.sealed.is_empty() {
                self.evict_oldest_segment();
            } else if disk.cur.len > 0 {
                disk.rotate()?;
            } else {
                return Err(StoreError::TooLarge {
                    len: n as usize,
                    limit: disk.cap,
                });
            }
        }
    }

    /// Takes a queued chunk off the write path: kept in the RAM tier only if it is there, else gone.
    fn unqueue(&mut self, slot: u32, id: &ChunkId) {
        if self.index.find(id) != Some(slot) || self.index.entry(slot).loc != LOC_QUEUED {
            return;
        }
        if self.ram.contains(id) {
            let len = self.index.entry(slot).len;
            self.index.relocate(slot, LOC_RAM, len);
        } else {
            self.index.remove(slot);
            self.c.evictions += 1;
        }
    }

    /// Removes the first `n` jobs from the queue.
    fn pop_jobs(&mut self, n: usize) {
        for _ in 0..n {
            if let Some(j) = self.q.jobs.pop_front() {
                self.q.bytes -= j.data.len() as u64;
            }
        }
    }

    /// Empties the queue: its chunks are kept in the RAM tier only (or gone). Returns how many.
    fn abandon_queue(&mut self) -> u64 {
        let jobs = std::mem::take(&mut self.q.jobs);
        self.q.bytes = 0;
        for j in &jobs {
            self.unqueue(j.slot, &j.id);
        }
        jobs.len() as u64
    }

    /// Queues a new chunk for the writer thread, or keeps it in RAM only if the queue is full.
    /// Returns whether the writer thread must be woken.
    fn enqueue(&mut self, id: &ChunkId, data: &[u8]) -> Result<bool, StoreError> {
        let len = data.len() as u64;
        if !self.q.jobs.is_empty() && self.q.bytes + len > self.q.cap {
            self.c.writes_skipped += 1;
            self.log_skips();
            if len > self.ram.capacity() {
                return Err(StoreError::WriteQueueFull);
            }
            self.index.insert(*id, LOC_RAM, len as u32);
            self.cache(id, data);
            return Ok(false);
        }
        let slot = self.index.insert(*id, LOC_QUEUED, len as u32);
        let data: Arc<[u8]> = Arc::from(data);
        self.cache_shared(id, Arc::clone(&data));
        self.q.jobs.push_back(Job {
            slot,
            id: *id,
            data,
        });
        self.q.bytes += len;
        Ok(self.q.sleeping)
    }

    /// Logs writes skipped for a full queue, at most once per [`SKIP_LOG_EVERY`].
    fn log_skips(&mut self) {
        let now = Instant::now();
        let before = match self.q.skip_logged {
            Some((at, _)) if now.duration_since(at) < SKIP_LOG_EVERY => return,
            Some((_, n)) => n,
            None => 0,
        };
        tracing::warn!(
            "chunk store: the disk does not keep up (write queue of {} KiB full): new chunks are kept \
             in RAM only, not written ({} since the last report; counted in writes_skipped)",
            self.q.cap >> 10,
            self.c.writes_skipped - before
        );
        self.q.skip_logged = Some((now, self.c.writes_skipped));
    }

    /// Picks the writer thread's next batch (buffered hints, then queued chunk records, up to
    /// [`WRITE_BATCH_BYTES`] and the room left in the current segment) and reserves its place at the
    /// end of the current segment. `None`: nothing to write, or it cannot be written.
    fn plan(&mut self) -> Option<Batch> {
        if self.disk_off() {
            let n = self.abandon_queue();
            self.c.unpersisted += n;
            if let Some(disk) = self.disk.as_mut() {
                disk.pending.clear();
            }
            return None;
        }
        let disk = self.disk.as_mut()?;
        let fmt = disk.fmt;
        let first = self
            .q
            .jobs
            .front()
            .map_or(0, |j| (fmt.overhead() + j.data.len()) as u64);
        if disk.pending.len() as u64 + first > disk.cap {
            disk.pending.clear();
        }
        let head = disk.pending.len() as u64 + first;
        let room = if disk.cur.len > 0 && disk.cur.len + head > disk.seg_limit {
            disk.seg_limit
        } else {
            disk.seg_limit.saturating_sub(disk.cur.len)
        };
        let limit = room.min(WRITE_BATCH_BYTES as u64).max(head);
        let mut wbuf = std::mem::take(&mut disk.wbuf);
        wbuf.clear();
        wbuf.append(&mut disk.pending);
        let mut recs = Vec::new();
        let mut jobs = 0;
        for j in &self.q.jobs {
            let rec = (fmt.overhead() + j.data.len()) as u64;
            if jobs > 0 && wbuf.len() as u64 + rec > limit {
                break;
            }
            jobs += 1;
            if self.index.find(&j.id) == Some(j.slot) && self.index.entry(j.slot).loc == LOC_QUEUED
            {
                let at = (wbuf.len() + fmt.pre()) as u64;
                fmt.encode_chunk(&mut wbuf, &j.id, &j.data);
                recs.push((j.slot, j.id, at));
            }
        }
        if wbuf.is_empty() {
            self.pop_jobs(jobs);
            return None;
        }
        let n = wbuf.len() as u64;
        if let Err(e) = self.make_room(n) {
            if matches!(e, StoreError::Io { .. }) {
                self.c.write_errors += 1;
            }
            self.disk_failed(&e);
            let n = self.abandon_queue();
            self.c.unpersisted += n;
            return None;
        }
        let disk = self.disk.as_mut()?;
        let off = disk.cur.len;
        disk.cur.len += n;
        disk.total += n;
        let fault = disk.faults > 0;
        if fault {
            disk.faults -= 1;
        }
        Some(Batch {
            file: Arc::clone(&disk.cur.file),
            path: disk.path(disk.cur.seq),
            seq: disk.cur.seq,
            off,
            wbuf,
            jobs,
            recs,
            fault,
            slow: self.slow,
        })
    }

    /// Takes the result of a batch: points the written chunks' entries at their records, or on
    /// failure turns the disk tier off and keeps every queued chunk in the RAM tier only.
    fn commit(&mut self, mut b: Batch, res: std::io::Result<()>) {
        self.pop_jobs(b.jobs);
        let n = b.wbuf.len() as u64;
        let ok = match res {
            Ok(()) => {
                self.disk_ok();
                true
            }
            Err(e) => {
                if let Some(disk) = self.disk.as_mut() {
                    if disk.cur.seq == b.seq && disk.cur.len == b.off + n {
                        disk.cur.len = b.off;
                        disk.total -= n;
                    }
                }
                self.c.write_errors += 1;
                self.disk_failed(&disk::io_err(&b.path, e));
                false
            }
        };
        // The segment may have been dropped meanwhile (damage found by a reader).
        let placed = ok
            && self
                .disk
                .as_ref()
                .is_some_and(|d| d.segment(b.seq).is_some());
        for &(slot, id, at) in &b.recs {
            if self.index.find(&id) != Some(slot) || self.index.entry(slot).loc != LOC_QUEUED {
                continue;
            }
            if placed {
                let len = self.index.entry(slot).len;
                self.index
                    .relocate(slot, pack_loc(b.seq, (b.off + at) as u32), len);
                if let Some(seg) = self.disk.as_mut().and_then(|d| d.segment_mut(b.seq)) {
                    seg.slots.push(slot);
                }
            } else {
                self.c.unpersisted += 1;
                self.unqueue(slot, &id);
            }
        }
        if !ok {
            let n = self.abandon_queue();
            self.c.unpersisted += n;
        }
        if let Some(disk) = self.disk.as_mut() {
            b.wbuf.clear();
            if b.wbuf.capacity() <= 2 * WRITE_BATCH_BYTES {
                disk.wbuf = b.wbuf;
            }
        }
    }

    fn insert_disk(&mut self, id: &ChunkId, data: &[u8]) -> Result<bool, StoreError> {
        let Some(disk) = self.disk.as_ref() else {
            return Ok(false);
        };
        // Refuse what could never be written.
        let over = disk.fmt.overhead() as u64;
        let rec_len = over + data.len() as u64;
        if rec_len > disk.cap {
            return Err(StoreError::TooLarge {
                len: data.len(),
                limit: disk.cap.saturating_sub(over),
            });
        }
        if self.disk_off() {
            return self
                .insert_unpersisted(id, data, |g| {
                    StoreError::Degraded(
                        g.off
                            .as_ref()
                            .map_or_else(String::new, |o| o.reason.clone()),
                    )
                })
                .map(|()| false);
        }
        self.enqueue(id, data)
    }

    fn insert_ram_only(&mut self, id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
        if data.len() as u64 > self.ram.capacity() {
            return Err(StoreError::TooLarge {
                len: data.len(),
                limit: self.ram.capacity(),
            });
        }
        self.index.insert(*id, LOC_RAM, data.len() as u32);
        self.cache(id, data);
        Ok(())
    }

    fn stats(&self) -> StoreStats {
        let (disk_bytes, segments, slot_lists) = match &self.disk {
            Some(d) => {
                let lists: usize = d
                    .sealed
                    .iter()
                    .chain(std::iter::once(&d.cur))
                    .map(|s| s.slots.capacity() * 4)
                    .sum();
                (d.total, d.sealed.len() as u64 + 1, lists as u64)
            }
            None => (0, 0, 0),
        };
        StoreStats {
            bytes: self.index.live_bytes(),
            chunks: self.index.len(),
            ram_bytes: self.ram.bytes(),
            ram_chunks: self.ram.len() as u64,
            disk_bytes,
            segments,
            ram_hits: self.c.ram_hits,
            disk_hits: self.c.disk_hits,
            misses: self.c.misses,
            verify_failures: self.c.verify_failures,
            io_errors: self.c.read_errors + self.c.write_errors,
            read_errors: self.c.read_errors,
            write_errors: self.c.write_errors,
            degraded: self.off.is_some(),
            unpersisted: self.c.unpersisted,
            writes_skipped: self.c.writes_skipped,
            write_queue_chunks: self.q.jobs.len() as u64,
            write_queue_bytes: self.q.bytes,
            blocking_reads: self.c.blocking_reads,
            segments_dropped: self.c.segments_dropped,
            evictions: self.c.evictions,
            corrupt_records: self.c.corrupt_records,
            index_bytes: self.index.heap_bytes() + slot_lists,
        }
    }
}

/// The write-behind thread: writes queued chunks and buffered hints in batches, never holding the lock
/// while writing.
fn run_writer(shared: Arc<Shared>) {
    let mut g = shared.lock();
    loop {
        if g.q.stop.is_some_and(|at| Instant::now() >= at) {
            // Past the deadline nothing more is written, hints included.
            if let Some(disk) = g.disk.as_mut() {
                disk.pending.clear();
            }
            if !g.q.jobs.is_empty() {
                let n = g.abandon_queue();
                g.c.writes_skipped += n;
                tracing::warn!(
                    "chunk store: stopping: dropped {n} queued chunk writes the disk did not take \
                     within {}s; those chunks are not kept",
                    DRAIN_TIMEOUT.as_secs()
                );
            }
        }
        let hints = g.disk.as_ref().map_or(0, |d| d.pending.len());
        let work = !g.q.jobs.is_empty()
            || (hints > 0 && (hints >= PENDING_FLUSH || g.q.want_hints || g.q.stop.is_some()));
        if !work {
            g.q.want_hints = false;
            if g.q.stop.is_some() {
                g.q.stopped = true;
                shared.idle.notify_all();
                return;
            }
            shared.idle.notify_all();
            g.q.sleeping = true;
            g = shared.work.wait(g).unwrap_or_else(|p| p.into_inner());
            g.q.sleeping = false;
            continue;
        }
        let Some(batch) = g.plan() else {
            continue;
        };
        g.q.busy = true;
        drop(g);
        let mut batch = batch;
        let res = batch.write(shared.sealer.as_ref());
        g = shared.lock();
        g.commit(batch, res);
        g.q.busy = false;
    }
}

/// Reads `buf.len()` bytes at `off`: from the page cache without blocking if it holds them, else in
/// the blocking section. Returns the result and whether the blocking section ran.
fn read_chunk(
    section: Option<BlockingSection>,
    in_ram: bool,
    file: &File,
    buf: &mut [u8],
    off: u64,
    slow: Duration,
) -> (std::io::Result<()>, bool) {
    if slow.is_zero() {
        if in_ram {
            return (disk::read_at(file, buf, off), false);
        }
        if disk::read_cached(file, buf, off) {
            return (Ok(()), false);
        }
    }
    let mut res = None;
    {
        let mut read = || {
            if !slow.is_zero() {
                std::thread::sleep(slow);
            }
            res = Some(disk::read_at(file, buf, off));
        };
        match section {
            Some(section) => section(&mut read),
            None => read(),
        }
    }
    let res = res.unwrap_or_else(|| Err(std::io::Error::other("the read did not run")));
    (res, true)
}

impl ChunkStore {
    /// Opens (or creates) a store. With a disk tier, recovers its contents as described in the module
    /// documentation and starts its writer thread; never fails because of what the files contain,
    /// only on I/O errors on the directory or meta file, or a bad configuration.
    pub fn open(cfg: StoreConfig) -> Result<ChunkStore, StoreError> {
        let ram = RamTier::new(cfg.ram_bytes);
        let Some(dir) = cfg.dir.clone() else {
            if cfg.ram_bytes == 0 {
                return Err(StoreError::Config("a RAM-only store needs ram_bytes > 0"));
            }
            let inner = Inner {
                index: Index::new(),
                ram,
                disk: None,
                off: None,
                last_on: None,
                c: Counters::default(),
                q: Queue::default(),
                slow: SlowDisk::default(),
            };
            return Ok(ChunkStore {
                id: StoreId(rand::random()),
                shared: Arc::new(Shared {
                    inner: Mutex::new(inner),
                    work: Condvar::new(),
                    idle: Condvar::new(),
                    blocking: OnceLock::new(),
                    in_ram: true,
                    sealer: None,
                    key: None,
                }),
                writer: None,
            });
        };
        if cfg.disk_bytes == 0 || cfg.segment_bytes == 0 {
            return Err(StoreError::Config(
                "disk_bytes and segment_bytes must be > 0",
            ));
        }
        let (id, mut inner, sealer) = open_disk(&dir, &cfg, ram)?;
        inner.q.cap = cfg.write_queue_bytes;
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            work: Condvar::new(),
            idle: Condvar::new(),
            blocking: OnceLock::new(),
            in_ram: disk::in_ram(&dir),
            sealer,
            key: cfg.key.clone(),
        });
        let for_writer = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("ditto-store-wr".into())
            .spawn(move || run_writer(for_writer))
            .map_err(|e| disk::io_err(&dir, e))?;
        Ok(ChunkStore {
            id,
            shared,
            writer: Some(writer),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.lock()
    }

    /// Identity of this store's contents.
    pub fn identity(&self) -> StoreId {
        self.id
    }

    /// Sets how disk reads that may wait for the device run (see the module documentation): `section`
    /// is called with the read and must call it once, e.g. after telling an async runtime that the
    /// calling thread is about to block. The first call wins; later ones are ignored.
    pub fn set_blocking_section(&self, section: BlockingSection) {
        let _ = self.shared.blocking.set(section);
    }

    /// Whether the chunk is stored (index lookup only; a later `get_into` may still miss if the data
    /// turns out to be damaged).
    #[inline]
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().index.find(id).is_some()
    }

    /// Appends the chunk's bytes to `out` and returns true, or leaves `out` unchanged and returns
    /// false. RAM-tier hits (and chunks still in the write queue) are trusted; disk reads are verified
    /// with blake3 and a mismatch drops the entry (`verify_failures += 1`).
    pub fn get_into(&self, id: &ChunkId, out: &mut Vec<u8>) -> bool {
        let (file, loc, len, slow) = {
            let mut g = self.lock();
            if let Some(data) = g.ram.get(id) {
                out.extend_from_slice(data);
                g.c.ram_hits += 1;
                return true;
            }
            let g = &mut *g;
            let Some(slot) = g.index.find(id) else {
                g.c.misses += 1;
                return false;
            };
            let e = *g.index.entry(slot);
            if e.loc == LOC_QUEUED {
                // Evicted from the RAM tier before the writer got to it: the queue has it.
                if let Some(j) = g.q.jobs.iter().find(|j| j.id == *id) {
                    out.extend_from_slice(&j.data);
                    g.c.ram_hits += 1;
                    return true;
                }
            }
            let seg = match (&g.disk, e.loc) {
                (Some(disk), loc) if on_disk(loc) => disk.segment(loc_seg(loc)),
                _ => None,
            };
            match seg {
                Some(seg) => (Arc::clone(&seg.file), e.loc, e.len, g.slow.read),
                None => {
                    // Only the RAM tier held it, and no longer does (eviction normally drops such
                    // entries at once): it is gone.
                    g.drop_slot(slot);
                    g.c.misses += 1;
                    return false;
                }
            }
        };
        let old = out.len();
        let sealer = self.shared.sealer.as_ref();
        // A sealed chunk is read with its whole record, and opened.
        let (pre, post) = match sealer {
            Some(_) => (Format::Sealed.pre(), Format::Sealed.post()),
            None => (0, 0),
        };
        // (A sealed record's payload is never at an offset below `pre`: scan and snapshot check it.)
        let at = u64::from(loc_offset(loc)).saturating_sub(pre as u64);
        out.resize(old + pre + len as usize + post, 0);
        let section = self.shared.blocking.get().copied();
        let (read, blocked) = read_chunk(
            section,
            self.shared.in_ram,
            &file,
            &mut out[old..],
            at,
            slow,
        );
        drop(file);
        let good = read.is_ok()
            && match sealer {
                Some(sealer) => {
                    let opened = record::open_chunk(sealer, &mut out[old..], loc_seg(loc), at, id);
                    if opened {
                        out.truncate(old + len as usize);
                    }
                    opened
                }
                None => id.matches(&out[old..]),
            };
        let mut g = self.lock();
        if blocked {
            g.c.blocking_reads += 1;
        }
        if good {
            g.c.disk_hits += 1;
            if g.index.find(id).is_some() {
                g.cache(id, &out[old..]);
            }
            return true;
        }
        out.truncate(old);
        g.c.misses += 1;
        let what = match &read {
            Err(e) => {
                g.c.read_errors += 1;
                format!("read error: {e}")
            }
            Ok(()) if sealer.is_some() => {
                g.c.verify_failures += 1;
                "the record does not open: altered, moved or not sealed by this store".to_owned()
            }
            Ok(()) => {
                g.c.verify_failures += 1;
                "contents do not match the fingerprint".to_owned()
            }
        };
        if let Some(slot) = g.index.find(id) {
            if g.index.entry(slot).loc == loc {
                g.drop_slot(slot);
                g.segment_damaged(loc_seg(loc), &what);
            }
        }
        false
    }

    /// Stores a chunk; `id` must be `ChunkId::of(data)`. Already present: no-op. Never waits for the
    /// disk: with a disk tier the chunk is queued for the writer thread (or, if the queue is full, kept
    /// in the RAM tier only). On `Err` the chunk is not stored and everything stored before is intact;
    /// later inserts may succeed.
    pub fn insert(&self, id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
        debug_assert_eq!(
            *id,
            ChunkId::of(data),
            "insert: id is not the fingerprint of data"
        );
        if data.len() > MAX_CHUNK_LEN {
            return Err(StoreError::TooLarge {
                len: data.len(),
                limit: MAX_CHUNK_LEN as u64,
            });
        }
        let mut g = self.lock();
        if g.index.find(id).is_some() {
            return Ok(());
        }
        if g.disk.is_none() {
            return g.insert_ram_only(id, data);
        }
        let wake = g.insert_disk(id, data)?;
        drop(g);
        if wake {
            self.shared.work.notify_one();
        }
        Ok(())
    }

    /// The chunk's index slot: a small integer, stable while the chunk stays stored (also across a
    /// clean close/open); reused for another chunk once this one is gone.
    #[inline]
    pub fn slot(&self, id: &ChunkId) -> Option<u32> {
        self.lock().index.find(id)
    }

    /// `slot` and `successor` of `id` under one lock: the encoder's per-chunk lookup.
    #[inline]
    pub fn lookup(&self, id: &ChunkId) -> Option<(u32, Option<ChunkId>)> {
        let g = self.lock();
        let slot = g.index.find(id)?;
        Some((slot, g.index.successor_of(slot)))
    }

    /// The chunk that followed `id` the last time a stream passed through it, if both are still
    /// stored. Only a hint: the slot it is kept as may in rare cases have been reused by another chunk.
    #[inline]
    pub fn successor(&self, id: &ChunkId) -> Option<ChunkId> {
        let g = self.lock();
        let slot = g.index.find(id)?;
        g.index.successor_of(slot)
    }

    /// Records that `next` followed `prev`. Ignored unless both are stored. A change is persisted
    /// (buffered and written by the writer thread, see the module documentation); write errors are
    /// only counted.
    pub fn set_successor(&self, prev: &ChunkId, next: &ChunkId) {
        let mut g = self.lock();
        let (Some(p), Some(n)) = (g.index.find(prev), g.index.find(next)) else {
            return;
        };
        if !g.index.set_successor(p, n) {
            return;
        }
        if g.off.is_some() {
            // Not persisted while the disk tier is off.
            return;
        }
        let sleeping = g.q.sleeping;
        if let Some(disk) = g.disk.as_mut() {
            if disk.pending.len() >= PENDING_MAX {
                // The writer is behind: hints are only hints.
                return;
            }
            disk.fmt.encode_succ(&mut disk.pending, prev, next);
            if disk.pending.len() >= PENDING_FLUSH && sleeping {
                drop(g);
                self.shared.work.notify_one();
            }
        }
    }

    /// Sizes and counters.
    pub fn stats(&self) -> StoreStats {
        self.lock().stats()
    }

    /// Waits until every chunk queued so far is written (or was given up on), at most `timeout`.
    /// Returns whether the queue is empty. Immediate without a disk tier.
    pub fn wait_written(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let mut g = self.lock();
        while !g.q.jobs.is_empty() || g.q.busy {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() || g.q.stopped || self.writer.is_none() {
                return false;
            }
            g = match self.shared.idle.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        true
    }

    /// Waits for the queue and the buffered hints to be written, then fsyncs the current segment.
    /// Waits for the disk, however slow: not for an async runtime's threads.
    pub fn flush(&self) -> Result<(), StoreError> {
        let mut g = self.lock();
        if self.writer.is_some() && !g.q.stopped {
            g.q.want_hints = true;
            if g.q.sleeping {
                self.shared.work.notify_one();
            }
            while (g.q.want_hints || g.q.busy || !g.q.jobs.is_empty()) && !g.q.stopped {
                g = self.shared.idle.wait(g).unwrap_or_else(|p| p.into_inner());
            }
        }
        let Some(disk) = g.disk.as_ref() else {
            return Ok(());
        };
        let file = Arc::clone(&disk.cur.file);
        let path = disk.path(disk.cur.seq);
        let slow = g.slow.fsync;
        drop(g);
        let res = file.sync_data();
        if !slow.is_zero() {
            std::thread::sleep(slow);
        }
        if let Err(e) = res {
            let e = disk::io_err(&path, e);
            let mut g = self.lock();
            g.c.write_errors += 1;
            g.disk_failed(&e);
            return Err(e);
        }
        Ok(())
    }

    /// Stops the writer thread: it writes what is queued for at most `timeout`, drops the rest, and
    /// writes the buffered hints. A writer stuck in a write on a hung device is not waited for long.
    fn stop_writer(&mut self, timeout: Duration) {
        let Some(writer) = self.writer.take() else {
            return;
        };
        let until = Instant::now() + timeout + Duration::from_secs(2);
        let mut g = self.lock();
        g.q.stop = Some(Instant::now() + timeout);
        self.shared.work.notify_one();
        while !g.q.stopped {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            g = match self.shared.idle.wait_timeout(g, left) {
                Ok((g, _)) => g,
                Err(p) => p.into_inner().0,
            };
        }
        let stopped = g.q.stopped;
        drop(g);
        if stopped {
            let _ = writer.join();
        } else {
            tracing::warn!(
                "chunk store: the writer thread is stuck in a write; not waiting for it"
            );
        }
    }

    /// Clean shutdown: writes the queue (waiting at most [`DRAIN_TIMEOUT`]), fsyncs, and writes the
    /// index snapshot that lets the next open skip the scan.
    pub fn close(mut self) -> Result<(), StoreError> {
        self.stop_writer(DRAIN_TIMEOUT);
        self.flush()?;
        let g = self.lock();
        let Some(disk) = g.disk.as_ref() else {
            return Ok(());
        };
        let segs: Vec<(u32, u64)> = disk
            .sealed
            .iter()
            .chain(std::iter::once(&disk.cur))
            .map(|s| (s.seq, s.len))
            .collect();
        // Chunks held only by the RAM tier (stored while the disk tier was off or the queue full, or
        // still queued) do not survive.
        let slots = g.index.iter_slots().map(|e| {
            if e.is_live() && !on_disk(e.loc) {
                index::Entry::FREE
            } else {
                *e
            }
        });
        disk::write_snapshot(
            &disk.dir,
            self.id,
            &segs,
            slots,
            self.shared.sealer.as_ref(),
        )
    }

    /// The disk tier's state if it is off after write failures, `None` while it is written normally
    /// (or there is no disk tier).
    ///
    /// A write that fails (no space, I/O error, read-only file system, ...) turns the tier off: for
    /// [`RETRY_FIRST`], doubled after each failed retry up to [`RETRY_MAX`]. Meanwhile nothing is
    /// written to disk, new chunks are kept in the RAM tier only (or, if they do not fit, not stored)
    /// and chunks already on disk are still read. Chunks inserted after the wait are queued again; if
    /// their write succeeds the tier is back on.
    pub fn degraded(&self) -> Option<Degraded> {
        let g = self.lock();
        let off = g.off.as_ref()?;
        Some(Degraded {
            kind: off.kind,
            reason: off.reason.clone(),
            since: off.since.elapsed(),
            retry_in: off.retry_at.saturating_duration_since(Instant::now()),
            failures: off.failures,
        })
    }

    /// Test hook: the next `n` disk writes write half their bytes and then fail like a full disk
    /// (the platform's "no space left on device" error).
    #[doc(hidden)]
    pub fn inject_write_failures(&self, n: u32) {
        if let Some(d) = self.lock().disk.as_mut() {
            d.faults = n;
        }
    }

    /// Test hook: if the disk tier is off, the next insert tries it again without waiting.
    #[doc(hidden)]
    pub fn retry_disk_now(&self) {
        if let Some(off) = self.lock().off.as_mut() {
            off.retry_at = Instant::now();
        }
    }

    /// Test hook: simulates a slow device. Every write of the writer thread takes `per_4k_write` per
    /// 4 KiB more, every fsync `fsync` more, and every disk read `read` (bypassing the page cache
    /// check, so it always runs in the blocking section).
    #[doc(hidden)]
    pub fn simulate_slow_disk(&self, per_4k_write: Duration, fsync: Duration, read: Duration) {
        self.lock().slow = SlowDisk {
            per_4k_write,
            fsync,
            read,
        };
    }
}

impl Drop for ChunkStore {
    /// Stops the writer thread: queued chunks are written for at most [`DRAIN_TIMEOUT`], then the
    /// buffered hints (no fsync, no snapshot).
    fn drop(&mut self) {
        self.stop_writer(DRAIN_TIMEOUT);
    }
}

/// Opens the disk tier: meta file, then the snapshot or a recovery scan of every segment.
fn open_disk(
    dir: &Path,
    cfg: &StoreConfig,
    ram: RamTier,
) -> Result<(StoreId, Inner, Option<Sealer>), StoreError> {
    use disk::Meta;
    disk::private_dir(dir).map_err(|e| disk::io_err(dir, e))?;
    let fmt = match cfg.key {
        Some(_) => Format::Sealed,
        None => Format::Plain,
    };
    let d = dir.display();
    let kept = match (disk::read_meta(dir), &cfg.key) {
        (Some(Meta::Plain(id)), None) => Some((id, None)),
        (Some(Meta::Sealed(id, check)), Some(key)) => {
            let sealer = Sealer::new(key, id);
            if sealer.key_check() == check {
                Some((id, Some(sealer)))
            } else {
                tracing::warn!(
                    "chunk store in {d}: its files were sealed with another store key (the key file                      was lost or replaced); they cannot be read: deleted, starting an empty store"
                );
                None
            }
        }
        (Some(Meta::Plain(_)), Some(_)) => {
            tracing::warn!(
                "chunk store in {d}: found an unencrypted store from an earlier version: deleted,                  starting an empty encrypted store"
            );
            None
        }
        (Some(Meta::Sealed(..)), None) => {
            tracing::warn!(
                "chunk store in {d}: its files are encrypted but no store key is configured:                  deleted, starting an empty unencrypted store"
            );
            None
        }
        // Missing or garbled: a store never used, or one whose files cannot be trusted.
        (None, _) => None,
    };
    let (id, sealer) = match kept {
        Some(k) => k,
        None => {
            disk::wipe(dir)?;
            let id = StoreId(rand::random());
            let sealer = cfg.key.as_ref().map(|k| Sealer::new(k, id));
            let meta = match &sealer {
                Some(s) => Meta::Sealed(id, s.key_check()),
                None => Meta::Plain(id),
            };
            disk::write_meta(dir, meta)?;
            (id, sealer)
        }
    };
    let mut c = Counters::default();
    let seqs = disk::list_segments(dir)?;
    let last_seq = seqs.last().copied().unwrap_or(0);
    let mut segs = Vec::with_capacity(seqs.len());
    for (i, &seq) in seqs.iter().enumerate() {
        let path = disk::seg_path(dir, seq);
        let newest = i + 1 == seqs.len();
        let opened = disk::open_segment(&path, newest).and_then(|f| Ok((f.metadata()?.len(), f)));
        match opened {
            Ok((len, file)) => segs.push(Segment {
                seq,
                file: Arc::new(file),
                len,
                slots: Vec::new(),
                damage: 0,
            }),
            Err(e) => {
                c.read_errors += 1;
                tracing::warn!(
                    "chunk store: cannot open {}: {e}; its chunks are not used",
                    disk::seg_name(seq)
                );
            }
        }
    }

    let lens: Vec<(u32, u64)> = segs.iter().map(|s| (s.seq, s.len)).collect();
    let snapshot =
        disk::read_snapshot(dir, id, &lens, fmt, sealer.as_ref()).and_then(Index::from_slots);
    // A snapshot describes one moment; never let it be mistaken for a later one.
    let _ = std::fs::remove_file(dir.join(disk::SNAPSHOT));
    let index = match snapshot {
        Some(index) => {
            for slot in 0..index.slots() as u32 {
                if let Some(e) = index.live(slot) {
                    if let Ok(i) = segs.binary_search_by_key(&loc_seg(e.loc), |s| s.seq) {
                        segs[i].slots.push(slot);
                    }
                }
            }
            index
        }
        None => scan_segments(&mut segs, last_seq, &mut c, sealer.as_ref()),
    };

    let seg_limit = cfg
        .segment_bytes
        .min(cfg.disk_bytes / 4)
        .clamp(1, MAX_SEGMENT_BYTES);
    let total = segs.iter().map(|s| s.len).sum();
    let cur = match segs.pop() {
        // Append to the newest segment only if it is the last one ever created and opened writable.
        Some(s) if s.seq == last_seq => s,
        other => {
            segs.extend(other);
            let seq = last_seq
                .checked_add(1)
                .filter(|&s| s != u32::MAX)
                .ok_or(StoreError::Config("segment numbers exhausted"))?;
            let path = disk::seg_path(dir, seq);
            let file = disk::create_segment(&path).map_err(|e| disk::io_err(&path, e))?;
            Segment {
                seq,
                file: Arc::new(file),
                len: 0,
                slots: Vec::new(),
                damage: 0,
            }
        }
    };
    let disk = Disk {
        dir: dir.to_path_buf(),
        fmt,
        sealed: segs.into(),
        cur,
        total,
        cap: cfg.disk_bytes,
        seg_limit,
        pending: Vec::with_capacity(PENDING_FLUSH + fmt.succ_len()),
        wbuf: Vec::new(),
        faults: 0,
    };
    let mut inner = Inner {
        index,
        ram,
        disk: Some(disk),
        off: None,
        last_on: None,
        c,
        q: Queue::default(),
        slow: SlowDisk::default(),
    };
    // The capacity may have shrunk since the files were written.
    inner.make_room(0)?;
    Ok((id, inner, sealer))
}

/// Rebuilds the index from the segments, oldest first, so later records win. Verifies every record;
/// truncates a torn tail of the newest segment. Successor records are applied after every chunk is
/// indexed (in order, so later ones win): the writer thread may write a hint before the chunk record
/// it names.
fn scan_segments(
    segs: &mut [Segment],
    last_seq: u32,
    c: &mut Counters,
    sealer: Option<&Sealer>,
) -> Index {
    let mut index = Index::new();
    let mut hints: Vec<(ChunkId, ChunkId)> = Vec::new();
    let mut buf = Vec::new();
    for seg in segs.iter_mut() {
        let want = seg.len.min(MAX_SEGMENT_FILE) as usize;
        buf.clear();
        buf.resize(want, 0);
        if let Err(e) = disk::read_at(&seg.file, &mut buf, 0) {
            c.read_errors += 1;
            tracing::warn!(
                "chunk store: cannot read {}: {e}; its chunks are not used",
                disk::seg_name(seg.seq)
            );
            // Unreadable: index nothing from it; it is evicted in turn like any other segment.
            continue;
        }
        let seq = seg.seq;
        let slots = &mut seg.slots;
        let visit = |rec| match rec {
            Record::Chunk { id, payload, len } => {
                let loc = pack_loc(seq, payload as u32);
                let slot = match index.find(&id) {
                    Some(slot) => {
                        index.relocate(slot, loc, len);
                        slot
                    }
                    None => index.insert(id, loc, len),
                };
                slots.push(slot);
            }
            Record::Succ { prev, next } => hints.push((prev, next)),
        };
        let sum = match sealer {
            Some(sealer) => record::scan_sealed(&mut buf, sealer, seq, visit),
            None => record::scan(&buf, visit),
        };
        c.verify_failures += sum.bad_payloads;
        c.corrupt_records += sum.bad_regions;
        let torn = seq == last_seq && (sum.good_end as u64) < seg.len;
        if sum.bad_payloads > 0 || sum.bad_regions > u64::from(torn) {
            tracing::warn!(
                "chunk store: {} is damaged: skipped {} records that do not match their \
                 fingerprint or do not open, and {} garbled regions",
                disk::seg_name(seq),
                sum.bad_payloads,
                sum.bad_regions
            );
        }
        if torn {
            match seg.file.set_len(sum.good_end as u64) {
                Ok(()) => seg.len = sum.good_end as u64,
                Err(_) => c.write_errors += 1,
            }
        }
    }
    for (prev, next) in hints {
        if let (Some(p), Some(n)) = (index.find(&prev), index.find(&next)) {
            index.set_successor(p, n);
        }
    }
    index
}

#[cfg(test)]
mod tests {
    use super::*;
    use record::{HDR, SUCC_RECORD_LEN};

    fn chunk(n: u32, len: usize) -> (ChunkId, Vec<u8>) {
        let mut data = vec![0u8; len];
        for (i, b) in data.iter_mut().enumerate() {
            *b = (n as usize * 31 + i * 7) as u8;
        }
        data[..4].copy_from_slice(&n.to_le_bytes());
        (ChunkId::of(&data), data)
    }

    #[test]
    fn store_is_send_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<ChunkStore>();
    }

    #[test]
    fn ram_only_round_trip() {
        let s = ChunkStore::open(StoreConfig::in_memory(1 << 20)).expect("open");
        let (id, data) = chunk(1, 1000);
        s.insert(&id, &data).expect("insert");
        let mut out = vec![9];
        assert!(s.get_into(&id, &mut out));
        assert_eq!(&out[1..], &data[..]);
        assert_eq!(s.stats().ram_hits, 1);
    }

    #[test]
    fn index_entry_locations_point_at_payloads() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = ChunkStore::open(StoreConfig::on_disk(d.path(), 0, 1 << 20)).expect("open");
        let (a, da) = chunk(1, 100);
        let (b, db) = chunk(2, 200);
        s.insert(&a, &da).expect("insert");
        assert!(s.wait_written(Duration::from_secs(10)));
        s.set_successor(&a, &a);
        s.insert(&b, &db).expect("insert");
        assert!(s.wait_written(Duration::from_secs(10)));
        let g = s.lock();
        let ea = *g.index.entry(g.index.find(&a).expect("a"));
        let eb = *g.index.entry(g.index.find(&b).expect("b"));
        assert_eq!(loc_offset(ea.loc) as usize, HDR);
        // b's write carried the buffered successor record in front of it.
        assert_eq!(
            loc_offset(eb.loc) as usize,
            HDR + 100 + SUCC_RECORD_LEN + HDR
        );
    }
}
