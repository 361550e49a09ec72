//! The byte encoding of the deduplicated stream (see docs/protocol.md, which is normative).
//!
//! Two byte streams run per direction of a connection: the *data* stream (encoder to decoder) and the
//! *feedback* stream (decoder back to encoder). Each starts with a 4-byte header (magic, version, kind)
//! and continues as a sequence of messages `type:u8, body_len:varint, body`. Every length read from the
//! wire is checked against a limit before anything is allocated for it.

use crate::fingerprint::{ChunkId, CHUNK_ID_LEN};

/// Protocol version carried in every stream header.
pub const VERSION: u8 = 1;
/// First two bytes of every stream.
pub const MAGIC: [u8; 2] = [0xD1, 0x70];
/// Stream kinds (fourth header byte).
pub const KIND_DATA: u8 = 0;
pub const KIND_FEEDBACK: u8 = 1;
pub const HEADER_LEN: usize = 4;

/// Data stream message types.
pub const MSG_BATCH: u8 = 0x01;
pub const MSG_FILL: u8 = 0x02;
/// Feedback stream message types.
pub const MSG_ACK: u8 = 0x11;
pub const MSG_NEED: u8 = 0x12;

/// Op tags inside a batch.
pub const OP_LIT: u8 = 0x00;
pub const OP_PART: u8 = 0x01;
pub const OP_REF: u8 = 0x02;
pub const OP_PARTREF: u8 = 0x03;
pub const OP_RUN: u8 = 0x04;
pub const OP_CUT: u8 = 0x05;
pub const OP_DELTA: u8 = 0x06;
/// A delta that keeps the chunk's first and last bytes from its base (tunnel protocol 5 and later;
/// see [`crate::EngineConfig::trimmed_deltas`]).
pub const OP_TDELTA: u8 = 0x07;
/// A run some of whose chunks are edited copies of the chunks the walk reaches (tunnel protocol 6
/// and later; see [`crate::EngineConfig::edited_runs`]).
pub const OP_ERUN: u8 = 0x08;

/// Literal payload codecs.
pub const CODEC_RAW: u8 = 0;
pub const CODEC_ZSTD: u8 = 1;

/// Hard limits a decoder enforces on its input, whatever its peer's configuration.
pub const MAX_MESSAGE: usize = 8 << 20;
/// Most bytes one batch may decode to (literals, references and runs together).
pub const MAX_BATCH_DECODED: u64 = 64 << 20;
/// Most ops in one batch.
pub const MAX_OPS: usize = 1 << 16;
/// Most chunks in one run.
pub const MAX_RUN: u64 = 4096;
/// Most bytes the edited chunks of one ERUN may decode to (the decoder holds them until the run's
/// digest is checked).
pub const MAX_RUN_EDIT_BYTES: u64 = MAX_BATCH_DECODED / 2;
/// Largest chunk a peer may send or reference.
pub const MAX_CHUNK: usize = 1 << 20;

/// Why the bytes from a peer could not be decoded. Any of these ends the stream; none loses or alters a
/// byte already delivered.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("stream header is not a ditto stream header")]
    BadMagic,
    #[error("unsupported protocol version {0} (this side speaks {VERSION})")]
    UnsupportedVersion(u8),
    #[error("stream kind {got} where {want} was expected")]
    WrongKind { got: u8, want: u8 },
    #[error("unknown message type {0:#04x}")]
    UnknownMessage(u8),
    #[error("unknown op tag {0:#04x}")]
    UnknownOp(u8),
    #[error("unknown literal codec {0}")]
    UnknownCodec(u8),
    #[error("{what} of {got} exceeds the limit of {limit}")]
    TooLarge {
        what: &'static str,
        got: u64,
        limit: u64,
    },
    #[error("message truncated: {0}")]
    Truncated(&'static str),
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("varint too long")]
    BadVarint,
    #[error("compressed literals are corrupt: {0}")]
    Decompress(String),
    #[error("fill for batch {seq} op {op}, which was not requested")]
    UnexpectedFill { seq: u64, op: u64 },
    #[error("fill for batch {seq} op {op} does not match the fingerprint it stands for")]
    FillMismatch { seq: u64, op: u64 },
    #[error(
        "request for batch {seq} op {op}, which is not held (already acknowledged or never sent)"
    )]
    UnknownNeed { seq: u64, op: u64 },
}

/// Appends `v` as an unsigned LEB128 varint.
#[inline]
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Bytes `put_varint(v)` writes.
#[inline]
pub fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

/// Writes a stream header.
pub fn put_header(out: &mut Vec<u8>, kind: u8) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
}

/// Checks a stream header.
pub fn check_header(h: &[u8], want_kind: u8) -> Result<(), WireError> {
    if h[..2] != MAGIC {
        return Err(WireError::BadMagic);
    }
    if h[2] != VERSION {
        return Err(WireError::UnsupportedVersion(h[2]));
    }
    if h[3] != want_kind {
        return Err(WireError::WrongKind {
            got: h[3],
            want: want_kind,
        });
    }
    Ok(())
}

/// Appends a message: type, body length, body (the body is produced by `body` into `out` directly).
pub fn put_message(out: &mut Vec<u8>, ty: u8, body: &[u8]) {
    out.push(ty);
    put_varint(out, body.len() as u64);
    out.extend_from_slice(body);
}

