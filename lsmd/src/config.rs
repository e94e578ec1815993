//! The image config (FORMAT.md §4): one JSON file describing an image's size, its layers bottom
//! first, and its upper layer. Loading rejects unknown fields and names the bad field; saving is
//! atomic (write, fsync, rename) so a crash never leaves half a config.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockfmt::format::parse_oci_digest;
use blockfmt::{Image, Layer, LayerStack, UpperLayer};
use serde::{Deserialize, Serialize};

use crate::cache::DiskCache;
use crate::error::{Error, Result};
use crate::source::auth::{AuthCache, Credentials};
use crate::source::http::{Mirror, RetryPolicy};
use crate::source::{Site, SourceMetrics};

/// Where a layer blob's bytes come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SourceConfig {
    /// A local file; relative paths are relative to the config file.
    Local(PathBuf),
    /// A blob in an OCI registry, fetched lazily by ranges (the layer's `digest` names it).
    Registry(RegistryConfig),
    /// A blob at any HTTP(S) URL that honours Range (object storage, presigned URLs).
    Http(HttpConfig),
    /// A blob file on a network filesystem: reads time out and are retried.
    Nas(NasConfig),
}

/// A blob at an HTTP(S) URL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// The blob's URL; `http://` only with `insecure`.
    pub url: String,
    /// URLs of copies, tried in order when `url` fails.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Blob size in bytes, if known (saves a HEAD request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// PEM file of the CA certificates trusted for these URLs (instead of the system's; relative
    /// paths: to the config file). `lsmd serve --registry-ca` gives one for every source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

fn default_nas_timeout_ms() -> u64 {
    5000
}

/// A blob file on a network mount.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NasConfig {
    /// Path of the blob (relative paths: to the config file).
    pub path: PathBuf,
    /// Timeout of one read, milliseconds (reads are retried until the source gives up).
    #[serde(default = "default_nas_timeout_ms")]
    pub read_timeout_ms: u64,
}

/// A registry blob source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// Base URL, `https://host[:port]`; `http://` only with `insecure` (loopback test registries).
    pub url: String,
    /// Repository, e.g. `library/app`.
    pub repository: String,
    /// Mirrors holding the same blobs, tried in order when `url` fails: base URLs, or
    /// `{"url", "username", "password"}` objects. The registry's credentials are never sent to a
    /// mirror: a mirror gets its own, or those a docker `config.json` gives for its host.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<MirrorConfig>,
    /// Hosts (`host[:port]`) of token servers, other than the registry and its mirrors, that
    /// may receive the credentials when a Bearer challenge names them as its realm.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub token_hosts: Vec<String>,
    /// PEM file of the CA certificates trusted for the registry, its mirrors and token servers
    /// (instead of the system's; relative paths: to the config file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// Allow plain HTTP.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub insecure: bool,
    /// Credentials; without them, a docker-style `config.json` is consulted, then anonymous.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Blob size in bytes, if known (saves a HEAD request).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// A P2P agent to fetch through first (its HTTP proxy); the registry is the fallback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub p2p: Option<P2pConfig>,
}

/// A registry mirror: its base URL, with credentials of its own if it needs them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum MirrorConfig {
    Url(String),
    WithCredentials(MirrorCredentials),
}

/// A mirror with its own credentials.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MirrorCredentials {
    pub url: String,
    pub username: String,
    pub password: String,
}

impl MirrorConfig {
    /// The mirror's base URL.
    pub fn url(&self) -> &String {
        match self {
            MirrorConfig::Url(u)
            | MirrorConfig::WithCredentials(MirrorCredentials { url: u, .. }) => u,
        }
    }
}

fn default_piece_size() -> u64 {
    4 << 20
}

/// A P2P agent (e.g. Dragonfly's dfdaemon) used as an HTTP proxy for blob URLs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct P2pConfig {
    /// The agent's proxy, `http://host:port`.
    pub proxy: String,
    /// Range requests are widened to whole pieces of this size (default 4 MiB, Dragonfly's).
    #[serde(default = "default_piece_size")]
    pub piece_size: u64,
}

/// `https://…`, or `http://…` when `insecure` allows it.
fn check_urls<'a>(
    urls: impl IntoIterator<Item = &'a String>,
    insecure: bool,
) -> std::result::Result<(), String> {
    for u in urls {
        if u.starts_with("http://") && !insecure {
            return Err(format!("{u}: plain HTTP needs \"insecure\": true"));
        }
        if !u.starts_with("http://") && !u.starts_with("https://") {
            return Err(format!("{u}: not an http(s) URL"));
        }
    }
    Ok(())
}

