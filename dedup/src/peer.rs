//! What we believe a peer's store holds.
//!
//! A `PeerView` combines two beliefs:
//! - **Marks**: chunks we sent to the peer or received from it, so the peer's store should hold them.
//!   They bridge the seconds until the peer's next summary lists them, and are kept in two
//!   generations: each time the peer's summaries are in sync again after a new index, the older
//!   generation is dropped (its chunks are in the summaries now, or the peer no longer keeps them
//!   on disk). With a peer that sends no summaries, a generation is dropped every
//!   [`MAX_MARKS`] marks instead.
//! - **Summaries** (`crate::summary`): the fingerprints of the chunks the peer's disk tier holds, per
//!   segment of its store, as the peer described them. They cover chunks whoever sent them there (a hub
//!   that received a file from another branch), and they survive restarts: the view keeps them in a
//!   log file of its own (below), and after a restart of either side only what changed is asked again.
//!
//! Both are only beliefs: the peer may have evicted a chunk, lost its disk, two chunks may share a
//! summary fingerprint. None of that can corrupt data — a reference the peer cannot resolve is
//! answered with the bytes — it only costs a round trip, after which the chunk is believed absent
//! ([`PeerView::forget`]) until we send it again. Beliefs are tied to chunk ids (fingerprints), never
//! to where a chunk sits in either store, so a slot or a segment reused for other chunks is never
//! believed by mistake: a changed segment has another fold and is asked again from its start.
//!
//! The view is tied to the peer store's identity: a peer that comes back with a new store id has lost
//! its store, and gets a fresh, empty view (the old log file is deleted).
//!
//! # The log file
//! `<dir>/<peer store id>.view`: a header (magic, peer store id, checksum) and records appended as
//! the view changes: each part as the peer sent it, and each dropped segment. Every record carries a
//! BLAKE3 checksum and is checked, then applied like a message from the network, when the file is
//! loaded. A torn or damaged record ends the replay there: the file is cut to the records before it
//! and the rest is asked from the peer again (logged, [`LoadReport`]). A damaged header drops the
//! file. Records are written without fsync: a crash of the process loses nothing written, a power
//! loss may lose the last seconds of beliefs, which the next exchange restores. The log is rewritten
//! compactly once it is more than twice what it describes.

use crate::store::seal::Sealer;
use crate::store::StoreId;
use crate::summary::{decode_keys, fp, Msg, Part, SegInfo};
use crate::ChunkId;
use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

/// Fingerprints believed absent (after a NEED) are remembered up to this many; then forgotten.
const MAX_DENIED: usize = 1 << 16;
/// Marks per generation (about 4 GiB of 4 KiB chunks): past it the older generation is dropped.
pub const MAX_MARKS: usize = 1 << 20;
/// Largest view file read at load (a 64 TiB peer store's summaries are well below it).
const MAX_FILE: u64 = 1 << 30;
const MAGIC: &[u8; 8] = b"DITTOVW1";
/// The magic of a view whose records are sealed with (a key derived from) the store key.
const MAGIC_SEALED: &[u8; 8] = b"DITTOVS1";
const HEADER_LEN: usize = 8 + 16 + 8;
const REC_PART: u8 = 1;
const REC_DROP: u8 = 2;

#[derive(Default)]
struct Marks {
    /// Fingerprints of chunks marked since the last rotation, and in the generation before.
    cur: HashSet<u64>,
    prev: HashSet<u64>,
    denied: HashSet<u64>,
}

/// One segment of the peer's store as far as we know it: from its start to `upto`.
#[derive(Default)]
struct SegKnown {
    upto: u64,
    fold: u64,
    keys: u64,
    /// The parts, as received (kept to forget their keys, and to rewrite the log).
    parts: Vec<Part>,
}

#[derive(Default)]
struct Known {
    segs: BTreeMap<u32, SegKnown>,
    /// Sorted fingerprints of all parts (a fingerprint in two segments is there twice).
    base: Sorted,
    /// Recently added, sorted; merged into `base` when it grows.
    recent: Vec<u64>,
}

/// What [`PeerView::apply_part`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Applied {
    /// The part extends (or starts) what we know of its segment.
    Added,
    /// It does not continue what we know (a duplicate, or an answer to an older question): ignored.
    Stale,
    /// What we knew of the segment does not match what came before the part on the peer: we forgot
    /// the segment; ask for it from the start.
    Mismatch,
}

