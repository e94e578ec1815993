//! NBD over TLS (`NBD_OPT_STARTTLS`, x509 certificates, rustls): what qemu's
//! `tls-creds-x509` and libnbd's `nbds://` clients speak.
//!
//! After the client's STARTTLS is acknowledged, the TLS handshake runs on the connection's
//! thread (within the NBD handshake deadline). Then one thread per connection, the pump, moves
//! bytes between the TLS socket and one end of a Unix socket pair; the other end is served
//! like any plain connection (option haggling resumes there, then transmission). Everything the
//! plain path guarantees therefore holds unchanged: write timeouts, the per-connection share of
//! pool workers, idle timeouts. The pump holds at most one 64 KiB chunk of plaintext in each
//! direction (it reads from one side only when the other has taken the last chunk), so a client
//! that stops reading fills the pair, and the server's write timeout drops the connection.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};

use super::Duplex;

/// Plaintext moved per step, each way.
const CHUNK: usize = 64 * 1024;

/// The server's TLS identity (and, optionally, the CA client certificates must chain to).
#[derive(Clone)]
pub struct TlsConfig(Arc<ServerConfig>);

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

impl TlsConfig {
    /// Loads a PEM certificate chain and private key; with `client_ca`, clients must present a
    /// certificate issued by it.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> io::Result<TlsConfig> {
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|e| invalid(format!("{}: {e}", cert.display())))?;
        if chain.is_empty() {
            return Err(invalid(format!("{}: no certificate", cert.display())));
        }
        let key_der = PrivateKeyDer::from_pem_file(key)
            .map_err(|e| invalid(format!("{}: {e}", key.display())))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(format!("TLS: {e}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in CertificateDer::pem_file_iter(ca)
                    .map_err(|e| invalid(format!("{}: {e}", ca.display())))?
                {
                    let c = c.map_err(|e| invalid(format!("{}: {e}", ca.display())))?;
                    roots
                        .add(c)
                        .map_err(|e| invalid(format!("{}: {e}", ca.display())))?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|e| invalid(format!("{}: {e}", ca.display())))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key_der)
            .map_err(|e| invalid(format!("{} / {}: {e}", cert.display(), key.display())))?;
        Ok(TlsConfig(Arc::new(config)))
    }
}

/// Runs the TLS handshake on `sock` (`early` holds bytes already read from it) until
/// `deadline`, then starts the pump; returns the plaintext end to serve.
pub(super) fn start<S: Duplex>(
    cfg: &TlsConfig,
    mut sock: S,
    early: &[u8],
    deadline: Option<Instant>,
    write_timeout: Option<Duration>,
) -> io::Result<UnixStream> {
    let mut tls = ServerConnection::new(cfg.0.clone()).map_err(io::Error::other)?;
    if !early.is_empty() {
        tls.read_tls(&mut &early[..])?;
        tls.process_new_packets().map_err(io::Error::other)?;
    }
    while tls.is_handshaking() {
        if let Some(d) = deadline {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "TLS handshake not finished within the handshake timeout",
                ));
            }
            sock.set_read_timeout_to(Some(left))?;
        }
        tls.complete_io(&mut sock)
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
    }
    sock.set_read_timeout_to(None)?;
    set_nonblocking(sock.as_raw_fd())?;
    let (ours, theirs) = UnixStream::pair()?;
    theirs.set_nonblocking(true)?;
    std::thread::Builder::new()
        .name("lsmd-tls".into())
        .spawn(move || {
            if let Err(e) = pump(&mut tls, &mut sock, &theirs, write_timeout) {
                tracing::debug!(error = %e, "TLS connection ended");
            }
            let _ = tls.write_tls(&mut sock);
        })?;
    Ok(ours)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted
}

/// Moves bytes between the TLS socket and the plaintext pair until either side ends, or the
/// client takes no encrypted bytes for `write_timeout`.
fn pump<S: Read + Write + AsRawFd>(
    tls: &mut ServerConnection,
    sock: &mut S,
    pair: &UnixStream,
    write_timeout: Option<Duration>,
) -> io::Result<()> {
    let mut p = Pump {
        tls,
        sock,
        pair,
        to_app: Vec::with_capacity(CHUNK),
        buf: vec![0u8; CHUNK],
        sock_eof: false,
        pair_eof: false,
        stall_ms: write_timeout
            .filter(|t| !t.is_zero())
            .map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32),
    };
    loop {
        // Plaintext rustls already decrypted goes first: the socket may have nothing more.
        if p.to_app.is_empty() {
            p.take_plaintext()?;
        }
        if p.sock_eof && p.to_app.is_empty() {
            return Ok(()); // dropping the pair end: the server sees the client leave
        }
        let want_sock_in = !p.sock_eof && p.to_app.is_empty();
        let want_pair_in = !p.pair_eof && !p.tls.wants_write();
        let Some((sock_ev, pair_ev)) = p.wait(want_sock_in, want_pair_in)? else {
            continue; // interrupted
        };
        p.client_side(sock_ev, want_sock_in)?;
        p.server_side(pair_ev, want_pair_in)?;
        if p.pair_eof && !p.tls.wants_write() {
            return Ok(());
        }
    }
}

