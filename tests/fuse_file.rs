//! The FUSE-file frontend on the host's real kernel: an ext4 image served by lsmd appears as a
//! file, `losetup` + `mount` mount it, and the tree compares equal to the tree it was made from —
//! contents (`diff -r`), modes, owners, symlink targets, hard links and xattrs. Then files
//! written through the mount survive `sync`, unmount, a commit and a fresh mount.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use lsm_e2e::nbd::*;
use lsm_e2e::tree::*;
use lsm_e2e::*;

/// A tree with every kind of entry and metadata mkfs.ext4 -d carries over.
fn make_tree(root: &Path) {
    std::fs::create_dir_all(root.join("docs")).expect("mkdir");
    ok(Command::new("cp")
        .args(["-a", "/usr/share/doc/bash"])
        .arg(root.join("docs")));
    std::fs::write(root.join("plain.txt"), "hello\n").expect("write");
    std::fs::write(root.join("big.bin"), vec![7u8; 3 << 20]).expect("write");
    std::os::unix::fs::symlink("plain.txt", root.join("link")).expect("symlink");
    std::os::unix::fs::symlink("/etc/passwd", root.join("abs-link")).expect("symlink");
    std::fs::hard_link(root.join("plain.txt"), root.join("hard.txt")).expect("hard link");
    ok(Command::new("chown")
        .args(["1234:5678"])
        .arg(root.join("plain.txt")));
    ok(Command::new("chmod")
        .args(["4755"])
        .arg(root.join("big.bin")));
    ok(Command::new("mkfifo").arg(root.join("fifo")));
    ok(Command::new("mknod")
        .arg(root.join("null"))
        .args(["c", "1", "3"]));
    ok(Command::new("setfattr")
        .args(["-n", "user.lsm", "-v", "layered"])
        .arg(root.join("plain.txt")));
}

#[test]
fn an_ext4_image_mounted_through_the_fuse_file_equals_its_tree_and_keeps_writes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let tree = t.join("tree");
    make_tree(&tree);
    let img = image_of_tree(t, &tree, 64, "img");

    let files = t.join("files");
    let d = Lsmd::start_fuse(&t.join("lsmd.sock"), img.as_os_str(), &files, &[]);
    {
        let m = Mounted::new(&files.join("img"), &t.join("mnt"));
        assert_same_tree(&tree, &m.dir, Some("user.lsm"));
        // Writes through the mount, made durable by sync.
        std::fs::write(m.dir.join("new.txt"), "written through lsmd\n").expect("write");
        std::fs::remove_file(m.dir.join("big.bin")).expect("rm");
        ok(&mut Command::new("sync"));
    }
    assert!(d.terminate().success());

    // Seal the writes into a layer, serve read-only, mount read-only: they are there.
    ok(lsmctl(["commit"])
        .arg(&img)
        .arg("-o")
        .arg(t.join("c1.blob")));
    let d = Lsmd::start_fuse(
        &t.join("lsmd.sock"),
        img.as_os_str(),
        &files,
        &[OsStr::new("--read-only")],
    );
    {
        let m = Mounted::with(&files.join("img"), &t.join("mnt2"), true);
        assert_eq!(
            std::fs::read_to_string(m.dir.join("new.txt")).expect("read"),
            "written through lsmd\n"
        );
        assert!(!m.dir.join("big.bin").exists());
        assert_eq!(
            std::fs::read_to_string(m.dir.join("link")).expect("read"),
            "hello\n"
        );
    }
    d.terminate();
}

#[test]
fn kernel_setup_check_reports_every_feature() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-setup/check");
    let o = run(Command::new("bash").arg(script).arg("--json"));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("check --json prints JSON");
    for k in ["nbd", "ublk", "loop", "fuse", "ext4", "erofs", "io_uring"] {
        assert!(v[k].is_string(), "{k} missing in {v}");
    }
    // The FUSE-file test above ran, so this host has that path.
    assert!(
        v["attach_paths"]
            .as_array()
            .is_some_and(|a| a.iter().any(|p| p == "fuse-file")),
        "{v}"
    );
    assert!(o.status.success());
}

#[test]
fn lsmctl_attach_list_detach_with_the_fuse_file() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let tree = t.join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("hello.txt"), "attached\n").expect("write");
    let img = image_of_tree(t, &tree, 32, "app");
    let state = t.join("state");
    let files = t.join("files");

    // Detach even if an assertion below fails, so no lsmd or mount outlives the test.
    struct Detach<'a>(&'a Path);
    impl Drop for Detach<'_> {
        fn drop(&mut self) {
            let _ = lsmctl(["detach", "app", "--state-dir"])
                .arg(self.0)
                .output();
        }
    }
    let _detach = Detach(&state);
    let dev = ok(lsmctl(["attach"])
        .arg(&img)
        .arg("--fuse")
        .arg(&files)
        .arg("--state-dir")
        .arg(&state));
    let dev = PathBuf::from(dev.trim());
    assert_eq!(dev, files.join("app"));
    assert_eq!(
        std::fs::metadata(&dev).expect("device file").len(),
        32 << 20
    );
    let list = ok(lsmctl(["list", "--state-dir"]).arg(&state));
    assert!(list.contains("app") && list.contains("running"), "{list}");
    // Attaching it twice is refused.
    let o = run(lsmctl(["attach"])
        .arg(&img)
        .arg("--fuse")
        .arg(&files)
        .arg("--state-dir")
        .arg(&state));
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("already attached"));
    {
        let m = Mounted::new(&dev, &t.join("mnt"));
        assert_eq!(
            std::fs::read_to_string(m.dir.join("hello.txt")).expect("read"),
            "attached\n"
        );
    }
    ok(lsmctl(["detach", "app", "--state-dir"]).arg(&state));
    assert!(!dev.exists(), "the FUSE file outlived detach");
    let list = ok(lsmctl(["list", "--state-dir"]).arg(&state));
    assert!(list.contains("nothing attached"), "{list}");
}
