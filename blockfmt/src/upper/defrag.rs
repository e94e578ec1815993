//! Defragmenting rewrites of fragmented ranges.
//!
//! After random small writes the upper layer maps the disk as small pieces scattered through
//! the data file in arrival order, so one large read costs a `pread` per piece (a 1 MiB read
//! over 4 KiB pieces: ~250 of them) where a flat file costs one. A read that finds many upper
//! pieces in its range notes it ([`UpperLayer::note_read`]); once the same range was read
//! [`DefragPolicy::reads`] times it is queued (a bounded queue, no duplicates), and the host
//! asks [`Image::run_defrags`] to rewrite the queued ranges on a thread of its own (blockfmt
//! starts none: [`UpperLayer::take_defrag_request`] says when).
//!
//! A rewrite reads the range's current bytes — the upper pieces and, under the gaps between
//! them, what the lower layers hold — and writes them back as **ordinary write records** through
//! the locked write path, their bytes back to back in the data file, so the map then holds the
//! range as one piece and a read of it is one `pread`. Nothing about it is special on disk (no
//! FORMAT change): every crash and flush rule of ordinary writes applies as is, and since the
//! records carry the bytes the range already reads as, any prefix of them recovers to the same
//! content. The bytes are written only if, under the layer's lock, the range's map is exactly
//! the snapshot they were read through (same pieces, same files generation; the snapshot also
//! holds its read epoch, so no dead slot it points at can have been reused meanwhile): a client
//! write that raced the rewrite wins and the rewrite is skipped.
//!
//! What a read returns never changes, nor does the allocation map: only runs of data are
//! rewritten (upper data and lower data under the gaps); zeroed or trimmed upper pieces and
//! lower holes and zero extents split a range into runs and stay as they are.
//!
//! Space: one record per upper piece (cut at 4 KiB boundaries of the run and at 64 KiB), so a
//! later overwrite frees the rewritten space slot by slot as it did before the rewrite; a
//! budget: the bytes rewritten since open never pass the bytes clients wrote since open; and
//! room: a rewrite that would append (no free region takes it whole) is skipped once the files
//! would pass 2.5 times the live data (or live + 64 MiB), so rewrites never push the files to
//! compaction's hard bound (three times, counting free space) — bringing a layer fragmented
//! again back in order is then compaction's job, which copies in disk order. Over the budget or
//! out of room, the queue is dropped and reads queue nothing until clients wrote another 64 MiB
//! (which may free space, or compact).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;

use super::{live_size, reuses_space, State, UpperLayer, UpperTarget, UpperView};
use crate::error::{Error, Result};
use crate::image::Image;
use crate::merged::{Segment, Target};

/// Largest range a read queues for a rewrite (larger reads queue nothing).
pub const DEFRAG_MAX_RANGE: u64 = 4 << 20;
/// Ranges waiting at most; reads find more only once some were rewritten.
const QUEUE_MAX: usize = 256;
/// Ranges whose reads are counted at most (the counts start over when it is full).
const SEEN_MAX: usize = 4096;
/// Largest record a rewrite writes (as compaction's): a later overwrite frees space per record.
const RECORD_MAX: u64 = 64 << 10;
/// Records start on this boundary of the data file (a slot each, `space.rs`).
const SLOT: u64 = 4096;
/// Client bytes written after a burst ended over the budget or out of room before reads queue
/// ranges again.
const PAUSE_BYTES: u64 = 64 << 20;
/// A rewrite that appends may grow the files to this percentage of the live data (compaction's
/// hard bound is 300 %: this leaves the clients' own appends room below it)...
const ROOM_PERCENT: u64 = 250;
/// ... or to the live data plus this much, if more (small layers).
const ROOM_MIN: u64 = 64 << 20;

/// Which reads queue their range for a rewrite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DefragPolicy {
    /// A read whose range holds at least this many upper-layer data pieces is fragmented.
    pub min_pieces: usize,
    /// A fragmented range is queued at its `reads`-th read (1: at once). More than one keeps a
    /// range read once (a backup, a scan) from being copied for nothing.
    pub reads: u32,
}

impl Default for DefragPolicy {
    fn default() -> Self {
        DefragPolicy {
            min_pieces: 8,
            reads: 2,
        }
    }
}

impl DefragPolicy {
    /// Never queue a range.
    pub fn off() -> Self {
        DefragPolicy {
            min_pieces: usize::MAX,
            reads: u32::MAX,
        }
    }
}

