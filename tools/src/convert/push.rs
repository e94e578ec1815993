//! Talking to a registry (OCI distribution API) for `convert`: pulling a source image into a
//! local image layout (manifest by tag, following an index to linux/amd64, then config and
//! layers), and pushing the converted one — every blob the registry does not already have (HEAD
//! first) is uploaded in one PUT, then the manifest is put under its tag. Registry auth — basic
//! or bearer token from the `WWW-Authenticate` challenge — is lsmd's, and so is its rule that
//! credentials go only to the registry: an upload `Location` on another host (blob storage) gets
//! no `Authorization`, and a 401 from there is not taken for the registry's challenge. Errors
//! never show a URL's query string (upload state, signatures).

use std::path::Path;

use lsmd::source::auth::Credentials;
use lsmd::source::http::ClientOptions;
use lsmd::source::redact;
use lsmd::source::registry::{Body, RepositoryClient, RequestError};

use crate::cli::{CliError, CliResult};
use crate::oci;

/// An image in a registry: `http(s)://host[:port]/repository:tag`.
pub struct Target {
    pub base: String,
    pub repository: String,
    pub tag: String,
}

impl Target {
    /// Parses `http(s)://host[:port]/repo/path:tag`.
    pub fn parse(s: &str) -> CliResult<Target> {
        let bad = || {
            CliError(format!(
                "--push {s:?}: want http(s)://host[:port]/repository:tag"
            ))
        };
        let (scheme, rest) = s.split_once("://").ok_or_else(bad)?;
        if scheme != "http" && scheme != "https" {
            return Err(bad());
        }
        let (host, path) = rest.split_once('/').ok_or_else(bad)?;
        let (repository, tag) = path.rsplit_once(':').ok_or_else(bad)?;
        if host.is_empty() || repository.is_empty() || tag.is_empty() {
            return Err(bad());
        }
        Ok(Target {
            base: format!("{scheme}://{host}"),
            repository: repository.to_string(),
            tag: tag.to_string(),
        })
    }

    /// `host[:port]`, for credentials lookup.
    pub fn host(&self) -> &str {
        self.base.split("://").nth(1).unwrap_or_default()
    }
}

/// What putting a blob took.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    /// The repository had it.
    Present,
    /// Mounted from another repository of the registry.
    Mounted,
    /// Uploaded.
    Uploaded,
}

/// How sessions talk to registries (`convert --registry-ca`, `--token-host`).
#[derive(Debug, Clone, Default)]
pub struct Client {
    /// PEM CA certificates trusted for HTTPS instead of the system's.
    pub ca_file: Option<std::path::PathBuf>,
    /// Hosts (`host[:port]`) of token servers, besides the registry's own, that may receive
    /// the credentials (a Bearer challenge's realm).
    pub token_hosts: Vec<String>,
}

/// An authenticated session with one registry repository, over lsmd's registry client (its
/// auth-challenge loop, credential rules and retry rule are the blob source's).
pub struct Session {
    client: RepositoryClient,
    target: Target,
}

impl Session {
    /// A session with `target`, set up as `client` says.
    pub fn new(target: Target, creds: Option<Credentials>, client: &Client) -> CliResult<Session> {
        let options = ClientOptions {
            tls: lsmd::source::tls::client_config(client.ca_file.as_deref())
                .map_err(|e| CliError(e.to_string()))?,
            credential_hosts: client.token_hosts.clone(),
        };
        Ok(Session {
            client: RepositoryClient::new(
                &target.base,
                &target.repository,
                creds,
                &options,
                std::time::Duration::from_secs(600),
            ),
            target,
        })
    }

    /// Sends a request built by `make` (retried while its failure may pass when `idempotent`);
    /// `Ok(None)` for a 404.
    fn send(
        &self,
        what: &str,
        make: impl FnMut(&ureq::Agent) -> ureq::Request,
        body: Body,
        idempotent: bool,
    ) -> CliResult<Option<ureq::Response>> {
        let r = match idempotent {
            true => self.client.send_retrying(make, &body),
            false => self.client.send(make, &body),
        };
        match r {
            Ok(resp) => Ok(Some(resp)),
            Err(RequestError::NotFound) => Ok(None),
            Err(e) => Err(CliError(format!("{}: {e}", redact::text(what)))),
        }
    }

