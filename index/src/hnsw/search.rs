//! Searching a layer: greedy descent on the upper levels and a bounded beam on the base
//! level, with per-thread reusable buffers so that a search allocates only its answer.

use std::cell::RefCell;
use std::cmp::{Ordering as CmpOrdering, Reverse};
use std::collections::BinaryHeap;

use super::distance::prefetch;
use super::Hnsw;

/// Cache lines of a neighbour's vector requested ahead of its distance.
const PREFETCH_LINES: usize = 8;

/// How many neighbours ahead of the one being scored its vector is requested.
const PREFETCH_AHEAD: usize = 3;

/// A node with its distance to the query; ordered by distance, then node.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) struct Scored {
    pub dist: f32,
    pub node: u32,
}

impl Eq for Scored {}

impl Ord for Scored {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        self.dist
            .total_cmp(&other.dist)
            .then(self.node.cmp(&other.node))
    }
}

impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

/// Which slots a search may return; nodes it rejects are still traversed.
pub(crate) type Accept<'a> = &'a dyn Fn(u64) -> bool;

/// Buffers reused by every search and insert on one thread.
#[derive(Default)]
pub(super) struct Context {
    /// Generation at which each node was last visited.
    stamps: Vec<u32>,
    generation: u32,
    /// Nodes still to expand, nearest first.
    candidates: BinaryHeap<Reverse<Scored>>,
    /// Best accepted nodes so far, farthest on top.
    pub results: BinaryHeap<Scored>,
    /// Unvisited neighbours of the node being expanded.
    fresh: Vec<u32>,
    /// Neighbour ids read while inserting.
    pub neighbours: Vec<u32>,
    /// Sorted candidates and selected neighbours while inserting.
    pub sorted: Vec<Scored>,
    pub selected: Vec<Scored>,
    /// Neighbours chosen per level for the node being inserted, before they are written.
    pub chosen: Vec<Vec<Scored>>,
}

impl Context {
    /// Starts a new visit over a graph of `capacity` nodes.
    fn begin(&mut self, capacity: usize) {
        if self.stamps.len() < capacity {
            self.stamps.resize(capacity, 0);
        }
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            self.stamps.fill(0);
            self.generation = 1;
        }
        self.candidates.clear();
        self.results.clear();
    }

    /// Marks `node` visited; false when it already was.
    #[inline]
    fn visit(&mut self, node: u32) -> bool {
        let stamp = &mut self.stamps[node as usize];
        let fresh = *stamp != self.generation;
        *stamp = self.generation;
        fresh
    }

    /// Requests the visit stamp of `node` ahead of [`Context::visit`].
    #[inline]
    fn prefetch_stamp(&self, node: u32) {
        if let Some(stamp) = self.stamps.get(node as usize..=node as usize) {
            prefetch(stamp, 1);
        }
    }

    /// Drains the results into `sorted`, nearest first.
    pub fn sort_results(&mut self) {
        self.sorted.clear();
        self.sorted.extend(self.results.drain());
        self.sorted.sort_unstable();
    }
}

thread_local! {
    static CONTEXT: RefCell<Context> = RefCell::new(Context::default());
}

/// Runs `f` with this thread's buffers.
pub(super) fn with_context<R>(f: impl FnOnce(&mut Context) -> R) -> R {
    CONTEXT.with(|cell| match cell.try_borrow_mut() {
        Ok(mut context) => f(&mut context),
        // Only reachable if an accept callback searched the graph again on this thread.
        Err(_) => f(&mut Context::default()),
    })
}

impl Hnsw {
    /// Up to `k` nearest nodes the filter accepts, as `(slot, inner product)`, nearest
    /// first. `ef` (raised to `k`) bounds the beam on the base level.
    pub fn search(
        &self,
        query: &[f32],
        k: usize,
        ef: usize,
        accept: Option<Accept<'_>>,
    ) -> Vec<(u64, f32)> {
        with_context(|context| {
            if !self.search_base(context, query, ef.max(k), accept) {
                return Vec::new();
            }
            context
                .sorted
                .iter()
                .take(k)
                .map(|s| (self.slot(s.node), -s.dist))
                .collect()
        })
    }

