//! The decoder: a data stream in, the original bytes out, plus a feedback stream back to the encoder.
//!
//! Ops are resolved strictly in order. A reference is resolved from the local store (whose disk reads
//! are verified against the fingerprint); a run is resolved by following the store's successor hints
//! and accepted only if the digest of the chunk ids it found equals the one the encoder sent. Whatever
//! cannot be resolved is requested (`NEED`) and the stream waits for the encoder's `FILL`, which carries
//! the very bytes the op stood for. So the decoder never guesses: every byte it outputs is a literal from
//! the peer, a chunk whose fingerprint was checked, or bytes the encoder resent.
//!
//! Memory is bounded: at most one batch's literals are decompressed at a time, output pauses while
//! `max_output_buffer` bytes wait to be read, and queued input is bounded by the caller's flow control
//! (and by `max_queued_bytes` as a backstop).

use crate::compress::{delta_apply, get_literals, ZSTD_FRAME_MAGIC};
use crate::config::EngineConfig;
use crate::fingerprint::{ChunkId, CHUNK_ID_LEN};
use crate::peer::PeerView;
use crate::store::ChunkStore;
use crate::wire::{self, put_varint, MessageReader, Reader, WireError};
use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

/// Counters of one decoder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecoderStats {
    /// Encoded bytes received.
    pub input_bytes: u64,
    /// Decoded bytes handed to the caller.
    pub output_bytes: u64,
    /// Ops requested from the encoder, and the stream bytes received to answer them.
    pub needs_sent: u64,
    pub fill_bytes: u64,
    /// Runs whose successor walk did not match the encoder's digest.
    pub run_mismatches: u64,
    /// Chunks that could not be stored (store errors); delivery is unaffected.
    pub store_errors: u64,
    pub chunks_stored: u64,
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Lit(u32),
    Part(u32),
    Ref(ChunkId),
    PartRef(ChunkId, u32),
    /// `count` chunks from `first` on, following successor hints, some of them replaced by the
    /// edits `edits` of the batch's edit table (an ERUN; an empty range for a RUN). `digest` is
    /// over the ids of the chunks output, edits included.
    Run {
        count: u32,
        first: ChunkId,
        digest: [u8; CHUNK_ID_LEN],
        edits: (u32, u32),
    },
    Cut(u32),
    /// A new chunk as a zstd delta against `base`, keeping the base's first `head` and last `tail`
    /// bytes (both 0 for a DELTA); the payload is `deltas[start..start + len]`.
    Delta {
        base: ChunkId,
        raw_len: u32,
        head: u32,
        tail: u32,
        start: u32,
        len: u32,
    },
}

/// An edited chunk of an ERUN: the run's `index`th chunk as a trimmed delta against the chunk the
/// walk reaches there; the payload is `deltas[start..start + len]`.
#[derive(Clone, Copy, Debug)]
struct Edit {
    index: u32,
    raw_len: u32,
    head: u32,
    tail: u32,
    start: u32,
    len: u32,
}

/// Bytes resent by the encoder for one op.
struct Fill {
    lens: Vec<u32>,
    data: Vec<u8>,
}

struct Batch {
    seq: u64,
    ops: Vec<Op>,
    /// The literal section, still compressed until the batch reaches the head of the queue.
    literals: Vec<u8>,
    /// Payloads of the batch's delta ops and edits.
    deltas: Vec<u8>,
    /// The edits of the batch's ERUN ops.
    edits: Vec<Edit>,
    decoded: Option<Vec<u8>>,
    lit_pos: usize,
    next_op: usize,
    /// Bytes of `ops[next_op]` already output (runs are output chunk by chunk).
    op_done: usize,
    /// The chunk ids of the run at `next_op`, once its walk matched, and how many are output.
    run_ids: Option<Vec<ChunkId>>,
    run_done: usize,
    /// The rebuilt edited chunks of that run not yet output, by index in the run.
    run_edits: VecDeque<(u32, Vec<u8>)>,
    needed: BTreeSet<u32>,
    fills: HashMap<u32, Fill>,
    encoded_len: usize,
}

