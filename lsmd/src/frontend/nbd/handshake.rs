//! The handshake phase: fixed newstyle option haggling until the client picks an export
//! (EXPORT_NAME or GO), leaves (ABORT) or, where TLS is offered, asks for it (STARTTLS); the
//! haggling then resumes over TLS. Where TLS is offered it is required: before STARTTLS every
//! other option is answered ERR_TLS_REQD (EXPORT_NAME, which has no error reply, ends the
//! connection), as the NBD spec's "forced TLS" mode says.

use std::io::{self, Read, Write};
use std::sync::Arc;

use blockfmt::Image;

use super::proto::*;
use super::{Export, Exports};

pub(super) fn transmission_flags(img: &Image) -> u16 {
    let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_DF | TF_CAN_MULTI_CONN;
    if img.read_only() {
        f |= TF_READ_ONLY;
    } else {
        f |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES;
    }
    f
}

/// TLS during the handshake.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Tls {
    /// Not offered (Unix sockets, plain TCP): STARTTLS is unsupported.
    Off,
    /// Offered and required, not started yet.
    Required,
    /// Running: the greeting was sent before STARTTLS; `no_zeroes` is what the client asked.
    Active { no_zeroes: bool },
}

/// How the handshake ended.
pub(super) enum Outcome {
    /// The client picked an export.
    Export(Negotiated),
    /// The client left (ABORT).
    Aborted,
    /// STARTTLS was acknowledged: TLS starts now, then [`handshake`] resumes with
    /// `Tls::Active`.
    StartTls { no_zeroes: bool },
}

/// What the handshake settled.
pub(super) struct Negotiated {
    pub export: Arc<Export>,
    pub structured: bool,
    pub meta: bool,
}

pub(super) fn read_payload(r: &mut impl Read, len: u32) -> io::Result<Vec<u8>> {
    let mut d = vec![0u8; len as usize];
    r.read_exact(&mut d)?;
    Ok(d)
}

pub(super) fn protocol(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// Parses `u32 len, name` at the start of an option payload.
fn take_name(d: &[u8]) -> Option<(String, &[u8])> {
    let n = u32::from_be_bytes(d.get(0..4)?.try_into().ok()?) as usize;
    let name = d.get(4..4 + n)?;
    Some((String::from_utf8(name.to_vec()).ok()?, &d[4 + n..]))
}

/// Sends the greeting and reads the client's flags; returns whether it asked for no zeroes.
fn greet<S: Read + Write>(s: &mut S) -> io::Result<bool> {
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
    Ok(cflags & FLAG_NO_ZEROES as u32 != 0)
}

/// The handshake (resumed after STARTTLS when `tls` is `Active`).
pub(super) fn handshake<S: Read + Write>(
    s: &mut S,
    exports: &Exports,
    tls: Tls,
) -> io::Result<Outcome> {
    let no_zeroes = match tls {
        Tls::Active { no_zeroes } => no_zeroes,
        _ => greet(s)?,
    };
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
        if tls == Tls::Required && opt != OPT_STARTTLS && opt != OPT_ABORT {
            if opt == OPT_EXPORT_NAME {
                return Err(protocol("EXPORT_NAME before STARTTLS on a TLS-only server"));
            }
            option_reply(
                s,
                opt,
                REP_ERR_TLS_REQD,
                b"this server requires TLS (STARTTLS)",
            )?;
            continue;
        }
        match opt {
            OPT_STARTTLS => match tls {
                Tls::Required if d.is_empty() => {
                    option_reply(s, opt, REP_ACK, &[])?;
                    s.flush()?;
                    return Ok(Outcome::StartTls { no_zeroes });
                }
                Tls::Required => option_reply(s, opt, REP_ERR_INVALID, b"STARTTLS takes no data")?,
                Tls::Active { .. } => {
                    option_reply(s, opt, REP_ERR_INVALID, b"TLS already started")?
                }
                Tls::Off => option_reply(s, opt, REP_ERR_UNSUP, b"TLS is not offered here")?,
            },
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
                return Ok(Outcome::Export(Negotiated {
                    export,
                    structured,
                    meta,
                }));
            }
            OPT_ABORT => {
                let _ = option_reply(s, opt, REP_ACK, &[]);
                return Ok(Outcome::Aborted);
            }
            OPT_LIST => {
                if !d.is_empty() {
                    option_reply(s, opt, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for name in exports.names() {
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
                    return Ok(Outcome::Export(Negotiated {
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