    /// Descends greedily from the entry point, then leaves the best `ef` accepted nodes of a
    /// beam search on the base level in `context.sorted`, nearest first. False, with nothing
    /// left, when the graph is empty.
    pub(super) fn search_base(
        &self,
        context: &mut Context,
        query: &[f32],
        ef: usize,
        accept: Option<Accept<'_>>,
    ) -> bool {
        let Some((entry, top)) = self.entry() else {
            context.sorted.clear();
            return false;
        };
        let mut nearest = Scored {
            dist: self.distance(query, entry),
            node: entry,
        };
        for level in (1..=top).rev() {
            nearest = self.greedy(context, query, nearest, level);
        }
        self.search_layer(context, query, nearest, ef, 0, accept);
        context.sort_results();
        true
    }

    /// Walks `level` from `start` to a local minimum of the distance to `query`.
    pub(super) fn greedy(
        &self,
        context: &mut Context,
        query: &[f32],
        start: Scored,
        level: usize,
    ) -> Scored {
        let mut nearest = start;
        loop {
            context.fresh.clear();
            self.read_links(nearest.node, level, &mut context.fresh);
            self.prefetch_first(&context.fresh);
            let mut moved = false;
            for (i, &node) in context.fresh.iter().enumerate() {
                self.prefetch_ahead(&context.fresh, i);
                let dist = self.distance(query, node);
                if dist < nearest.dist {
                    nearest = Scored { dist, node };
                    moved = true;
                }
            }
            if !moved {
                return nearest;
            }
        }
    }

    /// Beam search of width `ef` on `level` from `start`, leaving the best accepted nodes in
    /// `context.results`. Rejected nodes are expanded like any other, so a filter does not
    /// cut the graph; while fewer than `ef` nodes are accepted the walk goes on.
    pub(super) fn search_layer(
        &self,
        context: &mut Context,
        query: &[f32],
        start: Scored,
        ef: usize,
        level: usize,
        accept: Option<Accept<'_>>,
    ) {
        context.begin(self.capacity);
        context.visit(start.node);
        let accepted = |node: u32| accept.is_none_or(|f| f(self.slot(node)));
        context.candidates.push(Reverse(start));
        let mut bound = f32::INFINITY;
        if accepted(start.node) {
            context.results.push(start);
            bound = start.dist;
        }

        while let Some(Reverse(current)) = context.candidates.pop() {
            let full = context.results.len() >= ef;
            if current.dist > bound && (full || accept.is_none()) {
                break;
            }
            self.prefetch_next_list(context, level);
            self.expand(context, current.node, level);
            let fresh = std::mem::take(&mut context.fresh);
            for (i, &node) in fresh.iter().enumerate() {
                self.prefetch_ahead(&fresh, i);
                let dist = self.distance(query, node);
                if context.results.len() >= ef && dist >= bound {
                    continue;
                }
                context.candidates.push(Reverse(Scored { dist, node }));
                self.prefetch_next_list(context, level);
                if accepted(node) {
                    context.results.push(Scored { dist, node });
                    if context.results.len() > ef {
                        context.results.pop();
                    }
                }
                if let Some(worst) = context.results.peek() {
                    bound = worst.dist;
                }
            }
            context.fresh = fresh;
        }
    }

    /// Collects the unvisited neighbours of `node` on `level` into `context.fresh`.
    fn expand(&self, context: &mut Context, node: u32, level: usize) {
        context.fresh.clear();
        let mut links = std::mem::take(&mut context.neighbours);
        links.clear();
        self.read_links(node, level, &mut links);
        for &id in &links {
            context.prefetch_stamp(id);
        }
        for &id in &links {
            if context.visit(id) {
                context.fresh.push(id);
            }
        }
        self.prefetch_first(&context.fresh);
        context.neighbours = links;
    }

    /// Requests the whole neighbour list on `level` of the candidate that will be expanded
    /// next, so that its expansion does not wait for memory; called when a candidate is taken
    /// and whenever a push may have changed the top of the heap.
    fn prefetch_next_list(&self, context: &Context, level: usize) {
        if let Some(Reverse(next)) = context.candidates.peek() {
            prefetch(self.links(next.node, level), usize::MAX);
        }
    }

    /// Requests the vectors of the first [`PREFETCH_AHEAD`] of `nodes`, before they are
    /// scored in order.
    fn prefetch_first(&self, nodes: &[u32]) {
        for &node in nodes.iter().take(PREFETCH_AHEAD) {
            prefetch(self.vector(node), PREFETCH_LINES);
        }
    }

    /// Requests the vector [`PREFETCH_AHEAD`] places after position `i` of `nodes`, while
    /// the node at `i` is scored.
    fn prefetch_ahead(&self, nodes: &[u32], i: usize) {
        if let Some(&next) = nodes.get(i + PREFETCH_AHEAD) {
            prefetch(self.vector(next), PREFETCH_LINES);
        }
    }
}
