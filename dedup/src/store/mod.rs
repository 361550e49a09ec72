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
//! - Every disk read is re-hashed with blake3; a mismatch or read error drops the entry, counts a
//!   `verify_failures` (or `read_errors`) and is reported as a miss. `get_into` never yields wrong bytes.
//!   After [`SEGMENT_DAMAGE_LIMIT`] damaged chunks in one segment, the rest of it is not trusted either:
//!   the whole segment is dropped (`segments_dropped`).
//! - Opening after an unclean shutdown scans every segment: record headers are checked, chunk payloads
//!   are hashed, garbage is skipped by resynchronising on the next valid header, and a torn tail of the
//!   newest segment is truncated. A clean [`ChunkStore::close`] writes an index snapshot so that the
//!   next open skips the scan; it is used only if every segment file still has exactly the recorded
//!   length (payloads are then verified lazily, on read).
//!
//! # When the disk fails
//! A failed write (no space left, I/O error, read-only file system: [`FaultKind`]) leaves the store
//! consistent and turns the disk tier *off* ([`ChunkStore::degraded`]) instead of failing again on every
//! chunk: nothing is written to disk for [`RETRY_FIRST`], doubled after each failed retry up to
//! [`RETRY_MAX`]; the first insert after the wait tries again, and a write that succeeds turns the tier
//! back on. A tier that fails again within [`RETRY_MAX`] of coming back (a disk hovering at full)
//! continues the doubling rather than starting over. Meanwhile chunks already on disk are still read,
//! and new chunks are kept in the RAM tier only: an index entry without a disk location, dropped as
//! soon as the RAM tier evicts the chunk, and never written to a snapshot. A chunk that does not fit
//! the RAM tier is not stored ([`StoreError::Degraded`]), so the engine sends it without dedup. Each
//! change of state is logged once (`tracing`, target `ditto_dedup::store`) with the error and the file.
//!
//! # What survives a restart
//! Chunks whose insert returned `Ok` are on disk (in the page cache) at once, unless the disk tier was
//! off (then they live in the RAM tier only); they survive a process crash. Only
//! [`ChunkStore::flush`]/[`ChunkStore::close`] fsync, so a power loss may lose recent records, which
//! recovery then drops (never returns). Successor hints are buffered (a few KiB) and written with the
//! next chunk record, on flush/close, or on drop; a crash may lose the latest hints. Hints are not
//! written while the disk tier is off. A missing or garbled meta file wipes the store's files and starts
//! empty with a new [`StoreId`].
//!
//! # Locking
//! One mutex guards all state. `contains`, `slot`, `successor`, `set_successor` and RAM hits of
//! `get_into` are one short critical section without allocation. A disk read in `get_into` runs
//! *outside* the lock (on a shared handle of the segment file) and re-locks briefly to cache the chunk.
//! `insert` writes the record while holding the lock (one positional write, no fsync).

mod disk;
mod index;
mod ram;
pub(crate) mod record;

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::ChunkId;
use index::{loc_offset, loc_seg, pack_loc, Index, LOC_RAM};
use ram::RamTier;
use record::{Record, HDR, SUCC_RECORD_LEN};

pub use record::MAX_CHUNK_LEN;

/// Default size at which a segment file is sealed.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 << 20;
/// Upper bound on the effective segment size (payload offsets are 32-bit).
pub const MAX_SEGMENT_BYTES: u64 = 1 << 30;
/// Buffered successor records are written once they reach this many bytes.
const PENDING_FLUSH: usize = 4096;
/// Longest prefix of a segment file that recovery reads; anything beyond is treated as a garbage tail.
const MAX_SEGMENT_FILE: u64 = MAX_SEGMENT_BYTES + 2 * MAX_CHUNK_LEN as u64;
/// How long the disk tier stays off after a write failure; doubled after each failed retry.
pub const RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest wait between two attempts to write to a failing disk tier.
pub const RETRY_MAX: Duration = Duration::from_secs(60);
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
}

