//! The filesystem's metadata, read eagerly at open when there is no startup trace, and what it
//! says about where files lie. A start that looks up files reads the inode tables one 4 KiB
//! block at a time, each a round trip to the registry on a cold node; then it reads the files,
//! often a page here and a page there (a program faulting in its binary and libraries), again
//! a round trip each. For ext4 (what `lsmctl convert` writes):
//!
//! 1. the superblock and the group descriptors say where every group's inode table is and how
//!    much of it is in use; the chunks holding the used part are prefetched, in disk order (so
//!    neighbouring chunks go out as merged fetches: [`ext4_inode_tables`]);
//! 2. then every regular file's extents are read from its inode (extent-tree blocks below the
//!    inode, rare in converted images, are read too: a bounded number), and each file's data
//!    becomes runs of chunks ([`file_runs`]) that the stack fetches ahead of a reader's miss
//!    (`LayerStack::set_file_runs`): one round trip per file rather than per page.
//!
//! Directory blocks are not prefetched: `mkfs.ext4 -d` writes each directory's block among its
//! files, so on the python image fetching them all would move more bytes than its whole start
//! (README, "What a lazy start fetches").
//!
//! Everything here is read from the image, so it is untrusted: every offset is bounds-checked,
//! arithmetic is checked, and the totals are capped ([`MAX_META_BYTES`], [`MAX_TREE_BLOCKS`]);
//! anything that does not add up yields fewer runs or none, never a panic. A wrong run only
//! costs bytes: every chunk fetched is checked against its digest as any other. Reads here go
//! through the lower layers only and are not counted as needed (they are not the start's):
//! on an image whose upper layer rewrote files the runs are stale hints, nothing more.

use std::sync::Arc;

use blockfmt::merged::Target;
use blockfmt::{Image, LayerStack};

/// Most bytes of inode tables prefetched (a hint, not a promise).
pub const MAX_META_BYTES: u64 = 256 << 20;
/// Default of `lsmd serve --file-ahead-kb` (most stored bytes one fetch ahead in a file asks
/// for): off. Measured on the startup bench at 100 Mbit/s (`benches/startup/HISTORY.md`, "Lazy
/// start: fetching ahead in files"): 2048 cut python's GETs 109 → 80 and pip's 347 → 249 but
/// made both starts slower (more bytes, and readers waiting for a long fetch that holds their
/// chunk); 64–512 save at most 5–10 % (README, the startup section's table of trace-free levers).
pub const FILE_AHEAD_KB: u64 = 0;
/// Most extent-tree blocks (below the inodes) read to find files' extents.
pub const MAX_TREE_BLOCKS: usize = 4096;

const SUPERBLOCK_OFFSET: u64 = 1024;
const EXT4_MAGIC: u16 = 0xEF53;
const INCOMPAT_64BIT: u32 = 0x80;
/// Group descriptor flag: the inode table is not initialised (nothing in use).
const BG_INODE_UNINIT: u16 = 0x1;
/// Inode flags: the file's blocks are in an extent tree; its data is inline in the inode.
const EXT4_EXTENTS_FL: u32 = 0x80000;
const EXT4_INLINE_DATA_FL: u32 = 0x1000_0000;
const EXTENT_MAGIC: u16 = 0xF30A;
/// Deepest extent tree ext4 makes.
const MAX_TREE_DEPTH: u16 = 5;

fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(o..o + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(o..o + 4)?.try_into().ok()?))
}

/// What the superblock and group descriptors say: the block size, the inode size and the
/// byte ranges (offset, length) of the used part of every inode table, in disk order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ext4Geometry {
    pub block: u64,
    pub inode_size: u64,
    pub inode_tables: Vec<(u64, u64)>,
}

/// Byte ranges (offset, length) of the used part of every ext4 inode table in `image`, or
/// nothing if the disk does not hold ext4 (or its superblock does not add up).
pub fn ext4_inode_tables(image: &Image) -> Vec<(u64, u64)> {
    ext4_geometry(image.lower())
        .map(|g| g.inode_tables)
        .unwrap_or_default()
}

/// The ext4 geometry of `stack`'s disk, if it holds ext4 that adds up.
pub fn ext4_geometry(stack: &LayerStack) -> Option<Ext4Geometry> {
    let mut sb = vec![0u8; 1024];
    read_quiet(stack, SUPERBLOCK_OFFSET, &mut sb)?;
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
    if per_group == 0 || !(128..=block).contains(&inode_size) || !(32..=1024).contains(&desc) {
        return None;
    }
    let groups = blocks.checked_sub(first_data)?.div_ceil(per_group);
    let gdt_len = groups.checked_mul(desc)?;
    if gdt_len > 64 << 20 {
        return None;
    }
    let gdt_off = (first_data + 1).checked_mul(block)?;
    let mut gdt = vec![0u8; gdt_len as usize];
    read_quiet(stack, gdt_off, &mut gdt)?;
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
        if len == 0 || stack.check_range(off, len).is_err() {
            continue;
        }
        total += len;
        if total > MAX_META_BYTES {
            break;
        }
        out.push((off, len));
    }
    out.sort_unstable();
    Some(Ext4Geometry {
        block,
        inode_size,
        inode_tables: out,
    })
}

