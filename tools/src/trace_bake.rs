//! `lsmctl trace bake`: ship a startup trace inside the image, so the first start on any node
//! is already prefetched. The image is served by a private lsmd (FUSE file, empty cache, no
//! prefetch), attached read-only to a loop device with the nodes' readahead (128 KiB, not the
//! loop's 2560 KiB: readahead is part of the trace) and mounted; the command runs once in a sandbox
//! over it (`unshare` of mount, network, PID, IPC and UTS namespaces, the host's /dev and a
//! fresh /proc, `chroot`); the chunks it needed,
//! in first-need order, are the trace (FORMAT.md §6). The trace becomes a blob beside the
//! layers — pushed to the registry and repository of the image's first layer when that is a
//! registry, else a file next to the config — and the config's `trace` names it with its
//! digest, which lsmd checks before using it. With `--image-ref` the pushed image's manifest
//! lists the blob too (CONTRACT.md: an OCI layer media type, role `trace`, the config's
//! diff_ids and history kept one per layer).
//!
//! Everything set up (lsmd, loop device, mounts, the command) is torn down on every path out:
//! error, panic or signal (`sandbox`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blockfmt::format::{oci_digest, sha256};
use blockfmt::stack::TRACE_BLOCK;
use lsmd::config::{LayerConfig, SourceConfig};
use lsmd::frontend::loop_device;
use lsmd::source::auth::Credentials;
use lsmd::ImageConfig;

use crate::cli::{CliError, CliResult};
use crate::convert::manifest::{lsm_role, Blob, ImageManifest, Role};
use crate::convert::push::{Client, Session, Target};
use crate::oci;

mod sandbox;
use sandbox::Sandbox;

/// Arguments of `lsmctl trace bake`.
#[derive(clap::Args)]
pub struct BakeArgs {
    /// The image config (as `lsmctl convert` writes it: `lsm-remote.json` for a pushed image).
    /// Its `trace` is set to the baked trace.
    pub image: PathBuf,
    /// The startup command, run by `/bin/sh -c` inside the image (after `--`).
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
    /// The lsmd binary (default: the one beside lsmctl, else `lsmd` on PATH).
    #[arg(long)]
    pub lsmd: Option<PathBuf>,
    /// Give up on the command after this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// The pushed lsm image (`http(s)://host[:port]/repository:tag`, as given to `convert
    /// --push`): the trace blob is added to its manifest as a layer with role `trace` (replacing
    /// an earlier one) and to its config's diff_ids and history, and the manifest is put again.
    #[arg(long)]
    pub image_ref: Option<String>,
    /// Readahead (KiB) of the loop device the command runs over. What the kernel reads ahead is
    /// part of the trace and fetched by every node that uses it, so this should be what the
    /// nodes' disks have (lsm-snapshotter's `--read-ahead-kb`, `lsmctl attach
    /// --read-ahead-kb`); 0 keeps the kernel's (2560 KiB for a loop device).
    #[arg(long, value_name = "KIB", default_value_t = loop_device::READ_AHEAD_KB)]
    pub read_ahead_kb: u32,
    /// Bake the trace alone, without a startup layer (FORMAT.md §9: the 4 KiB blocks the
    /// command read, packed in first-read order, which lsmd stacks over the layers and
    /// prefetches first instead of the whole chunks they sit in).
    #[arg(long)]
    pub no_startup_layer: bool,
    /// Decoded bytes per chunk of the startup layer (KiB; a power of two, 4..=4096). lsmd
    /// prefetches the whole layer first, so larger chunks compress better, but a read that
    /// needs a chunk not yet there waits for all of it.
    #[arg(long, value_name = "KIB", default_value_t = STARTUP_CHUNK_KB)]
    pub startup_chunk_kb: u32,
    /// zstd level of the startup layer (1..=22): it is compressed once and fetched by every
    /// node that starts the image.
    #[arg(long, default_value_t = STARTUP_LEVEL)]
    pub startup_level: i32,
}

