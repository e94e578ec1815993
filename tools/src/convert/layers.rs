//! The per-layer loop of a conversion: each source layer, bottom first, is applied to the host
//! tree, its filesystem made (in place or whole, `layer_filesystem`) and imported as a layer
//! blob storing only what differs from the layers below it and from the dictionary — or, when
//! the reuse database knows its source chain, taken from there.
//!
//! Invariants the loop keeps between layers: `hashes` is the block hashes of `raw` when `raw`
//! holds the filesystem of every layer converted so far (`None` after a reused layer, whose
//! filesystem was never built here: it is exported from the layers when next needed), and
//! `running` is the dictionary plus every converted layer below the current one (each added
//! once, only when a layer is actually converted).

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockfmt::{Dictionary, Image, Layer, LayerStack, WriterOptions};

use super::reuse::{chain_key, ReuseDb};
use super::{
    bad, blob_path, dict, ext4apply, layer_filesystem, link_or_copy, rawimport, timing, unpack,
    workdir, FsKind, LayerFs, Summary,
};
use crate::build::write_blob_atomically;
use crate::cli::CliResult;
use crate::oci::Descriptor;

/// The state of one conversion's layer loop (see the module docs).
pub(super) struct LayerRun<'a> {
    pub fs: FsKind,
    pub quiet: bool,
    pub dst: &'a Path,
    /// The host tree the layers are applied to.
    pub root: &'a Path,
    /// The raw filesystem file.
    pub raw: PathBuf,
    pub size: u64,
    pub uuid: String,
    pub opts: WriterOptions,
    pub db: Option<ReuseDb>,
    pub dict_digests: Vec<String>,
    pub dict_blobs: &'a [dict::DictBlob],
    pub running: Dictionary,
    /// Block hashes of the blobs this image will list, by digest (for its hash index).
    pub hash_lists: std::collections::HashMap<String, super::hashindex::IndexedBlob>,
    /// Dictionary blobs read through a hash index (not downloaded): their bytes by ranged GET.
    pub remote_blobs: std::collections::HashMap<String, Arc<dyn blockfmt::ReadAt>>,
    pub hashes: Option<rawimport::BlockHashes>,
    /// How many of `out` are in `running` already.
    pub in_dict: usize,
    /// The converted layers' descriptors, bottom first.
    pub out: Vec<Descriptor>,
    /// Whether the bottom layer is in the host tree already (streamed into it while the
    /// layers were spooled, `mod.rs`).
    pub bottom_applied: bool,
    /// The host tree's removal, started once the top layer no longer needs it.
    pub tree_removal: Option<workdir::Removal>,
    pub stats: Summary,
    pub say: &'a dyn Fn(String),
}

/// One source layer as the loop sees it.
pub(super) struct SourceLayer<'a> {
    /// 0 = bottom.
    pub index: usize,
    pub count: usize,
    /// The source layer's digest.
    pub digest: &'a str,
    /// Its decompressed tar in the spool (removed once applied).
    pub tar: PathBuf,
    /// The diff IDs of it and every layer below.
    pub chain: &'a [sha2::digest::Output<sha2::Sha256>],
}

