//! The upper layer under faults that cannot be caused for real on a test machine: a failing
//! `fdatasync` and a log or data `pwrite` failing at an exact record (ENOSPC on a real full
//! filesystem is shown end to end in tests/enospc.rs). Failpoints from the `fail` crate:
//! `cargo test --release -p blockfmt --features failpoints --test upper_faults`.

use std::path::Path;

use blockfmt::upper::{LOG_FILE, RECORD_LEN};
use blockfmt::{Error, UpperLayer};

mod common;
use common::read;

const SIZE: u64 = 4 << 20;

fn block(i: u64, v: u8) -> (u64, Vec<u8>) {
    (i * 4096, vec![v; 4096])
}

fn reopen(dir: &Path) -> UpperLayer {
    UpperLayer::open(dir, SIZE).expect("reopen").0
}

/// Item: a failed `fdatasync` of the data file or the log is sticky: the flush fails, every
/// later flush and write fails although the fault is gone, no flush mark is written; after
/// reopening, what was flushed before is there and the layer works again. Both with the syncs
/// one after the other and with them at once on lent threads (as lsmd runs them).
#[test]
fn failed_data_sync_is_sticky_until_reopened() {
    let cases = ["upper-sync-data", "upper-sync-log"]
        .into_iter()
        .flat_map(|p| [(p, false), (p, true)]);
    for (point, lent) in cases {
        let scenario = fail::FailScenario::setup();
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let up = UpperLayer::create(dir, SIZE).expect("create");
        if lent {
            up.set_parallel_syncs(std::sync::Arc::new(common::Threads));
        }
        let (o, d) = block(1, 0x11);
        up.write(o, &d).expect("write");
        up.flush().expect("flush");
        let (o2, d2) = block(2, 0x22);
        up.write(o2, &d2).expect("write");
        fail::cfg(point, "1*return").expect("cfg");
        assert!(up.flush().is_err(), "{point}: flush must fail");
        // The fault is gone (1*): a retry would "succeed" over possibly dropped pages.
        assert_failed_for_good(&up, dir, point, 0);
        assert!(up.stats().failed.is_some());
        drop(up);
        scenario.teardown();
        let up = reopen(dir);
        assert_eq!(read(&up, o, 4096), d, "{point}: flushed write kept");
        up.write(0, &[7; 4096])
            .expect("writes work after reopening");
        up.flush().expect("flush after reopening");
    }
}

/// Item: a log `pwrite` that fails (here: ENOSPC at the 64th queued record) does not leave a
/// phantom record: the write fails, the next write takes its place, and after a flush and a
/// reopen every acknowledged write reads back exactly — none of the failed one.
#[test]
fn failed_log_append_leaves_no_phantom_record() {
    let scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    let mut model = vec![0u8; SIZE as usize];
    let mut put = |up: &UpperLayer, i: u64, v: u8| -> Result<(), Error> {
        let (o, d) = block(i, v);
        up.write(o, &d)?;
        model[o as usize..o as usize + 4096].copy_from_slice(&d);
        Ok(())
    };
    // 63 records queue without touching the log; the 64th writes the queue out.
    for i in 0..63 {
        put(&up, i, i as u8 + 1).expect("write");
    }
    fail::cfg("upper-log-write", "1*return").expect("cfg");
    let e = put(&up, 100, 0xee).expect_err("write whose log append fails");
    assert!(e.is_no_space(), "{e}");
    assert!(
        up.stats().failed.is_none(),
        "running out of space is not sticky"
    );
    // The next write reuses the failed one's data offset.
    put(&up, 101, 0x55).expect("write after the failed one");
    up.flush().expect("flush");
    drop(up);
    scenario.teardown();
    let up = reopen(dir);
    assert!(
        read(&up, 0, SIZE as usize) == model,
        "content after reopen differs"
    );
    let records =
        (std::fs::metadata(dir.join(LOG_FILE)).expect("stat").len() - 64) / RECORD_LEN as u64;
    assert_eq!(records, 65, "63 + 1 writes + 1 flush mark");
}

