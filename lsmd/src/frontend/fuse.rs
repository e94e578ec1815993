//! The FUSE-file frontend: every export appears as one regular file on a FUSE mount, so
//! `losetup` + `mount` work on kernels without nbd or ublk (such as these build machines). Reads
//! and writes go straight to the `Image`; `fsync` on the file is FLUSH. Files are opened with
//! direct I/O, so the kernel keeps no second copy of the disk's pages and what a reader sees is
//! always the image itself.
//!
//! The session runs on one thread and follows the engine's rule ([`crate::engine`]): hot work
//! (cached reads, writes) is answered right there; cold reads and fsync go to the mount's
//! [`Lane`] of the shared pool and are answered from there, so the kernel's concurrent reads
//! (readahead, a loop device with `--direct-io=on`: asynchronous direct I/O is enabled) fetch
//! in parallel and a cold read never holds up a hot one behind it.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::engine::{self, Engine, Export, Lane};
use crate::errno;
use crate::metrics::Frontend;
use fuser::{
    FileAttr, FileType, Filesystem, MountOption, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, TimeOrNow,
};

const ROOT: u64 = 1;
const TTL: Duration = Duration::from_secs(1);

/// `FUSE_ASYNC_DIO` (FUSE protocol 7.15+; fuser does not export it): asynchronous direct I/O.
const FUSE_ASYNC_DIO: u32 = 1 << 15;

/// Requests of one mount queued or running on the pool before the session thread waits.
const MAX_PENDING: usize = 256;

/// Asynchronous requests (direct reads) the kernel keeps in flight on one mount.
const MAX_BACKGROUND: u16 = 64;

/// The exported files: inode `2 + i` is `files[i]`.
struct ExportFiles {
    files: Vec<Arc<Export>>,
    started: SystemTime,
    lane: Lane,
}

