//! Fixing the times `mkfs.ext4 -d` copied from the host tree, by editing the inode tables of
//! the raw filesystem directly (issue 17, cause 3: one `debugfs sif` per inode and field took
//! about 11 s for a 10,000-file Debian base on a loaded host; this takes well under a second).
//!
//! `mkfs.ext4 -d` copies each file's change and access times from the host, i.e. from when the
//! unpack wrote them. A conversion must depend only on the image, so every in-use inode from
//! `s_first_ino` on gets access and change time = its modification time (seconds and the
//! `_extra` word: nanoseconds and epoch bits), which came from the layer; the root directory
//! gets 1 for all four times (creation times are mkfs's `E2FSPROGS_FAKE_TIME` already). Each
//! edited inode's checksum is recomputed (crc32c seeded as the kernel does: `s_checksum_seed`
//! with `metadata_csum_seed`, else the crc of the UUID; then inode number, generation, and the
//! inode with its checksum fields zeroed).
//!
//! The superblock's lifetime-writes counter is cleared too (see [`clear_lifetime_writes`]): it
//! counts what the tools wrote, not what the image holds.
//!
//! The raw file is the conversion's own mkfs output, but it is still read defensively: every
//! offset is bounds-checked and anything that does not add up is an error, never a panic.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const SUPERBLOCK: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
const BG_INODE_UNINIT: u16 = 0x1;
const ROOT_INO: u32 = 2;
/// Superblock field offsets (struct ext4_super_block).
const S_KBYTES_WRITTEN: usize = 0x178;
const S_CHECKSUM: usize = 0x3FC;

// Inode field offsets (struct ext4_inode).
const I_MODE: usize = 0x00;
const I_ATIME: usize = 0x08;
const I_CTIME: usize = 0x0C;
const I_MTIME: usize = 0x10;
const I_LINKS: usize = 0x1A;
const I_GENERATION: usize = 0x64;
const I_CSUM_LO: usize = 0x7C;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CSUM_HI: usize = 0x82;
const I_CTIME_EXTRA: usize = 0x84;
const I_MTIME_EXTRA: usize = 0x88;
const I_ATIME_EXTRA: usize = 0x8C;
const I_CRTIME: usize = 0x90;
const I_CRTIME_EXTRA: usize = 0x94;
const GOOD_OLD_INODE: usize = 128;

fn bad(what: &str) -> io::Error {
    io::Error::other(format!("fixing inode times: {what}"))
}

fn u16_at(b: &[u8], o: usize) -> io::Result<u16> {
    b.get(o..o + 2)
        .and_then(|s| s.try_into().ok())
        .map(u16::from_le_bytes)
        .ok_or_else(|| bad("short structure"))
}

fn u32_at(b: &[u8], o: usize) -> io::Result<u32> {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map(u32::from_le_bytes)
        .ok_or_else(|| bad("short structure"))
}

fn put_u32(b: &mut [u8], o: usize, v: u32) {
    if let Some(s) = b.get_mut(o..o + 4) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

fn put_u16(b: &mut [u8], o: usize, v: u16) {
    if let Some(s) = b.get_mut(o..o + 2) {
        s.copy_from_slice(&v.to_le_bytes());
    }
}

/// ext4's crc32c: no pre- or post-inversion (the crate's `crc32c_append` inverts both ends).
fn ext4_crc(crc: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!crc, data)
}

/// What the superblock says about inode tables and checksums.
struct Geometry {
    block: u64,
    inodes_per_group: u64,
    inode_size: usize,
    first_ino: u32,
    desc: usize,
    groups: u64,
    gdt_off: u64,
    /// crc32c seed of inode checksums (`None`: no metadata_csum).
    csum_seed: Option<u32>,
}

fn geometry(raw: &File) -> io::Result<Geometry> {
    let mut sb = vec![0u8; 1024];
    raw.read_exact_at(&mut sb, SUPERBLOCK)?;
    if u16_at(&sb, 0x38)? != EXT4_MAGIC {
        return Err(bad("not ext4"));
    }
    let log = u32_at(&sb, 0x18)?;
    if log > 6 {
        return Err(bad("block size"));
    }
    let block = 1024u64 << log;
    let blocks = u32_at(&sb, 0x4)? as u64 | (u32_at(&sb, 0x150)? as u64) << 32;
    let per_group = u32_at(&sb, 0x20)? as u64;
    let inodes_per_group = u32_at(&sb, 0x28)? as u64;
    let inode_size = u16_at(&sb, 0x58)? as usize;
    let first_ino = u32_at(&sb, 0x54)?;
    let first_data = u32_at(&sb, 0x14)? as u64;
    let incompat = u32_at(&sb, 0x60)?;
    let ro_compat = u32_at(&sb, 0x64)?;
    let desc = if incompat & INCOMPAT_64BIT != 0 {
        u16_at(&sb, 0xFE)? as usize
    } else {
        32
    };
    if per_group == 0
        || !(GOOD_OLD_INODE..=4096).contains(&inode_size)
        || !(32..=1024).contains(&desc)
    {
        return Err(bad("superblock does not add up"));
    }
    let groups = blocks
        .checked_sub(first_data)
        .ok_or_else(|| bad("block count"))?
        .div_ceil(per_group);
    let csum_seed = (ro_compat & RO_COMPAT_METADATA_CSUM != 0)
        .then(|| -> io::Result<u32> {
            if incompat & INCOMPAT_CSUM_SEED != 0 {
                u32_at(&sb, 0x270)
            } else {
                let uuid = sb.get(0x68..0x78).ok_or_else(|| bad("uuid"))?;
                Ok(ext4_crc(!0, uuid))
            }
        })
        .transpose()?;
    Ok(Geometry {
        block,
        inodes_per_group,
        inode_size,
        first_ino,
        desc,
        groups,
        gdt_off: (first_data + 1) * block,
        csum_seed,
    })
}