impl RegistryConfig {
    fn check(&self) -> std::result::Result<(), String> {
        check_urls(
            std::iter::once(&self.url).chain(self.mirrors.iter().map(MirrorConfig::url)),
            self.insecure,
        )?;
        if self.repository.is_empty() {
            return Err("repository is empty".into());
        }
        if let Some(p) = &self.p2p {
            if !p.proxy.starts_with("http://") {
                return Err(format!("p2p.proxy {}: not an http:// URL", p.proxy));
            }
            if !(4096..=1 << 30).contains(&p.piece_size) {
                return Err("p2p.piece_size: must be 4096..=1 GiB".into());
            }
        }
        Ok(())
    }

    /// The registry and its mirrors, each with the credentials that apply to it: the
    /// registry's own (else a docker `config.json`'s for its host) for the registry; for a
    /// mirror, its own (else `config.json`'s for the mirror's host) — never the registry's.
    pub fn mirrors(&self) -> Vec<Mirror> {
        let registry = Mirror {
            base: self.url.clone(),
            credentials: match (&self.username, &self.password) {
                (Some(u), Some(p)) => Some(Credentials {
                    username: u.clone(),
                    password: p.clone(),
                }),
                _ => Credentials::from_docker_config(&crate::source::redact::host_of(&self.url)),
            },
        };
        let mirrors = self.mirrors.iter().map(|m| Mirror {
            base: m.url().clone(),
            credentials: match m {
                MirrorConfig::WithCredentials(c) => Some(Credentials {
                    username: c.username.clone(),
                    password: c.password.clone(),
                }),
                MirrorConfig::Url(u) => {
                    Credentials::from_docker_config(&crate::source::redact::host_of(u))
                }
            },
        });
        std::iter::once(registry).chain(mirrors).collect()
    }

    /// Hosts trusted with this registry's credentials: its own, its mirrors', `token_hosts`.
    pub fn credential_hosts(&self) -> Vec<String> {
        std::iter::once(&self.url)
            .chain(self.mirrors.iter().map(MirrorConfig::url))
            .map(|u| crate::source::redact::host_of(u))
            .chain(self.token_hosts.iter().cloned())
            .collect()
    }
}

/// What every image opened by one daemon shares: the host cache of fetched chunks, the
/// counters of its sources, how hard remote sources retry.
#[derive(Clone, Default)]
pub struct HostServices {
    pub cache: Option<Arc<DiskCache>>,
    /// Counters of each kind of source, registered by the kind at its first open.
    pub sources: SourceMetrics,
    pub retry: RetryPolicy,
    /// Registry auth state (tokens) shared by all layers of a repository.
    pub registry_auth: AuthCache,
    /// Open remote layers that have no `meta_digest` (`lsmd serve --allow-unverified`), with a
    /// warning at every open. Off: such a layer is refused.
    pub allow_unverified: bool,
    /// CA certificates (PEM) trusted for HTTPS sources that name no `ca_file` of their own
    /// (`lsmd serve --registry-ca`); without either, the system's.
    pub ca_file: Option<PathBuf>,
}

/// One layer of the stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerConfig {
    pub source: SourceConfig,
    /// OCI digest of the whole blob (`sha256:…`), checked by `lsmctl verify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Metadata digest (`sha256:…`), checked at every open. Required of every remote layer
    /// and dictionary blob (registry, http, nas): it is what ties the bytes fetched to the
    /// manifest (FORMAT.md §4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_digest: Option<String>,
    /// Stored length of the blob's metadata section (the `io.lsm.layer.meta-len`
    /// annotation): the open then reads exactly the metadata and trailer in one request, no
    /// chunk bytes. Only a hint: a wrong one costs a second read, the digests still decide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_len: Option<u64>,
}

fn default_chunk_size() -> u32 {
    blockfmt::writer::DEFAULT_CHUNK_SIZE
}
fn default_level() -> i32 {
    blockfmt::chunk::DEFAULT_LEVEL
}
fn default_cache() -> usize {
    blockfmt::stack::DEFAULT_CACHE_BYTES
}
// Defaults are not written out, so a config written by one build keeps following the defaults
// of the build that reads it.
fn is_default_chunk_size(v: &u32) -> bool {
    *v == default_chunk_size()
}
fn is_default_level(v: &i32) -> bool {
    *v == default_level()
}
fn is_default_cache(v: &usize) -> bool {
    *v == default_cache()
}

