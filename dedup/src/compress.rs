//! Literal compression: zstd, one independent frame per batch, skipped for data that does not compress.
//!
//! Contexts are kept per thread, not per stream, so a thousand idle streams cost no compressor memory.
//! Decompression writes into a buffer of exactly the declared size: a frame that would expand beyond it
//! (a decompression bomb, or a lie) is an error, never an allocation.

use crate::wire::{WireError, CODEC_RAW, CODEC_ZSTD};
use std::cell::RefCell;
use zstd::zstd_safe::{get_error_name, CCtx, CParameter, DCtx, ResetDirective};

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
    static DELTA_CCTX: RefCell<Option<CCtx<'static>>> = const { RefCell::new(None) };
    static DELTA_DCTX: RefCell<Option<DCtx<'static>>> = const { RefCell::new(None) };
}

/// Below this many bytes compression is not worth a frame header.
const MIN_COMPRESS: usize = 64;

/// Order-0 entropy of a sample of `data`, in bits per byte: a cheap test that skips zstd for data that
/// is already compressed or encrypted.
fn sampled_entropy(data: &[u8]) -> f64 {
    const BLOCK: usize = 256;
    const MAX_SAMPLE: usize = 16 * 1024;
    let mut hist = [0u32; 256];
    let mut n = 0u32;
    let stride = (data.len() / MAX_SAMPLE).max(1) * BLOCK;
    let mut pos = 0;
    while pos < data.len() {
        for &b in &data[pos..(pos + BLOCK).min(data.len())] {
            hist[b as usize] += 1;
            n += 1;
        }
        pos += stride;
    }
    let n = f64::from(n);
    hist.iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = f64::from(c) / n;
            -p * p.log2()
        })
        .sum()
}

/// Appends `codec, raw_len, payload` for `raw` to `out`. Returns the payload length.
pub fn put_literals(out: &mut Vec<u8>, raw: &[u8], level: i32) -> usize {
    let compressed = if level > 0
        && raw.len() >= MIN_COMPRESS
        && (raw.len() < 4096 || sampled_entropy(raw) < 7.9)
    {
        compress(raw, level)
    } else {
        None
    };
    match compressed {
        // Keep the compressed form only if it saves something worth the decoder's time.
        Some(c) if c.len() + c.len() / 32 < raw.len() => {
            out.push(CODEC_ZSTD);
            crate::wire::put_varint(out, raw.len() as u64);
            out.extend_from_slice(&c);
            c.len()
        }
        _ => {
            out.push(CODEC_RAW);
            crate::wire::put_varint(out, raw.len() as u64);
            out.extend_from_slice(raw);
            raw.len()
        }
    }
}

fn compress(raw: &[u8], level: i32) -> Option<Vec<u8>> {
    COMPRESSOR.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|(l, _)| *l != level) {
            *slot = Some((level, zstd::bulk::Compressor::new(level).ok()?));
        }
        let (_, c) = slot.as_mut()?;
        let mut dst = Vec::with_capacity(zstd::zstd_safe::compress_bound(raw.len()));
        c.compress_to_buffer(raw, &mut dst).ok()?;
        Some(dst)
    })
}

