//! Test vectors of the dedup stream: `docs/vectors/dedup-*.txt` (the format is described in
//! `docs/protocol.md`, "Test vectors"). Each is a transcript between an encoder and a decoder: what the
//! application wrote, the data stream, the decoded bytes, the feedback stream. They are replayed
//! against the decoder (every expected output and feedback byte), and against the encoder, which must
//! produce the data stream byte for byte.
//!
//! The files are written by `write_vectors` (run on purpose after a deliberate change of the format:
//! `cargo test -p ditto-dedup --test vectors -- --ignored write_vectors`); it annotates every field
//! with a small parser of its own, independent of the engine's.

use ditto_dedup::chunker::ChunkParams;
use ditto_dedup::{ChunkStore, Decoder, Encoder, EngineConfig, PeerView, StoreConfig};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn vectors_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/vectors")
}

fn ram_store() -> Arc<ChunkStore> {
    Arc::new(ChunkStore::open(StoreConfig::in_memory(64 << 20)).expect("ram store"))
}

// ---------------------------------------------------------------------------------------------
// The vector file format.

/// One line of a vector file (consecutive lines of the same kind with bytes are one step).
#[derive(Clone, Debug)]
enum Step {
    /// `config chunk_min=N chunk_avg=N chunk_max=N zstd_level=N`: the encoder's settings.
    Config(EngineConfig),
    /// `stream`: a new connection: a new encoder and a new decoder; both sides keep their stores.
    Stream,
    /// `decoder-loses-store`: the decoder's side starts over with an empty store (the encoder does
    /// not know: it still believes the peer holds what it sent).
    LoseStore,
    /// `write HEX`: the application wrote these bytes into the encoder.
    Write(Vec<u8>),
    /// `flush`: the application's source went quiet: the encoder sends what it has.
    Flush,
    /// `finish`: end of the stream.
    Finish,
    /// `data HEX`: bytes of the data stream (encoder to decoder).
    Data(Vec<u8>),
    /// `output HEX`: the bytes the decoder outputs once it has the data so far.
    Output(Vec<u8>),
    /// `feedback HEX`: bytes of the feedback stream (decoder to encoder) after that.
    Feedback(Vec<u8>),
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .fold(String::with_capacity(b.len() * 2), |mut s, x| {
            let _ = write!(s, "{x:02x}");
            s
        })
}

fn unhex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() & 1 == 1 {
        return Err(format!("odd number of hex digits: {s}"));
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(|e| format!("{s}: {e}")))
        .collect()
}

/// Where two byte strings part, for a message of reasonable length.
fn differ(got: &[u8], want: &[u8]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let near = |b: &[u8]| hex(&b[at.min(b.len())..(at + 16).min(b.len())]);
    format!(
        "differs at byte {at} (got {} bytes, want {}): got {}..., want {}...",
        got.len(),
        want.len(),
        near(got),
        near(want)
    )
}

fn config_line(cfg: &EngineConfig) -> String {
    format!(
        "config chunk_min={} chunk_avg={} chunk_max={} zstd_level={} trimmed_deltas={} \
         edited_runs={}",
        cfg.chunking.min_size,
        cfg.chunking.avg_size,
        cfg.chunking.max_size,
        cfg.zstd_level,
        u8::from(cfg.trimmed_deltas),
        u8::from(cfg.edited_runs)
    )
}

fn parse(text: &str) -> Result<Vec<Step>, String> {
    let mut steps: Vec<Step> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut words = line.split_whitespace();
        let kw = words.next().unwrap_or("");
        let arg = words.collect::<Vec<_>>().join(" ");
        let at = |e: String| format!("line {}: {e}", n + 1);
        let step = match kw {
            "config" => {
                let mut cfg = EngineConfig::default();
                for kv in arg.split_whitespace() {
                    let (k, v) = kv.split_once('=').ok_or_else(|| at(format!("{kv}?")))?;
                    let v: i64 = v.parse().map_err(|_| at(format!("{kv}?")))?;
                    let u = u32::try_from(v).map_err(|_| at(format!("{kv}?")));
                    match k {
                        "chunk_min" => cfg.chunking.min_size = u?,
                        "chunk_avg" => cfg.chunking.avg_size = u?,
                        "chunk_max" => cfg.chunking.max_size = u?,
                        "zstd_level" => cfg.zstd_level = v as i32,
                        "trimmed_deltas" => cfg.trimmed_deltas = v != 0,
                        "edited_runs" => cfg.edited_runs = v != 0,
                        _ => return Err(at(format!("unknown setting {k}"))),
                    }
                }
                Step::Config(cfg)
            }
            "stream" => Step::Stream,
            "decoder-loses-store" => Step::LoseStore,
            "flush" => Step::Flush,
            "finish" => Step::Finish,
            "write" | "data" | "output" | "feedback" => {
                let b = unhex(&arg).map_err(at)?;
                match (kw, steps.last_mut()) {
                    ("write", Some(Step::Write(v)))
                    | ("data", Some(Step::Data(v)))
                    | ("output", Some(Step::Output(v)))
                    | ("feedback", Some(Step::Feedback(v))) => {
                        v.extend_from_slice(&b);
                        continue;
                    }
                    ("write", _) => Step::Write(b),
                    ("data", _) => Step::Data(b),
                    ("output", _) => Step::Output(b),
                    _ => Step::Feedback(b),
                }
            }
            other => return Err(at(format!("unknown keyword {other:?}"))),
        };
        steps.push(step);
    }
    Ok(steps)
}

