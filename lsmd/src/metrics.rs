//! The metrics endpoint: `GET /metrics` in the Prometheus text format (bytes fetched per source,
//! cache hit ratio, fetch latency histogram, in-flight requests, errors, upper-layer sizes,
//! per-export flushes by frontend, ENOSPC refusals and whether the upper layer has failed),
//! `GET /status` as JSON for `lsmctl status`, and `GET /trace?export=NAME` (the chunks that
//! export's readers needed so far, FORMAT.md §6) for `lsmctl trace record`, `GET
//! /trace-blocks?export=NAME` (with `--exact-trace`: the 4 KiB blocks read, in first-read order,
//! as u64 LE block numbers) for `lsmctl trace bake`. Plain HTTP/1.1 on a loopback address; one short
//! request per connection.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::HostServices;
use crate::engine::Exports;
use crate::source::{SourceStats, LATENCY_BUCKETS};
use crate::trace::Trace;

/// Which way a request reached an export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frontend {
    /// An NBD connection: a client such as qemu, or the kernel's nbd device.
    Nbd,
    /// A ublk device.
    Ublk,
    /// A FUSE file.
    Fuse,
    /// lsmd itself, flushing every upper layer before it exits.
    Shutdown,
}

impl Frontend {
    const ALL: [Frontend; 4] = [
        Frontend::Nbd,
        Frontend::Ublk,
        Frontend::Fuse,
        Frontend::Shutdown,
    ];

    /// The `frontend` label.
    pub fn label(self) -> &'static str {
        match self {
            Frontend::Nbd => "nbd",
            Frontend::Ublk => "ublk",
            Frontend::Fuse => "fuse",
            Frontend::Shutdown => "shutdown",
        }
    }
}

/// Per-export counters the frontends keep: flushes (by frontend), requests refused for lack of
/// space, and whether the upper layer has failed. Lock-free: bumped from any serving thread.
#[derive(Debug, Default)]
pub struct ExportStats {
    /// Requests by frontend, served hot (index 0, inline) or cold (1, on the pool).
    requests: [[AtomicU64; 2]; 4],
    flushes: [AtomicU64; 4],
    flush_errors: [AtomicU64; 4],
    no_space: AtomicU64,
    failed: AtomicBool,
}

