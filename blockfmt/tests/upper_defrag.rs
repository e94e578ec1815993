//! Defragmenting rewrites (blockfmt/src/upper/defrag.rs): a range reads found in many upper
//! pieces is rewritten as back-to-back ordinary write records, so it reads as one piece. These
//! tests show that the rewrite never changes what a read returns nor the allocation map, that
//! a client write racing it wins, that the budget (bytes clients wrote) holds, that a crash at
//! any point of it recovers a flushed prefix, and that its space is freed slot by slot by later
//! overwrites as before.

use std::fs;
use std::path::Path;
use std::sync::{Arc, Mutex};

use blockfmt::commit::import_raw;
use blockfmt::upper::{DefragOutcome, DefragPolicy, UpperTarget, DATA_FILE, LOG_FILE};
use blockfmt::{Alloc, Image, Layer, LayerStack, ReadAt, UpperLayer, WriterOptions};
use rand::{rngs::StdRng, Rng, SeedableRng};

const SIZE: u64 = 1 << 20;
/// The range the tests fragment: 64 blocks of 4 KiB.
const RANGE: (u64, u64) = (128 << 10, 256 << 10);

/// A blob whose next read first runs a hook (a client write racing a rewrite).
struct Hooked {
    blob: Vec<u8>,
    hook: Mutex<Option<Box<dyn FnOnce() + Send>>>,
}

impl ReadAt for Hooked {
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        let hook = self.hook.lock().expect("hook").take();
        if let Some(h) = hook {
            h();
        }
        let src = usize::try_from(off)
            .ok()
            .and_then(|o| self.blob.get(o..o + buf.len()))
            .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.blob.len() as u64)
    }
}

/// A lower layer of `disk` (zero blocks become holes) and its blob, hookable.
fn lower(disk: &[u8]) -> (LayerStack, Arc<Hooked>) {
    let (_, blob) = import_raw(
        disk,
        disk.len() as u64,
        None,
        None,
        Vec::new(),
        WriterOptions::default(),
        |_| {},
    )
    .expect("import");
    let blob = Arc::new(Hooked {
        blob,
        hook: Mutex::new(None),
    });
    let layer = Layer::open("lower", blob.clone(), None).expect("layer");
    let stack = LayerStack::new(vec![layer], disk.len() as u64, 4 << 20).expect("stack");
    (stack, blob)
}

fn random_disk(seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; SIZE as usize];
    StdRng::seed_from_u64(seed).fill(&mut d[..]);
    d
}

fn image(dir: &Path, disk: &[u8]) -> (Image, Arc<Hooked>) {
    let (stack, blob) = lower(disk);
    let (up, _) = UpperLayer::open(dir, SIZE).expect("upper");
    (Image::new(stack, Some(up)).expect("image"), blob)
}

fn read_all(img: &Image) -> Vec<u8> {
    let mut v = vec![0u8; SIZE as usize];
    img.read(0, &mut v).expect("read");
    v
}

/// Upper-layer data pieces in `[off, off + len)`.
fn data_pieces(img: &Image, (off, len): (u64, u64)) -> usize {
    let up = img.upper().expect("upper");
    up.pieces(off, len)
        .pieces
        .iter()
        .filter(|p| matches!(p.2, Some(UpperTarget::Data { .. })))
        .count()
}

/// Writes every other block of `RANGE` in a shuffled order (so the pieces lie in the data file
/// out of disk order, with lower data between them), `model` following.
fn fragment(img: &Image, model: &mut [u8], seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut blocks: Vec<u64> = (0..RANGE.1 / 8192).collect();
    for i in (1..blocks.len()).rev() {
        blocks.swap(i, rng.gen_range(0..=i));
    }
    for b in blocks {
        let off = RANGE.0 + b * 8192;
        let mut d = vec![0u8; 4096];
        rng.fill(&mut d[..]);
        img.write(off, &d).expect("write");
        model[off as usize..off as usize + 4096].copy_from_slice(&d);
    }
}

/// 128 KiB more written far from `RANGE`: with `fragment`'s, the budget for one rewrite of it.
fn give_budget(img: &Image, model: &mut [u8]) {
    img.write(512 << 10, &vec![9; 128 << 10]).expect("write");
    model[512 << 10..640 << 10].fill(9);
}

