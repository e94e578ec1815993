//! Where the work tree goes when `--work-dir` is not given: `/dev/shm` when it and the
//! machine's available memory both have room for it, else inside DST. The unpacked tree and
//! the raw filesystem are scratch (removed at the end; the output does not depend on where they
//! were, FORMAT.md §7), and on a disk they cost most of a conversion: writing them, `mkfs` and
//! every `debugfs` run fsyncing the raw file (0.2–0.7 s each), the discards of removing them.
//! On a tmpfs an fsync is free and nothing reaches a disk (measured: the base image at 0.64×
//! `umoci unpack` on /dev/shm against 1.28× inside DST, README Benchmarks).

use std::path::{Path, PathBuf};

/// The tmpfs tried first.
const SHM: &str = "/dev/shm";

/// Room a conversion's work tree needs: the host tree (the unpacked bytes), the raw
/// filesystem's allocated blocks (about as many again) and a margin for ext4's metadata.
fn needed(unpacked: u64) -> u64 {
    unpacked.saturating_mul(5) / 2 + (256 << 20)
}

/// `/dev/shm` when it is a tmpfs with room for `jobs` conversions of `unpacked` bytes each and
/// the available memory (`MemAvailable`) also leaves 1 GiB beyond that; `None` otherwise.
pub fn default_work_dir(unpacked: u64, jobs: usize) -> Option<PathBuf> {
    let need = needed(unpacked).saturating_mul(jobs.max(1) as u64);
    let shm = Path::new(SHM);
    let free = free_bytes(shm)?;
    let avail = mem_available()?;
    (is_tmpfs(shm) && free >= need && avail >= need.saturating_add(1 << 30))
        .then(|| shm.to_path_buf())
}

fn free_bytes(p: &Path) -> Option<u64> {
    let c = std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: `statvfs` is plain integers, for which all-zero bytes are a valid value.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `s` a writable statvfs, as statvfs(3) needs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64).saturating_mul(s.f_frsize as u64))
}

fn is_tmpfs(p: &Path) -> bool {
    let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
        return false;
    };
    mounts.lines().any(|l| {
        let mut f = l.split(' ');
        let (_, dir, kind) = (f.next(), f.next(), f.next());
        dir == p.to_str() && kind == Some("tmpfs")
    })
}

fn mem_available() -> Option<u64> {
    let m = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = m.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_image_stays_on_disk() {
        assert_eq!(default_work_dir(u64::MAX / 4, 1), None);
        assert_eq!(default_work_dir(1 << 50, 1), None);
    }
}
