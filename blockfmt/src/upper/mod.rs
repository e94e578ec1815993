//! The writable upper layer (FORMAT.md §3): an append-only data file and an append-only,
//! checksummed index log in one directory. Writes are acknowledged once in the page cache and
//! durable after `flush`; reopening after a crash keeps exactly a prefix of the acknowledged
//! operations that includes every flushed one.
//!
//! Failure contract (README "Guarantees"):
//! - A write that fails leaves the layer exactly as before it (its record is not queued, its
//!   bytes are past the end), so ENOSPC is an ordinary error and writes succeed again once space
//!   is freed. Log space for the next records is reserved (`fallocate`) before a write touches
//!   the data file, so a write cannot land its bytes and then fail to log them.
//! - A failed sync (`fdatasync` of either file), or a failure that leaves bytes on disk the log
//!   does not describe, is sticky: every later write and flush returns [`Error::Failed`] until
//!   the layer is reopened and recovered. The kernel may have dropped the dirty pages a failed
//!   sync was writing, so a retry that "succeeds" would write a flush mark over lost data.
//! - One writer: opening for writing takes an exclusive `flock` (see `lock.rs`); read-only opens
//!   change nothing on disk.
//! - The files are bounded by the live data: compaction (see `compact.rs`) rewrites them when
//!   the waste passes the [`CompactionPolicy`]. It copies while writes go on and holds the lock
//!   only for its last, small round; a host with threads of its own (lsmd) runs it beside the
//!   writers ([`UpperLayer::set_background_compaction`]), otherwise the write that finds it due
//!   runs it.
//!
//! Concurrency: all methods take `&self`. Writers append under the state's write lock; readers
//! take a snapshot (map pieces plus the files they point into) under the read lock and read
//! without it; syncs run without the lock.

mod compact;
mod defrag;
mod lock;
mod log;
mod rangemap;
mod recover;
mod space;

pub use compact::CompactionPolicy;
pub use defrag::{DefragOutcome, DefragPolicy, DefragReport, DEFRAG_MAX_RANGE};
pub use lock::LOCK_FILE;
pub use log::{
    data_alignment, reuses_space, FileHeader, Record, RecordKind, FILE_HEADER_LEN, RECORD_LEN,
    UPPER_VERSION,
};
pub use rangemap::{RangeMap, UpperTarget};

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, Result};
use crate::stack::{LoadTask, ParallelLoads};
use log::{DATA_MAGIC, LOG_MAGIC};
use space::{DataSpace, ReadEpoch};

/// File names inside an upper layer directory.
pub const DATA_FILE: &str = "data";
/// See [`DATA_FILE`].
pub const LOG_FILE: &str = "index.log";
/// The next generation's data file while a compaction writes it.
pub const COMPACT_DATA_FILE: &str = "data.compact";
/// The next generation's log while a compaction writes it.
pub const COMPACT_LOG_FILE: &str = "index.log.compact";

/// What recovery found when an upper layer was opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Operations (write, zeroes, trim) replayed.
    pub replayed: u64,
    /// Log bytes dropped from a torn tail.
    pub log_bytes_dropped: u64,
    /// Data bytes dropped from a torn tail.
    pub data_bytes_dropped: u64,
}

/// Sizes and state, for metrics and status.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpperStats {
    /// Bytes in the data file.
    pub data_file_bytes: u64,
    /// Bytes in the index log.
    pub log_bytes: u64,
    /// Disk bytes whose latest write is data in the data file.
    pub live_bytes: u64,
    /// Dead bytes in the data file that new writes may take (version 3).
    pub free_bytes: u64,
    /// Compactions since open.
    pub compactions: u64,
    /// Checkpoints since open: dead space freed by syncing a flush mark instead of a copy.
    pub checkpoints: u64,
    /// Flushes since open that made the data durable with one device flush (every write they
    /// covered went into reused space; see [`UpperLayer::set_data_writeback`]).
    pub single_sync_flushes: u64,
    /// Fragmented ranges rewritten in one piece since open (see `defrag.rs`).
    pub defrags: u64,
    /// Bytes those rewrites wrote.
    pub defrag_bytes: u64,
    /// Why the layer refuses writes and flushes, if it does.
    pub failed: Option<String>,
}

/// Log records kept in memory before one `pwrite` takes them all. Unflushed records may be lost
/// in a crash anyway; the buffer only ever drops a suffix of them, so recovery still finds a
/// prefix of the acknowledged operations.
const PENDING_RECORDS: usize = 64;

/// A compaction round that finds no more than this many bytes written meanwhile is the last:
/// it copies them under the lock (writes wait for that copy and two small syncs).
const LAST_ROUND_BYTES: u64 = 4 << 20;
/// Rounds before the last one copies whatever is left under the lock (a writer outrunning the
/// copy cannot keep compaction from ending).
const MAX_COMPACTION_ROUNDS: u32 = 8;

/// Data bytes a compaction round copies between two looks at what was written meanwhile.
const COMPACTION_BATCH: u64 = 4 << 20;
/// A compaction round syncs the new files after about this many bytes.
const COMPACTION_SYNC_EVERY: u64 = 64 << 20;

/// Log space reserved ahead of the records, so appending one never runs out of space.
const LOG_RESERVE: u64 = 256 * 1024;

/// One generation of the layer's two files (compaction replaces both).
pub(crate) struct Files {
    data: File,
    log: File,
    /// Alignment of each write's bytes in `data` (format version 2: 4096; 1: none).
    align: u64,
    /// Format version of both files.
    version: u16,
}

/// Syncs one of the layer's files. The failpoints (`--features failpoints`) stand for the
/// one fault a test cannot cause for real: a failing `fdatasync`.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
pub(crate) fn sync_data(f: &File, which: &str) -> io::Result<()> {
    fail::fail_point!(
        if which.starts_with(DATA_FILE) {
            "upper-sync-data"
        } else {
            "upper-sync-log"
        },
        |_| Err(io::Error::from_raw_os_error(5))
    );
    f.sync_data()
}

/// Writes `buf` at `at` in one of the layer's files; the failpoint `point` stands for a write
/// failing with ENOSPC at an exact record.
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn pwrite(f: &File, buf: &[u8], at: u64, point: &str) -> io::Result<()> {
    fail::fail_point!(point, |_| Err(io::Error::from_raw_os_error(28)));
    f.write_all_at(buf, at)
}

/// Writes a file's dirty pages back without a device cache flush and without the file's
/// metadata, which the host provides (blockfmt has no `unsafe`); see
/// [`UpperLayer::set_data_writeback`]. With [`Writeback::Wait`]: `sync_file_range(WAIT_BEFORE |
/// WRITE | WAIT_AFTER)`, the pages' writes have completed when it returns; with
/// [`Writeback::Start`]: `sync_file_range(WRITE)`, the writes are only started.
pub type DataWriteback = Arc<dyn Fn(&File, Writeback) -> io::Result<()> + Send + Sync>;

