//! The nbd driver's generic-netlink interface (family "nbd"): CONNECT hands the driver a socket
//! with the device's size, flags and a dead-connection timeout; RECONFIGURE gives a device whose
//! server went away a new socket; DISCONNECT ends it. With a dead-connection timeout the kernel
//! holds a dead device's I/O that long instead of failing it — which is what lets a restarted
//! lsmd take a mounted device over.

use std::io;
use std::os::fd::RawFd;

const NETLINK_GENERIC: i32 = 16;
const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLM_F_ACK: u16 = 4;
const NLMSG_ERROR: u16 = 2;
const NLA_F_NESTED: u16 = 1 << 15;

const NBD_CMD_CONNECT: u8 = 1;
const NBD_CMD_DISCONNECT: u8 = 2;
const NBD_CMD_RECONFIGURE: u8 = 3;
const NBD_GENL_VERSION: u8 = 1;
const NBD_ATTR_INDEX: u16 = 1;
const NBD_ATTR_SIZE_BYTES: u16 = 2;
const NBD_ATTR_BLOCK_SIZE_BYTES: u16 = 3;
const NBD_ATTR_TIMEOUT: u16 = 4;
const NBD_ATTR_SERVER_FLAGS: u16 = 5;
const NBD_ATTR_SOCKETS: u16 = 7;
const NBD_ATTR_DEAD_CONN_TIMEOUT: u16 = 8;
const NBD_SOCK_ITEM: u16 = 1;
const NBD_SOCK_FD: u16 = 1;

/// One netlink attribute, possibly nested.
fn attr(ty: u16, payload: &[u8]) -> Vec<u8> {
    let len = 4 + payload.len();
    let mut b = Vec::with_capacity(len.next_multiple_of(4));
    b.extend_from_slice(&(len as u16).to_ne_bytes());
    b.extend_from_slice(&ty.to_ne_bytes());
    b.extend_from_slice(payload);
    b.resize(len.next_multiple_of(4), 0);
    b
}

/// Walks the attributes in `b`: (type without flags, payload).
fn attrs(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let ty = u16::from_ne_bytes([b[2], b[3]]) & !NLA_F_NESTED;
        if len < 4 || len > b.len() {
            break;
        }
        out.push((ty, &b[4..len]));
        b = &b[len.next_multiple_of(4).min(b.len())..];
    }
    out
}

/// A generic-netlink socket.
struct Genl {
    fd: RawFd,
    seq: u32,
}

impl Drop for Genl {
    fn drop(&mut self) {
        // SAFETY: closing the socket this value opened and owns.
        unsafe {
            libc::close(self.fd);
        }
    }
}

impl Genl {
    fn open() -> io::Result<Genl> {
        // SAFETY: plain socket(2) call; the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                NETLINK_GENERIC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Genl { fd, seq: 1 })
    }

    /// Sends one request and returns the payloads (after the genl header) of its replies;
    /// a negative netlink error becomes an `Err`.
    fn request(
        &mut self,
        family: u16,
        cmd: u8,
        version: u8,
        body: &[u8],
    ) -> io::Result<Vec<Vec<u8>>> {
        self.seq += 1;
        let len = 16 + 4 + body.len();
        let mut m = Vec::with_capacity(len);
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&family.to_ne_bytes());
        m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_ACK).to_ne_bytes());
        m.extend_from_slice(&self.seq.to_ne_bytes());
        m.extend_from_slice(&0u32.to_ne_bytes());
        m.extend_from_slice(&[cmd, version, 0, 0]);
        m.extend_from_slice(body);
        // SAFETY: `m` is a valid buffer of `m.len()` bytes; the kernel is the destination
        // (a zeroed sockaddr_nl means pid 0).
        let sent = unsafe {
            let mut addr: libc::sockaddr_nl = std::mem::zeroed();
            addr.nl_family = libc::AF_NETLINK as u16;
            libc::sendto(
                self.fd,
                m.as_ptr() as *const libc::c_void,
                m.len(),
                0,
                &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut replies = Vec::new();
        let mut buf = vec![0u8; 65536];
        loop {
            // SAFETY: receiving into `buf`, which holds `buf.len()` writable bytes.
            let n =
                unsafe { libc::recv(self.fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len(), 0) };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut b = &buf[..n as usize];
            while b.len() >= 16 {
                let mlen = u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize;
                let ty = u16::from_ne_bytes([b[4], b[5]]);
                if mlen < 16 || mlen > b.len() {
                    return Err(io::Error::other("malformed netlink reply"));
                }
                let payload = &b[16..mlen];
                if ty == NLMSG_ERROR {
                    let err = i32::from_ne_bytes(
                        payload
                            .get(..4)
                            .and_then(|s| s.try_into().ok())
                            .unwrap_or([0; 4]),
                    );
                    if err < 0 {
                        return Err(io::Error::from_raw_os_error(-err));
                    }
                    return Ok(replies); // the ACK ends the exchange
                }
                replies.push(payload.get(4..).unwrap_or_default().to_vec());
                b = &b[mlen.next_multiple_of(4).min(b.len())..];
            }
        }
    }

    fn family(&mut self, name: &str) -> io::Result<u16> {
        let mut n = name.as_bytes().to_vec();
        n.push(0);
        let replies = self.request(
            GENL_ID_CTRL,
            CTRL_CMD_GETFAMILY,
            2,
            &attr(CTRL_ATTR_FAMILY_NAME, &n),
        )?;
        replies
            .iter()
            .flat_map(|r| attrs(r))
            .find(|(t, _)| *t == CTRL_ATTR_FAMILY_ID)
            .and_then(|(_, p)| p.get(..2).map(|v| u16::from_ne_bytes([v[0], v[1]])))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("no netlink family {name:?} (is nbd loaded?)"),
                )
            })
    }
}

