//! `lsmctl convert SRC DST`: an OCI image (an image layout directory, as `skopeo copy …
//! oci:DIR:TAG` or umoci make) becomes block layers in an OCI image layout. Each source layer is
//! decompressed once (checked against its digest, spooled) and applied to a root tree
//! (whiteouts honoured, see `unpack`). The bottom layer's tree is made into an ext4 filesystem
//! with `mkfs.ext4 -d`; every layer above is applied to the previous layer's filesystem in
//! place by one `debugfs` script replaying what the layer changed (`ext4apply`), so a layer
//! costs its own bytes. Each filesystem is imported as a layer holding only the 4 KiB blocks
//! whose hash changed (`rawimport`); for a layer small next to the image only the blocks
//! debugfs's undo file names are hashed (`e2undo`), so finding them costs the layer too. The
//! output is reproducible: UUID and hash seed derive from
//! the base layer's diff ID, the filesystem time and every inode's creation time are fixed,
//! every inode's change/access time is set to its modification time (which comes from the
//! layer), and directories a layer changes without naming keep their time. With `--fs erofs`
//! the final tree becomes one erofs layer instead (`erofs`). The result: an OCI manifest
//! of lsm layers (each annotated with the source layer it came from and the format version),
//! the source config, and `lsm-image.json`, an lsm image config over the converted blobs.
//!
//! With `--push http(s)://registry/repository:tag`, the converted blobs the registry lacks are
//! uploaded and the manifest tagged, and `lsm-remote.json` is written: an image config that
//! reads the layers from that registry. The source may be a registry image too
//! (`http(s)://registry/repository:tag`, pulled into a temporary layout first).
//!
//! Stages, each its own function or module: [`read_source`] (index → manifest, typed by
//! `crate::oci` and digest-checked), `spool` (each layer checked and decompressed once, on
//! every core), `layers` (the per-layer loop: apply, filesystem, import, reuse), `publish` (config,
//! manifest, index, the two lsmd image configs written through lsmd's `ImageConfig`, push).
//! Every e2fsprogs run is in `e2fs`, the reuse database in `reuse`.

pub mod dict;
mod e2fs;
mod e2undo;
mod erofs;
mod ext4apply;
mod ext4times;
mod hashindex;
mod layers;
pub mod manifest;
mod publish;
pub(crate) mod push;
mod rawimport;
mod remotedict;
pub mod report;
mod reuse;
mod scratch;
mod spool;
mod timing;
mod unpack;
mod workdir;

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::build::writer_options;
use crate::cli::{parse_size, CliError, CliResult, LayerOpts};
use crate::oci;