/// How far a [`DataWriteback`] goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Writeback {
    /// Start writing the dirty pages back; return without waiting.
    Start,
    /// Write every dirty page back and wait until the writes have completed.
    Wait,
}

/// `statfs` magic of ext2, ext3 and ext4 (one number for all three).
const EXT_SUPER_MAGIC: i64 = 0xEF53;

/// True when the filesystem holding `f` writes an overwrite of a file's allocated blocks back
/// in place, with no metadata of its own: ext2/3/4 (no copy-on-write, no reflinks) with blocks of
/// at least 4096 bytes (so every block of a slot holds written bytes and is allocated, FORMAT.md
/// §3.1). The single-sync FLUSH relies on it; other filesystems (btrfs, XFS with its reflinks,
/// NFS, ...) keep the two `fdatasync`s.
#[allow(clippy::useless_conversion)] // `f_type` is `i64` here, other integers on other targets
pub fn overwrites_in_place(f: &File) -> bool {
    rustix::fs::fstatfs(f).is_ok_and(|s| {
        i64::try_from(s.f_type).is_ok_and(|t| t == EXT_SUPER_MAGIC)
            && u64::try_from(s.f_bsize).is_ok_and(|b| b >= 4096)
    })
}

/// Writes back the data file's pages through the host's [`DataWriteback`]; the failpoint
/// `upper-writeback-data` stands for it failing (a writeback error of the data file).
#[cfg_attr(not(feature = "failpoints"), allow(unused_variables))]
fn write_back(wb: &DataWriteback, f: &File) -> io::Result<()> {
    fail::fail_point!("upper-writeback-data", |_| Err(
        io::Error::from_raw_os_error(5)
    ));
    wb(f, Writeback::Wait)
}

/// A round of [`UpperLayer::flush`] in flight: ends it (and wakes the flushes waiting) when
/// dropped, also when the round panicked, so no later flush waits forever.
struct FlushRound<'a>(&'a UpperLayer);

impl Drop for FlushRound<'_> {
    fn drop(&mut self) {
        *self.0.flushing.lock() = false;
        self.0.flush_done.notify_all();
    }
}

/// Makes renames and creations in `dir` durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

struct State {
    files: Arc<Files>,
    map: RangeMap,
    seq: u64,
    /// Where the next record goes in the log (pending records included).
    log_len: u64,
    /// Log bytes allocated (reserved); `u64::MAX` where the filesystem cannot reserve.
    log_reserved: u64,
    /// Encoded records not yet written; they belong at `log_len - pending.len()`.
    pending: Vec<u8>,
    /// End of the last appended write's bytes in `data`.
    data_len: u64,
    /// `seq` of the last write, zeroes or trim record.
    last_op: u64,
    /// Records up to this `seq` are durable.
    durable_seq: u64,
    /// Bumped by each compaction (a flush that began before one has nothing left to do).
    generation: u64,
    compactions: u64,
    /// Checkpoints (see [`UpperLayer::reclaim`]) since open.
    checkpoints: u64,
    /// Files may grow to this size before the next compaction check.
    next_compaction_check: u64,
    /// Set once a failure may have lost acknowledged bytes: sticky until reopened.
    failed: Option<String>,
    /// While a compaction copies without the lock: the disk ranges written since its current
    /// round began (the next round copies them again).
    compacting: Option<RangeMap>,
    /// Slots of `data`, dead ones and free ones (version 3 reuses free space; see `space.rs`).
    space: DataSpace,
    /// Held by every read snapshot taken since the latest flush began (see `space.rs`).
    epoch: Arc<ReadEpoch>,
    /// Highest `covered` of the flush marks queued so far; once a flush has written and synced
    /// the log, marks up to here are on disk and synced.
    marks_queued: u64,
    /// `data_len` when the latest successful `fdatasync(data)` of these files began (`None`:
    /// not known, e.g. after recovery). While `data_len` is still that, every write since went
    /// into reused space inside the synced file: no size or allocation change to sync.
    data_synced_len: Option<u64>,
    /// Flushes that synced with one device flush (see [`UpperLayer::set_data_writeback`]).
    single_sync_flushes: u64,
    /// Ranges and bytes defragmenting rewrites wrote since open (see `defrag.rs`).
    defrags: u64,
    defrag_bytes: u64,
}

impl State {
    fn new(files: Files, map: RangeMap, seq: u64, log_len: u64, data_len: u64) -> State {
        State {
            files: Arc::new(files),
            map,
            seq,
            log_len,
            log_reserved: 0,
            pending: Vec::with_capacity(PENDING_RECORDS * RECORD_LEN),
            data_len,
            last_op: seq,
            durable_seq: seq,
            generation: 0,
            compactions: 0,
            checkpoints: 0,
            next_compaction_check: 0,
            failed: None,
            compacting: None,
            space: DataSpace::default(),
            epoch: Arc::default(),
            marks_queued: 0,
            data_synced_len: None,
            single_sync_flushes: 0,
            defrags: 0,
            defrag_bytes: 0,
        }
    }
}

/// The writable upper layer; see the module docs. All methods take `&self` and are thread-safe.
pub struct UpperLayer {
    dir: PathBuf,
    logical_size: u64,
    /// Held while open for writing; `None` for a read-only open.
    lock: Option<lock::WriterLock>,
    policy: RwLock<CompactionPolicy>,
    state: RwLock<State>,
    /// Held by the compaction running (one at a time).
    compaction: Mutex<()>,
    /// Set by [`Self::set_background_compaction`]: writes only ask for compaction.
    background: AtomicBool,
    /// A compaction is due and nobody has taken the request yet.
    compaction_asked: AtomicBool,
    /// A compaction was asked for and has not finished: writes ask no more.
    compaction_queued: AtomicBool,
    /// The host's threads for a flush's two syncs ([`Self::set_parallel_syncs`]).
    syncs: OnceLock<Arc<dyn ParallelLoads>>,
    /// The host's writeback without a device flush, when the filesystem overwrites in place
    /// ([`Self::set_data_writeback`]).
    writeback: OnceLock<DataWriteback>,
    /// Group commit: true while one flush's syncs run ([`Self::flush`]); the flushes that
    /// arrive meanwhile wait on `flush_done` and are answered by that round when it covered
    /// them, else one of them runs the next round for all.
    flushing: Mutex<bool>,
    flush_done: Condvar,
    /// Fragmented ranges reads found, waiting for the host to rewrite them (`defrag.rs`).
    defrag: defrag::DefragQueue,
}

impl std::fmt::Debug for UpperLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpperLayer")
            .field("dir", &self.dir)
            .finish()
    }
}

fn name(dir: &Path) -> String {
    format!("upper layer {}", dir.display())
}

/// Bytes the files of a compacted layer with this map would take.
fn live_size(map: &RangeMap) -> u64 {
    map.data_bytes() + (map.len() as u64 + 1) * RECORD_LEN as u64 + 2 * FILE_HEADER_LEN as u64
}

