//! What every `lsmctl` subcommand shares: its error type (a message for a human, printed by
//! `main`), and the layer-writing options of the commands that write layers.

use clap::Args;

pub use lsmd::parse_size;

/// Error type of the CLI: a message for a human.
#[derive(Debug)]
pub struct CliError(pub String);

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

/// Result alias for subcommands.
pub type CliResult<T = ()> = Result<T, CliError>;

/// Layer writing options shared by the commands that write layers.
#[derive(Args, Clone, Debug, Default)]
pub struct LayerOpts {
    /// Chunk window in bytes (power of two, 4K..4M; suffixes K, M). Default: the image config's,
    /// else 128K.
    #[arg(long, value_parser = parse_size)]
    pub(crate) chunk_size: Option<u64>,
    /// zstd compression level 1..=22 (default: the image config's, else 6).
    #[arg(long, conflicts_with = "no_compress")]
    pub(crate) level: Option<i32>,
    /// Store chunks uncompressed.
    #[arg(long)]
    pub(crate) no_compress: bool,
}