/// What loading the view's file found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LoadReport {
    /// Records replayed.
    pub records: u64,
    /// The file was damaged (bad header, or a bad record and everything after it): that part was
    /// dropped, never believed.
    pub damaged: bool,
    pub dropped_bytes: u64,
}

/// The view's file, owned by its writer thread (`ditto-view-log`): no caller ever waits for the
/// disk, a slow or hung one included.
struct Log {
    path: PathBuf,
    /// Seals the records (with the store key, derived for this peer store).
    sealer: Option<Sealer>,
    file: Option<File>,
    len: u64,
}

enum LogOp {
    Append(u8, Vec<u8>),
    Discard,
}

/// Records waiting for the writer thread; past this they are not kept on disk (learned again
/// from the peer after a restart).
const LOG_QUEUE: usize = 1024;

/// How a view reaches its writer thread.
struct LogHandle {
    tx: std::sync::mpsc::SyncSender<LogOp>,
    /// Closed when the thread ends.
    done: std::sync::mpsc::Receiver<()>,
    /// Closed when the file was loaded.
    loaded: Mutex<Option<std::sync::mpsc::Receiver<()>>>,
}

#[derive(Debug)]
pub struct PeerView {
    b: Arc<Beliefs>,
    marks: Mutex<Marks>,
    log: Mutex<Option<LogHandle>>,
}

/// What the peer's summaries told us, shared with the view's writer thread (which loads it and
/// rewrites the file from it). The thread never holds the [`PeerView`] itself, so dropping the
/// view always happens on the caller's thread and waits for the queued records.
#[derive(Debug)]
struct Beliefs {
    store: StoreId,
    known: RwLock<Known>,
    report: Mutex<LoadReport>,
}

impl std::fmt::Debug for LogHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogHandle").finish_non_exhaustive()
    }
}

impl Drop for PeerView {
    /// Lets the writer thread finish what is queued, waiting at most 3 s (a hung disk is not
    /// waited for).
    fn drop(&mut self) {
        let h = self.log.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = h {
            drop(h.tx);
            let _ = h.done.recv_timeout(std::time::Duration::from_secs(3));
        }
    }
}

impl std::fmt::Debug for Marks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Marks").finish_non_exhaustive()
    }
}
impl std::fmt::Debug for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Known")
            .field("segments", &self.segs.len())
            .finish_non_exhaustive()
    }
}
impl std::fmt::Debug for Log {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Log").field("path", &self.path).finish()
    }
}

/// Sorted fingerprints with a directory of where each range of top bits starts, so a lookup reads
/// about one cache line of it (fingerprints are uniform: four to eight per directory entry).
#[derive(Default)]
struct Sorted {
    v: Vec<u64>,
    /// `dir[i]`: the first index whose fingerprint's top `bits` bits are at least `i`.
    dir: Vec<u32>,
    bits: u32,
}

impl Sorted {
    fn reindex(&mut self) {
        let n = self.v.len();
        self.bits = if n < 2 {
            0
        } else {
            (usize::BITS - 1 - n.leading_zeros())
                .saturating_sub(2)
                .min(crate::summary::FP_BITS)
        };
        let shift = crate::summary::FP_BITS - self.bits;
        let buckets = 1usize << self.bits;
        self.dir.clear();
        self.dir.reserve_exact(buckets + 1);
        let mut j = 0usize;
        for i in 0..buckets {
            while j < n && ((self.v[j] >> shift) as usize) < i {
                j += 1;
            }
            self.dir.push(j as u32);
        }
        self.dir.push(n as u32);
    }

    fn contains(&self, x: u64) -> bool {
        if self.v.is_empty() {
            return false;
        }
        let i = (x >> (crate::summary::FP_BITS - self.bits)) as usize;
        match (self.dir.get(i), self.dir.get(i + 1)) {
            (Some(&a), Some(&b)) => self.v[a as usize..b as usize].contains(&x),
            _ => false,
        }
    }
}

/// Merges sorted `b` into sorted `a`.
fn merge_into(a: &mut Vec<u64>, b: &[u64]) {
    if b.is_empty() {
        return;
    }
    let mut out = Vec::with_capacity(a.len() + b.len());
    let (mut i, mut j) = (0, 0);
    while i < a.len() && j < b.len() {
        if a[i] <= b[j] {
            out.push(a[i]);
            i += 1;
        } else {
            out.push(b[j]);
            j += 1;
        }
    }
    out.extend_from_slice(&a[i..]);
    out.extend_from_slice(&b[j..]);
    *a = out;
}

