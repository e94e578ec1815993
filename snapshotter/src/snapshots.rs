//! containerd's snapshots service over plain directories: overlayfs-style snapshots.
//!
//! Each snapshot is `ROOT/snapshots/<id>/` with `fs/` (its files: what an unpacked layer or a
//! container writes) and `work/` (overlayfs' work directory). Mounts are what containerd's own
//! overlayfs snapshotter returns, so containerd's normal unpack (apply each layer's diff into
//! the mounts of an active snapshot, then `Commit`) and `ctr run` work for any OCI image:
//! - active, no parent: a read-write bind mount of `fs/`;
//! - active over parents: `overlay` with `upperdir=fs`, `workdir=work`, `lowerdir=` the
//!   parents' `fs/`, nearest first;
//! - view of one parent: a read-only bind mount of the parent's `fs/`; of more: a read-only
//!   `overlay` of the parents' `fs/` (lowerdir only).
//!
//! Crash safety (a crash at any point of `Prepare`/`View`/`Remove` leaves nothing half made):
//! a new snapshot's directory is built under `ROOT/staging/`, renamed into `ROOT/snapshots/`,
//! and only then is its record committed; `Remove` commits the record's deletion before it
//! deletes the directory. A directory without a record is therefore never in use, and
//! [`Service::open`] deletes those (and everything in `staging/`) at startup.
//!
//! Concurrency: containerd calls concurrently; every call that changes metadata or
//! directories holds `lock` for its whole duration, so checks (key free, parent committed, no
//! children) and the changes they guard are atomic. Reads (`Stat`, `Mounts`, `List`) use redb
//! read transactions and need no lock. Filesystem work runs on tokio's blocking pool.

// Errors here are `tonic::Status`, the error type containerd's gRPC trait returns; boxing them
// would only be undone at every trait method.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic::Status;
use containerd_snapshots::{Info, Snapshotter, Usage};
use tokio::sync::Mutex;

use crate::filter::{Fields, Filter};
use crate::lsm::{self, Disk, LsmBlob, LsmOptions, LsmState};
use crate::store::{self, Kind, Record, Store, StoreError};

/// Environment variable naming a point at which to abort the process, for the crash tests
/// only (a crash in the middle of a call cannot be caused from outside at a chosen point).
/// `prepare-after-rename`: the directory is in place, its record not yet committed.
pub const CRASH_AT_ENV: &str = "LSM_SNAPSHOTTER_CRASH_AT";

/// The snapshots service.
pub struct Service {
    root: PathBuf,
    store: Arc<Store>,
    lock: Mutex<()>,
    lsm: Arc<LsmOptions>,
    /// `ROOT/attach`: `lsmctl attach` records of the snapshots' lsmd.
    attach_dir_path: PathBuf,
}

impl From<StoreError> for Status {
    fn from(e: StoreError) -> Status {
        Status::internal(e.to_string())
    }
}

fn io_status(what: &str, path: &Path, e: std::io::Error) -> Status {
    Status::internal(format!("{what} {}: {e}", path.display()))
}

impl Service {
    /// Opens the state under `root` (creating it), and deletes what a crash left half made.
    pub fn open(root: &Path, lsm: LsmOptions) -> Result<Service, String> {
        for sub in ["snapshots", "staging", "attach"] {
            let d = root.join(sub);
            std::fs::create_dir_all(&d).map_err(|e| format!("create {}: {e}", d.display()))?;
        }
        let store = Store::open(&root.join("metadata.redb")).map_err(|e| e.to_string())?;
        let svc = Service {
            root: root.to_path_buf(),
            store: Arc::new(store),
            lock: Mutex::new(()),
            lsm: Arc::new(lsm),
            attach_dir_path: root.join("attach"),
        };
        svc.sweep()?;
        svc.adopt_disks()?;
        Ok(svc)
    }

    /// The disk of lsm snapshot `id` (active or view).
    fn disk(&self, id: u64, read_only: bool) -> Disk {
        Disk {
            dir: self.dir(id),
            id,
            read_only,
            state_dir: self.attach_dir_path.clone(),
            opts: self.lsm.clone(),
        }
    }

