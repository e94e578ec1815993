//! The manifest and config a converted image is published with (FORMAT.md §7): what containerd
//! sees of an lsm image. containerd 1.6 stacks only OCI/Docker layer media types (any other
//! descriptor is fetched whole by its unpacker) and wants one config `diff_id` per manifest
//! layer, so every blob — stacked layers and extra-role blobs alike — is listed as an OCI tar
//! layer whose `io.lsm.layer.role` says what it really is, and the config's `diff_ids` are the
//! blobs' own digests (two conversions of one source layer never share a snapshot chainID).
//! Each layer also carries the `containerd.io/snapshot/lsm.*` annotations containerd forwards to
//! a remote snapshotter's Prepare, so lsm-snapshotter can answer it without fetching the blob.
//!
//! Other conversion steps (hash index, shipped trace) add their blobs with
//! [`ImageManifest::append_extra`]; readers find lsm blobs with [`lsm_role`], which also accepts
//! the older `application/vnd.lsm.layer.v1` media type.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use crate::cli::{CliError, CliResult};
use crate::oci::{Descriptor, Manifest, MANIFEST_MEDIA_TYPE};

/// Media type every blob of a converted image is listed with (as overlaybd does): the one
/// containerd treats as a layer and hands to the snapshotter instead of fetching.
pub const OCI_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

/// Prefix of the layer annotations containerd passes on as Prepare labels.
pub const SNAPSHOT_LABEL_PREFIX: &str = "containerd.io/snapshot/";

/// What a listed blob is for (`io.lsm.layer.role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// A disk layer of the stack.
    Layer,
    /// A blob the layers borrow chunks from (FORMAT.md §1.7); not stacked.
    Dictionary,
    /// A block-hash index (issue 17).
    HashIndex,
    /// A shipped startup trace (issue 18).
    Trace,
    /// A shipped startup layer (FORMAT.md §9): the blocks the baked start read, packed.
    Startup,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Layer => "layer",
            Role::Dictionary => blockfmt::ROLE_DICTIONARY,
            Role::HashIndex => "hash-index",
            Role::Trace => "trace",
            Role::Startup => "startup",
        }
    }

    /// Every role, for parsing.
    pub const ALL: [Role; 5] = [
        Role::Layer,
        Role::Dictionary,
        Role::HashIndex,
        Role::Trace,
        Role::Startup,
    ];

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// The role of manifest descriptor `desc` if it is an lsm blob: the OCI tar media type with an
/// `io.lsm.layer.role` annotation, or the older lsm media type (role annotation, else a layer).
/// A plain tar layer is `None`.
pub fn lsm_role(desc: &Descriptor) -> Option<Role> {
    let role = desc.annotation(blockfmt::ROLE_ANNOTATION);
    match desc.media_type.as_str() {
        blockfmt::LAYER_MEDIA_TYPE => role.map_or(Some(Role::Layer), Role::parse),
        OCI_LAYER_MEDIA_TYPE => role.and_then(Role::parse),
        _ => None,
    }
}

/// One blob a converted manifest lists.
#[derive(Debug, Clone)]
pub struct Blob {
    pub role: Role,
    /// `sha256:…` of the blob.
    pub digest: String,
    pub size: u64,
    /// Metadata digest (FORMAT.md §1.2), for blobs that are lsm layer blobs.
    pub meta_digest: Option<String>,
    /// Stored metadata length (FORMAT.md §1.2), when known: lets a reader open the blob in one
    /// exact read.
    pub meta_len: Option<u64>,
    /// The source layer a [`Role::Layer`] blob was converted from.
    pub source_layer: Option<String>,
}

/// The blobs of a converted image, in manifest order: the layers bottom first, then the
/// extra-role blobs in the order they were appended.
#[derive(Debug, Clone)]
pub struct ImageManifest {
    /// Virtual disk size, bytes.
    pub disk_size: u64,
    /// `host[:port]/repository` the image is pushed to, when known.
    pub repository: Option<String>,
    layers: Vec<Blob>,
    extras: Vec<Blob>,
}

impl ImageManifest {
    pub fn new(disk_size: u64, repository: Option<String>) -> ImageManifest {
        ImageManifest {
            disk_size,
            repository,
            layers: Vec::new(),
            extras: Vec::new(),
        }
    }

    /// Adds the next stacked layer (above those added before).
    pub fn push_layer(&mut self, b: Blob) {
        debug_assert_eq!(b.role, Role::Layer);
        self.layers.push(b);
    }

    /// Adds a blob of another role after every layer.
    pub fn append_extra(&mut self, b: Blob) {
        self.extras.push(b);
    }

    /// Every blob, in manifest order.
    pub fn blobs(&self) -> impl Iterator<Item = &Blob> {
        self.layers.iter().chain(self.extras.iter())
    }

