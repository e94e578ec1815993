//! `lsmctl dedup-report A B`: what image B shares with image A, before B is converted with
//! `--dict A`. Counts B's stored non-zero 4 KiB blocks whose content A stores (what `--dict`
//! borrows), and, for comparison, B's whole chunks whose content A stores as a whole chunk
//! (what a chunk-granular dictionary would borrow; FORMAT.md §1.7 has the figures). B may be an
//! OCI image not converted yet: it is converted (without a dictionary or the reuse database)
//! to a temporary layout first.

use std::collections::HashSet;
use std::path::PathBuf;

use blockfmt::format::sha256;
use blockfmt::writer::{is_zero, ZERO_GRANULE};
use blockfmt::Dictionary;
use serde_json::json;

use super::dict::{image_blobs, lsm_blobs, open_checked, DictBlob};
use super::ConvertArgs;
use crate::cli::CliResult;

/// Arguments of `lsmctl dedup-report`.
#[derive(clap::Args)]
pub struct ReportArgs {
    /// The dictionary image: a converted image layout `DIR` (or `DIR:TAG`) or
    /// `http(s)://host[:port]/repository:tag`.
    a: String,
    /// The image to convert next: converted or not (an OCI image is converted to a temporary
    /// layout first, with default settings), same forms as A.
    b: String,
    /// Allow plain HTTP registries.
    #[arg(long)]
    insecure: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

/// What B shares with A.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Shared {
    /// B's stored non-zero 4 KiB blocks.
    pub blocks: u64,
    /// Of them, blocks whose content A stores.
    pub shared_blocks: u64,
    /// B's own chunks.
    pub chunks: u64,
    /// Of them, chunks whose decoded content A stores as a chunk.
    pub shared_chunks: u64,
    /// Stored (compressed) bytes of B's own chunks.
    pub stored_bytes: u64,
    /// Stored bytes of the shared chunks.
    pub shared_chunk_stored_bytes: u64,
    /// Data bytes B already borrows from dictionary blobs.
    pub already_borrowed_bytes: u64,
}

fn pct(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        100.0 * a as f64 / b as f64
    }
}

/// Compares B's stacked layers with A's blobs.
pub fn shared(a: &[DictBlob], b: &[DictBlob]) -> CliResult<Shared> {
    let mut dict = Dictionary::new();
    let mut a_chunks = HashSet::new();
    for x in a {
        let (layer, id) = open_checked(x)?;
        a_chunks.extend(
            layer
                .metadata()
                .chunks
                .iter()
                .filter(|c| c.blob == 0)
                .map(|c| c.sha256),
        );
        dict.add_layer(&layer, id, |_| {})?;
    }
    let mut s = Shared::default();
    for y in b {
        let (layer, _) = open_checked(y)?;
        let meta = layer.metadata();
        for x in &meta.extents {
            if meta
                .chunks
                .get(x.chunk as usize)
                .is_some_and(|c| c.blob != 0)
            {
                s.already_borrowed_bytes += x.len as u64;
            }
        }
        for (i, c) in meta.chunks.iter().enumerate() {
            if c.blob != 0 {
                continue;
            }
            s.chunks += 1;
            s.stored_bytes += c.stored_len as u64;
            if a_chunks.contains(&c.sha256) {
                s.shared_chunks += 1;
                s.shared_chunk_stored_bytes += c.stored_len as u64;
            }
            let data = layer.read_chunk(i as u32)?;
            for block in data.chunks_exact(ZERO_GRANULE as usize) {
                if is_zero(block) {
                    continue;
                }
                s.blocks += 1;
                if dict.lookup(&sha256(block)).is_some() {
                    s.shared_blocks += 1;
                }
            }
        }
    }
    Ok(s)
}

pub fn dedup_report(r: ReportArgs) -> CliResult {
    let work = std::env::temp_dir().join(format!("lsm-dedup-report-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    let result = (|| -> CliResult {
        let a = image_blobs(&r.a, &work.join("a"), None, r.insecure, &Default::default())?;
        let b = match image_blobs(&r.b, &work.join("b"), None, r.insecure, &Default::default()) {
            Ok(b) => b,
            Err(e) if e.0.contains("has no lsm layers") => {
                // Not converted yet: convert it as `lsmctl convert` would, without a dictionary.
                let dst = work.join("b-converted");
                let args = ConvertArgs::for_report(r.b.clone(), dst.clone(), r.insecure);
                super::convert_one(args)?;
                let m = super::dict::layout_manifest(&dst, None)?;
                lsm_blobs(&dst, &m)?
            }
            Err(e) => return Err(e),
        };
        let stacked: Vec<DictBlob> = b
            .into_iter()
            .filter(|x| a.iter().all(|y| y.digest != x.digest))
            .collect();
        let s = shared(&a, &stacked)?;
        if r.json {
            println!("{}", serde_json::to_string_pretty(&json!(s))?);
            return Ok(());
        }
        println!("{} shares with {}:", r.b, r.a);
        println!(
            "  4 KiB blocks (what --dict borrows): {} of {} ({:.1} %), {} of {} bytes",
            s.shared_blocks,
            s.blocks,
            pct(s.shared_blocks, s.blocks),
            s.shared_blocks * ZERO_GRANULE,
            s.blocks * ZERO_GRANULE
        );
        println!(
            "  whole chunks:                      {} of {} ({:.1} %), {} of {} stored bytes",
            s.shared_chunks,
            s.chunks,
            pct(s.shared_chunks, s.chunks),
            s.shared_chunk_stored_bytes,
            s.stored_bytes
        );
        if s.already_borrowed_bytes > 0 {
            println!(
                "  already borrowed from dictionary blobs: {} bytes",
                s.already_borrowed_bytes
            );
        }
        let left = s.blocks - s.shared_blocks;
        println!(
            "  with --dict: about {} stored bytes instead of {} ({:.1} %)",
            (s.stored_bytes as f64 * left as f64 / s.blocks.max(1) as f64) as u64,
            s.stored_bytes,
            pct(left, s.blocks)
        );
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result
}

impl ConvertArgs {
    /// The arguments `lsmctl convert SRC DST` would have, quiet, for a report's conversion.
    fn for_report(src: String, dst: PathBuf, insecure: bool) -> ConvertArgs {
        let (src, tag) = if src.contains("://") {
            (src, None)
        } else {
            let (d, t) = super::dict::split_layout_ref(&src);
            (d.display().to_string(), t)
        };
        ConvertArgs {
            src: Some(src),
            dst: Some(dst),
            batch: None,
            jobs: 1,
            tag,
            size: None,
            push: None,
            insecure,
            registry_ca: None,
            token_hosts: Vec::new(),
            username: None,
            password: None,
            db: None,
            no_reuse: true,
            dict: Vec::new(),
            fs: super::FsKind::Ext4,
            work_dir: None,
            opts: crate::cli::LayerOpts::default(),
            quiet: true,
            print_digest: false,
        }
    }
}