// ---------------------------------------------------------------------------------------------
// Replay.

/// Replays `steps` against a decoder: after each run of `data`, the decoder reads all it can (that
/// must equal the `output` that follows, or nothing) and writes its feedback (that must equal the
/// `feedback` that follows, or nothing). Returns the decoded bytes of all streams.
fn replay_decoder(steps: &[Step]) -> Result<Vec<u8>, String> {
    let a = ram_store();
    let mut b = ram_store();
    let mut cfg = EngineConfig::default();
    let mut dec: Option<Decoder> = None;
    let mut all = Vec::new();
    let mut i = 0;
    while i < steps.len() {
        match &steps[i] {
            Step::Config(c) => cfg = c.clone(),
            Step::Stream => {
                let view = Arc::new(PeerView::new(a.identity()));
                dec = Some(Decoder::new(b.clone(), view, cfg.clone()));
            }
            Step::LoseStore => b = ram_store(),
            Step::Write(_) | Step::Flush | Step::Finish => {}
            Step::Output(_) | Step::Feedback(_) => {
                return Err(format!("step {i}: {:?} without data before it", steps[i]))
            }
            Step::Data(d) => {
                let dec = dec.as_mut().ok_or("data before the first stream")?;
                dec.receive(d)
                    .map_err(|e| format!("step {i}: decoder refused the data: {e}"))?;
                let mut out = Vec::new();
                dec.read(&mut out)
                    .map_err(|e| format!("step {i}: decoding failed: {e}"))?;
                let want_out = match steps.get(i + 1) {
                    Some(Step::Output(o)) => {
                        i += 1;
                        o.as_slice()
                    }
                    _ => &[],
                };
                if out != want_out {
                    return Err(format!("step {i}: output {}", differ(&out, want_out)));
                }
                all.extend_from_slice(&out);
                let mut fb = Vec::new();
                dec.feedback(&mut fb);
                let want_fb = match steps.get(i + 1) {
                    Some(Step::Feedback(f)) => {
                        i += 1;
                        f.as_slice()
                    }
                    _ => &[],
                };
                if fb != want_fb {
                    return Err(format!("step {i}: feedback {}", differ(&fb, want_fb)));
                }
            }
        }
        i += 1;
    }
    Ok(all)
}

/// Replays `steps` against an encoder: the application's writes, flushes and the decoder's feedback
/// go in; what comes out must be exactly the `data` lines, in order. Returns the bytes written.
fn replay_encoder(steps: &[Step]) -> Result<Vec<u8>, String> {
    let a = ram_store();
    let b_id = ram_store().identity();
    let view = Arc::new(PeerView::new(b_id));
    let mut cfg = EngineConfig::default();
    let mut enc: Option<Encoder> = None;
    let mut out = Vec::new();
    let mut written = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        let need_enc = || format!("step {i}: no stream yet");
        match step {
            Step::Config(c) => cfg = c.clone(),
            Step::Stream => {
                if !out.is_empty() {
                    return Err(format!("step {i}: unexpected data {}", hex(&out)));
                }
                enc = Some(Encoder::new(a.clone(), view.clone(), cfg.clone()));
            }
            Step::LoseStore | Step::Output(_) => {}
            Step::Write(w) => {
                enc.as_mut().ok_or_else(need_enc)?.write(w, &mut out);
                written.extend_from_slice(w);
            }
            Step::Flush => enc.as_mut().ok_or_else(need_enc)?.flush(&mut out),
            Step::Finish => enc.as_mut().ok_or_else(need_enc)?.finish(&mut out),
            Step::Feedback(f) => enc
                .as_mut()
                .ok_or_else(need_enc)?
                .feedback(f, &mut out)
                .map_err(|e| format!("step {i}: encoder refused the feedback: {e}"))?,
            Step::Data(d) => {
                if !out.starts_with(d) {
                    let got = &out[..out.len().min(d.len())];
                    return Err(format!("step {i}: encoder output {}", differ(got, d)));
                }
                out.drain(..d.len());
            }
        }
    }
    if !out.is_empty() {
        return Err(format!("unexpected data at the end: {}", hex(&out)));
    }
    Ok(written)
}

