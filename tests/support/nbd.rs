//! What the NBD end-to-end tests share: an `lsmd` process handle, multi-layer test images, `fio`
//! runs, and a deliberately minimal raw NBD client for what real clients never do (protocol
//! violations, crashing mid-request, counting acknowledged flushes).

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::{bin, lsmctl, ok, run};

/// A running `lsmd serve`; killed when dropped. Its log goes to `<socket>.log`.
pub struct Lsmd {
    child: Child,
    /// The Unix socket it listens on.
    pub socket: PathBuf,
}

impl Lsmd {
    /// Starts `lsmd serve` on `socket` with `args` (e.g. `--config X --read-only`) and waits
    /// until the socket accepts connections.
    pub fn start(socket: &Path, args: &[&std::ffi::OsStr]) -> Lsmd {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(socket.with_extension("log"))
            .expect("lsmd log");
        let child = Command::new(bin("lsmd"))
            .arg("serve")
            .args(args)
            .arg("--socket")
            .arg(socket)
            .stderr(log)
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn lsmd");
        let mut d = Lsmd {
            child,
            socket: socket.to_path_buf(),
        };
        // 30 s: opening reads each layer's metadata, which a slow or flaky source retries.
        for _ in 0..1200 {
            if UnixStream::connect(socket).is_ok() {
                return d;
            }
            if let Ok(Some(st)) = d.child.try_wait() {
                panic!("lsmd exited with {st}: {}", d.log());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!("lsmd did not listen on {}: {}", socket.display(), d.log());
    }

    /// `lsmd serve --config <config> --fuse <files> <extra>`: the exports appear as files in
    /// `files` (created); `config` may be `NAME=PATH`.
    pub fn start_fuse(
        socket: &Path,
        config: &std::ffi::OsStr,
        files: &Path,
        extra: &[&std::ffi::OsStr],
    ) -> Lsmd {
        std::fs::create_dir_all(files).expect("FUSE mountpoint");
        let mut args = vec![
            std::ffi::OsStr::new("--config"),
            config,
            std::ffi::OsStr::new("--fuse"),
            files.as_os_str(),
        ];
        args.extend_from_slice(extra);
        Lsmd::start(socket, &args)
    }

    /// `nbd+unix` URI of the default export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// The daemon's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.socket.with_extension("log")).unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, no chance to flush.
    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: the graceful path that flushes every upper layer.
    pub fn terminate(mut self) -> ExitStatus {
        ok(Command::new("kill").args(["-TERM", &self.child.id().to_string()]));
        self.child.wait().expect("wait lsmd")
    }
}

impl Drop for Lsmd {
    fn drop(&mut self) {
        // A test that ends early (a failed assertion) still lets lsmd unmount its FUSE files
        // and detach its devices: SIGTERM first, SIGKILL if it does not go within 5 s.
        if let Ok(None) = self.child.try_wait() {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            for _ in 0..100 {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP port free right now on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port")
}

/// Builds `dir/img.json`: a `size_mib` disk of `layers` stacked layers (each a diff over the
/// ones below: new data, overwrites, and zeroed runs), holes left between, plus an upper
/// layer. Returns (config, raw reference of the same content).
pub fn layered_image(dir: &Path, size_mib: usize, layers: usize) -> (PathBuf, PathBuf) {
    let mut data = vec![0u8; size_mib << 20];
    let raw = dir.join("ref.raw");
    let img = dir.join("img.json");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for l in 0..layers {
        // Every layer touches ~1/8 of the MiBs: half of them with data, the rest zeroed.
        for _ in 0..(size_mib / 8).max(1) {
            let mib = (next() % size_mib as u64) as usize;
            let start = (mib << 20) + (next() % 16) as usize * 4096;
            let len = (1 + next() % 64) as usize * 4096;
            let end = (start + len).min(data.len());
            if next() % 2 == 0 {
                let fill = next();
                for (i, b) in data[start..end].iter_mut().enumerate() {
                    *b = (fill >> (i % 8 * 8)) as u8 ^ (i / 4096) as u8;
                }
            } else {
                data[start..end].fill(0);
            }
        }
        std::fs::write(&raw, &data).expect("write raw");
        let blob = dir.join(format!("layer{l}.blob"));
        if l == 0 {
            ok(lsmctl(["import", "-q"]).arg(&raw).arg("-o").arg(&blob));
            ok(lsmctl(["create"]).arg(&img).arg("--layer").arg(&blob));
        } else {
            ok(lsmctl(["import", "-q"])
                .arg(&raw)
                .arg("--base")
                .arg(&img)
                .arg("--add-to")
                .arg(&img)
                .arg("-o")
                .arg(&blob));
        }
    }
    (img, raw)
}

/// Runs `fio` with the nbd engine against `uri`; returns (success, combined output). A pass
/// needs exit status 0 and no verify complaint.
pub fn fio(uri: &str, args: &[&str]) -> (bool, String) {
    let o = run(Command::new("fio")
        .args([
            "--ioengine=nbd",
            &format!("--uri={uri}"),
            "--verify_state_save=0",
        ])
        .args(args));
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    (o.status.success() && !text.contains("verify: bad"), text)
}

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;

/// A raw NBD client: fixed newstyle, `NBD_OPT_EXPORT_NAME`, simple replies only. Used where a
/// test must control every byte; behaviour checks use real clients.
pub struct RawClient {
    pub stream: UnixStream,
    /// Export size from the handshake.
    pub size: u64,
    /// Transmission flags from the handshake.
    pub flags: u16,
}

impl RawClient {
    /// Connects and completes the handshake for the default export.
    pub fn connect(socket: &Path) -> io::Result<RawClient> {
        let mut s = UnixStream::connect(socket)?;
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Err(io::Error::other("not an NBD newstyle server"));
        }
        let mut m = 3u32.to_be_bytes().to_vec(); // fixed newstyle, no zeroes
        m.extend_from_slice(b"IHAVEOPT");
        m.extend_from_slice(&1u32.to_be_bytes()); // EXPORT_NAME
        m.extend_from_slice(&0u32.to_be_bytes());
        s.write_all(&m)?;
        let mut info = [0u8; 10];
        s.read_exact(&mut info)?;
        Ok(RawClient {
            stream: s,
            size: u64::from_be_bytes(info[..8].try_into().expect("8 bytes")),
            flags: u16::from_be_bytes([info[8], info[9]]),
        })
    }

    /// Sends one request header (and `payload`, which may be shorter than `len` to cut a
    /// request off mid-way).
    pub fn send(
        &mut self,
        kind: u16,
        cookie: u64,
        off: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<()> {
        let mut h = Vec::with_capacity(28 + payload.len());
        h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&off.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        self.stream.write_all(&h)
    }

    /// Reads one simple reply: (error, cookie).
    pub fn reply(&mut self) -> io::Result<(u32, u64)> {
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r)?;
        if r[..4] != 0x6744_6698u32.to_be_bytes() {
            return Err(io::Error::other("bad reply magic"));
        }
        Ok((
            u32::from_be_bytes(r[4..8].try_into().expect("4 bytes")),
            u64::from_be_bytes(r[8..16].try_into().expect("8 bytes")),
        ))
    }

    /// A WRITE, waiting for its reply; returns the error code.
    pub fn write(&mut self, off: u64, data: &[u8]) -> io::Result<u32> {
        self.send(CMD_WRITE, off, off, data.len() as u32, data)?;
        Ok(self.reply()?.0)
    }

    /// A FLUSH, waiting for its reply; returns the error code.
    pub fn flush(&mut self) -> io::Result<u32> {
        self.send(CMD_FLUSH, u64::MAX, 0, 0, &[])?;
        Ok(self.reply()?.0)
    }

    /// A READ of `len` bytes; `Err` on transport failure, `Ok(Err(code))` on an error reply.
    pub fn read(&mut self, off: u64, len: u32) -> io::Result<Result<Vec<u8>, u32>> {
        self.send(CMD_READ, off, off, len, &[])?;
        let (err, _) = self.reply()?;
        if err != 0 {
            return Ok(Err(err));
        }
        let mut buf = vec![0u8; len as usize];
        self.stream.read_exact(&mut buf)?;
        Ok(Ok(buf))
    }
}
