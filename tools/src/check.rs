//! Read-only subcommands: inspect and verify. Both accept layer blobs or an image config.

use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use blockfmt::format::{oci_digest, parse_oci_digest, Codec, ExtentKind};
use blockfmt::Layer;
use clap::Args;
use lsmd::ImageSpec;
use serde_json::json;

use crate::cli::{CliError, CliResult};

#[derive(Args)]
pub struct InspectArgs {
    /// Layer blobs, or one image config (`.json`).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Print JSON for scripts.
    #[arg(long)]
    json: bool,
    /// Also list every extent.
    #[arg(long)]
    extents: bool,
}

#[derive(Args)]
pub struct VerifyArgs {
    /// Layer blobs, or image configs (`.json`): every layer they list, and digests they record.
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Print a JSON report.
    #[arg(long)]
    json: bool,
}

/// A layer to look at: what it is called, how to open it, the whole-blob digest a config
/// expects of it.
struct Target {
    name: String,
    open: Box<dyn Fn() -> CliResult<Layer>>,
    digest: Option<[u8; 32]>,
}

/// Blobs given as files, or every layer and dictionary blob of image configs, opened through
/// the config (any source; borrowed blobs attached, so their chunks are checked too).
fn targets(paths: &[PathBuf]) -> CliResult<Vec<Target>> {
    let mut out = Vec::new();
    let parse = |d: &Option<String>| {
        d.as_deref()
            .map(parse_oci_digest)
            .transpose()
            .map_err(CliError)
    };
    for p in paths {
        if p.extension().is_some_and(|e| e == "json") {
            let spec = Arc::new(ImageSpec::load(p)?);
            for (i, l) in spec.config.layers.iter().enumerate() {
                let s = spec.clone();
                out.push(Target {
                    name: spec.layer_name(i),
                    open: Box::new(move || Ok(s.open_layer(i, &lsmd::HostServices::default())?)),
                    digest: parse(&l.digest)?,
                });
            }
            for (k, d) in spec.config.dictionary.iter().enumerate() {
                let s = spec.clone();
                out.push(Target {
                    name: format!("dictionary {}", spec.source_name(d)),
                    open: Box::new(move || Ok(s.open_dictionary(k)?)),
                    digest: parse(&d.digest)?,
                });
            }
        } else {
            let path = p.clone();
            out.push(Target {
                name: p.display().to_string(),
                open: Box::new(move || {
                    let f = File::open(&path)
                        .map_err(|e| CliError(format!("{}: {e}", path.display())))?;
                    Ok(Layer::open(path.display().to_string(), Arc::new(f), None)?)
                }),
                digest: None,
            });
        }
    }
    Ok(out)
}

fn summary(name: &str, l: &Layer, with_extents: bool) -> serde_json::Value {
    let m = l.metadata();
    let t = l.trailer();
    let data_bytes: u64 = m
        .extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Data)
        .map(|e| e.len as u64)
        .sum();
    let zero_bytes: u64 = m
        .extents
        .iter()
        .filter(|e| e.kind == ExtentKind::Zero)
        .map(|e| e.len as u64)
        .sum();
    let own = m.chunks.iter().filter(|c| c.blob == 0);
    let (mut raw, mut stored, mut zstd, mut n) = (0u64, 0u64, 0u64, 0u64);
    for c in own {
        raw += c.raw_len as u64;
        stored += c.stored_len as u64;
        zstd += (c.codec == Codec::Zstd) as u64;
        n += 1;
    }
    let mut v = json!({
        "path": name,
        "format_version": blockfmt::format::VERSION,
        "blob_size": l.blob_size(),
        "logical_size": t.logical_size,
        "chunk_size": t.chunk_size,
        "meta_digest": oci_digest(&t.meta_sha256),
        "meta_offset": t.meta_offset,
        "meta_len": t.meta_len,
        "borrowed_blobs": m.blobs.iter().map(|b| json!({"digest": oci_digest(&b.sha256), "size": b.size})).collect::<Vec<_>>(),
        "extents": m.extents.len(),
        "data_bytes": data_bytes,
        "zero_bytes": zero_bytes,
        "chunks": n,
        "chunks_zstd": zstd,
        "chunks_borrowed": m.chunks.len() as u64 - n,
        "chunk_raw_bytes": raw,
        "chunk_stored_bytes": stored,
        "compression_ratio": if stored > 0 { raw as f64 / stored as f64 } else { 1.0 },
    });
    if with_extents {
        v["extent_list"] = m
            .extents
            .iter()
            .map(|e| match e.kind {
                ExtentKind::Data => json!({"offset": e.logical, "len": e.len, "kind": "data", "chunk": e.chunk, "chunk_offset": e.chunk_offset}),
                ExtentKind::Zero => json!({"offset": e.logical, "len": e.len, "kind": "zero"}),
            })
            .collect();
    }
    v
}

pub fn inspect(a: InspectArgs) -> CliResult {
    let mut all = Vec::new();
    for t in targets(&a.paths)? {
        let l = (t.open)()?;
        all.push(summary(&t.name, &l, a.extents));
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).map_err(|e| CliError(e.to_string()))?
        );
        return Ok(());
    }
    for v in &all {
        println!("layer {}", v["path"].as_str().unwrap_or(""));
        for (k, label) in [
            ("format_version", "format version"),
            ("blob_size", "blob size"),
            ("logical_size", "disk size"),
            ("chunk_size", "chunk size"),
            ("meta_digest", "metadata digest"),
            ("extents", "extents"),
            ("data_bytes", "data bytes"),
            ("zero_bytes", "zero-extent bytes"),
            ("chunks", "chunks"),
            ("chunks_zstd", "chunks zstd"),
            ("chunks_borrowed", "chunks borrowed"),
            ("chunk_raw_bytes", "chunk bytes decoded"),
            ("chunk_stored_bytes", "chunk bytes stored"),
        ] {
            println!("  {label:<22} {}", v[k]);
        }
        println!(
            "  {:<22} {:.3}",
            "compression ratio",
            v["compression_ratio"].as_f64().unwrap_or(1.0)
        );
        if let Some(list) = v["extent_list"].as_array() {
            for e in list {
                println!("    {e}");
            }
        }
    }
    Ok(())
}

pub fn verify(a: VerifyArgs) -> CliResult {
    let mut failures = Vec::new();
    let mut report = Vec::new();
    for t in targets(&a.paths)? {
        let r = (t.open)().and_then(|l| l.verify_all(t.digest).map_err(CliError::from));
        match &r {
            Ok(()) if !a.json => println!("ok      {}", t.name),
            Err(CliError(e)) if !a.json => println!("FAILED  {}: {e}", t.name),
            _ => {}
        }
        report.push(json!({"path": t.name, "ok": r.is_ok(), "error": r.as_ref().err().map(|e| e.0.clone())}));
        if let Err(CliError(e)) = r {
            failures.push(e);
        }
    }
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).map_err(|e| CliError(e.to_string()))?
        );
    }
    match failures.len() {
        0 => Ok(()),
        1 => Err(CliError(failures.remove(0))),
        n => Err(CliError(format!(
            "{n} layers failed verification; first: {}",
            failures[0]
        ))),
    }
}
