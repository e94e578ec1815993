//! The last stage of a conversion: the converted layers become an image — config, manifest and
//! index in the OCI layout (FORMAT.md §7), `lsm-image.json` (the image over the local blobs)
//! and, with `--push`, the blobs and manifest in the registry plus `lsm-remote.json` (the image
//! over the registry). Both image configs are lsmd's own `ImageConfig`, so what convert writes
//! is what lsmd parses.

use std::path::{Path, PathBuf};

use lsmd::config::{ImageConfig, LayerConfig, RegistryConfig, SourceConfig};

use super::{bad, blob_path, dict, manifest, meta_len_of, push, put_blob, ConvertArgs, FsKind};
use crate::cli::CliResult;
use crate::oci::{self, Descriptor, Index, REF_NAME_ANNOTATION};

/// What the layer loop produced, and where it came from.
pub(super) struct Converted<'a> {
    pub src: &'a Path,
    pub dst: &'a Path,
    /// The source manifest's digest and config descriptor.
    pub source_manifest: &'a str,
    pub source_config: &'a Descriptor,
    pub size: u64,
    pub layers: &'a [Descriptor],
    pub borrowed: &'a [dict::DictBlob],
    /// The hash-index blob (FORMAT.md §8), in the layout: digest and size.
    pub hash_index: (String, u64),
}

/// The written image: its manifest (bytes and digest) and config digest.
pub(super) struct Published {
    pub manifest_digest: String,
    pub manifest: Vec<u8>,
    pub config_digest: String,
}

/// Writes config, manifest, index, layout marker and `lsm-image.json` into `c.dst`.
pub(super) fn write_layout(a: &ConvertArgs, c: &Converted) -> CliResult<Published> {
    let repository = match &a.push {
        Some(p) => {
            let t = push::Target::parse(p)?;
            Some(format!("{}/{}", t.host(), t.repository))
        }
        None => None,
    };
    let mut published = manifest::ImageManifest::new(c.size, repository);
    for l in c.layers {
        published.push_layer(manifest::Blob {
            role: manifest::Role::Layer,
            digest: l.digest.clone(),
            size: l.size,
            meta_digest: l
                .annotation(blockfmt::META_DIGEST_ANNOTATION)
                .map(str::to_string),
            meta_len: meta_len_of(l),
            source_layer: l.annotation("io.lsm.source-layer").map(str::to_string),
        });
    }
    for b in c.borrowed {
        published.append_extra(manifest::Blob {
            role: manifest::Role::Dictionary,
            digest: b.digest.clone(),
            size: b.size,
            meta_digest: b.meta_digest.clone(),
            meta_len: None,
            source_layer: None,
        });
    }
    published.append_extra(manifest::Blob {
        role: manifest::Role::HashIndex,
        digest: c.hash_index.0.clone(),
        size: c.hash_index.1,
        meta_digest: None,
        meta_len: None,
        source_layer: None,
    });
    let cfg_src = &c.source_config.digest;
    let source_config = std::fs::read(blob_path(c.src, cfg_src)?)
        .map_err(|e| bad(format!("config {cfg_src}: {e}")))?;
    let (cfg_digest, cfg_size) = put_blob(c.dst, &published.config(&source_config)?)?;
    let config = Descriptor::new(
        c.source_config.media_type.clone(),
        cfg_digest.clone(),
        cfg_size,
    );
    let mut m = published.manifest(config, c.source_manifest, cfg_src);
    if a.fs == FsKind::Erofs {
        m.annotations
            .insert("io.lsm.filesystem".into(), "erofs".into());
    }
    let mbytes = serde_json::to_vec_pretty(&m)?;
    let (m_digest, m_size) = put_blob(c.dst, &mbytes)?;
    let mut mdesc = Descriptor::new(oci::MANIFEST_MEDIA_TYPE, m_digest.clone(), m_size);
    if let Some(t) = &a.tag {
        mdesc
            .annotations
            .insert(REF_NAME_ANNOTATION.into(), t.clone());
    }
    std::fs::write(
        c.dst.join("oci-layout"),
        "{\"imageLayoutVersion\":\"1.0.0\"}",
    )?;
    // A dictionary blob read through a hash index is not in the layout: the registry it came
    // from serves it.
    let local = |d: &str| {
        c.borrowed
            .iter()
            .find(|b| b.digest == d)
            .and_then(|b| super::remotedict::source_of(b, a.insecure, a.registry_ca.as_deref()))
            .unwrap_or_else(|| SourceConfig::Local(blob_path(Path::new(""), d).unwrap_or_default()))
    };
    let image = image_config(c, local, |_| None);
    std::fs::write(
        c.dst.join("lsm-image.json"),
        serde_json::to_vec_pretty(&image)?,
    )?;
    std::fs::write(
        c.dst.join("index.json"),
        serde_json::to_vec_pretty(&Index::of(vec![mdesc]))?,
    )?;
    Ok(Published {
        manifest_digest: m_digest,
        manifest: mbytes,
        config_digest: cfg_digest,
    })
}

