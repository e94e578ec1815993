//! A chunk dictionary: the 4 KiB blocks of existing layers, by content, so that a new layer
//! borrows a block some other blob already stores instead of storing it again (cross-image
//! dedup, FORMAT.md §1.7). The new layer names the borrowed blob in its blob table and points
//! an extent into that blob's chunk; nothing else about reading changes.
//!
//! Matching is by block, not by whole chunk: ext4 places a file's blocks at 4 KiB boundaries,
//! but one file of different size shifts every later file of its block group, so two rebuilt
//! images share most blocks and few whole chunk windows (measured in FORMAT.md §1.7). A block is
//! identified by the sha256 of its 4 KiB, the same identity in-layer dedup uses.

use std::collections::HashMap;

use crate::error::Result;
use crate::format::{is_zero, ZERO_GRANULE};
use crate::format::{sha256, BlobRef, ChunkEntry};
use crate::reader::Layer;

/// Where a dictionary block lives: a chunk of a dictionary blob and the block's offset in the
/// chunk's decoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRef {
    /// Index into [`Dictionary::chunks`].
    pub chunk: u32,
    /// Offset of the block in the chunk's decoded bytes.
    pub offset: u32,
}

/// Blocks of dictionary layers by content. Invariant: every entry of `chunks` has its `blob`
/// field set to an index into `blobs` (not a blob number), and every block named in `blocks`
/// lies inside its chunk's decoded bytes and hashes to its key.
#[derive(Debug, Default)]
pub struct Dictionary {
    blobs: Vec<BlobRef>,
    chunks: Vec<ChunkEntry>,
    blocks: HashMap<[u8; 32], BlockRef>,
    decoded_bytes: u64,
}

impl Dictionary {
    /// An empty dictionary (matches nothing).
    pub fn new() -> Dictionary {
        Dictionary::default()
    }

    /// Adds the chunks a layer stores itself (blob 0; chunks it borrows are left out: add the
    /// blob that holds them instead). `blob` is the layer's identity (digest and size), what a
    /// borrowing layer's blob table will name. Decodes and checks every chunk, so this reads the
    /// whole blob; `progress` gets the chunks done so far.
    pub fn add_layer(
        &mut self,
        layer: &Layer,
        blob: BlobRef,
        mut progress: impl FnMut(u64),
    ) -> Result<()> {
        if self.blobs.contains(&blob) {
            return Ok(());
        }
        let blocks = block_hashes(layer, &mut progress)?;
        self.add_hashed(blob, &layer.metadata().chunks, &blocks)
    }

    /// Adds a blob known by its chunk table (`chunks`, from its metadata) and, per chunk, the
    /// offsets and sha256 of its non-zero 4 KiB blocks (`blocks[i]` for chunk `i`, as
    /// [`block_hashes`] gives them, e.g. from a published hash index) without reading any chunk:
    /// the same dictionary [`Self::add_layer`] builds from the blob itself. Refused (nothing
    /// added) when the lists do not fit the chunk table: a count that differs, blocks of a
    /// borrowed chunk, an offset not 4 KiB-aligned, not increasing, or past the chunk.
    pub fn add_hashed(
        &mut self,
        blob: BlobRef,
        chunks: &[ChunkEntry],
        blocks: &[BlockList],
    ) -> Result<()> {
        if self.blobs.contains(&blob) {
            return Ok(());
        }
        let name = crate::format::oci_digest(&blob.sha256);
        let bad = |what: String| crate::error::Error::corrupt(&name, "block hash list", 0, what);
        if blocks.len() != chunks.len() {
            return Err(bad(format!(
                "{} chunk lists for {} chunks",
                blocks.len(),
                chunks.len()
            )));
        }
        let g = ZERO_GRANULE as u32;
        for (i, (e, b)) in chunks.iter().zip(blocks).enumerate() {
            if e.blob != 0 && !b.is_empty() {
                return Err(bad(format!("chunk {i} is borrowed but lists blocks")));
            }
            let mut next = 0u64;
            for &(off, _) in b {
                if off % g != 0 || u64::from(off) < next || off.saturating_add(g) > e.raw_len {
                    return Err(bad(format!("chunk {i}: block offset {off} out of place")));
                }
                next = u64::from(off) + u64::from(g);
            }
        }
        let blob_index = self.blobs.len() as u32;
        self.blobs.push(blob);
        for (e, b) in chunks.iter().zip(blocks) {
            if e.blob != 0 {
                continue;
            }
            self.decoded_bytes += u64::from(e.raw_len);
            let chunk = self.chunks.len() as u32;
            let mut any = false;
            for &(offset, hash) in b {
                // The first copy wins: lookups stay deterministic for a given dictionary order.
                self.blocks.entry(hash).or_insert_with(|| {
                    any = true;
                    BlockRef { chunk, offset }
                });
            }
            if any {
                self.chunks.push(ChunkEntry {
                    blob: blob_index,
                    ..*e
                });
            }
        }
        Ok(())
    }

