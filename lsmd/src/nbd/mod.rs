//! NBD frontend: serves `Image`s to NBD clients (qemu, libnbd, the kernel's nbd) over any byte
//! stream, Unix socket or TCP. Fixed newstyle handshake with EXPORT_NAME, INFO, GO, LIST, ABORT,
//! STRUCTURED_REPLY and base:allocation metadata contexts; READ (sparse, with OFFSET_HOLE),
//! WRITE, FLUSH, TRIM, WRITE_ZEROES, BLOCK_STATUS, FUA, DISC.
//!
//! Decision on the `nbd` crate: it implements only the oldstyle/simple-reply subset (no
//! structured replies, no block status, no INFO/GO block sizes, one request at a time), which
//! is most of what this frontend exists for; a protocol module of our own is a few hundred
//! lines and lets requests run concurrently with replies in any order.
//!
//! Concurrency: each connection has one thread that reads requests and serves the hot ones
//! itself; work that may block goes to one [`WorkerPool`] shared by all connections (see
//! `transmission`). No thread is ever started per request.

mod handshake;
pub mod kernel;
mod netlink;
pub mod proto;
mod transmission;

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use blockfmt::Image;

use crate::metrics::{ExportStats, Frontend};
use crate::pool::WorkerPool;

/// One named export, shared by every frontend that serves it (NBD connections, a kernel nbd
/// device, a ublk device, a FUSE file).
pub struct Export {
    pub name: String,
    pub image: Arc<Image>,
    /// Flushes and failures seen by the frontends, for `/metrics`.
    pub stats: ExportStats,
}

impl Export {
    pub fn new(name: String, image: Arc<Image>) -> Export {
        Export {
            name,
            image,
            stats: ExportStats::default(),
        }
    }

    /// A FLUSH (or the flush after a FUA write) asked for through `via`: syncs the image and
    /// counts it. Every frontend flushes through here, so `/metrics` shows which ones reach lsmd.
    /// The caller reports an error to its client and to [`Export::failed_request`].
    pub fn flush(&self, via: Frontend) -> blockfmt::Result<()> {
        let r = self.image.flush();
        self.stats.count_flush(via, r.is_ok());
        r
    }

    /// Notes a request that failed with `e`: an upper layer out of space is counted, and one
    /// that refuses writes after a failed sync ([`blockfmt::Error::Failed`], sticky until the
    /// layer is reopened) is logged at error level (once) and raises `lsm_upper_failed`.
    pub fn failed_request(&self, e: &blockfmt::Error) {
        if e.is_no_space() {
            self.stats.count_no_space();
        }
        if matches!(e, blockfmt::Error::Failed { .. }) && self.stats.mark_failed() {
            tracing::error!(export = %self.name, error = %e, "the upper layer failed: every write and flush of this export fails (EIO) until lsmd is restarted and the layer recovered");
        }
    }
}

/// The set of exports a server offers; the first is the default (empty name).
#[derive(Clone)]
pub struct Exports {
    by_name: Arc<BTreeMap<String, Arc<Export>>>,
    default: Option<String>,
}

impl Exports {
    /// Exports in order; the first answers to the empty name.
    pub fn new(list: Vec<Export>) -> Exports {
        let default = list.first().map(|e| e.name.clone());
        Exports {
            by_name: Arc::new(
                list.into_iter()
                    .map(|e| (e.name.clone(), Arc::new(e)))
                    .collect(),
            ),
            default,
        }
    }

    /// The export called `name` (the empty name: the default export).
    pub fn find(&self, name: &str) -> Option<Arc<Export>> {
        let key = if name.is_empty() {
            self.default.as_deref()?
        } else {
            name
        };
        self.by_name.get(key).cloned()
    }

    /// Every export's name and image, in name order.
    pub fn images(&self) -> impl Iterator<Item = (&str, &Image)> {
        self.by_name
            .values()
            .map(|e| (e.name.as_str(), e.image.as_ref()))
    }

    /// Every export, in name order.
    pub fn all(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.by_name.values()
    }

    /// Every export's name and a shared handle to its image, in name order.
    pub fn images_shared(&self) -> impl Iterator<Item = (&str, Arc<Image>)> {
        self.by_name
            .values()
            .map(|e| (e.name.as_str(), e.image.clone()))
    }

    /// Flushes every writable image (graceful shutdown).
    pub fn flush_all(&self) -> Vec<(String, blockfmt::Error)> {
        self.by_name
            .values()
            .filter_map(|e| {
                let err = e.flush(Frontend::Shutdown).err()?;
                e.failed_request(&err);
                Some((e.name.clone(), err))
            })
            .collect()
    }
}

/// A stream that can be split into a reading and a writing half.
pub trait Duplex: Read + Write + AsRawFd + Send + 'static {
    /// Another handle to the same stream.
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
}
impl Duplex for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}
impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
}

/// What every connection of one server shares.
#[derive(Clone)]
pub struct Server {
    /// The exports offered.
    pub exports: Exports,
    /// Threads for work that may block.
    pub pool: WorkerPool,
    /// How long a connection thread polls for the next request before it sleeps. Waking a
    /// sleeping thread from another CPU costs tens of microseconds on virtual machines
    /// (measured here: 4k QD1 read latency 55 µs sleeping, see README); polling a little after
    /// each reply keeps that off the latency of back-to-back requests. Zero disables it.
    pub busy_poll: Duration,
}

/// Serves one client connection to completion. Protocol violations end the connection with an
/// error; they never affect other connections.
pub fn serve_connection<S: Duplex>(stream: S, server: &Server) -> io::Result<()> {
    let exports = &server.exports;
    let fd = stream.as_raw_fd();
    let out = stream.try_clone_stream()?;
    let mut rd = BufReader::with_capacity(256 * 1024, stream);
    let mut hs = HandshakeIo { r: &mut rd, w: out };
    let Some(neg) = handshake::handshake(&mut hs, exports)? else {
        return Ok(());
    };
    let conn = Arc::new(transmission::Conn::new(
        hs.w,
        neg.export,
        neg.structured,
        neg.meta,
    ));
    transmission::serve(&mut rd, fd, conn, server)
}

/// Reads from a buffered reader and writes to the raw stream during the handshake.
struct HandshakeIo<'a, R: Read, W: Write> {
    r: &'a mut R,
    w: W,
}
impl<R: Read, W: Write> Read for HandshakeIo<'_, R, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.r.read(buf)
    }
}
impl<R: Read, W: Write> Write for HandshakeIo<'_, R, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}
