//! `lsmctl pull REF`: containerd's "pull with unpack", done by a client through containerd's
//! gRPC API — what overlaybd's `ctr rpull` and stargz's `ctr-remote image rpull` do. `ctr image
//! pull` (containerd 1.6) downloads every layer before unpacking; this pull asks the snapshotter
//! first, so layers an lsm-aware snapshotter serves lazily are never downloaded.
//!
//! Steps, under a containerd lease (nothing is collected half-way; a crash leaves only what the
//! lease's one-hour expiry then frees):
//! 1. resolve REF in the registry: index → this platform's manifest → config (digests checked);
//! 2. for each layer, bottom first, its chainID (from the config's `rootfs.diff_ids`):
//!    `Snapshots.Prepare("extract-… <chainID>", parent chainID, labels)` with the labels
//!    containerd's unpacker and CRI send (`containerd.io/snapshot.ref`, `…/cri.image-ref`,
//!    `…/cri.layer-digest`, `…/cri.manifest-digest`, and every layer annotation with the
//!    `containerd.io/snapshot/` prefix). ALREADY_EXISTS means the snapshotter made the layer
//!    itself (an lsm layer): nothing is downloaded. Otherwise (a plain OCI layer) the blob goes
//!    into the content store, `Diff.Apply` unpacks it onto the mounts (its diff_id is checked)
//!    and the snapshot is committed as the chainID;
//! 3. config, manifest (and index) go into the content store with the garbage-collection labels
//!    containerd's own pull sets — including `containerd.io/gc.ref.snapshot.<snapshotter>` on
//!    the config, which is how containerd sees the image unpacked — and the image record is
//!    created or updated.

mod containerd;
mod registry;

use std::collections::HashMap;
use std::io::Read;

use containerd_client::types::Descriptor;
use sha2::{Digest, Sha256};

use crate::cli::{CliError, CliResult};
use crate::oci::{self, Platform};
use containerd::Containerd;
use registry::{is_sha256, ImageRef, Registry};

/// Arguments of `lsmctl pull`.
#[derive(clap::Args, Debug)]
pub struct PullArgs {
    /// Image reference: host[:port]/repository[:tag][@sha256:…] (no host: Docker Hub).
    reference: String,
    /// containerd's gRPC socket.
    #[arg(long, default_value = "/run/containerd/containerd.sock")]
    address: String,
    /// containerd namespace the image goes into.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Snapshotter to unpack into (the name of lsm-snapshotter's proxy plugin in containerd's
    /// config).
    #[arg(long, default_value = "lsm")]
    snapshotter: String,
    /// Talk to the registry over plain HTTP instead of HTTPS.
    #[arg(long)]
    plain_http: bool,
    /// PEM CA certificates trusted for the registry's HTTPS instead of the system's (give
    /// lsm-snapshotter the same with its own `--registry-ca`: it reads the lsm layers).
    #[arg(long, value_name = "PEM")]
    registry_ca: Option<std::path::PathBuf>,
    /// Image of an index to pull: `os/arch[/variant]` (default: linux and this machine's
    /// architecture, any variant).
    #[arg(long, value_name = "OS/ARCH[/VARIANT]")]
    platform: Option<String>,
}

/// What one layer is, as the pull needs it.
struct Layer {
    descriptor: Descriptor,
    diff_id: String,
    chain_id: String,
    /// Marked by `lsmctl convert` (`io.lsm.layer.role`) or of the old lsm media type.
    is_lsm: bool,
}

/// The resolved image: the record's target, the manifest, the config and the layers.
struct Resolved {
    target: Descriptor,
    index: Option<registry::Fetched>,
    manifest: registry::Fetched,
    config_digest: String,
    config: Vec<u8>,
    layers: Vec<Layer>,
}

/// chainIDs of `diff_ids` (OCI image spec: chain(n) = sha256(chain(n-1) + " " + diff_id(n))).
pub fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::with_capacity(diff_ids.len());
    for d in diff_ids {
        let next = match out.last() {
            None => d.clone(),
            Some(prev) => format!(
                "sha256:{}",
                hex::encode(Sha256::digest(format!("{prev} {d}").as_bytes()))
            ),
        };
        out.push(next);
    }
    out
}

