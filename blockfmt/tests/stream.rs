//! A startup layer fetched as one in-order stream (`LayerStack::stream_chunks`, FORMAT.md §9):
//! each chunk reaches the readers waiting for it as soon as it is in and checked, without a
//! fetch of their own; a chunk that fails its check refuses the fallible top and ends the
//! stream, and the layers below answer.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use blockfmt::stack::TRACE_BLOCK;
use blockfmt::{Compression, Layer, LayerStack, LayerWriter, ReadAt, WriterOptions};

const DISK: u64 = 4 << 20;
/// Blocks in the packed top layer (4 chunks of 64 KiB).
const PACKED: u64 = 64;

fn opts(chunk_kb: u32) -> WriterOptions {
    WriterOptions {
        chunk_size: chunk_kb * 1024,
        compression: Compression::Zstd(3),
        dedup: false,
        ..Default::default()
    }
}

/// A disk of distinct blocks (each starts with its number).
fn disk() -> Vec<u8> {
    let mut d = vec![0u8; DISK as usize];
    for (i, b) in d.chunks_mut(TRACE_BLOCK as usize).enumerate() {
        b.fill((i % 251) as u8 | 1);
        b[..8].copy_from_slice(&(i as u64).to_le_bytes());
    }
    d
}

/// A bottom layer holding `disk` whole.
fn base(disk: &[u8]) -> Layer {
    let mut w = LayerWriter::new(Vec::new(), DISK, opts(128)).expect("writer");
    w.write_data(0, disk).expect("write");
    let (_, bytes) = w.finish().expect("finish");
    Layer::open("base", Arc::new(bytes), None).expect("open base")
}

/// The blob of a startup layer: blocks `PACKED - 1` down to 0 of `disk`, in that order, in
/// 64 KiB chunks (chunk 0 holds blocks 63..=48).
fn packed_blob(disk: &[u8]) -> Vec<u8> {
    let blocks = (0..PACKED).rev().map(|b| {
        let off = b * TRACE_BLOCK;
        (
            off,
            disk[off as usize..(off + TRACE_BLOCK) as usize].to_vec(),
        )
    });
    let w = LayerWriter::new(Vec::new(), DISK, opts(64)).expect("writer");
    w.write_packed(blocks).expect("packed").1
}

/// Reads block `b` of `stack`.
fn read_block(stack: &LayerStack, b: u64) -> blockfmt::Result<Vec<u8>> {
    let mut out = vec![0u8; TRACE_BLOCK as usize];
    for s in stack.map(b * TRACE_BLOCK, TRACE_BLOCK)? {
        let at = (s.offset - b * TRACE_BLOCK) as usize;
        stack.read_segment(&s, &mut out[at..at + s.len as usize])?;
    }
    Ok(out)
}

fn block_of(d: &[u8], b: u64) -> &[u8] {
    &d[(b * TRACE_BLOCK) as usize..((b + 1) * TRACE_BLOCK) as usize]
}

/// A blob whose streamed reads hand on 1000 bytes at a time and, once `hold_after` bytes of
/// the blob are handed on, wait for `gate` (at most 10 s: then `timed_out`) before the rest:
/// a link whose later bytes are still on the wire. Counts the other reads made of it.
struct Gated {
    blob: Vec<u8>,
    hold_after: AtomicU64,
    gate: parking_lot::Mutex<mpsc::Receiver<()>>,
    streaming: AtomicBool,
    timed_out: AtomicBool,
    streams: AtomicU64,
    reads: AtomicU64,
}

impl ReadAt for Gated {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.reads.fetch_add(1, SeqCst);
        self.blob.read_exact_at(buf, off)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.blob.len() as u64)
    }
    fn read_stream_at(
        &self,
        offset: u64,
        len: u64,
        sink: &mut dyn FnMut(&[u8]) -> bool,
    ) -> std::io::Result<()> {
        self.streams.fetch_add(1, SeqCst);
        self.streaming.store(true, SeqCst);
        let (mut at, end) = (offset as usize, (offset + len) as usize);
        let hold = self.hold_after.load(SeqCst) as usize;
        while at < end {
            let n = 1000
                .min(end - at)
                .min(if at < hold { hold - at } else { usize::MAX });
            if !sink(&self.blob[at..at + n]) {
                return Ok(());
            }
            at += n;
            if at == hold
                && self
                    .gate
                    .lock()
                    .recv_timeout(Duration::from_secs(10))
                    .is_err()
            {
                self.timed_out.store(true, SeqCst);
            }
        }
        Ok(())
    }
}

