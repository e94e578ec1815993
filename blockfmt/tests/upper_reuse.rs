//! Version 3 reuses dead space in `data` (FORMAT.md §3.1, §3.4): space whose every byte later
//! records replaced takes new writes once a synced flush mark covers those records. These
//! tests show when it is reused, that a crash between a reusing write's bytes and its record
//! keeps every flushed write (the dead record's crc32c then fails, and recovery accepts that
//! only because later flushed records wholly replace it), that a reopened layer finds its free
//! space again, and — a proptest against a model — that random writes, zeroes, trims, flushes,
//! defragmenting rewrites and crashes always recover a state between the last flush and the
//! last write.

use std::fs;
use std::path::Path;

use blockfmt::upper::{DefragPolicy, DATA_FILE, LOG_FILE};
use blockfmt::{Image, LayerStack, UpperLayer};
use proptest::prelude::*;

mod common;
use common::read;

const SIZE: u64 = 1 << 20;

/// A crash of the process: the files as the page cache holds them, in a copy.
fn crash_copy(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for f in [DATA_FILE, LOG_FILE] {
        fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

/// Reopens the layer at `dir` and checks the blocks the reuse tests leave: block 0 rewritten
/// (2), the appended block at 8192 (3) and the write that took the dead slot, at 16384 (4).
fn assert_reopened_holds_all_three(dir: &Path) {
    let (up, _) = UpperLayer::open(dir, SIZE).expect("reopen");
    for (off, v) in [(0, 2u8), (8192, 3), (16384, 4)] {
        assert_eq!(read(&up, off, 4096), [v; 4096], "at {off}");
    }
}

/// Writes block 0 twice with flushes so its first slot is dead and free: returns the layer
/// and where that slot is.
fn layer_with_free_slot(dir: &Path) -> UpperLayer {
    let up = UpperLayer::create(dir, SIZE).expect("create");
    up.write(0, &[1; 4096]).expect("write"); // slot at 4096
    up.flush().expect("flush");
    up.write(0, &[2; 4096]).expect("rewrite"); // kills the slot at 4096
    assert_eq!(up.stats().free_bytes, 0);
    up.flush().expect("flush"); // syncs the first mark; the second (over the rewrite) queued
    assert_eq!(
        up.stats().free_bytes,
        0,
        "the killer's mark is not synced yet"
    );
    up.write(8192, &[3; 4096]).expect("write"); // appended
    up.flush().expect("flush"); // syncs the mark over the rewrite
    assert_eq!(up.stats().free_bytes, 4096);
    up
}

#[test]
fn dead_space_is_reused_once_a_synced_mark_covers_its_killers() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("up");
    let up = layer_with_free_slot(&dir);
    let len = up.data_file_len();
    up.write(16384, &[4; 4096]).expect("write into dead space");
    assert_eq!(up.data_file_len(), len, "the write took the dead slot");
    assert_eq!(up.stats().free_bytes, 0);
    assert_eq!(read(&up, 16384, 4096), [4; 4096]);
    let v = up.pieces(16384, 4096);
    assert!(
        matches!(
            v.pieces[0].2,
            Some(blockfmt::upper::UpperTarget::Data { file_offset: 4096 })
        ),
        "{:?}",
        v.pieces
    );
    up.flush().expect("flush");
    drop(up);
    assert_reopened_holds_all_three(&dir);
}

/// A read snapshot taken while a write was live keeps that write's space from being reused
/// until the snapshot is dropped (readers read without the lock).
#[test]
fn dead_space_a_reader_may_still_read_is_not_reused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("up");
    let up = UpperLayer::create(&dir, SIZE).expect("create");
    up.write(0, &[1; 4096]).expect("write"); // slot at 4096
    up.flush().expect("flush");
    let reader = up.pieces(0, 4096); // a read in flight
    up.write(0, &[2; 4096]).expect("rewrite"); // kills the slot the reader points at
    for i in 0..3 {
        up.write(8192 * (i + 1), &[3; 4096]).expect("write");
        up.flush().expect("flush");
    }
    assert_eq!(up.stats().free_bytes, 0, "the reader holds it");
    let mut got = vec![0u8; 4096];
    let Some(blockfmt::upper::UpperTarget::Data { file_offset }) = reader.pieces[0].2 else {
        panic!("{:?}", reader.pieces);
    };
    reader.read_data(file_offset, &mut got).expect("read");
    assert_eq!(got, [1; 4096], "the snapshot still reads what it saw");
    drop(reader);
    up.write(65536, &[4; 4096]).expect("write");
    up.flush().expect("flush");
    assert!(
        up.stats().free_bytes >= 4096,
        "free once the reader is gone"
    );
}

