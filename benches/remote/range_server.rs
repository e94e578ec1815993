//! `range-server`: a bench-only HTTP/1.1 file server that honours `Range` (what object storage
//! offers) and answers every request a fixed delay after it arrived — a remote store N ms away,
//! without the kernel's netem qdisc (this host lacks it). `benches/nbd-vs.sh` serves its remote
//! rows from it.
//!
//! Why hand-written and not a crate: it is ~150 lines of std (a thread per connection, keep-alive,
//! HEAD and `GET` with `bytes=a-b`), and it must cost the 2 shared cores as little as possible so
//! that the peer, not lsmd, is never the ceiling of a QD32 row (the Python server and delaying
//! proxy it replaces topped out near 800 requests/s).
//!
//! Usage: `range-server HOST:PORT DIR DELAY_MS` (serves the files of DIR by base name).

use std::fs::File;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One parsed request: method, file base name, optional `(first, last)` byte range.
struct Request {
    head: bool,
    name: String,
    range: Option<(u64, Option<u64>)>,
    close: bool,
}

/// Reads one request head; `Ok(None)` at a clean end of the connection.
fn read_request(r: &mut impl BufRead) -> io::Result<Option<Request>> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("");
    let path = parts.next().unwrap_or("/");
    let name = path.rsplit('/').next().unwrap_or("").to_string();
    let mut req = Request {
        head: method == "HEAD",
        name,
        range: None,
        close: false,
    };
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Ok(None);
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        if k == "range" {
            req.range = v.strip_prefix("bytes=").and_then(|s| {
                let (a, b) = s.split_once('-')?;
                Some((a.parse().ok()?, b.parse().ok()))
            });
        } else if k == "connection" && v.eq_ignore_ascii_case("close") {
            req.close = true;
        }
    }
    Ok(Some(req))
}

fn serve(stream: TcpStream, dir: PathBuf, delay: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = stream;
    let mut body = Vec::new();
    while let Some(req) = read_request(&mut r)? {
        let arrived = Instant::now();
        let mut head = String::new();
        body.clear();
        let file = (!req.name.is_empty() && !req.name.starts_with('.'))
            .then(|| File::open(dir.join(&req.name)).ok())
            .flatten();
        match file {
            None => head.push_str("HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n"),
            Some(f) => {
                let size = f.metadata()?.len();
                match req.range {
                    None => {
                        head.push_str("HTTP/1.1 200 OK\r\nAccept-Ranges: bytes\r\n");
                        if !req.head {
                            body.resize(size as usize, 0);
                            f.read_exact_at(&mut body, 0)?;
                        }
                        head.push_str(&format!("Content-Length: {size}\r\n"));
                    }
                    Some((a, b)) if a < size && !matches!(b, Some(b) if b < a) => {
                        let b = b.unwrap_or(size - 1).min(size - 1);
                        head.push_str(&format!(
                            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {a}-{b}/{size}\r\n"
                        ));
                        if !req.head {
                            body.resize((b - a + 1) as usize, 0);
                            f.read_exact_at(&mut body, a)?;
                        }
                        head.push_str(&format!("Content-Length: {}\r\n", b - a + 1));
                    }
                    Some(_) => head.push_str(&format!(
                        "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{size}\r\nContent-Length: 0\r\n"
                    )),
                }
            }
        }
        head.push_str("\r\n");
        // The answer leaves `delay` after the request arrived, however long reading it took.
        if let Some(rest) = delay.checked_sub(arrived.elapsed()) {
            std::thread::sleep(rest);
        }
        w.write_all(head.as_bytes())?;
        w.write_all(&body)?;
        w.flush()?;
        if req.close {
            break;
        }
    }
    Ok(())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 4 {
        eprintln!("usage: range-server HOST:PORT DIR DELAY_MS");
        std::process::exit(2);
    }
    let delay = match args[3].parse::<f64>() {
        Ok(ms) if ms >= 0.0 => Duration::from_secs_f64(ms / 1000.0),
        _ => {
            eprintln!("range-server: DELAY_MS must be a number of milliseconds ≥ 0");
            std::process::exit(2);
        }
    };
    let dir = Path::new(&args[2]).to_path_buf();
    let listener = match TcpListener::bind(&args[1]) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("range-server: cannot listen on {}: {e}", args[1]);
            std::process::exit(1);
        }
    };
    for stream in listener.incoming().flatten() {
        let dir = dir.clone();
        std::thread::spawn(move || {
            let _ = serve(stream, dir, delay);
        });
    }
}
