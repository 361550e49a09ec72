//! Store summaries: how two peers learn what each other's chunk store holds.
//!
//! A sender references a chunk only if it believes the peer's store holds it ([`PeerView`]). Marking
//! what we sent or received builds that belief only from our own traffic, and only while we run. A
//! summary tells us what the peer's store *really* holds, whoever sent it there and across restarts of
//! either side:
//!
//! - The peer's disk tier is a list of append-only segment files. For each one it announces
//!   (seq, length, chunks, fold) in an **INDEX**; the fold is the wrapping sum of the segment's chunk
//!   fingerprints, so a segment that was rewritten (a store restored from a backup) does not pass for
//!   the one we know.
//! - We ask (**WANT**) for the part of each segment we have not seen yet: from the end of what we know
//!   to its current length. The answer (**PART**) lists the [`FP_BITS`]-bit fingerprints of the chunks
//!   in that range, sorted and Rice-coded (about 40 - log2(n) + 2 bits per chunk: under 0.1% of the
//!   bytes they describe at the default chunk size), with the fold of what came before, so a part that
//!   does not continue what we hold is not appended to it. A segment that no longer exists is answered
//!   with **GONE**.
//! - Segments missing from an INDEX were evicted: we forget their chunks. Sealed segments never change,
//!   so after a restart only what changed since is asked again: the parts we hold are kept on disk by
//!   the view (see [`PeerView`]).
//!
//! Everything from the network is checked before it is believed: sizes against the limits below,
//! fingerprints strictly increasing and in range, the stream of bits exactly consumed. A bad message
//! is an error for the caller to count; nothing of it is applied. A wrong belief (a fingerprint
//! collision, a chunk evicted since) costs a NEED/FILL round trip of the engine, never a wrong byte.
//!
//! Pure: the caller moves message bodies ([`Reconciler::on_message`]) and passes the clock.

use crate::peer::{Applied, PeerView};
use crate::store::{ChunkStore, SegmentState};
use crate::ChunkId;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Bits of a chunk fingerprint in a summary. With n chunks known, a chunk the peer does not hold is
/// believed held with probability about n / 2^40 (3e-6 for a 10 GiB store of 4 KiB chunks).
pub const FP_BITS: u32 = 40;
/// Largest number of fingerprints in one PART (about 45 KiB coded: one tunnel frame).
pub const MAX_PART_KEYS: usize = 12_000;
/// Segments in one INDEX message (24 bytes each: one tunnel frame).
pub const MAX_INDEX_ENTRIES: usize = 2_048;
/// Segments an INDEX may describe in all (a 64 TiB store of 64 MiB segments).
pub const MAX_SEGMENTS: usize = 1 << 20;
/// Largest message body.
pub const MAX_MESSAGE: usize = 60 * 1024;
/// WANTs in flight at once: bounds what a peer's answers can queue on a link.
pub const WANT_WINDOW: usize = 8;
/// A WANT unanswered this long (its link died) is asked again.
pub const WANT_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an owner whose store changed announces it again.
pub const INDEX_INTERVAL: Duration = Duration::from_secs(2);
/// How often an owner announces its store even if unchanged: a learner that lost an index
/// (whatever the cause) is in sync again within this (an index is about 20 bytes per segment).
pub const INDEX_REFRESH: Duration = Duration::from_secs(60);
/// Shortest time between two rotations of the marks: a chunk marked when it was encoded may wait
/// in send queues for a while before the peer stores it and a summary can list it.
pub const ROTATE_MIN: Duration = Duration::from_secs(10);

/// The fingerprint a summary carries for a chunk.
#[inline]
pub fn fp(id: &ChunkId) -> u64 {
    id.hash64() >> (64 - FP_BITS)
}

/// A summary message was malformed or broke a limit.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SummaryError {
    #[error("malformed summary message: {0}")]
    Malformed(&'static str),
    #[error("summary message of {0} bytes exceeds the limit")]
    TooLarge(usize),
}