fn vector_files() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(vectors_dir())
        .expect("docs/vectors")
        .map(|e| e.expect("entry").path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("dedup-") && n.ends_with(".txt"))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn vectors_replay_against_decoder_and_encoder() {
    let files = vector_files();
    assert!(files.len() >= 4, "dedup vectors missing: {files:?}");
    let mut seen = Coverage::default();
    for f in &files {
        let text = std::fs::read_to_string(f).expect("read vector");
        let steps = parse(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let decoded = replay_decoder(&steps).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        let written = replay_encoder(&steps).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
        assert!(
            decoded == written,
            "{}: decoded bytes differ from the bytes written",
            f.display()
        );
        // Walk the streams with the annotating parser, to see what the vectors exercise.
        let mut data = Annotator::new(true);
        let mut fb = Annotator::new(false);
        for s in &steps {
            match s {
                Step::Stream => {
                    data = Annotator::new(true);
                    fb = Annotator::new(false);
                }
                Step::Data(d) => {
                    data.annotate(d)
                        .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                }
                Step::Feedback(d) => {
                    fb.annotate(d)
                        .unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                }
                _ => {}
            }
            seen.merge(&data.seen);
            seen.merge(&fb.seen);
        }
    }
    seen.assert_complete();
}

// ---------------------------------------------------------------------------------------------
// An annotating parser of both streams, written from docs/protocol.md.

#[derive(Default, Clone)]
struct Coverage {
    ops: [bool; 9],
    codecs: [bool; 2],
    fills: [bool; 9],
    ack: bool,
    need: bool,
}

impl Coverage {
    fn merge(&mut self, o: &Coverage) {
        for i in 0..OP_NAMES.len() {
            self.ops[i] |= o.ops[i];
            self.fills[i] |= o.fills[i];
        }
        self.codecs[0] |= o.codecs[0];
        self.codecs[1] |= o.codecs[1];
        self.ack |= o.ack;
        self.need |= o.need;
    }

    fn assert_complete(&self) {
        for (i, name) in OP_NAMES.iter().enumerate() {
            assert!(self.ops[i], "no vector has a {name} op");
        }
        for i in [2, 3, 4, 6, 7, 8] {
            assert!(self.fills[i], "no vector has a FILL of a {}", OP_NAMES[i]);
        }
        assert!(self.codecs[0] && self.codecs[1], "raw and zstd literals");
        assert!(self.ack && self.need, "ACK and NEED");
    }
}

const OP_NAMES: [&str; 9] = [
    "LIT", "PART", "REF", "PARTREF", "RUN", "CUT", "DELTA", "TDELTA", "ERUN",
];

/// Splits stream bytes into fields, each with what it means. Streams arrive in whole messages in
/// the vectors (the encoder and the decoder emit whole messages), so each call parses whole messages.
struct Annotator {
    data: bool,
    header_seen: bool,
    /// Data stream: the op tags of each batch so far, for FILLs to name what they answer.
    batches: Vec<Vec<u8>>,
    seen: Coverage,
}

struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
    fields: Vec<(Vec<u8>, String)>,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: String) -> Result<&'a [u8], String> {
        let s = self
            .b
            .get(self.pos..self.pos + n)
            .ok_or_else(|| format!("truncated at {what}"))?;
        self.pos += n;
        self.fields.push((s.to_vec(), what));
        Ok(s)
    }

    fn varint(&mut self, what: &str) -> Result<u64, String> {
        self.varint_then(what, |_| String::new())
    }

    /// A varint labelled "WHAT = V (varint): NOTE".
    fn varint_then(&mut self, what: &str, note: impl FnOnce(u64) -> String) -> Result<u64, String> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = *self
                .b
                .get(self.pos + i)
                .ok_or_else(|| format!("truncated varint {what}"))?;
            v |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                let note = note(v);
                let sep = if note.is_empty() { "" } else { ": " };
                self.take(i + 1, format!("{what} = {v} (varint){sep}{note}"))?;
                return Ok(v);
            }
        }
        Err(format!("varint {what} too long"))
    }

    fn u8(&mut self, what: impl FnOnce(u8) -> String) -> Result<u8, String> {
        let b = *self.b.get(self.pos).ok_or("truncated byte")?;
        self.take(1, what(b))?;
        Ok(b)
    }

    fn id(&mut self, what: &str) -> Result<(), String> {
        self.take(
            16,
            format!("{what}: chunk id, 16 bytes (BLAKE3 of the chunk, first 16 bytes)"),
        )
        .map(|_| ())
    }
}

