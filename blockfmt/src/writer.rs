//! Streaming writer of a layer blob. The caller hands it the layer's content in increasing
//! logical order (data and zero ranges); it cuts chunks at fixed windows, detects all-zero 4 KiB
//! granules, compresses, and writes header, chunks, metadata and trailer in one pass. The output
//! depends only on the content and the options (FORMAT.md §1.5).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::chunk::{self, Compression};
use crate::dictionary::{chunk_block_hashes, BlockList, BlockRef, Dictionary};
use crate::error::{Error, Result};
use crate::format::{
    check_chunk_size, sha256, BlobRef, ChunkEntry, Extent, ExtentKind, Header, Metadata, Trailer,
    HEADER_LEN, NO_CHUNK,
};
use crate::stack::{LoadTask, ParallelLoads};

/// While writing, extents into borrowed chunks carry this bit plus the borrowed chunk's number;
/// `finish` renumbers them after the layer's own chunks (own chunks are numbered as they are
/// cut, so borrowed ones cannot take numbers before the layer ends).
const BORROWED: u32 = 1 << 31;

pub use crate::format::{is_zero, ZERO_GRANULE};

/// Default chunk window (FORMAT.md §1.4 says why).
pub const DEFAULT_CHUNK_SIZE: u32 = 128 * 1024;

/// What the writer records for all-zero data and explicit zero ranges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPolicy {
    /// Leave a hole: right for a bottom layer, where nothing shows through.
    Hole,
    /// Write a zero extent: right for a layer over others, where zeros must hide what is below.
    Extent,
}

/// Writer settings.
#[derive(Debug, Clone, Copy)]
pub struct WriterOptions {
    pub chunk_size: u32,
    pub compression: Compression,
    pub zeros: ZeroPolicy,
    /// Store each distinct aligned 4 KiB block once per layer: a repeat becomes an extent into
    /// the chunk that already holds it (FORMAT.md §1.4).
    pub dedup: bool,
}

impl Default for WriterOptions {
    fn default() -> Self {
        WriterOptions {
            chunk_size: DEFAULT_CHUNK_SIZE,
            compression: Compression::default(),
            zeros: ZeroPolicy::Extent,
            dedup: true,
        }
    }
}

/// What a finished blob is: its identity and a few figures for humans.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenLayer {
    /// Total blob bytes.
    pub size: u64,
    /// sha256 of the whole blob (the OCI digest).
    pub digest: [u8; 32],
    /// sha256 of the metadata section as stored (the `io.lsm.layer.meta-digest` annotation).
    pub meta_digest: [u8; 32],
    /// Stored bytes of the metadata section (the `io.lsm.layer.meta-len` annotation).
    pub meta_len: u64,
    pub chunks: u64,
    pub extents: u64,
    /// Logical bytes held as data (not zero, not hole).
    pub data_bytes: u64,
    /// Bytes of stored chunk data.
    pub stored_bytes: u64,
    /// Logical data bytes that point into dictionary blobs instead of being stored.
    pub borrowed_bytes: u64,
    /// The dictionary blobs the layer borrows from (its blob table).
    pub blobs: Vec<BlobRef>,
    /// Per own chunk, in chunk order, the offset and sha256 of each non-zero aligned 4 KiB
    /// block of its decoded bytes — exactly what [`crate::dictionary::chunk_block_hashes`]
    /// gives for the decoded chunk — when asked for with
    /// [`LayerWriter::collect_block_hashes`]; empty otherwise.
    pub block_hashes: Vec<BlockList>,
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
    pos: u64,
}

impl<W: Write> HashingWriter<W> {
    fn put(&mut self, b: &[u8]) -> Result<()> {
        self.inner
            .write_all(b)
            .map_err(|e| Error::io("layer writer", self.pos, e))?;
        self.hash.update(b);
        self.pos += b.len() as u64;
        Ok(())
    }
}

