//! The one error type of `lsmd`: configuration, layers and I/O, each with where it happened.

use std::path::PathBuf;

/// Errors from loading configs and opening images.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The config file is missing, not JSON, or has a bad field.
    #[error("config {path}: {detail}")]
    Config { path: PathBuf, detail: String },
    /// A layer could not be opened or read.
    #[error("layer {index} ({path}): {source}")]
    Layer {
        index: usize,
        path: PathBuf,
        #[source]
        source: blockfmt::Error,
    },
    /// Anything else from the format library.
    #[error(transparent)]
    Format(#[from] blockfmt::Error),
    /// An I/O call on a named path failed.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The errno a frontend reports for a failed image request: a range or argument the disk
/// cannot take is EINVAL, a write to a read-only image EROFS, a filesystem under the upper
/// layer out of space or quota (ENOSPC, EDQUOT) ENOSPC — the request failed, nothing was lost,
/// and it may succeed once space is freed, so a client such as qemu (`werror=enospc`) can pause
/// instead of failing the disk — and anything else (a layer that failed its checks, a source
/// that gave up, an upper layer refusing writes after a failed sync) EIO. Frontends whose
/// protocol lacks one of these translate further (NBD has no EROFS).
pub fn errno(e: &blockfmt::Error) -> i32 {
    match e {
        blockfmt::Error::OutOfRange { .. } | blockfmt::Error::Invalid(_) => libc::EINVAL,
        blockfmt::Error::ReadOnly => libc::EROFS,
        e if e.is_no_space() => libc::ENOSPC,
        _ => libc::EIO,
    }
}

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    fn io(raw: i32) -> blockfmt::Error {
        blockfmt::Error::Io {
            layer: "upper".into(),
            offset: 4096,
            source: std::io::Error::from_raw_os_error(raw),
        }
    }

    /// A full filesystem or quota is ENOSPC for the client; other I/O errors and a sticky
    /// failure are EIO.
    #[test]
    fn no_space_is_enospc_and_failures_are_eio() {
        assert_eq!(errno(&io(libc::ENOSPC)), libc::ENOSPC);
        assert_eq!(errno(&io(libc::EDQUOT)), libc::ENOSPC);
        assert_eq!(errno(&io(libc::EIO)), libc::EIO);
        let failed = blockfmt::Error::Failed {
            layer: "upper".into(),
            detail: "fdatasync of data failed".into(),
        };
        assert_eq!(errno(&failed), libc::EIO);
        assert_eq!(errno(&blockfmt::Error::ReadOnly), libc::EROFS);
    }
}
