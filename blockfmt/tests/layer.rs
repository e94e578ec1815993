//! Layer blob behaviour end to end inside the library: round trips, determinism, stacking, and
//! corruption anywhere in a blob giving an error, never different data.

use std::sync::Arc;

use blockfmt::commit::import_raw;
use blockfmt::{Compression, Error, Image, Layer, LayerStack, LayerWriter, WriterOptions};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// A disk with text-like data, random data, zero runs and holes.
fn sample_disk(size: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut d = vec![0u8; size];
    let mut pos = 0;
    while pos < size {
        let n = rng.gen_range(1..40_000).min(size - pos);
        match rng.gen_range(0..4) {
            0 => {}
            1 => rng.fill(&mut d[pos..pos + n]),
            _ => {
                let words = [&b"block "[..], b"layer ", b"chunk ", b"extent "];
                let mut i = pos;
                while i < pos + n {
                    let w = words[rng.gen_range(0..4)];
                    let k = w.len().min(pos + n - i);
                    d[i..i + k].copy_from_slice(&w[..k]);
                    i += k;
                }
            }
        }
        pos += n;
    }
    d
}

fn build(disk: &[u8], opts: WriterOptions) -> Vec<u8> {
    let (_, out) = import_raw(
        disk,
        disk.len() as u64,
        None,
        None,
        Vec::new(),
        opts,
        |_| {},
    )
    .unwrap();
    out
}

/// A blob in memory that counts the reads made of it and their bytes.
struct Counting {
    blob: Vec<u8>,
    reads: std::sync::atomic::AtomicU64,
    bytes: std::sync::atomic::AtomicU64,
}

impl Counting {
    fn new(blob: Vec<u8>) -> Counting {
        Counting {
            blob,
            reads: 0.into(),
            bytes: 0.into(),
        }
    }

    /// (reads, bytes) so far.
    fn reads(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.reads.load(SeqCst), self.bytes.load(SeqCst))
    }
}

impl blockfmt::ReadAt for Counting {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        use std::sync::atomic::Ordering::SeqCst;
        self.reads.fetch_add(1, SeqCst);
        self.bytes.fetch_add(buf.len() as u64, SeqCst);
        self.blob.read_exact_at(buf, off)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.blob.len() as u64)
    }
}

/// Reads of a bare stack, through its public segment API (the crate reads through `Image`).
trait ReadStack {
    fn read(&self, off: u64, buf: &mut [u8]) -> blockfmt::Result<()>;
}

impl ReadStack for LayerStack {
    fn read(&self, off: u64, buf: &mut [u8]) -> blockfmt::Result<()> {
        for seg in self.map(off, buf.len() as u64)? {
            let at = (seg.offset - off) as usize;
            self.read_segment(&seg, &mut buf[at..at + seg.len as usize])?;
        }
        Ok(())
    }
}

fn open_stack(blobs: &[Vec<u8>], size: u64) -> blockfmt::Result<LayerStack> {
    let layers = blobs
        .iter()
        .enumerate()
        .map(|(i, b)| Layer::open(format!("layer{i}"), Arc::new(b.clone()), None))
        .collect::<blockfmt::Result<Vec<_>>>()?;
    LayerStack::new(layers, size, 1 << 20)
}

fn read_all(s: &LayerStack) -> blockfmt::Result<Vec<u8>> {
    let mut out = vec![0u8; s.size() as usize];
    for (i, piece) in out.chunks_mut(100_000).enumerate() {
        s.read(i as u64 * 100_000, piece)?;
    }
    Ok(out)
}

#[test]
fn round_trip_every_chunk_size_and_codec() {
    let disk = sample_disk(3 << 20, 1);
    for cs in [4096u32, 65536, 1 << 20] {
        for c in [
            Compression::None,
            Compression::Zstd(1),
            Compression::Zstd(9),
        ] {
            let blob = build(
                &disk,
                WriterOptions {
                    chunk_size: cs,
                    compression: c,
                    ..Default::default()
                },
            );
            let s = open_stack(&[blob], disk.len() as u64).unwrap();
            assert_eq!(read_all(&s).unwrap(), disk, "chunk size {cs} {c:?}");
            // Unaligned small reads too.
            let mut b = vec![0u8; 777];
            s.read(12345, &mut b).unwrap();
            assert_eq!(b, disk[12345..12345 + 777]);
        }
    }
}

#[test]
fn writing_is_deterministic() {
    let disk = sample_disk(2 << 20, 2);
    let a = build(&disk, WriterOptions::default());
    let b = build(&disk, WriterOptions::default());
    assert_eq!(a, b);
}