/// A data `pwrite` that runs out of space leaves the layer as it was; writes succeed again
/// once the fault is gone. Version 3 never rewrites a record's bytes in place, so a failed
/// write into reused dead space is undone too: the space goes back to the free list and the
/// next write takes it.
#[test]
fn failed_data_write_is_undone_or_sticky() {
    let scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    let (o, d) = block(3, 0x33);
    up.write(o, &d).expect("write");
    up.flush().expect("flush");
    fail::cfg("upper-data-write", "1*return").expect("cfg");
    let e = up.write(8192, &[9; 4096]).expect_err("append fails");
    assert!(e.is_no_space() && up.stats().failed.is_none(), "{e}");
    up.write(8192, &[8; 4096]).expect("write again");
    // Kill that write's slot and free it (a synced mark over its killer).
    up.flush().expect("flush");
    up.write(8192, &[6; 4096]).expect("rewrite");
    up.flush().expect("flush");
    up.write(o, &d).expect("rewrite");
    up.flush().expect("flush");
    let free = up.stats().free_bytes;
    assert!(free >= 4096, "a dead slot is free");
    let len = up.data_file_len();
    fail::cfg("upper-data-write", "1*return").expect("cfg");
    up.write(65536, &[7; 4096])
        .expect_err("a write into dead space fails");
    assert!(up.stats().failed.is_none(), "undone, not sticky");
    assert_eq!(up.stats().free_bytes, free, "the space is free again");
    up.write(65536, &[5; 4096]).expect("write again");
    assert_eq!(up.data_file_len(), len, "it took the dead space");
    up.flush().expect("flush");
    drop(up);
    scenario.teardown();
    let up = reopen(dir);
    assert_eq!(read(&up, o, 4096), d, "flushed write kept");
    assert_eq!(read(&up, 8192, 4096), [6; 4096]);
    assert_eq!(read(&up, 65536, 4096), [5; 4096]);
}

/// Writes, zeroes, trims and flushes that land while a compaction copies without the lock —
/// including rewrites of unflushed bytes and (version 3) writes into dead space of the old
/// data file the copy may be reading — are all in the compacted layer, and after reopening.
#[test]
fn writes_during_a_compaction_are_kept() {
    const BIG: u64 = 16 << 20;
    let scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = std::sync::Arc::new(UpperLayer::create(dir, BIG).expect("create"));
    up.set_compaction(blockfmt::upper::CompactionPolicy::never());
    let model = std::sync::Arc::new(std::sync::Mutex::new(vec![0u8; BIG as usize]));
    let put = |up: &UpperLayer, model: &mut [u8], off: u64, v: u8, len: usize| {
        up.write(off, &vec![v; len]).expect("write");
        model[off as usize..off as usize + len].fill(v);
    };
    {
        let mut m = model.lock().expect("model");
        for i in 0..BIG / 4096 {
            put(&up, &mut m, i * 4096, (i % 251) as u8 + 1, 4096);
        }
        up.flush().expect("flush");
        // Not flushed: a rewrite of exactly these bytes would go in place.
        for i in 0..64 {
            put(&up, &mut m, i * 8192, 0xee, 4096);
        }
    }
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    let (up2, model2, calls2) = (up.clone(), model.clone(), calls.clone());
    fail::cfg_callback("upper-compact-round", move || {
        let mut m = model2.lock().expect("model");
        let n = calls2.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        match n {
            // Round 1: more than the last round takes (another unlocked round follows),
            // rewrites in place-able bytes, zeroes, a trim and a flush.
            0 => {
                for i in 0..64 {
                    put(&up2, &mut m, i * 8192, 0xdd, 4096);
                }
                for i in 0..1600 {
                    put(&up2, &mut m, (i * 7 % (BIG / 4096)) * 4096, 0x5a, 4096);
                }
                up2.write_zeroes(1 << 20, 65536, false).expect("zeroes");
                m[1 << 20..(1 << 20) + 65536].fill(0);
                up2.flush().expect("flush");
                up2.write_zeroes(3 << 20, 8192, true).expect("trim");
                m[3 << 20..(3 << 20) + 8192].fill(0);
                // Sync the mark over the rewrites: their old slots are free, and the next
                // writes take them.
                put(&up2, &mut m, 6 << 20, 0x44, 4096);
                up2.flush().expect("flush");
                let (free, len) = (up2.stats().free_bytes, up2.data_file_len());
                assert!(free > 64 * 4096, "dead space is free: {free}");
                for i in 0..64 {
                    put(&up2, &mut m, (7 << 20) + i * 4096, 0x33, 4096);
                }
                assert_eq!(up2.data_file_len(), len, "the writes took dead space");
            }
            // Round 2: a few writes, copied by the last round under the lock.
            1 => {
                put(&up2, &mut m, 5 << 20, 0x77, 12288);
                put(&up2, &mut m, 0, 0x66, 4096);
            }
            _ => {}
        }
    })
    .expect("cfg");
    up.compact().expect("compact");
    fail::remove("upper-compact-round");
    assert_eq!(
        calls.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "two rounds"
    );
    let want = model.lock().expect("model").clone();
    assert!(
        read(&up, 0, BIG as usize) == want,
        "content after compaction"
    );
    assert_eq!(up.stats().compactions, 1);
    // Everything acknowledged before compact returned is durable: the log ends in a flush
    // mark covering it, and the new files hold it.
    drop(up);
    scenario.teardown();
    let (up, rec) = UpperLayer::open(dir, BIG).expect("reopen");
    assert_eq!((rec.log_bytes_dropped, rec.data_bytes_dropped), (0, 0));
    assert!(read(&up, 0, BIG as usize) == want, "content after reopen");
}

