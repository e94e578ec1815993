//! The transmission phase of one connection.
//!
//! The engine's rule ([`crate::engine`]): the connection's own thread reads requests and does
//! the hot work right there (cached reads, writes, zeroes, trims, block status). Their replies
//! collect in one buffer that goes out in a single `write` when no further request is waiting
//! in the input buffer — a burst of 32 requests costs a couple of syscalls, not 64, and no
//! thread hand-off. Cold work (a chunk to decode or fetch, FLUSH, FUA) goes to the connection's
//! [`Lane`] of the shared pool, which replies by itself; replies therefore come in any order,
//! as the protocol allows.
//!
//! Isolation: the lane keeps a connection whose client stopped reading (its workers blocked
//! writing, or waiting for its reply lock) from taking every worker. The first failed write (the socket's send timeout, set by the caller) marks
//! the connection dead and shuts the socket down: blocked writers and the reading thread wake
//! up, queued tasks are skipped. A task that panics is answered with EIO; the worker goes on.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use blockfmt::{Alloc, Image};

use super::handshake::protocol;
use super::proto::*;
use super::{Export, Server};
use crate::engine::pool::panic_message;
use crate::engine::{self, Lane};
use crate::metrics::Frontend;

/// Requests handed to the pool and not yet answered, per connection, before the connection
/// stops reading (back-pressure on a client that floods cold reads).
pub(super) const MAX_DEFERRED: usize = 64;

