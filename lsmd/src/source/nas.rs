//! A layer blob on a network filesystem (NFS, SMB, CephFS…) mounted on the host. Such a mount
//! can hang, fail a read now and then, or vanish; so every read runs on one of the source's own
//! I/O threads and is waited for with a timeout, failed reads are retried (reopening the file,
//! which also survives a remount) until a deadline, and a missing path says the mount looks
//! gone. A read stuck in the kernel keeps its thread; the others carry on.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::http::RetryPolicy;
use super::SourceStats;
use crate::pool::WorkerPool;

/// I/O threads per NAS blob.
const IO_THREADS: usize = 4;

/// A blob file on a network mount; implements `blockfmt::ReadAt`.
pub struct NasFile {
    path: PathBuf,
    file: Mutex<Arc<File>>,
    size: u64,
    io: WorkerPool,
    /// Timeout of one read.
    read_timeout: Duration,
    policy: RetryPolicy,
    stats: Arc<SourceStats>,
}

fn gone(path: &Path, e: &io::Error) -> io::Error {
    io::Error::new(
        e.kind(),
        format!(
            "NAS path {}: {e} (is the network filesystem still mounted?)",
            path.display()
        ),
    )
}

impl NasFile {
    /// Opens `path`; `read_timeout` bounds each read (retries within `policy`).
    pub fn open(
        path: &Path,
        read_timeout: Duration,
        policy: RetryPolicy,
        stats: Arc<SourceStats>,
    ) -> io::Result<NasFile> {
        let f = File::open(path).map_err(|e| gone(path, &e))?;
        let size = f.metadata().map_err(|e| gone(path, &e))?.len();
        Ok(NasFile {
            path: path.to_path_buf(),
            file: Mutex::new(Arc::new(f)),
            size,
            io: WorkerPool::new(IO_THREADS),
            read_timeout,
            policy,
            stats,
        })
    }

    /// One read on an I/O thread, waited for at most `read_timeout`.
    fn attempt(&self, len: usize, off: u64) -> io::Result<Vec<u8>> {
        let f = self.file.lock().clone();
        let (tx, rx) = mpsc::channel();
        self.io.submit(move || {
            let mut b = vec![0u8; len];
            let r = f.read_exact_at(&mut b, off).map(|_| b);
            let _ = tx.send(r);
        });
        match rx.recv_timeout(self.read_timeout) {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "read of {len} bytes at {off} took over {:?}",
                    self.read_timeout
                ),
            )),
        }
    }
}

/// Most bytes one NAS read asks for. A merged fetch (several cold chunks in one range) is read
/// in pieces of this size, each retried on its own: a flaky mount that fails some reads fails a
/// long one almost surely, so retrying the whole range would only start over.
const PIECE: usize = 256 << 10;

impl blockfmt::ReadAt for NasFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut off = offset;
        for piece in buf.chunks_mut(PIECE) {
            self.read_piece(piece, off)?;
            off += piece.len() as u64;
        }
        Ok(())
    }

    fn size(&self) -> io::Result<u64> {
        Ok(self.size)
    }
}

impl NasFile {
    /// One piece of a read, retried with back-off until `give_up_after`.
    fn read_piece(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start = Instant::now();
        let mut backoff = self.policy.first_backoff;
        self.stats.requests.fetch_add(1, Ordering::Relaxed);
        loop {
            let t0 = Instant::now();
            self.stats.inflight.fetch_add(1, Ordering::Relaxed);
            let r = self.attempt(buf.len(), offset);
            self.stats.inflight.fetch_sub(1, Ordering::Relaxed);
            self.stats.observe_latency(t0.elapsed());
            let e = match r {
                Ok(b) => {
                    buf.copy_from_slice(&b);
                    self.stats
                        .bytes
                        .fetch_add(buf.len() as u64, Ordering::Relaxed);
                    return Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return Err(io::Error::new(
                        e.kind(),
                        format!(
                            "NAS path {}: read past the end at {offset}",
                            self.path.display()
                        ),
                    ))
                }
                Err(e) => e,
            };
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(path = %self.path.display(), offset, error = %e, "NAS read failed; will retry");
            if start.elapsed() + backoff > self.policy.give_up_after {
                return Err(gone(&self.path, &e));
            }
            self.stats.retries.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(backoff);
            backoff = (backoff * 2).min(self.policy.max_backoff);
            // A remount gives a new file; a missing path is reported when time runs out.
            if let Ok(f) = File::open(&self.path) {
                *self.file.lock() = Arc::new(f);
            }
        }
    }
}

impl crate::config::NasConfig {
    /// Opens this blob file, its reads bounded by `read_timeout_ms` and retried on the host's
    /// policy, counted in the host's NAS metrics.
    pub fn open(
        &self,
        site: &super::Site,
        host: &crate::config::HostServices,
    ) -> io::Result<Arc<dyn blockfmt::ReadAt>> {
        Ok(Arc::new(NasFile::open(
            &site.resolve(&self.path),
            Duration::from_millis(self.read_timeout_ms),
            host.retry,
            host.sources.register("nas"),
        )?))
    }
}
