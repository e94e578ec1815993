//! Subcommands that make or change images: create, import, write, export, commit.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blockfmt::commit::{commit_upper, import_raw, squash};
use blockfmt::format::oci_digest;
use blockfmt::{Alloc, Compression, Layer, UpperLayer, WriterOptions, WrittenLayer};
use clap::Args;
use lsmd::{ImageConfig, ImageSpec, LayerConfig, SourceConfig};
use serde_json::json;

use crate::cli::{parse_size, CliError, CliResult, LayerOpts};
use crate::progress::Progress;

#[derive(Args)]
pub struct CreateArgs {
    /// Image config file to create (JSON).
    image: PathBuf,
    /// Virtual disk size (suffixes K, M, G, T). Default: the largest layer's disk size.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// A layer blob to stack, bottom first; repeat for more.
    #[arg(long = "layer")]
    layers: Vec<PathBuf>,
    /// Upper layer directory (default: IMAGE's name with `.upper`, beside it).
    #[arg(long, conflicts_with = "read_only")]
    upper: Option<PathBuf>,
    /// Create a read-only image (no upper layer).
    #[arg(long)]
    read_only: bool,
    #[command(flatten)]
    opts: LayerOpts,
}

#[derive(Args)]
pub struct ImportArgs {
    /// Raw disk image to import.
    raw: PathBuf,
    /// Layer blob to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Store only what differs from this image, making a layer to stack on it.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Append the new layer to this image config (often the same as --base).
    #[arg(long)]
    add_to: Option<PathBuf>,
    #[command(flatten)]
    opts: LayerOpts,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct WriteArgs {
    /// Image config.
    image: PathBuf,
    /// Raw disk image of the same size: write the 4 KiB blocks where it differs from the image.
    #[arg(long, conflicts_with_all = ["file", "at"])]
    from: Option<PathBuf>,
    /// A file whose bytes to write at --at.
    #[arg(long, requires = "at")]
    file: Option<PathBuf>,
    /// Byte offset for --file (suffixes K, M, G, T).
    #[arg(long, value_parser = parse_size)]
    at: Option<u64>,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct ExportArgs {
    /// Image config.
    image: PathBuf,
    /// Raw file to write (sparse: zero ranges are not written).
    #[arg(long, short)]
    out: PathBuf,
    /// No progress lines.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args)]
pub struct CommitArgs {
    /// Image config.
    image: PathBuf,
    /// Layer blob to write.
    #[arg(long, short)]
    out: PathBuf,
    /// Squash every layer and the upper layer into one bottom layer that replaces the stack.
    #[arg(long)]
    squash: bool,
    #[command(flatten)]
    opts: LayerOpts,
}

/// Writer options from the flags, falling back to the image config, then to defaults.
pub(crate) fn writer_options(o: &LayerOpts, cfg: Option<&ImageConfig>) -> CliResult<WriterOptions> {
    let mut w = cfg.map(|c| c.writer_options()).unwrap_or_default();
    if let Some(cs) = o.chunk_size {
        w.chunk_size =
            u32::try_from(cs).map_err(|_| CliError(format!("--chunk-size {cs} is too large")))?;
    }
    if let Some(l) = o.level {
        w.compression = Compression::Zstd(l);
    }
    if o.no_compress {
        w.compression = Compression::None;
    }
    blockfmt::format::check_chunk_size(w.chunk_size)
        .map_err(|e| CliError(format!("--chunk-size: {e}")))?;
    Ok(w)
}

/// The OCI descriptor of a written blob, as printed by import and commit.
pub fn descriptor(w: &WrittenLayer) -> serde_json::Value {
    json!({
        "mediaType": blockfmt::LAYER_MEDIA_TYPE,
        "digest": oci_digest(&w.digest),
        "size": w.size,
        "annotations": { blockfmt::META_DIGEST_ANNOTATION: oci_digest(&w.meta_digest) },
    })
}

/// Writes a blob through `f` into a temporary file beside `out`, fsyncs it and renames it into
/// place, so `out` is either absent or complete.
pub(crate) fn write_blob_atomically(
    out: &Path,
    f: impl FnOnce(
        std::io::BufWriter<File>,
    ) -> blockfmt::Result<(WrittenLayer, std::io::BufWriter<File>)>,
) -> CliResult<WrittenLayer> {
    let tmp = out.with_extension("partial");
    let file = File::create(&tmp).map_err(|e| CliError(format!("{}: {e}", tmp.display())))?;
    let r = f(std::io::BufWriter::with_capacity(1 << 20, file)).and_then(|(w, bw)| {
        let file = bw
            .into_inner()
            .map_err(|e| blockfmt::Error::Invalid(format!("{}: {e}", tmp.display())))?;
        file.sync_all()
            .map_err(|e| blockfmt::Error::Invalid(format!("{}: {e}", tmp.display())))?;
        Ok(w)
    });
    match r {
        Ok(w) => {
            std::fs::rename(&tmp, out).map_err(|e| CliError(format!("{}: {e}", out.display())))?;
            Ok(w)
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e.into())
        }
    }
}

/// How a layer path is recorded in a config: relative to the config's folder when inside it.
fn config_relative(config: &Path, p: &Path) -> CliResult<PathBuf> {
    let abs = std::fs::canonicalize(p).map_err(|e| CliError(format!("{}: {e}", p.display())))?;
    let dir = config
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let dir =
        std::fs::canonicalize(dir).map_err(|e| CliError(format!("{}: {e}", dir.display())))?;
    Ok(abs.strip_prefix(&dir).map(Path::to_path_buf).unwrap_or(abs))
}

fn layer_entry(
    config: &Path,
    blob: &Path,
    w: Option<&WrittenLayer>,
) -> CliResult<(LayerConfig, u64)> {
    let f = File::open(blob).map_err(|e| CliError(format!("{}: {e}", blob.display())))?;
    let l = Layer::open(blob.display().to_string(), std::sync::Arc::new(f), None)?;
    let digest = match w {
        Some(w) => w.digest,
        None => sha2_file(blob)?,
    };
    Ok((
        LayerConfig {
            source: SourceConfig::Local(config_relative(config, blob)?),
            digest: Some(oci_digest(&digest)),
            meta_digest: Some(oci_digest(&l.trailer().meta_sha256)),
            meta_len: Some(l.trailer().meta_len),
        },
        l.logical_size(),
    ))
}

pub(crate) fn sha2_file(p: &Path) -> CliResult<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut f = File::open(p).map_err(|e| CliError(format!("{}: {e}", p.display())))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(|e| CliError(format!("{}: {e}", p.display())))?;
    Ok(h.finalize().into())
}

pub fn create(a: CreateArgs) -> CliResult {
    if a.image.exists() {
        return Err(CliError(format!("{} already exists", a.image.display())));
    }
    let mut layers = Vec::new();
    let mut largest = 0;
    for b in &a.layers {
        let (l, logical) = layer_entry(&a.image, b, None)?;
        largest = largest.max(logical);
        layers.push(l);
    }
    let size = match a.size {
        Some(s) if s < largest => {
            return Err(CliError(format!(
                "--size {s} is smaller than a layer's disk ({largest} bytes)"
            )))
        }
        Some(s) => s,
        None if largest > 0 => largest,
        None => return Err(CliError("give --size (or at least one --layer)".into())),
    };
    let upper = if a.read_only {
        None
    } else {
        Some(a.upper.clone().unwrap_or_else(|| {
            let stem = a
                .image
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| "image".into());
            PathBuf::from(format!("{stem}.upper"))
        }))
    };
    let mut cfg = ImageConfig::new(size, layers, upper);
    let w = writer_options(&a.opts, None)?;
    cfg.chunk_size = w.chunk_size;
    cfg.compression_level = match w.compression {
        Compression::None => 0,
        Compression::Zstd(l) => l,
    };
    cfg.check().map_err(CliError)?;
    cfg.save(&a.image)?;
    let spec = ImageSpec::load(&a.image)?;
    // Open once: checks every layer and creates the empty upper layer.
    spec.open_image(true, &lsmd::HostServices::default())?;
    println!(
        "created {} ({} bytes, {} layers{})",
        a.image.display(),
        size,
        spec.config.layers.len(),
        if a.read_only { ", read-only" } else { "" }
    );
    Ok(())
}

