//! Sources: where layer blob bytes come from. Every source implements `blockfmt::ReadAt`
//! (ranged reads of one blob, plus its size); retries, timeouts and auth live inside it. The
//! layer above checks every chunk, so no source is trusted.
//!
//! - local file: `std::fs::File` itself;
//! - [`nas::NasFile`]: a file on a network mount, with read timeouts and retries;
//! - [`http::HttpBlob`]: a blob over HTTP(S) with Range — in an OCI registry (`/v2/<repo>/blobs/<digest>`, registry auth) or at any URL that honours Range (object storage), with mirrors and an optional P2P agent.

pub mod auth;
pub mod http;
pub mod nas;
pub mod redact;
pub mod tls;

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

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
