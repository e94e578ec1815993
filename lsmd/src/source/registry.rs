//! The registry client, once: [`send`] is the only auth-challenge loop, [`RequestError`] the
//! only rule for which failures may pass, [`RepositoryClient`] what `lsmctl`'s convert (pull,
//! push) and pull use; and the registry blob source, which builds the [`HttpBlob`] a
//! `"registry"` layer config names (its mirrors, credentials, TLS trust and P2P agent), counted
//! in the host's registry metrics.
//!
//! Concurrency: a [`RepositoryClient`] serves concurrent requests (the agent pools
//! connections; the auth state is behind a short lock never held across a request).

use std::io;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{Credentials, RegistryAuth};
use super::http::{ClientOptions, HttpBlob, P2pAgent, RetryPolicy, MAX_RETRY_AFTER};
use super::{redact, tls, Site};
use crate::config::{HostServices, RegistryConfig};

impl RegistryConfig {
    /// Opens the blob `site.digest` of this repository.
    pub fn open(
        &self,
        site: &Site,
        host: &HostServices,
    ) -> std::io::Result<Arc<dyn blockfmt::ReadAt>> {
        let client = ClientOptions {
            tls: tls::client_config(site.ca_file(self.ca_file.as_ref(), host).as_deref())?,
            credential_hosts: self.credential_hosts(),
        };
        let blob = HttpBlob::registry(
            &self.mirrors(),
            &self.repository,
            site.digest.unwrap_or_default(),
            self.size,
            host.retry,
            host.sources.register("registry"),
            &host.registry_auth,
            &client,
        )?;
        Ok(Arc::new(match &self.p2p {
            // (the P2P agent only fronts registry blobs)
            Some(p) => blob.via_p2p(P2pAgent {
                proxy: p.proxy.clone(),
                piece_size: p.piece_size,
            })?,
            None => blob,
        }))
    }
}

/// Why one request to a registry failed. This is the one place that says which failures may
/// pass ([`RequestError::is_transient`]) and which will not; the blob source, `convert`'s push
/// and `lsmctl pull` all go by it.
#[derive(Debug)]
pub enum RequestError {
    /// 404: the registry lacks it.
    NotFound,
    /// Another HTTP status; with the wait a 429/503 asked for (`Retry-After`).
    Status(u16, Option<Duration>),
    /// Connection trouble, or a TLS certificate that does not verify.
    Transport(Box<ureq::Transport>),
    /// A challenge this client cannot meet (why), or still 401 after meeting one.
    Unauthorized(String),
    /// A 401 from a host that is not the registry (a redirect or upload target): not the
    /// registry's challenge, and no credentials are sent there.
    ForeignUnauthorized(String),
    /// Getting a token failed.
    Token(String),
    /// The body to send could not be read.
    Body(io::Error),
}

impl RequestError {
    /// Worth another try: 5xx, 429, connection trouble (not TLS), a failed token request.
    pub fn is_transient(&self) -> bool {
        match self {
            RequestError::Status(code, _) => *code == 429 || *code >= 500,
            RequestError::Transport(t) => tls::tls_failure(t).is_none(),
            RequestError::Token(_) => true,
            _ => false,
        }
    }

    /// The wait the server asked for, if it did.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            RequestError::Status(_, wait) => *wait,
            _ => None,
        }
    }
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RequestError::NotFound => write!(f, "not found (HTTP 404)"),
            RequestError::Status(code, _) => write!(f, "HTTP {code}"),
            RequestError::Transport(t) => match tls::tls_failure(t) {
                Some(why) => write!(f, "TLS: {why}"),
                None => write!(f, "{}", redact::text(&t.to_string())),
            },
            RequestError::Unauthorized(why) => write!(f, "401 unauthorized ({why})"),
            RequestError::ForeignUnauthorized(url) => write!(
                f,
                "401 from the redirect target {url}, which is not the registry (not its \
                 challenge: no credentials are sent there)"
            ),
            RequestError::Token(e) => write!(f, "{e}"),
            RequestError::Body(e) => write!(f, "request body: {e}"),
        }
    }
}

