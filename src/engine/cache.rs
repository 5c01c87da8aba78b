//! The rerank feature cache: each image item's full vision token sequence, in f16, kept
//! under a byte budget and evicted least recently used first.
//!
//! It is filled when images are ingested and consulted by rerank, match, caption and
//! VQA requests that name a stored item; a miss is recomputed by the caller from the
//! image stored in the index and inserted again. Each entry carries the content hash of the
//! image it was computed from, so a caller can tell an entry that outlived a replacement or
//! a delete of its item from a current one.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::backend::VisionTokens;

/// Counters and sizes of the cache.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CacheStats {
    /// Lookups that found an entry.
    pub hits: u64,
    /// Lookups that found nothing.
    pub misses: u64,
    /// Entries held.
    pub entries: u64,
    /// Bytes held by the entries' values.
    pub bytes: u64,
    /// Byte budget.
    pub budget: u64,
}

impl CacheStats {
    /// Hits over lookups; 0 before the first lookup.
    pub fn hit_ratio(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            return 0.0;
        }
        self.hits as f64 / lookups as f64
    }
}

/// Content hash of the image an entry was computed from.
pub type ContentHash = [u8; 32];

#[derive(Debug)]
struct Entry {
    tokens: Arc<VisionTokens>,
    hash: ContentHash,
    stamp: u64,
}

#[derive(Debug, Default)]
struct Lru {
    entries: HashMap<String, Entry>,
    order: BTreeMap<u64, String>,
    clock: u64,
    bytes: usize,
}

impl Lru {
    fn touch(&mut self, id: &str) -> Option<(Arc<VisionTokens>, ContentHash)> {
        self.clock += 1;
        let clock = self.clock;
        let entry = self.entries.get_mut(id)?;
        let old = std::mem::replace(&mut entry.stamp, clock);
        let found = (Arc::clone(&entry.tokens), entry.hash);
        self.order.remove(&old);
        self.order.insert(clock, id.to_owned());
        Some(found)
    }

    fn remove(&mut self, id: &str) {
        if let Some(entry) = self.entries.remove(id) {
            self.order.remove(&entry.stamp);
            self.bytes -= entry.tokens.byte_size();
        }
    }

    fn evict_oldest(&mut self) -> bool {
        let Some((_, id)) = self.order.pop_first() else {
            return false;
        };
        if let Some(entry) = self.entries.remove(&id) {
            self.bytes -= entry.tokens.byte_size();
        }
        true
    }
}

/// Bounded, thread-safe LRU cache from item id to vision tokens.
#[derive(Debug)]
pub struct FeatureCache {
    lru: Mutex<Lru>,
    budget: usize,
    hits: AtomicU64,
    misses: AtomicU64,
}

impl FeatureCache {
    /// An empty cache holding at most `budget` bytes of token values (0 disables it).
    pub fn new(budget: usize) -> Self {
        Self {
            lru: Mutex::new(Lru::default()),
            budget,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
        }
    }

    /// The entry for `id` and the content hash it was computed from, marking it recently
    /// used; counts a hit or a miss.
    pub fn get(&self, id: &str) -> Option<(Arc<VisionTokens>, ContentHash)> {
        let found = self.lock().touch(id);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Stores `tokens`, computed from the image whose content hash is `hash`, for `id`,
    /// replacing any previous entry and evicting the least recently used entries until the
    /// budget holds. An entry larger than the whole budget is not stored.
    pub fn insert(&self, id: &str, hash: ContentHash, tokens: Arc<VisionTokens>) {
        let size = tokens.byte_size();
        let mut lru = self.lock();
        lru.remove(id);
        if size > self.budget {
            return;
        }
        while lru.bytes + size > self.budget && lru.evict_oldest() {}

        lru.clock += 1;
        let clock = lru.clock;
        lru.bytes += size;
        lru.order.insert(clock, id.to_owned());
        let entry = Entry {
            tokens,
            hash,
            stamp: clock,
        };
        lru.entries.insert(id.to_owned(), entry);
    }

    /// Forgets `id` (after a delete or a content change).
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Current counters and sizes.
    pub fn stats(&self) -> CacheStats {
        let lru = self.lock();
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            entries: lru.entries.len() as u64,
            bytes: lru.bytes as u64,
            budget: self.budget as u64,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Lru> {
        // A panic while holding the lock cannot leave the map inconsistent in a way that
        // matters more than losing the cache, so a poisoned lock is simply reused.
        self.lru
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: ContentHash = [7; 32];

    fn tokens(n: usize) -> Arc<VisionTokens> {
        let values = vec![0.5_f32; n];
        Arc::new(VisionTokens::from_f32(&values, n, 1).expect("length matches by construction"))
    }

    #[test]
    fn evicts_least_recently_used_first_within_budget() {
        let cache = FeatureCache::new(3 * 8);
        cache.insert("a", HASH, tokens(4));
        cache.insert("b", HASH, tokens(4));
        cache.insert("c", HASH, tokens(4));
        assert!(cache.get("a").is_some());

        cache.insert("d", HASH, tokens(4));
        assert!(cache.get("b").is_none(), "b was the least recently used");
        assert!(cache.get("a").is_some());
        assert!(cache.get("c").is_some());
        assert!(cache.get("d").is_some());
        assert_eq!(cache.stats().bytes, 24);
    }

    #[test]
    fn replacing_an_entry_frees_its_old_bytes() {
        let cache = FeatureCache::new(100);
        cache.insert("a", HASH, tokens(10));
        cache.insert("a", HASH, tokens(20));
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes), (1, 40));

        cache.remove("a");
        assert_eq!(cache.stats().bytes, 0);
    }

    #[test]
    fn oversized_entry_is_not_stored_and_zero_budget_disables() {
        let cache = FeatureCache::new(10);
        cache.insert("big", HASH, tokens(6));
        assert!(cache.get("big").is_none());

        let disabled = FeatureCache::new(0);
        disabled.insert("a", HASH, tokens(1));
        assert_eq!(disabled.stats().entries, 0);
    }

    #[test]
    fn an_entry_returns_the_hash_it_was_stored_with() {
        let cache = FeatureCache::new(100);
        cache.insert("a", HASH, tokens(1));
        cache.insert("a", [9; 32], tokens(2));
        let (found, hash) = cache.get("a").expect("stored");
        assert_eq!((found.byte_size(), hash), (4, [9; 32]));
    }

    #[test]
    fn hit_ratio_counts_lookups() {
        let cache = FeatureCache::new(100);
        assert_eq!(cache.stats().hit_ratio(), 0.0);
        cache.insert("a", HASH, tokens(1));
        cache.get("a");
        cache.get("missing");
        cache.get("a");
        cache.get("a");
        assert!((cache.stats().hit_ratio() - 0.75).abs() < 1e-9);
    }
}