thread_local! {
    /// A pool thread's read buffer, reused: a fresh megabyte per request costs page faults.
    static POOL_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes of a request header.
const REQUEST_LEN: usize = 28;

/// A connection thread keeps a write buffer up to this size between requests; a larger one (a
/// big WRITE) is freed after use.
const SCRATCH_KEEP: usize = 1 << 20;

/// The connection state shared by its thread and the pool tasks working for it.
pub(super) struct Conn<W: Write> {
    out: Mutex<BufWriter<W>>,
    /// The socket `out` writes to; valid as long as `out` is (shut down when the connection
    /// dies, never closed through this).
    fd: RawFd,
    /// Set at the first failed write: nothing more is sent, queued work is skipped.
    dead: AtomicBool,
    export: Arc<Export>,
    structured: bool,
    meta: bool,
    /// This connection's share of the pool.
    lane: Lane,
}

fn poisoned() -> io::Error {
    io::Error::other("reply lock poisoned")
}

/// The NBD error for a failed request: the frontends' common errno, with a write past the end
/// as ENOSPC (as the protocol asks) and EPERM for EROFS, which NBD does not have.
fn errno(e: &blockfmt::Error, write: bool) -> u32 {
    match (e, crate::errno(e)) {
        (blockfmt::Error::OutOfRange { .. }, _) if write => ENOSPC,
        (_, libc::EROFS) => EPERM,
        (_, n) => n as u32,
    }
}

impl<W: Write + AsRawFd + Send + 'static> Conn<W> {
    /// A connection writing to `out`, its cold work on `lane`.
    pub(super) fn new(
        out: W,
        export: Arc<Export>,
        structured: bool,
        meta: bool,
        lane: Lane,
    ) -> Self {
        Conn {
            fd: out.as_raw_fd(),
            out: Mutex::new(BufWriter::with_capacity(256 * 1024, out)),
            dead: AtomicBool::new(false),
            export,
            structured,
            meta,
            lane,
        }
    }

    fn out(&self) -> io::Result<MutexGuard<'_, BufWriter<W>>> {
        if self.dead.load(Ordering::Acquire) {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "connection dropped",
            ));
        }
        self.out.lock().map_err(|_| poisoned())
    }

    /// Drops the connection after `e` (a write that timed out or failed): shuts the socket down
    /// so that blocked writers and the reading thread return at once.
    fn kill(&self, e: &io::Error) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            tracing::warn!(export = %self.export.name, error = %e, "dropping the connection: a reply could not be sent");
            // SAFETY: `fd` belongs to `out`, which lives as long as `self`; shutdown does not
            // close it, so the number cannot be reused under us.
            unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) };
        }
    }

    fn image(&self) -> &Image {
        &self.export.image
    }

    fn error(&self, w: &mut impl Write, cookie: u64, err: u32, msg: &str) -> io::Result<()> {
        if self.structured {
            let mut p = err.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg.as_bytes());
            w.write_all(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_ERROR,
                cookie,
                p.len() as u32,
            ))?;
            w.write_all(&p)
        } else {
            w.write_all(&simple_reply(err, cookie))
        }
    }

    fn done(&self, w: &mut impl Write, req: &Request, r: blockfmt::Result<()>) -> io::Result<()> {
        match r {
            Ok(()) if self.structured => w.write_all(&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                req.cookie,
                0,
            )),
            Ok(()) => w.write_all(&simple_reply(0, req.cookie)),
            Err(e) => {
                self.export.failed_request(&e);
                tracing::warn!(export = %self.export.name, offset = req.offset, len = req.len, error = %e, "request failed");
                let write = req.kind != CMD_READ && req.kind != CMD_BLOCK_STATUS;
                self.error(w, req.cookie, errno(&e, write), &e.to_string())
            }
        }
    }

    /// The reply to a READ whose bytes are in `buf`: sparse (holes and zeros as OFFSET_HOLE)
    /// unless the client asked for one chunk.
    fn read_reply(
        &self,
        w: &mut impl Write,
        req: &Request,
        buf: &[u8],
        map: Vec<(u64, u64, Alloc)>,
    ) -> io::Result<()> {
        if !self.structured {
            w.write_all(&simple_reply(0, req.cookie))?;
            return w.write_all(buf);
        }
        if buf.is_empty() {
            return self.done(w, req, Ok(()));
        }
        let pieces = if req.flags & CMD_FLAG_DF != 0 {
            vec![(req.offset, req.len as u64, Alloc::Data)]
        } else {
            map
        };
        let n = pieces.len();
        for (i, (off, len, a)) in pieces.into_iter().enumerate() {
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let rel = (off - req.offset) as usize;
            if a == Alloc::Data {
                w.write_all(&structured_header(
                    flags,
                    REPLY_TYPE_OFFSET_DATA,
                    req.cookie,
                    8 + len as u32,
                ))?;
                w.write_all(&off.to_be_bytes())?;
                w.write_all(&buf[rel..rel + len as usize])?;
            } else {
                w.write_all(&structured_header(
                    flags,
                    REPLY_TYPE_OFFSET_HOLE,
                    req.cookie,
                    12,
                ))?;
                w.write_all(&off.to_be_bytes())?;
                w.write_all(&(len as u32).to_be_bytes())?;
            }
        }
        Ok(())
    }

    fn block_status(&self, w: &mut impl Write, req: &Request) -> io::Result<()> {
        let map = match self.image().map(req.offset, req.len as u64) {
            Ok(m) => m,
            Err(e) => return self.done(w, req, Err(e)),
        };
        let max = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            1 << 16
        };
        let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for (_, len, a) in map.iter().take(max) {
            let state = match a {
                Alloc::Data => 0,
                Alloc::Zero => STATE_ZERO,
                Alloc::Hole => STATE_HOLE | STATE_ZERO,
            };
            p.extend_from_slice(&(*len as u32).to_be_bytes());
            p.extend_from_slice(&state.to_be_bytes());
        }
        w.write_all(&structured_header(
            REPLY_FLAG_DONE,
            REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            p.len() as u32,
        ))?;
        w.write_all(&p)
    }

    /// A read on a pool thread: decodes (or, with remote sources, fetches) what it needs.
    fn cold_read(&self, req: &Request) -> io::Result<()> {
        POOL_BUFFER.with_borrow_mut(|buf| {
            buf.resize(req.len as usize, 0);
            match engine::read_cold(&self.export, Frontend::Nbd, req.offset, buf) {
                Ok(map) => self.send_now(|w| self.read_reply(w, req, buf, map)),
                Err(e) => self.send_now(|w| self.done(w, req, Err(e))),
            }
        })
    }

    /// Runs `task` for the request `cookie` on the connection's lane; it replies and flushes by
    /// itself. Waits first while too many of this connection's requests are already there.
    fn defer(
        self: &Arc<Self>,
        cookie: u64,
        task: impl FnOnce(&Self) -> io::Result<()> + Send + 'static,
    ) -> io::Result<()> {
        let me = self.clone();
        self.lane.submit(move || me.run(cookie, task));
        Ok(())
    }

    /// Runs one task on a pool worker: skipped on a dead connection; a failed reply kills the
    /// connection; a panic is answered with EIO.
    fn run(&self, cookie: u64, task: impl FnOnce(&Self) -> io::Result<()>) {
        if self.dead.load(Ordering::Acquire) {
            return;
        }
        match catch_unwind(AssertUnwindSafe(|| task(self))) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => self.kill(&e),
            Err(panic) => {
                tracing::error!(export = %self.export.name, panic = panic_message(&*panic), "a request panicked; answering EIO");
                let msg = "internal error (see the lsmd log)";
                if let Err(e) = self.send_now(|w| self.error(w, cookie, EIO, msg)) {
                    self.kill(&e);
                }
            }
        }
    }

    /// Sends a reply from a pool task right away.
    fn send_now(&self, f: impl FnOnce(&mut BufWriter<W>) -> io::Result<()>) -> io::Result<()> {
        let mut w = self.out()?;
        f(&mut w)?;
        w.flush()
    }

    /// Waits until every deferred request has been answered (or skipped, the connection dead).
    fn drain(&self) -> io::Result<()> {
        self.lane.drain();
        Ok(())
    }

    /// Requests handed to the pool and not yet answered.
    fn in_flight(&self) -> usize {
        self.lane.pending()
    }

    /// A flush (for FLUSH, or after a FUA request) on the pool, then the reply.
    fn defer_flush(self: &Arc<Self>, req: Request) -> io::Result<()> {
        self.defer(req.cookie, move |c| {
            let r = engine::flush(&c.export, Frontend::Nbd);
            c.send_now(|w| c.done(w, &req, r))
        })
    }

    /// Handles one request read by the connection thread; `scratch` is its reusable buffer.
    fn request<R: Read>(
        self: &Arc<Self>,
        req: Request,
        rd: &mut R,
        scratch: &mut Vec<u8>,
    ) -> io::Result<()> {
        let img = self.image();
        let in_range = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|e| e <= img.size());
        let fua = req.flags & CMD_FLAG_FUA != 0;
        match req.kind {
            CMD_WRITE => {
                if req.len > MAX_PAYLOAD {
                    return Err(protocol(format!(
                        "write of {} bytes exceeds the maximum {MAX_PAYLOAD}",
                        req.len
                    )));
                }
                scratch.resize(req.len as usize, 0);
                rd.read_exact(scratch)?;
                if !in_range {
                    let msg = "write past the end of the export";
                    return self.error(&mut *self.out()?, req.cookie, ENOSPC, msg);
                }
                match engine::hot(&self.export, Frontend::Nbd, |i| {
                    i.write(req.offset, scratch)
                }) {
                    Ok(()) if fua => self.defer_flush(req),
                    r => self.done(&mut *self.out()?, &req, r),
                }
            }
            CMD_READ => {
                if req.len > MAX_PAYLOAD {
                    let msg = "read larger than the maximum block size";
                    return self.error(&mut *self.out()?, req.cookie, EOVERFLOW, msg);
                }
                if !in_range {
                    let msg = "read past the end of the export";
                    return self.error(&mut *self.out()?, req.cookie, EINVAL, msg);
                }
                let hot = if req.len as usize <= engine::INLINE_READ_MAX {
                    scratch.resize(req.len as usize, 0);
                    engine::read_hot(&self.export, Frontend::Nbd, req.offset, scratch)
                } else {
                    None
                };
                match hot {
                    Some(Ok(map)) => self.read_reply(&mut *self.out()?, &req, scratch, map),
                    Some(Err(e)) => self.done(&mut *self.out()?, &req, Err(e)),
                    None => self.defer(req.cookie, move |c| c.cold_read(&req)),
                }
            }
            CMD_FLUSH => self.defer_flush(req),
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if !in_range {
                    let msg = "range past the end of the export";
                    return self.error(&mut *self.out()?, req.cookie, ENOSPC, msg);
                }
                let r = engine::hot(&self.export, Frontend::Nbd, |img| {
                    if req.kind == CMD_TRIM {
                        img.trim(req.offset, req.len as u64)
                    } else {
                        img.write_zeroes(req.offset, req.len as u64)
                    }
                });
                match r {
                    Ok(()) if fua => self.defer_flush(req),
                    r => self.done(&mut *self.out()?, &req, r),
                }
            }
            CMD_BLOCK_STATUS => {
                let mut w = self.out()?;
                if !self.structured || !self.meta {
                    let msg = "no metadata context negotiated";
                    return self.error(&mut *w, req.cookie, EINVAL, msg);
                }
                if !in_range || req.len == 0 {
                    return self.error(&mut *w, req.cookie, EINVAL, "block status range invalid");
                }
                self.block_status(&mut *w, &req)
            }
            _ => self.error(&mut *self.out()?, req.cookie, EINVAL, "unknown command"),
        }
    }
}