/// Streaming layer blob writer; see the module docs.
pub struct LayerWriter<W: Write> {
    out: HashingWriter<W>,
    opts: WriterOptions,
    logical_size: u64,
    meta: Metadata,
    window: u64,
    buf: Vec<u8>,
    next_free: u64,
    data_bytes: u64,
    stored_bytes: u64,
    /// sha256 of each aligned 4 KiB block stored so far → (chunk, offset in chunk).
    seen: HashMap<[u8; 32], (u32, u32)>,
    dict: Option<Arc<Dictionary>>,
    /// Dictionary chunks borrowed so far, as this layer's chunk entries (blob = blob number).
    borrowed: Vec<ChunkEntry>,
    /// Dictionary chunk index → borrowed number.
    borrowed_of: HashMap<u32, u32>,
    /// Dictionary blob index → this layer's blob number.
    blob_number_of: HashMap<u32, u32>,
    borrowed_bytes: u64,
    /// Chunks cut but not yet encoded and written (numbered after `meta.chunks`), when the
    /// host lends threads to encode them at once ([`LayerWriter::set_parallel`]).
    pending: Vec<Vec<u8>>,
    parallel: Option<(Arc<dyn ParallelLoads>, usize)>,
    /// The block hashes of the own chunks cut so far, when collected.
    block_lists: Option<Vec<BlockList>>,
    /// The hashes of the blocks in `buf` when every byte of it came as a whole aligned block
    /// (`None` once an unaligned piece went in: the chunk is hashed from `buf` when cut).
    buf_blocks: Option<BlockList>,
}

/// One chunk's encoding, filled by a task on the host's threads.
type EncodeSlot = Arc<std::sync::Mutex<Option<Result<(Vec<u8>, ChunkEntry)>>>>;

impl<W: Write> LayerWriter<W> {
    /// Starts a blob for a disk of `logical_size` bytes and writes its header.
    pub fn new(out: W, logical_size: u64, opts: WriterOptions) -> Result<Self> {
        check_chunk_size(opts.chunk_size).map_err(Error::Invalid)?;
        if let Compression::Zstd(l) = opts.compression {
            if !(1..=22).contains(&l) {
                return Err(Error::Invalid(format!("zstd level {l} is not in 1..=22")));
            }
        }
        let mut w = LayerWriter {
            out: HashingWriter {
                inner: out,
                hash: Sha256::new(),
                pos: 0,
            },
            opts,
            logical_size,
            meta: Metadata::default(),
            window: 0,
            buf: Vec::with_capacity(opts.chunk_size as usize),
            next_free: 0,
            data_bytes: 0,
            stored_bytes: 0,
            seen: HashMap::new(),
            dict: None,
            borrowed: Vec::new(),
            borrowed_of: HashMap::new(),
            blob_number_of: HashMap::new(),
            borrowed_bytes: 0,
            pending: Vec::new(),
            parallel: None,
            block_lists: None,
            buf_blocks: Some(Vec::new()),
        };
        let h = Header {
            chunk_size: opts.chunk_size,
            logical_size,
        };
        w.out.put(&h.encode())?;
        Ok(w)
    }

    /// Keeps the block hashes of every own chunk for [`WrittenLayer::block_hashes`] (what a
    /// dictionary or hash index of the blob needs), so the caller need not decode the blob
    /// again: the blocks the writer deduplicates are hashed already, the rest are hashed as
    /// their chunk is cut. Call before the first write.
    pub fn collect_block_hashes(&mut self) {
        self.block_lists = Some(Vec::new());
    }

    /// Lets aligned 4 KiB blocks that a dictionary layer already stores point into that
    /// layer's blob instead of being stored (needs `dedup`; FORMAT.md §1.7).
    pub fn set_dictionary(&mut self, dict: Arc<Dictionary>) {
        if !dict.is_empty() {
            self.dict = Some(dict);
        }
    }

    /// Encodes up to `batch` chunks at once on the host's threads (the format crate starts
    /// none: the host lends them through the same hook as parallel chunk loads). The blob is
    /// byte-identical to a sequential write: chunks are encoded independently and written in
    /// order.
    pub fn set_parallel(&mut self, threads: Arc<dyn ParallelLoads>, batch: usize) {
        if batch > 1 {
            self.parallel = Some((threads, batch));
        }
    }

