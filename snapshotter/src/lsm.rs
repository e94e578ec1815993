//! lsm layers in containerd snapshots (FORMAT.md §7, README "Using lsm-snapshotter").
//!
//! containerd passes each layer descriptor's `containerd.io/snapshot/*` annotations to
//! `Prepare` as labels. A layer `lsmctl convert` made carries `…/lsm.role`, `…/lsm.digest`,
//! `…/lsm.meta-digest`, `…/lsm.size`, `…/lsm.disk-size` and (when pushed) `…/lsm.repository`:
//! such a Prepare records a committed snapshot named by `containerd.io/snapshot.ref` that
//! remembers where the blob is ([`LsmBlob`]) and fetches nothing.
//!
//! An active snapshot (or view) over such a chain is a disk: an lsmd image config
//! (`ROOT/snapshots/<id>/image.json`: the chain's `layer` blobs bottom first, its `dictionary`
//! blobs, an upper layer `upper/` for Prepare, none for View) served by a detached `lsmd`
//! started through `lsmctl attach` (ublk if the kernel has it, else nbd, else a FUSE file +
//! loop), with its filesystem (ext4, or erofs, told by the superblock magic) mounted at
//! `ROOT/snapshots/<id>/rootfs`; containerd gets a bind mount of that. The lsmd and the mount
//! are the kernel's and lsmd's, not this process's: a killed snapshotter leaves them running,
//! and at start [`Disk::ensure`] adopts what still runs (the attachment record's pid and start
//! time, checked by `lsmctl list`) and re-attaches or re-mounts what is gone.
//!
//! Commit of such an active snapshot unmounts it, stops its lsmd (which flushes) and seals the
//! upper layer into a local blob with `lsmctl commit`; the committed snapshot's blobs are the
//! local ones `image.json` gained, so a child stacks the remote layers and them.
//!
//! An erofs disk is read-only: the snapshot's rootfs is then an overlay whose upper directory is
//! the snapshot's `fs/` and whose lowest layer is the `rootfs/` erofs mount, with the overlay
//! diffs of committed ancestors between them. Commit of such a snapshot keeps its `fs/` as an
//! overlay diff ([`LsmState::overlay`]) instead of sealing a blob: the block disk has nothing
//! of the container's writes.
//!
//! The attach, detach and commit steps run `lsmctl` (found beside this binary, else on PATH)
//! rather than re-implementing them: one implementation of "start a detached lsmd and check it
//! is ours before signalling it".

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

/// File in a snapshot's directory saying its disk holds erofs (written when first mounted).
const EROFS_MARKER: &str = "erofs";

/// Label containerd sets on an unpack's Prepare: the chainID the committed snapshot gets.
pub const TARGET_REF_LABEL: &str = "containerd.io/snapshot.ref";
const LABEL: &str = "containerd.io/snapshot/lsm.";
const CRI_IMAGE_REF: &str = "containerd.io/snapshot/cri.image-ref";

/// How to reach registries and where lsmd caches (command-line flags).
#[derive(Debug, Clone, Default)]
pub struct LsmOptions {
    /// `host[:port]` of registries reached over plain http.
    pub plain_http: Vec<String>,
    /// PEM CA certificates for HTTPS registries.
    pub registry_ca: Option<PathBuf>,
    /// lsmd's host cache, shared by every snapshot.
    pub cache_dir: Option<PathBuf>,
    /// Readahead (KiB) set on a snapshot disk's block device; 0 leaves the kernel's.
    pub read_ahead_kb: u32,
    /// Mirrors: (registry `host[:port]`, mirror base URL), in the order to try them.
    pub mirrors: Vec<(String, String)>,
    /// A P2P agent every registry blob request goes through first.
    pub p2p: Option<P2p>,
}

/// A P2P agent used as an HTTP proxy (lsmd's `p2p` source option).
#[derive(Debug, Clone)]
pub struct P2p {
    /// `http://host:port`.
    pub proxy: String,
    /// Requests are widened to whole pieces of this size.
    pub piece_size: u64,
}

/// Where a blob is read from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobSource {
    /// A registry: base URL (`http(s)://host[:port]`) and repository.
    Registry { url: String, repository: String },
    /// A local file (a committed container layer).
    Local { path: PathBuf },
}

