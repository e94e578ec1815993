//! `lsmctl`: everything a person types to build and check lsm images. Each subcommand's `--help`
//! says what it does; errors are printed for humans (with the layer, offset or field at fault)
//! and exit non-zero.

mod attach;
mod build;
mod check;
mod convert;
mod progress;
mod pull;
mod trace_bake;

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
#[derive(Args, Clone, Debug, Default)]
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
    /// Startup traces: `trace record` saves the chunks a running lsmd's export has needed so far
    /// (start lsmd, start the container or VM, then record) as `<IMAGE>.trace`, which lsmd
    /// fetches first, in the background, the next time it serves IMAGE.
    #[command(subcommand)]
    Trace(TraceCmd),
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
    Status(StatusArgs),
    /// Pull an image into containerd with unpack, through its API: layers that lsm-snapshotter
    /// serves lazily (images made by `convert`) are not downloaded; plain OCI layers are
    /// fetched and unpacked as containerd does. Prints the image name containerd records.
    Pull(pull::PullArgs),
}

/// `lsmctl trace` actions.
#[derive(clap::Subcommand)]
pub enum TraceCmd {
    /// Save the chunks the export has needed since lsmd started as `<IMAGE>.trace`.
    Record {
        /// The image config lsmd serves.
        image: std::path::PathBuf,
        /// Export name in lsmd (default: IMAGE's file name without `.json`, as lsmd names it).
        #[arg(long)]
        export: Option<String>,
        /// lsmd's `--metrics` address.
        #[arg(long, default_value = "127.0.0.1:9810")]
        metrics: String,
    },
    /// Ship a startup trace inside the image: serve it (private lsmd, FUSE file, loop, mount
    /// read-only), run COMMAND once in a sandbox (chroot + unshare, no network) over it, and
    /// store the chunks it read, in order, as a blob beside the layers (pushed to the first
    /// layer's registry, else a file next to IMAGE); IMAGE's `trace` names it and its digest,
    /// which lsmd checks before prefetching by it. Needs root (loop devices, mounts).
    ///
    /// Example: lsmctl trace bake lsm-remote.json -- /usr/bin/python3 -c 'import json'
    Bake(trace_bake::BakeArgs),
}

fn trace(cmd: TraceCmd) -> CliResult {
    let (image, export, metrics) = match cmd {
        TraceCmd::Bake(a) => return trace_bake::bake(a),
        TraceCmd::Record {
            image,
            export,
            metrics,
        } => (image, export, metrics),
    };
    let export = export.unwrap_or_else(|| {
        image
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    let url = format!("http://{metrics}/trace?export={export}");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(&url)
            .timeout(std::time::Duration::from_secs(30))
            .call()
            .map_err(|e| CliError(format!("{url}: {e}")))?
            .into_reader(),
        &mut bytes,
    )?;
    let t = lsmd::trace::Trace::decode(&bytes).map_err(|e| CliError(format!("{url}: {e}")))?;
    let out = lsmd::trace::trace_path(&image);
    let tmp = out.with_extension("trace.tmp");
    std::fs::write(&tmp, &bytes)?;
    std::fs::rename(&tmp, &out)?;
    println!(
        "{}: {} chunks of {} layers",
        out.display(),
        t.entries.len(),
        t.layers.len()
    );
    Ok(())
}

/// Arguments of `lsmctl status`.
#[derive(clap::Args)]
pub struct StatusArgs {
    /// lsmd's `--metrics` address.
    #[arg(long, default_value = "127.0.0.1:9810")]
    metrics: String,
    /// Print lsmd's JSON as is.
    #[arg(long)]
    json: bool,
}

fn status(a: StatusArgs) -> CliResult {
    let url = format!("http://{}/status", a.metrics);
    let text = ureq::get(&url)
        .timeout(std::time::Duration::from_secs(5))
        .call()
        .map_err(|e| {
            CliError(format!(
                "{url}: {e} (is lsmd running with --metrics {}?)",
                a.metrics
            ))
        })?
        .into_string()?;
    if a.json {
        println!("{text}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&text)?;
    for e in v["exports"].as_array().into_iter().flatten() {
        println!(
            "export {:<16} {:>14} bytes  {} layers  {}  upper data {} bytes  cached {} bytes",
            e["name"].as_str().unwrap_or("?"),
            e["size"],
            e["layers"],
            if e["read_only"].as_bool() == Some(true) {
                "read-only"
            } else {
                "writable "
            },
            e["upper_data_bytes"].as_u64().unwrap_or(0),
            e["cache_bytes"].as_u64().unwrap_or(0)
        );
    }
    match v.get("cache").filter(|c| !c.is_null()) {
        Some(c) => {
            println!(
                "cache  {} of {} bytes, {} chunks, {} hits, {} misses",
                c["bytes"], c["limit"], c["entries"], c["hits"], c["misses"]
            );
            let (phys, logical) = (
                c["bytes"].as_u64().unwrap_or(0),
                c["logical_bytes"].as_u64().unwrap_or(0),
            );
            println!(
                "cache  physical {phys} bytes, logical {logical} bytes (each export's cached chunks \
                 counted as if it had its own cache){}",
                if phys > 0 && logical > phys {
                    format!("; shared chunks save {:.1} %", 100.0 * (1.0 - phys as f64 / logical as f64))
                } else {
                    String::new()
                }
            );
        }
        None => println!("cache  none (lsmd runs without --cache-dir)"),
    }
    println!(
        "registry  {} bytes fetched in {} reads, {} errors",
        v["registry"]["bytes_fetched"], v["registry"]["requests"], v["registry"]["errors"]
    );
    Ok(())
}

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
        Cmd::Status(a) => status(a),
        Cmd::Trace(c) => trace(c),
        Cmd::Attach(a) => attach::attach(a),
        Cmd::Convert(a) => convert::convert(a),
        Cmd::DedupReport(a) => convert::report::dedup_report(a),
        Cmd::Detach(a) => attach::detach(a),
        Cmd::List(a) => attach::list(a),
        Cmd::Pull(a) => pull::pull(a),
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
