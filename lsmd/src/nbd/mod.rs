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
//! Concurrency: per connection, one thread reads requests and a fixed set of worker threads
//! (created with the connection, never per request) execute them and write replies, each reply
//! written whole under the connection's write lock.

pub mod proto;

use std::collections::BTreeMap;
use std::io::{self, BufReader, Read, Write};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use blockfmt::{Alloc, Image};
use proto::*;

/// One named export.
pub struct Export {
    pub name: String,
    pub image: Arc<Image>,
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

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        let key = if name.is_empty() {
            self.default.as_deref()?
        } else {
            name
        };
        self.by_name.get(key).cloned()
    }

    /// Flushes every writable image (graceful shutdown).
    pub fn flush_all(&self) -> Vec<(String, blockfmt::Error)> {
        self.by_name
            .values()
            .filter_map(|e| e.image.flush().err().map(|err| (e.name.clone(), err)))
            .collect()
    }
}

/// Worker threads per connection.
pub const WORKERS_PER_CONNECTION: usize = 4;

fn transmission_flags(img: &Image) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF | TF_CAN_MULTI_CONN;
    if img.read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    }
    f
}

/// A stream that can be split into a reading and a writing half.
pub trait Duplex: Read + Write + Send + 'static {
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

struct Negotiated {
    export: Arc<Export>,
    structured: bool,
    meta: bool,
}

fn read_payload(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut d = vec![0u8; len as usize];
    r.read_exact(&mut d)?;
    Ok(d)
}

fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses `u32 len, name` at the start of an option payload.
fn take_name(d: &[u8]) -> Option<(String, &[u8])> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4 + n)?;
    Some((String::from_utf8(name.to_vec()).ok()?, &d[4 + n..]))
}