/// An image config; see the module docs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageConfig {
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Layers, bottom first.
    #[serde(default)]
    pub layers: Vec<LayerConfig>,
    /// Upper layer directory; absent = read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upper: Option<PathBuf>,
    /// Chunk window for layers committed from this image.
    #[serde(
        default = "default_chunk_size",
        skip_serializing_if = "is_default_chunk_size"
    )]
    pub chunk_size: u32,
    /// zstd level for committed layers; 0 = store uncompressed.
    #[serde(default = "default_level", skip_serializing_if = "is_default_level")]
    pub compression_level: i32,
    /// Bound of the in-memory decoded-chunk cache, bytes.
    #[serde(default = "default_cache", skip_serializing_if = "is_default_cache")]
    pub cache_bytes: usize,
    /// Blobs the layers borrow chunks from (their blob tables: cross-image dedup, FORMAT.md
    /// §1.7), found by digest. Not stacked: only the chunks the layers name are read from them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dictionary: Vec<LayerConfig>,
    /// A startup trace shipped with the image (FORMAT.md §6, made by `lsmctl trace bake`): a
    /// blob found like a layer (`source`) and checked against `digest` before use; lsmd
    /// prefetches in its order at open unless the node has its own `<config>.trace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace: Option<LayerConfig>,
    /// A startup layer shipped with the image (FORMAT.md §9, made by `lsmctl trace bake`
    /// beside `trace`): the blocks the baked start read, packed in first-read order. Fetched
    /// whole and checked against `digest` and against the binding in the trace (the exact
    /// layer chain it was read from) before it is stacked over the layers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub startup: Option<LayerConfig>,
}

impl ImageConfig {
    /// A config with defaults for everything but size, layers and upper.
    pub fn new(size: u64, layers: Vec<LayerConfig>, upper: Option<PathBuf>) -> Self {
        ImageConfig {
            size,
            layers,
            upper,
            chunk_size: default_chunk_size(),
            compression_level: default_level(),
            cache_bytes: default_cache(),
            dictionary: Vec::new(),
            trace: None,
            startup: None,
        }
    }

    /// Reads and checks a config file.
    pub fn load(path: &Path) -> Result<ImageConfig> {
        let bad = |detail: String| Error::Config {
            path: path.to_path_buf(),
            detail,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let c: ImageConfig = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
        c.check().map_err(bad)?;
        Ok(c)
    }

    /// Checks the fields serde cannot.
    pub fn check(&self) -> std::result::Result<(), String> {
        if self.size == 0 {
            return Err("field `size`: must be greater than 0".into());
        }
        blockfmt::format::check_chunk_size(self.chunk_size)
            .map_err(|e| format!("field `chunk_size`: {e}"))?;
        if !(0..=22).contains(&self.compression_level) {
            return Err("field `compression_level`: must be 0 (none) or 1..=22".into());
        }
        let layers = self.layers.iter().map(|l| ("layers", l));
        let dict = self.dictionary.iter().map(|l| ("dictionary", l));
        let mut n = std::collections::HashMap::new();
        for (field, l) in layers.chain(dict) {
            let i = n.entry(field).or_insert(0usize);
            check_layer(field, *i, l, field == "dictionary")?;
            *i += 1;
        }
        for (field, t) in [("trace", &self.trace), ("startup", &self.startup)] {
            if let Some(t) = t {
                check_layer(field, 0, t, true)
                    .map_err(|e| e.replace(&format!("{field}[0]"), field))?;
            }
        }
        Ok(())
    }

    /// Writes the config atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut text = serde_json::to_string_pretty(self).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
        text.push('\n');
        let tmp = path.with_extension("json.tmp");
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            f.write_all(text.as_bytes()).map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Some(d) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(d)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }

    /// Compression settings for layers written from this image.
    pub fn writer_options(&self) -> blockfmt::WriterOptions {
        blockfmt::WriterOptions {
            chunk_size: self.chunk_size,
            compression: match self.compression_level {
                0 => blockfmt::Compression::None,
                l => blockfmt::Compression::Zstd(l),
            },
            ..Default::default()
        }
    }
}

