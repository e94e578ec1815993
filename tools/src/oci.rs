//! The OCI image-spec documents lsmctl reads and writes (image index, image manifest,
//! descriptor, platform), as typed serde structs shared by `convert` and `pull`.
//!
//! Why our own structs and not the `oci-spec` crate: a converted image must be byte-for-byte
//! reproducible (its manifest digest is how a conversion is recognised and reused), and
//! `oci-spec` keeps annotations in a `HashMap`, whose serialisation order changes from run to
//! run. Here annotations are a `BTreeMap` and every struct's fields are declared in the
//! alphabetical order of their JSON names, so a document serialises exactly as the
//! `serde_json::Value` it replaced did (serde_json's maps are sorted) and converted digests did
//! not change. Unknown fields are ignored on reading (images carry `urls`, `artifactType`,
//! `subject` …); only what lsm uses round-trips.
//!
//! Docker schema 2 manifests and manifest lists share these shapes, so they parse too.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::cli::{CliError, CliResult};

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";

/// The annotation naming an image in an image layout's `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

/// An OCI content descriptor.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub digest: String,
    #[serde(rename = "mediaType", default)]
    pub media_type: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    pub size: u64,
}

impl Descriptor {
    /// A descriptor without annotations or platform.
    pub fn new(media_type: impl Into<String>, digest: impl Into<String>, size: u64) -> Self {
        Descriptor {
            media_type: media_type.into(),
            digest: digest.into(),
            size,
            ..Descriptor::default()
        }
    }

    /// The value of annotation `key`, if present.
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.annotations.get(key).map(String::as_str)
    }
}

/// The platform of an index entry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Platform {
    #[serde(default)]
    pub architecture: String,
    #[serde(default)]
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
}

impl Platform {
    /// Parses `os/arch` or `os/arch/variant` (as `--platform` takes it).
    pub fn parse(s: &str) -> CliResult<Platform> {
        let parts: Vec<&str> = s.split('/').collect();
        match parts.as_slice() {
            [os, arch, ..]
                if parts.len() <= 3 && !os.is_empty() && parts.iter().all(|p| !p.is_empty()) =>
            {
                Ok(Platform {
                    os: os.to_string(),
                    architecture: arch.to_string(),
                    variant: parts.get(2).map(|v| v.to_string()),
                })
            }
            _ => Err(CliError(format!(
                "--platform {s:?}: expected os/arch or os/arch/variant (e.g. linux/arm64/v8)"
            ))),
        }
    }

    /// linux on this machine's architecture (containerd's name for it), any variant.
    pub fn host() -> Platform {
        Platform {
            os: "linux".into(),
            architecture: host_arch().into(),
            variant: None,
        }
    }

    /// Whether an index entry's platform is this one (the variant only when this one has one).
    pub fn matches(&self, p: &Platform) -> bool {
        p.os == self.os
            && p.architecture == self.architecture
            && self
                .variant
                .as_ref()
                .is_none_or(|v| p.variant.as_ref() == Some(v))
    }
}

impl std::fmt::Display for Platform {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let or_q = |s: &str| if s.is_empty() { "?" } else { s }.to_string();
        write!(f, "{}/{}", or_q(&self.os), or_q(&self.architecture))?;
        match &self.variant {
            Some(v) => write!(f, "/{v}"),
            None => Ok(()),
        }
    }
}

/// containerd's name of this machine's architecture.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// An image index (or a Docker manifest list, or an image layout's `index.json`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Index {
    #[serde(default)]
    pub manifests: Vec<Descriptor>,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
}

impl Index {
    /// An index (as an image layout's `index.json`) listing `manifests`.
    pub fn of(manifests: Vec<Descriptor>) -> Index {
        Index {
            manifests,
            media_type: None,
            schema_version: 2,
        }
    }

    /// The entry for `platform`, or an error listing the platforms it has.
    pub fn for_platform(&self, platform: &Platform, what: &str) -> CliResult<&Descriptor> {
        self.manifests
            .iter()
            .find(|m| m.platform.as_ref().is_some_and(|p| platform.matches(p)))
            .ok_or_else(|| {
                let has: Vec<String> = self
                    .manifests
                    .iter()
                    .map(|m| m.platform.clone().unwrap_or_default().to_string())
                    .collect();
                CliError(format!(
                    "{what}: the index has no {platform} image (it has: {}); choose one with --platform",
                    has.join(", ")
                ))
            })
    }