/// Default chunk of a startup layer (`--startup-chunk-kb`).
pub const STARTUP_CHUNK_KB: u32 = 1024;
/// Default zstd level of a startup layer (`--startup-level`).
pub const STARTUP_LEVEL: i32 = 19;

fn free_port() -> CliResult<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

fn lsmd_binary(given: Option<PathBuf>) -> PathBuf {
    given.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|e| e.parent().map(|d| d.join("lsmd")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("lsmd"))
    })
}

/// Where a baked blob (`kind`: trace, startup) goes: pushed beside the first layer's registry
/// blob (returning that source), or written next to the config.
fn store_blob(
    image: &Path,
    config: &ImageConfig,
    (bytes, digest): (&[u8], &str),
    kind: &str,
) -> CliResult<SourceConfig> {
    match config.layers.first().map(|l| &l.source) {
        Some(SourceConfig::Registry(r)) => {
            let target = Target {
                base: r.url.trim_end_matches('/').to_string(),
                repository: r.repository.clone(),
                tag: String::new(),
            };
            let creds = match (&r.username, &r.password) {
                (Some(u), Some(p)) => Some(Credentials {
                    username: u.clone(),
                    password: p.clone(),
                }),
                _ => None,
            };
            let client = Client {
                ca_file: r.ca_file.clone(),
                token_hosts: r.token_hosts.clone(),
            };
            let session = Session::new(target, creds, &client)?;
            let tmp = image.with_extension(format!("{kind}-blob.tmp"));
            std::fs::write(&tmp, bytes)?;
            let put = session.put_blob(digest, &tmp);
            let _ = std::fs::remove_file(&tmp);
            put?;
            let mut src = r.clone();
            src.size = Some(bytes.len() as u64);
            src.p2p = None;
            Ok(SourceConfig::Registry(src))
        }
        _ => {
            let name = format!("{kind}-{}.blob", &digest[7..19]);
            let dir = image.parent().unwrap_or(Path::new("."));
            std::fs::write(dir.join(&name), bytes)?;
            Ok(SourceConfig::Local(PathBuf::from(name)))
        }
    }
}

const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// A blob `trace bake` made: what it is, its bytes and identity.
struct Baked {
    role: Role,
    bytes: Vec<u8>,
    digest: String,
    meta_digest: Option<String>,
    meta_len: Option<u64>,
}

