//! Applying an OCI layer tar onto a root directory: whiteouts (`.wh.NAME` deletes NAME,
//! `.wh..wh..opq` hides everything the lower layers put in its directory) first, then every
//! other entry — regular files, directories, symlinks, hard links, device nodes and fifos, with
//! owners, modes, mtimes and xattrs. Paths are resolved *inside* the root, following symlinks
//! the way a chroot would: nothing is ever read, written or deleted outside it, and an entry
//! whose own path climbs out with `..` is refused, and so is a whiteout naming `.` or `..`
//! (`.wh..`, `.wh...`), which would delete the directory holding it or the one above.
//!
//! Every change to the tree happens inside a [`workdir::step`], so that an interrupting signal
//! removes the tree between entries, never under one.

use std::ffi::{CString, OsStr};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use tar::{Archive, EntryType};

use super::ext4apply::Changes;
use super::workdir;

/// The path of a tar entry as components inside the root; `..` or an empty path is an error.
pub fn clean(p: &Path) -> io::Result<Vec<std::ffi::OsString>> {
    let mut out = Vec::new();
    for c in p.components() {
        match c {
            Component::Normal(s) => out.push(s.to_os_string()),
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("entry path {} climbs out of the root", p.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// Resolves the directory `parts` inside `root`, following symlinks in every component as a
/// chroot would (absolute targets restart at `root`, `..` stops at it); returns the real path
/// on the host, which is always below `root`.
pub fn resolve(root: &Path, parts: &[std::ffi::OsString]) -> io::Result<PathBuf> {
    let mut stack: Vec<std::ffi::OsString> = Vec::new();
    let mut todo: Vec<std::ffi::OsString> = parts.iter().rev().cloned().collect();
    let mut seen_links = 0;
    while let Some(c) = todo.pop() {
        if c == OsStr::new("..") {
            stack.pop();
            continue;
        }
        if c == OsStr::new(".") || c.is_empty() {
            continue;
        }
        let here: PathBuf = std::iter::once(root.as_os_str())
            .chain(stack.iter().map(|s| s.as_os_str()))
            .chain(std::iter::once(c.as_os_str()))
            .collect();
        match std::fs::symlink_metadata(&here) {
            Ok(m) if m.file_type().is_symlink() => {
                seen_links += 1;
                if seen_links > 40 {
                    return Err(io::Error::other(format!(
                        "too many symlinks resolving {}",
                        here.display()
                    )));
                }
                let target = std::fs::read_link(&here)?;
                if target.is_absolute() {
                    stack.clear();
                }
                for t in target.components().rev() {
                    match t {
                        Component::Normal(s) => todo.push(s.to_os_string()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => stack.push(c),
        }
    }
    Ok(std::iter::once(root.as_os_str())
        .chain(stack.iter().map(|s| s.as_os_str()))
        .collect())
}

fn remove_all(p: &Path) -> io::Result<()> {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => std::fs::remove_dir_all(p),
        Ok(_) => std::fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::other("NUL in a path"))
}

fn check(r: libc::c_int, what: &str, p: &Path) -> io::Result<()> {
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(
            e.kind(),
            format!("{what} {}: {e}", p.display()),
        ));
    }
    Ok(())
}

/// Where entry `parts` lives: its directory resolved inside `root`, then its own name (never
/// followed, so a symlink entry is itself replaced or removed).
fn entry_path(root: &Path, parts: &[std::ffi::OsString]) -> io::Result<PathBuf> {
    let (name, dir) = parts
        .split_last()
        .ok_or_else(|| io::Error::other("empty entry path"))?;
    Ok(resolve(root, dir)?.join(name))
}

/// Directories whose contents a layer changes without naming them keep their modification time
/// (as the layer did not change them): remembered before the first change, put back at the end.
#[derive(Default)]
struct KeptTimes(std::collections::HashMap<PathBuf, u64>);

impl KeptTimes {
    fn touch(&mut self, dir: &Path) {
        if !self.0.contains_key(dir) {
            if let Ok(m) = std::fs::symlink_metadata(dir) {
                let t = std::os::unix::fs::MetadataExt::mtime(&m) as u64;
                self.0.insert(dir.to_path_buf(), t);
            }
        }
    }
}

/// Creates the missing directories of `dir` (below `root`, resolved), recording each in
/// `changes` and `implicit` (a layer that names no such directory gives it no time: it gets
/// [`IMPLICIT_DIR_MTIME`], not the clock's, so conversions stay reproducible).
fn make_dirs(
    root: &Path,
    dir: &Path,
    changes: &mut Changes,
    implicit: &mut Vec<PathBuf>,
) -> io::Result<()> {
    if dir == root || dir.is_dir() {
        return Ok(());
    }
    if let Some(up) = dir.parent() {
        make_dirs(root, up, changes, implicit)?;
    }
    std::fs::create_dir(dir)?;
    changes.created(dir);
    implicit.push(dir.to_path_buf());
    Ok(())
}

/// Modification time of a directory a layer creates without naming it (a parent its tar
/// lacks): fixed, as the filesystem root's is.
const IMPLICIT_DIR_MTIME: u64 = 1;

/// The error for a whiteout of `hidden` that would climb out of its directory (`.wh.`,
/// `.wh..`, `.wh...`), if it is one.
fn climbing_whiteout(entry: &Path, hidden: &str) -> io::Result<()> {
    if matches!(hidden, "" | "." | "..") {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "entry path {}: a whiteout of {hidden:?} climbs out of its directory",
                entry.display()
            ),
        ));
    }
    Ok(())
}

/// Applies one layer, read twice through `open` (whiteouts, then contents), onto `root`,
/// recording in `changes` what it changed (to replay on the layer's filesystem). With
/// `empty_root` (the bottom layer: nothing below for a whiteout to hide) it is read once, as
/// a stream: the whiteout pass would change nothing, so only its checks are kept.
pub fn apply_layer(
    root: &Path,
    changes: &mut Changes,
    empty_root: bool,
    mut open: impl FnMut() -> io::Result<Box<dyn Read>>,
) -> io::Result<()> {
    let mut kept = KeptTimes::default();
    if !empty_root {
        hide_whiteouts(root, changes, &mut kept, open()?)?;
    }
    apply_contents(root, changes, kept, empty_root, open()?)
}

/// Pass 1: whiteouts hide what lower layers put there.
fn hide_whiteouts(
    root: &Path,
    changes: &mut Changes,
    kept: &mut KeptTimes,
    tar: Box<dyn Read>,
) -> io::Result<()> {
    let mut a = Archive::new(tar);
    for e in a.entries()? {
        let e = e?;
        let parts = clean(&e.path()?)?;
        let Some(name) = parts.last().and_then(|n| n.to_str()) else {
            continue;
        };
        let _step = workdir::step()?;
        if name == ".wh..wh..opq" {
            let dir = resolve(root, &parts[..parts.len() - 1])?;
            if dir.is_dir() {
                kept.touch(&dir);
                let mut kids: Vec<PathBuf> = std::fs::read_dir(&dir)?
                    .map(|c| c.map(|c| c.path()))
                    .collect::<Result<_, _>>()?;
                kids.sort();
                for c in kids {
                    changes.removing(&c)?;
                    remove_all(&c)?;
                }
            }
        } else if let Some(hidden) = name.strip_prefix(".wh.") {
            climbing_whiteout(&e.path()?, hidden)?;
            let mut p = parts[..parts.len() - 1].to_vec();
            p.push(hidden.into());
            let victim = entry_path(root, &p)?;
            if let Some(d) = victim.parent() {
                kept.touch(d);
            }
            changes.removing(&victim)?;
            remove_all(&victim)?;
        }
    }
    Ok(())
}

/// Pass 2: everything but whiteouts (checked here when pass 1 was skipped: `checks`).
fn apply_contents(
    root: &Path,
    changes: &mut Changes,
    mut kept: KeptTimes,
    checks: bool,
    tar: Box<dyn Read>,
) -> io::Result<()> {
    let mut dirs: Vec<(PathBuf, tar::Header)> = Vec::new();
    let mut implicit: Vec<PathBuf> = Vec::new();
    let mut a = Archive::new(tar);
    for e in a.entries()? {
        let mut e = e?;
        let parts = clean(&e.path()?)?;
        let Some(name) = parts.last() else { continue }; // the root itself
        if let Some(hidden) = name.to_str().and_then(|n| n.strip_prefix(".wh.")) {
            if checks {
                climbing_whiteout(&e.path()?, hidden)?;
            }
            continue;
        }
        let _step = workdir::step()?;
        let parent = resolve(root, &parts[..parts.len() - 1])?;
        make_dirs(root, &parent, changes, &mut implicit)?;
        kept.touch(&parent);
        let dst = parent.join(name);
        let kind = e.header().entry_type();
        let existing = std::fs::symlink_metadata(&dst).ok();
        if let Some(m) = &existing {
            if !(kind == EntryType::Directory && m.is_dir()) {
                changes.removing(&dst)?;
                remove_all(&dst)?;
            }
        }
        let mode = e.header().mode()? & 0o7777;
        match kind {
            EntryType::Regular | EntryType::Continuous => {
                let mut f = std::fs::File::create(&dst)?;
                io::copy(&mut e, &mut f)?;
            }
            EntryType::Directory => {
                if existing.as_ref().is_none_or(|m| !m.is_dir()) {
                    std::fs::create_dir(&dst)?;
                }
            }
            EntryType::Symlink => {
                let target = e
                    .link_name()?
                    .ok_or_else(|| io::Error::other("symlink without a target"))?;
                std::os::unix::fs::symlink(&*target, &dst)?;
            }
            EntryType::Link => {
                let target = e
                    .link_name()?
                    .ok_or_else(|| io::Error::other("hard link without a target"))?;
                let tpath = entry_path(root, &clean(&target)?)?;
                std::fs::hard_link(&tpath, &dst)?;
                changes.linked(&tpath, &dst);
                continue; // a hard link shares its target's metadata
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let fmt = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let dev = libc::makedev(
                    e.header().device_major()?.unwrap_or(0),
                    e.header().device_minor()?.unwrap_or(0),
                );
                let c = cstr(&dst)?;
                // SAFETY: a valid NUL-terminated path; mknod only creates the node.
                check(
                    unsafe { libc::mknod(c.as_ptr(), fmt | mode, dev) },
                    "mknod",
                    &dst,
                )?;
            }
            EntryType::XGlobalHeader
            | EntryType::XHeader
            | EntryType::GNULongName
            | EntryType::GNULongLink => continue,
            other => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("{}: unsupported tar entry type {other:?}", dst.display()),
                ))
            }
        }
        let c = cstr(&dst)?;
        let (uid, gid) = (e.header().uid()? as u32, e.header().gid()? as u32);
        // SAFETY: a valid NUL-terminated path; lchown never follows a symlink.
        check(
            unsafe { libc::lchown(c.as_ptr(), uid, gid) },
            "lchown",
            &dst,
        )?;
        if kind != EntryType::Symlink {
            // After chown, which clears set-id bits.
            // SAFETY: a valid NUL-terminated path; the node is not a symlink.
            check(unsafe { libc::chmod(c.as_ptr(), mode) }, "chmod", &dst)?;
        }
        if let Some(exts) = e.pax_extensions()? {
            for ext in exts {
                let ext = ext?;
                let Some(xname) = ext.key().ok().and_then(|k| k.strip_prefix("SCHILY.xattr."))
                else {
                    continue;
                };
                let xn =
                    CString::new(xname).map_err(|_| io::Error::other("NUL in an xattr name"))?;
                let v = ext.value_bytes();
                // SAFETY: valid NUL-terminated strings and a value buffer of the given length.
                check(
                    unsafe {
                        libc::lsetxattr(
                            c.as_ptr(),
                            xn.as_ptr(),
                            v.as_ptr() as *const libc::c_void,
                            v.len(),
                            0,
                        )
                    },
                    "lsetxattr",
                    &dst,
                )?;
            }
        }
        if kind == EntryType::Directory && existing.as_ref().is_some_and(|m| m.is_dir()) {
            changes.changed(&dst);
        } else {
            changes.created(&dst);
        }
        if kind == EntryType::Directory {
            dirs.push((dst, e.header().clone()));
        } else {
            set_mtime(&c, &dst, e.header().mtime()?)?;
        }
    }
    // Directory times last: adding children changed them. Directories the layer names get
    // its times; the others get their own back.
    let _step = workdir::step()?;
    let named: std::collections::HashSet<&PathBuf> = dirs.iter().map(|(d, _)| d).collect();
    for (d, t) in &kept.0 {
        if !named.contains(d) && d.exists() {
            set_mtime(&cstr(d)?, d, *t)?;
        }
    }
    for d in &implicit {
        if !named.contains(d) && d.exists() {
            set_mtime(&cstr(d)?, d, IMPLICIT_DIR_MTIME)?;
        }
    }
    for (d, h) in dirs.iter().rev() {
        set_mtime(&cstr(d)?, d, h.mtime()?)?;
    }
    Ok(())
}

fn set_mtime(c: &CString, p: &Path, mtime: u64) -> io::Result<()> {
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t, t];
    // SAFETY: a valid NUL-terminated path and two timespecs; AT_SYMLINK_NOFOLLOW sets a
    // symlink's own times.
    check(
        unsafe {
            libc::utimensat(
                libc::AT_FDCWD,
                c.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        },
        "utimensat",
        p,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolution_stays_inside_the_root() {
        let tmp = tempfile::tempdir().expect("tmp");
        let root = tmp.path().join("root");
        std::fs::create_dir_all(root.join("usr/lib")).expect("mkdir");
        std::os::unix::fs::symlink("/usr/lib", root.join("lib")).expect("symlink");
        std::os::unix::fs::symlink("../../../../etc", root.join("up")).expect("symlink");
        let r = resolve(&root, &["lib".into(), "x".into()]).expect("resolve");
        assert_eq!(r, root.join("usr/lib/x"));
        let r = resolve(&root, &["up".into(), "passwd".into()]).expect("resolve");
        assert_eq!(
            r,
            root.join("etc/passwd"),
            "climbing links stop at the root"
        );
        assert!(clean(Path::new("a/../../etc")).is_err());
    }
}
