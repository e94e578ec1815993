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

/// Item: a failed `fdatasync` of the data file is sticky: the flush fails, every later flush
/// and write fails although the fault is gone, no flush mark is written; after reopening,
/// what was flushed before is there and the layer works again.
#[test]
fn failed_data_sync_is_sticky_until_reopened() {
    for point in ["upper-sync-data", "upper-sync-log"] {
        let scenario = fail::FailScenario::setup();
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let up = UpperLayer::create(dir, SIZE).expect("create");
        let (o, d) = block(1, 0x11);
        up.write(o, &d).expect("write");
        up.flush().expect("flush");
        let (o2, d2) = block(2, 0x22);
        up.write(o2, &d2).expect("write");
        fail::cfg(point, "1*return").expect("cfg");
        assert!(up.flush().is_err(), "{point}: flush must fail");
        // The fault is gone (1*): a retry would "succeed" over possibly dropped pages.
        let log_len = std::fs::metadata(dir.join(LOG_FILE)).expect("stat").len();
        let again = up.flush().expect_err("second flush must fail too");
        assert!(matches!(again, Error::Failed { .. }), "{point}: {again}");
        let w = up.write(0, &[1; 4096]).expect_err("write after failure");
        assert!(matches!(w, Error::Failed { .. }), "{point}: {w}");
        assert!(up.stats().failed.is_some());
        assert_eq!(
            std::fs::metadata(dir.join(LOG_FILE)).expect("stat").len(),
            log_len,
            "{point}: nothing appended after the failure"
        );
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
/// once the fault is gone. A failure rewriting unflushed bytes in place cannot be undone (the
/// old record's bytes changed): it fails the layer, and recovery drops that unflushed record.
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
    // In place: the same range again, unflushed.
    fail::cfg("upper-data-write", "1*return").expect("cfg");
    up.write(8192, &[7; 4096])
        .expect_err("in-place rewrite fails");
    assert!(up.stats().failed.is_some(), "an in-place failure is sticky");
    drop(up);
    scenario.teardown();
    let up = reopen(dir);
    assert_eq!(read(&up, o, 4096), d, "flushed write kept");
}
