//! The in-RAM chunk index: id -> slot -> (location, length, successor hint).
//!
//! Memory layout, chosen to keep the index at well under 64 bytes per stored chunk:
//! - `entries`: one 32-byte [`Entry`] per slot. Freed slots are chained into a free list through their
//!   `succ` field, so the free list costs no extra memory. The vector grows by a quarter at a time (not
//!   by doubling) so that its slack stays small.
//! - `table`: a `hashbrown::HashTable<u32>` of slot numbers (4 bytes + 1 control byte per bucket), hashed
//!   by `ChunkId::hash64()`: ids are already uniformly random, so no keyed hash is needed.

use hashbrown::HashTable;

use crate::ChunkId;

/// Location of a live entry that exists only in the RAM tier (a store without a disk tier).
pub(crate) const LOC_RAM: u64 = 0;
/// Location of a live entry whose record waits in the write-behind queue (not on disk yet). Segment 0
/// is never allocated, so neither this nor [`LOC_RAM`] is a disk location.
pub(crate) const LOC_QUEUED: u64 = 1;
/// Location marking a free slot. Segment number `u32::MAX` is never allocated, so a free slot never
/// matches a segment during eviction.
const LOC_FREE: u64 = u64::MAX;
/// End of the free list / "no successor".
const NONE: u32 = u32::MAX;

/// Packs a disk location: segment sequence number in the high half, payload offset in the low half.
#[inline]
pub(crate) fn pack_loc(seg: u32, offset: u32) -> u64 {
    (u64::from(seg) << 32) | u64::from(offset)
}

/// Whether a live entry's location is a record on disk.
#[inline]
pub(crate) fn on_disk(loc: u64) -> bool {
    loc != LOC_RAM && loc != LOC_QUEUED && loc != LOC_FREE
}

#[inline]
pub(crate) fn loc_seg(loc: u64) -> u32 {
    (loc >> 32) as u32
}

#[inline]
pub(crate) fn loc_offset(loc: u64) -> u32 {
    loc as u32
}

/// One index slot (32 bytes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Entry {
    pub id: ChunkId,
    /// [`pack_loc`] of the payload, [`LOC_RAM`], or `LOC_FREE`.
    pub loc: u64,
    /// Payload length in bytes.
    pub len: u32,
    /// Live entry: successor slot, or `NONE`. Free entry: next free slot, or `NONE`.
    pub succ: u32,
}

const _: () = assert!(std::mem::size_of::<Entry>() == 32);

impl Entry {
    /// A free slot, as a snapshot records it.
    pub const FREE: Entry = Entry {
        id: ChunkId([0; crate::CHUNK_ID_LEN]),
        loc: LOC_FREE,
        len: 0,
        succ: NONE,
    };

    #[inline]
    pub fn is_live(&self) -> bool {
        self.loc != LOC_FREE
    }
}

pub(crate) struct Index {
    entries: Vec<Entry>,
    table: HashTable<u32>,
    free_head: u32,
    live: u64,
    live_bytes: u64,
}

impl Index {
    pub fn new() -> Self {
        Index {
            entries: Vec::new(),
            table: HashTable::new(),
            free_head: NONE,
            live: 0,
            live_bytes: 0,
        }
    }

    /// Number of live entries.
    pub fn len(&self) -> u64 {
        self.live
    }

    /// Sum of the payload lengths of live entries.
    pub fn live_bytes(&self) -> u64 {
        self.live_bytes
    }

    /// Number of slots (live and free); every slot number is below this.
    pub fn slots(&self) -> usize {
        self.entries.len()
    }

    #[inline]
    pub fn find(&self, id: &ChunkId) -> Option<u32> {
        let entries = &self.entries;
        self.table
            .find(id.hash64(), |&s| entries[s as usize].id == *id)
            .copied()
    }

    /// The entry in `slot`, live or not. Panics only on a slot number this index never handed out.
    #[inline]
    pub fn entry(&self, slot: u32) -> &Entry {
        &self.entries[slot as usize]
    }

    /// The live entry in `slot`, if any.
    #[inline]
    pub fn live(&self, slot: u32) -> Option<&Entry> {
        self.entries.get(slot as usize).filter(|e| e.is_live())
    }

    /// Adds an id that must not be present yet; returns its slot.
    pub fn insert(&mut self, id: ChunkId, loc: u64, len: u32) -> u32 {
        debug_assert!(self.find(&id).is_none());
        let entry = Entry {
            id,
            loc,
            len,
            succ: NONE,
        };
        let slot = if self.free_head != NONE {
            let slot = self.free_head;
            self.free_head = self.entries[slot as usize].succ;
            self.entries[slot as usize] = entry;
            slot
        } else {
            if self.entries.len() == self.entries.capacity() {
                // Grow by a quarter: doubling would leave up to 32 idle bytes per chunk.
                self.entries
                    .reserve_exact((self.entries.len() / 4).max(256));
            }
            let slot = self.entries.len() as u32;
            self.entries.push(entry);
            slot
        };
        let entries = &self.entries;
        self.table
            .insert_unique(id.hash64(), slot, |&s| entries[s as usize].id.hash64());
        self.live += 1;
        self.live_bytes += u64::from(len);
        slot
    }