/// Arguments of `lsmctl convert`.
#[derive(clap::Args, Clone)]
pub struct ConvertArgs {
    /// Source image: an OCI image layout directory, or `http(s)://host[:port]/repository:tag`
    /// in a registry (pulled first; same credentials options as --push).
    #[arg(required_unless_present = "batch")]
    src: Option<String>,
    /// Destination: an OCI image layout directory (created; must not hold an image yet), or
    /// `http(s)://host[:port]/repository:tag` to push to (as --push, from a temporary layout).
    #[arg(required_unless_present = "batch")]
    dst: Option<PathBuf>,
    /// Convert many images: a file of `SRC DST [TAG]` lines (`#` comments); the other options
    /// apply to each. Layers shared between images are converted once (see --db).
    #[arg(long, conflicts_with_all = ["src", "dst", "push", "tag"])]
    batch: Option<PathBuf>,
    /// Images converted at once in a batch.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Image in SRC by its tag (`org.opencontainers.image.ref.name`); default: its only image.
    #[arg(long)]
    tag: Option<String>,
    /// Virtual disk size (suffixes K, M, G). Default: twice the unpacked size plus 64 MiB.
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Also push the converted image: `http(s)://host[:port]/repository:tag`.
    #[arg(long)]
    push: Option<String>,
    /// Allow pushing over plain HTTP (loopback test registries).
    #[arg(long)]
    insecure: bool,
    /// PEM file of the CA certificates trusted for HTTPS registries (SRC, --push, --dict),
    /// instead of the system's; written as `ca_file` into the pushed image's lsm config.
    #[arg(long, value_name = "PEM")]
    registry_ca: Option<PathBuf>,
    /// A token server (`host[:port]`, a Bearer challenge's realm) other than the registry that
    /// may receive the credentials, e.g. `auth.docker.io` (repeat for more). Others are asked
    /// for an anonymous token.
    #[arg(long = "token-host", value_name = "HOST")]
    token_hosts: Vec<String>,
    /// Registry user (else a docker-style config.json, else anonymous).
    #[arg(long, requires = "password")]
    username: Option<String>,
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// Database of earlier conversions (default `$XDG_CACHE_HOME/lsm/convert`, else
    /// `~/.cache/lsm/convert`): a layer whose source chain was converted before, with the same
    /// disk size and chunk settings, is reused instead of converted again.
    #[arg(long)]
    db: Option<PathBuf>,
    /// Convert everything, ignoring (and not filling) the database.
    #[arg(long)]
    no_reuse: bool,
    /// Borrow blocks from an already converted image instead of storing them again (repeat for
    /// several): a converted image layout `DIR` (or `DIR:TAG`) or
    /// `http(s)://host[:port]/repository:tag`. The new manifest lists every blob it borrows
    /// from, so registries keep them and clients fetch them. See `lsmctl dedup-report`.
    #[arg(long = "dict", value_name = "REF")]
    dict: Vec<String>,
    /// Filesystem of the converted image: `ext4` (one lsm layer per source layer, writable
    /// through an upper layer) or `erofs` (read-only, flattened: one lsm layer holding the
    /// image's final tree; needs erofs-utils' mkfs.erofs; mount with the kernel's erofs).
    #[arg(long, value_enum, default_value_t = FsKind::Ext4)]
    fs: FsKind,
    /// Where to unpack the tree and build the raw filesystem (a private directory is made
    /// inside and removed at the end). On a tmpfs such as /dev/shm they are never written to
    /// (nor removed from) a disk, which is most of a conversion's time on a slow or
    /// discard-mounted disk; it holds about 2.5 times the unpacked size in memory. Default:
    /// /dev/shm when it and the available memory have room for that (times --jobs), else
    /// inside DST.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    #[command(flatten)]
    opts: LayerOpts,
    /// No progress lines.
    #[arg(short, long)]
    quiet: bool,
    /// Print the converted manifest's digest on stdout (not when converting for a report).
    #[arg(skip = true)]
    print_digest: bool,
}

/// The filesystem a conversion writes.
#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum FsKind {
    Ext4,
    Erofs,
}

impl ConvertArgs {
    /// How to talk to registries.
    fn client(&self) -> push::Client {
        push::Client {
            ca_file: self.registry_ca.clone(),
            token_hosts: self.token_hosts.clone(),
        }
    }
}

fn bad(what: impl std::fmt::Display) -> CliError {
    CliError(what.to_string())
}

