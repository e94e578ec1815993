//! The host cache: fetched chunks on local disk, shared by every image on the host, bounded in
//! bytes, evicting the least recently used, and surviving restarts. One file per chunk, named by
//! its content key (`blockfmt::ChunkKey`), so a chunk two images share is stored once. Entries
//! carry their own checksum (FORMAT.md §5); the layer checks every entry in full again before
//! use, and a damaged one is discarded and fetched anew — never served.

pub mod fsmeta;
pub mod trace;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blockfmt::{ChunkKey, ChunkStore};
use parking_lot::Mutex;

use crate::error::{Error, Result};

/// Entry header length.
pub const ENTRY_HEADER_LEN: usize = 32;
const ENTRY_MAGIC: &[u8; 8] = b"LSMCACHE";
const ENTRY_VERSION: u16 = 1;

/// Encodes an entry file: header then `body`.
pub fn encode_entry(body: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; ENTRY_HEADER_LEN];
    b[0..8].copy_from_slice(ENTRY_MAGIC);
    b[8..10].copy_from_slice(&ENTRY_VERSION.to_le_bytes());
    b[10..12].copy_from_slice(&(ENTRY_HEADER_LEN as u16).to_le_bytes());
    b[12..16].copy_from_slice(&(body.len() as u32).to_le_bytes());
    b[16..20].copy_from_slice(&crc32c::crc32c(body).to_le_bytes());
    let c = crc32c::crc32c(&b[..28]);
    b[28..32].copy_from_slice(&c.to_le_bytes());
    b.extend_from_slice(body);
    b
}

/// The body of an entry file, if the header and body check out.
pub fn decode_entry(b: &[u8]) -> Option<&[u8]> {
    let h = b.get(..ENTRY_HEADER_LEN)?;
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    if &h[0..8] != ENTRY_MAGIC
        || u16::from_le_bytes([h[8], h[9]]) != ENTRY_VERSION
        || u16::from_le_bytes([h[10], h[11]]) as usize != ENTRY_HEADER_LEN
        || u32_at(28) != crc32c::crc32c(&h[..28])
    {
        return None;
    }
    let body = &b[ENTRY_HEADER_LEN..];
    (body.len() == u32_at(12) as usize && crc32c::crc32c(body) == u32_at(16)).then_some(body)
}

struct Index {
    /// key → (file bytes, last use tick)
    entries: HashMap<ChunkKey, (u64, u64)>,
    /// last use tick → key: the eviction order
    lru: BTreeMap<u64, ChunkKey>,
    bytes: u64,
    tick: u64,
}

impl Index {
    fn touch(&mut self, k: &ChunkKey) {
        self.tick += 1;
        let t = self.tick;
        if let Some(e) = self.entries.get_mut(k) {
            self.lru.remove(&e.1);
            e.1 = t;
            self.lru.insert(t, *k);
        }
    }

    fn remove(&mut self, k: &ChunkKey) -> bool {
        match self.entries.remove(k) {
            Some((size, t)) => {
                self.lru.remove(&t);
                self.bytes -= size;
                true
            }
            None => false,
        }
    }
}

/// Counters for the metrics endpoint and `lsmctl status`.
#[derive(Default, Debug)]
pub struct CacheStats {
    pub hits: AtomicU64,
    pub misses: AtomicU64,
    pub inserted_bytes: AtomicU64,
    pub evictions: AtomicU64,
    /// Entries that failed a check when read back (and were dropped).
    pub discarded: AtomicU64,
}

/// The on-disk chunk cache; see the module docs. Thread-safe.
pub struct DiskCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    /// Counters since the daemon started.
    pub stats: CacheStats,
}

