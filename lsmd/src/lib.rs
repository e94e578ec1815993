//! `lsmd`: the lsm daemon as a library. Sources → host cache → image → engine → frontends:
//!
//! - [`source`]: where blob bytes come from (registry, HTTP URL, NAS file, P2P agent; local
//!   files are plain `File`s), all behind `blockfmt::ReadAt`;
//! - [`cache`]: the host's on-disk cache of fetched chunks (`blockfmt::ChunkStore`), and
//!   [`cache::trace`]: startup traces and background prefetch;
//! - [`config`]: image configs, and opening an image on the host's services;
//! - [`engine`]: the request engine every frontend uses (hot work inline, cold work on
//!   [`engine::pool`]);
//! - [`frontend`]: the NBD, ublk and FUSE-file frontends;
//! - [`metrics`]: the Prometheus/status endpoint.

// `unsafe` only at FFI/ioctl/io_uring edges, each block saying why it is sound.
#![warn(clippy::undocumented_unsafe_blocks)]

pub mod cache;
pub mod config;
pub mod engine;
pub mod error;
pub mod frontend;
pub mod metrics;
pub mod source;

// The paths these modules had before the engine/frontend layout, kept for callers outside lsmd.
pub use cache::trace;
pub use engine::pool;
pub use frontend::{fuse, nbd, ublk};

pub use config::{HostServices, ImageConfig, ImageSpec, LayerConfig, RegistryConfig, SourceConfig};
pub use engine::errno;
pub use error::{Error, Result};

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("{s:?} is not a size (a number with an optional K, M, G or T)"))
}
