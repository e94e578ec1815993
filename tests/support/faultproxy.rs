//! A fault injector in front of a real server: a small HTTP/1.1 reverse proxy that forwards each
//! request to `upstream` and, while faults are queued, spoils replies on purpose — error
//! statuses, a connection cut in the middle of the body, a body shorter than its range. Used
//! because these faults cannot be had from the real registry on demand.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One spoiled reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Reply with this status and no body, without asking upstream.
    Status(u16),
    /// Forward, but close the connection halfway through the body.
    CutBody,
    /// Forward a 206 reply with only the first half of its body (headers adjusted to match).
    ShortBody,
}

/// The running proxy; it lives as long as the test process.
pub struct FaultProxy {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    faults: Arc<Mutex<VecDeque<Fault>>>,
    /// Requests seen.
    pub requests: Arc<AtomicU64>,
    /// Faults delivered.
    pub delivered: Arc<AtomicU64>,
    /// Body bytes of the blob GET replies forwarded (what a client read of blobs).
    pub blob_bytes: Arc<AtomicU64>,
    /// Added to every forwarded request, microseconds (a far-away registry).
    latency_us: Arc<AtomicU64>,
}

impl FaultProxy {
    /// Proxies to `upstream` (`host:port`).
    pub fn start(upstream: &str) -> FaultProxy {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let url = format!("http://{}", l.local_addr().expect("addr"));
        let faults: Arc<Mutex<VecDeque<Fault>>> = Arc::default();
        let requests: Arc<AtomicU64> = Arc::default();
        let delivered: Arc<AtomicU64> = Arc::default();
        let latency_us: Arc<AtomicU64> = Arc::default();
        let blob_bytes: Arc<AtomicU64> = Arc::default();
        let bb = blob_bytes.clone();
        let (f, r, d, up, lat) = (
            faults.clone(),
            requests.clone(),
            delivered.clone(),
            upstream.to_string(),
            latency_us.clone(),
        );
        std::thread::spawn(move || {
            for c in l.incoming().flatten() {
                let (f, r, d, up, lat) = (f.clone(), r.clone(), d.clone(), up.clone(), lat.clone());
                let bb = bb.clone();
                std::thread::spawn(move || {
                    let us = lat.load(Ordering::Relaxed);
                    if us > 0 {
                        std::thread::sleep(std::time::Duration::from_micros(us));
                    }
                    let _ = handle(c, &up, &f, &r, &d, &bb);
                });
            }
        });
        FaultProxy {
            url,
            faults,
            requests,
            delivered,
            blob_bytes,
            latency_us,
        }
    }

    /// Delays every request from now on by `d`.
    pub fn set_latency(&self, d: std::time::Duration) {
        self.latency_us
            .store(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Queues faults for the next requests, in order.
    pub fn inject(&self, faults: &[Fault]) {
        self.faults.lock().expect("faults").extend(faults);
    }

    /// Faults still queued.
    pub fn pending(&self) -> usize {
        self.faults.lock().expect("faults").len()
    }
}

fn read_head(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(b[0]);
    }
    Ok(head)
}

/// The head with `Connection: close` in place of any Connection header.
fn close_head(head: &str) -> String {
    let mut out: Vec<&str> = head
        .trim_end()
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .collect();
    out.push("Connection: close");
    out.join("\r\n") + "\r\n\r\n"
}

fn handle(
    mut c: TcpStream,
    upstream: &str,
    faults: &Mutex<VecDeque<Fault>>,
    requests: &AtomicU64,
    delivered: &AtomicU64,
    blob_bytes: &AtomicU64,
) -> std::io::Result<()> {
    let head = String::from_utf8_lossy(&read_head(&mut c)?).into_owned();
    requests.fetch_add(1, Ordering::Relaxed);
    let fault = faults.lock().ok().and_then(|mut q| q.pop_front());
    if let Some(Fault::Status(code)) = fault {
        delivered.fetch_add(1, Ordering::Relaxed);
        return write!(
            c,
            "HTTP/1.1 {code} Injected\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        );
    }
    let mut up = TcpStream::connect(upstream)?;
    up.write_all(close_head(&head).as_bytes())?;
    let mut reply = Vec::new();
    up.read_to_end(&mut reply)?;
    let split = reply
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map_or(reply.len(), |p| p + 4);
    let (rhead, body) = reply.split_at(split);
    let rhead = String::from_utf8_lossy(rhead).into_owned();
    let is_206 = rhead.starts_with("HTTP/1.1 206");
    match fault {
        Some(Fault::CutBody) if !body.is_empty() => {
            delivered.fetch_add(1, Ordering::Relaxed);
            c.write_all(close_head(&rhead).as_bytes())?;
            c.write_all(&body[..body.len() / 2])?;
            Ok(()) // dropped here: the client sees the body end early
        }
        Some(Fault::ShortBody) if is_206 && body.len() > 1 => {
            delivered.fetch_add(1, Ordering::Relaxed);
            let half = body.len() / 2;
            let fixed: Vec<String> = rhead
                .trim_end()
                .split("\r\n")
                .map(|l| {
                    let low = l.to_ascii_lowercase();
                    if low.starts_with("content-length:") {
                        format!("Content-Length: {half}")
                    } else if low.starts_with("content-range:") {
                        // bytes a-b/n  ->  bytes a-(a+half-1)/n
                        let v = l.split_once(':').map_or("", |x| x.1).trim();
                        let (a, rest) = v
                            .trim_start_matches("bytes ")
                            .split_once('-')
                            .unwrap_or(("0", "0/0"));
                        let total = rest.split_once('/').map_or("*", |x| x.1);
                        let a: u64 = a.parse().unwrap_or(0);
                        format!("Content-Range: bytes {a}-{}/{total}", a + half as u64 - 1)
                    } else {
                        l.to_string()
                    }
                })
                .collect();
            c.write_all(close_head(&(fixed.join("\r\n") + "\r\n\r\n")).as_bytes())?;
            c.write_all(&body[..half])
        }
        other => {
            if let Some(f) = other {
                // Not applicable to this reply (e.g. a HEAD): keep it for the next one.
                if let Ok(mut q) = faults.lock() {
                    q.push_front(f);
                }
            }
            if head.starts_with("GET ") && head.contains("/blobs/") {
                blob_bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
            }
            c.write_all(close_head(&rhead).as_bytes())?;
            c.write_all(body)
        }
    }
}
