//! `lsmctl`: everything a person types to build and check lsm images. Each subcommand's `--help`
//! says what it does; errors are printed for humans (with the layer, offset or field at fault)
//! and exit non-zero.

mod build;
mod check;
mod progress;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Build, inspect and verify layered block images.
#[derive(Parser)]
#[command(name = "lsmctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Layer writing options shared by the commands that write layers.
#[derive(Args, Clone, Debug)]
pub struct LayerOpts {
    /// Chunk window in bytes (power of two, 4K..4M; suffixes K, M). Default: the image config's,
    /// else 128K.
    #[arg(long, value_parser = parse_size)]
    chunk_size: Option<u64>,
    /// zstd compression level 1..=22 (default: the image config's, else 6).
    #[arg(long, conflicts_with = "no_compress")]
    level: Option<i32>,
    /// Store chunks uncompressed.
    #[arg(long)]
    no_compress: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create an image config: disk size, a stack of existing layer blobs, an empty upper layer.
    Create(build::CreateArgs),
    /// Import a raw disk image (e.g. an ext4 or erofs image) as a layer blob. Zero blocks cost
    /// nothing; with --base, only blocks that differ from that image are stored.
    Import(build::ImportArgs),
    /// Write a raw disk image's differing blocks, or a file at an offset, into an image's upper
    /// layer, then flush.
    Write(build::WriteArgs),
    /// Export the merged image (all layers plus upper layer) as a sparse raw file.
    Export(build::ExportArgs),
    /// Seal the upper layer into a new immutable layer blob (or squash the whole stack into
    /// one), add it to the image config, start a fresh upper layer, and print the blob's OCI
    /// descriptor.
    Commit(build::CommitArgs),
    /// Show a layer blob's (or every layer of an image's) header, extents, chunk statistics and
    /// compression ratio.
    Inspect(check::InspectArgs),
    /// Check every checksum and digest of layer blobs or of an image; exits non-zero naming the
    /// failing layer and offset.
    Verify(check::VerifyArgs),
}

/// Parses a byte count with an optional K/M/G/T suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
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

/// Error type of the CLI: a message for a human.
pub struct CliError(pub String);

impl<E: std::fmt::Display> From<E> for CliError {
    fn from(e: E) -> Self {
        CliError(e.to_string())
    }
}

/// Result alias for subcommands.
pub type CliResult<T = ()> = Result<T, CliError>;

fn main() -> ExitCode {
    // Output piped into `head` and closed early ends the process quietly, as for other Unix
    // tools, instead of panicking in `println!`.
    // SAFETY: restoring the default disposition of SIGPIPE before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Create(a) => build::create(a),
        Cmd::Import(a) => build::import(a),
        Cmd::Write(a) => build::write(a),
        Cmd::Export(a) => build::export(a),
        Cmd::Commit(a) => build::commit(a),
        Cmd::Inspect(a) => check::inspect(a),
        Cmd::Verify(a) => check::verify(a),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError(msg)) => {
            eprintln!("lsmctl: error: {msg}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("256m"), Ok(256 << 20));
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