/// One segment in an INDEX.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegInfo {
    pub seq: u32,
    pub len: u64,
    /// Chunks listed in it.
    pub keys: u32,
    /// Wrapping sum of their fingerprints.
    pub fold: u64,
}

/// The fingerprints of the chunks of segment `seq` whose record starts in `from..to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub seq: u32,
    pub from: u64,
    pub to: u64,
    /// Fold of the chunks before `from`: what the receiver must hold for this part to continue it.
    pub fold_before: u64,
    /// Fold of the chunks in the part (every chunk, even two with the same fingerprint).
    pub fold: u64,
    /// Distinct fingerprints coded in `bits`.
    pub count: u32,
    /// Rice parameter.
    pub k: u8,
    pub bits: Vec<u8>,
}

/// A summary message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Segments of the sender's store. An index may span several messages: `first` starts it,
    /// `last` ends it.
    Index {
        first: bool,
        last: bool,
        entries: Vec<SegInfo>,
    },
    Want {
        seq: u32,
        from: u64,
    },
    Part(Part),
    Gone {
        seq: u32,
    },
}

const T_INDEX: u8 = 1;
const T_WANT: u8 = 2;
const T_PART: u8 = 3;
const T_GONE: u8 = 4;
const PART_HEAD: usize = 1 + 4 + 8 * 4 + 4 + 1;

struct Rd<'a>(&'a [u8]);

impl<'a> Rd<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SummaryError> {
        if self.0.len() < n {
            return Err(SummaryError::Malformed("truncated"));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, SummaryError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, SummaryError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, SummaryError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Result<u64, SummaryError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(a))
    }
}

impl Msg {
    /// The message's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            Msg::Index {
                first,
                last,
                entries,
            } => {
                out.push(T_INDEX);
                out.push(u8::from(*first) | u8::from(*last) << 1);
                out.extend_from_slice(&(entries.len() as u16).to_be_bytes());
                for e in entries {
                    out.extend_from_slice(&e.seq.to_be_bytes());
                    out.extend_from_slice(&e.len.to_be_bytes());
                    out.extend_from_slice(&e.keys.to_be_bytes());
                    out.extend_from_slice(&e.fold.to_be_bytes());
                }
            }
            Msg::Want { seq, from } => {
                out.push(T_WANT);
                out.extend_from_slice(&seq.to_be_bytes());
                out.extend_from_slice(&from.to_be_bytes());
            }
            Msg::Part(p) => {
                out.reserve(PART_HEAD + p.bits.len());
                out.push(T_PART);
                out.extend_from_slice(&p.seq.to_be_bytes());
                for v in [p.from, p.to, p.fold_before, p.fold] {
                    out.extend_from_slice(&v.to_be_bytes());
                }
                out.extend_from_slice(&p.count.to_be_bytes());
                out.push(p.k);
                out.extend_from_slice(&p.bits);
            }
            Msg::Gone { seq } => {
                out.push(T_GONE);
                out.extend_from_slice(&seq.to_be_bytes());
            }
        }
        out
    }

    /// Parses and checks a message. A PART's fingerprints are decoded and checked too (see
    /// [`decode_keys`]), so a part that parses is one that can be applied.
    pub fn parse(b: &[u8]) -> Result<Msg, SummaryError> {
        Msg::parse_keys(b).map(|(m, _)| m)
    }

    /// [`Msg::parse`], also returning a PART's decoded fingerprints (decoded once, to check them).
    pub(crate) fn parse_keys(b: &[u8]) -> Result<(Msg, Vec<u64>), SummaryError> {
        let mut keys = Vec::new();
        if b.len() > MAX_MESSAGE {
            return Err(SummaryError::TooLarge(b.len()));
        }
        let mut r = Rd(b);
        let msg = match r.u8()? {
            T_INDEX => {
                let flags = r.u8()?;
                if flags > 3 {
                    return Err(SummaryError::Malformed("unknown index flags"));
                }
                let n = r.u16()? as usize;
                if n > MAX_INDEX_ENTRIES {
                    return Err(SummaryError::Malformed("too many index entries"));
                }
                let mut entries = Vec::with_capacity(n);
                let mut prev: Option<u32> = None;
                for _ in 0..n {
                    let e = SegInfo {
                        seq: r.u32()?,
                        len: r.u64()?,
                        keys: r.u32()?,
                        fold: r.u64()?,
                    };
                    if prev.is_some_and(|p| p >= e.seq) {
                        return Err(SummaryError::Malformed("index segments out of order"));
                    }
                    prev = Some(e.seq);
                    entries.push(e);
                }
                Msg::Index {
                    first: flags & 1 != 0,
                    last: flags & 2 != 0,
                    entries,
                }
            }
            T_WANT => Msg::Want {
                seq: r.u32()?,
                from: r.u64()?,
            },
            T_PART => {
                let seq = r.u32()?;
                let (from, to, fold_before, fold) = (r.u64()?, r.u64()?, r.u64()?, r.u64()?);
                let count = r.u32()?;
                let k = r.u8()?;
                if to < from {
                    return Err(SummaryError::Malformed("part ends before it starts"));
                }
                if count as usize > MAX_PART_KEYS {
                    return Err(SummaryError::Malformed("too many fingerprints in a part"));
                }
                if u32::from(k) >= FP_BITS {
                    return Err(SummaryError::Malformed("rice parameter out of range"));
                }
                let bits = r.take(r.0.len())?.to_vec();
                keys = decode_keys(count, k, &bits)?;
                Msg::Part(Part {
                    seq,
                    from,
                    to,
                    fold_before,
                    fold,
                    count,
                    k,
                    bits,
                })
            }
            T_GONE => Msg::Gone { seq: r.u32()? },
            _ => return Err(SummaryError::Malformed("unknown message type")),
        };
        if !r.0.is_empty() {
            return Err(SummaryError::Malformed("trailing bytes"));
        }
        Ok((msg, keys))
    }
}

