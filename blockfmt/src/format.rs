//! Byte layouts of the layer blob (FORMAT.md §1): encode and validating decode of the header,
//! trailer and metadata section. Decoding never trusts a length or index before checking it
//! against the limits in FORMAT.md §1.6, so a hostile blob yields an error, not a panic or a
//! huge allocation.

use crate::error::{Error, Result};
use sha2::{Digest, Sha256};

/// Granule in which runs of zero bytes are detected, aligned to logical offset 0.
pub const ZERO_GRANULE: u64 = 4096;

/// True if every byte is zero. Folds 512-byte blocks (which the compiler vectorises) and stops
/// at the first non-zero block: this runs over every imported byte.
pub fn is_zero(b: &[u8]) -> bool {
    b.chunks(512)
        .all(|c| c.iter().fold(0u8, |a, &x| a | x) == 0)
}

/// Format version written by this build (2: the metadata section may be one zstd frame,
/// FORMAT.md §1.2). Version 1 blobs are read as well.
pub const VERSION: u16 = 2;
/// Oldest format version this build reads.
pub const MIN_VERSION: u16 = 1;
/// Trailer flag (version 2): the metadata section is stored as one zstd frame.
pub const TRAILER_META_ZSTD: u32 = 1;
/// Header length (FORMAT.md §1.1).
pub const HEADER_LEN: usize = 64;
/// Trailer length (FORMAT.md §1.2).
pub const TRAILER_LEN: usize = 96;
/// Metadata header length (FORMAT.md §1.3).
pub const META_HEADER_LEN: usize = 32;
/// Blob table entry length.
pub const BLOB_ENTRY_LEN: usize = 48;
/// Chunk table entry length.
pub const CHUNK_ENTRY_LEN: usize = 64;
/// Extent index entry length.
pub const EXTENT_ENTRY_LEN: usize = 24;
/// Largest metadata section a reader accepts.
pub const MAX_META_LEN: u64 = 1 << 30;
/// Smallest and largest chunk window.
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk window; also the largest decoded chunk.
pub const MAX_CHUNK_SIZE: u32 = 4 << 20;
/// Slack a zstd frame may exceed its input by before a reader calls it corrupt.
pub const MAX_ZSTD_OVERHEAD: u32 = 64 << 10;
/// `chunk` value of a zero extent.
pub const NO_CHUNK: u32 = u32::MAX;

const HEADER_MAGIC: &[u8; 8] = b"LSMLAYER";
const TRAILER_MAGIC: &[u8; 8] = b"LSMTRAIL";
const META_MAGIC: &[u8; 8] = b"LSMMETA\0";

pub(crate) fn le_u16(b: &[u8], o: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[o..o + 2]);
    u16::from_le_bytes(a)
}
pub(crate) fn le_u32(b: &[u8], o: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[o..o + 4]);
    u32::from_le_bytes(a)
}
pub(crate) fn le_u64(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}
fn arr32(b: &[u8], o: usize) -> [u8; 32] {
    let mut a = [0u8; 32];
    a.copy_from_slice(&b[o..o + 32]);
    a
}

/// Checks a chunk window size: a power of two in `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
pub fn check_chunk_size(chunk_size: u32) -> std::result::Result<(), String> {
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
        return Err(format!(
            "chunk size {chunk_size} must be a power of two between {MIN_CHUNK_SIZE} and {MAX_CHUNK_SIZE}"
        ));
    }
    Ok(())
}

/// SHA-256 of `data` as raw bytes.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// `sha256:<hex>` form of a digest, as OCI writes it.
pub fn oci_digest(d: &[u8; 32]) -> String {
    format!("sha256:{}", hex::encode(d))
}

/// Parses `sha256:<64 hex>` into raw bytes.
pub fn parse_oci_digest(s: &str) -> std::result::Result<[u8; 32], String> {
    let hexpart = s
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {s:?} does not start with \"sha256:\""))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hexpart, &mut out)
        .map_err(|e| format!("digest {s:?} is not 64 hex digits: {e}"))?;
    Ok(out)
}

