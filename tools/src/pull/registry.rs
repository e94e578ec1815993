//! The registry side of `lsmctl pull`: image references, and GETs of manifests and blobs with
//! lsmd's registry auth (Basic or a Bearer token from the `WWW-Authenticate` challenge,
//! credentials from docker's `config.json`), through lsmd's [`RepositoryClient`] as `convert`'s
//! push session does; this side streams blobs into containerd instead of writing files.

use std::io::Read;
use std::path::Path;

use lsmd::source::auth::Credentials;
use lsmd::source::http::ClientOptions;
use lsmd::source::redact;
use lsmd::source::registry::{Body, RepositoryClient, RequestError};
use sha2::{Digest, Sha256};

use crate::cli::{CliError, CliResult};

/// Manifest media types asked for when resolving a reference.
pub const MANIFEST_TYPES: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// A parsed image reference: `[host[:port]/]repository[:tag][@digest]`, normalised as
/// containerd names images (`docker.io/library/busybox:latest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `host[:port]` as written (`docker.io` for Docker Hub).
    pub host: String,
    pub repository: String,
    /// Tag or `sha256:…` digest to resolve.
    pub reference: String,
    /// The image name containerd records.
    pub name: String,
}

impl ImageRef {
    /// Parses `s`; a first path component without `.` or `:` (and not `localhost`) is a Docker
    /// Hub repository.
    pub fn parse(s: &str) -> CliResult<ImageRef> {
        let bad = |why: &str| CliError(format!("image reference {s:?}: {why}"));
        if s.is_empty() {
            return Err(bad("empty"));
        }
        if s.contains("://") {
            return Err(bad(
                "give host[:port]/repository[:tag] without a scheme (use --plain-http for http)",
            ));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (r, Some(d)),
            None => (s, None),
        };
        let (host, path) = match rest.split_once('/') {
            Some((h, p)) if h.contains('.') || h.contains(':') || h == "localhost" => {
                (h.to_string(), p.to_string())
            }
            _ => ("docker.io".to_string(), rest.to_string()),
        };
        // A tag is after the last ':' of the path (the host's port is not in `path`).
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r.to_string(), Some(t.to_string())),
            _ => (path, None),
        };
        let repository = if host == "docker.io" && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || "._-/".contains(c);
        if repository.is_empty() || !repository.chars().all(valid) {
            return Err(bad("bad repository name"));
        }
        if let Some(d) = digest {
            if !is_sha256(d) {
                return Err(bad("digest must be sha256:<64 hex digits>"));
            }
        }
        let (reference, name) = match (digest, tag) {
            (Some(d), _) => (d.to_string(), format!("{host}/{repository}@{d}")),
            (None, t) => {
                let t = t.unwrap_or_else(|| "latest".into());
                let name = format!("{host}/{repository}:{t}");
                (t, name)
            }
        };
        Ok(ImageRef {
            host,
            repository,
            reference,
            name,
        })
    }

    /// Where the registry API is: Docker Hub's API host for `docker.io`.
    pub fn base(&self, plain_http: bool) -> String {
        let host = if self.host == "docker.io" {
            "registry-1.docker.io"
        } else {
            &self.host
        };
        format!("{}://{host}", if plain_http { "http" } else { "https" })
    }
}

/// `sha256:` followed by 64 lowercase hex digits.
pub fn is_sha256(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    })
}

/// `sha256:<hex>` of `bytes`.
pub fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

/// An authenticated reader of one repository, over lsmd's registry client.
pub struct Registry {
    client: RepositoryClient,
}

/// A fetched manifest or index: its bytes, digest and media type.
pub struct Fetched {
    pub bytes: Vec<u8>,
    pub digest: String,
    pub media_type: String,
}

