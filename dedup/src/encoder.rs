//! The encoder: a byte stream in, a deduplicated, compressed data stream out.
//!
//! It cuts the stream into chunks and, for each chunk, emits a literal (the bytes, compressed per batch)
//! or a reference to a chunk it believes the peer holds. Chunks that followed each other before (by the
//! store's successor hints) are sent as one run op. Bytes of an incomplete chunk leave on `flush` as a
//! partial op, so an interactive client never waits for a chunk boundary.
//!
//! The encoder keeps the stream bytes of every batch until the decoder acknowledges it, so it can answer
//! a request (`NEED`) for any op the decoder could not resolve; this is what makes correctness independent
//! of what the two stores hold.

use crate::chunker::Chunker;
use crate::compress::{
    delta_compress, put_literals, trimmed_delta_compress, TrimmedDelta, ZSTD_FRAME_MAGIC,
};
use crate::config::EngineConfig;
use crate::fingerprint::ChunkId;
use crate::peer::PeerView;
use crate::store::ChunkStore;
use crate::wire::{self, put_varint, MessageReader, Reader, WireError};
use std::collections::VecDeque;
use std::sync::Arc;

/// Counters of one encoder. Wire bytes are all bytes handed to the caller, including headers and fills.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncoderStats {
    /// Stream bytes written by the caller.
    pub input_bytes: u64,
    /// Encoded bytes produced (data stream, including fills).
    pub output_bytes: u64,
    /// Stream bytes sent as references or runs instead of literals (and what deltas saved).
    pub dedup_saved_bytes: u64,
    /// Literal bytes minus their compressed size.
    pub compression_saved_bytes: u64,
    /// Stream bytes sent as literals.
    pub literal_bytes: u64,
    pub chunks: u64,
    pub chunks_deduped: u64,
    /// New chunks sent as a delta against a similar chunk the peer holds.
    pub delta_chunks: u64,
    /// Chunks sent as literals, reference ops, run ops.
    pub literal_chunks: u64,
    pub ref_ops: u64,
    pub run_ops: u64,
    pub batches: u64,
    /// Ops the decoder asked for again, and the stream bytes sent to answer them.
    pub needs_received: u64,
    pub fill_bytes: u64,
    /// Chunks that could not be stored locally (store errors); they are still sent.
    pub store_errors: u64,
}

/// Literal bytes that close the second batch of a stream; later batches double up to the
/// configured limit. The first batch holds the first chunk alone: the decoder delivers nothing of
/// a batch before all of it arrived, so a small first batch is a stream's first bytes early (see
/// [`Encoder::first_unit`]).
const SECOND_BATCH_LITERALS: usize = 8 * 1024;

/// Least zstd level of a delta. An edited chunk is long matches into its base with short edits
/// between them, and level 3's match finder misses many of the matches right after an edit that
/// level 6's lazy search finds (BENCHMARKS.md, "Edited chunks"); higher levels saved at most 5%
/// more, at up to four times the time.
const DELTA_MIN_LEVEL: i32 = 6;

/// What one op of a retained batch stands for.
#[derive(Clone, Copy, Debug)]
struct OpSpan {
    kind: u8,
    start: u32,
    end: u32,
    /// The referenced chunk (REF, PARTREF) or the first one of a run.
    id: ChunkId,
}

/// A sent batch, kept until acknowledged.
#[derive(Debug)]
struct Retained {
    seq: u64,
    raw: Vec<u8>,
    ops: Vec<OpSpan>,
}

/// A run being built: chunks each of which was the successor of the one before, or an edited copy
/// of that successor (an edit, with `edited_runs`).
struct Run {
    /// The chunk the walk starts from (the base of an edit at index 0).
    first: ChunkId,
    /// The successor hint of the last chunk walked (of an edit's base), read when it was looked up.
    next: Option<ChunkId>,
    count: u32,
    /// The digest of the ids of the chunks the run stands for (an edit's own id, not its base's;
    /// boxed: a hasher is 1.9 KiB, see `State::spare_digest`).
    digest: Box<blake3::Hasher>,
    start: usize,
    edits: Vec<Edit>,
}

