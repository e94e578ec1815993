//! The ublk frontend (`Documentation/block/ublk.rst`): an export becomes `/dev/ublkbN`, a block
//! device whose requests the kernel hands to lsmd through io_uring. The control device
//! (`/dev/ublk-control`) takes ADD_DEV, SET_PARAMS, START_DEV, STOP_DEV and DEL_DEV as
//! `IORING_OP_URING_CMD`s on a 128-byte-SQE ring; the per-device char device (`/dev/ublkcN`)
//! takes FETCH_REQ / COMMIT_AND_FETCH_REQ per tag, and its mmap'd descriptor array says what
//! each fetched request is. Data moves by user copy (pread/pwrite of the request's window on the
//! char device) where the kernel offers it, else through one page-aligned buffer per tag.
//!
//! Each hardware queue (`--ublk-queues`, depth `--ublk-depth`) is served by its own thread
//! under the engine's rule ([`crate::engine`]): hot requests are served and committed right
//! there; cold ones (a chunk to decode or fetch, FLUSH, FUA) go to the queue's lane of the
//! shared pool and are committed when done, so tags complete out of order and one registry
//! round trip on a tag never stalls the queue's other tags. The kernel ABI is in [`sys`].
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
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;

use io_uring::{cqueue, opcode, squeue, types, IoUring};
use parking_lot::Mutex;
use zerocopy::{FromBytes, IntoBytes};

use crate::engine::{self, Engine, Export, Lane};
use crate::metrics::Frontend;

mod sys;

use sys::*;

const CTRL_DEV: &str = "/dev/ublk-control";

