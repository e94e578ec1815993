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

/// Result alias for this crate.
pub type Result<T> = std::result::Result<T, Error>;