impl Annotator {
    fn new(data: bool) -> Annotator {
        Annotator {
            data,
            header_seen: false,
            batches: Vec::new(),
            seen: Coverage::default(),
        }
    }

    fn annotate(&mut self, b: &[u8]) -> Result<Vec<(Vec<u8>, String)>, String> {
        let mut c = Cursor {
            b,
            pos: 0,
            fields: Vec::new(),
        };
        if !self.header_seen {
            let kind = if self.data {
                "0 (data)"
            } else {
                "1 (feedback)"
            };
            let h = c.take(
                4,
                format!("stream header: magic d1 70, version 1, kind {kind}"),
            )?;
            if h != [0xd1, 0x70, 1, u8::from(!self.data)] {
                return Err(format!("bad header {}", hex(h)));
            }
            self.header_seen = true;
        }
        while c.pos < b.len() {
            let ty = c.u8(|t| {
                let name = match t {
                    0x01 => "BATCH",
                    0x02 => "FILL",
                    0x11 => "ACK",
                    0x12 => "NEED",
                    _ => "unknown",
                };
                format!("message type {t:#04x}: {name}")
            })?;
            let len = c.varint("body_len")?;
            let end = c.pos + len as usize;
            match (self.data, ty) {
                (true, 0x01) => self.batch(&mut c)?,
                (true, 0x02) => self.fill(&mut c)?,
                (false, 0x11) => {
                    c.varint_then("ACK delivered", |v| match v {
                        1 => "batch 0 is fully decoded".to_owned(),
                        v => format!("batches 0 to {} are fully decoded", v - 1),
                    })?;
                    self.seen.ack = true;
                }
                (false, 0x12) => {
                    let seq = c.varint_then("NEED seq", |v| format!("batch {v}"))?;
                    let n = c.varint("NEED n: ops requested")?;
                    for _ in 0..n {
                        c.varint_then("  op", |v| format!("op {v} of batch {seq}"))?;
                    }
                    self.seen.need = true;
                }
                _ => return Err(format!("message type {ty:#04x} on this stream")),
            }
            if c.pos != end {
                return Err(format!("message body of {len} bytes parsed to {}", c.pos));
            }
        }
        Ok(c.fields)
    }

    fn literals(&mut self, c: &mut Cursor<'_>, end: usize) -> Result<(), String> {
        let codec = c.u8(|k| match k {
            0 => "literals codec 0: raw".to_owned(),
            1 => "literals codec 1: zstd".to_owned(),
            k => format!("literals codec {k}: unknown"),
        })?;
        let raw = c.varint("literals raw_len")?;
        let n = end
            .checked_sub(c.pos)
            .ok_or("literal section past the message end")?;
        match codec {
            0 => {
                c.take(n, format!("literal bytes ({n})"))?;
                self.seen.codecs[0] = true;
            }
            1 => {
                c.take(
                    n,
                    format!("one zstd frame ({n} bytes) of the {raw} literal bytes"),
                )?;
                self.seen.codecs[1] = true;
            }
            _ => return Err(format!("codec {codec}")),
        }
        Ok(())
    }

