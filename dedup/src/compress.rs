//! Literal compression: zstd, one independent frame per batch, skipped for data that does not compress.
//!
//! Contexts are kept per thread, not per stream, so a thousand idle streams cost no compressor memory.
//! Decompression writes into a buffer of exactly the declared size: a frame that would expand beyond it
//! (a decompression bomb, or a lie) is an error, never an allocation.

use crate::wire::{WireError, CODEC_RAW, CODEC_ZSTD};
use std::cell::RefCell;

thread_local! {
    static COMPRESSOR: RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> = const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { RefCell::new(None) };
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

/// Compresses `data` as a delta against `base` (a zstd frame that uses `base` as its prefix). `None` if
/// zstd fails.
pub fn delta_compress(base: &[u8], data: &[u8], level: i32) -> Option<Vec<u8>> {
    let mut cctx = zstd::zstd_safe::CCtx::try_create()?;
    cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level.max(1)))
        .ok()?;
    cctx.ref_prefix(base).ok()?;
    let mut dst = Vec::with_capacity(zstd::zstd_safe::compress_bound(data.len()));
    cctx.compress2(&mut dst, data).ok()?;
    Some(dst)
}

/// Decodes a delta made by [`delta_compress`]: exactly `raw_len` bytes, or an error.
pub fn delta_decompress(base: &[u8], payload: &[u8], raw_len: usize) -> Result<Vec<u8>, WireError> {
    let mut dctx = zstd::zstd_safe::DCtx::try_create()
        .ok_or_else(|| WireError::Decompress("no decompression context".into()))?;
    dctx.ref_prefix(base)
        .map_err(|c| WireError::Decompress(zstd::zstd_safe::get_error_name(c).to_string()))?;
    let mut dst = Vec::with_capacity(raw_len);
    dctx.decompress(&mut dst, payload)
        .map_err(|c| WireError::Decompress(zstd::zstd_safe::get_error_name(c).to_string()))?;
    if dst.len() != raw_len {
        return Err(WireError::Malformed(
            "delta decodes to a length other than declared",
        ));
    }
    Ok(dst)
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
}
