//! On-disk record format of segment files, and the recovery scanner.
//!
//! Every record is a 32-byte header followed by a payload:
//!
//! ```text
//! 0..4    tag      b"dTC\x01" (chunk) or b"dTS\x01" (successor hint)
//! 4..8    len      payload length, u32 little endian
//! 8..24   id       chunk record: the chunk's id; successor record: the predecessor's id
//! 24..32  check    first 8 bytes of blake3(header[0..24] ++ checked payload)
//! ```
//!
//! The checked payload is the whole payload for successor records (16 bytes: the successor's id). For
//! chunk records the payload is covered by the id itself (`id = blake3(payload)[..16]`), so the check
//! covers only the header and the payload is never hashed twice on the write path.
//!
//! All multi-byte fields are little endian. Nothing read from a file is trusted before its check (and,
//! for chunk payloads, the blake3 id) matches.
//!
//! # Sealed records (a store with a key, see the `seal` module)
//!
//! ```text
//! 0..4    tag      b"dTC\x02" (chunk) or b"dTS\x02" (successor hint)
//! 4..8    len      payload length, u32 little endian (successor: 16)
//! 8..20   nonce    AES-256-GCM nonce
//! 20..28  check    first 8 bytes of blake3(header[0..20]): finds record boundaries after garbage
//! 28..    payload  sealed: `len` bytes (successor record: the successor's id)
//! then    id       sealed, 16 bytes: chunk record: the chunk's id; successor record: the predecessor's id
//! then    tag      16 bytes, the AEAD tag over payload and id
//! ```
//!
//! (The payload comes first so that a read can open the record and move the payload to the start of
//! its buffer in one pass.)
//!
//! The associated data is bytes 0..8 of the header, the segment's sequence number and the record's
//! offset in its segment: a record opens only where it was written, in the store incarnation that
//! wrote it. Nothing of the chunk (contents or id) is in plain text. A record that does not open
//! counts like a chunk whose payload does not match its id.

use super::seal::{Sealer, NONCE_LEN, TAG_LEN};
use crate::{ChunkId, CHUNK_ID_LEN};

pub(crate) const HDR: usize = 32;
pub(crate) const TAG_CHUNK: [u8; 4] = *b"dTC\x01";
pub(crate) const TAG_SUCC: [u8; 4] = *b"dTS\x01";
/// Largest chunk the store accepts.
pub const MAX_CHUNK_LEN: usize = 16 << 20;
/// Bytes of a successor record.
pub(crate) const SUCC_RECORD_LEN: usize = HDR + CHUNK_ID_LEN;
pub(crate) const TAG_CHUNK_SEALED: [u8; 4] = *b"dTC\x02";
pub(crate) const TAG_SUCC_SEALED: [u8; 4] = *b"dTS\x02";
/// Plain-text header of a sealed record.
const SEALED_HDR: usize = 8 + NONCE_LEN + 8;
/// Offset of the payload in a sealed record.
pub(crate) const SEALED_PRE: usize = SEALED_HDR;
/// Bytes of a sealed record after its payload: the sealed id and the tag.
const SEALED_POST: usize = CHUNK_ID_LEN + TAG_LEN;

/// Which record format a store writes and reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Format {
    /// Plain records (a store without a key).
    Plain,
    /// Sealed records (a store with a key).
    Sealed,
}

impl Format {
    /// Bytes of a record before its payload.
    pub(crate) fn pre(self) -> usize {
        match self {
            Format::Plain => HDR,
            Format::Sealed => SEALED_PRE,
        }
    }

    /// Bytes of a record after its payload.
    pub(crate) fn post(self) -> usize {
        match self {
            Format::Plain => 0,
            Format::Sealed => SEALED_POST,
        }
    }

    /// Bytes of a record besides its payload.
    pub(crate) fn overhead(self) -> usize {
        self.pre() + self.post()
    }

    /// Bytes of a successor record.
    pub(crate) fn succ_len(self) -> usize {
        match self {
            Format::Plain => SUCC_RECORD_LEN,
            Format::Sealed => SEALED_PRE + CHUNK_ID_LEN + SEALED_POST,
        }
    }

    /// Appends a chunk record (a sealed one still to be sealed with [`seal_all`]).
    pub(crate) fn encode_chunk(self, out: &mut Vec<u8>, id: &ChunkId, data: &[u8]) {
        match self {
            Format::Plain => encode_chunk(out, id, data),
            Format::Sealed => unsealed(out, TAG_CHUNK_SEALED, id, data),
        }
    }

    /// Appends a successor record (a sealed one still to be sealed with [`seal_all`]).
    pub(crate) fn encode_succ(self, out: &mut Vec<u8>, prev: &ChunkId, next: &ChunkId) {
        match self {
            Format::Plain => encode_succ(out, prev, next),
            Format::Sealed => unsealed(out, TAG_SUCC_SEALED, prev, next.as_bytes()),
        }
    }
}