/// Decodes one direction of one stream.
pub struct Decoder {
    store: Arc<ChunkStore>,
    view: Arc<PeerView>,
    cfg: EngineConfig,
    reader: MessageReader,
    queue: VecDeque<Batch>,
    queued_bytes: usize,
    next_seq: u64,
    delivered: u64,
    acked: u64,
    /// Requests not yet written to the feedback stream, by batch.
    pending_needs: Vec<(u64, u32)>,
    output: Vec<u8>,
    /// Bytes of the open chunk output so far (by PART and PARTREF ops).
    prefix: Vec<u8>,
    prev: Option<ChunkId>,
    hints: crate::hints::Hints,
    feedback_header_sent: bool,
    failed: Option<WireError>,
    stats: DecoderStats,
    /// Backstop on queued encoded input when the caller's flow control fails.
    pub max_queued_bytes: usize,
}

enum Step {
    /// The op is done.
    Done,
    /// Output is full; come back after `read`.
    Paused,
    /// Waiting for a fill.
    Stalled,
}

impl Decoder {
    pub fn new(store: Arc<ChunkStore>, view: Arc<PeerView>, cfg: EngineConfig) -> Decoder {
        Decoder {
            store,
            view,
            cfg,
            reader: MessageReader::default(),
            queue: VecDeque::new(),
            queued_bytes: 0,
            next_seq: 0,
            delivered: 0,
            acked: 0,
            pending_needs: Vec::new(),
            output: Vec::new(),
            prefix: Vec::new(),
            prev: None,
            hints: Default::default(),
            feedback_header_sent: false,
            failed: None,
            stats: DecoderStats::default(),
            max_queued_bytes: 256 << 20,
        }
    }