/// Check that a fixed structure starts with `magic`, has a known version and the given length,
/// and ends with a valid crc32c over the rest.
/// Returns the version.
fn check_fixed(
    b: &[u8],
    magic: &[u8; 8],
    len: usize,
    layer: &str,
    what: &'static str,
    offset: u64,
) -> Result<u16> {
    if b.len() != len {
        return Err(Error::corrupt(
            layer,
            what,
            offset,
            format!("{} bytes, want {len}", b.len()),
        ));
    }
    if &b[0..8] != magic {
        return Err(Error::corrupt(
            layer,
            what,
            offset,
            "bad magic (not an lsm layer blob)",
        ));
    }
    let want = le_u32(b, len - 4);
    let got = crc32c::crc32c(&b[..len - 4]);
    if want != got {
        return Err(Error::corrupt(
            layer,
            what,
            offset,
            format!("crc32c mismatch (stored {want:#010x}, computed {got:#010x})"),
        ));
    }
    let version = le_u16(b, 8);
    if !(MIN_VERSION..=VERSION).contains(&version) {
        return Err(Error::Unsupported {
            layer: layer.to_string(),
            what,
            version,
        });
    }
    if le_u16(b, 10) as usize != len {
        return Err(Error::corrupt(layer, what, offset, "length field mismatch"));
    }
    Ok(version)
}

fn seal_crc(b: &mut [u8]) {
    let n = b.len();
    let c = crc32c::crc32c(&b[..n - 4]);
    b[n - 4..].copy_from_slice(&c.to_le_bytes());
}

/// Byte-transposes the chunk table and the extent index of an encoded metadata section (the
/// header and blob table stay as they are), or undoes it (`back`): entry `i`'s byte `j` goes
/// to `j·n + i`. Stored compressed, the columns of offsets, lengths, kinds and chunk numbers
/// become runs zstd packs far better than rows (FORMAT.md §1.3). The section must have the
/// length its header's counts give; an error says which.
pub fn transpose_tables(meta: &[u8], back: bool) -> std::result::Result<Vec<u8>, String> {
    if meta.len() < META_HEADER_LEN || &meta[0..8] != META_MAGIC {
        return Err("bad metadata magic".into());
    }
    let n_blobs = le_u32(meta, 8) as u64;
    let n_chunks = le_u32(meta, 12) as u64;
    let n_extents = le_u64(meta, 16);
    if Metadata::encoded_len(n_blobs, n_chunks, n_extents) != Some(meta.len() as u64) {
        return Err(format!(
            "counts ({n_blobs} blobs, {n_chunks} chunks, {n_extents} extents) do not match length {}",
            meta.len()
        ));
    }
    let mut out = meta.to_vec();
    let start = META_HEADER_LEN + n_blobs as usize * BLOB_ENTRY_LEN;
    let tables = [
        (start, n_chunks as usize, CHUNK_ENTRY_LEN),
        (
            start + n_chunks as usize * CHUNK_ENTRY_LEN,
            n_extents as usize,
            EXTENT_ENTRY_LEN,
        ),
    ];
    for (at, n, w) in tables {
        let src = &meta[at..at + n * w];
        let dst = &mut out[at..at + n * w];
        for i in 0..n {
            for j in 0..w {
                if back {
                    dst[i * w + j] = src[j * n + i];
                } else {
                    dst[j * n + i] = src[i * w + j];
                }
            }
        }
    }
    Ok(out)
}

/// The blob header (FORMAT.md §1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub chunk_size: u32,
    pub logical_size: u64,
}