    /// The entry tagged `tag` (`org.opencontainers.image.ref.name`), or the only entry when
    /// `tag` is `None`; `what` names the layout in errors, `hint` how to choose.
    pub fn by_tag(&self, tag: Option<&str>, what: &str, hint: &str) -> CliResult<&Descriptor> {
        let chosen: Vec<&Descriptor> = self
            .manifests
            .iter()
            .filter(|m| tag.is_none_or(|t| m.annotation(REF_NAME_ANNOTATION) == Some(t)))
            .collect();
        match chosen.as_slice() {
            [one] => Ok(one),
            [] if self.manifests.is_empty() => Err(CliError(format!("{what} lists no images"))),
            [] => Err(CliError(format!("{what}: no image tagged {tag:?}"))),
            _ => Err(CliError(format!("{what} holds several images: {hint}"))),
        }
    }
}

/// An image manifest (OCI, or Docker schema 2).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(rename = "mediaType", default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(rename = "schemaVersion")]
    pub schema_version: u32,
}

/// Whether a document is an index (it lists `manifests`) rather than a manifest.
pub fn is_index(bytes: &[u8]) -> bool {
    #[derive(Deserialize)]
    struct Probe {
        manifests: Option<serde::de::IgnoredAny>,
    }
    serde_json::from_slice::<Probe>(bytes).is_ok_and(|p| p.manifests.is_some())
}

/// Parses an image index; `what` names it in errors.
pub fn parse_index(bytes: &[u8], what: &str) -> CliResult<Index> {
    serde_json::from_slice(bytes).map_err(|e| CliError(format!("{what}: not an image index: {e}")))
}

/// Parses a schema-2 image manifest; `what` names it in errors.
pub fn parse_manifest(bytes: &[u8], what: &str) -> CliResult<Manifest> {
    let m: Manifest = serde_json::from_slice(bytes).map_err(|e| {
        CliError(format!(
            "{what}: not an OCI or Docker schema 2 image manifest: {e}"
        ))
    })?;
    if m.schema_version != 2 {
        return Err(CliError(format!(
            "{what}: schemaVersion {} (only 2 is supported)",
            m.schema_version
        )));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn serialises_like_the_sorted_json_it_replaced() {
        let mut d = Descriptor::new(MANIFEST_MEDIA_TYPE, "sha256:ab", 7);
        d.annotations.insert("z".into(), "1".into());
        d.annotations.insert("a".into(), "2".into());
        let m = Manifest {
            annotations: BTreeMap::from([("k".to_string(), "v".to_string())]),
            config: Descriptor::new("c", "sha256:cd", 1),
            layers: vec![d.clone()],
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            schema_version: 2,
        };
        let as_value: Value = serde_json::to_value(&m).expect("value");
        assert_eq!(
            serde_json::to_vec_pretty(&m).expect("typed"),
            serde_json::to_vec_pretty(&as_value).expect("value")
        );
        let i = Index::of(vec![d]);
        let as_value: Value = serde_json::to_value(&i).expect("value");
        assert_eq!(
            serde_json::to_vec(&i).expect("typed"),
            serde_json::to_vec(&as_value).expect("value")
        );
    }

    #[test]
    fn platforms_and_tags() {
        let idx: Index = serde_json::from_value(json!({"schemaVersion": 2, "manifests": [
            {"digest": "sha256:1", "size": 1, "mediaType": "m", "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}},
            {"digest": "sha256:2", "size": 1, "mediaType": "m", "platform": {"os": "linux", "architecture": "amd64"},
             "annotations": {REF_NAME_ANNOTATION: "t"}, "urls": ["ignored"]},
        ]}))
        .expect("index");
        let arm = Platform::parse("linux/arm64").expect("platform");
        assert_eq!(idx.for_platform(&arm, "x").expect("arm").digest, "sha256:1");
        let v7 = Platform::parse("linux/arm64/v7").expect("platform");
        let e = idx.for_platform(&v7, "img").expect_err("no v7");
        assert!(e.0.contains("linux/arm64/v8, linux/amd64"), "{}", e.0);
        assert_eq!(
            idx.by_tag(Some("t"), "l", "h").expect("tag").digest,
            "sha256:2"
        );
        assert!(idx
            .by_tag(None, "l", "pick one")
            .expect_err("two")
            .0
            .contains("pick one"));
        for bad in ["linux", "/amd64", "linux//v8", "a/b/c/d"] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn manifests_are_checked() {
        assert!(parse_manifest(b"{\"schemaVersion\":1}", "m").is_err());
        assert!(parse_manifest(b"[]", "m").is_err());
        assert!(is_index(br#"{"manifests":[]}"#));
        assert!(!is_index(br#"{"layers":[]}"#));
        assert!(!is_index(b"not json"));
    }
}