    /// Takes bytes of the encoder's data stream, in any split. An error is final: the stream is corrupt
    /// or hostile and must be reset; bytes already output were correct.
    pub fn receive(&mut self, input: &[u8]) -> Result<(), WireError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.stats.input_bytes += input.len() as u64;
        self.reader.extend(input);
        let r = self.parse_and_pump();
        if let Err(e) = &r {
            self.failed = Some(e.clone());
        }
        r
    }

    fn parse_and_pump(&mut self) -> Result<(), WireError> {
        while let Some((ty, body)) = self.reader.next_message(wire::KIND_DATA)? {
            match ty {
                wire::MSG_BATCH => self.accept_batch(body)?,
                wire::MSG_FILL => self.accept_fill(&body)?,
                other => return Err(WireError::UnknownMessage(other)),
            }
        }
        self.pump()
    }

    /// Moves decoded bytes to `out`, then decodes more if it was paused on a full output buffer.
    pub fn read(&mut self, out: &mut Vec<u8>) -> Result<(), WireError> {
        self.stats.output_bytes += self.output.len() as u64;
        if out.is_empty() {
            std::mem::swap(out, &mut self.output);
        } else {
            out.append(&mut self.output);
        }
        if self.failed.is_none() {
            if let Err(e) = self.pump() {
                self.failed = Some(e.clone());
                return Err(e);
            }
        }
        Ok(())
    }

    /// Decoded bytes waiting to be read.
    pub fn readable(&self) -> usize {
        self.output.len()
    }

    /// Appends the feedback stream's next bytes (acknowledgements and requests) to `out`.
    pub fn feedback(&mut self, out: &mut Vec<u8>) {
        if self.delivered == self.acked && self.pending_needs.is_empty() {
            return;
        }
        if !self.feedback_header_sent {
            wire::put_header(out, wire::KIND_FEEDBACK);
            self.feedback_header_sent = true;
        }
        let mut needs = std::mem::take(&mut self.pending_needs);
        needs.sort_unstable();
        for group in needs.chunk_by(|a, b| a.0 == b.0) {
            let mut body = Vec::with_capacity(8 + group.len() * 3);
            put_varint(&mut body, group[0].0);
            put_varint(&mut body, group.len() as u64);
            for &(_, op) in group {
                put_varint(&mut body, u64::from(op));
            }
            wire::put_message(out, wire::MSG_NEED, &body);
        }
        if self.delivered > self.acked {
            let mut body = Vec::with_capacity(10);
            put_varint(&mut body, self.delivered);
            wire::put_message(out, wire::MSG_ACK, &body);
            self.acked = self.delivered;
        }
    }

    /// True when nothing waits: every received op has been output (it may still wait to be read).
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty()
    }

    /// True while some op waits for bytes from the encoder.
    pub fn is_stalled(&self) -> bool {
        self.queue.front().is_some_and(|b| !b.needed.is_empty())
    }

    /// Encoded bytes received and not yet fully decoded.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes + self.reader.buffered()
    }

    pub fn stats(&self) -> DecoderStats {
        self.stats
    }

    fn accept_batch(&mut self, body: Vec<u8>) -> Result<(), WireError> {
        let mut r = Reader::new(&body);
        let n = r.bounded("op count", wire::MAX_OPS as u64)? as usize;
        if n == 0 {
            return Err(WireError::Malformed("empty batch"));
        }
        let mut ops = Vec::with_capacity(n);
        let mut deltas = Vec::new();
        let mut edits = Vec::new();
        let mut lit_total: u64 = 0;
        for _ in 0..n {
            let tag = r.u8("op tag")?;
            let op = match tag {
                wire::OP_LIT | wire::OP_PART => {
                    let len = r.bounded("literal op length", wire::MAX_CHUNK as u64)?;
                    lit_total += len;
                    if tag == wire::OP_LIT {
                        Op::Lit(len as u32)
                    } else {
                        Op::Part(len as u32)
                    }
                }
                wire::OP_REF => Op::Ref(r.id()?),
                wire::OP_PARTREF => {
                    let id = r.id()?;
                    let len = r.bounded("partial reference length", wire::MAX_CHUNK as u64)?;
                    Op::PartRef(id, len as u32)
                }
                wire::OP_RUN => {
                    let (count, first, digest) = read_run_head(&mut r)?;
                    Op::Run {
                        count,
                        first,
                        digest,
                        edits: (0, 0),
                    }
                }
                wire::OP_ERUN => {
                    let (count, first, digest) = read_run_head(&mut r)?;
                    let n = r.bounded("run edit count", count.into())?;
                    if n == 0 {
                        return Err(WireError::Malformed("edited run without edits"));
                    }
                    let from = edits.len() as u32;
                    let mut index = 0u64;
                    let mut edit_bytes = 0u64;
                    for _ in 0..n {
                        index += r.bounded("run edit gap", count.into())?;
                        if index >= u64::from(count) {
                            return Err(WireError::Malformed("run edit beyond the run"));
                        }
                        let (raw_len, head, tail, start, len) =
                            read_edit(&mut r, &mut deltas, &ZSTD_FRAME_MAGIC)?;
                        edit_bytes += u64::from(raw_len);
                        if edit_bytes > wire::MAX_RUN_EDIT_BYTES {
                            return Err(WireError::TooLarge {
                                what: "edited chunks of a run",
                                got: edit_bytes,
                                limit: wire::MAX_RUN_EDIT_BYTES,
                            });
                        }
                        edits.push(Edit {
                            index: index as u32,
                            raw_len,
                            head,
                            tail,
                            start,
                            len,
                        });
                        index += 1;
                    }
                    Op::Run {
                        count,
                        first,
                        digest,
                        edits: (from, edits.len() as u32),
                    }
                }
                wire::OP_CUT => Op::Cut(r.bounded("cut length", wire::MAX_CHUNK as u64)? as u32),
                wire::OP_DELTA => {
                    let base = r.id()?;
                    let raw_len = r.bounded("delta length", wire::MAX_CHUNK as u64)? as u32;
                    let (start, len) = read_delta_payload(&mut r, &mut deltas, &[])?;
                    Op::Delta {
                        base,
                        raw_len,
                        head: 0,
                        tail: 0,
                        start,
                        len,
                    }
                }
                wire::OP_TDELTA => {
                    let base = r.id()?;
                    let (raw_len, head, tail, start, len) = read_edit(&mut r, &mut deltas, &[])?;
                    Op::Delta {
                        base,
                        raw_len,
                        head,
                        tail,
                        start,
                        len,
                    }
                }
                other => return Err(WireError::UnknownOp(other)),
            };
            ops.push(op);
        }
        // Check the literal section's declared size now; decompress it only when the batch is decoded.
        let literals = r.rest().to_vec();
        {
            let mut lr = Reader::new(&literals);
            let _codec = lr.u8("literal codec")?;
            let raw_len = lr.varint("literal length")?;
            if raw_len != lit_total {
                return Err(WireError::Malformed(
                    "literal section length differs from the ops",
                ));
            }
        }
        let encoded_len = body.len();
        if self.queued_bytes + encoded_len > self.max_queued_bytes {
            return Err(WireError::TooLarge {
                what: "queued input",
                got: (self.queued_bytes + encoded_len) as u64,
                limit: self.max_queued_bytes as u64,
            });
        }
        self.queued_bytes += encoded_len;
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queue.push_back(Batch {
            seq,
            ops,
            literals,
            deltas,
            edits,
            decoded: None,
            lit_pos: 0,
            next_op: 0,
            op_done: 0,
            run_ids: None,
            run_done: 0,
            run_edits: VecDeque::new(),
            needed: BTreeSet::new(),
            fills: HashMap::new(),
            encoded_len,
        });
        // If we are already missing chunks, ask for this batch's missing ones at once rather than one
        // round trip at a time.
        if self.queue.front().is_some_and(|b| !b.needed.is_empty()) {
            let last = self.queue.len() - 1;
            self.request_missing(last, 0);
        }
        Ok(())
    }

    fn accept_fill(&mut self, body: &[u8]) -> Result<(), WireError> {
        let mut r = Reader::new(body);
        let seq = r.varint("fill seq")?;
        let op = r.varint("fill op")?;
        let nlens = r.bounded("fill chunk count", wire::MAX_RUN)? as usize;
        let mut lens = Vec::with_capacity(nlens);
        let mut total: u64 = 0;
        for _ in 0..nlens {
            let l = r.bounded("fill chunk length", wire::MAX_CHUNK as u64)?;
            if l == 0 {
                return Err(WireError::Malformed("empty chunk in fill"));
            }
            total += l;
            lens.push(l as u32);
        }
        let limit = if nlens > 0 {
            total
        } else {
            wire::MAX_CHUNK as u64
        };
        let mut data = Vec::new();
        get_literals(&mut r, limit, &mut data)?;
        if nlens > 0 && data.len() as u64 != total {
            return Err(WireError::Malformed(
                "fill chunk lengths differ from its bytes",
            ));
        }
        let unexpected = WireError::UnexpectedFill { seq, op };
        let front = self
            .queue
            .front()
            .map(|b| b.seq)
            .ok_or(unexpected.clone())?;
        let idx = seq.checked_sub(front).ok_or(unexpected.clone())? as usize;
        let batch = self.queue.get_mut(idx).ok_or(unexpected.clone())?;
        let op32 = u32::try_from(op).map_err(|_| unexpected.clone())?;
        if !batch.needed.remove(&op32) {
            return Err(unexpected);
        }
        match batch.ops.get(op32 as usize).copied() {
            Some(Op::Run { .. }) if nlens == 0 => {
                return Err(WireError::Malformed("fill for a run without chunk lengths"))
            }
            Some(Op::Ref(_)) | Some(Op::PartRef(..)) | Some(Op::Delta { .. }) if nlens != 0 => {
                return Err(WireError::Malformed(
                    "fill for a reference with chunk lengths",
                ))
            }
            Some(Op::PartRef(_, len)) | Some(Op::Delta { raw_len: len, .. })
                if data.len() != len as usize =>
            {
                return Err(WireError::Malformed(
                    "fill for a partial reference of the wrong length",
                ))
            }
            _ => {}
        }
        // The fill must be what the op named: a bug or a lie on the other side must end the stream, not
        // reach the client. (A partial reference names a whole chunk and cannot be checked from a part.)
        let matches = match batch.ops.get(op32 as usize).copied() {
            Some(Op::Run {
                count,
                first,
                digest,
                edits,
            }) => {
                // The first chunk is `first` itself unless the run's first chunk is an edit of it.
                let first_edited = edits.0 < edits.1
                    && batch
                        .edits
                        .get(edits.0 as usize)
                        .is_some_and(|e| e.index == 0);
                let mut hasher = blake3::Hasher::new();
                let mut pos = 0usize;
                let mut ids = 0u32;
                let mut first_ok = false;
                for &len in &lens {
                    let id = ChunkId::of(&data[pos..pos + len as usize]);
                    first_ok |= ids == 0 && id == first;
                    hasher.update(id.as_bytes());
                    pos += len as usize;
                    ids += 1;
                }
                (first_ok || first_edited)
                    && ids == count
                    && hasher.finalize().as_bytes()[..CHUNK_ID_LEN] == digest[..]
            }
            // A reference completes the open chunk: the bytes already output plus the fill.
            Some(Op::Ref(id)) if idx == 0 && batch.next_op == op32 as usize => {
                let mut h = blake3::Hasher::new();
                h.update(&self.prefix);
                h.update(&data);
                h.finalize().as_bytes()[..CHUNK_ID_LEN] == id.0[..]
            }
            // A reference further on: its open-chunk prefix is not known yet; checked when applied.
            _ => true,
        };
        if !matches {
            return Err(WireError::FillMismatch { seq, op });
        }
        self.stats.fill_bytes += data.len() as u64;
        batch.fills.insert(op32, Fill { lens, data });
        Ok(())
    }

    /// Requests every op from `batch_idx`/`from_op` on whose chunk is not in the store and not yet
    /// requested. Called once the stream has missed a chunk, so that one round trip serves them all.
    fn request_missing(&mut self, batch_idx: usize, from_op: usize) {
        let store = &self.store;
        for (bi, batch) in self.queue.iter_mut().enumerate().skip(batch_idx) {
            let start = if bi == batch_idx { from_op } else { 0 };
            for (i, op) in batch.ops.iter().enumerate().skip(start) {
                let id = match op {
                    Op::Ref(id) | Op::PartRef(id, _) | Op::Delta { base: id, .. } => id,
                    Op::Run { first, .. } => first,
                    _ => continue,
                };
                let i = i as u32;
                if !batch.fills.contains_key(&i)
                    && !batch.needed.contains(&i)
                    && !store.contains(id)
                {
                    batch.needed.insert(i);
                    self.pending_needs.push((batch.seq, i));
                    self.stats.needs_sent += 1;
                }
            }
        }
    }

    fn need(&mut self, op: usize) {
        if let Some(batch) = self.queue.front_mut() {
            let i = op as u32;
            if batch.needed.insert(i) {
                self.pending_needs.push((batch.seq, i));
                self.stats.needs_sent += 1;
            }
        }
        self.request_missing(0, op + 1);
    }

    /// Decodes queued ops in order until the queue is empty, output is full, or an op waits for a fill.
    fn pump(&mut self) -> Result<(), WireError> {
        loop {
            if self.output.len() >= self.cfg.max_output_buffer {
                return Ok(());
            }
            let Some(batch) = self.queue.front_mut() else {
                return Ok(());
            };
            if batch.decoded.is_none() {
                let mut lits = Vec::new();
                let mut r = Reader::new(&batch.literals);
                get_literals(&mut r, wire::MAX_MESSAGE as u64 * 8, &mut lits)?;
                batch.decoded = Some(lits);
                batch.literals = Vec::new();
            }
            if batch.next_op == batch.ops.len() {
                if let Some(done) = self.queue.pop_front() {
                    self.queued_bytes -= done.encoded_len;
                }
                self.delivered += 1;
                continue;
            }
            let i = batch.next_op;
            if batch.needed.contains(&(i as u32)) {
                // Requested already; nothing to do until the fill arrives.
                return Ok(());
            }
            match self.step(i)? {
                Step::Done => {
                    if let Some(batch) = self.queue.front_mut() {
                        batch.next_op += 1;
                        batch.op_done = 0;
                        batch.run_ids = None;
                        batch.run_done = 0;
                        batch.run_edits.clear();
                        batch.fills.remove(&(i as u32));
                    }
                }
                Step::Paused => return Ok(()),
                Step::Stalled => {
                    self.need(i);
                    return Ok(());
                }
            }
        }
    }

    /// Records a completed chunk: stored, believed held by the peer (it sent or referenced it), and
    /// linked as the successor of the previous chunk.
    fn complete_chunk(&mut self, id: ChunkId, data: Option<&[u8]>) {
        if let Some(data) = data {
            match self.store.insert(&id, data) {
                Ok(()) => self.stats.chunks_stored += 1,
                Err(_) => self.stats.store_errors += 1,
            }
        }
        self.view.believe(&id);
        if let Some(prev) = self.prev {
            self.hints.record(&self.store, &prev, &id, false);
        }
        self.prev = Some(id);
    }

    fn step(&mut self, i: usize) -> Result<Step, WireError> {
        let Some(batch) = self.queue.front_mut() else {
            return Ok(Step::Done);
        };
        let op = batch.ops[i];
        let fill = batch.fills.remove(&(i as u32));
        match op {
            Op::Lit(len) | Op::Part(len) => {
                let lits = batch.decoded.as_deref().unwrap_or_default();
                let end = batch.lit_pos + len as usize;
                let bytes = lits.get(batch.lit_pos..end).ok_or(WireError::Malformed(
                    "literal ops exceed the literal section",
                ))?;
                batch.lit_pos = end;
                self.output.extend_from_slice(bytes);
                if matches!(op, Op::Part(_)) {
                    if self.prefix.len() + bytes.len() > wire::MAX_CHUNK {
                        return Err(WireError::TooLarge {
                            what: "open chunk",
                            got: (self.prefix.len() + bytes.len()) as u64,
                            limit: wire::MAX_CHUNK as u64,
                        });
                    }
                    self.prefix.extend_from_slice(bytes);
                    return Ok(Step::Done);
                }
                let bytes = bytes.to_vec();
                if self.prefix.is_empty() {
                    self.complete_chunk(ChunkId::of(&bytes), Some(&bytes));
                } else {
                    let mut chunk = std::mem::take(&mut self.prefix);
                    chunk.extend_from_slice(&bytes);
                    self.complete_chunk(ChunkId::of(&chunk), Some(&chunk));
                }
                Ok(Step::Done)
            }
            Op::Delta {
                base,
                raw_len,
                head,
                tail,
                start,
                len,
            } => {
                if !self.prefix.is_empty() {
                    return Err(WireError::Malformed("delta inside an open chunk"));
                }
                let chunk = match fill {
                    Some(fill) => fill.data,
                    None => {
                        let mut base_bytes = Vec::new();
                        if !self.store.get_into(&base, &mut base_bytes) {
                            return Ok(Step::Stalled);
                        }
                        let payload = &batch.deltas[start as usize..(start + len) as usize];
                        delta_apply(
                            &base_bytes,
                            head as usize,
                            tail as usize,
                            payload,
                            raw_len as usize,
                        )?
                    }
                };
                self.output.extend_from_slice(&chunk);
                self.complete_chunk(ChunkId::of(&chunk), Some(&chunk));
                Ok(Step::Done)
            }
            Op::Cut(len) => {
                let len = len as usize;
                if len > self.prefix.len() {
                    return Err(WireError::Malformed("cut beyond the open chunk"));
                }
                let chunk: Vec<u8> = self.prefix.drain(..len).collect();
                self.complete_chunk(ChunkId::of(&chunk), Some(&chunk));
                Ok(Step::Done)
            }
            Op::Ref(id) => {
                if let Some(fill) = fill {
                    let mut chunk = std::mem::take(&mut self.prefix);
                    chunk.extend_from_slice(&fill.data);
                    let got = ChunkId::of(&chunk);
                    if got != id {
                        let seq = batch.seq;
                        return Err(WireError::FillMismatch { seq, op: i as u64 });
                    }
                    self.output.extend_from_slice(&fill.data);
                    self.complete_chunk(got, Some(&chunk));
                    return Ok(Step::Done);
                }
                let mut chunk = Vec::new();
                if !self.store.get_into(&id, &mut chunk) || !chunk.starts_with(&self.prefix) {
                    return Ok(Step::Stalled);
                }
                self.output.extend_from_slice(&chunk[self.prefix.len()..]);
                self.prefix.clear();
                self.complete_chunk(id, None);
                Ok(Step::Done)
            }
            Op::PartRef(id, len) => {
                let plen = self.prefix.len();
                if plen + len as usize > wire::MAX_CHUNK {
                    return Err(WireError::Malformed(
                        "partial reference beyond the largest chunk",
                    ));
                }
                if let Some(fill) = fill {
                    self.output.extend_from_slice(&fill.data);
                    self.prefix.extend_from_slice(&fill.data);
                    return Ok(Step::Done);
                }
                let mut chunk = Vec::new();
                if !self.store.get_into(&id, &mut chunk)
                    || chunk.len() < plen + len as usize
                    || !chunk.starts_with(&self.prefix)
                {
                    return Ok(Step::Stalled);
                }
                let part = &chunk[plen..plen + len as usize];
                self.output.extend_from_slice(part);
                self.prefix.extend_from_slice(part);
                Ok(Step::Done)
            }
            Op::Run {
                count,
                first,
                digest,
                edits,
            } => {
                if !self.prefix.is_empty() {
                    return Err(WireError::Malformed("run inside an open chunk"));
                }
                if let Some(fill) = fill {
                    return Ok(self.apply_run_fill(fill));
                }
                let (ids, mut k) = match batch.run_ids.take() {
                    Some(ids) => (ids, batch.run_done),
                    None => {
                        let edits = &batch.edits[edits.0 as usize..edits.1 as usize];
                        let rebuilt = walk(&self.store, first, count).and_then(|mut ids| {
                            let held = rebuild_edits(&self.store, &mut ids, edits, &batch.deltas)?;
                            digest_matches(&ids, &digest).then_some((ids, held))
                        });
                        match rebuilt {
                            Some((ids, held)) => {
                                batch.run_edits = held;
                                (ids, 0)
                            }
                            None => {
                                self.stats.run_mismatches += 1;
                                return Ok(Step::Stalled);
                            }
                        }
                    }
                };
                while k < ids.len() {
                    let paused = self.output.len() >= self.cfg.max_output_buffer;
                    let edit = match self.queue.front_mut() {
                        Some(b)
                            if !paused
                                && b.run_edits.front().is_some_and(|e| e.0 as usize == k) =>
                        {
                            b.run_edits.pop_front().map(|e| e.1)
                        }
                        _ => None,
                    };
                    let before = self.output.len();
                    let got = match &edit {
                        Some(chunk) => {
                            self.output.extend_from_slice(chunk);
                            true
                        }
                        None => !paused && self.store.get_into(&ids[k], &mut self.output),
                    };
                    if !got {
                        if let Some(b) = self.queue.front_mut() {
                            b.run_ids = Some(ids);
                            b.run_done = k;
                        }
                        return Ok(if paused { Step::Paused } else { Step::Stalled });
                    }
                    let n = self.output.len() - before;
                    if let Some(b) = self.queue.front_mut() {
                        b.op_done += n;
                    }
                    self.complete_chunk(ids[k], edit.as_deref());
                    k += 1;
                }
                Ok(Step::Done)
            }
        }
    }

    /// Outputs the part of a resent run not yet output, storing the chunks not yet completed.
    fn apply_run_fill(&mut self, fill: Fill) -> Step {
        let skip = self.queue.front().map_or(0, |b| b.op_done);
        let mut pos = 0usize;
        for &len in &fill.lens {
            let end = pos + len as usize;
            if end > skip {
                let chunk = &fill.data[pos..end];
                self.complete_chunk(ChunkId::of(chunk), Some(chunk));
            }
            pos = end;
        }
        if skip < fill.data.len() {
            self.output.extend_from_slice(&fill.data[skip..]);
        }
        Step::Done
    }
}