/// An image layout's `index.json` (or any image index file).
fn read_index(p: &Path) -> CliResult<oci::Index> {
    let text = std::fs::read(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
    oci::parse_index(&text, &p.display().to_string())
}

/// The image manifest `digest` of layout `layout`, checked against its digest.
fn read_manifest(layout: &Path, digest: &str) -> CliResult<oci::Manifest> {
    let p = blob_path(layout, digest)?;
    if sha256_file(&p)? != digest {
        return Err(bad(format!(
            "manifest {digest}: content does not match its digest"
        )));
    }
    let text = std::fs::read(&p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
    oci::parse_manifest(&text, &format!("manifest {digest}"))
}

/// A layer descriptor's stored metadata length (`io.lsm.layer.meta-len`), when it has one.
fn meta_len_of(desc: &oci::Descriptor) -> Option<u64> {
    desc.annotation(blockfmt::META_LEN_ANNOTATION)
        .and_then(|s| s.parse().ok())
}

/// `blobs/sha256/<hex>` of a layout, for a `sha256:` digest (anything else is refused).
fn blob_path(layout: &Path, digest: &str) -> CliResult<PathBuf> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| bad(format!("unsupported digest {digest:?}")))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

/// `sha256:<hex>` of a file.
fn sha256_file(p: &Path) -> CliResult<String> {
    Ok(format!(
        "sha256:{}",
        hex::encode(crate::build::sha2_file(p)?)
    ))
}

/// How many times more a block costs when debugfs records it in an undo file than when it is
/// hashed from the page cache with the rest of the image (measured: about 10–20×; the undo
/// manager copies each block's old contents and rewrites its index per block).
const UNDO_COST: u64 = 16;

/// Whether a layer of `tar_bytes` is cheaper to apply with an undo file naming the blocks it
/// writes (`rawimport::Scan::Written`, costs the layer) than to find its blocks by hashing the
/// whole filesystem `raw` (costs the image): small layers over big images. Either way gives
/// the same blob.
fn worth_tracking(tar_bytes: u64, raw: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let image = std::fs::metadata(raw).map_or(0, |m| m.blocks() * 512);
    tar_bytes.saturating_mul(UNDO_COST) < image
}

/// What [`layer_filesystem`] works from: one layer, applied to the host tree already.
struct LayerFs<'a> {
    fs: FsKind,
    root: &'a Path,
    raw: &'a Path,
    size: u64,
    uuid: &'a str,
    digest: &'a str,
    /// Position of the layer, 0 = bottom.
    index: usize,
    changes: &'a ext4apply::Changes,
    tar_bytes: u64,
    say: &'a dyn Fn(String),
}

/// Makes `raw` the filesystem of the tree after layer `l.index`: erofs of the whole tree; the
/// layer's changes applied in place to the filesystem below (`ext4apply`); or, for the bottom
/// layer and a layer debugfs cannot express, ext4 of the whole tree (`mkfs.ext4 -d`). Returns
/// which blocks the import must look at.
fn layer_filesystem(l: &LayerFs) -> CliResult<rawimport::Scan> {
    let (raw, i, digest) = (l.raw, l.index, l.digest);
    let mut scan = rawimport::Scan::Whole;
    let _t = timing::stage(|| format!("layer {}: filesystem", i + 1));
    let in_place = if l.fs == FsKind::Erofs {
        erofs::make(l.root, raw, l.size, l.uuid)?;
        true
    } else if i > 0 && raw.exists() {
        match l
            .changes
            .run(raw, worth_tracking(l.tar_bytes, raw))
            .map_err(|e| bad(format!("layer {digest}: {e}")))?
        {
            Ok(written) => {
                if let Some(runs) = written {
                    scan = rawimport::Scan::Written(runs);
                }
                true
            }
            Err(why) => {
                (l.say)(format!(
                    "layer {}: {why}: making its filesystem whole",
                    i + 1
                ));
                false
            }
        }
    } else {
        false
    };
    if !in_place {
        e2fs::make_whole_fs(l.root, raw, l.size, l.uuid, digest)?;
    }
    Ok(scan)
}

