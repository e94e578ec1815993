//! The ublk frontend (`Documentation/block/ublk.rst`): an export becomes `/dev/ublkbN`, a block
//! device whose requests the kernel hands to lsmd through io_uring. The control device
//! (`/dev/ublk-control`) takes ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV and DEL_DEV as
//! `IORING_OP_URING_CMD`s on a 128-byte-SQE ring; the per-device char device (`/dev/ublkcN`)
//! takes FETCH_REQ / COMMIT_AND_FETCH_REQ per tag, and its mmap'd descriptor array says what
//! each fetched request is. Data moves by user copy (pread/pwrite of the request's window on the
//! char device) where the kernel offers it, else through one page-aligned buffer per tag.
//!
//! Each hardware queue (`--ublk-queues`, depth `--ublk-depth`) is served by its own thread,
//! which completes its requests in order of arrival; the `Image` does the work.
//!
//! Writable devices declare a volatile write cache with FUA (`UBLK_ATTR_VOLATILE_CACHE |
//! UBLK_ATTR_FUA`): a completed WRITE is in the upper layer's log but not yet synced, so the
//! kernel must send FLUSH (fsync, sync, journal commits) and FUA writes, which lsmd serves
//! like NBD's — FLUSH syncs the upper layer, a FUA write is written then synced before it
//! completes. Without the attribute the kernel would take the device for write-through and
//! an fsync on a filesystem over it would return before anything was synced.
//!
//! Devices are created with user recovery: if lsmd dies, the kernel holds the
//! device's I/O (a mounted filesystem just waits), and the next lsmd started for the same
//! export takes the device over (START/END_USER_RECOVERY) — requests that were in flight are
//! issued again. The device id is remembered in a state file for that.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::metrics::Frontend;
use crate::nbd::Export;
use io_uring::{cqueue, opcode, squeue, types, IoUring};

const CTRL_DEV: &str = "/dev/ublk-control";