/// A compaction that fails midway (while writes go on) leaves the layer as it was: no leftover
/// files, not failed, writes and flushes work, a later compaction succeeds.
#[test]
fn a_compaction_failing_midway_leaves_the_layer_as_it_was() {
    let scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = UpperLayer::create(dir, SIZE).expect("create");
    up.set_compaction(blockfmt::upper::CompactionPolicy::never());
    for i in 0..3 * SIZE / 4096 {
        let (o, d) = block(i % (SIZE / 4096), i as u8);
        up.write(o, &d).expect("write");
        if i % 8 == 0 {
            up.flush().expect("flush");
        }
    }
    let want = read(&up, 0, SIZE as usize);
    fail::cfg("upper-compact-round", "1*return").expect("cfg");
    up.compact().expect_err("compaction must fail");
    assert!(
        up.stats().failed.is_none(),
        "a failed compaction is not fatal"
    );
    assert!(!dir.join(blockfmt::upper::COMPACT_DATA_FILE).exists());
    assert!(!dir.join(blockfmt::upper::COMPACT_LOG_FILE).exists());
    assert!(read(&up, 0, SIZE as usize) == want);
    let (o, d) = block(3, 0x99);
    up.write(o, &d).expect("write after a failed compaction");
    up.flush().expect("flush after a failed compaction");
    up.compact().expect("a later compaction");
    drop(up);
    scenario.teardown();
    let mut want = want;
    want[o as usize..o as usize + 4096].copy_from_slice(&d);
    assert!(read(&reopen(dir), 0, SIZE as usize) == want);
}

/// Builds a layer whose next FLUSH takes the single-sync path: block 0 written, flushed,
/// rewritten, block 2 appended and flushed (so block 0's first slot is free), then block 3
/// written into that slot. Returns the layer; blocks 0 (0x22) and 2 (0x33) are flushed.
fn layer_before_a_single_sync_flush(dir: &Path) -> UpperLayer {
    let up = UpperLayer::create(dir, SIZE).expect("create");
    common::lend_writeback(&up);
    up.write(0, &[0x11; 4096]).expect("write");
    up.flush().expect("flush");
    up.write(0, &[0x22; 4096]).expect("rewrite");
    up.flush().expect("flush");
    up.write(2 * 4096, &[0x33; 4096]).expect("append");
    up.flush()
        .expect("flush: marks the rewrite, frees block 0's first slot");
    assert_eq!(up.stats().free_bytes, 4096);
    let len = up.data_file_len();
    up.write(3 * 4096, &[0x44; 4096])
        .expect("write into the free slot");
    assert_eq!(up.data_file_len(), len, "the write took the free slot");
    assert_eq!(
        up.stats().single_sync_flushes,
        0,
        "every flush so far appended"
    );
    up
}

/// Item: the single-sync FLUSH (data written back without a device flush, then the log's
/// `fdatasync`) is taken only when no write since the data file's last full sync appended, and
/// keeps every write; an append brings back the two `fdatasync`s.
#[test]
fn a_flush_of_reused_space_only_syncs_the_log() {
    // No failpoint here, but the scenario keeps the other tests' failpoints (a process-wide
    // registry) away from these syncs, and this test's syncs from their counts.
    let scenario = fail::FailScenario::setup();
    let tmp = common::tempdir_on_disk();
    let dir = tmp.path();
    let up = layer_before_a_single_sync_flush(dir);
    up.flush().expect("single-sync flush");
    assert_eq!(up.stats().single_sync_flushes, 1);
    up.write(9 * 4096, &[0x55; 4096]).expect("append");
    up.flush().expect("flush after an append");
    assert_eq!(
        up.stats().single_sync_flushes,
        1,
        "an append takes both fdatasyncs"
    );
    drop(up);
    let up = reopen(dir);
    for (i, v) in [(0u64, 0x22u8), (2, 0x33), (3, 0x44), (9, 0x55)] {
        assert_eq!(read(&up, i * 4096, 4096), [v; 4096], "block {i}");
    }
    scenario.teardown();
}