/// Runs each batch on threads of its own, in reverse order (a host pool gives no order).
struct ThreadsReversed;

impl blockfmt::ParallelLoads for ThreadsReversed {
    fn run_all(&self, tasks: Vec<blockfmt::LoadTask>) {
        let handles: Vec<_> = tasks.into_iter().rev().map(std::thread::spawn).collect();
        for h in handles {
            h.join().unwrap();
        }
    }
}

#[test]
fn parallel_encoding_writes_the_same_blob() {
    let disk = sample_disk(3 << 20, 5);
    for chunk_size in [4096u32, 64 << 10, 128 << 10] {
        let opts = WriterOptions {
            chunk_size,
            ..WriterOptions::default()
        };
        let write = |parallel: Option<usize>| {
            let mut w = LayerWriter::new(Vec::new(), disk.len() as u64, opts).unwrap();
            if let Some(batch) = parallel {
                w.set_parallel(Arc::new(ThreadsReversed), batch);
            }
            // Pieces of 12 KiB, so chunk cuts and writes do not line up.
            for (i, piece) in disk.chunks(12_288).enumerate() {
                w.write_data((i * 12_288) as u64, piece).unwrap();
            }
            w.finish().unwrap().1
        };
        let sequential = write(None);
        for batch in [2, 3, 16] {
            let parallel = write(Some(batch));
            assert!(
                parallel == sequential,
                "chunk size {chunk_size}, batch {batch}"
            );
        }
    }
}

#[test]
fn a_stack_of_three_diff_layers_reads_as_the_last_version() {
    let v1 = sample_disk(2 << 20, 3);
    let mut v2 = v1.clone();
    v2[100_000..300_000].copy_from_slice(&sample_disk(200_000, 4));
    v2[500_000..600_000].fill(0);
    let mut v3 = v2.clone();
    v3[250_000..1_200_000].copy_from_slice(&sample_disk(950_000, 5));
    v3[2_000_000..2_000_100].fill(7);
    let size = v1.len() as u64;
    let mut blobs = vec![build(&v1, WriterOptions::default())];
    for next in [&v2, &v3] {
        let base = Image::new(open_stack(&blobs, size).unwrap(), None).unwrap();
        let (_, blob) = import_raw(
            &next[..],
            size,
            Some(&base),
            None,
            Vec::new(),
            WriterOptions::default(),
            |_| {},
        )
        .unwrap();
        blobs.push(blob);
    }
    assert!(
        blobs[1].len() < blobs[0].len() / 3,
        "a diff layer holds only the changes"
    );
    assert_eq!(
        read_all(&open_stack(&blobs[..2], size).unwrap()).unwrap(),
        v2
    );
    assert_eq!(read_all(&open_stack(&blobs, size).unwrap()).unwrap(), v3);
}

#[test]
fn opening_takes_at_most_two_reads() {
    // 4 KiB chunks over 40 MiB of data: metadata far larger than the first tail read.
    let disk = sample_disk(40 << 20, 6);
    let blob = build(
        &disk,
        WriterOptions {
            chunk_size: 4096,
            ..Default::default()
        },
    );
    let src = Arc::new(Counting::new(blob));
    let l = Layer::open("big", src.clone(), None).unwrap();
    assert!(l.trailer().meta_len > blockfmt::reader::TAIL_READ);
    assert_eq!(src.reads(), (2, l.trailer().meta_len + 96));
}

#[test]
fn any_flipped_byte_fails_verify_and_reads_never_return_other_data() {
    let disk = sample_disk(1 << 20, 7);
    let blob = build(
        &disk,
        WriterOptions {
            chunk_size: 16384,
            ..Default::default()
        },
    );
    let mut rng = StdRng::seed_from_u64(8);
    // Every byte of header and trailer, the metadata's edges, and many random positions.
    let n = blob.len();
    let mut positions: Vec<usize> = (0..64).chain(n - 96..n).collect();
    positions.extend((0..600).map(|_| rng.gen_range(0..n)));
    for pos in positions {
        let mut bad = blob.clone();
        bad[pos] ^= 1 << rng.gen_range(0..8);
        let layer = Layer::open("flipped", Arc::new(bad), None);
        match layer {
            Err(e) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("flipped") && msg.contains("offset"),
                    "error names layer and offset: {msg}"
                );
            }
            Ok(l) => {
                assert!(l.verify_all(None).is_err(), "verify missed a flip at {pos}");
                let s = LayerStack::new(vec![l], disk.len() as u64, 0).unwrap();
                match read_all(&s) {
                    Err(Error::Corrupt { layer, .. }) => assert_eq!(layer, "flipped"),
                    Err(e) => panic!("unexpected error kind at {pos}: {e}"),
                    // A flip in the header is caught by verify only: no extent reads it.
                    Ok(d) => {
                        assert!(pos < 64, "read succeeded after a flip at {pos}");
                        assert_eq!(d, disk);
                    }
                }
            }
        }
    }
}

