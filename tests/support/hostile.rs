//! Misbehaving HTTP servers for the source tests: a small HTTP/1.1 server whose every reply is
//! decided by the test (ignore `Range`, answer for other bytes, redirect, challenge with a
//! foreign token realm, send `Retry-After`, flip bytes) and which records every request it got
//! (method, target, headers, arrival time) so tests can check what was sent where. One thread per
//! connection, `Connection: close` on every reply. Used because real registries do not misbehave
//! on demand.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// The request target: `/path?query`, or an absolute URI when asked as a proxy.
    pub target: String,
    /// Header names lowercased.
    pub headers: Vec<(String, String)>,
    pub at: Instant,
}

impl Req {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The `Range: bytes=a-b` asked for.
    pub fn range(&self) -> Option<(u64, u64)> {
        let v = self.header("range")?.strip_prefix("bytes=")?;
        let (a, b) = v.split_once('-')?;
        Some((a.parse().ok()?, b.parse().ok()?))
    }

    /// The target's path (no query, no scheme and host).
    pub fn path(&self) -> &str {
        let t = self
            .target
            .split_once("://")
            .map_or(self.target.as_str(), |(_, r)| {
                r.find('/').map_or("/", |i| &r[i..])
            });
        t.split('?').next().unwrap_or(t)
    }
}

/// What to answer.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Reply {
    pub fn new(status: u16) -> Reply {
        Reply {
            status,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    pub fn header(mut self, k: &str, v: &str) -> Reply {
        self.headers.push((k.to_string(), v.to_string()));
        self
    }

    pub fn body(mut self, b: Vec<u8>) -> Reply {
        self.body = b;
        self
    }

    /// What an honest server answers for `blob`: HEAD → its size; GET with Range → 206 with
    /// those bytes; GET without → 200 and all of it.
    pub fn honest(blob: &[u8], req: &Req) -> Reply {
        let n = blob.len() as u64;
        if req.method == "HEAD" {
            return Reply::new(200).header("Content-Length", &n.to_string());
        }
        match req.range() {
            Some((a, b)) if a <= b && b < n => Reply::new(206)
                .header("Content-Range", &format!("bytes {a}-{b}/{n}"))
                .body(blob[a as usize..=b as usize].to_vec()),
            Some(_) => Reply::new(416),
            None => Reply::new(200).body(blob.to_vec()),
        }
    }
}

type Handler = dyn Fn(&Req) -> Reply + Send + Sync;

/// A running server; it lives as long as the test process.
pub struct Server {
    /// `http://<ip>:<port>`.
    pub url: String,
    /// `<ip>:<port>`.
    pub host: String,
    log: Arc<Mutex<Vec<Req>>>,
}

impl Server {
    /// Listens on `ip` (any 127.x.y.z works on Linux) and answers with `handler`.
    pub fn start(ip: &str, handler: impl Fn(&Req) -> Reply + Send + Sync + 'static) -> Server {
        let l = TcpListener::bind((ip, 0)).expect("bind");
        let host = l.local_addr().expect("addr").to_string();
        let log: Arc<Mutex<Vec<Req>>> = Arc::default();
        let handler: Arc<Handler> = Arc::new(handler);
        let l2 = log.clone();
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (log, handler) = (l2.clone(), handler.clone());
                std::thread::spawn(move || {
                    let _ = serve(c, &log, &*handler);
                });
            }
        });
        Server {
            url: format!("http://{host}"),
            host,
            log,
        }
    }

    /// Every request so far, in arrival order.
    pub fn requests(&self) -> Vec<Req> {
        self.log.lock().expect("log").clone()
    }
}

fn serve(c: TcpStream, log: &Mutex<Vec<Req>>, handler: &Handler) -> std::io::Result<()> {
    let mut r = BufReader::new(c.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let (method, target) = (
        parts.next().unwrap_or_default().to_string(),
        parts.next().unwrap_or_default().to_string(),
    );
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let req = Req {
        method,
        target,
        headers,
        at: Instant::now(),
    };
    // Swallow a request body, if any.
    let body_len: u64 = req
        .header("content-length")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    std::io::copy(&mut (&mut r).take(body_len), &mut std::io::sink())?;
    log.lock().expect("log").push(req.clone());
    let reply = handler(&req);
    let mut out = c;
    let mut head = format!("HTTP/1.1 {} Hostile\r\n", reply.status);
    let has_len = reply
        .headers
        .iter()
        .any(|(k, _)| k.eq_ignore_ascii_case("content-length"));
    for (k, v) in &reply.headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !has_len {
        head += &format!("Content-Length: {}\r\n", reply.body.len());
    }
    head += "Connection: close\r\n\r\n";
    out.write_all(head.as_bytes())?;
    if req.method != "HEAD" {
        out.write_all(&reply.body)?;
    }
    out.flush()
}