/// One lsm blob a snapshot adds to its chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsmBlob {
    /// `layer`, `dictionary`, `hash-index` or `trace`.
    pub role: String,
    pub digest: String,
    pub meta_digest: Option<String>,
    /// Stored metadata length (label `lsm.meta-len`): lsmd opens the blob in one exact read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub meta_len: Option<u64>,
    pub size: u64,
    pub source: BlobSource,
}

/// What an lsm snapshot is (kept in its record).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LsmState {
    /// Blobs this snapshot adds on top of its parent's chain.
    pub blobs: Vec<LsmBlob>,
    /// Virtual disk size, bytes.
    pub disk_size: u64,
    /// Active or view: served by an lsmd and mounted at `rootfs/`.
    pub disk: bool,
    /// A committed snapshot of a disk whose filesystem is read-only (erofs): what the container
    /// wrote is the overlay diff in its `fs/`, stacked above the chain's disk by its children.
    #[serde(default)]
    pub overlay: bool,
}

/// A remote layer announced by Prepare labels: (target snapshot name, its state).
pub fn remote_layer(
    labels: &HashMap<String, String>,
    opts: &LsmOptions,
) -> Result<Option<(String, LsmState)>, String> {
    let Some(role) = labels.get(&format!("{LABEL}role")) else {
        return Ok(None);
    };
    let get = |k: &str| {
        labels
            .get(&format!("{LABEL}{k}"))
            .ok_or_else(|| format!("lsm layer without the {LABEL}{k} label"))
    };
    let target = labels
        .get(TARGET_REF_LABEL)
        .ok_or_else(|| format!("lsm layer without the {TARGET_REF_LABEL} label"))?
        .clone();
    let num = |k: &str| -> Result<u64, String> {
        get(k)?
            .parse()
            .map_err(|_| format!("{LABEL}{k} is not a number"))
    };
    let repo_ref = match labels.get(&format!("{LABEL}repository")) {
        Some(r) => r.clone(),
        None => labels
            .get(CRI_IMAGE_REF)
            .map(|r| strip_tag(r))
            .ok_or_else(|| {
                format!("lsm layer without {LABEL}repository or {CRI_IMAGE_REF}: cannot tell where it is")
            })?,
    };
    let (host, repository) = repo_ref
        .split_once('/')
        .filter(|(h, r)| !h.is_empty() && !r.is_empty())
        .ok_or_else(|| format!("repository {repo_ref:?} is not host/repository"))?;
    let scheme = if opts.plain_http.iter().any(|h| h == host) {
        "http"
    } else {
        "https"
    };
    let digest = get("digest")?.clone();
    if !digest.starts_with("sha256:") {
        return Err(format!("{LABEL}digest {digest:?} is not a sha256 digest"));
    }
    let blob = LsmBlob {
        role: role.clone(),
        digest,
        meta_digest: labels.get(&format!("{LABEL}meta-digest")).cloned(),
        // A hint only (a wrong one costs lsmd a second read): unparsable means absent.
        meta_len: labels
            .get(&format!("{LABEL}meta-len"))
            .and_then(|v| v.parse().ok()),
        size: num("size")?,
        source: BlobSource::Registry {
            url: format!("{scheme}://{host}"),
            repository: repository.to_string(),
        },
    };
    Ok(Some((
        target,
        LsmState {
            blobs: vec![blob],
            disk_size: num("disk-size")?,
            disk: false,
            overlay: false,
        },
    )))
}

/// `host/repo` of an image reference `host/repo[:tag][@digest]`.
fn strip_tag(r: &str) -> String {
    let r = r.split('@').next().unwrap_or_default();
    match r.rsplit_once(':') {
        Some((head, tag)) if !tag.contains('/') => head.to_string(),
        _ => r.to_string(),
    }
}