/// A bounds-checked reader over a message body.
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == self.buf.len()
    }

    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        let b = *self.buf.get(self.pos).ok_or(WireError::Truncated(what))?;
        self.pos += 1;
        Ok(b)
    }

    pub fn varint(&mut self, what: &'static str) -> Result<u64, WireError> {
        match read_varint(&self.buf[self.pos..])? {
            Some((v, n)) => {
                self.pos += n;
                Ok(v)
            }
            None => Err(WireError::Truncated(what)),
        }
    }

    /// A varint that must not exceed `limit`.
    pub fn bounded(&mut self, what: &'static str, limit: u64) -> Result<u64, WireError> {
        let v = self.varint(what)?;
        if v > limit {
            return Err(WireError::TooLarge {
                what,
                got: v,
                limit,
            });
        }
        Ok(v)
    }

    pub fn id(&mut self) -> Result<ChunkId, WireError> {
        let b = self.bytes(CHUNK_ID_LEN, "chunk id")?;
        let mut id = [0u8; CHUNK_ID_LEN];
        id.copy_from_slice(b);
        Ok(ChunkId(id))
    }

    pub fn bytes(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(WireError::Truncated(what));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    pub fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
}

/// Reads a varint from the front of `buf`: `Ok(None)` if `buf` ends inside it.
#[inline]
pub fn read_varint(buf: &[u8]) -> Result<Option<(u64, usize)>, WireError> {
    let mut v: u64 = 0;
    for (i, &b) in buf.iter().enumerate() {
        if i == 9 && b > 1 {
            return Err(WireError::BadVarint);
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Ok(Some((v, i + 1)));
        }
        if i == 9 {
            return Err(WireError::BadVarint);
        }
    }
    Ok(None)
}

/// Splits complete messages off the front of a byte buffer fed in arbitrary pieces.
#[derive(Debug, Default)]
pub struct MessageReader {
    buf: Vec<u8>,
    start: usize,
    header_seen: bool,
}

impl MessageReader {
    /// Adds input bytes.
    pub fn extend(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// Bytes held, not yet returned as messages.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next complete message as `(type, body)`, `Ok(None)` if more bytes are needed. Checks the
    /// stream header first. A declared length over `MAX_MESSAGE` is an error at once.
    pub fn next_message(&mut self, kind: u8) -> Result<Option<(u8, Vec<u8>)>, WireError> {
        if !self.header_seen {
            if self.buffered() < HEADER_LEN {
                // Check what we have early: garbage is refused before it fills a buffer.
                let have = &self.buf[self.start..];
                if !have.is_empty() && have[0] != MAGIC[0] || have.len() >= 2 && have[1] != MAGIC[1]
                {
                    return Err(WireError::BadMagic);
                }
                return Ok(None);
            }
            check_header(&self.buf[self.start..self.start + HEADER_LEN], kind)?;
            self.start += HEADER_LEN;
            self.header_seen = true;
        }
        let avail = &self.buf[self.start..];
        let Some(&ty) = avail.first() else {
            return Ok(None);
        };
        let Some((len, n)) = read_varint(&avail[1..])? else {
            return Ok(None);
        };
        if len > MAX_MESSAGE as u64 {
            return Err(WireError::TooLarge {
                what: "message length",
                got: len,
                limit: MAX_MESSAGE as u64,
            });
        }
        let total = 1 + n + len as usize;
        if avail.len() < total {
            return Ok(None);
        }
        let body = avail[1 + n..total].to_vec();
        self.start += total;
        // Keep the buffer from growing without bound when input keeps arriving in small pieces.
        if self.start > (1 << 20) && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some((ty, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trip() {
        for v in [0u64, 1, 127, 128, 300, 1 << 32, u64::MAX] {
            let mut b = Vec::new();
            put_varint(&mut b, v);
            assert_eq!(b.len(), varint_len(v));
            assert_eq!(read_varint(&b), Ok(Some((v, b.len()))));
            assert_eq!(read_varint(&b[..b.len() - 1]), Ok(None));
        }
        assert_eq!(read_varint(&[0xff; 10]), Err(WireError::BadVarint));
        assert_eq!(
            read_varint(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02]),
            Err(WireError::BadVarint)
        );
    }

    #[test]
    fn oversized_message_refused_before_buffering() {
        let mut r = MessageReader::default();
        let mut b = Vec::new();
        put_header(&mut b, KIND_DATA);
        b.push(MSG_BATCH);
        put_varint(&mut b, MAX_MESSAGE as u64 + 1);
        r.extend(&b);
        assert!(matches!(
            r.next_message(KIND_DATA),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn header_checks() {
        let mut r = MessageReader::default();
        r.extend(b"GET / HTTP/1.1\r\n");
        assert_eq!(r.next_message(KIND_DATA), Err(WireError::BadMagic));
        let mut r = MessageReader::default();
        r.extend(&[0xD1, 0x70, 9, 0]);
        assert_eq!(
            r.next_message(KIND_DATA),
            Err(WireError::UnsupportedVersion(9))
        );
        let mut r = MessageReader::default();
        r.extend(&[0xD1, 0x70, VERSION, KIND_FEEDBACK]);
        assert!(matches!(
            r.next_message(KIND_DATA),
            Err(WireError::WrongKind { .. })
        ));
    }
}