impl Header {
    /// Serialises the header with its checksum.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(HEADER_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        b[16..20].copy_from_slice(&self.chunk_size.to_le_bytes());
        b[24..32].copy_from_slice(&self.logical_size.to_le_bytes());
        seal_crc(&mut b);
        b
    }

    /// Parses and checks a header read from offset 0.
    pub fn decode(b: &[u8], layer: &str) -> Result<Header> {
        check_fixed(b, HEADER_MAGIC, HEADER_LEN, layer, "header", 0)?;
        if le_u32(b, 12) != 0 {
            return Err(Error::corrupt(layer, "header", 12, "unknown flags"));
        }
        let chunk_size = le_u32(b, 16);
        check_chunk_size(chunk_size).map_err(|e| Error::corrupt(layer, "header", 16, e))?;
        Ok(Header {
            chunk_size,
            logical_size: le_u64(b, 24),
        })
    }
}

/// The blob trailer (FORMAT.md §1.2): where the metadata is and its digest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Trailer {
    pub meta_offset: u64,
    /// Stored bytes of the metadata section (what a reader fetches).
    pub meta_len: u64,
    /// SHA-256 of the stored metadata bytes (checked before they are decompressed).
    pub meta_sha256: [u8; 32],
    pub logical_size: u64,
    pub chunk_size: u32,
    /// Version 2: the metadata is one zstd frame decoding to this many bytes (≤ 1 GiB);
    /// `None`: stored as is.
    pub meta_raw_len: Option<u64>,
}

impl Trailer {
    /// Serialises the trailer with its checksum.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(TRAILER_MAGIC);
        b[8..10].copy_from_slice(&VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&(TRAILER_LEN as u16).to_le_bytes());
        if let Some(raw) = self.meta_raw_len {
            b[12..16].copy_from_slice(&TRAILER_META_ZSTD.to_le_bytes());
            b[76..84].copy_from_slice(&raw.to_le_bytes());
        }
        b[16..24].copy_from_slice(&self.meta_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.meta_len.to_le_bytes());
        b[32..64].copy_from_slice(&self.meta_sha256);
        b[64..72].copy_from_slice(&self.logical_size.to_le_bytes());
        b[72..76].copy_from_slice(&self.chunk_size.to_le_bytes());
        seal_crc(&mut b);
        b
    }

    /// Parses and checks the trailer of a blob of `blob_size` bytes.
    pub fn decode(b: &[u8], blob_size: u64, layer: &str) -> Result<Trailer> {
        let at = blob_size.saturating_sub(TRAILER_LEN as u64);
        let version = check_fixed(b, TRAILER_MAGIC, TRAILER_LEN, layer, "trailer", at)?;
        let flags = le_u32(b, 12);
        let known = if version >= 2 { TRAILER_META_ZSTD } else { 0 };
        if flags & !known != 0 {
            return Err(Error::corrupt(layer, "trailer", at + 12, "unknown flags"));
        }
        let raw = le_u64(b, 76);
        let meta_raw_len = if flags & TRAILER_META_ZSTD != 0 {
            if !(META_HEADER_LEN as u64..=MAX_META_LEN).contains(&raw) {
                return Err(Error::corrupt(
                    layer,
                    "trailer",
                    at + 76,
                    format!("decoded metadata length {raw} outside {META_HEADER_LEN}..=1 GiB"),
                ));
            }
            Some(raw)
        } else if raw != 0 {
            return Err(Error::corrupt(
                layer,
                "trailer",
                at + 76,
                "decoded metadata length without the zstd flag",
            ));
        } else {
            None
        };
        let t = Trailer {
            meta_offset: le_u64(b, 16),
            meta_len: le_u64(b, 24),
            meta_sha256: arr32(b, 32),
            logical_size: le_u64(b, 64),
            chunk_size: le_u32(b, 72),
            meta_raw_len,
        };
        check_chunk_size(t.chunk_size).map_err(|e| Error::corrupt(layer, "trailer", at + 72, e))?;
        if t.meta_len > MAX_META_LEN
            || t.meta_offset < HEADER_LEN as u64
            || t.meta_offset.checked_add(t.meta_len) != Some(at)
        {
            return Err(Error::corrupt(
                layer,
                "trailer",
                at + 16,
                format!(
                    "metadata range {}+{} does not end at the trailer ({at})",
                    t.meta_offset, t.meta_len
                ),
            ));
        }
        Ok(t)
    }
}

