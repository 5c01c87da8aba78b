//! Search planning: graph walk, filtered graph walk, or exact scan of the matching items.

use std::cmp::Ordering as CmpOrdering;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use rayon::prelude::*;

use crate::collection::{Collection, Inner};
use crate::error::{Error, Result};
use crate::slots::{SlotInfo, SlotView};
use crate::types::{Filter, Hit, ItemKind, Metric, SearchRequest};
use crate::vector;

/// Largest accepted `k`.
pub const MAX_K: usize = 10_000;
/// Largest accepted `ef`.
pub const MAX_EF: usize = 100_000;
/// Candidate lists longer than this are scored on the rayon pool.
const PARALLEL_SCAN_MIN: usize = 8_192;

/// How a search will find its hits.
enum Plan {
    /// Walk the graph; `filtered` when a user filter restricts the result.
    Graph { filtered: bool },
    /// Score these candidate slots exactly.
    Exact(Vec<u64>),
}

impl Collection {
    /// The `k` best live items for the query, best first, among those the filter accepts.
    ///
    /// Without a filter the graph is walked with `ef` (default `ef_search`). With a filter
    /// that few items match (at most `exact_scan_max_matches`, or less than
    /// `exact_scan_fraction` of the collection) the matching items are scored exactly;
    /// otherwise the graph walk skips non-matching nodes, and an exact scan completes the
    /// answer if the walk finds fewer than `k`. `exact: true` always scans.
    ///
    /// Errors: [`Error::InvalidArgument`] for `k` outside 1..=[`MAX_K`] or `ef` outside
    /// 1..=[`MAX_EF`]; vector errors as for upserts, with the id `<query>`.
    pub fn search(&self, request: &SearchRequest<'_>) -> Result<Vec<Hit>> {
        self.inner.search(request)
    }
}

fn check_request(request: &SearchRequest<'_>) -> Result<()> {
    if !(1..=MAX_K).contains(&request.k) {
        let reason = format!("k = {}, expected 1..={MAX_K}", request.k);
        return Err(Error::invalid("k", reason));
    }
    if let Some(ef) = request.ef.filter(|ef| !(1..=MAX_EF).contains(ef)) {
        return Err(Error::invalid(
            "ef",
            format!("ef = {ef}, expected 1..={MAX_EF}"),
        ));
    }
    Ok(())
}

fn by_score(a: &(f32, u64), b: &(f32, u64)) -> CmpOrdering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

impl Inner {
    fn search(&self, request: &SearchRequest<'_>) -> Result<Vec<Hit>> {
        check_request(request)?;
        let (dimension, metric) = (self.settings.dimension, self.settings.metric);
        let (query, norm) = vector::prepare("<query>", request.vector, dimension, metric, true)?;
        let scale = if metric == Metric::InnerProduct {
            norm
        } else {
            1.0
        };
        let view = self.slots.view();
        let filter = &request.filter;

        let plan = if request.exact {
            Plan::Exact(self.candidates(&view, filter))
        } else {
            self.plan(&view, filter)
        };
        let scored = match plan {
            Plan::Exact(candidates) => self.scan(&view, &query, filter, &candidates, request.k)?,
            Plan::Graph { filtered } => {
                let ef = request.ef.unwrap_or(self.settings.hnsw.ef_search);
                let found = self.walk(&view, &query, request.k, ef, filtered.then_some(filter));
                self.complete(&view, &query, filter, request.k, found)?
            }
        };
        Ok(self.hits(&view, scored, scale))
    }

    /// Upper bound on the live items the filter accepts.
    fn estimate(&self, filter: &Filter) -> usize {
        let by_kind = match &filter.kinds {
            None => self.live_count(),
            Some(kinds) => [ItemKind::Image, ItemKind::Text]
                .into_iter()
                .filter(|k| kinds.contains(k))
                .map(|k| self.kind_count(k))
                .sum(),
        };
        let by_metadata = self
            .postings
            .estimate(&filter.metadata)
            .unwrap_or(usize::MAX);
        by_kind.min(by_metadata)
    }

