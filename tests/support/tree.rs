//! Comparing file trees and mounting images through loop devices, for the tests that check a
//! filesystem served by lsm against the tree it was made from.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::ok;

/// A loop device over a file, mounted; undone on drop.
pub struct Mounted {
    pub loopdev: String,
    pub dir: PathBuf,
}

impl Mounted {
    /// Attaches `file` to a loop device and mounts it on `dir` (`-o ro` with `read_only`).
    pub fn new(file: &Path, dir: &Path) -> Mounted {
        Mounted::with(file, dir, false)
    }

    /// [`Self::new`], read-only when asked.
    pub fn with(file: &Path, dir: &Path, read_only: bool) -> Mounted {
        std::fs::create_dir_all(dir).expect("mountpoint");
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if read_only {
            cmd.arg("-r");
        }
        let loopdev = ok(cmd.arg(file)).trim().to_string();
        let opt = if read_only { "ro" } else { "rw" };
        ok(Command::new("mount")
            .args(["-o", opt])
            .arg(&loopdev)
            .arg(dir));
        Mounted {
            loopdev,
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
        let _ = Command::new("losetup").args(["-d", &self.loopdev]).status();
    }
}

/// Path → (mode, uid, gid, size, symlink target, hard-link group) for every entry but
/// lost+found.
pub fn metadata(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut by_inode: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("readdir").flatten() {
            let p = e.path();
            let rel = p.strip_prefix(root).expect("prefix").to_path_buf();
            if rel == Path::new("lost+found") {
                continue;
            }
            let m = std::fs::symlink_metadata(&p).expect("lstat");
            let target = std::fs::read_link(&p)
                .map(|t| t.display().to_string())
                .unwrap_or_default();
            let size = if m.is_dir() { 0 } else { m.size() };
            out.insert(
                rel.clone(),
                format!(
                    "{:o} {}:{} {size} {target} rdev={}",
                    m.mode(),
                    m.uid(),
                    m.gid(),
                    m.rdev()
                ),
            );
            if m.is_file() && m.nlink() > 1 {
                by_inode.entry(m.ino()).or_default().push(rel);
            }
            if m.is_dir() {
                stack.push(p);
            }
        }
    }
    for group in by_inode.values() {
        let mut g = group.clone();
        g.sort();
        for p in group {
            if let Some(v) = out.get_mut(p) {
                *v += &format!(" linked={g:?}");
            }
        }
    }
    out
}

/// Every xattr of every entry (symlinks not followed), one block per entry, in path order.
pub fn xattrs(root: &Path) -> Vec<String> {
    let out = ok(Command::new("getfattr")
        .args(["-R", "-h", "-d", "-m", "-", "."])
        .current_dir(root));
    let mut blocks: Vec<String> = out
        .split("\n\n")
        .map(|b| b.trim().to_string())
        .filter(|b| !b.is_empty())
        .collect();
    blocks.sort();
    blocks
}

/// Asserts that the mounted tree `got` equals `want`: contents (`diff -r`, which skips entries
/// named lost+found, fifo, null and dev — special files are left to the metadata check), modes,
/// owners, sizes, symlink targets, device numbers, hard-link groups, and xattrs (of which `want`
/// must hold at least `xattr_key`, when given).
pub fn assert_same_tree(want: &Path, got: &Path, xattr_key: Option<&str>) {
    ok(Command::new("diff")
        .args(["-r", "--no-dereference"])
        .args(["-x", "lost+found", "-x", "fifo", "-x", "null", "-x", "dev"])
        .arg(want)
        .arg(got));
    assert_eq!(metadata(want), metadata(got));
    let x = xattrs(want);
    if let Some(k) = xattr_key {
        assert!(x.iter().any(|b| b.contains(k)), "{x:?}");
    }
    assert_eq!(x, xattrs(got));
}

/// An ext4 image of `tree` (`size_mib`) imported as `dir/base.blob`, with image config
/// `dir/<name>.json` over it (and an upper layer); returns the config.
pub fn image_of_tree(dir: &Path, tree: &Path, size_mib: u64, name: &str) -> PathBuf {
    let raw = dir.join("fs.raw");
    crate::mkfs_ext4(&raw, size_mib, tree);
    ok(crate::lsmctl(["import", "-q"])
        .arg(&raw)
        .arg("-o")
        .arg(dir.join("base.blob")));
    let img = dir.join(format!("{name}.json"));
    ok(crate::lsmctl(["create"])
        .arg(&img)
        .arg("--layer")
        .arg(dir.join("base.blob")));
    img
}
