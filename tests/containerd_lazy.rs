//! `lsmctl pull` (containerd's pull-with-unpack done by a client, through containerd's API)
//! against real containerd 1.6 + runc + lsm-snapshotter and a real docker-registry:
//! - a plain OCI image (not converted) pushed with skopeo is pulled by `lsmctl pull`: its layers
//!   are downloaded and unpacked through the lsm snapshotter (Diff.Apply), the image record and
//!   its content carry containerd's labels (containerd sees it unpacked), `ctr run --snapshotter
//!   lsm` runs it, and a second pull downloads nothing;
//! - the same through CRI `PullImage` (containerd's CRI plugin, snapshotter `lsm`, layer
//!   annotations forwarded) from a `k8s-cri` client;
//! - a container's writes committed as a snapshot are seen by a second container on it;
//! - lazily: real Debian python3 images (built from Debian packages, cached outside the
//!   clone) converted by `lsmctl convert` and pushed to the registry are pulled by `lsmctl
//!   pull` and by CRI `PullImage` with the registry serving the manifest and config but no
//!   layer bytes, then `ctr run --snapshotter lsm … python3 -c 'import json, sqlite3'` runs
//!   with the registry having served < 5 % of the layer bytes (its access log counts them), and
//!   the commit round trip works on that image too.

use std::path::Path;
use std::process::Command;

use lsm_e2e::containerd::{tiny_image, Containerd, NAMESPACE};
use lsm_e2e::registry::Registry;
use lsm_e2e::{debian_images, lsmctl, ok, run};

/// Pushes the OCI layout `layout` (tag `tag`) to `reg` as `repo:tag` with skopeo.
fn push_layout(reg: &Registry, layout: &Path, tag: &str, repo: &str) -> String {
    let host = reg.url.trim_start_matches("http://");
    let name = format!("{host}/{repo}:{tag}");
    ok(Command::new("skopeo")
        .args(["copy", "-q", "--insecure-policy", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:{tag}", layout.display()))
        .arg(format!("docker://{name}")));
    name
}

/// `lsmctl pull` against `c`; returns stderr (its progress lines).
fn lsmctl_pull(c: &Containerd, name: &str) -> String {
    let mut cmd = lsmctl([
        "pull",
        "--plain-http",
        "--namespace",
        NAMESPACE,
        "--address",
    ]);
    cmd.arg(&c.address).arg(name);
    let o = run(&mut cmd);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        o.status.success(),
        "lsmctl pull {name} failed:\n{err}\n{}",
        c.logs()
    );
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), name);
    err
}

#[test]
fn plain_oci_image_pulled_by_lsmctl_runs_with_lsm_snapshotter() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    tiny_image(t, "pulled through the API\n");
    let name = push_layout(&reg, &t.join("oci"), "tiny", "plain/tiny");
    let c = Containerd::start(t);

    let err = lsmctl_pull(&c, &name);
    assert_eq!(
        err.matches("bytes, unpacked").count(),
        2,
        "both layers are downloaded and unpacked:\n{err}"
    );
    // containerd knows the image, and sees it unpacked for lsm (gc label on the config): it
    // does not unpack again on `run`.
    let images = c.ctr_ok(["images", "ls", "-q"]);
    assert!(images.lines().any(|l| l == name), "{images}");
    let check = c.ctr_ok(["images", "check"]);
    assert!(check.contains("complete"), "{check}");
    let out = c.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        "lsm",
        &name,
        "c1",
        "/bin/busybox",
        "cat",
        "/etc/greeting",
    ]);
    assert_eq!(out, "pulled through the API\n", "{}", c.logs());

    // Pulling again finds every layer unpacked: nothing downloaded.
    let err = lsmctl_pull(&c, &name);
    assert!(err.contains("(0 bytes downloaded)"), "{err}");
    assert_eq!(err.matches("already unpacked").count(), 2, "{err}");
}