/// Checks one entry of `layers` or `dictionary` (`field`), naming `field[i]` in errors. A
/// dictionary entry is found by its digest, so it must have one.
fn check_layer(
    field: &str,
    i: usize,
    l: &LayerConfig,
    needs_digest: bool,
) -> std::result::Result<(), String> {
    if needs_digest && l.digest.is_none() {
        return Err(format!(
            "field `{field}[{i}].digest`: a dictionary blob needs its digest"
        ));
    }
    match &l.source {
        SourceConfig::Registry(r) => {
            r.check()
                .map_err(|e| format!("field `{field}[{i}].source.registry`: {e}"))?;
            if l.digest.is_none() {
                return Err(format!(
                    "field `{field}[{i}].digest`: a registry layer needs its blob digest"
                ));
            }
        }
        SourceConfig::Http(h) => {
            check_urls(std::iter::once(&h.url).chain(&h.mirrors), h.insecure)
                .map_err(|e| format!("field `{field}[{i}].source.http`: {e}"))?;
        }
        SourceConfig::Nas(n) if n.read_timeout_ms == 0 => {
            return Err(format!(
                "field `{field}[{i}].source.nas.read_timeout_ms`: must be > 0"
            ));
        }
        _ => {}
    }
    for (name, d) in [("digest", &l.digest), ("meta_digest", &l.meta_digest)] {
        if let Some(d) = d {
            parse_oci_digest(d).map_err(|e| format!("field `{field}[{i}].{name}`: {e}"))?;
        }
    }
    Ok(())
}

/// An image config together with where it lives (relative paths resolve against its folder).
#[derive(Debug, Clone)]
pub struct ImageSpec {
    pub path: PathBuf,
    pub config: ImageConfig,
}

impl ImageSpec {
    /// Loads the config at `path`.
    pub fn load(path: &Path) -> Result<ImageSpec> {
        Ok(ImageSpec {
            path: path.to_path_buf(),
            config: ImageConfig::load(path)?,
        })
    }

    /// Resolves a path from the config.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        match self.path.parent() {
            Some(d) if p.is_relative() => d.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// What layer `i` is called in logs and errors: its path, or its digest and repository.
    pub fn layer_name(&self, i: usize) -> String {
        match self.config.layers.get(i) {
            Some(l) => self.source_name(l),
            None => format!("layer {i}"),
        }
    }

    /// What a layer or dictionary blob is called in logs and errors.
    pub fn source_name(&self, l: &LayerConfig) -> String {
        match &l.source {
            SourceConfig::Local(p) | SourceConfig::Nas(NasConfig { path: p, .. }) => {
                self.resolve(p).display().to_string()
            }
            SourceConfig::Http(h) => crate::source::redact::url(&h.url),
            SourceConfig::Registry(r) => format!(
                "{} in {}/{}",
                l.digest.as_deref().unwrap_or("?"),
                crate::source::redact::url(&r.url),
                r.repository
            ),
        }
    }

    /// The upper layer directory, if any.
    pub fn upper_dir(&self) -> Option<PathBuf> {
        self.config.upper.as_ref().map(|p| self.resolve(p))
    }

    /// Every layer ([`Self::open_layer`]), bottom first, opened in parallel; the first failure
    /// (bottom first) is the error.
    pub fn open_layers(&self, host: &HostServices) -> Result<Vec<Layer>> {
        let n = self.config.layers.len();
        if n < 2 {
            return (0..n).map(|i| self.open_layer(i, host)).collect();
        }
        std::thread::scope(|s| {
            let opens: Vec<_> = (0..n)
                .map(|i| s.spawn(move || self.open_layer(i, host)))
                .collect();
            opens
                .into_iter()
                .enumerate()
                .map(|(i, h)| {
                    h.join().unwrap_or_else(|_| {
                        Err(Error::Config {
                            path: self.path.clone(),
                            detail: format!("opening layer {i} panicked"),
                        })
                    })
                })
                .collect()
        })
    }