    /// The block with this content, if a dictionary layer stores one.
    pub fn lookup(&self, block_sha256: &[u8; 32]) -> Option<BlockRef> {
        self.blocks.get(block_sha256).copied()
    }

    /// The dictionary chunk a [`BlockRef`] names (its `blob` is an index into [`Self::blobs`]).
    pub fn chunk(&self, r: BlockRef) -> Option<&ChunkEntry> {
        self.chunks.get(r.chunk as usize)
    }

    /// The dictionary's blobs, in the order they were added.
    pub fn blobs(&self) -> &[BlobRef] {
        &self.blobs
    }

    /// Distinct non-zero 4 KiB blocks known.
    pub fn block_count(&self) -> usize {
        self.blocks.len()
    }

    /// Decoded bytes of the chunks read.
    pub fn decoded_bytes(&self) -> u64 {
        self.decoded_bytes
    }

    /// True when nothing was added.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

/// The non-zero 4 KiB blocks of one chunk: (offset in its decoded bytes, sha256), in order.
pub type BlockList = Vec<(u32, [u8; 32])>;

/// Per chunk of `layer` (in chunk-table order), the offset and sha256 of each non-zero 4 KiB
/// block of its decoded bytes; empty for a borrowed chunk. What a dictionary indexes of a blob
/// (FORMAT.md §1.7) and what a published hash index lists. Decodes and checks every own chunk;
/// `progress` gets the chunks done so far.
pub fn block_hashes(layer: &Layer, mut progress: impl FnMut(u64)) -> Result<Vec<BlockList>> {
    let chunks = &layer.metadata().chunks;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, e) in chunks.iter().enumerate() {
        progress(i as u64);
        out.push(if e.blob != 0 {
            Vec::new()
        } else {
            chunk_block_hashes(&layer.read_chunk(i as u32)?)
        });
    }
    Ok(out)
}

