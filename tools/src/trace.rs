//! `lsmctl trace`: record a node's startup trace from a running lsmd, or bake one into an image
//! ([`crate::trace_bake`]).

use crate::cli::{CliError, CliResult};
use crate::trace_bake;

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

pub fn trace(cmd: TraceCmd) -> CliResult {
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