    /// Opens layer `i` with the host's cache and source settings, checking its metadata digest
    /// if the config gives one. The blobs the layer borrows chunks from are opened too, from the
    /// config's `dictionary` (or its layers), by digest; each must have the size the layer's
    /// blob table says.
    pub fn open_layer(&self, i: usize, host: &HostServices) -> Result<Layer> {
        let Some(l) = self.config.layers.get(i) else {
            return Err(Error::Config {
                path: self.path.clone(),
                detail: format!("no layer {i}"),
            });
        };
        let name = self.layer_name(i);
        let wrap = |source| Error::Layer {
            index: i,
            path: PathBuf::from(&name),
            source,
        };
        let mut layer = self.open_entry("layers", i, l, &name, host)?;
        let borrowed = layer.metadata().blobs.clone();
        for (k, b) in borrowed.iter().enumerate() {
            let digest = blockfmt::format::oci_digest(&b.sha256);
            let entry = self
                .config
                .dictionary
                .iter()
                .chain(&self.config.layers)
                .find(|d| d.digest.as_deref() == Some(digest.as_str()))
                .ok_or_else(|| Error::Config {
                    path: self.path.clone(),
                    detail: format!(
                        "layer {i} ({name}) borrows chunks from blob {digest}, which the \
                         config's `dictionary` does not list"
                    ),
                })?;
            let dname = self.source_name(entry);
            let (field, index) = match self
                .config
                .dictionary
                .iter()
                .position(|d| std::ptr::eq(d, entry))
            {
                Some(k) => ("dictionary", k),
                None => (
                    "layers",
                    self.config
                        .layers
                        .iter()
                        .position(|d| std::ptr::eq(d, entry))
                        .unwrap_or(0),
                ),
            };
            self.check_anchored(field, index, entry, &dname, host)?;
            let dsrc = self.open_source(entry, &dname, host).map_err(wrap)?;
            let size = dsrc.size().map_err(|e| {
                wrap(blockfmt::Error::Io {
                    layer: format!("dictionary blob {dname}"),
                    offset: 0,
                    source: e,
                })
            })?;
            if size != b.size {
                return Err(wrap(blockfmt::Error::Invalid(format!(
                    "dictionary blob {dname} is {size} bytes; the layer's blob table says {}",
                    b.size
                ))));
            }
            layer.attach_blob(k as u32 + 1, dsrc).map_err(wrap)?;
        }
        Ok(match &host.cache {
            Some(c) => layer.with_store(c.clone()),
            None => layer,
        })
    }

    /// Opens dictionary blob `k` as a layer (to verify or inspect it; reading goes through the
    /// layers that borrow from it).
    pub fn open_dictionary(&self, k: usize) -> Result<Layer> {
        let Some(d) = self.config.dictionary.get(k) else {
            return Err(Error::Config {
                path: self.path.clone(),
                detail: format!("no dictionary blob {k}"),
            });
        };
        self.open_entry(
            "dictionary",
            k,
            d,
            &self.source_name(d),
            &HostServices::default(),
        )
    }

    /// Opens a layer or dictionary blob as a layer (entry `index` of list `field`, `name` for
    /// errors), checking its metadata digest (required of a remote blob: see
    /// [`Self::check_anchored`]).
    fn open_entry(
        &self,
        field: &str,
        index: usize,
        l: &LayerConfig,
        name: &str,
        host: &HostServices,
    ) -> Result<Layer> {
        let wrap = |source| Error::Layer {
            index,
            path: PathBuf::from(name),
            source,
        };
        self.check_anchored(field, index, l, name, host)?;
        let src = self.open_source(l, name, host).map_err(wrap)?;
        let meta = l
            .meta_digest
            .as_deref()
            .map(parse_oci_digest)
            .transpose()
            .map_err(|detail| Error::Config {
                path: self.path.clone(),
                detail,
            })?;
        Layer::open_with_hint(name, src, meta, l.meta_len).map_err(wrap)
    }

    /// Refuses a remote blob (registry, http, nas) without `meta_digest`: nothing would tie
    /// the bytes a server sends to the manifest — the layer's own metadata, which every chunk
    /// is checked against, would come from that server too. `--allow-unverified` lets it open,
    /// with a warning every time.
    fn check_anchored(
        &self,
        field: &str,
        index: usize,
        l: &LayerConfig,
        name: &str,
        host: &HostServices,
    ) -> Result<()> {
        if l.meta_digest.is_some() || matches!(l.source, SourceConfig::Local(_)) {
            return Ok(());
        }
        if host.allow_unverified {
            tracing::warn!(layer = %name, "{field}[{index}] is a remote blob without meta_digest: its bytes are NOT verified against the manifest (--allow-unverified)");
            return Ok(());
        }
        Err(Error::Config {
            path: self.path.clone(),
            detail: format!(
                "field `{field}[{index}].meta_digest`: remote blob {name} has none, so nothing \
                 ties its bytes to the manifest; refusing it (write it with `lsmctl convert` or \
                 `lsmctl create`, or serve with --allow-unverified)"
            ),
        })
    }

    /// Opens where a layer's, dictionary's or trace blob's bytes come from (`name` is for
    /// errors).
    pub fn open_source(
        &self,
        l: &LayerConfig,
        name: &str,
        host: &HostServices,
    ) -> std::result::Result<Arc<dyn blockfmt::ReadAt>, blockfmt::Error> {
        let site = Site {
            name,
            digest: l.digest.as_deref(),
            dir: self.path.parent(),
        };
        l.source.open(&site, host)
    }