/// The lsmd image config over `blobs` (the whole chain, bottom first).
pub fn image_config(blobs: &[LsmBlob], disk_size: u64, upper: bool, opts: &LsmOptions) -> Value {
    let entry = |b: &LsmBlob| {
        let source = match &b.source {
            BlobSource::Local { path } => json!({ "local": path }),
            BlobSource::Registry { url, repository } => {
                let mut r = json!({
                    "url": url, "repository": repository, "size": b.size,
                    "insecure": url.starts_with("http://"),
                });
                if let Some(ca) = &opts.registry_ca {
                    r["ca_file"] = ca.display().to_string().into();
                }
                let host = url.split("://").nth(1).unwrap_or_default();
                let mirrors: Vec<&String> = opts
                    .mirrors
                    .iter()
                    .filter(|(h, _)| h == host)
                    .map(|(_, m)| m)
                    .collect();
                if !mirrors.is_empty() {
                    // Mirrors first: the registry is the fallback.
                    r["url"] = mirrors[0].clone().into();
                    r["mirrors"] = mirrors[1..]
                        .iter()
                        .map(|m| Value::from(m.as_str()))
                        .chain(std::iter::once(Value::from(url.as_str())))
                        .collect::<Vec<_>>()
                        .into();
                    r["insecure"] = (url.starts_with("http://")
                        || mirrors.iter().any(|m| m.starts_with("http://")))
                    .into();
                }
                if let Some(p) = &opts.p2p {
                    r["p2p"] = json!({ "proxy": p.proxy, "piece_size": p.piece_size });
                }
                json!({ "registry": r })
            }
        };
        let mut e = json!({ "source": source, "digest": b.digest, "meta_digest": b.meta_digest });
        if let Some(n) = b.meta_len {
            e["meta_len"] = n.into();
        }
        e
    };
    let mut c = json!({
        "size": disk_size,
        "layers": blobs.iter().filter(|b| b.role == "layer").map(entry).collect::<Vec<_>>(),
    });
    let dict: Vec<Value> = blobs
        .iter()
        .filter(|b| b.role == "dictionary")
        .map(entry)
        .collect();
    if !dict.is_empty() {
        c["dictionary"] = dict.into();
    }
    // A shipped startup trace (`lsmctl trace bake --image-ref`): lsmd fetches it, checks it
    // against this digest (refusing a tampered one, and serving lazily) and prefetches by it.
    // The topmost one wins (a rebaked image's trace is the one of its layers).
    if let Some(t) = blobs.iter().rev().find(|b| b.role == "trace") {
        c["trace"] = entry(t);
    }
    // Its startup layer (FORMAT.md §9), stacked by lsmd only when that trace binds it.
    if let Some(t) = blobs.iter().rev().find(|b| b.role == "startup") {
        c["startup"] = entry(t);
    }
    if upper {
        c["upper"] = "upper".into();
    }
    c
}

/// `lsmctl`: beside this binary, else on PATH.
fn lsmctl() -> Command {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("lsmctl")))
        .filter(|p| p.exists());
    Command::new(beside.unwrap_or_else(|| PathBuf::from("lsmctl")))
}

fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let o = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if !o.status.success() {
        return Err(format!(
            "{what}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// Whether `path` is a mount point (per /proc/self/mountinfo).
pub fn is_mounted(path: &Path) -> bool {
    let want = path.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape(m) == want)
}

fn unescape(m: &str) -> String {
    m.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The disk of an active or view snapshot in directory `dir` (`image.json`, `upper/`,
/// `dev/`, `rootfs/`), attached under `state_dir` as `s<id>`.
pub struct Disk {
    pub dir: PathBuf,
    pub id: u64,
    pub read_only: bool,
    pub state_dir: PathBuf,
    pub opts: std::sync::Arc<LsmOptions>,
}

impl Disk {
    fn name(&self) -> String {
        format!("s{}", self.id)
    }

    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    /// Whether the disk's filesystem is read-only (erofs): then the snapshot's writes go to an
    /// overlay upper directory (`fs/`) above the `rootfs/` mount, not to the disk's upper
    /// layer. Known once the disk was first mounted ([`EROFS_MARKER`]).
    pub fn is_read_only_fs(&self) -> bool {
        self.dir.join(EROFS_MARKER).exists()
    }

    /// The attachment's device if its lsmd runs (checked by `lsmctl list`: pid, start time,
    /// executable and command line).
    fn running_device(&self) -> Result<Option<String>, String> {
        let out = run(
            lsmctl()
                .args(["list", "--json", "--state-dir"])
                .arg(&self.state_dir),
            "lsmctl list",
        )?;
        let v: Value = serde_json::from_str(&out).map_err(|e| format!("lsmctl list: {e}"))?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .find(|a| a["name"] == self.name().as_str() && a["running"] == true)
            .and_then(|a| a["device"].as_str().map(str::to_string)))
    }

    /// Attaches (if its lsmd is not running) and mounts (if not mounted); adopts what runs.
    pub fn ensure(&self) -> Result<(), String> {
        let device = match self.running_device()? {
            Some(d) => d,
            None => {
                if is_mounted(&self.rootfs()) {
                    // Its lsmd is gone: the mount reads nothing any more.
                    tracing::warn!(dir = %self.dir.display(), "lsmd of a mounted snapshot is gone: re-attaching and re-mounting");
                    let _ = run(
                        Command::new("umount").arg("-l").arg(self.rootfs()),
                        "umount",
                    );
                }
                let dev = self.dir.join("dev");
                if is_mounted(&dev) {
                    let _ = run(Command::new("umount").arg("-l").arg(&dev), "umount");
                }
                self.attach()?
            }
        };
        if is_mounted(&self.rootfs()) {
            tracing::info!(dir = %self.dir.display(), device, "adopted a running snapshot disk");
            return Ok(());
        }
        std::fs::create_dir_all(self.rootfs()).map_err(|e| format!("mkdir rootfs: {e}"))?;
        let fstype = fs_type(Path::new(&device))?;
        if fstype == "erofs" {
            let marker = self.dir.join(EROFS_MARKER);
            std::fs::write(&marker, b"").map_err(|e| format!("{}: {e}", marker.display()))?;
        }
        let mut opts = vec![];
        if device.starts_with(&self.dir.display().to_string()) {
            opts.push("loop"); // a FUSE file; autoclear: the loop goes with the mount
        }
        if self.read_only || fstype == "erofs" {
            opts.push("ro");
            if fstype == "ext4" {
                opts.push("noload");
            }
        }
        let mut cmd = Command::new("mount");
        cmd.args(["-t", fstype]);
        if !opts.is_empty() {
            cmd.arg("-o").arg(opts.join(","));
        }
        self.limit_read_ahead(&device);
        run(cmd.arg(&device).arg(self.rootfs()), "mount")?;
        // `mount -o loop` made the loop device only now.
        self.limit_read_ahead(&device);
        tracing::info!(dir = %self.dir.display(), device, fstype, "snapshot disk mounted");
        Ok(())
    }

    /// Sets the readahead of the block device behind `device` (itself, or the loop device over
    /// it when it is a FUSE file) to [`LsmOptions::read_ahead_kb`]: what the kernel reads
    /// ahead is fetched from the registry, chunk by chunk. A device that is not there yet (the
    /// loop before `mount -o loop`) is skipped; failing to set it is logged, not fatal (the
    /// disk works, only fetches more).
    fn limit_read_ahead(&self, device: &str) {
        let kb = self.opts.read_ahead_kb;
        if kb == 0 {
            return;
        }
        let block = if device.starts_with(&self.dir.display().to_string()) {
            match run(Command::new("losetup").arg("-j").arg(device), "losetup -j") {
                // `/dev/loop3: [0041]:2 (/path)`
                Ok(out) => out.split(':').next().unwrap_or_default().trim().to_string(),
                Err(_) => String::new(),
            }
        } else {
            device.to_string()
        };
        let Some(name) = Path::new(&block)
            .canonicalize()
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        else {
            return;
        };
        let knob = format!("/sys/block/{name}/queue/read_ahead_kb");
        match std::fs::write(&knob, kb.to_string()) {
            Ok(()) => tracing::debug!(device = %block, read_ahead_kb = kb, "readahead limited"),
            Err(e) => tracing::warn!(knob, error = %e, "cannot limit the disk's readahead"),
        }
    }

    fn attach(&self) -> Result<String, String> {
        let mut cmd = lsmctl();
        cmd.arg("attach")
            .arg(self.dir.join("image.json"))
            .args(["--name", &self.name(), "--state-dir"])
            .arg(&self.state_dir);
        if Path::new("/dev/ublk-control").exists() {
            cmd.arg("--ublk");
        } else if let Some(nbd) = free_nbd() {
            cmd.arg("--nbd").arg(nbd);
        } else {
            cmd.arg("--fuse").arg(self.dir.join("dev"));
        }
        if self.read_only {
            cmd.arg("--read-only");
        }
        cmd.arg("--");
        if let Some(c) = &self.opts.cache_dir {
            cmd.arg("--cache-dir").arg(c);
        }
        if let Some(ca) = &self.opts.registry_ca {
            cmd.arg("--registry-ca").arg(ca);
        }
        run(&mut cmd, "lsmctl attach")
    }

    /// Unmounts (refusing if busy) and stops the lsmd (which flushes the upper layer).
    pub fn teardown(&self) -> Result<(), String> {
        if is_mounted(&self.rootfs()) {
            // Unmounting our mount while another one (a container's bind) holds the
            // filesystem would stop its lsmd under it: refuse instead.
            let binds = mounts_of_device(&self.rootfs());
            if binds.len() > 1 {
                return Err(format!(
                    "the snapshot's filesystem is still mounted elsewhere ({}): unmount it first",
                    binds.join(", ")
                ));
            }
            run(Command::new("umount").arg(self.rootfs()), "umount")?;
        }
        let file = self.dir.join("dev").join(self.name());
        if file.exists() {
            // A FUSE file: its loop device goes with the last mount (autoclear); one that
            // stays is held by a mount in another namespace (a running container).
            let held = run(Command::new("losetup").arg("-j").arg(&file), "losetup -j")?;
            if !held.is_empty() {
                return Err(format!(
                    "the snapshot's disk is still in use ({held}): stop what mounts it first"
                ));
            }
        }
        if self.running_device()?.is_some() {
            run(
                lsmctl()
                    .args(["detach", &self.name(), "--state-dir"])
                    .arg(&self.state_dir),
                "lsmctl detach",
            )?;
        }
        if is_mounted(&self.dir.join("dev")) {
            run(
                Command::new("umount").arg(self.dir.join("dev")),
                "umount dev",
            )?;
        }
        Ok(())
    }

    /// Seals the upper layer into a local blob beside the image config (the disk torn down
    /// first); returns the blobs the config gained beyond its first `below` layers.
    pub fn commit(&self, below: usize) -> Result<Vec<LsmBlob>, String> {
        self.teardown()?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let config = self.dir.join("image.json");
        run(
            lsmctl()
                .arg("commit")
                .arg(&config)
                .arg("--out")
                .arg(self.dir.join(format!("layer-{stamp}.blob"))),
            "lsmctl commit",
        )?;
        let c: Value = serde_json::from_slice(
            &std::fs::read(&config).map_err(|e| format!("{}: {e}", config.display()))?,
        )
        .map_err(|e| format!("{}: {e}", config.display()))?;
        let mut out = Vec::new();
        for l in c["layers"].as_array().into_iter().flatten().skip(below) {
            let path = l["source"]["local"]
                .as_str()
                .map(|p| self.dir.join(p))
                .ok_or_else(|| "a committed layer is not local".to_string())?;
            let size = std::fs::metadata(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .len();
            out.push(LsmBlob {
                role: "layer".into(),
                digest: l["digest"].as_str().unwrap_or_default().to_string(),
                meta_digest: l["meta_digest"].as_str().map(str::to_string),
                meta_len: l["meta_len"].as_u64(),
                size,
                source: BlobSource::Local { path },
            });
        }
        Ok(out)
    }
}

/// Mount points (in this namespace) of the filesystem mounted at `path`.
fn mounts_of_device(path: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let rows: Vec<(String, String)> = info
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            Some((f.get(2)?.to_string(), unescape(f.get(4)?)))
        })
        .collect();
    let want = path.display().to_string();
    let Some((dev, _)) = rows.iter().find(|(_, m)| *m == want) else {
        return Vec::new();
    };
    rows.iter()
        .filter(|(d, _)| d == dev)
        .map(|(_, m)| m.clone())
        .collect()
}

/// The first nbd device the kernel has with nothing connected.
fn free_nbd() -> Option<String> {
    (0..16).find_map(|i| {
        let size = std::fs::read_to_string(format!("/sys/block/nbd{i}/size")).ok()?;
        let pid = Path::new(&format!("/sys/block/nbd{i}/pid")).exists();
        (size.trim() == "0" && !pid).then(|| format!("/dev/nbd{i}"))
    })
}

/// `ext4` or `erofs`, by the superblock magic at 1024 (ext4: 0xEF53 at 1024+56).
fn fs_type(dev: &Path) -> Result<&'static str, String> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(dev).map_err(|e| format!("{}: {e}", dev.display()))?;
    let mut sb = [0u8; 64];
    f.read_exact_at(&mut sb, 1024)
        .map_err(|e| format!("read superblock of {}: {e}", dev.display()))?;
    if u32::from_le_bytes([sb[0], sb[1], sb[2], sb[3]]) == 0xE0F5_E1E2 {
        Ok("erofs")
    } else if u16::from_le_bytes([sb[56], sb[57]]) == 0xEF53 {
        Ok("ext4")
    } else {
        Err(format!(
            "{}: neither ext4 nor erofs (no superblock magic)",
            dev.display()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(kv: &[(&str, &str)]) -> HashMap<String, String> {
        kv.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn layers_from_labels() {
        let opts = LsmOptions {
            plain_http: vec!["127.0.0.1:5000".into()],
            ..Default::default()
        };
        let base = [
            (TARGET_REF_LABEL, "sha256:chain"),
            ("containerd.io/snapshot/lsm.role", "layer"),
            ("containerd.io/snapshot/lsm.digest", "sha256:ab"),
            ("containerd.io/snapshot/lsm.meta-digest", "sha256:cd"),
            ("containerd.io/snapshot/lsm.size", "10"),
            ("containerd.io/snapshot/lsm.disk-size", "4096"),
        ];
        let mut l = labels(&base);
        l.insert(CRI_IMAGE_REF.into(), "127.0.0.1:5000/a/b:v1".into());
        let (t, s) = remote_layer(&l, &opts).expect("ok").expect("lsm");
        assert_eq!(t, "sha256:chain");
        assert_eq!(
            s.blobs[0].source,
            BlobSource::Registry {
                url: "http://127.0.0.1:5000".into(),
                repository: "a/b".into()
            }
        );
        l.insert(
            "containerd.io/snapshot/lsm.repository".into(),
            "reg.example:443/x".into(),
        );
        l.insert("containerd.io/snapshot/lsm.meta-len".into(), "1234".into());
        let (_, s) = remote_layer(&l, &opts).expect("ok").expect("lsm");
        assert_eq!(s.blobs[0].meta_len, Some(1234));
        let c = image_config(&s.blobs, 4096, false, &opts);
        assert_eq!(c["layers"][0]["meta_len"], 1234);
        assert_eq!(
            s.blobs[0].source,
            BlobSource::Registry {
                url: "https://reg.example:443".into(),
                repository: "x".into()
            }
        );
        assert!(
            remote_layer(&labels(&base), &opts).is_err(),
            "no repository"
        );
        assert!(remote_layer(&labels(&base[..1]), &opts)
            .expect("ok")
            .is_none());
        assert_eq!(strip_tag("h:1/r@sha256:x"), "h:1/r");
        assert_eq!(strip_tag("h:1/r"), "h:1/r");
    }

    /// Mirrors go first (the registry is the fallback), each host's own; the P2P agent fronts
    /// every registry blob; and lsmd accepts the config made.
    #[test]
    fn mirrors_and_p2p_reach_the_lsmd_config() {
        let opts = LsmOptions {
            mirrors: vec![
                ("reg.example".into(), "https://m1.example".into()),
                ("other.example".into(), "https://m9.example".into()),
                ("reg.example".into(), "http://127.0.0.1:5001".into()),
            ],
            p2p: Some(P2p {
                proxy: "http://127.0.0.1:65001".into(),
                piece_size: 1 << 20,
            }),
            ..Default::default()
        };
        let blob = LsmBlob {
            role: "layer".into(),
            digest: format!("sha256:{}", "a".repeat(64)),
            meta_digest: Some(format!("sha256:{}", "b".repeat(64))),
            meta_len: None,
            size: 4096,
            source: BlobSource::Registry {
                url: "https://reg.example".into(),
                repository: "app".into(),
            },
        };
        let c = image_config(&[blob], 1 << 20, false, &opts);
        let r = &c["layers"][0]["source"]["registry"];
        assert_eq!(r["url"], "https://m1.example");
        assert_eq!(
            r["mirrors"],
            json!(["http://127.0.0.1:5001", "https://reg.example"])
        );
        assert_eq!(r["insecure"], true);
        assert_eq!(r["p2p"]["proxy"], "http://127.0.0.1:65001");
        let parsed: lsmd::config::ImageConfig =
            serde_json::from_value(c).expect("lsmd reads the config");
        parsed.check().expect("lsmd accepts the config");
    }
}