/// Reads of a fragmented range queue it at the policy's second read; the host is asked once;
/// the rewrite leaves the range one upper piece reading the same bytes with the same allocation
/// map, before and after a reopen.
#[test]
fn a_fragmented_range_read_twice_becomes_one_piece_with_the_same_bytes() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut model = random_disk(1);
    let (img, _) = image(tmp.path(), &model);
    // A fragmented range at the front, a write of zeros far from it.
    fragment(&img, &mut model, 2);
    give_budget(&img, &mut model);
    img.write_zeroes(800 << 10, 8192).expect("zeroes");
    model[800 << 10..(800 << 10) + 8192].fill(0);
    let up = img.upper().expect("upper");
    assert_eq!(data_pieces(&img, RANGE), 32);
    let map_before = img.map(0, SIZE).expect("map");

    let mut buf = vec![0u8; RANGE.1 as usize];
    img.read(RANGE.0, &mut buf).expect("read");
    assert_eq!(up.queued_defrags(), 0, "read once: not yet");
    assert!(!up.take_defrag_request());
    img.read(RANGE.0, &mut buf).expect("read again");
    assert_eq!(up.queued_defrags(), 1);
    img.read(RANGE.0, &mut buf).expect("read a third time");
    assert_eq!(up.queued_defrags(), 1, "queued once");
    assert!(up.take_defrag_request(), "the host is asked");
    assert!(!up.take_defrag_request(), "once per burst");

    let report = img.run_defrags().expect("defrag");
    assert_eq!((report.ranges, report.bytes), (1, RANGE.1));
    assert_eq!(data_pieces(&img, RANGE), 1, "one piece");
    assert_eq!(read_all(&img), model);
    assert_eq!(
        img.map(0, SIZE).expect("map"),
        map_before,
        "same allocation map"
    );
    let stats = up.stats();
    assert_eq!((stats.defrags, stats.defrag_bytes), (1, RANGE.1));
    // A read of it now is one piece: nothing queued again.
    img.read(RANGE.0, &mut buf).expect("read");
    img.read(RANGE.0, &mut buf).expect("read");
    assert_eq!(up.queued_defrags(), 0);

    img.flush().expect("flush");
    drop(img);
    let (img, _) = image(tmp.path(), &model);
    assert_eq!(data_pieces(&img, RANGE), 1, "one piece after a reopen");
    assert_eq!(read_all(&img), model);
}

/// Zeroed upper pieces, lower holes and lower zero extents inside the range stay what they were
/// (the allocation map is unchanged): the rewrite splits into runs of data around them.
#[test]
fn zeros_and_holes_inside_the_range_are_kept() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut model = random_disk(3);
    // A hole in the lower layer inside the range.
    model[(RANGE.0 + 100_000) as usize..(RANGE.0 + 140_000) as usize].fill(0);
    let (img, _) = image(tmp.path(), &model);
    fragment(&img, &mut model, 4);
    give_budget(&img, &mut model);
    img.trim(RANGE.0 + 20_480, 4096).expect("trim");
    model[(RANGE.0 + 20_480) as usize..(RANGE.0 + 24_576) as usize].fill(0);
    let map_before = img.map(0, SIZE).expect("map");
    assert!(
        map_before.iter().any(|p| p.2 == Alloc::Hole),
        "{map_before:?}"
    );
    let out = img.defrag_range(RANGE.0, RANGE.1).expect("defrag");
    assert!(matches!(out, DefragOutcome::Rewritten { .. }), "{out:?}");
    assert_eq!(read_all(&img), model);
    assert_eq!(img.map(0, SIZE).expect("map"), map_before);
    // Runs on either side of the trim and the hole are one piece each; the upper pieces
    // alone between lower holes stay as they were.
    let n = data_pieces(&img, RANGE);
    assert!(n < 10, "{n} pieces");
}

/// A client write landing between the rewrite's read and its write wins: the rewrite is
/// skipped and the range reads the client's bytes; the next rewrite keeps them.
#[test]
fn a_write_racing_the_rewrite_wins() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut model = random_disk(5);
    let (img, blob) = image(tmp.path(), &model);
    fragment(&img, &mut model, 6);
    give_budget(&img, &mut model);
    let img = Arc::new(img);
    let racer = img.clone();
    // The rewrite reads the lower data under the gaps: the first such read writes first.
    let at = RANGE.0 + 4096; // a gap: lower data
    *blob.hook.lock().expect("hook") = Some(Box::new(move || {
        racer.write(at, &[0x5a; 4096]).expect("racing write");
    }));
    model[at as usize..at as usize + 4096].fill(0x5a);
    let out = img.defrag_range(RANGE.0, RANGE.1).expect("defrag");
    assert_eq!(out, DefragOutcome::Changed);
    assert!(blob.hook.lock().expect("hook").is_none(), "the race ran");
    assert_eq!(read_all(&img), model);
    let out = img.defrag_range(RANGE.0, RANGE.1).expect("defrag");
    assert!(matches!(out, DefragOutcome::Rewritten { .. }), "{out:?}");
    assert_eq!(read_all(&img), model);
    // A write after the rewrite wins too.
    img.write(at, &[0xa5; 4096]).expect("write");
    model[at as usize..at as usize + 4096].fill(0xa5);
    assert_eq!(read_all(&img), model);
}