/// `_IOWR('u', nr, size)`: the ioctl-encoded command numbers.
const fn iowr(nr: u32, size: u32) -> u32 {
    (3 << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
/// `_IOR('u', nr, size)`.
const fn ior(nr: u32, size: u32) -> u32 {
    (2 << 30) | (size << 16) | ((b'u' as u32) << 8) | nr
}
const CTRL_CMD_LEN: u32 = 32;
const IO_CMD_LEN: u32 = 16;
const CMD_ADD_DEV: u32 = iowr(0x04, CTRL_CMD_LEN);
const CMD_DEL_DEV: u32 = iowr(0x05, CTRL_CMD_LEN);
const CMD_START_DEV: u32 = iowr(0x06, CTRL_CMD_LEN);
const CMD_STOP_DEV: u32 = iowr(0x07, CTRL_CMD_LEN);
const CMD_SET_PARAMS: u32 = iowr(0x08, CTRL_CMD_LEN);
const CMD_GET_DEV_INFO: u32 = ior(0x02, CTRL_CMD_LEN);
const CMD_START_USER_RECOVERY: u32 = iowr(0x10, CTRL_CMD_LEN);
const CMD_END_USER_RECOVERY: u32 = iowr(0x11, CTRL_CMD_LEN);
const IO_FETCH_REQ: u32 = iowr(0x20, IO_CMD_LEN);
const IO_COMMIT_AND_FETCH_REQ: u32 = iowr(0x21, IO_CMD_LEN);

const F_USER_RECOVERY: u64 = 1 << 3;
/// With recovery: requests in flight when the server died are issued again to the next one.
const F_USER_RECOVERY_REISSUE: u64 = 1 << 4;
const F_CMD_IOCTL_ENCODE: u64 = 1 << 6;
/// Request data moves by pread/pwrite on the char device instead of through buffers the driver
/// maps: no pinned buffer per tag.
const F_USER_COPY: u64 = 1 << 7;
/// Where a request's data sits for user copy: `UBLKSRV_IO_BUF_OFFSET + (q_id << 41) + (tag <<
/// 25)`.
fn user_copy_pos(q_id: u16, tag: usize) -> u64 {
    0x8000_0000 + ((q_id as u64) << 41) + ((tag as u64) << 25)
}
/// Device states (`ublksrv_ctrl_dev_info.state`) a restarted server can take over.
const S_DEV_LIVE: u16 = 1;
const S_DEV_QUIESCED: u16 = 2;
const S_DEV_FAIL_IO: u16 = 3;
/// How long a restarted lsmd waits for the kernel to finish with its killed predecessor: for a
/// moment after that process is reaped its device is still LIVE (queues being cancelled) and its
/// char device still open (START_USER_RECOVERY says EBUSY). A supervisor restarting lsmd at
/// once must get the takeover, not a second device.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);
const PARAM_TYPE_BASIC: u32 = 1;
const ATTR_READ_ONLY: u32 = 1;
/// The device has a volatile write cache: the kernel sends FLUSH for fsync and sync.
const ATTR_VOLATILE_CACHE: u32 = 1 << 2;
/// The device honours FUA on writes (`UBLK_IO_F_FUA` in the descriptor).
const ATTR_FUA: u32 = 1 << 3;
/// `ublksrv_io_desc.op_flags`: the operation in the low byte, flags above it.
const IO_F_FUA: u32 = 1 << 13;

const OP_READ: u8 = 0;
const OP_WRITE: u8 = 1;
const OP_FLUSH: u8 = 2;
const OP_DISCARD: u8 = 3;
const OP_WRITE_ZEROES: u8 = 5;

/// Most queue depth the driver allows; it also spaces the per-queue descriptor arrays.
const MAX_QUEUE_DEPTH: usize = 4096;
const DESC_LEN: usize = 24;

/// Per-request buffer size (and largest request) of the devices lsmd creates.
const IO_BUF_BYTES: u32 = 512 * 1024;

/// Shape of a new device: hardware queues (one serving thread each) and their depth.
#[derive(Debug, Clone, Copy)]
pub struct UblkOptions {
    pub queues: u16,
    pub depth: u16,
    /// Move data with user copy (set when the kernel takes it; buffers otherwise).
    pub user_copy: bool,
}

impl Default for UblkOptions {
    fn default() -> Self {
        UblkOptions {
            queues: 1,
            depth: 64,
            user_copy: true,
        }
    }
}

/// struct ublksrv_ctrl_cmd, as bytes.
fn ctrl_cmd(dev_id: u32, len: u16, addr: u64, data0: u64) -> [u8; 80] {
    let mut c = [0u8; 80];
    c[0..4].copy_from_slice(&dev_id.to_le_bytes());
    c[4..6].copy_from_slice(&u16::MAX.to_le_bytes()); // queue_id: none
    c[6..8].copy_from_slice(&len.to_le_bytes());
    c[8..16].copy_from_slice(&addr.to_le_bytes());
    c[16..24].copy_from_slice(&data0.to_le_bytes());
    c
}

/// struct ublksrv_io_cmd, as bytes.
fn io_cmd(q_id: u16, tag: u16, result: i32, addr: u64) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0..2].copy_from_slice(&q_id.to_le_bytes());
    c[2..4].copy_from_slice(&tag.to_le_bytes());
    c[4..8].copy_from_slice(&result.to_le_bytes());
    c[8..16].copy_from_slice(&addr.to_le_bytes());
    c
}

struct Control {
    file: File,
    ring: IoUring<squeue::Entry128, cqueue::Entry>,
}

impl Control {
    fn open() -> io::Result<Control> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(CTRL_DEV)
            .map_err(|e| {
                io::Error::new(e.kind(), format!("{CTRL_DEV}: {e} (is ublk_drv loaded?)"))
            })?;
        let ring = IoUring::<squeue::Entry128, cqueue::Entry>::builder().build(4)?;
        Ok(Control { file, ring })
    }

    /// Runs one control command; returns the kernel's result.
    fn run(&mut self, what: &str, op: u32, cmd: [u8; 80]) -> io::Result<i32> {
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(cmd)
            .build();
        // SAFETY: the command's `addr` (if any) points at memory the caller keeps alive until
        // this call returns, and we wait for the completion before returning.
        unsafe {
            self.ring
                .submission()
                .push(&sqe)
                .map_err(|_| io::Error::other("control ring full"))?;
        }
        self.ring.submit_and_wait(1)?;
        let res = self
            .ring
            .completion()
            .next()
            .map(|c| c.result())
            .ok_or_else(|| io::Error::other("no completion"))?;
        if res < 0 {
            let e = io::Error::from_raw_os_error(-res);
            return Err(io::Error::new(e.kind(), format!("ublk {what}: {e}")));
        }
        Ok(res)
    }
}