impl Registry {
    /// A reader of `image`'s repository; credentials from docker's `config.json`; HTTPS
    /// trusting `ca_file` (PEM) instead of the system's roots when given.
    pub fn new(image: &ImageRef, plain_http: bool, ca_file: Option<&Path>) -> CliResult<Registry> {
        let options = ClientOptions {
            tls: lsmd::source::tls::client_config(ca_file).map_err(|e| CliError(e.to_string()))?,
            ..ClientOptions::default()
        };
        Ok(Registry {
            client: RepositoryClient::new(
                &image.base(plain_http),
                &image.repository,
                Credentials::from_docker_config(&image.host),
                &options,
                std::time::Duration::from_secs(120),
            ),
        })
    }

    /// GETs `/v2/<repo>/<tail>`, retried while the failure may pass.
    fn get(&self, tail: &str, accept: &str) -> CliResult<ureq::Response> {
        let url = self.client.url(tail);
        self.client
            .send_retrying(|a| a.get(&url).set("Accept", accept), &Body::Empty)
            .map_err(|e| {
                let hint = match e {
                    RequestError::Unauthorized(_) => "; credentials come from docker's config.json",
                    _ => "",
                };
                CliError(format!("GET {}: {e}{hint}", redact::url(&url)))
            })
    }

    /// A manifest or index by tag or digest (a digest is checked).
    pub fn manifest(&self, reference: &str) -> CliResult<Fetched> {
        let resp = self.get(&format!("manifests/{reference}"), MANIFEST_TYPES)?;
        let header_type = resp.content_type().to_string();
        let mut bytes = Vec::new();
        resp.into_reader()
            .take(16 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| CliError(format!("manifest {reference}: {e}")))?;
        let digest = sha256(&bytes);
        if is_sha256(reference) && digest != reference {
            return Err(CliError(format!(
                "manifest {reference}: the registry sent content with digest {digest}"
            )));
        }
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| CliError(format!("manifest {reference}: not JSON: {e}")))?;
        let media_type = v["mediaType"]
            .as_str()
            .map(String::from)
            .unwrap_or(header_type);
        Ok(Fetched {
            bytes,
            digest,
            media_type,
        })
    }

    /// A small blob (a config), checked against `digest`.
    pub fn small_blob(&self, digest: &str) -> CliResult<Vec<u8>> {
        let mut bytes = Vec::new();
        self.blob(digest)?
            .take(64 << 20)
            .read_to_end(&mut bytes)
            .map_err(|e| CliError(format!("blob {digest}: {e}")))?;
        if sha256(&bytes) != digest {
            return Err(CliError(format!(
                "blob {digest}: the registry sent content with digest {}",
                sha256(&bytes)
            )));
        }
        Ok(bytes)
    }

    /// A blob's bytes as a stream (the caller checks the digest).
    pub fn blob(&self, digest: &str) -> CliResult<Box<dyn Read + Send + Sync + 'static>> {
        if !is_sha256(digest) {
            return Err(CliError(format!("unsupported digest {digest:?}")));
        }
        Ok(self.get(&format!("blobs/{digest}"), "*/*")?.into_reader())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_normalise_like_containerd() {
        let r = ImageRef::parse("127.0.0.1:5000/lsm/app:v1").expect("parse");
        assert_eq!(
            (r.host.as_str(), r.repository.as_str(), r.reference.as_str()),
            ("127.0.0.1:5000", "lsm/app", "v1")
        );
        assert_eq!(r.name, "127.0.0.1:5000/lsm/app:v1");
        assert_eq!(r.base(true), "http://127.0.0.1:5000");
        let r = ImageRef::parse("busybox").expect("parse");
        assert_eq!(r.name, "docker.io/library/busybox:latest");
        assert_eq!(r.base(false), "https://registry-1.docker.io");
        let r = ImageRef::parse("localhost/x").expect("parse");
        assert_eq!(r.name, "localhost/x:latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("reg.example/x@{d}")).expect("parse");
        assert_eq!(
            (r.reference.as_str(), r.name),
            (d.as_str(), format!("reg.example/x@{d}"))
        );
        for bad in ["http://h/x:1", "h.example/X", "h.example/x@sha256:12", ""] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
