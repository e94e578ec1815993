//! A bounded in-memory cache of decoded, verified chunks, so hot chunks are decoded once.
//! Sharded by key so concurrent readers rarely meet on a lock; each shard evicts by CLOCK
//! (second chance), which keeps frequently read chunks without an LRU list update on every hit.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hash};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Most shards a cache is split into.
const MAX_SHARDS: usize = 16;
/// Fewest largest-size entries one shard must be able to hold; small caches get fewer shards
/// rather than shards too small to keep anything.
const ENTRIES_PER_SHARD: usize = 4;

struct Shard<K> {
    map: HashMap<K, (Arc<Vec<u8>>, bool)>,
    clock: VecDeque<K>,
    bytes: usize,
}

/// Decoded-chunk cache keyed by `K`, bounded by total bytes.
pub struct ChunkCache<K> {
    shards: Vec<Mutex<Shard<K>>>,
    /// Each shard's share of the limit; only ever raised ([`Self::reserve`]).
    shard_limit: AtomicUsize,
    hasher: std::collections::hash_map::RandomState,
}

impl<K: Hash + Eq + Clone> ChunkCache<K> {
    /// A cache holding at most about `limit_bytes` of decoded data (0 disables caching), for
    /// entries of at most `max_entry` bytes.
    pub fn new(limit_bytes: usize, max_entry: usize) -> Self {
        let shards = (limit_bytes / (ENTRIES_PER_SHARD * max_entry.max(1))).clamp(1, MAX_SHARDS);
        ChunkCache {
            shards: (0..shards)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                        clock: VecDeque::new(),
                        bytes: 0,
                    })
                })
                .collect(),
            shard_limit: AtomicUsize::new(limit_bytes / shards),
            hasher: Default::default(),
        }
    }

    fn shard(&self, k: &K) -> &Mutex<Shard<K>> {
        &self.shards[self.hasher.hash_one(k) as usize % self.shards.len()]
    }

    /// The cached chunk, marking it recently used.
    pub fn get(&self, k: &K) -> Option<Arc<Vec<u8>>> {
        let mut s = self.shard(k).lock();
        s.map.get_mut(k).map(|(v, used)| {
            *used = true;
            v.clone()
        })
    }

    /// Adds a chunk, evicting others if the shard is over its share of the limit.
    pub fn insert(&self, k: K, v: Arc<Vec<u8>>) {
        let shard_limit = self.shard_limit.load(Ordering::Relaxed);
        if v.len() > shard_limit {
            return;
        }
        let mut s = self.shard(&k).lock();
        let s = &mut *s;
        if s.map.contains_key(&k) {
            return;
        }
        s.bytes += v.len();
        s.map.insert(k.clone(), (v, false));
        s.clock.push_back(k);
        while s.bytes > shard_limit {
            let Some(victim) = s.clock.pop_front() else {
                break;
            };
            match s.map.get_mut(&victim) {
                Some((_, used)) if *used => {
                    *used = false;
                    s.clock.push_back(victim);
                }
                Some(_) => {
                    if let Some((v, _)) = s.map.remove(&victim) {
                        s.bytes -= v.len();
                    }
                }
                None => {}
            }
        }
    }

    /// Raises the limit to about `limit_bytes` if it is lower (never lowers it): room for what
    /// a host knows readers are about to need, such as a startup trace it prefetches.
    pub fn reserve(&self, limit_bytes: usize) {
        let share = limit_bytes / self.shards.len();
        self.shard_limit.fetch_max(share, Ordering::Relaxed);
    }

    /// The limit, bytes.
    pub fn limit(&self) -> usize {
        self.shard_limit.load(Ordering::Relaxed) * self.shards.len()
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.shards.iter().map(|s| s.lock().bytes).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_within_limit_and_keeps_hot_entries() {
        let c = ChunkCache::new(16 * 64 * 1024, 4096);
        for i in 0..1000u32 {
            c.insert(i, Arc::new(vec![0u8; 4096]));
            assert!(c.get(&0).is_some() || i < 16, "hot entry evicted at {i}");
        }
        assert!(c.bytes() <= 16 * 64 * 1024);
    }

    #[test]
    fn reserve_raises_the_limit_and_never_lowers_it() {
        let c: ChunkCache<u32> = ChunkCache::new(1 << 20, 1000);
        for i in 0..4000 {
            c.insert(i, Arc::new(vec![0; 1000]));
        }
        assert!(c.bytes() <= 1 << 20);
        c.reserve(8 << 20);
        assert!(c.limit() >= (8 << 20) - 16);
        for i in 0..4000 {
            c.insert(i, Arc::new(vec![0; 1000]));
        }
        assert_eq!(c.bytes(), 4000 * 1000, "all of them fit now");
        c.reserve(1 << 10);
        assert!(c.limit() >= (8 << 20) - 16, "never lowered");
    }

    #[test]
    fn a_small_cache_still_holds_large_entries() {
        let c = ChunkCache::new(1 << 20, 128 << 10);
        for i in 0..8u32 {
            c.insert(i, Arc::new(vec![0u8; 128 << 10]));
        }
        assert!(c.get(&7).is_some());
        assert!(c.bytes() <= 1 << 20);
    }
}