/// What a read sees of the upper layer: the pieces of a range (or every range) and the data
/// file they point into, which stays valid even if a compaction replaces the layer's files.
pub struct UpperView<T> {
    /// `(disk offset, length, what is there)`, in order.
    pub pieces: Vec<(u64, u64, T)>,
    files: Arc<Files>,
    name: String,
    /// The files' generation (bumped by each compaction) when the snapshot was taken.
    generation: u64,
    /// Keeps the dead space these pieces may point at from being reused while they are read.
    _epoch: Arc<ReadEpoch>,
}

impl<T> UpperView<T> {
    /// Reads bytes a piece points at (`UpperTarget::Data`'s `file_offset`).
    pub fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.files
            .data
            .read_exact_at(buf, file_offset)
            .map_err(|e| Error::io(format!("{}/{DATA_FILE}", self.name), file_offset, e))
    }
}

impl UpperLayer {
    /// Opens the upper layer in `dir` for writing, creating an empty one if the directory holds
    /// none. An existing layer must belong to a disk of `logical_size` bytes. Fails with
    /// [`Error::Locked`] while another process has it open for writing.
    pub fn open(dir: &Path, logical_size: u64) -> Result<(UpperLayer, Recovery)> {
        if !dir.join(LOG_FILE).exists() && !dir.join(DATA_FILE).exists() {
            return Ok((UpperLayer::create(dir, logical_size)?, Recovery::default()));
        }
        let lock = lock::WriterLock::acquire(dir, &name(dir))?;
        UpperLayer::recover(dir, logical_size, Some(lock))
    }

    /// Opens an existing upper layer to read it; changes nothing on disk (a torn tail is
    /// skipped, not cut) and takes no lock, so it works beside a writer (as a snapshot).
    pub fn open_read_only(dir: &Path, logical_size: u64) -> Result<(UpperLayer, Recovery)> {
        UpperLayer::recover(dir, logical_size, None)
    }