/// Adds the baked blobs to the pushed image `reference`: each a manifest layer with its role
/// (`trace`, `startup`; an earlier blob of that role is replaced, and an earlier startup layer
/// removed when none was baked), its digest as that layer's diff_id in a new config (with a
/// `lsm: <role>` history entry when added), then the manifest put again under its tag. The
/// config fetched is checked against the manifest's digest first.
fn add_to_manifest(
    reference: &str,
    creds: Option<Credentials>,
    client: &Client,
    dir: &Path,
    baked: &[Baked],
    disk_size: u64,
) -> CliResult {
    let target = Target::parse(reference)?;
    let repository = format!("{}/{}", target.host(), target.repository);
    let tag = target.tag.clone();
    let s = Session::new(target, creds, client)?;
    let (mf, cf, bf) = (dir.join("manifest"), dir.join("config"), dir.join("blob"));
    let kind = s.get(&format!("manifests/{tag}"), MANIFEST_TYPES, &mf)?;
    let mut m = oci::parse_manifest(&std::fs::read(&mf)?, reference)?;
    let cfg_digest = m.config.digest.clone();
    s.get(&format!("blobs/{cfg_digest}"), "*/*", &cf)?;
    let cfg_bytes = std::fs::read(&cf)?;
    if oci_digest(&sha256(&cfg_bytes)) != cfg_digest {
        return Err(CliError(format!(
            "{reference}: the config blob does not match its digest {cfg_digest}"
        )));
    }
    // The image config stays untyped: everything but its diff_ids and history passes through.
    let mut c: serde_json::Value = serde_json::from_slice(&cfg_bytes)?;
    if m.layers.len() != c["rootfs"]["diff_ids"].as_array().map_or(0, Vec::len) {
        return Err(CliError(format!(
            "{reference}: the manifest's layers and the config's diff_ids differ in number"
        )));
    }
    if !baked.iter().any(|b| b.role == Role::Startup) {
        remove_role(&mut m.layers, &mut c, Role::Startup);
    }
    for b in baked {
        std::fs::write(&bf, &b.bytes)?;
        s.put_blob(&b.digest, &bf)?;
        // As a manifest layer (CONTRACT.md: the OCI layer media type, which containerd hands
        // to the snapshotter instead of fetching, and the annotations it forwards).
        let desc = ImageManifest::new(disk_size, Some(repository.clone())).descriptor(&Blob {
            role: b.role,
            digest: b.digest.clone(),
            size: b.bytes.len() as u64,
            meta_digest: b.meta_digest.clone(),
            meta_len: b.meta_len,
            source_layer: None,
        });
        let layers = &mut m.layers;
        let Some(diff_ids) = c["rootfs"]["diff_ids"].as_array_mut() else {
            return Err(CliError(format!(
                "{reference}: the image config has no diff_ids"
            )));
        };
        match layers.iter().position(|l| lsm_role(l) == Some(b.role)) {
            Some(i) => {
                layers[i] = desc;
                diff_ids[i] = b.digest.clone().into();
            }
            None => {
                layers.push(desc);
                diff_ids.push(b.digest.clone().into());
                if let Some(h) = c["history"].as_array_mut() {
                    let created_by = format!("lsm: {}", b.role.as_str());
                    h.push(serde_json::json!({ "created_by": created_by }));
                }
            }
        }
    }
    let new_cfg = serde_json::to_vec(&c)?;
    let new_digest = oci_digest(&sha256(&new_cfg));
    std::fs::write(&cf, &new_cfg)?;
    s.put_blob(&new_digest, &cf)?;
    m.config.digest = new_digest;
    m.config.size = new_cfg.len() as u64;
    let media = m.media_type.clone().unwrap_or_else(|| {
        kind.split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_string()
    });
    s.put_manifest(&serde_json::to_vec(&m)?, &media)
}

/// Removes the manifest layers of `role`, their diff_ids and their `lsm: <role>` history
/// entries.
fn remove_role(layers: &mut Vec<oci::Descriptor>, c: &mut serde_json::Value, role: Role) {
    while let Some(i) = layers.iter().position(|l| lsm_role(l) == Some(role)) {
        layers.remove(i);
        if let Some(d) = c["rootfs"]["diff_ids"].as_array_mut() {
            if i < d.len() {
                d.remove(i);
            }
        }
        let created_by = format!("lsm: {}", role.as_str());
        if let Some(h) = c["history"].as_array_mut() {
            if let Some(k) = h
                .iter()
                .rposition(|e| e["created_by"] == created_by.as_str())
            {
                h.remove(k);
            }
        }
    }
}

/// GETs `path` of the bake's lsmd (its metrics address `metrics`).
fn get_lsmd(metrics: &str, path: &str) -> CliResult<Vec<u8>> {
    let url = format!("http://{metrics}{path}");
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(&url)
            .timeout(Duration::from_secs(30))
            .call()
            .map_err(|e| CliError(format!("{url}: {e}")))?
            .into_reader(),
        &mut bytes,
    )?;
    Ok(bytes)
}

