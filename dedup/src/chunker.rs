//! A streaming content-defined chunker on FastCDC (v2020, normalized level 1).
//!
//! Bytes arrive in pieces of any size. A chunk boundary is a function of the stream's bytes only: the
//! cut point FastCDC finds in the bytes buffered since the previous boundary is final as soon as it lies
//! strictly inside the buffer, or the buffer has reached `max_size` (a forced cut). A cut that falls on
//! the end of the buffer only means "no boundary yet", so those bytes wait for more input. Because the
//! gear hash of a position depends only on the bytes since the chunk start, the same stream yields the same
//! boundaries however its reads were split.
//!
//! The chunker never forces a boundary on a flush: the encoder sends the open chunk's bytes early (as a
//! partial chunk) and keeps them here, so an idle client's bytes leave at once and the boundaries still do
//! not depend on when the client paused.

use fastcdc::v2020;

/// Chunk size parameters. Sizes are powers of two; `min < avg < max`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ChunkParams {
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
}

impl Default for ChunkParams {
    fn default() -> Self {
        ChunkParams {
            min_size: 1024,
            avg_size: 4096,
            max_size: 16384,
        }
    }
}

/// Chunker identity for the handshake: the cut-point algorithm and its parameters. Two peers whose ids
/// differ still interoperate correctly (dedup never depends on agreement), they just dedup less.
pub const CHUNKER_ALGORITHM: &str = "fastcdc-v2020-n1";

impl ChunkParams {
    /// Checks the parameters against what the cut-point algorithm supports.
    pub fn validate(&self) -> Result<(), String> {
        let ChunkParams {
            min_size,
            avg_size,
            max_size,
        } = *self;
        for (name, v) in [("min", min_size), ("avg", avg_size), ("max", max_size)] {
            if !v.is_power_of_two() {
                return Err(format!("chunk {name} size {v} is not a power of two"));
            }
        }
        if !(min_size < avg_size && avg_size < max_size) {
            return Err(format!(
                "chunk sizes must satisfy min < avg < max (got {min_size}, {avg_size}, {max_size})"
            ));
        }
        if min_size < v2020::MINIMUM_MIN
            || avg_size < v2020::AVERAGE_MIN
            || max_size > (1 << 20)
            || avg_size > v2020::AVERAGE_MAX
        {
            return Err(format!(
                "chunk sizes out of range (min >= {}, avg >= {}, max <= 1 MiB)",
                v2020::MINIMUM_MIN,
                v2020::AVERAGE_MIN
            ));
        }
        Ok(())
    }

    /// A compact text id of the chunking, exchanged in the peer hello.
    pub fn id(&self) -> String {
        format!(
            "{CHUNKER_ALGORITHM}/{}/{}/{}",
            self.min_size, self.avg_size, self.max_size
        )
    }
}

/// Finds chunk boundaries in a stream fed in arbitrary pieces.
#[derive(Debug)]
pub struct Chunker {
    params: ChunkParams,
    mask_s: u64,
    mask_l: u64,
    /// Bytes since the last boundary (at most `max_size` once scanned).
    buf: Vec<u8>,
    /// Where the scan of `buf` stopped without finding a boundary, and the gear hash there: bytes
    /// appended later are scanned from that point, not again from the chunk's start. (A chatty
    /// flow appends a few dozen bytes at a time to a chunk of kilobytes.)
    scan_pos: usize,
    scan_hash: u64,
}

impl Chunker {
    /// A chunker with the given parameters (validate them first; invalid ones are clamped by FastCDC).
    pub fn new(params: ChunkParams) -> Chunker {
        let bits = params.avg_size.trailing_zeros();
        // Normalization level 1: a harder mask before the average size, an easier one after it.
        let mask_s = v2020::MASKS[(bits + 1) as usize];
        let mask_l = v2020::MASKS[(bits - 1) as usize];
        Chunker {
            params,
            mask_s,
            mask_l,
            // Allocated on first use: a thousand idle streams should cost nothing here.
            buf: Vec::new(),
            scan_pos: 0,
            scan_hash: 0,
        }
    }

    pub fn params(&self) -> ChunkParams {
        self.params
    }

    /// The bytes of the open (not yet cut) chunk.
    pub fn pending(&self) -> &[u8] {
        &self.buf
    }

    /// Finds the end of the next chunk in `data`, which starts at a chunk boundary and is all the stream
    /// has so far. Returns `Some(len)` when the boundary is final, `None` when more bytes are needed.
    #[inline]
    pub fn find_boundary(&self, data: &[u8]) -> Option<usize> {
        let max = self.params.max_size as usize;
        let (_, cut) = v2020::cut(
            data,
            self.params.min_size as usize,
            self.params.avg_size as usize,
            max,
            self.mask_s,
            self.mask_l,
            self.mask_s << 1,
            self.mask_l << 1,
        );
        if cut < data.len() || data.len() >= max {
            Some(cut)
        } else {
            None
        }
    }