    /// The manifest descriptor of `b`.
    pub fn descriptor(&self, b: &Blob) -> Descriptor {
        let mut a = BTreeMap::new();
        let mut put = |k: &str, v: String| {
            a.insert(k.to_string(), v);
        };
        put(blockfmt::ROLE_ANNOTATION, b.role.as_str().into());
        put("io.lsm.format-version", "1".into());
        if let Some(m) = &b.meta_digest {
            put(blockfmt::META_DIGEST_ANNOTATION, m.clone());
        }
        if let Some(n) = b.meta_len {
            put(blockfmt::META_LEN_ANNOTATION, n.to_string());
        }
        if let Some(s) = &b.source_layer {
            put("io.lsm.source-layer", s.clone());
        }
        let l = |k: &str| format!("{SNAPSHOT_LABEL_PREFIX}lsm.{k}");
        put(&l("role"), b.role.as_str().into());
        put(&l("digest"), b.digest.clone());
        if let Some(m) = &b.meta_digest {
            put(&l("meta-digest"), m.clone());
        }
        if let Some(n) = b.meta_len {
            put(&l("meta-len"), n.to_string());
        }
        put(&l("size"), b.size.to_string());
        put(&l("disk-size"), self.disk_size.to_string());
        if let Some(r) = &self.repository {
            put(&l("repository"), r.clone());
        }
        Descriptor {
            annotations: a,
            ..Descriptor::new(OCI_LAYER_MEDIA_TYPE, b.digest.clone(), b.size)
        }
    }

    /// The converted image's config: the source config `source` with `rootfs.diff_ids` = the
    /// blobs' digests in manifest order and one `history` entry per extra-role blob (when the
    /// source has a history), so diff_ids match manifest layers and history stays consistent.
    pub fn config(&self, source: &[u8]) -> CliResult<Vec<u8>> {
        let mut c: Value = serde_json::from_slice(source)
            .map_err(|e| CliError(format!("source image config: {e}")))?;
        if !c.is_object() {
            return Err(CliError("source image config is not a JSON object".into()));
        }
        c["rootfs"] = json!({
            "type": "layers",
            "diff_ids": self.blobs().map(|b| b.digest.clone()).collect::<Vec<_>>(),
        });
        if let Some(h) = c.get_mut("history").and_then(Value::as_array_mut) {
            for b in &self.extras {
                h.push(json!({ "created_by": format!("lsm: {}", b.role.as_str()) }));
            }
        }
        Ok(serde_json::to_vec(&c)?)
    }

    /// The manifest over config descriptor `config`.
    pub fn manifest(
        &self,
        config: Descriptor,
        source_manifest: &str,
        source_config: &str,
    ) -> Manifest {
        Manifest {
            annotations: BTreeMap::from(
                [
                    ("io.lsm.format-version", "1".to_string()),
                    ("io.lsm.disk-size", self.disk_size.to_string()),
                    ("io.lsm.source-manifest", source_manifest.to_string()),
                    ("io.lsm.source-config", source_config.to_string()),
                ]
                .map(|(k, v)| (k.to_string(), v)),
            ),
            config,
            layers: self.blobs().map(|b| self.descriptor(b)).collect(),
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            schema_version: 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(role: Role, d: &str) -> Blob {
        Blob {
            role,
            digest: d.into(),
            size: 10,
            meta_digest: Some(format!("{d}m")),
            meta_len: None,
            source_layer: None,
        }
    }

    #[test]
    fn config_diff_ids_follow_the_manifest() {
        let mut m = ImageManifest::new(1 << 30, Some("127.0.0.1:5000/a/b".into()));
        m.push_layer(blob(Role::Layer, "sha256:1"));
        m.append_extra(blob(Role::Dictionary, "sha256:d"));
        m.push_layer(blob(Role::Layer, "sha256:2"));
        let src = br#"{"rootfs":{"type":"layers","diff_ids":["x","y"]},"history":[{"created_by":"a"},{"created_by":"b"}],"config":{}}"#;
        let c: Value = serde_json::from_slice(&m.config(src).expect("config")).expect("json");
        assert_eq!(
            c["rootfs"]["diff_ids"],
            json!(["sha256:1", "sha256:2", "sha256:d"])
        );
        assert_eq!(c["history"][2]["created_by"], "lsm: dictionary");
        let man = m.manifest(Descriptor::default(), "sha256:sm", "sha256:sc");
        let layers = &man.layers;
        assert_eq!(layers.len(), 3);
        for l in layers {
            assert_eq!(l.media_type, OCI_LAYER_MEDIA_TYPE);
            assert!(lsm_role(l).is_some());
            assert_eq!(
                l.annotation("containerd.io/snapshot/lsm.repository"),
                Some("127.0.0.1:5000/a/b")
            );
        }
        assert_eq!(lsm_role(&layers[2]), Some(Role::Dictionary));
        assert_eq!(
            layers[1].annotation("containerd.io/snapshot/lsm.digest"),
            Some("sha256:2")
        );
    }

    #[test]
    fn roles_of_old_and_plain_layers() {
        let old = Descriptor::new(blockfmt::LAYER_MEDIA_TYPE, "sha256:1", 1);
        assert_eq!(lsm_role(&old), Some(Role::Layer));
        let plain = Descriptor::new(OCI_LAYER_MEDIA_TYPE, "sha256:1", 1);
        assert_eq!(lsm_role(&plain), None);
        assert!(m_role_parse_roundtrip());
    }

    fn m_role_parse_roundtrip() -> bool {
        Role::ALL
            .into_iter()
            .all(|r| Role::parse(r.as_str()) == Some(r))
    }
}