pub fn import(a: ImportArgs) -> CliResult {
    let raw = File::open(&a.raw).map_err(|e| CliError(format!("{}: {e}", a.raw.display())))?;
    let size = raw
        .metadata()
        .map_err(|e| CliError(format!("{}: {e}", a.raw.display())))?
        .len();
    let base = a.base.as_deref().map(ImageSpec::load).transpose()?;
    let base_img = base
        .as_ref()
        .map(|s| s.open_image(false, &lsmd::HostServices::default()))
        .transpose()?;
    let add_to = a.add_to.as_deref().map(ImageSpec::load).transpose()?;
    if let Some(s) = &add_to {
        if s.config.size != size {
            return Err(CliError(format!(
                "{} is a {} byte disk, the raw image is {size} bytes",
                s.path.display(),
                s.config.size
            )));
        }
    }
    let opts = writer_options(
        &a.opts,
        base.as_ref().or(add_to.as_ref()).map(|s| &s.config),
    )?;
    let mut prog = Progress::new(format!("import {}", a.raw.display()), size, a.quiet);
    let w = write_blob_atomically(&a.out, |out| {
        import_raw(
            BufReader::with_capacity(1 << 20, raw),
            size,
            base_img.as_ref(),
            None,
            out,
            opts,
            |d| prog.update(d),
        )
    })?;
    if let Some(mut s) = add_to {
        let (entry, _) = layer_entry(&s.path, &a.out, Some(&w))?;
        s.config.layers.push(entry);
        s.config.save(&s.path)?;
    }
    println!("{}", descriptor(&w));
    Ok(())
}