impl ExportStats {
    pub(crate) fn count_request(&self, via: Frontend, cold: bool) {
        self.requests[via as usize][cold as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Requests served through `via`, hot (inline on the frontend's thread) or cold (pool).
    pub fn requests(&self, via: Frontend, cold: bool) -> u64 {
        self.requests[via as usize][cold as usize].load(Ordering::Relaxed)
    }

    pub(crate) fn count_flush(&self, via: Frontend, ok: bool) {
        let i = via as usize;
        self.flushes[i].fetch_add(1, Ordering::Relaxed);
        if !ok {
            self.flush_errors[i].fetch_add(1, Ordering::Relaxed);
        }
    }

    pub(crate) fn count_no_space(&self) {
        self.no_space.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks the upper layer failed; true the first time.
    pub(crate) fn mark_failed(&self) -> bool {
        !self.failed.swap(true, Ordering::Relaxed)
    }

    /// FLUSH requests served through `via` (failed ones included).
    pub fn flushes(&self, via: Frontend) -> u64 {
        self.flushes[via as usize].load(Ordering::Relaxed)
    }

    /// True once a request saw the upper layer's sticky failure.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

/// The per-export families: flushes and flush errors by frontend, ENOSPC refusals, and the
/// upper layer's failed state.
fn export_metrics(m: &mut String, exports: &Exports) {
    type Get = fn(&ExportStats, usize) -> u64;
    let by_frontend: [(&str, &str, Get); 2] = [
        (
            "lsm_flush_total",
            "FLUSH requests (and flushes after FUA writes) served, by frontend.",
            |s, i| s.flushes[i].load(Ordering::Relaxed),
        ),
        (
            "lsm_flush_errors_total",
            "FLUSH requests that failed, by frontend.",
            |s, i| s.flush_errors[i].load(Ordering::Relaxed),
        ),
    ];
    for (name, help, get) in by_frontend {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} counter");
        for e in exports.all() {
            for f in Frontend::ALL {
                let (export, frontend) = (&e.name, f.label());
                let v = get(&e.stats, f as usize);
                let _ = writeln!(
                    m,
                    "{name}{{export=\"{export}\",frontend=\"{frontend}\"}} {v}"
                );
            }
        }
    }
    let name = "lsm_requests_total";
    let _ = writeln!(m, "# HELP {name} Requests served, by frontend and path: hot (inline on the frontend's thread) or cold (decode, fetch or sync on the shared pool).\n# TYPE {name} counter");
    for e in exports.all() {
        for f in Frontend::ALL {
            for (cold, path) in [(false, "hot"), (true, "cold")] {
                let v = e.stats.requests(f, cold);
                let _ = writeln!(
                    m,
                    "{name}{{export=\"{}\",frontend=\"{}\",path=\"{path}\"}} {v}",
                    e.name,
                    f.label()
                );
            }
        }
    }
    let name = "lsm_no_space_errors_total";
    let _ = writeln!(m, "# HELP {name} Requests refused with ENOSPC: the filesystem under the upper layer is full (or over quota).\n# TYPE {name} counter");
    for e in exports.all() {
        let v = e.stats.no_space.load(Ordering::Relaxed);
        let _ = writeln!(m, "{name}{{export=\"{}\"}} {v}", e.name);
    }
    let name = "lsm_upper_failed";
    let _ = writeln!(m, "# HELP {name} 1 when the upper layer refuses writes and flushes after a failed sync (until lsmd restarts and recovers it).\n# TYPE {name} gauge");
    for e in exports.all() {
        let Some(upper) = e.image.upper().filter(|_| !e.image.read_only()) else {
            continue;
        };
        let failed = e.stats.failed() || upper.stats().failed.is_some();
        let _ = writeln!(m, "{name}{{export=\"{}\"}} {}", e.name, failed as u8);
    }
}

/// Renders every metric.
pub fn render(host: &HostServices, exports: &Exports) -> String {
    let mut m = String::new();
    trace_metrics(&mut m);
    source_metrics(&mut m, &host.sources.all());
    if let Some(c) = &host.cache {
        let s = &c.stats;
        let (hits, misses) = (
            s.hits.load(Ordering::Relaxed),
            s.misses.load(Ordering::Relaxed),
        );
        let ratio = if hits + misses == 0 {
            0.0
        } else {
            hits as f64 / (hits + misses) as f64
        };
        for (name, help, kind, v) in [
            (
                "lsm_cache_hits_total",
                "Chunks served from the host cache.",
                "counter",
                hits as f64,
            ),
            (
                "lsm_cache_misses_total",
                "Chunks not in the host cache.",
                "counter",
                misses as f64,
            ),
            (
                "lsm_cache_hit_ratio",
                "hits / (hits + misses) since start.",
                "gauge",
                ratio,
            ),
            (
                "lsm_cache_bytes",
                "Bytes of cache entry files.",
                "gauge",
                c.bytes() as f64,
            ),
            (
                "lsm_cache_limit_bytes",
                "The cache size bound.",
                "gauge",
                c.limit() as f64,
            ),
            ("lsm_cache_entries", "Chunks held.", "gauge", c.len() as f64),
            (
                "lsm_cache_inserted_bytes_total",
                "Bytes written into the cache.",
                "counter",
                s.inserted_bytes.load(Ordering::Relaxed) as f64,
            ),
            (
                "lsm_cache_evictions_total",
                "Entries evicted to stay under the bound.",
                "counter",
                s.evictions.load(Ordering::Relaxed) as f64,
            ),
            (
                "lsm_cache_discarded_total",
                "Entries that failed their check and were dropped.",
                "counter",
                s.discarded.load(Ordering::Relaxed) as f64,
            ),
        ] {
            let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
    }
    export_metrics(&mut m, exports);
    upper_metrics(&mut m, exports);
    m
}

/// Each export's upper-layer files against its live data, its free space, compactions,
/// checkpoints and defragmenting rewrites.
fn upper_metrics(m: &mut String, exports: &Exports) {
    type Get = fn(&blockfmt::upper::UpperStats) -> u64;
    let families: [(&str, &str, &str, Get); 9] = [
        (
            "lsm_upper_data_bytes",
            "Bytes in each export's upper-layer data file.",
            "gauge",
            |s| s.data_file_bytes,
        ),
        (
            "lsm_upper_log_bytes",
            "Bytes in each export's upper-layer index log.",
            "gauge",
            |s| s.log_bytes,
        ),
        (
            "lsm_upper_live_bytes",
            "Disk bytes whose latest write is data in the upper layer (what compaction keeps).",
            "gauge",
            |s| s.live_bytes,
        ),
        (
            "lsm_upper_compactions_total",
            "Compactions of each export's upper layer since lsmd started.",
            "counter",
            |s| s.compactions,
        ),
        (
            "lsm_upper_free_bytes",
            "Dead bytes in each export's upper-layer data file that new writes may take.",
            "gauge",
            |s| s.free_bytes,
        ),
        (
            "lsm_upper_checkpoints_total",
            "Checkpoints (a flush and a synced mark freeing dead space, no copy) since lsmd started.",
            "counter",
            |s| s.checkpoints,
        ),
        (
            "lsm_upper_single_sync_flushes_total",
            "Flushes since lsmd started whose writes all went into reused space, made durable with one device flush.",
            "counter",
            |s| s.single_sync_flushes,
        ),
        (
            "lsm_upper_defrags_total",
            "Fragmented ranges of each export's upper layer rewritten as one piece since lsmd started.",
            "counter",
            |s| s.defrags,
        ),
        (
            "lsm_upper_defrag_bytes_total",
            "Bytes those defragmenting rewrites wrote (at most what clients wrote).",
            "counter",
            |s| s.defrag_bytes,
        ),
    ];
    let stats: Vec<_> = exports
        .images()
        .filter_map(|(name, image)| image.upper().map(|u| (name, u.stats())))
        .collect();
    for (family, help, kind, get) in families {
        let _ = writeln!(m, "# HELP {family} {help}\n# TYPE {family} {kind}");
        for (name, st) in &stats {
            let _ = writeln!(m, "{family}{{export=\"{name}\"}} {}", get(st));
        }
    }
}

/// Startup traces: shipped ones used or refused, node ones used, chunks prefetched.
fn trace_metrics(m: &mut String) {
    let s = &crate::trace::STATS;
    let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
    let _ = writeln!(
        m,
        "# HELP lsm_trace_total Startup traces replayed (shipped in the image and digest-checked, \
         or recorded on this node), and shipped ones refused (then served lazily).\n\
         # TYPE lsm_trace_total counter\n\
         lsm_trace_total{{trace=\"shipped\",result=\"used\"}} {}\n\
         lsm_trace_total{{trace=\"shipped\",result=\"refused\"}} {}\n\
         lsm_trace_total{{trace=\"node\",result=\"used\"}} {}\n\
         lsm_trace_total{{trace=\"startup\",result=\"used\"}} {}\n\
         lsm_trace_total{{trace=\"startup\",result=\"refused\"}} {}\n\
         # HELP lsm_prefetch_chunks_total Chunks loaded by background prefetch.\n\
         # TYPE lsm_prefetch_chunks_total counter\n\
         lsm_prefetch_chunks_total {}",
        n(&s.shipped_used),
        n(&s.shipped_refused),
        n(&s.node_used),
        n(&s.startup_used),
        n(&s.startup_refused),
        n(&s.prefetched_chunks)
    );
}

/// One family per metric, a sample per kind of source.
fn source_metrics(m: &mut String, sources: &[(&str, Arc<SourceStats>)]) {
    type Get = fn(&SourceStats) -> i64;
    let families: [(&str, &str, &str, Get); 5] = [
        (
            "lsm_source_requests_total",
            "Reads asked of the source.",
            "counter",
            |s| s.requests.load(Ordering::Relaxed) as i64,
        ),
        (
            "lsm_source_bytes_total",
            "Bytes fetched from the source.",
            "counter",
            |s| s.bytes.load(Ordering::Relaxed) as i64,
        ),
        (
            "lsm_source_errors_total",
            "Failed fetch attempts.",
            "counter",
            |s| s.errors.load(Ordering::Relaxed) as i64,
        ),
        (
            "lsm_source_retries_total",
            "Back-off rounds.",
            "counter",
            |s| s.retries.load(Ordering::Relaxed) as i64,
        ),
        (
            "lsm_source_inflight",
            "Fetches on the wire now.",
            "gauge",
            |s| s.inflight.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, kind, get) in families {
        let _ = writeln!(m, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (source, s) in sources {
            let _ = writeln!(m, "{name}{{source=\"{source}\"}} {}", get(s));
        }
    }
    let name = "lsm_source_fetch_seconds";
    let _ = writeln!(
        m,
        "# HELP {name} Latency of fetch attempts.\n# TYPE {name} histogram"
    );
    for (source, s) in sources {
        let mut cum = 0;
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            cum += s.latency[i].load(Ordering::Relaxed);
            let _ = writeln!(m, "{name}_bucket{{source=\"{source}\",le=\"{b}\"}} {cum}");
        }
        cum += s.latency[LATENCY_BUCKETS.len()].load(Ordering::Relaxed);
        let _ = writeln!(m, "{name}_bucket{{source=\"{source}\",le=\"+Inf\"}} {cum}");
        let sum = s.latency_sum_us.load(Ordering::Relaxed) as f64 / 1e6;
        let l = format!("{{source=\"{source}\"}}");
        let _ = writeln!(m, "{name}_sum{l} {sum}\n{name}_count{l} {cum}");
    }
}

/// Longest request line read; the rest of a longer one is never read (nor kept).
const MAX_REQUEST_LINE: u64 = 8 * 1024;

/// Time a client has to send its request line, and each write of the answer may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The request line, read within [`REQUEST_TIMEOUT`] in all (a client trickling bytes gets no
/// more) and at most [`MAX_REQUEST_LINE`] bytes; `None` if it did not come in time or in size
/// (the connection is then closed without an answer).
fn read_request_line(s: &TcpStream) -> Option<String> {
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let mut line = Vec::new();
    let mut r = BufReader::new(s).take(MAX_REQUEST_LINE);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || s.set_read_timeout(Some(left)).is_err() {
            return None;
        }
        let buf = r.fill_buf().ok()?;
        if buf.is_empty() {
            return None; // closed, or the line is longer than the cap
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                line.extend_from_slice(&buf[..=i]);
                return Some(String::from_utf8_lossy(&line).into_owned());
            }
            None => {
                let n = buf.len();
                line.extend_from_slice(buf);
                r.consume(n);
            }
        }
    }
}

/// Serves the endpoint on `listener` until the process ends.
pub fn spawn(listener: TcpListener, host: HostServices, exports: Exports) {
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let _ = s.set_write_timeout(Some(REQUEST_TIMEOUT));
            let Some(line) = read_request_line(&s) else {
                continue;
            };
            let target = line.split_whitespace().nth(1).unwrap_or("");
            let (path, query) = target.split_once('?').unwrap_or((target, ""));
            let (status, kind, body): (&str, &str, Vec<u8>) = match path {
                "/metrics" => (
                    "200 OK",
                    "text/plain; version=0.0.4",
                    render(&host, &exports).into_bytes(),
                ),
                "/status" => (
                    "200 OK",
                    "application/json",
                    status_json(&host, &exports).into_bytes(),
                ),
                "/trace" | "/trace-blocks" => {
                    let want = query.strip_prefix("export=").unwrap_or("");
                    match exports.images().find(|(n, _)| *n == want) {
                        Some((_, image)) => (
                            "200 OK",
                            "application/octet-stream",
                            match path {
                                "/trace" => Trace::of(image).encode(),
                                _ => crate::trace::encode_blocks(&image.lower().touched_blocks()),
                            },
                        ),
                        None => (
                            "404 Not Found",
                            "text/plain",
                            format!("no export {want:?}\n").into_bytes(),
                        ),
                    }
                }
                _ => ("404 Not Found", "text/plain", b"not found\n".to_vec()),
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            )
            .and_then(|_| s.write_all(&body));
        }
    });
}

/// Host-cache bytes holding chunks of `image`'s layers (each content counted once per image):
/// what this image alone would keep in a cache of its own.
fn image_cache_bytes(cache: &crate::cache::DiskCache, image: &blockfmt::Image) -> u64 {
    let mut seen = std::collections::HashSet::new();
    image
        .lower()
        .layers()
        .iter()
        .flat_map(|l| l.metadata().chunks.iter())
        .map(blockfmt::ChunkKey::of)
        .filter(|k| seen.insert(*k))
        .filter_map(|k| cache.entry_bytes(&k))
        .sum()
}

/// Exports, upper-layer sizes and cache use, for `lsmctl status`. `logical_bytes` adds up each
/// export's cached chunks as if each had a cache of its own; `bytes` is what the shared,
/// content-keyed cache holds: the difference is what cross-image dedup saves on this host.
pub fn status_json(host: &HostServices, exports: &Exports) -> String {
    let mut logical = 0;
    let ex: Vec<serde_json::Value> = exports
        .images()
        .map(|(name, image)| {
            let cached = host.cache.as_ref().map(|c| image_cache_bytes(c, image));
            logical += cached.unwrap_or(0);
            serde_json::json!({
                "name": name,
                "size": image.size(),
                "read_only": image.read_only(),
                "layers": image.lower().layers().len(),
                "upper_data_bytes": image.upper().map(|u| u.data_file_len()),
                "upper_live_bytes": image.upper().map(|u| u.stats().live_bytes),
                "cache_bytes": cached,
            })
        })
        .collect();
    let cache = host.cache.as_ref().map(|c| {
        serde_json::json!({
            "logical_bytes": logical,
            "bytes": c.bytes(),
            "limit": c.limit(),
            "entries": c.len(),
            "hits": c.stats.hits.load(Ordering::Relaxed),
            "misses": c.stats.misses.load(Ordering::Relaxed),
        })
    });
    let s = host.sources.get("registry").unwrap_or_default();
    serde_json::json!({
        "exports": ex,
        "cache": cache,
        "registry": {
            "bytes_fetched": s.bytes.load(Ordering::Relaxed),
            "requests": s.requests.load(Ordering::Relaxed),
            "errors": s.errors.load(Ordering::Relaxed),
        },
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family is declared once, before its samples, and every sample has a number.
    #[test]
    fn exposition_is_well_formed() {
        let text = render(&HostServices::default(), &Exports::new(Vec::new()));
        let mut declared = std::collections::HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                assert!(declared.insert(name.to_string()), "{name} declared twice");
            } else if !line.starts_with('#') {
                let (series, value) = line.rsplit_once(' ').unwrap_or_default();
                assert!(value.parse::<f64>().is_ok(), "{line}");
                let family = series.split('{').next().unwrap_or_default();
                let base = family
                    .trim_end_matches("_bucket")
                    .trim_end_matches("_sum")
                    .trim_end_matches("_count");
                assert!(
                    declared.contains(family) || declared.contains(base),
                    "{line}"
                );
            }
        }
        assert!(declared.contains("lsm_source_bytes_total"));
        assert!(declared.contains("lsm_flush_total"));
        assert!(declared.contains("lsm_upper_failed"));
    }

    /// A flush is counted under its frontend; a sticky failure raises the gauge, once.
    #[test]
    fn flushes_and_failures_are_exported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let upper =
            blockfmt::UpperLayer::create(&dir.path().join("upper"), 1 << 20).expect("upper layer");
        let lower = blockfmt::LayerStack::new(Vec::new(), 1 << 20, 0).expect("stack");
        let image = blockfmt::Image::new(lower, Some(upper)).expect("image");
        image.write(0, &[1; 8192]).expect("write");
        let export = crate::engine::Export::new("disk".into(), std::sync::Arc::new(image));
        export.flush(Frontend::Ublk).expect("flush");
        let failed = blockfmt::Error::Failed {
            layer: "upper".into(),
            detail: "fdatasync failed".into(),
        };
        export.failed_request(&failed);
        assert!(!export.stats.mark_failed(), "marked failed once");
        let exports = Exports::new(vec![export]);
        let text = render(&HostServices::default(), &exports);
        assert!(
            text.contains("lsm_flush_total{export=\"disk\",frontend=\"ublk\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lsm_flush_total{export=\"disk\",frontend=\"nbd\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("lsm_upper_failed{export=\"disk\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lsm_upper_live_bytes{export=\"disk\"} 8192"),
            "{text}"
        );
        assert!(
            text.contains("lsm_upper_compactions_total{export=\"disk\"} 0"),
            "{text}"
        );
    }

    /// A fragmented range read twice through the engine is rewritten on the export's
    /// `upper-defrag` thread, and `/metrics` counts it.
    #[test]
    fn defragmenting_rewrites_are_run_and_exported() {
        let dir = tempfile::tempdir().expect("temp dir");
        let upper =
            blockfmt::UpperLayer::create(&dir.path().join("upper"), 1 << 20).expect("upper layer");
        let lower = blockfmt::LayerStack::new(Vec::new(), 1 << 20, 0).expect("stack");
        let image = blockfmt::Image::new(lower, Some(upper)).expect("image");
        // 16 blocks written last to first: 16 upper pieces, out of order in the data file.
        for b in (0..16u64).rev() {
            image.write(b * 4096, &[b as u8 + 1; 4096]).expect("write");
        }
        let export = crate::engine::Export::new("disk".into(), std::sync::Arc::new(image));
        let mut buf = vec![0u8; 64 << 10];
        for _ in 0..2 {
            crate::engine::read_cold(&export, Frontend::Nbd, 0, &mut buf).expect("read");
        }
        let up = export.image.upper().expect("upper");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while up.stats().defrags == 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        let pieces = up.pieces(0, 64 << 10).pieces.len();
        assert_eq!(pieces, 1, "rewritten as one piece");
        crate::engine::read_cold(&export, Frontend::Nbd, 0, &mut buf).expect("read");
        assert!(buf
            .chunks(4096)
            .enumerate()
            .all(|(b, c)| c.iter().all(|&x| x == b as u8 + 1)));
        let text = render(&HostServices::default(), &Exports::new(vec![export]));
        assert!(
            text.contains("lsm_upper_defrags_total{export=\"disk\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("lsm_upper_defrag_bytes_total{export=\"disk\"} 65536"),
            "{text}"
        );
    }
}
