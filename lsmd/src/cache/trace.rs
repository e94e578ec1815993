//! Startup traces and prefetch. A trace is the list of chunks an image's readers needed, in the
//! order they first needed them — typically while a container or VM started. Stored next to the
//! image config (`<config>.trace`, FORMAT.md §6); on the next start lsmd fetches those chunks
//! first, in the background and in parallel, so the startup finds them local. Optionally it then
//! goes on to the rest of the image at low priority.
//!
//! Layers are named in a trace by their metadata digest, not their position, so a trace stays
//! valid when layers are added on top; entries of layers no longer in the stack are skipped.
//!
//! A trace can also ship inside the image (`lsmctl trace bake`): the image config's `trace`
//! names a blob and its digest ([`fetch_shipped`]). It is fetched whole at open and used only
//! if its sha256 is that digest; otherwise it is refused, counted, logged, and lsmd serves
//! lazily. The node's own recording, when there is one, goes first (it is this node's start).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use blockfmt::format::{oci_digest, parse_oci_digest, sha256};
use blockfmt::Image;

use crate::config::{HostServices, ImageSpec};

/// The largest shipped trace fetched (8 bytes an entry: 8 M entries).
pub const MAX_SHIPPED_TRACE: u64 = 64 << 20;

/// What became of startup traces since lsmd started, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct TraceStats {
    /// Shipped traces that passed their digest check and were replayed.
    pub shipped_used: AtomicU64,
    /// Shipped traces refused (digest mismatch, unreadable, unparsable).
    pub shipped_refused: AtomicU64,
    /// Node traces (`<config>.trace`) replayed.
    pub node_used: AtomicU64,
    /// Shipped startup layers stacked (digest and binding checked).
    pub startup_used: AtomicU64,
    /// Shipped startup layers refused (digest, binding or chain mismatch, unreadable).
    pub startup_refused: AtomicU64,
    /// Chunks loaded by prefetching (from the host cache or the source).
    pub prefetched_chunks: AtomicU64,
}

/// The daemon's trace counters.
pub static STATS: TraceStats = TraceStats {
    shipped_used: AtomicU64::new(0),
    shipped_refused: AtomicU64::new(0),
    node_used: AtomicU64::new(0),
    startup_used: AtomicU64::new(0),
    startup_refused: AtomicU64::new(0),
    prefetched_chunks: AtomicU64::new(0),
};

const MAGIC: &[u8; 8] = b"LSMTRACE";
/// Version 1: layers and entries. Version 2 adds the startup layer the trace was baked with
/// (FORMAT.md §6); written only when there is one, so a trace without stays readable by
/// builds that know version 1 only.
const VERSION: u16 = 1;
const VERSION_STARTUP: u16 = 2;
const HEADER_LEN: usize = 16;
/// Entry flag (version 2): the startup layer holds every block the start read of this chunk.
const ENTRY_COVERED: u16 = 1;

/// The startup layer a trace was baked with (`lsmctl trace bake`, FORMAT.md §9): which blob,
/// and — the trace's layer table, bottom first — exactly which layer chain its blocks were
/// read from. lsmd stacks it only over that chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartupBinding {
    /// sha256 of the whole startup blob (its OCI digest).
    pub blob_sha256: [u8; 32],
    /// Its metadata digest (FORMAT.md §1.2).
    pub meta_sha256: [u8; 32],
}

/// A decoded trace: layer table (metadata sha256) and (layer index, chunk) entries; with a
/// startup layer, its binding and which entries it covers (`covered[i]` for `entries[i]`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Trace {
    pub layers: Vec<[u8; 32]>,
    pub entries: Vec<(u16, u32)>,
    /// Empty, or one flag per entry: the startup layer holds every block read of that chunk.
    pub covered: Vec<bool>,
    pub startup: Option<StartupBinding>,
}

impl Trace {
    /// What `image`'s readers have needed since it was opened.
    pub fn of(image: &Image) -> Trace {
        let stack = image.lower();
        Trace {
            layers: stack
                .layers()
                .iter()
                .map(|l| l.trailer().meta_sha256)
                .collect(),
            entries: stack.touched(),
            covered: Vec::new(),
            startup: None,
        }
    }

