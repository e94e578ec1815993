//! `lsm-snapshotter` as containerd's proxy snapshotter, against real containerd 1.6 + runc
//! started by each test in its own directories (see `support/containerd.rs`):
//! - a plain OCI image (two layers, built here with umoci) is imported and unpacked through the
//!   snapshotter and `ctr run --snapshotter lsm` runs a command in it that reads both layers and
//!   writes into its container layer;
//! - a crash in the middle of `Prepare` (the snapshot's directory is in place, its record not
//!   yet committed) leaves nothing half made after a restart: the key is free, the directory
//!   is gone, and the key can be prepared again;
//! - `kill -9` of the snapshotter while a container runs: the container keeps its filesystem,
//!   its later writes land, and the restarted snapshotter answers for its snapshot.

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
