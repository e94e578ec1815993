//! Packed layers (startup layers, FORMAT.md §9): blocks stored in the order given, whatever
//! their disk offsets, read back exactly; and the exact trace's block record they are made from.

use std::sync::Arc;

use blockfmt::stack::TRACE_BLOCK;
use blockfmt::{Compression, Layer, LayerStack, LayerWriter, WriterOptions};
use proptest::prelude::*;

const DISK: u64 = 4 << 20;

fn opts(chunk_kb: u32) -> WriterOptions {
    WriterOptions {
        chunk_size: chunk_kb * 1024,
        compression: Compression::Zstd(3),
        dedup: false,
        ..Default::default()
    }
}

/// A bottom layer holding `disk` whole.
fn base(disk: &[u8]) -> Layer {
    let mut w = LayerWriter::new(Vec::new(), DISK, opts(128)).expect("writer");
    w.write_data(0, disk).expect("write");
    let (_, bytes) = w.finish().expect("finish");
    Layer::open("base", Arc::new(bytes), None).expect("open base")
}

/// `disk`'s blocks `order` (block numbers), packed in that order.
fn packed(disk: &[u8], order: &[u64], chunk_kb: u32) -> Layer {
    let blocks = order.iter().map(|&b| {
        let off = b * TRACE_BLOCK;
        (
            off,
            disk[off as usize..(off + TRACE_BLOCK) as usize].to_vec(),
        )
    });
    let w = LayerWriter::new(Vec::new(), DISK, opts(chunk_kb)).expect("writer");
    let (_, bytes) = w.write_packed(blocks).expect("packed");
    Layer::open("packed", Arc::new(bytes), None).expect("open packed")
}

/// A disk of distinct blocks (each starts with its number), with block 7 all zero.
fn disk() -> Vec<u8> {
    let mut d = vec![0u8; DISK as usize];
    for (i, b) in d.chunks_mut(TRACE_BLOCK as usize).enumerate() {
        b.fill((i % 251) as u8 | 1);
        b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    d[7 * 4096..8 * 4096].fill(0);
    d
}

proptest! {
    /// Any set of blocks in any order: over a base holding the disk, the stack reads the disk
    /// (the packed layer's blocks equal it); its first chunk holds the first blocks given, in
    /// that order; on its own it reads exactly the packed blocks.
    #[test]
    fn packed_blocks_read_back_in_place_and_are_stored_in_the_order_given(
        picks in proptest::collection::vec(0u64..DISK / TRACE_BLOCK, 1..200),
        chunk_kb in prop_oneof![Just(4u32), Just(64), Just(1024)],
    ) {
        let d = disk();
        let mut seen = std::collections::HashSet::new();
        let order: Vec<u64> = picks.into_iter().filter(|b| seen.insert(*b)).collect();
        let top = packed(&d, &order, chunk_kb);
        let first = top.read_chunk(0).expect("chunk 0");
        let nonzero: Vec<u64> = order.iter().copied().filter(|&b| b != 7).collect();
        for (k, b) in nonzero.iter().take(first.len() / 4096).enumerate() {
            prop_assert_eq!(&first[k * 4096..k * 4096 + 8], &b.to_le_bytes()[..]);
        }
        let alone = LayerStack::new(vec![packed(&d, &order, chunk_kb)], DISK, 1 << 20).expect("stack");
        let mut got = vec![0u8; 4096];
        for &b in &order {
            let s = alone.map(b * TRACE_BLOCK, TRACE_BLOCK).expect("map");
            prop_assert_eq!(s.len(), 1);
            alone.read_segment(&s[0], &mut got).expect("read");
            prop_assert_eq!(&got[..], &d[(b * 4096) as usize..(b * 4096 + 4096) as usize]);
        }
        let stack = LayerStack::new(vec![base(&d), top], DISK, 8 << 20).expect("stack");
        let mut all = vec![0u8; DISK as usize];
        let mut off = 0;
        for s in stack.map(0, DISK).expect("map") {
            stack.read_segment(&s, &mut all[off..off + s.len as usize]).expect("read");
            off += s.len as usize;
        }
        prop_assert!(all == d);
    }
}

#[test]
fn an_exact_trace_records_the_blocks_read_in_first_read_order() {
    let d = disk();
    let stack = LayerStack::new(vec![base(&d)], DISK, 8 << 20).expect("stack");
    stack.set_exact_trace(true);
    let mut buf = vec![0u8; 6000];
    for off in [3 * 4096 + 100, 0, 3 * 4096, 40 * 4096 - 10] {
        for s in stack.map(off, buf.len() as u64).expect("map") {
            let at = (s.offset - off) as usize;
            stack
                .read_segment(&s, &mut buf[at..at + s.len as usize])
                .expect("read");
        }
    }
    assert_eq!(stack.touched_blocks(), vec![3, 4, 0, 1, 39, 40, 41]);
    let plain = LayerStack::new(vec![base(&d)], DISK, 8 << 20).expect("stack");
    let s = plain.map(0, 4096).expect("map");
    plain.read_segment(&s[0], &mut buf[..4096]).expect("read");
    assert!(plain.touched_blocks().is_empty());
}

/// A fallible top layer (how lsmd stacks a startup layer) whose first chunk fails its digest
/// check: the read that meets it refuses the top and takes those blocks from the layer below,
/// so the disk still reads exactly; every later map skips the top. Stacked plainly, the same
/// read is an error: a chunk that fails its check is never served.
#[test]
fn a_fallible_top_whose_chunk_fails_its_check_is_refused_and_the_layers_below_answer() {
    let d = disk();
    let order: Vec<u64> = (0..64).rev().collect();
    let w = LayerWriter::new(Vec::new(), DISK, opts(64)).expect("writer");
    let blocks = order.iter().map(|&b| {
        let off = b * TRACE_BLOCK;
        (off, d[off as usize..(off + TRACE_BLOCK) as usize].to_vec())
    });
    let (_, mut bytes) = w.write_packed(blocks).expect("packed");
    bytes[64 + 10] ^= 0x01; // in chunk 0, right after the 64-byte header
    let bytes = Arc::new(bytes);
    let top = |b: &Arc<Vec<u8>>| Layer::open("packed", b.clone(), None).expect("metadata intact");
    let read_all = |stack: &LayerStack| -> blockfmt::Result<Vec<u8>> {
        let mut all = vec![0u8; 64 * 4096];
        for s in stack.map(0, all.len() as u64)? {
            let at = s.offset as usize;
            stack.read_segment(&s, &mut all[at..at + s.len as usize])?;
        }
        Ok(all)
    };

    let plain = LayerStack::new(vec![base(&d), top(&bytes)], DISK, 8 << 20).expect("stack");
    assert!(read_all(&plain).is_err());
    assert!(!plain.refuse_top(), "a plain stack has no fallible top");

    let stack = LayerStack::new(vec![base(&d), top(&bytes)], DISK, 8 << 20)
        .and_then(LayerStack::with_fallible_top)
        .expect("stack");
    assert!(!stack.top_refused());
    assert_eq!(read_all(&stack).expect("read"), d[..64 * 4096]);
    assert!(stack.top_refused());
    assert!(stack
        .map(0, DISK)
        .expect("map")
        .iter()
        .all(|s| !matches!(s.target, blockfmt::merged::Target::Data { layer: 1, .. })));
}