#[test]
fn cri_pull_image_of_plain_oci_image_unpacks_into_lsm() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    tiny_image(t, "pulled by CRI\n");
    let name = push_layout(&reg, &t.join("oci"), "tiny", "plain/cri");
    let c = Containerd::start_cri(t, reg.url.trim_start_matches("http://"));

    let id =
        lsm_e2e::cri::pull_image(&c.address, &name).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert!(id.starts_with("sha256:"), "{id}");
    // CRI pulled into its namespace, unpacked through lsm.
    let images = c.ctr_in("k8s.io", &["images", "ls", "-q"]);
    assert!(images.lines().any(|l| l == name), "{images}");
    let snaps = c.ctr_in("k8s.io", &["snapshots", "--snapshotter", "lsm", "ls"]);
    assert_eq!(snaps.lines().count(), 3, "two committed layers:\n{snaps}");
    let out = c.ctr_in(
        "k8s.io",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lsm",
            &name,
            "c1",
            "/bin/busybox",
            "cat",
            "/etc/greeting",
        ],
    );
    assert_eq!(out, "pulled by CRI\n");
}

/// A container's writes, committed as a snapshot (what `nerdctl commit` does first), are seen
/// by a second container started on that snapshot.
#[test]
fn committed_container_snapshot_carries_its_writes_to_a_second_container() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    tiny_image(t, "base\n");
    let name = push_layout(&reg, &t.join("oci"), "tiny", "plain/commit");
    let c = Containerd::start(t);
    lsmctl_pull(&c, &name);
    committed_snapshot_round_trip(&c, &name, &["/bin/busybox", "sh"], &["/bin/busybox", "cat"]);
}

/// Runs a container of `image` that writes `/written`, commits its snapshot as `sealed`, and
/// runs a second container on a snapshot prepared from `sealed` (mounted where `ctr
/// snapshots mounts` says, as its rootfs).
/// `sh` and `cat` are the commands for a shell and cat, by absolute path (a container on a
/// bare rootfs has no image config, so no `PATH`).
fn committed_snapshot_round_trip(c: &Containerd, image: &str, sh: &[&str], cat: &[&str]) {
    let mut writer = vec!["run", "--snapshotter", "lsm", image, "writer"];
    writer.extend(sh);
    writer.extend(["-c", "echo kept > /written"]);
    c.ctr_ok(writer);
    // The container's active snapshot is named after it.
    c.ctr_ok([
        "snapshots",
        "--snapshotter",
        "lsm",
        "commit",
        "sealed",
        "writer",
    ]);
    c.ctr_ok(["containers", "delete", "writer"]);
    let info = c.ctr_ok(["snapshots", "--snapshotter", "lsm", "info", "sealed"]);
    assert!(info.contains("\"Kind\": \"Committed\""), "{info}");
    c.ctr_ok([
        "snapshots",
        "--snapshotter",
        "lsm",
        "prepare",
        "second",
        "sealed",
    ]);
    let rootfs = c.dir.join("second-rootfs");
    std::fs::create_dir_all(&rootfs).expect("mkdir");
    let mount = c.ctr_ok([
        "snapshots",
        "--snapshotter",
        "lsm",
        "mounts",
        &rootfs.display().to_string(),
        "second",
    ]);
    ok(Command::new("sh").arg("-c").arg(mount.trim()));
    let rootfs_arg = rootfs.display().to_string();
    let mut reader = vec!["run", "--rm", "--rootfs", &rootfs_arg, "reader"];
    reader.extend(cat);
    reader.push("/written");
    let out = c.ctr_ok(reader);
    let _ = Command::new("umount").arg(&rootfs).output();
    assert_eq!(out, "kept\n", "{}", c.logs());
}

/// The Debian python3 image pushed to `reg` as `debian/py:1` and converted by `lsmctl
/// convert` to `lsm/py:1` there; returns the converted image's name and its layer digests and
/// total layer bytes (from its manifest).
fn converted_debian_python(reg: &Registry, t: &Path) -> (String, Vec<String>, u64) {
    converted_debian_python_as(reg, t, "lsm/py", &[])
}

