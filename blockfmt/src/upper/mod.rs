//! The writable upper layer (FORMAT.md §3): an append-only data file and an append-only,
//! checksummed index log in one directory. Writes are acknowledged once in the page cache and
//! durable after `flush`; reopening after a crash keeps exactly a prefix of the acknowledged
//! operations that includes every flushed one.

mod log;
mod rangemap;

pub use log::{
    data_alignment, FileHeader, Record, RecordKind, FILE_HEADER_LEN, RECORD_LEN, UPPER_VERSION,
};
pub use rangemap::{RangeMap, UpperTarget};

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::RwLock;

use crate::error::{Error, Result};
use log::{DATA_MAGIC, LOG_MAGIC};

/// File names inside an upper layer directory.
pub const DATA_FILE: &str = "data";
/// See [`DATA_FILE`].
pub const LOG_FILE: &str = "index.log";

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

/// Log records kept in memory before one `pwrite` takes them all. Unflushed records may be lost
/// in a crash anyway; the buffer only ever drops a suffix of them, so recovery still finds a
/// prefix of the acknowledged operations.
const PENDING_RECORDS: usize = 64;

struct State {
    map: RangeMap,
    seq: u64,
    /// Where the next record goes in the log (pending records included).
    log_len: u64,
    /// Encoded records not yet written; they belong at `log_len - pending.len()`.
    pending: Vec<u8>,
    /// End of the last appended write's bytes in `data`.
    data_len: u64,
    /// `data_len` when the latest flush began: bytes below it may be durable and are never
    /// rewritten; bytes above it belong to writes no flush has claimed yet, and a write that
    /// covers exactly such bytes again overwrites them in place (version 2).
    sealed_len: u64,
    /// `seq` of the last write, zeroes or trim record.
    last_op: u64,
    /// Records up to this `seq` are durable.
    durable_seq: u64,
}

impl State {
    fn new(map: RangeMap, seq: u64, log_len: u64, data_len: u64) -> State {
        State {
            map,
            seq,
            log_len,
            pending: Vec::with_capacity(PENDING_RECORDS * RECORD_LEN),
            data_len,
            sealed_len: data_len,
            last_op: seq,
            durable_seq: seq,
        }
    }
}

/// The writable upper layer; see the module docs. All methods take `&self` and are thread-safe.
pub struct UpperLayer {
    dir: PathBuf,
    data: File,
    log: File,
    logical_size: u64,
    /// Alignment of each write's bytes in `data` (format version 2: 4096; 1: none).
    align: u64,
    /// Writers append under the write lock; readers only snapshot the map under the read lock.
    state: RwLock<State>,
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

impl UpperLayer {
    /// Opens the upper layer in `dir`, creating an empty one if the directory holds none.
    /// An existing layer must belong to a disk of `logical_size` bytes.
    pub fn open(dir: &Path, logical_size: u64) -> Result<(UpperLayer, Recovery)> {
        if !dir.join(LOG_FILE).exists() && !dir.join(DATA_FILE).exists() {
            return Ok((UpperLayer::create(dir, logical_size)?, Recovery::default()));
        }
        UpperLayer::recover(dir, logical_size)
    }

    /// Creates an empty upper layer; fails if one exists there.
    pub fn create(dir: &Path, logical_size: u64) -> Result<UpperLayer> {
        let n = name(dir);
        std::fs::create_dir_all(dir).map_err(|e| Error::io(&n, 0, e))?;
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
        put(
            &data,
            &FileHeader {
                version: UPPER_VERSION,
                pair_id,
                logical_size: 0,
            }
            .encode(DATA_MAGIC),
            DATA_FILE,
        )?;
        put(
            &log,
            &FileHeader {
                version: UPPER_VERSION,
                pair_id,
                logical_size,
            }
            .encode(LOG_MAGIC),
            LOG_FILE,
        )?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(&n, 0, e))?;
        Ok(UpperLayer {
            dir: dir.to_path_buf(),
            data,
            log,
            logical_size,
            align: data_alignment(UPPER_VERSION),
            state: RwLock::new(State::new(
                RangeMap::default(),
                0,
                FILE_HEADER_LEN as u64,
                FILE_HEADER_LEN as u64,
            )),
        })
    }