/// containerd's descriptor of OCI descriptor `d`, its digest checked to be sha256.
fn descriptor(d: &oci::Descriptor, what: &str) -> CliResult<Descriptor> {
    if !is_sha256(&d.digest) {
        return Err(CliError(format!("{what}: no sha256 digest")));
    }
    Ok(Descriptor {
        media_type: d.media_type.clone(),
        digest: d.digest.clone(),
        size: i64::try_from(d.size)
            .map_err(|_| CliError(format!("{what}: size {} too big", d.size)))?,
        annotations: d.annotations.clone().into_iter().collect(),
    })
}

/// Step 1: manifest (through an index), config, layers with their chainIDs.
fn resolve(reg: &Registry, image: &ImageRef, platform: &Platform) -> CliResult<Resolved> {
    let top = reg.manifest(&image.reference)?;
    let target = Descriptor {
        media_type: top.media_type.clone(),
        digest: top.digest.clone(),
        size: top.bytes.len() as i64,
        annotations: HashMap::new(),
    };
    let (index, manifest) = if oci::is_index(&top.bytes) {
        let idx = oci::parse_index(&top.bytes, &image.name)?;
        let pick = idx.for_platform(platform, &image.name)?.digest.clone();
        let manifest = reg.manifest(&pick)?;
        (Some(top), manifest)
    } else {
        (None, top)
    };
    let m = oci::parse_manifest(&manifest.bytes, &image.name)?;
    let config_digest = descriptor(&m.config, "manifest config")?.digest;
    let config = reg.small_blob(&config_digest)?;
    /// What the pull reads of an image config.
    #[derive(serde::Deserialize, Default)]
    struct Rootfs {
        #[serde(default)]
        diff_ids: Vec<String>,
    }
    #[derive(serde::Deserialize)]
    struct ImageConfig {
        #[serde(default)]
        rootfs: Rootfs,
    }
    let c: ImageConfig = serde_json::from_slice(&config)
        .map_err(|e| CliError(format!("{}: image config {config_digest}: {e}", image.name)))?;
    let diff_ids = c.rootfs.diff_ids;
    let descs = m.layers;
    if descs.len() != diff_ids.len() {
        return Err(CliError(format!(
            "{}: mismatched image rootfs and manifest layers ({} diff_ids, {} layers)",
            image.name,
            diff_ids.len(),
            descs.len()
        )));
    }
    let chains = chain_ids(&diff_ids);
    let mut layers = Vec::new();
    for (i, d) in descs.iter().enumerate() {
        let descriptor = descriptor(d, &format!("layer {i}"))?;
        let is_lsm = descriptor.annotations.contains_key("io.lsm.layer.role")
            || descriptor.media_type == "application/vnd.lsm.layer.v1";
        layers.push(Layer {
            descriptor,
            diff_id: diff_ids[i].clone(),
            chain_id: chains[i].clone(),
            is_lsm,
        });
    }
    Ok(Resolved {
        target,
        index,
        manifest,
        config_digest,
        config,
        layers,
    })
}

/// `containerd.io/distribution.source.<host>` = repository, as containerd labels pulled blobs.
fn source_label(image: &ImageRef) -> (String, String) {
    (
        format!("containerd.io/distribution.source.{}", image.host),
        image.repository.clone(),
    )
}

/// How a layer got into the snapshotter.
enum Unpacked {
    /// Its chainID was there already.
    Present,
    /// The snapshotter made it on Prepare (lazy: nothing downloaded).
    Lazy,
    /// Downloaded (this many bytes, 0 if the content store had it) and applied.
    Applied(u64),
}

/// Downloads a layer blob into the content store (unless there), checking its digest.
async fn fetch_layer(
    ctr: &Containerd,
    reg: &Registry,
    image: &ImageRef,
    l: &Layer,
) -> CliResult<u64> {
    let digest = l.descriptor.digest.clone();
    let labels = HashMap::from([
        ("containerd.io/uncompressed".to_string(), l.diff_id.clone()),
        source_label(image),
    ]);
    if ctr.have_content(&digest, labels.clone()).await? {
        return Ok(0);
    }
    let mut reader = tokio::task::block_in_place(|| reg.blob(&digest))?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let want = digest.clone();
    let reading = tokio::task::spawn_blocking(move || {
        let mut h = Sha256::new();
        let mut n = 0u64;
        loop {
            let mut buf = vec![0u8; 1 << 20];
            let got = match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(k) => k,
                Err(e) => {
                    let _ = tx.blocking_send(Err(format!("blob {want}: {e}")));
                    return n;
                }
            };
            buf.truncate(got);
            h.update(&buf);
            n += got as u64;
            if tx.blocking_send(Ok(buf)).is_err() {
                return n;
            }
        }
        let got = format!("sha256:{}", hex::encode(h.finalize()));
        if got != want {
            let _ = tx.blocking_send(Err(format!(
                "blob {want}: the registry sent content with digest {got}"
            )));
        }
        n
    });
    ctr.write_content(&digest, l.descriptor.size, labels, rx)
        .await?;
    reading
        .await
        .map_err(|e| CliError(format!("blob {digest}: {e}")))
}