/// The handshake: returns the chosen export, or `None` when the client aborted.
fn handshake<S: Read + Write>(s: &mut S, exports: &Exports) -> io::Result<Option<Negotiated>> {
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let cflags = read_u32(s)?;
    if cflags & !(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u32 != 0
        || cflags & FLAG_FIXED_NEWSTYLE as u32 == 0
    {
        return Err(protocol(format!("client flags {cflags:#x} unsupported")));
    }
    let no_zeroes = cflags & FLAG_NO_ZEROES as u32 != 0;
    let mut structured = false;
    let mut meta = false;
    loop {
        if read_u64(s)? != IHAVEOPT {
            return Err(protocol("option without IHAVEOPT magic"));
        }
        let opt = read_u32(s)?;
        let len = read_u32(s)?;
        if len > MAX_OPTION_LEN {
            io::copy(&mut Read::by_ref(s).take(len as u64), &mut io::sink())?;
            option_reply(s, opt, REP_ERR_TOO_BIG, b"option too large")?;
            continue;
        }
        let d = read_payload(s, len)?;
        match opt {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&d).into_owned();
                let Some(export) = exports.find(&name) else {
                    return Err(protocol(format!("no export named {name:?}")));
                };
                let mut b = Vec::new();
                b.extend_from_slice(&export.image.size().to_be_bytes());
                b.extend_from_slice(&transmission_flags(&export.image).to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                s.write_all(&b)?;
                return Ok(Some(Negotiated {
                    export,
                    structured,
                    meta,
                }));
            }
            OPT_ABORT => {
                let _ = option_reply(s, opt, REP_ACK, &[]);
                return Ok(None);
            }
            OPT_LIST => {
                if !d.is_empty() {
                    option_reply(s, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in exports.by_name.keys() {
                    let mut b = (name.len() as u32).to_be_bytes().to_vec();
                    b.extend_from_slice(name.as_bytes());
                    option_reply(s, opt, REP_SERVER, &b)?;
                }
                option_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_STRUCTURED_REPLY => {
                if !d.is_empty() {
                    option_reply(s, opt, REP_ERR_INVALID, b"STRUCTURED_REPLY takes no data")?;
                    continue;
                }
                structured = true;
                option_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let parsed = take_name(&d).and_then(|(name, rest)| {
                    let n = u32::from_be_bytes(rest.get(0..4)?.try_into().ok()?);
                    let mut rest = &rest[4..];
                    let mut queries = Vec::new();
                    for _ in 0..n {
                        let (q, r) = take_name(rest)?;
                        queries.push(q);
                        rest = r;
                    }
                    rest.is_empty().then_some((name, queries))
                });
                let Some((name, queries)) = parsed else {
                    option_reply(s, opt, REP_ERR_INVALID, b"malformed meta context request")?;
                    continue;
                };
                if opt == OPT_SET_META_CONTEXT && !structured {
                    option_reply(
                        s,
                        opt,
                        REP_ERR_INVALID,
                        b"structured replies not negotiated",
                    )?;
                    continue;
                }
                if exports.find(&name).is_none() {
                    option_reply(s, opt, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let wanted = queries.is_empty() && opt == OPT_LIST_META_CONTEXT
                    || queries.iter().any(|q| {
                        q == BASE_ALLOCATION || (opt == OPT_LIST_META_CONTEXT && q == "base:")
                    });
                if opt == OPT_SET_META_CONTEXT {
                    meta = wanted;
                }
                if wanted {
                    let mut b = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
                    b.extend_from_slice(BASE_ALLOCATION.as_bytes());
                    option_reply(s, opt, REP_META_CONTEXT, &b)?;
                }
                option_reply(s, opt, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let parsed = take_name(&d).and_then(|(name, rest)| {
                    let n = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
                    let reqs = rest.get(2..2 + 2 * n)?;
                    (rest.len() == 2 + 2 * n).then(|| {
                        (
                            name,
                            reqs.chunks(2)
                                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                                .collect::<Vec<_>>(),
                        )
                    })
                });
                let Some((name, reqs)) = parsed else {
                    option_reply(s, opt, REP_ERR_INVALID, b"malformed INFO/GO request")?;
                    continue;
                };
                let Some(export) = exports.find(&name) else {
                    option_reply(
                        s,
                        opt,
                        REP_ERR_UNKNOWN,
                        format!("no export named {name:?}").as_bytes(),
                    )?;
                    continue;
                };
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.image.size().to_be_bytes());
                info.extend_from_slice(&transmission_flags(&export.image).to_be_bytes());
                option_reply(s, opt, REP_INFO, &info)?;
                let mut bs = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                for v in [1u32, 4096, MAX_PAYLOAD] {
                    bs.extend_from_slice(&v.to_be_bytes());
                }
                option_reply(s, opt, REP_INFO, &bs)?;
                if reqs.contains(&INFO_NAME) {
                    let mut b = INFO_NAME.to_be_bytes().to_vec();
                    b.extend_from_slice(export.name.as_bytes());
                    option_reply(s, opt, REP_INFO, &b)?;
                }
                option_reply(s, opt, REP_ACK, &[])?;
                if opt == OPT_GO {
                    return Ok(Some(Negotiated {
                        export,
                        structured,
                        meta,
                    }));
                }
            }
            _ => option_reply(s, opt, REP_ERR_UNSUP, b"option not supported")?,
        }
    }
}

fn errno(e: &blockfmt::Error, write: bool) -> u32 {
    match e {
        blockfmt::Error::OutOfRange { .. } if write => ENOSPC,
        blockfmt::Error::OutOfRange { .. } | blockfmt::Error::Invalid(_) => EINVAL,
        blockfmt::Error::ReadOnly => EPERM,
        _ => EIO,
    }
}

struct Job {
    req: Request,
    data: Vec<u8>,
}

struct Conn<W: Write> {
    out: Mutex<W>,
    export: Arc<Export>,
    structured: bool,
    meta: bool,
}

impl<W: Write> Conn<W> {
    fn send(&self, bytes: &[&[u8]]) -> io::Result<()> {
        let mut w = self
            .out
            .lock()
            .map_err(|_| io::Error::other("reply lock poisoned"))?;
        for b in bytes {
            w.write_all(b)?;
        }
        w.flush()
    }

    fn reply_error(&self, cookie: u64, err: u32, msg: &str) -> io::Result<()> {
        if self.structured {
            let mut p = err.to_be_bytes().to_vec();
            p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
            p.extend_from_slice(msg.as_bytes());
            self.send(&[
                &structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, p.len() as u32),
                &p,
            ])
        } else {
            self.send(&[&simple_reply(err, cookie)])
        }
    }

    fn reply_ok(&self, cookie: u64) -> io::Result<()> {
        if self.structured {
            self.send(&[&structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_NONE,
                cookie,
                0,
            )])
        } else {
            self.send(&[&simple_reply(0, cookie)])
        }
    }

    fn handle(&self, job: Job) -> io::Result<()> {
        let Job { req, data } = job;
        let img = &self.export.image;
        let size = img.size();
        let in_range = req
            .offset
            .checked_add(req.len as u64)
            .is_some_and(|e| e <= size);
        let done = |r: blockfmt::Result<()>, write: bool| match r {
            Ok(()) => self.reply_ok(req.cookie),
            Err(e) => {
                tracing::warn!(export = %self.export.name, offset = req.offset, len = req.len, error = %e, "request failed");
                self.reply_error(req.cookie, errno(&e, write), &e.to_string())
            }
        };
        match req.kind {
            CMD_READ => {
                if !in_range {
                    return self.reply_error(req.cookie, EINVAL, "read past the end of the export");
                }
                self.read(req)
            }
            CMD_WRITE => {
                if !in_range {
                    return self.reply_error(
                        req.cookie,
                        ENOSPC,
                        "write past the end of the export",
                    );
                }
                let r = img.write(req.offset, &data).and_then(|_| {
                    if req.flags & CMD_FLAG_FUA != 0 {
                        img.flush()
                    } else {
                        Ok(())
                    }
                });
                done(r, true)
            }
            CMD_FLUSH => done(img.flush(), true),
            CMD_TRIM | CMD_WRITE_ZEROES => {
                if !in_range {
                    return self.reply_error(
                        req.cookie,
                        ENOSPC,
                        "range past the end of the export",
                    );
                }
                let r = if req.kind == CMD_TRIM {
                    img.trim(req.offset, req.len as u64)
                } else {
                    img.write_zeroes(req.offset, req.len as u64)
                };
                let r = r.and_then(|_| {
                    if req.flags & CMD_FLAG_FUA != 0 {
                        img.flush()
                    } else {
                        Ok(())
                    }
                });
                done(r, true)
            }
            CMD_BLOCK_STATUS => {
                if !self.structured || !self.meta {
                    return self.reply_error(req.cookie, EINVAL, "no metadata context negotiated");
                }
                if !in_range || req.len == 0 {
                    return self.reply_error(req.cookie, EINVAL, "block status range invalid");
                }
                self.block_status(req)
            }
            _ => self.reply_error(req.cookie, EINVAL, "unknown command"),
        }
    }

    fn read(&self, req: Request) -> io::Result<()> {
        let img = &self.export.image;
        let mut buf = vec![0u8; req.len as usize];
        if let Err(e) = img.read(req.offset, &mut buf) {
            tracing::warn!(export = %self.export.name, offset = req.offset, len = req.len, error = %e, "read failed");
            return self.reply_error(req.cookie, errno(&e, false), &e.to_string());
        }
        if !self.structured {
            return self.send(&[&simple_reply(0, req.cookie), &buf]);
        }
        // Sparse reply: holes and zero ranges as OFFSET_HOLE, unless the client asked for one chunk.
        let pieces = match img.map(req.offset, req.len as u64) {
            Ok(p) if req.flags & CMD_FLAG_DF == 0 && req.len > 0 => p,
            _ => vec![(req.offset, req.len as u64, Alloc::Data)],
        };
        let n = pieces.len();
        let mut w = self
            .out
            .lock()
            .map_err(|_| io::Error::other("reply lock poisoned"))?;
        for (i, (off, len, a)) in pieces.into_iter().enumerate() {
            let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
            let rel = (off - req.offset) as usize;
            if a == Alloc::Data || len == 0 {
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
        w.flush()
    }

    fn block_status(&self, req: Request) -> io::Result<()> {
        let map = match self.export.image.map(req.offset, req.len as u64) {
            Ok(m) => m,
            Err(e) => return self.reply_error(req.cookie, errno(&e, false), &e.to_string()),
        };
        let mut p = BASE_ALLOCATION_ID.to_be_bytes().to_vec();
        for (_, len, a) in map.iter().take(if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            1 << 16
        }) {
            let state = match a {
                Alloc::Data => 0,
                Alloc::Zero => STATE_ZERO,
                Alloc::Hole => STATE_HOLE | STATE_ZERO,
            };
            p.extend_from_slice(&(*len as u32).to_be_bytes());
            p.extend_from_slice(&state.to_be_bytes());
        }
        self.send(&[
            &structured_header(
                REPLY_FLAG_DONE,
                REPLY_TYPE_BLOCK_STATUS,
                req.cookie,
                p.len() as u32,
            ),
            &p,
        ])
    }
}

/// Serves one client connection to completion. Protocol violations end the connection with an
/// error; they never affect other connections.
pub fn serve_connection<S: Duplex>(stream: S, exports: &Exports) -> io::Result<()> {
    let out = stream.try_clone_stream()?;
    let mut rd = BufReader::with_capacity(256 * 1024, stream);
    let mut hs = HandshakeIo { r: &mut rd, w: out };
    let Some(neg) = handshake(&mut hs, exports)? else {
        return Ok(());
    };
    let conn = Arc::new(Conn {
        out: Mutex::new(std::io::BufWriter::with_capacity(256 * 1024, hs.w)),
        export: neg.export,
        structured: neg.structured,
        meta: neg.meta,
    });
    let (tx, rx) = mpsc::sync_channel::<Job>(64);
    let rx = Arc::new(Mutex::new(rx));
    let workers: Vec<_> = (0..WORKERS_PER_CONNECTION)
        .map(|_| {
            let (rx, conn) = (rx.clone(), conn.clone());
            std::thread::spawn(move || loop {
                let job = match rx.lock() {
                    Ok(r) => r.recv(),
                    Err(_) => return,
                };
                let Ok(job) = job else { return };
                if conn.handle(job).is_err() {
                    return;
                }
            })
        })
        .collect();
    let result = (|| -> io::Result<()> {
        loop {
            let Some(req) = read_request(&mut rd)? else {
                return Err(protocol("request with bad magic"));
            };
            match req.kind {
                CMD_DISC => return Ok(()),
                CMD_WRITE => {
                    if req.len > MAX_PAYLOAD {
                        return Err(protocol(format!(
                            "write of {} bytes exceeds the maximum {MAX_PAYLOAD}",
                            req.len
                        )));
                    }
                    let data = read_payload(&mut rd, req.len)?;
                    if tx.send(Job { req, data }).is_err() {
                        return Ok(());
                    }
                }
                CMD_READ if req.len > MAX_PAYLOAD => {
                    conn.reply_error(
                        req.cookie,
                        EOVERFLOW,
                        "read larger than the maximum block size",
                    )?;
                }
                _ => {
                    if tx
                        .send(Job {
                            req,
                            data: Vec::new(),
                        })
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    })();
    drop(tx);
    for w in workers {
        let _ = w.join();
    }
    result
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
