//! Byte layouts of the upper layer's two files (FORMAT.md §3): the file headers and the 48-byte
//! index log record. Decoding checks crc32c first, so a torn or foreign record is rejected.

use crate::format::{le_u16, le_u32, le_u64};

/// Length of both file headers.
pub const FILE_HEADER_LEN: usize = 64;
/// Upper layer format version written by this build. Version 1 (data appended back to back)
/// is still read and appended to; version 2 starts every write's bytes at a 4 KiB boundary of
/// `data`, so block-sized writes fill whole pages and never read-modify-write one; version 3
/// (same layout) also reuses dead space in `data` (see `space.rs`), which older builds would
/// refuse after a crash, hence the new number. Versions 1 and 2 are still opened and extended
/// in their own rules.
pub const UPPER_VERSION: u16 = 3;

/// True when a layer of this version may put new writes in dead space of `data`.
pub fn reuses_space(version: u16) -> bool {
    version >= 3
}

/// Alignment of each write's bytes in `data` for a format version.
pub fn data_alignment(version: u16) -> u64 {
    if version >= 2 {
        4096
    } else {
        1
    }
}
/// Length of one log record.
pub const RECORD_LEN: usize = 48;

pub(crate) const DATA_MAGIC: &[u8; 8] = b"LSMUPDAT";
pub(crate) const LOG_MAGIC: &[u8; 8] = b"LSMUPLOG";

/// What a log record records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Write = 1,
    WriteZeroes = 2,
    Trim = 3,
    /// Everything before this record was durable when it was written.
    FlushMark = 4,
}

/// One index log record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub kind: RecordKind,
    pub seq: u64,
    pub offset: u64,
    pub len: u32,
    pub data_crc32c: u32,
    pub data_offset: u64,
}

impl Record {
    /// Serialises the record with its crc32c.
    pub fn encode(&self) -> [u8; RECORD_LEN] {
        let mut b = [0u8; RECORD_LEN];
        b[4] = self.kind as u8;
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..32].copy_from_slice(&self.data_crc32c.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_offset.to_le_bytes());
        let c = crc32c::crc32c(&b[4..]);
        b[0..4].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Parses a record; `None` if it is torn, corrupt or not a record.
    pub fn decode(b: &[u8]) -> Option<Record> {
        if b.len() != RECORD_LEN || le_u32(b, 0) != crc32c::crc32c(&b[4..]) {
            return None;
        }
        if b[5..8] != [0, 0, 0] || le_u64(b, 40) != 0 {
            return None;
        }
        let kind = match b[4] {
            1 => RecordKind::Write,
            2 => RecordKind::WriteZeroes,
            3 => RecordKind::Trim,
            4 => RecordKind::FlushMark,
            _ => return None,
        };
        Some(Record {
            kind,
            seq: le_u64(b, 8),
            offset: le_u64(b, 16),
            len: le_u32(b, 24),
            data_crc32c: le_u32(b, 28),
            data_offset: le_u64(b, 32),
        })
    }
}

/// The shared header of `data` and `index.log`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileHeader {
    /// Format version (1, 2 or 3).
    pub version: u16,
    pub pair_id: [u8; 16],
    /// Disk size (log only; 0 in `data`).
    pub logical_size: u64,
}

impl FileHeader {
    /// Serialises with the given magic.
    pub fn encode(&self, magic: &[u8; 8]) -> [u8; FILE_HEADER_LEN] {
        let mut b = [0u8; FILE_HEADER_LEN];
        b[0..8].copy_from_slice(magic);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&(FILE_HEADER_LEN as u16).to_le_bytes());
        b[16..32].copy_from_slice(&self.pair_id);
        b[32..40].copy_from_slice(&self.logical_size.to_le_bytes());
        let c = crc32c::crc32c(&b[..60]);
        b[60..64].copy_from_slice(&c.to_le_bytes());
        b
    }

    /// Parses a header with the given magic; the error says what is wrong.
    pub fn decode(b: &[u8], magic: &[u8; 8]) -> Result<FileHeader, String> {
        if b.len() < FILE_HEADER_LEN {
            return Err(format!(
                "header is {} bytes, want {FILE_HEADER_LEN}",
                b.len()
            ));
        }
        if &b[0..8] != magic {
            return Err("bad magic".into());
        }
        if le_u32(b, 60) != crc32c::crc32c(&b[..60]) {
            return Err("header crc32c mismatch".into());
        }
        let v = le_u16(b, 8);
        if !(1..=UPPER_VERSION).contains(&v) || le_u16(b, 10) as usize != FILE_HEADER_LEN {
            return Err(format!(
                "unsupported version {v} (this build reads 1..={UPPER_VERSION})"
            ));
        }
        let mut pair_id = [0u8; 16];
        pair_id.copy_from_slice(&b[16..32]);
        Ok(FileHeader {
            version: v,
            pair_id,
            logical_size: le_u64(b, 32),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]
        /// Fuzz: arbitrary bytes never panic the record and header parsers.
        #[test]
        fn fuzz_record_and_header(b in proptest::collection::vec(any::<u8>(), 0..80)) {
            let _ = Record::decode(&b);
            let _ = FileHeader::decode(&b, LOG_MAGIC);
            let _ = FileHeader::decode(&b, DATA_MAGIC);
        }

        /// Any single-byte change to a valid record is rejected.
        #[test]
        fn record_flip_is_rejected(seq in any::<u64>(), off in any::<u64>(), len in any::<u32>(), pos in 0usize..RECORD_LEN, x in 1u8..=255) {
            let r = Record { kind: RecordKind::Write, seq, offset: off, len, data_crc32c: 7, data_offset: 64 };
            let mut b = r.encode();
            prop_assert_eq!(Record::decode(&b), Some(r));
            b[pos] ^= x;
            prop_assert_eq!(Record::decode(&b), None);
        }
    }
}