/// The state of one pump (see [`pump`]).
struct Pump<'a, S> {
    tls: &'a mut ServerConnection,
    sock: &'a mut S,
    pair: &'a UnixStream,
    /// Plaintext from the client not yet handed to the server.
    to_app: Vec<u8>,
    buf: Vec<u8>,
    sock_eof: bool,
    pair_eof: bool,
    /// Poll timeout while encrypted bytes wait for the client (-1: none).
    stall_ms: i32,
}

impl<S: Read + Write + AsRawFd> Pump<'_, S> {
    /// Moves decrypted plaintext from rustls into `to_app` (one chunk).
    fn take_plaintext(&mut self) -> io::Result<()> {
        match self.tls.reader().read(&mut self.buf) {
            Ok(0) => self.sock_eof = true, // close_notify
            Ok(n) => self.to_app.extend_from_slice(&self.buf[..n]),
            Err(e) if would_block(&e) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => self.sock_eof = true,
            Err(e) => return Err(e),
        }
        Ok(())
    }

    /// Polls both sides for what they can do now; `None` if interrupted. A side with nothing
    /// to wait for is left out (fd -1): its hang-up would otherwise wake every poll.
    fn wait(&self, want_sock_in: bool, want_pair_in: bool) -> io::Result<Option<(i16, i16)>> {
        let sock_events = (if want_sock_in { libc::POLLIN } else { 0 })
            | (if self.tls.wants_write() {
                libc::POLLOUT
            } else {
                0
            });
        let pair_events = (if want_pair_in { libc::POLLIN } else { 0 })
            | (if self.to_app.is_empty() {
                0
            } else {
                libc::POLLOUT
            });
        let fd = |events: i16, fd: RawFd| if events == 0 { -1 } else { fd };
        let mut fds = [
            libc::pollfd {
                fd: fd(sock_events, self.sock.as_raw_fd()),
                events: sock_events,
                revents: 0,
            },
            libc::pollfd {
                fd: fd(pair_events, self.pair.as_raw_fd()),
                events: pair_events,
                revents: 0,
            },
        ];
        let timeout = if self.tls.wants_write() {
            self.stall_ms
        } else {
            -1
        };
        // SAFETY: two valid pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the TLS client took no data within the write timeout",
            ));
        }
        Ok(Some((fds[0].revents, fds[1].revents)))
    }

    /// The TLS socket: encrypted bytes in (when wanted) and out.
    fn client_side(&mut self, ev: i16, want_in: bool) -> io::Result<()> {
        if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && want_in {
            match self.tls.read_tls(self.sock) {
                Ok(0) => self.sock_eof = true,
                Ok(_) => {
                    if let Err(e) = self.tls.process_new_packets() {
                        let _ = self.tls.write_tls(self.sock);
                        return Err(io::Error::other(format!("TLS: {e}")));
                    }
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if ev & (libc::POLLOUT | libc::POLLERR) != 0 && self.tls.wants_write() {
            match self.tls.write_tls(self.sock) {
                Ok(_) => {}
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The plaintext pair: the client's bytes to the server, the server's replies in (when
    /// wanted) to be encrypted.
    fn server_side(&mut self, ev: i16, want_in: bool) -> io::Result<()> {
        let mut pair = self.pair;
        if ev & (libc::POLLOUT | libc::POLLERR | libc::POLLHUP) != 0 && !self.to_app.is_empty() {
            match pair.write(&self.to_app) {
                Ok(n) => {
                    self.to_app.drain(..n);
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        if ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 && want_in {
            match pair.read(&mut self.buf) {
                Ok(0) => {
                    self.pair_eof = true;
                    self.tls.send_close_notify();
                }
                Ok(n) => self.tls.writer().write_all(&self.buf[..n])?,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}