/// What one conversion did.
#[derive(Default, Debug, Clone, Copy)]
pub struct Summary {
    pub converted: usize,
    pub reused: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// Hard-links `from` to `to` (same filesystem), else copies it.
fn link_or_copy(from: &Path, to: &Path) -> CliResult {
    if to.exists() {
        return Ok(());
    }
    if std::fs::hard_link(from, to).is_err() {
        let tmp = to.with_extension("partial");
        std::fs::copy(from, &tmp).map_err(|e| bad(format!("{}: {e}", from.display())))?;
        std::fs::rename(&tmp, to).map_err(|e| bad(format!("{}: {e}", to.display())))?;
    }
    Ok(())
}

/// Writes `bytes` as a blob of layout `dst`; returns its descriptor fields (digest, size).
fn put_blob(dst: &Path, bytes: &[u8]) -> CliResult<(String, u64)> {
    let digest = format!("sha256:{}", hex::encode(Sha256::digest(bytes)));
    let p = blob_path(dst, &digest)?;
    std::fs::write(&p, bytes).map_err(|e| bad(format!("{}: {e}", p.display())))?;
    Ok((digest, bytes.len() as u64))
}

pub fn convert(a: ConvertArgs) -> CliResult {
    let Some(list) = a.batch.clone() else {
        return convert_one(a).map(|_| ());
    };
    let text =
        std::fs::read_to_string(&list).map_err(|e| bad(format!("{}: {e}", list.display())))?;
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let (src, dst, tag) = match f.as_slice() {
            [s, d] => (*s, *d, None),
            [s, d, t] => (*s, *d, Some(t.to_string())),
            _ => {
                return Err(bad(format!(
                    "{}:{}: want SRC DST [TAG]",
                    list.display(),
                    n + 1
                )))
            }
        };
        let mut one = a.clone();
        one.batch = None;
        one.src = Some(src.to_string());
        one.dst = Some(PathBuf::from(dst));
        one.tag = tag;
        jobs.push(one);
    }
    let start = std::time::Instant::now();
    let total = jobs.len();
    let queue = std::sync::Mutex::new(jobs.into_iter().enumerate());
    let results = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..a.jobs.clamp(1, total.max(1)) {
            sc.spawn(|| loop {
                let next = queue.lock().ok().and_then(|mut q| q.next());
                let Some((i, job)) = next else { return };
                let name = job.src.clone().unwrap_or_default();
                let r = convert_one(job);
                if let Ok(mut v) = results.lock() {
                    v.push((i, name, r));
                }
            });
        }
    });
    let mut results = results.into_inner().unwrap_or_default();
    results.sort_by_key(|r| r.0);
    let mut sum = Summary::default();
    let mut failed = 0;
    for (_, name, r) in &results {
        match r {
            Ok(s) => {
                sum.converted += s.converted;
                sum.reused += s.reused;
                sum.bytes_in += s.bytes_in;
                sum.bytes_out += s.bytes_out;
            }
            Err(e) => {
                failed += 1;
                eprintln!("convert: {name}: {}", e.0);
            }
        }
    }
    eprintln!(
        "convert: {} images ({failed} failed), layers {} converted, {} reused; {} bytes in, {} bytes out; {:.1} s",
        total,
        sum.converted,
        sum.reused,
        sum.bytes_in,
        sum.bytes_out,
        start.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(bad(format!("{failed} of {total} conversions failed")));
    }
    Ok(())
}

fn convert_one(a: ConvertArgs) -> CliResult<Summary> {
    let dst_arg = a.dst.clone().unwrap_or_default();
    let dst_str = dst_arg.to_string_lossy().into_owned();
    if dst_str.starts_with("http://") || dst_str.starts_with("https://") {
        if a.push.is_some() {
            return Err(bad("give either a registry DST or --push, not both"));
        }
        let layout = std::env::temp_dir().join(format!(
            "lsm-convert-{}-{}",
            std::process::id(),
            hex::encode(Sha256::digest(dst_str.as_bytes()))
                .get(..12)
                .unwrap_or_default()
        ));
        let _ = std::fs::remove_dir_all(&layout);
        let _cleanup = workdir::WorkTree::adopt(&layout);
        return convert_one(ConvertArgs {
            dst: Some(layout.clone()),
            push: Some(dst_str),
            ..a
        });
    }
    let src_arg = a.src.clone().unwrap_or_default();
    let creds = match (&a.username, &a.password) {
        (Some(u), Some(pw)) => Some(lsmd::source::auth::Credentials {
            username: u.clone(),
            password: pw.clone(),
        }),
        _ => None,
    };
    if src_arg.starts_with("http://") || src_arg.starts_with("https://") {
        let target = push::Target::parse(&src_arg)?;
        if target.base.starts_with("http://") && !a.insecure {
            return Err(bad(format!("{src_arg}: plain HTTP needs --insecure")));
        }
        let tag = target.tag.clone();
        let pulled = a.dst.clone().unwrap_or_default().with_extension("pull");
        let _ = std::fs::remove_dir_all(&pulled);
        let _cleanup = workdir::WorkTree::adopt(&pulled);
        if !a.quiet {
            eprintln!("convert: pulling {src_arg}");
        }
        let r = push::Session::new(target, creds.clone(), &a.client())
            .and_then(|s| s.pull(&pulled))
            .and_then(|_| {
                let local = ConvertArgs {
                    src: Some(pulled.display().to_string()),
                    tag: Some(tag),
                    ..a
                };
                convert_layout(local, creds)
            });
        return r;
    }
    convert_layout(a, creds)
}