/// What a request sends.
pub enum Body<'a> {
    /// Nothing (GET, HEAD).
    Empty,
    /// These bytes.
    Bytes(&'a [u8]),
    /// A file, opened afresh for each attempt (the length is the caller's header).
    File(&'a dyn Fn() -> io::Result<std::fs::File>),
}

/// Sends one request to the registry at `registry` (its base URL), meeting at most one auth
/// challenge: the only copy of that loop. `Authorization` goes only with a request to the
/// registry's own host; a 401 from any other host (blob storage after a redirect, an upload
/// location) is [`RequestError::ForeignUnauthorized`], never taken for the registry's
/// challenge.
pub fn send(
    agent: &ureq::Agent,
    auth: &RegistryAuth,
    registry: &str,
    mut make: impl FnMut(&ureq::Agent) -> ureq::Request,
    body: &Body,
) -> Result<ureq::Response, RequestError> {
    let ours_host = redact::host_of(registry);
    for attempt in 0..2 {
        let mut req = make(agent);
        let ours = redact::host_of(req.url()) == ours_host;
        if ours {
            if let Some(h) = auth.header(agent).map_err(RequestError::Token)? {
                req = req.set("Authorization", &h);
            }
        }
        let r = match body {
            Body::Empty => req.call(),
            Body::Bytes(b) => req.send_bytes(b),
            Body::File(open) => req.send(open().map_err(RequestError::Body)?),
        };
        match r {
            Ok(resp) => return Ok(resp),
            Err(ureq::Error::Status(404, _)) => return Err(RequestError::NotFound),
            Err(ureq::Error::Status(401, resp))
                if !ours || redact::host_of(resp.get_url()) != ours_host =>
            {
                return Err(RequestError::ForeignUnauthorized(redact::url(
                    resp.get_url(),
                )))
            }
            Err(ureq::Error::Status(401, resp)) if attempt == 0 => {
                auth.challenged(resp.header("www-authenticate"))
                    .map_err(RequestError::Unauthorized)?;
            }
            Err(ureq::Error::Status(401, _)) => break,
            Err(ureq::Error::Status(code, resp)) => {
                return Err(RequestError::Status(code, retry_after(&resp)))
            }
            Err(ureq::Error::Transport(t)) => return Err(RequestError::Transport(Box::new(t))),
        }
    }
    Err(RequestError::Unauthorized(
        "still refused after authenticating".into(),
    ))
}

/// The wait a 429/503 asks for (`Retry-After: <seconds>`, at most [`MAX_RETRY_AFTER`]; an HTTP
/// date is not honoured).
pub fn retry_after(r: &ureq::Response) -> Option<Duration> {
    r.header("retry-after")
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(|s| Duration::from_secs(s.min(MAX_RETRY_AFTER.as_secs())))
}

/// One repository of a registry, spoken to with its auth: `convert`'s pull and push and
/// `lsmctl pull` use it; blob reads go through [`HttpBlob`] (mirrors, ranges), which sends
/// each request through the same [`send`].
pub struct RepositoryClient {
    agent: ureq::Agent,
    auth: Arc<RegistryAuth>,
    base: String,
    repository: String,
    policy: RetryPolicy,
}

impl RepositoryClient {
    /// A client of `repository` at `base` (`http(s)://host[:port]`): credentials given, else
    /// docker's `config.json` entry for the host; TLS trust and token hosts from `client`;
    /// `timeout` bounds one request (uploads of big blobs need long ones).
    pub fn new(
        base: &str,
        repository: &str,
        creds: Option<Credentials>,
        client: &ClientOptions,
        timeout: Duration,
    ) -> RepositoryClient {
        let base = base.trim_end_matches('/').to_string();
        let creds = creds.or_else(|| Credentials::from_docker_config(&redact::host_of(&base)));
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30).min(timeout))
            .timeout(timeout);
        if let Some(t) = &client.tls {
            agent = agent.tls_config(t.clone());
        }
        RepositoryClient {
            agent: agent.build(),
            auth: Arc::new(RegistryAuth::new(creds, &base, &client.credential_hosts)),
            base,
            repository: repository.to_string(),
            policy: RetryPolicy::default(),
        }
    }

    /// The registry's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `<base>/v2/<repository>/<tail>`.
    pub fn url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.repository)
    }

    /// One request (see [`send`]); not retried.
    pub fn send(
        &self,
        make: impl FnMut(&ureq::Agent) -> ureq::Request,
        body: &Body,
    ) -> Result<ureq::Response, RequestError> {
        send(&self.agent, &self.auth, &self.base, make, body)
    }

    /// An idempotent request (GET, HEAD, a manifest PUT), retried with back-off while its
    /// failure may pass, until the retry policy's deadline.
    pub fn send_retrying(
        &self,
        mut make: impl FnMut(&ureq::Agent) -> ureq::Request,
        body: &Body,
    ) -> Result<ureq::Response, RequestError> {
        let start = Instant::now();
        let mut backoff = self.policy.first_backoff;
        loop {
            match self.send(&mut make, body) {
                Err(e) if e.is_transient() => {
                    let wait = e.retry_after().unwrap_or(backoff);
                    if start.elapsed() + wait > self.policy.give_up_after {
                        return Err(e);
                    }
                    tracing::debug!(repository = %self.repository, error = %e, "registry request failed; will retry");
                    std::thread::sleep(wait);
                    backoff = (backoff * 2).min(self.policy.max_backoff);
                }
                r => return r,
            }
        }
    }
}