/// As [`converted_debian_python`], converted with `more` options (e.g. `--fs erofs`) to
/// `repo:1`.
fn converted_debian_python_as(
    reg: &Registry,
    t: &Path,
    repo: &str,
    more: &[&str],
) -> (String, Vec<String>, u64) {
    let oci = debian_images("debian-v1");
    let src = format!("http://{}", push_layout(reg, &oci, "py", "debian/py"));
    let dst = format!("{}/{repo}:1", reg.url);
    let mut cmd = lsmctl([
        "convert",
        "--insecure",
        "--quiet",
        "--size",
        "1G",
        "--chunk-size",
        "32K",
        "--db",
    ]);
    cmd.arg(t.join("convert-db")).args(more).args([&src, &dst]);
    ok(&mut cmd);
    let host = reg.url.trim_start_matches("http://");
    let manifest: serde_json::Value = reg
        .agent()
        .get(&format!("{}/v2/{repo}/manifests/1", reg.url))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .call()
        .expect("manifest")
        .into_string()
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .expect("manifest JSON");
    let layers: Vec<&serde_json::Value> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .collect();
    assert!(
        layers
            .iter()
            .all(|l| l["annotations"]["containerd.io/snapshot/lsm.role"].is_string()),
        "every layer of a converted image is an lsm blob: {manifest}"
    );
    let digests = layers
        .iter()
        .map(|l| l["digest"].as_str().expect("digest").to_string())
        .collect();
    let total = layers
        .iter()
        .map(|l| l["size"].as_u64().expect("size"))
        .sum();
    (format!("{host}/{repo}:1"), digests, total)
}

/// Most of the layer bytes a lazy start may fetch, percent: issue 15's < 5 %. The python3 start
/// fetches 4.80 % (README "What a lazy start fetches": 0.31 % is the layers' metadata, read at
/// open in one exact request each; the rest is the pages python and its libraries fault in,
/// each costing its whole 32 KiB chunk, widened by 128 KiB of readahead).
const LAZY_BOUND_PERCENT: u64 = 5;

/// With `LSM_TEST_KEEP_LSMD_LOGS=DIR`, copies the snapshots' lsmd logs there (they go with the
/// test's temporary directory otherwise): with `LSM_TEST_RUST_LOG=info,lsm::fetch=debug` they
/// list every fetch of the start, for the README's byte analysis.
fn keep_lsmd_logs(c: &Containerd) {
    let Some(keep) = std::env::var_os("LSM_TEST_KEEP_LSMD_LOGS") else {
        return;
    };
    let keep = Path::new(&keep);
    std::fs::create_dir_all(keep).expect("mkdir");
    for e in std::fs::read_dir(c.snap_root.join("attach"))
        .expect("attach dir")
        .flatten()
    {
        if e.file_name().to_string_lossy().ends_with(".log") {
            std::fs::copy(e.path(), keep.join(e.file_name())).expect("copy log");
        }
    }
}

/// Bytes of `digests` the registry served so far.
fn layer_bytes_served(reg: &Registry, digests: &[String]) -> u64 {
    digests.iter().map(|d| reg.served_of_blob(d)).sum()
}

/// `python3 -c 'import json, sqlite3; print("ok")'` in a container of `image`.
const PYTHON: [&str; 3] = [
    "/usr/bin/python3",
    "-c",
    "import json, sqlite3; print('ok')",
];

#[test]
fn converted_debian_python_pulls_lazily_with_lsmctl_and_runs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let (name, digests, total) = converted_debian_python(&reg, t);
    let c = Containerd::start_plain_http(t, reg.url.trim_start_matches("http://"));
    let before = layer_bytes_served(&reg, &digests);

    let err = lsmctl_pull(&c, &name);
    assert_eq!(
        err.matches("served lazily").count(),
        digests.len(),
        "every lsm layer is the snapshotter's:\n{err}"
    );
    assert!(err.contains("(0 bytes downloaded)"), "{err}");
    assert_eq!(
        layer_bytes_served(&reg, &digests),
        before,
        "the pull itself fetched no layer bytes"
    );

    let out = c.ctr_ok(
        ["run", "--rm", "--snapshotter", "lsm", &name, "py1"]
            .into_iter()
            .chain(PYTHON),
    );
    assert_eq!(out, "ok\n", "{}", c.logs());
    let served = layer_bytes_served(&reg, &digests) - before;
    keep_lsmd_logs(&c);
    eprintln!(
        "lazy run: registry served {served} of {total} layer bytes ({:.2} %)",
        100.0 * served as f64 / total as f64
    );
    assert!(
        served * 100 < total * LAZY_BOUND_PERCENT,
        "served {served} of {total} layer bytes: not lazy"
    );

    committed_snapshot_round_trip(&c, &name, &["/bin/sh"], &["/bin/cat"]);
}

