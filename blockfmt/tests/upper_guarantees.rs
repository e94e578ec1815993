//! The upper layer's promises that need no injected fault (README "Guarantees"): the first flush
//! after recovery syncs the recovered tail; flushed data is checked on recovery; one writer per
//! layer and read-only opens that change nothing; compaction bounds the files by the live data
//! and is crash safe at every step.

use std::fs;
use std::path::Path;

use blockfmt::upper::{
    CompactionPolicy, Record, RecordKind, COMPACT_DATA_FILE, COMPACT_LOG_FILE, DATA_FILE, LOG_FILE,
    RECORD_LEN,
};
use blockfmt::{Error, UpperLayer};
use rand::{rngs::StdRng, Rng, SeedableRng};

mod common;
use common::read;

const SIZE: u64 = 4 << 20;

fn last_record(dir: &Path) -> Record {
    let log = fs::read(dir.join(LOG_FILE)).expect("log");
    Record::decode(&log[log.len() - RECORD_LEN..]).expect("a record at the end")
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<_> = fs::read_dir(dir)
        .expect("dir")
        .map(|e| {
            let e = e.expect("entry");
            (
                e.file_name().to_string_lossy().into_owned(),
                fs::read(e.path()).expect("read"),
            )
        })
        .collect();
    v.sort();
    v
}

/// Item 3: records recovered after a crash were not synced by the new process: the first
/// flush must sync them and write a flush mark covering them (it used to return at once).
#[test]
fn first_flush_after_recovery_syncs_the_recovered_tail() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    for i in 0..3u64 {
        up.write(i * 4096, &[i as u8 + 1; 4096]).expect("write");
    }
    drop(up); // settles the queue into the page cache: a crash of the process, not the machine
    let (up, rec) = UpperLayer::open(dir, SIZE).expect("reopen");
    assert_eq!(rec.replayed, 3);
    up.flush().expect("flush");
    // The mark is queued once both files are synced; it reaches the log with the next records
    // or, as here, on close.
    drop(up);
    let r = last_record(dir);
    assert_eq!(
        r.kind,
        RecordKind::FlushMark,
        "the first flush wrote no mark"
    );
    assert_eq!(
        (r.seq, r.offset),
        (4, 3),
        "the mark covers the 3 recovered writes"
    );
}

/// Item 4: flushed records are checked too: a flushed write whose bytes changed on disk is an
/// error naming the data file, never replayed as if it were right.
#[test]
fn a_flushed_write_with_bad_data_is_refused() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    up.write(8192, &[0xab; 4096]).expect("write");
    up.flush().expect("flush");
    // A rewrite before a flush (older builds put it in place; this one never does).
    up.write(0, &[1; 8192]).expect("write");
    up.write(4096, &[2; 4096]).expect("rewrite");
    up.flush().expect("flush");
    drop(up);
    let (up, _) = UpperLayer::open(dir, SIZE).expect("rewrites reopen");
    assert_eq!(read(&up, 0, 8192)[4096..], [2; 4096]);
    drop(up);
    let data = dir.join(DATA_FILE);
    let mut b = fs::read(&data).expect("data");
    b[4096 + 100] ^= 0xff; // inside the first (flushed) write's bytes
    fs::write(&data, &b).expect("corrupt");
    for ro in [true, false] {
        let e = if ro {
            UpperLayer::open_read_only(dir, SIZE)
        } else {
            UpperLayer::open(dir, SIZE)
        }
        .expect_err("corrupt flushed data must be refused");
        assert!(
            matches!(e, Error::Corrupt { .. }) && e.to_string().contains("flushed"),
            "{e}"
        );
    }
}

/// Item 5: one writer per upper layer; the refusal names the holder. Read-only opens work
/// beside the writer and change nothing on disk, even over a torn tail.
#[test]
fn one_writer_and_read_only_opens_change_nothing() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    up.write(0, &[5; 4096]).expect("write");
    up.flush().expect("flush");
    let e = UpperLayer::open(dir, SIZE).expect_err("second writer");
    assert!(matches!(e, Error::Locked { .. }), "{e}");
    assert!(
        e.to_string()
            .contains(&format!("pid {}", std::process::id())),
        "names the holder: {e}"
    );
    // A torn tail: half a record after the last one.
    fs::OpenOptions::new()
        .append(true)
        .open(dir.join(LOG_FILE))
        .and_then(|mut f| std::io::Write::write_all(&mut f, &[0x5a; 20]))
        .expect("tear");
    let before = files(dir);
    let (ro, rec) = UpperLayer::open_read_only(dir, SIZE).expect("read-only beside the writer");
    assert_eq!(rec.log_bytes_dropped, 20);
    assert_eq!(read(&ro, 0, 4096), vec![5; 4096]);
    assert!(ro.write(0, &[1; 10]).is_err(), "read-only refuses writes");
    drop(ro);
    assert!(
        files(dir) == before,
        "a read-only open changed the directory"
    );
    drop(up);
    // The writer is gone: the lock went with it.
    UpperLayer::open(dir, SIZE).expect("open after the writer closed");
}