/// Rewrites never write more than clients wrote since the layer was opened; a burst over the
/// budget drops its queue.
#[test]
fn rewrites_stay_within_the_bytes_clients_wrote() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut model = random_disk(7);
    let (img, _) = image(tmp.path(), &model);
    let up = img.upper().expect("upper");
    up.set_defrag_policy(DefragPolicy {
        min_pieces: 8,
        reads: 1,
    });
    // 128 KiB written, 256 KiB to rewrite (the gaps are lower data).
    fragment(&img, &mut model, 8);
    let mut buf = vec![0u8; RANGE.1 as usize];
    img.read(RANGE.0, &mut buf).expect("read");
    assert_eq!(up.queued_defrags(), 1);
    let report = img.run_defrags().expect("defrag");
    assert_eq!((report.ranges, report.skipped), (0, 1), "over budget");
    assert_eq!(up.queued_defrags(), 0);
    assert_eq!(data_pieces(&img, RANGE), 32);
    assert_eq!(
        img.defrag_range(RANGE.0, RANGE.1).expect("defrag"),
        DefragOutcome::OverBudget
    );
    // Another 128 KiB written elsewhere: now it fits, exactly. Reads queue nothing until
    // clients wrote 64 MiB since the burst ended over the budget.
    give_budget(&img, &mut model);
    img.read(RANGE.0, &mut buf).expect("read");
    assert_eq!(up.queued_defrags(), 0, "paused");
    assert_eq!(
        img.defrag_range(RANGE.0, RANGE.1).expect("defrag"),
        DefragOutcome::Rewritten { bytes: RANGE.1 }
    );
    assert_eq!(up.stats().defrag_bytes, 256 << 10);
    assert_eq!(read_all(&img), model);
    // Spent: nothing more, however fragmented.
    fragment(&img, &mut model, 9);
    assert_eq!(
        img.defrag_range(RANGE.0, RANGE.1).expect("defrag"),
        DefragOutcome::OverBudget
    );
    assert_eq!(read_all(&img), model);
    // 64 MiB more written (flushed as it goes, so it reuses its own space): reads queue again.
    for i in 0..64u8 {
        img.write(0, &vec![i; 1 << 20]).expect("write");
        img.flush().expect("flush");
    }
    model.fill(63);
    fragment(&img, &mut model, 10);
    img.read(RANGE.0, &mut buf).expect("read");
    assert_eq!(up.queued_defrags(), 1, "resumed");
    let report = img.run_defrags().expect("defrag");
    assert_eq!((report.ranges, report.bytes), (1, RANGE.1));
    assert_eq!(read_all(&img), model);
}

/// A rewrite that would append is skipped once the files would pass the room rewrites may
/// take (here: live data + 64 MiB); one that fits in free space whole takes it, and the data
/// file does not grow.
#[test]
fn rewrites_append_only_within_their_room() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut model = random_disk(17);
    let (img, _) = image(tmp.path(), &model);
    let up = img.upper().expect("upper");
    up.set_compaction(blockfmt::upper::CompactionPolicy::never());
    // 70 MiB appended over the same MiB, unflushed: nothing is free yet.
    for i in 0..70u8 {
        img.write(0, &vec![i; 1 << 20]).expect("write");
    }
    model.fill(69);
    fragment(&img, &mut model, 18);
    let len = up.data_file_len();
    assert_eq!(
        img.defrag_range(RANGE.0, RANGE.1).expect("defrag"),
        DefragOutcome::NoRoom
    );
    assert_eq!(up.data_file_len(), len);
    // Two flushes: the overwritten MiBs are free; the rewrite goes there whole.
    img.flush().expect("flush");
    img.write(900 << 10, &[5; 4096]).expect("write");
    model[900 << 10..(900 << 10) + 4096].fill(5);
    img.flush().expect("flush");
    assert!(up.stats().free_bytes >= RANGE.1);
    let len = up.data_file_len();
    assert_eq!(
        img.defrag_range(RANGE.0, RANGE.1).expect("defrag"),
        DefragOutcome::Rewritten { bytes: RANGE.1 }
    );
    assert_eq!(up.data_file_len(), len, "no growth");
    assert_eq!(data_pieces(&img, RANGE), 1);
    assert_eq!(read_all(&img), model);
}

