//! The filesystem's metadata, fetched eagerly at open when there is no startup trace: a start
//! that looks up files reads the inode tables one 4 KiB block at a time, each a round trip to
//! the registry on a cold node. For ext4 (what `lsmctl convert` writes) the superblock and the
//! group descriptors say where every group's inode table is and how much of it is in use;
//! the chunks holding the used part are prefetched, in disk order (so neighbouring chunks go
//! out as merged fetches). Directory blocks and extent trees are not located (that would need
//! the inodes themselves): they are left to the lazy path or to a trace.
//!
//! Everything here is read from the image, so it is untrusted: every offset is bounds-checked,
//! arithmetic is checked, and the total is capped ([`MAX_META_BYTES`]); anything that does not
//! add up yields no chunks, never a panic.

use blockfmt::merged::Target;
use blockfmt::Image;

/// Most bytes of inode tables prefetched (a hint, not a promise).
pub const MAX_META_BYTES: u64 = 256 << 20;

const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;
/// Group descriptor flag: the inode table is not initialised (nothing in use).
const BG_INODE_UNINIT: u16 = 0x1;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// Byte ranges (offset, length) of the used part of every ext4 inode table in `image`, or
/// nothing if the disk does not hold ext4 (or its superblock does not add up).
pub fn ext4_inode_tables(image: &Image) -> Vec<(u64, u64)> {
    read_ranges(image).unwrap_or_default()
}

fn read_ranges(image: &Image) -> Option<Vec<(u64, u64)>> {
    let mut sb = vec![0u8; 1024];
    image.read(SUPERBLOCK_OFFSET, &mut sb).ok()?;
    if u16_at(&sb, 56)? != EXT4_MAGIC {
        return None;
    }
    let log = u32_at(&sb, 24)?;
    if log > 6 {
        return None;
    }
    let block = 1024u64 << log;
    let blocks = u32_at(&sb, 4)? as u64 | (u32_at(&sb, 0x150)? as u64) << 32;
    let per_group = u32_at(&sb, 32)? as u64;
    let inodes_per_group = u32_at(&sb, 40)? as u64;
    let inode_size = u16_at(&sb, 88)? as u64;
    let first_data = u32_at(&sb, 20)? as u64;
    let desc = match u32_at(&sb, 96)? & INCOMPAT_64BIT != 0 {
        true => u16_at(&sb, 254)? as u64,
        false => 32,
    };
    if per_group == 0 || inode_size == 0 || !(32..=1024).contains(&desc) {
        return None;
    }
    let groups = blocks.checked_sub(first_data)?.div_ceil(per_group);
    let gdt_len = groups.checked_mul(desc)?;
    if gdt_len > 64 << 20 {
        return None;
    }
    let gdt_off = (first_data + 1).checked_mul(block)?;
    let mut gdt = vec![0u8; gdt_len as usize];
    image.read(gdt_off, &mut gdt).ok()?;
    let mut out = Vec::new();
    let mut total = 0u64;
    for g in gdt.chunks(desc as usize) {
        let flags = u16_at(g, 0x12)?;
        if flags & BG_INODE_UNINIT != 0 {
            continue;
        }
        let mut table = u32_at(g, 8)? as u64;
        let mut unused = u16_at(g, 0x1C)? as u64;
        if desc >= 64 {
            table |= (u32_at(g, 0x28)? as u64) << 32;
            unused |= (u16_at(g, 0x32)? as u64) << 16;
        }
        let used = inodes_per_group.saturating_sub(unused);
        let len = used.checked_mul(inode_size)?;
        let off = table.checked_mul(block)?;
        if len == 0 || image.lower().check_range(off, len).is_err() {
            continue;
        }
        total += len;
        if total > MAX_META_BYTES {
            break;
        }
        out.push((off, len));
    }
    out.sort_unstable();
    Some(out)
}

/// The chunks (layer, chunk) holding `ranges` of `image`, each once, in disk order.
pub fn chunks_of(image: &Image, ranges: &[(u64, u64)]) -> Vec<(u16, u32)> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for &(off, len) in ranges {
        let Ok(segs) = image.lower().map(off, len) else {
            continue;
        };
        for s in segs {
            if let Target::Data { layer, chunk, .. } = s.target {
                if seen.insert((layer, chunk)) {
                    out.push((layer, chunk));
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn image_of(disk: &[u8]) -> Image {
        crate::cache::test_image(disk)
    }

    #[test]
    fn finds_the_used_inode_tables_of_a_real_ext4() {
        let tmp = tempfile::tempdir().expect("tmp");
        let (dir, raw) = (tmp.path().join("d"), tmp.path().join("fs.raw"));
        std::fs::create_dir_all(dir.join("sub")).expect("dir");
        for i in 0..50 {
            std::fs::write(dir.join("sub").join(i.to_string()), [i as u8; 5000]).expect("file");
        }
        let f = std::fs::File::create(&raw).expect("raw");
        f.set_len(64 << 20).expect("size");
        let st = std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F", "-d"])
            .arg(&dir)
            .arg(&raw)
            .status()
            .expect("mkfs.ext4");
        assert!(st.success());
        let disk = std::fs::read(&raw).expect("read");
        let img = image_of(&disk);
        let ranges = ext4_inode_tables(&img);
        assert!(!ranges.is_empty());
        // 50 files, a directory, lost+found, the root and the reserved inodes: a few KiB.
        let total: u64 = ranges.iter().map(|r| r.1).sum();
        assert!((60 * 128..=1 << 20).contains(&total), "{total} bytes");
        assert!(ranges.iter().all(|&(o, l)| o + l <= disk.len() as u64));
        assert!(!chunks_of(&img, &ranges).is_empty());
    }

    proptest! {
        /// Fuzz: any superblock and group descriptors (with the ext4 magic) give ranges inside
        /// the disk, or none, never a panic.
        #[test]
        fn garbage_never_panics(sb in proptest::collection::vec(any::<u8>(), 1024), gdt in proptest::collection::vec(any::<u8>(), 4096)) {
            let mut disk = vec![0u8; 1 << 20];
            disk[1024..2048].copy_from_slice(&sb);
            disk[1024 + 56..1024 + 58].copy_from_slice(&EXT4_MAGIC.to_le_bytes());
            disk[2048..6144].copy_from_slice(&gdt);
            disk[8192..12288].copy_from_slice(&gdt);
            let img = image_of(&disk);
            for (o, l) in ext4_inode_tables(&img) {
                prop_assert!(o + l <= disk.len() as u64);
            }
        }
    }
}
