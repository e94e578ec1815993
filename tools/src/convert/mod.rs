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
//! (`http(s)://registry/repository:tag`, pulled into a temporary layout first). First cut: one
//! image per run; no reuse database.

pub mod dict;
mod e2undo;
mod erofs;
mod ext4apply;
mod ext4times;
mod hashindex;
pub mod manifest;
pub(crate) mod push;
mod rawimport;
mod remotedict;
pub mod report;
mod unpack;
mod workdir;

use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use blockfmt::{Image, Layer, LayerStack};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::build::{write_blob_atomically, writer_options};
use crate::cli::{parse_size, CliError, CliResult, LayerOpts};

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
    /// inside and removed at the end; default: inside DST). On a tmpfs such as /dev/shm they
    /// are never written to (nor removed from) a disk, which is most of a conversion's time on
    /// a slow or discard-mounted disk; it holds about twice the unpacked size in memory.
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

fn read_json(p: &Path) -> CliResult<Value> {
    let text = std::fs::read(p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
    serde_json::from_slice(&text).map_err(|e| bad(format!("{}: {e}", p.display())))
}

/// A layer descriptor's stored metadata length (`io.lsm.layer.meta-len`), when it has one.
fn meta_len_of(desc: &Value) -> Option<u64> {
    desc["annotations"][blockfmt::META_LEN_ANNOTATION]
        .as_str()
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

/// A source layer's bytes, decompressed as its media type says.
fn layer_reader(path: &Path, media_type: &str) -> std::io::Result<Box<dyn Read>> {
    let f = BufReader::with_capacity(1 << 20, File::open(path)?);
    Ok(if media_type.ends_with("gzip") {
        Box::new(flate2::read::MultiGzDecoder::new(f))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::stream::read::Decoder::new(f)?)
    } else if media_type.ends_with(".tar") || media_type.ends_with("tar") {
        Box::new(f)
    } else {
        return Err(std::io::Error::other(format!(
            "unsupported layer media type {media_type}"
        )));
    })
}

/// UUID every converted filesystem is made with, and its directory hash seed. ext4 seeds every
/// metadata checksum (inodes, directory blocks, bitmaps, extent blocks) with the UUID it was
/// made with, and orders large directories by the hash seed, so one constant for both makes the
/// same files give the same metadata blocks in any image — which cross-image dedup needs
/// (FORMAT.md §1.7). `metadata_csum_seed` keeps that seed when the filesystem then gets its own
/// UUID (derived from its base layer) in the superblock.
const FS_SEED: &str = "6c736d2d-6673-4d00-8000-000000000001";

/// Makes the filesystem's times a function of the image (`ext4times`: change and access
/// times = the modification time the layer gave each inode, the root's times fixed) and gives
/// the filesystem its own UUID (see [`FS_SEED`]) with one `debugfs` command.
fn normalize_times(raw: &Path, uuid: &str) -> CliResult {
    {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(raw)?;
        ext4times::normalize(&f).map_err(|e| bad(e.to_string()))?;
    }
    ext4apply::run_script(
        raw,
        &format!("ssv uuid {uuid}\n"),
        "debugfs",
        "debugfs setting the UUID",
    )
    .map_err(|e| bad(e.to_string()))?;
    Ok(())
}

/// Makes `raw` (`size` bytes, recreated) the ext4 filesystem of the whole tree `root`, with
/// `mkfs.ext4 -d`: for the bottom layer, and for a layer that cannot be applied in place (see
/// `ext4apply`).
fn make_whole_fs(root: &Path, raw: &Path, size: u64, uuid: &str, digest: &str) -> CliResult {
    {
        let _step = workdir::step()?;
        let _ = std::fs::remove_file(raw);
        File::create(raw)?.set_len(size)?;
    }
    let o = workdir::output(
        std::process::Command::new("mkfs.ext4")
            .args([
                "-q",
                "-F",
                "-b",
                "4096",
                "-U",
                FS_SEED,
                "-O",
                "metadata_csum_seed",
            ])
            .arg("-E")
            .arg(format!("hash_seed={FS_SEED},lazy_itable_init=0,nodiscard"))
            .arg("-d")
            .arg(root)
            .arg(raw)
            .env("E2FSPROGS_FAKE_TIME", "1"),
    )
    .map_err(|e| bad(format!("mkfs.ext4: {e}")))?;
    if !o.status.success() {
        return Err(bad(format!(
            "mkfs.ext4 for layer {digest}: {} (is --size {size} too small?)",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    normalize_times(raw, uuid)
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
        make_whole_fs(l.root, raw, l.size, l.uuid, digest)?;
    }
    Ok(scan)
}

/// Where blob `digest` is during a conversion: a layer converted already, or a dictionary blob.
fn path_of(dst: &Path, out: &[Value], dict: &[dict::DictBlob], digest: &str) -> Option<PathBuf> {
    if out.iter().any(|l| l["digest"].as_str() == Some(digest)) {
        return blob_path(dst, digest).ok();
    }
    // (A blob read through a hash index was not downloaded: it stays missing.)
    dict.iter()
        .find(|b| b.digest == digest)
        .map(|b| b.path.clone())
        .filter(|p| p.exists())
}

/// What one conversion did.
#[derive(Default, Debug, Clone, Copy)]
pub struct Summary {
    pub converted: usize,
    pub reused: usize,
    pub bytes_in: u64,
    pub bytes_out: u64,
}

/// The key of a converted layer: its source chain (diff IDs of it and every layer under it),
/// the disk size and the layer settings — what decides the converted bytes.
fn chain_key(
    diff_ids: &[impl AsRef<[u8]>],
    size: u64,
    opts: &blockfmt::WriterOptions,
    dict: &[String],
    fs: FsKind,
) -> String {
    let mut h = Sha256::new();
    // v9: images carry a hash-index blob (FORMAT.md §8).
    h.update(b"lsm-convert-v9\0");
    if fs == FsKind::Erofs {
        h.update(b"erofs-flat\0");
    }
    h.update(size.to_le_bytes());
    h.update(format!("{:?}/{:?}", opts.chunk_size, opts.compression).as_bytes());
    // A dictionary changes what is stored (not what is read): its blobs are part of the key.
    for d in dict {
        h.update(b"dict\0");
        h.update(d.as_bytes());
    }
    for d in diff_ids {
        h.update(d.as_ref());
    }
    hex::encode(h.finalize())
}

fn default_db() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
        .map(|c| c.join("lsm/convert"))
}

/// Converted layers by chain key: `chains/<key>.json` (the layer's descriptor) and the blob in
/// `blobs/sha256/`. Written atomically; a missing or unreadable entry is a miss.
struct ReuseDb {
    dir: PathBuf,
}

impl ReuseDb {
    fn lookup(&self, key: &str) -> Option<(Value, PathBuf)> {
        let desc: Value = serde_json::from_slice(
            &std::fs::read(self.dir.join("chains").join(format!("{key}.json"))).ok()?,
        )
        .ok()?;
        let blob = blob_path(&self.dir, desc["digest"].as_str()?).ok()?;
        blob.exists().then_some((desc, blob))
    }

    /// Remembers a converted layer (failures only cost a future conversion).
    fn record(&self, key: &str, desc: &Value, blob: &Path) {
        let r = (|| -> std::io::Result<()> {
            let blobs = self.dir.join("blobs/sha256");
            std::fs::create_dir_all(&blobs)?;
            std::fs::create_dir_all(self.dir.join("chains"))?;
            let name = blob
                .file_name()
                .ok_or_else(|| std::io::Error::other("blob name"))?;
            link_or_copy(blob, &blobs.join(name)).map_err(|e| std::io::Error::other(e.0))?;
            let tmp = self.dir.join("chains").join(format!(".{key}.tmp"));
            std::fs::write(&tmp, serde_json::to_vec(desc)?)?;
            std::fs::rename(&tmp, self.dir.join("chains").join(format!("{key}.json")))
        })();
        if let Err(e) = r {
            eprintln!(
                "convert: warning: cannot record a conversion in {}: {e}",
                self.dir.display()
            );
        }
    }
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

/// A `Write` that hashes, and copies to a file if it has one.
struct HashingSink(Sha256, Option<std::io::BufWriter<File>>);

impl std::io::Write for HashingSink {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        if let Some(f) = &mut self.1 {
            std::io::Write::write_all(f, b)?;
        }
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
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
    // --- the source image -------------------------------------------------------------------
    let index = read_json(&src.join("index.json"))?;
    let manifests = index["manifests"]
        .as_array()
        .ok_or_else(|| bad(format!("{}/index.json lists no manifests", src.display())))?;
    let chosen: Vec<&Value> = manifests
        .iter()
        .filter(|m| match &a.tag {
            Some(t) => m["annotations"]["org.opencontainers.image.ref.name"].as_str() == Some(t),
            None => true,
        })
        .collect();
    let desc = match chosen.as_slice() {
        [one] => *one,
        [] => {
            return Err(bad(format!(
                "{}: no image tagged {:?}",
                src.display(),
                a.tag
            )))
        }
        _ => {
            return Err(bad(format!(
                "{} holds several images: pick one with --tag",
                src.display()
            )))
        }
    };
    let manifest_digest = desc["digest"].as_str().unwrap_or_default().to_string();
    let manifest_path = blob_path(&src, &manifest_digest)?;
    if sha256_file(&manifest_path)? != manifest_digest {
        return Err(bad(format!(
            "manifest {manifest_digest}: content does not match its digest"
        )));
    }
    let manifest = read_json(&manifest_path)?;
    let config_digest = manifest["config"]["digest"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let layers: Vec<(String, String)> = manifest["layers"]
        .as_array()
        .ok_or_else(|| bad("the manifest lists no layers"))?
        .iter()
        .map(|l| {
            (
                l["digest"].as_str().unwrap_or_default().to_string(),
                l["mediaType"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();

    // Every blob is checked before anything is written; the unpacked size sizes the disk; the
    // uncompressed digests (diff IDs) name the content whatever its compression. Each layer is
    // decompressed only here, into a private spool beside DST that the apply passes read.
    let mut unpacked = 0u64;
    let mut diff_ids = Vec::new();
    let spool_tree = {
        let mut name = dst.file_name().unwrap_or_default().to_os_string();
        name.push(".lsm-spool");
        let spool = dst.with_file_name(name);
        if let Some(up) = spool.parent().filter(|u| !u.as_os_str().is_empty()) {
            std::fs::create_dir_all(up).map_err(|e| bad(format!("{}: {e}", up.display())))?;
        }
        workdir::WorkTree::create(&spool).map_err(|e| bad(format!("spool: {e}")))?
    };
    let spooled = |i: usize| spool_tree.path().join(format!("{i}.tar"));
    for (i, (digest, media)) in layers.iter().enumerate() {
        let p = blob_path(&src, digest)?;
        if sha256_file(&p)? != *digest {
            return Err(bad(format!(
                "layer {digest}: content does not match its digest (corrupt or truncated)"
            )));
        }
        let mut r = layer_reader(&p, media).map_err(|e| bad(format!("layer {digest}: {e}")))?;
        let mut h = HashingSink(
            Sha256::new(),
            Some(std::io::BufWriter::with_capacity(
                1 << 20,
                File::create(spooled(i)).map_err(|e| bad(format!("spool: {e}")))?,
            )),
        );
        unpacked += std::io::copy(&mut r, &mut h)
            .map_err(|e| bad(format!("layer {digest}: {e} (corrupt or truncated)")))?;
        if let Some(w) = h.1.take() {
            w.into_inner().map_err(|e| bad(format!("spool: {e}")))?;
        }
        diff_ids.push(h.0.finalize());
    }
    // Default: a power-of-two size class (at least 256 MiB) with room for twice the content;
    // images of one class can share converted layers. Holes cost nothing.
    let size = a.size.unwrap_or_else(|| {
        (2 * unpacked + (64 << 20))
            .next_power_of_two()
            .max(256 << 20)
    });
    say(format!(
        "{} layers, {unpacked} bytes unpacked, disk {size} bytes",
        layers.len()
    ));

    // --- the destination -------------------------------------------------------------------
    if dst.join("index.json").exists() {
        return Err(bad(format!("{} already holds an image", dst.display())));
    }
    let created = !dst.exists();
    std::fs::create_dir_all(dst.join("blobs/sha256"))
        .map_err(|e| bad(format!("{}: {e}", dst.display())))?;
    // Private (0700) and removed however this ends, signals included: it holds the image's
    // setuid files and device nodes.
    let work_path = match &a.work_dir {
        Some(d) => d.join(format!(
            ".lsm-convert-{}-{}",
            std::process::id(),
            hex::encode(Sha256::digest(dst.as_os_str().as_encoded_bytes()))
                .get(..12)
                .unwrap_or_default()
        )),
        None => dst.join(".convert-work"),
    };
    let work_tree =
        workdir::WorkTree::create(&work_path).map_err(|e| bad(format!("work tree: {e}")))?;
    let work = work_tree.path().to_path_buf();
    let root = work.join("root");
    std::fs::create_dir(&root)?;
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
    // Every layer borrows what the dictionary images or the layers below it already store:
    // `running` starts as the --dict images and grows by each layer converted.
    // `hash_lists`: block hashes of every blob this image will list, for its hash index.
    let (mut running, dict_blobs, mut hash_lists) = match dict {
        Some(d) => (d.dict, d.blobs, d.index),
        None => (blockfmt::Dictionary::new(), Vec::new(), Default::default()),
    };
    let dict_digests: Vec<String> = dict_blobs.iter().map(|b| b.digest.clone()).collect();
    let db = (!a.no_reuse)
        .then(|| a.db.clone().or_else(default_db).map(|dir| ReuseDb { dir }))
        .flatten();
    let mut stats = Summary {
        bytes_in: layers
            .iter()
            .filter_map(|(d, _)| blob_path(&src, d).ok())
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum(),
        ..Summary::default()
    };
    // The host tree, removed while the top layer is imported (it is not read after its
    // filesystem is made).
    let mut tree_removal: Option<workdir::Removal> = None;
    let result = (|| -> CliResult<(Vec<Value>, Vec<dict::DictBlob>)> {
        // Deterministic filesystem identity: from the base layer's content (its diff ID), so
        // the same base converts to the same filesystem whatever image or registry it came
        // from, and however it was compressed.
        let seed = Sha256::digest(diff_ids.first().map(|d| d.as_slice()).unwrap_or_default());
        let uuid = format!(
            "{}-{}-{}-{}-{}",
            hex::encode(&seed[0..4]),
            hex::encode(&seed[4..6]),
            hex::encode(&seed[6..8]),
            hex::encode(&seed[8..10]),
            hex::encode(&seed[10..16])
        );
        let opts = writer_options(&a.opts, None)?;
        let mut out: Vec<Value> = Vec::new();
        let mut in_dict = 0;
        let raw = work.join("fs.raw");
        // The block hashes of `raw` when it holds the filesystem of the layers converted so
        // far (`None` after a reused layer: then it is exported from them when next needed).
        let mut hashes = Some(rawimport::BlockHashes::zeros(size));
        for (i, (digest, _)) in layers.iter().enumerate() {
            let mut changes = ext4apply::Changes::new(&root);
            let tar = spooled(i);
            unpack::apply_layer(&root, &mut changes, || {
                let f = File::open(&tar)?;
                Ok(Box::new(BufReader::with_capacity(1 << 20, f)) as Box<dyn Read>)
            })
            .map_err(|e| bad(format!("layer {digest}: {e}")))?;
            let tar_bytes = std::fs::metadata(&tar).map_or(u64::MAX, |m| m.len());
            let _ = std::fs::remove_file(&tar);
            if a.fs == FsKind::Erofs && i + 1 < layers.len() {
                continue; // flattened: one filesystem of the final tree
            }
            let key = chain_key(&diff_ids[..=i], size, &opts, &dict_digests, a.fs);
            if let Some(known) = db.as_ref().and_then(|d| d.lookup(&key)) {
                let (ours, src_blob) = known;
                let final_path = blob_path(&dst, ours["digest"].as_str().unwrap_or_default())?;
                link_or_copy(&src_blob, &final_path)?;
                say(format!(
                    "layer {}/{}: {digest} → {} (reused)",
                    i + 1,
                    layers.len(),
                    ours["digest"]
                ));
                stats.reused += 1;
                hashes = None;
                let mut desc = ours;
                desc["annotations"]["io.lsm.source-layer"] = digest.as_str().into();
                out.push(desc);
                continue;
            }
            // The layers converted so far: the new one stores only what differs from them.
            let below = out
                .iter()
                .map(|v| {
                    let bp = blob_path(&dst, v["digest"].as_str().unwrap_or_default())?;
                    let f = File::open(&bp).map_err(|e| bad(format!("{}: {e}", bp.display())))?;
                    let mut l = Layer::open(bp.display().to_string(), Arc::new(f), None)?;
                    dict::attach_borrowed(&mut l, |d| path_of(&dst, &out, &dict_blobs, d))?;
                    Ok(l)
                })
                .collect::<CliResult<Vec<Layer>>>()?;
            let base = (!below.is_empty())
                .then(|| LayerStack::new(below, size, 64 << 20).and_then(|s| Image::new(s, None)))
                .transpose()?;
            let mut h = match (hashes.take(), &base) {
                (Some(h), _) => h,
                (None, None) => rawimport::BlockHashes::zeros(size),
                (None, Some(b)) => {
                    // Layers below were reused: their filesystem, back as a raw file.
                    let _step = workdir::step()?;
                    let _ = std::fs::remove_file(&raw);
                    let f = File::create(&raw)?;
                    f.set_len(size)?;
                    rawimport::export(b, &f, size)?
                }
            };
            let scan = layer_filesystem(&LayerFs {
                fs: a.fs,
                root: &root,
                raw: &raw,
                size,
                uuid: &uuid,
                digest,
                index: i,
                changes: &changes,
                tar_bytes,
                say: &say,
            })?;
            if i + 1 == layers.len() {
                tree_removal = Some(workdir::Removal::start(&root));
            }
            let tmp = dst.join("blobs/sha256/.layer.partial");
            let rawf = File::open(&raw)?;
            let mut prog = crate::progress::Progress::new(
                format!("convert: layer {}/{} import", i + 1, layers.len()),
                size,
                a.quiet,
            );
            // The layers below join the dictionary (each once, and only when a layer is
            // actually converted: reused ones need none).
            for l in &out[in_dict..] {
                let d = l["digest"].as_str().unwrap_or_default();
                // (Written by this conversion, its digest computed while writing.)
                let (layer, id) = dict::open_trusted(&dict::DictBlob {
                    digest: d.to_string(),
                    size: l["size"].as_u64().unwrap_or_default(),
                    meta_digest: None,
                    path: blob_path(&dst, d)?,
                    from: None,
                })?;
                let entry = hashindex::of_layer(&layer, id)?;
                running.add_hashed(id, &layer.metadata().chunks, &entry.chunks)?;
                hash_lists.insert(d.to_string(), entry);
            }
            in_dict = out.len();
            let shared = Arc::new(std::mem::take(&mut running));
            let w = write_blob_atomically(&tmp, |o| {
                rawimport::import_changed(
                    &rawf,
                    size,
                    &mut h,
                    base.is_none(),
                    Some(shared.clone()),
                    o,
                    opts,
                    &scan,
                    |d| prog.update(d),
                )
            })?;
            hashes = Some(h);
            running = Arc::try_unwrap(shared)
                .map_err(|_| bad("internal error: the dictionary is still in use"))?;
            let ours = format!("sha256:{}", hex::encode(w.digest));
            let final_path = blob_path(&dst, &ours)?;
            std::fs::rename(&tmp, &final_path)?;
            say(format!(
                "layer {}/{}: {digest} → {ours} ({} bytes{})",
                i + 1,
                layers.len(),
                w.size,
                if w.borrowed_bytes > 0 {
                    format!(
                        "; {} of {} data bytes borrowed from the dictionary",
                        w.borrowed_bytes, w.data_bytes
                    )
                } else {
                    String::new()
                }
            ));
            stats.converted += 1;
            stats.bytes_out += w.size;
            let desc = json!({
                "mediaType": blockfmt::LAYER_MEDIA_TYPE,
                "digest": ours,
                "size": w.size,
                "annotations": {
                    blockfmt::META_DIGEST_ANNOTATION: format!("sha256:{}", hex::encode(w.meta_digest)),
                    blockfmt::META_LEN_ANNOTATION: w.meta_len.to_string(),
                    "io.lsm.source-layer": digest,
                    "io.lsm.format-version": "1",
                },
            });
            if let Some(d) = &db {
                d.record(&key, &desc, &final_path);
            }
            out.push(desc);
        }
        // The dictionary blobs the new layers borrow from, in first-use order: copied into the
        // layout and listed in the manifest, so registries keep them and clients find them.
        // (Blobs of this image's own layers are listed as layers already.)
        let mut borrowed: Vec<dict::DictBlob> = Vec::new();
        for l in &out {
            let p = blob_path(&dst, l["digest"].as_str().unwrap_or_default())?;
            let f = File::open(&p).map_err(|e| bad(format!("{}: {e}", p.display())))?;
            let layer = Layer::open(p.display().to_string(), Arc::new(f), None)?;
            for b in &layer.metadata().blobs {
                let dg = blockfmt::format::oci_digest(&b.sha256);
                if borrowed.iter().any(|x| x.digest == dg)
                    || out
                        .iter()
                        .any(|o| o["digest"].as_str() == Some(dg.as_str()))
                {
                    continue;
                }
                let from = dict_blobs.iter().find(|x| x.digest == dg).ok_or_else(|| {
                    bad(format!(
                        "layer {} borrows from blob {dg}, which no --dict image holds",
                        l["digest"]
                    ))
                })?;
                if from.path.exists() {
                    link_or_copy(&from.path, &blob_path(&dst, &dg)?)?;
                }
                borrowed.push(from.clone());
            }
        }
        Ok((out, borrowed))
    })();
    if let Some(r) = tree_removal.take() {
        r.wait();
    }
    drop(work_tree);
    drop(dict_tree);
    drop(spool_tree);
    let (out_layers, borrowed) = match result {
        Ok(l) => l,
        Err(e) => {
            // No partial image: drop the blobs written (and the directory, if we made it).
            let _ = std::fs::remove_dir_all(if created {
                dst.clone()
            } else {
                dst.join("blobs")
            });
            return Err(e);
        }
    };

    // Config (the source's, with the converted blobs as its diff IDs), manifest, index,
    // layout marker, lsm image config.
    let repository = match &a.push {
        Some(p) => {
            let t = push::Target::parse(p)?;
            Some(format!("{}/{}", t.host(), t.repository))
        }
        None => None,
    };
    let mut published = manifest::ImageManifest::new(size, repository);
    for l in &out_layers {
        published.push_layer(manifest::Blob {
            role: manifest::Role::Layer,
            digest: l["digest"].as_str().unwrap_or_default().to_string(),
            size: l["size"].as_u64().unwrap_or_default(),
            meta_digest: l["annotations"][blockfmt::META_DIGEST_ANNOTATION]
                .as_str()
                .map(str::to_string),
            meta_len: meta_len_of(l),
            source_layer: l["annotations"]["io.lsm.source-layer"]
                .as_str()
                .map(str::to_string),
        });
    }
    for b in &borrowed {
        published.append_extra(manifest::Blob {
            role: manifest::Role::Dictionary,
            digest: b.digest.clone(),
            size: b.size,
            meta_digest: b.meta_digest.clone(),
            meta_len: None,
            source_layer: None,
        });
    }
    let index = hashindex::for_image(&dst, &out_layers, &borrowed, &mut hash_lists)?;
    let (index_digest, index_size) = put_blob(&dst, &index)?;
    published.append_extra(manifest::Blob {
        role: manifest::Role::HashIndex,
        digest: index_digest.clone(),
        size: index_size,
        meta_digest: None,
        meta_len: None,
        source_layer: None,
    });
    let source_config = std::fs::read(blob_path(&src, &config_digest)?)
        .map_err(|e| bad(format!("config {config_digest}: {e}")))?;
    let (cfg_digest, cfg_size) = put_blob(&dst, &published.config(&source_config)?)?;
    let mut manifest = published.manifest(
        json!({
            "mediaType": manifest["config"]["mediaType"],
            "digest": cfg_digest,
            "size": cfg_size,
        }),
        &manifest_digest,
        &config_digest,
    );
    if a.fs == FsKind::Erofs {
        manifest["annotations"]["io.lsm.filesystem"] = "erofs".into();
    }
    let mbytes = serde_json::to_vec_pretty(&manifest)?;
    let (m_digest, m_size) = put_blob(&dst, &mbytes)?;
    let mut mdesc = json!({
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "digest": m_digest,
        "size": m_size,
    });
    if let Some(t) = &a.tag {
        mdesc["annotations"] = json!({ "org.opencontainers.image.ref.name": t });
    }
    std::fs::write(dst.join("oci-layout"), "{\"imageLayoutVersion\":\"1.0.0\"}")?;
    let local =
        |digest: &str| json!({ "local": blob_path(Path::new(""), digest).unwrap_or_default() });
    let mut image = json!({
        "size": size,
        "layers": out_layers.iter().map(|l| json!({
            "source": local(l["digest"].as_str().unwrap_or_default()),
            "digest": l["digest"],
            "meta_digest": l["annotations"][blockfmt::META_DIGEST_ANNOTATION],
            "meta_len": meta_len_of(l),
        })).collect::<Vec<_>>(),
    });
    if !borrowed.is_empty() {
        image["dictionary"] = borrowed
            .iter()
            .map(|b| json!({ "source": remotedict::source_of(b, a.insecure).unwrap_or_else(|| local(&b.digest)), "digest": b.digest, "meta_digest": b.meta_digest }))
            .collect();
    }
    std::fs::write(
        dst.join("lsm-image.json"),
        serde_json::to_vec_pretty(&image)?,
    )?;
    std::fs::write(
        dst.join("index.json"),
        serde_json::to_vec_pretty(&json!({ "schemaVersion": 2, "manifests": [mdesc] }))?,
    )?;
    if let Some(p) = &a.push {
        let target = push::Target::parse(p)?;
        if target.base.starts_with("http://") && !a.insecure {
            return Err(bad(format!("--push {p}: plain HTTP needs --insecure")));
        }
        let ca_file = a
            .registry_ca
            .as_deref()
            .map(std::fs::canonicalize)
            .transpose()
            .map_err(|e| bad(format!("--registry-ca: {e}")))?;
        let registry_source = |size: Option<&serde_json::Value>| {
            let mut r = json!({
                "url": target.base, "repository": target.repository, "insecure": a.insecure,
            });
            if let Some(s) = size {
                r["size"] = s.clone();
            }
            if let Some(ca) = &ca_file {
                r["ca_file"] = ca.display().to_string().into();
            }
            if !a.token_hosts.is_empty() {
                r["token_hosts"] = a.token_hosts.clone().into();
            }
            json!({ "registry": r })
        };
        let mut remote = json!({
            "size": size,
            "layers": out_layers.iter().map(|l| json!({
                "source": registry_source(Some(&l["size"])),
                "digest": l["digest"],
                "meta_digest": l["annotations"][blockfmt::META_DIGEST_ANNOTATION],
                "meta_len": meta_len_of(l),
            })).collect::<Vec<_>>(),
        });
        if !borrowed.is_empty() {
            // No size: opening the image asks the registry for each (HEAD), so a dictionary
            // blob missing from the repository fails at attach, naming it, not at some read.
            remote["dictionary"] = borrowed
                .iter()
                .map(|b| {
                    json!({
                        "source": registry_source(None),
                        "digest": b.digest,
                        "meta_digest": b.meta_digest,
                    })
                })
                .collect();
        }
        let session = push::Session::new(target, creds.clone(), &a.client())?;
        let (mut sent, mut had) = (0, 0);
        let blobs = std::iter::once(cfg_digest.clone())
            .chain(
                out_layers
                    .iter()
                    .map(|l| l["digest"].as_str().unwrap_or_default().to_string()),
            )
            .chain(std::iter::once(index_digest.clone()));
        let mut mounted = 0;
        for d in blobs {
            if session.put_blob(&d, &blob_path(&dst, &d)?)? {
                sent += 1;
            } else {
                had += 1;
            }
        }
        for b in &borrowed {
            // Another repository of the same registry has it: mount instead of uploading.
            let from = b
                .from
                .as_ref()
                .filter(|(base, _)| *base == session.base())
                .map(|(_, repo)| repo.as_str());
            if from.is_none() {
                // Read through a hash index and not downloaded, from another registry: the
                // push needs its bytes after all.
                remotedict::download(b, &dst, creds.as_ref(), &a.client(), a.insecure, &say)?;
            }
            match session.put_blob_from(&b.digest, &blob_path(&dst, &b.digest)?, from)? {
                push::Put::Uploaded => sent += 1,
                push::Put::Mounted => mounted += 1,
                push::Put::Present => had += 1,
            }
        }
        session.put_manifest(&mbytes, "application/vnd.oci.image.manifest.v1+json")?;
        std::fs::write(
            dst.join("lsm-remote.json"),
            serde_json::to_vec_pretty(&remote)?,
        )?;
        say(format!(
            "pushed to {p}: {sent} blobs uploaded, {had} already there{}",
            if mounted > 0 {
                format!(", {mounted} mounted from another repository")
            } else {
                String::new()
            }
        ));
    }
    say(format!(
        "{} layers converted, {} reused; {} bytes in, {} bytes out",
        stats.converted, stats.reused, stats.bytes_in, stats.bytes_out
    ));
    if a.print_digest {
        println!("{m_digest}");
    }
    Ok(stats)
}
