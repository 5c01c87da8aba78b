//! Keeping every node reachable from the entry point on the base level.
//!
//! When a full neighbour list overflows, the selection heuristic may drop every link into a
//! node, or every link into a small group of nodes that only link to each other (near
//! duplicates do this); no search finds such nodes. Counting incoming links would miss the
//! groups, so the graph keeps a stronger invariant:
//!
//! - every node has a rank; the entry point has rank 0, and no other node has;
//! - every other node has at least one anchor: a base-level link into it from a node of
//!   lower rank.
//!
//! Following anchors backwards lowers the rank at every step, so it ends at the entry point:
//! every node is reachable from it.
//!
//! Ranks change only under the writer lock, outside the linking phase of a batch. While a
//! batch links, every base-level list change counts the anchors it adds or drops, atomically
//! and under the lock of the list's owner, and a node that loses its last anchor is queued.
//! The nodes of a batch get ranks above every older node, so links from older nodes anchor
//! them. At the end of the batch, every queued or new node left without an anchor is
//! adopted: linked from a lower-ranked node near it that can take the link, in a free place
//! or in place of an entry that keeps another anchor.
//!
//! A full ranking replaces this step after a batch that is large next to the graph, that
//! changed the entry point, that failed to adopt a node, or that doubled the graph since the
//! last full ranking (so that lower-ranked nodes stay common everywhere), and when a graph
//! is loaded. It ranks the nodes in the order of a breadth-first walk of the base level
//! from the entry point (one depth at a time, in parallel), adopting every node the walk
//! misses by a reached node and walking on from it, and counts anchors on the way. In walk
//! order, links between nodes of equal depth anchor too, so nodes keep several anchors and
//! an adoption rarely has to look beyond the node's own neighbours. Ranks and anchors live
//! in memory only.

use std::ops::Range;
use std::sync::atomic::Ordering;

use rayon::prelude::*;

use super::search::{with_context, Context, Scored};
use super::{Hnsw, Ranking};

/// Rank of a node that the running full ranking has not reached yet.
const UNRANKED: u32 = u32::MAX;
/// Rank of a node that the running walk has reached but not numbered yet.
const REACHED: u32 = u32::MAX - 1;
/// A batch that adds at least `1 / LARGE_BATCH` of the nodes already in the graph ends with
/// a full ranking, which then costs little next to the batch itself.
const LARGE_BATCH: usize = 8;

impl Hnsw {
    /// Rank of `node`: its place in the order that anchors follow.
    pub(super) fn rank(&self, node: u32) -> u32 {
        self.ranks[node as usize].load(Ordering::Relaxed)
    }

    /// Base-level links into `node` from nodes of lower rank.
    pub(super) fn anchors(&self, node: u32) -> u32 {
        self.anchors[node as usize].load(Ordering::Relaxed)
    }

    /// True when a base-level link from `owner` to `node` anchors `node`.
    fn is_anchor(&self, owner: u32, node: u32) -> bool {
        self.rank(owner) < self.rank(node)
    }

    /// Ranks the written but unlinked nodes of a batch above every older node, in order.
    pub(super) fn rank_batch(&self, ranking: &Ranking, nodes: Range<u32>) {
        for (offset, node) in nodes.enumerate() {
            let rank = ranking.next.saturating_add(offset as u32).min(REACHED - 1);
            self.ranks[node as usize].store(rank, Ordering::Relaxed);
            self.anchors[node as usize].store(0, Ordering::Relaxed);
        }
    }

    /// Counts the anchors gained and lost when the base-level list of `owner` changed from
    /// `old` to `new`. Called under the lock of `owner`.
    pub(super) fn count_changes(&self, owner: u32, old: &[u32], new: &[Scored]) {
        for added in new.iter().filter(|s| !old.contains(&s.node)) {
            self.add_link(owner, added.node);
        }
        for &removed in old.iter().filter(|&&id| new.iter().all(|s| s.node != id)) {
            self.drop_link(owner, removed);
        }
    }

