//! Attaching an export to the kernel's nbd driver (`/dev/nbdN`) with the classic ioctl
//! interface: lsmd keeps one end of a socket pair and serves the transmission phase on it (the
//! kernel speaks no handshake and wants simple replies); the other end goes to the driver, and a
//! thread sits in `NBD_DO_IT` for as long as the device is attached. Detaching sends
//! `NBD_DISCONNECT`: the kernel finishes its requests, sends DISC, and the thread returns.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use super::handshake::transmission_flags;
use super::{transmission, Export, Server};

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

/// An export attached to an nbd device.
pub struct KernelAttachment {
    device: PathBuf,
    dev: Arc<File>,
    server_thread: Option<JoinHandle<io::Result<()>>>,
    kernel_thread: Option<JoinHandle<io::Result<()>>>,
}

impl KernelAttachment {
    /// Attaches `export` to `device` (e.g. `/dev/nbd0`).
    pub fn attach(device: &Path, export: Arc<Export>, server: &Server) -> io::Result<Self> {
        let ctx = |e: io::Error| io::Error::new(e.kind(), format!("{}: {e}", device.display()));
        let dev = Arc::new(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(device)
                .map_err(ctx)?,
        );
        let size = export.image.size();
        let (ours, theirs) = UnixStream::pair()?;
        let flags = transmission_flags(&export.image) as libc::c_ulong;
        let setup = || -> io::Result<()> {
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
            ioctl(&dev, "NBD_SET_SOCK", NBD_SET_SOCK, theirs.as_raw_fd() as _)
        };
        setup().map_err(ctx)?;
        let server = server.clone();
        let server_thread = std::thread::spawn(move || {
            let out = ours.try_clone()?;
            let fd = ours.as_raw_fd();
            let mut rd = io::BufReader::with_capacity(256 * 1024, ours);
            let conn = Arc::new(transmission::Conn::new(out, export, false, false));
            transmission::serve(&mut rd, fd, conn, &server)
        });
        let d = dev.clone();
        let name = device.to_path_buf();
        let kernel_thread = std::thread::spawn(move || {
            // Blocks while the device is attached; the kernel holds its own reference to
            // `theirs`, so dropping ours after DO_IT returns is what ends it.
            let r = ioctl(&d, "NBD_DO_IT", NBD_DO_IT, 0);
            let _ = ioctl(&d, "NBD_CLEAR_QUE", NBD_CLEAR_QUE, 0);
            let _ = ioctl(&d, "NBD_CLEAR_SOCK", NBD_CLEAR_SOCK, 0);
            drop(theirs);
            tracing::info!(device = %name.display(), "nbd device detached");
            r
        });
        Ok(KernelAttachment {
            device: device.to_path_buf(),
            dev,
            server_thread: Some(server_thread),
            kernel_thread: Some(kernel_thread),
        })
    }

    /// The device path.
    pub fn device(&self) -> &Path {
        &self.device
    }

    /// Detaches: the kernel completes what it has queued, disconnects, and both threads end.
    pub fn detach(mut self) -> io::Result<()> {
        self.disconnect()
    }

    fn disconnect(&mut self) -> io::Result<()> {
        let Some(k) = self.kernel_thread.take() else {
            return Ok(());
        };
        ioctl(&self.dev, "NBD_DISCONNECT", NBD_DISCONNECT, 0)?;
        let _ = k.join();
        if let Some(s) = self.server_thread.take() {
            let _ = s.join();
        }
        Ok(())
    }
}

impl Drop for KernelAttachment {
    fn drop(&mut self) {
        if let Err(e) = self.disconnect() {
            tracing::warn!(device = %self.device.display(), error = %e, "nbd detach failed");
        }
    }
}