    fn kind_count(&self, kind: ItemKind) -> usize {
        let count = match kind {
            ItemKind::Image => &self.images,
            ItemKind::Text => &self.texts,
        };
        count.load(Ordering::Relaxed) as usize
    }

    /// An exact scan when few items can match: the upper bound of [`Self::estimate`] is
    /// within [`Self::exact_limit`], or (for several metadata pairs, each common) their
    /// intersection is; a graph walk otherwise.
    fn plan(&self, view: &SlotView, filter: &Filter) -> Plan {
        if filter.is_empty() {
            return Plan::Graph { filtered: false };
        }
        let limit = self.exact_limit();
        if self.estimate(filter) <= limit {
            return Plan::Exact(self.candidates(view, filter));
        }
        if filter.metadata.len() > 1 {
            if let Some(matching) = self.postings.matching(&filter.metadata, limit) {
                return Plan::Exact(matching);
            }
        }
        Plan::Graph { filtered: true }
    }

    /// The most matches for which an exact scan is chosen: `exact_scan_max_matches`, or
    /// fewer than `exact_scan_fraction` of the live items if that is more.
    fn exact_limit(&self) -> usize {
        let params = &self.settings.hnsw;
        let share = params.exact_scan_fraction as f64 * self.live_count() as f64;
        let by_fraction = (share.ceil() as usize).saturating_sub(1);
        params.exact_scan_max_matches.max(by_fraction)
    }

    /// Live slots that may match: those carrying every metadata pair, or every live slot of
    /// an accepted kind when the filter has no metadata.
    fn candidates(&self, view: &SlotView, filter: &Filter) -> Vec<u64> {
        if filter.metadata.is_empty() {
            return view
                .iter_live()
                .filter(|(_, info)| filter.accepts(info.kind, &info.metadata))
                .map(|(slot, _)| slot)
                .collect();
        }
        self.postings
            .matching(&filter.metadata, usize::MAX)
            .unwrap_or_default()
    }

    /// Graph walk returning `(similarity, slot)` of live, accepted nodes, best first.
    fn walk(
        &self,
        view: &SlotView,
        query: &[f32],
        k: usize,
        ef: usize,
        filter: Option<&Filter>,
    ) -> Vec<(f32, u64)> {
        let graph = Arc::clone(&self.graph.read());
        let accept = |slot: u64| {
            view.live(slot as usize)
                .is_some_and(|info| filter.is_none_or(|f| f.accepts(info.kind, &info.metadata)))
        };
        let tombstones = graph.len() > self.live_count();
        let restricted = filter.is_some() || tombstones;
        let mut found = graph.search(query, k, ef.max(k), restricted.then_some(&accept));
        // A delete that landed after the check above can leave a node that is no longer live
        // on an unrestricted walk; walking again with the check keeps it from costing a hit.
        if !restricted
            && found
                .iter()
                .any(|(slot, _)| view.live(*slot as usize).is_none())
        {
            found = graph.search(query, k, ef.max(k), Some(&accept));
        }
        found
            .into_iter()
            .map(|(slot, similarity)| (similarity, slot))
            .collect()
    }

    /// Falls back to an exact scan when the walk found fewer than `k` hits but more items
    /// may match.
    fn complete(
        &self,
        view: &SlotView,
        query: &[f32],
        filter: &Filter,
        k: usize,
        found: Vec<(f32, u64)>,
    ) -> Result<Vec<(f32, u64)>> {
        if found.len() >= k || self.estimate(filter) <= found.len() {
            return Ok(found);
        }
        let candidates = self.candidates(view, filter);
        self.scan(view, query, filter, &candidates, k)
    }