/// Serves requests until DISC, the client leaving, a protocol violation, a failed write or
/// (with `idle`) a client that sent nothing for that long with nothing in flight; answers every
/// request already accepted before returning unless the connection is dropped.
pub(super) fn serve<R: Read, W: Write + AsRawFd + Send + 'static>(
    rd: &mut BufReader<R>,
    fd: RawFd,
    conn: Arc<Conn<W>>,
    server: &Server,
    idle: Option<Duration>,
) -> io::Result<()> {
    let mut scratch = Vec::new();
    let result = (|| loop {
        if rd.buffer().len() < REQUEST_LEN {
            // The next read may block: let the upper layer hand its queued log records to
            // the kernel (so a restarted lsmd sees every acknowledged write), then send the
            // replies collected so far.
            if let Err(e) = conn.image().settle() {
                conn.export.failed_request(&e);
                tracing::warn!(export = %conn.export.name, error = %e, "upper layer log write failed");
            }
            conn.out()?.flush()?;
            if !poll_readable(fd, server.busy_poll) {
                wait_for_request(fd, idle, &conn)?;
            }
        }
        let Some(req) = read_request(rd)? else {
            return Err(protocol("request with bad magic"));
        };
        if req.kind == CMD_DISC {
            return Ok(());
        }
        conn.request(req, rd, &mut scratch)?;
        if scratch.capacity() > SCRATCH_KEEP {
            // One large write must not pin its buffer for the connection's lifetime.
            scratch = Vec::new();
        }
    })();
    if let Err(e) = &result {
        // A write that timed out or failed, or a timeout on the client: nothing more can be
        // sent. (A client gone or a protocol violation still gets the replies in flight.)
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock
                | io::ErrorKind::TimedOut
                | io::ErrorKind::BrokenPipe
                | io::ErrorKind::ConnectionReset
        ) {
            conn.kill(e);
        }
    }
    conn.drain()?;
    if let Ok(mut w) = conn.out() {
        let _ = w.flush();
    }
    result
}

