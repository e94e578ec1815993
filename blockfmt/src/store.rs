//! The seam between a layer and a host-wide store of fetched chunks (lsmd's on-disk cache). A
//! chunk is named by what it is, not where it came from, so the same chunk in two blobs or two
//! images is kept once. The store only ever holds bytes that passed every check, and whatever it
//! hands back is checked again before use: a damaged entry is dropped and fetched anew.

use crate::format::ChunkEntry;

/// Content name of a stored chunk: the sha256 of its decoded bytes plus the crc32c and length of
/// its stored (compressed) bytes, which tell two encodings of the same content apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkKey {
    pub sha256: [u8; 32],
    pub crc32c: u32,
    pub stored_len: u32,
}

impl ChunkKey {
    /// The key of a chunk table entry.
    pub fn of(e: &ChunkEntry) -> ChunkKey {
        ChunkKey {
            sha256: e.sha256,
            crc32c: e.crc32c,
            stored_len: e.stored_len,
        }
    }

    /// `<sha256 hex>-<crc32c hex>-<stored_len>`: a file name.
    pub fn name(&self) -> String {
        format!(
            "{}-{:08x}-{}",
            hex::encode(self.sha256),
            self.crc32c,
            self.stored_len
        )
    }

    /// Parses [`Self::name`]; `None` for anything else.
    pub fn parse(s: &str) -> Option<ChunkKey> {
        let mut it = s.split('-');
        let (h, c, l) = (it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || h.len() != 64 || c.len() != 8 {
            return None;
        }
        let mut sha256 = [0u8; 32];
        hex::decode_to_slice(h, &mut sha256).ok()?;
        let key = ChunkKey {
            sha256,
            crc32c: u32::from_str_radix(c, 16).ok()?,
            stored_len: l.parse().ok()?,
        };
        (key.name() == s).then_some(key)
    }
}

/// A store of verified stored-chunk bytes, shared by layers.
pub trait ChunkStore: Send + Sync {
    /// The stored bytes kept under `key`, if any (to be checked by the caller).
    fn get(&self, key: &ChunkKey) -> Option<Vec<u8>>;
    /// Keeps `stored` (already checked) under `key`; failures only cost a later refetch.
    fn put(&self, key: &ChunkKey, stored: &[u8]);
    /// Drops an entry that failed its check.
    fn discard(&self, key: &ChunkKey);
    /// Whether an entry is kept under `key` (a hint, without reading it: a layer fetching
    /// neighbouring chunks together skips those kept). Default: unknown, so `false`.
    fn contains(&self, _key: &ChunkKey) -> bool {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Fuzz: names round-trip; arbitrary strings never panic the parser.
        #[test]
        fn names_round_trip(sha in any::<[u8; 32]>(), crc in any::<u32>(), len in any::<u32>(), junk in ".{0,80}") {
            let k = ChunkKey { sha256: sha, crc32c: crc, stored_len: len };
            prop_assert_eq!(ChunkKey::parse(&k.name()), Some(k));
            let _ = ChunkKey::parse(&junk);
        }
    }
}