    /// The entries a prefetch still needs when the startup layer is stacked: those it does not
    /// cover.
    pub fn uncovered(&self) -> Trace {
        let entries = self
            .entries
            .iter()
            .enumerate()
            .filter(|&(i, _)| !self.covered.get(i).copied().unwrap_or(false))
            .map(|(_, &e)| e)
            .collect();
        Trace {
            entries,
            covered: Vec::new(),
            ..self.clone()
        }
    }

    /// Encodes: header, layer table, entries, (version 2) the startup binding, crc32c of all
    /// before it. Version 1 unless there is a startup layer.
    pub fn encode(&self) -> Vec<u8> {
        let mut b =
            Vec::with_capacity(HEADER_LEN + self.layers.len() * 32 + self.entries.len() * 8 + 68);
        let version = match self.startup {
            Some(_) => VERSION_STARTUP,
            None => VERSION,
        };
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&version.to_le_bytes());
        b.extend_from_slice(&(self.layers.len() as u16).to_le_bytes());
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for l in &self.layers {
            b.extend_from_slice(l);
        }
        for (i, &(layer, chunk)) in self.entries.iter().enumerate() {
            let covered = self.startup.is_some() && self.covered.get(i) == Some(&true);
            let flags = if covered { ENTRY_COVERED } else { 0 };
            b.extend_from_slice(&layer.to_le_bytes());
            b.extend_from_slice(&flags.to_le_bytes());
            b.extend_from_slice(&chunk.to_le_bytes());
        }
        if let Some(s) = &self.startup {
            b.extend_from_slice(&s.blob_sha256);
            b.extend_from_slice(&s.meta_sha256);
        }
        let c = crc32c::crc32c(&b);
        b.extend_from_slice(&c.to_le_bytes());
        b
    }

    /// Decodes (version 1 or 2); the error says what is wrong.
    pub fn decode(b: &[u8]) -> Result<Trace, String> {
        if b.len() < HEADER_LEN + 4 || &b[..8] != MAGIC {
            return Err("not an lsm trace".into());
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err("trace checksum mismatch".into());
        }
        let v = u16::from_le_bytes([b[8], b[9]]);
        let tail = match v {
            VERSION => 0,
            VERSION_STARTUP => 64,
            _ => return Err(format!("unsupported trace version {v}")),
        };
        let nl = u16::from_le_bytes([b[10], b[11]]) as usize;
        let ne = u32::from_le_bytes([b[12], b[13], b[14], b[15]]) as usize;
        let entries_end = HEADER_LEN + nl * 32 + ne * 8;
        if body.len() != entries_end + tail {
            return Err("trace length does not match its counts".into());
        }
        let mut t = Trace::default();
        for l in body[HEADER_LEN..HEADER_LEN + nl * 32].chunks(32) {
            let mut d = [0u8; 32];
            d.copy_from_slice(l);
            t.layers.push(d);
        }
        let allowed = if v == VERSION { 0 } else { ENTRY_COVERED };
        for e in body[HEADER_LEN + nl * 32..entries_end].chunks(8) {
            let layer = u16::from_le_bytes([e[0], e[1]]);
            let flags = u16::from_le_bytes([e[2], e[3]]);
            if layer as usize >= nl || flags & !allowed != 0 {
                return Err(format!(
                    "trace entry names layer {layer} of {nl} (flags {flags:#x})"
                ));
            }
            t.entries
                .push((layer, u32::from_le_bytes([e[4], e[5], e[6], e[7]])));
            if v == VERSION_STARTUP {
                t.covered.push(flags & ENTRY_COVERED != 0);
            }
        }
        if v == VERSION_STARTUP {
            let mut s = StartupBinding {
                blob_sha256: [0; 32],
                meta_sha256: [0; 32],
            };
            s.blob_sha256
                .copy_from_slice(&body[entries_end..entries_end + 32]);
            s.meta_sha256
                .copy_from_slice(&body[entries_end + 32..entries_end + 64]);
            t.startup = Some(s);
        }
        Ok(t)
    }

    /// The entries as (layer index in `image`'s stack, chunk), dropping those of other layers
    /// and chunks out of range.
    pub fn resolve(&self, image: &Image) -> Vec<(u16, u32)> {
        let layers = image.lower().layers();
        let map: Vec<Option<u16>> = self
            .layers
            .iter()
            .map(|d| {
                layers
                    .iter()
                    .position(|l| &l.trailer().meta_sha256 == d)
                    .map(|i| i as u16)
            })
            .collect();
        self.entries
            .iter()
            .filter_map(|&(l, c)| {
                let i = map.get(l as usize).copied().flatten()?;
                (c < layers[i as usize].metadata().chunks.len() as u32).then_some((i, c))
            })
            .collect()
    }
}