/// How long a restarted lsmd waits for the kernel to finish with its killed predecessor: for a
/// moment after that process is reaped its device is still LIVE (queues being cancelled) and its
/// char device still open (START_USER_RECOVERY says EBUSY). A supervisor restarting lsmd at
/// once must get the takeover, not a second device.
const TAKEOVER_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

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
    fn run(&mut self, what: &str, op: u32, cmd: CtrlCmd) -> io::Result<i32> {
        let sqe = opcode::UringCmd80::new(types::Fd(self.file.as_raw_fd()), op)
            .cmd(cmd.sqe_bytes())
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

// SAFETY: the mapping is plain memory owned by this value. The descriptor array is only read by
// the queue thread; the buffers are split by tag, and a tag's buffer is used by one thread at a
// time: the queue thread until it hands the request to the pool, then that one task until it
// completes the tag (see `Queue`).
unsafe impl Send for Mapping {}
// SAFETY: as above — shared handles never touch the same bytes at once.
unsafe impl Sync for Mapping {}

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
        engine: &Engine,
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
                    let dev = UblkDevice::serve(export, ctrl, id, shape, true, engine)?;
                    tracing::info!(export = %name, device = %dev.block_device(), "took over the ublk device after a restart");
                    return Ok(dev);
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::debug!(export = %name, error = %e, "recorded ublk device is gone")
                }
            }
        }
        // The kernel fills in dev_id.
        let template = DevInfo {
            nr_hw_queues: opts.queues,
            queue_depth: opts.depth,
            max_io_buf_bytes: IO_BUF_BYTES,
            dev_id: u32::MAX, // any
            ..DevInfo::default()
        };
        let base = F_CMD_IOCTL_ENCODE | F_USER_RECOVERY | F_USER_RECOVERY_REISSUE;
        let mut opts = opts;
        let mut info = template;
        let mut added = Err(io::Error::other("not tried"));
        // User copy where the kernel offers it, else buffers the driver maps.
        for user_copy in [opts.user_copy, false] {
            info = template;
            let flags = base | if user_copy { F_USER_COPY } else { 0 };
            info.flags = flags;
            let len = std::mem::size_of::<DevInfo>() as u16;
            let addr = info.as_mut_bytes().as_mut_ptr() as u64;
            added = ctrl.run("ADD_DEV", CMD_ADD_DEV, CtrlCmd::new(u32::MAX, len, addr, 0));
            if added.is_ok() {
                opts.user_copy = user_copy;
                break;
            }
        }
        added?;
        let dev_id = info.dev_id;

        let attrs = if image.read_only() {
            ATTR_READ_ONLY
        } else {
            ATTR_VOLATILE_CACHE | ATTR_FUA
        };
        let mut params = Params {
            len: std::mem::size_of::<Params>() as u32,
            types: PARAM_TYPE_BASIC,
            basic: ParamBasic {
                attrs,
                logical_bs_shift: 9,   // 512
                physical_bs_shift: 12, // 4096
                io_opt_shift: 12,
                io_min_shift: 9,
                max_sectors: IO_BUF_BYTES >> 9,
                dev_sectors: image.size() >> 9,
                ..ParamBasic::default()
            },
        };
        if let Err(e) = ctrl.run(
            "SET_PARAMS",
            CMD_SET_PARAMS,
            CtrlCmd::new(
                dev_id,
                params.len as u16,
                params.as_mut_bytes().as_mut_ptr() as u64,
                0,
            ),
        ) {
            let _ = ctrl.run("DEL_DEV", CMD_DEL_DEV, CtrlCmd::new(dev_id, 0, 0, 0));
            return Err(e);
        }
        let dev = UblkDevice::serve(export.clone(), ctrl, dev_id, opts, false, engine)?;
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
        engine: &Engine,
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
                CtrlCmd::new(dev_id, 0, 0, 0),
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
            let lane = engine.lane(shape.depth as usize);
            dev.queues.push(std::thread::spawn(move || {
                if let Err(e) = serve_queue(&export, &cdev, q, shape, lane, &ready) {
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
        dev.ctrl.run(
            what,
            op,
            CtrlCmd::new(dev_id, 0, 0, std::process::id() as u64),
        )?;
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
            .run("STOP_DEV", CMD_STOP_DEV, CtrlCmd::new(self.dev_id, 0, 0, 0));
        for q in self.queues.drain(..) {
            let _ = q.join();
        }
        self.ctrl
            .run("DEL_DEV", CMD_DEL_DEV, CtrlCmd::new(self.dev_id, 0, 0, 0))?;
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
    let mut info = DevInfo::default();
    let len = std::mem::size_of::<DevInfo>() as u16;
    let addr = info.as_mut_bytes().as_mut_ptr() as u64;
    ctrl.run(
        "GET_DEV_INFO",
        CMD_GET_DEV_INFO,
        CtrlCmd::new(id, len, addr, 0),
    )?;
    let (state, flags) = (info.state, info.flags);
    let recovery = flags & F_USER_RECOVERY != 0;
    let waiting = recovery && (state == S_DEV_QUIESCED || state == S_DEV_FAIL_IO);
    let shape = waiting.then_some(UblkOptions {
        queues: info.nr_hw_queues,
        depth: info.queue_depth,
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

/// `user_data` of the eventfd read that wakes the queue thread when the pool finished tags.
const WAKE: u64 = u64::MAX;

/// Tags whose cold work the pool finished, with their results, waiting for the queue thread to
/// commit them (only the thread owning the ring may submit to it). The eventfd wakes it.
struct Finished {
    tags: Mutex<Vec<(usize, i32)>>,
    wake: File,
}

impl Finished {
    fn new() -> io::Result<Finished> {
        // SAFETY: eventfd takes no pointers; a non-negative result is a new fd we own.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let wake = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(Finished {
            tags: Mutex::new(Vec::new()),
            wake,
        })
    }

    fn push(&self, tag: usize, result: i32) {
        self.tags.lock().push((tag, result));
        if let Err(e) = (&self.wake).write_all(&1u64.to_ne_bytes()) {
            // Cannot happen short of a bug (the counter would have to overflow).
            tracing::error!(error = %e, "cannot wake the ublk queue thread");
        }
    }
}

/// A tag's data buffer: its slice of the queue's buffers, or (user copy) a buffer of the
/// thread that serves it.
#[derive(Clone)]
struct TagBuffers {
    bufs: Arc<Mapping>,
    user_copy: bool,
}

impl TagBuffers {
    /// Runs `f` on a buffer of `len` bytes for `tag` (`len` ≤ [`IO_BUF_BYTES`]).
    ///
    /// Only the one thread that owns `tag` right now (the queue thread, or the pool task it
    /// handed the request to) may call this for `tag`.
    fn with<T>(&self, tag: usize, len: usize, f: impl FnOnce(&mut [u8]) -> T) -> T {
        if self.user_copy {
            thread_local! {
                static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
            }
            BUF.with_borrow_mut(|b| {
                b.resize(len, 0);
                f(b)
            })
        } else {
            // SAFETY: `len` ≤ IO_BUF_BYTES bytes of this tag's slot inside `bufs` (`depth`
            // slots), used by nobody else while this thread owns the tag.
            let buf = unsafe {
                std::slice::from_raw_parts_mut(self.bufs.ptr.add(tag * IO_BUF_BYTES as usize), len)
            };
            f(buf)
        }
    }
}

/// What one queue thread needs to serve a tag, shareable with the pool tasks it starts.
#[derive(Clone)]
struct Queue {
    export: Arc<Export>,
    cdev: Arc<File>,
    q_id: u16,
    bufs: TagBuffers,
    finished: Arc<Finished>,
}

/// A request, read from its descriptor.
#[derive(Clone, Copy)]
struct Io {
    tag: usize,
    op: u8,
    fua: bool,
    off: u64,
    len: usize,
}

impl Queue {
    /// The result the kernel gets for `r`: the byte count, or a negative errno (logged).
    fn result(&self, io: &Io, r: blockfmt::Result<()>) -> i32 {
        match r {
            Ok(()) => io.len as i32,
            Err(e) => {
                self.export.failed_request(&e);
                tracing::warn!(export = %self.export.name, queue = self.q_id, op = io.op, offset = io.off, len = io.len, error = %e, "ublk request failed");
                -crate::errno(&e)
            }
        }
    }

    fn copy_err(e: io::Error) -> blockfmt::Error {
        blockfmt::Error::Invalid(format!("ublk user copy: {e}"))
    }

    /// With user copy, hands a read's bytes to the kernel.
    fn copy_out(&self, io: &Io, buf: &[u8]) -> blockfmt::Result<()> {
        if !self.bufs.user_copy {
            return Ok(());
        }
        let pos = user_copy_pos(self.q_id, io.tag);
        std::os::unix::fs::FileExt::write_all_at(&*self.cdev, buf, pos).map_err(Self::copy_err)
    }

    /// With user copy, takes a write's bytes from the kernel.
    fn copy_in(&self, io: &Io, buf: &mut [u8]) -> blockfmt::Result<()> {
        if !self.bufs.user_copy {
            return Ok(());
        }
        let pos = user_copy_pos(self.q_id, io.tag);
        std::os::unix::fs::FileExt::read_exact_at(&*self.cdev, buf, pos).map_err(Self::copy_err)
    }

    /// Serves `io` on the queue thread if it is hot work and returns its result; else hands it
    /// to `lane`, which completes it through [`Finished`], and returns `None`.
    fn serve(&self, io: Io, lane: &Lane) -> Option<i32> {
        let via = Frontend::Ublk;
        let export = &*self.export;
        let (off, len) = (io.off, io.len);
        let r = match io.op {
            OP_READ => {
                let hot = self.bufs.with(io.tag, len, |buf| {
                    Some(match engine::read_hot(export, via, off, buf)? {
                        Ok(_) => self.copy_out(&io, buf),
                        Err(e) => Err(e),
                    })
                });
                match hot {
                    Some(r) => r,
                    None => {
                        let me = self.clone();
                        lane.submit(move || {
                            let r = me.bufs.with(io.tag, len, |buf| {
                                engine::read_cold(&me.export, via, off, buf)
                                    .and_then(|_| me.copy_out(&io, buf))
                            });
                            me.finished.push(io.tag, me.result(&io, r));
                        });
                        return None;
                    }
                }
            }
            OP_WRITE => {
                let r = self.bufs.with(io.tag, len, |buf| {
                    self.copy_in(&io, buf)?;
                    engine::hot(export, via, |img| img.write(off, buf))
                });
                match r {
                    // FUA: the write is synced before it completes.
                    Ok(()) if io.fua => return self.flush_cold(io, lane),
                    r => r,
                }
            }
            OP_FLUSH => return self.flush_cold(io, lane),
            OP_DISCARD => engine::hot(export, via, |img| img.trim(off, len as u64)),
            OP_WRITE_ZEROES => engine::hot(export, via, |img| img.write_zeroes(off, len as u64)),
            op => Err(blockfmt::Error::Invalid(format!("ublk op {op}"))),
        };
        Some(self.result(&io, r))
    }

    /// A FLUSH (or the sync after a FUA write) on the pool.
    fn flush_cold(&self, io: Io, lane: &Lane) -> Option<i32> {
        let me = self.clone();
        lane.submit(move || {
            let r = engine::flush(&me.export, Frontend::Ublk);
            me.finished.push(io.tag, me.result(&io, r));
        });
        None
    }
}

/// Serves queue `q_id` until the device stops.
///
/// Tags complete in any order: hot requests are committed from this thread as soon as they are
/// served, cold ones when their pool task finishes (it queues the result in [`Finished`] and
/// wakes this thread through an eventfd read on the same ring), so a cold read on one tag never
/// delays another.
fn serve_queue(
    export: &Arc<Export>,
    cdev: &Arc<File>,
    q_id: u16,
    shape: UblkOptions,
    lane: Lane,
    ready: &mpsc::Sender<io::Result<()>>,
) -> io::Result<()> {
    let depth = shape.depth as usize;
    let user_copy = shape.user_copy;
    // Each queue's descriptors sit at a fixed stride (room for the largest depth); the driver
    // wants exactly the queue's own size, rounded to pages.
    let desc_len = std::mem::size_of::<IoDesc>();
    let stride = (MAX_QUEUE_DEPTH * desc_len).div_ceil(4096) * 4096;
    let descs_len = (depth * desc_len).div_ceil(4096) * 4096;
    let descs = Mapping::map(
        descs_len,
        Some((cdev, q_id as i64 * stride as i64)),
        libc::PROT_READ,
    )?;
    // Buffers the driver copies through (a tag each); with user copy, threads use their own.
    let bufs = Arc::new(Mapping::map(
        if user_copy {
            4096
        } else {
            depth * IO_BUF_BYTES as usize
        },
        None,
        libc::PROT_READ | libc::PROT_WRITE,
    )?);
    let queue = Queue {
        export: export.clone(),
        cdev: cdev.clone(),
        q_id,
        bufs: TagBuffers {
            bufs: bufs.clone(),
            user_copy,
        },
        finished: Arc::new(Finished::new()?),
    };
    let buf_addr = |tag: usize| {
        if user_copy {
            0
        } else {
            bufs.ptr as u64 + (tag * IO_BUF_BYTES as usize) as u64
        }
    };
    // The eventfd read lands here; declared before the ring so it outlives it.
    let mut wake_buf = Box::new([0u8; 8]);
    let mut ring: IoUring = IoUring::new((depth * 2 + 2) as u32)?;
    let fd = types::Fd(cdev.as_raw_fd());
    let push = |ring: &mut IoUring, op: u32, tag: usize, result: i32| -> io::Result<()> {
        let cmd = IoCmd {
            q_id,
            tag: tag as u16,
            result,
            addr: buf_addr(tag),
        };
        let sqe = opcode::UringCmd16::new(fd, op)
            .cmd(cmd.sqe_bytes())
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
    let wake_fd = types::Fd(queue.finished.wake.as_raw_fd());
    let arm_wake = |ring: &mut IoUring, buf: &mut [u8; 8]| -> io::Result<()> {
        let sqe = opcode::Read::new(wake_fd, buf.as_mut_ptr(), 8)
            .build()
            .user_data(WAKE);
        // SAFETY: `buf` is boxed and outlives the ring (declared before it); only this read
        // writes it.
        unsafe {
            ring.submission()
                .push(&sqe)
                .map_err(|_| io::Error::other("queue ring full"))
        }
    };
    for tag in 0..depth {
        push(&mut ring, IO_FETCH_REQ, tag, 0)?;
    }
    arm_wake(&mut ring, &mut wake_buf)?;
    ring.submit()?;
    let _ = ready.send(Ok(()));
    let mut live = depth;
    while live > 0 {
        ring.submit_and_wait(1)?;
        let done: Vec<(u64, i32)> = ring
            .completion()
            .map(|c| (c.user_data(), c.result()))
            .collect();
        let mut woken = false;
        for (data, res) in done {
            if data == WAKE {
                if res < 0 {
                    tracing::warn!(queue = q_id, error = %io::Error::from_raw_os_error(-res), "ublk wake-up read failed");
                }
                woken = true;
                continue;
            }
            let tag = data as usize;
            if res < 0 || tag >= depth {
                // UBLK_IO_RES_ABORT (-ENODEV): the device is stopping; this tag is done.
                live -= 1;
                continue;
            }
            // SAFETY: the driver wrote descriptor `tag` before completing its fetch, and the
            // mapping holds `depth` descriptors.
            let raw =
                unsafe { std::slice::from_raw_parts(descs.ptr.add(tag * desc_len), desc_len) };
            let d = IoDesc::read_from_bytes(raw).unwrap_or_default();
            let io = Io {
                tag,
                op: d.op(),
                fua: d.fua(),
                off: d.start_sector << 9,
                len: (d.nr_sectors as usize) << 9,
            };
            let result = if io.len > IO_BUF_BYTES as usize {
                Some(-libc::EINVAL)
            } else {
                queue.serve(io, &lane)
            };
            if let Some(result) = result {
                push(&mut ring, IO_COMMIT_AND_FETCH_REQ, tag, result)?;
            }
        }
        if woken {
            let finished = std::mem::take(&mut *queue.finished.tags.lock());
            for (tag, result) in finished {
                push(&mut ring, IO_COMMIT_AND_FETCH_REQ, tag, result)?;
            }
            arm_wake(&mut ring, &mut wake_buf)?;
        }
        // Before the kernel hears of these completions, the upper layer's queued records reach
        // the kernel too: a restarted lsmd (recovery) then sees every write it acknowledged.
        if let Err(e) = export.image.settle() {
            export.failed_request(&e);
            tracing::warn!(export = %export.name, error = %e, "upper layer log write failed");
        }
    }
    // Every tag is done, so no task of this queue is left on the pool.
    lane.drain();
    Ok(())
}
