//! In-memory view of which graph nodes are live, and what searches need to know about them.
//!
//! Every graph node has a slot number (its data id in the graph). Slots are handed out once
//! and never reused: an update writes a new slot and tombstones the old one. Slot cells are
//! written once and then only flipped to dead, so searches read them without locks; the
//! list of chunks is behind a lock held only to clone or grow it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use crate::types::ItemKind;

/// Slots per chunk.
const CHUNK: usize = 4096;

/// What a search needs to turn a graph node into a hit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SlotInfo {
    /// Item id.
    pub id: String,
    /// Item kind.
    pub kind: ItemKind,
    /// Item metadata.
    pub metadata: BTreeMap<String, String>,
}

#[derive(Default)]
struct Cell {
    info: OnceLock<SlotInfo>,
    dead: AtomicBool,
}

type Chunks = Arc<Vec<Arc<[Cell]>>>;

/// Growable table of slot cells.
#[derive(Default)]
pub(crate) struct SlotTable {
    chunks: Arc<RwLock<Chunks>>,
}

/// A snapshot of the chunk list; cells stay shared, so later tombstones are visible. A slot
/// past the snapshot (published in a chunk added since) is looked up in the table's chunk
/// list as it is at the first such lookup, so that a search that sees the old version of a
/// replaced item tombstoned also sees the new one.
#[derive(Clone)]
pub(crate) struct SlotView {
    chunks: Chunks,
    table: Arc<RwLock<Chunks>>,
    later: OnceLock<Chunks>,
}

fn new_chunk() -> Arc<[Cell]> {
    (0..CHUNK).map(|_| Cell::default()).collect()
}

impl SlotTable {
    /// Current chunk list.
    pub fn view(&self) -> SlotView {
        SlotView {
            chunks: Arc::clone(&self.chunks.read()),
            table: Arc::clone(&self.chunks),
            later: OnceLock::new(),
        }
    }

    /// Makes `slot` live with `info`. A slot is published once; a second call is ignored.
    pub fn publish(&self, slot: u64, info: SlotInfo) {
        let slot = slot as usize;
        let chunk = slot / CHUNK;
        if self.chunks.read().len() <= chunk {
            let mut guard = self.chunks.write();
            let mut grown: Vec<_> = guard.as_ref().clone();
            while grown.len() <= chunk {
                grown.push(new_chunk());
            }
            *guard = Arc::new(grown);
        }

        let view = self.view();
        let _ = view.chunks[chunk][slot % CHUNK].info.set(info);
    }

    /// Tombstones `slot`; it will never be returned again.
    pub fn kill(&self, slot: u64) {
        if let Some(cell) = self.view().cell(slot as usize) {
            cell.dead.store(true, Ordering::Release);
        }
    }
}

impl SlotView {
    fn cell(&self, slot: usize) -> Option<&Cell> {
        let chunk = slot / CHUNK;
        let chunks = if chunk < self.chunks.len() {
            &self.chunks
        } else {
            self.later.get_or_init(|| Arc::clone(&self.table.read()))
        };
        chunks.get(chunk).map(|chunk| &chunk[slot % CHUNK])
    }

    /// The item at `slot` when it is published and not tombstoned.
    #[inline]
    pub fn live(&self, slot: usize) -> Option<&SlotInfo> {
        let cell = self.cell(slot)?;
        if cell.dead.load(Ordering::Acquire) {
            return None;
        }
        cell.info.get()
    }

    /// Number of slots the view covers (live or not).
    pub fn capacity(&self) -> usize {
        self.chunks.len() * CHUNK
    }

    /// The item published at `slot`, tombstoned or not: a search reports what it scored
    /// even when a write replaced or deleted it meanwhile.
    pub fn published(&self, slot: usize) -> Option<&SlotInfo> {
        self.cell(slot)?.info.get()
    }

    /// Every live slot with its item, in slot order.
    pub fn iter_live(&self) -> impl Iterator<Item = (u64, &SlotInfo)> + '_ {
        (0..self.capacity()).filter_map(|slot| self.live(slot).map(|info| (slot as u64, info)))
    }
}

/// Inverted lists from a metadata pair to the live slots carrying it.
#[derive(Default)]
pub(crate) struct Postings {
    lists: RwLock<HashMap<String, HashMap<String, BTreeSet<u64>>>>,
}

impl Postings {
    /// Indexes a live slot's metadata.
    pub fn add(&self, slot: u64, metadata: &BTreeMap<String, String>) {
        if metadata.is_empty() {
            return;
        }
        let mut lists = self.lists.write();
        for (key, value) in metadata {
            let values = lists.entry(key.clone()).or_default();
            values.entry(value.clone()).or_default().insert(slot);
        }
    }

    /// Removes a slot that is no longer live.
    pub fn remove(&self, slot: u64, metadata: &BTreeMap<String, String>) {
        if metadata.is_empty() {
            return;
        }
        let mut lists = self.lists.write();
        for (key, value) in metadata {
            let Some(values) = lists.get_mut(key) else {
                continue;
            };
            if let Some(slots) = values.get_mut(value) {
                slots.remove(&slot);
                if slots.is_empty() {
                    values.remove(value);
                }
            }
        }
    }

