//! A layer blob read over HTTP(S) with ranged GETs: from an OCI registry
//! (`GET /v2/<name>/blobs/<digest>`, with registry auth — anonymous, basic, bearer token — and
//! redirects to blob storage, credentials not forwarded off the registry) or from any URL that
//! honours Range (object storage). Mirrors tried in order, retries with backoff and jitter
//! until a deadline, per-request timeouts, an optional P2P agent in front. Every byte it returns is checked by the layer above
//! (chunk crc32c + sha256): a source never has to be trusted.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{AuthCache, Credentials, RegistryAuth};
use super::SourceStats;

/// How hard a source tries before a read fails.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Keep retrying a read this long (a registry restart should be ridden out).
    pub give_up_after: Duration,
    /// First back-off; doubles up to `max_backoff`, each with ±50 % jitter.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Timeout of one request (connect + whole body).
    pub request_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            give_up_after: Duration::from_secs(60),
            first_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// One place a blob can be fetched from.
#[derive(Debug, Clone)]
pub struct Mirror {
    /// A registry's `http(s)://host[:port]` (for [`HttpBlob::registry`]), or the blob's whole
    /// URL (for [`HttpBlob::urls`]).
    pub base: String,
    pub credentials: Option<Credentials>,
}

/// A P2P agent used as an HTTP proxy for blob URLs (as Dragonfly's dfdaemon is deployed).
#[derive(Debug, Clone)]
pub struct P2pAgent {
    /// `http://host:port` of the agent's proxy.
    pub proxy: String,
    /// Requests are widened to whole pieces of this size, so every node asks the agent for the
    /// same ranges and an agent that keys its tasks by range shares them between nodes.
    pub piece_size: u64,
}

/// Pieces kept per blob, so neighbouring chunk reads do not ask for the same piece again.
const PIECES_KEPT: usize = 8;
/// How long to go straight to the registry after the agent failed.
const AGENT_RETRY_AFTER: Duration = Duration::from_secs(30);

struct P2pPath {
    agent: ureq::Agent,
    cfg: P2pAgent,
    /// Recently fetched pieces: (piece index, bytes), most recent last.
    pieces: parking_lot::Mutex<Vec<(u64, Arc<Vec<u8>>)>>,
    down_since: parking_lot::Mutex<Option<Instant>>,
}

/// Why one attempt failed.
enum Failure {
    /// Worth another try (5xx, 429, connection trouble, short body).
    Transient(String),
    /// Trying again will not help (404, 403, bad auth, bad request).
    Fatal(String),
}

struct Endpoint {
    url: String,
    auth: Arc<RegistryAuth>,
}

/// A blob in a registry (and its mirrors); implements `blockfmt::ReadAt`.
pub struct HttpBlob {
    name: String,
    endpoints: Vec<Endpoint>,
    agent: ureq::Agent,
    size: u64,
    /// The mirror that answered last; failures move it on, and after a while it goes back to
    /// the first (the preferred one).
    current: AtomicUsize,
    failed_over_at: parking_lot::Mutex<Option<Instant>>,
    policy: RetryPolicy,
    stats: Arc<SourceStats>,
    p2p: Option<P2pPath>,
}

/// How long a failed-over source stays on a later mirror before trying the first again.
const RETURN_AFTER: Duration = Duration::from_secs(30);

impl HttpBlob {
    /// A blob `digest` of `repository` served by `mirrors` (first preferred). `size` saves a
    /// HEAD request when the manifest already says it.
    /// Blobs of one repository share `auths`' state, so one token serves them all.
    #[allow(clippy::too_many_arguments)]
    pub fn registry(
        mirrors: &[Mirror],
        repository: &str,
        digest: &str,
        size: Option<u64>,
        policy: RetryPolicy,
        stats: Arc<SourceStats>,
        auths: &AuthCache,
    ) -> io::Result<HttpBlob> {
        let endpoints = mirrors
            .iter()
            .map(|m| {
                let base = m.base.trim_end_matches('/');
                Endpoint {
                    url: format!("{base}/v2/{repository}/blobs/{digest}"),
                    auth: auths.get(&format!("{base}/{repository}"), m.credentials.clone()),
                }
            })
            .collect();
        HttpBlob::open(
            format!("{digest} ({repository})"),
            endpoints,
            size,
            policy,
            stats,
        )
    }

    /// A blob at each of `urls` (whole URLs, first preferred), called `name` in errors.
    pub fn urls(
        name: String,
        urls: &[Mirror],
        size: Option<u64>,
        policy: RetryPolicy,
        stats: Arc<SourceStats>,
    ) -> io::Result<HttpBlob> {
        let endpoints = urls
            .iter()
            .map(|m| Endpoint {
                url: m.base.clone(),
                auth: Arc::new(RegistryAuth::new(m.credentials.clone())),
            })
            .collect();
        HttpBlob::open(name, endpoints, size, policy, stats)
    }

