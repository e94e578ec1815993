//! `--dict REF`: already converted images whose blocks a new conversion borrows instead of
//! storing (FORMAT.md §1.7). A REF is a converted OCI image layout (`DIR`, or `DIR:TAG` when
//! it holds several images) or `http(s)://registry/repository:tag` (pulled first). Every lsm
//! blob its manifest lists — its layers and its own dictionary blobs — joins the dictionary,
//! each checked against its digest before use, since the new layers will name it by digest.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::{bad, blob_path, push, read_index, read_manifest, sha256_file};
use crate::cli::{CliError, CliResult};
use crate::oci::Manifest;
use blockfmt::format::{parse_oci_digest, BlobRef};
use blockfmt::{Dictionary, Layer};

/// One lsm blob of a dictionary image: what a converted manifest lists for it and where it is.
#[derive(Debug, Clone)]
pub struct DictBlob {
    pub digest: String,
    pub size: u64,
    pub meta_digest: Option<String>,
    pub path: PathBuf,
    /// `base/repository` it was pulled from, when it came from a registry (for cross-repository
    /// mounts when pushing).
    pub from: Option<(String, String)>,
}

/// The dictionary images, loaded.
pub struct DictImages {
    pub dict: Dictionary,
    pub blobs: Vec<DictBlob>,
    /// Each blob's block hashes, by digest (what the new image's hash index repeats for the
    /// dictionary blobs it lists).
    pub index: std::collections::HashMap<String, super::hashindex::IndexedBlob>,
    /// Blobs read through a hash index (not downloaded), by digest: their bytes by ranged GET.
    pub remote: std::collections::HashMap<String, Arc<dyn blockfmt::ReadAt>>,
}

/// The manifest of the image `tag` (or the only image) in layout `dir`.
pub fn layout_manifest(dir: &Path, tag: Option<&str>) -> CliResult<Manifest> {
    let index = read_index(&dir.join("index.json"))?;
    let what = dir.display().to_string();
    let desc = index.by_tag(tag, &what, "name one as DIR:TAG")?;
    read_manifest(dir, &desc.digest)
}

/// The lsm blobs a converted manifest lists (layers and dictionary blobs, in manifest order).
pub fn lsm_blobs(dir: &Path, manifest: &Manifest) -> CliResult<Vec<DictBlob>> {
    let mut out = Vec::new();
    for l in &manifest.layers {
        // Layers and dictionary blobs are lsm layer blobs; other roles are not.
        use super::manifest::{lsm_role, Role};
        if !matches!(lsm_role(l), Some(Role::Layer | Role::Dictionary)) {
            continue;
        }
        out.push(DictBlob {
            path: blob_path(dir, &l.digest)?,
            size: l.size,
            meta_digest: l
                .annotation(blockfmt::META_DIGEST_ANNOTATION)
                .map(str::to_string),
            digest: l.digest.clone(),
            from: None,
        });
    }
    if out.is_empty() {
        return Err(bad(format!(
            "{}: the image has no lsm layers (convert it first)",
            dir.display()
        )));
    }
    Ok(out)
}

/// Splits `DIR:TAG` when `DIR` is a directory and the whole string is not.
pub fn split_layout_ref(r: &str) -> (PathBuf, Option<String>) {
    if Path::new(r).is_dir() {
        return (PathBuf::from(r), None);
    }
    match r.rsplit_once(':') {
        Some((d, t)) if Path::new(d).is_dir() => (PathBuf::from(d), Some(t.to_string())),
        _ => (PathBuf::from(r), None),
    }
}

