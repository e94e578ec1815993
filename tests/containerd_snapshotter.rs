//! `lsm-snapshotter` as containerd's proxy snapshotter, against real containerd 1.6 + runc
//! started by each test in its own directories (see `support/containerd.rs`):
//! - a plain OCI image (two layers, built here with umoci) is imported and unpacked through the
//!   snapshotter and `ctr run --snapshotter lsm` runs a command in it that reads both layers and
//!   writes into its container layer;
//! - a crash in the middle of `Prepare` (the snapshot's directory is in place, its record not
//!   yet committed) leaves nothing half made after a restart: the key is free, the directory
//!   is gone, and the key can be prepared again;
//! - `kill -9` of the snapshotter while a container runs: the container keeps its filesystem,
//!   its later writes land, and the restarted snapshotter answers for its snapshot;
//! - lsm layers of an image converted and pushed to a real registry here: Prepare with the
//!   layers' annotations as labels (through containerd's snapshots API: `ctr` cannot pass
//!   labels) answers AlreadyExists without fetching; a container snapshot over them is served
//!   lazily (bytes counted at the registry), commits into a child, views are read-only, and
//!   a kill -9 of the snapshotter leaves its mount working;
//! - `ctr run --snapshotter lsm` of that converted image.

// Errors here are `tonic::Status`, what the gRPC client returns.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;

use lsm_e2e::containerd::{tiny_image, Containerd};
use lsm_e2e::ok;

const IMAGE: &str = "localhost/lsm-test:tiny";

fn import_tiny(c: &Containerd, dir: &Path, greeting: &str) {
    let tar = tiny_image(dir, greeting);
    c.ctr_ok(
        [
            "images",
            "import",
            "--snapshotter",
            "lsm",
            "--base-name",
            "localhost/lsm-test",
        ]
        .map(String::from)
        .into_iter()
        .chain([tar.display().to_string()]),
    );
}

/// Every key the snapshotter lists, as `ctr snapshots ls` shows them.
fn snapshot_keys(c: &Containerd) -> Vec<String> {
    c.ctr_ok(["snapshots", "--snapshotter", "lsm", "ls"])
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .collect()
}

#[test]
fn plain_oci_image_runs_with_lsm_snapshotter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let c = Containerd::start(tmp.path());
    import_tiny(&c, tmp.path(), "hello from layer two\n");

    // Both layers were unpacked through lsm: two committed snapshots.
    let keys = snapshot_keys(&c);
    assert_eq!(
        keys.len(),
        2,
        "expected 2 committed layer snapshots, got {keys:?}"
    );

    let out = c.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        "lsm",
        IMAGE,
        "c1",
        "/bin/busybox",
        "sh",
        "-c",
        "cat /etc/greeting && echo written > /tmp-file && /bin/busybox cat /tmp-file",
    ]);
    assert_eq!(out, "hello from layer two\nwritten\n", "{}", c.logs());

    // The container's layer was a snapshot of its own, over the two layers.
    let created = std::fs::read_dir(c.snap_root.join("snapshots"))
        .expect("snapshots dir")
        .count();
    assert!(created >= 2, "{created} snapshot directories");
}

#[test]
fn crash_mid_prepare_leaves_nothing_half_made() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Containerd::start_with_env(
        tmp.path(),
        &[("LSM_SNAPSHOTTER_CRASH_AT", "prepare-after-rename")],
    );

    let o = c.ctr_output([
        "--timeout",
        "30s",
        "snapshots",
        "--snapshotter",
        "lsm",
        "prepare",
        "half-made",
    ]);
    assert!(
        !o.status.success(),
        "prepare must fail: the snapshotter aborted"
    );
    let status = c.wait_snapshotter_exit();
    assert!(!status.success(), "snapshotter must have aborted: {status}");
    // The crash left a directory in place with no record.
    let dirs = |c: &Containerd| {
        std::fs::read_dir(c.snap_root.join("snapshots"))
            .expect("snapshots dir")
            .count()
    };
    assert_eq!(dirs(&c), 1, "the failpoint fires after the rename");

    c.start_snapshotter(&[]);
    assert_eq!(
        dirs(&c),
        0,
        "startup deletes the unrecorded directory:\n{}",
        c.logs()
    );
    assert!(snapshot_keys(&c).is_empty(), "{}", c.logs());
    let o = c.ctr_output(["snapshots", "--snapshotter", "lsm", "info", "half-made"]);
    assert!(!o.status.success(), "half-made must not exist");

    // The key is free again and works end to end.
    c.ctr_ok_reconnecting(&["snapshots", "--snapshotter", "lsm", "prepare", "half-made"]);
    assert_eq!(snapshot_keys(&c), vec!["half-made".to_string()]);
    assert_eq!(dirs(&c), 1);
    // (containerd removes it from the snapshotter later, in its garbage collection.)
    c.ctr_ok(["snapshots", "--snapshotter", "lsm", "rm", "half-made"]);
    assert!(snapshot_keys(&c).is_empty());
}