    /// Scores candidates exactly against their stored vectors; best `k` first.
    fn scan(
        &self,
        view: &SlotView,
        query: &[f32],
        filter: &Filter,
        candidates: &[u64],
        k: usize,
    ) -> Result<Vec<(f32, u64)>> {
        // Set when a candidate is scored as another slot (its newer version), which the
        // candidates may hold as well.
        let moved = AtomicBool::new(false);
        let score = |candidate: &u64| -> Result<Option<(f32, u64)>> {
            let Some((slot, vector)) = self.current_version(view, *candidate)? else {
                return Ok(None);
            };
            if slot != *candidate {
                moved.store(true, Ordering::Relaxed);
            }
            let Some(info) = view.published(slot as usize) else {
                return Ok(None);
            };
            if !filter.accepts(info.kind, &info.metadata) {
                return Ok(None);
            }
            Ok(Some((vector::dot(query, &vector), slot)))
        };
        let scored: Result<Vec<Option<(f32, u64)>>> = if candidates.len() >= PARALLEL_SCAN_MIN {
            candidates.par_iter().map(score).collect()
        } else {
            candidates.iter().map(score).collect()
        };

        let mut scored: Vec<(f32, u64)> = scored?.into_iter().flatten().collect();
        if moved.load(Ordering::Relaxed) {
            scored.sort_unstable_by_key(|&(_, slot)| slot);
            scored.dedup_by_key(|&mut (_, slot)| slot);
        }
        if scored.len() > k {
            scored.select_nth_unstable_by(k - 1, by_score);
            scored.truncate(k);
        }
        scored.sort_unstable_by(by_score);
        Ok(scored)
    }

    /// The version of the item at `slot` that an exact scan scores, as its slot and stored
    /// vector: the slot's own when the store still holds it; the newer one the store holds
    /// once it is published; while a replacement is committed (the store holds a version not
    /// yet published), the published version from [`Inner::superseded`]. `None` for an item
    /// deleted since, or a slot never published.
    fn current_version(&self, view: &SlotView, slot: u64) -> Result<Option<(u64, Vec<f32>)>> {
        let Some(info) = view.published(slot as usize) else {
            return Ok(None);
        };
        let Some((record, vector)) = self.store.entry(&info.id, self.settings.dimension)? else {
            return Ok(None);
        };
        if record.slot == slot || view.live(record.slot as usize).is_some() {
            return Ok(vector.map(|vector| (record.slot, vector)));
        }
        let superseded = self.superseded.read();
        let kept = superseded
            .get(&info.id)
            .filter(|(kept, _)| view.live(*kept as usize).is_some());
        Ok(kept.cloned())
    }

