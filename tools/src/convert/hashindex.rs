//! The `hash-index` blob a converted image is published with (FORMAT.md §8): per lsm blob of
//! the image, the sha256 of every non-zero 4 KiB block of every chunk it stores itself — what a
//! dictionary (§1.7) indexes of the blob. A later `convert --dict` against the image in a
//! registry reads this blob and each blob's metadata (ranged GETs) instead of downloading and
//! decoding the blobs whole, and builds the same dictionary.
//!
//! The blob is named by digest in the manifest, so what `--dict` reads is what the dictionary
//! image's publisher wrote; its crc and counts are checked before anything is allocated, and
//! each blob's entry is checked against that blob's metadata (same metadata digest, one block
//! list per chunk, offsets inside the chunk).

use blockfmt::dictionary::BlockList;

use crate::cli::{CliError, CliResult};

const MAGIC: &[u8; 8] = b"LSMHASHI";
const VERSION: u16 = 1;
const HEADER_LEN: usize = 16;
/// Per blob: sha256, size, metadata sha256, chunk count, block count.
const BLOB_LEN: usize = 32 + 8 + 32 + 4 + 4;
/// Per block: offset in the chunk's decoded bytes, sha256.
const BLOCK_LEN: usize = 4 + 32;

/// One lsm blob's block hashes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedBlob {
    pub sha256: [u8; 32],
    pub size: u64,
    /// The blob's metadata digest (§1.2): ties the lists to the chunk table they describe.
    pub meta_sha256: [u8; 32],
    /// Per chunk, in chunk-table order: (offset in the decoded chunk, sha256) of each non-zero
    /// 4 KiB block; empty for a borrowed chunk.
    pub chunks: Vec<BlockList>,
}

/// A whole hash index: its blobs in manifest order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HashIndex {
    pub blobs: Vec<IndexedBlob>,
}

fn bad(what: impl std::fmt::Display) -> CliError {
    CliError(format!("hash index: {what}"))
}

impl HashIndex {
    /// The blob's bytes (deterministic: the same blobs give the same bytes).
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::new();
        o.extend_from_slice(MAGIC);
        o.extend_from_slice(&VERSION.to_le_bytes());
        o.extend_from_slice(&0u16.to_le_bytes());
        o.extend_from_slice(&(self.blobs.len() as u32).to_le_bytes());
        for b in &self.blobs {
            o.extend_from_slice(&b.sha256);
            o.extend_from_slice(&b.size.to_le_bytes());
            o.extend_from_slice(&b.meta_sha256);
            o.extend_from_slice(&(b.chunks.len() as u32).to_le_bytes());
            let n: usize = b.chunks.iter().map(Vec::len).sum();
            o.extend_from_slice(&(n as u32).to_le_bytes());
            for c in &b.chunks {
                o.extend_from_slice(&(c.len() as u32).to_le_bytes());
            }
            for (off, h) in b.chunks.iter().flatten() {
                o.extend_from_slice(&off.to_le_bytes());
                o.extend_from_slice(h);
            }
        }
        let crc = crc32c::crc32c(&o);
        o.extend_from_slice(&crc.to_le_bytes());
        o
    }

    /// Parses a hash index; every count is checked against the bytes left before allocating.
    pub fn decode(b: &[u8]) -> CliResult<HashIndex> {
        if b.len() < HEADER_LEN + 4 {
            return Err(bad(format!("{} bytes is too short", b.len())));
        }
        let (body, crc) = b.split_at(b.len() - 4);
        if crc32c::crc32c(body).to_le_bytes() != crc {
            return Err(bad("crc32c does not match"));
        }
        if &body[..8] != MAGIC {
            return Err(bad("bad magic"));
        }
        let mut r = Cursor { b: body, at: 8 };
        let version = r.u16()?;
        if version != VERSION {
            return Err(bad(format!("version {version} is not supported (1)")));
        }
        if r.u16()? != 0 {
            return Err(bad("reserved field is not zero"));
        }
        let n_blobs = r.u32()? as usize;
        if n_blobs > r.left() / BLOB_LEN {
            return Err(bad(format!("{n_blobs} blobs do not fit")));
        }
        let mut blobs = Vec::with_capacity(n_blobs);
        for _ in 0..n_blobs {
            let sha256 = r.hash()?;
            let size = r.u64()?;
            let meta_sha256 = r.hash()?;
            let n_chunks = r.u32()? as usize;
            let n_blocks = r.u32()? as usize;
            if n_chunks > r.left() / 4 || n_blocks > (r.left() - n_chunks * 4) / BLOCK_LEN {
                return Err(bad(format!(
                    "{n_chunks} chunks and {n_blocks} blocks do not fit"
                )));
            }
            let mut counts = Vec::with_capacity(n_chunks);
            for _ in 0..n_chunks {
                counts.push(r.u32()? as usize);
            }
            if counts.iter().try_fold(0usize, |a, &c| a.checked_add(c)) != Some(n_blocks) {
                return Err(bad("per-chunk block counts do not add up"));
            }
            let mut chunks = Vec::with_capacity(n_chunks);
            for c in counts {
                let mut blocks = Vec::with_capacity(c);
                for _ in 0..c {
                    blocks.push((r.u32()?, r.hash()?));
                }
                chunks.push(blocks);
            }
            blobs.push(IndexedBlob {
                sha256,
                size,
                meta_sha256,
                chunks,
            });
        }
        if r.left() != 0 {
            return Err(bad(format!("{} bytes after the last blob", r.left())));
        }
        Ok(HashIndex { blobs })
    }

    /// The entry of the blob with this sha256.
    pub fn find(&self, sha256: &[u8; 32]) -> Option<&IndexedBlob> {
        self.blobs.iter().find(|b| &b.sha256 == sha256)
    }
}