#[test]
fn truncated_and_foreign_blobs_are_rejected() {
    let disk = sample_disk(256 << 10, 9);
    let blob = build(&disk, WriterOptions::default());
    for cut in [0, 1, 63, 64, 100, blob.len() / 2, blob.len() - 1] {
        assert!(Layer::open("cut", Arc::new(blob[..cut].to_vec()), None).is_err());
    }
    let junk: Vec<u8> = (0..10_000u32).map(|i| i as u8).collect();
    assert!(Layer::open("junk", Arc::new(junk), None).is_err());
}

#[test]
fn expected_meta_digest_is_enforced() {
    let disk = sample_disk(256 << 10, 10);
    let mut w = LayerWriter::new(Vec::new(), disk.len() as u64, WriterOptions::default()).unwrap();
    w.write_data(0, &disk).unwrap();
    let (info, blob) = w.finish().unwrap();
    assert!(Layer::open("ok", Arc::new(blob.clone()), Some(info.meta_digest)).is_ok());
    let err = Layer::open("other", Arc::new(blob), Some([1; 32])).unwrap_err();
    assert!(err.to_string().contains("expected"), "{err}");
}

#[test]
fn repeated_blocks_are_stored_once_and_read_back() {
    let mut rng = StdRng::seed_from_u64(11);
    let mut block = vec![0u8; 4096];
    rng.fill(&mut block[..]);
    let mut disk = vec![0u8; 4 << 20];
    // The same random block at many aligned places, in many windows, some adjacent.
    for i in (0..1024).step_by(3) {
        disk[i * 4096..(i + 1) * 4096].copy_from_slice(&block);
    }
    disk[4096 * 2..4096 * 2 + 100].fill(9);
    for cs in [4096u32, 16384, 131072] {
        let opts = WriterOptions {
            chunk_size: cs,
            ..Default::default()
        };
        let blob = build(&disk, opts);
        let s = open_stack(std::slice::from_ref(&blob), disk.len() as u64).unwrap();
        assert_eq!(read_all(&s).unwrap(), disk);
        assert!(
            blob.len() < 64 << 10,
            "{} bytes: repeats were stored again",
            blob.len()
        );
        let off = WriterOptions {
            dedup: false,
            ..opts
        };
        assert!(build(&disk, off).len() > blob.len());
    }
}

/// The frontends' read: `read_sparse` returns the same bytes as `read` and the same map as
/// `map`, over layers and an upper layer; with `cached_only` it declines a cold chunk and
/// serves it once the cache holds it.
#[test]
fn read_sparse_agrees_with_read_and_map() {
    let v1 = sample_disk(1 << 20, 21);
    let mut v2 = v1.clone();
    v2[300_000..340_000].fill(0);
    v2[600_000..610_000].fill(7);
    let base = build(&v1, WriterOptions::default());
    let (_, top) = import_raw(
        &v2[..],
        v2.len() as u64,
        Some(
            &Image::new(
                open_stack(std::slice::from_ref(&base), 1 << 20).unwrap(),
                None,
            )
            .unwrap(),
        ),
        None,
        Vec::new(),
        WriterOptions::default(),
        |_| {},
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let (up, _) = blockfmt::UpperLayer::open(tmp.path(), 1 << 20).unwrap();
    let img = Image::new(open_stack(&[base, top], 1 << 20).unwrap(), Some(up)).unwrap();
    img.write(500_000, &[9; 20_000]).unwrap();
    img.write_zeroes(700_000, 30_000).unwrap();

    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..300 {
        let off = rng.gen_range(0..(1 << 20) - 1);
        let len = rng.gen_range(1..=((1 << 20) - off).min(200_000));
        let mut a = vec![0u8; len as usize];
        img.read(off, &mut a).unwrap();
        let mut b = vec![1u8; len as usize];
        let map = img
            .read_sparse(off, &mut b, false)
            .unwrap()
            .expect("full read");
        assert_eq!(a, b, "bytes at {off}+{len}");
        assert_eq!(map, img.map(off, len).unwrap(), "map at {off}+{len}");
    }
    // A fresh stack: nothing cached yet.
    let cold = open_stack(&[build(&v1, WriterOptions::default())], 1 << 20).unwrap();
    let img = Image::new(cold, None).unwrap();
    let data_at = v1.iter().position(|&x| x != 0).unwrap() as u64;
    let mut b = vec![0u8; 4096];
    assert_eq!(img.read_sparse(data_at, &mut b, true).unwrap(), None);
    img.read(data_at, &mut b).unwrap();
    assert!(img.read_sparse(data_at, &mut b, true).unwrap().is_some());
}

/// Eight readers missing the same chunk at once cause one fetch from the source.
#[test]
fn concurrent_misses_on_one_chunk_fetch_it_once() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Slow {
        data: Vec<u8>,
        reads: AtomicUsize,
    }
    impl blockfmt::ReadAt for Slow {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.reads.fetch_add(1, Ordering::SeqCst);
            std::thread::sleep(std::time::Duration::from_millis(50));
            buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn size(&self) -> std::io::Result<u64> {
            Ok(self.data.len() as u64)
        }
    }
    let disk = sample_disk(1 << 20, 31);
    let src = Arc::new(Slow {
        data: build(&disk, WriterOptions::default()),
        reads: AtomicUsize::new(0),
    });
    let layer = Layer::open("slow", src.clone(), None).unwrap();
    let stack = Arc::new(LayerStack::new(vec![layer], 1 << 20, 8 << 20).unwrap());
    let at = disk.iter().position(|&x| x != 0).unwrap() as u64;
    let before = src.reads.load(Ordering::SeqCst);
    let readers: Vec<_> = (0..8)
        .map(|_| {
            let s = stack.clone();
            std::thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                s.read(at, &mut b).unwrap();
                b
            })
        })
        .collect();
    for r in readers {
        let b = r.join().unwrap();
        assert_eq!(b, disk[at as usize..at as usize + 4096]);
    }
    assert_eq!(src.reads.load(Ordering::SeqCst) - before, 1);
}

