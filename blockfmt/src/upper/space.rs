//! Dead space in `data` and its reuse (format version 3, FORMAT.md §3.1 and §3.4).
//!
//! Every write record owns a *slot* in `data`: its bytes from `data_offset`, rounded up to
//! 4096. A slot dies when the map no longer points at any of its bytes (later writes, zeroes or
//! trims replaced all of them). Its space may take new writes only once a flush mark covering
//! every record that killed it is **on disk and synced**: from then on any recovery replays
//! those killers (records a synced mark covers are always replayed), so the dead record is
//! wholly superseded whatever its bytes say, and recovery does not require them to pass their
//! crc32c (§3.4). Before that, a crash could replay the dead record as live and read the new
//! bytes in its place.
//!
//! Readers read without the lock, through a snapshot of the map taken earlier: a dead slot is
//! not free while a reader that may still read it is running. Each snapshot holds the current
//! [`ReadEpoch`]; each flush starts a new one; a dying slot remembers the epoch it died in and
//! is freed only once no snapshot of that epoch or an older one is left (an epoch holds the
//! next one alive, so "epoch e is gone" means "every snapshot up to e is gone").
//!
//! Slots die in the order of the record that killed them (`seq` grows), so the dying queue is
//! settled from its front. Free space is kept coalesced, by offset and by size (best fit).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, OnceLock, Weak};

/// A period between two flushes, as the readers see it (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct ReadEpoch {
    next: OnceLock<Arc<ReadEpoch>>,
}

impl ReadEpoch {
    /// Starts the next epoch: returns it; this one keeps it alive while it lives.
    pub fn advance(self: &Arc<Self>) -> Arc<ReadEpoch> {
        let next = Arc::new(ReadEpoch::default());
        let _ = self.next.set(next.clone());
        next
    }
}

/// Slot granularity: each write's bytes start on a 4096-byte boundary (version ≥ 2).
const SLOT: u64 = 4096;

/// The slots of one data file, the dead ones waiting for a synced mark, and the free ones.
#[derive(Debug, Default)]
pub(crate) struct DataSpace {
    /// Live slots: data offset → (slot length, live bytes).
    slots: BTreeMap<u64, (u64, u64)>,
    /// Dead slots: the `seq` of the record that killed their last byte, offset, length, and
    /// the read epoch they died in.
    dying: VecDeque<(u64, u64, u64, Weak<ReadEpoch>)>,
    /// Free space: offset → length (coalesced).
    free_by_off: BTreeMap<u64, u64>,
    /// The same, by (length, offset) for best fit.
    free_by_len: BTreeSet<(u64, u64)>,
    free_bytes: u64,
    dying_bytes: u64,
}

impl DataSpace {
    /// A new record's bytes `[at, at + len)`: a slot of `len` rounded up to 4096.
    pub fn add_slot(&mut self, at: u64, len: u64) {
        if len > 0 {
            self.slots.insert(at, (len.next_multiple_of(SLOT), len));
        }
    }

    /// True when `at` lies inside a live slot (a rewrite in place, not a new slot).
    pub fn in_live_slot(&self, at: u64) -> bool {
        self.slots
            .range(..=at)
            .next_back()
            .is_some_and(|(&s, &(l, _))| at < s + l)
    }

    /// The map stopped pointing at `len` bytes at data offset `at` (record `seq` replaced
    /// them). Bytes in no known slot (e.g. written before this process tracked slots) are
    /// ignored: their space is never reused.
    pub fn release(&mut self, mut at: u64, mut len: u64, seq: u64, epoch: &Weak<ReadEpoch>) {
        while len > 0 {
            let Some((&s, &(l, live))) = self.slots.range(..=at).next_back() else {
                return;
            };
            if at >= s + l {
                return;
            }
            let here = len.min(s + l - at);
            let left = live.saturating_sub(here);
            if left == 0 {
                self.slots.remove(&s);
                self.dying.push_back((seq, s, l, epoch.clone()));
                self.dying_bytes += l;
            } else {
                self.slots.insert(s, (l, left));
            }
            at += here;
            len -= here;
        }
    }

    /// A flush mark covering records up to `seq` is on disk and synced: slots those records
    /// killed become free, once no reader may still read them.
    pub fn settle(&mut self, seq: u64) {
        while let Some((killer, s, l, epoch)) = self.dying.front() {
            let (killer, s, l) = (*killer, *s, *l);
            if killer > seq || epoch.strong_count() > 0 {
                break;
            }
            self.dying.pop_front();
            self.dying_bytes -= l;
            self.put_free(s, l);
        }
    }

    /// Takes free space for `len` bytes that ends at or before `limit` (the end of the data
    /// recovery accepts records inside); the rest of the region stays free.
    pub fn take(&mut self, len: u64, limit: u64) -> Option<u64> {
        let want = len.next_multiple_of(SLOT);
        let &(l, s) = self
            .free_by_len
            .range((want, 0)..)
            .find(|&&(_, s)| s + len <= limit)?;
        self.remove_free(s, l);
        if l > want {
            self.put_free(s + want, l - want);
        }
        Some(s)
    }