/// Reads a RUN's (or ERUN's) count, first id and digest.
fn read_run_head(r: &mut Reader<'_>) -> Result<(u32, ChunkId, [u8; CHUNK_ID_LEN]), WireError> {
    let count = r.bounded("run length", wire::MAX_RUN)?;
    if count < 2 {
        return Err(WireError::Malformed("run of fewer than two chunks"));
    }
    let first = r.id()?;
    let mut digest = [0u8; CHUNK_ID_LEN];
    digest.copy_from_slice(r.bytes(CHUNK_ID_LEN, "run digest")?);
    Ok((count as u32, first, digest))
}

/// Reads a TDELTA's fields after its base (as an ERUN's edits carry them too): the chunk's length,
/// its ends and its payload, which is appended to `deltas` after `frame_prefix` (the zstd magic
/// number an ERUN's edits leave out). Returns the length, the ends and where the payload is in
/// `deltas`.
fn read_edit(
    r: &mut Reader<'_>,
    deltas: &mut Vec<u8>,
    frame_prefix: &[u8],
) -> Result<(u32, u32, u32, u32, u32), WireError> {
    let raw_len = r.bounded("delta length", wire::MAX_CHUNK as u64)?;
    let head = r.bounded("delta head", raw_len)?;
    let tail = r.bounded("delta tail", raw_len - head)?;
    let (start, len) = read_delta_payload(r, deltas, frame_prefix)?;
    Ok((raw_len as u32, head as u32, tail as u32, start, len))
}

