//! What the upper-layer test binaries share.

use blockfmt::upper::UpperTarget;
use blockfmt::UpperLayer;

/// Reads `[off, off + len)` of an upper layer alone (zeros where it has nothing).
pub fn read(up: &UpperLayer, off: u64, len: usize) -> Vec<u8> {
    let mut out = vec![0u8; len];
    let v = up.pieces(off, len as u64);
    for &(s, l, t) in &v.pieces {
        let dst = &mut out[(s - off) as usize..(s - off + l) as usize];
        if let Some(UpperTarget::Data { file_offset }) = t {
            v.read_data(file_offset, dst).expect("read");
        }
    }
    out
}

/// A host's threads as the daemon lends them ([`blockfmt::ParallelLoads`]): one thread per
/// task, all joined before returning.
#[allow(dead_code)] // not every test binary lends threads
pub struct Threads;

impl blockfmt::ParallelLoads for Threads {
    fn run_all(&self, tasks: Vec<blockfmt::LoadTask>) {
        let handles: Vec<_> = tasks.into_iter().map(std::thread::spawn).collect();
        for h in handles {
            let _ = h.join();
        }
    }
}

/// A directory on the filesystem of the build's target directory (not /tmp, which may be a
/// tmpfs): the single-sync FLUSH is on only where the filesystem overwrites in place (ext4).
#[allow(dead_code)] // not every test binary needs it
pub fn tempdir_on_disk() -> tempfile::TempDir {
    tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tmp")
}

/// Lends `up` a writeback for the single-sync FLUSH and checks that it is on. The stand-in is
/// `fdatasync` (stronger than the daemon's `sync_file_range`: these tests are about which path
/// a FLUSH takes and how its failures are handled, not the device's cache).
#[allow(dead_code)] // not every test binary needs it
pub fn lend_writeback(up: &UpperLayer) {
    let on = up.set_data_writeback(std::sync::Arc::new(|f: &std::fs::File, how| match how {
        blockfmt::upper::Writeback::Wait => f.sync_data(),
        blockfmt::upper::Writeback::Start => Ok(()),
    }));
    assert!(
        on,
        "this test needs CARGO_TARGET_TMPDIR on ext2/3/4 with 4 KiB blocks"
    );
}