    /// Adopts the disks of active and view lsm snapshots that still run; re-attaches or
    /// re-mounts the others (a failure is logged: that snapshot's mounts then fail to read,
    /// the others are served).
    fn adopt_disks(&self) -> Result<(), String> {
        for (key, rec) in self.store.all().map_err(|e| e.to_string())? {
            if rec.lsm.as_ref().is_some_and(|l| l.disk) {
                if let Err(e) = self.disk(rec.id, rec.kind == Kind::View).ensure() {
                    tracing::error!(
                        key,
                        id = rec.id,
                        "cannot bring back the snapshot's disk: {e}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Deletes `staging/*` and every snapshot directory without a record.
    fn sweep(&self) -> Result<(), String> {
        let staging = self.root.join("staging");
        let entries =
            std::fs::read_dir(&staging).map_err(|e| format!("{}: {e}", staging.display()))?;
        for entry in entries {
            let p = entry
                .map_err(|e| format!("{}: {e}", staging.display()))?
                .path();
            tracing::warn!(path = %p.display(), "deleting staging directory left by a crash");
            remove_tree(&p).map_err(|e| format!("delete {}: {e}", p.display()))?;
        }
        let snaps = self.root.join("snapshots");
        for id in self.store.orphan_dirs(&snaps).map_err(|e| e.to_string())? {
            let p = snaps.join(&id);
            tracing::warn!(path = %p.display(), "deleting snapshot directory with no record (left by a crash)");
            if let (true, Ok(n)) = (p.join("image.json").exists(), id.parse::<u64>()) {
                // A disk may still be attached and mounted there: never delete through it.
                if let Err(e) = self.disk(n, false).teardown() {
                    tracing::error!(path = %p.display(), "cannot tear down the disk of an unrecorded snapshot, keeping it: {e}");
                    continue;
                }
            }
            remove_tree(&p).map_err(|e| format!("delete {}: {e}", p.display()))?;
        }
        Ok(())
    }

    fn dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    /// Ids of `parent` and its ancestors, nearest first.
    fn ancestry(&self, parent: &str) -> Result<Vec<u64>, Status> {
        let mut ids = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            let rec = self.store.get(&next)?.ok_or_else(|| {
                Status::not_found(format!("parent snapshot {next:?} does not exist"))
            })?;
            ids.push(rec.id);
            next = rec.parent;
            if ids.len() > 4096 {
                return Err(Status::internal(format!(
                    "parent chain of {parent:?} loops"
                )));
            }
        }
        Ok(ids)
    }

    /// The `fs/` directories of `parent`'s chain that hold overlay diffs above an erofs disk,
    /// nearest first (overlayfs `lowerdir` order).
    fn overlay_diffs(&self, parent: &str) -> Result<Vec<String>, Status> {
        let mut dirs = Vec::new();
        let mut next = parent.to_string();
        for _ in 0..4096 {
            if next.is_empty() {
                return Ok(dirs);
            }
            let rec = self.store.get(&next)?.ok_or_else(|| {
                Status::not_found(format!("parent snapshot {next:?} does not exist"))
            })?;
            if rec.lsm.as_ref().is_some_and(|l| l.overlay) {
                dirs.push(self.dir(rec.id).join("fs").display().to_string());
            }
            next = rec.parent;
        }
        Err(Status::internal(format!(
            "parent chain of {parent:?} loops"
        )))
    }

    /// Mounts of a disk snapshot whose filesystem is read-only (erofs): an overlay over the
    /// `rootfs/` mount and the chain's overlay diffs, with `fs/` as the upper directory of an
    /// active snapshot.
    fn read_only_fs_mounts(&self, rec: &Record) -> Result<Vec<Mount>, Status> {
        let mut lower = self.overlay_diffs(&rec.parent)?;
        let rootfs = self.dir(rec.id).join("rootfs").display().to_string();
        let mut options = Vec::new();
        match rec.kind {
            Kind::View if lower.is_empty() => return Ok(vec![bind_mount(rootfs, true)]),
            Kind::View => options.push("ro".to_string()),
            _ => {
                options.push(format!(
                    "workdir={}",
                    self.dir(rec.id).join("work").display()
                ));
                options.push(format!(
                    "upperdir={}",
                    self.dir(rec.id).join("fs").display()
                ));
            }
        }
        lower.push(rootfs);
        options.push(format!("lowerdir={}", lower.join(":")));
        Ok(vec![Mount {
            r#type: "overlay".into(),
            source: "overlay".into(),
            target: String::new(),
            options,
        }])
    }

    fn mounts_of(&self, rec: &Record) -> Result<Vec<Mount>, Status> {
        if rec.lsm.as_ref().is_some_and(|l| l.disk) {
            if self.disk(rec.id, true).is_read_only_fs() {
                return self.read_only_fs_mounts(rec);
            }
            let rootfs = self.dir(rec.id).join("rootfs").display().to_string();
            return Ok(vec![bind_mount(rootfs, rec.kind == Kind::View)]);
        }
        let parents = self.ancestry(&rec.parent)?;
        let fs = |id: u64| self.dir(id).join("fs").display().to_string();
        let lower = parents
            .iter()
            .map(|&id| fs(id))
            .collect::<Vec<_>>()
            .join(":");
        let overlay = |mut options: Vec<String>| {
            options.push(format!("lowerdir={lower}"));
            Mount {
                r#type: "overlay".into(),
                source: "overlay".into(),
                target: String::new(),
                options,
            }
        };
        Ok(match (rec.kind, parents.len()) {
            (Kind::Committed, _) => {
                return Err(Status::failed_precondition(
                    "a committed snapshot has no mounts: prepare or view it",
                ))
            }
            (Kind::Active, 0) => vec![bind_mount(fs(rec.id), false)],
            (Kind::View, 0) => vec![bind_mount(fs(rec.id), true)],
            (Kind::View, 1) => vec![bind_mount(fs(parents[0]), true)],
            (Kind::View, _) => vec![overlay(vec!["ro".into()])],
            (Kind::Active, _) => vec![overlay(vec![
                format!("workdir={}", self.dir(rec.id).join("work").display()),
                format!("upperdir={}", fs(rec.id)),
            ])],
        })
    }

    /// `Prepare` and `View`: records a new snapshot over `parent` (committed, or empty).
    async fn create(
        &self,
        kind: Kind,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        let _guard = self.lock.lock().await;
        // A layer `lsmctl convert` made: recorded as committed under its chainID, not fetched.
        let remote = match kind {
            Kind::Active => {
                lsm::remote_layer(&labels, &self.lsm).map_err(Status::invalid_argument)?
            }
            _ => None,
        };
        let txn = self.store.begin()?;
        if let Some((target, _)) = &remote {
            if txn.get(target)?.is_some() {
                return Err(Status::already_exists(format!(
                    "snapshot {target:?} already exists"
                )));
            }
        }
        if txn.get(&key)?.is_some() {
            return Err(Status::already_exists(format!(
                "snapshot {key:?} already exists"
            )));
        }
        if !parent.is_empty() {
            match txn.get(&parent)? {
                None => {
                    return Err(Status::not_found(format!(
                        "parent snapshot {parent:?} does not exist"
                    )))
                }
                Some(p) if p.kind != Kind::Committed => {
                    return Err(Status::failed_precondition(format!(
                        "parent snapshot {parent:?} is not committed"
                    )))
                }
                Some(_) => {}
            }
        }
        let chain = match remote {
            None => self.lsm_chain(&parent)?,
            Some(_) => None,
        };
        let id = txn.next_id()?;
        let now = store::now();
        let mut disk_files = None;
        let (name, kind, lsm_state) = match (remote, chain) {
            (Some((target, st)), _) => (target, Kind::Committed, Some(st)),
            (None, Some((blobs, disk_size))) => {
                let upper = kind == Kind::Active;
                let config = lsm::image_config(&blobs, disk_size, upper, &self.lsm);
                disk_files = Some((
                    serde_json::to_vec_pretty(&config)
                        .map_err(|e| Status::internal(e.to_string()))?,
                    upper.then_some(disk_size),
                ));
                let st = LsmState {
                    blobs: Vec::new(),
                    disk_size,
                    disk: true,
                    overlay: false,
                };
                (key, kind, Some(st))
            }
            (None, None) => (key, kind, None),
        };
        let rec = Record {
            id,
            kind,
            parent,
            labels,
            created_at: now,
            updated_at: now,
            usage: None,
            lsm: lsm_state,
        };
        txn.put(&name, &rec)?;
        let (staging, dir) = (self.root.join("staging").join(id.to_string()), self.dir(id));
        tokio::task::spawn_blocking(move || make_snapshot_dir(&staging, &dir, disk_files))
            .await
            .map_err(|e| Status::internal(format!("snapshot directory task: {e}")))??;
        if std::env::var(CRASH_AT_ENV).as_deref() == Ok("prepare-after-rename") {
            tracing::error!(name, "{CRASH_AT_ENV}=prepare-after-rename: aborting");
            std::process::abort();
        }
        if let Err(e) = txn.commit() {
            let _ = remove_tree(&self.dir(id));
            return Err(e.into());
        }
        let lsm_kind = rec.lsm.as_ref().map(|l| l.disk);
        tracing::info!(name, id, kind = ?kind, parent = %rec.parent, lsm = ?lsm_kind, "snapshot created");
        match lsm_kind {
            // containerd then Stats the target: it exists, committed.
            Some(false) => Err(Status::already_exists(format!(
                "lsm layer: snapshot {name:?} already exists (committed, read remotely)"
            ))),
            Some(true) => {
                self.bring_up(&name, &rec).await?;
                self.mounts_of(&rec)
            }
            None => self.mounts_of(&rec),
        }
    }

    /// Attaches and mounts a new disk snapshot; on failure forgets it again (record first,
    /// then the directory: the order the sweep relies on).
    async fn bring_up(&self, name: &str, rec: &Record) -> Result<(), Status> {
        let (id, ro) = (rec.id, rec.kind == Kind::View);
        let disk = self.disk(id, ro);
        let r = tokio::task::spawn_blocking(move || disk.ensure())
            .await
            .map_err(|e| Status::internal(format!("attach task: {e}")))?;
        let Err(e) = r else { return Ok(()) };
        tracing::error!(name, id, "cannot attach or mount the snapshot's disk: {e}");
        let disk = self.disk(id, ro);
        let torn = tokio::task::spawn_blocking(move || disk.teardown())
            .await
            .map_err(|e| Status::internal(format!("detach task: {e}")))?;
        if torn.is_ok() {
            let txn = self.store.begin()?;
            txn.delete(name)?;
            txn.commit()?;
            let _ = remove_tree(&self.dir(id));
        }
        Err(Status::internal(format!("snapshot {name:?}: {e}")))
    }

    /// The lsm blobs of `parent`'s chain (bottom first) and its disk size, if it is an lsm
    /// chain; a chain mixing lsm and unpacked layers is refused.
    fn lsm_chain(&self, parent: &str) -> Result<Option<(Vec<LsmBlob>, u64)>, Status> {
        let mut recs = Vec::new();
        let mut next = parent.to_string();
        while !next.is_empty() {
            let rec = self.store.get(&next)?.ok_or_else(|| {
                Status::not_found(format!("parent snapshot {next:?} does not exist"))
            })?;
            next = rec.parent.clone();
            recs.push(rec);
            if recs.len() > 4096 {
                return Err(Status::internal(format!(
                    "parent chain of {parent:?} loops"
                )));
            }
        }
        let lsm: Vec<&LsmState> = recs.iter().filter_map(|r| r.lsm.as_ref()).collect();
        if lsm.is_empty() {
            return Ok(None);
        }
        if lsm.len() != recs.len() {
            return Err(Status::failed_precondition(format!(
                "parent chain of {parent:?} mixes lsm layers and unpacked layers"
            )));
        }
        let size = lsm.iter().map(|l| l.disk_size).max().unwrap_or(0);
        let blobs = lsm
            .iter()
            .rev()
            .flat_map(|l| l.blobs.iter().cloned())
            .collect();
        Ok(Some((blobs, size)))
    }
}

/// A recursive bind mount of `source`, read-only or read-write.
fn bind_mount(source: String, ro: bool) -> Mount {
    Mount {
        r#type: "bind".into(),
        source,
        target: String::new(),
        options: vec![if ro { "ro" } else { "rw" }.into(), "rbind".into()],
    }
}

/// Builds `staging/{fs,work}` and renames it to `dir`, syncing so that the rename is durable
/// before the record that names it is committed.
/// A disk snapshot also gets `image.json` and, when writable, an empty upper layer of
/// `upper` bytes.
fn make_snapshot_dir(
    staging: &Path,
    dir: &Path,
    disk: Option<(Vec<u8>, Option<u64>)>,
) -> Result<(), Status> {
    for sub in ["fs", "work"] {
        let p = staging.join(sub);
        std::fs::create_dir_all(&p).map_err(|e| io_status("create", &p, e))?;
    }
    if let Some((config, upper)) = disk {
        let p = staging.join("image.json");
        std::fs::write(&p, config).map_err(|e| io_status("write", &p, e))?;
        if let Some(size) = upper {
            let p = staging.join("upper");
            blockfmt::UpperLayer::create(&p, size).map_err(|e| {
                Status::internal(format!("create upper layer {}: {e}", p.display()))
            })?;
        }
    }
    std::fs::rename(staging, dir).map_err(|e| io_status("rename into place", dir, e))?;
    if let Some(parent) = dir.parent() {
        std::fs::File::open(parent)
            .and_then(|f| f.sync_all())
            .map_err(|e| io_status("sync", parent, e))?;
    }
    Ok(())
}

/// Deletes a directory tree; a missing one is already deleted.
fn remove_tree(p: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(p) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        r => r,
    }
}

/// Bytes and inodes used under `dir` (hard links counted once), without following symlinks
/// or crossing into other filesystems' mounts.
fn disk_usage(dir: &Path) -> std::io::Result<(i64, i64)> {
    use std::os::unix::fs::MetadataExt;
    let mut seen = std::collections::HashSet::new();
    let (mut bytes, mut inodes) = (0i64, 0i64);
    let root_dev = std::fs::symlink_metadata(dir)?.dev();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        let md = std::fs::symlink_metadata(&p)?;
        if md.dev() != root_dev || !seen.insert(md.ino()) {
            continue;
        }
        inodes += 1;
        bytes += i64::try_from(md.blocks() * 512).unwrap_or(i64::MAX);
        if md.is_dir() {
            for entry in std::fs::read_dir(&p)? {
                stack.push(entry?.path());
            }
        }
    }
    Ok((bytes, inodes))
}

fn info_of(key: String, rec: Record) -> Info {
    Info {
        kind: match rec.kind {
            Kind::Active => containerd_snapshots::Kind::Active,
            Kind::View => containerd_snapshots::Kind::View,
            Kind::Committed => containerd_snapshots::Kind::Committed,
        },
        name: key,
        parent: rec.parent,
        labels: rec.labels,
        created_at: store::to_system_time(rec.created_at),
        updated_at: store::to_system_time(rec.updated_at),
    }
}

/// Stream of `List` answers.
pub type InfoStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<Info, Status>> + Send + 'static>>;

#[containerd_snapshots::tonic::async_trait]
impl Snapshotter for Service {
    type Error = Status;

    async fn stat(&self, key: String) -> Result<Info, Status> {
        let rec = self
            .store
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} does not exist")))?;
        Ok(info_of(key, rec))
    }

    async fn update(&self, info: Info, fieldpaths: Option<Vec<String>>) -> Result<Info, Status> {
        let _guard = self.lock.lock().await;
        let txn = self.store.begin()?;
        let key = info.name.clone();
        let mut rec = txn
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} does not exist")))?;
        let paths = fieldpaths.unwrap_or_default();
        if paths.is_empty() {
            rec.labels = info.labels.clone();
        }
        for path in paths {
            if path == "labels" {
                rec.labels = info.labels.clone();
            } else if let Some(label) = path.strip_prefix("labels.") {
                match info.labels.get(label) {
                    Some(v) => rec.labels.insert(label.to_string(), v.clone()),
                    None => rec.labels.remove(label),
                };
            } else {
                return Err(Status::invalid_argument(format!(
                    "cannot update field {path:?} of snapshot {key:?}: only labels are updatable"
                )));
            }
        }
        rec.updated_at = store::now();
        txn.put(&key, &rec)?;
        txn.commit()?;
        Ok(info_of(key, rec))
    }