    /// Size of the rarest list of `wanted`: an upper bound on the live items matching every
    /// pair. `None` when `wanted` is empty.
    pub fn estimate(&self, wanted: &BTreeMap<String, String>) -> Option<usize> {
        let lists = self.lists.read();
        let mut best: Option<usize> = None;
        for (key, value) in wanted {
            let count = lists
                .get(key)
                .and_then(|values| values.get(value))
                .map_or(0, BTreeSet::len);
            best = Some(best.map_or(count, |b| b.min(count)));
        }
        best
    }

    /// The slots carrying every pair of `wanted`, in slot order, when there are at most
    /// `limit` of them; `None` when there are more. The two rarest lists are intersected in
    /// order (std's `BTreeSet::intersection`, which searches the longer list when the shorter
    /// is much shorter), each common slot is looked up in the other lists, and the walk stops
    /// at the first match past `limit`. Empty for an empty `wanted`.
    pub fn matching(&self, wanted: &BTreeMap<String, String>, limit: usize) -> Option<Vec<u64>> {
        let lists = self.lists.read();
        let mut sets = Vec::with_capacity(wanted.len());
        for (key, value) in wanted {
            let Some(slots) = lists.get(key).and_then(|values| values.get(value)) else {
                return Some(Vec::new());
            };
            sets.push(slots);
        }
        sets.sort_unstable_by_key(|slots| slots.len());
        let (common, others): (Box<dyn Iterator<Item = &u64>>, _) = match sets[..] {
            [] => return Some(Vec::new()),
            [only] => (Box::new(only.iter()), &[][..]),
            [rarest, next, ..] => (Box::new(rarest.intersection(next)), &sets[2..]),
        };

        let mut found = Vec::new();
        for &slot in common {
            if others.iter().all(|slots| slots.contains(&slot)) {
                if found.len() == limit {
                    return None;
                }
                found.push(slot);
            }
        }
        Some(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> SlotInfo {
        SlotInfo {
            id: id.to_string(),
            kind: ItemKind::Image,
            metadata: BTreeMap::new(),
        }
    }

    #[test]
    fn published_slots_are_live_until_killed() {
        let table = SlotTable::default();
        table.publish(5000, info("a"));
        let view = table.view();
        assert_eq!(view.live(5000).map(|i| i.id.as_str()), Some("a"));
        assert!(view.live(4999).is_none());
        assert!(view.live(1 << 40).is_none());

        table.kill(5000);
        assert!(
            view.live(5000).is_none(),
            "an older view must see the tombstone"
        );
        assert_eq!(table.view().iter_live().count(), 0);
    }

    #[test]
    fn postings_pick_the_rarest_pair() {
        let postings = Postings::default();
        let common = BTreeMap::from([("lang".to_string(), "en".to_string())]);
        let mut rare = common.clone();
        rare.insert("source".to_string(), "scan".to_string());
        for slot in 0..10 {
            postings.add(slot, &common);
        }
        postings.add(10, &rare);

        assert_eq!(postings.estimate(&common), Some(11));
        assert_eq!(postings.matching(&rare, usize::MAX), Some(vec![10]));
        postings.remove(10, &rare);
        assert_eq!(postings.estimate(&rare), Some(0));
        assert_eq!(postings.estimate(&BTreeMap::new()), None);
    }

    #[test]
    fn matching_intersects_the_lists_up_to_a_limit() {
        let postings = Postings::default();
        let pair = |k: &str, v: &str| (k.to_string(), v.to_string());
        for slot in 0..100u64 {
            let colour = if slot % 2 == 0 { "red" } else { "blue" };
            let size = if slot < 50 { "small" } else { "large" };
            let album = if slot % 10 == 3 { "x" } else { "y" };
            let pairs = [
                pair("colour", colour),
                pair("size", size),
                pair("album", album),
            ];
            postings.add(slot, &BTreeMap::from(pairs));
        }
        let wanted = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| pair(k, v)).collect()
        };

        let red_small = wanted(&[("colour", "red"), ("size", "small")]);
        let all: Vec<u64> = (0..50).step_by(2).collect();
        assert_eq!(postings.matching(&red_small, 25), Some(all.clone()));
        assert_eq!(
            postings.matching(&red_small, 24),
            None,
            "one past the limit"
        );
        assert_eq!(postings.matching(&red_small, usize::MAX), Some(all));

        let disjoint = wanted(&[("colour", "red"), ("album", "x")]);
        assert_eq!(postings.matching(&disjoint, 0), Some(vec![]));
        let three = wanted(&[("colour", "blue"), ("size", "large"), ("album", "x")]);
        assert_eq!(
            postings.matching(&three, 10),
            Some(vec![53, 63, 73, 83, 93])
        );
        let unknown = wanted(&[("colour", "red"), ("size", "huge")]);
        assert_eq!(postings.matching(&unknown, 0), Some(vec![]));
        assert_eq!(postings.matching(&BTreeMap::new(), 0), Some(vec![]));
    }
}