/// The lsm blobs of image `r` (layout or registry; registry images are pulled under `work`).
pub fn image_blobs(
    r: &str,
    work: &Path,
    creds: Option<&lsmd::source::auth::Credentials>,
    insecure: bool,
    client: &push::Client,
) -> CliResult<Vec<DictBlob>> {
    if r.starts_with("http://") || r.starts_with("https://") {
        let target = push::Target::parse(r)?;
        if target.base.starts_with("http://") && !insecure {
            return Err(bad(format!("{r}: plain HTTP needs --insecure")));
        }
        let from = (target.base.clone(), target.repository.clone());
        let dir = work.join(format!(
            "dict-{}",
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(r.as_bytes()))
                .get(..12)
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        push::Session::new(target, creds.cloned(), client)?.pull(&dir)?;
        let m = layout_manifest(&dir, None)?;
        let mut blobs = lsm_blobs(&dir, &m)?;
        for b in &mut blobs {
            b.from = Some(from.clone());
        }
        return Ok(blobs);
    }
    let (dir, tag) = split_layout_ref(r);
    let m = layout_manifest(&dir, tag.as_deref())?;
    lsm_blobs(&dir, &m)
}

/// Opens a dictionary blob after checking it is what its digest says.
pub fn open_checked(b: &DictBlob) -> CliResult<(Layer, BlobRef)> {
    if sha256_file(&b.path)? != b.digest {
        return Err(bad(format!(
            "dictionary blob {}: content does not match its digest",
            b.digest
        )));
    }
    open_trusted(b)
}

/// Opens a blob whose digest is known to be right (one this conversion just wrote).
pub fn open_trusted(b: &DictBlob) -> CliResult<(Layer, BlobRef)> {
    let size = std::fs::metadata(&b.path)
        .map_err(|e| bad(format!("{}: {e}", b.path.display())))?
        .len();
    let sha256 = parse_oci_digest(&b.digest).map_err(CliError)?;
    let meta = b
        .meta_digest
        .as_deref()
        .map(parse_oci_digest)
        .transpose()
        .map_err(CliError)?;
    let f = std::fs::File::open(&b.path).map_err(|e| bad(format!("{}: {e}", b.path.display())))?;
    let layer = Layer::open(b.digest.clone(), Arc::new(f), meta)?;
    Ok((layer, BlobRef { sha256, size }))
}

/// Loads every `--dict` image into one dictionary (first image, first layer wins a tie). A
/// registry image with a hash index is read through it (no blob downloaded, FORMAT.md §8);
/// any other is read whole, each blob checked against its digest.
pub fn load(
    refs: &[String],
    work: &Path,
    creds: Option<&lsmd::source::auth::Credentials>,
    insecure: bool,
    client: &push::Client,
    mut say: impl FnMut(String),
) -> CliResult<DictImages> {
    let mut dict = Dictionary::new();
    let mut blobs: Vec<DictBlob> = Vec::new();
    let mut index = std::collections::HashMap::new();
    let mut remote = std::collections::HashMap::new();
    for r in refs {
        if let Some(indexed) = load_indexed(r, work, creds, insecure, client)? {
            let all = indexed.blobs.into_iter().zip(indexed.lists);
            for ((b, (id, chunks, entry)), src) in all.zip(indexed.sources) {
                if blobs.iter().any(|x| x.digest == b.digest) {
                    continue;
                }
                remote.insert(b.digest.clone(), src);
                dict.add_hashed(id, &chunks, &entry.chunks)?;
                index.insert(b.digest.clone(), entry);
                blobs.push(b);
            }
            say(format!(
                "dictionary {r}: {} blobs read through its hash index (metadata only), {} distinct 4 KiB blocks so far",
                blobs.len(),
                dict.block_count()
            ));
            continue;
        }
        if r.starts_with("http://") || r.starts_with("https://") {
            say(format!(
                "dictionary {r}: no hash-index blob (converted before lsm published one): downloading its blobs whole"
            ));
        }
        for mut b in image_blobs(r, work, creds, insecure, client)? {
            if blobs.iter().any(|x| x.digest == b.digest) {
                continue;
            }
            let (layer, id) = open_checked(&b)?;
            // Its whole-blob digest was just checked, so its metadata digest can be taken from
            // it: every config written from this conversion anchors the blob (FORMAT.md §4).
            if b.meta_digest.is_none() {
                b.meta_digest = Some(blockfmt::format::oci_digest(&layer.trailer().meta_sha256));
            }
            let entry = super::hashindex::of_layer(&layer, id)?;
            dict.add_hashed(id, &layer.metadata().chunks, &entry.chunks)?;
            index.insert(b.digest.clone(), entry);
            blobs.push(b);
        }
        say(format!(
            "dictionary {r}: {} blobs, {} distinct 4 KiB blocks so far",
            blobs.len(),
            dict.block_count()
        ));
    }
    Ok(DictImages {
        dict,
        blobs,
        index,
        remote,
    })
}

/// Registry image `r` read through its hash index, when it is one and has an index.
fn load_indexed(
    r: &str,
    work: &Path,
    creds: Option<&lsmd::source::auth::Credentials>,
    insecure: bool,
    client: &push::Client,
) -> CliResult<Option<super::remotedict::IndexedImage>> {
    if !(r.starts_with("http://") || r.starts_with("https://")) {
        return Ok(None);
    }
    let target = push::Target::parse(r)?;
    if target.base.starts_with("http://") && !insecure {
        return Err(bad(format!("{r}: plain HTTP needs --insecure")));
    }
    let from = (target.base.clone(), target.repository.clone());
    let session = push::Session::new(target, creds.cloned(), client)?;
    super::remotedict::load(r, work, session, from)
}

/// Supplies a layer with the blobs its blob table names, found by `path_of(digest)` (those it
/// does not find stay missing: reading their chunks fails naming them).
pub fn attach_borrowed(layer: &mut Layer, path_of: impl Fn(&str) -> Option<PathBuf>) -> CliResult {
    let wanted = layer.metadata().blobs.clone();
    for (k, b) in wanted.iter().enumerate() {
        if let Some(p) = path_of(&blockfmt::format::oci_digest(&b.sha256)) {
            let f = std::fs::File::open(&p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            layer.attach_blob(k as u32 + 1, Arc::new(f))?;
        }
    }
    Ok(())
}