#[test]
fn a_crash_between_a_reuse_write_and_its_record_keeps_every_flushed_write() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("up");
    let up = layer_with_free_slot(&dir);
    up.write(16384, &[4; 4096]).expect("write into dead space");
    // Its bytes are in `data` (over the dead first write's), its record still queued.
    let cut = tmp.path().join("cut");
    crash_copy(&dir, &cut);
    assert_eq!(
        fs::read(cut.join(DATA_FILE)).expect("data")[4096..8192],
        [4; 4096]
    );
    for ro in [true, false] {
        let (c, _) = if ro {
            UpperLayer::open_read_only(&cut, SIZE)
        } else {
            UpperLayer::open(&cut, SIZE)
        }
        .expect("the dead write's failing crc is accepted: flushed records replace it");
        assert_eq!(read(&c, 0, 4096), [2; 4096]);
        assert_eq!(read(&c, 8192, 4096), [3; 4096]);
        assert_eq!(
            read(&c, 16384, 4096),
            [0; 4096],
            "its record never reached the log"
        );
    }
    // Once the record reached the log, a crash keeps the write.
    up.settle().expect("settle");
    let logged = tmp.path().join("logged");
    crash_copy(&dir, &logged);
    let (c, _) = UpperLayer::open(&logged, SIZE).expect("open");
    assert_eq!(read(&c, 16384, 4096), [4; 4096]);
    assert_eq!(read(&c, 0, 4096), [2; 4096]);
}

#[test]
fn a_reopened_layer_finds_its_free_space_again() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("up");
    let up = layer_with_free_slot(&dir);
    drop(up);
    let (up, _) = UpperLayer::open(&dir, SIZE).expect("reopen");
    assert_eq!(up.stats().free_bytes, 4096);
    let len = up.data_file_len();
    up.write(16384, &[4; 4096]).expect("write");
    assert_eq!(up.data_file_len(), len, "the write took the dead slot");
    up.flush().expect("flush");
    drop(up);
    assert_reopened_holds_all_three(&dir);
}

/// A corrupt flushed write that is still live is refused even with reuse about: the new rule
/// accepts a failing crc only for writes later flushed records wholly replace.
#[test]
fn a_partly_replaced_flushed_write_with_bad_data_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path().join("up");
    let up = UpperLayer::create(&dir, SIZE).expect("create");
    up.write(0, &[1; 8192]).expect("write"); // data 4096..12288
    up.flush().expect("flush");
    up.write(0, &[2; 4096]).expect("rewrite half");
    up.flush().expect("flush");
    up.write(65536, &[3; 4096]).expect("write");
    up.flush().expect("flush");
    drop(up);
    let mut b = fs::read(dir.join(DATA_FILE)).expect("data");
    b[4096 + 10] ^= 0xff; // the replaced half of the first write
    fs::write(dir.join(DATA_FILE), &b).expect("corrupt");
    let e = UpperLayer::open(&dir, SIZE).expect_err("its other half is live: refused");
    assert!(e.to_string().contains("flushed"), "{e}");
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, u64, u8),
    Zero(u64, u64, bool),
    Flush,
    Settle,
    Crash,
    Compact,
    Reclaim,
    /// A defragmenting rewrite of blocks `[b, b + n)`.
    Defrag(u64, u64),
    /// A read of the whole disk, then the rewrites it queued.
    ReadAndDefrag,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0u64..16, 1u64..4, 1u8..=255).prop_map(|(b, n, v)| Op::Write(b, n, v)),
        1 => (0u64..16, 1u64..4, any::<bool>()).prop_map(|(b, n, t)| Op::Zero(b, n, t)),
        3 => Just(Op::Flush),
        1 => Just(Op::Settle),
        1 => Just(Op::Crash),
        1 => Just(Op::Compact),
        1 => Just(Op::Reclaim),
        2 => (0u64..16, 2u64..8).prop_map(|(b, n)| Op::Defrag(b, n)),
        1 => Just(Op::ReadAndDefrag),
    ]
}

