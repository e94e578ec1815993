//! A read-only stack of immutable layers over one virtual disk: the layers, their merged index,
//! and a decoded-chunk cache. Reads never take a lock other than a cache shard's.
//!
//! The format crate starts no threads: a read that needs several cold chunks loads them at
//! once through the [`ParallelLoads`] hook the host installs (lsmd: its request pool), or one
//! after another without one.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, OnceLock};

use parking_lot::Mutex;

use crate::cache::ChunkCache;
use crate::error::{Error, Result};
use crate::merged::{MergedIndex, Segment, Target};
use crate::reader::Layer;

/// Default bound of the decoded-chunk cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// The chunks being loaded, by (layer, chunk): a second reader waits on the first's load.
type InFlightMap = HashMap<(u16, u32), Arc<InFlight>>;

/// A chunk being read by one thread that others wait for instead of reading it again.
#[derive(Default)]
struct InFlight {
    /// `Some(result)` once the reader is done; `Some(None)` means it failed (waiters retry).
    done: std::sync::Mutex<Option<Option<Arc<Vec<u8>>>>>,
    cv: Condvar,
}

impl InFlight {
    fn finish(&self, v: Option<Arc<Vec<u8>>>) {
        if let Ok(mut d) = self.done.lock() {
            *d = Some(v);
        }
        self.cv.notify_all();
    }

    fn wait(&self) -> Option<Arc<Vec<u8>>> {
        let mut d = self.done.lock().ok()?;
        while d.is_none() {
            d = self.cv.wait(d).ok()?;
        }
        d.clone().flatten()
    }
}

/// One chunk load, as handed to [`ParallelLoads::run_all`].
pub type LoadTask = Box<dyn FnOnce() + Send + 'static>;

/// Runs independent chunk loads at once on the host's threads. The format crate has none of
/// its own (it is pure: no threads, no network); the host that has a pool lends it here.
pub trait ParallelLoads: Send + Sync {
    /// Runs every task and returns once all have finished (or panicked). A task may run on
    /// any thread, the caller's included; the caller may itself be one of the host's threads,
    /// so an implementation must not wait for tasks nobody is free to run.
    fn run_all(&self, tasks: Vec<LoadTask>);

    /// Runs `task` on one of the host's threads without waiting for it (a fetch ahead of a
    /// reader, [`LayerStack::set_file_runs`]). The default runs it at once on the caller's
    /// thread, which is correct but makes the caller wait.
    fn spawn(&self, task: LoadTask) {
        task();
    }
}

/// Releases a leader's in-flight slot when the load ends, by return or by unwinding.
struct SlotGuard<'a> {
    stack: &'a Chunks,
    key: (u16, u32),
    slot: Arc<InFlight>,
    value: Option<Arc<Vec<u8>>>,
}

impl<'a> SlotGuard<'a> {
    /// Marks `key` in flight in `inflight` (the stack's map, locked by the caller): readers of
    /// it wait for this guard's load; the mark goes when the guard drops.
    fn claim(
        stack: &'a Chunks,
        inflight: &mut HashMap<(u16, u32), Arc<InFlight>>,
        key: (u16, u32),
    ) -> SlotGuard<'a> {
        let slot = Arc::new(InFlight::default());
        inflight.insert(key, slot.clone());
        SlotGuard {
            stack,
            key,
            slot,
            value: None,
        }
    }
}

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        self.stack.inflight.lock().remove(&self.key);
        self.slot.finish(self.value.take());
    }
}

/// Chunks one read loads at once (see [`LayerStack::load_range`]).
const PARALLEL_LOADS: usize = 16;

/// Most chunks one fetch takes: a sequential reader's window doubles up to this.
const MAX_RUN: u32 = 16;
/// Most stored bytes one merged fetch asks for.
const MAX_RUN_BYTES: u64 = 4 << 20;
/// Sequential streams remembered (several files read at once each keep their own window).
const STREAMS: usize = 16;
/// Recent misses remembered for finding hot groups.
const RECENT_MISSES: usize = 64;
/// Fetches ahead in a file ([`LayerStack::set_file_runs`]) in flight at once, per stack.
const FILE_AHEAD_FETCHES: usize = 4;
/// Most stored bytes of a file's next chunks taken along in a reader's own fetch (about one
/// round trip's worth at 100 Mbit/s); the rest of the file goes in a fetch of its own.
const FILE_INLINE_BYTES: u64 = 256 << 10;

/// A sequential reader seen in a layer: the chunk its next miss would be, and its window.
#[derive(Clone, Copy)]
struct Stream {
    layer: u16,
    next: u32,
    window: u32,
}

/// Layers (bottom first) composed into one readable disk.
pub struct LayerStack {
    index: MergedIndex,
    /// With a fallible top layer ([`LayerStack::with_fallible_top`]): the index of the layers
    /// below it, used once the top is refused.
    below_top: Option<MergedIndex>,
    /// The fallible top layer was refused: reads go to the layers below it from then on.
    top_refused: std::sync::atomic::AtomicBool,
    size: u64,
    /// Shared with the load tasks handed to `loads`.
    chunks: Arc<Chunks>,
    /// Set once by the host; without it loads run one after another.
    loads: OnceLock<Arc<dyn ParallelLoads>>,
}