/// Cross-image dedup: a disk holding the same 4 KiB blocks as a dictionary layer, moved by whole
/// blocks and with a few changes, borrows them; it reads back exactly with the dictionary blob
/// attached, and without it fails naming that blob, never returning other bytes.
#[test]
fn dictionary_blocks_are_borrowed_across_blobs() {
    let a = sample_disk(4 << 20, 11);
    // B: A moved up by 3 blocks (as when one file earlier in the filesystem grows), plus new data.
    let mut b = vec![0u8; a.len()];
    b[3 * 4096..].copy_from_slice(&a[..a.len() - 3 * 4096]);
    b[1_000_000..1_050_000].fill(0x5a);
    let blob_a = build(&a, WriterOptions::default());
    let layer_a = Layer::open("a", Arc::new(blob_a.clone()), None).unwrap();
    let id_a = blockfmt::format::BlobRef {
        sha256: blockfmt::format::sha256(&blob_a),
        size: blob_a.len() as u64,
    };
    let mut dict = blockfmt::Dictionary::new();
    dict.add_layer(&layer_a, id_a, |_| {}).unwrap();
    assert!(dict.block_count() > 0);
    let (w, blob_b) = import_raw(
        &b[..],
        b.len() as u64,
        None,
        Some(Arc::new(dict)),
        Vec::new(),
        WriterOptions::default(),
        |_| {},
    )
    .unwrap();
    assert_eq!(w.blobs, vec![id_a]);
    let plain = build(&b, WriterOptions::default());
    assert!(
        blob_b.len() * 10 < plain.len(),
        "with the dictionary {} bytes, without {}",
        blob_b.len(),
        plain.len()
    );
    assert!(w.borrowed_bytes > 0);

    // With the dictionary blob attached: exact, and every chunk (own and borrowed) verifies.
    let mut lb = Layer::open("b", Arc::new(blob_b.clone()), None).unwrap();
    lb.attach_blob(1, Arc::new(blob_a.clone())).unwrap();
    lb.verify_all(None).unwrap();
    let s = LayerStack::new(vec![lb], b.len() as u64, 1 << 20).unwrap();
    assert_eq!(read_all(&s).unwrap(), b);

    // Without it: an error that names the missing blob.
    let lb = Layer::open("b", Arc::new(blob_b.clone()), None).unwrap();
    let s = LayerStack::new(vec![lb], b.len() as u64, 1 << 20).unwrap();
    let e = read_all(&s).unwrap_err().to_string();
    assert!(
        e.contains(&blockfmt::format::oci_digest(&id_a.sha256)),
        "{e}"
    );

    // A different blob attached in its place (same size, other bytes) fails its checks.
    let mut wrong = blob_a.clone();
    let mid = wrong.len() / 2;
    wrong[mid] ^= 0xff;
    let mut lb = Layer::open("b", Arc::new(blob_b), None).unwrap();
    lb.attach_blob(1, Arc::new(wrong)).unwrap();
    assert!(lb.verify_all(None).is_err());
}

