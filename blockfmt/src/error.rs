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
    /// The upper layer refuses writes and flushes: an earlier sync (or a write it could not
    /// undo) failed, so the kernel may have dropped bytes that were acknowledged. Sticky until
    /// the layer is reopened and recovered; never retried into silence.
    #[error("{layer}: {detail}; refusing writes and flushes until it is reopened and recovered")]
    Failed { layer: String, detail: String },
    /// Another process holds the upper layer open for writing (one writer per upper layer).
    #[error("{layer}: in use by {holder}")]
    Locked { layer: String, holder: String },
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// True when the error is the filesystem running out of space or quota (ENOSPC, EDQUOT):
    /// the request failed but nothing was lost, and it may succeed once space is freed.
    pub fn is_no_space(&self) -> bool {
        match self {
            Error::Io { source, .. } => matches!(
                source.raw_os_error(),
                Some(libc_enospc::ENOSPC) | Some(libc_enospc::EDQUOT)
            ),
            _ => false,
        }
    }

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

/// The two errno values `is_no_space` looks for (Linux numbering; blockfmt has no libc).
mod libc_enospc {
    pub const ENOSPC: i32 = 28;
    pub const EDQUOT: i32 = 122;
}
