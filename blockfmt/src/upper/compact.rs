//! Compaction: bounds an upper layer's files by its live data (FORMAT.md §3.5).
//!
//! Every rewrite appends (once a flush has claimed the old bytes), so `data` and `index.log`
//! grow without end under a workload that overwrites. Compaction writes the live map into a new
//! pair of files (`data.compact`, `index.log.compact`, a new pair id, one record per live range
//! and a flush mark covering them all), syncs both and the directory, then switches: renames the
//! log first, then the data file, then syncs the directory. Every step is crash safe:
//!
//! - before the log rename, recovery finds the old pair and deletes the leftovers;
//! - after it, `index.log` has the new pair id and so does `data.compact`: recovery finishes the
//!   switch by renaming `data.compact` (a read-only open just reads `data.compact`);
//! - after both, it is an ordinary layer.
//!
//! Writes go on while it copies (the caller, `UpperLayer::compact`, drives the rounds): the
//! first round copies a snapshot of the map without the state lock, each later round copies the
//! ranges written meanwhile (later records in the new log replace earlier ones on replay), and
//! only the last, small round — with the flush mark, the syncs and the switch — holds the lock.
//! A write may rewrite bytes in place while a round copies them (the copy's record then carries
//! the crc32c of what it copied, consistent but stale); every write since the round began is
//! in the changed set, so a later round copies it again and its record replaces the stale one.
//! Readers keep the old files open through their snapshots, so reads in flight stay right. A failure
//! before the switch leaves the layer as it was (the caller may try again later); a failure
//! during it is sticky.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::log::{FileHeader, Record, RecordKind, FILE_HEADER_LEN, UPPER_VERSION};
use super::log::{DATA_MAGIC, LOG_MAGIC};
use super::rangemap::{RangeMap, UpperTarget};
use super::space::DataSpace;
use super::{sync_data, sync_dir, Files, COMPACT_DATA_FILE, COMPACT_LOG_FILE, DATA_FILE, LOG_FILE};
use crate::error::{Error, Result};

/// Largest range one record of the compacted log describes. Each record owns one slot of the
/// new data file, and a slot is free for reuse only once later writes replaced all of it, so
/// small records keep the copied space reusable piece by piece (64 KiB: a record per 64 KiB of
/// live data adds 0.07 % to the log).
const MAX_RECORD: u64 = 64 << 10;
/// Largest zeroed or trimmed range one record describes (records carry a u32 length).
const MAX_ZEROES_RECORD: u64 = 1 << 30;
/// Compaction never runs for less waste than this.
const MIN_WASTE_FLOOR: u64 = 1 << 20;
/// Bytes copied per `pread`/`pwrite`.
const COPY_PIECE: usize = 1 << 20;

/// When to compact: once the files exceed `ratio_percent` of what the live ranges need *and*
/// waste at least `min_waste` bytes — or half the live size when that is less (so a small layer
/// is bounded too), but never less than 1 MiB (so a few hot blocks rewritten and flushed over
/// and over do not cost a compaction, three syncs, every few writes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompactionPolicy {
    /// Files (data + log) may reach this percentage of the live size before compaction.
    pub ratio_percent: u64,
    /// ... and must waste at least this many bytes.
    pub min_waste: u64,
}

impl Default for CompactionPolicy {
    fn default() -> Self {
        CompactionPolicy {
            ratio_percent: 150,
            min_waste: 32 << 20,
        }
    }
}

impl CompactionPolicy {
    /// Never compact.
    pub fn never() -> Self {
        CompactionPolicy {
            ratio_percent: u64::MAX,
            min_waste: u64::MAX,
        }
    }

    /// The same with twice the ratio: files this far over the live size are compacted even
    /// when free space inside them could take new writes.
    pub fn doubled(&self) -> Self {
        CompactionPolicy {
            ratio_percent: self.ratio_percent.saturating_mul(2),
            min_waste: self.min_waste,
        }
    }

    /// True when files of `total` bytes for `live` live bytes should be compacted.
    pub fn due(&self, total: u64, live: u64) -> bool {
        let limit =
            u64::try_from(live as u128 * self.ratio_percent as u128 / 100).unwrap_or(u64::MAX);
        let floor = self.min_waste.min(live / 2).max(MIN_WASTE_FLOOR);
        total > limit && total - live >= floor
    }
}