#[test]
fn container_survives_snapshotter_kill_9() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut c = Containerd::start(tmp.path());
    import_tiny(&c, tmp.path(), "survivor\n");
    c.ctr_ok([
        "run",
        "-d",
        "--snapshotter",
        "lsm",
        IMAGE,
        "long",
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    c.snapshotter().kill().expect("kill -9");
    c.wait_snapshotter_exit();

    // While the snapshotter is down, the container's filesystem keeps working.
    c.ctr_ok([
        "tasks",
        "exec",
        "--exec-id",
        "w1",
        "long",
        "/bin/busybox",
        "sh",
        "-c",
        "echo during > /during",
    ]);
    c.start_snapshotter(&[]);
    c.ctr_ok([
        "tasks",
        "exec",
        "--exec-id",
        "w2",
        "long",
        "/bin/busybox",
        "sh",
        "-c",
        "echo after > /after",
    ]);
    let out = c.ctr_ok([
        "tasks",
        "exec",
        "--exec-id",
        "r",
        "long",
        "/bin/busybox",
        "cat",
        "/etc/greeting",
        "/during",
        "/after",
    ]);
    assert_eq!(out, "survivor\nduring\nafter\n");
    // The restarted snapshotter still knows the container's snapshot, and its writes are in
    // the snapshot's upper directory.
    let usage = c.ctr_ok_reconnecting(&["snapshots", "--snapshotter", "lsm", "usage", "long"]);
    let info = c.ctr_ok(["snapshots", "--snapshotter", "lsm", "info", "long"]);
    assert!(info.contains("\"Kind\": \"Active\""), "{info}");
    assert!(usage.contains("long"), "{usage}");
    let found = ok(Command::new("find")
        .arg(c.snap_root.join("snapshots"))
        .args(["-name", "after", "-path", "*/fs/after"]));
    assert_eq!(
        found.lines().count(),
        1,
        "container write not in its upper dir: {found}"
    );
}

/// containerd's snapshots API (the same service lsm-snapshotter serves), reached through
/// containerd's socket, for the calls `ctr` cannot make (Prepare with labels). Every call is
/// made under a lease (as containerd's unpack does), so containerd's garbage collector keeps
/// the snapshots made until the test is done with them.
struct SnapshotsApi {
    rt: tokio::runtime::Runtime,
    client: SnapshotsClient<tonic::transport::Channel>,
}

use containerd_snapshots::api::snapshots::v1::snapshots_client::SnapshotsClient;
use containerd_snapshots::api::snapshots::v1::{
    CommitSnapshotRequest, MountsRequest, PrepareSnapshotRequest, StatSnapshotRequest,
    ViewSnapshotRequest,
};
use containerd_snapshots::api::types::Mount;
use containerd_snapshots::tonic;

impl SnapshotsApi {
    fn connect(c: &Containerd) -> SnapshotsApi {
        const LEASE: &str = "lsm-test-lease";
        if !c.ctr_ok(["leases", "ls", "-q"]).lines().any(|l| l == LEASE) {
            c.ctr_ok(["leases", "create", "--id", LEASE, "--expires", "0"]);
        }
        SnapshotsApi::connect_socket(&c.address)
    }

    fn connect_socket(socket: &Path) -> SnapshotsApi {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let path = socket.to_path_buf();
        let channel = rt
            .block_on(
                tonic::transport::Endpoint::try_from("http://[::]:50051")
                    .expect("endpoint")
                    .connect_with_connector(tower::service_fn(move |_| {
                        tokio::net::UnixStream::connect(path.clone())
                    })),
            )
            .expect("connect to containerd");
        SnapshotsApi {
            rt,
            client: SnapshotsClient::new(channel),
        }
    }

    fn req<T>(msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.metadata_mut().insert(
            "containerd-namespace",
            lsm_e2e::containerd::NAMESPACE.parse().expect("ascii"),
        );
        r.metadata_mut()
            .insert("containerd-lease", "lsm-test-lease".parse().expect("ascii"));
        r
    }

    fn prepare(
        &mut self,
        key: &str,
        parent: &str,
        labels: HashMap<String, String>,
    ) -> Result<Vec<Mount>, tonic::Status> {
        let r = Self::req(PrepareSnapshotRequest {
            snapshotter: "lsm".into(),
            key: key.into(),
            parent: parent.into(),
            labels,
        });
        let c = &mut self.client;
        self.rt
            .block_on(c.prepare(r))
            .map(|r| r.into_inner().mounts)
    }

    fn view(&mut self, key: &str, parent: &str) -> Vec<Mount> {
        let r = Self::req(ViewSnapshotRequest {
            snapshotter: "lsm".into(),
            key: key.into(),
            parent: parent.into(),
            labels: HashMap::new(),
        });
        let c = &mut self.client;
        self.rt
            .block_on(c.view(r))
            .expect("view")
            .into_inner()
            .mounts
    }

    fn mounts(&mut self, key: &str) -> Vec<Mount> {
        let r = Self::req(MountsRequest {
            snapshotter: "lsm".into(),
            key: key.into(),
        });
        let c = &mut self.client;
        self.rt
            .block_on(c.mounts(r))
            .expect("mounts")
            .into_inner()
            .mounts
    }

    /// (kind, parent) of `key`: kind 1 view, 2 active, 3 committed.
    fn stat(&mut self, key: &str) -> Result<(i32, String), tonic::Status> {
        let r = Self::req(StatSnapshotRequest {
            snapshotter: "lsm".into(),
            key: key.into(),
        });
        let c = &mut self.client;
        self.rt.block_on(c.stat(r)).map(|r| {
            let i = r.into_inner().info.unwrap_or_default();
            (i.kind, i.parent)
        })
    }

    fn commit(&mut self, name: &str, key: &str) {
        let r = Self::req(CommitSnapshotRequest {
            snapshotter: "lsm".into(),
            name: name.into(),
            key: key.into(),
            labels: HashMap::new(),
        });
        let c = &mut self.client;
        self.rt.block_on(c.commit(r)).expect("commit");
    }
}

/// Mounts what a snapshot's `Mounts` say at `target` (as containerd would for a container).
fn mount_all(mounts: &[Mount], target: &Path) {
    std::fs::create_dir_all(target).expect("mkdir");
    assert_eq!(mounts.len(), 1, "{mounts:?}");
    let m = &mounts[0];
    ok(Command::new("mount")
        .args(["-t", &m.r#type, "-o", &m.options.join(",")])
        .arg(&m.source)
        .arg(target));
}

fn umount(target: &Path) {
    ok(Command::new("umount").arg(target));
}

/// chainIDs of `diff_ids` (containerd's identity.ChainIDs).
fn chain_ids(diff_ids: &[String]) -> Vec<String> {
    use sha2::{Digest, Sha256};
    let mut out: Vec<String> = Vec::new();
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

/// A tar of `(path, content, mode)` entries (a path ending in `/` is a directory).
fn tar_of(entries: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (path, data, mode) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(*mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        if path.ends_with('/') {
            h.set_entry_type(tar::EntryType::Directory);
            h.set_size(0);
        } else {
            h.set_size(data.len() as u64);
        }
        b.append_data(&mut h, path, *data).expect("tar entry");
    }
    b.into_inner().expect("tar")
}

/// An OCI image layout at `dir` tagged `app` with these uncompressed tar layers.
fn oci_layout(dir: &Path, layers: &[Vec<u8>]) {
    let descs: Vec<serde_json::Value> = layers
        .iter()
        .map(|t| serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": lsm_e2e::put_oci_blob(dir, t), "size": t.len()}))
        .collect();
    let diff_ids: Vec<serde_json::Value> = descs.iter().map(|d| d["digest"].clone()).collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/bin/busybox", "sh"]},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": diff_ids.iter().map(|_| serde_json::json!({"created_by": "test"})).collect::<Vec<_>>(),
    });
    lsm_e2e::finish_oci_layout(dir, &config, descs, "app");
}

/// A three-layer image (busybox; 16 MiB of random bytes; a greeting), converted and pushed
/// to `reg` as `lsm/app:v1`; returns the pushed manifest and config.
fn converted_image(
    dir: &Path,
    reg: &lsm_e2e::registry::Registry,
) -> (serde_json::Value, serde_json::Value) {
    use rand::{Rng, SeedableRng};
    let mut big = vec![0u8; 16 << 20];
    rand::rngs::StdRng::seed_from_u64(15).fill(&mut big[..]);
    let busybox = std::fs::read("/usr/bin/busybox").expect("busybox");
    let layout = dir.join("oci");
    oci_layout(
        &layout,
        &[
            tar_of(&[("bin/", &[], 0o755), ("bin/busybox", &busybox, 0o755)]),
            tar_of(&[("data/", &[], 0o755), ("data/big", &big, 0o644)]),
            tar_of(&[
                ("etc/", &[], 0o755),
                ("etc/greeting", b"hello, lazily\n", 0o644),
            ]),
        ],
    );
    ok(lsm_e2e::lsmctl([
        "convert",
        "-q",
        "--no-reuse",
        "--tag",
        "app",
        "--insecure",
        "--push",
        &format!("{}/lsm/app:v1", reg.url),
    ])
    .arg(&layout)
    .arg(dir.join("converted")));
    let get = |what: &str| -> serde_json::Value {
        reg.agent()
            .get(&format!("{}/v2/lsm/app/{what}", reg.url))
            .set("Accept", "application/vnd.oci.image.manifest.v1+json")
            .call()
            .expect("get")
            .into_string()
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .expect("json")
    };
    let m = get("manifests/v1");
    let c = get(&format!(
        "blobs/{}",
        m["config"]["digest"].as_str().expect("config digest")
    ));
    (m, c)
}

#[test]
fn lsm_layers_are_prepared_remotely_and_served_lazily_through_containerd() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = lsm_e2e::registry::Registry::start(&t.join("registry"), None);
    let (manifest, config) = converted_image(t, &reg);
    // lsmd reads the registry through a proxy that counts blob bytes; the layers name it by
    // the CRI image reference (what `lsmctl pull` and the CRI plugin send).
    let proxy = lsm_e2e::faultproxy::FaultProxy::start(reg.url.trim_start_matches("http://"));
    let proxy_host = proxy.url.trim_start_matches("http://").to_string();
    let cache = t.join("cache");
    let mut c = Containerd::start_with(
        t,
        &[],
        &[
            "--plain-http",
            &proxy_host,
            "--cache-dir",
            cache.to_str().expect("utf-8"),
        ],
    );
    let mut api = SnapshotsApi::connect(&c);

    let layers = manifest["layers"].as_array().expect("layers");
    let layer_bytes: u64 = layers
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    // containerd's unpack, layer by layer: Prepare with the layer's annotations as labels
    // answers AlreadyExists; the chainID is then a committed snapshot over its parent.
    let chain = prepare_lsm_layers(
        &mut api,
        &manifest,
        &config,
        &format!("{proxy_host}/lsm/app:v1"),
    );
    for (i, id) in chain.iter().enumerate() {
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        let (kind, p) = api.stat(id).expect("stat of the chainID");
        assert_eq!(
            (kind, p.as_str()),
            (3, parent),
            "committed, over its parent"
        );
    }
    assert_eq!(
        proxy.blob_bytes.load(std::sync::atomic::Ordering::Relaxed),
        0,
        "preparing the layers fetched blob bytes"
    );

    // A container's snapshot: its mount shows the image, reading only what it needs.
    let top = chain.last().expect("top").clone();
    let mounts = api
        .prepare("ctr1", &top, HashMap::new())
        .expect("prepare ctr1");
    let m1 = t.join("m1");
    mount_all(&mounts, &m1);
    assert_eq!(
        std::fs::read_to_string(m1.join("etc/greeting")).expect("greeting"),
        "hello, lazily\n"
    );
    assert!(m1.join("bin/busybox").exists() && m1.join("data/big").exists());
    let fetched = proxy.blob_bytes.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!("reading /etc/greeting fetched {fetched} of {layer_bytes} layer blob bytes");
    assert!(
        fetched * 4 < layer_bytes,
        "reading a greeting fetched {fetched} of {layer_bytes} layer bytes"
    );
    // Writes land in the container's upper layer; commit seals them.
    std::fs::write(m1.join("written"), "by ctr1\n").expect("write");
    umount(&m1);
    api.commit("committed1", "ctr1");
    assert_eq!(api.stat("committed1").expect("stat").0, 3);

    // A child sees the write; a view is read-only.
    let m2 = t.join("m2");
    mount_all(
        &api.prepare("ctr2", "committed1", HashMap::new())
            .expect("ctr2"),
        &m2,
    );
    assert_eq!(
        std::fs::read_to_string(m2.join("written")).expect("written"),
        "by ctr1\n"
    );
    let mv = t.join("mv");
    mount_all(&api.view("view1", "committed1"), &mv);
    assert_eq!(
        std::fs::read_to_string(mv.join("written")).expect("view"),
        "by ctr1\n"
    );
    let e = std::fs::write(mv.join("nope"), "x").expect_err("a view is read-only");
    assert_eq!(e.raw_os_error(), Some(libc_erofs()), "{e}");
    umount(&mv);

    // kill -9 of the snapshotter while ctr2 is mounted: the mount keeps working, the restarted
    // snapshotter adopts the disk, and later writes persist through a commit.
    c.snapshotter().kill().expect("kill -9");
    c.wait_snapshotter_exit();
    std::fs::write(m2.join("during"), "while down\n").expect("write while down");
    c.start_snapshotter(&[]);
    c.ctr_ok_reconnecting(&["snapshots", "--snapshotter", "lsm", "info", "ctr2"]);
    let mut api = SnapshotsApi::connect(&c);
    assert_eq!(api.stat("ctr2").expect("stat").0, 2, "still active");
    assert_eq!(api.mounts("ctr2"), api.mounts("ctr2"));
    std::fs::write(m2.join("after"), "after restart\n").expect("write after restart");
    umount(&m2);
    api.commit("committed2", "ctr2");
    let m3 = t.join("m3");
    mount_all(
        &api.prepare("ctr3", "committed2", HashMap::new())
            .expect("ctr3"),
        &m3,
    );
    for (f, want) in [
        ("written", "by ctr1\n"),
        ("during", "while down\n"),
        ("after", "after restart\n"),
        ("etc/greeting", "hello, lazily\n"),
    ] {
        assert_eq!(
            std::fs::read_to_string(m3.join(f)).expect(f),
            want,
            "{}",
            c.logs()
        );
    }
    umount(&m3);
    // Remove detaches and deletes.
    c.ctr_ok(["snapshots", "--snapshotter", "lsm", "rm", "ctr3"]);
    assert!(api.stat("ctr3").is_err());
}

/// EROFS.
fn libc_erofs() -> i32 {
    30
}

/// Prepares every layer of the converted image through containerd's snapshots API, as
/// containerd's unpack does with the annotations as labels (what `lsmctl pull` and the CRI
/// plugin make it do); returns the chainIDs.
fn prepare_lsm_layers(
    api: &mut SnapshotsApi,
    manifest: &serde_json::Value,
    config: &serde_json::Value,
    image_ref: &str,
) -> Vec<String> {
    let diff_ids: Vec<String> = config["rootfs"]["diff_ids"]
        .as_array()
        .expect("diff_ids")
        .iter()
        .map(|d| d.as_str().expect("str").to_string())
        .collect();
    let chain = chain_ids(&diff_ids);
    for (i, l) in manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .enumerate()
    {
        let mut labels: HashMap<String, String> = l["annotations"]
            .as_object()
            .expect("annotations")
            .iter()
            .filter(|(k, _)| k.starts_with("containerd.io/snapshot/"))
            .filter(|(k, _)| *k != "containerd.io/snapshot/lsm.repository")
            .map(|(k, v)| (k.clone(), v.as_str().expect("str").to_string()))
            .collect();
        labels.insert("containerd.io/snapshot.ref".into(), chain[i].clone());
        labels.insert(
            "containerd.io/snapshot/cri.image-ref".into(),
            image_ref.to_string(),
        );
        let parent = if i == 0 { "" } else { chain[i - 1].as_str() };
        let err = api
            .prepare(&format!("extract-{i} {}", chain[i]), parent, labels)
            .expect_err("an lsm layer is not unpacked");
        assert_eq!(err.code(), tonic::Code::AlreadyExists, "{err:?}");
    }
    chain
}

#[test]
fn ctr_run_starts_a_container_from_a_lazily_served_converted_image() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = lsm_e2e::registry::Registry::start(&t.join("registry"), None);
    let (manifest, config) = converted_image(t, &reg);
    let proxy = lsm_e2e::faultproxy::FaultProxy::start(reg.url.trim_start_matches("http://"));
    let proxy_host = proxy.url.trim_start_matches("http://").to_string();
    let c = Containerd::start_with(t, &[], &["--plain-http", &proxy_host]);
    let mut api = SnapshotsApi::connect(&c);
    prepare_lsm_layers(
        &mut api,
        &manifest,
        &config,
        &format!("{proxy_host}/lsm/app:v1"),
    );

    // The image record: manifest and config only (an OCI archive without the layer blobs),
    // imported without unpacking; its layers are the snapshots prepared above.
    let layout = t.join("meta-only");
    let blobs = layout.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).expect("mkdir");
    let put = |v: &serde_json::Value| {
        let bytes = serde_json::to_vec(v).expect("json");
        let d = {
            use sha2::{Digest, Sha256};
            hex::encode(Sha256::digest(&bytes))
        };
        std::fs::write(blobs.join(&d), &bytes).expect("blob");
        (format!("sha256:{d}"), bytes.len())
    };
    let (cd, cs) = put(&config);
    let mut m = manifest.clone();
    m["config"]["digest"] = cd.into();
    m["config"]["size"] = cs.into();
    let (md, ms) = put(&m);
    std::fs::write(
        layout.join("index.json"),
        serde_json::json!({"schemaVersion": 2, "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": md, "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": "v1"}}]})
        .to_string(),
    )
    .expect("index");
    std::fs::write(
        layout.join("oci-layout"),
        "{\"imageLayoutVersion\":\"1.0.0\"}",
    )
    .expect("layout");
    let tar = t.join("meta-only.tar");
    ok(Command::new("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tar)
        .arg("."));
    c.ctr_ok(
        [
            "images",
            "import",
            "--no-unpack",
            "--base-name",
            "localhost/lsm-app",
        ]
        .map(String::from)
        .into_iter()
        .chain([tar.display().to_string()]),
    );

    let out = c.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        "lsm",
        "localhost/lsm-app:v1",
        "lazy1",
        "/bin/busybox",
        "sh",
        "-c",
        "cat /etc/greeting && echo written > /w && /bin/busybox cat /w",
    ]);
    assert_eq!(out, "hello, lazily\nwritten\n", "{}", c.logs());
    let fetched = proxy.blob_bytes.load(std::sync::atomic::Ordering::Relaxed);
    let layer_bytes: u64 = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    eprintln!("ctr run fetched {fetched} of {layer_bytes} layer blob bytes");
    assert!(
        fetched * 2 < layer_bytes,
        "ctr run fetched {fetched} of {layer_bytes} layer bytes"
    );

    // A container on an lsm disk keeps its filesystem through a containerd kill -9 + restart
    // and then a snapshotter kill -9 + restart, and what it writes in between persists.
    let mut c = c;
    c.ctr_ok([
        "run",
        "-d",
        "--snapshotter",
        "lsm",
        "localhost/lsm-app:v1",
        "keep",
        "/bin/busybox",
        "sleep",
        "600",
    ]);
    let sh = |c: &Containerd, id: &str, script: &str| {
        c.ctr_ok([
            "tasks",
            "exec",
            "--exec-id",
            id,
            "keep",
            "/bin/busybox",
            "sh",
            "-c",
            script,
        ])
    };
    sh(&c, "w1", "echo before > /before && sync");
    c.restart_containerd();
    sh(&c, "w2", "echo after-containerd > /a1 && sync");
    c.snapshotter().kill().expect("kill -9 snapshotter");
    c.wait_snapshotter_exit();
    sh(&c, "w3", "echo snapshotter-down > /a2 && sync");
    c.start_snapshotter(&[]);
    c.ctr_ok_reconnecting(&["snapshots", "--snapshotter", "lsm", "info", "keep"]);
    sh(&c, "w4", "echo after-snapshotter > /a3 && sync");
    let out = sh(
        &c,
        "r",
        "/bin/busybox cat /etc/greeting /before /a1 /a2 /a3",
    );
    assert_eq!(
        out,
        "hello, lazily\nbefore\nafter-containerd\nsnapshotter-down\nafter-snapshotter\n",
        "{}",
        c.logs()
    );
}