/// The source image of a conversion, read from an image layout and checked.
struct SourceImage {
    manifest_digest: String,
    manifest: oci::Manifest,
}

/// Reads the image `tag` (or the only image) of layout `src`; its manifest is checked against
/// its digest (layers are checked as they are spooled).
fn read_source(src: &Path, tag: Option<&str>) -> CliResult<SourceImage> {
    let index = read_index(&src.join("index.json"))?;
    let desc = index.by_tag(tag, &src.display().to_string(), "pick one with --tag")?;
    Ok(SourceImage {
        manifest_digest: desc.digest.clone(),
        manifest: read_manifest(src, &desc.digest)?,
    })
}

/// Default disk size: a power-of-two size class (at least 256 MiB) with room for twice the
/// content; images of one class can share converted layers. Holes cost nothing.
fn default_disk_size(unpacked: u64) -> u64 {
    (2 * unpacked + (64 << 20))
        .next_power_of_two()
        .max(256 << 20)
}

/// The filesystem identity every layer of an image gets: from the base layer's content (its
/// diff ID), so the same base converts to the same filesystem whatever image or registry it
/// came from, and however it was compressed.
fn filesystem_uuid(base_diff_id: &[u8]) -> String {
    let seed = Sha256::digest(base_diff_id);
    format!(
        "{}-{}-{}-{}-{}",
        hex::encode(&seed[0..4]),
        hex::encode(&seed[4..6]),
        hex::encode(&seed[6..8]),
        hex::encode(&seed[8..10]),
        hex::encode(&seed[10..16])
    )
}

/// Where the work tree goes for an image of `unpacked` bytes: `--work-dir`, else `/dev/shm` if
/// it has room (`scratch`); `None`: inside DST.
fn work_dir(a: &ConvertArgs, unpacked: u64) -> Option<PathBuf> {
    a.work_dir
        .clone()
        .or_else(|| scratch::default_work_dir(unpacked, a.jobs))
}

/// The private (0700) work tree for the host tree and raw filesystem: in `dir`, else inside
/// DST. Removed however the conversion ends, signals included: it holds the image's setuid
/// files and device nodes.
fn work_tree(dir: Option<&Path>, dst: &Path) -> CliResult<workdir::WorkTree> {
    let path = match dir {
        Some(d) => d.join(format!(
            ".lsm-convert-{}-{}",
            std::process::id(),
            hex::encode(Sha256::digest(dst.as_os_str().as_encoded_bytes()))
                .get(..12)
                .unwrap_or_default()
        )),
        None => dst.join(".convert-work"),
    };
    let tree = workdir::WorkTree::create(&path).map_err(|e| bad(format!("work tree: {e}")))?;
    std::fs::create_dir(tree.path().join("root"))?;
    Ok(tree)
}

/// A guess of the image's unpacked size before its layers are decompressed, for where to put
/// the work tree while the bottom layer streams into it: a gzip layer's trailer size (its
/// length modulo 4 GiB) or its compressed size, whichever is larger; else 4 times the
/// compressed size. Only where the tree goes depends on it, never the output; a wrong guess
/// costs the streamed apply, which is then redone from the spool.
fn estimated_unpacked(src: &Path, layers: &[oci::Descriptor]) -> u64 {
    use std::io::{Read, Seek, SeekFrom};
    let gzip_size = |l: &oci::Descriptor| -> Option<u64> {
        let mut f = std::fs::File::open(blob_path(src, &l.digest).ok()?).ok()?;
        f.seek(SeekFrom::End(-4)).ok()?;
        let mut b = [0u8; 4];
        f.read_exact(&mut b).ok()?;
        Some(u32::from_le_bytes(b) as u64)
    };
    layers
        .iter()
        .map(|l| {
            if l.media_type.ends_with("gzip") {
                gzip_size(l).unwrap_or(0).max(l.size)
            } else {
                l.size.saturating_mul(4)
            }
        })
        .fold(0u64, |a, b| a.saturating_add(b))
}