    /// Feeds `data`, calling `emit` with every chunk completed by it, in order. Chunks that lie wholly in
    /// `data` are passed without copying. Bytes of an incomplete chunk are kept for the next call.
    pub fn push(&mut self, mut data: &[u8], mut emit: impl FnMut(&[u8])) {
        let max = self.params.max_size as usize;
        // First complete the open chunk, lending it at most `max` bytes of `data`.
        while !self.buf.is_empty() {
            let old = self.buf.len();
            let take = (max - old).min(data.len());
            self.buf.extend_from_slice(&data[..take]);
            let Some(cut) = self.scan_buf() else {
                // No boundary below `max`: all of `data` was taken (the buffer is not full).
                return;
            };
            emit(&self.buf[..cut]);
            self.reset_scan();
            if cut >= old {
                // The bytes after the cut are still in `data`: give them back and cut from there.
                data = &data[cut - old..];
                self.buf.clear();
            } else {
                self.buf.drain(..cut);
                data = &data[take..];
            }
        }
        // The open chunk is empty: cut straight from the caller's slice.
        while !data.is_empty() {
            match self.find_boundary(data) {
                Some(cut) => {
                    emit(&data[..cut]);
                    data = &data[cut..];
                }
                None => {
                    // FastCDC found nothing here, but does not say where its hash stood: the next
                    // push scans these bytes once more, and never again.
                    self.buf.extend_from_slice(data);
                    self.reset_scan();
                    return;
                }
            }
        }
    }

    /// Looks for a boundary in the open chunk, from where the last scan of it stopped.
    ///
    /// The same cut points as [`Self::find_boundary`] (FastCDC v2020): a gear hash from `min_size`
    /// on, the harder mask before `avg_size` and the easier one after it, a cut where the masked hash
    /// is zero, a forced cut at `max_size`. FastCDC rolls two bytes per step, with the table and mask
    /// shifted left by one on the first of them; a one-byte gear hash checked against the unshifted
    /// mask finds the same positions (the masks leave the top bit clear). Like FastCDC this scans
    /// whole pairs only: the odd last byte of a stream is never a cut point.
    fn scan_buf(&mut self) -> Option<usize> {
        let min = self.params.min_size as usize;
        let avg = self.params.avg_size as usize;
        let max = self.params.max_size as usize;
        let len = self.buf.len();
        if len <= min {
            return None;
        }
        let end = len.min(max) & !1;
        let gear = gear();
        let mut pos = self.scan_pos.max(min);
        let mut hash = self.scan_hash;
        while pos < end {
            hash = (hash << 1).wrapping_add(gear[self.buf[pos] as usize]);
            let mask = if pos < avg { self.mask_s } else { self.mask_l };
            if hash & mask == 0 {
                self.reset_scan();
                return Some(pos);
            }
            pos += 1;
        }
        if len >= max {
            self.reset_scan();
            return Some(max);
        }
        self.scan_pos = pos;
        self.scan_hash = hash;
        None
    }

    fn reset_scan(&mut self) {
        self.scan_pos = 0;
        self.scan_hash = 0;
    }

    /// Ends the stream: the open chunk (if any) is returned as a final, possibly short, chunk.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        // The open chunk may hold more than one chunk's worth only transiently inside `push`; here it is
        // below the size at which a cut would have been found, so it is one chunk.
        if !self.buf.is_empty() {
            emit(&self.buf);
            self.buf.clear();
            self.reset_scan();
        }
    }
}

/// FastCDC's gear table (the crate's own, unseeded).
fn gear() -> &'static [u64; 256] {
    static GEAR: std::sync::OnceLock<Box<[u64; 256]>> = std::sync::OnceLock::new();
    GEAR.get_or_init(|| v2020::get_gear_with_seed(0).0)
}

/// Cuts `data` fed to a streaming chunker in pieces, each as long as `piece` says given what is
/// left (at least 1 byte, at most all of it): what must match [`chunk_all`] whatever the pieces.
pub fn chunk_in_pieces(
    params: ChunkParams,
    data: &[u8],
    mut piece: impl FnMut(&[u8]) -> usize,
) -> Vec<usize> {
    let mut c = Chunker::new(params);
    let mut lens = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = piece(rest).clamp(1, rest.len());
        c.push(&rest[..n], |ch| lens.push(ch.len()));
        rest = &rest[n..];
    }
    c.finish(|ch| lens.push(ch.len()));
    lens
}

