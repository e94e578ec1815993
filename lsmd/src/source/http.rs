//! A layer blob read over HTTP(S) with ranged GETs: from an OCI registry
//! (`GET /v2/<name>/blobs/<digest>`, with registry auth — anonymous, basic, bearer token — and
//! redirects to blob storage, credentials not forwarded off the registry) or from any URL that
//! honours Range (object storage). Mirrors tried in order, retries with backoff and jitter
//! until a deadline, per-request timeouts, an optional P2P agent in front. Every byte it returns
//! is checked by the layer above (chunk crc32c + sha256): a source never has to be trusted.
//!
//! A server that answers wrongly is dropped for that read, and the next mirror asked, at once:
//! a reply for another range than asked (206 with a `Content-Range` that does not match), the
//! whole blob for a ranged request (200: only a read from offset 0 takes the start of such a
//! stream; any other fails naming the server instead of downloading the blob's prefix), 403 and
//! 404 (a mirror that lacks the blob), a 401 sent by a redirect target (not the registry's
//! challenge), a TLS certificate that does not verify. Only trouble that may pass (5xx, 429,
//! connection errors, short bodies) is retried with back-off until the deadline, honouring a
//! `Retry-After` of at most [`MAX_RETRY_AFTER`]. Bytes that fail the layer's check are fetched
//! once more from the next source ([`blockfmt::ReadAt::read_again_at`]).
//!
//! Errors and logs name servers by [`redact::url`]: no query string (presigned URLs), no
//! userinfo, no tokens.
//!
//! Concurrency: one `HttpBlob` serves concurrent reads; the mirror in use and the P2P pieces
//! are behind short locks never held across a request.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{AuthCache, Credentials, RegistryAuth};
use super::registry::{self, RequestError};
use super::{redact, SourceStats};

/// The longest `Retry-After` honoured; a server asking for more is waited on this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(30);

/// How the HTTP client of a source is set up.
#[derive(Clone, Default)]
pub struct ClientOptions {
    /// Trust roots for HTTPS (`None`: the system's).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Hosts, besides each endpoint's own, a token realm may be on to get the credentials.
    pub credential_hosts: Vec<String>,
}

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
    /// Worth another try (5xx, 429, connection trouble, short body), after the server's
    /// `Retry-After` if it gave one.
    Transient(String, Option<Duration>),
    /// This server will not give the right answer for this read (404, 403, bad auth, a reply
    /// for other bytes, a bad certificate): the next mirror is asked at once.
    Fatal(String),
}

struct Endpoint {
    url: String,
    /// `url` as errors and logs show it (see [`redact::url`]).
    shown: String,
    auth: Arc<RegistryAuth>,
}