    fn recover(dir: &Path, logical_size: u64) -> Result<(UpperLayer, Recovery)> {
        let n = name(dir);
        let open = |f: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .open(dir.join(f))
                .map_err(|e| Error::io(format!("{n}/{f}"), 0, e))
        };
        let data = open(DATA_FILE)?;
        let log = open(LOG_FILE)?;
        let log_bytes = std::fs::read(dir.join(LOG_FILE))
            .map_err(|e| Error::io(format!("{n}/{LOG_FILE}"), 0, e))?;
        let data_file_len = data
            .metadata()
            .map_err(|e| Error::io(format!("{n}/{DATA_FILE}"), 0, e))?
            .len();
        let mut dh = [0u8; FILE_HEADER_LEN];
        data.read_exact_at(&mut dh, 0)
            .map_err(|e| Error::corrupt(&n, "data file header", 0, e.to_string()))?;
        let dh = FileHeader::decode(&dh, DATA_MAGIC)
            .map_err(|e| Error::corrupt(&n, "data file header", 0, e))?;
        let lh = FileHeader::decode(&log_bytes, LOG_MAGIC)
            .map_err(|e| Error::corrupt(&n, "index log header", 0, e))?;
        if dh.pair_id != lh.pair_id || dh.version != lh.version {
            return Err(Error::corrupt(
                &n,
                "data file header",
                16,
                "data file and index log belong to different upper layers",
            ));
        }
        if lh.logical_size != logical_size {
            return Err(Error::Invalid(format!(
                "{n}: belongs to a disk of {} bytes, not {logical_size}",
                lh.logical_size
            )));
        }
        let align = data_alignment(lh.version);
        // Scan: take records while each is well-formed and continues the sequence.
        let mut recs: Vec<Record> = Vec::new();
        let mut last_flush = 0usize; // records[..last_flush] are covered by a flush mark
        let mut data_end = FILE_HEADER_LEN as u64;
        let mut pos = FILE_HEADER_LEN;
        while let Some(r) = log_bytes
            .get(pos..pos + RECORD_LEN)
            .and_then(Record::decode)
        {
            let in_disk = r
                .offset
                .checked_add(r.len as u64)
                .is_some_and(|e| e <= logical_size);
            let ok = r.seq == recs.len() as u64 + 1
                && match r.kind {
                    // Version 2 marks name the last record they cover (`offset`), never one
                    // after the mark. Version 1 marks cover all before them.
                    RecordKind::FlushMark => lh.version < 2 || r.offset <= recs.len() as u64,
                    RecordKind::Write => {
                        let end = r.data_offset + r.len as u64;
                        let appended = r.data_offset == data_end.next_multiple_of(align)
                            && end <= data_file_len;
                        // Version 2: a rewrite in place of bytes already appended.
                        let in_place = lh.version >= 2
                            && r.data_offset >= FILE_HEADER_LEN as u64
                            && end <= data_end;
                        in_disk && (appended || in_place)
                    }
                    _ => in_disk,
                };
            if !ok {
                break;
            }
            if r.kind == RecordKind::Write {
                data_end = data_end.max(r.data_offset + r.len as u64);
            }
            if r.kind == RecordKind::FlushMark {
                // Concurrent flushes may write their marks out of order: the highest wins.
                last_flush = if lh.version < 2 {
                    recs.len()
                } else {
                    last_flush.max(r.offset as usize)
                };
            }
            recs.push(r);
            pos += RECORD_LEN;
        }
        // Records after the last flush mark may have data that never reached the disk.
        let mut keep = recs.len();
        for (i, r) in recs.iter().enumerate().skip(last_flush) {
            if r.kind == RecordKind::Write {
                let mut buf = vec![0u8; r.len as usize];
                let good = data.read_exact_at(&mut buf, r.data_offset).is_ok()
                    && crc32c::crc32c(&buf) == r.data_crc32c;
                if !good {
                    keep = i;
                    break;
                }
            }
        }
        recs.truncate(keep);
        let data_len = recs
            .iter()
            .filter(|r| r.kind == RecordKind::Write)
            .map(|r| r.data_offset + r.len as u64)
            .max()
            .unwrap_or(FILE_HEADER_LEN as u64);
        let log_len = (FILE_HEADER_LEN + recs.len() * RECORD_LEN) as u64;
        let rec = Recovery {
            replayed: recs
                .iter()
                .filter(|r| r.kind != RecordKind::FlushMark)
                .count() as u64,
            log_bytes_dropped: log_bytes.len() as u64 - log_len,
            data_bytes_dropped: data_file_len.saturating_sub(data_len),
        };
        if rec.log_bytes_dropped > 0 || rec.data_bytes_dropped > 0 {
            log.set_len(log_len)
                .and_then(|_| log.sync_all())
                .map_err(|e| Error::io(format!("{n}/{LOG_FILE}"), log_len, e))?;
            data.set_len(data_len)
                .and_then(|_| data.sync_all())
                .map_err(|e| Error::io(format!("{n}/{DATA_FILE}"), data_len, e))?;
        }
        let mut map = RangeMap::default();
        for r in &recs {
            let t = match r.kind {
                RecordKind::Write => UpperTarget::Data {
                    file_offset: r.data_offset,
                },
                RecordKind::WriteZeroes => UpperTarget::Zero,
                RecordKind::Trim => UpperTarget::Trimmed,
                RecordKind::FlushMark => continue,
            };
            map.insert(r.offset, r.len as u64, t);
        }
        let up = UpperLayer {
            dir: dir.to_path_buf(),
            data,
            log,
            logical_size,
            align,
            state: RwLock::new(State::new(map, recs.len() as u64, log_len, data_len)),
        };
        Ok((up, rec))
    }

    /// The directory holding the layer.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
    /// Disk size.
    pub fn logical_size(&self) -> u64 {
        self.logical_size
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

    /// Queues a record; writes the queue out when it is full.
    fn append(&self, st: &mut State, mut r: Record) -> Result<()> {
        r.seq = st.seq + 1;
        st.pending.extend_from_slice(&r.encode());
        st.seq += 1;
        if r.kind != RecordKind::FlushMark {
            st.last_op = st.seq;
        }
        st.log_len += RECORD_LEN as u64;
        if st.pending.len() >= PENDING_RECORDS * RECORD_LEN {
            self.write_pending(st)?;
        }
        Ok(())
    }

    /// Writes queued records to the log (not synced). On error they stay queued.
    fn write_pending(&self, st: &mut State) -> Result<()> {
        if st.pending.is_empty() {
            return Ok(());
        }
        let at = st.log_len - st.pending.len() as u64;
        self.log
            .write_all_at(&st.pending, at)
            .map_err(|e| Error::io(format!("{}/{LOG_FILE}", name(&self.dir)), at, e))?;
        st.pending.clear();
        Ok(())
    }

    /// Hands queued log records to the kernel, so that acknowledged writes survive a crash of
    /// this process (not of the machine — that takes [`Self::flush`]). Frontends call it when
    /// they go idle.
    pub fn settle(&self) -> Result<()> {
        let mut st = self.state.write();
        self.write_pending(&mut st)
    }

    /// Appends a write of `data` at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check(off, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.state.write();
        let prev = st.data_len;
        let len = data.len() as u64;
        // Bytes no flush has claimed, covering exactly this range: rewrite them in place. A crash
        // then fails the older record's data check and recovery stops there: still a prefix.
        let in_place = (self.align > 1)
            .then(|| st.map.data_at(off, len))
            .flatten()
            .filter(|&at| at >= st.sealed_len);
        let at = in_place.unwrap_or_else(|| prev.next_multiple_of(self.align));
        self.data
            .write_all_at(data, at)
            .map_err(|e| Error::io(format!("{}/{DATA_FILE}", name(&self.dir)), at, e))?;
        if in_place.is_none() {
            st.data_len = at + len;
        }
        let r = Record {
            kind: RecordKind::Write,
            seq: 0,
            offset: off,
            len: data.len() as u32,
            data_crc32c: crc32c::crc32c(data),
            data_offset: at,
        };
        if let Err(e) = self.append(&mut st, r) {
            st.data_len = prev; // the bytes are garbage past the end; the next write overwrites them
            return Err(e);
        }
        if in_place.is_none() {
            st.map
                .insert(off, len, UpperTarget::Data { file_offset: at });
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
        let kind = if trim {
            RecordKind::Trim
        } else {
            RecordKind::WriteZeroes
        };
        self.append(
            &mut st,
            Record {
                kind,
                seq: 0,
                offset: off,
                len: len as u32,
                data_crc32c: 0,
                data_offset: 0,
            },
        )?;
        st.map.insert(
            off,
            len,
            if trim {
                UpperTarget::Trimmed
            } else {
                UpperTarget::Zero
            },
        );
        Ok(())
    }

    /// Makes every operation acknowledged before the call durable: `fdatasync(data)`, a flush
    /// mark naming the last record covered, `fdatasync(index.log)`. The syncs run without the
    /// lock, so reads and writes go on meanwhile; writes that land during them are not claimed
    /// by this mark (the next flush covers them).
    pub fn flush(&self) -> Result<()> {
        let n = name(&self.dir);
        let covered = {
            let mut st = self.state.write();
            if st.durable_seq >= st.last_op {
                return Ok(());
            }
            self.write_pending(&mut st)?;
            st.sealed_len = st.data_len;
            st.seq
        };
        self.data
            .sync_data()
            .map_err(|e| Error::io(format!("{n}/{DATA_FILE}"), 0, e))?;
        {
            let mut st = self.state.write();
            self.append(
                &mut st,
                Record {
                    kind: RecordKind::FlushMark,
                    seq: 0,
                    // Version 1 marks cover every record before them: only when none came in.
                    offset: if self.align > 1 { covered } else { 0 },
                    len: 0,
                    data_crc32c: 0,
                    data_offset: 0,
                },
            )?;
            if self.align == 1 && st.last_op > covered {
                // A version 1 mark would also claim the records that arrived during the sync.
                self.data
                    .sync_data()
                    .map_err(|e| Error::io(format!("{n}/{DATA_FILE}"), 0, e))?;
            }
            self.write_pending(&mut st)?;
        }
        self.log
            .sync_data()
            .map_err(|e| Error::io(format!("{n}/{LOG_FILE}"), 0, e))?;
        let mut st = self.state.write();
        st.durable_seq = st.durable_seq.max(covered);
        Ok(())
    }

    /// Pieces of `[off, off + len)`: `None` where the upper layer has nothing (lower shows).
    pub fn pieces(&self, off: u64, len: u64) -> Vec<(u64, u64, Option<UpperTarget>)> {
        self.state.read().map.pieces(off, len)
    }

    /// Reads bytes the map points at. Data is never overwritten in place, so a piece obtained
    /// from `pieces` stays valid even if a later write covers the same range.
    pub fn read_data(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.data
            .read_exact_at(buf, file_offset)
            .map_err(|e| Error::io(format!("{}/{DATA_FILE}", name(&self.dir)), file_offset, e))
    }

    /// A snapshot of every range, in order.
    pub fn ranges(&self) -> Vec<(u64, u64, UpperTarget)> {
        self.state.read().map.iter().collect()
    }

    /// Bytes in the data file (including overwritten data, until commit).
    pub fn data_file_len(&self) -> u64 {
        self.state.read().data_len
    }
}

impl Drop for UpperLayer {
    fn drop(&mut self) {
        // Queued records reach the kernel on a clean close, as they would on `settle`.
        if let Err(e) = self.settle() {
            tracing::warn!(error = %e, "upper layer closed with unwritten log records");
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
            let p = up.pieces(off, len as u64);
            let Some(UpperTarget::Data { file_offset }) = p[0].2 else {
                panic!("no data at {off}: {p:?}");
            };
            up.read_data(file_offset, &mut got).expect("read");
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
            .into_iter()
            .filter_map(|(_, _, t)| match t {
                UpperTarget::Data { file_offset } => Some(file_offset),
                _ => None,
            })
            .collect();
        assert_eq!(offs, vec![4096, 8192]);
    }
}
