//! Recovery: what an upper layer's files say after any crash (FORMAT.md §3.4).
//!
//! Memory is bounded by the live map, not by the log: the log is read twice in fixed-size
//! blocks — first to find the longest well-formed prefix and the last flush mark, then to
//! replay it into the map — and data is checked in fixed-size pieces.
//!
//! What is kept: every record a flush mark covers, and of the records after it the longest run
//! whose data checks out (a crash may have left their bytes unwritten): a prefix of the
//! acknowledged operations that includes every flushed one. A *flushed* write whose data fails
//! its crc32c is an error, not a silent drop — unless a later record rewrote those bytes in
//! place or reused them (then the older record's crc is expected to fail), or later flushed
//! records wholly supersede it (version 3 reuses such dead space; a crash between the reusing
//! write's bytes and its record leaves exactly that).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::log::{
    data_alignment, reuses_space, FileHeader, Record, RecordKind, FILE_HEADER_LEN, RECORD_LEN,
};
use super::log::{DATA_MAGIC, LOG_MAGIC};
use super::rangemap::{RangeMap, UpperTarget};
use super::space::DataSpace;
use super::{sync_dir, Files, Recovery, COMPACT_DATA_FILE, COMPACT_LOG_FILE, DATA_FILE, LOG_FILE};
use crate::error::{Error, Result};

/// Records read from the log per `pread`.
const RECORDS_PER_READ: usize = 16 * 1024;
/// Bytes of data read per `pread` while checking a record's crc32c.
const CHECK_PIECE: usize = 1 << 20;

/// The state recovery rebuilt.
pub(super) struct Recovered {
    pub files: Files,
    pub map: RangeMap,
    /// Records kept (the next record's seq is `seq + 1`).
    pub seq: u64,
    pub log_len: u64,
    pub data_len: u64,
    /// Records covered by the last flush mark: durable.
    pub flushed: u64,
    /// Seq of the last kept write, zeroes or trim record.
    pub last_op: u64,
    /// The data file's slots: free space (whose killers the synced last mark covers) and dead
    /// slots waiting for a mark over their killers (version 3; empty otherwise).
    pub space: DataSpace,
    pub report: Recovery,
}

/// Recovers the upper layer in `dir`. Read-only (`writable == false`) changes nothing on disk:
/// no torn tail is cut and an interrupted compaction is resolved in memory only.
pub(super) fn recover(dir: &Path, logical_size: u64, writable: bool) -> Result<Recovered> {
    let n = super::name(dir);
    let data_path = settle_compaction(dir, &n, writable)?;
    let open = |p: &Path, f: &str| {
        OpenOptions::new()
            .read(true)
            .write(writable)
            .open(p)
            .map_err(|e| Error::io(format!("{n}/{f}"), 0, e))
    };
    let data = open(&data_path, DATA_FILE)?;
    let log = open(&dir.join(LOG_FILE), LOG_FILE)?;
    let len_of = |f: &File, which: &str| {
        f.metadata()
            .map(|m| m.len())
            .map_err(|e| Error::io(format!("{n}/{which}"), 0, e))
    };
    let (data_file_len, log_file_len) = (len_of(&data, DATA_FILE)?, len_of(&log, LOG_FILE)?);
    let version = check_headers(&n, &data, &log, logical_size)?;
    let align = data_alignment(version);
    let scan = scan(&n, &log, log_file_len, logical_size, data_file_len, version)?;
    let kept = replay(&n, &log, &data, &scan, version)?;
    let log_len = (FILE_HEADER_LEN as u64) + kept.seq * RECORD_LEN as u64;
    let report = Recovery {
        replayed: kept.ops,
        log_bytes_dropped: log_file_len.saturating_sub(log_len),
        data_bytes_dropped: data_file_len.saturating_sub(kept.data_len),
    };
    if writable && (report.log_bytes_dropped > 0 || report.data_bytes_dropped > 0) {
        log.set_len(log_len)
            .and_then(|_| log.sync_all())
            .map_err(|e| Error::io(format!("{n}/{LOG_FILE}"), log_len, e))?;
        data.set_len(kept.data_len)
            .and_then(|_| data.sync_all())
            .map_err(|e| Error::io(format!("{n}/{DATA_FILE}"), kept.data_len, e))?;
    }
    if writable && kept.space.free_bytes() > 0 {
        // Free space counts on the last mark being durable; after a crash of the process alone
        // it may be in the page cache only.
        log.sync_data()
            .map_err(|e| Error::io(format!("{n}/{LOG_FILE}"), 0, e))?;
    }
    Ok(Recovered {
        files: Files {
            data,
            log,
            align,
            version,
        },
        map: kept.map,
        seq: kept.seq,
        log_len,
        data_len: kept.data_len,
        flushed: scan.last_flush,
        last_op: kept.last_op,
        space: kept.space,
        report,
    })
}