/// Step 2 for one layer over `parent` (a chainID, "" for the bottom one).
async fn unpack_layer(
    ctr: &Containerd,
    reg: &Registry,
    image: &ImageRef,
    manifest_digest: &str,
    l: &Layer,
    parent: &str,
) -> CliResult<Unpacked> {
    if ctr.snapshot_exists(&l.chain_id).await? {
        return Ok(Unpacked::Present);
    }
    let mut labels: HashMap<String, String> = l
        .descriptor
        .annotations
        .iter()
        .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in [
        ("containerd.io/snapshot.ref", l.chain_id.as_str()),
        ("containerd.io/snapshot/cri.image-ref", image.name.as_str()),
        (
            "containerd.io/snapshot/cri.manifest-digest",
            manifest_digest,
        ),
        (
            "containerd.io/snapshot/cri.layer-digest",
            l.descriptor.digest.as_str(),
        ),
    ] {
        labels.insert(k.to_string(), v.to_string());
    }
    let key = format!("extract-{} {}", containerd::now_nanos(), l.chain_id);
    let Some(mounts) = ctr.prepare(&key, parent, labels).await? else {
        if !ctr.snapshot_exists(&l.chain_id).await? {
            return Err(CliError(format!(
                "snapshotter {:?} answered ALREADY_EXISTS for layer {} but has no snapshot {}",
                ctr.snapshotter, l.descriptor.digest, l.chain_id
            )));
        }
        return Ok(Unpacked::Lazy);
    };
    let applied = async {
        if l.is_lsm {
            return Err(CliError(format!(
                "layer {} is an lsm layer, but snapshotter {:?} prepared an empty snapshot for it \
                 instead of serving it lazily: point --snapshotter at lsm-snapshotter's proxy \
                 plugin (nothing was downloaded)",
                l.descriptor.digest, ctr.snapshotter
            )));
        }
        let fetched = fetch_layer(ctr, reg, image, l).await?;
        let diff_id = ctr.apply(l.descriptor.clone(), mounts).await?;
        if diff_id != l.diff_id {
            return Err(CliError(format!(
                "layer {}: unpacked to {diff_id}, the config says {}",
                l.descriptor.digest, l.diff_id
            )));
        }
        let labels =
            HashMap::from([("containerd.io/snapshot.ref".to_string(), l.chain_id.clone())]);
        ctr.commit(&l.chain_id, &key, labels).await?;
        Ok(fetched)
    }
    .await;
    match applied {
        Ok(n) => Ok(Unpacked::Applied(n)),
        Err(e) => {
            // Leave no active extract snapshot behind; the first error is the one to report.
            let _ = ctr.remove(&key).await;
            Err(e)
        }
    }
}

/// Step 3: content with its gc labels, then the image record.
async fn record(ctr: &Containerd, image: &ImageRef, r: &Resolved) -> CliResult {
    let source = source_label(image);
    let top_chain = r
        .layers
        .last()
        .map(|l| l.chain_id.clone())
        .unwrap_or_default();
    let mut labels = HashMap::from([source.clone()]);
    if !top_chain.is_empty() {
        labels.insert(
            format!("containerd.io/gc.ref.snapshot.{}", ctr.snapshotter),
            top_chain,
        );
    }
    ctr.put_content(&r.config_digest, r.config.clone(), labels)
        .await?;
    let mut labels = HashMap::from([
        source.clone(),
        (
            "containerd.io/gc.ref.content.config".to_string(),
            r.config_digest.clone(),
        ),
    ]);
    for (i, l) in r.layers.iter().enumerate() {
        labels.insert(
            format!("containerd.io/gc.ref.content.l.{i}"),
            l.descriptor.digest.clone(),
        );
    }
    ctr.put_content(&r.manifest.digest, r.manifest.bytes.clone(), labels)
        .await?;
    if let Some(index) = &r.index {
        let labels = HashMap::from([
            source,
            (
                "containerd.io/gc.ref.content.m.0".to_string(),
                r.manifest.digest.clone(),
            ),
        ]);
        ctr.put_content(&index.digest, index.bytes.clone(), labels)
            .await?;
    }
    ctr.set_image(&image.name, r.target.clone()).await
}