/// What [`Image::defrag_range`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefragOutcome {
    /// The range's data runs were rewritten with this many bytes.
    Rewritten { bytes: u64 },
    /// No run of the range held two upper pieces or more: nothing to do.
    Unfragmented,
    /// The range changed between the read and the write (a client write won): skipped.
    Changed,
    /// Rewriting it would pass the budget (bytes clients wrote since open): skipped.
    OverBudget,
    /// Rewriting it would append past the room rewrites may take (see the module docs).
    NoRoom,
}

/// What one [`Image::run_defrags`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DefragReport {
    /// Ranges rewritten.
    pub ranges: u64,
    /// Bytes written by the rewrites.
    pub bytes: u64,
    /// Ranges skipped (changed meanwhile, no longer fragmented, over the budget).
    pub skipped: u64,
}

/// The ranges waiting for a rewrite, and whether the host was asked to run them.
#[derive(Default)]
pub(super) struct DefragQueue {
    inner: Mutex<Queued>,
    /// Set when the queue became busy; the host takes it ([`UpperLayer::take_defrag_request`]).
    asked: AtomicBool,
    /// Data bytes clients wrote since open: the budget of the rewrites.
    written: AtomicU64,
    /// Reads queue nothing until `written` reaches this (a burst ran out of budget or room).
    resume_at: AtomicU64,
}

impl DefragQueue {
    /// A client write of `len` data bytes (budget and pause; lock-free, on every write).
    pub(super) fn note_client_write(&self, len: u64) {
        self.written.fetch_add(len, Ordering::Relaxed);
    }
}

#[derive(Default)]
struct Queued {
    policy: DefragPolicy,
    ranges: VecDeque<(u64, u64)>,
    queued: HashSet<(u64, u64)>,
    /// Fragmented reads of each range so far (up to `policy.reads`).
    seen: HashMap<(u64, u64), u32>,
    /// From the request to run the queue until a run finds it empty: no new request meanwhile,
    /// so at most one host thread runs it.
    active: bool,
}

impl UpperLayer {
    /// Sets which reads queue their range for a rewrite (default: [`DefragPolicy::default`]).
    pub fn set_defrag_policy(&self, policy: DefragPolicy) {
        self.defrag.inner.lock().policy = policy;
    }

    /// A read of `[off, off + len)` found `data_pieces` upper-layer data pieces in it: queues
    /// the range for a rewrite once it is fragmented and read often enough (see the module
    /// docs). Cheap when it is not: reads of one piece return at once.
    pub(crate) fn note_read(&self, off: u64, len: u64, data_pieces: usize) {
        if data_pieces < 2 || len > DEFRAG_MAX_RANGE || self.read_only() {
            return;
        }
        let d = &self.defrag;
        if d.written.load(Ordering::Relaxed) < d.resume_at.load(Ordering::Relaxed) {
            return;
        }
        let mut q = self.defrag.inner.lock();
        if data_pieces < q.policy.min_pieces || q.queued.contains(&(off, len)) {
            return;
        }
        if q.ranges.len() >= QUEUE_MAX {
            return;
        }
        if q.policy.reads > 1 {
            if q.seen.len() >= SEEN_MAX {
                q.seen.clear();
            }
            let n = q.seen.entry((off, len)).or_insert(0);
            *n += 1;
            if *n < q.policy.reads {
                return;
            }
            q.seen.remove(&(off, len));
        }
        q.ranges.push_back((off, len));
        q.queued.insert((off, len));
        if !q.active {
            q.active = true;
            self.defrag.asked.store(true, Ordering::Release);
        }
    }

    /// True once per burst of queued ranges: the caller should run [`Image::run_defrags`] off
    /// the request path (one run at a time: no new request until a run found the queue empty).
    pub fn take_defrag_request(&self) -> bool {
        self.defrag.asked.load(Ordering::Relaxed) && self.defrag.asked.swap(false, Ordering::AcqRel)
    }

    /// Drops the queue and queues nothing until clients wrote [`PAUSE_BYTES`] more.
    fn pause_defrags(&self) {
        let d = &self.defrag;
        d.resume_at.store(
            d.written
                .load(Ordering::Relaxed)
                .saturating_add(PAUSE_BYTES),
            Ordering::Relaxed,
        );
        self.cancel_defrags();
    }

    /// True when a rewrite of `len` bytes could go into free space whole, or append within
    /// the room rewrites may take (see the module docs).
    fn defrag_room(&self, st: &State, len: u64) -> bool {
        if reuses_space(st.files.version) && st.space.fits(len, st.data_len) {
            return true;
        }
        let live = live_size(&st.map);
        let room = (live / 100)
            .saturating_mul(ROOM_PERCENT)
            .max(live + ROOM_MIN);
        st.data_len + st.log_len + len <= room
    }