/// Finishes or undoes a compaction a crash interrupted (see `compact.rs`): the log is switched
/// first, so a `data.compact` whose pair id matches `index.log` is the data file to use (rolled
/// forward), and any other leftover is discarded. Returns the data file's path.
fn settle_compaction(dir: &Path, n: &str, writable: bool) -> Result<PathBuf> {
    let (cdata, clog) = (dir.join(COMPACT_DATA_FILE), dir.join(COMPACT_LOG_FILE));
    let data = dir.join(DATA_FILE);
    let header = |p: &Path, magic: &[u8; 8]| {
        let mut b = [0u8; FILE_HEADER_LEN];
        File::open(p)
            .and_then(|f| f.read_exact_at(&mut b, 0))
            .ok()
            .and_then(|_| FileHeader::decode(&b, magic).ok())
    };
    let io = |e: std::io::Error| Error::io(n.to_string(), 0, e);
    if cdata.exists() {
        let forward = matches!(
            (header(&cdata, DATA_MAGIC), header(&dir.join(LOG_FILE), LOG_MAGIC)),
            (Some(d), Some(l)) if d.pair_id == l.pair_id
        );
        if forward {
            if !writable {
                return Ok(cdata);
            }
            std::fs::rename(&cdata, &data).map_err(io)?;
            sync_dir(dir).map_err(io)?;
            return Ok(data);
        }
        if writable {
            std::fs::remove_file(&cdata).map_err(io)?;
        }
    }
    if writable && clog.exists() {
        std::fs::remove_file(&clog).map_err(io)?;
    }
    Ok(data)
}