    /// Counts a link from `owner` to `node` added to the base level.
    pub(super) fn add_link(&self, owner: u32, node: u32) {
        if self.is_anchor(owner, node) {
            self.anchors[node as usize].fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts a link from `owner` to `node` dropped from the base level, queueing `node`
    /// when that was its last anchor.
    fn drop_link(&self, owner: u32, node: u32) {
        let anchor = self.is_anchor(owner, node);
        if anchor && self.anchors[node as usize].fetch_sub(1, Ordering::Relaxed) == 1 {
            self.unanchored.lock().push(node);
        }
    }

    /// Restores the invariant after the linking phase of a batch of `nodes`, which began
    /// with `entry` as the entry point: adopts the nodes left without an anchor, or ranks
    /// the whole graph afresh (see the module documentation for when).
    pub(super) fn anchor_batch(
        &self,
        ranking: &mut Ranking,
        nodes: Range<u32>,
        entry: Option<(u32, usize)>,
    ) {
        let mut unanchored = std::mem::take(&mut *self.unanchored.lock());
        let large = nodes.len() * LARGE_BATCH >= nodes.start as usize;
        let doubled = self.len() >= 2 * ranking.ranked_len;
        if large || doubled || self.entry() != entry {
            return self.rank_all(ranking);
        }
        ranking.next = ranking.next.saturating_add(nodes.len() as u32);

        unanchored.extend(nodes);
        unanchored.retain(|&node| self.anchors(node) == 0);
        unanchored.sort_unstable();
        unanchored.dedup();
        let adopted = with_context(|context| {
            unanchored
                .iter()
                .all(|&node| self.anchors(node) > 0 || self.adopt(context, node).is_some())
        });
        if !adopted {
            self.rank_all(ranking);
        } else if !unanchored.is_empty() {
            tracing::trace!(adopted = unanchored.len(), "graph nodes relinked");
        }
    }

    /// Ranks every node in the order of a breadth-first walk of the base level from the
    /// entry point, adopting every node the walk misses, and counts anchors from scratch.
    /// Runs under the writer lock, or on a graph not yet shared; searches go on meanwhile.
    pub(super) fn rank_all(&self, ranking: &mut Ranking) {
        let len = self.len();
        self.ranks[..len]
            .par_iter()
            .for_each(|rank| rank.store(UNRANKED, Ordering::Relaxed));
        self.anchors[..len]
            .par_iter()
            .for_each(|anchors| anchors.store(0, Ordering::Relaxed));
        self.unanchored.lock().clear();
        let mut next = 0;
        if let Some((entry, _)) = self.entry() {
            next = self.spread(entry, 0);
            next = self.adopt_unranked(next);
        }
        ranking.next = next;
        ranking.ranked_len = len;
    }

    /// Adopts every node that the walks so far missed, walking on from each, and returns
    /// the next free rank.
    fn adopt_unranked(&self, mut next: u32) -> u32 {
        let (mut adopted, mut left) = (0usize, 0usize);
        with_context(|context| {
            for node in 0..self.len() as u32 {
                if self.rank(node) != UNRANKED {
                    continue;
                }
                if self.adopt(context, node).is_some() {
                    next = self.spread(node, next);
                    adopted += 1;
                } else {
                    left += 1;
                }
            }
        });
        if left > 0 {
            tracing::warn!(
                left,
                "graph nodes left unreachable: no reachable node could link them"
            );
        }
        if adopted > 0 {
            tracing::debug!(adopted, "unreachable graph nodes relinked");
        }
        next
    }

    /// Gives `start` rank `next`, then the following ranks to the unranked nodes the base
    /// level reaches from it, in breadth-first order, one depth at a time in parallel, and
    /// counts the anchors among the links it follows. Returns the next free rank.
    fn spread(&self, start: u32, mut next: u32) -> u32 {
        self.ranks[start as usize].store(next, Ordering::Relaxed);
        next += 1;
        let mut frontier = vec![start];
        while !frontier.is_empty() {
            frontier = frontier
                .par_iter()
                .flat_map_iter(|&owner| {
                    let rank = self.rank(owner);
                    self.base_ids(owner)
                        .filter(move |&node| self.follow(rank, node))
                })
                .collect();
            frontier.par_iter().enumerate().for_each(|(offset, &node)| {
                let rank = next.saturating_add(offset as u32).min(REACHED - 1);
                self.ranks[node as usize].store(rank, Ordering::Relaxed);
            });
            next = next.saturating_add(frontier.len() as u32);
        }
        next
    }

    /// Follows a link from a node of rank `rank` to `node` during a walk: counts it when it
    /// is an anchor and marks `node` reached when it was unranked, returning true then.
    ///
    /// Every node of the walk's current depth is numbered before the depth is walked, and
    /// every node reached from it gets a higher number afterwards, so the rank read here
    /// decides the anchor exactly: a node not numbered yet will rank higher.
    fn follow(&self, rank: u32, node: u32) -> bool {
        let target = &self.ranks[node as usize];
        let current = target.load(Ordering::Relaxed);
        if current > rank {
            self.anchors[node as usize].fetch_add(1, Ordering::Relaxed);
        }
        current == UNRANKED
            && target
                .compare_exchange(UNRANKED, REACHED, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The ids in the base-level list of `node`.
    fn base_ids(&self, node: u32) -> impl Iterator<Item = u32> + '_ {
        let (count, ids) = self.links(node, 0).split_first().unzip();
        let count = count.map_or(0, |c| c.load(Ordering::Acquire) as usize);
        let ids = ids.unwrap_or(&[]);
        ids[..count.min(ids.len())]
            .iter()
            .map(|id| id.load(Ordering::Acquire))
    }

    /// Links `orphan` from a node of lower rank that can take the link: the nearest such
    /// node among its own neighbours, else among the nodes a search for it finds, else the
    /// entry point or one of its neighbours. Returns the new parent, or `None` when none of
    /// them could take it.
    fn adopt(&self, context: &mut Context, orphan: u32) -> Option<u32> {
        let base = self.vector(orphan);
        context.sorted.clear();
        for node in self.base_ids(orphan) {
            let dist = self.distance(base, node);
            context.sorted.push(Scored { dist, node });
        }
        context.sorted.sort_unstable();
        if let Some(parent) = self.link_from_first(context, orphan, None) {
            return Some(parent);
        }
        self.search_base(context, base, self.shape.ef_construction, None);
        let entry = self.entry().map(|(node, _)| node);
        self.link_from_first(context, orphan, entry)
    }

    /// Links `orphan` from the first node ranked below it that can take the link, among
    /// `context.sorted`, then `entry` and its neighbours when given.
    fn link_from_first(&self, context: &Context, orphan: u32, entry: Option<u32>) -> Option<u32> {
        let rank = self.rank(orphan);
        let near_entry = entry.into_iter().flat_map(|node| self.base_ids(node));
        context
            .sorted
            .iter()
            .map(|s| s.node)
            .chain(entry)
            .chain(near_entry)
            .filter(|&parent| parent != orphan && self.rank(parent) < rank)
            .find(|&parent| self.link_from(parent, orphan))
    }

    /// Adds `orphan` to the base-level list of `parent`: in a free place, else in place of
    /// the entry farthest from `parent` among those that keep an anchor without this link.
    /// False when the list is full of entries this link alone anchors.
    fn link_from(&self, parent: u32, orphan: u32) -> bool {
        let _guard = self.locks[parent as usize].lock();
        let Some((count, ids)) = self.links(parent, 0).split_first() else {
            return false;
        };
        let len = (count.load(Ordering::Acquire) as usize).min(ids.len());
        if len < ids.len() {
            ids[len].store(orphan, Ordering::Release);
            count.store(len as u32 + 1, Ordering::Release);
            self.add_link(parent, orphan);
            return true;
        }

        let base = self.vector(parent);
        let spare = ids
            .iter()
            .map(|id| id.load(Ordering::Acquire))
            .enumerate()
            .filter(|&(_, id)| !self.is_anchor(parent, id) || self.anchors(id) >= 2)
            .map(|(place, id)| (self.distance(base, id), place, id))
            .max_by(|a, b| a.0.total_cmp(&b.0));
        let Some((_, place, evicted)) = spare else {
            return false;
        };
        ids[place].store(orphan, Ordering::Release);
        self.drop_link(parent, evicted);
        self.add_link(parent, orphan);
        true
    }
}
