//! Sources: where layer blob bytes come from. Every source implements `blockfmt::ReadAt`
//! (ranged reads of one blob, plus its size); retries, timeouts and auth live inside it. The
//! layer above checks every chunk, so no source is trusted.
//!
//! - local file: `std::fs::File` itself;
//! - [`nas::NasFile`]: a file on a network mount, with read timeouts and retries;
//! - [`http::HttpBlob`]: a blob over HTTP(S) with Range — in an OCI registry (`/v2/<repo>/blobs/<digest>`, registry auth) or at any URL that honours Range (object storage), with mirrors and an optional P2P agent.
//!
//! - [`ahead::StreamAhead`]: any of them, streaming one range ahead of its reads (a startup
//!   layer's chunks, while the image opens).
//!
//! Each kind builds itself from its config ([`SourceConfig::open`]: [`registry`], [`url`],
//! [`nas`]), so `config` is only the schema and its validation.

pub mod ahead;
pub mod auth;
pub mod http;
pub mod nas;
pub mod redact;
pub mod registry;
pub mod tls;
pub mod url;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::config::{HostServices, SourceConfig};

/// Where a blob is named: what a source needs from the config that names it.
pub struct Site<'a> {
    /// What the blob is called in logs and errors.
    pub name: &'a str,
    /// Its digest (`sha256:…`), when the config gives one (registry blobs need it).
    pub digest: Option<&'a str>,
    /// The config file's directory: relative paths are relative to it.
    pub dir: Option<&'a Path>,
}

impl Site<'_> {
    /// `p` relative to the config's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        match self.dir {
            Some(d) if p.is_relative() => d.join(p),
            _ => p.to_path_buf(),
        }
    }

    /// The CA file a source trusts: its own (relative to the config), else the host's.
    pub fn ca_file(&self, own: Option<&PathBuf>, host: &HostServices) -> Option<PathBuf> {
        own.map(|p| self.resolve(p))
            .or_else(|| host.ca_file.clone())
    }
}

impl SourceConfig {
    /// Opens the blob this source names: each kind builds itself (`registry`, `url`, `nas`; a
    /// local blob is a plain file).
    pub fn open(
        &self,
        site: &Site,
        host: &HostServices,
    ) -> Result<Arc<dyn blockfmt::ReadAt>, blockfmt::Error> {
        let opened = match self {
            SourceConfig::Local(p) => std::fs::File::open(site.resolve(p))
                .map(|f| Arc::new(f) as Arc<dyn blockfmt::ReadAt>),
            SourceConfig::Registry(r) => r.open(site, host),
            SourceConfig::Http(h) => h.open(site, host),
            SourceConfig::Nas(n) => n.open(site, host),
        };
        opened.map_err(|e| blockfmt::Error::Io {
            layer: site.name.to_string(),
            offset: 0,
            source: e,
        })
    }
}

/// The counters of every kind of source a daemon has opened. Each kind registers itself at its
/// first open (`host.sources.register("nas")`), so `/metrics` names exactly the kinds in use and
/// a new kind of source needs no edit in `metrics` or `config`. Cloning shares it.
#[derive(Clone, Default)]
pub struct SourceMetrics(Arc<parking_lot::Mutex<Vec<KindStats>>>);

/// A kind of source and its counters.
pub type KindStats = (&'static str, Arc<SourceStats>);

impl SourceMetrics {
    /// The counters of `kind`, made at its first registration; every blob of the kind shares them.
    pub fn register(&self, kind: &'static str) -> Arc<SourceStats> {
        let mut all = self.0.lock();
        if let Some((_, s)) = all.iter().find(|(k, _)| *k == kind) {
            return s.clone();
        }
        let s = Arc::new(SourceStats::default());
        all.push((kind, s.clone()));
        s
    }

    /// The counters of `kind`, if it was opened.
    pub fn get(&self, kind: &str) -> Option<Arc<SourceStats>> {
        self.0
            .lock()
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, s)| s.clone())
    }

    /// Every registered kind, in registration order.
    pub fn all(&self) -> Vec<KindStats> {
        self.0.lock().clone()
    }
}

/// Upper bounds (seconds) of the fetch latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0];

/// Counters of one kind of source, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct SourceStats {
    /// Reads asked of the source.
    pub requests: AtomicU64,
    /// Bytes returned by it.
    pub bytes: AtomicU64,
    /// Failed attempts (each retry counts).
    pub errors: AtomicU64,
    /// Back-off rounds.
    pub retries: AtomicU64,
    /// Requests on the wire now.
    pub inflight: AtomicI64,
    /// Attempts per latency bucket (last: slower than every bound).
    pub latency: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    /// Sum of attempt latencies, microseconds.
    pub latency_sum_us: AtomicU64,
}

impl SourceStats {
    /// Counts one attempt's latency.
    pub fn observe_latency(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|&b| s <= b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.latency[i].fetch_add(1, Ordering::Relaxed);
        self.latency_sum_us
            .fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }
}
