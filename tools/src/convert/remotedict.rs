//! `--dict http(s)://registry/repository:tag` without downloading the dictionary's blobs: when
//! the image carries a `hash-index` blob (FORMAT.md §8), the dictionary is built from that blob
//! and each lsm blob's metadata, read with one ranged GET per blob (the manifest's
//! `io.lsm.layer.meta-len` sizes it) — the same dictionary that decoding the blobs whole gives
//! (`Dictionary::add_hashed` is what `add_layer` runs after hashing). Images converted before
//! the index existed have none: the caller then downloads them whole, and says so.
//!
//! What is checked: the index against its digest in the manifest (a tampered index is refused),
//! each blob's metadata against the metadata digest the index (and the manifest's annotation,
//! when present) names, and the index's block lists against that metadata's chunk table. What
//! cannot be checked without the blobs: that a listed block hash is the hash of that block —
//! the index's publisher, who also published the blobs, is trusted for it (FORMAT.md §8).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockfmt::format::{oci_digest, parse_oci_digest, BlobRef, ChunkEntry};
use blockfmt::Layer;

use super::dict::DictBlob;
use super::hashindex::{HashIndex, IndexedBlob};
use super::manifest::{lsm_role, Role};
use super::{bad, push, sha256_file};
use crate::cli::{CliError, CliResult};

/// A dictionary image read through its hash index.
pub struct IndexedImage {
    /// Its lsm blobs (layers and dictionary blobs, manifest order); their `path` does not exist
    /// (nothing was downloaded), `from` names the repository.
    pub blobs: Vec<DictBlob>,
    /// Per blob (same order): identity, chunk table, block hashes.
    pub lists: Vec<(BlobRef, Vec<ChunkEntry>, IndexedBlob)>,
    /// Per blob (same order): its bytes by ranged GETs, for the rare read of a borrowed chunk
    /// during the conversion (layers below a new one that were reused, exported back to a raw
    /// filesystem).
    pub sources: Vec<Arc<dyn blockfmt::ReadAt>>,
}

/// A blob read by ranged GETs, for [`Layer::open_with_hint`] (which reads only its tail).
struct RangedBlob {
    session: Arc<push::Session>,
    digest: String,
    size: u64,
}

impl blockfmt::ReadAt for RangedBlob {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.session
            .get_range(&self.digest, offset, buf)
            .map_err(|e| std::io::Error::other(e.0))
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
}

/// Reads registry image `r` through its hash index; `None` when it has none. `work` holds the
/// manifest and the index while they are read.
pub fn load(
    r: &str,
    work: &Path,
    session: push::Session,
    from: (String, String),
) -> CliResult<Option<IndexedImage>> {
    std::fs::create_dir_all(work).map_err(|e| bad(format!("{}: {e}", work.display())))?;
    let name = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(r.as_bytes()));
    let tmp = work.join(format!("manifest-{}", name.get(..12).unwrap_or_default()));
    let (_, bytes) = session.fetch_manifest(&tmp)?;
    let _ = std::fs::remove_file(&tmp);
    let manifest = crate::oci::parse_manifest(&bytes, r)?;
    let layers = manifest.layers;
    let Some(idx) = layers.iter().find(|l| lsm_role(l) == Some(Role::HashIndex)) else {
        return Ok(None);
    };
    let idx_digest = idx.digest.clone();
    let idx_path = work.join(format!("hash-index-{}", name.get(..12).unwrap_or_default()));
    parse_oci_digest(&idx_digest).map_err(|e| bad(format!("hash-index blob: {e}")))?;
    session.get(&format!("blobs/{idx_digest}"), "*/*", &idx_path)?;
    if sha256_file(&idx_path)? != idx_digest {
        let _ = std::fs::remove_file(&idx_path);
        return Err(bad(format!(
            "{r}: hash-index blob {idx_digest}: content does not match its digest"
        )));
    }
    let bytes = std::fs::read(&idx_path)?;
    let _ = std::fs::remove_file(&idx_path);
    let index =
        HashIndex::decode(&bytes).map_err(|e| bad(format!("{r}: {idx_digest}: {}", e.0)))?;
    let session = Arc::new(session);
    let mut out = IndexedImage {
        blobs: Vec::new(),
        lists: Vec::new(),
        sources: Vec::new(),
    };
    for l in &layers {
        if !matches!(lsm_role(l), Some(Role::Layer | Role::Dictionary)) {
            continue;
        }
        let digest = l.digest.clone();
        let size = l.size;
        let sha256 = parse_oci_digest(&digest).map_err(CliError)?;
        let entry = index.find(&sha256).ok_or_else(|| {
            bad(format!(
                "{r}: hash index {idx_digest} does not list blob {digest}"
            ))
        })?;
        let annotated = l.annotation(blockfmt::META_DIGEST_ANNOTATION);
        if entry.size != size || annotated.is_some_and(|a| a != oci_digest(&entry.meta_sha256)) {
            return Err(bad(format!(
                "{r}: hash index {idx_digest} does not describe blob {digest} as the manifest does"
            )));
        }
        let meta_len = super::meta_len_of(l);
        let src = Arc::new(RangedBlob {
            session: session.clone(),
            digest: digest.clone(),
            size,
        });
        let layer = Layer::open_with_hint(
            digest.clone(),
            src.clone(),
            Some(entry.meta_sha256),
            meta_len,
        )?;
        out.sources.push(src);
        out.blobs.push(DictBlob {
            path: absent_path(work, &digest),
            size,
            meta_digest: Some(oci_digest(&entry.meta_sha256)),
            digest,
            from: Some(from.clone()),
        });
        out.lists.push((
            BlobRef { sha256, size },
            layer.metadata().chunks.clone(),
            entry.clone(),
        ));
    }
    if out.blobs.is_empty() {
        return Err(bad(format!(
            "{r}: the image has no lsm layers (convert it first)"
        )));
    }
    Ok(Some(out))
}