/// The layers and what loading their chunks shares: the decoded-chunk cache and the loads in
/// flight.
struct Chunks {
    layers: Vec<Layer>,
    cache: ChunkCache<(u16, u32)>,
    /// Chunks being read now: concurrent misses on one chunk cost one fetch and one decode.
    inflight: Mutex<InFlightMap>,
    /// Chunks readers needed, in first-need order (for startup traces), bounded.
    touched: Mutex<Touched>,
    /// With exact traces: the disk's 4 KiB blocks reads took data from, in first-read order
    /// ([`LayerStack::touched_blocks`]), bounded.
    touched_blocks: Mutex<TouchedBlocks>,
    /// Recent sequential readers, most recent last (see [`Chunks::window_for`]).
    streams: Mutex<Vec<Stream>>,
    /// Exact traces ([`LayerStack::set_exact_trace`]).
    exact_trace: std::sync::atomic::AtomicBool,
    /// Readers' recent misses (layer, chunk), oldest first (see [`Chunks::hot_group`]).
    recent_misses: Mutex<std::collections::VecDeque<(u16, u32)>>,
    /// Raw bytes of a hot group; 0: off ([`LayerStack::set_hot_group_bytes`]).
    hot_group_bytes: std::sync::atomic::AtomicU64,
    /// Where each chunk's file run ends, per layer ([`LayerStack::set_file_runs`]).
    file_ends: OnceLock<Vec<Vec<u32>>>,
    /// Most stored bytes one fetch ahead in a file asks for; 0: off.
    file_ahead_bytes: std::sync::atomic::AtomicU64,
    /// Fetches ahead in a file in flight now (at most [`FILE_AHEAD_FETCHES`]).
    file_ahead_inflight: std::sync::atomic::AtomicUsize,
}

/// Most chunks a trace remembers.
const TOUCHED_MAX: usize = 1 << 20;

/// Most blocks an exact trace remembers (16 GiB of reads).
const TOUCHED_BLOCKS_MAX: usize = 1 << 22;

/// Block size of [`LayerStack::touched_blocks`].
pub const TRACE_BLOCK: u64 = 4096;

#[derive(Default)]
struct TouchedBlocks {
    seen: std::collections::HashSet<u64>,
    order: Vec<u64>,
}

impl TouchedBlocks {
    /// Remembers the blocks of `[off, off + len)` not seen before, in order.
    fn note(&mut self, off: u64, len: u64) {
        let end = off.saturating_add(len.max(1));
        for b in off / TRACE_BLOCK..end.div_ceil(TRACE_BLOCK) {
            if self.order.len() < TOUCHED_BLOCKS_MAX && self.seen.insert(b) {
                self.order.push(b);
            }
        }
    }
}

#[derive(Default)]
struct Touched {
    seen: std::collections::HashSet<(u16, u32)>,
    order: Vec<(u16, u32)>,
}

impl LayerStack {
    /// Composes `layers` (bottom first) into a disk of `size` bytes. Every layer must have been
    /// written for a disk of at most `size` bytes.
    pub fn new(layers: Vec<Layer>, size: u64, cache_bytes: usize) -> Result<LayerStack> {
        for l in &layers {
            if l.logical_size() > size {
                return Err(Error::Invalid(format!(
                    "{}: layer is for a {} byte disk, larger than the image ({size} bytes)",
                    l.name(),
                    l.logical_size()
                )));
            }
        }
        let lists: Vec<&[crate::format::Extent]> = layers
            .iter()
            .map(|l| l.metadata().extents.as_slice())
            .collect();
        let index = MergedIndex::build(&lists)?;
        let largest_chunk = layers
            .iter()
            .map(|l| l.chunk_size() as usize)
            .max()
            .unwrap_or(1);
        Ok(LayerStack {
            index,
            below_top: None,
            top_refused: std::sync::atomic::AtomicBool::new(false),
            size,
            chunks: Arc::new(Chunks {
                layers,
                cache: ChunkCache::new(cache_bytes, largest_chunk),
                inflight: Mutex::new(HashMap::new()),
                touched: Mutex::new(Touched::default()),
                touched_blocks: Mutex::new(TouchedBlocks::default()),
                streams: Mutex::new(Vec::new()),
                exact_trace: std::sync::atomic::AtomicBool::new(false),
                recent_misses: Mutex::new(std::collections::VecDeque::new()),
                hot_group_bytes: std::sync::atomic::AtomicU64::new(0),
                file_ends: OnceLock::new(),
                file_ahead_bytes: std::sync::atomic::AtomicU64::new(0),
                file_ahead_inflight: std::sync::atomic::AtomicUsize::new(0),
            }),
            loads: OnceLock::new(),
        })
    }

    /// Makes the top layer fallible (a startup layer, FORMAT.md §9, whose every block equals
    /// what the layers below hold there): a read of one of its chunks that fails (a chunk that
    /// fails its digest check, a source that cannot serve it) refuses the top layer
    /// ([`Self::refuse_top`]) and reads those blocks from the layers below, which answer as
    /// the image does. Never a byte of a chunk that failed its check: the top's chunks are
    /// served only verified, the layers below only as always.
    pub fn with_fallible_top(mut self) -> Result<LayerStack> {
        let layers = self.layers();
        if layers.len() < 2 {
            return Ok(self);
        }
        let lists: Vec<&[crate::format::Extent]> = layers[..layers.len() - 1]
            .iter()
            .map(|l| l.metadata().extents.as_slice())
            .collect();
        self.below_top = Some(MergedIndex::build(&lists)?);
        Ok(self)
    }

    /// Stops reading the fallible top layer (see [`Self::with_fallible_top`]): from now on
    /// every read goes to the layers below. Returns whether this call refused it (false: it
    /// was already refused, or the top is not fallible).
    pub fn refuse_top(&self) -> bool {
        self.below_top.is_some()
            && !self
                .top_refused
                .swap(true, std::sync::atomic::Ordering::AcqRel)
    }