/// Blocks until `fd` is readable. With `idle`, fails once it has not been readable for that
/// long while none of the connection's requests was in flight.
fn wait_for_request<W: Write + AsRawFd + Send + 'static>(
    fd: RawFd,
    idle: Option<Duration>,
    conn: &Conn<W>,
) -> io::Result<()> {
    let Some(idle) = idle.filter(|t| !t.is_zero()) else {
        return Ok(()); // the read blocks
    };
    let ms = idle.as_millis().min(i32::MAX as u128) as i32;
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n > 0 {
            return Ok(());
        }
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if conn.in_flight() == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("client idle for {} s", idle.as_secs()),
            ));
        }
    }
}

/// Polls `fd` without sleeping until it is readable or `budget` has passed.
fn poll_readable(fd: RawFd, budget: Duration) -> bool {
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    loop {
        let mut p = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut p, 1, 0) };
        if n != 0 || start.elapsed() >= budget {
            return n > 0;
        }
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    fn reply(r: &mut UnixStream) -> (u32, u64) {
        let mut b = [0u8; 16];
        r.read_exact(&mut b).expect("reply");
        assert_eq!(b[..4], SIMPLE_REPLY_MAGIC.to_be_bytes());
        (
            u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            u64::from_be_bytes(b[8..16].try_into().unwrap_or_default()),
        )
    }

    /// A request whose work panics is answered EIO; the pool and the connection go on.
    #[test]
    fn a_panicking_request_is_answered_eio_and_the_worker_lives_on() {
        let image = blockfmt::LayerStack::new(Vec::new(), 1 << 20, 1 << 20)
            .and_then(|s| Image::new(s, None))
            .expect("image");
        let export = Arc::new(Export::new("t".into(), Arc::new(image)));
        let (ours, mut theirs) = UnixStream::pair().expect("pair");
        theirs
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let engine = crate::engine::Engine::new(1);
        let conn = Arc::new(Conn::new(ours, export, false, false, engine.lane(64)));
        conn.defer(7, |_| panic!("a bug in a request"))
            .expect("defer");
        assert_eq!(reply(&mut theirs), (EIO, 7));
        conn.defer(8, |c| c.send_now(|w| w.write_all(&simple_reply(0, 8))))
            .expect("defer");
        assert_eq!(reply(&mut theirs), (0, 8), "the only worker survived");
        conn.drain().expect("drain");
    }
}