    /// Creates an empty upper layer; fails if one exists there.
    pub fn create(dir: &Path, logical_size: u64) -> Result<UpperLayer> {
        let n = name(dir);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(&n, 0, e))?;
        let lock = lock::WriterLock::acquire(dir, &n)?;
        let pair_id: [u8; 16] = rand::random();
        let open_new = |f: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(dir.join(f))
                .map_err(|e| Error::io(format!("{n}/{f}"), 0, e))
        };
        let data = open_new(DATA_FILE)?;
        let log = open_new(LOG_FILE)?;
        let put = |f: &File, b: &[u8], which: &str| {
            f.write_all_at(b, 0)
                .and_then(|_| f.sync_all())
                .map_err(|e| Error::io(format!("{n}/{which}"), 0, e))
        };
        let header = |logical_size| FileHeader {
            version: UPPER_VERSION,
            pair_id,
            logical_size,
        };
        put(&data, &header(0).encode(DATA_MAGIC), DATA_FILE)?;
        put(&log, &header(logical_size).encode(LOG_MAGIC), LOG_FILE)?;
        sync_dir(dir).map_err(|e| Error::io(&n, 0, e))?;
        let files = Files {
            data,
            log,
            align: data_alignment(UPPER_VERSION),
            version: UPPER_VERSION,
        };
        let hdr = FILE_HEADER_LEN as u64;
        Ok(UpperLayer {
            dir: dir.to_path_buf(),
            logical_size,
            lock: Some(lock),
            policy: RwLock::new(CompactionPolicy::default()),
            state: RwLock::new(State::new(files, RangeMap::default(), 0, hdr, hdr)),
            compaction: Mutex::new(()),
            background: AtomicBool::new(false),
            compaction_asked: AtomicBool::new(false),
            compaction_queued: AtomicBool::new(false),
            syncs: OnceLock::new(),
            writeback: OnceLock::new(),
            flushing: Mutex::new(false),
            flush_done: Condvar::new(),
            defrag: defrag::DefragQueue::default(),
        })
    }

    fn recover(
        dir: &Path,
        logical_size: u64,
        lock: Option<lock::WriterLock>,
    ) -> Result<(UpperLayer, Recovery)> {
        let r = recover::recover(dir, logical_size, lock.is_some())?;
        let mut st = State::new(r.files, r.map, r.seq, r.log_len, r.data_len);
        // The recovered tail was not synced by this process: only what a flush mark covers is
        // durable, so the first flush syncs the rest.
        st.durable_seq = r.flushed;
        st.last_op = r.last_op;
        // Slots the recovered records killed are freed once the first flush has synced the log
        // holding the mark that covers their killers.
        st.space = r.space;
        st.marks_queued = r.flushed;
        let up = UpperLayer {
            dir: dir.to_path_buf(),
            logical_size,
            lock,
            policy: RwLock::new(CompactionPolicy::default()),
            state: RwLock::new(st),
            compaction: Mutex::new(()),
            background: AtomicBool::new(false),
            compaction_asked: AtomicBool::new(false),
            compaction_queued: AtomicBool::new(false),
            syncs: OnceLock::new(),
            writeback: OnceLock::new(),
            flushing: Mutex::new(false),
            flush_done: Condvar::new(),
            defrag: defrag::DefragQueue::default(),
        };
        Ok((up, r.report))
    }

    /// The directory holding the layer.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Disk size.
    pub fn logical_size(&self) -> u64 {
        self.logical_size
    }
    /// True when opened with [`Self::open_read_only`].
    pub fn read_only(&self) -> bool {
        self.lock.is_none()
    }

    /// Sets when compaction runs (default: [`CompactionPolicy::default`]).
    pub fn set_compaction(&self, policy: CompactionPolicy) {
        *self.policy.write() = policy;
        self.state.write().next_compaction_check = 0;
    }

    /// With `on`, a write or flush that finds compaction due only asks for it
    /// ([`Self::take_compaction_request`]); the host runs [`Self::compact`] on a thread of its
    /// own, so no write waits for the copy. Off (the default), the write that finds it due runs
    /// it (blockfmt starts no threads).
    pub fn set_background_compaction(&self, on: bool) {
        self.background.store(on, Ordering::Relaxed);
    }

    /// True once per compaction a write or flush found due (with background compaction on):
    /// the caller should run [`Self::compact`] off the request path.
    pub fn take_compaction_request(&self) -> bool {
        self.compaction_asked.load(Ordering::Relaxed)
            && self.compaction_asked.swap(false, Ordering::AcqRel)
    }

    fn check(&self, off: u64, len: u64) -> Result<()> {
        match off.checked_add(len) {
            Some(e) if e <= self.logical_size && len <= u32::MAX as u64 => Ok(()),
            _ => Err(Error::OutOfRange {
                offset: off,
                len,
                size: self.logical_size,
            }),
        }
    }

    /// Refuses changes to a read-only or failed layer.
    fn usable(&self, st: &State) -> Result<()> {
        if self.lock.is_none() {
            return Err(Error::ReadOnly);
        }
        match &st.failed {
            Some(why) => Err(Error::Failed {
                layer: name(&self.dir),
                detail: why.clone(),
            }),
            None => Ok(()),
        }
    }

    /// Makes the layer refuse every later write and flush (see the module docs); returns the
    /// error to report now.
    fn fail(&self, st: &mut State, e: Error) -> Error {
        if st.failed.is_none() {
            tracing::error!(layer = %self.dir.display(), error = %e,
                "upper layer failed: refusing writes and flushes until reopened");
            st.failed = Some(e.to_string());
        }
        e
    }

    /// Fails the layer unless `e` is running out of space (which loses nothing).
    fn fail_unless_no_space(&self, st: &mut State, e: Error) -> Error {
        if e.is_no_space() {
            e
        } else {
            self.fail(st, e)
        }
    }

    /// Reserves log space for `records` more records (plus a flush mark) past the queue.
    fn reserve_log(&self, st: &mut State, records: u64) -> Result<()> {
        let need = st.log_len + (records + 1) * RECORD_LEN as u64;
        if need <= st.log_reserved {
            return Ok(());
        }
        let to = need.next_multiple_of(LOG_RESERVE);
        let from = st.log_len;
        match rustix::fs::fallocate(
            &st.files.log,
            rustix::fs::FallocateFlags::KEEP_SIZE,
            from,
            to - from,
        ) {
            Ok(()) => st.log_reserved = to,
            // The filesystem cannot reserve: appends may then fail, and are undone.
            Err(rustix::io::Errno::OPNOTSUPP) => st.log_reserved = u64::MAX,
            Err(e) => {
                return Err(Error::io(
                    format!("{}/{LOG_FILE}", name(&self.dir)),
                    from,
                    e.into(),
                ))
            }
        }
        Ok(())
    }

    /// Queues a record; writes the queue out when it is full. On error the record is not
    /// queued (earlier queued records stay: they are acknowledged and still correct).
    fn append(&self, st: &mut State, mut r: Record) -> Result<()> {
        r.seq = st.seq + 1;
        st.pending.extend_from_slice(&r.encode());
        st.seq += 1;
        let prev_last_op = st.last_op;
        if r.kind != RecordKind::FlushMark {
            st.last_op = st.seq;
        }
        st.log_len += RECORD_LEN as u64;
        if st.pending.len() >= PENDING_RECORDS * RECORD_LEN {
            if let Err(e) = self.write_pending(st) {
                st.pending.truncate(st.pending.len() - RECORD_LEN);
                st.seq -= 1;
                st.log_len -= RECORD_LEN as u64;
                st.last_op = prev_last_op;
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes queued records to the log (not synced). On error they stay queued; any error but
    /// running out of space fails the layer.
    fn write_pending(&self, st: &mut State) -> Result<()> {
        if st.pending.is_empty() {
            return Ok(());
        }
        let at = st.log_len - st.pending.len() as u64;
        if let Err(e) = pwrite(&st.files.log, &st.pending, at, "upper-log-write") {
            let e = Error::io(format!("{}/{LOG_FILE}", name(&self.dir)), at, e);
            return Err(self.fail_unless_no_space(st, e));
        }
        st.pending.clear();
        Ok(())
    }

    /// Hands queued log records to the kernel, so that acknowledged writes survive a crash of
    /// this process (not of the machine — that takes [`Self::flush`]). Frontends call it when
    /// they go idle.
    pub fn settle(&self) -> Result<()> {
        let mut st = self.state.write();
        if st.failed.is_some() {
            return self.usable(&st);
        }
        self.write_pending(&mut st)
    }

    /// Appends a write of `data` at `off`. On error the layer is as before the call (or, if
    /// bytes it cannot undo reached the disk, failed — see the module docs).
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check(off, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.state.write();
        self.usable(&st)?;
        let len = data.len() as u64;
        self.write_records(&mut st, off, data, &[len])?;
        self.defrag.note_client_write(len);
        let due = self.compaction_due(&mut st);
        drop(st);
        self.compact_if(due);
        Ok(())
    }

    /// Writes `data` at `off` as ordinary write records, one per length in `records` (they add
    /// up to `data.len()`; all but the last are multiples of 4096, so each record's bytes start
    /// a slot of their own), whose bytes lie back to back in the data file: one `pwrite`, then
    /// the records in disk order. On error, records already queued stay (they are whole and
    /// correct, a prefix of the write) and the layer is otherwise as before (or failed — see
    /// the module docs).
    fn write_records(&self, st: &mut State, off: u64, data: &[u8], records: &[u64]) -> Result<()> {
        self.reserve_log(st, records.len() as u64)?;
        let len = data.len() as u64;
        let align = st.files.align;
        // Version 3: dead space whose killers a synced flush mark covers (see `space.rs`).
        // Nothing is ever rewritten in place: a record whose bytes changed under it fails its
        // crc32c, and until a mark over it is on disk recovery would stop there, losing
        // acknowledged (even flushed: the mark follows the flush) writes after it.
        let reused = if reuses_space(st.files.version) {
            let limit = st.data_len;
            st.space.take(len, limit)
        } else {
            None
        };
        let at = reused.unwrap_or_else(|| st.data_len.next_multiple_of(align));
        let res = pwrite(&st.files.data, data, at, "upper-data-write");
        if let Err(e) = res {
            let e = Error::io(format!("{}/{DATA_FILE}", name(&self.dir)), at, e);
            // Appended bytes past the end are garbage no record names (the next write
            // overwrites them), and so are bytes in reused dead space (no replay needs them:
            // later flushed records replace the dead record they belonged to).
            if reused.is_some() {
                st.space.untake(at, len);
            }
            return Err(self.fail_unless_no_space(st, e));
        }
        let mut done = 0u64;
        for &rl in records {
            let bytes = &data[done as usize..(done + rl) as usize];
            let r = Record {
                kind: RecordKind::Write,
                seq: 0,
                offset: off + done,
                len: rl as u32,
                data_crc32c: crc32c::crc32c(bytes),
                data_offset: at + done,
            };
            if let Err(e) = self.append(st, r) {
                // The bytes from here on are garbage no record names, as above.
                if reused.is_some() {
                    st.space.untake(at + done, len - done);
                }
                return Err(e);
            }
            if reused.is_none() {
                st.data_len = at + done + rl;
            }
            self.replace(
                st,
                off + done,
                rl,
                UpperTarget::Data {
                    file_offset: at + done,
                },
            );
            st.space.add_slot(at + done, rl);
            if let Some(changed) = st.compacting.as_mut() {
                changed.insert(off + done, rl, UpperTarget::Zero);
            }
            done += rl;
        }
        Ok(())
    }

    /// Records zeros over `[off, off + len)`; `trim` records a discard (also read as zeros).
    pub fn write_zeroes(&self, off: u64, len: u64, trim: bool) -> Result<()> {
        self.check(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut st = self.state.write();
        self.usable(&st)?;
        self.reserve_log(&mut st, 1)?;
        let (kind, target) = if trim {
            (RecordKind::Trim, UpperTarget::Trimmed)
        } else {
            (RecordKind::WriteZeroes, UpperTarget::Zero)
        };
        let r = Record {
            kind,
            seq: 0,
            offset: off,
            len: len as u32,
            data_crc32c: 0,
            data_offset: 0,
        };
        self.append(&mut st, r)?;
        self.replace(&mut st, off, len, target);
        if let Some(changed) = st.compacting.as_mut() {
            changed.insert(off, len, UpperTarget::Zero);
        }
        let due = self.compaction_due(&mut st);
        drop(st);
        self.compact_if(due);
        Ok(())
    }

    /// Points `[off, off + len)` at `t` in the map; the data bytes it pointed at before are
    /// released from their slots, killed by the record just appended (`st.seq`).
    fn replace(&self, st: &mut State, off: u64, len: u64, t: UpperTarget) {
        if reuses_space(st.files.version) {
            let (seq, epoch) = (st.seq, Arc::downgrade(&st.epoch));
            for (_, l, was) in st.map.pieces(off, len) {
                if let Some(UpperTarget::Data { file_offset }) = was {
                    st.space.release(file_offset, l, seq, &epoch);
                }
            }
        }
        st.map.insert(off, len, t);
    }

    /// Makes every operation acknowledged before the call durable. Version 2: write the queued
    /// records, then `fdatasync` both files — at once, on the host's threads when it lent them
    /// ([`Self::set_parallel_syncs`]) — and only then queue a flush mark naming the last record
    /// covered. The mark reaches the log with the next records and is synced by the next flush:
    /// it is never on disk before what it covers, and a crash before it is there loses nothing
    /// (the covered records and their bytes are durable and pass recovery's checks). One sync
    /// wait per FLUSH instead of two in a row. Version 1 marks claim every record before them,
    /// so version 1 layers keep the ordered path (see [`Self::flush_ordered`]).
    /// The syncs run without the lock, so reads and writes go on meanwhile; writes that land
    /// during them are not claimed by this flush. A failed sync fails the layer (sticky).
    ///
    /// Group commit: one round of syncs runs at a time. A flush that arrives while a round is
    /// in flight waits for it and returns as soon as a finished round covered every operation
    /// acknowledged before the flush began (the `last_op` it saw); otherwise it runs the next
    /// round, which covers every flush waiting with it. A flush storm (fio `--fsync=32` at
    /// queue depth 32 sends one FLUSH per ~2 writes) then costs one pair of syncs per round,
    /// not per FLUSH; a failed round fails the layer and every waiter sees it (sticky).
    pub fn flush(&self) -> Result<()> {
        let target = {
            let st = self.state.read();
            if self.lock.is_none() {
                return Ok(());
            }
            self.usable(&st)?;
            if st.durable_seq >= st.last_op {
                return Ok(());
            }
            st.last_op
        };
        let mut busy = self.flushing.lock();
        while *busy {
            self.flush_done.wait(&mut busy);
            let st = self.state.read();
            self.usable(&st)?;
            if st.durable_seq >= target {
                return Ok(());
            }
        }
        *busy = true;
        drop(busy);
        let round = FlushRound(self);
        let ordered = self.state.read().files.align == 1;
        let due = if ordered {
            self.flush_ordered()
        } else {
            self.flush_round()
        };
        drop(round);
        self.compact_if(due?);
        Ok(())
    }

    /// One round of [`Self::flush`] (the caller holds the round): syncs what is acknowledged
    /// now. Returns whether a compaction is due.
    fn flush_round(&self) -> Result<bool> {
        let n = name(&self.dir);
        let (covered, files, generation, marks_in_log, data_len, single) = {
            let mut st = self.state.write();
            self.usable(&st)?;
            if st.durable_seq >= st.last_op {
                return Ok(false);
            }
            self.reserve_log(&mut st, 0)?;
            self.write_pending(&mut st)?;
            // Snapshots taken from now on do not see what died before: a new read epoch.
            st.epoch = st.epoch.advance();
            // One device flush when nothing changed the data file's size or allocation since
            // its last full sync (every write since went into reused space inside it).
            let single = self
                .writeback
                .get()
                .filter(|_| st.data_synced_len == Some(st.data_len));
            // Every mark queued so far is in the log now: the syncs below make them durable.
            let marks = st.marks_queued;
            (
                st.seq,
                st.files.clone(),
                st.generation,
                marks,
                st.data_len,
                single,
            )
        };
        let (data_synced, log_synced) = match single {
            Some(wb) => self.sync_single(wb, &files),
            None => self.sync_both(&files),
        };
        let mut st = self.state.write();
        for (res, which) in [(data_synced, DATA_FILE), (log_synced, LOG_FILE)] {
            if let Err(e) = res {
                let e = Error::io(format!("{n}/{which}"), 0, e);
                return Err(self.fail(&mut st, e));
            }
        }
        // Another flush may have failed meanwhile: never write a mark over lost data.
        self.usable(&st)?;
        if st.generation == generation {
            st.durable_seq = st.durable_seq.max(covered);
            if single.is_some() {
                st.single_sync_flushes += 1;
            } else {
                st.data_synced_len = Some(st.data_synced_len.unwrap_or(0).max(data_len));
            }
            st.space.settle(marks_in_log);
            self.reserve_log(&mut st, 0)?;
            let mark = Record {
                kind: RecordKind::FlushMark,
                seq: 0,
                offset: covered,
                len: 0,
                data_crc32c: 0,
                data_offset: 0,
            };
            self.append(&mut st, mark)?;
            st.marks_queued = st.marks_queued.max(covered);
        } // else a compaction synced everything this flush covers, and marked it.
        Ok(self.compaction_due(&mut st))
    }

    /// Lends the host's threads to [`Self::flush`], so the two files' `fdatasync`s wait at
    /// once (blockfmt starts no threads; without this they run one after the other).
    pub fn set_parallel_syncs(&self, threads: Arc<dyn ParallelLoads>) {
        let _ = self.syncs.set(threads);
    }

    /// `fdatasync` of `data` and of `index.log`, at once when the host lent its threads.
    fn sync_both(&self, files: &Arc<Files>) -> (io::Result<()>, io::Result<()>) {
        let Some(threads) = self.syncs.get() else {
            return (
                sync_data(&files.data, DATA_FILE),
                sync_data(&files.log, LOG_FILE),
            );
        };
        type Slot = Arc<Mutex<Option<io::Result<()>>>>;
        let (data_res, log_res): (Slot, Slot) = Default::default();
        let task = |slot: &Slot, log: bool| -> LoadTask {
            let (slot, files) = (slot.clone(), files.clone());
            Box::new(move || {
                let r = if log {
                    sync_data(&files.log, LOG_FILE)
                } else {
                    sync_data(&files.data, DATA_FILE)
                };
                *slot.lock() = Some(r);
            })
        };
        threads.run_all(vec![task(&data_res, false), task(&log_res, true)]);
        // A task that panicked left its slot empty: the sync's outcome is unknown, so failed.
        let take = |slot: &Slot| {
            slot.lock()
                .take()
                .unwrap_or_else(|| Err(io::Error::other("fdatasync task panicked")))
        };
        (take(&data_res), take(&log_res))
    }

    /// The single-sync FLUSH (FORMAT.md §3.4): the data file's pages are written back and waited
    /// for *first* — no metadata to go with them, as every write since its last full sync
    /// overwrote allocated blocks in place — and only then `fdatasync(index.log)`, whose device
    /// cache flush (ext2/3/4 always send one) makes those completed data writes durable with the
    /// log's. A failed writeback is reported as the data file's failure and the log is not
    /// synced; either failure fails the flush and the layer.
    fn sync_single(
        &self,
        wb: &DataWriteback,
        files: &Arc<Files>,
    ) -> (io::Result<()>, io::Result<()>) {
        // The log's pages go to the device while the data's are waited for, so the log's
        // `fdatasync` below finds them written or in flight and mostly waits for its device
        // flush: one round trip fewer per FLUSH. Starting I/O orders nothing; an error here
        // fails the log's sync (the `fdatasync` would report it as well).
        if let Err(e) = wb(&files.log, Writeback::Start) {
            return (Ok(()), Err(e));
        }
        if let Err(e) = write_back(wb, &files.data) {
            return (Err(e), Ok(()));
        }
        (Ok(()), sync_data(&files.log, LOG_FILE))
    }

    /// Lends the host's writeback without a device flush (`sync_file_range`) to
    /// [`Self::flush`]. When the filesystem overwrites in place ([`overwrites_in_place`]), a
    /// FLUSH none of whose writes changed the data file's size or allocation (all went into
    /// reused space, version 3) then costs one device flush instead of two: the data file's
    /// writeback, then the log's `fdatasync`. Returns whether that path is on (off on other
    /// filesystems, where a FLUSH keeps its two `fdatasync`s). Compaction keeps the directory,
    /// so the answer holds for later generations of the files too.
    pub fn set_data_writeback(&self, wb: DataWriteback) -> bool {
        if !overwrites_in_place(&self.state.read().files.data) {
            return false;
        }
        self.writeback.set(wb).is_ok()
    }

    /// FLUSH of a version 1 layer, whose marks claim every record before them:
    /// `fdatasync(data)`, a flush mark, `fdatasync(index.log)`, in that order.
    /// Returns whether a compaction is due; runs as a round of [`Self::flush`].
    fn flush_ordered(&self) -> Result<bool> {
        let n = name(&self.dir);
        let (covered, files, generation) = {
            let mut st = self.state.write();
            self.usable(&st)?;
            if st.durable_seq >= st.last_op {
                return Ok(false);
            }
            self.reserve_log(&mut st, 0)?;
            self.write_pending(&mut st)?;
            (st.seq, st.files.clone(), st.generation)
        };
        let synced = sync_data(&files.data, DATA_FILE);
        {
            let mut st = self.state.write();
            if let Err(e) = synced {
                let e = Error::io(format!("{n}/{DATA_FILE}"), 0, e);
                return Err(self.fail(&mut st, e));
            }
            // Another flush may have failed meanwhile: never write a mark over lost data.
            self.usable(&st)?;
            if st.generation != generation {
                // A compaction synced everything this flush covers.
                return Ok(false);
            }
            self.reserve_log(&mut st, 0)?;
            self.append(
                &mut st,
                Record {
                    kind: RecordKind::FlushMark,
                    seq: 0,
                    offset: 0,
                    len: 0,
                    data_crc32c: 0,
                    data_offset: 0,
                },
            )?;
            if st.last_op > covered {
                // The mark also claims the records that arrived during the sync.
                if let Err(e) = sync_data(&files.data, DATA_FILE) {
                    let e = Error::io(format!("{n}/{DATA_FILE}"), 0, e);
                    return Err(self.fail(&mut st, e));
                }
            }
            self.write_pending(&mut st)?;
        }
        let synced = sync_data(&files.log, LOG_FILE);
        let mut st = self.state.write();
        if let Err(e) = synced {
            let e = Error::io(format!("{n}/{LOG_FILE}"), 0, e);
            return Err(self.fail(&mut st, e));
        }
        if st.generation == generation {
            st.durable_seq = st.durable_seq.max(covered);
        }
        Ok(self.compaction_due(&mut st))
    }

    /// Reclaims the waste a write or flush found due (hosts with background compaction call
    /// this once [`Self::take_compaction_request`] says so). Version 3: when at least half of
    /// it is dead space that only waits for a synced flush mark over the records that killed
    /// it, a *checkpoint* — a flush, then a sync of the log holding its mark — frees that space
    /// for new writes and nothing is copied; otherwise, or when even the free space counted the
    /// files pass twice the policy's ratio, [`Self::compact`].
    pub fn reclaim(&self) -> Result<()> {
        let checkpoint = {
            let st = self.state.read();
            let total = st.data_len + st.log_len;
            let live = live_size(&st.map);
            let excess = total
                .saturating_sub(st.space.free_bytes())
                .saturating_sub(live);
            let dying = st.space.dying_bytes();
            reuses_space(st.files.version)
                && dying > 0
                && dying.saturating_mul(2) >= excess
                && !self.policy.read().doubled().due(total, live)
        };
        if !checkpoint {
            return self.compact();
        }
        let _one = self.compaction.lock();
        // A flush inside must not start another reclaim.
        self.compaction_queued.store(true, Ordering::Release);
        let res = self.flush().and_then(|()| self.sync_marks());
        if res.is_ok() {
            let mut st = self.state.write();
            st.checkpoints += 1;
            st.next_compaction_check = 0;
        }
        self.compaction_queued.store(false, Ordering::Release);
        res
    }

    /// Writes the queued records (flush marks among them) and syncs the log: the marks queued
    /// before are then on disk and synced, so the slots their records killed are free.
    fn sync_marks(&self) -> Result<()> {
        let (files, generation, marks) = {
            let mut st = self.state.write();
            self.usable(&st)?;
            self.write_pending(&mut st)?;
            (st.files.clone(), st.generation, st.marks_queued)
        };
        let synced = sync_data(&files.log, LOG_FILE);
        let mut st = self.state.write();
        if let Err(e) = synced {
            let e = Error::io(format!("{}/{LOG_FILE}", name(&self.dir)), 0, e);
            return Err(self.fail(&mut st, e));
        }
        if st.generation == generation {
            st.space.settle(marks);
        }
        Ok(())
    }

    /// Rewrites the files to hold only the live ranges now, whatever the policy says (see
    /// `compact.rs`); everything acknowledged before the call is durable when it returns.
    /// Reads, writes and flushes go on while it copies; only its last round (the ranges written
    /// during the round before, the syncs and the switch) holds the lock. A failure before the
    /// switch leaves the layer as it was; one during it fails the layer.
    pub fn compact(&self) -> Result<()> {
        let _one = self.compaction.lock();
        let res = self.compact_rounds();
        self.compaction_queued.store(false, Ordering::Release);
        res
    }

    fn compact_rounds(&self) -> Result<()> {
        let (files, mut todo, total) = {
            let mut st = self.state.write();
            self.usable(&st)?;
            st.compacting = Some(RangeMap::default());
            let total = st.data_len + st.log_len;
            (st.files.clone(), st.map.iter().collect::<Vec<_>>(), total)
        };
        let mut gen = match compact::Generation::create(&self.dir, self.logical_size) {
            Ok(g) => g,
            Err(e) => return Err(self.compaction_failed(&mut self.state.write(), e)),
        };
        let mut round = 1;
        loop {
            let copied = self
                .copy_unchanged(&mut gen, &files, &todo)
                .and_then(|()| gen.sync())
                .and_then(|()| self.compaction_round_fault());
            let mut st = self.state.write();
            if let Err(e) = copied.and_then(|()| self.usable(&st)) {
                gen.abandon();
                return Err(self.compaction_failed(&mut st, e));
            }
            let changed = st.compacting.replace(RangeMap::default());
            todo = changed
                .iter()
                .flat_map(|c| c.iter())
                .flat_map(|(off, len, _)| st.map.pieces(off, len))
                .filter_map(|(off, len, t)| t.map(|t| (off, len, t)))
                .collect();
            let bytes: u64 = todo.iter().map(|&(_, len, _)| len).sum();
            if bytes > LAST_ROUND_BYTES && round < MAX_COMPACTION_ROUNDS {
                round += 1;
                continue;
            }
            // The last round, under the lock: nothing changes until the switch.
            st.compacting = None;
            let done = match gen.copy_pieces(&st.files, &todo) {
                Ok(()) => gen.finish(),
                Err(e) => {
                    gen.abandon();
                    Err(compact::CompactError::Before(e))
                }
            };
            return match done {
                Ok(c) => {
                    let to = c.data_len + c.log_len;
                    st.files = Arc::new(c.files);
                    st.map = c.map;
                    st.seq = c.seq;
                    st.log_len = c.log_len;
                    st.log_reserved = 0;
                    st.pending.clear();
                    st.data_len = c.data_len;
                    st.durable_seq = c.seq;
                    st.last_op = c.seq.saturating_sub(1);
                    // The new log's mark covers every record in it and is synced: the slots
                    // later rounds' records killed are free at once.
                    st.space = c.space;
                    st.space.settle(c.seq);
                    st.marks_queued = c.seq;
                    // The compacted data file was synced whole (`finish`).
                    st.data_synced_len = Some(c.data_len);
                    st.generation += 1;
                    st.compactions += 1;
                    st.next_compaction_check = 0;
                    tracing::info!(layer = %self.dir.display(), from = total, to, rounds = round,
                        last_round_bytes = bytes, "upper layer compacted");
                    Ok(())
                }
                Err(compact::CompactError::Before(e)) => Err(self.compaction_failed(&mut st, e)),
                Err(compact::CompactError::During(e)) => Err(self.fail(&mut st, e)),
            };
        }
    }

    /// One unlocked round: copies `todo` in batches, leaving out what was written since the
    /// round began (the next round copies it, as it is then; copying it now would be waste in
    /// the new files), and syncs every few batches so the new file's dirty pages do not pile up
    /// into one long writeback that the writers' flushes would queue behind.
    fn copy_unchanged(
        &self,
        gen: &mut compact::Generation,
        files: &Files,
        todo: &[(u64, u64, UpperTarget)],
    ) -> Result<()> {
        let mut rest = todo;
        let mut unsynced = 0u64;
        while !rest.is_empty() {
            let (mut n, mut bytes) = (0, 0u64);
            while n < rest.len() && bytes < COMPACTION_BATCH {
                if let UpperTarget::Data { .. } = rest[n].2 {
                    bytes += rest[n].1;
                }
                n += 1;
            }
            let (batch, tail) = rest.split_at(n);
            rest = tail;
            let kept: Vec<(u64, u64, UpperTarget)> = {
                let st = self.state.read();
                let Some(changed) = st.compacting.as_ref() else {
                    return Err(Error::Invalid("compaction state lost".into()));
                };
                batch
                    .iter()
                    .flat_map(|&(off, len, t)| {
                        changed
                            .pieces(off, len)
                            .into_iter()
                            .filter(|&(_, _, c)| c.is_none())
                            .map(move |(o, l, _)| (o, l, t.advance(o - off)))
                    })
                    .collect()
            };
            gen.copy_pieces(files, &kept)?;
            unsynced += bytes;
            if unsynced >= COMPACTION_SYNC_EVERY {
                gen.sync()?;
                unsynced = 0;
            }
        }
        Ok(())
    }

    /// The failpoint `upper-compact-round` (`--features failpoints`): a callback there runs
    /// between a round's unlocked copy and its check (tests write meanwhile); `return` stands
    /// for a copy failing midway.
    fn compaction_round_fault(&self) -> Result<()> {
        fail::fail_point!("upper-compact-round", |_| Err(Error::io(
            format!("{}/{COMPACT_DATA_FILE}", name(&self.dir)),
            0,
            io::Error::from_raw_os_error(5)
        )));
        Ok(())
    }

    /// A compaction gave up before the switch: the layer is as it was; try again after more
    /// growth (a failed layer says so itself).
    fn compaction_failed(&self, st: &mut State, e: Error) -> Error {
        st.compacting = None;
        if st.failed.is_none() {
            tracing::warn!(layer = %self.dir.display(), error = %e,
                "upper layer compaction failed; the layer is unchanged");
            let min_waste = self.policy.read().min_waste;
            st.next_compaction_check = st.data_len + st.log_len + min_waste.max(1 << 20);
        }
        e
    }

    /// True when the policy says the files waste too much and no compaction is queued or
    /// running.
    fn compaction_due(&self, st: &mut State) -> bool {
        let total = st.data_len + st.log_len;
        // Free space takes new writes: it is not waste (but see `reclaim`'s hard bound).
        let used = total.saturating_sub(st.space.free_bytes());
        if total < st.next_compaction_check
            || st.failed.is_some()
            || st.compacting.is_some()
            || self.compaction_queued.load(Ordering::Acquire)
        {
            return false;
        }
        let policy = *self.policy.read();
        let live = live_size(&st.map);
        if policy.due(used, live) || policy.doubled().due(total, live) {
            return true;
        }
        // Nothing to do until the files grow by a step (live size changes slowly).
        st.next_compaction_check = total + (policy.min_waste / 8).clamp(4096, 8 << 20);
        false
    }

    /// Runs a due compaction here, or (background compaction) asks the host to. Called without
    /// the state lock; a failure is logged and leaves the layer as it was or failed.
    fn compact_if(&self, due: bool) {
        if !due {
            return;
        }
        if self.background.load(Ordering::Relaxed) {
            if !self.compaction_queued.swap(true, Ordering::AcqRel) {
                self.compaction_asked.store(true, Ordering::Release);
            }
            return;
        }
        // The error is logged (and sticky if the switch failed); the write itself succeeded.
        let _ = self.reclaim();
    }

    /// Pieces of `[off, off + len)`: `None` where the upper layer has nothing (lower shows).
    pub fn pieces(&self, off: u64, len: u64) -> UpperView<Option<UpperTarget>> {
        let st = self.state.read();
        UpperView {
            pieces: st.map.pieces(off, len),
            files: st.files.clone(),
            name: name(&self.dir),
            generation: st.generation,
            _epoch: st.epoch.clone(),
        }
    }

    /// A snapshot of every range, in order.
    pub fn ranges(&self) -> UpperView<UpperTarget> {
        let st = self.state.read();
        UpperView {
            pieces: st.map.iter().collect(),
            files: st.files.clone(),
            name: name(&self.dir),
            generation: st.generation,
            _epoch: st.epoch.clone(),
        }
    }

    /// Bytes in the data file (including overwritten data, until compaction or commit).
    pub fn data_file_len(&self) -> u64 {
        self.state.read().data_len
    }

    /// Sizes and state, for metrics.
    pub fn stats(&self) -> UpperStats {
        let st = self.state.read();
        UpperStats {
            data_file_bytes: st.data_len,
            log_bytes: st.log_len,
            live_bytes: st.map.data_bytes(),
            free_bytes: st.space.free_bytes(),
            compactions: st.compactions,
            checkpoints: st.checkpoints,
            single_sync_flushes: st.single_sync_flushes,
            defrags: st.defrags,
            defrag_bytes: st.defrag_bytes,
            failed: st.failed.clone(),
        }
    }
}

impl Drop for UpperLayer {
    fn drop(&mut self) {
        // Queued records reach the kernel on a clean close, as they would on `settle`.
        if self.lock.is_some() {
            if let Err(e) = self.settle() {
                tracing::warn!(error = %e, "upper layer closed with unwritten log records");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(
        kind: RecordKind,
        seq: u64,
        offset: u64,
        data: &[u8],
        data_offset: u64,
    ) -> [u8; RECORD_LEN] {
        Record {
            kind,
            seq,
            offset,
            len: data.len() as u32,
            data_crc32c: if data.is_empty() {
                0
            } else {
                crc32c::crc32c(data)
            },
            data_offset,
        }
        .encode()
    }

    /// A version 1 layer (bytes back to back, marks covering everything before them) opens,
    /// takes new writes in its own layout, and reopens with everything in place.
    #[test]
    fn version_1_layers_are_read_and_extended() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path();
        let pair_id = [7u8; 16];
        let (a, b) = (vec![0xaau8; 1000], vec![0xbbu8; 4096]);
        let mut data = FileHeader {
            version: 1,
            pair_id,
            logical_size: 0,
        }
        .encode(DATA_MAGIC)
        .to_vec();
        data.extend_from_slice(&a);
        data.extend_from_slice(&b);
        let mut log = FileHeader {
            version: 1,
            pair_id,
            logical_size: 1 << 20,
        }
        .encode(LOG_MAGIC)
        .to_vec();
        log.extend_from_slice(&rec(RecordKind::Write, 1, 0, &a, 64));
        log.extend_from_slice(&rec(RecordKind::FlushMark, 2, 0, &[], 0));
        log.extend_from_slice(&rec(RecordKind::Write, 3, 8192, &b, 1064));
        std::fs::write(dir.join(DATA_FILE), &data).expect("write data");
        std::fs::write(dir.join(LOG_FILE), &log).expect("write log");

        let (up, rec) = UpperLayer::open(dir, 1 << 20).expect("open v1");
        assert_eq!(rec.replayed, 2);
        up.write(100_000, &[0xcc; 512]).expect("write");
        up.flush().expect("flush");
        drop(up);
        let (up, _) = UpperLayer::open(dir, 1 << 20).expect("reopen v1");
        let mut got = vec![0u8; 512];
        for (off, len, want) in [
            (0u64, 1000usize, 0xaau8),
            (8192, 4096, 0xbb),
            (100_000, 512, 0xcc),
        ] {
            got.resize(len, 0);
            let v = up.pieces(off, len as u64);
            let Some(UpperTarget::Data { file_offset }) = v.pieces[0].2 else {
                panic!("no data at {off}: {:?}", v.pieces);
            };
            v.read_data(file_offset, &mut got).expect("read");
            assert!(got.iter().all(|&x| x == want), "at {off}");
        }
        // The new write went right after the old bytes: version 1 layout kept.
        assert_eq!(up.data_file_len(), 64 + 1000 + 4096 + 512);
    }

    /// Writers and flushers racing: the flush marks reach the log in any order, and a clean
    /// reopen still replays every operation.
    #[test]
    fn concurrent_flushes_leave_a_log_that_replays_whole() {
        let tmp = tempfile::tempdir().expect("tmp");
        let up = std::sync::Arc::new(UpperLayer::create(tmp.path(), 1 << 20).expect("create"));
        let threads: Vec<_> = (0..4u64)
            .map(|t| {
                let up = up.clone();
                std::thread::spawn(move || {
                    for i in 0..200u64 {
                        let off = (t * 200 + i) % 256 * 4096;
                        up.write(off, &[t as u8 + 1; 4096]).expect("write");
                        if i % 3 == 0 {
                            up.flush().expect("flush");
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        up.flush().expect("flush");
        drop(up);
        let (_, rec) = UpperLayer::open(tmp.path(), 1 << 20).expect("reopen");
        assert_eq!(rec.replayed, 800);
        assert_eq!((rec.log_bytes_dropped, rec.data_bytes_dropped), (0, 0));
    }

    /// Version 2 puts every write's bytes on a 4 KiB boundary.
    #[test]
    fn version_2_aligns_data() {
        let tmp = tempfile::tempdir().expect("tmp");
        let up = UpperLayer::create(tmp.path(), 1 << 20).expect("create");
        up.write(0, &[1; 100]).expect("write");
        up.write(4096, &[2; 4096]).expect("write");
        let offs: Vec<u64> = up
            .ranges()
            .pieces
            .into_iter()
            .filter_map(|(_, _, t)| match t {
                UpperTarget::Data { file_offset } => Some(file_offset),
                _ => None,
            })
            .collect();
        assert_eq!(offs, vec![4096, 8192]);
    }
}
