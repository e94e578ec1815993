//! NBD frontend: serves `Image`s to NBD clients (qemu, libnbd, the kernel's nbd) over any byte
//! stream, Unix socket or TCP. Fixed newstyle handshake with EXPORT_NAME, INFO, GO, LIST, ABORT,
//! STARTTLS (required on TCP when a certificate is configured, see `tls`), STRUCTURED_REPLY and
//! base:allocation metadata contexts; READ (sparse, with OFFSET_HOLE),
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
//!
//! Isolation ([`Limits`]): no client can hold what another needs. The handshake has a deadline;
//! every write to a client has a timeout, after which the connection is shut down (so a client
//! that stops reading replies frees the pool worker writing to it and the reply lock); one
//! connection never has more than all but one of the pool's workers; an idle timeout may be set;
//! the number of connections is capped by the accept loop. Per-connection memory is bounded:
//! 256 KiB of input and of output buffer, one request payload (at most [`proto::MAX_PAYLOAD`])
//! and at most 64 queued request headers; read buffers belong to pool workers, not connections.

mod handshake;
pub mod kernel;
mod netlink;
pub mod proto;
mod tls;
mod transmission;

pub use tls::TlsConfig;

pub use crate::engine::{Export, Exports};

use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::Engine;

/// A stream that can be split into a reading and a writing half.
pub trait Duplex: Read + Write + AsRawFd + Send + 'static {
    /// Another handle to the same stream.
    fn try_clone_stream(&self) -> io::Result<Self>
    where
        Self: Sized;
    /// Sets the socket's receive timeout (shared by every handle to it).
    fn set_read_timeout_to(&self, t: Option<Duration>) -> io::Result<()>;
    /// Sets the socket's send timeout (shared by every handle to it).
    fn set_write_timeout_to(&self, t: Option<Duration>) -> io::Result<()>;
}
impl Duplex for std::net::TcpStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_to(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_to(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}
impl Duplex for std::os::unix::net::UnixStream {
    fn try_clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn set_read_timeout_to(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(t)
    }
    fn set_write_timeout_to(&self, t: Option<Duration>) -> io::Result<()> {
        self.set_write_timeout(t)
    }
}

/// Timeouts that keep one client from holding what others need. `None` (or zero) disables one.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From accept to the client choosing an export (a client that connects and sends nothing,
    /// or haggles forever, is dropped).
    pub handshake: Option<Duration>,
    /// How long one write to the client may make no progress before the connection is dropped
    /// (a client that stops reading replies).
    pub write: Option<Duration>,
    /// How long a connection may send no request while none of its requests is in flight.
    pub idle: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake: Some(Duration::from_secs(30)),
            write: Some(Duration::from_secs(30)),
            idle: None,
        }
    }
}

/// What every connection of one server shares.
#[derive(Clone)]
pub struct Server {
    /// The exports offered.
    pub exports: Exports,
    /// The request engine: its pool runs the work that may block.
    pub engine: Engine,
    /// How long a connection thread polls for the next request before it sleeps. Waking a
    /// sleeping thread from another CPU costs tens of microseconds on virtual machines
    /// (measured here: 4k QD1 read latency 55 µs sleeping, see README); polling a little after
    /// each reply keeps that off the latency of back-to-back requests. Zero disables it.
    pub busy_poll: Duration,
    /// Timeouts of client connections (not of kernel attachments: the kernel is trusted).
    pub limits: Limits,
    /// When set, clients must start TLS (STARTTLS) before anything else.
    pub tls: Option<TlsConfig>,
}

/// Serves one client connection to completion. Protocol violations end the connection with an
/// error; they never affect other connections.
pub fn serve_connection<S: Duplex>(stream: S, server: &Server) -> io::Result<()> {
    let deadline = server
        .limits
        .handshake
        .filter(|t| !t.is_zero())
        .map(|t| Instant::now() + t);
    let tls = match server.tls {
        Some(_) => handshake::Tls::Required,
        None => handshake::Tls::Off,
    };
    serve_stream(stream, server, tls, deadline)
}

/// [`serve_connection`] from the handshake phase `tls` on (`Active`: resumed after STARTTLS on
/// the plaintext end of the TLS pump), with the handshake due by `deadline`.
fn serve_stream<S: Duplex>(
    stream: S,
    server: &Server,
    tls: handshake::Tls,
    deadline: Option<Instant>,
) -> io::Result<()> {
    let exports = &server.exports;
    let limits = server.limits;
    let fd = stream.as_raw_fd();
    stream.set_write_timeout_to(limits.write.filter(|t| !t.is_zero()))?;
    let out = stream.try_clone_stream()?;
    let mut rd = BufReader::with_capacity(256 * 1024, stream);
    let mut hs = HandshakeIo {
        r: &mut rd,
        w: out,
        deadline,
    };
    let neg = match handshake::handshake(&mut hs, exports, tls)? {
        handshake::Outcome::Export(neg) => neg,
        handshake::Outcome::Aborted => return Ok(()),
        handshake::Outcome::StartTls { no_zeroes } => {
            let Some(cfg) = &server.tls else {
                return Err(handshake::protocol("STARTTLS without TLS configured"));
            };
            drop(hs);
            let early = rd.buffer().to_vec();
            let write_timeout = limits.write;
            let plain = tls::start(cfg, rd.into_inner(), &early, deadline, write_timeout)?;
            return serve_stream(
                plain,
                server,
                handshake::Tls::Active { no_zeroes },
                deadline,
            );
        }
    };
    let HandshakeIo { w: out, .. } = hs;
    // A request stalled half-way is bounded by the idle timeout (if any); waiting between
    // requests is handled in `transmission::serve`.
    rd.get_ref()
        .set_read_timeout_to(limits.idle.filter(|t| !t.is_zero()))?;
    let conn = Arc::new(transmission::Conn::new(
        out,
        neg.export,
        neg.structured,
        neg.meta,
        server.engine.lane(transmission::MAX_DEFERRED),
    ));
    transmission::serve(&mut rd, fd, conn, server, limits.idle)
}

/// Reads from a buffered reader and writes to the raw stream during the handshake; every read
/// waits at most until the handshake deadline.
struct HandshakeIo<'a, S: Duplex, W: Write> {
    r: &'a mut BufReader<S>,
    w: W,
    deadline: Option<Instant>,
}
impl<S: Duplex, W: Write> Read for HandshakeIo<'_, S, W> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(deadline) = self.deadline {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake not finished within the handshake timeout",
                ));
            }
            self.r.get_ref().set_read_timeout_to(Some(left))?;
        }
        self.r.read(buf).map_err(|e| match e.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                io::ErrorKind::TimedOut,
                "handshake not finished within the handshake timeout",
            ),
            _ => e,
        })
    }
}
impl<S: Duplex, W: Write> Write for HandshakeIo<'_, S, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.w.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.w.flush()
    }
}