    /// Hits for scored slots, best first. A search that overlaps the commit of a replacement
    /// can score both versions of an id, or one slot twice; the id is reported once, as its
    /// newer version (the higher slot).
    fn hits(&self, view: &SlotView, scored: Vec<(f32, u64)>, scale: f32) -> Vec<Hit> {
        let found: Vec<(f32, u64, &SlotInfo)> = scored
            .into_iter()
            .filter_map(|(similarity, slot)| {
                Some((similarity, slot, view.published(slot as usize)?))
            })
            .collect();
        let mut newest: HashMap<&str, u64> = HashMap::with_capacity(found.len());
        for (_, slot, info) in &found {
            let kept = newest.entry(info.id.as_str()).or_insert(*slot);
            *kept = (*kept).max(*slot);
        }
        found
            .into_iter()
            .filter(|(_, slot, info)| {
                // Once reported, an id leaves the map: a slot scored twice is one hit.
                let id = info.id.as_str();
                newest.get(id) == Some(slot) && newest.remove(id).is_some()
            })
            .map(|(similarity, _, info)| Hit {
                id: info.id.clone(),
                kind: info.kind,
                score: similarity * scale,
                metadata: info.metadata.clone(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::types::{HnswParams, Item, Settings};

    use super::*;

    fn item(i: usize, dimension: usize) -> Item {
        let mut vector = vec![0.01f32; dimension];
        vector[i % dimension] = 1.0;
        vector[(i * 7 + 3) % dimension] += 0.5 + i as f32 / 100.0;
        Item {
            id: format!("item-{i}"),
            kind: ItemKind::Image,
            vector,
            metadata: BTreeMap::new(),
            content_hash: [i as u8; 32],
            payload: None,
        }
    }

    /// A delete that lands between a search's tombstone check and its walk leaves a node
    /// that is no longer live on an unrestricted walk; the search must still return k hits.
    #[test]
    fn a_slot_killed_during_an_unrestricted_walk_does_not_cost_a_hit() {
        let dir = tempfile::tempdir().unwrap();
        let dimension = 16;
        let settings = Settings {
            dimension,
            metric: Metric::Cosine,
            hnsw: HnswParams::default(),
            model_id: "m".into(),
        };
        let collection = Collection::open(dir.path(), settings).unwrap();
        let items: Vec<Item> = (0..40).map(|i| item(i, dimension)).collect();
        let query = items[5].vector.clone();
        collection.upsert(items).unwrap();

        // What the delete has done by then: the slot is dead, the live count not yet lower.
        let inner = &collection.inner;
        let view = inner.slots.view();
        let (slot, _) = view.iter_live().find(|(_, i)| i.id == "item-5").unwrap();
        inner.slots.kill(slot);
        assert_eq!(inner.graph.read().len(), inner.live_count());

        let request = SearchRequest {
            vector: &query,
            k: 10,
            ef: None,
            filter: Filter::default(),
            exact: false,
        };
        let hits = collection.search(&request).unwrap();
        assert_eq!(hits.len(), 10, "hits: {hits:?}");
        assert!(hits.iter().all(|h| h.id != "item-5"));
    }

    /// A collection of `count` items, item `i` tagged `colour` red (even i) or blue, `tone`
    /// dark for odd i, `size` small (i below half) or large, and `band` high for i from
    /// `count / 2 - 100` on.
    fn tagged(dir: &std::path::Path, count: usize) -> Collection {
        let settings = Settings {
            dimension: 8,
            metric: Metric::Cosine,
            hnsw: HnswParams::default(),
            model_id: "test".into(),
        };
        let collection = Collection::open(dir, settings).unwrap();
        let items = (0..count).map(|i| {
            let tag = |k: &str, v: &str| (k.to_string(), v.to_string());
            let mut metadata = BTreeMap::from([
                tag("colour", if i % 2 == 0 { "red" } else { "blue" }),
                tag("size", if i < count / 2 { "small" } else { "large" }),
            ]);
            if i % 2 == 1 {
                metadata.insert("tone".into(), "dark".into());
            }
            if i >= count / 2 - 100 {
                metadata.insert("band".into(), "high".into());
            }
            Item {
                id: format!("item-{i}"),
                kind: ItemKind::Image,
                vector: (0..8)
                    .map(|d| ((i * 7 + d * 3) % 11) as f32 + 1.0)
                    .collect(),
                metadata,
                content_hash: [i as u8; 32],
                payload: None,
            }
        });
        collection.upsert(items.collect()).unwrap();
        collection
    }

    fn filter(pairs: &[(&str, &str)]) -> Filter {
        Filter {
            metadata: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Filter::default()
        }
    }

    #[test]
    fn common_pairs_that_rarely_meet_are_scanned_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let collection = tagged(dir.path(), 10_000);
        let inner = &collection.inner;
        let view = inner.slots.view();
        let plan = |f: &Filter| inner.plan(&view, f);

        // Each pair is common (about half the items, over the 4096 of
        // `exact_scan_max_matches`); together they meet rarely or never.
        let never = filter(&[("colour", "red"), ("tone", "dark")]);
        assert!(matches!(plan(&never), Plan::Exact(ref slots) if slots.is_empty()));
        let rare = filter(&[("size", "small"), ("band", "high")]);
        assert!(matches!(plan(&rare), Plan::Exact(ref slots) if slots.len() == 100));
        let quarter = filter(&[("colour", "red"), ("size", "large")]);
        assert!(matches!(plan(&quarter), Plan::Exact(ref slots) if slots.len() == 2500));
        let many = filter(&[("size", "large"), ("band", "high")]);
        assert!(matches!(plan(&many), Plan::Graph { filtered: true }));
        let half = filter(&[("colour", "red")]);
        assert!(matches!(plan(&half), Plan::Graph { filtered: true }));

        let query = [1.0; 8];
        let request = |filter: Filter, exact: bool| SearchRequest {
            vector: &query,
            k: 5,
            ef: None,
            filter,
            exact,
        };
        let hits = collection.search(&request(never, false)).unwrap();
        assert!(hits.is_empty());
        let planned = collection.search(&request(quarter.clone(), false)).unwrap();
        let scanned = collection.search(&request(quarter, true)).unwrap();
        assert_eq!(planned, scanned);
    }
}