/// How a chunk's stored bytes are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is.
    None = 0,
    /// One zstd frame.
    Zstd = 1,
}

/// A blob table entry: another blob this layer borrows chunks from (FORMAT.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlobRef {
    pub sha256: [u8; 32],
    pub size: u64,
}

/// A chunk table entry (FORMAT.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkEntry {
    /// 0 = this blob; `i >= 1` = blob table entry `i - 1`.
    pub blob: u32,
    pub codec: Codec,
    pub stored_len: u32,
    pub raw_len: u32,
    pub offset: u64,
    pub crc32c: u32,
    pub sha256: [u8; 32],
}

/// What an extent maps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes of a chunk.
    Data = 0,
    /// Zeros that hide the layers below.
    Zero = 1,
}

/// An extent index entry (FORMAT.md §1.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub logical: u64,
    pub len: u32,
    pub kind: ExtentKind,
    /// Chunk table index for data; `NO_CHUNK` for zero.
    pub chunk: u32,
    pub chunk_offset: u32,
}

impl Extent {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.logical + self.len as u64
    }
}

/// The decoded metadata section.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metadata {
    pub blobs: Vec<BlobRef>,
    pub chunks: Vec<ChunkEntry>,
    pub extents: Vec<Extent>,
}

impl Metadata {
    /// Exact encoded length for the given counts.
    pub fn encoded_len(n_blobs: u64, n_chunks: u64, n_extents: u64) -> Option<u64> {
        let a = n_blobs.checked_mul(BLOB_ENTRY_LEN as u64)?;
        let b = n_chunks.checked_mul(CHUNK_ENTRY_LEN as u64)?;
        let c = n_extents.checked_mul(EXTENT_ENTRY_LEN as u64)?;
        (META_HEADER_LEN as u64)
            .checked_add(a)?
            .checked_add(b)?
            .checked_add(c)
    }