/// Appends a sealed record's plain text: header without nonce and check, payload, id, room for the tag.
fn unsealed(out: &mut Vec<u8>, tag: [u8; 4], id: &ChunkId, payload: &[u8]) {
    debug_assert!(payload.len() <= MAX_CHUNK_LEN);
    out.extend_from_slice(&tag);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&[0u8; NONCE_LEN + 8]);
    out.extend_from_slice(payload);
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(&[0u8; TAG_LEN]);
}

/// Seals every record of `buf` (records appended by [`Format::encode_chunk`] and
/// [`Format::encode_succ`] in the sealed format, back to back) for the place it is written to:
/// segment `seq`, starting at offset `at`.
pub(crate) fn seal_all(sealer: &Sealer, buf: &mut [u8], seq: u32, at: u64) {
    let mut p = 0;
    while p + SEALED_PRE <= buf.len() {
        let len = u32::from_le_bytes([buf[p + 4], buf[p + 5], buf[p + 6], buf[p + 7]]) as usize;
        let end = p + SEALED_PRE + len + SEALED_POST;
        let Some(rec) = buf.get_mut(p..end) else {
            debug_assert!(false, "seal_all: a record runs past the buffer");
            return;
        };
        let nonce = sealer.fresh_nonce();
        rec[8..8 + NONCE_LEN].copy_from_slice(&nonce);
        let c = check(&rec[..8 + NONCE_LEN], &[]);
        rec[8 + NONCE_LEN..SEALED_HDR].copy_from_slice(&c);
        let (head, body) = rec.split_at_mut(SEALED_HDR);
        let (body, tag) = body.split_at_mut(len + CHUNK_ID_LEN);
        let t = sealer.seal_record(nonce, &head[..8], seq, at + p as u64, body);
        tag.copy_from_slice(&t);
        p = end;
    }
}

/// The header of the sealed record at `p`, if it is one: (whether it is a chunk record, payload
/// length).
fn sealed_header(buf: &[u8], p: usize) -> Option<(bool, usize)> {
    let h = buf.get(p..p + SEALED_HDR)?;
    let tag = [h[0], h[1], h[2], h[3]];
    let chunk = match tag {
        TAG_CHUNK_SEALED => true,
        TAG_SUCC_SEALED => false,
        _ => return None,
    };
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
    if len > MAX_CHUNK_LEN || (!chunk && len != CHUNK_ID_LEN) {
        return None;
    }
    if check(&h[..8 + NONCE_LEN], &[]) != h[8 + NONCE_LEN..SEALED_HDR] {
        return None;
    }
    Some((chunk, len))
}

/// Opens the sealed record at `p` in place (its id and payload become plain text in `buf`).
fn open_sealed_at(buf: &mut [u8], p: usize, sealer: &Sealer, seq: u32) -> Step {
    let Some((chunk, len)) = sealed_header(buf, p) else {
        return Step::Bad;
    };
    let end = p + SEALED_PRE + len + SEALED_POST;
    let Some(rec) = buf.get_mut(p..end) else {
        return Step::Truncated;
    };
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&rec[8..8 + NONCE_LEN]);
    let (head, body) = rec.split_at_mut(SEALED_HDR);
    if !sealer.open_record(nonce, &head[..8], seq, p as u64, body) {
        return Step::BadPayload(end);
    }
    let payload = p + SEALED_PRE;
    let id = id_at(buf, payload + len);
    let rec = if chunk {
        Record::Chunk {
            id,
            payload,
            len: len as u32,
        }
    } else {
        Record::Succ {
            prev: id,
            next: id_at(buf, payload),
        }
    };
    Step::Ok(rec, end)
}

/// Opens one sealed chunk record read back from disk: `rec` holds the whole record, written at
/// `off` in segment `seq`. True if the record opens and holds chunk `id`: then `rec` starts with the
/// payload (decrypted and moved in one pass).
pub(crate) fn open_chunk(
    sealer: &Sealer,
    rec: &mut [u8],
    seq: u32,
    off: u64,
    id: &ChunkId,
) -> bool {
    let Some((true, len)) = sealed_header(rec, 0) else {
        return false;
    };
    if rec.len() != SEALED_PRE + len + SEALED_POST {
        return false;
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&rec[8..8 + NONCE_LEN]);
    let head = [
        rec[0], rec[1], rec[2], rec[3], rec[4], rec[5], rec[6], rec[7],
    ];
    match sealer.open_record_within(nonce, &head, seq, off, rec, SEALED_PRE) {
        Some(plain) => plain.get(len..) == Some(id.as_bytes()),
        None => false,
    }
}