/// The new generation compaction wrote and switched to.
pub(super) struct Compacted {
    pub files: Files,
    pub map: RangeMap,
    /// Records in the new log, flush mark included.
    pub seq: u64,
    pub log_len: u64,
    pub data_len: u64,
    /// The new data file's slots; those of records a later round replaced are dead.
    pub space: DataSpace,
}

/// Why compaction failed, and whether the layer is still whole.
pub(super) enum CompactError {
    /// Nothing switched: the layer is exactly as before.
    Before(Error),
    /// The switch began: the layer must refuse writes until reopened (recovery finishes it).
    During(Error),
}

/// The next generation while compaction writes it (`data.compact`, `index.log.compact`).
pub(super) struct Generation {
    n: String,
    dir: PathBuf,
    data: File,
    log: File,
    map: RangeMap,
    /// Encoded records not yet written.
    records: Vec<u8>,
    seq: u64,
    log_len: u64,
    data_len: u64,
    align: u64,
    space: DataSpace,
    buf: Vec<u8>,
}

impl Generation {
    /// Creates the next generation's files (replacing leftovers of an earlier attempt).
    pub fn create(dir: &Path, logical_size: u64) -> Result<Generation> {
        let n = super::name(dir);
        let create = |f: &str| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(dir.join(f))
                .map_err(|e| Error::io(format!("{n}/{f}"), 0, e))
        };
        let data = create(COMPACT_DATA_FILE)?;
        let log = create(COMPACT_LOG_FILE)?;
        let pair_id: [u8; 16] = rand::random();
        let header = |size| FileHeader {
            version: UPPER_VERSION,
            pair_id,
            logical_size: size,
        };
        let werr = |f: &str, e: std::io::Error| Error::io(format!("{n}/{f}"), 0, e);
        data.write_all_at(&header(0).encode(DATA_MAGIC), 0)
            .map_err(|e| werr(COMPACT_DATA_FILE, e))?;
        log.write_all_at(&header(logical_size).encode(LOG_MAGIC), 0)
            .map_err(|e| werr(COMPACT_LOG_FILE, e))?;
        Ok(Generation {
            n,
            dir: dir.to_path_buf(),
            data,
            log,
            map: RangeMap::default(),
            records: Vec::with_capacity(COPY_PIECE),
            seq: 0,
            log_len: FILE_HEADER_LEN as u64,
            data_len: FILE_HEADER_LEN as u64,
            align: super::log::data_alignment(UPPER_VERSION),
            space: DataSpace::default(),
            buf: vec![0u8; COPY_PIECE],
        })
    }

    /// Deletes the next generation's files (compaction gave up before the switch).
    pub fn abandon(self) {
        let _ = std::fs::remove_file(self.dir.join(COMPACT_DATA_FILE));
        let _ = std::fs::remove_file(self.dir.join(COMPACT_LOG_FILE));
    }

    /// Appends the ranges `pieces` (as the map says them, bytes read from `old`): each one
    /// replaces what earlier rounds wrote for it.
    pub fn copy_pieces(&mut self, old: &Files, pieces: &[(u64, u64, UpperTarget)]) -> Result<()> {
        for &(start, len, t) in pieces {
            let max = match t {
                UpperTarget::Data { .. } => MAX_RECORD,
                _ => MAX_ZEROES_RECORD,
            };
            let mut done = 0;
            while done < len {
                let l = (len - done).min(max);
                self.range(old, start + done, l, t, done)?;
                done += l;
            }
        }
        Ok(())
    }

    /// Writes the queued records and syncs both files, so the last round syncs only its own.
    pub fn sync(&mut self) -> Result<()> {
        self.write_records()?;
        let werr = |f: &str, e: std::io::Error| Error::io(format!("{}/{f}", self.n), 0, e);
        sync_data(&self.data, COMPACT_DATA_FILE).map_err(|e| werr(COMPACT_DATA_FILE, e))?;
        sync_data(&self.log, COMPACT_LOG_FILE).map_err(|e| werr(COMPACT_LOG_FILE, e))
    }

    /// Seals the generation (a flush mark covering every record), syncs it and the directory,
    /// and switches the directory to it (see the module docs for why each step is crash safe).
    pub fn finish(mut self) -> std::result::Result<Compacted, CompactError> {
        let covered = self.seq;
        let sealed = self
            .record(RecordKind::FlushMark, covered, 0, 0, 0)
            .and_then(|_| self.sync())
            .and_then(|_| sync_dir(&self.dir).map_err(|e| Error::io(self.n.clone(), 0, e)));
        if let Err(e) = sealed {
            self.abandon();
            return Err(CompactError::Before(e));
        }
        let (dir, n) = (self.dir.clone(), self.n.clone());
        let io = |what: &str, e: std::io::Error| Error::io(format!("{n}/{what}"), 0, e);
        if let Err(e) = std::fs::rename(dir.join(COMPACT_LOG_FILE), dir.join(LOG_FILE)) {
            self.abandon();
            return Err(CompactError::Before(io(LOG_FILE, e)));
        }
        std::fs::rename(dir.join(COMPACT_DATA_FILE), dir.join(DATA_FILE))
            .and_then(|_| sync_dir(&dir))
            .map_err(|e| CompactError::During(io(DATA_FILE, e)))?;
        Ok(Compacted {
            files: Files {
                data: self.data,
                log: self.log,
                align: self.align,
                version: UPPER_VERSION,
            },
            map: self.map,
            seq: self.seq,
            log_len: self.log_len,
            data_len: self.data_len,
            space: self.space,
        })
    }

    /// Copies one live range (`skip` bytes into the map's range `t`).
    fn range(
        &mut self,
        old: &Files,
        start: u64,
        len: u64,
        t: UpperTarget,
        skip: u64,
    ) -> Result<()> {
        // A later round's record replaces what an earlier one copied here: that copy's slot
        // loses these bytes (killed by the record about to be written).
        for (_, l, was) in self.map.pieces(start, len) {
            if let Some(UpperTarget::Data { file_offset }) = was {
                // Nobody reads the new files yet.
                self.space
                    .release(file_offset, l, self.seq + 1, &std::sync::Weak::new());
            }
        }
        match t {
            UpperTarget::Data { file_offset } => {
                let at = self.data_len.next_multiple_of(self.align);
                let crc = self.copy(old, file_offset + skip, at, len)?;
                self.data_len = at + len;
                self.map
                    .insert(start, len, UpperTarget::Data { file_offset: at });
                self.space.add_slot(at, len);
                self.record(RecordKind::Write, start, len, crc, at)
            }
            UpperTarget::Zero => {
                self.map.insert(start, len, t);
                self.record(RecordKind::WriteZeroes, start, len, 0, 0)
            }
            UpperTarget::Trimmed => {
                self.map.insert(start, len, t);
                self.record(RecordKind::Trim, start, len, 0, 0)
            }
        }
    }

    /// Copies `len` bytes from `old.data` at `from` to the new data file at `to`; their crc32c.
    fn copy(&mut self, old: &Files, from: u64, to: u64, len: u64) -> Result<u32> {
        let (mut done, mut crc) = (0u64, 0u32);
        while done < len {
            let take = ((len - done) as usize).min(self.buf.len());
            let b = &mut self.buf[..take];
            old.data
                .read_exact_at(b, from + done)
                .map_err(|e| Error::io(format!("{}/{DATA_FILE}", self.n), from + done, e))?;
            self.data
                .write_all_at(b, to + done)
                .map_err(|e| Error::io(format!("{}/{COMPACT_DATA_FILE}", self.n), to + done, e))?;
            crc = crc32c::crc32c_append(crc, b);
            done += take as u64;
        }
        Ok(crc)
    }

    fn record(&mut self, kind: RecordKind, offset: u64, len: u64, crc: u32, at: u64) -> Result<()> {
        self.seq += 1;
        let r = Record {
            kind,
            seq: self.seq,
            offset,
            len: len as u32,
            data_crc32c: crc,
            data_offset: at,
        };
        self.records.extend_from_slice(&r.encode());
        if self.records.len() >= COPY_PIECE {
            self.write_records()?;
        }
        Ok(())
    }

    fn write_records(&mut self) -> Result<()> {
        self.log
            .write_all_at(&self.records, self.log_len)
            .map_err(|e| Error::io(format!("{}/{COMPACT_LOG_FILE}", self.n), self.log_len, e))?;
        self.log_len += self.records.len() as u64;
        self.records.clear();
        Ok(())
    }
}