    fn url(&self, tail: &str) -> String {
        self.client.url(tail)
    }

    /// The registry's base URL.
    pub fn base(&self) -> &str {
        self.client.base()
    }

    /// Uploads blob `digest` from `file` unless the registry has it; true if uploaded.
    pub fn put_blob(&self, digest: &str, file: &Path) -> CliResult<bool> {
        Ok(self.put_blob_from(digest, file, None)? == Put::Uploaded)
    }

    /// [`Self::put_blob`], first asking the registry to mount the blob from repository `from`
    /// of the same registry (OCI distribution cross-repository mount), which costs no upload.
    pub fn put_blob_from(&self, digest: &str, file: &Path, from: Option<&str>) -> CliResult<Put> {
        let head = self.url(&format!("blobs/{digest}"));
        if self
            .send(
                &format!("HEAD {head}"),
                |a| a.head(&head),
                Body::Empty,
                true,
            )?
            .is_some()
        {
            return Ok(Put::Present);
        }
        if let Some(repo) = from {
            let url = self.url(&format!("blobs/uploads/?mount={digest}&from={repo}"));
            let r = self.send(
                &format!("POST {url}"),
                |a| a.post(&url),
                Body::Bytes(&[]),
                false,
            )?;
            if r.is_some_and(|r| r.status() == 201) {
                return Ok(Put::Mounted);
            }
            // 202: the registry started an upload instead; a new one below is as good.
        }
        let start = self.url("blobs/uploads/");
        let resp = self
            .send(
                &format!("POST {start}"),
                |a| a.post(&start),
                Body::Bytes(&[]),
                false,
            )?
            .ok_or_else(|| CliError(format!("POST {start}: 404")))?;
        let loc = resp
            .header("location")
            .ok_or_else(|| CliError(format!("POST {start}: no upload location")))?;
        let loc = if loc.starts_with('/') {
            format!("{}{loc}", self.target.base)
        } else {
            loc.to_string()
        };
        let sep = if loc.contains('?') { '&' } else { '?' };
        let put = format!("{loc}{sep}digest={digest}");
        let open = || std::fs::File::open(file);
        // With Content-Length, not chunked: registries backed by object storage refuse chunked
        // uploads, and a server that answers before reading a chunked body cuts the upload.
        let len = std::fs::metadata(file)
            .map_err(|e| CliError(format!("PUT blob {digest}: {}: {e}", file.display())))?
            .len()
            .to_string();
        self.send(
            &format!("PUT blob {digest}"),
            |a| {
                a.put(&put)
                    .set("Content-Type", "application/octet-stream")
                    .set("Content-Length", &len)
            },
            Body::File(&open),
            false,
        )?
        .ok_or_else(|| CliError(format!("PUT blob {digest}: 404")))?;
        Ok(Put::Uploaded)
    }

    /// Downloads `what` (`manifests/<ref>` or `blobs/<digest>`) into `out`; returns its
    /// Content-Type.
    pub(crate) fn get(&self, what: &str, accept: &str, out: &Path) -> CliResult<String> {
        let url = self.url(what);
        let resp = self
            .send(
                &format!("GET {url}"),
                |a| a.get(&url).set("Accept", accept),
                Body::Empty,
                true,
            )?
            .ok_or_else(|| CliError(format!("GET {url}: not found")))?;
        let kind = resp.content_type().to_string();
        let mut f =
            std::fs::File::create(out).map_err(|e| CliError(format!("{}: {e}", out.display())))?;
        std::io::copy(&mut resp.into_reader(), &mut f)
            .map_err(|e| CliError(format!("GET {url}: {e}")))?;
        Ok(kind)
    }

    /// Fetches the tagged image's manifest into `tmp` (an index is followed to this machine's
    /// image: linux on its architecture); returns its Content-Type and bytes.
    pub(crate) fn fetch_manifest(&self, tmp: &Path) -> CliResult<(String, Vec<u8>)> {
        const MANIFESTS: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.list.v2+json";
        let mut kind = self.get(&format!("manifests/{}", self.target.tag), MANIFESTS, tmp)?;
        if oci::is_index(&std::fs::read(tmp)?) {
            let index = oci::parse_index(&std::fs::read(tmp)?, &self.target.tag)?;
            let pick = index
                .for_platform(&oci::Platform::host(), &self.target.tag)?
                .digest
                .clone();
            kind = self.get(&format!("manifests/{pick}"), MANIFESTS, tmp)?;
        }
        Ok((kind, std::fs::read(tmp)?))
    }