impl Endpoint {
    fn new(url: String, auth: Arc<RegistryAuth>) -> Endpoint {
        Endpoint {
            shown: redact::url(&url),
            url,
            auth,
        }
    }
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
    /// Trust roots of the P2P path too (it tunnels HTTPS through the agent).
    tls: Option<Arc<rustls::ClientConfig>>,
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
        client: &ClientOptions,
    ) -> io::Result<HttpBlob> {
        let endpoints = mirrors
            .iter()
            .map(|m| {
                let base = m.base.trim_end_matches('/');
                let auth = auths.get(
                    base,
                    repository,
                    m.credentials.clone(),
                    &client.credential_hosts,
                );
                Endpoint::new(format!("{base}/v2/{repository}/blobs/{digest}"), auth)
            })
            .collect();
        let name = format!("{digest} ({repository})");
        HttpBlob::open(name, endpoints, size, policy, stats, client)
    }

    /// A blob at each of `urls` (whole URLs, first preferred), called `name` in errors.
    pub fn urls(
        name: String,
        urls: &[Mirror],
        size: Option<u64>,
        policy: RetryPolicy,
        stats: Arc<SourceStats>,
        client: &ClientOptions,
    ) -> io::Result<HttpBlob> {
        let endpoints = urls
            .iter()
            .map(|m| {
                let auth =
                    RegistryAuth::new(m.credentials.clone(), &m.base, &client.credential_hosts);
                Endpoint::new(m.base.clone(), Arc::new(auth))
            })
            .collect();
        HttpBlob::open(name, endpoints, size, policy, stats, client)
    }

    fn open(
        name: String,
        endpoints: Vec<Endpoint>,
        size: Option<u64>,
        policy: RetryPolicy,
        stats: Arc<SourceStats>,
        client: &ClientOptions,
    ) -> io::Result<HttpBlob> {
        if endpoints.is_empty() {
            return Err(io::Error::other(format!("{name}: no URL to fetch from")));
        }
        let mut builder = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5).min(policy.request_timeout))
            .timeout(policy.request_timeout)
            .max_idle_connections_per_host(16);
        if let Some(t) = &client.tls {
            builder = builder.tls_config(t.clone());
        }
        let mut blob = HttpBlob {
            name,
            endpoints,
            agent: builder.build(),
            size: size.unwrap_or(0),
            current: AtomicUsize::new(0),
            failed_over_at: parking_lot::Mutex::new(None),
            policy,
            stats,
            p2p: None,
            tls: client.tls.clone(),
        };
        if size.is_none() {
            blob.size = blob.with_retries(None, |b, ep| b.head(ep))?;
        }
        Ok(blob)
    }

    /// Sends blob requests through a P2P agent first (see [`P2pAgent`]); falls back to the
    /// registry, with a warning, whenever the agent fails.
    pub fn via_p2p(mut self, cfg: P2pAgent) -> io::Result<HttpBlob> {
        let proxy = ureq::Proxy::new(&cfg.proxy)
            .map_err(|e| io::Error::other(format!("P2P agent {}: {e}", cfg.proxy)))?;
        let mut builder = ureq::AgentBuilder::new()
            .proxy(proxy)
            .timeout_connect(Duration::from_secs(2))
            .timeout(self.policy.request_timeout);
        if let Some(t) = &self.tls {
            builder = builder.tls_config(t.clone());
        }
        self.p2p = Some(P2pPath {
            agent: builder.build(),
            cfg,
            pieces: parking_lot::Mutex::new(Vec::new()),
            down_since: parking_lot::Mutex::new(None),
        });
        Ok(self)
    }

    /// Forgets the pieces the agent sent for `off..off + len` (they failed a check).
    fn drop_pieces(p: &P2pPath, off: u64, len: u64) {
        let ps = p.cfg.piece_size.max(4096);
        let (first, last) = (off / ps, (off + len.max(1) - 1) / ps);
        p.pieces.lock().retain(|(i, _)| *i < first || *i > last);
    }

    /// One piece through the agent (kept, or fetched and kept); `None` when the agent failed.
    fn p2p_piece(&self, p: &P2pPath, piece: u64, ps: u64) -> Option<Arc<Vec<u8>>> {
        let kept = p.pieces.lock();
        if let Some((_, b)) = kept.iter().find(|(i, _)| *i == piece) {
            return Some(b.clone());
        }
        drop(kept);
        let start = piece * ps;
        let mut b = vec![0u8; ps.min(self.size - start) as usize];
        let ep = &self.endpoints[0];
        let t0 = Instant::now();
        let r = self.get_with(&p.agent, ep, &mut b, start);
        self.stats.observe_latency(t0.elapsed());
        if let Err(Failure::Transient(e, _) | Failure::Fatal(e)) = r {
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
        Some(b)
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
            let bytes = self.p2p_piece(p, piece, ps)?;
            let from = (off + done as u64 - piece * ps) as usize;
            let n = (bytes.len().saturating_sub(from)).min(buf.len() - done);
            buf[done..done + n].copy_from_slice(&bytes[from..from + n]);
            done += n;
        }
        (done == buf.len()).then_some(())
    }

    fn request(
        &self,
        agent: &ureq::Agent,
        ep: &Endpoint,
        method: &str,
        range: Option<(u64, u64)>,
    ) -> Result<ureq::Response, Failure> {
        let r = registry::send(
            agent,
            &ep.auth,
            &ep.url,
            |a| {
                let req = a.request(method, &ep.url);
                match range {
                    Some((off, len)) => {
                        req.set("Range", &format!("bytes={}-{}", off, off + len - 1))
                    }
                    None => req,
                }
            },
            &registry::Body::Empty,
        );
        r.map_err(|e| {
            let text = match &e {
                RequestError::Transport(_) if !e.is_transient() => format!(
                    "{}: {e} (is the server's CA in the source's `ca_file` or lsmd's \
                     --registry-ca?)",
                    ep.shown
                ),
                _ => format!("{}: {e}", ep.shown),
            };
            match e.is_transient() {
                true => Failure::Transient(text, e.retry_after()),
                false => Failure::Fatal(text),
            }
        })
    }

    fn head(&self, ep: &Endpoint) -> Result<u64, Failure> {
        let r = self.request(&self.agent, ep, "HEAD", None)?;
        r.header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| Failure::Fatal(format!("{}: no Content-Length in HEAD reply", ep.shown)))
    }

    fn get(&self, ep: &Endpoint, buf: &mut [u8], off: u64) -> Result<(), Failure> {
        self.get_with(&self.agent, ep, buf, off)
    }

    /// Fills `buf` from `off` with one ranged GET; a reply for other bytes is refused at once.
    fn get_with(
        &self,
        agent: &ureq::Agent,
        ep: &Endpoint,
        buf: &mut [u8],
        off: u64,
    ) -> Result<(), Failure> {
        let len = buf.len() as u64;
        let r = self.request(agent, ep, "GET", Some((off, len)))?;
        self.check_reply(ep, &r, off, len)?;
        let mut body = r.into_reader().take(len);
        let mut got = 0;
        while got < buf.len() {
            match body.read(&mut buf[got..]) {
                Ok(0) => return Err(body_ended(ep, got as u64, len, off)),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(body_failed(ep, &e)),
            }
        }
        Ok(())
    }

    /// Streams `len` bytes from `off` with one ranged GET, handing `sink` each piece as it
    /// arrives and counting them in `done` (so that a retry asks only for the rest); `Ok(false)`
    /// when the sink asked to stop. A reply for other bytes is refused at once.
    fn get_stream(
        &self,
        ep: &Endpoint,
        (off, len): (u64, u64),
        done: &mut u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> Result<bool, Failure> {
        let r = self.request(&self.agent, ep, "GET", Some((off, len)))?;
        self.check_reply(ep, &r, off, len)?;
        let mut body = r.into_reader().take(len);
        let mut buf = vec![0u8; STREAM_READ.min(len) as usize];
        let mut got = 0u64;
        while got < len {
            match body.read(&mut buf) {
                Ok(0) => return Err(body_ended(ep, got, len, off)),
                Ok(n) => {
                    got += n as u64;
                    *done += n as u64;
                    if !sink(&buf[..n]) {
                        return Ok(false);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(body_failed(ep, &e)),
            }
        }
        Ok(true)
    }

    /// Whether reply `r` to a GET of `len` bytes from `off` carries exactly those bytes: a
    /// 206 for that range, or — for a read from offset 0 only — a 200 with the whole blob,
    /// whose start they are. Anything else fails for good at this server.
    fn check_reply(
        &self,
        ep: &Endpoint,
        r: &ureq::Response,
        off: u64,
        len: u64,
    ) -> Result<(), Failure> {
        let end = off + len - 1;
        match r.status() {
            206 => {
                let got = r.header("content-range").unwrap_or("(none)");
                if !content_range_matches(got, off, end, self.size) {
                    return Err(Failure::Fatal(format!(
                        "{}: asked for bytes {off}-{end}, got a 206 with Content-Range {got:?}",
                        ep.shown
                    )));
                }
            }
            // A server that ignores Range sends the whole blob: its start is what a read from
            // offset 0 wants; for any other, refuse rather than download the prefix.
            200 if off == 0 => {}
            200 => {
                return Err(Failure::Fatal(format!(
                    "{}: ignores Range (answered bytes {off}-{end} with 200 and the whole blob)",
                    ep.shown
                )))
            }
            s => return Err(Failure::Fatal(format!("{}: unexpected HTTP {s}", ep.shown))),
        }
        Ok(())
    }

    /// Goes back to the first (preferred) mirror once a fail-over is [`RETURN_AFTER`] old.
    fn return_to_first_after_a_while(&self) {
        let mut f = self.failed_over_at.lock();
        if f.is_some_and(|t| t.elapsed() > RETURN_AFTER) {
            *f = None;
            self.current.store(0, Ordering::Relaxed);
        }
    }

    /// One attempt of `op` at `ep`, counted in the stats.
    fn attempt<T>(
        &self,
        ep: &Endpoint,
        op: &mut impl FnMut(&Self, &Endpoint) -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        let t0 = Instant::now();
        self.stats.inflight.fetch_add(1, Ordering::Relaxed);
        let r = op(self, ep);
        self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
        self.stats.observe_latency(t0.elapsed());
        r
    }

    /// Runs `op` against the mirrors, from `start_at` (else the current one), failing over and
    /// backing off until it succeeds or the deadline passes. A mirror that fails for good is
    /// not asked again for this call; when none is left, the call fails at once.
    fn with_retries<T>(
        &self,
        start_at: Option<usize>,
        mut op: impl FnMut(&Self, &Endpoint) -> Result<T, Failure>,
    ) -> io::Result<T> {
        let start = Instant::now();
        let mut backoff = self.policy.first_backoff;
        let n = self.endpoints.len();
        self.return_to_first_after_a_while();
        let mut out_for_good: Vec<Option<String>> = vec![None; n];
        let current = self.current.load(Ordering::Relaxed) % n;
        let first = start_at.unwrap_or(current) % n;
        loop {
            let (mut last, mut wait_asked) = (String::new(), None);
            for k in 0..n {
                let i = (first + k) % n;
                if out_for_good[i].is_some() {
                    continue;
                }
                match self.attempt(&self.endpoints[i], &mut op) {
                    Ok(v) => {
                        if i != current {
                            tracing::warn!(blob = %self.name, mirror = %self.endpoints[i].shown, "failed over to another mirror");
                            self.current.store(i, Ordering::Relaxed);
                            *self.failed_over_at.lock() = Some(Instant::now());
                        }
                        return Ok(v);
                    }
                    Err(Failure::Fatal(e)) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(blob = %self.name, error = %e, "source failed for this read; asking the next one");
                        out_for_good[i] = Some(e);
                    }
                    Err(Failure::Transient(e, asked)) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        tracing::debug!(blob = %self.name, error = %e, "fetch failed; will retry");
                        last = e;
                        wait_asked = wait_asked.max(asked);
                    }
                }
            }
            if out_for_good.iter().all(Option::is_some) {
                let why: Vec<String> = out_for_good.into_iter().flatten().collect();
                return Err(io::Error::other(format!(
                    "blob {}: {}",
                    self.name,
                    why.join("; ")
                )));
            }
            let wait = match wait_asked {
                Some(asked) => asked.min(MAX_RETRY_AFTER),
                None => jitter(backoff),
            };
            if start.elapsed() + wait > self.policy.give_up_after {
                let others: Vec<&str> = out_for_good.iter().flatten().map(String::as_str).collect();
                let others = match others.is_empty() {
                    true => String::new(),
                    false => format!(" (and for good: {})", others.join("; ")),
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "blob {}: giving up after {:?}: {last}{others}",
                        self.name,
                        start.elapsed()
                    ),
                ));
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(wait);
            backoff = (backoff * 2).min(self.policy.max_backoff);
        }
    }
}

