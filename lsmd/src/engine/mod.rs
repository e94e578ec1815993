//! The request engine: the one rule every frontend follows, so that NBD, ublk and FUSE differ
//! only in how requests arrive and how answers leave.
//!
//! - Hot work runs inline on the frontend's own thread: reads whose chunks the decoded-chunk
//!   cache holds (or that fall in the upper layer, or in holes), writes, zeroes, trims. It never
//!   blocks for long, and a thread hand-off would cost more than the work.
//! - Cold work — a chunk to decode or fetch, FLUSH, the sync after a FUA write, large reads —
//!   runs on one [`WorkerPool`] shared by every export and frontend, through a [`Lane`] per
//!   client (an NBD connection, a ublk queue, a FUSE mount): at most all but one worker run one
//!   lane's work at once, and a lane holds a bounded number of tasks before its submitter waits,
//!   so no client can take the pool from the others.
//! - Answers are given by whoever finished the work, in any order: a cold read on one request
//!   never delays a hot one behind it.
//! - Failures map to one errno table ([`errno`]); every request is counted per export, frontend
//!   and path (hot or cold) for `/metrics` (`lsm_requests_total`).

mod export;
mod lane;
mod loads;
pub mod pool;

pub use export::{Export, Exports};
pub use lane::Lane;
pub use loads::PoolLoads;
pub use pool::WorkerPool;

use blockfmt::upper::Writeback;
use blockfmt::Alloc;

use crate::metrics::Frontend;

/// Largest read served on a frontend's thread when its chunks are cached: copying megabytes is
/// better spread over cores than serialised on one thread.
pub const INLINE_READ_MAX: usize = 128 * 1024;

/// The allocation map of a read: `(offset, length, what)` pieces covering it.
pub type ReadMap = Vec<(u64, u64, Alloc)>;

/// The shared pool and the rule for using it; cloning shares it.
#[derive(Clone)]
pub struct Engine {
    pool: WorkerPool,
}

impl Engine {
    /// An engine with `threads` pool workers (at least one).
    pub fn new(threads: usize) -> Engine {
        Engine {
            pool: WorkerPool::new(threads),
        }
    }

    /// Pool workers.
    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// A new lane for one client: at most `max_pending` of its tasks queued or running before
    /// [`Lane::submit`] waits.
    pub fn lane(&self, max_pending: usize) -> Lane {
        Lane::new(self.pool.clone(), max_pending)
    }

    /// The pool itself, for work that belongs to no client (source I/O threads use their own).
    pub fn pool(&self) -> &WorkerPool {
        &self.pool
    }

    /// Lends the pool to `image` (`blockfmt` has no threads) for a read's parallel chunk loads
    /// and for the two `fdatasync`s of a FLUSH of its upper layer, which then wait at once; and
    /// `sync_file_range` (blockfmt has no `unsafe`), with which a FLUSH whose writes all went
    /// into reused space costs one device flush (ext2/3/4 only, see
    /// [`blockfmt::UpperLayer::set_data_writeback`]).
    pub fn serve_image(&self, image: &blockfmt::Image) {
        let threads = std::sync::Arc::new(PoolLoads(self.pool.clone()));
        if let Some(up) = image.upper() {
            up.set_parallel_syncs(threads.clone());
            let single = up.set_data_writeback(std::sync::Arc::new(write_back));
            tracing::debug!(layer = %up.dir().display(), single, "single-sync FLUSH");
        }
        image.lower().set_parallel_loads(threads);
    }
}