/// An edited chunk inside a run: the `index`th chunk of the run as a trimmed delta against the
/// chunk the walk reaches there.
struct Edit {
    index: u32,
    raw_len: usize,
    delta: TrimmedDelta,
}

/// Everything but the chunker (split so the chunker's callback can borrow it).
struct State {
    store: Arc<ChunkStore>,
    view: Arc<PeerView>,
    cfg: EngineConfig,
    /// Bytes at the front of the open chunk already sent by PART/PARTREF ops.
    sent_prefix: usize,
    prev: Option<ChunkId>,
    /// The chunk of the earlier stream that `prev` corresponds to (itself if it was sent as a reference,
    /// its base if sent as a delta): its successor is the best base for a delta of the next chunk.
    prev_old: Option<ChunkId>,
    hints: crate::hints::Hints,
    /// Hints of the open run's chunks once it holds an edit, recorded when it closes (see
    /// `record_hint`).
    deferred_hints: Vec<(ChunkId, ChunkId, bool)>,
    // The batch being built.
    ops: Vec<u8>,
    spans: Vec<OpSpan>,
    lits: Vec<u8>,
    raw: Vec<u8>,
    run: Option<Run>,
    /// The last closed run's digest, for the next run: allocated at a stream's first run and
    /// dropped when its client pauses (an idle flow keeps no hasher).
    spare_digest: Option<Box<blake3::Hasher>>,
    next_seq: u64,
    retained: VecDeque<Retained>,
    retained_bytes: usize,
    header_sent: bool,
    /// Encoded bytes up to the end of the first batch (0 until it is emitted).
    first_unit: usize,
    stats: EncoderStats,
    scratch: Vec<u8>,
}

/// Encodes one direction of one stream. Feed it with `write`, `flush` when the source goes quiet,
/// `finish` at its end, and pass it the decoder's feedback stream.
pub struct Encoder {
    chunker: Chunker,
    st: State,
    feedback: MessageReader,
}

/// Work buffer capacity an encoder keeps across a pause of its client.
const IDLE_BUFFER: usize = 256;

impl Encoder {
    /// An encoder sending to the peer described by `view`, using `store` to remember what it sends.
    pub fn new(store: Arc<ChunkStore>, view: Arc<PeerView>, cfg: EngineConfig) -> Encoder {
        Encoder {
            chunker: Chunker::new(cfg.chunking),
            st: State {
                store,
                view,
                cfg,
                sent_prefix: 0,
                prev: None,
                prev_old: None,
                hints: Default::default(),
                deferred_hints: Vec::new(),
                ops: Vec::new(),
                spans: Vec::new(),
                lits: Vec::new(),
                raw: Vec::new(),
                run: None,
                spare_digest: None,
                next_seq: 0,
                retained: VecDeque::new(),
                retained_bytes: 0,
                header_sent: false,
                first_unit: 0,
                stats: EncoderStats::default(),
                scratch: Vec::new(),
            },
            feedback: MessageReader::default(),
        }
    }

    /// Encodes `data`, appending whatever is ready to `out` (often nothing until a batch fills).
    pub fn write(&mut self, data: &[u8], out: &mut Vec<u8>) {
        let st = &mut self.st;
        st.stats.input_bytes += data.len() as u64;
        let before = out.len();
        self.chunker.push(data, |chunk| st.on_chunk(chunk, out));
        st.stats.output_bytes += (out.len() - before) as u64;
    }

    /// Sends everything written so far, including the bytes of the open chunk, without ending it.
    pub fn flush(&mut self, out: &mut Vec<u8>) {
        let before = out.len();
        self.st.flush_partial(self.chunker.pending());
        self.st.emit_batch(out);
        self.st.stats.output_bytes += (out.len() - before) as u64;
        // The client paused: a flow that waits (or is held through an outage) keeps no work
        // buffers sized for its last burst.
        for v in [&mut self.st.ops, &mut self.st.lits, &mut self.st.scratch] {
            if v.capacity() > IDLE_BUFFER {
                *v = Vec::new();
            }
        }
        self.st.spare_digest = None;
    }