/// Sets the times of one inode as the module docs say; `false` if it is not in use.
fn fix_inode(ino: u32, inode: &mut [u8], seed: Option<u32>) -> io::Result<bool> {
    if u16_at(inode, I_MODE)? == 0 || u16_at(inode, I_LINKS)? == 0 {
        return Ok(false);
    }
    let extra = if inode.len() > GOOD_OLD_INODE {
        u16_at(inode, I_EXTRA_ISIZE)? as usize
    } else {
        0
    };
    let len = inode.len();
    let has = |end: usize| GOOD_OLD_INODE + extra >= end && len >= end;
    if ino == ROOT_INO {
        for f in [I_ATIME, I_CTIME, I_MTIME] {
            put_u32(inode, f, 1);
        }
        for f in [I_CTIME_EXTRA, I_MTIME_EXTRA, I_ATIME_EXTRA] {
            if has(f + 4) {
                put_u32(inode, f, 0);
            }
        }
        if has(I_CRTIME_EXTRA + 4) {
            put_u32(inode, I_CRTIME, 1);
            put_u32(inode, I_CRTIME_EXTRA, 0);
        }
    } else {
        let m = u32_at(inode, I_MTIME)?;
        put_u32(inode, I_ATIME, m);
        put_u32(inode, I_CTIME, m);
        if has(I_ATIME_EXTRA + 4) {
            let me = u32_at(inode, I_MTIME_EXTRA)?;
            put_u32(inode, I_CTIME_EXTRA, me);
            put_u32(inode, I_ATIME_EXTRA, me);
        }
    }
    if let Some(seed) = seed {
        let hi = has(I_CSUM_HI + 2);
        put_u16(inode, I_CSUM_LO, 0);
        if hi {
            put_u16(inode, I_CSUM_HI, 0);
        }
        let mut crc = ext4_crc(seed, &ino.to_le_bytes());
        crc = ext4_crc(crc, &u32_at(inode, I_GENERATION)?.to_le_bytes());
        crc = ext4_crc(crc, inode);
        put_u16(inode, I_CSUM_LO, crc as u16);
        if hi {
            put_u16(inode, I_CSUM_HI, (crc >> 16) as u16);
        }
    }
    Ok(true)
}

/// Sets the superblock's lifetime-writes counter (`s_kbytes_written`) to 0 and its checksum
/// to match. The counter says how many bytes the tools that made the filesystem happened to
/// write — with `debugfs -z` (undo file, `e2undo`) more than without, for the same result —
/// and libext2fs leaves a counter of 0 at 0, so every later debugfs run keeps it there: the
/// filesystem is a function of the image, however its blocks were tracked.
fn clear_lifetime_writes(raw: &File) -> io::Result<()> {
    let mut sb = vec![0u8; 1024];
    raw.read_exact_at(&mut sb, SUPERBLOCK)?;
    if u16_at(&sb, 0x38)? != EXT4_MAGIC {
        return Err(bad("not ext4"));
    }
    sb[S_KBYTES_WRITTEN..S_KBYTES_WRITTEN + 8].fill(0);
    if u32_at(&sb, 0x64)? & RO_COMPAT_METADATA_CSUM != 0 {
        let c = ext4_crc(!0, &sb[..S_CHECKSUM]);
        put_u32(&mut sb, S_CHECKSUM, c);
    }
    raw.write_all_at(&sb, SUPERBLOCK)
}