/// Removes one occurrence of each of sorted `b` from sorted `a`.
fn remove_from(a: &mut Vec<u64>, b: &[u64]) {
    if b.is_empty() {
        return;
    }
    let mut j = 0;
    a.retain(|&x| {
        while j < b.len() && b[j] < x {
            j += 1;
        }
        if j < b.len() && b[j] == x {
            j += 1;
            false
        } else {
            true
        }
    });
}

impl Known {
    fn contains(&self, f: u64) -> bool {
        self.base.contains(f) || self.recent.binary_search(&f).is_ok()
    }

    fn merge_recent(&mut self) {
        let recent = std::mem::take(&mut self.recent);
        merge_into(&mut self.base.v, &recent);
        self.base.reindex();
    }

    fn chunks(&self) -> u64 {
        self.segs.values().map(|s| s.keys).sum()
    }

    fn drop_seg(&mut self, seq: u32) -> bool {
        let Some(s) = self.segs.remove(&seq) else {
            return false;
        };
        let mut gone = Vec::with_capacity(s.keys as usize);
        for p in &s.parts {
            // Parts were checked when they were added.
            if let Ok(k) = decode_keys(p.count, p.k, &p.bits) {
                gone.extend(k);
            }
        }
        gone.sort_unstable();
        let recent = std::mem::take(&mut self.recent);
        merge_into(&mut self.base.v, &recent);
        remove_from(&mut self.base.v, &gone);
        self.base.reindex();
        true
    }

    /// Applies part `p` whose fingerprints are `keys` (decoded from it).
    fn apply_part(&mut self, p: &Part, keys: Vec<u64>) -> Applied {
        if p.from == 0 {
            self.drop_seg(p.seq);
        } else {
            match self.segs.get(&p.seq) {
                Some(s) if s.upto == p.from => {
                    if s.fold != p.fold_before {
                        self.drop_seg(p.seq);
                        return Applied::Mismatch;
                    }
                }
                _ => return Applied::Stale,
            }
        }
        let s = self.segs.entry(p.seq).or_default();
        s.upto = p.to;
        s.fold = s.fold.wrapping_add(p.fold);
        s.keys += keys.len() as u64;
        s.parts.push(p.clone());
        merge_into(&mut self.recent, &keys);
        if self.recent.len() > (self.base.v.len() / 8).max(4096) {
            self.merge_recent();
        }
        Applied::Added
    }
}

/// What a sealed record's place binds in: a record moved within the file, or into another view's
/// file, does not open.
fn record_ad(at: u64) -> [u8; 23] {
    let mut ad = [0u8; 23];
    ad[..15].copy_from_slice(b"ditto peer view");
    ad[15..].copy_from_slice(&at.to_le_bytes());
    ad
}

/// A log record to be written at byte `at` of the file: length, checksum, then the kind and body,
/// sealed if the view is.
fn record(sealer: Option<&Sealer>, at: u64, kind: u8, body: &[u8]) -> Vec<u8> {
    let mut plain = Vec::with_capacity(1 + body.len());
    plain.push(kind);
    plain.extend_from_slice(body);
    let payload = match sealer {
        Some(s) => s.seal_snapshot(&record_ad(at), plain),
        None => plain,
    };
    let mut r = Vec::with_capacity(12 + payload.len());
    r.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    r.extend_from_slice(&blake3::hash(&payload).as_bytes()[..8]);
    r.extend_from_slice(&payload);
    r
}

fn header(store: StoreId, sealed: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(HEADER_LEN);
    b.extend_from_slice(if sealed { MAGIC_SEALED } else { MAGIC });
    b.extend_from_slice(&store.0.to_le_bytes());
    let check = blake3::hash(&b);
    b.extend_from_slice(&check.as_bytes()[..8]);
    b
}

