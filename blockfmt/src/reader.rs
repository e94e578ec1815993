//! Opening and reading one immutable layer blob through the `ReadAt` seam. Opening costs at most
//! two ranged reads (tail, then metadata if it did not fit in the tail); a chunk read costs one.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::chunk::{self, Verify};
use crate::error::{Error, Result};
use crate::format::{
    oci_digest, sha256, ChunkEntry, Header, Metadata, Trailer, HEADER_LEN, MAX_META_LEN,
    TRAILER_LEN,
};
use crate::store::{ChunkKey, ChunkStore};

/// Positional reads of a blob: the one thing a layer needs from where its bytes live.
/// Implemented for local files here; `lsmd` implements it over its sources and cache.
pub trait ReadAt: Send + Sync {
    /// Fills `buf` from `offset`; a short blob is an error (`UnexpectedEof`).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Total size in bytes.
    fn size(&self) -> io::Result<u64>;
    /// Fills `buf` from `offset` again because the bytes read before failed their check: from
    /// another copy if the source has one (a mirror, the origin behind a peer-to-peer agent),
    /// forgetting whatever it kept of the bad bytes. `None`: nowhere else to ask (a local
    /// file), so the check's failure stands.
    fn read_again_at(&self, _buf: &mut [u8], _offset: u64) -> Option<io::Result<()>> {
        None
    }
    /// Reads `len` bytes from `offset` as ONE stream, in order, handing `sink` each piece as
    /// it arrives (the pieces, in order, are the range): for a long read whose first bytes
    /// are wanted before its last (a startup layer, fetched in the order a start reads it,
    /// [`Layer::stream_run`]). `sink` returns false to stop: the read then ends `Ok` early.
    /// On an error the sink keeps the pieces it had; the rest never comes. The default reads
    /// [`STREAM_PIECE`] bytes at a time with [`Self::read_exact_at`]; a remote source does
    /// better with one request.
    fn read_stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> io::Result<()> {
        let mut buf = vec![0u8; len.min(STREAM_PIECE) as usize];
        let mut at = 0u64;
        while at < len {
            let n = (len - at).min(STREAM_PIECE) as usize;
            self.read_exact_at(&mut buf[..n], offset + at)?;
            if !sink(&buf[..n]) {
                return Ok(());
            }
            at += n as u64;
        }
        Ok(())
    }
}

/// Bytes a default [`ReadAt::read_stream_at`] reads at a time.
pub const STREAM_PIECE: u64 = 1 << 20;

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> io::Result<u64> {
        Ok(self.len() as u64)
    }
}

/// Bytes read from the end of a blob in the first ranged read: big enough for the trailer and the
/// metadata of a layer with a few thousand extents, so most opens take one read.
pub const TAIL_READ: u64 = 256 * 1024;

/// Decodes a version 2 metadata section stored as one zstd frame (its digest already checked):
/// exactly `raw` bytes or an error, never more than `raw` allocated.
fn decompress_metadata(stored: &[u8], raw: u64, t: &Trailer, name: &str) -> Result<Vec<u8>> {
    let bad = |detail: String| Error::corrupt(name, "metadata", t.meta_offset, detail);
    let cap = usize::try_from(raw).map_err(|_| bad(format!("{raw} bytes do not fit memory")))?;
    let out = zstd::bulk::decompress(stored, cap)
        .map_err(|e| bad(format!("zstd frame does not decode to {raw} bytes: {e}")))?;
    if out.len() as u64 != raw {
        return Err(bad(format!(
            "zstd frame decodes to {} bytes, the trailer says {raw}",
            out.len()
        )));
    }
    crate::format::transpose_tables(&out, true).map_err(bad)
}

/// An open, validated layer: trailer and metadata in memory, chunks read on demand.
pub struct Layer {
    name: String,
    src: Arc<dyn ReadAt>,
    blob_size: u64,
    trailer: Trailer,
    meta: Metadata,
    /// Sources of the blobs in the blob table (index `i` = blob number `i + 1`).
    borrowed: Vec<Option<Arc<dyn ReadAt>>>,
    verify: Verify,
    /// Host-wide store of fetched chunks, consulted before the source.
    store: Option<Arc<dyn ChunkStore>>,
}

impl std::fmt::Debug for Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Layer")
            .field("name", &self.name)
            .field("blob_size", &self.blob_size)
            .field("extents", &self.meta.extents.len())
            .finish()
    }
}

