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
    // Another image onto the same directory is refused too: its FUSE mount would hide the
    // first one's file from everyone using it.
    std::fs::create_dir(t.join("o")).expect("mkdir");
    let other = image_of_tree(&t.join("o"), &tree, 32, "other");
    let o = run(lsmctl(["attach"])
        .arg(&other)
        .arg("--fuse")
        .arg(&files)
        .arg("--state-dir")
        .arg(&state));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("is a mount point already"),
        "{err}"
    );
    assert!(dev.exists(), "the first attachment's FUSE file is hidden");
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

/// The kernel's readahead of block device `dev` (KiB).
fn read_ahead_kb(dev: &str) -> u32 {
    let name = dev.trim_start_matches("/dev/");
    std::fs::read_to_string(format!("/sys/block/{name}/queue/read_ahead_kb"))
        .expect("read_ahead_kb")
        .trim()
        .parse()
        .expect("a number")
}

/// `attach --fuse --loop` makes the loop device too, with lsm's readahead (128 KiB, not the
/// 2560 KiB the kernel gives a loop device: every page read ahead is a fetched chunk) or the
/// one asked for; `detach` refuses while the loop device is mounted and then detaches it.
#[test]
fn lsmctl_attach_loop_sets_the_readahead_and_detach_removes_the_loop() {
    let tmp = tempfile::tempdir().expect("tmp");
    let t = tmp.path();
    let tree = t.join("tree");
    std::fs::create_dir_all(&tree).expect("mkdir");
    std::fs::write(tree.join("hello.txt"), "looped\n").expect("write");
    let img = image_of_tree(t, &tree, 32, "app");
    let state = t.join("state");
    let files = t.join("files");
    let mnt = t.join("mnt");
    std::fs::create_dir_all(&mnt).expect("mkdir");

    struct Undo<'a>(&'a Path, &'a Path);
    impl Drop for Undo<'_> {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(self.1).status();
            for name in ["app", "wide"] {
                let _ = lsmctl(["detach", name, "--state-dir"]).arg(self.0).output();
            }
        }
    }
    let _undo = Undo(&state, &mnt);
    let attach = |name: &str, extra: &[&str]| {
        ok(lsmctl(["attach"])
            .arg(&img)
            .args(["--name", name, "--read-only", "--loop", "--fuse"])
            .arg(files.join(name))
            .args(extra)
            .arg("--state-dir")
            .arg(&state))
        .trim()
        .to_string()
    };
    let dev = attach("app", &[]);
    assert!(dev.starts_with("/dev/loop"), "{dev}");
    assert_eq!(read_ahead_kb(&dev), 128);
    let name = dev.trim_start_matches("/dev/");
    let backing = std::fs::read_to_string(format!("/sys/block/{name}/loop/backing_file"))
        .expect("a loop device");
    assert_eq!(backing.trim(), files.join("app/app").to_string_lossy());
    let wide = attach("wide", &["--read-ahead-kb", "512"]);
    assert_eq!(read_ahead_kb(&wide), 512);
    let list = ok(lsmctl(["list", "--state-dir"]).arg(&state));
    assert!(list.contains(&dev) && list.contains(&wide), "{list}");

    ok(Command::new("mount").args(["-o", "ro"]).arg(&dev).arg(&mnt));
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).expect("read"),
        "looped\n"
    );
    // Mounted: detach refuses and leaves the lsmd serving.
    let o = run(lsmctl(["detach", &dev, "--state-dir"]).arg(&state));
    assert!(
        !o.status.success() && String::from_utf8_lossy(&o.stderr).contains("still in use"),
        "{o:?}"
    );
    assert_eq!(
        std::fs::read_to_string(mnt.join("hello.txt")).expect("read"),
        "looped\n"
    );
    ok(Command::new("umount").arg(&mnt));
    ok(lsmctl(["detach", "app", "--state-dir"]).arg(&state));
    ok(lsmctl(["detach", "wide", "--state-dir"]).arg(&state));
    for d in [&dev, &wide] {
        let n = d.trim_start_matches("/dev/");
        let b = std::fs::read_to_string(format!("/sys/block/{n}/loop/backing_file"));
        assert!(
            b.map(|b| !b.contains(&*files.to_string_lossy()))
                .unwrap_or(true),
            "{d} outlived detach"
        );
    }
    assert!(
        !files.join("app/app").exists(),
        "the FUSE file outlived detach"
    );
}
