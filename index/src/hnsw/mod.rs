//! Our own HNSW graph (Malkov and Yashunin, "Efficient and robust approximate nearest
//! neighbor search using Hierarchical Navigable Small World graphs", 2016) in flat arrays.
//!
//! Storage, for a graph of fixed capacity:
//! - vectors in one contiguous `f32` array, node-indexed and dimension-strided;
//! - the base layer as one flat `u32` array of `1 + 2M` words per node (a count, then up to
//!   `2M` neighbour ids);
//! - upper layers (reached by about one node in `M - 1`) as one small boxed array per such
//!   node, `1 + M` words per level;
//! - node levels drawn with `mL = 1 / ln(M)`;
//! - a rank and an anchor count per node, in memory only, which keep every node reachable
//!   (see `reach`).
//!
//! Concurrency: a batch of inserts runs under the graph's writer mutex and links its nodes
//! in parallel on rayon, each neighbour list guarded by its node's lock; searches take no
//! lock at all. Neighbour lists are atomics written with release stores and read with
//! acquire loads, so a search that reaches a node through a link also sees the node's vector
//! and level, which are written before any link to the node exists. Each base-level list
//! change also counts the anchors it adds or drops, and the batch ends, still under the
//! writer mutex, by relinking every node that lost its last anchor; relinking writes ids
//! with the same release stores, so searches go on meanwhile. A graph never grows in
//! place: [`Hnsw::with_room`] returns a larger copy, which the owner swaps in while searches
//! finish on the old one.

mod cells;
pub(crate) mod distance;
mod insert;
mod io;
mod reach;
mod region;
mod search;

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use parking_lot::Mutex;

use cells::Cells;
use distance::Dot;
use region::Region;

pub(crate) use io::{GraphFile, VectorFile};
pub(crate) use search::Accept;

/// Highest level a node may be drawn at.
pub(crate) const MAX_LEVEL: usize = 15;
/// Packed entry point meaning "the graph is empty".
const NO_ENTRY: u64 = u64::MAX;
/// Seed of the level draws; levels depend only on it and the node number.
const LEVEL_SEED: u64 = 0x5EED_1E7E_15A5_EED5;

/// Shape of a graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Shape {
    /// Components per vector.
    pub dimension: usize,
    /// Neighbours per node on the upper levels; twice this on the base level.
    pub max_connections: usize,
    /// Candidate list width while inserting.
    pub ef_construction: usize,
}

impl Shape {
    fn base_stride(&self) -> usize {
        1 + 2 * self.max_connections
    }

    fn upper_stride(&self) -> usize {
        1 + self.max_connections
    }
}

/// An HNSW graph over inner products of vectors, each node carrying a caller's slot number.
pub(crate) struct Hnsw {
    shape: Shape,
    capacity: usize,
    /// Nodes whose vector, slot and level are written; nodes are numbered `0..len`.
    len: AtomicUsize,
    vectors: Cells<f32>,
    slots: Cells<u64>,
    levels: Cells<u8>,
    upper: Cells<Option<Box<[AtomicU32]>>>,
    base: Region<AtomicU32>,
    locks: Box<[Mutex<()>]>,
    /// Rank of each node; changed only under the writer lock, between linking phases.
    ranks: Region<AtomicU32>,
    /// Base-level links into each node from lower-ranked nodes; changed with the lists,
    /// under their owners' locks.
    anchors: Region<AtomicU32>,
    /// Nodes that lost their last anchor during the running insert batch.
    unanchored: Mutex<Vec<u32>>,
    /// `level << 32 | node` of the entry point, or [`NO_ENTRY`].
    entry: AtomicU64,
    entry_lock: Mutex<()>,
    /// Serialises insert batches, copies and dumps.
    writer: Mutex<Ranking>,
    dot: Dot,
}

/// What the writer lock guards besides the right to change the graph.
#[derive(Debug, Default, Clone, Copy)]
struct Ranking {
    /// Rank of the nodes of the next insert batch: above every rank given so far.
    next: u32,
    /// Nodes in the graph at the last full ranking.
    ranked_len: usize,
}

fn pack_entry(node: u32, level: usize) -> u64 {
    ((level as u64) << 32) | u64::from(node)
}

fn unpack_entry(packed: u64) -> Option<(u32, usize)> {
    (packed != NO_ENTRY).then_some((packed as u32, (packed >> 32) as usize))
}

impl Hnsw {
    /// An empty graph with room for `capacity` nodes. Untouched room costs address space,
    /// not resident memory, except for one lock byte and one pointer per node.
    pub fn new(shape: Shape, capacity: usize) -> Self {
        Self {
            shape,
            capacity,
            len: AtomicUsize::new(0),
            vectors: Cells::from_region(Region::zeroed(capacity * shape.dimension)),
            slots: Cells::from_vec(vec![0u64; capacity]),
            levels: Cells::from_vec(vec![0u8; capacity]),
            upper: Cells::from_vec((0..capacity).map(|_| None).collect()),
            base: Region::zeroed(capacity * shape.base_stride()),
            locks: (0..capacity).map(|_| Mutex::new(())).collect(),
            ranks: Region::zeroed(capacity),
            anchors: Region::zeroed(capacity),
            unanchored: Mutex::new(Vec::new()),
            entry: AtomicU64::new(NO_ENTRY),
            entry_lock: Mutex::new(()),
            writer: Mutex::new(Ranking::default()),
            dot: Dot::detect(),
        }
    }