pub fn write(a: WriteArgs) -> CliResult {
    let spec = ImageSpec::load(&a.image)?;
    let img = spec.open_image(true, &lsmd::HostServices::default())?;
    if img.read_only() {
        return Err(CliError(format!(
            "{} has no upper layer (read-only image)",
            a.image.display()
        )));
    }
    match (&a.from, &a.file, a.at) {
        (Some(raw), None, None) => {
            let f = File::open(raw).map_err(|e| CliError(format!("{}: {e}", raw.display())))?;
            let size = f
                .metadata()
                .map_err(|e| CliError(format!("{}: {e}", raw.display())))?
                .len();
            if size != img.size() {
                return Err(CliError(format!(
                    "{} is {size} bytes, the image {} bytes",
                    raw.display(),
                    img.size()
                )));
            }
            let mut prog = Progress::new(format!("write {}", raw.display()), size, a.quiet);
            let step = 1 << 20;
            let (mut new, mut old) = (vec![0u8; step], vec![0u8; step]);
            let mut off = 0u64;
            let mut written = 0u64;
            while off < size {
                let n = (size - off).min(step as u64) as usize;
                f.read_exact_at(&mut new[..n], off)
                    .map_err(|e| CliError(format!("{}: {e}", raw.display())))?;
                img.read(off, &mut old[..n])?;
                // Coalesce runs of differing 4 KiB blocks into one write each.
                let mut i = 0;
                while i < n {
                    let differs = |i: usize| new[i..(i + 4096).min(n)] != old[i..(i + 4096).min(n)];
                    if !differs(i) {
                        i += 4096;
                        continue;
                    }
                    let start = i;
                    while i < n && differs(i) {
                        i += 4096;
                    }
                    let end = i.min(n);
                    img.write(off + start as u64, &new[start..end])?;
                    written += (end - start) as u64;
                }
                off += n as u64;
                prog.update(off);
            }
            img.flush()?;
            println!(
                "wrote {written} bytes that differ into {}",
                a.image.display()
            );
        }
        (None, Some(file), Some(at)) => {
            let data =
                std::fs::read(file).map_err(|e| CliError(format!("{}: {e}", file.display())))?;
            img.write(at, &data)?;
            img.flush()?;
            println!("wrote {} bytes at {at}", data.len());
        }
        _ => {
            return Err(CliError(
                "give either --from RAW, or --file F with --at OFFSET".into(),
            ))
        }
    }
    Ok(())
}

pub fn export(a: ExportArgs) -> CliResult {
    let spec = ImageSpec::load(&a.image)?;
    let img = spec.open_image(false, &lsmd::HostServices::default())?;
    let out = File::create(&a.out).map_err(|e| CliError(format!("{}: {e}", a.out.display())))?;
    let io = |e: std::io::Error| CliError(format!("{}: {e}", a.out.display()));
    out.set_len(img.size()).map_err(io)?;
    let mut prog = Progress::new(format!("export {}", a.image.display()), img.size(), a.quiet);
    let mut buf = vec![0u8; 1 << 20];
    for (start, len, alloc) in img.map(0, img.size())? {
        if alloc == Alloc::Data {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(buf.len() as u64) as usize;
                img.read(start + done, &mut buf[..n])?;
                out.write_all_at(&buf[..n], start + done).map_err(io)?;
                done += n as u64;
            }
        }
        prog.update(start + len);
    }
    out.sync_all().map_err(io)?;
    Ok(())
}

pub fn commit(a: CommitArgs) -> CliResult {
    let mut spec = ImageSpec::load(&a.image)?;
    let opts = writer_options(&a.opts, Some(&spec.config))?;
    let upper_dir = spec.upper_dir();
    let w = {
        let img = spec.open_image(true, &lsmd::HostServices::default())?;
        if a.squash {
            write_blob_atomically(&a.out, |out| squash(&img, out, opts))?
        } else {
            let Some(up) = img.upper() else {
                return Err(CliError(format!(
                    "{} has no upper layer: nothing to commit (use --squash to merge layers)",
                    a.image.display()
                )));
            };
            up.flush()?;
            write_blob_atomically(&a.out, |out| commit_upper(up, out, opts))?
        }
    };
    // Config first, then the fresh upper layer: after a crash in between, the old upper layer
    // sits over a layer holding the same writes, which reads the same.
    let (entry, _) = layer_entry(&spec.path, &a.out, Some(&w))?;
    if a.squash {
        spec.config.layers = vec![entry];
    } else {
        spec.config.layers.push(entry);
    }
    spec.config.save(&spec.path)?;
    if let Some(dir) = upper_dir {
        std::fs::remove_dir_all(&dir).map_err(|e| CliError(format!("{}: {e}", dir.display())))?;
        UpperLayer::create(&dir, spec.config.size)?;
    }
    let mut stdout = std::io::stdout();
    writeln!(stdout, "{}", descriptor(&w)).map_err(|e| CliError(e.to_string()))?;
    Ok(())
}