    async fn usage(&self, key: String) -> Result<Usage, Status> {
        let rec = self
            .store
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} does not exist")))?;
        let (size, inodes) = match (&rec.usage, &rec.lsm) {
            (Some(u), _) => *u,
            // An lsm layer weighs its blobs; a disk, what its upper layer holds.
            (None, Some(l)) if !l.disk => {
                let bytes: u64 = l.blobs.iter().map(|b| b.size).sum();
                (i64::try_from(bytes).unwrap_or(i64::MAX), 0)
            }
            (None, Some(_)) => {
                // An erofs disk's writes are in `fs/`, an ext4 disk's in its upper layer.
                let sub = if self.disk(rec.id, true).is_read_only_fs() {
                    "fs"
                } else {
                    "upper"
                };
                let up = self.dir(rec.id).join(sub);
                let (bytes, _) = tokio::task::spawn_blocking(move || {
                    disk_usage(&up).map_err(|e| io_status("usage of", &up, e))
                })
                .await
                .map_err(|e| Status::internal(format!("usage task: {e}")))??;
                (bytes, 0)
            }
            (None, None) => {
                let fs = self.dir(rec.id).join("fs");
                tokio::task::spawn_blocking(move || {
                    disk_usage(&fs).map_err(|e| io_status("usage of", &fs, e))
                })
                .await
                .map_err(|e| Status::internal(format!("usage task: {e}")))??
            }
        };
        Ok(Usage { inodes, size })
    }

    async fn mounts(&self, key: String) -> Result<Vec<Mount>, Status> {
        let rec = self
            .store
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} does not exist")))?;
        self.mounts_of(&rec)
    }

    async fn prepare(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        self.create(Kind::Active, key, parent, labels).await
    }

    async fn view(
        &self,
        key: String,
        parent: String,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, Status> {
        self.create(Kind::View, key, parent, labels).await
    }

    async fn commit(
        &self,
        name: String,
        key: String,
        labels: HashMap<String, String>,
    ) -> Result<(), Status> {
        let _guard = self.lock.lock().await;
        let txn = self.store.begin()?;
        let mut rec = txn
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} does not exist")))?;
        if rec.kind != Kind::Active {
            return Err(Status::failed_precondition(format!(
                "snapshot {key:?} is not active: only active snapshots can be committed"
            )));
        }
        if txn.get(&name)?.is_some() {
            return Err(Status::already_exists(format!(
                "snapshot {name:?} already exists"
            )));
        }
        let is_disk = rec.lsm.as_ref().is_some_and(|l| l.disk);
        let usage = if is_disk && self.disk(rec.id, false).is_read_only_fs() {
            // erofs: the container's writes are the overlay diff in `fs/`; the disk goes.
            let disk = self.disk(rec.id, false);
            tokio::task::spawn_blocking(move || disk.teardown())
                .await
                .map_err(|e| Status::internal(format!("detach task: {e}")))?
                .map_err(|e| Status::failed_precondition(format!("commit {key:?}: {e}")))?;
            if let Some(l) = rec.lsm.as_mut() {
                l.disk = false;
                l.overlay = true;
            }
            let fs = self.dir(rec.id).join("fs");
            tokio::task::spawn_blocking(move || {
                disk_usage(&fs).map_err(|e| io_status("usage of", &fs, e))
            })
            .await
            .map_err(|e| Status::internal(format!("usage task: {e}")))??
        } else if is_disk {
            // Seal the container's writes into a local lsm blob above the parent's chain.
            let below = self
                .lsm_chain(&rec.parent)?
                .map(|(b, _)| b.iter().filter(|b| b.role == "layer").count())
                .unwrap_or(0);
            let disk = self.disk(rec.id, false);
            let blobs = tokio::task::spawn_blocking(move || disk.commit(below))
                .await
                .map_err(|e| Status::internal(format!("commit task: {e}")))?
                .map_err(|e| Status::failed_precondition(format!("commit {key:?}: {e}")))?;
            let bytes: u64 = blobs.iter().map(|b| b.size).sum();
            if let Some(l) = rec.lsm.as_mut() {
                l.blobs = blobs;
                l.disk = false;
            }
            (i64::try_from(bytes).unwrap_or(i64::MAX), 0)
        } else {
            let fs = self.dir(rec.id).join("fs");
            tokio::task::spawn_blocking(move || {
                disk_usage(&fs).map_err(|e| io_status("usage of", &fs, e))
            })
            .await
            .map_err(|e| Status::internal(format!("usage task: {e}")))??
        };
        rec.kind = Kind::Committed;
        rec.labels = labels;
        rec.usage = Some(usage);
        rec.updated_at = store::now();
        txn.delete(&key)?;
        txn.put(&name, &rec)?;
        txn.commit()?;
        tracing::info!(key, name, id = rec.id, "snapshot committed");
        Ok(())
    }

    async fn remove(&self, key: String) -> Result<(), Status> {
        let _guard = self.lock.lock().await;
        let txn = self.store.begin()?;
        let rec = txn
            .get(&key)?
            .ok_or_else(|| Status::not_found(format!("snapshot {key:?} does not exist")))?;
        if txn.has_children(&key)? {
            return Err(Status::failed_precondition(format!(
                "snapshot {key:?} has children: remove them first"
            )));
        }
        if rec.lsm.as_ref().is_some_and(|l| l.disk) {
            // Unmount and stop the lsmd before forgetting it: a busy mount keeps the record.
            let disk = self.disk(rec.id, rec.kind == Kind::View);
            tokio::task::spawn_blocking(move || disk.teardown())
                .await
                .map_err(|e| Status::internal(format!("detach task: {e}")))?
                .map_err(|e| Status::failed_precondition(format!("remove {key:?}: {e}")))?;
        }
        txn.delete(&key)?;
        txn.commit()?;
        let dir = self.dir(rec.id);
        let result =
            tokio::task::spawn_blocking(move || remove_tree(&dir).map_err(|e| (dir, e))).await;
        match result {
            Ok(Ok(())) => tracing::info!(key, id = rec.id, "snapshot removed"),
            // The record is gone, so the directory is an orphan the next start deletes.
            Ok(Err((dir, e))) => {
                tracing::warn!(key, dir = %dir.display(), "snapshot removed; deleting its directory failed (retried at next start): {e}")
            }
            Err(e) => tracing::warn!(key, "snapshot removed; directory deletion task failed: {e}"),
        }
        Ok(())
    }

    type InfoStream = InfoStream;

    async fn list(&self, snapshotter: String, filters: Vec<String>) -> Result<InfoStream, Status> {
        // Alternatives; an unsupported one is refused (unfiltered results would be wrong data).
        let parsed: Vec<Filter> = filters
            .iter()
            .filter(|f| !f.is_empty())
            .map(|f| Filter::parse(f))
            .collect::<Result<_, _>>()
            .map_err(|e| {
                Status::unimplemented(format!("lsm-snapshotter ({snapshotter}): walk filter: {e}"))
            })?;
        let mut out = Vec::new();
        for (k, r) in self.store.all()? {
            let kind = match r.kind {
                Kind::Active => "active",
                Kind::View => "view",
                Kind::Committed => "committed",
            };
            let fields = Fields {
                name: &k,
                parent: &r.parent,
                kind,
                labels: &r.labels,
            };
            let mut keep = parsed.is_empty();
            for f in &parsed {
                keep |= f.matches(&fields).map_err(|e| {
                    Status::unimplemented(format!("lsm-snapshotter ({snapshotter}): {e}"))
                })?;
            }
            if keep {
                out.push(Ok(info_of(k, r)));
            }
        }
        Ok(Box::pin(futures::stream::iter(out)))
    }
}
