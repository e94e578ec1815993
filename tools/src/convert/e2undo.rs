//! Which blocks a `debugfs -z UNDO` run wrote, read from its undo file (issue 17: change
//! detection that costs the layer, not the image).
//!
//! e2fsprogs' undo I/O manager sits between debugfs and the filesystem image and, before the
//! first write to any block, copies that block's old contents into the undo file under a key
//! naming the block (`lib/ext2fs/undo_io.c`, format `E2UNDO02`). Every write path of
//! libext2fs — block writes, byte writes, discard and zero-out — goes through it, so the keys
//! name a superset of the blocks whose contents changed. Hashing only those (`rawimport`)
//! therefore stores exactly the blocks a whole-image hash would find.
//!
//! Layout (little-endian; the file is cut into `block_size` blocks): block 0 the header
//! (magic, key count, superblock copy and first key block positions, block sizes, state,
//! feature words, a crc32c of the header), block 1 a superblock copy, then from `key_offset`
//! a key block (magic `0xCADECADE`, crc32c, then `block_size / 16 - 1` keys of `fsblk: u64,
//! crc: u32, size: u32`) followed by the data blocks of its keys (each key's `size` bytes
//! rounded up to whole blocks), then the next key block, and so on.
//!
//! The file is the conversion's own debugfs output, but it is read defensively: every field
//! is checked, anything that does not add up is an error (the caller then hashes the whole
//! image), never a panic or a guess.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

const MAGIC: &[u8; 8] = b"E2UNDO02";
const KEYBLOCK_MAGIC: u32 = 0xCADE_CADE;
const HEADER: usize = 512;
const STATE_FINISHED: u32 = 0x1;
const KEY: usize = 16;

fn bad(what: &str) -> io::Error {
    io::Error::other(format!("debugfs undo file: {what}"))
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    b.get(o..o + 4)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u32::from_le_bytes)
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    b.get(o..o + 8)
        .and_then(|s| s.try_into().ok())
        .map_or(0, u64::from_le_bytes)
}

/// crc32c as libext2fs computes it (`ext2fs_crc32c_le(~0, …)`: no final inversion).
fn crc(data: &[u8]) -> u32 {
    !crc32c::crc32c_append(0, data)
}

/// Runs of blocks, `(first, count)`, sorted and not overlapping.
pub type Runs = Vec<(u64, u64)>;

/// The blocks (of `fs_block` bytes) a debugfs run recorded in the undo file `f`: sorted,
/// merged runs of `(first block, count)`.
pub fn written_blocks(f: &File, fs_block: u64) -> io::Result<Runs> {
    let mut hdr = [0u8; HEADER];
    f.read_exact_at(&mut hdr, 0)?;
    if &hdr[..8] != MAGIC {
        return Err(bad("not an E2UNDO02 file"));
    }
    if crc(&hdr[..HEADER - 4]) != u32_at(&hdr, HEADER - 4) {
        return Err(bad("header checksum"));
    }
    let keys = u64_at(&hdr, 8);
    let key_offset = u64_at(&hdr, 24);
    let block = u32_at(&hdr, 32) as u64;
    let state = u32_at(&hdr, 44);
    let (incompat, rocompat, fs_offset) = (u32_at(&hdr, 52), u32_at(&hdr, 56), u64_at(&hdr, 64));
    if state & STATE_FINISHED == 0 {
        return Err(bad("debugfs did not finish it"));
    }
    if incompat != 0 || rocompat != 0 || fs_offset != 0 {
        return Err(bad("unknown features or a filesystem offset"));
    }
    if keys == 0 {
        return Ok(Vec::new());
    }
    if u32_at(&hdr, 36) as u64 != fs_block
        || !(1024..=1 << 20).contains(&block)
        || !block.is_multiple_of(fs_block)
    {
        return Err(bad("block sizes"));
    }
    let len = f.metadata()?.len();
    let per_block = block as usize / KEY - 1;
    let mut runs: Vec<(u64, u64)> = Vec::new();
    let mut kb = vec![0u8; block as usize];
    let mut at = key_offset;
    let mut left = keys;
    while left > 0 {
        let off = at
            .checked_mul(block)
            .filter(|o| o.checked_add(block).is_some_and(|e| e <= len))
            .ok_or_else(|| bad("key block outside the file"))?;
        f.read_exact_at(&mut kb, off)?;
        if u32_at(&kb, 0) != KEYBLOCK_MAGIC {
            return Err(bad("key block magic"));
        }
        let sum = u32_at(&kb, 4);
        kb[4..8].fill(0);
        if crc(&kb) != sum {
            return Err(bad("key block checksum"));
        }
        at += 1;
        let n = left.min(per_block as u64) as usize;
        for k in kb[KEY..].chunks_exact(KEY).take(n) {
            let (first, size) = (u64_at(k, 0), u32_at(k, 12) as u64);
            if size == 0 {
                return Err(bad("empty key"));
            }
            // Bytes from the start of block `first` (in the filesystem's block size).
            let count = size.div_ceil(fs_block);
            first
                .checked_add(count)
                .ok_or_else(|| bad("key past the end of any disk"))?;
            runs.push((first, count));
            at = at
                .checked_add(size.div_ceil(block))
                .ok_or_else(|| bad("key data past the end"))?;
        }
        left -= n as u64;
    }
    Ok(merge(runs))
}