// ----- Rice coding of sorted fingerprints -----------------------------------------------------------

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    n: u32,
}

impl BitWriter {
    /// Appends the low `bits` bits of `v` (at most 32), most significant first.
    fn put(&mut self, v: u64, bits: u32) {
        debug_assert!(bits <= 32);
        if bits == 0 {
            return;
        }
        self.acc = (self.acc << bits) | (v & ((1u64 << bits) - 1));
        self.n += bits;
        while self.n >= 8 {
            self.n -= 8;
            self.out.push((self.acc >> self.n) as u8);
        }
    }
    fn finish(mut self) -> Vec<u8> {
        if self.n > 0 {
            self.out.push((self.acc << (8 - self.n)) as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    b: &'a [u8],
    pos: usize,
}

impl BitReader<'_> {
    fn left(&self) -> usize {
        self.b.len() * 8 - self.pos
    }
    /// The next 64 bits (zeros past the end).
    fn peek(&self) -> u64 {
        let i = self.pos / 8;
        let mut w = [0u8; 16];
        let n = self.b.len().saturating_sub(i).min(9);
        w[..n].copy_from_slice(&self.b[i..i + n]);
        let v = u128::from_be_bytes(w) << (self.pos % 8);
        (v >> 64) as u64
    }
    /// A unary count: zeros ended by a one. Errors past `limit` or the end.
    fn unary(&mut self, limit: u64) -> Result<u64, SummaryError> {
        let mut q = 0u64;
        loop {
            let w = self.peek();
            let z = w.leading_zeros() as usize;
            if z < 64 {
                if z + 1 > self.left() {
                    return Err(SummaryError::Malformed("fingerprint bits truncated"));
                }
                q += z as u64;
                self.pos += z + 1;
                break;
            }
            q += 64;
            if 64 > self.left() {
                return Err(SummaryError::Malformed("fingerprint bits truncated"));
            }
            self.pos += 64;
            if q > limit {
                break;
            }
        }
        if q > limit {
            return Err(SummaryError::Malformed("fingerprint gap out of range"));
        }
        Ok(q)
    }
    fn bits(&mut self, k: u32) -> Result<u64, SummaryError> {
        if k == 0 {
            return Ok(0);
        }
        if (k as usize) > self.left() {
            return Err(SummaryError::Malformed("fingerprint bits truncated"));
        }
        let v = self.peek() >> (64 - k);
        self.pos += k as usize;
        Ok(v)
    }
}

/// Bits the Rice code of these gaps takes with parameter `k`.
fn rice_cost(keys: &[u64], k: u32) -> u64 {
    let mut prev = 0u64;
    let mut bits = 0u64;
    for &x in keys {
        bits += ((x - prev) >> k) + 1 + u64::from(k);
        prev = x;
    }
    bits
}

/// Codes sorted, distinct fingerprints (each below 2^[`FP_BITS`]): returns the Rice parameter and
/// the bits. The gaps between neighbours (the first from zero) are coded as a unary quotient and `k`
/// low bits, `k` chosen for the fewest bits.
pub fn encode_keys(keys: &[u64]) -> (u8, Vec<u8>) {
    debug_assert!(keys.windows(2).all(|w| w[0] < w[1]));
    let mean = (1u64 << FP_BITS) / (keys.len() as u64 + 1);
    let guess = 63u32.saturating_sub(mean.max(1).leading_zeros());
    let k = (guess.saturating_sub(1)..=(guess + 1).min(FP_BITS - 1))
        .min_by_key(|&k| rice_cost(keys, k))
        .unwrap_or(0);
    let mut w = BitWriter {
        out: Vec::with_capacity((rice_cost(keys, k) / 8 + 1) as usize),
        acc: 0,
        n: 0,
    };
    let mut prev = 0u64;
    for &x in keys {
        let gap = x - prev;
        let mut q = gap >> k;
        while q >= 32 {
            w.put(0, 32);
            q -= 32;
        }
        w.put(1, q as u32 + 1);
        let low = gap & ((1u64 << k) - 1);
        if k > 32 {
            w.put(low >> 32, k - 32);
            w.put(low, 32);
        } else {
            w.put(low, k);
        }
        prev = x;
    }
    (k as u8, w.finish())
}

/// Decodes what [`encode_keys`] coded. Checks that there are exactly `count` strictly increasing
/// fingerprints below 2^[`FP_BITS`], and that only the padding of the last byte is left over.
pub fn decode_keys(count: u32, k: u8, bits: &[u8]) -> Result<Vec<u64>, SummaryError> {
    let k = u32::from(k);
    if k >= FP_BITS {
        return Err(SummaryError::Malformed("rice parameter out of range"));
    }
    // Every fingerprint takes at least k + 1 bits: refuse a count the bytes cannot hold before
    // allocating for it.
    if u64::from(count) * (u64::from(k) + 1) > bits.len() as u64 * 8 {
        return Err(SummaryError::Malformed("fingerprint bits truncated"));
    }
    let mut keys = Vec::with_capacity(count as usize);
    let mut r = BitReader { b: bits, pos: 0 };
    let limit = (1u64 << FP_BITS) >> k;
    let mut prev = 0u64;
    for i in 0..count {
        let q = r.unary(limit)?;
        let gap = (q << k) | r.bits(k)?;
        if i > 0 && gap == 0 {
            return Err(SummaryError::Malformed(
                "fingerprints not strictly increasing",
            ));
        }
        let x = prev
            .checked_add(gap)
            .filter(|&x| x < 1u64 << FP_BITS)
            .ok_or(SummaryError::Malformed("fingerprint out of range"))?;
        keys.push(x);
        prev = x;
    }
    if r.left() >= 8 || (r.left() > 0 && r.peek() != 0) {
        return Err(SummaryError::Malformed("trailing fingerprint bits"));
    }
    Ok(keys)
}

// ----- the owner's side: describing our store -----------------------------------------------------

/// Builds the summaries of our store for peers. Keeps the folds of segments that did not change.
pub struct Summarizer {
    store: Arc<ChunkStore>,
    cache: Mutex<HashMap<u32, (SegmentState, u32, u64)>>,
}

impl Summarizer {
    pub fn new(store: Arc<ChunkStore>) -> Summarizer {
        Summarizer {
            store,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// The INDEX of our store now. Costs one pass over the slots of each segment that changed
    /// since the last call.
    pub fn index(&self) -> Vec<SegInfo> {
        let states = self.store.segment_states();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.retain(|seq, _| states.iter().any(|s| s.seq == *seq));
        let mut out = Vec::with_capacity(states.len());
        let mut chunks = Vec::new();
        for st in states {
            let (keys, fold) = match cache.get(&st.seq) {
                Some((was, keys, fold)) if *was == st => (*keys, *fold),
                _ => {
                    chunks.clear();
                    let Some(now) = self.store.segment_chunks(st.seq, &mut chunks) else {
                        continue;
                    };
                    let fold = chunks
                        .iter()
                        .fold(0u64, |a, (_, id)| a.wrapping_add(fp(id)));
                    let keys = chunks.len() as u32;
                    cache.insert(st.seq, (now, keys, fold));
                    (keys, fold)
                }
            };
            out.push(SegInfo {
                seq: st.seq,
                len: st.len,
                keys,
                fold,
            });
        }
        out
    }

    /// The answer to a WANT: the chunks of segment `seq` from `from` on (at most
    /// [`MAX_PART_KEYS`]), or GONE if the segment no longer exists or is shorter than `from`.
    pub fn part(&self, seq: u32, from: u64) -> Msg {
        let mut chunks = Vec::new();
        let Some(st) = self.store.segment_chunks(seq, &mut chunks) else {
            return Msg::Gone { seq };
        };
        part_of(seq, from, st.len, &mut chunks)
    }
}

/// The PART (or GONE) for segment `seq` of length `len` holding `chunks` (payload offset, id; any
/// order), from `from` on: at most [`MAX_PART_KEYS`] fingerprints.
pub fn part_of(seq: u32, from: u64, len: u64, chunks: &mut [(u32, ChunkId)]) -> Msg {
    if from > len {
        return Msg::Gone { seq };
    }
    chunks.sort_unstable_by_key(|&(off, _)| off);
    let split = chunks.partition_point(|&(off, _)| u64::from(off) < from);
    let fold_before = chunks[..split]
        .iter()
        .fold(0u64, |a, (_, id)| a.wrapping_add(fp(id)));
    let rest = &chunks[split..];
    let (rest, to) = if rest.len() > MAX_PART_KEYS {
        (&rest[..MAX_PART_KEYS], u64::from(rest[MAX_PART_KEYS].0))
    } else {
        (rest, len)
    };
    let fold = rest.iter().fold(0u64, |a, (_, id)| a.wrapping_add(fp(id)));
    let mut keys: Vec<u64> = rest.iter().map(|(_, id)| fp(id)).collect();
    keys.sort_unstable();
    keys.dedup();
    let (k, bits) = encode_keys(&keys);
    Msg::Part(Part {
        seq,
        from,
        to,
        fold_before,
        fold,
        count: keys.len() as u32,
        k,
        bits,
    })
}

// ----- both sides of one peer session -------------------------------------------------------------

/// Counters of one [`Reconciler`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReconcileStats {
    pub bytes_sent: u64,
    pub bytes_received: u64,
    /// Messages refused as malformed or over a limit.
    pub rejected: u64,
    /// Parts applied to the view.
    pub parts: u64,
    /// Chunks the peer's store holds, per its latest INDEX.
    pub peer_chunks: u64,
}

/// Both roles of the summary exchange with one peer process: owner (answers WANTs about our store,
/// announces changes) and learner (asks for what it lacks of the peer's store, applies answers to
/// the [`PeerView`]). One per peer session; the view outlives it.
pub struct Reconciler {
    view: Arc<PeerView>,
    summarizer: Option<Arc<Summarizer>>,
    // learner
    index_acc: Vec<SegInfo>,
    index_open: bool,
    peer_index: BTreeMap<u32, SegInfo>,
    queue: VecDeque<(u32, u64)>,
    outstanding: HashMap<u32, Instant>,
    /// A new index arrived: once we know all it lists, the older generation of marks goes (at
    /// most every [`ROTATE_MIN`]).
    rotate_due: bool,
    rotated: Option<Instant>,
    // owner
    next_index: Option<Instant>,
    last_index: Option<Vec<SegInfo>>,
    /// When the last index was sent.
    index_sent: Option<Instant>,
    force_index: bool,
    stats: ReconcileStats,
}

impl Reconciler {
    /// `summarizer` is `None` when we have no disk tier to describe (we still learn the peer's).
    pub fn new(view: Arc<PeerView>, summarizer: Option<Arc<Summarizer>>) -> Reconciler {
        Reconciler {
            view,
            summarizer,
            index_acc: Vec::new(),
            index_open: false,
            peer_index: BTreeMap::new(),
            queue: VecDeque::new(),
            outstanding: HashMap::new(),
            rotate_due: false,
            rotated: None,
            next_index: None,
            last_index: None,
            index_sent: None,
            force_index: true,
            stats: ReconcileStats::default(),
        }
    }

    pub fn view(&self) -> &Arc<PeerView> {
        &self.view
    }

    pub fn stats(&self) -> ReconcileStats {
        self.stats
    }

    /// A new connection to the peer: announce our store on it (the peer may have missed changes).
    pub fn link_up(&mut self) {
        self.force_index = true;
    }

    fn send(&mut self, m: &Msg, out: &mut Vec<Vec<u8>>) {
        let b = m.encode();
        self.stats.bytes_sent += b.len() as u64;
        out.push(b);
    }

    /// Handles one message body from the peer; answers are appended to `out`. An error means the
    /// message was refused (counted); nothing of it was applied.
    pub fn on_message(
        &mut self,
        body: &[u8],
        now: Instant,
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), SummaryError> {
        self.stats.bytes_received += body.len() as u64;
        let (msg, keys) = match Msg::parse_keys(body) {
            Ok(m) => m,
            Err(e) => {
                self.stats.rejected += 1;
                return Err(e);
            }
        };
        match msg {
            Msg::Index {
                first,
                last,
                entries,
            } => {
                if first {
                    self.index_acc.clear();
                    self.index_open = true;
                }
                if !self.index_open {
                    self.stats.rejected += 1;
                    return Err(SummaryError::Malformed(
                        "index continuation without a start",
                    ));
                }
                if self.index_acc.len() + entries.len() > MAX_SEGMENTS
                    || self
                        .index_acc
                        .last()
                        .zip(entries.first())
                        .is_some_and(|(a, b)| a.seq >= b.seq)
                {
                    self.index_open = false;
                    self.index_acc.clear();
                    self.stats.rejected += 1;
                    return Err(SummaryError::Malformed("index too long or out of order"));
                }
                self.index_acc.extend(entries);
                if last {
                    self.index_open = false;
                    let entries = std::mem::take(&mut self.index_acc);
                    self.stats.peer_chunks = entries.iter().map(|e| u64::from(e.keys)).sum();
                    let wants = self.view.apply_index(&entries);
                    let index: BTreeMap<u32, SegInfo> =
                        entries.into_iter().map(|e| (e.seq, e)).collect();
                    // The same index again (a refresh) says nothing new about the marks: the
                    // chunks they stand for are not on the peer's disk yet.
                    if index != self.peer_index {
                        self.rotate_due = true;
                    }
                    self.peer_index = index;
                    self.queue = wants.into();
                }
            }
            Msg::Want { seq, from } => {
                if let Some(s) = &self.summarizer {
                    let answer = s.part(seq, from);
                    self.send(&answer, out);
                } else {
                    self.send(&Msg::Gone { seq }, out);
                }
            }
            Msg::Part(p) => {
                self.outstanding.remove(&p.seq);
                let seq = p.seq;
                match self.view.apply_decoded(&p, keys) {
                    Applied::Added => {
                        self.stats.parts += 1;
                        let upto = self.view.known_upto(seq);
                        if self.peer_index.get(&seq).is_some_and(|e| upto < e.len) {
                            self.queue.push_back((seq, upto));
                        }
                    }
                    Applied::Mismatch => {
                        if self.peer_index.contains_key(&seq) {
                            self.queue.push_back((seq, 0));
                        }
                    }
                    Applied::Stale => {}
                }
            }
            Msg::Gone { seq } => {
                self.outstanding.remove(&seq);
                self.peer_index.remove(&seq);
                self.view.drop_segment(seq);
            }
        }
        self.fill_window(now, out);
        self.maybe_rotate(now);
        Ok(())
    }

    /// Marks older than the latest index the peer's summaries now cover (or the peer no longer
    /// holds on disk): drop their generation.
    fn maybe_rotate(&mut self, now: Instant) {
        let due = self
            .rotated
            .is_none_or(|t| now.saturating_duration_since(t) >= ROTATE_MIN);
        if self.rotate_due && due && self.in_sync() {
            self.rotate_due = false;
            self.rotated = Some(now);
            self.view.rotate_marks();
        }
    }

    fn fill_window(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) {
        while self.outstanding.len() < WANT_WINDOW {
            let Some((seq, from)) = self.queue.pop_front() else {
                break;
            };
            if self.outstanding.contains_key(&seq) {
                continue;
            }
            self.outstanding.insert(seq, now);
            self.send(&Msg::Want { seq, from }, out);
        }
    }

    /// Periodic work: announce our store if it changed (at most every [`INDEX_INTERVAL`], at once
    /// after [`Reconciler::link_up`]), and ask again for parts whose answer was lost.
    pub fn poll(&mut self, now: Instant, out: &mut Vec<Vec<u8>>) {
        if let Some(s) = self.summarizer.clone() {
            let due = self.force_index || self.next_index.is_none_or(|t| now >= t);
            if due {
                let index = s.index();
                let stale = self
                    .index_sent
                    .is_none_or(|t| now.saturating_duration_since(t) >= INDEX_REFRESH);
                if self.force_index || stale || self.last_index.as_ref() != Some(&index) {
                    let n = index.len().div_ceil(MAX_INDEX_ENTRIES).max(1);
                    for (i, c) in index
                        .chunks(MAX_INDEX_ENTRIES)
                        .chain(index.is_empty().then_some(&[][..]))
                        .enumerate()
                    {
                        let m = Msg::Index {
                            first: i == 0,
                            last: i + 1 == n,
                            entries: c.to_vec(),
                        };
                        self.send(&m, out);
                    }
                    self.last_index = Some(index);
                    self.index_sent = Some(now);
                }
                self.force_index = false;
                self.next_index = Some(now + INDEX_INTERVAL);
            }
        }
        let lost: Vec<u32> = self
            .outstanding
            .iter()
            .filter(|(_, &t)| now.saturating_duration_since(t) >= WANT_TIMEOUT)
            .map(|(&s, _)| s)
            .collect();
        if self.outstanding.is_empty() && self.queue.is_empty() {
            self.view.settle();
        }
        self.maybe_rotate(now);
        for seq in lost {
            self.outstanding.remove(&seq);
            let upto = self.view.known_upto(seq);
            if self.peer_index.get(&seq).is_some_and(|e| upto < e.len) {
                self.queue.push_back((seq, upto));
            }
        }
        self.fill_window(now, out);
    }

    /// Whether every segment of the peer's latest INDEX is known to its announced length.
    pub fn in_sync(&self) -> bool {
        self.queue.is_empty()
            && self.outstanding.is_empty()
            && !self.peer_index.is_empty()
            && self
                .peer_index
                .values()
                .all(|e| self.view.known_upto(e.seq) >= e.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rice_round_trip_edges() {
        for keys in [
            vec![],
            vec![0],
            vec![(1 << FP_BITS) - 1],
            vec![0, 1, 2, 3],
            vec![5, 1 << 39, (1 << FP_BITS) - 1],
        ] {
            let (k, bits) = encode_keys(&keys);
            assert_eq!(decode_keys(keys.len() as u32, k, &bits).expect("ok"), keys);
        }
    }

    #[test]
    fn rice_size_near_the_bound() {
        let mut keys: Vec<u64> = (0..12_000u64)
            .map(|i| fp(&ChunkId::of(&i.to_le_bytes())))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        let (k, bits) = encode_keys(&keys);
        let per_key = bits.len() as f64 * 8.0 / keys.len() as f64;
        // 40 - log2(12000) = 26.4 bits of entropy per gap; Rice adds about 1.5.
        assert!(per_key < 29.0, "{per_key} bits per key (k = {k})");
    }

    #[test]
    fn messages_round_trip() {
        let (k, bits) = encode_keys(&[3, 9, 1000]);
        for m in [
            Msg::Index {
                first: true,
                last: false,
                entries: vec![
                    SegInfo {
                        seq: 1,
                        len: 10,
                        keys: 2,
                        fold: 7,
                    },
                    SegInfo {
                        seq: 4,
                        len: 1 << 33,
                        keys: 0,
                        fold: u64::MAX,
                    },
                ],
            },
            Msg::Want { seq: 9, from: 77 },
            Msg::Gone { seq: 3 },
            Msg::Part(Part {
                seq: 2,
                from: 5,
                to: 900,
                fold_before: 1,
                fold: 2,
                count: 3,
                k,
                bits,
            }),
        ] {
            assert_eq!(Msg::parse(&m.encode()).expect("ok"), m);
        }
    }

    #[test]
    fn bad_messages_are_refused() {
        let (k, bits) = encode_keys(&[3, 9, 1000]);
        let part = |count: u32, k: u8, bits: Vec<u8>| {
            Msg::Part(Part {
                seq: 2,
                from: 0,
                to: 10,
                fold_before: 0,
                fold: 0,
                count,
                k,
                bits,
            })
            .encode()
        };
        // More keys than coded, fewer, a stray byte, a bad parameter.
        assert!(Msg::parse(&part(4, k, bits.clone())).is_err());
        assert!(Msg::parse(&part(2, k, bits.clone())).is_err());
        let mut longer = bits.clone();
        longer.push(0);
        assert!(Msg::parse(&part(3, k, longer)).is_err());
        assert!(Msg::parse(&part(3, 45, bits.clone())).is_err());
        // A huge count with few bytes is refused before any allocation.
        assert!(Msg::parse(&part(u32::MAX, 0, bits)).is_err());
        assert!(Msg::parse(&[]).is_err());
        assert!(Msg::parse(&[9]).is_err());
        assert!(Msg::parse(&vec![T_GONE; MAX_MESSAGE + 1]).is_err());
        let mut idx = Msg::Index {
            first: true,
            last: true,
            entries: vec![
                SegInfo {
                    seq: 5,
                    len: 1,
                    keys: 1,
                    fold: 1,
                };
                2
            ],
        }
        .encode();
        assert!(Msg::parse(&idx).is_err(), "duplicate segments");
        idx.truncate(idx.len() - 1);
        assert!(Msg::parse(&idx).is_err());
    }
}