/// Building with a dictionary is deterministic: same inputs, same bytes.
#[test]
fn dictionary_output_is_deterministic() {
    let a = sample_disk(2 << 20, 12);
    let mut b = a.clone();
    b[100_000..140_000].fill(1);
    let blob_a = build(&a, WriterOptions::default());
    let layer_a = Layer::open("a", Arc::new(blob_a.clone()), None).unwrap();
    let id = blockfmt::format::BlobRef {
        sha256: blockfmt::format::sha256(&blob_a),
        size: blob_a.len() as u64,
    };
    let run = || {
        let mut d = blockfmt::Dictionary::new();
        d.add_layer(&layer_a, id, |_| {}).unwrap();
        import_raw(
            &b[..],
            b.len() as u64,
            None,
            Some(Arc::new(d)),
            Vec::new(),
            WriterOptions::default(),
            |_| {},
        )
        .unwrap()
        .1
    };
    assert_eq!(run(), run());
}

#[test]
fn a_chunk_failing_its_check_is_read_again_once_where_the_source_has_another_copy() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    /// Serves flipped bytes below the metadata; `read_again_at` serves the good copy when
    /// `other_copy`, and counts how often it was asked.
    struct Flaky {
        good: Vec<u8>,
        meta_offset: u64,
        other_copy: bool,
        again: AtomicUsize,
    }
    impl blockfmt::ReadAt for Flaky {
        fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
            self.good.read_exact_at(buf, off)?;
            if off < self.meta_offset && !buf.is_empty() {
                buf[buf.len() / 2] ^= 0x40;
            }
            Ok(())
        }
        fn size(&self) -> std::io::Result<u64> {
            Ok(self.good.len() as u64)
        }
        fn read_again_at(&self, buf: &mut [u8], off: u64) -> Option<std::io::Result<()>> {
            self.again.fetch_add(1, Ordering::SeqCst);
            self.other_copy.then(|| self.good.read_exact_at(buf, off))
        }
    }
    let disk = sample_disk(1 << 20, 9);
    let blob = build(&disk, WriterOptions::default());
    let meta_offset = Layer::open("probe", Arc::new(blob.clone()), None)
        .unwrap()
        .trailer()
        .meta_offset;
    for other_copy in [true, false] {
        let src = Arc::new(Flaky {
            good: blob.clone(),
            meta_offset,
            other_copy,
            again: AtomicUsize::new(0),
        });
        let l = Layer::open("flaky", src.clone(), None).unwrap();
        let n = l.metadata().chunks.len();
        for c in 0..n as u32 {
            let r = l.read_chunk(c);
            assert_eq!(r.is_ok(), other_copy, "chunk {c}: {:?}", r.err());
        }
        // Asked once per chunk, never more.
        assert_eq!(src.again.load(Ordering::SeqCst), n);
    }
}

/// A blob source whose reads panic while `armed` (a bug in a source, e.g. an overflow on a
/// hostile server's answer).
struct PanickingSource {
    blob: Vec<u8>,
    armed: std::sync::atomic::AtomicBool,
}

impl blockfmt::ReadAt for PanickingSource {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        assert!(
            !self.armed.load(std::sync::atomic::Ordering::SeqCst),
            "a bug in a blob source"
        );
        self.blob.read_exact_at(buf, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.blob.len() as u64)
    }
}

/// A chunk load that panics releases its in-flight slot: the next reader of that chunk loads it
/// instead of waiting forever for the dead one.
#[test]
fn a_panicking_chunk_load_releases_its_slot() {
    let disk = sample_disk(256 << 10, 10);
    let mut w = LayerWriter::new(Vec::new(), disk.len() as u64, WriterOptions::default()).unwrap();
    w.write_data(0, &disk).unwrap();
    let (_, blob) = w.finish().unwrap();
    let src = Arc::new(PanickingSource {
        blob,
        armed: false.into(),
    });
    let layer = Layer::open("p", src.clone(), None).unwrap();
    let stack = Arc::new(LayerStack::new(vec![layer], disk.len() as u64, 1 << 20).unwrap());
    src.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let s = stack.clone();
    let r = std::thread::spawn(move || s.load_chunk(0, 0)).join();
    assert!(r.is_err(), "the load did not panic");
    src.armed.store(false, std::sync::atomic::Ordering::SeqCst);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(stack.load_chunk(0, 0).map(|c| c.len()));
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(30))
        .expect("the second reader waited for the panicked load's slot");
    assert!(got.is_ok(), "{got:?}");
}