/// Sorted, overlapping and adjacent runs joined.
fn merge(mut runs: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    runs.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(runs.len());
    for (s, n) in runs {
        match out.last_mut() {
            Some((ps, pn)) if s <= *ps + *pn => *pn = (*pn).max(s + n - *ps),
            _ => out.push((s, n)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn merge_joins_overlapping_and_adjacent_runs() {
        assert_eq!(
            merge(vec![(10, 2), (0, 1), (12, 3), (1, 1), (5, 1), (13, 1)]),
            vec![(0, 2), (5, 1), (10, 5)]
        );
    }

    /// On a real filesystem: every 4 KiB block a debugfs script changed is named.
    #[test]
    fn names_every_block_debugfs_changed() {
        let t = tempfile::tempdir().unwrap();
        let raw = t.path().join("fs.raw");
        File::create(&raw).unwrap().set_len(64 << 20).unwrap();
        let ok = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&raw)
            .status()
            .unwrap();
        assert!(ok.success());
        let before = std::fs::read(&raw).unwrap();
        let data = t.path().join("data");
        std::fs::write(&data, vec![7u8; 300_000]).unwrap();
        let script = t.path().join("s");
        std::fs::write(
            &script,
            format!(
                "write {0} f\nmkdir d\nwrite {0} d/g\nsif d mtime @1000\nrm f\n",
                data.display()
            ),
        )
        .unwrap();
        let undo = t.path().join("u.undo");
        let o = Command::new("debugfs")
            .arg("-w")
            .arg("-z")
            .arg(&undo)
            .arg("-f")
            .arg(&script)
            .arg(&raw)
            .output()
            .unwrap();
        assert!(o.status.success());
        let after = std::fs::read(&raw).unwrap();
        let runs = written_blocks(&File::open(&undo).unwrap(), 4096).unwrap();
        let named = |b: u64| runs.iter().any(|(s, n)| (*s..s + n).contains(&b));
        let mut changed = 0;
        for (i, (x, y)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
            if x != y {
                changed += 1;
                assert!(named(i as u64), "block {i} changed but is not named");
            }
        }
        assert!(changed > 70, "{changed}");
        // Not the whole disk: only what the script wrote.
        let total: u64 = runs.iter().map(|r| r.1).sum();
        assert!(total < 1024, "{total}");
    }

    proptest::proptest! {
        /// Whatever the file holds, no panic: an error or some runs.
        #[test]
        fn fuzz_written_blocks(body in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..20000),
                               keys in 0u64..1000, key_offset in 0u64..6) {
            let t = tempfile::tempfile().unwrap();
            let mut hdr = [0u8; HEADER];
            hdr[..8].copy_from_slice(MAGIC);
            hdr[8..16].copy_from_slice(&keys.to_le_bytes());
            hdr[24..32].copy_from_slice(&key_offset.to_le_bytes());
            hdr[32..36].copy_from_slice(&4096u32.to_le_bytes());
            hdr[36..40].copy_from_slice(&4096u32.to_le_bytes());
            hdr[44..48].copy_from_slice(&STATE_FINISHED.to_le_bytes());
            let c = crc(&hdr[..HEADER - 4]);
            hdr[HEADER - 4..].copy_from_slice(&c.to_le_bytes());
            t.write_all_at(&hdr, 0).unwrap();
            let mut body = body;
            if body.len() >= 4096 {
                // A valid first key block, so the keys themselves are fuzzed.
                body[..4].copy_from_slice(&KEYBLOCK_MAGIC.to_le_bytes());
                body[4..8].fill(0);
                let c = crc(&body[..4096]);
                body[4..8].copy_from_slice(&c.to_le_bytes());
            }
            t.write_all_at(&body, 4096 * key_offset.max(1)).unwrap();
            let _ = written_blocks(&t, 4096);
        }
    }
}