    /// Serialises the metadata section.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(
            META_HEADER_LEN
                + self.blobs.len() * BLOB_ENTRY_LEN
                + self.chunks.len() * CHUNK_ENTRY_LEN
                + self.extents.len() * EXTENT_ENTRY_LEN,
        );
        b.extend_from_slice(META_MAGIC);
        b.extend_from_slice(&(self.blobs.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        b.extend_from_slice(&(self.extents.len() as u64).to_le_bytes());
        b.extend_from_slice(&0u64.to_le_bytes());
        for r in &self.blobs {
            b.extend_from_slice(&r.sha256);
            b.extend_from_slice(&r.size.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
        }
        for c in &self.chunks {
            b.extend_from_slice(&c.blob.to_le_bytes());
            b.push(c.codec as u8);
            b.extend_from_slice(&[0u8; 3]);
            b.extend_from_slice(&c.stored_len.to_le_bytes());
            b.extend_from_slice(&c.raw_len.to_le_bytes());
            b.extend_from_slice(&c.offset.to_le_bytes());
            b.extend_from_slice(&c.crc32c.to_le_bytes());
            b.extend_from_slice(&0u32.to_le_bytes());
            b.extend_from_slice(&c.sha256);
        }
        for e in &self.extents {
            b.extend_from_slice(&e.logical.to_le_bytes());
            b.extend_from_slice(&e.len.to_le_bytes());
            b.push(e.kind as u8);
            b.extend_from_slice(&[0u8; 3]);
            b.extend_from_slice(&e.chunk.to_le_bytes());
            b.extend_from_slice(&e.chunk_offset.to_le_bytes());
        }
        b
    }

    /// Parses and validates a metadata section whose digest was already checked against the
    /// trailer. Checks every rule of FORMAT.md §1.6; offsets in errors are blob offsets.
    pub fn decode(b: &[u8], t: &Trailer, layer: &str) -> Result<Metadata> {
        let base = t.meta_offset;
        let bad = |off: usize, detail: String| {
            Error::corrupt(layer, "metadata", base + off as u64, detail)
        };
        if b.len() < META_HEADER_LEN || &b[0..8] != META_MAGIC {
            return Err(bad(0, "bad metadata magic".into()));
        }
        let n_blobs = le_u32(b, 8) as u64;
        let n_chunks = le_u32(b, 12) as u64;
        let n_extents = le_u64(b, 16);
        if le_u64(b, 24) != 0 {
            return Err(bad(24, "reserved field is not zero".into()));
        }
        if Metadata::encoded_len(n_blobs, n_chunks, n_extents) != Some(b.len() as u64) {
            return Err(bad(
                8,
                format!("counts ({n_blobs} blobs, {n_chunks} chunks, {n_extents} extents) do not match length {}", b.len()),
            ));
        }
        let mut p = META_HEADER_LEN;
        let mut blobs = Vec::with_capacity(n_blobs as usize);
        for _ in 0..n_blobs {
            blobs.push(BlobRef {
                sha256: arr32(b, p),
                size: le_u64(b, p + 32),
            });
            if le_u64(b, p + 40) != 0 {
                return Err(bad(p + 40, "reserved field is not zero".into()));
            }
            p += BLOB_ENTRY_LEN;
        }
        let mut chunks = Vec::with_capacity(n_chunks as usize);
        for i in 0..n_chunks {
            let blob = le_u32(b, p);
            let codec = match b[p + 4] {
                0 => Codec::None,
                1 => Codec::Zstd,
                c => return Err(bad(p + 4, format!("chunk {i}: unknown codec {c}"))),
            };
            if b[p + 5..p + 8] != [0, 0, 0] || le_u32(b, p + 28) != 0 {
                return Err(bad(p, format!("chunk {i}: reserved field is not zero")));
            }
            let c = ChunkEntry {
                blob,
                codec,
                stored_len: le_u32(b, p + 8),
                raw_len: le_u32(b, p + 12),
                offset: le_u64(b, p + 16),
                crc32c: le_u32(b, p + 24),
                sha256: arr32(b, p + 32),
            };
            if c.blob as u64 > n_blobs {
                return Err(bad(
                    p,
                    format!("chunk {i}: blob {} beyond the blob table", c.blob),
                ));
            }
            if c.raw_len == 0 || c.raw_len > MAX_CHUNK_SIZE {
                return Err(bad(
                    p + 12,
                    format!("chunk {i}: decoded length {} out of bounds", c.raw_len),
                ));
            }
            let max_stored = match c.codec {
                Codec::None => c.raw_len,
                Codec::Zstd => c.raw_len + MAX_ZSTD_OVERHEAD,
            };
            if c.stored_len == 0
                || c.stored_len > max_stored
                || (c.codec == Codec::None && c.stored_len != c.raw_len)
            {
                return Err(bad(
                    p + 8,
                    format!("chunk {i}: stored length {} invalid", c.stored_len),
                ));
            }
            if c.blob == 0 {
                let end = c.offset.checked_add(c.stored_len as u64);
                if c.offset < HEADER_LEN as u64 || end.is_none_or(|e| e > t.meta_offset) {
                    return Err(bad(
                        p + 16,
                        format!(
                            "chunk {i}: range {}+{} outside the data area",
                            c.offset, c.stored_len
                        ),
                    ));
                }
            } else if let Some(r) = blobs.get(c.blob as usize - 1) {
                if c.offset
                    .checked_add(c.stored_len as u64)
                    .is_none_or(|e| e > r.size)
                {
                    return Err(bad(
                        p + 16,
                        format!("chunk {i}: range outside blob {}", c.blob),
                    ));
                }
            }
            chunks.push(c);
            p += CHUNK_ENTRY_LEN;
        }
        let mut extents = Vec::with_capacity(n_extents as usize);
        let mut prev_end = 0u64;
        for i in 0..n_extents {
            let e = Extent {
                logical: le_u64(b, p),
                len: le_u32(b, p + 8),
                kind: match b[p + 12] {
                    0 => ExtentKind::Data,
                    1 => ExtentKind::Zero,
                    k => return Err(bad(p + 12, format!("extent {i}: unknown kind {k}"))),
                },
                chunk: le_u32(b, p + 16),
                chunk_offset: le_u32(b, p + 20),
            };
            if b[p + 13..p + 16] != [0, 0, 0] {
                return Err(bad(
                    p + 13,
                    format!("extent {i}: reserved field is not zero"),
                ));
            }
            if e.len == 0
                || e.logical < prev_end
                || e.logical
                    .checked_add(e.len as u64)
                    .is_none_or(|x| x > t.logical_size)
            {
                return Err(bad(
                    p,
                    format!(
                        "extent {i}: range {}+{} overlaps, is empty or leaves the disk",
                        e.logical, e.len
                    ),
                ));
            }
            let window = t.chunk_size as u64;
            match e.kind {
                ExtentKind::Data => {
                    let c = chunks.get(e.chunk as usize).ok_or_else(|| {
                        bad(
                            p + 16,
                            format!("extent {i}: chunk {} beyond the chunk table", e.chunk),
                        )
                    })?;
                    if e.chunk_offset as u64 + e.len as u64 > c.raw_len as u64 {
                        return Err(bad(
                            p + 20,
                            format!("extent {i}: range leaves chunk {}", e.chunk),
                        ));
                    }
                    if e.logical / window != (e.end() - 1) / window {
                        return Err(bad(p, format!("extent {i}: crosses a chunk window")));
                    }
                }
                ExtentKind::Zero => {
                    if e.chunk != NO_CHUNK || e.chunk_offset != 0 {
                        return Err(bad(
                            p + 16,
                            format!("extent {i}: zero extent names a chunk"),
                        ));
                    }
                }
            }
            prev_end = e.end();
            extents.push(e);
            p += EXTENT_ENTRY_LEN;
        }
        Ok(Metadata {
            blobs,
            chunks,
            extents,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn trailer_for(meta: &[u8]) -> Trailer {
        Trailer {
            meta_offset: 1 << 20,
            meta_len: meta.len() as u64,
            meta_sha256: sha256(meta),
            logical_size: 1 << 30,
            chunk_size: 65536,
            meta_raw_len: None,
        }
    }

    #[test]
    fn header_and_trailer_round_trip() {
        let h = Header {
            chunk_size: 65536,
            logical_size: 12345,
        };
        assert_eq!(Header::decode(&h.encode(), "t").unwrap(), h);
        let t = trailer_for(b"x");
        let size = t.meta_offset + t.meta_len + TRAILER_LEN as u64;
        assert_eq!(Trailer::decode(&t.encode(), size, "t").unwrap(), t);
    }

    #[test]
    fn version_1_trailers_are_read_and_cannot_claim_compressed_metadata() {
        let mut t = trailer_for(b"x");
        let size = t.meta_offset + t.meta_len + TRAILER_LEN as u64;
        let mut v1 = t.encode();
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        seal_crc(&mut v1);
        assert_eq!(Trailer::decode(&v1, size, "t").unwrap(), t);
        t.meta_raw_len = Some(4096);
        let v2 = t.encode();
        assert_eq!(Trailer::decode(&v2, size, "t").unwrap(), t);
        let mut v1 = v2;
        v1[8..10].copy_from_slice(&1u16.to_le_bytes());
        seal_crc(&mut v1);
        assert!(Trailer::decode(&v1, size, "t").is_err());
        let mut v3 = v2;
        v3[8..10].copy_from_slice(&3u16.to_le_bytes());
        seal_crc(&mut v3);
        assert!(matches!(
            Trailer::decode(&v3, size, "t"),
            Err(Error::Unsupported { version: 3, .. })
        ));
    }

    #[test]
    fn every_single_bit_flip_in_header_and_trailer_is_caught() {
        let h = Header {
            chunk_size: 65536,
            logical_size: 12345,
        }
        .encode();
        let t = trailer_for(b"x");
        let size = t.meta_offset + t.meta_len + TRAILER_LEN as u64;
        let te = t.encode();
        for i in 0..HEADER_LEN * 8 {
            let mut b = h;
            b[i / 8] ^= 1 << (i % 8);
            assert!(Header::decode(&b, "t").is_err());
        }
        for i in 0..TRAILER_LEN * 8 {
            let mut b = te;
            b[i / 8] ^= 1 << (i % 8);
            assert!(Trailer::decode(&b, size, "t").is_err());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        /// Fuzz: any bytes given to the header parser give Ok or Err, never a panic.
        #[test]
        fn fuzz_header(b in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Header::decode(&b, "fuzz");
        }

        /// Fuzz: any bytes and any blob size given to the trailer parser.
        #[test]
        fn fuzz_trailer(b in proptest::collection::vec(any::<u8>(), 0..160), size in any::<u64>()) {
            let _ = Trailer::decode(&b, size, "fuzz");
        }

        /// Fuzz: a trailer with valid framing but arbitrary fields.
        #[test]
        fn fuzz_trailer_fields(mo in any::<u64>(), ml in any::<u64>(), cs in any::<u32>(), size in any::<u64>()) {
            let t = Trailer { meta_offset: mo, meta_len: ml, meta_sha256: [0; 32], logical_size: 0, chunk_size: cs, meta_raw_len: (ml % 3 == 0).then_some(ml / 2) };
            if let Ok(p) = Trailer::decode(&t.encode(), size, "fuzz") {
                prop_assert_eq!(p.meta_offset + p.meta_len + TRAILER_LEN as u64, size);
            }
        }

        /// Fuzz: transposing any bytes is Ok or Err, never a panic; a valid section comes back.
        #[test]
        fn fuzz_transpose_tables(b in proptest::collection::vec(any::<u8>(), 0..600), n_chunks in 0u32..5, n_extents in 0u64..7) {
            let _ = transpose_tables(&b, true);
            let _ = transpose_tables(&b, false);
            let mut m = META_MAGIC.to_vec();
            m.extend_from_slice(&0u32.to_le_bytes());
            m.extend_from_slice(&n_chunks.to_le_bytes());
            m.extend_from_slice(&n_extents.to_le_bytes());
            m.extend_from_slice(&[0; 8]);
            let len = n_chunks as usize * CHUNK_ENTRY_LEN + n_extents as usize * EXTENT_ENTRY_LEN;
            m.extend(b.iter().cycle().take(len));
            if m.len() == META_HEADER_LEN + len {
                let t = transpose_tables(&m, false).unwrap();
                prop_assert_eq!(transpose_tables(&t, true).unwrap(), m);
            }
        }

        /// Fuzz: arbitrary metadata bytes, and valid metadata with random byte mutations.
        #[test]
        fn fuzz_metadata(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            let t = trailer_for(&b);
            let _ = Metadata::decode(&b, &t, "fuzz");
        }

        #[test]
        fn fuzz_metadata_mutations(n_ext in 1usize..20, muts in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8)) {
            let mut m = Metadata::default();
            m.chunks.push(ChunkEntry { blob: 0, codec: Codec::Zstd, stored_len: 100, raw_len: 65536, offset: 64, crc32c: 0, sha256: [0; 32] });
            for i in 0..n_ext {
                m.extents.push(Extent { logical: i as u64 * 4096, len: 4096, kind: ExtentKind::Data, chunk: 0, chunk_offset: (i as u32 % 16) * 4096 });
            }
            let mut b = m.encode();
            let t = trailer_for(&b);
            let parsed = Metadata::decode(&b, &t, "fuzz");
            prop_assert!(parsed.is_ok());
            for (pos, val) in muts {
                let l = b.len();
                b[pos % l] = val;
            }
            if let Ok(p) = Metadata::decode(&b, &t, "fuzz") {
                // Whatever parses satisfies the invariants readers rely on.
                for w in p.extents.windows(2) { prop_assert!(w[0].end() <= w[1].logical); }
                for e in &p.extents { prop_assert!(e.end() <= t.logical_size); }
            }
        }
    }
}
