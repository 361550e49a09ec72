//! Chunk fingerprints.
//!
//! A chunk is named by the first 128 bits of its BLAKE3 hash. 128 bits keep accidental collisions out of
//! reach (birthday bound 2^64 chunks) while halving the size of every reference on the wire compared
//! with the full 256-bit digest.

use std::fmt;

/// Bytes of a fingerprint, on the wire and in the store.
pub const CHUNK_ID_LEN: usize = 16;

/// The fingerprint of one chunk: the first 128 bits of `blake3(chunk)`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct ChunkId(pub [u8; CHUNK_ID_LEN]);

impl ChunkId {
    /// Fingerprint `data`.
    #[inline]
    pub fn of(data: &[u8]) -> ChunkId {
        let digest = blake3::hash(data);
        let mut id = [0u8; CHUNK_ID_LEN];
        id.copy_from_slice(&digest.as_bytes()[..CHUNK_ID_LEN]);
        ChunkId(id)
    }

    /// Whether `data` really is the chunk this id names.
    #[inline]
    pub fn matches(&self, data: &[u8]) -> bool {
        ChunkId::of(data) == *self
    }

    /// The first 8 bytes as an integer: already uniformly distributed, so usable directly as a hash.
    #[inline]
    pub fn hash64(&self) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(b)
    }

    /// The id as bytes.
    #[inline]
    pub fn as_bytes(&self) -> &[u8; CHUNK_ID_LEN] {
        &self.0
    }
}

impl fmt::Debug for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChunkId(")?;
        for b in &self.0[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

impl fmt::Display for ChunkId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_fingerprint() {
        // blake3("abc") = 6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85
        assert_eq!(
            ChunkId::of(b"abc").to_string(),
            "6437b3ac38465133ffb63b75273a8db5"
        );
        assert!(ChunkId::of(b"abc").matches(b"abc"));
        assert!(!ChunkId::of(b"abc").matches(b"abd"));
    }
}