/// The bytes of `blocks` (block numbers of [`TRACE_BLOCK`] bytes, in first-read order) of the
/// image served as `file` (the bake's FUSE file, whose chunks are all in lsmd's cache by now),
/// in that order, as (disk offset, bytes); the last block is cut at the disk's end. Read in
/// disk order, neighbours together.
fn read_blocks(file: &Path, blocks: &[u64], size: u64) -> CliResult<Vec<(u64, Vec<u8>)>> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(file)?;
    let mut sorted: Vec<u64> = blocks.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut bytes = std::collections::HashMap::new();
    let mut i = 0;
    while i < sorted.len() {
        let mut n = 1;
        while i + n < sorted.len() && sorted[i + n] == sorted[i] + n as u64 && n < 256 {
            n += 1;
        }
        let off = sorted[i] * TRACE_BLOCK;
        let len = (n as u64 * TRACE_BLOCK).min(size.saturating_sub(off));
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off)?;
        for (k, piece) in buf.chunks(TRACE_BLOCK as usize).enumerate() {
            bytes.insert(sorted[i] + k as u64, piece.to_vec());
        }
        i += n;
    }
    Ok(blocks
        .iter()
        .filter_map(|b| Some((b * TRACE_BLOCK, bytes.remove(b)?)))
        .collect())
}

/// The startup layer of `blocks` (FORMAT.md §9): a packed layer blob for a disk of `size`
/// bytes, and what it is.
fn startup_layer(
    blocks: Vec<(u64, Vec<u8>)>,
    size: u64,
    chunk_kb: u32,
    level: i32,
) -> CliResult<(Vec<u8>, blockfmt::WrittenLayer)> {
    let opts = blockfmt::WriterOptions {
        chunk_size: chunk_kb.saturating_mul(1024),
        compression: blockfmt::Compression::Zstd(level),
        dedup: false,
        ..Default::default()
    };
    let w = blockfmt::LayerWriter::new(Vec::new(), size, opts)
        .map_err(|e| CliError(format!("startup layer: {e}")))?;
    let (written, bytes) = w
        .write_packed(blocks)
        .map_err(|e| CliError(format!("startup layer: {e}")))?;
    Ok((bytes, written))
}

/// Stored bytes of the chunks `trace` lists, and of all the image's chunks (for the bake's
/// report: what a start with the trace alone fetches).
fn traced_bytes(image: &Path, trace: &lsmd::trace::Trace) -> Option<u64> {
    let spec = lsmd::ImageSpec::load(image).ok()?;
    let layers = spec.open_layers(&lsmd::HostServices::default()).ok()?;
    let by_digest: std::collections::HashMap<[u8; 32], &blockfmt::Layer> = layers
        .iter()
        .map(|l| (l.trailer().meta_sha256, l))
        .collect();
    let mut seen = std::collections::HashSet::new();
    Some(
        trace
            .entries
            .iter()
            .filter(|e| seen.insert(**e))
            .filter_map(|&(l, c)| {
                let layer = by_digest.get(trace.layers.get(l as usize)?)?;
                Some(layer.metadata().chunks.get(c as usize)?.stored_len as u64)
            })
            .sum(),
    )
}