    /// True when [`Self::take`] would find space for `len` bytes below `limit`.
    pub fn fits(&self, len: u64, limit: u64) -> bool {
        let want = len.next_multiple_of(SLOT);
        self.free_by_len
            .range((want, 0)..)
            .any(|&(_, s)| s + len <= limit)
    }

    /// Gives back space [`Self::take`] returned (the write failed).
    pub fn untake(&mut self, at: u64, len: u64) {
        self.put_free(at, len.next_multiple_of(SLOT));
    }

    /// Recovery replays a record whose bytes went to `[at, at + len)` outside any live slot
    /// (space the writer reused): that space is no longer free or dying. A writer-made log only
    /// reuses free space, so the dying queue is searched only when the free list did not hold
    /// all of it (dropping a dying slot leaks its space until compaction, which is safe).
    pub fn claim(&mut self, at: u64, len: u64) {
        let end = at + len.next_multiple_of(SLOT);
        let hit: Vec<(u64, u64)> = self
            .free_by_off
            .range(..end)
            .rev()
            .take_while(|&(&s, &l)| s + l > at)
            .map(|(&s, &l)| (s, l))
            .collect();
        let mut found = 0;
        for (s, l) in hit {
            self.remove_free(s, l);
            found += (s + l).min(end) - s.max(at);
            if s < at {
                self.put_free(s, at - s);
            }
            if s + l > end {
                self.put_free(end, s + l - end);
            }
        }
        if found < end - at {
            self.dying.retain(|&(_, s, l, _)| s + l <= at || s >= end);
            self.dying_bytes = self.dying.iter().map(|&(_, _, l, _)| l).sum();
        }
    }

    /// Bytes of dead slots waiting for a synced mark over their killers.
    pub fn dying_bytes(&self) -> u64 {
        self.dying_bytes
    }

    /// Bytes free for new writes.
    pub fn free_bytes(&self) -> u64 {
        self.free_bytes
    }

    fn remove_free(&mut self, s: u64, l: u64) {
        self.free_by_off.remove(&s);
        self.free_by_len.remove(&(l, s));
        self.free_bytes -= l;
    }

    fn put_free(&mut self, mut s: u64, mut l: u64) {
        if let Some((&ps, &pl)) = self.free_by_off.range(..s).next_back() {
            if ps + pl == s {
                self.remove_free(ps, pl);
                s = ps;
                l += pl;
            }
        }
        if let Some(&nl) = self.free_by_off.get(&(s + l)) {
            self.remove_free(s + l, nl);
            l += nl;
        }
        self.free_by_off.insert(s, l);
        self.free_by_len.insert((l, s));
        self.free_bytes += l;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_slots_are_free_only_after_their_killer_is_marked() {
        let mut s = DataSpace::default();
        s.add_slot(4096, 4096);
        s.add_slot(8192, 8000);
        s.release(4096, 4096, 5, &Weak::new());
        s.release(8192, 4000, 6, &Weak::new());
        assert_eq!(s.take(4096, 1 << 20), None);
        s.settle(5);
        assert_eq!(s.free_bytes(), 4096);
        s.release(12192, 4000, 7, &Weak::new());
        s.settle(6);
        assert_eq!(s.free_bytes(), 4096);
        s.settle(7);
        // Coalesced: 4096 + 8192 bytes from 4096.
        assert_eq!(s.free_bytes(), 12288);
        assert_eq!(s.take(4096, 1 << 20), Some(4096));
        // The rest ends past the limit: not taken.
        assert_eq!(s.take(8192, 12000), None);
        assert_eq!(s.take(8192, 1 << 20), Some(8192));
        assert_eq!(s.free_bytes(), 0);
        s.untake(8192, 100);
        assert_eq!(s.free_bytes(), 4096);
    }

    #[test]
    fn a_reader_of_an_epoch_keeps_what_died_in_it_from_being_free() {
        let mut s = DataSpace::default();
        let e0 = Arc::new(ReadEpoch::default());
        let reader = e0.clone(); // a snapshot taken in epoch 0
        s.add_slot(4096, 4096);
        s.release(4096, 4096, 1, &Arc::downgrade(&e0));
        let e1 = e0.advance();
        drop(e0); // the layer moved on to epoch 1
        s.settle(10);
        assert_eq!(s.free_bytes(), 0, "the reader may still read it");
        let e2 = e1.advance();
        drop(e1);
        s.settle(10);
        assert_eq!(s.free_bytes(), 0, "older readers hold newer epochs too");
        drop(reader);
        s.settle(10);
        assert_eq!(s.free_bytes(), 4096);
        drop(e2);
    }

    #[test]
    fn claimed_space_leaves_the_free_list_and_the_dying_queue() {
        let mut s = DataSpace::default();
        for i in 1..=4 {
            s.add_slot(i * 4096, 4096);
        }
        for i in 1..=4 {
            s.release(i * 4096, 4096, i, &Weak::new());
        }
        s.settle(2);
        s.claim(4096, 100);
        assert_eq!(s.free_bytes(), 4096);
        s.claim(4 * 4096, 4096);
        s.settle(10);
        // Only the third slot is left.
        assert_eq!(s.free_bytes(), 4096 * 2);
        assert_eq!(s.take(8192, 1 << 20), Some(8192));
    }
}