fn check(head: &[u8], payload: &[u8]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(head);
    h.update(payload);
    let mut out = [0u8; 8];
    out.copy_from_slice(&h.finalize().as_bytes()[..8]);
    out
}

fn put_header(out: &mut Vec<u8>, tag: [u8; 4], len: u32, id: &ChunkId, checked_payload: &[u8]) {
    let start = out.len();
    out.extend_from_slice(&tag);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    let c = check(&out[start..start + 24], checked_payload);
    out.extend_from_slice(&c);
}

/// Appends a chunk record; `data.len()` must be at most [`MAX_CHUNK_LEN`].
pub(crate) fn encode_chunk(out: &mut Vec<u8>, id: &ChunkId, data: &[u8]) {
    debug_assert!(data.len() <= MAX_CHUNK_LEN);
    put_header(out, TAG_CHUNK, data.len() as u32, id, &[]);
    out.extend_from_slice(data);
}

/// Appends a successor record.
pub(crate) fn encode_succ(out: &mut Vec<u8>, prev: &ChunkId, next: &ChunkId) {
    put_header(out, TAG_SUCC, CHUNK_ID_LEN as u32, prev, next.as_bytes());
    out.extend_from_slice(next.as_bytes());
}

/// A record that passed all checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Record {
    /// A verified chunk; its payload is `buf[payload..payload + len]`.
    Chunk {
        id: ChunkId,
        payload: usize,
        len: u32,
    },
    Succ {
        prev: ChunkId,
        next: ChunkId,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// A valid record ending at `end`.
    Ok(Record, usize),
    /// A valid header whose chunk payload does not hash to the id; the record ends at `end`.
    BadPayload(usize),
    /// A valid header whose payload runs past the end of the buffer (a torn write).
    Truncated,
    /// No valid header here.
    Bad,
}

fn id_at(buf: &[u8], at: usize) -> ChunkId {
    let mut id = [0u8; CHUNK_ID_LEN];
    id.copy_from_slice(&buf[at..at + CHUNK_ID_LEN]);
    ChunkId(id)
}

fn parse_at(buf: &[u8], p: usize) -> Step {
    let Some(h) = buf.get(p..p + HDR) else {
        return Step::Bad;
    };
    let tag = [h[0], h[1], h[2], h[3]];
    if tag != TAG_CHUNK && tag != TAG_SUCC {
        return Step::Bad;
    }
    let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len as usize > MAX_CHUNK_LEN || (tag == TAG_SUCC && len as usize != CHUNK_ID_LEN) {
        return Step::Bad;
    }
    let payload = p + HDR;
    let end = payload + len as usize;
    let id = id_at(h, 8);
    if tag == TAG_CHUNK {
        if check(&h[..24], &[]) != h[24..32] {
            return Step::Bad;
        }
        let Some(data) = buf.get(payload..end) else {
            return Step::Truncated;
        };
        if !id.matches(data) {
            return Step::BadPayload(end);
        }
        Step::Ok(Record::Chunk { id, payload, len }, end)
    } else {
        let Some(data) = buf.get(payload..end) else {
            // The check covers the payload, so a short successor record cannot be told from garbage.
            return Step::Truncated;
        };
        if check(&h[..24], data) != h[24..32] {
            return Step::Bad;
        }
        Step::Ok(
            Record::Succ {
                prev: id,
                next: id_at(data, 0),
            },
            end,
        )
    }
}

/// What a scan of one segment's bytes found, besides the records it reported.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ScanSummary {
    /// End of the last valid record: everything after it is a torn or garbage tail.
    pub good_end: usize,
    /// Chunk records whose payload did not match their id.
    pub bad_payloads: u64,
    /// Stretches of bytes with no valid header (a garbled header, or garbage) that were skipped,
    /// including a garbage tail.
    pub bad_regions: u64,
}

/// Walks the records in `buf`, calling `visit` for every valid one, resynchronising after garbage by
/// searching for the next position holding a valid header.
pub(crate) fn scan(buf: &[u8], mut visit: impl FnMut(Record)) -> ScanSummary {
    let mut sum = ScanSummary::default();
    let mut p = 0;
    while p < buf.len() {
        match parse_at(buf, p) {
            Step::Ok(rec, end) => {
                visit(rec);
                p = end;
                sum.good_end = end;
            }
            Step::BadPayload(end) => {
                sum.bad_payloads += 1;
                p = end;
            }
            Step::Truncated => {
                sum.bad_regions += 1;
                break;
            }
            Step::Bad => {
                sum.bad_regions += 1;
                match resync(buf, p + 1) {
                    Some(q) => p = q,
                    None => break,
                }
            }
        }
    }
    sum
}

