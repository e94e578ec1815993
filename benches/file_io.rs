//! Does io_uring pay for lsmd's file I/O? The two file paths that remain after the decoded-chunk
//! cache are (1) the upper layer taking a burst of 4 KiB writes (one `pwrite` each today) and
//! (2) a cold read fetching a few compressed chunks from a blob (one `pread` each). Each is
//! measured as plain syscalls and as one io_uring submission for the whole burst, on a file in
//! the page cache (as lsmd's files are between syncs). The decision and its figure are in
//! README ("I/O path").

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use io_uring::{opcode, types, IoUring};

const BURST: usize = 32;

fn scratch_file(len: u64) -> (tempfile::TempDir, File) {
    let dir = tempfile::tempdir().expect("tmp");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(dir.path().join("f"))
        .expect("open");
    f.write_all_at(&vec![1u8; len as usize], 0).expect("fill");
    (dir, f)
}

/// Submits `n` prepared entries and waits for all; panics on a failed op (a benchmark).
fn run_ring(ring: &mut IoUring, entries: &[io_uring::squeue::Entry]) {
    // SAFETY: every entry points at buffers that outlive this call (the caller's), and the
    // call waits for all completions before returning.
    unsafe {
        ring.submission()
            .push_multiple(entries)
            .expect("submission queue has room");
    }
    ring.submit_and_wait(entries.len()).expect("submit");
    for c in ring.completion() {
        assert!(c.result() >= 0, "io_uring op failed: {}", c.result());
    }
}

fn writes(c: &mut Criterion) {
    let (_d, f) = scratch_file(BURST as u64 * 4096);
    let buf = vec![7u8; 4096];
    let mut g = c.benchmark_group("upper_write_burst_32x4k");
    g.throughput(Throughput::Elements(BURST as u64));
    g.bench_function("pwrite", |b| {
        b.iter(|| {
            for i in 0..BURST {
                f.write_all_at(&buf, i as u64 * 4096).expect("pwrite");
            }
        })
    });
    let mut ring = IoUring::new(64).expect("io_uring");
    let fd = types::Fd(f.as_raw_fd());
    let entries: Vec<_> = (0..BURST)
        .map(|i| {
            opcode::Write::new(fd, buf.as_ptr(), 4096)
                .offset(i as u64 * 4096)
                .build()
        })
        .collect();
    g.bench_function("io_uring", |b| b.iter(|| run_ring(&mut ring, &entries)));
    g.finish();
}

fn reads(c: &mut Criterion) {
    const CHUNK: usize = 64 << 10; // a compressed 128 KiB chunk is about this size
    const N: usize = 8; // a 1 MiB cold read
    let (_d, f) = scratch_file((N * CHUNK) as u64);
    let mut bufs = vec![vec![0u8; CHUNK]; N];
    let mut g = c.benchmark_group("cold_read_8_chunks");
    g.throughput(Throughput::Bytes((N * CHUNK) as u64));
    g.bench_function("pread", |b| {
        b.iter(|| {
            for (i, buf) in bufs.iter_mut().enumerate() {
                f.read_exact_at(buf, (i * CHUNK) as u64).expect("pread");
            }
        })
    });
    let mut ring = IoUring::new(64).expect("io_uring");
    let fd = types::Fd(f.as_raw_fd());
    let entries: Vec<_> = bufs
        .iter_mut()
        .enumerate()
        .map(|(i, buf)| {
            opcode::Read::new(fd, buf.as_mut_ptr(), CHUNK as u32)
                .offset((i * CHUNK) as u64)
                .build()
        })
        .collect();
    g.bench_function("io_uring", |b| b.iter(|| run_ring(&mut ring, &entries)));
    g.finish();
}

criterion_group!(benches, writes, reads);
criterion_main!(benches);
