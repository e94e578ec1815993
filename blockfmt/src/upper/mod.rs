//! The writable upper layer (FORMAT.md §3): an append-only data file and an append-only,
//! checksummed index log in one directory. Writes are acknowledged once in the page cache and
//! durable after `flush`; reopening after a crash keeps exactly a prefix of the acknowledged
//! operations that includes every flushed one.

mod log;
mod rangemap;

pub use log::{FileHeader, Record, RecordKind, FILE_HEADER_LEN, RECORD_LEN};
pub use rangemap::{RangeMap, UpperTarget};

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use parking_lot::Mutex;

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

struct State {
    map: RangeMap,
    seq: u64,
    log_len: u64,
    data_len: u64,
    /// Something was appended since the last flush.
    dirty: bool,
}

/// The writable upper layer; see the module docs. All methods take `&self` and are thread-safe.
pub struct UpperLayer {
    dir: PathBuf,
    data: File,
    log: File,
    logical_size: u64,
    state: Mutex<State>,
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
                pair_id,
                logical_size: 0,
            }
            .encode(DATA_MAGIC),
            DATA_FILE,
        )?;
        put(
            &log,
            &FileHeader {
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
            state: Mutex::new(State {
                map: RangeMap::default(),
                seq: 0,
                log_len: FILE_HEADER_LEN as u64,
                data_len: FILE_HEADER_LEN as u64,
                dirty: false,
            }),
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
        if dh.pair_id != lh.pair_id {
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
                    RecordKind::FlushMark => true,
                    RecordKind::Write => {
                        in_disk
                            && r.data_offset == data_end
                            && data_end + r.len as u64 <= data_file_len
                    }
                    _ => in_disk,
                };
            if !ok {
                break;
            }
            if r.kind == RecordKind::Write {
                data_end += r.len as u64;
            }
            recs.push(r);
            if r.kind == RecordKind::FlushMark {
                last_flush = recs.len();
            }
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
            .rev()
            .find(|r| r.kind == RecordKind::Write)
            .map_or(FILE_HEADER_LEN as u64, |r| r.data_offset + r.len as u64);
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
            state: Mutex::new(State {
                map,
                seq: recs.len() as u64,
                log_len,
                data_len,
                dirty: false,
            }),
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

    fn append(&self, st: &mut State, mut r: Record) -> Result<()> {
        r.seq = st.seq + 1;
        self.log
            .write_all_at(&r.encode(), st.log_len)
            .map_err(|e| Error::io(format!("{}/{LOG_FILE}", name(&self.dir)), st.log_len, e))?;
        st.seq += 1;
        st.log_len += RECORD_LEN as u64;
        st.dirty = true;
        Ok(())
    }

    /// Appends a write of `data` at `off`.
    pub fn write(&self, off: u64, data: &[u8]) -> Result<()> {
        self.check(off, data.len() as u64)?;
        if data.is_empty() {
            return Ok(());
        }
        let mut st = self.state.lock();
        let at = st.data_len;
        self.data
            .write_all_at(data, at)
            .map_err(|e| Error::io(format!("{}/{DATA_FILE}", name(&self.dir)), at, e))?;
        st.data_len += data.len() as u64;
        let r = Record {
            kind: RecordKind::Write,
            seq: 0,
            offset: off,
            len: data.len() as u32,
            data_crc32c: crc32c::crc32c(data),
            data_offset: at,
        };
        if let Err(e) = self.append(&mut st, r) {
            st.data_len = at; // the bytes are garbage past the end; the next write overwrites them
            return Err(e);
        }
        st.map.insert(
            off,
            data.len() as u64,
            UpperTarget::Data { file_offset: at },
        );
        Ok(())
    }

    /// Records zeros over `[off, off + len)`; `trim` records a discard (also read as zeros).
    pub fn write_zeroes(&self, off: u64, len: u64, trim: bool) -> Result<()> {
        self.check(off, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut st = self.state.lock();
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

    /// Makes every acknowledged operation durable: data, then a flush mark, then the log.
    pub fn flush(&self) -> Result<()> {
        let mut st = self.state.lock();
        if !st.dirty {
            return Ok(());
        }
        let n = name(&self.dir);
        self.data
            .sync_data()
            .map_err(|e| Error::io(format!("{n}/{DATA_FILE}"), 0, e))?;
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
        self.log
            .sync_data()
            .map_err(|e| Error::io(format!("{n}/{LOG_FILE}"), 0, e))?;
        st.dirty = false;
        Ok(())
    }

    /// Pieces of `[off, off + len)`: `None` where the upper layer has nothing (lower shows).
    pub fn pieces(&self, off: u64, len: u64) -> Vec<(u64, u64, Option<UpperTarget>)> {
        self.state.lock().map.pieces(off, len)
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
        self.state.lock().map.iter().collect()
    }

    /// Bytes in the data file (including overwritten data, until commit).
    pub fn data_file_len(&self) -> u64 {
        self.state.lock().data_len
    }
}
