//! The RAM tier: an LRU of chunk contents bounded by payload bytes.
//!
//! Keyed by `ChunkId` rather than by index slot so that a stale cache line can never be served under a
//! reused slot number; the ids are uniformly random, so the hasher simply takes their first 8 bytes.

use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;

use lru::LruCache;

use crate::ChunkId;

/// Hasher for `ChunkId` keys: the id's own first 8 bytes (already uniform), no SipHash.
#[derive(Default, Clone, Copy)]
pub(crate) struct IdHasher(u64);

impl Hasher for IdHasher {
    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }

    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        if bytes.len() >= 8 {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[..8]);
            self.0 ^= u64::from_le_bytes(b);
        } else {
            for &b in bytes {
                self.0 = self.0.rotate_left(8) ^ u64::from(b);
            }
        }
    }

    #[inline]
    fn write_usize(&mut self, n: usize) {
        // The slice length prefix; ids all have the same length, so it only needs to be harmless.
        self.0 ^= n as u64;
    }
}

pub(crate) struct RamTier {
    /// Shared with the write-behind queue while a chunk waits there: one copy for both.
    lru: LruCache<ChunkId, Arc<[u8]>, BuildHasherDefault<IdHasher>>,
    bytes: u64,
    cap: u64,
}

impl RamTier {
    pub fn new(cap: u64) -> Self {
        RamTier {
            lru: LruCache::unbounded_with_hasher(BuildHasherDefault::default()),
            bytes: 0,
            cap,
        }
    }

    pub fn capacity(&self) -> u64 {
        self.cap
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// The cached bytes, promoting the entry to most recently used.
    #[inline]
    pub fn get(&mut self, id: &ChunkId) -> Option<&[u8]> {
        self.lru.get(id).map(|b| &b[..])
    }

    /// Caches `data` (if it fits at all), evicting least recently used entries; each evicted id is
    /// passed to `on_evict`. Returns whether `data` is now cached.
    pub fn put(&mut self, id: ChunkId, data: &[u8], on_evict: impl FnMut(ChunkId)) -> bool {
        if data.len() as u64 > self.cap {
            return false;
        }
        if self.lru.contains(&id) {
            self.lru.promote(&id);
            return true;
        }
        self.put_shared(id, Arc::from(data), on_evict)
    }

    /// Same, with bytes the caller shares.
    pub fn put_shared(
        &mut self,
        id: ChunkId,
        data: Arc<[u8]>,
        mut on_evict: impl FnMut(ChunkId),
    ) -> bool {
        let len = data.len() as u64;
        if len > self.cap {
            return false;
        }
        if self.lru.contains(&id) {
            self.lru.promote(&id);
            return true;
        }
        while self.bytes + len > self.cap {
            match self.lru.pop_lru() {
                Some((old, v)) => {
                    self.bytes -= v.len() as u64;
                    on_evict(old);
                }
                None => break,
            }
        }
        self.lru.put(id, data);
        self.bytes += len;
        true
    }

    /// Whether the chunk is cached (does not promote it).
    pub fn contains(&self, id: &ChunkId) -> bool {
        self.lru.contains(id)
    }

    /// Drops a cached chunk, if present.
    pub fn remove(&mut self, id: &ChunkId) {
        if let Some(v) = self.lru.pop(id) {
            self.bytes -= v.len() as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_within_bytes() {
        let mut r = RamTier::new(300);
        let ids: Vec<ChunkId> = (0u8..4).map(|n| ChunkId::of(&[n])).collect();
        let mut evicted = Vec::new();
        for id in &ids[..3] {
            assert!(r.put(*id, &[0u8; 100], |e| evicted.push(e)));
        }
        assert!(r.get(&ids[0]).is_some()); // 0 is now most recent; 1 is the LRU
        assert!(r.put(ids[3], &[0u8; 100], |e| evicted.push(e)));
        assert_eq!(evicted, vec![ids[1]]);
        assert_eq!(r.bytes(), 300);
        assert!(!r.put(ChunkId::of(b"big"), &[0u8; 301], |_| {}));
        r.remove(&ids[0]);
        assert_eq!(r.bytes(), 200);
        assert_eq!(r.len(), 2);
    }
}