/// What CONNECT needs to know about the device.
pub struct ConnectSpec {
    pub index: u32,
    pub size: u64,
    pub block_size: u64,
    pub server_flags: u64,
    /// Seconds the kernel holds I/O of a device whose server died, waiting for RECONFIGURE.
    pub dead_conn_timeout: u64,
}

fn sockets(fd: RawFd) -> Vec<u8> {
    attr(
        NBD_ATTR_SOCKETS | NLA_F_NESTED,
        &attr(
            NBD_SOCK_ITEM | NLA_F_NESTED,
            &attr(NBD_SOCK_FD, &(fd as u32).to_ne_bytes()),
        ),
    )
}

/// NBD_CMD_CONNECT for `/dev/nbd<index>` over socket `fd`.
pub fn connect(spec: &ConnectSpec, fd: RawFd) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family("nbd")?;
    let mut body = attr(NBD_ATTR_INDEX, &spec.index.to_ne_bytes());
    body.extend(attr(NBD_ATTR_SIZE_BYTES, &spec.size.to_ne_bytes()));
    body.extend(attr(
        NBD_ATTR_BLOCK_SIZE_BYTES,
        &spec.block_size.to_ne_bytes(),
    ));
    body.extend(attr(NBD_ATTR_TIMEOUT, &0u64.to_ne_bytes()));
    body.extend(attr(
        NBD_ATTR_SERVER_FLAGS,
        &spec.server_flags.to_ne_bytes(),
    ));
    body.extend(attr(
        NBD_ATTR_DEAD_CONN_TIMEOUT,
        &spec.dead_conn_timeout.to_ne_bytes(),
    ));
    body.extend(sockets(fd));
    g.request(family, NBD_CMD_CONNECT, NBD_GENL_VERSION, &body)
        .map(|_| ())
        .map_err(|e| io::Error::new(e.kind(), format!("NBD_CMD_CONNECT nbd{}: {e}", spec.index)))
}

/// NBD_CMD_RECONFIGURE: a new socket for a connected device whose old one died.
pub fn reconnect(index: u32, fd: RawFd) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family("nbd")?;
    let mut body = attr(NBD_ATTR_INDEX, &index.to_ne_bytes());
    body.extend(sockets(fd));
    g.request(family, NBD_CMD_RECONFIGURE, NBD_GENL_VERSION, &body)
        .map(|_| ())
        .map_err(|e| io::Error::new(e.kind(), format!("NBD_CMD_RECONFIGURE nbd{index}: {e}")))
}

/// NBD_CMD_DISCONNECT.
pub fn disconnect(index: u32) -> io::Result<()> {
    let mut g = Genl::open()?;
    let family = g.family("nbd")?;
    g.request(
        family,
        NBD_CMD_DISCONNECT,
        NBD_GENL_VERSION,
        &attr(NBD_ATTR_INDEX, &index.to_ne_bytes()),
    )
    .map(|_| ())
    .map_err(|e| io::Error::new(e.kind(), format!("NBD_CMD_DISCONNECT nbd{index}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nested_attributes_round_trip() {
        let s = sockets(7);
        let outer = attrs(&s);
        assert_eq!(outer.len(), 1);
        assert_eq!(outer[0].0, NBD_ATTR_SOCKETS);
        let item = attrs(outer[0].1);
        let fd = attrs(item[0].1);
        assert_eq!(fd[0], (NBD_SOCK_FD, &7u32.to_ne_bytes()[..]));
    }

    proptest! {
        /// Fuzz: the attribute walker never panics on arbitrary bytes.
        #[test]
        fn attribute_parser(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = attrs(&b);
        }
    }
}