/// True if `header` (`bytes a-b/total`) is exactly bytes `off..=end` of a blob of `size` bytes
/// (`size` 0: not known yet).
fn content_range_matches(header: &str, off: u64, end: u64, size: u64) -> bool {
    let Some(v) = header.trim().strip_prefix("bytes ") else {
        return false;
    };
    let Some((range, total)) = v.split_once('/') else {
        return false;
    };
    let Some((a, b)) = range.split_once('-') else {
        return false;
    };
    let total_ok = total.trim() == "*" || size == 0 || total.trim().parse() == Ok(size);
    a.trim().parse() == Ok(off) && b.trim().parse() == Ok(end) && total_ok
}

impl HttpBlob {
    fn check_bounds(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, buf.len() as u64)
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("blob {}: read past its {} bytes", self.name, self.size),
            )),
        }
    }
}

/// A body that ended after `got` of the `len` bytes asked from `off`: worth another try.
fn body_ended(ep: &Endpoint, got: u64, len: u64, off: u64) -> Failure {
    Failure::Transient(
        format!(
            "{}: body ended after {got} of {len} bytes at offset {off}",
            ep.shown
        ),
        None,
    )
}

/// A body whose read failed with `e`: worth another try.
fn body_failed(ep: &Endpoint, e: &io::Error) -> Failure {
    Failure::Transient(
        format!("{}: body: {}", ep.shown, redact::text(&e.to_string())),
        None,
    )
}