    /// The number the chunk being filled will get.
    fn next_chunk(&self) -> u32 {
        (self.meta.chunks.len() + self.pending.len()) as u32
    }

    fn check_range(&mut self, off: u64, len: u64) -> Result<()> {
        let end = off
            .checked_add(len)
            .filter(|&e| e <= self.logical_size)
            .ok_or(Error::OutOfRange {
                offset: off,
                len,
                size: self.logical_size,
            })?;
        if off < self.next_free {
            return Err(Error::Invalid(format!(
                "layer writer: range at {off} starts before the end of the previous one ({})",
                self.next_free
            )));
        }
        self.next_free = end;
        Ok(())
    }

    /// Adds data at `off`; all-zero 4 KiB granules become zero ranges.
    pub fn write_data(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.check_range(off, data.len() as u64)?;
        let mut pos = off;
        let mut rest = data;
        while !rest.is_empty() {
            let granule_end = (pos / ZERO_GRANULE + 1) * ZERO_GRANULE;
            let n = rest.len().min((granule_end - pos) as usize);
            let (piece, tail) = rest.split_at(n);
            if is_zero(piece) {
                self.push_zero(pos, n as u64);
            } else if self.opts.dedup && n as u64 == ZERO_GRANULE {
                self.push_block(pos, piece)?;
            } else {
                self.push_data(pos, piece)?;
                self.buf_blocks = None; // not a whole aligned block: hashed from `buf` when cut
            }
            pos += n as u64;
            rest = tail;
        }
        Ok(())
    }

    /// [`LayerWriter::write_data`] of one aligned 4 KiB block whose sha256 the caller computed
    /// already (`hash` must be `sha256(block)`; anything else but an aligned 4 KiB block is
    /// written as `write_data` writes it): the same blob, without hashing the block again. A
    /// raw import hashes every block to find those that changed, on every core; the writer's
    /// own hash of each block would be one more pass over them, on one.
    pub fn write_block_hashed(&mut self, off: u64, block: &[u8], hash: [u8; 32]) -> Result<()> {
        if block.len() as u64 != ZERO_GRANULE || !off.is_multiple_of(ZERO_GRANULE) {
            return self.write_data(off, block);
        }
        debug_assert_eq!(sha256(block), hash, "write_block_hashed: a wrong hash");
        self.check_range(off, ZERO_GRANULE)?;
        if is_zero(block) {
            self.push_zero(off, ZERO_GRANULE);
        } else if self.opts.dedup {
            self.push_hashed_block(off, block, hash)?;
        } else {
            self.push_data(off, block)?;
            self.buf_blocks = None;
        }
        Ok(())
    }

    /// Records `len` bytes of zeros at `off` (a zero extent or a hole, per the zero policy).
    pub fn write_zeroes(&mut self, off: u64, len: u64) -> Result<()> {
        self.check_range(off, len)?;
        self.push_zero(off, len);
        Ok(())
    }

    fn push_zero(&mut self, mut off: u64, mut len: u64) {
        if self.opts.zeros == ZeroPolicy::Hole {
            return;
        }
        while len > 0 {
            if let Some(p) = self.meta.extents.last_mut() {
                if p.kind == ExtentKind::Zero && p.end() == off && p.len < u32::MAX {
                    let add = len.min((u32::MAX - p.len) as u64);
                    p.len += add as u32;
                    off += add;
                    len -= add;
                    continue;
                }
            }
            let n = len.min(u32::MAX as u64);
            self.meta.extents.push(Extent {
                logical: off,
                len: n as u32,
                kind: ExtentKind::Zero,
                chunk: NO_CHUNK,
                chunk_offset: 0,
            });
            off += n;
            len -= n;
        }
    }

    /// Adds one aligned 4 KiB block, pointing at an earlier copy when there is one.
    fn push_block(&mut self, off: u64, block: &[u8]) -> Result<()> {
        self.push_hashed_block(off, block, sha256(block))
    }