impl Layer {
    /// Opens a layer, checking trailer and metadata (and, if given, that the metadata digest is
    /// `expect_meta`, as the image manifest says). `name` appears in every error.
    pub fn open(
        name: impl Into<String>,
        src: Arc<dyn ReadAt>,
        expect_meta: Option<[u8; 32]>,
    ) -> Result<Layer> {
        Layer::open_with_hint(name, src, expect_meta, None)
    }

    /// As [`Layer::open`]; `meta_len_hint` (the stored metadata length, e.g. from the image's
    /// annotations) sizes the first read to exactly the metadata and the trailer, so a remote
    /// layer opens in one request that carries no chunk bytes. A wrong hint costs a second
    /// read, never a wrong answer: the trailer and the metadata digest decide.
    pub fn open_with_hint(
        name: impl Into<String>,
        src: Arc<dyn ReadAt>,
        expect_meta: Option<[u8; 32]>,
        meta_len_hint: Option<u64>,
    ) -> Result<Layer> {
        let name = name.into();
        let blob_size = src.size().map_err(|e| Error::io(&name, 0, e))?;
        if blob_size < (HEADER_LEN + TRAILER_LEN) as u64 {
            return Err(Error::corrupt(
                &name,
                "blob",
                0,
                format!("{blob_size} bytes is too short for a layer blob"),
            ));
        }
        let want = meta_len_hint
            .filter(|&m| m <= MAX_META_LEN)
            .map_or(TAIL_READ, |m| m + TRAILER_LEN as u64);
        let tail_len = blob_size.min(want);
        let tail_off = blob_size - tail_len;
        let mut tail = vec![0u8; tail_len as usize];
        src.read_exact_at(&mut tail, tail_off)
            .map_err(|e| Error::io(&name, tail_off, e))?;
        let t = Trailer::decode(&tail[tail.len() - TRAILER_LEN..], blob_size, &name)?;
        let meta_bytes = if t.meta_offset >= tail_off {
            let s = (t.meta_offset - tail_off) as usize;
            tail[s..s + t.meta_len as usize].to_vec()
        } else {
            // Only the part the tail read missed: the rest of the metadata is in `tail`
            // (reading it all again cost a large layer's open 256 KiB more from the registry).
            let head_len = (tail_off - t.meta_offset) as usize;
            let mut m = vec![0u8; t.meta_len as usize];
            let (head, rest) = m.split_at_mut(head_len.min(t.meta_len as usize));
            src.read_exact_at(head, t.meta_offset)
                .map_err(|e| Error::io(&name, t.meta_offset, e))?;
            let from_tail = tail.get(..rest.len()).ok_or_else(|| {
                Error::corrupt(&name, "trailer", tail_off, "metadata runs past the trailer")
            })?;
            rest.copy_from_slice(from_tail);
            m
        };
        if sha256(&meta_bytes) != t.meta_sha256 {
            return Err(Error::corrupt(
                &name,
                "metadata",
                t.meta_offset,
                "sha256 does not match the trailer",
            ));
        }
        if let Some(want) = expect_meta {
            if want != t.meta_sha256 {
                return Err(Error::corrupt(
                    &name,
                    "metadata",
                    t.meta_offset,
                    format!(
                        "digest {} is not the expected {}",
                        oci_digest(&t.meta_sha256),
                        oci_digest(&want)
                    ),
                ));
            }
        }
        let meta_bytes = match t.meta_raw_len {
            None => meta_bytes,
            Some(raw) => decompress_metadata(&meta_bytes, raw, &t, &name)?,
        };
        let meta = Metadata::decode(&meta_bytes, &t, &name)?;
        let borrowed = vec![None; meta.blobs.len()];
        Ok(Layer {
            name,
            src,
            blob_size,
            trailer: t,
            meta,
            borrowed,
            verify: Verify::Full,
            store: None,
        })
    }