/// Spools the layers (`spool`) and meanwhile streams the bottom layer's bytes into a work tree
/// (its apply overlaps its decompression and the other layers'), when the work tree's place
/// is known before the unpacked size is: `--work-dir`, or `/dev/shm` with room for the
/// [`estimated_unpacked`] size (the stream stops past that size). The tree is kept only if
/// every layer then matched its digest (else the error is the spool's), the apply succeeded
/// and the unpacked size puts the tree in the same place; otherwise it is removed and the
/// bottom layer applied from the spool as the others are. The same tree either way.
fn spool_and_apply_bottom(
    a: &ConvertArgs,
    src: &Path,
    dst: &Path,
    layers: &[oci::Descriptor],
) -> CliResult<(spool::Spool, Option<workdir::WorkTree>)> {
    let guess = estimated_unpacked(src, layers);
    let Some(dir) = work_dir(a, guess).filter(|_| !layers.is_empty()) else {
        return Ok((spool::spool_layers(src, dst, layers, None)?, None));
    };
    let tree = work_tree(Some(&dir), dst)?;
    let root = tree.path().join("root");
    let (to, from) = std::sync::mpsc::sync_channel(16);
    let tee = spool::Tee {
        to,
        limit: if a.work_dir.is_some() {
            u64::MAX
        } else {
            guess
        },
    };
    let (spooled, applied) = std::thread::scope(|sc| {
        let spooling = sc.spawn(move || spool::spool_layers(src, dst, layers, Some(tee)));
        let streamed = timing::stage(|| "layer 1: tar to host tree, streamed".into());
        let mut stream = Some(spool::TeeReader::new(from));
        let mut changes = ext4apply::Changes::new(&root);
        let applied = unpack::apply_layer(&root, &mut changes, true, || {
            let s = stream
                .take()
                .ok_or_else(|| std::io::Error::other("read twice"))?;
            Ok(Box::new(s) as Box<dyn std::io::Read>)
        });
        drop(stream);
        drop(streamed);
        (spooling.join(), applied)
    });
    let spool = spooled.map_err(|_| bad("internal error: the spooling thread panicked"))??;
    let keep = applied.is_ok() && work_dir(a, spool.unpacked).as_deref() == Some(dir.as_path());
    if !keep {
        timing::note(|| "layer 1: the streamed apply is not kept; applied from the spool".into());
    }
    Ok((spool, keep.then_some(tree)))
}

