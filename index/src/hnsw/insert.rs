//! Inserting: nodes of a batch are written first, then linked in parallel, each by greedy
//! descent, a beam of `ef_construction` per level, the neighbour selection heuristic and
//! bidirectional links, written from the base level up, that prune the neighbour's list
//! when it is full. A batch ends by
//! relinking the nodes that pruning left unreachable (see `reach`).

use std::sync::atomic::{AtomicU32, Ordering};

use rayon::prelude::*;

use super::search::{with_context, Context, Scored};
use super::{draw_level, pack_entry, unpack_entry, Hnsw, NO_ENTRY};

/// Below this many nodes a batch is linked on the calling thread, and so are the nodes of a
/// batch that bring the graph up to this many.
const PARALLEL_MIN: usize = 64;

impl Hnsw {
    /// Adds `(vector, slot)` pairs as new nodes, linking them in parallel for large batches.
    /// Returns how many were added: pairs past the capacity (see [`Hnsw::has_room`]) are
    /// left out and reported. Vectors are read up to the graph's dimension; shorter ones
    /// are padded with zeros. On return every node is reachable on the base level.
    pub fn insert(&self, items: &[(&[f32], u64)]) -> usize {
        let mut ranking = self.writer.lock();
        let start = self.len();
        let count = items.len().min(self.capacity - start);
        if count < items.len() {
            tracing::error!(
                dropped = items.len() - count,
                capacity = self.capacity,
                "graph is full; vectors left out of the graph"
            );
        }
        let level_mult = 1.0 / (self.shape.max_connections as f64).ln();
        for (offset, &(vector, slot)) in items[..count].iter().enumerate() {
            self.write_node(
                start + offset,
                vector,
                slot,
                draw_level(start + offset, level_mult),
            );
        }
        self.len.store(start + count, Ordering::Release);
        if count == 0 {
            return 0;
        }

        let entry = self.entry();
        let nodes = start as u32..(start + count) as u32;
        self.rank_batch(&ranking, nodes.clone());
        // Small batches, and the first nodes of a nearly empty graph, are linked one by one:
        // parallel links into a graph of a few nodes would start from lists not yet written.
        let serial = if count < PARALLEL_MIN {
            count
        } else {
            PARALLEL_MIN.saturating_sub(start).min(count)
        };
        let split = nodes.start + serial as u32;
        (nodes.start..split).for_each(|node| with_context(|context| self.link(context, node)));
        (split..nodes.end)
            .into_par_iter()
            .for_each(|node| with_context(|context| self.link(context, node)));
        self.anchor_batch(&mut ranking, start as u32..(start + count) as u32, entry);
        count
    }

    /// Writes the vector, slot, level and empty upper lists of a node no link points to yet.
    #[allow(unsafe_code)]
    fn write_node(&self, node: usize, vector: &[f32], slot: u64, level: usize) {
        let dim = self.shape.dimension;
        let mut padded;
        let vector = if vector.len() == dim {
            vector
        } else {
            padded = vec![0f32; dim];
            let n = vector.len().min(dim);
            padded[..n].copy_from_slice(&vector[..n]);
            &padded
        };
        let upper = (level > 0).then(|| {
            let words = level * self.shape.upper_stride();
            (0..words).map(|_| AtomicU32::new(0)).collect()
        });
        // SAFETY: `node` is at or past `len`, under the writer lock: no link or entry point
        // names it yet, so no other thread reads these cells; `insert` publishes the node
        // with release stores (`len`, then the links) after these writes.
        unsafe {
            self.vectors.write_row(node * dim, vector);
            self.slots.set(node, slot);
            self.levels.set(node, level as u8);
            self.upper.set(node, upper);
        }
    }

    /// Links a written node into the graph: chooses its neighbours on every level from the
    /// top down, then writes the lists from the base level up (see [`Hnsw::publish`]).
    fn link(&self, context: &mut Context, node: u32) {
        let level = self.level(node);
        let Some((entry, top)) = self.entry_or_claim(node, level) else {
            return;
        };
        let query = self.vector(node);
        let mut nearest = Scored {
            dist: self.distance(query, entry),
            node: entry,
        };
        for layer in (level + 1..=top).rev() {
            nearest = self.greedy(context, query, nearest, layer);
        }

        let mut chosen = std::mem::take(&mut context.chosen);
        chosen.resize_with(level.min(top) + 1, Vec::new);
        for layer in (0..=level.min(top)).rev() {
            chosen[layer].clear();
            let ef = self.shape.ef_construction;
            self.search_layer(context, query, nearest, ef, layer, None);
            context.sort_results();
            context.sorted.retain(|s| s.node != node);
            let Some(&closest) = context.sorted.first() else {
                continue;
            };
            self.select(
                &context.sorted,
                self.shape.max_connections,
                &mut chosen[layer],
            );
            nearest = closest;
        }

        self.publish(context, node, &chosen);
        context.chosen = chosen;
        if level > top {
            self.promote(node, level);
        }
    }

    /// Writes the lists of `node` and the links back to it, level by level from the base
    /// up. Other inserts reach a node on a level only through links written here (or as the
    /// entry point, whose lists the one-by-one start of a graph fills first), so by then its
    /// lists on every lower level are in place: a search that descends to it never
    /// continues from an empty base-level list, which would leave the inserting node with
    /// that single far neighbour.
    fn publish(&self, context: &mut Context, node: u32, chosen: &[Vec<Scored>]) {
        for (layer, selected) in chosen.iter().enumerate() {
            if selected.is_empty() {
                continue;
            }
            self.set_own_list(context, node, layer, selected);
            for neighbour in selected {
                self.connect(context, neighbour.node, node, neighbour.dist, layer);
            }
        }
    }