    fn batch(&mut self, c: &mut Cursor<'_>) -> Result<(), String> {
        let body_end = c.pos + body_len_of(c)?;
        let seq = self.batches.len();
        let n = c.varint_then("BATCH n_ops", |_| {
            format!("this is batch {seq} (batches are numbered from 0 in the order sent)")
        })?;
        let mut tags = Vec::new();
        for i in 0..n {
            let tag = c.u8(|t| {
                let name = OP_NAMES.get(usize::from(t)).unwrap_or(&"unknown");
                format!("op {i}: tag {t:#04x} {name}")
            })?;
            let name = OP_NAMES.get(usize::from(tag)).ok_or("unknown op")?;
            match tag {
                0 | 1 | 5 => {
                    c.varint(&format!("  {name} len"))?;
                }
                2 => c.id("  REF id")?,
                3 => {
                    c.id("  PARTREF id")?;
                    c.varint("  PARTREF len")?;
                }
                4 => {
                    c.varint_then("  RUN count", |_| {
                        "chunks, from the first id on by successor hints".to_owned()
                    })?;
                    c.id("  RUN first id")?;
                    c.take(16, "  RUN digest: BLAKE3 of the run's ids, 16 bytes".into())?;
                }
                6 => {
                    c.id("  DELTA base")?;
                    c.varint("  DELTA raw_len: bytes of the new chunk")?;
                    let plen = c.varint("  DELTA plen")?;
                    c.take(
                        plen as usize,
                        format!("  DELTA payload: one zstd frame with the base as prefix ({plen} bytes)"),
                    )?;
                }
                7 => {
                    c.id("  TDELTA base")?;
                    c.varint("  TDELTA raw_len: bytes of the new chunk")?;
                    c.varint("  TDELTA head: the chunk's first bytes are the base's")?;
                    c.varint("  TDELTA tail: the chunk's last bytes are the base's")?;
                    let plen = c.varint("  TDELTA plen")?;
                    c.take(
                        plen as usize,
                        format!(
                            "  TDELTA payload: one zstd frame of the chunk's middle, with the \
                             base's middle as prefix ({plen} bytes)"
                        ),
                    )?;
                }
                8 => {
                    c.varint_then("  ERUN count", |_| {
                        "chunks, from the first id on by successor hints, some edited".to_owned()
                    })?;
                    c.id("  ERUN first id")?;
                    c.take(
                        16,
                        "  ERUN digest: BLAKE3 of the ids of the chunks it stands for (edits' own \
                         ids), 16 bytes"
                            .into(),
                    )?;
                    let n = c.varint("  ERUN n_edits")?;
                    for _ in 0..n {
                        c.varint("    edit gap: chunks of the run before it not yet placed")?;
                        c.varint("    edit raw_len: bytes of the edited chunk")?;
                        c.varint("    edit head: its first bytes are the walked chunk's")?;
                        c.varint("    edit tail: its last bytes are the walked chunk's")?;
                        let plen = c.varint("    edit plen")?;
                        c.take(
                            plen as usize,
                            format!(
                                "    edit payload: one zstd frame of the chunk's middle, with the \
                                 walked chunk's middle as prefix, without its magic number \
                                 ({plen} bytes)"
                            ),
                        )?;
                    }
                }
                _ => return Err(format!("op tag {tag}")),
            }
            self.seen.ops[usize::from(tag)] = true;
            tags.push(tag);
        }
        self.batches.push(tags);
        self.literals(c, body_end)
    }

    fn fill(&mut self, c: &mut Cursor<'_>) -> Result<(), String> {
        let body_end = c.pos + body_len_of(c)?;
        let seq = c.varint("FILL seq")?;
        let tag = |op: u64| {
            self.batches
                .get(seq as usize)
                .and_then(|b| b.get(op as usize))
                .copied()
        };
        let op = c.varint_then("FILL op", |op| match tag(op) {
            Some(t) => format!(
                "answers a {} (op {op} of batch {seq})",
                OP_NAMES[usize::from(t)]
            ),
            None => "an op never sent".to_owned(),
        })?;
        let tag = tag(op).ok_or("FILL of an op never sent")?;
        let n = c.varint_then("FILL n_lens", |n| match n {
            0 => "the bytes stand for one op".to_owned(),
            n => format!("the run's {n} chunk lengths follow"),
        })?;
        for _ in 0..n {
            c.varint("  chunk length")?;
        }
        self.seen.fills[usize::from(tag)] = true;
        self.literals(c, body_end)
    }
}

/// The body length just parsed (the last field) of the message whose body starts at `c.pos`.
fn body_len_of(c: &Cursor<'_>) -> Result<usize, String> {
    let (bytes, _) = c.fields.last().ok_or("no body length")?;
    let mut v = 0usize;
    for (i, b) in bytes.iter().enumerate() {
        v |= usize::from(b & 0x7f) << (7 * i);
    }
    Ok(v)
}

// ---------------------------------------------------------------------------------------------
// The generator.

/// What the application does in a vector.
enum Act {
    Stream,
    LoseStore,
    Write(Vec<u8>),
    Flush,
    Finish,
}

/// Deterministic text: words of a small vocabulary with numbers, from a fixed seed.
fn text(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "select", "from", "where", "backup", "replica", "chunk", "the", "of", "and", "table",
        "index", "insert", "value", "commit", "segment", "stream", "ditto", "wan", "link", "\n",
    ];
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut v = Vec::with_capacity(len + 16);
    while v.len() < len {
        let r = next();
        v.extend_from_slice(WORDS[(r % WORDS.len() as u64) as usize].as_bytes());
        v.push(b' ');
        if r % 7 == 0 {
            v.extend_from_slice(format!("{}", (r >> 20) % 100_000).as_bytes());
            v.push(b' ');
        }
    }
    v.truncate(len);
    v
}