    /// Ends the stream: the open chunk becomes a chunk and everything is sent.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let before = out.len();
        let st = &mut self.st;
        self.chunker.finish(|chunk| st.on_chunk(chunk, out));
        st.emit_batch(out);
        st.stats.output_bytes += (out.len() - before) as u64;
    }

    /// Takes bytes of the decoder's feedback stream (any split). Answers to its requests are appended to
    /// `out`. An error means the feedback stream is corrupt: end the stream.
    pub fn feedback(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(), WireError> {
        self.feedback.extend(input);
        let before = out.len();
        let r = self.handle_feedback(out);
        self.st.stats.output_bytes += (out.len() - before) as u64;
        r
    }

    fn handle_feedback(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        while let Some((ty, body)) = self.feedback.next_message(wire::KIND_FEEDBACK)? {
            let mut r = Reader::new(&body);
            match ty {
                wire::MSG_ACK => {
                    let delivered = r.varint("ack")?;
                    if delivered > self.st.next_seq {
                        return Err(WireError::Malformed("ack of a batch never sent"));
                    }
                    while self.st.retained.front().is_some_and(|b| b.seq < delivered) {
                        if let Some(b) = self.st.retained.pop_front() {
                            self.st.retained_bytes -= b.raw.len();
                        }
                    }
                }
                wire::MSG_NEED => {
                    let seq = r.varint("need seq")?;
                    let n = r.bounded("need count", wire::MAX_OPS as u64)?;
                    for _ in 0..n {
                        let op = r.varint("need op")?;
                        self.st.answer_need(seq, op, out)?;
                    }
                }
                other => return Err(WireError::UnknownMessage(other)),
            }
            if !r.is_empty() {
                return Err(WireError::Malformed("trailing bytes in feedback message"));
            }
        }
        Ok(())
    }

    /// Stream bytes kept for possible requests. Stop feeding the encoder while this is above your limit:
    /// it falls when the decoder's acknowledgements arrive.
    pub fn retained_bytes(&self) -> usize {
        self.st.retained_bytes
    }

    /// Bytes written but not yet sent (the open chunk's unsent tail and the batch being built).
    pub fn unflushed_bytes(&self) -> usize {
        self.st.raw.len() + self.chunker.pending().len() - self.st.sent_prefix
    }

    pub fn stats(&self) -> EncoderStats {
        self.st.stats
    }

    /// The encoded bytes from the start of the stream to the end of its first batch (the stream
    /// header included): the first thing the decoder can deliver from. 0 until that batch is out.
    /// A tunnel serving a burst of new streams sends each one's first unit in one turn.
    pub fn first_unit(&self) -> usize {
        self.st.first_unit
    }
}

impl State {
    fn push_op(&mut self, kind: u8, start: usize, id: ChunkId) {
        self.spans.push(OpSpan {
            kind,
            start: start as u32,
            end: self.raw.len() as u32,
            id,
        });
    }