    /// Frees a live slot and returns what it held.
    pub fn remove(&mut self, slot: u32) -> Entry {
        let old = self.entries[slot as usize];
        debug_assert!(old.is_live());
        if let Ok(found) = self.table.find_entry(old.id.hash64(), |&s| s == slot) {
            found.remove();
        }
        self.entries[slot as usize] = Entry {
            id: ChunkId::default(),
            loc: LOC_FREE,
            len: 0,
            succ: self.free_head,
        };
        self.free_head = slot;
        self.live -= 1;
        self.live_bytes -= u64::from(old.len);
        old
    }

    /// Moves a live entry to a new location (a newer copy of the same chunk).
    pub fn relocate(&mut self, slot: u32, loc: u64, len: u32) {
        let e = &mut self.entries[slot as usize];
        self.live_bytes = self.live_bytes - u64::from(e.len) + u64::from(len);
        e.loc = loc;
        e.len = len;
    }

    /// Successor id of `slot`, if set and still live.
    #[inline]
    pub fn successor_of(&self, slot: u32) -> Option<ChunkId> {
        let succ = self.entries[slot as usize].succ;
        if succ == NONE {
            return None;
        }
        self.live(succ).map(|e| e.id)
    }

    /// Sets the successor; returns whether it changed.
    #[inline]
    pub fn set_successor(&mut self, slot: u32, next: u32) -> bool {
        let e = &mut self.entries[slot as usize];
        if e.succ == next {
            false
        } else {
            e.succ = next;
            true
        }
    }

    /// All slots with their entries, live or free (snapshot writing).
    pub fn iter_slots(&self) -> std::slice::Iter<'_, Entry> {
        self.entries.iter()
    }

    /// Rebuilds an index from a snapshot's slot array. Returns `None` on any inconsistency (duplicate id,
    /// successor out of range), in which case the caller falls back to a scan.
    pub fn from_slots(slots: Vec<Entry>) -> Option<Index> {
        let n = u32::try_from(slots.len()).ok()?;
        if n == NONE {
            return None;
        }
        let mut index = Index {
            entries: slots,
            table: HashTable::with_capacity(0),
            free_head: NONE,
            live: 0,
            live_bytes: 0,
        };
        let live = index.entries.iter().filter(|e| e.is_live()).count();
        index.table.reserve(live, |_| 0);
        for slot in (0..n).rev() {
            let e = index.entries[slot as usize];
            if !e.is_live() {
                index.entries[slot as usize] = Entry {
                    id: ChunkId::default(),
                    loc: LOC_FREE,
                    len: 0,
                    succ: index.free_head,
                };
                index.free_head = slot;
                continue;
            }
            if e.succ != NONE && e.succ >= n {
                return None;
            }
            if index.find(&e.id).is_some() {
                return None;
            }
            let entries = &index.entries;
            index
                .table
                .insert_unique(e.id.hash64(), slot, |&s| entries[s as usize].id.hash64());
            index.live += 1;
            index.live_bytes += u64::from(e.len);
        }
        Some(index)
    }

    /// Estimated heap bytes of the index (entries vector plus hash table).
    pub fn heap_bytes(&self) -> u64 {
        (self.entries.capacity() * std::mem::size_of::<Entry>() + self.table.allocation_size())
            as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u32) -> ChunkId {
        ChunkId::of(&n.to_le_bytes())
    }

    #[test]
    fn insert_find_remove_reuse() {
        let mut ix = Index::new();
        let a = ix.insert(id(1), pack_loc(1, 32), 10);
        let b = ix.insert(id(2), pack_loc(1, 74), 20);
        assert_eq!(ix.find(&id(1)), Some(a));
        assert_eq!(ix.find(&id(2)), Some(b));
        assert_eq!(ix.live_bytes(), 30);
        assert!(ix.set_successor(a, b));
        assert!(!ix.set_successor(a, b));
        assert_eq!(ix.successor_of(a), Some(id(2)));
        ix.remove(b);
        assert_eq!(ix.find(&id(2)), None);
        assert_eq!(
            ix.successor_of(a),
            None,
            "successor pointing at a freed slot is not reported"
        );
        let c = ix.insert(id(3), LOC_RAM, 5);
        assert_eq!(c, b, "freed slot is reused");
        assert_eq!(ix.len(), 2);
        assert_eq!(ix.live_bytes(), 15);
    }

    #[test]
    fn from_slots_round_trip_and_rejects_duplicates() {
        let mut ix = Index::new();
        for n in 0..100 {
            ix.insert(id(n), pack_loc(1, n * 100), n);
        }
        for n in (0..100).step_by(3) {
            let s = ix.find(&id(n)).expect("present");
            ix.remove(s);
        }
        let slots: Vec<Entry> = ix.iter_slots().copied().collect();
        let back = Index::from_slots(slots.clone()).expect("valid");
        assert_eq!(back.len(), ix.len());
        for n in 0..100 {
            assert_eq!(back.find(&id(n)), ix.find(&id(n)));
        }
        let mut dup = slots;
        dup[1] = dup[2];
        assert!(Index::from_slots(dup).is_none());
    }

    #[test]
    fn loc_packing() {
        let l = pack_loc(7, 0xdead_beef);
        assert_eq!(loc_seg(l), 7);
        assert_eq!(loc_offset(l), 0xdead_beef);
        assert_eq!(loc_seg(LOC_FREE), u32::MAX);
    }
}