/// Reads `buf.len()` bytes at `off` of the lower layers, loading chunks as a prefetch does (not
/// counted as needed, so a startup trace does not list them). `None` if any of it fails.
fn read_quiet(stack: &LayerStack, off: u64, buf: &mut [u8]) -> Option<()> {
    let segs = stack.map(off, buf.len() as u64).ok()?;
    for s in segs {
        let at = usize::try_from(s.offset - off).ok()?;
        let dst = buf.get_mut(at..at.checked_add(usize::try_from(s.len).ok()?)?)?;
        match s.target {
            Target::Hole | Target::Zero { .. } => dst.fill(0),
            Target::Data {
                layer,
                chunk,
                chunk_offset,
            } => {
                let c = stack.load_chunk(layer, chunk).ok()?;
                let from = chunk_offset as usize;
                dst.copy_from_slice(c.get(from..from.checked_add(dst.len())?)?);
            }
        }
    }
    Some(())
}

/// Every regular file's data in `stack` as runs of chunks `(layer, first, end)`: each file's
/// extents in its order, mapped to the chunks that hold them, cut where the next chunk is not
/// the one after in the same layer. Runs of one chunk are left out (nothing to fetch ahead).
/// Reads the inode tables (prefetched before) and at most [`MAX_TREE_BLOCKS`] extent-tree
/// blocks.
pub fn file_runs(stack: &LayerStack, geo: &Ext4Geometry) -> Vec<(u16, u32, u32)> {
    let mut runs = Vec::new();
    let mut tree_budget = MAX_TREE_BLOCKS;
    let mut table = Vec::new();
    for &(off, len) in &geo.inode_tables {
        let Ok(len) = usize::try_from(len) else {
            continue;
        };
        table.resize(len, 0);
        if read_quiet(stack, off, &mut table).is_none() {
            continue;
        }
        for inode in table.chunks_exact(geo.inode_size as usize) {
            let mut extents = Vec::new();
            file_extents(stack, geo.block, inode, &mut tree_budget, &mut extents);
            push_runs(stack, &extents, &mut runs);
        }
    }
    runs
}

/// The extents `(disk offset, length)` of the regular file `inode` describes, in file order,
/// appended to `out`; none for anything else (directories, links, inline data, deleted).
fn file_extents(
    stack: &LayerStack,
    block: u64,
    inode: &[u8],
    budget: &mut usize,
    out: &mut Vec<(u64, u64)>,
) {
    let (Some(mode), Some(links), Some(flags)) =
        (u16_at(inode, 0), u16_at(inode, 0x1A), u32_at(inode, 0x20))
    else {
        return;
    };
    let regular = mode & 0xF000 == 0x8000 && links > 0;
    if !regular || flags & EXT4_EXTENTS_FL == 0 || flags & EXT4_INLINE_DATA_FL != 0 {
        return;
    }
    if let Some(root) = inode.get(0x28..0x28 + 60) {
        extent_node(stack, block, root, None, budget, out);
    }
}

/// Appends the extents under one extent-tree node (`node`: header and entries) to `out`,
/// reading child blocks while `budget` lasts. `depth`: what the parent says this node's depth
/// must be (`None` at the root).
fn extent_node(
    stack: &LayerStack,
    block: u64,
    node: &[u8],
    depth: Option<u16>,
    budget: &mut usize,
    out: &mut Vec<(u64, u64)>,
) {
    let (Some(magic), Some(entries), Some(d)) = (u16_at(node, 0), u16_at(node, 2), u16_at(node, 6))
    else {
        return;
    };
    if magic != EXTENT_MAGIC || d > MAX_TREE_DEPTH || depth.is_some_and(|want| want != d) {
        return;
    }
    for i in 0..entries as usize {
        let Some(e) = node.get(12 + i * 12..24 + i * 12) else {
            return;
        };
        let (Some(lo), Some(hi)) = (
            u32_at(e, if d == 0 { 8 } else { 4 }),
            u16_at(e, if d == 0 { 6 } else { 8 }),
        ) else {
            return;
        };
        let Some(at) = ((hi as u64) << 32 | lo as u64).checked_mul(block) else {
            return;
        };
        if d == 0 {
            let Some(len) = u16_at(e, 4) else { return };
            // Over 32768: an unwritten extent, which reads as zeroes (no data to fetch).
            if len <= 32768 {
                out.push((at, len as u64 * block));
            }
            continue;
        }
        if *budget == 0 {
            return;
        }
        *budget -= 1;
        let mut child = vec![0u8; block as usize];
        if read_quiet(stack, at, &mut child).is_some() {
            extent_node(stack, block, &child, Some(d - 1), budget, out);
        }
    }
}