/// Writes back the dirty pages of `f` without its metadata and without a device cache flush
/// (the caller's next `fdatasync` of another file on the same filesystem sends that): with
/// [`Writeback::Wait`] every page, waiting until the writes completed, and returning a writeback
/// error since this descriptor last looked; with [`Writeback::Start`] the writes are only
/// started.
fn write_back(f: &std::fs::File, how: Writeback) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let flags = match how {
        Writeback::Start => libc::SYNC_FILE_RANGE_WRITE,
        Writeback::Wait => {
            libc::SYNC_FILE_RANGE_WAIT_BEFORE
                | libc::SYNC_FILE_RANGE_WRITE
                | libc::SYNC_FILE_RANGE_WAIT_AFTER
        }
    };
    // SAFETY: a plain syscall on a descriptor `f` keeps open for the call; offset 0 and
    // length 0 mean the whole file; no memory is passed.
    let r = unsafe { libc::sync_file_range(f.as_raw_fd(), 0, 0, flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Tries a read as hot work: `Some` (filled `buf` and its map, or the failure) when it could be
/// served without decoding or fetching, `None` when it must go to the pool ([`read_cold`]).
pub fn read_hot(
    export: &Export,
    via: Frontend,
    off: u64,
    buf: &mut [u8],
) -> Option<blockfmt::Result<ReadMap>> {
    if buf.len() > INLINE_READ_MAX {
        return None;
    }
    let r = export.image.read_sparse(off, buf, true).transpose()?;
    export.stats.count_request(via, false);
    export.defrag_if_asked();
    Some(r)
}

/// A read as cold work (on a pool thread): decodes and fetches what it needs.
pub fn read_cold(
    export: &Export,
    via: Frontend,
    off: u64,
    buf: &mut [u8],
) -> blockfmt::Result<ReadMap> {
    export.stats.count_request(via, true);
    let r = export
        .image
        .read_sparse(off, buf, false)?
        .ok_or_else(|| blockfmt::Error::Invalid("read incomplete".into()));
    export.defrag_if_asked();
    r
}

/// Hot work that changes the image (write, zeroes, trim), counted.
pub fn hot<T>(export: &Export, via: Frontend, work: impl FnOnce(&blockfmt::Image) -> T) -> T {
    export.stats.count_request(via, false);
    let r = work(&export.image);
    export.compact_if_asked();
    r
}

/// FLUSH (or the sync after a FUA write) as cold work: syncs the image and counts it.
pub fn flush(export: &Export, via: Frontend) -> blockfmt::Result<()> {
    export.stats.count_request(via, true);
    export.flush(via)
}

/// The errno a frontend reports for a failed image request: a range or argument the disk
/// cannot take is EINVAL, a write to a read-only image EROFS, a filesystem under the upper
/// layer out of space or quota (ENOSPC, EDQUOT) ENOSPC — the request failed, nothing was lost,
/// and it may succeed once space is freed, so a client such as qemu (`werror=enospc`) can pause
/// instead of failing the disk — and anything else (a layer that failed its checks, a source
/// that gave up, an upper layer refusing writes after a failed sync) EIO. Frontends whose
/// protocol lacks one of these translate further (NBD has no EROFS).
pub fn errno(e: &blockfmt::Error) -> i32 {
    match e {
        blockfmt::Error::OutOfRange { .. } | blockfmt::Error::Invalid(_) => libc::EINVAL,
        blockfmt::Error::ReadOnly => libc::EROFS,
        e if e.is_no_space() => libc::ENOSPC,
        _ => libc::EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn io(raw: i32) -> blockfmt::Error {
        blockfmt::Error::Io {
            layer: "upper".into(),
            offset: 4096,
            source: std::io::Error::from_raw_os_error(raw),
        }
    }

    /// A full filesystem or quota is ENOSPC for the client; other I/O errors and a sticky
    /// failure are EIO.
    #[test]
    fn no_space_is_enospc_and_failures_are_eio() {
        assert_eq!(errno(&io(libc::ENOSPC)), libc::ENOSPC);
        assert_eq!(errno(&io(libc::EDQUOT)), libc::ENOSPC);
        assert_eq!(errno(&io(libc::EIO)), libc::EIO);
        let failed = blockfmt::Error::Failed {
            layer: "upper".into(),
            detail: "fdatasync of data failed".into(),
        };
        assert_eq!(errno(&failed), libc::EIO);
        assert_eq!(errno(&blockfmt::Error::ReadOnly), libc::EROFS);
    }
}