    fn on_chunk(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        let id = ChunkId::of(chunk);
        self.stats.chunks += 1;
        if self.sent_prefix >= chunk.len() {
            // A flush sent this whole chunk already (a boundary can fall just before the end of what was
            // flushed, at a position the scan could only judge once the next byte arrived). Tell the
            // decoder where the chunk ends; the rest of what it holds starts the next chunk.
            self.close_run();
            self.ops.push(wire::OP_CUT);
            put_varint(&mut self.ops, chunk.len() as u64);
            self.push_op(wire::OP_CUT, self.raw.len(), id);
            self.remember_sent(&id, chunk);
            if let Some(prev) = self.prev {
                self.hints.record(&self.store, &prev, &id, false);
            }
            self.prev = Some(id);
            self.prev_old = None;
            self.sent_prefix -= chunk.len();
            self.maybe_emit(out);
            return;
        }
        let fresh = &chunk[self.sent_prefix..];
        let found = self.store.lookup(&id);
        let known = self.view.knows(&id);
        let successor = found.and_then(|(_, next)| next);
        let start = self.raw.len();
        let mut old = known.then_some(id);
        if known && self.sent_prefix == 0 {
            self.stats.chunks_deduped += 1;
            let extends = match &self.run {
                Some(run) => run.count < self.cfg.max_run && run.next == Some(id),
                None => false,
            };
            if extends {
                if let Some(run) = &mut self.run {
                    run.count += 1;
                    run.next = successor;
                    run.digest.update(id.as_bytes());
                }
                self.raw.extend_from_slice(fresh);
                if let Some(prev) = self.prev {
                    // The successor hint already says exactly this, unless `prev` was an edit.
                    let known_equal = self.prev_old == self.prev;
                    self.record_hint(prev, id, known_equal);
                }
                self.prev = Some(id);
                self.prev_old = Some(id);
                self.sent_prefix = 0;
                self.maybe_emit(out);
                return;
            } else {
                self.close_run();
                let mut digest = self.take_digest();
                digest.update(id.as_bytes());
                self.run = Some(Run {
                    first: id,
                    next: successor,
                    count: 1,
                    digest,
                    start,
                    edits: Vec::new(),
                });
            }
            self.raw.extend_from_slice(fresh);
        } else {
            let delta = if known {
                None
            } else {
                self.try_delta(chunk, &id)
            };
            let delta = match delta {
                Some((base, delta)) if self.cfg.edited_runs => {
                    self.stats.delta_chunks += 1;
                    self.stats.dedup_saved_bytes += (chunk.len() - delta.payload.len()) as u64;
                    self.add_edit(base, id, chunk.len(), delta);
                    self.raw.extend_from_slice(fresh);
                    self.remember_sent(&id, chunk);
                    if let Some(prev) = self.prev {
                        self.record_hint(prev, id, false);
                    }
                    self.prev = Some(id);
                    self.prev_old = Some(base);
                    self.maybe_emit(out);
                    return;
                }
                other => other,
            };
            self.close_run();
            self.raw.extend_from_slice(fresh);
            if known {
                self.stats.chunks_deduped += 1;
                self.stats.dedup_saved_bytes += fresh.len() as u64;
                self.ops.push(wire::OP_REF);
                self.ops.extend_from_slice(id.as_bytes());
                self.push_op(wire::OP_REF, start, id);
            } else if let Some((base, delta)) = delta {
                if self.cfg.trimmed_deltas {
                    self.put_tdelta(&base, chunk.len(), &delta);
                } else {
                    self.ops.push(wire::OP_DELTA);
                    self.ops.extend_from_slice(base.as_bytes());
                    put_varint(&mut self.ops, chunk.len() as u64);
                    put_varint(&mut self.ops, delta.payload.len() as u64);
                    self.ops.extend_from_slice(&delta.payload);
                }
                let payload = delta.payload;
                self.stats.delta_chunks += 1;
                self.stats.dedup_saved_bytes += (chunk.len() - payload.len()) as u64;
                self.push_op(wire::OP_DELTA, start, base);
                self.remember_sent(&id, chunk);
                old = Some(base);
            } else {
                self.ops.push(wire::OP_LIT);
                self.stats.literal_chunks += 1;
                put_varint(&mut self.ops, fresh.len() as u64);
                self.lits.extend_from_slice(fresh);
                self.stats.literal_bytes += fresh.len() as u64;
                self.push_op(wire::OP_LIT, start, id);
                self.remember_sent(&id, chunk);
            }
        }
        if let Some(prev) = self.prev {
            self.record_hint(prev, id, false);
        }
        self.prev = Some(id);
        self.prev_old = old;
        self.sent_prefix = 0;
        self.maybe_emit(out);
    }

    /// A new chunk is often an edited copy of the chunk that stood at its place in an earlier stream:
    /// the successor of the previous chunk's counterpart. If the peer holds that chunk, send the new one
    /// as a zstd delta against it when that is much smaller: trimmed to the bytes between the first
    /// and the last edit when the peer knows TDELTA, else whole (head and tail 0).
    fn try_delta(&mut self, chunk: &[u8], id: &ChunkId) -> Option<(ChunkId, TrimmedDelta)> {
        if self.sent_prefix != 0 || self.cfg.zstd_level == 0 {
            return None;
        }
        let base = self
            .prev_old
            .and_then(|o| self.store.successor(&o))
            .or_else(|| self.prev.and_then(|p| self.store.successor(&p)))
            .filter(|b| b != id && self.view.knows(b))?;
        self.scratch.clear();
        if !self.store.get_into(&base, &mut self.scratch) {
            return None;
        }
        let level = self.cfg.zstd_level.max(DELTA_MIN_LEVEL);
        let delta = if self.cfg.trimmed_deltas {
            trimmed_delta_compress(&self.scratch, chunk, level)?
        } else {
            TrimmedDelta {
                head: 0,
                tail: 0,
                payload: delta_compress(&self.scratch, chunk, level)?,
            }
        };
        (delta.payload.len() < chunk.len() / 4).then_some((base, delta))
    }