impl DiskCache {
    /// Opens (or creates) the cache in `dir`, bounded to `limit` bytes of entry files. Entries
    /// left by an earlier run are kept (least recently modified evicted first); stray files
    /// are removed.
    pub fn open(dir: &Path, limit: u64) -> Result<DiskCache> {
        let io = |e| Error::Io {
            path: dir.to_path_buf(),
            source: e,
        };
        fs::create_dir_all(dir.join("tmp")).map_err(io)?;
        for t in fs::read_dir(dir.join("tmp")).map_err(io)?.flatten() {
            let _ = fs::remove_file(t.path());
        }
        let mut found: Vec<(std::time::SystemTime, ChunkKey, u64)> = Vec::new();
        for sub in fs::read_dir(dir).map_err(io)?.flatten() {
            if sub.file_name() == "tmp" || !sub.path().is_dir() {
                continue;
            }
            for f in fs::read_dir(sub.path()).map_err(io)?.flatten() {
                let name = f.file_name();
                let key = name.to_str().and_then(ChunkKey::parse);
                match (key, f.metadata()) {
                    (Some(k), Ok(m)) if m.is_file() => {
                        found.push((m.modified().unwrap_or(std::time::UNIX_EPOCH), k, m.len()))
                    }
                    _ => {
                        let _ = fs::remove_file(f.path());
                    }
                }
            }
        }
        found.sort();
        let mut index = Index {
            entries: HashMap::new(),
            lru: BTreeMap::new(),
            bytes: 0,
            tick: 0,
        };
        for (_, k, size) in found {
            index.tick += 1;
            index.entries.insert(k, (size, index.tick));
            index.lru.insert(index.tick, k);
            index.bytes += size;
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            limit,
            index: Mutex::new(index),
            stats: CacheStats::default(),
        };
        cache.evict_to(limit);
        Ok(cache)
    }

    fn path(&self, k: &ChunkKey) -> PathBuf {
        let name = k.name();
        self.dir.join(&name[..2]).join(name)
    }

    /// Bytes of entry files held.
    pub fn bytes(&self) -> u64 {
        self.index.lock().bytes
    }
    /// Entries held.
    pub fn len(&self) -> usize {
        self.index.lock().entries.len()
    }
    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Bytes of the entry file for `k`, if held.
    pub fn entry_bytes(&self, k: &ChunkKey) -> Option<u64> {
        self.index.lock().entries.get(k).map(|e| e.0)
    }
    /// The size bound.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    fn evict_to(&self, target: u64) {
        loop {
            let victim = {
                let mut ix = self.index.lock();
                if ix.bytes <= target {
                    return;
                }
                let Some((_, k)) = ix.lru.pop_first() else {
                    return;
                };
                if let Some((size, _)) = ix.entries.remove(&k) {
                    ix.bytes -= size;
                }
                k
            };
            self.stats.evictions.fetch_add(1, Ordering::Relaxed);
            let _ = fs::remove_file(self.path(&victim));
        }
    }

    fn write_entry(&self, k: &ChunkKey, stored: &[u8]) -> std::io::Result<u64> {
        let file = encode_entry(stored);
        let path = self.path(k);
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent)?;
        }
        let tmp = self
            .dir
            .join("tmp")
            .join(format!("{}.{:x}", k.name(), rand_suffix()));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(&file)?;
        drop(f);
        fs::rename(&tmp, &path).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })?;
        Ok(file.len() as u64)
    }
}

fn rand_suffix() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    );
    h.finish()
}