/// Maps one file's `extents` to chunk runs (see [`file_runs`]) appended to `runs`.
fn push_runs(stack: &LayerStack, extents: &[(u64, u64)], runs: &mut Vec<(u16, u32, u32)>) {
    let mut cur: Option<(u16, u32, u32)> = None;
    let flush = |r: Option<(u16, u32, u32)>, runs: &mut Vec<(u16, u32, u32)>| {
        if let Some(r) = r.filter(|r| r.2 - r.1 >= 2) {
            runs.push(r);
        }
    };
    for &(off, len) in extents {
        let Ok(segs) = stack.map(off, len) else {
            continue;
        };
        for s in segs {
            let Target::Data { layer, chunk, .. } = s.target else {
                continue;
            };
            cur = match cur {
                Some((l, first, end)) if l == layer && chunk.saturating_add(1) == end => {
                    Some((l, first, end))
                }
                Some((l, first, end)) if l == layer && chunk == end => Some((l, first, end + 1)),
                other => {
                    flush(other, runs);
                    Some((layer, chunk, chunk.saturating_add(1)))
                }
            };
        }
    }
    flush(cur, runs);
}

/// Installs `image`'s file runs ([`file_runs`]) in its stack, if its disk holds ext4 and
/// fetching ahead in files is on (`LayerStack::set_file_ahead_bytes`). Returns how many runs
/// (for the log).
pub fn map_files(image: &Arc<Image>) -> usize {
    let stack = image.lower();
    if stack.file_ahead_bytes() == 0 {
        return 0;
    }
    let Some(geo) = ext4_geometry(stack) else {
        return 0;
    };
    let runs = file_runs(stack, &geo);
    stack.set_file_runs(&runs);
    runs.len()
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
        // A "program" of 1 MiB: eight 128 KiB chunks of one file.
        let big: Vec<u8> = (0..1u32 << 20)
            .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
            .collect();
        std::fs::write(dir.join("prog"), &big).expect("file");
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
        // The program's data is one run of at least its eight chunks, found from its inode;
        // the 5000-byte files make no run (one chunk each, nothing to fetch ahead).
        let geo = ext4_geometry(img.lower()).expect("ext4");
        let runs = file_runs(img.lower(), &geo);
        let chunks = img.lower().layers()[0].metadata().chunks.len() as u32;
        assert!(
            runs.iter()
                .all(|&(l, f, e)| l == 0 && f + 2 <= e && e <= chunks),
            "{runs:?}"
        );
        assert!(runs.iter().any(|&(_, f, e)| e - f >= 8), "{runs:?}");
        let bs = geo.block as usize;
        let at = (bs
            * disk
                .chunks(bs)
                .position(|b| b == &big[..bs])
                .expect("the program's first block")) as u64;
        let seg = img.lower().map(at, 1).expect("map").remove(0);
        let Target::Data { chunk, .. } = seg.target else {
            panic!("{seg:?}")
        };
        assert!(
            runs.iter()
                .any(|&(_, f, e)| (f..e).contains(&chunk) && e - chunk >= 8),
            "{runs:?} {chunk}"
        );
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

        /// Fuzz: any inode of a regular extent-mapped file (its extent tree, and the blocks its
        /// index entries point to, random) gives runs inside the layer's chunks, never a panic.
        #[test]
        fn garbage_extent_trees_never_panic(mut inode in proptest::collection::vec(any::<u8>(), 256), depth in 0u16..7, fill in proptest::collection::vec(any::<u8>(), 4096)) {
            let mut disk = fill.repeat(256);
            // Child blocks that look like extent nodes one level down, now and then.
            for b in (0..disk.len()).step_by(12288) {
                disk[b..b + 2].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
            }
            let img = image_of(&disk);
            inode[0..2].copy_from_slice(&0o100644u16.to_le_bytes());
            inode[0x1A..0x1C].copy_from_slice(&1u16.to_le_bytes());
            inode[0x20..0x24].copy_from_slice(&EXT4_EXTENTS_FL.to_le_bytes());
            inode[0x28..0x2A].copy_from_slice(&EXTENT_MAGIC.to_le_bytes());
            inode[0x2E..0x30].copy_from_slice(&depth.to_le_bytes());
            let mut budget = 64;
            let mut extents = Vec::new();
            file_extents(img.lower(), 4096, &inode, &mut budget, &mut extents);
            let mut runs = Vec::new();
            push_runs(img.lower(), &extents, &mut runs);
            let chunks = img.lower().layers()[0].metadata().chunks.len() as u32;
            for (l, f, e) in runs {
                prop_assert!(l == 0 && f < e && e <= chunks);
            }
        }
    }
}