    /// Fills `buf` from byte `offset` of blob `digest` with one ranged GET (a registry that
    /// answers with more than the range is an error: the point is not to download it whole).
    pub(crate) fn get_range(&self, digest: &str, offset: u64, buf: &mut [u8]) -> CliResult {
        if buf.is_empty() {
            return Ok(());
        }
        let url = self.url(&format!("blobs/{digest}"));
        let range = format!("bytes={}-{}", offset, offset + buf.len() as u64 - 1);
        let resp = self
            .send(
                &format!("GET {url} ({range})"),
                |a| a.get(&url).set("Range", &range),
                Body::Empty,
                true,
            )?
            .ok_or_else(|| CliError(format!("GET {url}: not found")))?;
        let whole = resp.status() != 206
            && resp.header("content-length") != Some(buf.len().to_string().as_str());
        if whole {
            return Err(CliError(format!(
                "GET {url} ({range}): the registry answered {} without the range",
                resp.status()
            )));
        }
        std::io::Read::read_exact(&mut resp.into_reader(), buf)
            .map_err(|e| CliError(format!("GET {url} ({range}): {e}")))
    }

    /// Pulls the tagged image into an OCI image layout at `dir` (tagged with the same tag);
    /// digests are checked by the conversion that reads it.
    pub fn pull(&self, dir: &Path) -> CliResult {
        let blobs = dir.join("blobs/sha256");
        std::fs::create_dir_all(&blobs).map_err(|e| CliError(format!("{}: {e}", dir.display())))?;
        let tmp = dir.join("manifest.tmp");
        let (kind, bytes) = self.fetch_manifest(&tmp)?;
        let digest = format!(
            "sha256:{}",
            hex::encode(sha2::Digest::finalize(sha2::Digest::chain_update(
                sha2::Sha256::default(),
                &bytes
            )))
        );
        std::fs::rename(&tmp, blobs.join(&digest[7..]))?;
        let body = oci::parse_manifest(&bytes, &digest)?;
        for d in std::iter::once(&body.config).chain(&body.layers) {
            let dg = &d.digest;
            let hexpart = dg
                .strip_prefix("sha256:")
                .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or_else(|| CliError(format!("unsupported digest {dg:?}")))?;
            self.get(&format!("blobs/{dg}"), "*/*", &blobs.join(hexpart))?;
        }
        let mut desc = oci::Descriptor::new(
            kind.split(';').next().unwrap_or_default().trim(),
            digest,
            bytes.len() as u64,
        );
        desc.annotations
            .insert(oci::REF_NAME_ANNOTATION.into(), self.target.tag.clone());
        let index = serde_json::to_string(&oci::Index::of(vec![desc]))?;
        std::fs::write(dir.join("index.json"), index)?;
        std::fs::write(dir.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}")?;
        Ok(())
    }

    /// Puts the manifest under the tag.
    pub fn put_manifest(&self, bytes: &[u8], media_type: &str) -> CliResult {
        let url = self.url(&format!("manifests/{}", self.target.tag));
        self.send(
            &format!("PUT {url}"),
            |a| a.put(&url).set("Content-Type", media_type),
            Body::Bytes(bytes),
            true,
        )?
        .ok_or_else(|| CliError(format!("PUT {url}: 404")))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = Target::parse("http://127.0.0.1:5000/lsm/app:v1").expect("parse");
        assert_eq!(
            (t.base.as_str(), t.repository.as_str(), t.tag.as_str()),
            ("http://127.0.0.1:5000", "lsm/app", "v1")
        );
        assert_eq!(t.host(), "127.0.0.1:5000");
        for bad in [
            "127.0.0.1:5000/a:b",
            "ftp://h/a:b",
            "http://h/a",
            "http://h/:t",
            "http:///a:b",
        ] {
            assert!(Target::parse(bad).is_err(), "{bad}");
        }
    }
}