impl ChunkStore for DiskCache {
    fn get(&self, k: &ChunkKey) -> Option<Vec<u8>> {
        if !self.index.lock().entries.contains_key(k) {
            self.stats.misses.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let body = fs::read(self.path(k))
            .ok()
            .and_then(|b| decode_entry(&b).map(<[u8]>::to_vec));
        match body {
            Some(b) => {
                self.stats.hits.fetch_add(1, Ordering::Relaxed);
                self.index.lock().touch(k);
                Some(b)
            }
            None => {
                // Gone or damaged on disk: forget it; the caller fetches from the source.
                self.discard(k);
                self.stats.misses.fetch_add(1, Ordering::Relaxed);
                None
            }
        }
    }

    fn put(&self, k: &ChunkKey, stored: &[u8]) {
        if self.index.lock().entries.contains_key(k) {
            return;
        }
        let size = (ENTRY_HEADER_LEN + stored.len()) as u64;
        if size > self.limit {
            return;
        }
        self.evict_to(self.limit - size);
        match self.write_entry(k, stored) {
            Ok(size) => {
                let mut ix = self.index.lock();
                ix.tick += 1;
                let t = ix.tick;
                if let Some((old, ot)) = ix.entries.insert(*k, (size, t)) {
                    ix.lru.remove(&ot);
                    ix.bytes -= old;
                }
                ix.lru.insert(t, *k);
                ix.bytes += size;
                drop(ix);
                self.stats.inserted_bytes.fetch_add(size, Ordering::Relaxed);
                self.evict_to(self.limit);
            }
            Err(e) => {
                tracing::warn!(cache = %self.dir.display(), error = %e, "cannot keep a chunk")
            }
        }
    }

    fn contains(&self, k: &ChunkKey) -> bool {
        self.index.lock().entries.contains_key(k)
    }

    fn discard(&self, k: &ChunkKey) {
        if self.index.lock().remove(k) {
            self.stats.discarded.fetch_add(1, Ordering::Relaxed);
        }
        let _ = fs::remove_file(self.path(k));
    }
}

/// An image of one layer imported from `disk` (for the tests of the cache modules).
#[cfg(test)]
pub(crate) fn test_image(disk: &[u8]) -> blockfmt::Image {
    let (_, blob) = blockfmt::commit::import_raw(
        disk,
        disk.len() as u64,
        None,
        None,
        Vec::new(),
        Default::default(),
        |_| {},
    )
    .expect("import");
    let l = blockfmt::Layer::open("t", std::sync::Arc::new(blob), None).expect("open");
    let s = blockfmt::LayerStack::new(vec![l], disk.len() as u64, 1 << 20).expect("stack");
    blockfmt::Image::new(s, None).expect("image")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn key(i: u8) -> ChunkKey {
        ChunkKey {
            sha256: [i; 32],
            crc32c: i as u32,
            stored_len: 1000,
        }
    }

    #[test]
    fn keeps_entries_across_reopen_and_stays_under_its_limit() {
        let tmp = tempfile::tempdir().expect("tmp");
        let c = DiskCache::open(tmp.path(), 10_000).expect("open");
        for i in 0..20u8 {
            c.put(&key(i), &[i; 1000]);
            assert!(c.bytes() <= 10_000);
        }
        assert_eq!(c.get(&key(19)).as_deref(), Some(&[19u8; 1000][..]));
        assert!(c.get(&key(0)).is_none(), "oldest evicted");
        drop(c);
        let c = DiskCache::open(tmp.path(), 10_000).expect("reopen");
        assert_eq!(c.get(&key(19)).as_deref(), Some(&[19u8; 1000][..]));
        // A smaller limit on reopen evicts down to it.
        drop(c);
        let c = DiskCache::open(tmp.path(), 3_000).expect("reopen smaller");
        assert!(c.bytes() <= 3_000 && !c.is_empty());
    }

    #[test]
    fn a_damaged_entry_is_not_returned() {
        let tmp = tempfile::tempdir().expect("tmp");
        let c = DiskCache::open(tmp.path(), 1 << 20).expect("open");
        c.put(&key(1), &[1; 1000]);
        let p = c.path(&key(1));
        let mut b = fs::read(&p).expect("read");
        b[500] ^= 1;
        fs::write(&p, b).expect("write");
        assert!(c.get(&key(1)).is_none());
        assert!(!p.exists(), "damaged entry removed");
        assert_eq!(c.stats.discarded.load(Ordering::Relaxed), 1);
    }

    proptest! {
        /// Fuzz: the entry parser never panics and rejects any single flipped byte.
        #[test]
        fn entry_parser(body in proptest::collection::vec(any::<u8>(), 0..300), pos in any::<usize>(), x in 1u8..=255, junk in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut e = encode_entry(&body);
            prop_assert_eq!(decode_entry(&e), Some(&body[..]));
            let p = pos % e.len();
            e[p] ^= x;
            prop_assert_eq!(decode_entry(&e), None);
            let _ = decode_entry(&junk);
        }
    }
}