async fn pull_under_lease(
    ctr: &Containerd,
    reg: &Registry,
    image: &ImageRef,
    r: &Resolved,
) -> CliResult {
    let (mut lazy, mut applied, mut present, mut bytes) = (0, 0, 0, 0u64);
    let mut parent = String::new();
    let n = r.layers.len();
    for (i, l) in r.layers.iter().enumerate() {
        let how = unpack_layer(ctr, reg, image, &r.manifest.digest, l, &parent).await?;
        let what = match how {
            Unpacked::Present => {
                present += 1;
                "already unpacked".to_string()
            }
            Unpacked::Lazy => {
                lazy += 1;
                format!("served lazily by {} (not downloaded)", ctr.snapshotter)
            }
            Unpacked::Applied(b) => {
                applied += 1;
                bytes += b;
                format!("downloaded {b} bytes, unpacked")
            }
        };
        eprintln!(
            "lsmctl pull: layer {}/{n} {} ({} bytes): {what}",
            i + 1,
            l.descriptor.digest,
            l.descriptor.size
        );
        parent = l.chain_id.clone();
    }
    record(ctr, image, r).await?;
    let total: i64 = r.layers.iter().map(|l| l.descriptor.size).sum();
    eprintln!(
        "lsmctl pull: {}: {n} layers ({total} bytes): {lazy} lazy, {applied} unpacked \
         ({bytes} bytes downloaded), {present} already there",
        image.name
    );
    Ok(())
}

async fn pull_async(a: PullArgs) -> CliResult {
    let image = ImageRef::parse(&a.reference)?;
    let platform = match &a.platform {
        Some(p) => Platform::parse(p)?,
        None => Platform::host(),
    };
    let reg = Registry::new(&image, a.plain_http, a.registry_ca.as_deref())?;
    let r = tokio::task::block_in_place(|| resolve(&reg, &image, &platform))?;
    let via = match &r.index {
        Some(_) => format!("index {}, manifest {}", r.target.digest, r.manifest.digest),
        None => format!("manifest {}", r.manifest.digest),
    };
    eprintln!(
        "lsmctl pull: {} resolved to {via}, {} layers",
        image.name,
        r.layers.len()
    );
    let mut ctr = Containerd::connect(&a.address, &a.namespace, &a.snapshotter).await?;
    ctr.take_lease().await?;
    let result = pull_under_lease(&ctr, &reg, &image, &r).await;
    // Releasing the lease lets containerd collect what a failed pull left.
    let released = ctr.release_lease().await;
    result?;
    released?;
    println!("{}", image.name);
    Ok(())
}

/// `lsmctl pull`.
pub fn pull(a: PullArgs) -> CliResult {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CliError(format!("tokio runtime: {e}")))?;
    rt.block_on(pull_async(a))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_ids_follow_the_image_spec() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = chain_ids(&[a.clone(), b.clone()]);
        assert_eq!(c[0], a);
        assert_eq!(c[1], registry::sha256(format!("{a} {b}").as_bytes()));
        assert!(chain_ids(&[]).is_empty());
    }

    #[test]
    fn platforms_parse_and_match_index_entries() {
        let p = Platform::parse("linux/arm64/v8").expect("ok");
        assert_eq!(p.to_string(), "linux/arm64/v8");
        let entry = |arch: &str, variant: Option<&str>| Platform {
            os: "linux".into(),
            architecture: arch.into(),
            variant: variant.map(str::to_string),
        };
        assert!(p.matches(&entry("arm64", Some("v8"))));
        assert!(!p.matches(&entry("arm64", Some("v7"))));
        let any = Platform::parse("linux/arm64").expect("ok");
        assert!(any.matches(&entry("arm64", Some("v8"))));
        assert!(!any.matches(&entry("amd64", None)));
        for bad in ["linux", "linux/", "/amd64", "a/b/c/d", "linux//v8", ""] {
            assert!(Platform::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(Platform::host().os, "linux");
    }
}