    /// The peer stores every chunk it completes from bytes we sent: store it too, and remember that the
    /// peer now holds it.
    fn remember_sent(&mut self, id: &ChunkId, chunk: &[u8]) {
        if self.store.insert(id, chunk).is_err() {
            self.stats.store_errors += 1;
        }
        self.view.believe(id);
    }

    fn maybe_emit(&mut self, out: &mut Vec<u8>) {
        // The decoder outputs nothing of a batch before all of it arrived: start a stream with small
        // batches (the first chunk alone, then 8 KiB of literals), so its first bytes leave early
        // even on a slow link, and double up to the limit.
        let ramp = (SECOND_BATCH_LITERALS << self.stats.batches.min(16)) / 2;
        if self.stats.batches == 0
            || self.lits.len() >= self.cfg.batch_literal_bytes.min(ramp)
            || self.raw.len() >= self.cfg.batch_stream_bytes
            || self.spans.len() >= wire::MAX_OPS - 2
        {
            self.emit_batch(out);
        }
    }

    /// A cleared hasher for a new run's digest: the last closed run's, or a new one.
    fn take_digest(&mut self) -> Box<blake3::Hasher> {
        let mut digest = self
            .spare_digest
            .take()
            .unwrap_or_else(|| Box::new(blake3::Hasher::new()));
        digest.reset();
        digest
    }

    /// Adds an edited chunk (`id`, a delta against `base`) to the open run if `base` is where the
    /// run's walk goes next, else starts a run with it. (`edited_runs` only.)
    fn add_edit(&mut self, base: ChunkId, id: ChunkId, raw_len: usize, delta: TrimmedDelta) {
        let joins = match &self.run {
            Some(run) => run.count < self.cfg.max_run && run.next == Some(base),
            None => false,
        };
        if !joins {
            self.close_run();
            let digest = self.take_digest();
            self.run = Some(Run {
                first: base,
                next: None,
                count: 0,
                digest,
                start: self.raw.len(),
                edits: Vec::new(),
            });
        }
        let next = self.store.successor(&base);
        if let Some(run) = &mut self.run {
            run.edits.push(Edit {
                index: run.count,
                raw_len,
                delta,
            });
            run.count += 1;
            run.next = next;
            run.digest.update(id.as_bytes());
        }
    }

    /// Records that `next` followed `prev`, unless a run is open: then when it closes. The decoder
    /// walks a run's hints before it records any of the run's own, so the encoder must not see
    /// them either while it builds the run. In a stream that repeats itself a run can walk through
    /// the chunk before its first again (whose hint its first chunk rewrote), or through a chunk
    /// before an edit (whose hint the edit rewrote).
    fn record_hint(&mut self, prev: ChunkId, next: ChunkId, known_equal: bool) {
        if self.run.is_some() {
            self.deferred_hints.push((prev, next, known_equal));
        } else {
            self.hints.record(&self.store, &prev, &next, known_equal);
        }
    }

    fn close_run(&mut self) {
        let Some(run) = self.run.take() else { return };
        if run.edits.is_empty() {
            self.close_plain_run(run);
        } else {
            self.close_edited_run(run);
        }
        let mut deferred = std::mem::take(&mut self.deferred_hints);
        for (prev, next, known_equal) in deferred.drain(..) {
            self.hints.record(&self.store, &prev, &next, known_equal);
        }
        self.deferred_hints = deferred;
    }