    /// Drops every queued range (the host cannot run them now); later reads queue anew.
    pub fn cancel_defrags(&self) {
        let mut q = self.defrag.inner.lock();
        q.ranges.clear();
        q.queued.clear();
        q.active = false;
    }

    /// Ranges waiting for a rewrite.
    pub fn queued_defrags(&self) -> usize {
        self.defrag.inner.lock().ranges.len()
    }

    /// The next queued range; `None` ends the burst.
    fn next_defrag(&self) -> Option<(u64, u64)> {
        let mut q = self.defrag.inner.lock();
        let r = q.ranges.pop_front();
        match r {
            Some(r) => {
                q.queued.remove(&r);
            }
            None => q.active = false,
        }
        r
    }

    /// Writes `runs` (`(disk offset, bytes, record lengths)`) read through `seen`, the snapshot
    /// of `[off, off + len)`, as ordinary write records — if that range's map is still exactly
    /// the snapshot and the budget allows (see the module docs).
    fn write_defragged(
        &self,
        seen: &UpperView<Option<UpperTarget>>,
        (off, len): (u64, u64),
        runs: &[(u64, Vec<u8>, Vec<u64>)],
    ) -> Result<DefragOutcome> {
        let bytes: u64 = runs.iter().map(|(_, b, _)| b.len() as u64).sum();
        let mut st = self.state.write();
        self.usable(&st)?;
        if !unchanged(&st, seen, off, len) {
            return Ok(DefragOutcome::Changed);
        }
        if st.defrag_bytes.saturating_add(bytes) > self.defrag.written.load(Ordering::Relaxed) {
            return Ok(DefragOutcome::OverBudget);
        }
        if !self.defrag_room(&st, bytes) {
            return Ok(DefragOutcome::NoRoom);
        }
        let mut res = Ok(());
        for (at, data, records) in runs {
            res = self.write_records(&mut st, *at, data, records);
            if res.is_err() {
                break;
            }
            st.defrag_bytes += data.len() as u64;
        }
        if res.is_ok() {
            st.defrags += 1;
        }
        let due = self.compaction_due(&mut st);
        drop(st);
        self.compact_if(due);
        res.map(|()| DefragOutcome::Rewritten { bytes })
    }
}

impl UpperLayer {
    /// `Some(skip)` when a rewrite of `bytes` would be over the budget or out of room now.
    fn defrag_precheck(&self, bytes: u64) -> Option<DefragOutcome> {
        let st = self.state.read();
        if st.defrag_bytes.saturating_add(bytes) > self.defrag.written.load(Ordering::Relaxed) {
            return Some(DefragOutcome::OverBudget);
        }
        (!self.defrag_room(&st, bytes)).then_some(DefragOutcome::NoRoom)
    }
}

/// True when the layer's map of `[off, off + len)` is still what `seen` shows.
fn unchanged(st: &State, seen: &UpperView<Option<UpperTarget>>, off: u64, len: u64) -> bool {
    st.generation == seen.generation && st.map.pieces(off, len) == seen.pieces
}

/// Where a part of a run's bytes come from.
#[derive(Debug, Clone, Copy)]
enum Source {
    /// The upper layer's data file at this offset.
    Upper(u64),
    /// A lower-layer segment.
    Lower(Segment),
}

/// A stretch of data (no zeros, no holes) in a range: its parts in disk order.
#[derive(Debug, Default)]
struct Run {
    parts: Vec<(u64, u64, Source)>,
    upper_pieces: usize,
}

impl Run {
    fn start(&self) -> u64 {
        self.parts.first().map_or(0, |p| p.0)
    }
    fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.1).sum()
    }

    /// Record lengths: a record ends where an upper piece or a stretch of lower data ends, if
    /// that is a 4 KiB boundary of the run (each record starts a slot), and at most 64 KiB in.
    fn records(&self) -> Vec<u64> {
        let mut out = Vec::new();
        let (mut start, mut pos) = (0u64, 0u64);
        for (i, &(_, l, src)) in self.parts.iter().enumerate() {
            let end = pos + l;
            while end - start > RECORD_MAX {
                out.push(RECORD_MAX);
                start += RECORD_MAX;
            }
            pos = end;
            let lower_goes_on = matches!(src, Source::Lower(_))
                && matches!(self.parts.get(i + 1), Some((_, _, Source::Lower(_))));
            if pos % SLOT == 0 && !lower_goes_on && pos > start {
                out.push(pos - start);
                start = pos;
            }
        }
        if pos > start {
            out.push(pos - start);
        }
        out
    }
}