    /// The name used in errors.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// The decoded metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }
    /// The trailer.
    pub fn trailer(&self) -> &Trailer {
        &self.trailer
    }
    /// Disk size this layer was written for.
    pub fn logical_size(&self) -> u64 {
        self.trailer.logical_size
    }
    /// Chunk window.
    pub fn chunk_size(&self) -> u32 {
        self.trailer.chunk_size
    }
    /// Blob size in bytes.
    pub fn blob_size(&self) -> u64 {
        self.blob_size
    }
    /// Supplies the source of blob table entry `number - 1` (blob numbers start at 1).
    pub fn attach_blob(&mut self, number: u32, src: Arc<dyn ReadAt>) -> Result<()> {
        let slot = (number as usize)
            .checked_sub(1)
            .and_then(|i| self.borrowed.get_mut(i))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "{}: no blob number {number} in the blob table",
                    self.name
                ))
            })?;
        *slot = Some(src);
        Ok(())
    }

    fn chunk_entry(&self, chunk: u32) -> Result<&ChunkEntry> {
        self.meta
            .chunks
            .get(chunk as usize)
            .ok_or_else(|| Error::Invalid(format!("{}: no chunk {chunk}", self.name)))
    }

    /// The stored (still encoded, unchecked) bytes of a chunk: what a cache or a fetch moves.
    pub fn read_stored(&self, chunk: u32) -> Result<Vec<u8>> {
        let (e, src) = self.chunk_source(chunk)?;
        let mut buf = vec![0u8; e.stored_len as usize];
        src.read_exact_at(&mut buf, e.offset)
            .map_err(|err| Error::io(&self.name, e.offset, err))?;
        Ok(buf)
    }

    /// A chunk's entry and the source holding its bytes.
    fn chunk_source(&self, chunk: u32) -> Result<(&ChunkEntry, &Arc<dyn ReadAt>)> {
        let e = self.chunk_entry(chunk)?;
        if e.blob == 0 {
            return Ok((e, &self.src));
        }
        let i = e.blob as usize - 1;
        match self.borrowed.get(i).and_then(|s| s.as_ref()) {
            Some(s) => Ok((e, s)),
            None => Err(Error::MissingBlob {
                layer: self.name.clone(),
                chunk,
                blob_digest: self
                    .meta
                    .blobs
                    .get(i)
                    .map(|b| oci_digest(&b.sha256))
                    .unwrap_or_default(),
            }),
        }
    }

    /// Reads and decodes a chunk from its source; bytes that fail the check are asked for once
    /// more ([`ReadAt::read_again_at`]: another copy, if the source has one) before the check's
    /// failure is returned. Returns the stored bytes with the decoded ones.
    fn fetch_checked(&self, chunk: u32) -> Result<(Vec<u8>, Vec<u8>)> {
        let e = self.chunk_entry(chunk)?;
        let decode = |stored: &[u8]| chunk::decode(e, stored, chunk, &self.name, self.verify);
        let stored = self.read_stored(chunk)?;
        match decode(&stored) {
            Ok(d) => Ok((stored, d)),
            Err(err) => self.fetch_again(chunk, err),
        }
    }

    /// A chunk whose bytes failed the check with `err`, fetched once more from another copy
    /// ([`ReadAt::read_again_at`]); `err` stands when there is none or it fails too.
    fn fetch_again(&self, chunk: u32, err: Error) -> Result<(Vec<u8>, Vec<u8>)> {
        let (e, src) = self.chunk_source(chunk)?;
        let decode = |stored: &[u8]| chunk::decode(e, stored, chunk, &self.name, self.verify);
        let mut again = vec![0u8; e.stored_len as usize];
        match src.read_again_at(&mut again, e.offset) {
            None => Err(err),
            Some(Err(io)) => {
                tracing::warn!(layer = %self.name, chunk, error = %io, "fetching a chunk that failed its check again failed");
                Err(err)
            }
            Some(Ok(())) => {
                let d = decode(&again)?;
                tracing::warn!(layer = %self.name, chunk, error = %err, "chunk failed its check; the copy fetched again passed");
                Ok((again, d))
            }
        }
    }

    /// Reads, decodes and checks a chunk. Never returns bytes that failed a check. With a
    /// store, a kept copy is tried first (and dropped if it fails the check), and a chunk
    /// fetched from the source is kept once it has passed.
    pub fn read_chunk(&self, chunk: u32) -> Result<Vec<u8>> {
        let e = self.chunk_entry(chunk)?;
        let Some(store) = &self.store else {
            return Ok(self.fetch_checked(chunk)?.1);
        };
        let key = ChunkKey::of(e);
        if let Some(kept) = store.get(&key) {
            // Kept copies are always checked in full: the cache disk is not the blob.
            match chunk::decode(e, &kept, chunk, &self.name, Verify::Full) {
                Ok(d) => return Ok(d),
                Err(err) => {
                    tracing::warn!(layer = %self.name, chunk, error = %err, "cached chunk failed its check; fetching it again");
                    store.discard(&key);
                }
            }
        }
        let (stored, decoded) = self.fetch_checked(chunk)?;
        store.put(&key, &stored);
        Ok(decoded)
    }

    /// Whether chunk `b` is stored right after chunk `a` in the same blob, so one ranged read
    /// fetches both.
    pub fn adjacent(&self, a: u32, b: u32) -> bool {
        match (
            self.meta.chunks.get(a as usize),
            self.meta.chunks.get(b as usize),
        ) {
            (Some(x), Some(y)) => x.blob == y.blob && x.offset + x.stored_len as u64 == y.offset,
            _ => false,
        }
    }

    /// Whether the store keeps chunk `chunk` (a hint: see [`ChunkStore::contains`]).
    pub fn is_kept(&self, chunk: u32) -> bool {
        match (&self.store, self.meta.chunks.get(chunk as usize)) {
            (Some(s), Some(e)) => s.contains(&ChunkKey::of(e)),
            _ => false,
        }
    }

    /// Chunks `first..first + n`, stored back to back (see [`Self::adjacent`]), fetched with ONE
    /// ranged read instead of `n`: a remote source pays one round trip for all of them. Each
    /// is checked on its own exactly as [`Self::read_chunk`] checks it and kept in the store;
    /// one that fails its check is fetched once more from another copy, as a single read's
    /// would be, and a run that is not back to back or whose read fails is read chunk by chunk
    /// ([`Self::read_chunk`]): a result is never less checked than a single read's.
    pub fn read_run(&self, first: u32, n: u32) -> Vec<Result<Vec<u8>>> {
        let chunks: Vec<u32> = (first..first.saturating_add(n.max(1))).collect();
        let joined = chunks.windows(2).all(|w| self.adjacent(w[0], w[1]));
        let bytes = match (joined && chunks.len() > 1, self.chunk_source(first)) {
            (true, Ok((e, src))) => {
                let last = &self.meta.chunks[*chunks.last().unwrap_or(&first) as usize];
                let len = (last.offset + last.stored_len as u64 - e.offset) as usize;
                let mut buf = vec![0u8; len];
                match src.read_exact_at(&mut buf, e.offset) {
                    Ok(()) => Some((e.offset, buf)),
                    Err(err) => {
                        tracing::debug!(layer = %self.name, first, n, error = %err, "a merged fetch failed; fetching its chunks one by one");
                        None
                    }
                }
            }
            _ => None,
        };
        let Some((base, buf)) = bytes else {
            return chunks.iter().map(|&c| self.read_chunk(c)).collect();
        };
        chunks
            .iter()
            .map(|&c| {
                let e = &self.meta.chunks[c as usize];
                let at = (e.offset - base) as usize;
                self.check_fetched(c, &buf[at..at + e.stored_len as usize])
            })
            .collect()
    }

    /// The stored bytes of chunk `c` as one fetch of several chunks brought them: decoded and
    /// checked exactly as [`Self::read_chunk`] checks a chunk (asked once more from another
    /// copy when they fail, [`Self::fetch_again`]) and kept in the store once they passed.
    fn check_fetched(&self, c: u32, stored: &[u8]) -> Result<Vec<u8>> {
        let e = self.chunk_entry(c)?;
        match chunk::decode(e, stored, c, &self.name, self.verify) {
            Ok(d) => {
                if let Some(s) = &self.store {
                    s.put(&ChunkKey::of(e), stored);
                }
                Ok(d)
            }
            // Asked once more from another copy, as a single read's failure is.
            Err(err) => {
                let (stored, d) = self.fetch_again(c, err)?;
                if let Some(s) = &self.store {
                    s.put(&ChunkKey::of(e), &stored);
                }
                Ok(d)
            }
        }
    }

    /// Chunks `first..first + n`, stored back to back, fetched as ONE stream
    /// ([`ReadAt::read_stream_at`]: one request of a remote source) and handed to `on_chunk`
    /// one by one, in order, **as soon as each one's last byte arrives** — checked and kept
    /// as [`Self::read_run`] does (never a byte that failed its check) — instead of after the
    /// whole run: a reader waiting for the first chunk of a long run gets it after its own
    /// bytes, not the run's. `on_chunk` returns false to stop the stream (the chunks after
    /// get no call). Every chunk gets one call otherwise: those after a failed stream get its
    /// error. Chunks not stored back to back are read one by one ([`Self::read_chunk`]).
    pub fn stream_run(
        &self,
        first: u32,
        n: u32,
        on_chunk: &mut dyn FnMut(u32, Result<Vec<u8>>) -> bool,
    ) {
        let end = first.saturating_add(n.max(1));
        let joined = (first..end.saturating_sub(1)).all(|c| self.adjacent(c, c + 1));
        let (base, src) = match (joined, self.chunk_source(first)) {
            (true, Ok((e, src))) => (e.offset, src.clone()),
            _ => {
                for c in first..end {
                    if !on_chunk(c, self.read_chunk(c)) {
                        return;
                    }
                }
                return;
            }
        };
        let last = &self.meta.chunks[end as usize - 1];
        let len = last.offset + last.stored_len as u64 - base;
        let mut pending: Vec<u8> = Vec::new();
        let (mut next, mut go_on) = (first, true);
        let streamed = src.read_stream_at(base, len, &mut |piece| {
            pending.extend_from_slice(piece);
            while go_on && next < end {
                let need = self.meta.chunks[next as usize].stored_len as usize;
                if pending.len() < need {
                    break;
                }
                let r = self.check_fetched(next, &pending[..need]);
                pending.drain(..need);
                go_on = on_chunk(next, r);
                next += 1;
            }
            go_on
        });
        if !go_on {
            return;
        }
        let why = match streamed {
            Err(e) => e,
            Ok(()) => io::Error::new(io::ErrorKind::UnexpectedEof, "the stream ended early"),
        };
        for c in next..end {
            let at = self.meta.chunks[c as usize].offset;
            let e = io::Error::new(why.kind(), why.to_string());
            if !on_chunk(c, Err(Error::io(&self.name, at, e))) {
                return;
            }
        }
    }

    /// Consults `store` before the source for every chunk, and fills it.
    pub fn with_store(mut self, store: Arc<dyn ChunkStore>) -> Layer {
        self.store = Some(store);
        self
    }

    /// Checks every byte of the blob: header (and its agreement with the trailer), every chunk in
    /// full, and, if given, the sha256 of the whole blob. Returns the first failure.
    pub fn verify_all(&self, expect_digest: Option<[u8; 32]>) -> Result<()> {
        let mut hb = [0u8; HEADER_LEN];
        self.src
            .read_exact_at(&mut hb, 0)
            .map_err(|e| Error::io(&self.name, 0, e))?;
        let h = Header::decode(&hb, &self.name)?;
        if h.chunk_size != self.trailer.chunk_size || h.logical_size != self.trailer.logical_size {
            return Err(Error::corrupt(
                &self.name,
                "header",
                16,
                "header and trailer disagree",
            ));
        }
        for (i, e) in self.meta.chunks.iter().enumerate() {
            if e.blob != 0
                && self
                    .borrowed
                    .get(e.blob as usize - 1)
                    .is_none_or(|s| s.is_none())
            {
                continue; // a borrowed chunk is verified with the blob that holds it
            }
            let stored = self.read_stored(i as u32)?;
            chunk::decode(e, &stored, i as u32, &self.name, Verify::Full)?;
        }
        // Every byte between the header and the metadata belongs to some chunk of this blob.
        let mut spans: Vec<(u64, u64)> = self
            .meta
            .chunks
            .iter()
            .filter(|c| c.blob == 0)
            .map(|c| (c.offset, c.offset + c.stored_len as u64))
            .collect();
        spans.sort_unstable();
        let mut at = HEADER_LEN as u64;
        for (s, e) in spans {
            if s > at {
                return Err(Error::corrupt(
                    &self.name,
                    "blob",
                    at,
                    "bytes not covered by any chunk",
                ));
            }
            at = at.max(e);
        }
        if at != self.trailer.meta_offset {
            return Err(Error::corrupt(
                &self.name,
                "blob",
                at,
                "bytes not covered by any chunk",
            ));
        }
        if let Some(want) = expect_digest {
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 1 << 20];
            let mut off = 0u64;
            while off < self.blob_size {
                let n = (self.blob_size - off).min(buf.len() as u64) as usize;
                self.src
                    .read_exact_at(&mut buf[..n], off)
                    .map_err(|e| Error::io(&self.name, off, e))?;
                h.update(&buf[..n]);
                off += n as u64;
            }
            let got: [u8; 32] = h.finalize().into();
            if got != want {
                return Err(Error::corrupt(
                    &self.name,
                    "blob",
                    0,
                    format!(
                        "digest {} is not the expected {}",
                        oci_digest(&got),
                        oci_digest(&want)
                    ),
                ));
            }
        }
        Ok(())
    }
}