    /// Whether the fallible top layer was refused.
    pub fn top_refused(&self) -> bool {
        self.top_refused.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Makes [`Self::touched`] exact: only chunks a read touched, including reads the
    /// decoded-chunk cache served (one lock per such read), never the chunks a sequential
    /// reader's widened fetch took along but nobody read. For recording a trace to ship
    /// (`lsmctl trace bake`): each chunk in it is fetched by every node that uses it.
    pub fn set_exact_trace(&self, exact: bool) {
        self.chunks
            .exact_trace
            .store(exact, std::sync::atomic::Ordering::Relaxed);
    }

    /// Hot groups (off with 0, the default): a reader's miss that is not sequential, in an
    /// aligned stretch of `bytes` (raw) of a layer where another recent miss fell too, fetches
    /// that stretch's cold chunks around it in one request. Fewer round trips for a reader
    /// that touches a region here and there (a program faulting in pages of its binary and
    /// libraries), for more bytes.
    pub fn set_hot_group_bytes(&self, bytes: u64) {
        self.chunks
            .hot_group_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// Files' data as runs of chunks (once; later calls are ignored): `(layer, first, end)` for
    /// each stretch of a file stored in chunks `first..end` of one layer, in the file's order.
    /// With [`Self::set_file_ahead_bytes`], a reader's miss on a chunk of such a run also
    /// fetches the run's cold chunks after it (up to that many stored bytes, in one ranged
    /// GET on one of the host's threads, beside the reader's own fetch): a program faulting in
    /// pages of its binary and libraries here and there then pays about one round trip per
    /// file instead of one per page it touches. Runs naming chunks a layer lacks are ignored:
    /// the runs come from the filesystem inside the image, which the host parsed untrusted;
    /// a wrong run costs bytes, never correctness (every chunk is still checked).
    pub fn set_file_runs(&self, runs: &[(u16, u32, u32)]) {
        let mut ends: Vec<Vec<u32>> = self
            .chunks
            .layers
            .iter()
            .map(|l| vec![0; l.metadata().chunks.len()])
            .collect();
        for &(layer, first, end) in runs {
            let Some(e) = ends.get_mut(layer as usize) else {
                continue;
            };
            if first >= end || end as usize > e.len() {
                continue;
            }
            for c in first..end {
                e[c as usize] = e[c as usize].max(end);
            }
        }
        let _ = self.chunks.file_ends.set(ends);
    }

    /// Most stored bytes a fetch ahead in a file ([`Self::set_file_runs`]) asks for; 0 (the
    /// default) turns it off.
    pub fn set_file_ahead_bytes(&self, bytes: u64) {
        self.chunks
            .file_ahead_bytes
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// [`Self::set_file_ahead_bytes`]'s value (0: off).
    pub fn file_ahead_bytes(&self) -> u64 {
        self.chunks
            .file_ahead_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Lends the host's threads for parallel chunk loads (once; later calls are ignored).
    pub fn set_parallel_loads(&self, loads: Arc<dyn ParallelLoads>) {
        let _ = self.loads.set(loads);
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The layers, bottom first.
    pub fn layers(&self) -> &[Layer] {
        &self.chunks.layers
    }
    /// The merged index (without the fallible top layer once it is refused).
    pub fn index(&self) -> &MergedIndex {
        match &self.below_top {
            Some(below) if self.top_refused() => below,
            _ => &self.index,
        }
    }

    /// Bounds check shared by every request.
    pub fn check_range(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(Error::OutOfRange {
                offset: off,
                len,
                size: self.size,
            }),
        }
    }

    /// The decoded, verified chunk, from cache or from its layer. Concurrent misses on the same
    /// chunk wait for the first reader instead of fetching it again. Remembered as needed (see
    /// [`Self::touched`]).
    pub fn chunk(&self, layer: u16, chunk: u32) -> Result<Arc<Vec<u8>>> {
        self.chunks.note_needed(layer, chunk);
        if let Some(c) = self.chunks.cache.get(&(layer, chunk)) {
            return Ok(c);
        }
        let take = self.fetch_file_ahead(layer, chunk);
        self.chunks.load(layer, chunk, take, true, true)
    }

    /// On a reader's miss on `chunk` that lies in a file run ([`Self::set_file_runs`]) going
    /// on after it: the run's chunks after it within [`FILE_INLINE_BYTES`] are taken along
    /// in the reader's own fetch (returns how many chunks that fetch takes, at least 1), and
    /// when the run goes on past them, one more fetch of its next cold chunks (at most the
    /// file-ahead bytes) starts on the host's threads, unless [`FILE_AHEAD_FETCHES`] are in
    /// flight already or there are no host threads. Never waits.
    fn fetch_file_ahead(&self, layer: u16, chunk: u32) -> u32 {
        use std::sync::atomic::Ordering::Relaxed;
        let cap = self.chunks.file_ahead_bytes.load(Relaxed);
        let (Some(ends), Some(loads)) = (self.chunks.file_ends.get(), self.loads.get()) else {
            return 1;
        };
        let end = ends
            .get(layer as usize)
            .and_then(|e| e.get(chunk as usize))
            .copied()
            .unwrap_or(0);
        let Some(l) = self.chunks.layers.get(layer as usize) else {
            return 1;
        };
        if cap == 0 || end <= chunk.saturating_add(1) {
            return 1;
        }
        let entries = &l.metadata().chunks;
        let mut inline_end = chunk + 1;
        let mut bytes = entries
            .get(chunk as usize)
            .map_or(0, |e| e.stored_len as u64);
        while inline_end < end {
            bytes += entries
                .get(inline_end as usize)
                .map_or(0, |e| e.stored_len as u64);
            if bytes > FILE_INLINE_BYTES.min(cap) {
                break;
            }
            inline_end += 1;
        }
        if inline_end < end {
            self.spawn_fetch_ahead(loads.as_ref(), layer, inline_end, end, cap);
        }
        inline_end - chunk
    }

    /// Starts [`Chunks::fetch_ahead`] of `from..end` on the host's threads, unless
    /// [`FILE_AHEAD_FETCHES`] are in flight already.
    fn spawn_fetch_ahead(
        &self,
        loads: &dyn ParallelLoads,
        layer: u16,
        from: u32,
        end: u32,
        cap: u64,
    ) {
        use std::sync::atomic::Ordering::Relaxed;
        let busy = &self.chunks.file_ahead_inflight;
        if busy
            .fetch_update(Relaxed, Relaxed, |n| {
                (n < FILE_AHEAD_FETCHES).then_some(n + 1)
            })
            .is_err()
        {
            return;
        }
        let chunks = self.chunks.clone();
        loads.spawn(Box::new(move || {
            // Released even if the fetch panics.
            struct Done<'a>(&'a std::sync::atomic::AtomicUsize);
            impl Drop for Done<'_> {
                fn drop(&mut self) {
                    self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            let _done = Done(&chunks.file_ahead_inflight);
            chunks.fetch_ahead(layer, from, end, cap);
        }));
    }

    /// Loads the chunks of `[off, off + len)` that the decoded-chunk cache lacks all at once,
    /// each as [`Self::chunk`] would: chunks stored back to back are fetched together with one
    /// ranged read ([`Layer::read_run`]), and separate runs in parallel on the host's threads,
    /// so a read spanning several cold chunks waits for one round trip, not for the sum of
    /// them. Failures are left for the read that follows to meet and report.
    pub fn load_range(&self, off: u64, len: u64) {
        let mut missing: Vec<(u16, u32)> = Vec::new();
        for seg in self.index().segments(off, len) {
            if let Target::Data { layer, chunk, .. } = seg.target {
                let key = (layer, chunk);
                if !missing.contains(&key) && self.chunks.cache.get(&key).is_none() {
                    missing.push((layer, chunk));
                }
            }
        }
        if missing.len() < 2 {
            return;
        }
        // Runs of consecutive chunks of one layer: (layer, first chunk, count).
        let mut runs: Vec<(u16, u32, u32)> = Vec::new();
        for &(l, c) in &missing {
            self.chunks.note_needed(l, c);
            match runs.last_mut() {
                Some((rl, first, n)) if *rl == l && *first + *n == c => *n += 1,
                _ => runs.push((l, c, 1)),
            }
        }
        for &(layer, first, n) in &runs {
            // The read's own fetch is planned: only the file's chunks after it go ahead.
            let last = first + n - 1;
            if let Some(loads) = self.loads.get() {
                let end = self
                    .chunks
                    .file_ends
                    .get()
                    .and_then(|e| e.get(layer as usize)?.get(last as usize).copied())
                    .unwrap_or(0);
                let cap = self
                    .chunks
                    .file_ahead_bytes
                    .load(std::sync::atomic::Ordering::Relaxed);
                if cap > 0 && end > last + 1 {
                    self.spawn_fetch_ahead(loads.as_ref(), layer, last + 1, end, cap);
                }
            }
        }
        let Some(loads) = self.loads.get() else {
            // No host threads: each run in turn, still one fetch per run.
            for (layer, first, n) in runs {
                let _ = self.chunks.load(layer, first, n, true, true);
            }
            return;
        };
        for batch in runs.chunks(PARALLEL_LOADS) {
            let tasks = batch
                .iter()
                .map(|&(layer, first, n)| {
                    let chunks = self.chunks.clone();
                    Box::new(move || {
                        let _ = chunks.load(layer, first, n, true, true);
                    }) as LoadTask
                })
                .collect();
            loads.run_all(tasks);
        }
    }

    /// Chunks that readers needed from the decoded-chunk cache's misses, in the order first
    /// needed (prefetching does not count): what a startup reads.
    pub fn touched(&self) -> Vec<(u16, u32)> {
        self.chunks.touched.lock().order.clone()
    }

    /// With exact traces ([`Self::set_exact_trace`]), the disk's [`TRACE_BLOCK`] blocks that
    /// reads took layer data from, by block number, in the order first read (a block partly
    /// read counts whole). What `lsmctl trace bake` packs into a startup layer: the bytes a
    /// start reads, without the rest of the chunks they sit in. Empty without exact traces.
    pub fn touched_blocks(&self) -> Vec<u64> {
        self.chunks.touched_blocks.lock().order.clone()
    }

    /// [`Self::chunk`] for prefetching: loads without counting as needed, widening like a
    /// sequential reader when its neighbours come next (chunks prefetched in disk order).
    pub fn load_chunk(&self, layer: u16, chunk: u32) -> Result<Arc<Vec<u8>>> {
        self.chunks.load_chunk(layer, chunk)
    }

    /// Makes the decoded-chunk cache hold at least `bytes` (never shrinks it): a host about to
    /// prefetch what a start will read sizes it so the prefetched chunks are still there when
    /// the start reads them, instead of being decoded twice.
    pub fn reserve_cache(&self, bytes: usize) {
        self.chunks.cache.reserve(bytes);
    }

    /// Prefetches chunks `first..first + n` of `layer` (a stretch of a startup trace): those
    /// neither decoded nor being loaded are fetched, as few fetches as they allow (one for
    /// chunks stored back to back, at most [`MAX_RUN_BYTES`] each), checked and cached as
    /// [`Self::chunk`] would. Neither counted as needed nor taken as a sequential reader.
    /// Returns the first failure (prefetch is a hint: the caller logs it and goes on); a
    /// failure in the fallible top layer refuses it ([`Self::with_fallible_top`]).
    pub fn prefetch_run(&self, layer: u16, first: u32, n: u32) -> Result<()> {
        let end = first.saturating_add(n);
        let mut failure = Ok(());
        for c in first..end {
            let busy = self.chunks.cache.get(&(layer, c)).is_some()
                || self.chunks.inflight.lock().contains_key(&(layer, c));
            if !busy {
                if let Err(e) = self.chunks.load(layer, c, end - c, false, false) {
                    self.refuse_failed_top(layer, &e);
                    failure = failure.and(Err(e));
                }
            }
        }
        failure
    }

    /// Fetches chunks `first..end` of `layer` **in order, as streams**: each stretch of them
    /// stored back to back (at most `max_bytes` stored bytes) is claimed as in flight, then
    /// fetched with ONE streamed read ([`Layer::stream_run`]), and each chunk is checked,
    /// cached and handed to the readers waiting for it as soon as it arrives — a reader that
    /// needs a chunk of the stream waits for it instead of fetching it itself, and the
    /// stream's first chunks do not share the link with its later ones. One stretch after
    /// the other, on the caller's thread. Chunks already decoded or being loaded are skipped;
    /// chunks the host store keeps are loaded from it. Not counted as needed. For a startup
    /// layer (FORMAT.md §9), whose chunks are stored in the order a start reads them.
    /// Returns the first failure; a failure in the fallible top layer refuses it
    /// ([`Self::with_fallible_top`]) and ends the stream (what is left of that layer would
    /// never be read).
    pub fn stream_chunks(&self, layer: u16, first: u32, end: u32, max_bytes: u64) -> Result<()> {
        let Some(l) = self.layers().get(layer as usize) else {
            return Err(Error::Invalid(format!("no layer {layer}")));
        };
        let end = end.min(l.metadata().chunks.len() as u32);
        let mut failure = Ok(());
        let mut c = first;
        while c < end && !(self.top_refused() && layer as usize + 1 == self.layers().len()) {
            let Some(guards) = self.chunks.claim_stream(layer, c, end, max_bytes) else {
                // Decoded, being loaded, or kept in the host store (then loaded from there).
                if l.is_kept(c) {
                    if let Err(e) = self.chunks.load(layer, c, 1, false, false) {
                        self.refuse_failed_top(layer, &e);
                        failure = failure.and(Err(e));
                    }
                }
                c += 1;
                continue;
            };
            let n = guards.len() as u32;
            if let Err(e) = self.chunks.stream(layer, c, guards, &|e| {
                self.refuse_failed_top(layer, e).is_none()
            }) {
                failure = failure.and(Err(e));
            }
            c += n;
        }
        failure
    }

    /// The decoded chunk if the cache holds it; never touches the layer.
    pub fn cached_chunk(&self, layer: u16, chunk: u32) -> Option<Arc<Vec<u8>>> {
        self.chunks.cache.get(&(layer, chunk))
    }

    /// The segments of `[off, off + len)`.
    pub fn map(&self, off: u64, len: u64) -> Result<Vec<Segment>> {
        self.check_range(off, len)?;
        Ok(self.index().segments(off, len))
    }

    /// Fills `dst` (of `s.len` bytes) with segment `s`.
    pub fn read_segment(&self, s: &Segment, dst: &mut [u8]) -> Result<()> {
        self.read_segment_from(s, dst, false).map(|_| ())
    }

    /// [`Self::read_segment`], or `Ok(false)` with `dst` untouched when `cached_only` is set
    /// and the segment's chunk is not in the decoded-chunk cache.
    pub fn read_segment_from(
        &self,
        s: &Segment,
        dst: &mut [u8],
        cached_only: bool,
    ) -> Result<bool> {
        match s.target {
            Target::Hole | Target::Zero { .. } => dst.fill(0),
            Target::Data {
                layer,
                chunk,
                chunk_offset,
            } => {
                let c = if cached_only {
                    match self.cached_chunk(layer, chunk) {
                        Some(c) => {
                            if self.chunks.exact() {
                                self.chunks.note_needed(layer, chunk);
                            }
                            c
                        }
                        None => return Ok(false),
                    }
                } else {
                    match self.chunk(layer, chunk) {
                        Ok(c) => c,
                        Err(e) => return self.read_below_failed_top(s, dst, layer, e),
                    }
                };
                if self.chunks.exact() {
                    let mut blocks = self.chunks.touched_blocks.lock();
                    blocks.note(s.offset, dst.len() as u64);
                }
                let from = chunk_offset as usize;
                let src = c.get(from..from + dst.len()).ok_or_else(|| {
                    Error::corrupt(
                        self.chunks.layers[layer as usize].name(),
                        "extent",
                        s.offset,
                        "extent leaves its chunk",
                    )
                })?;
                dst.copy_from_slice(src);
            }
        }
        Ok(true)
    }
}

impl LayerStack {
    /// After a read of `layer`'s chunk failed with `e`: when `layer` is the fallible top
    /// ([`Self::with_fallible_top`]), refuses it and fills `dst` with segment `s` from the
    /// layers below; otherwise `e`.
    fn read_below_failed_top(
        &self,
        s: &Segment,
        dst: &mut [u8],
        layer: u16,
        e: Error,
    ) -> Result<bool> {
        let Some(below) = self.refuse_failed_top(layer, &e) else {
            return Err(e);
        };
        for seg in below.segments(s.offset, dst.len() as u64) {
            let at = (seg.offset - s.offset) as usize;
            self.read_segment(&seg, &mut dst[at..at + seg.len as usize])?;
        }
        Ok(true)
    }
}

impl LayerStack {
    /// When `layer` is the fallible top ([`Self::with_fallible_top`]) and a load of one of its
    /// chunks failed with `e`: refuses it (said once) and returns the index of the layers
    /// below. Otherwise none.
    fn refuse_failed_top(&self, layer: u16, e: &Error) -> Option<&MergedIndex> {
        let below = match &self.below_top {
            Some(b) if layer as usize + 1 == self.layers().len() => b,
            _ => return None,
        };
        if self.refuse_top() {
            tracing::warn!(layer = %self.layers()[layer as usize].name(), error = %e, "refusing the fallible top layer: a chunk failed its digest check or could not be read; its blocks are read from the layers below");
        }
        Some(below)
    }
}

impl Chunks {
    /// The decoded, verified chunk, from cache or from its layer. Concurrent misses on the same
    /// chunk wait for the first reader instead of fetching it again. Remembered as needed (see
    /// [`LayerStack::touched`]).
    fn exact(&self) -> bool {
        self.exact_trace.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn note_needed(&self, layer: u16, chunk: u32) {
        let mut t = self.touched.lock();
        if t.order.len() < TOUCHED_MAX && t.seen.insert((layer, chunk)) {
            t.order.push((layer, chunk));
        }
    }

    /// [`LayerStack::chunk`] for prefetching: loads without counting as needed.
    fn load_chunk(&self, layer: u16, chunk: u32) -> Result<Arc<Vec<u8>>> {
        self.load(layer, chunk, 1, false, true)
    }

    /// How many chunks a miss on `chunk` fetches: 1 for a random read; for a miss where a
    /// reader's last fetch ended (a sequential reader), twice that reader's last window, up to
    /// [`MAX_RUN`]. Remembers the fetch as ending at `chunk + window`.
    fn window_for(&self, layer: u16, chunk: u32, at_least: u32) -> u32 {
        let mut streams = self.streams.lock();
        let found = streams
            .iter()
            .position(|s| s.layer == layer && (s.next == chunk || s.next.wrapping_add(1) == chunk));
        let window = match found {
            Some(i) => (streams.remove(i).window * 2).min(MAX_RUN),
            None => 1,
        }
        .max(at_least);
        if streams.len() >= STREAMS {
            streams.remove(0);
        }
        streams.push(Stream {
            layer,
            next: chunk.saturating_add(window),
            window,
        });
        window
    }

    /// Loads `chunk` (from the decoded-chunk cache, by waiting for a reader already loading it,
    /// or by reading it), and with it the cold chunks stored right after it, up to `at_least`
    /// chunks in all or the sequential window ([`Self::window_for`]), in one fetch. When a
    /// reader `needed` the chunk, the chunks fetched along are remembered as needed too: the
    /// reader will take them from the decoded-chunk cache, on the hot path that records nothing.
    fn load(
        &self,
        layer: u16,
        chunk: u32,
        at_least: u32,
        needed: bool,
        widen: bool,
    ) -> Result<Arc<Vec<u8>>> {
        let key = (layer, chunk);
        if let Some(c) = self.cache.get(&key) {
            return Ok(c);
        }
        let (slot, leader) = {
            let mut m = self.inflight.lock();
            match m.get(&key) {
                Some(s) => (s.clone(), false),
                None => {
                    let s = Arc::new(InFlight::default());
                    m.insert(key, s.clone());
                    (s, true)
                }
            }
        };
        if !leader {
            if let Some(c) = slot.wait() {
                return Ok(c);
            }
            // The first reader failed: try on our own (and report our own error).
            return self.read_chunk_now(layer, chunk);
        }
        // The guards release the slots even if the load panics (a bug in a decoder or a
        // source): waiters then retry on their own instead of waiting forever.
        let mut guard = SlotGuard {
            stack: self,
            key,
            slot,
            value: None,
        };
        // A widening fetch (a reader's, or a prefetch of single chunks in disk order) takes
        // its sequential window along; a planned prefetch run takes exactly what it asks. A
        // reader's random miss in a hot group takes the group's cold chunks around it.
        let window = match widen {
            true => self.window_for(layer, chunk, at_least),
            false => at_least,
        };
        let hot = match widen && needed {
            true => self.hot_group(layer, chunk, window > at_least),
            false => None,
        };
        let (first, mut extras) = match hot {
            Some((lo, hi)) => self.claim_around(layer, chunk, lo, hi.max(chunk + at_least)),
            None => (chunk, self.claim_run(layer, chunk, window)),
        };
        // Taken along for a reader who will read them from the cache, on the hot path — which
        // notes nothing unless traces are exact (then it notes what is really read).
        if needed && !self.exact() {
            for g in &extras {
                self.note_needed(g.key.0, g.key.1);
            }
        }
        let why = match (needed, at_least > 1, hot.is_some() && !extras.is_empty()) {
            (false, _, _) => "prefetch",
            (true, _, true) => "group",
            (true, true, false) => "span",
            (true, false, false) if extras.is_empty() => "demand",
            (true, false, false) => "window",
        };
        self.log_fetch(layer, first, extras.len() as u32, why);
        if extras.is_empty() {
            let r = self.read_chunk_now(layer, chunk);
            guard.value = r.as_ref().ok().cloned();
            return r;
        }
        let l = &self.layers[layer as usize];
        let results = l.read_run(first, 1 + extras.len() as u32);
        let mut r = Err(Error::Invalid(format!("no chunk {chunk} in layer {layer}")));
        let mut extras = extras.iter_mut();
        for (c, res) in (first..).zip(results) {
            if c == chunk {
                r = res.map(Arc::new);
                continue;
            }
            let Some(g) = extras.next() else { break };
            if let Ok(d) = res {
                let d = Arc::new(d);
                self.cache.insert(g.key, d.clone());
                g.value = Some(d);
            }
        }
        if let Ok(d) = &r {
            self.cache.insert(key, d.clone());
            guard.value = Some(d.clone());
        }
        r
    }

    /// For a reader's miss on `chunk` that is not `sequential` (a stream's window): the aligned
    /// group of [`LayerStack::set_hot_group_bytes`] holding it, `(first, end)`, when another recent miss fell
    /// in that group too — a region read here and there, like the pages a program faults in
    /// of its binary and libraries, or a package's small files; `None` for a first miss there.
    /// Remembers the miss. A second round trip into the same group is the sign: the miss then
    /// takes the group's cold chunks along (one ranged GET), instead of paying one round trip
    /// per chunk the reader goes on to touch.
    fn hot_group(&self, layer: u16, chunk: u32, sequential: bool) -> Option<(u32, u32)> {
        let group = self
            .hot_group_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        let size = self.layers.get(layer as usize)?.chunk_size().max(1) as u64;
        let per_group = (group / size).min(u32::MAX as u64) as u32;
        if per_group < 2 {
            return None;
        }
        let first = chunk / per_group * per_group;
        let end = first.saturating_add(per_group);
        let mut recent = self.recent_misses.lock();
        let hot = recent
            .iter()
            .any(|&(l, c)| l == layer && c != chunk && (first..end).contains(&c));
        if recent.len() >= RECENT_MISSES {
            recent.pop_front();
        }
        recent.push_back((layer, chunk));
        (hot && !sequential).then_some((first, end))
    }

    /// Claims (as [`Self::claim_run`] does) the cold chunks of `lo..hi` stored back to back
    /// with `chunk` on both sides of it: returns the run's first chunk and the claimed chunks
    /// other than `chunk`, in order.
    fn claim_around(&self, layer: u16, chunk: u32, lo: u32, hi: u32) -> (u32, Vec<SlotGuard<'_>>) {
        let Some(l) = self.layers.get(layer as usize) else {
            return (chunk, Vec::new());
        };
        if l.is_kept(chunk) {
            return (chunk, Vec::new());
        }
        let chunks = &l.metadata().chunks;
        let stored = |c: u32| chunks.get(c as usize).map_or(0, |e| e.stored_len as u64);
        let mut inflight = self.inflight.lock();
        let free = |c: u32, inflight: &InFlightMap| self.is_free(l, layer, c, inflight);
        let mut bytes = stored(chunk);
        let mut first = chunk;
        while first > lo
            && free(first - 1, &inflight)
            && l.adjacent(first - 1, first)
            && bytes + stored(first - 1) <= MAX_RUN_BYTES
        {
            first -= 1;
            bytes += stored(first);
        }
        let mut end = chunk + 1;
        while end < hi
            && free(end, &inflight)
            && l.adjacent(end - 1, end)
            && bytes + stored(end) <= MAX_RUN_BYTES
        {
            bytes += stored(end);
            end += 1;
        }
        let mut out = Vec::new();
        for c in (first..end).filter(|&c| c != chunk) {
            out.push(SlotGuard::claim(self, &mut inflight, (layer, c)));
        }
        (first, out)
    }

    /// Whether chunk `c` of `layer` (`l`) exists and is neither decoded, being loaded nor kept
    /// in the host store: one a merged or ahead fetch may take.
    fn is_free(&self, l: &Layer, layer: u16, c: u32, inflight: &InFlightMap) -> bool {
        (c as usize) < l.metadata().chunks.len()
            && !inflight.contains_key(&(layer, c))
            && self.cache.get(&(layer, c)).is_none()
            && !l.is_kept(c)
    }

    /// Fetches, with one ranged read, the chunks of `from..end` of `layer` from the first one
    /// neither decoded, being loaded nor kept in the host store, as far as they are stored back
    /// to back, free, and within `cap` stored bytes (at least one chunk); checked and cached as
    /// [`Self::load`] does, not counted as needed (`file` in the fetch log).
    fn fetch_ahead(&self, layer: u16, from: u32, end: u32, cap: u64) {
        let Some(l) = self.layers.get(layer as usize) else {
            return;
        };
        let chunks = &l.metadata().chunks;
        let stored = |c: u32| chunks.get(c as usize).map_or(0, |e| e.stored_len as u64);
        let mut inflight = self.inflight.lock();
        let free = |c: u32, inflight: &InFlightMap| self.is_free(l, layer, c, inflight);
        let Some(first) = (from..end).find(|&c| free(c, &inflight)) else {
            return;
        };
        let mut guards = vec![SlotGuard::claim(self, &mut inflight, (layer, first))];
        let mut bytes = stored(first);
        let mut next = first + 1;
        while next < end
            && free(next, &inflight)
            && l.adjacent(next - 1, next)
            && bytes + stored(next) <= cap
        {
            bytes += stored(next);
            guards.push(SlotGuard::claim(self, &mut inflight, (layer, next)));
            next += 1;
        }
        drop(inflight);
        self.log_fetch(layer, first, guards.len() as u32 - 1, "file");
        let results = l.read_run(first, guards.len() as u32);
        for (g, res) in guards.iter_mut().zip(results) {
            if let Ok(d) = res {
                let d = Arc::new(d);
                self.cache.insert(g.key, d.clone());
                g.value = Some(d);
            }
        }
    }

    /// Claims as in flight (readers of them wait for the stream) the chunks from `first` on,
    /// before `end`, that one streamed read takes: `first` and the chunks stored right after
    /// it, as long as each is free ([`Self::is_free`]) and they stay within `max_bytes`
    /// stored bytes (`first` alone may exceed it). `None` when `first` is not free.
    fn claim_stream(
        &self,
        layer: u16,
        first: u32,
        end: u32,
        max_bytes: u64,
    ) -> Option<Vec<SlotGuard<'_>>> {
        let l = self.layers.get(layer as usize)?;
        let chunks = &l.metadata().chunks;
        let stored = |c: u32| chunks.get(c as usize).map_or(0, |e| e.stored_len as u64);
        let mut inflight = self.inflight.lock();
        if !self.is_free(l, layer, first, &inflight) {
            return None;
        }
        let mut guards = vec![SlotGuard::claim(self, &mut inflight, (layer, first))];
        let mut bytes = stored(first);
        let mut next = first + 1;
        while next < end
            && self.is_free(l, layer, next, &inflight)
            && l.adjacent(next - 1, next)
            && bytes + stored(next) <= max_bytes
        {
            bytes += stored(next);
            guards.push(SlotGuard::claim(self, &mut inflight, (layer, next)));
            next += 1;
        }
        Some(guards)
    }

    /// Streams the chunks `guards` claimed (from `first`, [`Self::claim_stream`]) with one
    /// read ([`Layer::stream_run`]): each is cached and its slot released (its waiters woken
    /// with it) as soon as it arrives and passes its check. A failed chunk's slot is released
    /// empty (its waiters fetch it themselves and meet the failure) after `on_fail` saw the
    /// error; the stream goes on only if `on_fail` says so. Returns the first failure.
    fn stream(
        &self,
        layer: u16,
        first: u32,
        guards: Vec<SlotGuard<'_>>,
        on_fail: &dyn Fn(&Error) -> bool,
    ) -> Result<()> {
        let l = &self.layers[layer as usize];
        let n = guards.len() as u32;
        self.log_fetch(layer, first, n - 1, "stream");
        let mut guards: Vec<Option<SlotGuard<'_>>> = guards.into_iter().map(Some).collect();
        let mut failure = Ok(());
        l.stream_run(first, n, &mut |c, r| {
            let g = guards.get_mut((c - first) as usize).and_then(Option::take);
            match r {
                Ok(d) => {
                    let d = Arc::new(d);
                    self.cache.insert((layer, c), d.clone());
                    if let Some(mut g) = g {
                        g.value = Some(d);
                    }
                    true
                }
                Err(e) => {
                    let go_on = on_fail(&e);
                    if failure.is_ok() {
                        failure = Err(e);
                    }
                    drop(g);
                    go_on
                }
            }
        });
        failure
    }

    /// Claims (as in-flight, so concurrent readers wait for this fetch) the chunks after
    /// `chunk`, up to `window` chunks in all, that one fetch should take along: stored right
    /// after it, not cached, not being loaded, not kept in the host store; none when `chunk`
    /// itself is kept there.
    fn claim_run(&self, layer: u16, chunk: u32, window: u32) -> Vec<SlotGuard<'_>> {
        let Some(l) = self.layers.get(layer as usize) else {
            return Vec::new();
        };
        if window < 2 || l.is_kept(chunk) {
            return Vec::new();
        }
        let chunks = &l.metadata().chunks;
        let mut bytes = chunks
            .get(chunk as usize)
            .map_or(0, |e| e.stored_len as u64);
        let mut out = Vec::new();
        let mut inflight = self.inflight.lock();
        for c in chunk + 1..chunk.saturating_add(window) {
            let Some(e) = chunks.get(c as usize) else {
                break;
            };
            bytes += e.stored_len as u64;
            if bytes > MAX_RUN_BYTES
                || !l.adjacent(c - 1, c)
                || inflight.contains_key(&(layer, c))
                || self.cache.get(&(layer, c)).is_some()
                || l.is_kept(c)
            {
                break;
            }
            out.push(SlotGuard::claim(self, &mut inflight, (layer, c)));
        }
        out
    }

    /// One line per fetch at debug level (target `lsm::fetch`): which chunks (from `chunk`), how
    /// many stored bytes, and why: `demand` (a reader's miss), `window` (a sequential reader's
    /// miss with the chunks after it), `group` (a random miss in a hot group, with the group's
    /// cold chunks around it), `span` (one read's cold chunks), `file` (a file's chunks after a
    /// reader's miss, [`LayerStack::set_file_runs`]), `prefetch` (trace or metadata), `stream`
    /// (a startup layer fetched in order, [`LayerStack::stream_chunks`]). What the README's
    /// byte analysis of a lazy start is made from.
    fn log_fetch(&self, layer: u16, chunk: u32, extras: u32, why: &str) {
        if !tracing::enabled!(target: "lsm::fetch", tracing::Level::DEBUG) {
            return;
        }
        let Some(l) = self.layers.get(layer as usize) else {
            return;
        };
        let entries = &l.metadata().chunks;
        let stored: u64 = (chunk..=chunk.saturating_add(extras))
            .filter_map(|c| entries.get(c as usize))
            .map(|e| e.stored_len as u64)
            .sum();
        tracing::debug!(target: "lsm::fetch", layer, chunk, chunks = 1 + extras, stored, why, "fetch");
    }

    fn read_chunk_now(&self, layer: u16, chunk: u32) -> Result<Arc<Vec<u8>>> {
        let l = self
            .layers
            .get(layer as usize)
            .ok_or_else(|| Error::Invalid(format!("no layer {layer}")))?;
        let data = Arc::new(l.read_chunk(chunk)?);
        self.cache.insert((layer, chunk), data.clone());
        Ok(data)
    }
}
