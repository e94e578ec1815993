//! Applying one layer to the previous layer's ext4 filesystem in place, so a layer costs its
//! own bytes, not the image's (issue 17; FORMAT.md §7).
//!
//! How: `unpack::apply_layer` still applies the tar to the host root tree (which resolves
//! symlinked directories, whiteouts and hard links the way it always did) and records here, in
//! order, what it changed: paths removed (walked children first before the host removes them),
//! paths created, directories whose metadata changed, hard links. [`Changes::run`] turns that
//! into one `debugfs -w -f` script over the raw filesystem of the layer below: `rm`/`rmdir`,
//! `mkdir`, `write` (file contents from the host tree), `symlink`, `mknod`, `ln`, then `sif`
//! for mode, owner, link count and the four times, and `ea_set` for every xattr, so the
//! filesystem holds exactly the tree `mkfs.ext4 -d` would have been given. One process per
//! layer, driven by the layer's entries in tar order plus sorted directory walks: the same
//! input gives the same commands and so the same bytes (`E2FSPROGS_FAKE_TIME` fixes the
//! times debugfs would take from the clock).
//!
//! Why debugfs rather than libext2fs through FFI or writing ext4 ourselves: it is the same
//! library `mkfs.ext4 -d` uses (same allocator, same htree and extent code), already a
//! dependency, and needs no `unsafe`; its per-command cost is small next to the bytes.
//!
//! What it cannot say, it does not guess: a name debugfs cannot quote (`"`, `\`, newline,
//! not UTF-8), or a path a layer changes twice (a tar naming one path twice, a hard link to a
//! file the same layer then replaces) makes [`Changes::run`] name the reason, and the
//! caller remakes that layer's filesystem whole with `mkfs.ext4 -d` (the old path).

use std::collections::{BTreeSet, HashSet};
use std::fmt::Write as _;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use super::workdir;

/// One change to the tree, by host path, in the order the layer made it.
enum Op {
    Rm(PathBuf),
    Rmdir(PathBuf),
    Create(PathBuf),
    Meta(PathBuf),
    Link { target: PathBuf, path: PathBuf },
}

/// What one layer changed in the host tree below `root`.
pub struct Changes {
    root: PathBuf,
    ops: Vec<Op>,
    created: HashSet<PathBuf>,
    /// Paths whose times are set at the end (created, changed, or a directory whose entries
    /// changed): sorted, so the script is a function of the set.
    times: BTreeSet<PathBuf>,
    linked: BTreeSet<PathBuf>,
    full_rebuild: Option<String>,
}

impl Changes {
    pub fn new(root: &Path) -> Changes {
        Changes {
            root: root.to_path_buf(),
            ops: Vec::new(),
            created: HashSet::new(),
            times: BTreeSet::new(),
            linked: BTreeSet::new(),
            full_rebuild: None,
        }
    }

    fn rebuild(&mut self, why: String) {
        if self.full_rebuild.is_none() {
            self.full_rebuild = Some(why);
        }
    }

    /// Records that `p` (and everything under it) is about to be removed: call before the host
    /// removes it.
    pub fn removing(&mut self, p: &Path) -> io::Result<()> {
        let Ok(m) = std::fs::symlink_metadata(p) else {
            return Ok(());
        };
        if self.created.contains(p) {
            self.rebuild(format!("{} changes twice in one layer", p.display()));
        }
        if let Some(d) = p.parent() {
            self.times.insert(d.to_path_buf());
        }
        if m.is_dir() {
            let mut kids: Vec<_> = std::fs::read_dir(p)?
                .map(|e| e.map(|e| e.path()))
                .collect::<Result<_, _>>()?;
            kids.sort();
            for k in kids {
                self.removing(&k)?;
            }
            self.ops.push(Op::Rmdir(p.to_path_buf()));
        } else {
            self.ops.push(Op::Rm(p.to_path_buf()));
        }
        self.times.remove(p);
        Ok(())
    }

    /// Records that `p` was created (after the host made it, owners and mode set).
    pub fn created(&mut self, p: &Path) {
        if !self.created.insert(p.to_path_buf()) {
            self.rebuild(format!("{} is created twice in one layer", p.display()));
        }
        self.ops.push(Op::Create(p.to_path_buf()));
        self.times.insert(p.to_path_buf());
        if let Some(d) = p.parent() {
            self.times.insert(d.to_path_buf());
        }
    }