    /// [`Self::push_block`] of a block whose sha256 is `h`.
    fn push_hashed_block(&mut self, off: u64, block: &[u8], h: [u8; 32]) -> Result<()> {
        if let Some(r) = self.dict.as_ref().and_then(|d| d.lookup(&h)) {
            let chunk = self.borrow(r)?;
            self.push_data_extent(off, block.len() as u32, chunk, r.offset);
            self.data_bytes += block.len() as u64;
            self.borrowed_bytes += block.len() as u64;
            return Ok(());
        }
        let Some(&(chunk, chunk_offset)) = self.seen.get(&h) else {
            self.push_data(off, block)?;
            // The block now sits at the end of the pending chunk, whose index is the next one
            // (`push_data` cut the previous chunk first if the block opened a new window).
            let at = (self.buf.len() - block.len()) as u32;
            self.seen.insert(h, (self.next_chunk(), at));
            match &mut self.buf_blocks {
                _ if at == 0 => self.buf_blocks = Some(vec![(0, h)]),
                Some(l) if at.is_multiple_of(ZERO_GRANULE as u32) => l.push((at, h)),
                _ => self.buf_blocks = None,
            }
            return Ok(());
        };
        self.push_data_extent(off, block.len() as u32, chunk, chunk_offset);
        self.data_bytes += block.len() as u64;
        Ok(())
    }

    /// Records that `[off, off + len)` is `chunk[chunk_offset..]`, extending the previous
    /// extent when it continues it in the same window and the same chunk.
    fn push_data_extent(&mut self, off: u64, len: u32, chunk: u32, chunk_offset: u32) {
        let cs = self.opts.chunk_size as u64;
        match self.meta.extents.last_mut() {
            Some(p)
                if p.kind == ExtentKind::Data
                    && p.chunk == chunk
                    && p.end() == off
                    && p.logical / cs == off / cs
                    && p.chunk_offset + p.len == chunk_offset =>
            {
                p.len += len
            }
            _ => self.meta.extents.push(Extent {
                logical: off,
                len,
                kind: ExtentKind::Data,
                chunk,
                chunk_offset,
            }),
        }
    }

    /// The (provisional) chunk number of a dictionary chunk, adding it and its blob to this
    /// layer's tables on first use.
    fn borrow(&mut self, r: BlockRef) -> Result<u32> {
        if let Some(&n) = self.borrowed_of.get(&r.chunk) {
            return Ok(BORROWED | n);
        }
        let dict = self
            .dict
            .as_ref()
            .ok_or_else(|| Error::Invalid("layer writer: borrowing without a dictionary".into()))?;
        let e = *dict
            .chunk(r)
            .ok_or_else(|| Error::Invalid(format!("dictionary: no chunk {}", r.chunk)))?;
        let blob = *dict
            .blobs()
            .get(e.blob as usize)
            .ok_or_else(|| Error::Invalid(format!("dictionary: no blob {}", e.blob)))?;
        let next_number = self.blob_number_of.len() as u32 + 1;
        let number = *self.blob_number_of.entry(e.blob).or_insert(next_number);
        if number == next_number {
            self.meta.blobs.push(blob);
        }
        let n = self.borrowed.len() as u32;
        if n >= BORROWED - 1 {
            return Err(Error::Invalid(
                "layer writer: too many borrowed chunks".into(),
            ));
        }
        self.borrowed.push(ChunkEntry { blob: number, ..e });
        self.borrowed_of.insert(r.chunk, n);
        Ok(BORROWED | n)
    }

    fn push_data(&mut self, off: u64, data: &[u8]) -> Result<()> {
        let cs = self.opts.chunk_size as u64;
        let mut pos = off;
        let mut rest = data;
        while !rest.is_empty() {
            let window = pos / cs;
            if window != self.window {
                self.flush_chunk()?;
                self.window = window;
            }
            let n = rest.len().min(((window + 1) * cs - pos) as usize);
            let (chunk, chunk_offset) = (self.next_chunk(), self.buf.len() as u32);
            self.push_data_extent(pos, n as u32, chunk, chunk_offset);
            self.buf.extend_from_slice(&rest[..n]);
            self.data_bytes += n as u64;
            pos += n as u64;
            rest = &rest[n..];
        }
        Ok(())
    }