    /// Opens the whole image on the host's cache and source settings (the one way an image is
    /// opened: `lsmd serve`, `lsmctl`, tests). With `writable`, opens (or creates) the upper
    /// layer too; without, an existing upper layer is shown but not written.
    /// The layers are opened at once, one thread each (a remote layer's open waits for its
    /// metadata: one round trip and a transfer each, which need not add up).
    pub fn open_image(&self, writable: bool, host: &HostServices) -> Result<Image> {
        self.open_image_with(writable, host, |_| None)
    }

    /// [`Self::open_image`], with a read-only layer `top` may give (seeing the opened layers,
    /// bottom first) stacked over them, below the upper layer: a startup layer (FORMAT.md §9),
    /// whose blocks equal what the layers below hold there. It is stacked fallible
    /// (`LayerStack::with_fallible_top`): a chunk of it that fails refuses it, and the layers
    /// below answer.
    pub fn open_image_with(
        &self,
        writable: bool,
        host: &HostServices,
        top: impl FnOnce(&[Layer]) -> Option<Layer>,
    ) -> Result<Image> {
        let mut layers = self.open_layers(host)?;
        let fallible_top = match top(&layers) {
            Some(t) => {
                layers.push(t);
                true
            }
            None => false,
        };
        let stack = LayerStack::new(layers, self.config.size, self.config.cache_bytes)?;
        // A read of the top layer's that fails reads the layers below instead.
        let stack = match fallible_top {
            true => stack.with_fallible_top()?,
            false => stack,
        };
        // Read-only still shows what an existing upper layer holds; it only refuses writes.
        let upper = match self.upper_dir() {
            Some(dir) if writable => Some(UpperLayer::open(&dir, self.config.size)?.0),
            Some(dir) if dir.join(blockfmt::upper::LOG_FILE).exists() => {
                Some(UpperLayer::open_read_only(&dir, self.config.size)?.0)
            }
            _ => None,
        };
        let image = Image::new(stack, upper)?;
        Ok(if writable {
            image
        } else {
            image.read_only_view()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_configs_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        for (text, want) in [
            (r#"{"size": 0}"#, "size"),
            (r#"{"size": 1, "layrs": []}"#, "layrs"),
            (r#"{"size": 1, "chunk_size": 1000}"#, "chunk_size"),
            (
                r#"{"size": 1, "layers": [{"source": {"ftp": "x"}}]}"#,
                "ftp",
            ),
            (
                r#"{"size": 1, "layers": [{"source": {"local": "x"}, "digest": "md5:1"}]}"#,
                "layers[0].digest",
            ),
            (r#"{"size": "#, "EOF"),
            (
                r#"{"size": 1, "dictionary": [{"source": {"local": "x"}}]}"#,
                "dictionary[0].digest",
            ),
            (
                r#"{"size": 1, "layers": [{"source": {"registry": {"url": "http://r", "repository": "a"}}, "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
                "insecure",
            ),
            (
                r#"{"size": 1, "layers": [{"source": {"registry": {"url": "https://r", "repository": "a"}}}]}"#,
                "layers[0].digest",
            ),
            (
                r#"{"size": 1, "layers": [{"source": {"http": {"url": "ftp://x"}}}]}"#,
                "layers[0].source.http",
            ),
            (
                r#"{"size": 1, "layers": [{"source": {"registry": {"url": "https://r", "repository": "a", "p2p": {"proxy": "socks://p"}}}, "digest": "sha256:0000000000000000000000000000000000000000000000000000000000000000"}]}"#,
                "p2p.proxy",
            ),
            (
                r#"{"size": 1, "layers": [{"source": {"nas": {"path": "x", "read_timeout_ms": 0}}}]}"#,
                "read_timeout_ms",
            ),
        ] {
            std::fs::write(&p, text).unwrap();
            let e = ImageConfig::load(&p).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("c.json"), "{text}: {e}");
        }
    }

    #[test]
    fn save_and_load_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        let c = ImageConfig::new(
            1 << 20,
            vec![LayerConfig {
                source: SourceConfig::Local("a.blob".into()),
                digest: None,
                meta_digest: None,
                meta_len: None,
            }],
            Some("upper".into()),
        );
        c.save(&p).unwrap();
        assert_eq!(ImageConfig::load(&p).unwrap(), c);
    }
}