/// Creates (or truncates) a file only its owner may read.
fn create_private(path: &Path) -> std::io::Result<File> {
    let mut o = std::fs::OpenOptions::new();
    o.create(true).write(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
    o.open(path)
}

impl Beliefs {
    fn known(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.known.read().unwrap_or_else(|e| e.into_inner())
    }

    fn known_mut(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.known.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Replays the file; returns how many bytes of it to keep (0: start it anew).
    fn load(&self, path: &Path, sealer: Option<&Sealer>) -> (u64, LoadReport) {
        let mut rep = LoadReport::default();
        let data = match std::fs::metadata(path) {
            Err(_) => return (0, rep),
            Ok(m) if m.len() > MAX_FILE => {
                rep.damaged = true;
                rep.dropped_bytes = m.len();
                tracing::warn!(
                    "peer view {} is larger than any view can be: dropped; relearning it from the peer",
                    path.display()
                );
                return (0, rep);
            }
            Ok(_) => match std::fs::read(path) {
                Ok(d) => d,
                Err(e) => {
                    tracing::warn!(
                        "peer view {}: cannot read: {e}; relearning it from the peer",
                        path.display()
                    );
                    return (0, rep);
                }
            },
        };
        self.replay(&data, &path.display().to_string(), sealer)
    }

    /// Replays the bytes of a view file (`what` names it in logs); returns how many to keep.
    fn replay(&self, data: &[u8], what: &str, sealer: Option<&Sealer>) -> (u64, LoadReport) {
        let mut rep = LoadReport::default();
        if data.len() < HEADER_LEN || data[..HEADER_LEN] != header(self.store, sealer.is_some())[..]
        {
            rep.damaged = true;
            rep.dropped_bytes = data.len() as u64;
            tracing::warn!(
                "peer view {} has a damaged header: dropped; relearning it from the peer",
                what
            );
            return (0, rep);
        }
        let mut known = self.known_mut();
        let mut pos = HEADER_LEN;
        while pos < data.len() {
            let ok = (|| {
                let len = u32::from_le_bytes(data.get(pos..pos + 4)?.try_into().ok()?) as usize;
                let sum = data.get(pos + 4..pos + 12)?;
                let payload = data.get(pos + 12..pos + 12 + len)?;
                if len == 0 || blake3::hash(payload).as_bytes()[..8] != *sum {
                    return None;
                }
                let opened;
                let body = match sealer {
                    Some(s) => {
                        opened = s.open_snapshot(&record_ad(pos as u64), payload.to_vec())?;
                        &opened[..]
                    }
                    None => payload,
                };
                if body.is_empty() {
                    return None;
                }
                match body[0] {
                    REC_PART => match Msg::parse_keys(&body[1..]).ok()? {
                        (Msg::Part(p), keys) => {
                            known.apply_part(&p, keys);
                        }
                        _ => return None,
                    },
                    REC_DROP => {
                        let seq = u32::from_le_bytes(body.get(1..5)?.try_into().ok()?);
                        known.drop_seg(seq);
                    }
                    _ => return None,
                }
                Some(12 + len)
            })();
            match ok {
                Some(n) => {
                    pos += n;
                    rep.records += 1;
                }
                None => {
                    rep.damaged = true;
                    rep.dropped_bytes = (data.len() - pos) as u64;
                    tracing::warn!(
                        "peer view {} is damaged at byte {pos} (torn or altered): kept the {} records \
                         before it, dropped {} bytes; relearning the rest from the peer",
                        what,
                        rep.records,
                        rep.dropped_bytes
                    );
                    break;
                }
            }
        }
        (pos as u64, rep)
    }

    /// Bytes of log records what the view knows would take.
    fn live_bytes(&self) -> u64 {
        let k = self.known();
        k.segs
            .values()
            .flat_map(|s| &s.parts)
            .map(|p| p.bits.len() as u64 + 64)
            .sum()
    }

    /// Writes the log anew (a temporary file renamed over it) with one record per part held.
    fn rewrite(&self, log: &mut Log) {
        let tmp = log.path.with_extension("view.tmp");
        let mut buf = header(self.store, log.sealer.is_some());
        {
            let k = self.known();
            for p in k.segs.values().flat_map(|s| &s.parts) {
                let at = buf.len() as u64;
                let r = record(
                    log.sealer.as_ref(),
                    at,
                    REC_PART,
                    &Msg::Part(p.clone()).encode(),
                );
                buf.extend_from_slice(&r);
            }
        }
        let res = create_private(&tmp)
            .and_then(|mut f| {
                f.write_all(&buf)?;
                f.sync_data()?;
                Ok(f)
            })
            .and_then(|f| {
                std::fs::rename(&tmp, &log.path)?;
                Ok(f)
            });
        match res {
            Ok(f) => {
                log.file = Some(f);
                log.len = buf.len() as u64;
            }
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                tracing::warn!(
                    "peer view {}: cannot rewrite: {e}; no longer kept on disk this run",
                    log.path.display()
                );
                log.file = None;
            }
        }
    }
}

impl PeerView {
    /// An empty view of the peer store `store`, kept in RAM only.
    pub fn new(store: StoreId) -> PeerView {
        PeerView {
            b: Arc::new(Beliefs {
                store,
                known: RwLock::default(),
                report: Mutex::default(),
            }),
            marks: Mutex::default(),
            log: Mutex::new(None),
        }
    }

    /// The view of the peer store `store`, kept in `dir` (created, mode 0700): loads what an earlier
    /// run learned (see the module documentation) and returns once it is loaded (at most 30 s).
    /// Never fails: a file that cannot be read or written leaves a view in RAM only (logged).
    pub fn open(store: StoreId, dir: &Path) -> Arc<PeerView> {
        let v = PeerView::open_sealed(store, dir, None);
        v.wait_loaded(std::time::Duration::from_secs(30));
        v
    }

    /// The view of the peer store `store`, kept in `<our store's dir>/peers` and sealed with our
    /// store's key (when it has one, see `docs/security.md`): fingerprints of the peer's chunks
    /// are fingerprints of content. Without a disk tier, a view in RAM only. Returns at once: the
    /// file is loaded by the view's writer thread (what it holds is believed once loaded).
    pub fn open_for(ours: &crate::ChunkStore, store: StoreId) -> Arc<PeerView> {
        match ours.dir() {
            Some(d) => PeerView::open_sealed(
                store,
                &d.join("peers"),
                ours.key().map(|k| Sealer::new(&k, store)),
            ),
            None => Arc::new(PeerView::new(store)),
        }
    }

    /// Waits until the view's file is loaded (true), at most `timeout`.
    pub fn wait_loaded(&self, timeout: std::time::Duration) -> bool {
        let g = self.log.lock().unwrap_or_else(|e| e.into_inner());
        let Some(h) = g.as_ref() else {
            return true;
        };
        let rx = h.loaded.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(g);
        match rx {
            // Nothing is ever sent: the sender is dropped once loaded.
            Some(rx) => !matches!(
                rx.recv_timeout(timeout),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout)
            ),
            None => true,
        }
    }

    fn open_sealed(store: StoreId, dir: &Path, sealer: Option<Sealer>) -> Arc<PeerView> {
        let v = Arc::new(PeerView::new(store));
        let (tx, rx) = std::sync::mpsc::sync_channel(LOG_QUEUE);
        let (done_tx, done) = std::sync::mpsc::channel::<()>();
        let (loaded_tx, loaded) = std::sync::mpsc::channel::<()>();
        let beliefs = v.b.clone();
        let dir = dir.to_path_buf();
        let spawned = std::thread::Builder::new()
            .name("ditto-view-log".into())
            .spawn(move || {
                let _done = done_tx;
                run_log(&beliefs, &dir, sealer, rx, loaded_tx);
            });
        match spawned {
            Ok(_) => {
                *v.log.lock().unwrap_or_else(|e| e.into_inner()) = Some(LogHandle {
                    tx,
                    done,
                    loaded: Mutex::new(Some(loaded)),
                })
            }
            Err(e) => tracing::warn!(
                "peer view: cannot start its writer thread: {e}; the view of this peer is kept in RAM only"
            ),
        }
        v
    }

    /// A view in RAM from the bytes of a view file (for the fuzzer).
    #[doc(hidden)]
    pub fn from_log_bytes(store: StoreId, data: &[u8]) -> PeerView {
        let v = PeerView::new(store);
        let (_, rep) = v.b.replay(data, "(bytes)", None);
        *v.b.report.lock().unwrap_or_else(|e| e.into_inner()) = rep;
        v
    }

    /// The bytes of a view file holding what this view knows (for the fuzzer's seeds).
    #[doc(hidden)]
    pub fn log_bytes(&self) -> Vec<u8> {
        let mut buf = header(self.b.store, false);
        let k = self.known();
        for p in k.segs.values().flat_map(|s| &s.parts) {
            let r = record(
                None,
                buf.len() as u64,
                REC_PART,
                &Msg::Part(p.clone()).encode(),
            );
            buf.extend_from_slice(&r);
        }
        buf
    }

    /// The identity of the peer store this view describes.
    pub fn store(&self) -> StoreId {
        self.b.store
    }

    /// What loading the file found.
    pub fn load_report(&self) -> LoadReport {
        self.b
            .report
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn marks(&self) -> std::sync::MutexGuard<'_, Marks> {
        // A panic elsewhere while holding the lock leaves a bitmap that is still a valid belief.
        self.marks.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn known(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.b.known()
    }

    fn known_mut(&self) -> std::sync::RwLockWriteGuard<'_, Known> {
        self.b.known_mut()
    }

    /// Whether we believe the peer holds chunk `id`: marked, or in the peer's summaries and not
    /// found missing since.
    #[inline]
    pub fn knows(&self, id: &ChunkId) -> bool {
        let f = fp(id);
        {
            let m = self.marks();
            if m.cur.contains(&f) || m.prev.contains(&f) {
                return true;
            }
            if m.denied.contains(&f) {
                return false;
            }
        }
        self.known().contains(f)
    }

    /// Records that the peer now holds chunk `id`: we sent it, or it sent it to us.
    pub fn believe(&self, id: &ChunkId) {
        let f = fp(id);
        let mut m = self.marks();
        if !m.denied.is_empty() {
            m.denied.remove(&f);
        }
        if m.cur.len() >= MAX_MARKS {
            m.prev = std::mem::take(&mut m.cur);
        }
        m.cur.insert(f);
    }

    /// The peer asked for chunk `id`: it does not hold it, whatever marks or summaries said.
    pub fn forget(&self, id: &ChunkId) {
        let f = fp(id);
        let mut m = self.marks();
        m.cur.remove(&f);
        m.prev.remove(&f);
        if m.denied.len() >= MAX_DENIED {
            m.denied.clear();
        }
        m.denied.insert(f);
    }

    /// Drops the older generation of marks (the peer's summaries now cover what it kept of them).
    pub fn rotate_marks(&self) {
        let mut m = self.marks();
        m.prev = std::mem::take(&mut m.cur);
    }

    /// Drops the marks (the peer process restarted: what it had not written to disk is gone; its
    /// summaries tell what survived).
    pub fn clear_marks(&self) {
        let mut m = self.marks();
        m.cur.clear();
        m.prev.clear();
    }

    /// Chunks believed held by marks (for status and tests).
    pub fn count(&self) -> u64 {
        let m = self.marks();
        (m.cur.len() + m.prev.len()) as u64
    }

    /// Chunks of the peer's store its summaries told us about.
    pub fn summarized_chunks(&self) -> u64 {
        self.known().chunks()
    }

    /// Folds recently learned fingerprints into the indexed set (one pass over what we know), so
    /// lookups read one place. Called when the exchange is quiet.
    pub fn settle(&self) {
        if !self.known().recent.is_empty() {
            self.known_mut().merge_recent();
        }
    }

    /// How far we know segment `seq` of the peer's store (0: not at all).
    pub fn known_upto(&self, seq: u32) -> u64 {
        self.known().segs.get(&seq).map_or(0, |s| s.upto)
    }

    /// Bytes of RAM the view uses.
    pub fn ram_bytes(&self) -> usize {
        let m = self.marks();
        let k = self.known();
        (m.cur.capacity() + m.prev.capacity() + m.denied.capacity()) * 9
            + (k.base.v.capacity() + k.recent.capacity()) * 8
            + k.base.dir.capacity() * 4
            + k.segs
                .values()
                .flat_map(|s| &s.parts)
                .map(|p| p.bits.capacity() + 64)
                .sum::<usize>()
    }

    /// Applies the peer's INDEX: forgets segments it no longer lists and segments that changed under
    /// us; returns what to ask for, as (segment, from).
    pub fn apply_index(&self, entries: &[SegInfo]) -> Vec<(u32, u64)> {
        let mut wants = Vec::new();
        let mut dropped = Vec::new();
        {
            let mut k = self.known_mut();
            let listed: HashSet<u32> = entries.iter().map(|e| e.seq).collect();
            let gone: Vec<u32> = k
                .segs
                .keys()
                .copied()
                .filter(|s| !listed.contains(s))
                .collect();
            for seq in gone {
                k.drop_seg(seq);
                dropped.push(seq);
            }
            for e in entries {
                let (upto, fold) = k.segs.get(&e.seq).map_or((0, 0), |s| (s.upto, s.fold));
                let changed = upto > e.len || (upto == e.len && upto > 0 && fold != e.fold);
                if changed {
                    k.drop_seg(e.seq);
                    dropped.push(e.seq);
                    wants.push((e.seq, 0));
                } else if upto < e.len {
                    wants.push((e.seq, if k.segs.contains_key(&e.seq) { upto } else { 0 }));
                }
            }
        }
        for seq in dropped {
            self.append(REC_DROP, &seq.to_le_bytes());
        }
        wants
    }

    /// Applies a part the peer sent (already parsed and checked by [`Msg::parse`]).
    pub fn apply_part(&self, p: &Part) -> Applied {
        match decode_keys(p.count, p.k, &p.bits) {
            Ok(keys) => self.apply_decoded(p, keys),
            Err(_) => Applied::Stale,
        }
    }

    /// [`PeerView::apply_part`] with the part's fingerprints already decoded.
    pub(crate) fn apply_decoded(&self, p: &Part, keys: Vec<u64>) -> Applied {
        let r = self.known_mut().apply_part(p, keys);
        match r {
            Applied::Added => {
                let body = Msg::Part(p.clone()).encode();
                self.append(REC_PART, &body);
            }
            Applied::Mismatch => self.append(REC_DROP, &p.seq.to_le_bytes()),
            Applied::Stale => {}
        }
        r
    }

    /// Forgets segment `seq` of the peer's store.
    pub fn drop_segment(&self, seq: u32) {
        if self.known_mut().drop_seg(seq) {
            self.append(REC_DROP, &seq.to_le_bytes());
        }
    }

    /// Hands a record to the writer thread (dropped if it is far behind: only a belief).
    fn append(&self, kind: u8, body: &[u8]) {
        let g = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = g.as_ref() {
            let _ = h.tx.try_send(LogOp::Append(kind, body.to_vec()));
        }
    }

    /// The peer store this view describes is gone (the peer has a new store): delete the file.
    pub fn discard(&self) {
        let g = self.log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(h) = g.as_ref() {
            let _ = h.tx.try_send(LogOp::Discard);
        }
    }
}