    /// Writes a run without edits: a REF if it is one chunk, else a RUN.
    fn close_plain_run(&mut self, run: Run) {
        let len = (self.raw.len() - run.start) as u64;
        self.stats.dedup_saved_bytes += len;
        if run.count == 1 {
            self.stats.ref_ops += 1;
            self.ops.push(wire::OP_REF);
            self.ops.extend_from_slice(run.first.as_bytes());
            self.push_op(wire::OP_REF, run.start, run.first);
        } else {
            self.stats.run_ops += 1;
            self.ops.push(wire::OP_RUN);
            put_varint(&mut self.ops, u64::from(run.count));
            self.ops.extend_from_slice(run.first.as_bytes());
            self.ops
                .extend_from_slice(&run.digest.finalize().as_bytes()[..crate::CHUNK_ID_LEN]);
            self.push_op(wire::OP_RUN, run.start, run.first);
        }
        self.spare_digest = Some(run.digest);
    }

    /// Writes a run with edits: a TDELTA if the run is that one edit, else an ERUN. (Its chunks were
    /// counted as references or deltas as they were added.)
    fn close_edited_run(&mut self, mut run: Run) {
        let edited: usize = run.edits.iter().map(|e| e.raw_len).sum();
        self.stats.dedup_saved_bytes += (self.raw.len() - run.start - edited) as u64;
        if run.count == 1 {
            if let Some(edit) = run.edits.pop() {
                self.put_tdelta(&run.first, edit.raw_len, &edit.delta);
                self.push_op(wire::OP_DELTA, run.start, run.first);
            }
        } else {
            self.stats.run_ops += 1;
            self.ops.push(wire::OP_ERUN);
            put_varint(&mut self.ops, u64::from(run.count));
            self.ops.extend_from_slice(run.first.as_bytes());
            self.ops
                .extend_from_slice(&run.digest.finalize().as_bytes()[..crate::CHUNK_ID_LEN]);
            put_varint(&mut self.ops, run.edits.len() as u64);
            let mut at = 0;
            for edit in &run.edits {
                put_varint(&mut self.ops, u64::from(edit.index - at));
                at = edit.index + 1;
                // Without the frame's magic number. (zstd always writes it; were it missing, the
                // decoder's check of the run's digest would fail and the run be resent.)
                let payload = &edit.delta.payload;
                let frame = payload.strip_prefix(&ZSTD_FRAME_MAGIC).unwrap_or(payload);
                self.put_edit(edit.raw_len, edit.delta.head, edit.delta.tail, frame);
            }
            self.push_op(wire::OP_RUN, run.start, run.first);
        }
        self.spare_digest = Some(run.digest);
    }

    /// A TDELTA op's fields after its base (an ERUN's edit's after its gap): the chunk's length,
    /// its ends and the payload.
    fn put_edit(&mut self, raw_len: usize, head: usize, tail: usize, payload: &[u8]) {
        put_varint(&mut self.ops, raw_len as u64);
        put_varint(&mut self.ops, head as u64);
        put_varint(&mut self.ops, tail as u64);
        put_varint(&mut self.ops, payload.len() as u64);
        self.ops.extend_from_slice(payload);
    }

    fn put_tdelta(&mut self, base: &ChunkId, raw_len: usize, delta: &TrimmedDelta) {
        self.ops.push(wire::OP_TDELTA);
        self.ops.extend_from_slice(base.as_bytes());
        self.put_edit(raw_len, delta.head, delta.tail, &delta.payload);
    }