/// `lsmctl trace bake`.
pub fn bake(a: BakeArgs) -> CliResult {
    let mut config = ImageConfig::load(&a.image).map_err(|e| CliError(e.to_string()))?;
    let lsmd = lsmd_binary(a.lsmd);
    let port = free_port()?;
    let metrics = format!("127.0.0.1:{port}");
    let dir = std::env::temp_dir().join(format!("lsmctl-bake-{}", std::process::id()));
    let sb = Sandbox::new(dir)?;
    sandbox::mount_image(&sb, &a.image, &lsmd, &metrics, a.read_ahead_kb)?;
    let t0 = Instant::now();
    sandbox::run_command(&sb, &a.command, Duration::from_secs(a.timeout))?;
    let took = t0.elapsed();
    let bytes = get_lsmd(&metrics, "/trace?export=image")?;
    let mut trace =
        lsmd::trace::Trace::decode(&bytes).map_err(|e| CliError(format!("trace: {e}")))?;
    // The blocks the command read, before anything else reads the file.
    let blocks = lsmd::trace::decode_blocks(&get_lsmd(&metrics, "/trace-blocks?export=image")?)
        .map_err(CliError)?;
    let mut baked = Vec::new();
    if !a.no_startup_layer {
        let data = read_blocks(&sb.dir().join("files/image"), &blocks, config.size)?;
        let (blob, w) = startup_layer(data, config.size, a.startup_chunk_kb, a.startup_level)?;
        // Every chunk in the exact trace had a block read, and the layer holds every block
        // read: the layer covers them all (FORMAT.md §6, version 2).
        trace.covered = vec![true; trace.entries.len()];
        trace.startup = Some(lsmd::trace::StartupBinding {
            blob_sha256: w.digest,
            meta_sha256: w.meta_digest,
        });
        let traced = traced_bytes(&a.image, &trace);
        println!(
            "startup layer: {} blocks read ({} bytes), {} bytes stored in {} chunks; the \
             trace's {} chunks are {} stored bytes",
            blocks.len(),
            w.data_bytes,
            blob.len(),
            w.chunks,
            trace.entries.len(),
            traced.map_or("?".into(), |b| b.to_string()),
        );
        baked.push(Baked {
            role: Role::Startup,
            digest: oci_digest(&w.digest),
            meta_digest: Some(oci_digest(&w.meta_digest)),
            meta_len: Some(w.meta_len),
            bytes: blob,
        });
    }
    drop(sb);
    let bytes = trace.encode();
    baked.insert(
        0,
        Baked {
            role: Role::Trace,
            digest: oci_digest(&sha256(&bytes)),
            bytes,
            meta_digest: None,
            meta_len: None,
        },
    );
    publish(&a.image, &mut config, &baked, a.image_ref.as_deref())?;
    config.save(&a.image).map_err(|e| CliError(e.to_string()))?;
    println!(
        "{}: trace {} ({} chunks of {} layers, {} bytes; the command took {:.2} s cold){}",
        a.image.display(),
        baked[0].digest,
        trace.entries.len(),
        trace.layers.len(),
        baked[0].bytes.len(),
        took.as_secs_f64(),
        baked
            .get(1)
            .map_or(String::new(), |s| format!("; startup layer {}", s.digest))
    );
    Ok(())
}

/// Stores the baked blobs beside the layers, names them in `config` (`trace`, `startup`:
/// removed when not baked) and, with `image_ref`, in the pushed image's manifest.
fn publish(
    image: &Path,
    config: &mut ImageConfig,
    baked: &[Baked],
    image_ref: Option<&str>,
) -> CliResult {
    config.startup = None;
    let mut sources = Vec::new();
    for b in baked {
        sources.push(store_blob(
            image,
            config,
            (&b.bytes, &b.digest),
            b.role.as_str(),
        )?);
    }
    if let Some(reference) = image_ref {
        let (creds, client) = match sources.first() {
            Some(SourceConfig::Registry(r)) => (
                match (&r.username, &r.password) {
                    (Some(u), Some(p)) => Some(Credentials {
                        username: u.clone(),
                        password: p.clone(),
                    }),
                    _ => None,
                },
                Client {
                    ca_file: r.ca_file.clone(),
                    token_hosts: r.token_hosts.clone(),
                },
            ),
            _ => (None, Client::default()),
        };
        let dir = std::env::temp_dir().join(format!("lsmctl-bake-m-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let r = add_to_manifest(reference, creds, &client, &dir, baked, config.size);
        let _ = std::fs::remove_dir_all(&dir);
        r?;
        println!(
            "{reference}: the manifest lists the trace (role `trace`){}",
            match baked.len() {
                1 => "",
                _ => " and the startup layer (role `startup`)",
            }
        );
    }
    for (b, source) in baked.iter().zip(sources) {
        let entry = Some(LayerConfig {
            source,
            digest: Some(b.digest.clone()),
            meta_digest: b.meta_digest.clone(),
            meta_len: b.meta_len,
        });
        match b.role {
            Role::Startup => config.startup = entry,
            _ => config.trace = entry,
        }
    }
    Ok(())
}
