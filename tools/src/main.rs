//! `lsmctl`: everything a person types to build and check lsm images. Each subcommand's `--help`
//! says what it does; errors are printed for humans (with the layer, offset or field at fault)
//! and exit non-zero.

mod attach;
mod build;
mod check;
mod cli;
mod convert;
mod interrupt;
mod oci;
mod progress;
mod pull;
mod status;
mod trace;
mod trace_bake;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use cli::CliError;

/// Build, inspect and verify layered block images.
#[derive(Parser)]
#[command(name = "lsmctl", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
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
    /// Startup traces: `trace record` saves the chunks a running lsmd's export has needed so far
    /// (start lsmd, start the container or VM, then record) as `<IMAGE>.trace`, which lsmd
    /// fetches first, in the background, the next time it serves IMAGE.
    #[command(subcommand)]
    Trace(trace::TraceCmd),
    /// Convert an OCI image (an image layout directory) into lsm block layers in another image
    /// layout: each source layer applied (whiteouts honoured) to a tree, made into ext4
    /// deterministically, and stored as the blocks that differ from the layers below.
    Convert(convert::ConvertArgs),
    /// What image B shares with image A, in 4 KiB blocks and whole chunks: what converting B
    /// with `--dict A` would borrow instead of storing (B may be an unconverted OCI image).
    DedupReport(convert::report::ReportArgs),
    /// Attach an image as a block device (--nbd /dev/nbdN or --ublk) or a FUSE file (--fuse
    /// DIR): starts a detached lsmd for it and prints the device.
    Attach(attach::AttachArgs),
    /// Detach an attached image (by name or device): its lsmd finishes the kernel's requests,
    /// flushes, and exits.
    Detach(attach::DetachArgs),
    /// List attached images.
    List(attach::ListArgs),
    /// Show what a running lsmd serves: exports, upper-layer sizes, host cache use, bytes
    /// fetched (from its `--metrics` address).
    Status(status::StatusArgs),
    /// Pull an image into containerd with unpack, through its API: layers that lsm-snapshotter
    /// serves lazily (images made by `convert`) are not downloaded; plain OCI layers are
    /// fetched and unpacked as containerd does. Prints the image name containerd records.
    Pull(pull::PullArgs),
}

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
        Cmd::Status(a) => status::status(a),
        Cmd::Trace(c) => trace::trace(c),
        Cmd::Attach(a) => attach::attach(a),
        Cmd::Convert(a) => convert::convert(a),
        Cmd::DedupReport(a) => convert::report::dedup_report(a),
        Cmd::Detach(a) => attach::detach(a),
        Cmd::List(a) => attach::list(a),
        Cmd::Pull(a) => pull::pull(a),
    };
    // Interrupted: the signal's cleanups decide how lsmctl ends (exit 128 + the signal), not
    // whatever the interrupted work returned.
    interrupt::wait_if_interrupted();
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
    use crate::cli::parse_size;

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