/// Item 7: ten times the disk size of random overwrites never let the files pass twice what
/// the live data needs; content stays right across reopens. Flushed every 16 writes, version
/// 3 puts new writes in dead space and never needs to compact; never flushed, with 8 KiB writes
/// that straddle earlier ones (so none is a rewrite in place), no dead space is free until a
/// compaction has marked everything, so compaction bounds the files.
#[test]
fn compaction_bounds_the_files_by_the_live_data() {
    let (compactions, worst) = overwrite_ten_times(Some(16), 1);
    assert!(worst <= 1.5, "files reached {worst:.2}× the live data");
    assert_eq!(compactions, 0, "flushed overwrites reuse dead space");
    let (compactions, worst) = overwrite_ten_times(None, 2);
    assert!(worst <= 2.0, "files reached {worst:.2}× the live data");
    assert!(compactions > 0);
}

/// Random overwrites of `n` 4 KiB blocks, ten times the disk, flushed every `flush_every`
/// writes; returns the compactions and the worst files ÷ live data seen.
fn overwrite_ten_times(flush_every: Option<u64>, n: u64) -> (u64, f64) {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    up.set_compaction(CompactionPolicy {
        ratio_percent: 150,
        min_waste: 1 << 20,
    });
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(7);
    let blocks = SIZE / 4096;
    let mut worst = 0f64;
    let len = n * 4096;
    for i in 0..10 * blocks / n {
        let b = rng.gen_range(0..=blocks - n);
        let v = rng.gen::<u8>() | 1;
        up.write(b * 4096, &vec![v; len as usize]).expect("write");
        model[(b * 4096) as usize..(b * 4096 + len) as usize].fill(v);
        if flush_every.is_some_and(|n| i % n == n - 1) {
            up.flush().expect("flush");
        }
        if i >= blocks {
            let s = up.stats();
            let on_disk = fs::metadata(dir.join(DATA_FILE)).expect("stat").len()
                + fs::metadata(dir.join(LOG_FILE)).expect("stat").len();
            worst = worst
                .max(on_disk.max(s.data_file_bytes + s.log_bytes) as f64 / s.live_bytes as f64);
        }
    }
    let s = up.stats();
    eprintln!(
        "flush every {flush_every:?}: compactions {}, worst files/live {worst:.2}",
        s.compactions
    );
    assert!(read(&up, 0, SIZE as usize) == model);
    up.flush().expect("flush");
    drop(up);
    let (up, _) = UpperLayer::open(dir, SIZE).expect("reopen");
    assert!(read(&up, 0, SIZE as usize) == model, "content after reopen");
    (s.compactions, worst)
}