/// The hash index of a converted image: its layers (`out`, manifest order), then the
/// dictionary blobs it lists (`borrowed`). `known` holds the entries computed or read so far,
/// by digest; a layer missing from it (the top one, a reused one) is read from `dst` now.
pub fn for_image(
    dst: &std::path::Path,
    out: &[crate::oci::Descriptor],
    borrowed: &[super::dict::DictBlob],
    known: &mut std::collections::HashMap<String, IndexedBlob>,
) -> CliResult<Vec<u8>> {
    let mut ix = HashIndex::default();
    for l in out {
        let d = l.digest.as_str();
        let entry = match known.remove(d) {
            Some(e) => e,
            None => {
                let (layer, id) = super::dict::open_trusted(&super::dict::DictBlob {
                    digest: d.to_string(),
                    size: l.size,
                    meta_digest: None,
                    path: super::blob_path(dst, d)?,
                    from: None,
                })?;
                of_layer(&layer, id)?
            }
        };
        ix.blobs.push(entry);
    }
    for b in borrowed {
        let entry = known
            .remove(&b.digest)
            .ok_or_else(|| bad(format!("internal error: no block hashes of {}", b.digest)))?;
        ix.blobs.push(entry);
    }
    Ok(ix.encode())
}

/// The entry of a blob, computed from its bytes: every own chunk decoded, checked and its
/// non-zero blocks hashed, on every core (chunks are independent; the result is in chunk order,
/// so it does not depend on the thread count).
pub fn of_layer(
    layer: &blockfmt::Layer,
    blob: blockfmt::format::BlobRef,
) -> CliResult<IndexedBlob> {
    let chunks = &layer.metadata().chunks;
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 8);
    let per_thread: Vec<CliResult<Vec<(usize, BlockList)>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                s.spawn(move || {
                    let mut mine = Vec::new();
                    for (i, e) in chunks.iter().enumerate().skip(t).step_by(threads) {
                        if e.blob == 0 {
                            let data = layer.read_chunk(i as u32)?;
                            mine.push((i, blockfmt::dictionary::chunk_block_hashes(&data)));
                        }
                    }
                    Ok(mine)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(bad("a hashing thread panicked")))
            })
            .collect()
    });
    let mut lists = vec![Vec::new(); chunks.len()];
    for part in per_thread {
        for (i, l) in part? {
            lists[i] = l;
        }
    }
    Ok(IndexedBlob {
        sha256: blob.sha256,
        size: blob.size,
        meta_sha256: layer.trailer().meta_sha256,
        chunks: lists,
    })
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn left(&self) -> usize {
        self.b.len() - self.at
    }
    fn take<const N: usize>(&mut self) -> CliResult<[u8; N]> {
        let s = self
            .b
            .get(self.at..self.at + N)
            .ok_or_else(|| bad("truncated"))?;
        self.at += N;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u16(&mut self) -> CliResult<u16> {
        Ok(u16::from_le_bytes(self.take()?))
    }
    fn u32(&mut self) -> CliResult<u32> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> CliResult<u64> {
        Ok(u64::from_le_bytes(self.take()?))
    }
    fn hash(&mut self) -> CliResult<[u8; 32]> {
        self.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn index() -> impl Strategy<Value = HashIndex> {
        let block = (0u32..64, any::<[u8; 32]>()).prop_map(|(k, h)| (k * 4096, h));
        let blob = (
            any::<[u8; 32]>(),
            any::<u64>(),
            any::<[u8; 32]>(),
            prop::collection::vec(prop::collection::vec(block, 0..4), 0..5),
        )
            .prop_map(|(sha256, size, meta_sha256, chunks)| IndexedBlob {
                sha256,
                size,
                meta_sha256,
                chunks,
            });
        prop::collection::vec(blob, 0..4).prop_map(|blobs| HashIndex { blobs })
    }

    proptest! {
        #[test]
        fn roundtrips(ix in index()) {
            prop_assert_eq!(HashIndex::decode(&ix.encode()).expect("decode"), ix);
        }

        /// Any byte flipped or any truncation is refused (the crc covers everything), never a
        /// panic or a different index.
        #[test]
        fn damage_is_refused(ix in index(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut b = ix.encode();
            let i = at.index(b.len());
            b[i] ^= x;
            prop_assert!(HashIndex::decode(&b).is_err());
            prop_assert!(HashIndex::decode(&ix.encode()[..i]).is_err());
        }

        /// Arbitrary bytes with a valid crc (counts that lie included) never panic or allocate
        /// past what the bytes can hold.
        #[test]
        fn garbage_with_a_good_crc(mut body in prop::collection::vec(any::<u8>(), 0..400),
                                   magic in any::<bool>()) {
            if magic && body.len() >= 12 {
                body[..8].copy_from_slice(MAGIC);
                body[8..10].copy_from_slice(&VERSION.to_le_bytes());
                body[10..12].copy_from_slice(&[0, 0]);
            }
            let crc = crc32c::crc32c(&body);
            body.extend_from_slice(&crc.to_le_bytes());
            if let Ok(ix) = HashIndex::decode(&body) {
                prop_assert_eq!(ix.encode(), body);
            }
        }
    }
}