    /// The graph's shape.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Nodes in the graph.
    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    /// True when `extra` more nodes fit without [`Hnsw::with_room`].
    pub fn has_room(&self, extra: usize) -> bool {
        self.len() + extra <= self.capacity
    }

    /// A copy with room for at least `extra` more nodes: capacity at least doubles, so a
    /// sequence of batches copies each node a bounded number of times. Waits for a running
    /// insert batch.
    pub fn with_room(&self, extra: usize) -> Self {
        let ranking = self.writer.lock();
        let len = self.len();
        let capacity = (len + extra).max(2 * self.capacity).max(1024);
        let mut copy = Self::new(self.shape, capacity);

        let dim = self.shape.dimension;
        copy.vectors.as_mut_slice()[..len * dim].copy_from_slice(self.vectors.row(0, len * dim));
        copy.slots.as_mut_slice()[..len].copy_from_slice(self.slots.row(0, len));
        copy.levels.as_mut_slice()[..len].copy_from_slice(self.levels.row(0, len));
        let upper = copy.upper.as_mut_slice();
        for (node, target) in upper.iter_mut().enumerate().take(len) {
            *target = self
                .upper
                .get(node)
                .as_ref()
                .map(|lists| copy_atomics(lists));
        }
        copy_into(&mut copy.base, &self.base[..len * self.shape.base_stride()]);
        copy_into(&mut copy.ranks, &self.ranks[..len]);
        copy_into(&mut copy.anchors, &self.anchors[..len]);
        *copy.writer.get_mut() = *ranking;
        *copy.entry.get_mut() = self.entry.load(Ordering::Acquire);
        *copy.len.get_mut() = len;
        copy
    }

    /// Slot numbers of every node, in node order.
    pub fn slots(&self) -> Vec<u64> {
        self.slots.row(0, self.len()).to_vec()
    }

    /// Name of the inner product kernel in use.
    pub fn kernel(&self) -> &'static str {
        self.dot.name()
    }

    fn entry(&self) -> Option<(u32, usize)> {
        unpack_entry(self.entry.load(Ordering::Acquire))
    }

    #[inline]
    fn vector(&self, node: u32) -> &[f32] {
        let dim = self.shape.dimension;
        self.vectors.row(node as usize * dim, dim)
    }

    #[inline]
    fn slot(&self, node: u32) -> u64 {
        *self.slots.get(node as usize)
    }

    fn level(&self, node: u32) -> usize {
        usize::from(*self.levels.get(node as usize))
    }

    /// Negated inner product: smaller is nearer.
    #[inline]
    fn distance(&self, query: &[f32], node: u32) -> f32 {
        -self.dot.call(query, self.vector(node))
    }

    /// The neighbour list of `node` on `level`: a count word, then the ids. Empty when the
    /// node does not reach that level.
    #[inline]
    fn links(&self, node: u32, level: usize) -> &[AtomicU32] {
        if level == 0 {
            let stride = self.shape.base_stride();
            let start = node as usize * stride;
            return &self.base[start..start + stride];
        }
        let stride = self.shape.upper_stride();
        let Some(lists) = self.upper.get(node as usize).as_deref() else {
            return &[];
        };
        let start = (level - 1) * stride;
        lists.get(start..start + stride).unwrap_or(&[])
    }

    /// Appends the neighbours of `node` on `level` to `out`.
    #[inline]
    fn read_links(&self, node: u32, level: usize, out: &mut Vec<u32>) {
        let list = self.links(node, level);
        let Some((count, ids)) = list.split_first() else {
            return;
        };
        let count = (count.load(Ordering::Acquire) as usize).min(ids.len());
        out.extend(ids[..count].iter().map(|id| id.load(Ordering::Acquire)));
    }
}

/// Copies `source` into the start of `target`, which nothing else can reach yet.
fn copy_into(target: &mut [AtomicU32], source: &[AtomicU32]) {
    for (target, source) in target.iter_mut().zip(source) {
        *target.get_mut() = source.load(Ordering::Acquire);
    }
}

fn copy_atomics(source: &[AtomicU32]) -> Box<[AtomicU32]> {
    source
        .iter()
        .map(|a| AtomicU32::new(a.load(Ordering::Acquire)))
        .collect()
}

/// Level of node `node`: `floor(-ln(u) * mL)` for a uniform `u` in (0, 1] derived from the
/// node number, capped at [`MAX_LEVEL`].
fn draw_level(node: usize, level_mult: f64) -> usize {
    let mut z = LEVEL_SEED ^ (node as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    let uniform = ((z >> 11) as f64 + 1.0) / (1u64 << 53) as f64;
    let level = (-uniform.ln() * level_mult).floor();
    (level as usize).min(MAX_LEVEL)
}

#[cfg(test)]
mod tests;
