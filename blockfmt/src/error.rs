//! The one error type of `blockfmt`. Every variant says *where*: which layer (its name, usually a
//! path or digest), which byte offset, which structure, so a person can find the fault.

use std::io;

/// Errors from reading, writing, verifying and composing layers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call failed.
    #[error("{layer}: I/O error at offset {offset}: {source}")]
    Io {
        layer: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// Stored bytes failed a check: magic, checksum, digest, bounds or ordering.
    #[error("{layer}: corrupt {what} at offset {offset}: {detail}")]
    Corrupt {
        layer: String,
        what: &'static str,
        offset: u64,
        detail: String,
    },
    /// A structure carries a version this build does not know.
    #[error("{layer}: unsupported {what} version {version} (this build reads version 1)")]
    Unsupported {
        layer: String,
        what: &'static str,
        version: u16,
    },
    /// A chunk lives in another blob (dictionary dedup) that was not supplied.
    #[error("{layer}: chunk {chunk} is stored in blob {blob_digest}, which is not available")]
    MissingBlob {
        layer: String,
        chunk: u32,
        blob_digest: String,
    },
    /// A request outside the disk.
    #[error("range {offset}+{len} is outside the disk of {size} bytes")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    /// A write to an image without an upper layer.
    #[error("the image is read-only (it has no upper layer)")]
    ReadOnly,
    /// A caller passed an argument that cannot be honoured.
    #[error("invalid argument: {0}")]
    Invalid(String),
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub(crate) fn io(layer: impl Into<String>, offset: u64, source: io::Error) -> Self {
        Error::Io {
            layer: layer.into(),
            offset,
            source,
        }
    }

    pub(crate) fn corrupt(
        layer: impl Into<String>,
        what: &'static str,
        offset: u64,
        detail: impl Into<String>,
    ) -> Self {
        Error::Corrupt {
            layer: layer.into(),
            what,
            offset,
            detail: detail.into(),
        }
    }
}
