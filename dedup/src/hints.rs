//! Successor hints, updated the same way by encoder and decoder.
//!
//! Each chunk's hint names the chunk that followed it. A stream updates the hint of a chunk only at the
//! chunk's first occurrence in that stream: a chunk that recurs inside a stream (a file stored twice in a
//! tar, a repeated page) would otherwise flip its hint back and forth, and break every run through it
//! the next time the stream is sent. Encoder and decoder see the same chunk sequence and apply the same
//! rule, so their hints agree unless other streams interfere; a disagreement only costs a request.

use crate::fingerprint::ChunkId;
use crate::store::ChunkStore;
use std::hash::{BuildHasherDefault, Hasher};

/// Chunks tracked per stream before the set starts over (bounds memory to a few MiB per stream).
pub const MAX_TRACKED: usize = 1 << 18;

/// Chunk ids are uniformly random already: their first 8 bytes are the hash.
#[derive(Default)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // `ChunkId` hashes as its 16-byte array (a length prefix first, then the bytes).
        for chunk in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            self.0 ^= u64::from_le_bytes(b);
        }
    }
    fn write_usize(&mut self, _: usize) {}
}

#[derive(Default)]
pub(crate) struct Hints {
    seen: hashbrown::HashSet<ChunkId, BuildHasherDefault<IdHasher>>,
}

impl Hints {
    /// Records that `next` followed `prev` in this stream. `known_equal` says the caller already knows
    /// the hint of `prev` is `next` (inside a run), which saves a store call.
    #[inline]
    pub fn record(
        &mut self,
        store: &ChunkStore,
        prev: &ChunkId,
        next: &ChunkId,
        known_equal: bool,
    ) {
        if self.seen.len() >= MAX_TRACKED {
            self.seen.clear();
        }
        if self.seen.insert(*prev) && !known_equal {
            store.set_successor(prev, next);
        }
    }
}