    fn open(
        name: String,
        endpoints: Vec<Endpoint>,
        size: Option<u64>,
        policy: RetryPolicy,
        stats: Arc<SourceStats>,
    ) -> io::Result<HttpBlob> {
        if endpoints.is_empty() {
            return Err(io::Error::other(format!("{name}: no URL to fetch from")));
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5).min(policy.request_timeout))
            .timeout(policy.request_timeout)
            .max_idle_connections_per_host(16)
            .build();
        let mut blob = HttpBlob {
            name,
            endpoints,
            agent,
            size: size.unwrap_or(0),
            current: AtomicUsize::new(0),
            failed_over_at: parking_lot::Mutex::new(None),
            policy,
            stats,
            p2p: None,
        };
        if size.is_none() {
            blob.size = blob.with_retries(|b, ep| b.head(ep))?;
        }
        Ok(blob)
    }

    /// Sends blob requests through a P2P agent first (see [`P2pAgent`]); falls back to the
    /// registry, with a warning, whenever the agent fails.
    pub fn via_p2p(mut self, cfg: P2pAgent) -> io::Result<HttpBlob> {
        let proxy = ureq::Proxy::new(&cfg.proxy)
            .map_err(|e| io::Error::other(format!("P2P agent {}: {e}", cfg.proxy)))?;
        let agent = ureq::AgentBuilder::new()
            .proxy(proxy)
            .timeout_connect(Duration::from_secs(2))
            .timeout(self.policy.request_timeout)
            .build();
        self.p2p = Some(P2pPath {
            agent,
            cfg,
            pieces: parking_lot::Mutex::new(Vec::new()),
            down_since: parking_lot::Mutex::new(None),
        });
        Ok(self)
    }

    /// Reads through the agent by whole pieces; `None` when the agent is (or just went) down.
    fn read_via_p2p(&self, p: &P2pPath, buf: &mut [u8], off: u64) -> Option<()> {
        if p.down_since
            .lock()
            .is_some_and(|t| t.elapsed() < AGENT_RETRY_AFTER)
        {
            return None;
        }
        let ps = p.cfg.piece_size.max(4096);
        let (first, last) = (off / ps, (off + buf.len() as u64 - 1) / ps);
        let mut done = 0usize;
        for piece in first..=last {
            let cached = p
                .pieces
                .lock()
                .iter()
                .find(|(i, _)| *i == piece)
                .map(|(_, b)| b.clone());
            let bytes = match cached {
                Some(b) => b,
                None => {
                    let start = piece * ps;
                    let mut b = vec![0u8; ps.min(self.size - start) as usize];
                    let ep = &self.endpoints[0];
                    let t0 = Instant::now();
                    let r = self.get_with(&p.agent, ep, &mut b, start);
                    self.stats.observe_latency(t0.elapsed());
                    if let Err(Failure::Transient(e) | Failure::Fatal(e)) = r {
                        tracing::warn!(blob = %self.name, agent = %p.cfg.proxy, error = %e, "P2P agent failed; falling back to the registry");
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        *p.down_since.lock() = Some(Instant::now());
                        return None;
                    }
                    let b = Arc::new(b);
                    let mut kept = p.pieces.lock();
                    kept.push((piece, b.clone()));
                    if kept.len() > PIECES_KEPT {
                        kept.remove(0);
                    }
                    b
                }
            };
            let from = (off + done as u64 - piece * ps) as usize;
            let n = (bytes.len() - from).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[from..from + n]);
            done += n;
        }
        Some(())
    }

    fn request(
        &self,
        agent: &ureq::Agent,
        ep: &Endpoint,
        method: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ureq::Response, Failure> {
        for attempt in 0..2 {
            let mut req = agent.request(method, &ep.url);
            if let Some((off, len)) = range {
                req = req.set("Range", &format!("bytes={}-{}", off, off + len - 1));
            }
            match ep.auth.header(&self.agent) {
                Ok(Some(h)) => req = req.set("Authorization", &h),
                Ok(None) => {}
                Err(e) => return Err(Failure::Transient(e)),
            }
            match req.call() {
                Ok(r) => return Ok(r),
                Err(ureq::Error::Status(401, r)) if attempt == 0 => {
                    if !ep.auth.challenged(r.header("www-authenticate")) {
                        return Err(Failure::Fatal(format!(
                            "{}: 401 unauthorized (no usable credentials)",
                            ep.url
                        )));
                    }
                }
                Err(ureq::Error::Status(code, _)) if code == 429 || code >= 500 => {
                    return Err(Failure::Transient(format!("{}: HTTP {code}", ep.url)))
                }
                Err(ureq::Error::Status(code, _)) => {
                    return Err(Failure::Fatal(format!("{}: HTTP {code}", ep.url)))
                }
                Err(ureq::Error::Transport(t)) => {
                    return Err(Failure::Transient(format!("{}: {t}", ep.url)))
                }
            }
        }
        Err(Failure::Fatal(format!(
            "{}: 401 unauthorized after authenticating",
            ep.url
        )))
    }

    fn head(&self, ep: &Endpoint) -> Result<u64, Failure> {
        let r = self.request(&self.agent, ep, "HEAD", None)?;
        r.header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Failure::Fatal(format!("{}: no Content-Length in HEAD reply", ep.url)))
    }

    fn get(&self, ep: &Endpoint, buf: &mut [u8], off: u64) -> Result<(), Failure> {
        self.get_with(&self.agent, ep, buf, off)
    }

    fn get_with(
        &self,
        agent: &ureq::Agent,
        ep: &Endpoint,
        buf: &mut [u8],
        off: u64,
    ) -> Result<(), Failure> {
        let len = buf.len() as u64;
        let r = self.request(agent, ep, "GET", Some((off, len)))?;
        let status = r.status();
        let ranged_right = r
            .header("content-range")
            .is_some_and(|v| v.trim().starts_with(&format!("bytes {off}-")));
        let mut body = r.into_reader();
        match status {
            206 if ranged_right => {}
            206 => {
                return Err(Failure::Fatal(format!(
                    "{}: 206 reply for another range than bytes {off}-",
                    ep.url
                )))
            }
            200 => {
                // A server that ignores Range sends the whole blob: skip to the offset.
                io::copy(&mut (&mut body).take(off), &mut io::sink())
                    .map_err(|e| Failure::Transient(format!("{}: body: {e}", ep.url)))?;
            }
            s => return Err(Failure::Fatal(format!("{}: unexpected HTTP {s}", ep.url))),
        }
        let mut got = 0;
        while got < buf.len() {
            match body.read(&mut buf[got..]) {
                Ok(0) => {
                    return Err(Failure::Transient(format!(
                        "{}: body ended after {got} of {len} bytes at offset {off}",
                        ep.url
                    )))
                }
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Failure::Transient(format!("{}: body: {e}", ep.url))),
            }
        }
        Ok(())
    }

    /// Runs `op` against the current mirror, failing over and backing off until it succeeds,
    /// fails for good, or the deadline passes.
    fn with_retries<T>(
        &self,
        mut op: impl FnMut(&Self, &Endpoint) -> Result<T, Failure>,
    ) -> io::Result<T> {
        let start = Instant::now();
        let mut backoff = self.policy.first_backoff;
        let n = self.endpoints.len();
        {
            let mut f = self.failed_over_at.lock();
            if f.is_some_and(|t| t.elapsed() > RETURN_AFTER) {
                *f = None;
                self.current.store(0, Ordering::Relaxed);
            }
        }
        loop {
            let mut last = String::new();
            let first = self.current.load(Ordering::Relaxed) % n;
            for k in 0..n {
                let i = (first + k) % n;
                let t0 = Instant::now();
                self.stats.inflight.fetch_add(1, Ordering::Relaxed);
                let r = op(self, &self.endpoints[i]);
                self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
                self.stats.observe_latency(t0.elapsed());
                match r {
                    Ok(v) => {
                        if i != first {
                            tracing::warn!(blob = %self.name, mirror = %self.endpoints[i].url, "failed over to another mirror");
                            self.current.store(i, Ordering::Relaxed);
                            *self.failed_over_at.lock() = Some(Instant::now());
                        }
                        return Ok(v);
                    }
                    Err(Failure::Fatal(e)) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        return Err(io::Error::other(format!("blob {}: {e}", self.name)));
                    }
                    Err(Failure::Transient(e)) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(blob = %self.name, error = %e, "fetch failed; will retry");
                        last = e;
                    }
                }
            }
            if start.elapsed() + backoff > self.policy.give_up_after {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "blob {}: giving up after {:?}: {last}",
                        self.name,
                        start.elapsed()
                    ),
                ));
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(jitter(backoff));
            backoff = (backoff * 2).min(self.policy.max_backoff);
        }
    }
}

/// `d` ± 50 %.
fn jitter(d: Duration) -> Duration {
    let r: f64 = rand::random();
    d.mul_f64(0.5 + r)
}

impl blockfmt::ReadAt for HttpBlob {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        if offset + buf.len() as u64 > self.size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("blob {}: read past its {} bytes", self.name, self.size),
            ));
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let via_agent = self
            .p2p
            .as_ref()
            .and_then(|p| self.read_via_p2p(p, buf, offset));
        if via_agent.is_none() {
            self.with_retries(|b, ep| b.get(ep, buf, offset))?;
        }
        self.stats
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}