fn read_delta_payload(
    r: &mut Reader<'_>,
    deltas: &mut Vec<u8>,
    frame_prefix: &[u8],
) -> Result<(u32, u32), WireError> {
    let len = r.bounded("delta payload length", wire::MAX_CHUNK as u64)? as usize;
    let start = deltas.len() as u32;
    deltas.extend_from_slice(frame_prefix);
    deltas.extend_from_slice(r.bytes(len, "delta payload")?);
    Ok((start, (frame_prefix.len() + len) as u32))
}

/// Follows successor hints from `first` for `count` chunks.
fn walk(store: &ChunkStore, first: ChunkId, count: u32) -> Option<Vec<ChunkId>> {
    let mut ids = Vec::with_capacity(count as usize);
    let mut cur = first;
    for k in 0..count {
        if k > 0 {
            cur = store.successor(&cur)?;
        }
        ids.push(cur);
    }
    Some(ids)
}

/// Rebuilds the edited chunks of a run whose walk reached `ids`: each edit's chunk replaces its
/// base's id in `ids` by its own. `None` if a base is not in the store or an edit does not apply to
/// it (hints that differ from the encoder's can lead the walk to another chunk: the run is then
/// requested, as when its digest does not match).
fn rebuild_edits(
    store: &ChunkStore,
    ids: &mut [ChunkId],
    edits: &[Edit],
    deltas: &[u8],
) -> Option<VecDeque<(u32, Vec<u8>)>> {
    let mut held = VecDeque::with_capacity(edits.len());
    let mut base = Vec::new();
    for e in edits {
        let slot = ids.get_mut(e.index as usize)?;
        base.clear();
        if !store.get_into(slot, &mut base) {
            return None;
        }
        let payload = deltas.get(e.start as usize..(e.start + e.len) as usize)?;
        let chunk = delta_apply(
            &base,
            e.head as usize,
            e.tail as usize,
            payload,
            e.raw_len as usize,
        )
        .ok()?;
        *slot = ChunkId::of(&chunk);
        held.push_back((e.index, chunk));
    }
    Some(held)
}

/// Whether `digest` is the run digest of `ids`: the first 16 bytes of BLAKE3 over them.
fn digest_matches(ids: &[ChunkId], digest: &[u8; CHUNK_ID_LEN]) -> bool {
    let mut hasher = blake3::Hasher::new();
    for id in ids {
        hasher.update(id.as_bytes());
    }
    hasher.finalize().as_bytes()[..CHUNK_ID_LEN] == digest[..]
}