    /// Writes the list of the node being inserted. Links that other inserts already added to
    /// it are kept, pruned with the heuristic when the list would overflow (none are expected,
    /// as [`Hnsw::publish`] writes this list before any link into the node on this level).
    fn set_own_list(&self, context: &mut Context, node: u32, layer: usize, selected: &[Scored]) {
        let _guard = self.locks[node as usize].lock();
        let list = self.links(node, layer);
        context.neighbours.clear();
        self.read_links(node, layer, &mut context.neighbours);
        let fresh = |id: &u32| selected.iter().all(|s| s.node != *id);
        if context.neighbours.iter().all(|id| !fresh(id)) {
            write_list(list, selected.iter().map(|s| s.node));
            if layer == 0 {
                self.count_changes(node, &context.neighbours, selected);
            }
            return;
        }

        let base = self.vector(node);
        context.sorted.clear();
        context.sorted.extend_from_slice(selected);
        for &id in context.neighbours.iter().filter(|id| fresh(id)) {
            let dist = self.distance(base, id);
            context.sorted.push(Scored { dist, node: id });
        }
        context.sorted.sort_unstable();
        let sorted = std::mem::take(&mut context.sorted);
        let mut kept = Vec::new();
        self.select(&sorted, list.len().saturating_sub(1), &mut kept);
        context.sorted = sorted;
        write_list(list, kept.iter().map(|s| s.node));
        if layer == 0 {
            self.count_changes(node, &context.neighbours, &kept);
        }
    }

    /// The entry point, or `None` after making `node` the entry point of an empty graph.
    fn entry_or_claim(&self, node: u32, level: usize) -> Option<(u32, usize)> {
        if let Some(entry) = self.entry() {
            return Some(entry);
        }
        let _guard = self.entry_lock.lock();
        let packed = self.entry.load(Ordering::Acquire);
        if packed == NO_ENTRY {
            self.entry.store(pack_entry(node, level), Ordering::Release);
        }
        unpack_entry(packed)
    }

    /// Makes `node` the entry point when its level is above the current top.
    fn promote(&self, node: u32, level: usize) {
        let _guard = self.entry_lock.lock();
        let above = self.entry().is_none_or(|(_, top)| level > top);
        if above {
            self.entry.store(pack_entry(node, level), Ordering::Release);
        }
    }

    /// The neighbour selection heuristic over candidates sorted nearest first: a candidate
    /// is kept when it is nearer to the base than to every neighbour kept before it, up to
    /// `max`. With fewer than `max` candidates all are kept.
    fn select(&self, sorted: &[Scored], max: usize, out: &mut Vec<Scored>) {
        out.clear();
        if sorted.len() <= max {
            out.extend_from_slice(sorted);
            return;
        }
        for candidate in sorted {
            if out.len() >= max {
                break;
            }
            let vector = self.vector(candidate.node);
            let diverse = out
                .iter()
                .all(|kept| self.distance(vector, kept.node) >= candidate.dist);
            if diverse {
                out.push(*candidate);
            }
        }
    }

    /// Adds `node` (at distance `dist`) to the list of `neighbour` on `level`, pruning the
    /// list with the heuristic when it is full.
    fn connect(&self, context: &mut Context, neighbour: u32, node: u32, dist: f32, level: usize) {
        let _guard = self.locks[neighbour as usize].lock();
        let list = self.links(neighbour, level);
        let Some((count, ids)) = list.split_first() else {
            return;
        };
        let len = (count.load(Ordering::Acquire) as usize).min(ids.len());
        if ids[..len]
            .iter()
            .any(|id| id.load(Ordering::Acquire) == node)
        {
            return;
        }
        if len < ids.len() {
            ids[len].store(node, Ordering::Release);
            count.store(len as u32 + 1, Ordering::Release);
            if level == 0 {
                self.add_link(neighbour, node);
            }
            return;
        }

        let base = self.vector(neighbour);
        context.neighbours.clear();
        self.read_links(neighbour, level, &mut context.neighbours);
        context.sorted.clear();
        context.sorted.push(Scored { dist, node });
        for &other in &context.neighbours {
            let dist = self.distance(base, other);
            context.sorted.push(Scored { dist, node: other });
        }
        context.sorted.sort_unstable();
        let sorted = std::mem::take(&mut context.sorted);
        self.select(&sorted, ids.len(), &mut context.selected);
        context.sorted = sorted;
        write_list(list, context.selected.iter().map(|s| s.node));
        if level == 0 {
            self.count_changes(neighbour, &context.neighbours, &context.selected);
        }
    }
}

/// Replaces a neighbour list (count word first) under its node's lock: ids first, then the
/// count, so a reader never sees a count covering unwritten ids.
fn write_list(list: &[AtomicU32], ids: impl Iterator<Item = u32>) {
    let Some((count, slots)) = list.split_first() else {
        return;
    };
    let mut written = 0;
    for (slot, id) in slots.iter().zip(ids) {
        slot.store(id, Ordering::Release);
        written += 1;
    }
    count.store(written, Ordering::Release);
}