/// Same for a sealed segment (number `seq`): every record is opened in place, so `buf` ends up with
/// the plain text of the records reported.
pub(crate) fn scan_sealed(
    buf: &mut [u8],
    sealer: &Sealer,
    seq: u32,
    visit: impl FnMut(Record),
) -> ScanSummary {
    let mut sum = ScanSummary::default();
    let mut visit = visit;
    let mut p = 0;
    while p < buf.len() {
        match open_sealed_at(buf, p, sealer, seq) {
            Step::Ok(rec, end) => {
                visit(rec);
                p = end;
                sum.good_end = end;
            }
            Step::BadPayload(end) => {
                sum.bad_payloads += 1;
                p = end;
            }
            Step::Truncated => {
                sum.bad_regions += 1;
                break;
            }
            Step::Bad => {
                sum.bad_regions += 1;
                match resync_sealed(buf, p + 1) {
                    Some(q) => p = q,
                    None => break,
                }
            }
        }
    }
    sum
}

/// The first position at or after `from` holding a valid sealed record header.
fn resync_sealed(buf: &[u8], from: usize) -> Option<usize> {
    let mut q = from;
    while q + SEALED_HDR <= buf.len() {
        let off = buf[q..].windows(2).position(|w| w == &TAG_CHUNK[..2])?;
        q += off;
        if sealed_header(buf, q).is_some() {
            return Some(q);
        }
        q += 1;
    }
    None
}

/// The first position at or after `from` where a structurally valid record starts.
fn resync(buf: &[u8], from: usize) -> Option<usize> {
    let mut q = from;
    while q + HDR <= buf.len() {
        // Both tags start with "dT".
        let off = buf[q..].windows(2).position(|w| w == &TAG_CHUNK[..2])?;
        q += off;
        match parse_at(buf, q) {
            Step::Ok(..) | Step::BadPayload(_) => return Some(q),
            // A valid header whose payload is cut off: the torn tail starts here.
            Step::Truncated => return Some(q),
            Step::Bad => q += 1,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Vec<u8>, Vec<ChunkId>) {
        let mut buf = Vec::new();
        let mut ids = Vec::new();
        for n in 0..5u8 {
            let data = vec![n; 100 + n as usize];
            let id = ChunkId::of(&data);
            encode_chunk(&mut buf, &id, &data);
            ids.push(id);
        }
        encode_succ(&mut buf, &ids[0], &ids[1]);
        (buf, ids)
    }

    fn chunks(buf: &[u8]) -> (Vec<ChunkId>, ScanSummary) {
        let mut out = Vec::new();
        let s = scan(buf, |r| {
            if let Record::Chunk { id, .. } = r {
                out.push(id)
            }
        });
        (out, s)
    }

    #[test]
    fn clean_scan() {
        let (buf, ids) = sample();
        let mut succ = None;
        let s = scan(&buf, |r| {
            if let Record::Succ { prev, next } = r {
                succ = Some((prev, next))
            }
        });
        assert_eq!(
            s,
            ScanSummary {
                good_end: buf.len(),
                bad_payloads: 0,
                bad_regions: 0
            }
        );
        assert_eq!(succ, Some((ids[0], ids[1])));
    }

    #[test]
    fn garbled_header_resyncs_to_next_record() {
        let (mut buf, ids) = sample();
        let second = HDR + 100;
        buf[second + 10] ^= 1;
        let (found, s) = chunks(&buf);
        assert_eq!(found, vec![ids[0], ids[2], ids[3], ids[4]]);
        assert_eq!(s.bad_regions, 1);
        assert_eq!(s.good_end, buf.len());
    }

    #[test]
    fn bad_payload_skipped() {
        let (mut buf, ids) = sample();
        buf[HDR + 5] ^= 0x40;
        let (found, s) = chunks(&buf);
        assert_eq!(found, ids[1..].to_vec());
        assert_eq!(s.bad_payloads, 1);
    }

    #[test]
    fn torn_and_garbage_tails() {
        let (buf, ids) = sample();
        let end_of_4 = buf.len() - SUCC_RECORD_LEN;
        for cut in 1..(HDR + 104 + SUCC_RECORD_LEN) {
            let (found, s) = chunks(&buf[..buf.len() - cut]);
            assert!(s.good_end <= buf.len() - cut);
            assert!(found.iter().all(|id| ids.contains(id)));
            if cut <= SUCC_RECORD_LEN {
                assert_eq!(s.good_end, end_of_4);
            }
        }
        let mut g = buf.clone();
        g.extend_from_slice(b"dTC\x01 garbage that is not a record at all.........");
        let (found, s) = chunks(&g);
        assert_eq!(found, ids);
        assert_eq!(s.good_end, buf.len());
        assert_eq!(s.bad_regions, 1);
    }
}