/// Where a blob that was not downloaded would be: never created, so that code looking for the
/// blob's bytes finds none (and fetches it, or names it as missing).
fn absent_path(work: &Path, digest: &str) -> PathBuf {
    work.join("not-downloaded")
        .join(digest.strip_prefix("sha256:").unwrap_or(digest))
}

/// The image-config source (FORMAT.md §4) of a dictionary blob read through a hash index: the
/// registry it came from (`None` for a blob that is in the layout).
pub fn source_of(
    b: &DictBlob,
    insecure: bool,
    ca_file: Option<&Path>,
) -> Option<lsmd::config::SourceConfig> {
    if b.path.exists() {
        return None;
    }
    let (url, repository) = b.from.as_ref()?;
    Some(lsmd::config::SourceConfig::Registry(
        lsmd::config::RegistryConfig {
            url: url.clone(),
            repository: repository.clone(),
            mirrors: Vec::new(),
            token_hosts: Vec::new(),
            ca_file: ca_file.and_then(|c| std::fs::canonicalize(c).ok()),
            insecure,
            username: None,
            password: None,
            size: None,
            p2p: None,
        },
    ))
}

/// Downloads dictionary blob `b` (read through a hash index, so not in the layout) into layout
/// `dst` whole, checking its digest: needed only to upload it to another registry.
pub fn download(
    b: &DictBlob,
    dst: &Path,
    creds: Option<&lsmd::source::auth::Credentials>,
    client: &push::Client,
    insecure: bool,
    say: &dyn Fn(String),
) -> CliResult {
    let path = super::blob_path(dst, &b.digest)?;
    if path.exists() {
        return Ok(());
    }
    let Some((base, repository)) = &b.from else {
        return Err(bad(format!(
            "dictionary blob {}: not in the layout",
            b.digest
        )));
    };
    if base.starts_with("http://") && !insecure {
        return Err(bad(format!("{base}: plain HTTP needs --insecure")));
    }
    say(format!(
        "dictionary blob {}: downloading it from {base}/{repository} to push it elsewhere",
        b.digest
    ));
    let target = push::Target {
        base: base.clone(),
        repository: repository.clone(),
        tag: "latest".into(),
    };
    let session = push::Session::new(target, creds.cloned(), client)?;
    let tmp = path.with_extension("partial");
    session.get(&format!("blobs/{}", b.digest), "*/*", &tmp)?;
    if sha256_file(&tmp)? != b.digest {
        let _ = std::fs::remove_file(&tmp);
        return Err(bad(format!(
            "dictionary blob {}: content does not match its digest",
            b.digest
        )));
    }
    std::fs::rename(&tmp, &path)?;
    Ok(())
}