impl LayerRun<'_> {
    /// Converts (or reuses) one source layer.
    pub fn layer(&mut self, s: &SourceLayer) -> CliResult {
        let (i, digest) = (s.index, s.digest);
        let mut changes = ext4apply::Changes::new(self.root);
        let tar = s.tar.clone();
        let apply = timing::stage(|| format!("layer {}: tar to host tree", i + 1));
        // (The bottom layer may be in the tree already: applied as it was spooled.)
        if !(i == 0 && self.bottom_applied) {
            unpack::apply_layer(self.root, &mut changes, i == 0, || {
                let f = File::open(&tar)?;
                Ok(Box::new(BufReader::with_capacity(1 << 20, f)) as Box<dyn Read>)
            })
            .map_err(|e| bad(format!("layer {digest}: {e}")))?;
        }
        let tar_bytes = std::fs::metadata(&s.tar).map_or(u64::MAX, |m| m.len());
        let _ = std::fs::remove_file(&s.tar);
        drop(apply);
        if self.fs == FsKind::Erofs && i + 1 < s.count {
            return Ok(()); // flattened: one filesystem of the final tree
        }
        let key = chain_key(s.chain, self.size, &self.opts, &self.dict_digests, self.fs);
        if self.reuse(s, &key)? {
            return Ok(());
        }
        let below = timing::stage(|| format!("layer {}: layers below", i + 1));
        let bottom = self.out.is_empty();
        let mut h = self.hashes_of()?;
        drop(below);
        let scan = layer_filesystem(&LayerFs {
            fs: self.fs,
            root: self.root,
            raw: &self.raw,
            size: self.size,
            uuid: &self.uuid,
            digest,
            index: i,
            changes: &changes,
            tar_bytes,
            say: self.say,
        })?;
        if i + 1 == s.count {
            self.tree_removal = Some(workdir::Removal::start(self.root));
        }
        let import = timing::stage(|| format!("layer {}: import", i + 1));
        let desc = self.import(s, &mut h, bottom, &scan)?;
        drop(import);
        self.hashes = Some(h);
        if let Some(d) = &self.db {
            d.record(&key, &desc, &blob_path(self.dst, &desc.digest)?);
        }
        self.out.push(desc);
        Ok(())
    }

    /// Takes the layer from the reuse database when it has its chain; whether it did.
    fn reuse(&mut self, s: &SourceLayer, key: &str) -> CliResult<bool> {
        let Some((mut ours, src_blob)) = self.db.as_ref().and_then(|d| d.lookup(key)) else {
            return Ok(false);
        };
        link_or_copy(&src_blob, &blob_path(self.dst, &ours.digest)?)?;
        (self.say)(format!(
            "layer {}/{}: {} → {} (reused)",
            s.index + 1,
            s.count,
            s.digest,
            ours.digest
        ));
        self.stats.reused += 1;
        self.hashes = None;
        ours.annotations
            .insert("io.lsm.source-layer".into(), s.digest.to_string());
        self.out.push(ours);
        Ok(true)
    }

    /// The image of the layers converted so far (the new one stores only what differs from
    /// them); `None` below the bottom layer.
    fn below(&self) -> CliResult<Option<Image>> {
        let below = self
            .out
            .iter()
            .map(|v| {
                let bp = blob_path(self.dst, &v.digest)?;
                let f = File::open(&bp).map_err(|e| bad(format!("{}: {e}", bp.display())))?;
                let mut l = Layer::open(bp.display().to_string(), Arc::new(f), None)?;
                dict::attach_borrowed(&mut l, |d| self.path_of(d))?;
                // Chunks borrowed from a dictionary blob that was not downloaded: read by
                // ranged GET (only an export after a reused layer reads them).
                let wanted = l.metadata().blobs.clone();
                for (k, b) in wanted.iter().enumerate() {
                    let d = blockfmt::format::oci_digest(&b.sha256);
                    if let (None, Some(src)) = (self.path_of(&d), self.remote_blobs.get(&d)) {
                        l.attach_blob(k as u32 + 1, src.clone())?;
                    }
                }
                Ok(l)
            })
            .collect::<CliResult<Vec<Layer>>>()?;
        Ok((!below.is_empty())
            .then(|| LayerStack::new(below, self.size, 64 << 20).and_then(|s| Image::new(s, None)))
            .transpose()?)
    }

    /// The block hashes of `raw` as the layers below left it: kept from the last layer, or,
    /// after a reused layer, their filesystem exported back into `raw` and hashed (the stack
    /// of layers below is opened only then).
    fn hashes_of(&mut self) -> CliResult<rawimport::BlockHashes> {
        if let Some(h) = self.hashes.take() {
            return Ok(h);
        }
        Ok(match self.below()? {
            None => rawimport::BlockHashes::zeros(self.size),
            Some(b) => {
                let _step = workdir::step()?;
                let _ = std::fs::remove_file(&self.raw);
                let f = File::create(&self.raw)?;
                f.set_len(self.size)?;
                rawimport::export(&b, &f, self.size)?
            }
        })
    }

    /// Where blob `digest` is during the conversion: a layer converted already, or a
    /// dictionary blob.
    pub fn path_of(&self, digest: &str) -> Option<PathBuf> {
        if self.out.iter().any(|l| l.digest == digest) {
            return blob_path(self.dst, digest).ok();
        }
        self.dict_blobs
            .iter()
            .find(|b| b.digest == digest)
            .map(|b| b.path.clone())
            // (A blob read through a hash index was not downloaded: it stays missing.)
            .filter(|p| p.exists())
    }

    /// Imports `raw` as the layer's blob (only the blocks that changed, borrowing what the
    /// dictionary and the layers below store); returns its descriptor.
    fn import(
        &mut self,
        s: &SourceLayer,
        h: &mut rawimport::BlockHashes,
        bottom: bool,
        scan: &rawimport::Scan,
    ) -> CliResult<Descriptor> {
        let tmp = self.dst.join("blobs/sha256/.layer.partial");
        let rawf = File::open(&self.raw)?;
        let mut prog = crate::progress::Progress::new(
            format!("convert: layer {}/{} import", s.index + 1, s.count),
            self.size,
            self.quiet,
        );
        // The layers below join the dictionary (each once).
        let grow = timing::stage(|| format!("layer {}: dictionary growth", s.index + 1));
        for l in &self.out[self.in_dict..] {
            // (Written by this conversion, its digest computed while writing.)
            let (layer, id) = dict::open_trusted(&dict::DictBlob {
                digest: l.digest.clone(),
                size: l.size,
                meta_digest: None,
                path: blob_path(self.dst, &l.digest)?,
                from: None,
            })?;
            // The writer's own block hashes (kept at import); decoded and hashed again only
            // for a layer this run did not write.
            if !self.hash_lists.contains_key(&l.digest) {
                let entry = super::hashindex::of_layer(&layer, id)?;
                self.hash_lists.insert(l.digest.clone(), entry);
            }
            let entry = self
                .hash_lists
                .get(&l.digest)
                .ok_or_else(|| bad(format!("internal error: no block hashes of {}", l.digest)))?;
            self.running
                .add_hashed(id, &layer.metadata().chunks, &entry.chunks)?;
        }
        self.in_dict = self.out.len();
        drop(grow);
        let shared = Arc::new(std::mem::take(&mut self.running));
        let (size, opts) = (self.size, self.opts);
        let mut w = write_blob_atomically(&tmp, |o| {
            rawimport::import_changed(
                &rawf,
                size,
                h,
                bottom,
                Some(shared.clone()),
                o,
                opts,
                scan,
                |d| prog.update(d),
            )
        })?;
        self.running = Arc::try_unwrap(shared)
            .map_err(|_| bad("internal error: the dictionary is still in use"))?;
        let ours = format!("sha256:{}", hex::encode(w.digest));
        std::fs::rename(&tmp, blob_path(self.dst, &ours)?)?;
        // Its entry of the hash index and of the dictionary of the layers above, from the
        // hashes the writer took while writing (borrowed chunks list no blocks).
        let mut lists = std::mem::take(&mut w.block_hashes);
        lists.resize(w.chunks as usize, Vec::new());
        self.hash_lists.insert(
            ours.clone(),
            super::hashindex::IndexedBlob {
                sha256: w.digest,
                size: w.size,
                meta_sha256: w.meta_digest,
                chunks: lists,
            },
        );
        (self.say)(format!(
            "layer {}/{}: {} → {ours} ({} bytes{})",
            s.index + 1,
            s.count,
            s.digest,
            w.size,
            if w.borrowed_bytes > 0 {
                format!(
                    "; {} of {} data bytes borrowed from the dictionary",
                    w.borrowed_bytes, w.data_bytes
                )
            } else {
                String::new()
            }
        ));
        self.stats.converted += 1;
        self.stats.bytes_out += w.size;
        let mut desc = Descriptor::new(blockfmt::LAYER_MEDIA_TYPE, ours, w.size);
        for (k, v) in [
            (
                blockfmt::META_DIGEST_ANNOTATION,
                format!("sha256:{}", hex::encode(w.meta_digest)),
            ),
            (blockfmt::META_LEN_ANNOTATION, w.meta_len.to_string()),
            ("io.lsm.source-layer", s.digest.to_string()),
            ("io.lsm.format-version", "1".to_string()),
        ] {
            desc.annotations.insert(k.to_string(), v);
        }
        Ok(desc)
    }

    /// The dictionary blobs the converted layers borrow from, in first-use order, linked into
    /// the layout (blobs of this image's own layers are listed as layers already). A borrowed
    /// blob no `--dict` image holds is an error naming it.
    pub fn borrowed_blobs(&self) -> CliResult<Vec<dict::DictBlob>> {
        let mut borrowed: Vec<dict::DictBlob> = Vec::new();
        for l in &self.out {
            let p = blob_path(self.dst, &l.digest)?;
            let f = File::open(&p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            let layer = Layer::open(p.display().to_string(), Arc::new(f), None)?;
            for b in &layer.metadata().blobs {
                let dg = blockfmt::format::oci_digest(&b.sha256);
                if borrowed.iter().any(|x| x.digest == dg)
                    || self.out.iter().any(|o| o.digest == dg)
                {
                    continue;
                }
                let from = self
                    .dict_blobs
                    .iter()
                    .find(|x| x.digest == dg)
                    .ok_or_else(|| {
                        bad(format!(
                            "layer {} borrows from blob {dg}, which no --dict image holds",
                            l.digest
                        ))
                    })?;
                if from.path.exists() {
                    link_or_copy(&from.path, &blob_path(self.dst, &dg)?)?;
                }
                borrowed.push(from.clone());
            }
        }
        Ok(borrowed)
    }
}