/// Where an image's trace lives: beside its config.
pub fn trace_path(config: &Path) -> PathBuf {
    let mut p = config.as_os_str().to_owned();
    p.push(".trace");
    PathBuf::from(p)
}

/// Most stored bytes one prefetch fetch asks for. Large enough that a trace goes out in few
/// GETs (a registry spends milliseconds of CPU on each, and each waits a round trip); small
/// enough that a reader needing one of its chunks does not wait long for the whole of it.
pub const PREFETCH_RUN_BYTES: u64 = 1 << 20;

/// Fetches a trace prefetch keeps in flight (`lsmd serve --prefetch-threads`).
pub const PREFETCH_THREADS: u32 = 8;

/// Most decoded bytes an image's decoded-chunk cache grows to for a prefetch (the startup
/// trace's chunks, decoded, stay there until the start reads them).
pub const PREFETCH_CACHE_MAX: u64 = 512 << 20;

/// `chunks` (in the order a start needs them) as prefetch fetches: (layer, first chunk,
/// count). Chunks stored back to back go in one fetch of at most [`PREFETCH_RUN_BYTES`],
/// whatever their places in the list; the fetches are ordered by the earliest place any of
/// their chunks has, so what a start needs first still comes first.
pub fn plan_runs(image: &Image, chunks: &[(u16, u32)]) -> Vec<(u16, u32, u32)> {
    let layers = image.lower().layers();
    let mut first_needed = std::collections::HashMap::new();
    for (i, &k) in chunks.iter().enumerate() {
        first_needed.entry(k).or_insert(i);
    }
    let mut sorted: Vec<(u16, u32)> = first_needed.keys().copied().collect();
    sorted.sort_unstable();
    // (earliest place, layer, first chunk, count, stored bytes)
    let mut runs: Vec<(usize, u16, u32, u32, u64)> = Vec::new();
    for (l, c) in sorted {
        let Some(e) = layers
            .get(l as usize)
            .and_then(|layer| layer.metadata().chunks.get(c as usize))
        else {
            continue;
        };
        let (stored, place) = (e.stored_len as u64, first_needed[&(l, c)]);
        match runs.last_mut() {
            Some(r)
                if r.1 == l
                    && r.2 + r.3 == c
                    && r.4 + stored <= PREFETCH_RUN_BYTES
                    && layers[l as usize].adjacent(c - 1, c) =>
            {
                r.0 = r.0.min(place);
                r.3 += 1;
                r.4 += stored;
            }
            _ => runs.push((place, l, c, 1, stored)),
        }
    }
    runs.sort_unstable_by_key(|r| r.0);
    runs.into_iter().map(|r| (r.1, r.2, r.3)).collect()
}