fn small_chunks(zstd_level: i32) -> EngineConfig {
    EngineConfig {
        chunking: ChunkParams {
            min_size: 64,
            avg_size: 256,
            max_size: 1024,
        },
        zstd_level,
        ..EngineConfig::default()
    }
}

/// Emits `bytes` as lines of `kw`, 32 bytes a line, the first with `comment`.
fn put_lines(o: &mut String, kw: &str, bytes: &[u8], comment: &str) {
    for (i, part) in bytes.chunks(32).enumerate() {
        let h = hex(part);
        if i == 0 && !comment.is_empty() {
            let _ = writeln!(o, "{kw:<8} {h:<64}  # {comment}");
        } else {
            let _ = writeln!(o, "{kw:<8} {h}");
        }
    }
}

/// Runs `acts` through a real encoder and decoder and writes the transcript.
fn generate(title: &str, about: &str, cfg: EngineConfig, acts: &[Act]) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "# ditto dedup stream test vector: {title}");
    for l in about.lines() {
        let _ = writeln!(o, "# {l}");
    }
    let _ = writeln!(
        o,
        "# Format and replay rules: docs/protocol.md, \"Test vectors\". Written by dedup/tests/vectors.rs."
    );
    let _ = writeln!(o, "{}", config_line(&cfg));
    let a = ram_store();
    let mut b = ram_store();
    let view_a = Arc::new(PeerView::new(b.identity()));
    let mut enc: Option<Encoder> = None;
    let mut dec: Option<Decoder> = None;
    let mut data_ann = Annotator::new(true);
    let mut fb_ann = Annotator::new(false);
    let (mut written, mut decoded) = (Vec::new(), Vec::new());
    for act in acts {
        let mut out = Vec::new();
        match act {
            Act::Stream => {
                let _ = writeln!(o, "\nstream");
                enc = Some(Encoder::new(a.clone(), view_a.clone(), cfg.clone()));
                let view_b = Arc::new(PeerView::new(a.identity()));
                dec = Some(Decoder::new(b.clone(), view_b, cfg.clone()));
                data_ann = Annotator::new(true);
                fb_ann = Annotator::new(false);
                continue;
            }
            Act::LoseStore => {
                let _ = writeln!(o, "\ndecoder-loses-store");
                b = ram_store();
                continue;
            }
            Act::Write(w) => {
                let _ = writeln!(o);
                put_lines(&mut o, "write", w, &format!("{} bytes", w.len()));
                enc.as_mut().expect("stream").write(w, &mut out);
                written.extend_from_slice(w);
            }
            Act::Flush => {
                let _ = writeln!(o, "\nflush");
                enc.as_mut().expect("stream").flush(&mut out);
            }
            Act::Finish => {
                let _ = writeln!(o, "\nfinish");
                enc.as_mut().expect("stream").finish(&mut out);
            }
        }
        let (enc, dec) = (enc.as_mut().expect("stream"), dec.as_mut().expect("stream"));
        // Carry both directions until nothing is in flight.
        while !out.is_empty() {
            for (bytes, what) in data_ann.annotate(&out).expect("annotate data") {
                put_lines(&mut o, "data", &bytes, &what);
            }
            dec.receive(&out)
                .expect("decoder accepts the encoder's stream");
            out.clear();
            let mut got = Vec::new();
            dec.read(&mut got).expect("decodes");
            put_lines(
                &mut o,
                "output",
                &got,
                &format!("{} decoded bytes", got.len()),
            );
            decoded.extend_from_slice(&got);
            let mut fb = Vec::new();
            dec.feedback(&mut fb);
            for (bytes, what) in fb_ann.annotate(&fb).expect("annotate feedback") {
                put_lines(&mut o, "feedback", &bytes, &what);
            }
            enc.feedback(&fb, &mut out)
                .expect("encoder accepts the feedback");
        }
    }
    assert!(decoded == written, "{title}: decoded bytes differ");
    o
}