/// The offset and sha256 of each non-zero 4 KiB block of one decoded chunk.
pub fn chunk_block_hashes(data: &[u8]) -> BlockList {
    let g = ZERO_GRANULE as usize;
    data.chunks_exact(g)
        .enumerate()
        .filter(|(_, b)| !is_zero(b))
        .map(|(k, b)| ((k * g) as u32, sha256(b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::commit::import_raw;
    use crate::format::oci_digest;
    use crate::{LayerStack, WriterOptions};
    use proptest::prelude::*;
    use std::sync::Arc;

    /// A disk made of 4 KiB blocks drawn from a small alphabet (so blocks repeat within and
    /// across disks), zero blocks included.
    fn disk(blocks: &[u8]) -> Vec<u8> {
        let mut d = Vec::with_capacity(blocks.len() * 4096);
        for &b in blocks {
            let mut block = vec![0u8; 4096];
            if b != 0 {
                for (i, x) in block.iter_mut().enumerate() {
                    *x = (i as u8).wrapping_mul(b).wrapping_add(b);
                }
            }
            d.extend_from_slice(&block);
        }
        d
    }

    fn blob(d: &[u8], dict: Option<Arc<Dictionary>>, opts: WriterOptions) -> Vec<u8> {
        import_raw(d, d.len() as u64, None, dict, Vec::new(), opts, |_| {})
            .expect("import")
            .1
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Whatever the two disks and chunk size: a layer written with the other as its
        /// dictionary reads back exactly (with the dictionary blob attached), borrows only what
        /// the dictionary has, and names the dictionary blob when it is missing.
        #[test]
        fn borrowing_layers_read_back_exactly(
            a in proptest::collection::vec(0u8..12, 1..80),
            b in proptest::collection::vec(0u8..16, 1..80),
            chunk_kib in prop_oneof![Just(4u32), Just(16), Just(64)],
        ) {
            let opts = WriterOptions { chunk_size: chunk_kib * 1024, ..Default::default() };
            let (da, db) = (disk(&a), disk(&b));
            let ba = blob(&da, None, opts);
            let la = Layer::open("a", Arc::new(ba.clone()), None).expect("open a");
            let id = BlobRef { sha256: sha256(&ba), size: ba.len() as u64 };
            let mut dict = Dictionary::new();
            dict.add_layer(&la, id, |_| {}).expect("dict");
            let bb = blob(&db, Some(Arc::new(dict)), opts);
            let mut lb = Layer::open("b", Arc::new(bb.clone()), None).expect("open b");
            let borrows = lb.metadata().chunks.iter().any(|c| c.blob != 0);
            prop_assert!(!borrows || lb.metadata().blobs == vec![id]);
            lb.attach_blob(1, Arc::new(ba)).ok();
            lb.verify_all(None).expect("verify");
            let s = LayerStack::new(vec![lb], db.len() as u64, 1 << 20).expect("stack");
            let s = crate::Image::new(s, None).expect("image");
            let mut got = vec![0u8; db.len()];
            s.read(0, &mut got).expect("read");
            prop_assert_eq!(got, db.clone());
            if borrows {
                let lb = Layer::open("b", Arc::new(bb), None).expect("open b");
                let s = LayerStack::new(vec![lb], db.len() as u64, 1 << 20).expect("stack");
                let s = crate::Image::new(s, None).expect("image");
                let mut got = vec![0u8; db.len()];
                let e = s.read(0, &mut got).expect_err("missing blob").to_string();
                prop_assert!(e.contains(&oci_digest(&id.sha256)), "{}", e);
            }
        }

        /// Blocks handed over with their hashes (`write_block_hashed`, what a raw import
        /// does) give the same blob as the same bytes through `write_data`, with or without a
        /// dictionary and dedup, zero blocks and repeats included.
        #[test]
        fn blocks_written_with_their_hashes_give_the_same_blob(
            a in proptest::collection::vec(0u8..12, 1..40),
            b in proptest::collection::vec(0u8..16, 1..60),
            chunk_kib in prop_oneof![Just(4u32), Just(16), Just(64)],
            dedup in any::<bool>(),
            with_dict in any::<bool>(),
        ) {
            let opts = WriterOptions { chunk_size: chunk_kib * 1024, dedup, ..Default::default() };
            let ba = blob(&disk(&a), None, opts);
            let la = Layer::open("a", Arc::new(ba.clone()), None).expect("open a");
            let mut dict = Dictionary::new();
            dict.add_layer(&la, BlobRef { sha256: sha256(&ba), size: ba.len() as u64 }, |_| {})
                .expect("dict");
            let dict = Arc::new(dict);
            let db = disk(&b);
            let write = |hashed: bool| {
                let mut w = crate::LayerWriter::new(Vec::new(), db.len() as u64, opts).expect("w");
                w.collect_block_hashes();
                if with_dict {
                    w.set_dictionary(dict.clone());
                }
                for (k, block) in db.chunks(4096).enumerate() {
                    let at = k as u64 * 4096;
                    if hashed {
                        w.write_block_hashed(at, block, sha256(block)).expect("write");
                    } else {
                        w.write_data(at, block).expect("write");
                    }
                }
                w.finish().expect("finish")
            };
            prop_assert!(write(true) == write(false));
        }

        /// The block hashes a writer collects while writing equal those of its own chunks
        /// decoded, whatever the pieces (aligned blocks, unaligned pieces, zeros, repeats,
        /// blocks borrowed from a dictionary), the chunk size and the dedup setting.
        #[test]
        fn collected_block_hashes_equal_the_decoded_chunks(
            a in proptest::collection::vec(0u8..12, 1..40),
            b in proptest::collection::vec(0u8..16, 1..60),
            cuts in proptest::collection::vec(1usize..20_000, 1..12),
            chunk_kib in prop_oneof![Just(4u32), Just(16), Just(64)],
            dedup in any::<bool>(),
            with_dict in any::<bool>(),
        ) {
            let opts = WriterOptions { chunk_size: chunk_kib * 1024, dedup, ..Default::default() };
            let da = disk(&a);
            let ba = blob(&da, None, opts);
            let la = Layer::open("a", Arc::new(ba.clone()), None).expect("open a");
            let mut dict = Dictionary::new();
            dict.add_layer(&la, BlobRef { sha256: sha256(&ba), size: ba.len() as u64 }, |_| {})
                .expect("dict");
            let mut db = disk(&b);
            db[3..7].copy_from_slice(b"odd!"); // a block no dictionary or repeat matches
            let mut w = crate::LayerWriter::new(Vec::new(), db.len() as u64, opts).expect("w");
            w.collect_block_hashes();
            if with_dict {
                w.set_dictionary(Arc::new(dict));
            }
            let (mut at, mut k) = (0usize, 0usize);
            while at < db.len() {
                let n = cuts[k % cuts.len()].min(db.len() - at);
                w.write_data(at as u64, &db[at..at + n]).expect("write");
                at += n;
                k += 1;
            }
            let (written, bytes) = w.finish().expect("finish");
            let l = Layer::open("b", Arc::new(bytes), None).expect("open b");
            let own: Vec<BlockList> = l
                .metadata()
                .chunks
                .iter()
                .enumerate()
                .filter(|(_, e)| e.blob == 0)
                .map(|(i, _)| chunk_block_hashes(&l.read_chunk(i as u32).expect("chunk")))
                .collect();
            prop_assert_eq!(written.block_hashes, own);
        }
    }
}
