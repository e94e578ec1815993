//! `lsmctl pull` (containerd's pull-with-unpack done by a client, through containerd's API)
//! against real containerd 1.6 + runc + lsm-snapshotter and a real docker-registry:
//! - a plain OCI image (not converted) pushed with skopeo is pulled by `lsmctl pull`: its layers
//!   are downloaded and unpacked through the lsm snapshotter (Diff.Apply), the image record and
//!   its content carry containerd's labels (containerd sees it unpacked), `ctr run --snapshotter
//!   lsm` runs it, and a second pull downloads nothing.

use std::path::Path;
use std::process::Command;

use lsm_e2e::containerd::{tiny_image, Containerd, NAMESPACE};
use lsm_e2e::registry::Registry;
use lsm_e2e::{lsmctl, ok, run};

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
    committed_snapshot_round_trip(&c, &name);
}

/// Runs a container of `image` that writes `/written`, commits its snapshot as `sealed`, and
/// runs a second container on a snapshot prepared from `sealed` (mounted where `ctr
/// snapshots mounts` says, as its rootfs).
fn committed_snapshot_round_trip(c: &Containerd, image: &str) {
    c.ctr_ok([
        "run",
        "--snapshotter",
        "lsm",
        image,
        "writer",
        "/bin/busybox",
        "sh",
        "-c",
        "echo kept > /written",
    ]);
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
    let out = c.ctr_ok([
        "run",
        "--rm",
        "--rootfs",
        &rootfs.display().to_string(),
        "reader",
        "/bin/busybox",
        "cat",
        "/written",
    ]);
    let _ = Command::new("umount").arg(&rootfs).output();
    assert_eq!(out, "kept\n", "{}", c.logs());
}