    fn flush_chunk(&mut self) -> Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        if self.next_chunk() as u64 >= BORROWED as u64 {
            return Err(Error::Invalid("layer writer: too many chunks".into()));
        }
        let known = self.buf_blocks.replace(Vec::new());
        if let Some(lists) = &mut self.block_lists {
            lists.push(known.unwrap_or_else(|| chunk_block_hashes(&self.buf)));
        }
        match &self.parallel {
            Some((_, batch)) => {
                let next = Vec::with_capacity(self.opts.chunk_size as usize);
                self.pending.push(std::mem::replace(&mut self.buf, next));
                if self.pending.len() >= *batch {
                    self.encode_pending()?;
                }
            }
            None => {
                let encoded = chunk::encode(&self.buf, self.opts.compression)?;
                self.put_chunk(encoded)?;
                self.buf.clear();
            }
        }
        Ok(())
    }

    fn put_chunk(&mut self, (stored, mut entry): (Vec<u8>, ChunkEntry)) -> Result<()> {
        entry.offset = self.out.pos;
        self.out.put(&stored)?;
        self.stored_bytes += stored.len() as u64;
        self.meta.chunks.push(entry);
        Ok(())
    }

    /// Encodes the pending chunks at once on the host's threads, then writes them in order.
    fn encode_pending(&mut self) -> Result<()> {
        let Some((threads, _)) = &self.parallel else {
            return Ok(());
        };
        let compression = self.opts.compression;
        let slots: Vec<EncodeSlot> = self.pending.iter().map(|_| EncodeSlot::default()).collect();
        let tasks: Vec<LoadTask> = self
            .pending
            .drain(..)
            .zip(&slots)
            .map(|(raw, slot)| {
                let slot = slot.clone();
                Box::new(move || {
                    let r = chunk::encode(&raw, compression);
                    if let Ok(mut s) = slot.lock() {
                        *s = Some(r);
                    }
                }) as LoadTask
            })
            .collect();
        threads.run_all(tasks);
        for slot in slots {
            let r = slot.lock().ok().and_then(|mut s| s.take()).ok_or_else(|| {
                Error::Invalid("layer writer: a chunk encode did not finish".into())
            })?;
            self.put_chunk(r?)?;
        }
        Ok(())
    }

    /// Writes a *packed* layer and finishes it: `blocks` (disk offset, bytes; each at most one
    /// chunk window long and inside one window, at distinct offsets) are stored in the order
    /// given, back to back, cut into chunks of `chunk_size` decoded bytes, whatever their disk
    /// offsets; the extents (sorted by offset, as every layer's) point into those chunks. An
    /// all-zero block becomes a zero extent. A reader needs nothing special (FORMAT.md §1.3: an
    /// extent names a chunk and an offset in it); what a reader reads first is stored first, so
    /// reading the blob from its start brings the blocks in the order they are needed. For
    /// startup layers (FORMAT.md §9): the blocks a start read, in first-read order. The writer
    /// must be fresh (nothing written yet).
    pub fn write_packed(
        mut self,
        blocks: impl IntoIterator<Item = (u64, Vec<u8>)>,
    ) -> Result<(WrittenLayer, W)> {
        if !self.meta.extents.is_empty() || !self.buf.is_empty() {
            return Err(Error::Invalid(
                "layer writer: a packed layer needs a fresh writer".into(),
            ));
        }
        let cs = self.opts.chunk_size as u64;
        let mut extents = Vec::new();
        for (off, data) in blocks {
            let len = data.len() as u64;
            let end = off.checked_add(len).filter(|&e| e <= self.logical_size);
            if len == 0 || end.is_none() || off / cs != (off + len - 1) / cs {
                return Err(Error::Invalid(format!(
                    "layer writer: packed block {off}+{len} is empty, leaves the disk or crosses a window"
                )));
            }
            if data.iter().all(|&b| b == 0) {
                extents.push(Extent {
                    logical: off,
                    len: len as u32,
                    kind: ExtentKind::Zero,
                    chunk: NO_CHUNK,
                    chunk_offset: 0,
                });
                continue;
            }
            if self.buf.len() as u64 + len > cs {
                self.flush_chunk()?;
            }
            extents.push(Extent {
                logical: off,
                len: len as u32,
                kind: ExtentKind::Data,
                chunk: self.next_chunk(),
                chunk_offset: self.buf.len() as u32,
            });
            self.buf.extend_from_slice(&data);
            self.data_bytes += len;
        }
        extents.sort_unstable_by_key(|e| e.logical);
        for w in extents.windows(2) {
            if w[0].end() > w[1].logical {
                return Err(Error::Invalid(format!(
                    "layer writer: packed blocks at {} and {} overlap",
                    w[0].logical, w[1].logical
                )));
            }
        }
        for e in extents {
            match self.meta.extents.last_mut() {
                Some(p)
                    if p.kind == e.kind
                        && p.end() == e.logical
                        && p.logical / cs == e.logical / cs
                        && (e.kind == ExtentKind::Zero
                            || (p.chunk == e.chunk
                                && p.chunk_offset + p.len == e.chunk_offset)) =>
                {
                    p.len += e.len
                }
                _ => self.meta.extents.push(e),
            }
        }
        self.finish()
    }

    /// Writes the last chunk, the metadata and the trailer; returns the blob's identity and
    /// the inner writer (flushed).
    pub fn finish(mut self) -> Result<(WrittenLayer, W)> {
        self.flush_chunk()?;
        self.encode_pending()?;
        let own = self.meta.chunks.len() as u32;
        for x in &mut self.meta.extents {
            if x.chunk != NO_CHUNK && x.chunk & BORROWED != 0 {
                x.chunk = own + (x.chunk & !BORROWED);
            }
        }
        self.meta.chunks.append(&mut self.borrowed);
        let (meta, meta_raw_len) = compress_metadata(self.meta.encode());
        let meta_digest = sha256(&meta);
        let t = Trailer {
            meta_offset: self.out.pos,
            meta_len: meta.len() as u64,
            meta_sha256: meta_digest,
            logical_size: self.logical_size,
            chunk_size: self.opts.chunk_size,
            meta_raw_len,
        };
        debug_assert!(t.meta_offset >= HEADER_LEN as u64);
        self.out.put(&meta)?;
        self.out.put(&t.encode())?;
        let pos = self.out.pos;
        self.out
            .inner
            .flush()
            .map_err(|e| Error::io("layer writer", pos, e))?;
        let written = WrittenLayer {
            size: self.out.pos,
            digest: self.out.hash.finalize().into(),
            meta_digest,
            meta_len: t.meta_len,
            chunks: self.meta.chunks.len() as u64,
            extents: self.meta.extents.len() as u64,
            data_bytes: self.data_bytes,
            stored_bytes: self.stored_bytes,
            borrowed_bytes: self.borrowed_bytes,
            blobs: self.meta.blobs.clone(),
            block_hashes: self.block_lists.take().unwrap_or_default(),
        };
        Ok((written, self.out.inner))
    }
}

/// Level of the metadata's zstd frame: its chunk digests do not compress at any level, the
/// rest (offsets, lengths, extents) does at any.
const META_ZSTD_LEVEL: i32 = 3;

/// The metadata section as stored (FORMAT.md §1.2, version 2): one zstd frame and its decoded
/// length when that is smaller, else the bytes as they are. A remote layer's open fetches
/// all of it, so this is what a lazy start pays before its first chunk.
fn compress_metadata(meta: Vec<u8>) -> (Vec<u8>, Option<u64>) {
    let Ok(columns) = crate::format::transpose_tables(&meta, false) else {
        return (meta, None);
    };
    match zstd::bulk::compress(&columns, META_ZSTD_LEVEL) {
        Ok(z) if z.len() < meta.len() => (z, Some(meta.len() as u64)),
        _ => (meta, None),
    }
}