/// Fixes the times of every in-use inode of the ext4 filesystem in `raw` (see the module
/// docs) and clears its lifetime-writes counter; returns how many inodes it set.
pub fn normalize(raw: &File) -> io::Result<u64> {
    clear_lifetime_writes(raw)?;
    let g = geometry(raw)?;
    let gdt_len = g
        .groups
        .checked_mul(g.desc as u64)
        .filter(|l| *l <= 64 << 20)
        .ok_or_else(|| bad("group descriptor table size"))?;
    let file_len = raw.metadata()?.len();
    let mut gdt = vec![0u8; gdt_len as usize];
    raw.read_exact_at(&mut gdt, g.gdt_off)?;
    let mut fixed = 0u64;
    for (n, d) in gdt.chunks(g.desc).enumerate() {
        if u16_at(d, 0x12)? & BG_INODE_UNINIT != 0 {
            continue;
        }
        let mut table = u32_at(d, 0x8)? as u64;
        let mut unused = u16_at(d, 0x1C)? as u64;
        if g.desc >= 64 {
            table |= (u32_at(d, 0x28)? as u64) << 32;
            unused |= (u16_at(d, 0x32)? as u64) << 16;
        }
        let used = g.inodes_per_group.saturating_sub(unused) as usize;
        if used == 0 {
            continue;
        }
        let off = table
            .checked_mul(g.block)
            .ok_or_else(|| bad("table offset"))?;
        let len = (used as u64)
            .checked_mul(g.inode_size as u64)
            .filter(|l| off.checked_add(*l).is_some_and(|end| end <= file_len))
            .ok_or_else(|| bad("inode table outside the filesystem"))?;
        let mut buf = vec![0u8; len as usize];
        raw.read_exact_at(&mut buf, off)?;
        let mut changed = false;
        for (i, inode) in buf.chunks_mut(g.inode_size).enumerate() {
            let ino = (n as u64 * g.inodes_per_group + i as u64 + 1) as u32;
            if ino != ROOT_INO && ino < g.first_ino {
                continue; // reserved inodes keep mkfs's fixed times
            }
            if fix_inode(ino, inode, g.csum_seed)? {
                fixed += 1;
                changed = true;
            }
        }
        if changed {
            raw.write_all_at(&buf, off)?;
        }
    }
    Ok(fixed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    fn stat(raw: &std::path::Path, path: &str) -> String {
        let o = Command::new("debugfs")
            .args(["-R", &format!("stat {path}")])
            .arg(raw)
            .output()
            .expect("debugfs");
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn field(stat: &str, name: &str) -> String {
        stat.lines()
            .find_map(|l| l.trim().split_once(&format!("{name}: ")).map(|x| x.1))
            .and_then(|v| v.split(" --").next())
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    /// On a real `mkfs.ext4 -d` filesystem: change and access times become the modification
    /// time, the root's become 1, and e2fsck finds every inode checksum right.
    #[test]
    fn times_follow_mtime_and_checksums_stay_valid() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"x").unwrap();
        Command::new("touch")
            .args(["-m", "-d", "@1600000000.25"])
            .arg(root.join("d/f"))
            .status()
            .unwrap();
        let raw = t.path().join("fs.raw");
        File::create(&raw).unwrap().set_len(64 << 20).unwrap();
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096", "-O", "metadata_csum_seed", "-d"])
            .arg(&root)
            .arg(&raw)
            .status()
            .unwrap();
        assert!(ok.success());
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&raw)
            .unwrap();
        assert!(normalize(&f).unwrap() >= 3);
        drop(f);
        let s = stat(&raw, "/d/f");
        let m = field(&s, "mtime");
        assert!(m.starts_with("0x5f5e1000:"), "{s}");
        assert_eq!(field(&s, "ctime"), m);
        assert_eq!(field(&s, "atime"), m);
        let r = stat(&raw, "/");
        assert!(field(&r, "ctime").starts_with("0x00000001:00000000"), "{r}");
        let sb = Command::new("dumpe2fs")
            .arg("-h")
            .arg(&raw)
            .output()
            .unwrap();
        let sb = String::from_utf8_lossy(&sb.stdout);
        assert!(!sb.contains("Lifetime writes"), "{sb}");
        let fsck = Command::new("e2fsck")
            .arg("-fn")
            .arg(&raw)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "{}",
            String::from_utf8_lossy(&fsck.stdout)
        );
    }

    proptest::proptest! {
        /// Whatever the superblock and descriptors say, no panic: an error or some count.
        #[test]
        fn fuzz_normalize(sb in proptest::collection::vec(proptest::prelude::any::<u8>(), 1024),
                          gdt in proptest::collection::vec(proptest::prelude::any::<u8>(), 256),
                          log in 0u32..3) {
            let t = tempfile::tempfile().unwrap();
            let mut sb = sb;
            sb[0x38..0x3A].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
            sb[0x18..0x1C].copy_from_slice(&log.to_le_bytes());
            t.write_all_at(&sb, SUPERBLOCK).unwrap();
            t.write_all_at(&gdt, 4096).unwrap();
            t.set_len(1 << 20).unwrap();
            let _ = normalize(&t);
        }
    }
}