    /// Sends the unsent tail of the open chunk as a partial op: a reference to the chunk that followed
    /// the previous one last time, if the tail is a prefix of it, else literal bytes.
    fn flush_partial(&mut self, pending: &[u8]) {
        if pending.len() <= self.sent_prefix {
            return;
        }
        self.close_run();
        let fresh_len = pending.len() - self.sent_prefix;
        let start = self.raw.len();
        self.raw.extend_from_slice(&pending[self.sent_prefix..]);
        let predicted = self
            .prev
            .and_then(|p| self.store.successor(&p))
            .filter(|next| {
                self.view.knows(next) && {
                    self.scratch.clear();
                    self.store.get_into(next, &mut self.scratch)
                        && self.scratch.starts_with(pending)
                }
            });
        match predicted {
            Some(next) => {
                self.ops.push(wire::OP_PARTREF);
                self.ops.extend_from_slice(next.as_bytes());
                put_varint(&mut self.ops, fresh_len as u64);
                self.stats.dedup_saved_bytes += fresh_len as u64;
                self.push_op(wire::OP_PARTREF, start, next);
            }
            None => {
                self.ops.push(wire::OP_PART);
                put_varint(&mut self.ops, fresh_len as u64);
                self.lits.extend_from_slice(&pending[self.sent_prefix..]);
                self.stats.literal_bytes += fresh_len as u64;
                self.push_op(wire::OP_PART, start, ChunkId::default());
            }
        }
        self.sent_prefix = pending.len();
    }

    fn put_header(&mut self, out: &mut Vec<u8>) {
        if !self.header_sent {
            wire::put_header(out, wire::KIND_DATA);
            self.header_sent = true;
        }
    }

    /// Sends the batch being built (if it holds anything) and keeps its stream bytes until acknowledged.
    fn emit_batch(&mut self, out: &mut Vec<u8>) {
        self.close_run();
        if self.spans.is_empty() {
            return;
        }
        let start = out.len();
        self.put_header(out);
        let mut body = Vec::with_capacity(self.ops.len() + self.lits.len() / 2 + 16);
        put_varint(&mut body, self.spans.len() as u64);
        body.extend_from_slice(&self.ops);
        let payload = put_literals(&mut body, &self.lits, self.cfg.zstd_level);
        self.stats.compression_saved_bytes +=
            (self.lits.len() as u64).saturating_sub(payload as u64);
        wire::put_message(out, wire::MSG_BATCH, &body);
        if self.stats.batches == 0 {
            self.first_unit = out.len() - start;
        }
        self.stats.batches += 1;
        self.ops.clear();
        self.lits.clear();
        let mut raw = std::mem::take(&mut self.raw);
        // Kept until acknowledged, and counted by its length: it holds no more than that.
        raw.shrink_to_fit();
        self.retained_bytes += raw.len();
        self.retained.push_back(Retained {
            seq: self.next_seq,
            raw,
            ops: std::mem::take(&mut self.spans),
        });
        self.next_seq += 1;
    }

    /// Answers a request for op `op` of batch `seq` with the stream bytes that op stood for.
    fn answer_need(&mut self, seq: u64, op: u64, out: &mut Vec<u8>) -> Result<(), WireError> {
        let batch = self
            .retained
            .front()
            .and_then(|f| seq.checked_sub(f.seq))
            .and_then(|i| self.retained.get(i as usize))
            .ok_or(WireError::UnknownNeed { seq, op })?;
        let span = *batch
            .ops
            .get(op as usize)
            .ok_or(WireError::UnknownNeed { seq, op })?;
        let bytes = &batch.raw[span.start as usize..span.end as usize];
        let mut body = Vec::with_capacity(bytes.len() / 2 + 32);
        put_varint(&mut body, seq);
        put_varint(&mut body, op);
        // The peer lacked what we thought it held: correct our belief so the next copy goes as bytes.
        let forget = |id: &ChunkId| self.view.forget(id);
        match span.kind {
            wire::OP_RUN => {
                let lens = crate::chunker::chunk_all(self.cfg.chunking, bytes);
                put_varint(&mut body, lens.len() as u64);
                let mut pos = 0;
                for len in lens {
                    put_varint(&mut body, len as u64);
                    forget(&ChunkId::of(&bytes[pos..pos + len]));
                    pos += len;
                }
            }
            wire::OP_REF | wire::OP_PARTREF | wire::OP_DELTA => {
                forget(&span.id);
                put_varint(&mut body, 0);
            }
            // Literal ops carry their bytes already; a request for one is a confused peer.
            _ => return Err(WireError::UnknownNeed { seq, op }),
        }
        put_literals(&mut body, bytes, self.cfg.zstd_level);
        wire::put_message(out, wire::MSG_FILL, &body);
        self.stats.needs_received += 1;
        self.stats.fill_bytes += bytes.len() as u64;
        Ok(())
    }
}
