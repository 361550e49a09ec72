//! What the disk tier holds, segment by segment: the listing that store summaries are built from
//! (`crate::summary`). Only chunks whose record is on disk are listed: queued chunks and chunks kept
//! in the RAM tier only do not survive a restart, so a peer must not count on them for long.

use super::index::{loc_offset, loc_seg, on_disk};
use super::{ChunkStore, Segment};
use crate::ChunkId;

/// One segment file of the disk tier, as a summary describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentState {
    pub seq: u32,
    /// Bytes written: every chunk record listed starts below this.
    pub len: u64,
    /// Chunks found damaged in it since open: a change means chunks left it.
    pub damage: u32,
}

impl Segment {
    fn state(&self) -> SegmentState {
        SegmentState {
            seq: self.seq,
            len: self.len,
            damage: self.damage,
        }
    }
}

impl ChunkStore {
    /// The disk tier's segments, oldest first (empty without a disk tier). One short critical
    /// section; no I/O.
    pub fn segment_states(&self) -> Vec<SegmentState> {
        let g = self.lock();
        let Some(disk) = g.disk.as_ref() else {
            return Vec::new();
        };
        disk.sealed
            .iter()
            .chain(std::iter::once(&disk.cur))
            .map(Segment::state)
            .collect()
    }

    /// The chunks whose record is in segment `seq`, as (payload offset, id) in no particular order,
    /// appended to `out`; returns the segment's state, or `None` if it no longer exists. One critical
    /// section over the segment's slots (a few thousand entries for a default 64 MiB segment).
    pub fn segment_chunks(&self, seq: u32, out: &mut Vec<(u32, ChunkId)>) -> Option<SegmentState> {
        let g = self.lock();
        let seg = g.disk.as_ref()?.segment(seq)?;
        out.reserve(seg.slots.len());
        for &slot in &seg.slots {
            if let Some(e) = g.index.live(slot) {
                // Stale slots (dropped, or relocated to a later segment) are skipped.
                if on_disk(e.loc) && loc_seg(e.loc) == seq {
                    out.push((loc_offset(e.loc), e.id));
                }
            }
        }
        Some(seg.state())
    }

    /// The store key, if the disk tier is sealed (for files kept beside the store).
    pub(crate) fn key(&self) -> Option<super::StoreKey> {
        self.shared.key.clone()
    }

    /// The directory of the disk tier, if there is one.
    pub fn dir(&self) -> Option<std::path::PathBuf> {
        self.lock().disk.as_ref().map(|d| d.dir.clone())
    }
}
