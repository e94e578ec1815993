//! A read-only stack of immutable layers over one virtual disk: the layers, their merged index,
//! and a decoded-chunk cache. Reads never take a lock other than a cache shard's.

use std::collections::HashMap;
use std::sync::{Arc, Condvar};

use parking_lot::Mutex;

use crate::cache::ChunkCache;
use crate::error::{Error, Result};
use crate::merged::{MergedIndex, Segment, Target};
use crate::reader::Layer;

/// Default bound of the decoded-chunk cache.
pub const DEFAULT_CACHE_BYTES: usize = 64 << 20;

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

/// Releases a leader's in-flight slot when the load ends, by return or by unwinding.
struct SlotGuard<'a> {
    stack: &'a LayerStack,
    key: (u16, u32),
    slot: Arc<InFlight>,
    value: Option<Arc<Vec<u8>>>,
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

/// A sequential reader seen in a layer: the chunk its next miss would be, and its window.
#[derive(Clone, Copy)]
struct Stream {
    layer: u16,
    next: u32,
    window: u32,
}

/// Layers (bottom first) composed into one readable disk.
pub struct LayerStack {
    layers: Vec<Layer>,
    index: MergedIndex,
    size: u64,
    cache: ChunkCache<(u16, u32)>,
    /// Chunks being read now: concurrent misses on one chunk cost one fetch and one decode.
    inflight: Mutex<HashMap<(u16, u32), Arc<InFlight>>>,
    /// Chunks readers needed, in first-need order (for startup traces), bounded.
    touched: Mutex<Touched>,
    /// Recent sequential readers, most recent last (see [`Self::window_for`]).
    streams: Mutex<Vec<Stream>>,
}

/// Most chunks a trace remembers.
const TOUCHED_MAX: usize = 1 << 20;

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
            layers,
            index,
            size,
            cache: ChunkCache::new(cache_bytes, largest_chunk),
            inflight: Mutex::new(HashMap::new()),
            touched: Mutex::new(Touched::default()),
            streams: Mutex::new(Vec::new()),
        })
    }

    /// Disk size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
    /// The layers, bottom first.
    pub fn layers(&self) -> &[Layer] {
        &self.layers
    }
    /// The merged index.
    pub fn index(&self) -> &MergedIndex {
        &self.index
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
        self.note_needed(layer, chunk);
        self.load(layer, chunk, 1)
    }

    fn note_needed(&self, layer: u16, chunk: u32) {
        let mut t = self.touched.lock();
        if t.order.len() < TOUCHED_MAX && t.seen.insert((layer, chunk)) {
            t.order.push((layer, chunk));
        }
    }

    /// Loads the chunks of `[off, off + len)` that the decoded-chunk cache lacks all at once,
    /// each as [`Self::chunk`] would: chunks stored back to back are fetched together with one
    /// ranged read ([`Layer::read_run`]), and separate runs in parallel, so a read spanning
    /// several cold chunks waits for one round trip, not for the sum of them. Failures are
    /// left for the read that follows to meet and report.
    pub fn load_range(&self, off: u64, len: u64) {
        let mut missing: Vec<(u16, u32)> = Vec::new();
        for seg in self.index.segments(off, len) {
            if let Target::Data { layer, chunk, .. } = seg.target {
                if !missing.contains(&(layer, chunk)) && self.cache.get(&(layer, chunk)).is_none() {
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
            self.note_needed(l, c);
            match runs.last_mut() {
                Some((rl, first, n)) if *rl == l && *first + *n == c => *n += 1,
                _ => runs.push((l, c, 1)),
            }
        }
        for batch in runs.chunks(PARALLEL_LOADS) {
            std::thread::scope(|sc| {
                for &(layer, first, n) in &batch[1..] {
                    sc.spawn(move || {
                        let _ = self.load(layer, first, n);
                    });
                }
                let (layer, first, n) = batch[0];
                let _ = self.load(layer, first, n);
            });
        }
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

    /// Chunks that readers needed from the decoded-chunk cache's misses, in the order first
    /// needed (prefetching does not count): what a startup reads.
    pub fn touched(&self) -> Vec<(u16, u32)> {
        self.touched.lock().order.clone()
    }

    /// [`Self::chunk`] for prefetching: loads without counting as needed.
    pub fn load_chunk(&self, layer: u16, chunk: u32) -> Result<Arc<Vec<u8>>> {
        self.load(layer, chunk, 1)
    }

    /// Loads `chunk` (from the decoded-chunk cache, by waiting for a reader already loading it,
    /// or by reading it), and with it the cold chunks stored right after it, up to `at_least`
    /// chunks in all or the sequential window ([`Self::window_for`]), in one fetch.
    fn load(&self, layer: u16, chunk: u32, at_least: u32) -> Result<Arc<Vec<u8>>> {
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
        let mut extras = self.claim_run(layer, chunk, at_least);
        if extras.is_empty() {
            let r = self.read_chunk_now(layer, chunk);
            guard.value = r.as_ref().ok().cloned();
            return r;
        }
        let l = &self.layers[layer as usize];
        let mut results = l.read_run(chunk, 1 + extras.len() as u32).into_iter();
        let r = match results.next() {
            Some(r) => r.map(Arc::new),
            None => Err(Error::Invalid(format!("no chunk {chunk} in layer {layer}"))),
        };
        for (g, res) in extras.iter_mut().zip(results) {
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

    /// Claims (as in-flight, so concurrent readers wait for this fetch) the chunks after
    /// `chunk` that one fetch should take along: stored right after it, not cached, not
    /// being loaded, not kept in the host store; none when `chunk` itself is kept there.
    fn claim_run(&self, layer: u16, chunk: u32, at_least: u32) -> Vec<SlotGuard<'_>> {
        let Some(l) = self.layers.get(layer as usize) else {
            return Vec::new();
        };
        let window = self.window_for(layer, chunk, at_least);
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
            let slot = Arc::new(InFlight::default());
            inflight.insert((layer, c), slot.clone());
            out.push(SlotGuard {
                stack: self,
                key: (layer, c),
                slot,
                value: None,
            });
        }
        out
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

    /// The decoded chunk if the cache holds it; never touches the layer.
    pub fn cached_chunk(&self, layer: u16, chunk: u32) -> Option<Arc<Vec<u8>>> {
        self.cache.get(&(layer, chunk))
    }

    /// The segments of `[off, off + len)`.
    pub fn map(&self, off: u64, len: u64) -> Result<Vec<Segment>> {
        self.check_range(off, len)?;
        Ok(self.index.segments(off, len))
    }

    /// Reads `buf.len()` bytes at `off`.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        for s in self.map(off, buf.len() as u64)? {
            let dst = &mut buf[(s.offset - off) as usize..(s.offset - off + s.len) as usize];
            self.read_segment(&s, dst)?;
        }
        Ok(())
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
                        Some(c) => c,
                        None => return Ok(false),
                    }
                } else {
                    self.chunk(layer, chunk)?
                };
                let from = chunk_offset as usize;
                let src = c.get(from..from + dst.len()).ok_or_else(|| {
                    Error::corrupt(
                        self.layers[layer as usize].name(),
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