#[test]
fn a_streamed_chunk_reaches_a_waiting_reader_before_the_stream_ends_and_costs_it_no_fetch() {
    let d = disk();
    let (open_gate, gate) = mpsc::channel();
    let src = Arc::new(Gated {
        blob: packed_blob(&d),
        hold_after: AtomicU64::new(u64::MAX),
        gate: parking_lot::Mutex::new(gate),
        streaming: AtomicBool::new(false),
        timed_out: AtomicBool::new(false),
        streams: AtomicU64::new(0),
        reads: AtomicU64::new(0),
    });
    let top = Layer::open("startup", src.clone(), None).expect("open");
    let chunks = top.metadata().chunks.clone();
    assert_eq!(chunks.len(), 4);
    // The link holds back everything after chunk 0.
    src.hold_after
        .store(chunks[0].offset + chunks[0].stored_len as u64, SeqCst);
    let stack = LayerStack::new(vec![base(&d), top], DISK, 8 << 20)
        .and_then(LayerStack::with_fallible_top)
        .map(Arc::new)
        .expect("stack");
    let reads_at_open = src.reads.load(SeqCst);

    let streamer = {
        let stack = stack.clone();
        std::thread::spawn(move || stack.stream_chunks(1, 0, 4, u64::MAX))
    };
    while !src.streaming.load(SeqCst) {
        std::thread::yield_now();
    }
    // Block 63 is in chunk 0: served while chunks 1..=3 are still held back.
    assert_eq!(read_block(&stack, 63).expect("read"), block_of(&d, 63));
    assert!(
        !src.timed_out.load(SeqCst),
        "the read waited for the whole stream"
    );
    // Block 0 is in chunk 3: its reader waits for the stream, then gets it.
    let late = {
        let stack = stack.clone();
        std::thread::spawn(move || read_block(&stack, 0))
    };
    std::thread::sleep(Duration::from_millis(50));
    open_gate.send(()).expect("gate");
    assert_eq!(late.join().expect("reader").expect("read"), block_of(&d, 0));
    streamer.join().expect("streamer").expect("stream");
    assert_eq!(
        src.streams.load(SeqCst),
        1,
        "one streamed read for the layer"
    );
    assert_eq!(
        src.reads.load(SeqCst),
        reads_at_open,
        "a reader fetched a chunk of the stream itself"
    );
    assert!(!stack.top_refused());
    for b in 0..PACKED {
        assert_eq!(read_block(&stack, b).expect("read"), block_of(&d, b));
    }
}

#[test]
fn a_streamed_chunk_that_fails_its_check_refuses_the_fallible_top_and_ends_the_stream() {
    let d = disk();
    let good = packed_blob(&d);
    let chunks = Layer::open("startup", Arc::new(good.clone()), None)
        .expect("open")
        .metadata()
        .chunks
        .clone();
    let mut bad = good.clone();
    bad[(chunks[1].offset + 10) as usize] ^= 0x01;
    let bad = Arc::new(bad);
    let top = || Layer::open("startup", bad.clone(), None).expect("metadata intact");

    let stack = LayerStack::new(vec![base(&d), top()], DISK, 8 << 20)
        .and_then(LayerStack::with_fallible_top)
        .expect("stack");
    assert!(stack.stream_chunks(1, 0, 4, u64::MAX).is_err());
    assert!(stack.top_refused());
    assert!(stack.cached_chunk(1, 0).is_some(), "chunk 0 passed");
    assert!(
        stack.cached_chunk(1, 1).is_none(),
        "a failed chunk is never kept"
    );
    assert!(
        stack.cached_chunk(1, 2).is_none(),
        "the stream went on past the refusal"
    );
    for b in 0..PACKED {
        assert_eq!(read_block(&stack, b).expect("read"), block_of(&d, b));
    }

    // Stacked plainly, the stream goes on past the failed chunk, which is never served.
    let plain = LayerStack::new(vec![base(&d), top()], DISK, 8 << 20).expect("stack");
    assert!(plain.stream_chunks(1, 0, 4, u64::MAX).is_err());
    assert!(plain.cached_chunk(1, 1).is_none());
    assert!(plain.cached_chunk(1, 2).is_some() && plain.cached_chunk(1, 3).is_some());
    assert!(read_block(&plain, 47).is_err(), "block 47 is in chunk 1");
}