/// The image config over `c`'s layers and borrowed blobs, each found through `source(digest)`;
/// `layer_size(layer)` gives a layer's size when the source should know it.
fn image_config(
    c: &Converted,
    source: impl Fn(&str) -> SourceConfig,
    layer_size: impl Fn(&Descriptor) -> Option<u64>,
) -> ImageConfig {
    let layers = c
        .layers
        .iter()
        .map(|l| LayerConfig {
            source: with_size(source(&l.digest), layer_size(l)),
            digest: Some(l.digest.clone()),
            meta_digest: l
                .annotation(blockfmt::META_DIGEST_ANNOTATION)
                .map(str::to_string),
            meta_len: meta_len_of(l),
        })
        .collect();
    let mut image = ImageConfig::new(c.size, layers, None);
    image.dictionary = c
        .borrowed
        .iter()
        .map(|b| LayerConfig {
            source: source(&b.digest),
            digest: Some(b.digest.clone()),
            meta_digest: b.meta_digest.clone(),
            meta_len: None,
        })
        .collect();
    image
}

fn with_size(s: SourceConfig, size: Option<u64>) -> SourceConfig {
    match s {
        SourceConfig::Registry(mut r) => {
            r.size = size;
            SourceConfig::Registry(r)
        }
        other => other,
    }
}

/// `--push`: uploads the blobs the registry lacks (mounting borrowed ones from the repository
/// they came from when it is the same registry), puts the manifest under the tag and writes
/// `lsm-remote.json`.
pub(super) fn push_image(
    a: &ConvertArgs,
    c: &Converted,
    p: &Published,
    push_ref: &str,
    creds: Option<lsmd::source::auth::Credentials>,
    say: &dyn Fn(String),
) -> CliResult {
    let target = push::Target::parse(push_ref)?;
    if target.base.starts_with("http://") && !a.insecure {
        return Err(bad(format!(
            "--push {push_ref}: plain HTTP needs --insecure"
        )));
    }
    let ca_file: Option<PathBuf> = a
        .registry_ca
        .as_deref()
        .map(std::fs::canonicalize)
        .transpose()
        .map_err(|e| bad(format!("--registry-ca: {e}")))?;
    let registry = RegistryConfig {
        url: target.base.clone(),
        repository: target.repository.clone(),
        mirrors: Vec::new(),
        token_hosts: a.token_hosts.clone(),
        ca_file,
        insecure: a.insecure,
        username: None,
        password: None,
        size: None,
        p2p: None,
    };
    // Layers carry their size (saves a HEAD); dictionary blobs do not: opening the image asks
    // the registry for each, so a dictionary blob missing from the repository fails at attach,
    // naming it, not at some read.
    let remote = image_config(
        c,
        |_| SourceConfig::Registry(registry.clone()),
        |l| Some(l.size),
    );
    let creds_for_dict = creds.clone();
    let session = push::Session::new(target, creds, &a.client())?;
    let (mut sent, mut had, mut mounted) = (0, 0, 0);
    let blobs = std::iter::once(p.config_digest.clone())
        .chain(c.layers.iter().map(|l| l.digest.clone()))
        .chain(std::iter::once(c.hash_index.0.clone()));
    for d in blobs {
        if session.put_blob(&d, &blob_path(c.dst, &d)?)? {
            sent += 1;
        } else {
            had += 1;
        }
    }
    for b in c.borrowed {
        // Another repository of the same registry has it: mount instead of uploading.
        let from = b
            .from
            .as_ref()
            .filter(|(base, _)| *base == session.base())
            .map(|(_, repo)| repo.as_str());
        if from.is_none() {
            // Read through a hash index (not downloaded) from another registry: the push needs
            // its bytes after all.
            super::remotedict::download(
                b,
                c.dst,
                creds_for_dict.as_ref(),
                &a.client(),
                a.insecure,
                say,
            )?;
        }
        match session.put_blob_from(&b.digest, &blob_path(c.dst, &b.digest)?, from)? {
            push::Put::Uploaded => sent += 1,
            push::Put::Mounted => mounted += 1,
            push::Put::Present => had += 1,
        }
    }
    session.put_manifest(&p.manifest, oci::MANIFEST_MEDIA_TYPE)?;
    std::fs::write(
        c.dst.join("lsm-remote.json"),
        serde_json::to_vec_pretty(&remote)?,
    )?;
    say(format!(
        "pushed to {push_ref}: {sent} blobs uploaded, {had} already there{}",
        if mounted > 0 {
            format!(", {mounted} mounted from another repository")
        } else {
            String::new()
        }
    ));
    Ok(())
}