/// After a failed sync: a second flush and a write (at `write_at`) fail although the fault is
/// gone, and nothing more reaches the log.
fn assert_failed_for_good(up: &UpperLayer, dir: &std::path::Path, point: &str, write_at: u64) {
    let log_len = std::fs::metadata(dir.join(LOG_FILE)).expect("stat").len();
    let again = up.flush().expect_err("second flush must fail too");
    assert!(matches!(again, Error::Failed { .. }), "{point}: {again}");
    let w = up
        .write(write_at, &[1; 4096])
        .expect_err("write after failure");
    assert!(matches!(w, Error::Failed { .. }), "{point}: {w}");
    assert_eq!(
        std::fs::metadata(dir.join(LOG_FILE)).expect("stat").len(),
        log_len,
        "{point}: nothing appended after the failure"
    );
}

/// Item: on the single-sync path, a failing writeback of the data file (`sync_file_range`) or
/// a failing `fdatasync` of the log is sticky like any failed sync: that flush fails, later
/// flushes and writes fail although the fault is gone, no flush mark is written; after
/// reopening, what was flushed before is there.
#[test]
fn a_failed_single_sync_flush_is_sticky_until_reopened() {
    for point in ["upper-writeback-data", "upper-sync-log"] {
        let scenario = fail::FailScenario::setup();
        let tmp = common::tempdir_on_disk();
        let dir = tmp.path();
        let up = layer_before_a_single_sync_flush(dir);
        fail::cfg(point, "1*return").expect("cfg");
        assert!(up.flush().is_err(), "{point}: flush must fail");
        assert_eq!(up.stats().single_sync_flushes, 0, "{point}");
        assert_failed_for_good(&up, dir, point, 5 * 4096);
        drop(up);
        scenario.teardown();
        let up = reopen(dir);
        assert_eq!(
            read(&up, 0, 4096),
            [0x22; 4096],
            "{point}: flushed rewrite kept"
        );
        assert_eq!(
            read(&up, 2 * 4096, 4096),
            [0x33; 4096],
            "{point}: flushed write kept"
        );
        up.write(0, &[7; 4096])
            .expect("writes work after reopening");
        up.flush().expect("flush after reopening");
    }
}

/// A gate the `upper-sync-log` failpoint's callback waits at: the first `hold` calls block
/// until [`SyncGate::open`], every call is counted.
struct SyncGate {
    state: std::sync::Mutex<(u32, bool)>,
    cv: std::sync::Condvar,
}

impl SyncGate {
    fn install(hold: u32) -> std::sync::Arc<SyncGate> {
        let gate = std::sync::Arc::new(SyncGate {
            state: std::sync::Mutex::new((0, false)),
            cv: std::sync::Condvar::new(),
        });
        let g = gate.clone();
        fail::cfg_callback("upper-sync-log", move || {
            let mut s = g.state.lock().expect("gate");
            s.0 += 1;
            g.cv.notify_all();
            while s.0 <= hold && !s.1 {
                s = g.cv.wait(s).expect("gate");
            }
        })
        .expect("cfg");
        gate
    }

    /// Waits until `n` syncs of the log have begun.
    fn wait_for(&self, n: u32) {
        let mut s = self.state.lock().expect("gate");
        while s.0 < n {
            s = self.cv.wait(s).expect("gate");
        }
    }

    fn open(&self) {
        self.state.lock().expect("gate").1 = true;
        self.cv.notify_all();
    }

    fn syncs(&self) -> u32 {
        self.state.lock().expect("gate").0
    }
}