impl StoreConfig {
    /// A store without a disk tier.
    pub fn in_memory(ram_bytes: u64) -> Self {
        StoreConfig {
            dir: None,
            ram_bytes,
            disk_bytes: 0,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }

    /// A store with a disk tier in `dir` (created if missing).
    pub fn on_disk(dir: impl Into<PathBuf>, ram_bytes: u64, disk_bytes: u64) -> Self {
        StoreConfig {
            dir: Some(dir.into()),
            ram_bytes,
            disk_bytes,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
        }
    }

    /// Same, with another segment size.
    pub fn with_segment_bytes(mut self, segment_bytes: u64) -> Self {
        self.segment_bytes = segment_bytes;
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
    inner: Mutex<Inner>,
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

    /// Appends `wbuf` to the current segment; returns the offset it was written at. On failure the
    /// logical end is unchanged (a partial write past it is cut off if possible, else overwritten by
    /// the next write or dropped by recovery) and pending successor records are discarded.
    fn write_wbuf(&mut self) -> Result<u64, StoreError> {
        let off = self.cur.len;
        let res = if self.faults > 0 {
            self.faults -= 1;
            let half = &self.wbuf[..self.wbuf.len() / 2];
            disk::write_at(&self.cur.file, half, off).and_then(|()| Err(disk_full_error()))
        } else {
            disk::write_at(&self.cur.file, &self.wbuf, off)
        };
        self.pending.clear();
        match res {
            Ok(()) => {
                let n = self.wbuf.len() as u64;
                self.cur.len += n;
                self.total += n;
                Ok(off)
            }
            Err(e) => {
                let _ = self.cur.file.set_len(off);
                Err(disk::io_err(&self.path(self.cur.seq), e))
            }
        }
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
        ram.put(*id, data, |old| {
            if let Some(s) = index.find(&old) {
                if index.entry(s).loc == LOC_RAM {
                    index.remove(s);
                    c.evictions += 1;
                }
            }
        })
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
                .is_some_and(|e| e.loc != LOC_RAM && loc_seg(e.loc) == seq)
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
                .is_some_and(|e| loc_seg(e.loc) == seg.seq)
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

    /// Writes buffered successor records. Failures are only counted (and turn the disk tier off): hints
    /// may be lost. While the tier is off, hints are dropped.
    fn write_pending(&mut self) {
        let off = self.off.is_some();
        let Some(disk) = self.disk.as_mut() else {
            return;
        };
        if disk.pending.is_empty() {
            return;
        }
        if off || disk.pending.len() as u64 > disk.cap {
            disk.pending.clear();
            return;
        }
        disk.wbuf.clear();
        disk.wbuf.extend_from_slice(&disk.pending);
        let n = disk.wbuf.len() as u64;
        let res = self.make_room(n).and_then(|()| match self.disk.as_mut() {
            Some(disk) => disk.write_wbuf().map(drop),
            None => Ok(()),
        });
        if let Err(e) = res {
            if let Some(disk) = self.disk.as_mut() {
                disk.pending.clear();
            }
            if matches!(e, StoreError::Io { .. }) {
                self.c.write_errors += 1;
                self.disk_failed(&e);
            }
        }
    }

    fn insert_disk(&mut self, id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
        let Some(disk) = self.disk.as_mut() else {
            return Ok(());
        };
        // Refuse before make_room could empty the whole tier trying to fit the record.
        let rec_len = (HDR + data.len()) as u64;
        if rec_len > disk.cap {
            return Err(StoreError::TooLarge {
                len: data.len(),
                limit: disk.cap.saturating_sub(HDR as u64),
            });
        }
        if self.disk_off() {
            return self.insert_unpersisted(id, data, |g| {
                StoreError::Degraded(
                    g.off
                        .as_ref()
                        .map_or_else(String::new, |o| o.reason.clone()),
                )
            });
        }
        match self.write_chunk(id, data) {
            Ok(()) => {
                self.disk_ok();
                Ok(())
            }
            Err(e @ StoreError::Io { .. }) => {
                self.c.write_errors += 1;
                self.disk_failed(&e);
                self.insert_unpersisted(id, data, |_| e)
            }
            Err(e) => Err(e),
        }
    }

    /// Appends a chunk record (after any buffered successor records) and indexes it.
    fn write_chunk(&mut self, id: &ChunkId, data: &[u8]) -> Result<(), StoreError> {
        let Some(disk) = self.disk.as_mut() else {
            return Ok(());
        };
        let rec_len = (HDR + data.len()) as u64;
        if rec_len + disk.pending.len() as u64 > disk.cap {
            disk.pending.clear();
        }
        disk.wbuf.clear();
        disk.wbuf.extend_from_slice(&disk.pending);
        let rec_at = disk.wbuf.len() as u64;
        record::encode_chunk(&mut disk.wbuf, id, data);
        let n = disk.wbuf.len() as u64;
        let res = self.make_room(n).and_then(|()| match self.disk.as_mut() {
            Some(disk) => disk.write_wbuf().map(|off| (disk.cur.seq, off)),
            None => Err(StoreError::Config("no disk tier")),
        });
        let (seq, off) = res?;
        let payload_off = off + rec_at + HDR as u64;
        let slot = self
            .index
            .insert(*id, pack_loc(seq, payload_off as u32), data.len() as u32);
        if let Some(disk) = self.disk.as_mut() {
            disk.cur.slots.push(slot);
        }
        self.cache(id, data);
        Ok(())
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
            segments_dropped: self.c.segments_dropped,
            evictions: self.c.evictions,
            corrupt_records: self.c.corrupt_records,
            index_bytes: self.index.heap_bytes() + slot_lists,
        }
    }

    /// Writes pending hints and fsyncs the current segment.
    fn flush(&mut self) -> Result<(), StoreError> {
        self.write_pending();
        let Some(disk) = self.disk.as_ref() else {
            return Ok(());
        };
        let res = disk
            .cur
            .file
            .sync_data()
            .map_err(|e| disk::io_err(&disk.path(disk.cur.seq), e));
        if let Err(e) = &res {
            self.c.write_errors += 1;
            self.disk_failed(e);
        }
        res
    }
}

impl ChunkStore {
    /// Opens (or creates) a store. With a disk tier, recovers its contents as described in the module
    /// documentation; never fails because of what the files contain, only on I/O errors on the
    /// directory or meta file, or a bad configuration.
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
            };
            return Ok(ChunkStore {
                id: StoreId(rand::random()),
                inner: Mutex::new(inner),
            });
        };
        if cfg.disk_bytes == 0 || cfg.segment_bytes == 0 {
            return Err(StoreError::Config(
                "disk_bytes and segment_bytes must be > 0",
            ));
        }
        let (id, inner) = open_disk(&dir, &cfg, ram)?;
        Ok(ChunkStore {
            id,
            inner: Mutex::new(inner),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is kept consistent at every point a panic could unwind from, so a poisoned lock is
        // still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Identity of this store's contents.
    pub fn identity(&self) -> StoreId {
        self.id
    }

    /// Whether the chunk is stored (index lookup only; a later `get_into` may still miss if the data
    /// turns out to be damaged).
    #[inline]
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lock().index.find(id).is_some()
    }

    /// Appends the chunk's bytes to `out` and returns true, or leaves `out` unchanged and returns
    /// false. RAM-tier hits are trusted; disk reads are verified with blake3 and a mismatch drops the
    /// entry (`verify_failures += 1`).
    pub fn get_into(&self, id: &ChunkId, out: &mut Vec<u8>) -> bool {
        let (file, loc, len) = {
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
            let seg = match (&g.disk, e.loc) {
                (Some(disk), loc) if loc != LOC_RAM => disk.segment(loc_seg(loc)),
                _ => None,
            };
            match seg {
                Some(seg) => (Arc::clone(&seg.file), e.loc, e.len),
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
        out.resize(old + len as usize, 0);
        let read = disk::read_at(&file, &mut out[old..], u64::from(loc_offset(loc)));
        drop(file);
        let good = read.is_ok() && id.matches(&out[old..]);
        let mut g = self.lock();
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

    /// Stores a chunk; `id` must be `ChunkId::of(data)`. Already present: no-op. On `Err` the chunk is
    /// not stored and everything stored before is intact; later inserts may succeed.
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
        if g.disk.is_some() {
            g.insert_disk(id, data)
        } else {
            g.insert_ram_only(id, data)
        }
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
    /// (buffered, see the module documentation); write errors are only counted.
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
        if let Some(disk) = g.disk.as_mut() {
            record::encode_succ(&mut disk.pending, prev, next);
            if disk.pending.len() >= PENDING_FLUSH {
                g.write_pending();
            }
        }
    }

    /// Sizes and counters.
    pub fn stats(&self) -> StoreStats {
        self.lock().stats()
    }

    /// Writes buffered successor hints and fsyncs the current segment.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.lock().flush()
    }

    /// Clean shutdown: flush, fsync, and write the index snapshot that lets the next open skip the scan.
    pub fn close(self) -> Result<(), StoreError> {
        let mut g = self.lock();
        g.flush()?;
        let Some(disk) = g.disk.as_ref() else {
            return Ok(());
        };
        let segs: Vec<(u32, u64)> = disk
            .sealed
            .iter()
            .chain(std::iter::once(&disk.cur))
            .map(|s| (s.seq, s.len))
            .collect();
        // Chunks held only by the RAM tier (stored while the disk tier was off) do not survive.
        let slots = g.index.iter_slots().map(|e| {
            if e.is_live() && e.loc == LOC_RAM {
                index::Entry::FREE
            } else {
                *e
            }
        });
        disk::write_snapshot(&disk.dir, self.id, &segs, slots)
    }

    /// The disk tier's state if it is off after write failures, `None` while it is written normally
    /// (or there is no disk tier).
    ///
    /// A write that fails (no space, I/O error, read-only file system, ...) turns the tier off: for
    /// [`RETRY_FIRST`], doubled after each failed retry up to [`RETRY_MAX`]. Meanwhile nothing is
    /// written to disk, new chunks are kept in the RAM tier only (or, if they do not fit, not stored)
    /// and chunks already on disk are still read. The first insert after the wait tries the disk
    /// again; if that write succeeds the tier is back on.
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
}

impl Drop for ChunkStore {
    /// Writes buffered successor hints (best effort; no fsync, no snapshot).
    fn drop(&mut self) {
        self.lock().write_pending();
    }
}

/// Opens the disk tier: meta file, then the snapshot or a recovery scan of every segment.
fn open_disk(dir: &Path, cfg: &StoreConfig, ram: RamTier) -> Result<(StoreId, Inner), StoreError> {
    std::fs::create_dir_all(dir).map_err(|e| disk::io_err(dir, e))?;
    let id = match disk::read_meta(dir) {
        Some(id) => id,
        None => {
            disk::wipe(dir)?;
            let id = StoreId(rand::random());
            disk::write_meta(dir, id)?;
            id
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
    let snapshot = disk::read_snapshot(dir, id, &lens).and_then(Index::from_slots);
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
        None => scan_segments(&mut segs, last_seq, &mut c),
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
        sealed: segs.into(),
        cur,
        total,
        cap: cfg.disk_bytes,
        seg_limit,
        pending: Vec::with_capacity(PENDING_FLUSH + SUCC_RECORD_LEN),
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
    };
    // The capacity may have shrunk since the files were written.
    inner.make_room(0)?;
    Ok((id, inner))
}

/// Rebuilds the index from the segments, oldest first, so later records win. Verifies every record;
/// truncates a torn tail of the newest segment.
fn scan_segments(segs: &mut [Segment], last_seq: u32, c: &mut Counters) -> Index {
    let mut index = Index::new();
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
        let sum = record::scan(&buf, |rec| match rec {
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
            Record::Succ { prev, next } => {
                if let (Some(p), Some(n)) = (index.find(&prev), index.find(&next)) {
                    index.set_successor(p, n);
                }
            }
        });
        c.verify_failures += sum.bad_payloads;
        c.corrupt_records += sum.bad_regions;
        let torn = seq == last_seq && (sum.good_end as u64) < seg.len;
        if sum.bad_payloads > 0 || sum.bad_regions > u64::from(torn) {
            tracing::warn!(
                "chunk store: {} is damaged: skipped {} chunk records that do not match their \
                 fingerprint and {} garbled regions",
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
    index
}

#[cfg(test)]
mod tests {
    use super::*;

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
        s.set_successor(&a, &a);
        s.insert(&b, &db).expect("insert");
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