/// Splits the snapshot's pieces into runs of data worth rewriting (two upper pieces or more).
fn plan_runs(image: &Image, pieces: &[(u64, u64, Option<UpperTarget>)]) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut cur = Run::default();
    let mut close = |cur: &mut Run| {
        let run = std::mem::take(cur);
        if run.upper_pieces >= 2 {
            runs.push(run);
        }
    };
    for &(s, l, t) in pieces {
        match t {
            Some(UpperTarget::Data { file_offset }) => {
                cur.parts.push((s, l, Source::Upper(file_offset)));
                cur.upper_pieces += 1;
            }
            Some(UpperTarget::Zero | UpperTarget::Trimmed) => close(&mut cur),
            None => {
                for seg in image.lower().index().segments(s, l) {
                    match seg.target {
                        Target::Data { .. } => {
                            cur.parts.push((seg.offset, seg.len, Source::Lower(seg)))
                        }
                        Target::Hole | Target::Zero { .. } => close(&mut cur),
                    }
                }
            }
        }
    }
    close(&mut cur);
    runs
}

impl Image {
    /// Rewrites the ranges reads queued (see `upper/defrag.rs`), until the queue is empty; the
    /// host runs it on a thread of its own when [`UpperLayer::take_defrag_request`] says so.
    /// A failure ends the burst (the rest of the queue is dropped) and is returned: an upper
    /// layer out of space, failed, or a lower layer that could not be read.
    pub fn run_defrags(&self) -> Result<DefragReport> {
        let mut report = DefragReport::default();
        let Some(up) = self.upper().filter(|_| !self.read_only()) else {
            return Ok(report);
        };
        while let Some((off, len)) = up.next_defrag() {
            match self.defrag_range(off, len) {
                Ok(DefragOutcome::Rewritten { bytes }) => {
                    report.ranges += 1;
                    report.bytes += bytes;
                }
                Ok(DefragOutcome::OverBudget | DefragOutcome::NoRoom) => {
                    // Nothing more fits until clients write more.
                    report.skipped += 1 + up.queued_defrags() as u64;
                    up.pause_defrags();
                    break;
                }
                Ok(DefragOutcome::Unfragmented | DefragOutcome::Changed) => report.skipped += 1,
                Err(e) => {
                    up.cancel_defrags();
                    return Err(e);
                }
            }
        }
        Ok(report)
    }

    /// Rewrites the data runs of `[off, off + len)` (at most [`DEFRAG_MAX_RANGE`] bytes) that
    /// hold two upper pieces or more, each as back-to-back ordinary write records, unless the
    /// range changes meanwhile or the budget is spent (see `upper/defrag.rs`). Reads return the
    /// same bytes and the same allocation map before and after.
    pub fn defrag_range(&self, off: u64, len: u64) -> Result<DefragOutcome> {
        let Some(up) = self.upper().filter(|_| !self.read_only()) else {
            return Err(Error::ReadOnly);
        };
        self.lower().check_range(off, len)?;
        if len > DEFRAG_MAX_RANGE {
            return Err(Error::Invalid(format!(
                "defrag of {len} bytes: at most {DEFRAG_MAX_RANGE} at once"
            )));
        }
        let seen = up.pieces(off, len);
        let runs = plan_runs(self, &seen.pieces);
        if runs.is_empty() {
            return Ok(DefragOutcome::Unfragmented);
        }
        // Settled before reading a byte: the write checks again, under the same lock.
        let bytes = runs.iter().map(Run::len).sum();
        if let Some(out) = up.defrag_precheck(bytes) {
            return Ok(out);
        }
        let mut filled = Vec::with_capacity(runs.len());
        for run in &runs {
            filled.push((run.start(), self.read_run(&seen, run)?, run.records()));
        }
        up.write_defragged(&seen, (off, len), &filled)
    }

    /// The bytes of `run`, read through the snapshot `seen` (upper pieces) and the lower layers.
    fn read_run(&self, seen: &UpperView<Option<UpperTarget>>, run: &Run) -> Result<Vec<u8>> {
        let start = run.start();
        let mut buf = vec![0u8; run.len() as usize];
        for &(s, l, src) in &run.parts {
            let dst = &mut buf[(s - start) as usize..(s - start + l) as usize];
            match src {
                Source::Upper(file_offset) => seen.read_data(file_offset, dst)?,
                Source::Lower(seg) => self.lower().read_segment(&seg, dst)?,
            }
        }
        Ok(buf)
    }
}