/// Fetches `chunks` of `image` (in the order a start needs them) on `threads` background
/// threads, as the fetches [`plan_runs`] makes of them, each thread taking the next; then
/// returns. With `hold`, the image's decoded-chunk cache is first grown to hold them (up to
/// [`PREFETCH_CACHE_MAX`]): for what a start is about to read, not for a whole image.
/// Failures are logged and skipped: prefetch is only a hint.
pub fn prefetch(
    name: &str,
    image: &Arc<Image>,
    chunks: Vec<(u16, u32)>,
    threads: usize,
    hold: bool,
) -> usize {
    let runs = Arc::new(plan_runs(image, &chunks));
    if hold {
        let listed = runs
            .iter()
            .flat_map(|&(l, c, n)| (c..c + n).map(move |c| (l, c)));
        hold_cache_for(image, listed);
    }
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (image, runs, next) = (image.clone(), runs.clone(), next.clone());
            let failed = failed.clone();
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(l, c, n)) = runs.get(i) else { return };
                match image.lower().prefetch_run(l, c, n) {
                    Ok(()) => {
                        STATS.prefetched_chunks.fetch_add(n as u64, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(layer = l, chunk = c, count = n, error = %e, "prefetch skipped chunks")
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    tracing::info!(export = %name, chunks = chunks.len(), fetches = runs.len(), secs = start.elapsed().as_secs_f64(), "prefetch done");
    failed.load(Ordering::Relaxed)
}

/// Most stored bytes one streamed GET of a startup layer asks for; a larger layer goes in
/// several, one after the other. One request per stretch (each waits a round trip), but a
/// body short enough that a slow link still delivers it well within a request's timeout (a
/// GET that times out part-way is resumed for the rest, never restarted).
pub const STARTUP_STREAM_BYTES: u64 = 16 << 20;

/// Fetches the startup layer stacked at the top of `image`'s stack (FORMAT.md §9) as ONE
/// in-order stream (a ranged GET per [`STARTUP_STREAM_BYTES`], one after the other, on this
/// thread): its chunks are stored in the order the start reads them, so each arrives when
/// the start wants it instead of sharing the link with later ones, and each is checked and
/// handed to the reads waiting for it as soon as it is in (`LayerStack::stream_chunks`).
/// A chunk that fails refuses the layer and ends the stream; returns whether the stream
/// went through.
pub fn stream_startup(name: &str, image: &Image) -> bool {
    let stack = image.lower();
    let top = stack.layers().len().saturating_sub(1);
    let n = stack
        .layers()
        .get(top)
        .map_or(0, |l| l.metadata().chunks.len() as u32);
    let start = std::time::Instant::now();
    let r = stack.stream_chunks(top as u16, 0, n, STARTUP_STREAM_BYTES);
    if r.is_ok() {
        STATS
            .prefetched_chunks
            .fetch_add(n as u64, Ordering::Relaxed);
    }
    let secs = start.elapsed().as_secs_f64();
    match &r {
        Ok(()) => tracing::info!(export = %name, chunks = n, secs, "startup layer streamed"),
        Err(e) => {
            tracing::info!(export = %name, chunks = n, secs, error = %e, "startup layer stream failed")
        }
    }
    r.is_ok()
}

/// Makes `image`'s decoded-chunk cache hold at least the decoded bytes of `chunks` and a
/// quarter more for what the start reads besides (never more than [`PREFETCH_CACHE_MAX`]):
/// what a start is about to read stays there until it reads it.
pub fn hold_cache_for(image: &Image, chunks: impl Iterator<Item = (u16, u32)>) {
    let stack = image.lower();
    let raw: u64 = chunks
        .filter_map(|(l, c)| {
            stack
                .layers()
                .get(l as usize)?
                .metadata()
                .chunks
                .get(c as usize)
        })
        .map(|e| e.raw_len as u64)
        .sum();
    stack.reserve_cache(raw.saturating_add(raw / 4).min(PREFETCH_CACHE_MAX) as usize);
}

/// Fetches `chunks` of `image` (in disk order) one at a time on `threads` background threads,
/// each load widening like a sequential reader's: for filesystem metadata, whose neighbouring
/// blocks (directories, small files) a start often reads next, and whose fetches leave
/// sequential windows the start's own reads continue. Measured on the python image: 109 GETs
/// for its lazy start this way, 124 with [`prefetch`]'s exact runs. Failures are skipped.
pub fn prefetch_widening(name: &str, image: &Arc<Image>, chunks: Vec<(u16, u32)>, threads: usize) {
    let chunks = Arc::new(chunks);
    let next = Arc::new(AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let workers: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let (image, chunks, next) = (image.clone(), chunks.clone(), next.clone());
            std::thread::spawn(move || loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&(l, c)) = chunks.get(i) else { return };
                match image.lower().load_chunk(l, c) {
                    Ok(_) => {
                        STATS.prefetched_chunks.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        tracing::debug!(layer = l, chunk = c, error = %e, "prefetch skipped a chunk")
                    }
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    tracing::info!(export = %name, chunks = chunks.len(), secs = start.elapsed().as_secs_f64(), "prefetch done");
}

/// The trace shipped with the image `spec` describes (its config's `trace`), fetched whole from
/// its source and checked: `Ok(None)` when there is none; an error (say why) when it cannot be
/// read, is larger than [`MAX_SHIPPED_TRACE`], its sha256 is not the config's digest, or it
/// does not parse. Never trusted before the digest check.
pub fn fetch_shipped(spec: &ImageSpec, host: &HostServices) -> Result<Option<Trace>, String> {
    let Some(t) = &spec.config.trace else {
        return Ok(None);
    };
    let want = t
        .digest
        .as_deref()
        .ok_or("the trace entry has no digest")
        .and_then(|d| parse_oci_digest(d).map_err(|_| "bad trace digest"))?;
    let name = spec.source_name(t);
    let src = spec
        .open_source(t, &name, host)
        .map_err(|e| format!("{name}: {e}"))?;
    let size = src.size().map_err(|e| format!("{name}: {e}"))?;
    if size > MAX_SHIPPED_TRACE {
        return Err(format!(
            "{name}: {size} bytes is larger than a trace may be ({MAX_SHIPPED_TRACE})"
        ));
    }
    let mut b = vec![0u8; size as usize];
    src.read_exact_at(&mut b, 0)
        .map_err(|e| format!("{name}: {e}"))?;
    let got = sha256(&b);
    if got != want {
        return Err(format!(
            "{name}: digest {} is not the {} the image config names",
            oci_digest(&got),
            oci_digest(&want)
        ));
    }
    Trace::decode(&b)
        .map(Some)
        .map_err(|e| format!("{name}: {e}"))
}

/// Block numbers (of [`blockfmt::stack::TRACE_BLOCK`] bytes) as the `/trace-blocks` reply
/// carries them: u64 LE each, in order.
pub fn encode_blocks(blocks: &[u64]) -> Vec<u8> {
    blocks.iter().flat_map(|b| b.to_le_bytes()).collect()
}

/// [`encode_blocks`] back; an error when the length is not a multiple of 8.
pub fn decode_blocks(b: &[u8]) -> Result<Vec<u64>, String> {
    if !b.len().is_multiple_of(8) {
        return Err(format!("{} bytes is not a list of block numbers", b.len()));
    }
    Ok(b.chunks_exact(8)
        .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect())
}

/// The startup layer shipped with the image `spec` describes (its config's `startup`),
/// opened as a remote layer is: one ranged read of its metadata and trailer (the config's
/// `meta_len` sizes it), the metadata checked against its trailer and, when the config names
/// one, its `meta_digest`; no chunk is fetched (they are checked one by one as they arrive,
/// FORMAT.md §9). `Ok(None)` when there is none; an error (saying why) when it cannot be
/// opened. Nothing in it is used before [`bind_startup`].
pub fn open_startup(
    spec: &ImageSpec,
    host: &HostServices,
) -> Result<Option<blockfmt::Layer>, String> {
    let Some(t) = &spec.config.startup else {
        return Ok(None);
    };
    let name = spec.source_name(t);
    let meta = t
        .meta_digest
        .as_deref()
        .map(|d| parse_oci_digest(d).map_err(|_| format!("{name}: bad startup meta_digest")))
        .transpose()?;
    let src = spec
        .open_source(t, &name, host)
        .map_err(|e| format!("{name}: {e}"))?;
    let ahead = Arc::new(crate::source::ahead::StreamAhead::new(src));
    let layer = blockfmt::Layer::open_with_hint(&name, ahead.clone(), meta, t.meta_len)
        .map_err(|e| format!("{name}: {e}"))?;
    let layer = match &host.cache {
        Some(c) => layer.with_store(c.clone()),
        None => layer,
    };
    stream_ahead(&ahead, &layer);
    Ok(Some(layer))
}

/// On a cold node (the host store keeps none of its chunks), starts streaming the chunks of
/// the startup `layer` (its first [`STARTUP_STREAM_BYTES`]) through `ahead`, its source, at
/// once: while the image's layers open and the trace binds it, instead of once it is
/// stacked. Only held: each chunk is checked when the stack reads it
/// ([`stream_startup`]), and a layer refused at binding is dropped, which stops the stream.
fn stream_ahead(ahead: &crate::source::ahead::StreamAhead, layer: &blockfmt::Layer) {
    let chunks = &layer.metadata().chunks;
    let n = chunks.len() as u32;
    if n == 0 || (0..n).any(|c| layer.is_kept(c)) {
        return;
    }
    let own = chunks.iter().filter(|e| e.blob == 0);
    let base = own.clone().map(|e| e.offset).min().unwrap_or(0);
    let end = own
        .map(|e| e.offset + e.stored_len as u64)
        .max()
        .unwrap_or(0);
    let len = end.saturating_sub(base).min(STARTUP_STREAM_BYTES);
    ahead.start(layer.name(), base, len);
}

/// The opened startup `layer` (the config's `startup`, whose digest is `config_digest`), if
/// the digest-checked `trace` binds it to exactly `layers` (bottom first): the trace names
/// this blob's digest and its metadata digest, and its layer table is the chain's metadata
/// digests in order. The metadata digest anchors every chunk's sha256, so each chunk is
/// checked as it arrives instead of the whole blob before use; a chunk that fails refuses
/// the layer then (`LayerStack::with_fallible_top`). An error says what does not match; the
/// caller then serves without it.
pub fn bind_startup(
    layer: blockfmt::Layer,
    config_digest: Option<&str>,
    trace: &Trace,
    layers: &[blockfmt::Layer],
    size: u64,
) -> Result<blockfmt::Layer, String> {
    let b = trace
        .startup
        .ok_or("the shipped trace names no startup layer (baked without one)")?;
    let digest = config_digest
        .ok_or("the startup entry has no digest")
        .and_then(|d| parse_oci_digest(d).map_err(|_| "bad startup digest"))?;
    let meta = layer.trailer().meta_sha256;
    if digest != b.blob_sha256 || meta != b.meta_sha256 {
        return Err(format!(
            "the startup layer {} (metadata digest {}) is not the {} (metadata digest {}) the \
             shipped trace was baked with",
            oci_digest(&digest),
            oci_digest(&meta),
            oci_digest(&b.blob_sha256),
            oci_digest(&b.meta_sha256)
        ));
    }
    let chain: Vec<[u8; 32]> = layers.iter().map(|l| l.trailer().meta_sha256).collect();
    if chain != trace.layers {
        return Err(format!(
            "the startup layer was baked over another layer chain ({} layers, top {}) than \
             this image's ({} layers, top {})",
            trace.layers.len(),
            trace.layers.last().map_or("-".into(), oci_digest),
            chain.len(),
            chain.last().map_or("-".into(), oci_digest),
        ));
    }
    if layer.logical_size() > size || !layer.metadata().blobs.is_empty() {
        return Err(format!(
            "{}: not a startup layer for a {size} byte disk (it is for {} bytes, borrows {} blobs)",
            layer.name(),
            layer.logical_size(),
            layer.metadata().blobs.len()
        ));
    }
    Ok(layer)
}

/// Every chunk of every layer, top layer first (what a whole-image prefetch fetches).
pub fn all_chunks(image: &Image) -> Vec<(u16, u32)> {
    let layers = image.lower().layers();
    (0..layers.len())
        .rev()
        .flat_map(|i| (0..layers[i].metadata().chunks.len() as u32).map(move |c| (i as u16, c)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    /// An image over `mib` MiB of incompressible data: every 128 KiB chunk stored as it is,
    /// back to back.
    fn random_image(mib: usize) -> Image {
        let mut disk = vec![0u8; mib << 20];
        rand::rngs::StdRng::seed_from_u64(7).fill(&mut disk[..]);
        crate::cache::test_image(&disk)
    }

    #[test]
    fn plan_merges_neighbours_wherever_they_are_listed_and_keeps_the_first_need_first() {
        let img = random_image(4);
        // Chunk 20 first, then a stretch 2..=5 listed backwards, 20 again, and 0.
        let trace = [(0, 20), (0, 5), (0, 4), (0, 3), (0, 2), (0, 20), (0, 0)];
        assert_eq!(
            plan_runs(&img, &trace),
            vec![(0, 20, 1), (0, 2, 4), (0, 0, 1)]
        );
        // Chunks out of range or of layers the image lacks are left out.
        assert_eq!(
            plan_runs(&img, &[(0, 1 << 20), (3, 0), (0, 1)]),
            vec![(0, 1, 1)]
        );
    }

    #[test]
    fn plan_bounds_each_fetch_and_covers_every_chunk_once() {
        let img = random_image(4);
        let all: Vec<(u16, u32)> = (0..32).rev().map(|c| (0, c)).collect();
        let runs = plan_runs(&img, &all);
        let chunks = &img.lower().layers()[0].metadata().chunks;
        for &(_, first, n) in &runs {
            let bytes: u64 = (first..first + n)
                .map(|c| chunks[c as usize].stored_len as u64)
                .sum();
            assert!(bytes <= PREFETCH_RUN_BYTES, "{bytes} bytes in one fetch");
        }
        let mut covered: Vec<u32> = runs.iter().flat_map(|&(_, f, n)| f..f + n).collect();
        covered.sort_unstable();
        assert_eq!(covered, (0..32).collect::<Vec<_>>());
        assert!(runs.len() < 32 / 2, "{} fetches for 32 chunks", runs.len());
        assert_eq!(runs[0].1 + runs[0].2, 32, "the last chunk was listed first");
    }

    /// Reads chunks 0, 1 and 3 of a fresh image (a sequential reader: its misses on 1 and 3
    /// fetch 1..=2 and 3..=6 along), then with `then_two` chunk 2; returns the trace.
    fn trace_of_reads(exact: bool, then_two: bool) -> Vec<(u16, u32)> {
        let img = random_image(4);
        img.lower().set_exact_trace(exact);
        let mut b = vec![0u8; 4096];
        let chunks: &[u64] = if then_two { &[0, 1, 3, 2] } else { &[0, 1, 3] };
        for &c in chunks {
            img.read(c * (128 << 10), &mut b).expect("read");
        }
        Trace::of(&img).entries
    }

    #[test]
    fn an_exact_trace_has_only_the_chunks_reads_touched() {
        // Plain traces count what a widened fetch took along as needed (chunk 2, 4, 5, 6)...
        let plain = trace_of_reads(false, false);
        assert!(
            plain.contains(&(0, 2)) && plain.contains(&(0, 6)),
            "{plain:?}"
        );
        // ...exact ones only what was read, in the order it was first read, also when the
        // read found the chunk already decoded.
        assert_eq!(trace_of_reads(true, false), vec![(0, 0), (0, 1), (0, 3)]);
        assert_eq!(
            trace_of_reads(true, true),
            vec![(0, 0), (0, 1), (0, 3), (0, 2)]
        );
    }

    proptest! {
        /// Fuzz: traces round-trip; any flipped byte or arbitrary bytes are rejected without panic.
        #[test]
        fn trace_format(startup in any::<bool>(), seed in any::<u32>(), nl in 1usize..4, entries in proptest::collection::vec((0u16..4, any::<u32>()), 0..50), pos in any::<usize>(), x in 1u8..=255, junk in proptest::collection::vec(any::<u8>(), 0..200)) {
            let n = entries.len();
            let t = Trace {
                layers: (0..nl).map(|i| [i as u8; 32]).collect(),
                entries: entries.into_iter().map(|(l, c)| (l % nl as u16, c)).collect(),
                covered: match startup {
                    true => (0..n).map(|i| !(i as u32 ^ seed).is_multiple_of(3)).collect(),
                    false => Vec::new(),
                },
                startup: startup.then_some(StartupBinding {
                    blob_sha256: [seed as u8; 32],
                    meta_sha256: [(seed >> 8) as u8; 32],
                }),
            };
            let mut b = t.encode();
            prop_assert_eq!(Trace::decode(&b), Ok(t));
            let p = pos % b.len();
            b[p] ^= x;
            prop_assert!(Trace::decode(&b).is_err());
            let _ = Trace::decode(&junk);
        }
    }
}