/// The rewrite's records are ordinary writes, one per 4 KiB piece here: a later overwrite of
/// one block frees that block's space (once a synced mark covers the overwrite), as before the
/// rewrite.
#[test]
fn rewritten_space_is_freed_block_by_block() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut model = random_disk(10);
    let (img, _) = image(tmp.path(), &model);
    fragment(&img, &mut model, 11);
    give_budget(&img, &mut model);
    assert!(matches!(
        img.defrag_range(RANGE.0, RANGE.1).expect("defrag"),
        DefragOutcome::Rewritten { .. }
    ));
    let up = img.upper().expect("upper");
    let mut put = |off: u64, v: u8| {
        img.write(off, &[v; 4096]).expect("write");
        model[off as usize..off as usize + 4096].fill(v);
        img.flush().expect("flush");
    };
    // Two flushes with writes: the mark over the rewrite is synced, what it replaced is free.
    put(900 << 10, 3);
    put(904 << 10, 3);
    let free = up.stats().free_bytes;
    assert!(free >= 128 << 10, "the fragmented pieces are free: {free}");
    // An overwrite of one rewritten block takes a free block; once a synced mark covers it
    // (after the next write's flush, which takes another), its old block is free again.
    put(RANGE.0 + 8192, 4);
    put(908 << 10, 5);
    assert_eq!(up.stats().free_bytes, free - 4096);
    assert_eq!(read_all(&img), model);
}

fn copy_cut(src: &Path, dst: &Path, log_len: u64, data_len: u64) {
    fs::create_dir_all(dst).expect("mkdir");
    for (f, len) in [(LOG_FILE, log_len), (DATA_FILE, data_len)] {
        fs::copy(src.join(f), dst.join(f)).expect("copy");
        fs::OpenOptions::new()
            .write(true)
            .open(dst.join(f))
            .expect("open")
            .set_len(len)
            .expect("cut");
    }
}

/// A crash at any record boundary of a rewrite (and with the data file cut anywhere past the
/// last flush) recovers the flushed state — which is also what every prefix of the rewrite
/// reads — with the writes before it and after it a prefix.
#[test]
fn a_crash_during_or_after_a_rewrite_recovers_a_flushed_prefix() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("up");
    let mut model = random_disk(12);
    let (img, _) = image(&dir, &model);
    fragment(&img, &mut model, 13);
    give_budget(&img, &mut model);
    img.flush().expect("flush");
    let flushed_model = model.clone();
    let sizes = |d: &Path| {
        (
            fs::metadata(d.join(LOG_FILE)).expect("log").len(),
            fs::metadata(d.join(DATA_FILE)).expect("data").len(),
        )
    };
    let flushed = sizes(&dir);
    assert!(matches!(
        img.defrag_range(RANGE.0, RANGE.1).expect("defrag"),
        DefragOutcome::Rewritten { .. }
    ));
    // One more client write after it, then everything handed to the kernel.
    img.write(RANGE.0 + 4096, &[7; 4096]).expect("write");
    let mut after = model.clone();
    after[(RANGE.0 + 4096) as usize..(RANGE.0 + 8192) as usize].fill(7);
    img.settle().expect("settle");
    let full = sizes(&dir);
    assert!(
        full.0 > flushed.0 + 48 * 32,
        "the rewrite's records are in the log"
    );
    let mut rng = StdRng::seed_from_u64(14);
    let mut cuts = Vec::new();
    let mut b = flushed.0;
    while b <= full.0 {
        cuts.push((b, full.1));
        cuts.push((b, rng.gen_range(flushed.1..=full.1)));
        b += 48;
    }
    for (n, (log_len, data_len)) in cuts.into_iter().enumerate() {
        let d = tmp.path().join(format!("cut{n}"));
        copy_cut(&dir, &d, log_len, data_len);
        let (c, _) = image(&d, &flushed_model);
        let got = read_all(&c);
        assert!(
            got == flushed_model || got == after,
            "cut {log_len}/{data_len}: neither the flushed state nor the last"
        );
        drop(c);
        fs::remove_dir_all(&d).expect("rm");
    }
    drop(img);
    let (img, _) = image(&dir, &flushed_model);
    assert_eq!(read_all(&img), after);
}

/// A read-only view never queues a rewrite and refuses one.
#[test]
fn a_read_only_view_rewrites_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let mut model = random_disk(15);
    let (img, _) = image(tmp.path(), &model);
    fragment(&img, &mut model, 16);
    let img = img.read_only_view();
    let mut buf = vec![0u8; RANGE.1 as usize];
    for _ in 0..3 {
        img.read(RANGE.0, &mut buf).expect("read");
    }
    assert_eq!(img.upper().expect("upper").queued_defrags(), 0);
    assert!(img.defrag_range(RANGE.0, RANGE.1).is_err());
    assert_eq!(img.run_defrags().expect("nothing").ranges, 0);
}