/// Page-aligned anonymous memory, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by this value; access is coordinated by the queue
// thread (it is only ever used there).
unsafe impl Send for Mapping {}

impl Mapping {
    fn map(len: usize, fd: Option<(&File, i64)>, prot: i32) -> io::Result<Mapping> {
        let (flags, raw, off) = match fd {
            Some((f, off)) => (libc::MAP_SHARED | libc::MAP_POPULATE, f.as_raw_fd(), off),
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
        };
        // SAFETY: a fresh mapping of `len` bytes; the kernel picks the address.
        let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, flags, raw, off) };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: p as *mut u8,
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `map` mapped.
        unsafe {
            libc::munmap(self.ptr as *mut libc::c_void, self.len);
        }
    }
}

/// An export served as a ublk block device.
pub struct UblkDevice {
    dev_id: u32,
    ctrl: Control,
    queues: Vec<JoinHandle<()>>,
    user_copy: bool,
}

impl UblkDevice {
    /// Serves `export` as a ublk device: takes over the device recorded in `state` if it is
    /// waiting for a server (after lsmd died), else creates `/dev/ublkbN` and records its id in
    /// `state`.
    pub fn start(
        export: Arc<Export>,
        state: &std::path::Path,
        opts: UblkOptions,
    ) -> io::Result<UblkDevice> {
        let name = export.name.clone();
        let image = &export.image;
        if opts.queues == 0 || opts.depth == 0 || opts.depth as usize > MAX_QUEUE_DEPTH {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("ublk queues must be ≥ 1 and depth 1..={MAX_QUEUE_DEPTH}"),
            ));
        }
        let mut ctrl = Control::open()?;
        let previous = std::fs::read_to_string(state)
            .ok()
            .and_then(|s| s.trim().parse::<u32>().ok());
        if let Some(id) = previous {
            match wait_recoverable(&mut ctrl, id) {
                Ok(Some(shape)) => {
                    let dev = UblkDevice::serve(export, ctrl, id, shape, true)?;
                    tracing::info!(export = %name, device = %dev.block_device(), "took over the ublk device after a restart");
                    return Ok(dev);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(export = %name, error = %e, "recorded ublk device is gone")
                }
            }
        }
        // struct ublksrv_ctrl_dev_info, 64 bytes; the kernel fills in dev_id.
        let mut info = [0u8; 64];
        info[0..2].copy_from_slice(&opts.queues.to_le_bytes()); // nr_hw_queues
        info[2..4].copy_from_slice(&opts.depth.to_le_bytes());
        info[8..12].copy_from_slice(&IO_BUF_BYTES.to_le_bytes());
        info[12..16].copy_from_slice(&u32::MAX.to_le_bytes()); // dev_id: any
        let base = F_CMD_IOCTL_ENCODE | F_USER_RECOVERY | F_USER_RECOVERY_REISSUE;
        let mut opts = opts;
        let template = info;
        let mut added = Err(io::Error::other("not tried"));
        // User copy where the kernel offers it, else buffers the driver maps.
        for user_copy in [opts.user_copy, false] {
            info = template;
            let flags = base | if user_copy { F_USER_COPY } else { 0 };
            info[24..32].copy_from_slice(&flags.to_le_bytes());
            added = ctrl.run(
                "ADD_DEV",
                CMD_ADD_DEV,
                ctrl_cmd(u32::MAX, 64, info.as_mut_ptr() as u64, 0),
            );
            if added.is_ok() {
                opts.user_copy = user_copy;
                break;
            }
        }
        added?;
        let dev_id = u32::from_le_bytes([info[12], info[13], info[14], info[15]]);

        // struct ublk_params with the basic part only: 8 + 32 bytes.
        let mut params = [0u8; 40];
        params[0..4].copy_from_slice(&40u32.to_le_bytes());
        params[4..8].copy_from_slice(&PARAM_TYPE_BASIC.to_le_bytes());
        let attrs = if image.read_only() {
            ATTR_READ_ONLY
        } else {
            ATTR_VOLATILE_CACHE | ATTR_FUA
        };
        params[8..12].copy_from_slice(&attrs.to_le_bytes());
        params[12] = 9; // logical block 512
        params[13] = 12; // physical block 4096
        params[14] = 12; // optimal I/O 4096
        params[15] = 9; // minimal I/O 512
        params[16..20].copy_from_slice(&(IO_BUF_BYTES >> 9).to_le_bytes());
        params[24..32].copy_from_slice(&(image.size() >> 9).to_le_bytes());
        if let Err(e) = ctrl.run(
            "SET_PARAMS",
            CMD_SET_PARAMS,
            ctrl_cmd(dev_id, 40, params.as_mut_ptr() as u64, 0),
        ) {
            let _ = ctrl.run("DEL_DEV", CMD_DEL_DEV, ctrl_cmd(dev_id, 0, 0, 0));
            return Err(e);
        }
        let dev = UblkDevice::serve(export.clone(), ctrl, dev_id, opts, false)?;
        if let Some(dir) = state.parent() {
            let _ = std::fs::create_dir_all(dir);
        }
        if let Err(e) = std::fs::write(state, format!("{dev_id}\n")) {
            tracing::warn!(state = %state.display(), error = %e, "cannot record the ublk device id; a restart will not take it over");
        }
        Ok(dev)
    }

    /// Opens the char device, starts a thread per queue, then START_DEV (or
    /// END_USER_RECOVERY).
    fn serve(
        export: Arc<Export>,
        ctrl: Control,
        dev_id: u32,
        shape: UblkOptions,
        recovering: bool,
    ) -> io::Result<UblkDevice> {
        let mut dev = UblkDevice {
            dev_id,
            ctrl,
            queues: Vec::new(),
            user_copy: shape.user_copy,
        };
        if recovering {
            let deadline = std::time::Instant::now() + TAKEOVER_WAIT;
            while let Err(e) = dev.ctrl.run(
                "START_USER_RECOVERY",
                CMD_START_USER_RECOVERY,
                ctrl_cmd(dev_id, 0, 0, 0),
            ) {
                // EBUSY: the dead server's char device is not released yet.
                if e.kind() != io::ErrorKind::ResourceBusy || std::time::Instant::now() > deadline {
                    return Err(e);
                }
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
        let cdev_path = format!("/dev/ublkc{dev_id}");
        let mut cdev = None;
        for _ in 0..100 {
            match OpenOptions::new().read(true).write(true).open(&cdev_path) {
                Ok(f) => {
                    cdev = Some(Arc::new(f));
                    break;
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
        let cdev = cdev.ok_or_else(|| io::Error::other(format!("{cdev_path} did not appear")))?;
        let (ready_tx, ready_rx) = mpsc::channel();
        for q in 0..shape.queues {
            let (export, cdev, ready) = (export.clone(), cdev.clone(), ready_tx.clone());
            dev.queues.push(std::thread::spawn(move || {
                if let Err(e) = serve_queue(&export, &cdev, q, shape, &ready) {
                    tracing::error!(export = %export.name, queue = q, error = %e, "ublk queue failed");
                    let _ = ready.send(Err(e));
                }
            }));
        }
        drop(ready_tx);
        for _ in 0..shape.queues {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(io::Error::other("ublk queue thread ended")),
            }
        }
        let (what, op) = if recovering {
            ("END_USER_RECOVERY", CMD_END_USER_RECOVERY)
        } else {
            ("START_DEV", CMD_START_DEV)
        };
        dev.ctrl
            .run(what, op, ctrl_cmd(dev_id, 0, 0, std::process::id() as u64))?;
        Ok(dev)
    }

    /// True when data moves by user copy (pread/pwrite on the char device).
    pub fn user_copy(&self) -> bool {
        self.user_copy
    }

    /// `/dev/ublkbN`.
    pub fn block_device(&self) -> String {
        format!("/dev/ublkb{}", self.dev_id)
    }

    /// Stops and removes the device (the kernel fails requests still queued).
    pub fn stop(mut self) -> io::Result<()> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> io::Result<()> {
        if self.queues.is_empty() {
            return Ok(());
        }
        let r = self
            .ctrl
            .run("STOP_DEV", CMD_STOP_DEV, ctrl_cmd(self.dev_id, 0, 0, 0));
        for q in self.queues.drain(..) {
            let _ = q.join();
        }
        self.ctrl
            .run("DEL_DEV", CMD_DEL_DEV, ctrl_cmd(self.dev_id, 0, 0, 0))?;
        r.map(|_| ())
    }
}

/// [`recoverable`], waiting (up to [`TAKEOVER_WAIT`]) while a device with user recovery is
/// still LIVE: its server may have just been killed and the kernel not yet quiesced it.
fn wait_recoverable(ctrl: &mut Control, id: u32) -> io::Result<Option<UblkOptions>> {
    let deadline = std::time::Instant::now() + TAKEOVER_WAIT;
    loop {
        let (state, shape) = recoverable(ctrl, id)?;
        if shape.is_some() || state != S_DEV_LIVE || std::time::Instant::now() > deadline {
            return Ok(shape);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// Device `id`'s state, and its shape when it has user recovery and waits for a server.
fn recoverable(ctrl: &mut Control, id: u32) -> io::Result<(u16, Option<UblkOptions>)> {
    let mut info = [0u8; 64];
    ctrl.run(
        "GET_DEV_INFO",
        CMD_GET_DEV_INFO,
        ctrl_cmd(id, 64, info.as_mut_ptr() as u64, 0),
    )?;
    let state = u16::from_le_bytes([info[4], info[5]]);
    let flags = u64::from_le_bytes(info[24..32].try_into().unwrap_or_default());
    let recovery = flags & F_USER_RECOVERY != 0;
    let waiting = recovery && (state == S_DEV_QUIESCED || state == S_DEV_FAIL_IO);
    let shape = waiting.then(|| UblkOptions {
        queues: u16::from_le_bytes([info[0], info[1]]),
        depth: u16::from_le_bytes([info[2], info[3]]),
        user_copy: flags & F_USER_COPY != 0,
    });
    Ok((if recovery { state } else { 0 }, shape))
}

impl Drop for UblkDevice {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::warn!(device = %self.block_device(), error = %e, "ublk stop failed");
        }
    }
}

/// Serves queue `q_id` until the device stops.
fn serve_queue(
    export: &Export,
    cdev: &File,
    q_id: u16,
    shape: UblkOptions,
    ready: &mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    let (name, image) = (&export.name, &export.image);
    let depth = shape.depth as usize;
    let user_copy = shape.user_copy;
    // Each queue's descriptors sit at a fixed stride (room for the largest depth); the driver
    // wants exactly the queue's own size, rounded to pages.
    let stride = (MAX_QUEUE_DEPTH * DESC_LEN).div_ceil(4096) * 4096;
    let descs_len = (depth * DESC_LEN).div_ceil(4096) * 4096;
    let descs = Mapping::map(
        descs_len,
        Some((cdev, q_id as i64 * stride as i64)),
        libc::PROT_READ,
    )?;
    // Buffers the driver copies through (a tag each), or with user copy one scratch buffer.
    let bufs = Mapping::map(
        if user_copy {
            IO_BUF_BYTES as usize
        } else {
            depth * IO_BUF_BYTES as usize
        },
        None,
        libc::PROT_READ | libc::PROT_WRITE,
    )?;
    let buf_addr = |tag: usize| {
        if user_copy {
            0
        } else {
            bufs.ptr as u64 + (tag * IO_BUF_BYTES as usize) as u64
        }
    };
    let mut ring: IoUring = IoUring::new((depth * 2) as u32)?;
    let fd = types::Fd(cdev.as_raw_fd());
    let push = |ring: &mut IoUring, op: u32, tag: usize, result: i32| -> io::Result<()> {
        let sqe = opcode::UringCmd16::new(fd, op)
            .cmd(io_cmd(q_id, tag as u16, result, buf_addr(tag)))
            .build()
            .user_data(tag as u64);
        // SAFETY: the command names this tag's buffer, which lives (in `bufs`) as long as the
        // ring; completions are reaped below before `bufs` is dropped.
        unsafe {
            ring.submission()
                .push(&sqe)
                .map_err(|_| io::Error::other("queue ring full"))
        }
    };
    for tag in 0..depth {
        push(&mut ring, IO_FETCH_REQ, tag, 0)?;
    }
    ring.submit()?;
    let _ = ready.send(Ok(()));
    let mut live = depth;
    while live > 0 {
        ring.submit_and_wait(1)?;
        let done: Vec<(usize, i32)> = ring
            .completion()
            .map(|c| (c.user_data() as usize, c.result()))
            .collect();
        for (tag, res) in done {
            if res < 0 {
                // UBLK_IO_RES_ABORT (-ENODEV): the device is stopping; this tag is done.
                live -= 1;
                continue;
            }
            // SAFETY: the driver wrote descriptor `tag` before completing its fetch, and the
            // mapping holds `depth` descriptors.
            let d = unsafe { std::slice::from_raw_parts(descs.ptr.add(tag * DESC_LEN), DESC_LEN) };
            let op_flags = u32::from_le_bytes([d[0], d[1], d[2], d[3]]);
            let op = (op_flags & 0xff) as u8;
            let fua = op_flags & IO_F_FUA != 0;
            let sectors = u32::from_le_bytes([d[4], d[5], d[6], d[7]]) as u64;
            let start = u64::from_le_bytes([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]);
            let (off, len) = (start << 9, (sectors << 9) as usize);
            let result = if len > IO_BUF_BYTES as usize {
                -libc::EINVAL
            } else {
                let slot = if user_copy {
                    0
                } else {
                    tag * IO_BUF_BYTES as usize
                };
                // SAFETY: `len` ≤ IO_BUF_BYTES bytes inside `bufs` (this tag's buffer, or the
                // queue's scratch buffer with user copy), used by nobody else until we commit.
                let buf = unsafe { std::slice::from_raw_parts_mut(bufs.ptr.add(slot), len) };
                let pos = user_copy_pos(q_id, tag);
                let copy_err =
                    |e: io::Error| blockfmt::Error::Invalid(format!("ublk user copy: {e}"));
                let r = match op {
                    OP_READ => image.read(off, buf).and_then(|_| {
                        if user_copy {
                            std::os::unix::fs::FileExt::write_all_at(cdev, buf, pos)
                                .map_err(copy_err)
                        } else {
                            Ok(())
                        }
                    }),
                    OP_WRITE => {
                        let got = if user_copy {
                            std::os::unix::fs::FileExt::read_exact_at(cdev, buf, pos)
                                .map_err(copy_err)
                        } else {
                            Ok(())
                        };
                        // FUA: the write is synced before it completes.
                        got.and_then(|_| image.write(off, buf))
                            .and_then(|_| match fua {
                                true => export.flush(Frontend::Ublk),
                                false => Ok(()),
                            })
                    }
                    OP_FLUSH => export.flush(Frontend::Ublk),
                    OP_DISCARD => image.trim(off, len as u64),
                    OP_WRITE_ZEROES => image.write_zeroes(off, len as u64),
                    _ => Err(blockfmt::Error::Invalid(format!("ublk op {op}"))),
                };
                match r {
                    Ok(()) => len as i32,
                    Err(e) => {
                        export.failed_request(&e);
                        tracing::warn!(export = %name, queue = q_id, op, offset = off, len, error = %e, "ublk request failed");
                        -crate::errno(&e)
                    }
                }
            };
            push(&mut ring, IO_COMMIT_AND_FETCH_REQ, tag, result)?;
        }
        // Before the kernel hears of these completions, the upper layer's queued records reach
        // the kernel too: a restarted lsmd (recovery) then sees every write it acknowledged.
        if let Err(e) = image.settle() {
            export.failed_request(&e);
            tracing::warn!(export = %name, error = %e, "upper layer log write failed");
        }
    }
    Ok(())
}
