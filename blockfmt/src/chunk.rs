//! Encoding and checked decoding of one chunk. `decode` is the only way stored bytes become data,
//! and it returns nothing unless the crc32c of the stored bytes, the decoded length and the sha256
//! of the decoded bytes all match the chunk table entry.

use crate::error::{Error, Result};
use crate::format::{sha256, ChunkEntry, Codec};

/// How chunks are compressed when written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Store chunks as they are.
    None,
    /// zstd at this level (1..=22; 6 is the default, see FORMAT.md §1.4).
    Zstd(i32),
}

/// Default zstd level: layers are written once and read many times, and zstd decodes as fast
/// at 6 as at 3 (FORMAT.md §1.4 has the figures).
pub const DEFAULT_LEVEL: i32 = 6;

impl Default for Compression {
    fn default() -> Self {
        Compression::Zstd(DEFAULT_LEVEL)
    }
}

/// Encodes `raw` into stored bytes and a chunk entry (offset and blob left for the caller).
/// A zstd frame that would not be smaller than the input is stored uncompressed instead.
pub fn encode(raw: &[u8], compression: Compression) -> Result<(Vec<u8>, ChunkEntry)> {
    let (codec, stored) = match compression {
        Compression::None => (Codec::None, raw.to_vec()),
        Compression::Zstd(level) => {
            let z = zstd::bulk::compress(raw, level)
                .map_err(|e| Error::Invalid(format!("zstd level {level}: {e}")))?;
            if z.len() < raw.len() {
                (Codec::Zstd, z)
            } else {
                (Codec::None, raw.to_vec())
            }
        }
    };
    let entry = ChunkEntry {
        blob: 0,
        codec,
        stored_len: stored.len() as u32,
        raw_len: raw.len() as u32,
        offset: 0,
        crc32c: crc32c::crc32c(&stored),
        sha256: sha256(raw),
    };
    Ok((stored, entry))
}

/// Whether `decode` also checks the sha256 of the decoded bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// crc32c of stored bytes, decoded length, and sha256 of decoded bytes (the default).
    #[default]
    Full,
    /// crc32c and decoded length only: for a local file already verified in full by `lsmctl
    /// verify`. Still catches every accidental single-byte corruption.
    CrcOnly,
}

/// Decodes the stored bytes of chunk `index` and checks them. `layer` names the blob in errors.
pub fn decode(
    entry: &ChunkEntry,
    stored: &[u8],
    index: u32,
    layer: &str,
    verify: Verify,
) -> Result<Vec<u8>> {
    let bad = |detail: String| {
        Error::corrupt(
            layer,
            "chunk",
            entry.offset,
            format!("chunk {index}: {detail}"),
        )
    };
    if stored.len() != entry.stored_len as usize {
        return Err(bad(format!(
            "{} stored bytes, want {}",
            stored.len(),
            entry.stored_len
        )));
    }
    let crc = crc32c::crc32c(stored);
    if crc != entry.crc32c {
        return Err(bad(format!(
            "crc32c mismatch (stored {:#010x}, computed {crc:#010x})",
            entry.crc32c
        )));
    }
    let raw = match entry.codec {
        Codec::None if stored.len() != entry.raw_len as usize => {
            return Err(bad(format!(
                "{} stored bytes for an uncompressed chunk of {}",
                stored.len(),
                entry.raw_len
            )))
        }
        Codec::None => stored.to_vec(),
        Codec::Zstd => {
            let mut out = vec![0u8; entry.raw_len as usize];
            let n = zstd::bulk::decompress_to_buffer(stored, &mut out)
                .map_err(|e| bad(format!("zstd: {e}")))?;
            if n != out.len() {
                return Err(bad(format!("decoded {n} bytes, want {}", entry.raw_len)));
            }
            out
        }
    };
    if verify == Verify::Full && sha256(&raw) != entry.sha256 {
        return Err(bad(
            "sha256 of decoded bytes does not match the chunk table".into(),
        ));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let raw: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        for c in [Compression::None, Compression::Zstd(3)] {
            let (stored, e) = encode(&raw, c).unwrap();
            assert_eq!(decode(&e, &stored, 0, "t", Verify::Full).unwrap(), raw);
            for pos in (0..stored.len()).step_by(97) {
                let mut s = stored.clone();
                s[pos] ^= 0x40;
                assert!(decode(&e, &s, 0, "t", Verify::CrcOnly).is_err());
            }
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2048))]
        /// Fuzz: hostile stored bytes that pass the crc (so they reach the zstd decoder) with any
        /// claimed decoded length give an error or exactly that many verified bytes.
        #[test]
        fn fuzz_decode(stored in proptest::collection::vec(proptest::prelude::any::<u8>(), 1..300), raw_len in 1u32..100_000, zstd in proptest::prelude::any::<bool>()) {
            let mut e = ChunkEntry {
                blob: 0,
                codec: if zstd { Codec::Zstd } else { Codec::None },
                stored_len: stored.len() as u32,
                raw_len,
                offset: 64,
                crc32c: crc32c::crc32c(&stored),
                sha256: [0; 32],
            };
            if let Ok(out) = decode(&e, &stored, 0, "fuzz", Verify::CrcOnly) {
                proptest::prop_assert_eq!(out.len(), raw_len as usize);
                e.sha256 = sha256(&out);
                proptest::prop_assert!(decode(&e, &stored, 0, "fuzz", Verify::Full).is_ok());
            }
            // A valid frame with a wrong claimed length is refused.
            let (z, mut good) = encode(&stored, Compression::Zstd(3)).unwrap();
            good.raw_len = raw_len;
            if raw_len as usize != stored.len() {
                proptest::prop_assert!(decode(&good, &z, 0, "fuzz", Verify::CrcOnly).is_err());
            }
        }
    }

    #[test]
    fn incompressible_data_is_stored_raw() {
        let raw: Vec<u8> = (0..4096).map(|_| rand::random::<u8>()).collect();
        let (_, e) = encode(&raw, Compression::Zstd(3)).unwrap();
        assert_eq!(e.codec, Codec::None);
    }
}