/// Bytes a streamed read ([`blockfmt::ReadAt::read_stream_at`]) takes from the body at a
/// time: what it hands on as soon as they are in.
const STREAM_READ: u64 = 64 << 10;

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
        self.check_bounds(buf, offset)?;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let via_agent = self
            .p2p
            .as_ref()
            .and_then(|p| self.read_via_p2p(p, buf, offset));
        if via_agent.is_none() {
            self.with_retries(None, |b, ep| b.get(ep, buf, offset))?;
        }
        self.stats
            .bytes
            .fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// One ranged GET for the whole range, its body handed on as it arrives (a startup
    /// layer's first chunks are checked and served while its last are on the wire). A GET
    /// that fails part-way is retried as any read is (mirrors, back-off, until the deadline),
    /// for the bytes not handed on yet only. Through a P2P agent: read as
    /// [`Self::read_exact_at`] reads (by whole pieces), then handed on.
    fn read_stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        self.check_range(offset, len)?;
        if self.p2p.is_some() {
            let mut buf = vec![0u8; len as usize];
            self.read_exact_at(&mut buf, offset)?;
            sink(&buf);
            return Ok(());
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let mut done = 0u64;
        let r = self.with_retries(None, |b, ep| {
            let at = done;
            b.get_stream(ep, (offset + at, len - at), &mut done, &mut *sink)
        });
        self.stats.bytes.fetch_add(done, Ordering::Relaxed);
        r.map(|_| ())
    }

    /// Bytes that failed their check, once more from the next source: the registry behind the
    /// P2P agent (the agent's pieces of them dropped), else the next mirror (the same server
    /// when there is no other).
    fn read_again_at(&self, buf: &mut [u8], offset: u64) -> Option<io::Result<()>> {
        if buf.is_empty() {
            return Some(Ok(()));
        }
        if let Err(e) = self.check_bounds(buf, offset) {
            return Some(Err(e));
        }
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        let next = match &self.p2p {
            Some(p) => {
                HttpBlob::drop_pieces(p, offset, buf.len() as u64);
                self.current.load(Ordering::Relaxed)
            }
            None => self.current.load(Ordering::Relaxed) + 1,
        };
        tracing::warn!(blob = %self.name, offset, len = buf.len(), "bytes failed their check; fetching them again from the next source");
        let r = self.with_retries(Some(next), |b, ep| b.get(ep, buf, offset));
        if r.is_ok() {
            self.stats
                .bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
        Some(r)
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_range_must_be_exactly_the_bytes_asked() {
        assert!(content_range_matches("bytes 10-19/100", 10, 19, 100));
        assert!(content_range_matches("bytes 10-19/*", 10, 19, 100));
        assert!(content_range_matches("bytes 10-19/100", 10, 19, 0));
        assert!(!content_range_matches("bytes 10-29/100", 10, 19, 100));
        assert!(!content_range_matches("bytes 4106-4115/100", 10, 19, 100));
        assert!(!content_range_matches("bytes 10-19/200", 10, 19, 100));
        assert!(!content_range_matches("bytes 10-/100", 10, 19, 100));
        assert!(!content_range_matches("(none)", 10, 19, 100));
    }
}