/// Counts reads (and bytes) asked of a blob; flips a byte at `bad_at` in every read covering it
/// except `read_again_at`'s.
struct CountingSource {
    blob: Vec<u8>,
    reads: std::sync::atomic::AtomicUsize,
    bad_at: Option<u64>,
}

impl blockfmt::ReadAt for CountingSource {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.reads.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.blob.read_exact_at(buf, off)?;
        if let Some(b) = self
            .bad_at
            .filter(|&b| b >= off && b < off + buf.len() as u64)
        {
            buf[(b - off) as usize] ^= 0x10;
        }
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.blob.len() as u64)
    }
    fn read_again_at(&self, buf: &mut [u8], off: u64) -> Option<std::io::Result<()>> {
        Some(self.blob.read_exact_at(buf, off))
    }
}

#[test]
fn sequential_reads_fetch_neighbouring_chunks_together_and_random_reads_do_not() {
    use std::sync::atomic::Ordering;
    let disk: Vec<u8> = {
        let mut rng = StdRng::seed_from_u64(21);
        (0..(4 << 20)).map(|_| rng.gen::<u8>() & 0x3f).collect()
    };
    let blob = build(&disk, WriterOptions::default());
    let open = |bad_at| {
        let src = Arc::new(CountingSource {
            blob: blob.clone(),
            reads: Default::default(),
            bad_at,
        });
        let l = Layer::open("seq", src.clone(), None).unwrap();
        let opened = src.reads.load(Ordering::SeqCst);
        (
            src,
            opened,
            LayerStack::new(vec![l], disk.len() as u64, 64 << 20).unwrap(),
        )
    };
    // Sequential 4 KiB reads, as a page-cache miss stream: far fewer fetches than chunks.
    let (src, opened, s) = open(None);
    let chunks = s.layers()[0].metadata().chunks.len();
    let mut out = vec![0u8; disk.len()];
    for (i, piece) in out.chunks_mut(4096).enumerate() {
        s.read(i as u64 * 4096, piece).unwrap();
    }
    assert_eq!(out, disk);
    let fetches = src.reads.load(Ordering::SeqCst) - opened;
    assert!(
        fetches * 3 <= chunks,
        "{fetches} fetches for {chunks} chunks"
    );
    // One chunk in every MiB, backwards: no neighbour is ever read, so none is fetched along.
    let (src, opened, s) = open(None);
    let cs = 128 * 1024;
    for c in (0..chunks).rev().step_by(8) {
        let mut b = vec![0u8; 4096];
        s.read((c * cs) as u64, &mut b).unwrap();
        assert_eq!(b, disk[c * cs..c * cs + 4096]);
    }
    assert_eq!(
        src.reads.load(Ordering::SeqCst) - opened,
        chunks.div_ceil(8)
    );
    // With hot groups of 1 MiB: a second random miss in the same MiB (chunks 8..16: 8, then 11) takes that group's cold
    // chunks around it along in one fetch (9..16: 8 is decoded already); the reads that follow
    // there fetch nothing.
    let (src, opened, s) = open(None);
    s.set_hot_group_bytes(1 << 20);
    let read_chunk = |c: usize| {
        let mut b = vec![0u8; 4096];
        s.read((c * cs + 8192) as u64, &mut b).unwrap();
        assert_eq!(b, disk[c * cs + 8192..c * cs + 12288]);
    };
    let fetches = || src.reads.load(Ordering::SeqCst) - opened;
    read_chunk(8);
    assert_eq!(fetches(), 1);
    read_chunk(11);
    assert_eq!(fetches(), 2, "one fetch for the hot group's cold chunks");
    for c in [9, 10, 12, 15, 8, 11] {
        read_chunk(c);
    }
    assert_eq!(fetches(), 2, "the group came along");
    read_chunk(16);
    assert_eq!(fetches(), 3, "another group's first miss: that chunk alone");
    assert!(s.cached_chunk(0, 17).is_none() && s.cached_chunk(0, 7).is_none());
    // A chunk failing its check inside a merged fetch is fetched again on its own; its
    // neighbours from the merged fetch are served, and every byte read is the disk's.
    let meta = s.layers()[0].metadata();
    let bad_chunk = meta.chunks[5];
    let (src, _, s) = open(Some(bad_chunk.offset + bad_chunk.stored_len as u64 / 2));
    let mut out = vec![0u8; disk.len()];
    for (i, piece) in out.chunks_mut(4096).enumerate() {
        s.read(i as u64 * 4096, piece).unwrap();
    }
    assert_eq!(out, disk);
    drop(src);
}