/// Cuts a whole buffer into chunks (the reference behaviour the streaming chunker must match).
pub fn chunk_all(params: ChunkParams, data: &[u8]) -> Vec<usize> {
    let mut c = Chunker::new(params);
    let mut lens = Vec::new();
    c.push(data, |ch| lens.push(ch.len()));
    c.finish(|ch| lens.push(ch.len()));
    lens
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, RngCore, SeedableRng};

    fn random(seed: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut v);
        v
    }

    #[test]
    fn golden_boundaries() {
        // Pinned cut points: a change here breaks dedup against peers and stores of older versions, so it
        // must come with a new chunker id.
        let mut data = vec![0u8; 64 * 1024];
        blake3::Hasher::new()
            .update(b"ditto golden chunking")
            .finalize_xof()
            .fill(&mut data);
        let lens = chunk_all(ChunkParams::default(), &data);
        assert_eq!(lens.iter().sum::<usize>(), data.len());
        let golden: &[usize] = &GOLDEN;
        assert_eq!(lens, golden, "chunk boundaries changed");
    }

    const GOLDEN: [usize; 17] = [
        3310, 5389, 5226, 2494, 1826, 1482, 4755, 4937, 4791, 2197, 7350, 5289, 4837, 5055, 3970,
        2333, 295,
    ];

    #[test]
    fn matches_fastcdc_reference_iterator() {
        let p = ChunkParams::default();
        let data = random(99, 1 << 20);
        let reference: Vec<usize> = v2020::FastCDC::with_level(
            &data,
            p.min_size,
            p.avg_size,
            p.max_size,
            v2020::Normalization::Level1,
        )
        .map(|c| c.length)
        .collect();
        assert_eq!(chunk_all(p, &data), reference);
    }

    #[test]
    fn sizes_within_bounds() {
        let p = ChunkParams::default();
        let data = random(7, 4 << 20);
        let lens = chunk_all(p, &data);
        let (last, body) = lens.split_last().expect("chunks");
        assert!(*last <= p.max_size as usize);
        for &l in body {
            assert!(l >= p.min_size as usize && l <= p.max_size as usize, "{l}");
        }
        let avg = data.len() / lens.len();
        assert!(avg > 2048 && avg < 8192, "average chunk {avg}");
    }

    #[test]
    fn zeros_cut_at_max() {
        let p = ChunkParams::default();
        let lens = chunk_all(p, &vec![0u8; 100_000]);
        assert!(lens[..lens.len() - 1]
            .iter()
            .all(|&l| l == p.max_size as usize));
    }

    #[test]
    fn validate_rejects_bad_params() {
        assert!(ChunkParams::default().validate().is_ok());
        let bad = ChunkParams {
            min_size: 1000,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        let bad = ChunkParams {
            min_size: 8192,
            ..Default::default()
        };
        assert!(bad.validate().is_err());
    }

    /// What the resumed one-byte scan of the open chunk relies on to match FastCDC's two-byte
    /// steps: the shifted table is the table shifted, and no mask uses the top bit.
    #[test]
    fn one_byte_scan_assumptions_hold() {
        let (gear, gear_ls) = v2020::get_gear_with_seed(0);
        assert!(gear.iter().zip(gear_ls.iter()).all(|(g, ls)| g << 1 == *ls));
        assert!(v2020::MASKS.iter().all(|m| m >> 63 == 0));
    }

    /// A chatty stream: pieces of a few dozen bytes, each one resuming the scan of the open chunk,
    /// cut exactly where one pass over the whole stream cuts, for several chunk sizes and for data
    /// that cuts early, late (text) and only at the maximum (zeros).
    #[test]
    fn small_pieces_cut_where_the_whole_stream_cuts() {
        let mut data = random(5, 300_000);
        data.extend(std::iter::repeat_n(0u8, 70_000));
        data.extend(b"INSERT INTO t VALUES (1, 'a row of text');\n".repeat(3_000));
        data.extend(random(6, 50_000));
        let sizes = [(1024, 4096, 16384), (256, 1024, 4096), (2048, 8192, 65536)];
        for (min_size, avg_size, max_size) in sizes {
            let p = ChunkParams {
                min_size,
                avg_size,
                max_size,
            };
            let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(avg_size));
            let lens = chunk_in_pieces(p, &data, |_| rng.gen_range(1..=80));
            assert_eq!(
                chunk_all(p, &data),
                lens,
                "chunk sizes {min_size}/{avg_size}/{max_size}"
            );
        }
        // Short streams at small sizes, each ending wherever it ends: FastCDC never cuts at the
        // odd last byte of a stream, and neither may the resumed scan.
        let p = ChunkParams {
            min_size: 64,
            avg_size: 256,
            max_size: 1024,
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(17);
        for len in (1..4000).step_by(3) {
            let data = random(len as u64, len);
            let lens = chunk_in_pieces(p, &data, |_| rng.gen_range(1..=16));
            assert_eq!(chunk_all(p, &data), lens, "a stream of {len} bytes");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn boundaries_independent_of_read_sizes(seed in any::<u64>(), len in 0usize..200_000, max_read in 1usize..40_000) {
            let p = ChunkParams::default();
            let data = random(seed, len);
            let whole = chunk_all(p, &data);
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
            let lens = chunk_in_pieces(p, &data, |_| rng.gen_range(1..=max_read));
            prop_assert_eq!(whole, lens);
        }
    }
}