    /// Records that directory `p`, which existed, got new owners, mode or xattrs.
    pub fn changed(&mut self, p: &Path) {
        self.ops.push(Op::Meta(p.to_path_buf()));
        self.times.insert(p.to_path_buf());
    }

    /// Records hard link `p` to `target` (both host paths).
    pub fn linked(&mut self, target: &Path, p: &Path) {
        if !self.created.insert(p.to_path_buf()) {
            self.rebuild(format!("{} is created twice in one layer", p.display()));
        }
        self.ops.push(Op::Link {
            target: target.to_path_buf(),
            path: p.to_path_buf(),
        });
        self.linked.insert(p.to_path_buf());
        if let Some(d) = p.parent() {
            self.times.insert(d.to_path_buf());
        }
    }

    /// `"/rel"` of a host path below the root, quoted for debugfs; `None` if debugfs cannot
    /// say it.
    fn fs_path(&self, p: &Path) -> Option<String> {
        let rel = p.strip_prefix(&self.root).ok()?.to_str()?;
        quotable(rel).then(|| format!("\"/{rel}\""))
    }

    /// The debugfs script for these changes; `Err` names why there is none (rebuild whole).
    fn script(&self, scratch: &Path) -> Result<String, String> {
        if let Some(why) = &self.full_rebuild {
            return Err(why.clone());
        }
        let say = |p: &Path| {
            self.fs_path(p)
                .ok_or_else(|| format!("debugfs cannot name {}", p.display()))
        };
        let mut s = String::new();
        let mut xattr_files = 0usize;
        for op in &self.ops {
            match op {
                Op::Rm(p) => writeln!(s, "rm {}", say(p)?),
                Op::Rmdir(p) => writeln!(s, "rmdir {}", say(p)?),
                Op::Link { target, path } => writeln!(s, "ln {} {}", say(target)?, say(path)?),
                Op::Create(p) => {
                    let m = std::fs::symlink_metadata(p)
                        .map_err(|_| format!("{} changes twice in one layer", p.display()))?;
                    let fs = say(p)?;
                    let ft = m.file_type();
                    let (dir, name) = match (p.parent(), p.file_name().and_then(|n| n.to_str())) {
                        (Some(d), Some(n)) if d != self.root => (say(d)?, n),
                        (_, Some(n)) => ("/".to_string(), n),
                        _ => return Err(format!("debugfs cannot name {}", p.display())),
                    };
                    if ft.is_dir() {
                        writeln!(s, "mkdir {fs}").ok();
                    } else if ft.is_file() {
                        let host = p.to_str().filter(|h| quotable(h)).ok_or_else(|| {
                            format!("debugfs cannot read host file {}", p.display())
                        })?;
                        writeln!(s, "cd {dir}\nwrite \"{host}\" \"{name}\"\ncd /").ok();
                    } else if ft.is_symlink() {
                        let t = std::fs::read_link(p).map_err(|e| e.to_string())?;
                        let t = t
                            .to_str()
                            .filter(|t| quotable(t) && !t.is_empty())
                            .ok_or_else(|| format!("debugfs cannot write link {}", p.display()))?;
                        writeln!(s, "symlink {fs} \"{t}\"").ok();
                    } else if ft.is_fifo() {
                        writeln!(s, "cd {dir}\nmknod \"{name}\" p\ncd /").ok();
                    } else if ft.is_char_device() || ft.is_block_device() {
                        let kind = if ft.is_char_device() { 'c' } else { 'b' };
                        let (ma, mi) = (libc::major(m.rdev()), libc::minor(m.rdev()));
                        writeln!(s, "cd {dir}\nmknod \"{name}\" {kind} {ma} {mi}\ncd /").ok();
                    } else {
                        return Err(format!("{}: unsupported file type", p.display()));
                    }
                    meta(&mut s, &fs, p, &m, scratch, &mut xattr_files)?;
                    Ok(())
                }
                Op::Meta(p) => {
                    let m = std::fs::symlink_metadata(p).map_err(|e| e.to_string())?;
                    meta(&mut s, &say(p)?, p, &m, scratch, &mut xattr_files)?;
                    Ok(())
                }
            }
            .map_err(|e| e.to_string())?;
        }
        for p in &self.linked {
            if let Ok(m) = std::fs::symlink_metadata(p) {
                writeln!(s, "sif {} links_count {}", say(p)?, m.nlink()).ok();
            }
        }
        for p in &self.times {
            if p == &self.root {
                continue; // the root keeps the fixed time mkfs gave it
            }
            let Ok(m) = std::fs::symlink_metadata(p) else {
                continue;
            };
            let fs = say(p)?;
            let t = m.mtime();
            for field in ["mtime", "ctime", "atime"] {
                writeln!(s, "sif {fs} {field} @{t}").ok();
            }
        }
        Ok(s)
    }