const DISK: u64 = 20 * 4096;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Random writes (straddling blocks, so some reuse splits free space), zeroes, trims,
    /// flushes (single-sync ones among them), compactions, checkpoints, defragmenting rewrites
    /// (which never change what the disk reads) and process crashes:
    /// every crash recovers exactly the state after some prefix of the operations that includes
    /// every one a finished flush covered and every one whose record reached the log
    /// (`settle`); a final reopen reads the model.
    #[test]
    fn random_operations_and_crashes_recover_a_flushed_prefix(ops in proptest::collection::vec(op(), 1..80)) {
        let tmp = common::tempdir_on_disk();
        let dir = tmp.path().join("up");
        let up = UpperLayer::create(&dir, DISK).expect("create");
        // Flushes whose writes all went into reused space take the single-sync path.
        common::lend_writeback(&up);
        // Any read over two pieces or more queues its range.
        up.set_defrag_policy(DefragPolicy { min_pieces: 2, reads: 1 });
        let img = Image::new(LayerStack::new(vec![], DISK, 0).expect("stack"), Some(up))
            .expect("image");
        let up = img.upper().expect("upper");
        let mut model = vec![0u8; DISK as usize];
        // The content after each operation; `flushed` operations are durable.
        let mut states = vec![model.clone()];
        let mut flushed = 0usize;
        // Operations whose records reached the log: a crash of the process keeps them.
        let mut flushed_or_logged = 0usize;
        for (i, o) in ops.iter().enumerate() {
            match *o {
                Op::Write(b, n, v) => {
                    let (off, len) = (b * 4096 + (v as u64 % 3) * 512, n * 4096);
                    let len = len.min(DISK - off);
                    up.write(off, &vec![v; len as usize]).expect("write");
                    model[off as usize..(off + len) as usize].fill(v);
                    states.push(model.clone());
                }
                Op::Zero(b, n, trim) => {
                    let (off, len) = (b * 4096, (n * 4096).min(DISK - b * 4096));
                    up.write_zeroes(off, len, trim).expect("zeroes");
                    model[off as usize..(off + len) as usize].fill(0);
                    states.push(model.clone());
                }
                Op::Flush => {
                    up.flush().expect("flush");
                    flushed = states.len() - 1;
                }
                Op::Settle => {
                    up.settle().expect("settle");
                    flushed_or_logged = states.len() - 1;
                }
                // Both make everything before them durable.
                Op::Compact => {
                    up.compact().expect("compact");
                    flushed = states.len() - 1;
                }
                Op::Reclaim => {
                    up.reclaim().expect("reclaim");
                    flushed = states.len() - 1;
                }
                Op::Defrag(b, n) => {
                    let (off, len) = (b * 4096, (n * 4096).min(DISK - b * 4096));
                    img.defrag_range(off, len).expect("defrag");
                    prop_assert!(read(up, 0, DISK as usize) == model, "defrag changed the disk");
                }
                Op::ReadAndDefrag => {
                    let mut got = vec![0u8; DISK as usize];
                    img.read(0, &mut got).expect("read");
                    prop_assert!(got == model);
                    img.run_defrags().expect("defrags");
                    prop_assert!(read(up, 0, DISK as usize) == model, "defrag changed the disk");
                }
                Op::Crash => {
                    let cut = tmp.path().join(format!("crash{i}"));
                    crash_copy(&dir, &cut);
                    let (c, _) = UpperLayer::open(&cut, DISK).expect("recover");
                    let got = read(&c, 0, DISK as usize);
                    let k = states.iter().rposition(|s| *s == got);
                    let least = flushed.max(flushed_or_logged);
                    prop_assert!(
                        k.is_some_and(|k| k >= least),
                        "crash after op {i}: recovered state {k:?}, flushed {flushed}, logged {least}"
                    );
                    drop(c);
                    fs::remove_dir_all(&cut).expect("rm");
                }
            }
        }
        up.flush().expect("flush");
        drop(img);
        let (up, _) = UpperLayer::open(&dir, DISK).expect("reopen");
        prop_assert!(read(&up, 0, DISK as usize) == model);
    }
}