/// Item 7: a crash at any step of a compaction recovers to the same content: leftovers before
/// the switch are discarded, a half-done switch (log renamed, data not) is finished.
#[test]
fn compaction_is_crash_safe_at_every_step() {
    let tmp = tempfile::tempdir().expect("tmp");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let up = UpperLayer::create(&a, SIZE).expect("create");
    up.set_compaction(CompactionPolicy::never());
    let mut rng = StdRng::seed_from_u64(9);
    for i in 0..400u64 {
        let off = rng.gen_range(0..SIZE / 4096 - 4) * 4096;
        match i % 9 {
            0 => up.write_zeroes(off, 12288, i % 2 == 0).expect("zeroes"),
            _ => up.write(off, &[i as u8; 8192]).expect("write"),
        }
        if i % 10 == 0 {
            up.flush().expect("flush");
        }
    }
    up.flush().expect("flush");
    let want = read(&up, 0, SIZE as usize);
    drop(up);
    copy_dir(&a, &b);
    let up = UpperLayer::open(&b, SIZE).expect("open copy").0;
    up.compact().expect("compact");
    assert!(
        read(&up, 0, SIZE as usize) == want,
        "content after compaction"
    );
    drop(up);
    // b holds the new generation, a the old one.
    let check = |name: &str, files: &[(&Path, &str, &str)]| {
        let d = tmp.path().join(name);
        fs::create_dir_all(&d).expect("mkdir");
        for (from, f, to) in files {
            fs::copy(from.join(f), d.join(to)).expect("copy");
        }
        let (up, _) = UpperLayer::open_read_only(&d, SIZE).expect("read-only open");
        assert!(
            read(&up, 0, SIZE as usize) == want,
            "{name}: read-only content"
        );
        drop(up);
        let (up, _) = UpperLayer::open(&d, SIZE).expect("open");
        assert!(read(&up, 0, SIZE as usize) == want, "{name}: content");
        let mut left: Vec<String> = fs::read_dir(&d)
            .expect("dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["data", "index.log", "lock"], "{name}: leftovers");
        up.write(0, b"after").expect("write");
        up.flush().expect("flush");
    };
    let (a, b) = (a.as_path(), b.as_path());
    // Crash while writing the new files, or after syncing them, before the switch.
    check(
        "before-switch",
        &[
            (a, DATA_FILE, DATA_FILE),
            (a, LOG_FILE, LOG_FILE),
            (b, DATA_FILE, COMPACT_DATA_FILE),
            (b, LOG_FILE, COMPACT_LOG_FILE),
        ],
    );
    check(
        "only-data-written",
        &[
            (a, DATA_FILE, DATA_FILE),
            (a, LOG_FILE, LOG_FILE),
            (b, DATA_FILE, COMPACT_DATA_FILE),
        ],
    );
    // Crash between the two renames.
    check(
        "log-switched",
        &[
            (a, DATA_FILE, DATA_FILE),
            (b, LOG_FILE, LOG_FILE),
            (b, DATA_FILE, COMPACT_DATA_FILE),
        ],
    );
    check(
        "switched",
        &[(b, DATA_FILE, DATA_FILE), (b, LOG_FILE, LOG_FILE)],
    );
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("mkdir");
    for f in [DATA_FILE, LOG_FILE] {
        fs::copy(from.join(f), to.join(f)).expect("copy");
    }
}

/// Compaction beside writers: one thread compacts over and over while another writes, zeroes
/// and flushes at random; the content always follows the writes, and survives a reopen.
#[test]
fn compaction_beside_writers_keeps_every_write() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = std::sync::Arc::new(UpperLayer::create(dir, SIZE).expect("create"));
    up.set_compaction(CompactionPolicy::never());
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let compactor = {
        let (up, stop) = (up.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) || n < 3 {
                up.compact().expect("compact");
                n += 1;
            }
            n
        })
    };
    let mut model = vec![0u8; SIZE as usize];
    let mut rng = StdRng::seed_from_u64(11);
    let blocks = SIZE / 4096;
    for i in 0..4 * blocks {
        let b = rng.gen_range(0..blocks - 2);
        let v = rng.gen::<u8>() | 1;
        if i % 13 == 0 {
            up.write_zeroes(b * 4096, 8192, i % 2 == 0).expect("zeroes");
            model[(b * 4096) as usize..(b * 4096 + 8192) as usize].fill(0);
        } else {
            up.write(b * 4096, &[v; 4096]).expect("write");
            model[(b * 4096) as usize..(b * 4096 + 4096) as usize].fill(v);
        }
        if i % 32 == 31 {
            up.flush().expect("flush");
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = compactor.join().expect("compactor");
    eprintln!("{n} compactions beside the writer");
    assert!(read(&up, 0, SIZE as usize) == model, "content");
    up.flush().expect("flush");
    drop(up);
    let (up, _) = UpperLayer::open(dir, SIZE).expect("reopen");
    assert!(read(&up, 0, SIZE as usize) == model, "content after reopen");
}

/// A flush on lent threads (as lsmd runs it: both files' `fdatasync`s at once) queues its mark
/// only after both syncs: the mark reaches the log after the records it covers, with the next
/// records, and names exactly what the flush covered; everything replays.
#[test]
fn a_flush_on_lent_threads_marks_after_both_syncs() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    up.set_parallel_syncs(std::sync::Arc::new(common::Threads));
    for i in 0..3u64 {
        up.write(i * 4096, &[i as u8 + 1; 4096]).expect("write");
    }
    up.flush().expect("flush");
    let r = last_record(dir);
    assert_eq!(
        (r.kind, r.seq),
        (RecordKind::Write, 3),
        "the flush synced the 3 writes; its mark is still queued"
    );
    up.write(3 * 4096, &[9; 4096]).expect("write");
    up.settle().expect("settle");
    let log = fs::read(dir.join(LOG_FILE)).expect("log");
    let mark =
        Record::decode(&log[log.len() - 2 * RECORD_LEN..log.len() - RECORD_LEN]).expect("a record");
    assert_eq!(
        (mark.kind, mark.seq, mark.offset),
        (RecordKind::FlushMark, 4, 3),
        "the mark follows the records it covers and names the last one"
    );
    drop(up);
    let (up, rec) = UpperLayer::open(dir, SIZE).expect("reopen");
    assert_eq!(rec.replayed, 4);
    assert_eq!(read(&up, 3 * 4096, 4096), [9; 4096]);
}