/// An erofs image (`lsmctl convert --fs erofs`): read-only filesystem, so the container's
/// rootfs is an overlay whose upper directory takes its writes above the erofs mount; it runs
/// lazily, and a committed container's writes reach a second container (an overlay diff above
/// the disk).
#[test]
fn converted_erofs_image_runs_writable_and_commits() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let (name, digests, total) =
        converted_debian_python_as(&reg, t, "lsm/py-erofs", &["--fs", "erofs"]);
    let c = Containerd::start_plain_http(t, reg.url.trim_start_matches("http://"));
    let before = layer_bytes_served(&reg, &digests);
    let err = lsmctl_pull(&c, &name);
    assert!(err.contains("(0 bytes downloaded)"), "{err}");

    // The image's own files, and a write beside them, in one container.
    let out = c.ctr_ok([
        "run",
        "--rm",
        "--snapshotter",
        "lsm",
        &name,
        "e1",
        "/bin/sh",
        "-c",
        "echo w > /tmp/x && cat /tmp/x && /usr/bin/python3 -c 'import json, sqlite3; print(\"ok\")'",
    ]);
    assert_eq!(out, "w\nok\n", "{}", c.logs());
    let served = layer_bytes_served(&reg, &digests) - before;
    eprintln!(
        "erofs lazy run: registry served {served} of {total} layer bytes ({:.2} %)",
        100.0 * served as f64 / total as f64
    );
    assert!(
        served * 100 < total * 20,
        "served {served} of {total} layer bytes: not lazy"
    );
    committed_snapshot_round_trip(&c, &name, &["/bin/sh"], &["/bin/cat"]);
}

#[test]
fn converted_debian_python_pulls_lazily_through_cri() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let (name, digests, total) = converted_debian_python(&reg, t);
    let c = Containerd::start_cri(t, reg.url.trim_start_matches("http://"));
    let before = layer_bytes_served(&reg, &digests);

    lsm_e2e::cri::pull_image(&c.address, &name).unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
    assert_eq!(
        layer_bytes_served(&reg, &digests),
        before,
        "CRI's pull fetched no layer bytes\n{}",
        c.logs()
    );
    let out = c.ctr_in(
        "k8s.io",
        &[
            "run",
            "--rm",
            "--snapshotter",
            "lsm",
            &name,
            "py1",
            PYTHON[0],
            PYTHON[1],
            PYTHON[2],
        ],
    );
    assert_eq!(out, "ok\n", "{}", c.logs());
    let served = layer_bytes_served(&reg, &digests) - before;
    eprintln!(
        "lazy run (CRI): registry served {served} of {total} layer bytes ({:.2} %)",
        100.0 * served as f64 / total as f64
    );
    assert!(
        served * 100 < total * LAZY_BOUND_PERCENT,
        "served {served} of {total} layer bytes: not lazy"
    );
}