/// A prefetched stretch of chunks stored back to back costs one read of the source; chunks
/// already decoded are not read again; prefetched chunks are cached but not counted as needed
/// by a reader (they are not part of a startup trace).
#[test]
fn prefetch_run_reads_a_stretch_once_and_skips_what_is_cached() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    struct Counting(Vec<u8>, AtomicUsize);
    impl blockfmt::ReadAt for Counting {
        fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
            self.1.fetch_add(1, Ordering::SeqCst);
            self.0.read_exact_at(buf, off)
        }
        fn size(&self) -> std::io::Result<u64> {
            Ok(self.0.len() as u64)
        }
    }
    let mut disk = vec![0u8; 1 << 20];
    StdRng::seed_from_u64(11).fill(&mut disk[..]);
    let src = Arc::new(Counting(build(&disk, WriterOptions::default()), 0.into()));
    let layer = Layer::open("p", src.clone(), None).unwrap();
    let chunk = layer.chunk_size() as usize;
    let n = layer.metadata().chunks.len() as u32;
    assert_eq!(n as usize, disk.len() / chunk);
    let stack = LayerStack::new(vec![layer], disk.len() as u64, 8 << 20).unwrap();
    let reads = || src.1.swap(0, Ordering::SeqCst);
    reads();
    stack.prefetch_run(0, 1, 5).unwrap();
    assert_eq!(reads(), 1, "five chunks stored back to back: one read");
    for c in 1..6 {
        let got = stack
            .cached_chunk(0, c)
            .expect("prefetched chunk is decoded");
        assert_eq!(
            &got[..],
            &disk[c as usize * chunk..(c as usize + 1) * chunk]
        );
    }
    // The whole layer: chunk 0 alone (its neighbour is cached), then 6.. in one read.
    stack.prefetch_run(0, 0, n).unwrap();
    assert_eq!(reads(), 2);
    assert!((0..n).all(|c| stack.cached_chunk(0, c).is_some()));
    stack.prefetch_run(0, 0, n).unwrap();
    assert_eq!(reads(), 0, "nothing left to fetch");
    assert!(
        stack.touched().is_empty(),
        "prefetching is not a reader's need"
    );
}

/// Format version 2 stores the metadata as one zstd frame (its digest over the stored bytes),
/// and the stored length as a hint makes the open one read with no chunk bytes in it.
#[test]
fn metadata_is_compressed_and_a_length_hint_opens_in_one_exact_read() {
    let disk = sample_disk(8 << 20, 9);
    let blob = build(
        &disk,
        WriterOptions {
            chunk_size: 4096,
            ..Default::default()
        },
    );
    let plain = Layer::open("l", Arc::new(blob.clone()), None).unwrap();
    let t = *plain.trailer();
    let raw = t.meta_raw_len.expect("metadata stored compressed");
    assert!(t.meta_len < raw, "{} stored for {raw} decoded", t.meta_len);
    let src = Arc::new(Counting::new(blob.clone()));
    let l = Layer::open_with_hint("l", src.clone(), Some(t.meta_sha256), Some(t.meta_len)).unwrap();
    assert_eq!(src.reads(), (1, t.meta_len + 96));
    assert_eq!(l.metadata(), plain.metadata());
    // A wrong hint costs a read, not the answer.
    let src = Arc::new(Counting::new(blob));
    let l = Layer::open_with_hint("l", src, None, Some(t.meta_len / 3)).unwrap();
    assert_eq!(l.metadata(), plain.metadata());
}

/// A version 1 blob (metadata stored as is, version 1 header and trailer) still opens and
/// reads the same.
#[test]
fn version_1_blobs_still_open() {
    use blockfmt::format::{Header, Trailer, HEADER_LEN, TRAILER_LEN};
    let disk = sample_disk(2 << 20, 10);
    let v2 = build(&disk, WriterOptions::default());
    let l2 = Layer::open("v2", Arc::new(v2.clone()), None).unwrap();
    let t2 = *l2.trailer();
    let meta = l2.metadata().encode();
    let mut v1 = v2[..t2.meta_offset as usize].to_vec();
    v1.extend_from_slice(&meta);
    let t1 = Trailer {
        meta_len: meta.len() as u64,
        meta_sha256: blockfmt::format::sha256(&meta),
        meta_raw_len: None,
        ..t2
    };
    v1.extend_from_slice(&t1.encode());
    let h = Header::decode(&v1[..HEADER_LEN], "v1").unwrap().encode();
    v1[..HEADER_LEN].copy_from_slice(&h);
    // Version 1 on both fixed structures, crc re-sealed.
    for (at, len) in [(0, HEADER_LEN), (v1.len() - TRAILER_LEN, TRAILER_LEN)] {
        let b = &mut v1[at..at + len];
        b[8..10].copy_from_slice(&1u16.to_le_bytes());
        let c = crc32c::crc32c(&b[..len - 4]);
        b[len - 4..].copy_from_slice(&c.to_le_bytes());
    }
    let l1 = Layer::open("v1", Arc::new(v1), None).unwrap();
    assert_eq!(l1.trailer().meta_raw_len, None);
    assert_eq!(l1.metadata(), l2.metadata());
    let size = disk.len() as u64;
    let s = |b: Layer| LayerStack::new(vec![b], size, 1 << 20).unwrap();
    assert_eq!(read_all(&s(l1)).unwrap(), read_all(&s(l2)).unwrap());
}