/// Checks both headers belong together and to this disk; returns the format version.
fn check_headers(n: &str, data: &File, log: &File, logical_size: u64) -> Result<u16> {
    let read = |f: &File, what: &'static str, magic: &[u8; 8]| {
        let mut b = [0u8; FILE_HEADER_LEN];
        f.read_exact_at(&mut b, 0)
            .map_err(|e| Error::corrupt(n, what, 0, e.to_string()))?;
        FileHeader::decode(&b, magic).map_err(|e| Error::corrupt(n, what, 0, e))
    };
    let dh = read(data, "data file header", DATA_MAGIC)?;
    let lh = read(log, "index log header", LOG_MAGIC)?;
    if dh.pair_id != lh.pair_id || dh.version != lh.version {
        return Err(Error::corrupt(
            n,
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
    Ok(lh.version)
}

/// Reads the log's records in order, a block at a time, stopping at the first that does not
/// decode (a torn or zeroed tail) or at the end of the file.
struct LogRecords<'a> {
    log: &'a File,
    file_len: u64,
    next: u64,
    buf: Vec<u8>,
    at: usize,
}

impl<'a> LogRecords<'a> {
    fn new(log: &'a File, file_len: u64) -> Self {
        LogRecords {
            log,
            file_len,
            next: FILE_HEADER_LEN as u64,
            buf: Vec::new(),
            at: 0,
        }
    }

    fn next(&mut self, n: &str) -> Result<Option<Record>> {
        if self.at + RECORD_LEN > self.buf.len() {
            let left = self.file_len.saturating_sub(self.next);
            let want = (left as usize).min(RECORDS_PER_READ * RECORD_LEN);
            self.buf.resize(want - want % RECORD_LEN, 0);
            self.log
                .read_exact_at(&mut self.buf, self.next)
                .map_err(|e| Error::io(format!("{n}/{LOG_FILE}"), self.next, e))?;
            self.next += self.buf.len() as u64;
            self.at = 0;
            if self.buf.is_empty() {
                return Ok(None);
            }
        }
        let r = Record::decode(&self.buf[self.at..self.at + RECORD_LEN]);
        self.at += RECORD_LEN;
        Ok(r)
    }
}

/// What the first pass found: the well-formed prefix and what its flush marks cover.
struct Scan {
    /// Records in the well-formed prefix.
    records: u64,
    /// Records covered by the last flush mark.
    last_flush: u64,
}

/// Pass one: the longest prefix of records that are well-formed and continue the sequence.
fn scan(
    n: &str,
    log: &File,
    log_file_len: u64,
    logical_size: u64,
    data_file_len: u64,
    version: u16,
) -> Result<Scan> {
    let align = data_alignment(version);
    let mut it = LogRecords::new(log, log_file_len);
    let (mut records, mut last_flush) = (0u64, 0u64);
    let mut data_end = FILE_HEADER_LEN as u64;
    while let Some(r) = it.next(n)? {
        let in_disk = r
            .offset
            .checked_add(r.len as u64)
            .is_some_and(|e| e <= logical_size);
        let ok = r.seq == records + 1
            && match r.kind {
                // Version 2 marks name the last record they cover (`offset`), never one after
                // the mark. Version 1 marks cover all before them.
                RecordKind::FlushMark => version < 2 || r.offset <= records,
                RecordKind::Write => {
                    let end = r.data_offset.saturating_add(r.len as u64);
                    let appended =
                        r.data_offset == data_end.next_multiple_of(align) && end <= data_file_len;
                    // Version 2: a rewrite in place of bytes already appended.
                    let in_place =
                        version >= 2 && r.data_offset >= FILE_HEADER_LEN as u64 && end <= data_end;
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
            last_flush = if version < 2 {
                records
            } else {
                last_flush.max(r.offset)
            };
        }
        records += 1;
    }
    Ok(Scan {
        records,
        last_flush,
    })
}

/// What the second pass kept.
struct Kept {
    map: RangeMap,
    seq: u64,
    ops: u64,
    data_len: u64,
    last_op: u64,
    space: DataSpace,
}

/// A flushed write whose data failed its check: (end in `data`, seq, disk offset, len), by
/// data offset.
type Suspects = BTreeMap<u64, (u64, u64, u64, u64)>;

/// Pass two: replays the prefix into the map, checking data as it goes.
fn replay(n: &str, log: &File, data: &File, scan: &Scan, version: u16) -> Result<Kept> {
    let track = reuses_space(version);
    let log_file_len = FILE_HEADER_LEN as u64 + scan.records * RECORD_LEN as u64;
    let mut it = LogRecords::new(log, log_file_len);
    let mut k = Kept {
        map: RangeMap::default(),
        seq: 0,
        ops: 0,
        data_len: FILE_HEADER_LEN as u64,
        last_op: 0,
        space: DataSpace::default(),
    };
    // Flushed records whose data failed its check; a later record rewriting those bytes (in
    // place or in reused space) explains the failure.
    let mut suspects = Suspects::new();
    while let Some(r) = it.next(n)? {
        if k.seq >= scan.records {
            break;
        }
        let target = match r.kind {
            RecordKind::Write => {
                let end = r.data_offset + r.len as u64;
                let good = data_matches(n, data, &r)?;
                if !good && k.seq >= scan.last_flush {
                    // Not flushed: a crash may have left its bytes unwritten. Stop here.
                    break;
                }
                let overlapping: Vec<u64> = suspects
                    .range(..end)
                    .filter(|(_, &(e, ..))| e > r.data_offset)
                    .map(|(&s, _)| s)
                    .collect();
                for s in overlapping {
                    suspects.remove(&s);
                }
                if !good {
                    suspects.insert(r.data_offset, (end, r.seq, r.offset, r.len as u64));
                }
                k.data_len = k.data_len.max(end);
                Some(UpperTarget::Data {
                    file_offset: r.data_offset,
                })
            }
            RecordKind::WriteZeroes => Some(UpperTarget::Zero),
            RecordKind::Trim => Some(UpperTarget::Trimmed),
            RecordKind::FlushMark => None,
        };
        k.seq += 1;
        if let Some(t) = target {
            if track {
                track_slots(&mut k, &r, t, scan.last_flush);
            }
            k.map.insert(r.offset, r.len as u64, t);
            k.ops += 1;
            k.last_op = r.seq;
        }
    }
    if !suspects.is_empty() {
        suspects = still_owned(n, log, scan, &suspects)?;
    }
    if let Some((&off, &(_, seq, ..))) = suspects.iter().next() {
        return Err(Error::corrupt(
            format!("{n}/{DATA_FILE}"),
            "flushed write data",
            off,
            format!(
                "record {seq} was flushed but its bytes fail their crc32c ({} such records): \
                 the data file lost acknowledged writes",
                suspects.len()
            ),
        ));
    }
    Ok(k)
}

/// Keeps the data file's slots as the writer did (version 3): bytes the record replaces leave
/// their slots, slots left with none die, and dead slots whose killer the last mark covers
/// are free; a write outside every live slot (appended, or in reused space) starts its own.
fn track_slots(k: &mut Kept, r: &Record, t: UpperTarget, last_flush: u64) {
    for (o, l, was) in k.map.pieces(r.offset, r.len as u64) {
        let Some(UpperTarget::Data { file_offset }) = was else {
            continue;
        };
        // A rewrite in place (older builds) points at the same bytes again: nothing released.
        if matches!(t, UpperTarget::Data { .. }) && file_offset == r.data_offset + (o - r.offset) {
            continue;
        }
        k.space
            .release(file_offset, l, r.seq, &std::sync::Weak::new());
    }
    k.space.settle(last_flush);
    if let UpperTarget::Data { .. } = t {
        if !k.space.in_live_slot(r.data_offset) {
            k.space.claim(r.data_offset, r.len as u64);
            k.space.add_slot(r.data_offset, r.len as u64);
        }
    }
}

/// Of the flushed writes whose data failed its check and that no later record explained,
/// those whose disk range later flushed records do not wholly replace (a third pass over the
/// flushed records, only when there are such writes). A wholly replaced write's bytes are
/// never read, and version 3 may have put a new write's bytes there before a crash cut its
/// record off.
fn still_owned(n: &str, log: &File, scan: &Scan, suspects: &Suspects) -> Result<Suspects> {
    // Each suspect's range maps to a virtual offset of its own, so what is left of it in
    // `own` after the later records is exactly what it still owns.
    let mut by_seq: BTreeMap<u64, (u64, u64)> = BTreeMap::new();
    let mut virt = 0u64;
    for (&data_off, &(_, seq, _, len)) in suspects {
        by_seq.insert(seq, (virt, data_off));
        virt += len + 1; // a gap, so two suspects never merge into one range
    }
    let first = by_seq.keys().next().copied().unwrap_or(0);
    let mut own = RangeMap::default();
    let flushed_len = FILE_HEADER_LEN as u64 + scan.last_flush * RECORD_LEN as u64;
    let mut it = LogRecords::new(log, flushed_len);
    while let Some(r) = it.next(n)? {
        if r.seq < first || r.kind == RecordKind::FlushMark {
            continue;
        }
        if let Some(&(v, _)) = by_seq.get(&r.seq) {
            own.insert(r.offset, r.len as u64, UpperTarget::Data { file_offset: v });
        } else if own
            .pieces(r.offset, r.len as u64)
            .iter()
            .any(|(_, _, t)| matches!(t, Some(UpperTarget::Data { .. })))
        {
            own.insert(r.offset, r.len as u64, UpperTarget::Trimmed);
        }
    }
    let by_virt: BTreeMap<u64, u64> = by_seq.values().copied().collect();
    let mut left = Suspects::new();
    for (_, _, t) in own.iter() {
        if let UpperTarget::Data { file_offset } = t {
            if let Some((_, &data_off)) = by_virt.range(..=file_offset).next_back() {
                if let Some(&s) = suspects.get(&data_off) {
                    left.insert(data_off, s);
                }
            }
        }
    }
    Ok(left)
}

/// True when the record's bytes in `data` are there and match its crc32c.
fn data_matches(n: &str, data: &File, r: &Record) -> Result<bool> {
    let mut buf = vec![0u8; (r.len as usize).min(CHECK_PIECE)];
    let (mut done, mut crc) = (0u64, 0u32);
    while done < r.len as u64 {
        let take = ((r.len as u64 - done) as usize).min(buf.len());
        match data.read_exact_at(&mut buf[..take], r.data_offset + done) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(false),
            Err(e) => {
                return Err(Error::io(
                    format!("{n}/{DATA_FILE}"),
                    r.data_offset + done,
                    e,
                ))
            }
        }
        crc = crc32c::crc32c_append(crc, &buf[..take]);
        done += take as u64;
    }
    Ok(crc == r.data_crc32c)
}