/// The lsmd image config of the converted image `repo:tag` in `reg` (its `layer` blobs, from
/// the registry), as `lsmctl trace bake` takes it.
fn remote_config(reg: &Registry, repo: &str, tag: &str, path: &Path) {
    let manifest: serde_json::Value = reg
        .agent()
        .get(&format!("{}/v2/{repo}/manifests/{tag}", reg.url))
        .set("Accept", "application/vnd.oci.image.manifest.v1+json")
        .call()
        .expect("manifest")
        .into_string()
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok())
        .expect("manifest JSON");
    let label = |l: &serde_json::Value, k: &str| {
        l["annotations"][format!("containerd.io/snapshot/lsm.{k}")].clone()
    };
    let layers: Vec<&serde_json::Value> = manifest["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .filter(|l| label(l, "role") == "layer")
        .collect();
    let size: u64 = label(layers[0], "disk-size")
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("disk size");
    let entries: Vec<serde_json::Value> = layers
        .iter()
        .map(|l| {
            serde_json::json!({
                "source": { "registry": { "url": reg.url, "repository": repo,
                    "size": l["size"], "insecure": true } },
                "digest": l["digest"],
                "meta_digest": label(l, "meta-digest"),
            })
        })
        .collect();
    let config = serde_json::json!({ "size": size, "layers": entries });
    std::fs::write(path, serde_json::to_vec_pretty(&config).expect("json")).expect("config");
}

/// The snapshots' lsmd logs, joined.
fn lsmd_logs(c: &Containerd) -> String {
    let mut out = String::new();
    for e in std::fs::read_dir(c.snap_root.join("attach"))
        .expect("attach dir")
        .flatten()
    {
        if e.file_name().to_string_lossy().ends_with(".log") {
            out += &std::fs::read_to_string(e.path()).unwrap_or_default();
        }
    }
    out
}

/// A trace baked into the image (`lsmctl trace bake --image-ref`: a manifest layer with role
/// `trace`, and its startup layer, role `startup`) is recorded by the snapshotter at pull and handed to the lsmd of the container's
/// snapshot, which checks its digest and prefetches by it; the same trace blob tampered with
/// in the registry is refused by the next container's lsmd, which serves lazily and says so.
#[test]
fn shipped_trace_is_used_through_containerd_and_a_tampered_one_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let reg = Registry::start(&t.join("registry"), None);
    let (name, _, _) = converted_debian_python(&reg, t);
    let remote = t.join("lsm-remote.json");
    remote_config(&reg, "lsm/py", "1", &remote);
    let out = ok(lsmctl([
        "trace",
        "bake",
        "--image-ref",
        &format!("{}/lsm/py:1", reg.url),
    ])
    .arg(&remote)
    .args(["--", "/usr/bin/python3 -c 'import json, sqlite3'"]));
    assert!(out.contains("trace sha256:"), "{out}");
    let c = Containerd::start_plain_http(t, reg.url.trim_start_matches("http://"));
    let err = lsmctl_pull(&c, &name);
    assert!(err.contains("(0 bytes downloaded)"), "{err}");

    let out = c.ctr_ok(
        ["run", "--rm", "--snapshotter", "lsm", &name, "py1"]
            .into_iter()
            .chain(PYTHON),
    );
    assert_eq!(out, "ok\n", "{}", c.logs());
    let logs = lsmd_logs(&c);
    assert!(
        logs.contains("replaying the startup trace shipped in the image (digest checked)"),
        "{logs}"
    );
    // Its startup layer (FORMAT.md §9) too: the snapshotter names it in the disk's config,
    // and lsmd stacks it under the container's upper layer.
    assert!(logs.contains("stacking the startup layer"), "{logs}");

    // Tamper with the trace blob where the registry keeps it.
    let conf: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&remote).expect("config")).expect("json");
    let digest = conf["trace"]["digest"].as_str().expect("trace digest");
    let hex = digest.trim_start_matches("sha256:");
    let data = t.join(format!(
        "registry/data/docker/registry/v2/blobs/sha256/{}/{hex}/data",
        &hex[..2]
    ));
    let mut bytes = std::fs::read(&data).expect("trace blob");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&data, bytes).expect("tamper");
    let out = c.ctr_ok(
        ["run", "--rm", "--snapshotter", "lsm", &name, "py2"]
            .into_iter()
            .chain(PYTHON),
    );
    assert_eq!(out, "ok\n", "lazily served without the trace\n{}", c.logs());
    let logs = lsmd_logs(&c);
    assert!(
        logs.contains("refusing the startup trace shipped in the image; serving lazily"),
        "{logs}"
    );
}