/// The view's writer thread: loads the file into the view, then appends what the view hands it,
/// rewriting the file when it has grown to twice what it describes. Ends when the view is dropped.
fn run_log(
    v: &Beliefs,
    dir: &Path,
    sealer: Option<Sealer>,
    rx: std::sync::mpsc::Receiver<LogOp>,
    loaded: std::sync::mpsc::Sender<()>,
) {
    let path = dir.join(format!("{:032x}.view", v.store.0));
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    if let Err(e) = builder.create(dir) {
        tracing::warn!(
            "peer view: cannot create {}: {e}; the view of this peer is kept in RAM only",
            dir.display()
        );
        return;
    }
    let (keep, report) = v.load(&path, sealer.as_ref());
    *v.report.lock().unwrap_or_else(|e| e.into_inner()) = report;
    let file = if keep > 0 {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|f| {
                f.set_len(keep)?;
                Ok(f)
            })
    } else {
        create_private(&path).and_then(|mut f| {
            f.write_all(&header(v.store, sealer.is_some()))?;
            Ok(f)
        })
    };
    drop(loaded);
    let mut log = match file {
        Ok(f) => Log {
            path,
            sealer,
            file: Some(f),
            len: keep.max(HEADER_LEN as u64),
        },
        Err(e) => {
            tracing::warn!(
                "peer view: cannot write {}: {e}; the view of this peer is kept in RAM only",
                path.display()
            );
            return;
        }
    };
    while let Ok(op) = rx.recv() {
        match op {
            LogOp::Discard => {
                let _ = std::fs::remove_file(&log.path);
                return;
            }
            LogOp::Append(kind, body) => {
                let Some(file) = log.file.as_mut() else {
                    continue;
                };
                let rec = record(log.sealer.as_ref(), log.len, kind, &body);
                if let Err(e) = file.write_all(&rec) {
                    tracing::warn!(
                        "peer view {}: cannot write: {e}; no longer kept on disk this run",
                        log.path.display()
                    );
                    log.file = None;
                    continue;
                }
                log.len += rec.len() as u64;
                if log.len > 2 * v.live_bytes() + (1 << 20) {
                    v.rewrite(&mut log);
                }
            }
        }
    }
}