/// The chunks `data` is cut into with `cfg`.
fn chunks_of(cfg: &EngineConfig, data: &[u8]) -> Vec<Vec<u8>> {
    let mut pos = 0;
    ditto_dedup::chunker::chunk_all(cfg.chunking, data)
        .into_iter()
        .map(|len| {
            let c = data[pos..pos + len].to_vec();
            pos += len;
            c
        })
        .collect()
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// The second stream of the reference vectors: chunks 0-2 and the first 40 bytes of chunk 3, a
/// flush (a RUN and a PARTREF), then the rest of chunk 3 (a REF that completes the open chunk), chunk
/// 4 (a REF: what follows it is new) and new text (LITs). A boundary can depend on the byte after it,
/// so the new text starts with the two bytes that followed chunk 4 before.
fn second_stream(c: &[Vec<u8>]) -> Vec<Act> {
    vec![
        Act::Stream,
        Act::Write(cat(&[&c[0], &c[1], &c[2], &c[3][..40]])),
        Act::Flush,
        Act::Write(cat(&[&c[3][40..], &c[4], &c[5][..2], &text(99, 200)])),
        Act::Finish,
    ]
}

#[test]
#[ignore]
fn write_vectors() {
    let dir = vectors_dir();
    std::fs::create_dir_all(&dir).expect("mkdir");

    // Literals: PART on a flush, LIT when a chunk completes, CUT when a flush had already sent past
    // the boundary the chunker finds once more bytes arrive. Search for a flush point that makes one.
    let cfg = small_chunks(0);
    let data = text(1, 1400);
    let mut made = None;
    for k in 100..data.len() {
        let acts = vec![
            Act::Stream,
            Act::Write(data[..k].to_vec()),
            Act::Flush,
            Act::Write(data[k..].to_vec()),
            Act::Finish,
        ];
        let v = generate(
            "literals",
            "One stream, literals only (zstd off): a write, a flush (PART), the rest and the end.\n\
             The flush falls where the chunker can judge a boundary only with the next byte: a CUT.",
            cfg.clone(),
            &acts,
        );
        if v.contains("0x05 CUT") {
            made = Some(v);
            break;
        }
    }
    let v = made.expect("a flush point that makes a CUT");
    std::fs::write(dir.join("dedup-1-literals.txt"), v).expect("write");

    // References: a first stream of new text (LITs), then a second that repeats parts of it.
    let data = text(2, 3600);
    let c = chunks_of(&cfg, &data);
    assert!(c.len() >= 8, "{} chunks", c.len());
    let mut acts = vec![Act::Stream, Act::Write(data.clone()), Act::Finish];
    acts.extend(second_stream(&c));
    let v = generate(
        "references",
        "Two streams on the same pair of stores (zstd off). The first sends new text: LITs. The\n\
         second sends chunks 0-2 of it again and the first 40 bytes of chunk 3, then flushes: one RUN\n\
         (the decoder follows its successor hints from chunk 0 and checks the digest) and a PARTREF\n\
         (the bytes are a prefix of the chunk that followed chunk 2 last time). Then the rest of\n\
         chunk 3 (a REF that completes the open chunk), chunk 4 (a REF) and new text (LITs).",
        cfg.clone(),
        &acts,
    );
    std::fs::write(dir.join("dedup-2-references.txt"), v).expect("write");

    // NEED and FILL: the same, but the decoder's side lost its store between the streams.
    let mut acts = vec![Act::Stream, Act::Write(data.clone()), Act::Finish];
    acts.push(Act::LoseStore);
    acts.extend(second_stream(&c));
    let v = generate(
        "need-fill",
        "As dedup-2-references, but the decoder's side lost its store between the two streams\n\
         (restarted without a disk tier). The encoder still believes the peer holds the chunks; the\n\
         decoder requests every op it cannot resolve (NEED) and the encoder answers each with the\n\
         exact bytes (FILL): for a RUN with the lengths of its chunks.",
        cfg,
        &acts,
    );
    std::fs::write(dir.join("dedup-3-need-fill.txt"), v).expect("write");

    // DELTA (as builds before tunnel protocol 5 send it) and TDELTA, with zstd literals.
    std::fs::write(dir.join("dedup-4-delta.txt"), delta_vector(false)).expect("write");
    std::fs::write(dir.join("dedup-5-tdelta.txt"), delta_vector(true)).expect("write");
    std::fs::write(dir.join("dedup-6-erun.txt"), erun_vector()).expect("write");
}

/// Two chunks edited in place, with unchanged chunks before, between and after them: one ERUN
/// (tunnel protocol 6) stands for all of them; then, on a decoder that lost its store, the ERUN is
/// requested and filled.
fn erun_vector() -> String {
    let cfg = small_chunks(3);
    let data = text(6, 3000);
    let c = chunks_of(&cfg, &data);
    assert!(c.len() >= 8, "{} chunks", c.len());
    let edit = |chunks: &mut Vec<Vec<u8>>, k: usize, at: usize, with: &[u8]| {
        let p = chunks[k].len() / at;
        chunks[k][p..p + with.len()].copy_from_slice(with);
    };
    let mut second = c.clone();
    edit(&mut second, 2, 3, b"XYZ");
    edit(&mut second, 5, 2, b"QRS");
    let mut third = second.clone();
    edit(&mut third, 5, 3, b"T");
    let acts = vec![
        Act::Stream,
        Act::Write(data.clone()),
        Act::Finish,
        Act::Stream,
        Act::Write(second.concat()),
        Act::Finish,
        Act::LoseStore,
        Act::Stream,
        Act::Write(third.concat()),
        Act::Finish,
    ];
    let v = generate(
        "edited run",
        "Three streams, zstd level 3 (literal sections are zstd frames). The first sends new text.\n\
         The second sends it again with two chunks edited (3 bytes each): one ERUN stands for the\n\
         whole stream, the edited chunks as trimmed deltas against the chunks its walk reaches at\n\
         their places. Then the decoder's side loses its store, and a third stream with one more\n\
         byte changed is requested (NEED) and filled (FILL), the ERUN with its chunk lengths.",
        cfg,
        &acts,
    );
    assert!(
        v.matches("0x08 ERUN").count() >= 2 && v.contains("answers a ERUN "),
        "the edited run vector has no ERUN and FILL of one:\n{v}"
    );
    v
}

/// A chunk edited in place is sent as a delta against its old version (a TDELTA when `trimmed`,
/// else a whole-chunk DELTA); then, on a decoder that lost its store, the delta is requested and
/// filled.
fn delta_vector(trimmed: bool) -> String {
    let (op, title, about) = if trimmed {
        (
            "0x07 TDELTA",
            "trimmed delta",
            "Three streams, zstd level 3 (literal sections are zstd frames). The first sends new\n\
             text. The second sends it again with 3 bytes of one chunk changed: that chunk goes as a\n\
             TDELTA against the chunk at its place last time (its bytes before the first and after\n\
             the last change are the base's), the others as references. Then the decoder's side\n\
             loses its store, and a third stream with one more byte changed in the same chunk is\n\
             requested (NEED) and filled (FILL), the TDELTA included.",
        )
    } else {
        (
            "0x06 DELTA",
            "delta",
            "Three streams, zstd level 3 (literal sections are zstd frames), from an encoder for a\n\
             peer older than tunnel protocol 5. The first sends new text. The second sends it again\n\
             with 3 bytes of one chunk changed: that chunk goes as a DELTA against the chunk at its\n\
             place last time, the others as references. Then the decoder's side loses its store, and\n\
             a third stream with one more byte changed in the same chunk is requested (NEED) and\n\
             filled (FILL), the DELTA included.",
        )
    };
    let cfg = EngineConfig {
        trimmed_deltas: trimmed,
        edited_runs: false,
        ..small_chunks(3)
    };
    let data = text(4, 2600);
    let c = chunks_of(&cfg, &data);
    for victim in 1..c.len() - 2 {
        for at in [c[victim].len() / 3, c[victim].len() / 2] {
            let mut edited = c[victim].clone();
            edited[at..at + 3].copy_from_slice(b"XYZ");
            let mut second: Vec<u8> = c[..victim].concat();
            second.extend_from_slice(&edited);
            second.extend_from_slice(&c[victim + 1..].concat());
            let mut third = second.clone();
            third[c[..victim].concat().len() + at + 4] ^= 0x20;
            let acts = vec![
                Act::Stream,
                Act::Write(data.clone()),
                Act::Finish,
                Act::Stream,
                Act::Write(second),
                Act::Finish,
                Act::LoseStore,
                Act::Stream,
                Act::Write(third),
                Act::Finish,
            ];
            let v = generate(title, about, cfg.clone(), &acts);
            let name = &op[5..];
            if v.matches(op).count() >= 2 && v.contains(&format!("answers a {name} ")) {
                return v;
            }
        }
    }
    panic!("no edit makes a {op}");
}

#[test]
fn vector_parser_round_trips_its_own_lines() {
    let cfg = small_chunks(3);
    let text = format!(
        "# c\n{}\nstream\nwrite 0102  # two bytes\nwrite 03\nflush\ndata d1700100\noutput 010203\nfeedback d1700101\n",
        config_line(&cfg)
    );
    let steps = parse(&text).expect("parse");
    assert_eq!(steps.len(), 7);
    assert!(matches!(&steps[2], Step::Write(w) if w == &[1, 2, 3]));
    assert!(
        matches!(&steps[0], Step::Config(c) if c.zstd_level == 3 && c.chunking.avg_size == 256)
    );
    assert!(parse("bogus 00\n").is_err());
    assert!(parse("data 0\n").is_err());
}