/// Converts the image `a.src` (an image layout) into the layout `a.dst`: the source is read and
/// checked, its layers spooled, converted bottom first (`layers`), and the result published
/// (`publish`). On failure no partial image is left: the blobs written (and DST, if this made
/// it) are removed.
fn convert_layout(
    a: ConvertArgs,
    creds: Option<lsmd::source::auth::Credentials>,
) -> CliResult<Summary> {
    let src = PathBuf::from(a.src.clone().unwrap_or_default());
    let dst = a.dst.clone().unwrap_or_default();
    let say = |m: String| {
        if !a.quiet {
            eprintln!("convert: {m}");
        }
    };
    let _total = timing::stage(|| "total".into());
    let source = read_source(&src, a.tag.as_deref())?;
    let (spool, early_tree) = {
        let _t = timing::stage(|| "spool (all layers)".into());
        spool_and_apply_bottom(&a, &src, &dst, &source.manifest.layers)?
    };
    let size = a.size.unwrap_or_else(|| default_disk_size(spool.unpacked));
    let n = source.manifest.layers.len();
    say(format!(
        "{n} layers, {} bytes unpacked, disk {size} bytes",
        spool.unpacked
    ));

    if dst.join("index.json").exists() {
        return Err(bad(format!("{} already holds an image", dst.display())));
    }
    let created = !dst.exists();
    std::fs::create_dir_all(dst.join("blobs/sha256"))
        .map_err(|e| bad(format!("{}: {e}", dst.display())))?;
    let remove_partial = || {
        let _ = std::fs::remove_dir_all(if created {
            dst.clone()
        } else {
            dst.join("blobs")
        });
    };
    let bottom_applied = early_tree.is_some();
    let work_tree = match early_tree {
        Some(t) => t,
        None => work_tree(work_dir(&a, spool.unpacked).as_deref(), &dst)?,
    };
    let root = work_tree.path().join("root");
    let dict_dir = dst.join(".convert-dict");
    let dict_tree = workdir::WorkTree::adopt(&dict_dir);
    let dict = if a.dict.is_empty() {
        None
    } else {
        let loaded = dict::load(
            &a.dict,
            &dict_dir,
            creds.as_ref(),
            a.insecure,
            &a.client(),
            &say,
        );
        if loaded.is_err() && created {
            let _ = std::fs::remove_dir_all(&dst);
        }
        Some(loaded?)
    };
    // Every layer borrows what the dictionary images or the layers below it already store.
    let (running, dict_blobs, hash_lists, remote_blobs) = match dict {
        Some(d) => (d.dict, d.blobs, d.index, d.remote),
        None => Default::default(),
    };
    let mut run = layers::LayerRun {
        fs: a.fs,
        quiet: a.quiet,
        dst: &dst,
        root: &root,
        raw: work_tree.path().join("fs.raw"),
        size,
        uuid: filesystem_uuid(
            spool
                .diff_ids
                .first()
                .map(|d| d.as_slice())
                .unwrap_or_default(),
        ),
        opts: writer_options(&a.opts, None)?,
        db: (!a.no_reuse)
            .then(|| a.db.clone().or_else(reuse::default_db))
            .flatten()
            .map(|dir| reuse::ReuseDb { dir }),
        dict_digests: dict_blobs.iter().map(|b| b.digest.clone()).collect(),
        dict_blobs: &dict_blobs,
        running,
        hash_lists,
        remote_blobs,
        hashes: Some(rawimport::BlockHashes::zeros(size)),
        in_dict: 0,
        out: Vec::new(),
        bottom_applied,
        tree_removal: None,
        stats: Summary {
            bytes_in: source.manifest.layers.iter().map(|l| l.size).sum(),
            ..Summary::default()
        },
        say: &say,
    };
    let result = source
        .manifest
        .layers
        .iter()
        .enumerate()
        .try_for_each(|(i, l)| {
            run.layer(&layers::SourceLayer {
                index: i,
                count: n,
                digest: &l.digest,
                tar: spool.tar(i),
                chain: &spool.diff_ids[..=i],
            })
        })
        .and_then(|()| run.borrowed_blobs());
    let end = timing::stage(|| "end (removal, hash index, publish)".into());
    if let Some(r) = run.tree_removal.take() {
        r.wait();
    }
    drop(work_tree);
    drop(dict_tree);
    drop(spool);
    let borrowed = result.inspect_err(|_| remove_partial())?;
    let index = hashindex::for_image(&dst, &run.out, &borrowed, &mut run.hash_lists)
        .inspect_err(|_| remove_partial())?;
    let hash_index = put_blob(&dst, &index)?;
    let converted = publish::Converted {
        src: &src,
        dst: &dst,
        source_manifest: &source.manifest_digest,
        source_config: &source.manifest.config,
        size,
        layers: &run.out,
        borrowed: &borrowed,
        hash_index,
    };
    let published = publish::write_layout(&a, &converted)?;
    if let Some(p) = &a.push {
        publish::push_image(&a, &converted, &published, p, creds, &say)?;
    }
    let stats = run.stats;
    say(format!(
        "{} layers converted, {} reused; {} bytes in, {} bytes out",
        stats.converted, stats.reused, stats.bytes_in, stats.bytes_out
    ));
    if a.print_digest {
        println!("{}", published.manifest_digest);
    }
    drop(end);
    Ok(stats)
}