/// Decodes `codec, raw_len, payload` from the rest of a message, appending exactly `raw_len` bytes to
/// `out`. `limit` bounds `raw_len`.
pub fn get_literals(
    r: &mut crate::wire::Reader<'_>,
    limit: u64,
    out: &mut Vec<u8>,
) -> Result<(), WireError> {
    let codec = r.u8("literal codec")?;
    let raw_len = r.bounded("literal length", limit)? as usize;
    let payload = r.rest();
    match codec {
        CODEC_RAW => {
            if payload.len() != raw_len {
                return Err(WireError::Malformed(
                    "raw literal length differs from its payload",
                ));
            }
            out.extend_from_slice(payload);
            Ok(())
        }
        CODEC_ZSTD => {
            let mut dst = Vec::with_capacity(raw_len);
            DECOMPRESSOR.with(|cell| {
                let mut slot = cell.borrow_mut();
                if slot.is_none() {
                    *slot = Some(
                        zstd::bulk::Decompressor::new()
                            .map_err(|e| WireError::Decompress(e.to_string()))?,
                    );
                }
                let d = slot
                    .as_mut()
                    .ok_or_else(|| WireError::Decompress("no context".into()))?;
                d.decompress_to_buffer(payload, &mut dst)
                    .map_err(|e| WireError::Decompress(e.to_string()))
            })?;
            if dst.len() != raw_len {
                return Err(WireError::Malformed(
                    "literals decompress to a length other than declared",
                ));
            }
            out.extend_from_slice(&dst);
            Ok(())
        }
        other => Err(WireError::UnknownCodec(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_raw_fallback() {
        let text = b"the quick brown fox jumps over the lazy dog. ".repeat(200);
        let mut out = Vec::new();
        let n = put_literals(&mut out, &text, 3);
        assert!(n < text.len() / 10);
        assert_eq!(out[0], CODEC_ZSTD);
        let mut back = Vec::new();
        get_literals(&mut crate::wire::Reader::new(&out), 1 << 20, &mut back).expect("decode");
        assert_eq!(back, text);

        let noise: Vec<u8> = (0..10_000u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        let mut out = Vec::new();
        put_literals(&mut out, &noise, 3);
        let mut back = Vec::new();
        get_literals(&mut crate::wire::Reader::new(&out), 1 << 20, &mut back).expect("decode");
        assert_eq!(back, noise);
    }

    #[test]
    fn bomb_is_refused() {
        // 64 MiB of zeros compresses to a few KiB; declared as 1 KiB it must fail without expanding.
        let zeros = vec![0u8; 64 << 20];
        let frame = zstd::bulk::compress(&zeros, 3).expect("compress");
        let mut msg = vec![CODEC_ZSTD];
        crate::wire::put_varint(&mut msg, 1024);
        msg.extend_from_slice(&frame);
        let mut back = Vec::new();
        assert!(get_literals(&mut crate::wire::Reader::new(&msg), 1 << 20, &mut back).is_err());
        assert!(back.is_empty());
        // Declared larger than the limit: refused before decompressing.
        let mut msg = vec![CODEC_ZSTD];
        crate::wire::put_varint(&mut msg, 64 << 20);
        msg.extend_from_slice(&frame);
        assert!(matches!(
            get_literals(&mut crate::wire::Reader::new(&msg), 1 << 20, &mut back),
            Err(WireError::TooLarge { .. })
        ));
    }
}

/// The first four bytes of every zstd frame. An ERUN's edits leave them out (the decoder puts them
/// back): 13 KB of a database dump's re-send.
pub const ZSTD_FRAME_MAGIC: [u8; 4] = 0xFD2F_B528u32.to_le_bytes();

/// zstd's dictionary magic number. A delta's base is raw content, a prefix in zstd's terms: the
/// thread's reused contexts load it as a dictionary, which zstd would parse as a formatted
/// dictionary if it began with these bytes, so such a base goes through a fresh context and
/// `refPrefix` instead. (A prefix and a raw-content dictionary make and read the same frames.)
const ZSTD_DICT_MAGIC: [u8; 4] = 0xEC30_A437u32.to_le_bytes();

fn no_dctx() -> WireError {
    WireError::Decompress("no decompression context".into())
}

fn zstd_error(code: usize) -> WireError {
    WireError::Decompress(get_error_name(code).to_string())
}

/// Compresses `data` as a delta against `base` (a zstd frame that uses `base` as its prefix). `None` if
/// zstd fails.
///
/// The thread's compression context is reused from delta to delta: a fresh one per delta spent
/// about a fifth of the time of re-sending an edited database dump creating and clearing contexts.
pub fn delta_compress(base: &[u8], data: &[u8], level: i32) -> Option<Vec<u8>> {
    let level = level.max(1);
    let mut dst = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    if base.starts_with(&ZSTD_DICT_MAGIC) {
        let mut cctx = CCtx::try_create()?;
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .ok()?;
        cctx.ref_prefix(base).ok()?;
        cctx.compress2(&mut dst, data).ok()?;
        return Some(dst);
    }
    DELTA_CCTX.with(|cell| {
        let mut slot = cell.try_borrow_mut().ok()?;
        if slot.is_none() {
            *slot = Some(CCtx::try_create()?);
        }
        let cctx = slot.as_mut()?;
        cctx.reset(ResetDirective::SessionAndParameters).ok()?;
        cctx.set_parameter(CParameter::CompressionLevel(level))
            .ok()?;
        cctx.load_dictionary(base).ok()?;
        cctx.compress2(&mut dst, data).ok()?;
        Some(dst)
    })
}

/// Decodes a delta made by [`delta_compress`]: exactly `raw_len` bytes, or an error. The thread's
/// decompression context is reused, as for compression.
pub fn delta_decompress(base: &[u8], payload: &[u8], raw_len: usize) -> Result<Vec<u8>, WireError> {
    let mut dst = Vec::with_capacity(raw_len);
    if base.starts_with(&ZSTD_DICT_MAGIC) {
        let mut dctx = DCtx::try_create().ok_or_else(no_dctx)?;
        dctx.ref_prefix(base).map_err(zstd_error)?;
        dctx.decompress(&mut dst, payload).map_err(zstd_error)?;
    } else {
        DELTA_DCTX.with(|cell| {
            let mut slot = cell
                .try_borrow_mut()
                .map_err(|_| WireError::Decompress("decompression context in use".into()))?;
            if slot.is_none() {
                *slot = Some(DCtx::try_create().ok_or_else(no_dctx)?);
            }
            let dctx = slot.as_mut().ok_or_else(no_dctx)?;
            dctx.reset(ResetDirective::SessionAndParameters)
                .map_err(zstd_error)?;
            dctx.load_dictionary(base).map_err(zstd_error)?;
            dctx.decompress(&mut dst, payload).map_err(zstd_error)?;
            Ok(())
        })?;
    }
    if dst.len() != raw_len {
        return Err(WireError::Malformed(
            "delta decodes to a length other than declared",
        ));
    }
    Ok(dst)
}

/// How many leading and trailing bytes `data` shares with `base`, never overlapping in either:
/// `head + tail <= min(base.len(), data.len())`.
pub fn common_ends(base: &[u8], data: &[u8]) -> (usize, usize) {
    let head = base.iter().zip(data).take_while(|(a, b)| a == b).count();
    let room = base.len().min(data.len()) - head;
    let tail = base
        .iter()
        .rev()
        .zip(data.iter().rev())
        .take(room)
        .take_while(|(a, b)| a == b)
        .count();
    (head, tail)
}

/// A chunk as a trimmed delta against `base` (a TDELTA op): the chunk's first `head` and last `tail`
/// bytes are the base's, and its middle is a zstd frame against the base's middle. Only the bytes
/// between the first and the last edit are compressed, against only the part of the base they
/// replace, so a small edit costs a fraction of a whole-chunk delta in time and bytes.
pub struct TrimmedDelta {
    pub head: usize,
    pub tail: usize,
    pub payload: Vec<u8>,
}

/// Makes the [`TrimmedDelta`] of `data` against `base`. `None` if zstd fails.
pub fn trimmed_delta_compress(base: &[u8], data: &[u8], level: i32) -> Option<TrimmedDelta> {
    let (head, tail) = common_ends(base, data);
    let payload = delta_compress(
        &base[head..base.len() - tail],
        &data[head..data.len() - tail],
        level,
    )?;
    Some(TrimmedDelta {
        head,
        tail,
        payload,
    })
}

/// Rebuilds a chunk of `raw_len` bytes from a delta against `base` whose first `head` and last
/// `tail` bytes are the base's (both 0 for a whole-chunk DELTA). Ends that do not fit the base or
/// the declared length are an error, never a panic.
pub fn delta_apply(
    base: &[u8],
    head: usize,
    tail: usize,
    payload: &[u8],
    raw_len: usize,
) -> Result<Vec<u8>, WireError> {
    let ends = head
        .checked_add(tail)
        .ok_or(WireError::Malformed("delta ends overflow"))?;
    if ends > raw_len || ends > base.len() {
        return Err(WireError::Malformed(
            "delta ends longer than the chunk or its base",
        ));
    }
    let mid = delta_decompress(&base[head..base.len() - tail], payload, raw_len - ends)?;
    if ends == 0 {
        return Ok(mid);
    }
    let mut out = Vec::with_capacity(raw_len);
    out.extend_from_slice(&base[..head]);
    out.extend_from_slice(&mid);
    out.extend_from_slice(&base[base.len() - tail..]);
    Ok(out)
}

#[cfg(test)]
mod delta_tests {
    use super::*;

    #[test]
    fn delta_of_a_small_edit_is_small() {
        let mut base = vec![0u8; 8000];
        blake3::Hasher::new()
            .update(b"base")
            .finalize_xof()
            .fill(&mut base);
        let mut data = base.clone();
        data[4000] ^= 0xff;
        data.splice(100..100, *b"inserted");
        let d = delta_compress(&base, &data, 3).expect("delta");
        assert!(d.len() < 64, "delta of {} bytes", d.len());
        assert_eq!(
            delta_decompress(&base, &d, data.len()).expect("undelta"),
            data
        );
        // The wrong base never yields the data; a lying length is refused.
        let other = vec![7u8; 8000];
        assert_ne!(
            delta_decompress(&other, &d, data.len()).ok(),
            Some(data.clone())
        );
        assert!(delta_decompress(&base, &d, data.len() - 1).is_err());
    }

    fn random(seed: &[u8], len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        blake3::Hasher::new()
            .update(seed)
            .finalize_xof()
            .fill(&mut v);
        v
    }

    fn roundtrip(base: &[u8], data: &[u8]) -> TrimmedDelta {
        let d = trimmed_delta_compress(base, data, 6).expect("delta");
        assert!(d.head + d.tail <= base.len().min(data.len()));
        let back = delta_apply(base, d.head, d.tail, &d.payload, data.len()).expect("apply");
        assert!(back == data, "trimmed delta did not rebuild the chunk");
        d
    }

    #[test]
    fn trimmed_deltas_rebuild_every_kind_of_edit() {
        let base = random(b"trim", 12_000);
        // A row moved from one place to another and one number in it changed.
        let mut moved = base.clone();
        let row: Vec<u8> = moved.drain(3_000..3_100).collect();
        let at = 7_000;
        moved.splice(at..at, row.iter().copied());
        moved[at + 10] ^= 1;
        let d = roundtrip(&base, &moved);
        assert_eq!((d.head, d.tail), (3_000, 12_000 - 7_100));
        // Edits at the very ends, a pure insertion, a pure deletion, an identical chunk, a chunk
        // that is a prefix of its base, and one with nothing in common.
        let mut first = base.clone();
        first[0] ^= 1;
        let mut last = base.clone();
        last[11_999] ^= 1;
        let mut inserted = base.clone();
        inserted.splice(500..500, *b"new bytes");
        let mut deleted = base.clone();
        deleted.drain(500..600);
        for data in [
            first,
            last,
            inserted,
            deleted,
            base.clone(),
            base[..6_000].to_vec(),
            random(b"other", 9_000),
            Vec::new(),
        ] {
            roundtrip(&base, &data);
        }
        // Repeated bytes: the common ends must not overlap in the shorter of the two.
        roundtrip(&[7u8; 100], &[7u8; 150]);
        roundtrip(&[7u8; 150], &[7u8; 100]);
    }

    /// The frames of the reused contexts (the base loaded as a dictionary) and of a fresh context
    /// with the base as its prefix are interchangeable: a peer of an earlier build reads ours, and
    /// we read its. A base that starts with zstd's dictionary magic is still raw content.
    #[test]
    fn reused_contexts_and_prefixes_read_each_others_deltas() {
        let with_prefix = |base: &[u8], data: &[u8]| {
            let mut cctx = CCtx::create();
            cctx.set_parameter(CParameter::CompressionLevel(6))
                .expect("level");
            cctx.ref_prefix(base).expect("prefix");
            let mut dst = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
            cctx.compress2(&mut dst, data).expect("compress");
            dst
        };
        let read_with_prefix = |base: &[u8], payload: &[u8], len: usize| {
            let mut dctx = DCtx::create();
            dctx.ref_prefix(base).expect("prefix");
            let mut dst = Vec::with_capacity(len);
            dctx.decompress(&mut dst, payload).expect("decompress");
            dst
        };
        let plain = random(b"plain base", 6_000);
        let mut magic = plain.clone();
        magic[..4].copy_from_slice(&ZSTD_DICT_MAGIC);
        for base in [plain, magic] {
            let mut data = base.clone();
            data[3_000] ^= 1;
            data.splice(5_000..5_000, *b"inserted");
            // Several in a row, so a reused context carries nothing from one delta to the next.
            for _ in 0..3 {
                let ours = delta_compress(&base, &data, 6).expect("delta");
                assert!(ours.len() < 100, "a delta of {} bytes", ours.len());
                assert!(read_with_prefix(&base, &ours, data.len()) == data);
                let theirs = with_prefix(&base, &data);
                assert!(delta_decompress(&base, &theirs, data.len()).expect("undelta") == data);
            }
            // A base loaded as a formatted dictionary would fail or differ: it is raw content.
            let other = random(b"other data", 3_000);
            let d = delta_compress(&base, &other, 6).expect("delta");
            assert!(delta_decompress(&base, &d, other.len()).expect("undelta") == other);
        }
    }

    #[test]
    fn trimmed_delta_ends_that_do_not_fit_are_refused() {
        let base = random(b"ends", 1_000);
        let mut data = base.clone();
        data[500] ^= 1;
        let d = trimmed_delta_compress(&base, &data, 6).expect("delta");
        let n = data.len();
        // Ends past the chunk's length or the base's, or that overflow: errors, not panics.
        for (head, tail, raw_len) in [
            (n, 1, n),
            (600, 600, n),
            (d.head, d.tail, d.head + d.tail - 1),
            (usize::MAX, 1, n),
            (d.head + 1, d.tail, n),
        ] {
            assert!(
                delta_apply(&base, head, tail, &d.payload, raw_len).is_err(),
                "ends {head}+{tail} of {raw_len} were accepted"
            );
        }
        // Longer than the base, shorter than the chunk: refused as well.
        assert!(delta_apply(&base[..400], 300, 200, &d.payload, n).is_err());
    }
}
