//! `lsmctl convert --fs erofs`: the image's final tree as one read-only erofs filesystem
//! (flattened: one lsm layer per image), made with Debian's `mkfs.erofs` (erofs-utils 1.5),
//! uncompressed inside (lsm compresses its chunks outside). FORMAT.md §7.
//!
//! Reproducible: `mkfs.erofs` orders inodes by sorted directory walk and takes the UUID from
//! `-U`; the one thing it takes from the clock is the superblock's build time, which with
//! `--preserve-mtime` no inode inherits (every inode whose mtime differs from it is written in
//! the extended form with its own mtime), so it is set to 1 afterwards and the superblock
//! checksum recomputed (crc32c over the superblock block from byte 1024, seed !0, no final
//! inversion, as the kernel's `erofs_superblock_csum_verify` checks it).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use super::{bad, workdir};
use crate::cli::CliResult;

const SB: u64 = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
const COMPAT_SB_CHKSUM: u32 = 1;

/// Makes `raw` the erofs filesystem of `root`, then extends it (holes) to `size` bytes.
pub fn make(root: &Path, raw: &Path, size: u64, uuid: &str) -> CliResult {
    {
        let _step = workdir::step()?;
        let _ = std::fs::remove_file(raw);
        // The root's time is the unpack's: fixed, as ext4's is (`normalize_times`).
        let one = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1);
        File::open(root)?.set_times(
            std::fs::FileTimes::new()
                .set_modified(one)
                .set_accessed(one),
        )?;
    }
    let o = workdir::output(
        std::process::Command::new("mkfs.erofs")
            .arg("--quiet")
            .arg("--preserve-mtime")
            .arg(format!("-U{uuid}"))
            .arg(raw)
            .arg(root),
    )
    .map_err(|e| bad(format!("mkfs.erofs: {e} (install erofs-utils)")))?;
    if !o.status.success() {
        return Err(bad(format!(
            "mkfs.erofs: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )));
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(raw)?;
    let len = f.metadata()?.len();
    if len > size {
        return Err(bad(format!(
            "the erofs image is {len} bytes, more than the disk size {size} (give --size)"
        )));
    }
    fix_build_time(&f)?;
    f.set_len(size)?;
    Ok(())
}

/// Sets the superblock's build time to 1 s and recomputes its checksum.
fn fix_build_time(f: &File) -> CliResult {
    let mut blk = vec![0u8; 4096];
    f.read_exact_at(&mut blk, 0)?;
    let sb = &mut blk[SB as usize..];
    let word = |b: &[u8], at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
    if word(sb, 0) != MAGIC {
        return Err(bad("mkfs.erofs wrote no erofs superblock"));
    }
    if sb[12] != 12 {
        return Err(bad("mkfs.erofs wrote a block size other than 4 KiB"));
    }
    sb[24..32].copy_from_slice(&1u64.to_le_bytes()); // build_time
    sb[32..36].copy_from_slice(&0u32.to_le_bytes()); // build_time_nsec
    if word(sb, 8) & COMPAT_SB_CHKSUM != 0 {
        sb[4..8].copy_from_slice(&[0; 4]);
        let crc = !crc32c::crc32c(sb);
        sb[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    f.write_all_at(&blk, 0)?;
    Ok(())
}
