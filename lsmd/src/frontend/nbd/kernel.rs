//! Attaching an export to the kernel's nbd driver (`/dev/nbdN`): lsmd keeps one end of a
//! socket pair and serves the transmission phase on it (the kernel speaks no handshake and
//! wants simple replies); the other end goes to the driver.
//!
//! The netlink interface is used when the kernel has it: CONNECT with a dead-connection
//! timeout, and the device's index recorded in a state file, so that a restarted lsmd finds the
//! device waiting for a server and hands it a new socket (RECONFIGURE) — a mounted filesystem
//! keeps going, and I/O issued in the gap completes. Otherwise the classic ioctls: a thread
//! sits in `NBD_DO_IT` while the device is attached, and the device dies with lsmd.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::handshake::transmission_flags;
use super::{netlink, transmission, Export, Server};

const NBD_SET_SOCK: libc::c_ulong = 0xab00;
const NBD_SET_BLKSIZE: libc::c_ulong = 0xab01;
const NBD_DO_IT: libc::c_ulong = 0xab03;
const NBD_CLEAR_SOCK: libc::c_ulong = 0xab04;
const NBD_CLEAR_QUE: libc::c_ulong = 0xab05;
const NBD_SET_SIZE_BLOCKS: libc::c_ulong = 0xab07;
const NBD_DISCONNECT: libc::c_ulong = 0xab08;
const NBD_SET_TIMEOUT: libc::c_ulong = 0xab09;
const NBD_SET_FLAGS: libc::c_ulong = 0xab0a;

/// Logical block size given to the driver: 512, so that filesystems made with any block size
/// (a small ext4 uses 1 KiB) mount; the kernel still sends page-sized requests.
const BLOCK: u64 = 512;

fn ioctl(dev: &File, what: &str, req: libc::c_ulong, arg: libc::c_ulong) -> io::Result<()> {
    // SAFETY: `dev` is an open nbd device; every request used here takes an integer argument
    // (a size, a flag word or a file descriptor we own), never a pointer.
    let r = unsafe { libc::ioctl(dev.as_raw_fd(), req as _, arg) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
    }
    Ok(())
}

/// How the device was attached.
enum Mode {
    /// Netlink: the kernel owns its socket; nothing of ours waits.
    Netlink { index: u32 },
    /// Ioctls: the device file and the thread in NBD_DO_IT.
    Ioctl {
        dev: Arc<File>,
        kernel_thread: Option<JoinHandle<io::Result<()>>>,
    },
}

/// An export attached to an nbd device.
pub struct KernelAttachment {
    device: PathBuf,
    mode: Mode,
    server_thread: Option<JoinHandle<io::Result<()>>>,
    /// Records the device for a restarted lsmd (netlink only); removed on a clean detach.
    state: Option<PathBuf>,
}

fn device_index(device: &Path) -> Option<u32> {
    device
        .file_name()?
        .to_str()?
        .strip_prefix("nbd")?
        .parse()
        .ok()
}