    /// Applies the changes to the ext4 image `raw` in place with one debugfs run. `Ok(Err(why))`:
    /// these changes cannot be said to debugfs; make the filesystem whole instead.
    ///
    /// With `track_writes`, debugfs keeps an undo file (`-z`, beside `raw`) and the answer is
    /// the runs of 4 KiB blocks it wrote (`e2undo`); without, `None`. The filesystem is the
    /// same either way (its lifetime-writes counter is kept at 0, see `ext4times`).
    pub fn run(
        &self,
        raw: &Path,
        track_writes: bool,
    ) -> io::Result<Result<Option<super::e2undo::Runs>, String>> {
        let scratch = raw.with_extension("xattrs");
        {
            let _step = workdir::step()?;
            let _ = std::fs::remove_dir_all(&scratch);
            std::fs::create_dir(&scratch)?;
        }
        let script = match self.script(&scratch) {
            Ok(s) => s,
            Err(why) => return Ok(Err(why)),
        };
        let undo = track_writes.then(|| raw.with_extension("undo"));
        if let Some(u) = &undo {
            // debugfs would append to an undo file that is there already.
            let _step = workdir::step()?;
            match std::fs::remove_file(u) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        super::e2fs::run_script_tracked(
            raw,
            &script,
            "apply",
            "debugfs applying a layer",
            undo.as_deref(),
        )
        .map_err(|e| io::Error::other(format!("{e} (is --size too small?)")))?;
        let Some(u) = undo else {
            return Ok(Ok(None));
        };
        let runs = super::e2undo::written_blocks(&std::fs::File::open(&u)?, 4096);
        let _step = workdir::step()?;
        std::fs::remove_file(&u)?;
        Ok(Ok(Some(runs?)))
    }
}

/// Whether debugfs's quoted-argument parser passes `s` through unchanged.
fn quotable(s: &str) -> bool {
    !s.contains(['"', '\n', '\\', '\r'])
}

/// `sif` mode and owners, `ea_set` every xattr (values through files: they may be binary).
fn meta(
    s: &mut String,
    fs: &str,
    p: &Path,
    m: &std::fs::Metadata,
    scratch: &Path,
    n: &mut usize,
) -> Result<(), String> {
    writeln!(
        s,
        "sif {fs} mode 0{:o}\nsif {fs} uid {}\nsif {fs} gid {}",
        m.mode(),
        m.uid(),
        m.gid()
    )
    .ok();
    for (name, value) in xattrs(p).map_err(|e| format!("{}: xattrs: {e}", p.display()))? {
        if !quotable(&name) || name.contains(' ') {
            return Err(format!("debugfs cannot name xattr {name:?}"));
        }
        let vf = scratch.join(format!("{n}"));
        *n += 1;
        std::fs::write(&vf, value).map_err(|e| e.to_string())?;
        let vf = vf
            .to_str()
            .filter(|v| quotable(v))
            .ok_or("scratch path")?
            .to_string();
        writeln!(s, "ea_set -f \"{vf}\" {fs} \"{name}\"").ok();
    }
    Ok(())
}

/// Every xattr of `p` (not following a symlink), sorted by name.
fn xattrs(p: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::other("NUL in a path"))?;
    let mut names = vec![0u8; 64 << 10];
    // SAFETY: a valid NUL-terminated path and a buffer of the given length.
    let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOTSUP) {
            return Ok(Vec::new());
        }
        return Err(e);
    }
    names.truncate(n as usize);
    let mut out = Vec::new();
    for name in names.split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let cn = std::ffi::CString::new(name).map_err(|_| io::Error::other("xattr name"))?;
        let mut v = vec![0u8; 64 << 10];
        // SAFETY: valid NUL-terminated strings and a buffer of the given length.
        let len =
            unsafe { libc::lgetxattr(c.as_ptr(), cn.as_ptr(), v.as_mut_ptr().cast(), v.len()) };
        if len < 0 {
            return Err(io::Error::last_os_error());
        }
        v.truncate(len as usize);
        let name = String::from_utf8(name.to_vec())
            .map_err(|_| io::Error::other("xattr name is not UTF-8"))?;
        out.push((name, v));
    }
    out.sort();
    Ok(out)
}