impl ExportFiles {
    fn file(&self, ino: u64) -> Option<&Arc<Export>> {
        ino.checked_sub(2).and_then(|i| self.files.get(i as usize))
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size) = if ino == ROOT {
            (FileType::Directory, 0o755, 0)
        } else {
            let img = &self.file(ino)?.image;
            let perm = if img.read_only() { 0o444 } else { 0o644 };
            (FileType::RegularFile, perm, img.size())
        };
        Some(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink: if kind == FileType::Directory { 2 } else { 1 },
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for ExportFiles {
    fn init(
        &mut self,
        _req: &Request<'_>,
        config: &mut fuser::KernelConfig,
    ) -> Result<(), libc::c_int> {
        // Let the kernel keep several direct reads in flight (a kernel without it still works).
        let _ = config.add_capabilities(FUSE_ASYNC_DIO);
        // Async requests the kernel keeps in flight on this mount (its default is 12): cold
        // reads wait on a source, so a queue depth of 32 needs that many at once. The lane
        // (`MAX_PENDING`) and the pool's share still bound what runs.
        let _ = config.set_max_background(MAX_BACKGROUND);
        let _ = config.set_congestion_threshold(MAX_BACKGROUND * 3 / 4);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let found = (parent == ROOT)
            .then(|| self.files.iter().position(|e| OsStr::new(&e.name) == name))
            .flatten();
        match found.and_then(|i| self.attr(i as u64 + 2)) {
            Some(a) => reply.entry(&TTL, &a, 0),
            None => reply.error(libc::ENOENT),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        match self.attr(ino) {
            // A disk's size is fixed: truncating it to another size is refused.
            Some(a) if size.is_some_and(|s| s != a.size) => reply.error(libc::EPERM),
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(libc::ENOENT),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, flags: i32, reply: ReplyOpen) {
        let Some(export) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        if export.image.read_only() && flags & libc::O_ACCMODE != libc::O_RDONLY {
            return reply.error(libc::EROFS);
        }
        reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        let Some(export) = self.file(ino).cloned() else {
            return reply.error(libc::ENOENT);
        };
        let off = offset.max(0) as u64;
        let len = (size as u64).min(export.image.size().saturating_sub(off)) as usize;
        let mut buf = vec![0u8; len];
        let answer = move |export: &Export, buf: &[u8], r: blockfmt::Result<engine::ReadMap>| {
            match r {
                Ok(_) => reply.data(buf),
                Err(e) => {
                    export.failed_request(&e);
                    tracing::warn!(export = %export.name, offset = off, len, error = %e, "FUSE read failed");
                    reply.error(errno(&e))
                }
            }
        };
        match engine::read_hot(&export, Frontend::Fuse, off, &mut buf) {
            Some(r) => answer(&export, &buf, r),
            None => self.lane.submit(move || {
                let r = engine::read_cold(&export, Frontend::Fuse, off, &mut buf);
                answer(&export, &buf, r)
            }),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        let Some(export) = self.file(ino) else {
            return reply.error(libc::ENOENT);
        };
        let off = offset.max(0) as u64;
        if off + data.len() as u64 > export.image.size() {
            return reply.error(libc::ENOSPC);
        }
        match engine::hot(export, Frontend::Fuse, |img| img.write(off, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                export.failed_request(&e);
                tracing::warn!(export = %export.name, offset = off, len = data.len(), error = %e, "FUSE write failed");
                reply.error(errno(&e))
            }
        }
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        // close(2) promises nothing about durability; fsync does.
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(export) = self.file(ino).cloned() else {
            return reply.error(libc::ENOENT);
        };
        self.lane
            .submit(move || match engine::flush(&export, Frontend::Fuse) {
                Ok(()) => reply.ok(),
                Err(e) => {
                    export.failed_request(&e);
                    tracing::warn!(export = %export.name, error = %e, "FUSE fsync failed");
                    reply.error(errno(&e))
                }
            });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let mut entries: Vec<(u64, FileType, &str)> = vec![
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
        ];
        for (i, e) in self.files.iter().enumerate() {
            entries.push((i as u64 + 2, FileType::RegularFile, &e.name));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(ino, i as i64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Whether `dir` (canonical) is a mount point in `mountinfo` (the text of
/// `/proc/self/mountinfo`: field 5 is the mount point, with space, tab, newline and backslash
/// written as octal escapes).
fn is_mount_point(mountinfo: &str, dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let want = dir.as_os_str().as_bytes();
    mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .any(|m| unescape_octal(m) == want)
}

/// `\ooo` escapes decoded (anything else as it is).
fn unescape_octal(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let code = b
            .get(i + 1..i + 4)
            .filter(|d| b[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |v, c| v * 8 + u32::from(c - b'0')));
        match code.and_then(|c| u8::try_from(c).ok()) {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(b[i]);
                i += 1;
            }
        }
    }
    out
}

/// A mounted FUSE-file export; unmounted when dropped.
pub struct FuseMount {
    _session: fuser::BackgroundSession,
}

/// Mounts `exports` as files (named after them) in `dir`; cold work runs on `engine`'s pool.
///
/// A directory that is a mount point already is refused: mounting over it would hide what is
/// there (another lsmd's files, whose users would then read ours) until this one exits.
pub fn mount(dir: &Path, exports: Vec<Arc<Export>>, engine: &Engine) -> std::io::Result<FuseMount> {
    let canonical = dir.canonicalize()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    if is_mount_point(&mountinfo, &canonical) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            format!(
                "{} is a mount point already (another lsmd's FUSE files?): unmount it or choose another directory",
                canonical.display()
            ),
        ));
    }
    let writable = exports.iter().any(|e| !e.image.read_only());
    let mut options = vec![
        MountOption::FSName("lsmd".into()),
        MountOption::Subtype("lsm".into()),
        MountOption::DefaultPermissions,
    ];
    options.push(if writable {
        MountOption::RW
    } else {
        MountOption::RO
    });
    let fs = ExportFiles {
        files: exports,
        started: SystemTime::now(),
        lane: engine.lane(MAX_PENDING),
    };
    let session = fuser::spawn_mount2(fs, dir, &options)?;
    Ok(FuseMount { _session: session })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_in_mountinfo_with_escapes() {
        let info = "36 35 98:0 / /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw\n\
                    37 35 0:40 / /srv/files rw - fuse.lsm lsmd rw\n";
        assert!(is_mount_point(info, Path::new("/mnt/a b")));
        assert!(is_mount_point(info, Path::new("/srv/files")));
        assert!(!is_mount_point(info, Path::new("/srv")));
        assert!(!is_mount_point(info, Path::new("/mnt/a\\040b")));
        assert_eq!(unescape_octal("x\\134y\\01"), b"x\\y\\01");
        assert_eq!(unescape_octal("\\777"), b"\\777", "not a byte: kept");
    }
}