/// Item (group commit): flushes that arrive while a flush's syncs run wait for that round and
/// do not return before a round covered their own writes; one next round then covers all of
/// them, so three FLUSHes cost two rounds of syncs. Every write replays after a reopen.
#[test]
fn flushes_arriving_during_a_round_share_the_next_one() {
    let scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = std::sync::Arc::new(UpperLayer::create(dir, SIZE).expect("create"));
    let (o, d) = block(1, 0x11);
    up.write(o, &d).expect("write");
    let gate = SyncGate::install(1);
    let flusher = |up: &std::sync::Arc<UpperLayer>| {
        let up = up.clone();
        std::thread::spawn(move || up.flush())
    };
    let first = flusher(&up);
    gate.wait_for(1);
    // Round 1 is syncing the first write; these writes and flushes come after it began.
    up.write(2 * 4096, &[0x22; 4096]).expect("write");
    let second = flusher(&up);
    up.write(3 * 4096, &[0x33; 4096]).expect("write");
    let third = flusher(&up);
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert!(
        !second.is_finished() && !third.is_finished(),
        "a flush returned before any round covered its write"
    );
    gate.open();
    for t in [first, second, third] {
        t.join().expect("flush thread").expect("flush");
    }
    assert_eq!(gate.syncs(), 2, "the two later flushes shared one round");
    drop(up);
    scenario.teardown();
    let up = reopen(dir);
    assert_eq!(read(&up, o, 4096), d);
    assert_eq!(read(&up, 2 * 4096, 4096), [0x22; 4096]);
    assert_eq!(read(&up, 3 * 4096, 4096), [0x33; 4096]);
}

/// Item (group commit): a flush waiting for a round that fails fails too (the layer is failed,
/// sticky) and runs no round of its own: a waiter never succeeds over a failed sync.
#[test]
fn a_flush_waiting_for_a_failed_round_fails() {
    let scenario = fail::FailScenario::setup();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = tmp.path();
    let up = std::sync::Arc::new(UpperLayer::create(dir, SIZE).expect("create"));
    up.write(0, &[0x11; 4096]).expect("write");
    fail::cfg("upper-sync-data", "1*return").expect("cfg");
    let gate = SyncGate::install(1);
    let first = {
        let up = up.clone();
        std::thread::spawn(move || up.flush())
    };
    gate.wait_for(1);
    up.write(4096, &[0x22; 4096])
        .expect("write during the round");
    let second = {
        let up = up.clone();
        std::thread::spawn(move || up.flush())
    };
    std::thread::sleep(std::time::Duration::from_millis(300));
    gate.open();
    assert!(first.join().expect("thread").is_err(), "the round failed");
    let e = second
        .join()
        .expect("thread")
        .expect_err("the waiting flush fails too");
    assert!(matches!(e, Error::Failed { .. }), "{e}");
    assert_eq!(gate.syncs(), 1, "the waiter ran no round of its own");
    assert_failed_for_good(&up, dir, "upper-sync-data", 2 * 4096);
    drop(up);
    scenario.teardown();
}

/// Item: a defragmenting rewrite is ordinary writes under faults too. Its data `pwrite` running
/// out of space changes nothing (the rewrite fails, the layer is not failed); its log append
/// running out of space midway keeps the records before it (whole, correct: the same bytes)
/// and drops the rest. Either way the disk reads the same, before and after a reopen, and a
/// failure ends the burst (the queue is dropped).
#[test]
fn a_rewrite_out_of_space_changes_nothing_a_read_sees() {
    for point in ["upper-data-write", "upper-log-write"] {
        let scenario = fail::FailScenario::setup();
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let (up, _) = UpperLayer::open(dir, SIZE).expect("create");
        up.set_defrag_policy(blockfmt::upper::DefragPolicy {
            min_pieces: 8,
            reads: 1,
        });
        let stack = blockfmt::LayerStack::new(vec![], SIZE, 0).expect("stack");
        let img = blockfmt::Image::new(stack, Some(up)).expect("image");
        // 96 blocks written last to first: out of order in the data file.
        let mut model = vec![0u8; SIZE as usize];
        for b in (0..96u64).rev() {
            let (o, d) = block(b, b as u8 + 1);
            img.write(o, &d).expect("write");
            model[o as usize..o as usize + 4096].copy_from_slice(&d);
        }
        img.flush().expect("flush");
        let mut buf = vec![0u8; 96 * 4096];
        img.read(0, &mut buf).expect("read");
        let up = img.upper().expect("upper");
        assert_eq!(up.queued_defrags(), 1);
        // The log fault hits where the pending records are written out: mid-rewrite.
        fail::cfg(point, "1*return").expect("cfg");
        let e = img.run_defrags().expect_err("the rewrite fails");
        assert!(e.is_no_space(), "{point}: {e}");
        assert!(up.stats().failed.is_none(), "{point}: not sticky");
        assert_eq!(up.queued_defrags(), 0, "{point}: the burst ended");
        assert!(read(up, 0, SIZE as usize) == model, "{point}: same bytes");
        img.flush().expect("flush");
        drop(img);
        scenario.teardown();
        let up = reopen(dir);
        assert!(
            read(&up, 0, SIZE as usize) == model,
            "{point}: after reopen"
        );
    }
}
