//! What we believe a peer's store holds.
//!
//! A `PeerView` is a bitmap over our own store's index slots: bit set = we sent this chunk to the peer
//! or received it from the peer, so the peer's store should hold it. It is only a belief: the peer may
//! have evicted the chunk, lost its disk, or the slot may since hold another chunk of ours. None of that
//! can corrupt data — a reference the peer cannot resolve is answered with the bytes — it only costs a
//! round trip, after which the belief is corrected.
//!
//! The view is tied to the peer store's identity: a peer that comes back with a new store id has lost
//! its store, and gets a fresh, empty view.

use crate::store::StoreId;
use std::sync::Mutex;

#[derive(Debug)]
pub struct PeerView {
    store: StoreId,
    bits: Mutex<Vec<u64>>,
}

impl PeerView {
    /// An empty view of the peer store `store`.
    pub fn new(store: StoreId) -> PeerView {
        PeerView {
            store,
            bits: Mutex::new(Vec::new()),
        }
    }

    /// The identity of the peer store this view describes.
    pub fn store(&self) -> StoreId {
        self.store
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u64>> {
        // A panic elsewhere while holding the lock leaves a bitmap that is still a valid belief.
        self.bits.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether we believe the peer holds the chunk in our slot `slot`.
    #[inline]
    pub fn has(&self, slot: u32) -> bool {
        let bits = self.lock();
        bits.get((slot / 64) as usize)
            .is_some_and(|w| w & (1 << (slot % 64)) != 0)
    }

    /// Records that the peer holds the chunk in our slot `slot`.
    #[inline]
    pub fn mark(&self, slot: u32) {
        let mut bits = self.lock();
        let word = (slot / 64) as usize;
        if bits.len() <= word {
            bits.resize(word + 1, 0);
        }
        bits[word] |= 1 << (slot % 64);
    }

    /// Records that the peer does not hold the chunk in our slot `slot`.
    #[inline]
    pub fn unmark(&self, slot: u32) {
        let mut bits = self.lock();
        if let Some(w) = bits.get_mut((slot / 64) as usize) {
            *w &= !(1 << (slot % 64));
        }
    }

    /// Chunks believed held (for status and tests).
    pub fn count(&self) -> u64 {
        self.lock().iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Bytes of RAM the view uses.
    pub fn ram_bytes(&self) -> usize {
        self.lock().capacity() * 8
    }
}