/// True when `/dev/nbd<index>` is configured (has a size): a server died under it.
fn configured(index: u32) -> bool {
    std::fs::read_to_string(format!("/sys/block/nbd{index}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|s| s > 0)
}

impl KernelAttachment {
    /// Attaches `export` to `device` (e.g. `/dev/nbd0`). With netlink, a device recorded in
    /// `state` that still waits for its server is taken over instead; `dead_conn_timeout` is
    /// how long the kernel waits for a restarted lsmd.
    pub fn attach(
        device: &Path,
        export: Arc<Export>,
        server: &Server,
        state: &Path,
        dead_conn_timeout: u64,
    ) -> io::Result<Self> {
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", device.display()));
        let (ours, theirs) = UnixStream::pair()?;
        let index = device_index(device);
        let mut mode = None;
        if let Some(index) = index {
            let recorded = std::fs::read_to_string(state)
                .ok()
                .and_then(|s| s.trim().parse::<u32>().ok());
            if recorded == Some(index) && configured(index) {
                match netlink::reconnect(index, theirs.as_raw_fd()) {
                    Ok(()) => {
                        tracing::info!(device = %device.display(), "took over the nbd device after a restart");
                        mode = Some(Mode::Netlink { index });
                    }
                    Err(e) => {
                        tracing::warn!(device = %device.display(), error = %e, "cannot take the nbd device over; connecting anew")
                    }
                }
            }
            if mode.is_none() {
                let spec = netlink::ConnectSpec {
                    index,
                    size: export.image.size(),
                    block_size: BLOCK,
                    server_flags: transmission_flags(&export.image) as u64,
                    dead_conn_timeout,
                };
                match netlink::connect(&spec, theirs.as_raw_fd()) {
                    Ok(()) => mode = Some(Mode::Netlink { index }),
                    Err(e) => {
                        tracing::info!(device = %device.display(), error = %e, "netlink attach unavailable; using ioctls")
                    }
                }
            }
        }
        let mode = match mode {
            Some(m) => {
                if let Some(dir) = state.parent() {
                    let _ = std::fs::create_dir_all(dir);
                }
                if let Err(e) = std::fs::write(state, format!("{}\n", index.unwrap_or_default())) {
                    tracing::warn!(state = %state.display(), error = %e, "cannot record the nbd device; a restart will not take it over");
                }
                drop(theirs); // the kernel holds its own reference
                m
            }
            None => ioctl_attach(device, &export, theirs).map_err(ctx)?,
        };
        let server = server.clone();
        let server_thread = std::thread::spawn(move || {
            let out = ours.try_clone()?;
            let fd = ours.as_raw_fd();
            let mut rd = io::BufReader::with_capacity(256 * 1024, ours);
            let lane = server.engine.lane(transmission::MAX_DEFERRED);
            let conn = Arc::new(transmission::Conn::new(out, export, false, false, lane));
            // The kernel is trusted: no idle timeout (a mounted disk may be idle for days).
            transmission::serve(&mut rd, fd, conn, &server, None)
        });
        let state = matches!(mode, Mode::Netlink { .. }).then(|| state.to_path_buf());
        Ok(KernelAttachment {
            device: device.to_path_buf(),
            mode,
            server_thread: Some(server_thread),
            state,
        })
    }

    /// The device path.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Detaches: the kernel completes what it has queued, disconnects, and lsmd's side ends.
    pub fn detach(mut self) -> io::Result<()> {
        self.disconnect()
    }

    fn disconnect(&mut self) -> io::Result<()> {
        let Some(server) = self.server_thread.take() else {
            return Ok(());
        };
        match &mut self.mode {
            Mode::Netlink { index } => netlink::disconnect(*index)?,
            Mode::Ioctl { dev, kernel_thread } => {
                ioctl(dev, "NBD_DISCONNECT", NBD_DISCONNECT, 0)?;
                if let Some(k) = kernel_thread.take() {
                    let _ = k.join();
                }
            }
        }
        let _ = server.join();
        if let Some(s) = &self.state {
            let _ = std::fs::remove_file(s);
        }
        tracing::info!(device = %self.device.display(), "nbd device detached");
        Ok(())
    }
}

/// The ioctl way: configure the device, hand it `theirs`, and park a thread in NBD_DO_IT.
fn ioctl_attach(device: &Path, export: &Export, theirs: UnixStream) -> io::Result<Mode> {
    let dev = Arc::new(OpenOptions::new().read(true).write(true).open(device)?);
    let size = export.image.size();
    let flags = transmission_flags(&export.image) as libc::c_ulong;
    ioctl(&dev, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0)?;
    ioctl(&dev, "NBD_SET_BLKSIZE", NBD_SET_BLKSIZE, BLOCK as _)?;
    ioctl(
        &dev,
        "NBD_SET_SIZE_BLOCKS",
        NBD_SET_SIZE_BLOCKS,
        (size / BLOCK) as _,
    )?;
    ioctl(&dev, "NBD_SET_TIMEOUT", NBD_SET_TIMEOUT, 0)?;
    ioctl(&dev, "NBD_SET_FLAGS", NBD_SET_FLAGS, flags)?;
    ioctl(&dev, "NBD_SET_SOCK", NBD_SET_SOCK, theirs.as_raw_fd() as _)?;
    let d = dev.clone();
    let kernel_thread = std::thread::spawn(move || {
        // Blocks while the device is attached.
        let r = ioctl(&d, "NBD_DO_IT", NBD_DO_IT, 0);
        let _ = ioctl(&d, "NBD_CLEAR_QUE", NBD_CLEAR_QUE, 0);
        let _ = ioctl(&d, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
        drop(theirs);
        r
    });
    Ok(Mode::Ioctl {
        dev,
        kernel_thread: Some(kernel_thread),
    })
}

impl Drop for KernelAttachment {
    fn drop(&mut self) {
        if let Err(e) = self.disconnect() {
            tracing::warn!(device = %self.device.display(), error = %e, "nbd detach failed");
        }
    }
}