/// Fetching ahead in a file: a miss on the first chunk of a file run fetches the run's
/// following chunks in one more ranged read (on the host's threads, capped in stored bytes),
/// so the reader's later misses in that file fetch nothing; a chunk outside any run, or a
/// stack with file-ahead off, fetches only what is read; every byte read is the disk's.
#[test]
fn a_miss_in_a_file_run_fetches_the_rest_of_the_run_ahead() {
    use std::sync::atomic::Ordering;
    /// Host threads for the test: every task on its own thread, joined at `wait`.
    #[derive(Default)]
    struct Threads(std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>);
    impl blockfmt::ParallelLoads for Threads {
        fn run_all(&self, tasks: Vec<blockfmt::LoadTask>) {
            tasks.into_iter().for_each(|t| t());
        }
        fn spawn(&self, task: blockfmt::LoadTask) {
            self.0.lock().unwrap().push(std::thread::spawn(task));
        }
    }
    impl Threads {
        fn wait(&self) {
            for h in self.0.lock().unwrap().drain(..) {
                h.join().unwrap();
            }
        }
    }
    let disk: Vec<u8> = {
        let mut rng = StdRng::seed_from_u64(23);
        (0..(4 << 20)).map(|_| rng.gen::<u8>() & 0x3f).collect()
    };
    let blob = build(&disk, WriterOptions::default());
    let cs = 128 * 1024;
    let open = |ahead: u64| {
        let src = Arc::new(CountingSource {
            blob: blob.clone(),
            reads: Default::default(),
            bad_at: None,
        });
        let l = Layer::open("files", src.clone(), None).unwrap();
        let opened = src.reads.load(Ordering::SeqCst);
        let s = LayerStack::new(vec![l], disk.len() as u64, 64 << 20).unwrap();
        let threads = Arc::new(Threads::default());
        s.set_parallel_loads(threads.clone());
        // A file in chunks 4..12 and one in 20..22; junk runs are ignored.
        s.set_file_runs(&[
            (0, 4, 12),
            (0, 20, 22),
            (0, 30, 1 << 20),
            (7, 0, 2),
            (0, 9, 9),
        ]);
        s.set_file_ahead_bytes(ahead);
        (src, opened, s, threads)
    };
    let read_chunk = |s: &LayerStack, c: usize| {
        let mut b = vec![0u8; 4096];
        s.read((c * cs + 4096) as u64, &mut b).unwrap();
        assert_eq!(b, disk[c * cs + 4096..c * cs + 8192]);
    };
    let (src, opened, s, threads) = open(1 << 20);
    let fetches = || src.reads.load(Ordering::SeqCst) - opened;
    read_chunk(&s, 4);
    threads.wait();
    assert_eq!(fetches(), 2, "the chunk read, and the rest of its file");
    for c in [11, 6, 5, 9] {
        read_chunk(&s, c);
    }
    assert_eq!(fetches(), 2, "the file's pages came along");
    assert!(
        s.cached_chunk(0, 12).is_none(),
        "nothing past the file's end"
    );
    read_chunk(&s, 2);
    threads.wait();
    assert_eq!(fetches(), 3, "outside any file run: that chunk alone");
    // The cap: chunks of 4..12 stored as about 100 KB each, 150 KB ahead takes one more chunk.
    let (src, opened, s, threads) = open(150 << 10);
    read_chunk(&s, 4);
    threads.wait();
    assert_eq!(src.reads.load(Ordering::SeqCst) - opened, 2);
    assert!(s.cached_chunk(0, 5).is_some() && s.cached_chunk(0, 6).is_none());
    // Off: only what is read.
    let (src, opened, s, threads) = open(0);
    read_chunk(&s, 4);
    read_chunk(&s, 20);
    threads.wait();
    assert_eq!(src.reads.load(Ordering::SeqCst) - opened, 2);
    assert!(s.cached_chunk(0, 5).is_none() && s.cached_chunk(0, 21).is_none());
}
