use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::io::Placement;
use super::*;

const DIM: usize = 32;

fn shape() -> Shape {
    Shape {
        dimension: DIM,
        max_connections: 12,
        ef_construction: 100,
    }
}

/// A shape with short lists, which overflow and get pruned often.
fn narrow_shape() -> Shape {
    Shape {
        dimension: DIM,
        max_connections: 4,
        ef_construction: 50,
    }
}

/// Seeded unit vectors from a small xorshift generator.
fn unit_vectors(count: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    (0..count)
        .map(|_| {
            let v: Vec<f32> = (0..DIM).map(|_| next()).collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

/// Seeded vectors of norms spread over `[low, 1]`, as inner-product collections hold. The
/// heuristic prunes links into short vectors more than into long ones.
fn scaled_vectors(count: usize, low: f32, seed: u64) -> Vec<Vec<f32>> {
    let vectors = unit_vectors(count, seed);
    let norms = unit_vectors(count, seed ^ 0xA5A5);
    vectors
        .into_iter()
        .zip(norms)
        .map(|(v, n)| {
            let scale = low + (1.0 - low) * (n[0].abs() * 4.0).min(1.0);
            v.into_iter().map(|x| x * scale).collect()
        })
        .collect()
}

/// Seeded unit vectors of which two in three are copies of one of `count / group` others,
/// exact or moved by up to `noise` per component: neighbour lists fill with near copies.
fn duplicated_vectors(count: usize, group: usize, noise: f32, seed: u64) -> Vec<Vec<f32>> {
    let originals = unit_vectors(count, seed);
    let jitter = unit_vectors(count, seed ^ 0x5A5A);
    (0..count)
        .map(|i| {
            if i % 3 == 0 {
                return originals[i].clone();
            }
            let original = &originals[i / group * group];
            let v: Vec<f32> = original
                .iter()
                .zip(&jitter[i])
                .map(|(a, b)| a + noise * b)
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

fn build(vectors: &[Vec<f32>]) -> Hnsw {
    build_shaped(shape(), vectors)
}

/// One parallel batch of every vector, slots numbered from 1000.
fn build_shaped(shape: Shape, vectors: &[Vec<f32>]) -> Hnsw {
    let graph = Hnsw::new(shape, vectors.len());
    let items: Vec<(&[f32], u64)> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| (v.as_slice(), 1000 + i as u64))
        .collect();
    assert_eq!(graph.insert(&items), vectors.len());
    graph
}

/// Exact top-k slots among those `accept` keeps.
fn brute_force(
    vectors: &[Vec<f32>],
    query: &[f32],
    k: usize,
    accept: &dyn Fn(u64) -> bool,
) -> Vec<u64> {
    let mut scored: Vec<(f32, u64)> = vectors
        .iter()
        .enumerate()
        .map(|(i, v)| (distance::dot_scalar(query, v), 1000 + i as u64))
        .filter(|(_, slot)| accept(*slot))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.into_iter().take(k).map(|(_, slot)| slot).collect()
}

fn recall(
    graph: &Hnsw,
    vectors: &[Vec<f32>],
    queries: &[Vec<f32>],
    ef: usize,
    accept: Option<Accept<'_>>,
) -> f64 {
    let everything = |_: u64| true;
    let filter = accept.unwrap_or(&everything);
    let mut found = 0;
    for query in queries {
        let expected: HashSet<u64> = brute_force(vectors, query, 10, filter)
            .into_iter()
            .collect();
        let got = graph.search(query, 10, ef, accept);
        assert!(
            got.windows(2).all(|w| w[0].1 >= w[1].1),
            "hits are not sorted"
        );
        assert!(
            got.iter().all(|(slot, _)| filter(*slot)),
            "a rejected slot was returned"
        );
        found += got
            .iter()
            .filter(|(slot, _)| expected.contains(slot))
            .count();
    }
    found as f64 / (queries.len() * 10) as f64
}

#[test]
fn recall_against_brute_force_and_every_node_finds_itself() {
    let vectors = unit_vectors(3000, 1);
    let graph = build(&vectors);
    let queries = unit_vectors(100, 2);
    let recall = recall(&graph, &vectors, &queries, 64, None);
    assert!(recall >= 0.95, "recall@10 {recall}");

    let lost: Vec<usize> = (0..vectors.len())
        .filter(|&i| {
            let found = graph.search(&vectors[i], 1, 500, None);
            found.first().map(|h| h.0) != Some(1000 + i as u64)
        })
        .collect();
    assert!(
        lost.is_empty(),
        "nodes not found by their own vector: {lost:?}"
    );
}

/// A node that descends to a neighbour still being linked must not start its base-level
/// search from that neighbour's empty list: it would keep it as its only neighbour, and
/// searches would rarely find it again.
#[test]
fn parallel_builds_give_every_node_a_full_base_list() {
    let vectors = unit_vectors(3000, 1);
    let floor = shape().max_connections / 2;
    for round in 0..4 {
        let graph = build(&vectors);
        let mut list = Vec::new();
        let short: Vec<(u32, usize)> = (0..vectors.len() as u32)
            .filter_map(|node| {
                list.clear();
                graph.read_links(node, 0, &mut list);
                (list.len() < floor).then_some((node, list.len()))
            })
            .collect();
        assert!(
            short.is_empty(),
            "build {round}: nodes with fewer than {floor} base-level links: {short:?}"
        );
    }
}

#[test]
fn filtered_search_returns_only_accepted_slots_with_good_recall() {
    let vectors = unit_vectors(2000, 3);
    let graph = build(&vectors);
    let queries = unit_vectors(50, 4);
    let even = |slot: u64| slot.is_multiple_of(2);
    let recall = recall(&graph, &vectors, &queries, 64, Some(&even));
    assert!(recall >= 0.95, "filtered recall@10 {recall}");
    let none = |_: u64| false;
    assert!(graph.search(&queries[0], 10, 64, Some(&none)).is_empty());
}

#[test]
fn empty_and_tiny_graphs_answer() {
    let graph = Hnsw::new(shape(), 0);
    assert!(graph.search(&[0.0; DIM], 5, 10, None).is_empty());
    assert!(!graph.has_room(1));
    let vectors = unit_vectors(3, 5);
    let graph = graph.with_room(3);
    assert!(graph.has_room(3));
    let items: Vec<(&[f32], u64)> = vectors.iter().map(|v| (v.as_slice(), 7)).collect();
    assert_eq!(graph.insert(&items[..1]), 1);
    assert_eq!(graph.search(&vectors[1], 5, 10, None).len(), 1);
    assert_eq!(graph.insert(&items[1..]), 2);
    assert_eq!(graph.search(&vectors[1], 5, 10, None).len(), 3);
}

#[test]
fn a_full_graph_leaves_extra_vectors_out() {
    let vectors = unit_vectors(10, 6);
    let graph = Hnsw::new(shape(), 4);
    let items: Vec<(&[f32], u64)> = vectors.iter().map(|v| (v.as_slice(), 1)).collect();
    assert_eq!(graph.insert(&items), 4);
    assert_eq!(graph.len(), 4);
}

#[test]
fn copies_with_room_answer_like_the_original() {
    let vectors = unit_vectors(1500, 7);
    let graph = build(&vectors);
    let copy = graph.with_room(10);
    assert!(copy.has_room(10) && copy.len() == graph.len());
    assert_eq!(copy.slots(), graph.slots());
    for query in unit_vectors(20, 8) {
        assert_eq!(
            copy.search(&query, 10, 40, None),
            graph.search(&query, 10, 40, None)
        );
    }
}

/// Inserts into a graph reloaded from `links` and `data` after removing both files: the new
/// nodes are found, and the files' bytes (still held by the mapping) never change.
fn grow_a_mapped_graph(loaded: Hnsw, links: &Path, data: &Path) {
    let before = [links, data].map(|p| std::fs::read(p).unwrap());
    let (links_file, data_file) = (File::open(links).unwrap(), File::open(data).unwrap());
    std::fs::remove_file(links).unwrap();
    std::fs::remove_file(data).unwrap();

    let extra = unit_vectors(16, 13);
    let first = loaded.len() as u64;
    let items: Vec<(&[f32], u64)> = (first..)
        .zip(&extra)
        .map(|(slot, v)| (v.as_slice(), slot))
        .collect();
    loaded.insert(&items);
    for (slot, vector) in (first..).zip(&extra) {
        assert_eq!(loaded.search(vector, 1, 40, None)[0].0, slot);
    }
    let after = [links_file, data_file].map(|mut f| {
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes).unwrap();
        bytes
    });
    assert!(before == after, "a reloaded graph wrote to its dump files");
}

#[test]
fn dump_and_reload_give_the_same_graph() {
    for placement in [Placement::MappedLocked, Placement::Read] {
        dump_and_reload(placement);
    }
}

/// A graph dumped and reloaded with its vectors placed as `placement` says equals the
/// original, and grows without touching its files.
fn dump_and_reload(placement: Placement) {
    let vectors = unit_vectors(1500, 9);
    let graph = build(&vectors);
    let dir = tempfile::tempdir().unwrap();
    let (links, data) = (dir.path().join("g"), dir.path().join("v"));
    graph.write_files(&links, &data).unwrap();

    let spare = 16;
    let file = GraphFile::read(&links, spare).unwrap();
    let vector_file = VectorFile::read_as(&data, spare, placement).unwrap();
    if placement == Placement::Read {
        assert!(!vector_file.is_mapped());
    }
    let hash = crate::checksum::of(&std::fs::read(&links).unwrap());
    assert_eq!(file.checksum, hash);
    let loaded = Hnsw::from_files(shape(), file, vector_file, spare).unwrap();
    assert_eq!(loaded.slots(), graph.slots());
    assert!(loaded.has_room(spare) && !loaded.has_room(spare + 1));
    for node in 0..graph.len() as u32 {
        assert_eq!(loaded.vector(node), graph.vector(node));
        for level in 0..=graph.level(node) {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            graph.read_links(node, level, &mut a);
            loaded.read_links(node, level, &mut b);
            assert_eq!(a, b, "links of {node} on level {level}");
        }
    }
    for query in unit_vectors(20, 10) {
        assert_eq!(
            loaded.search(&query, 10, 40, None),
            graph.search(&query, 10, 40, None)
        );
    }

    let other = Shape {
        max_connections: 8,
        ..shape()
    };
    let file = GraphFile::read(&links, 0).unwrap();
    let vector_file = VectorFile::read(&data, 0).unwrap();
    assert!(Hnsw::from_files(other, file, vector_file, 0).is_err());
    grow_a_mapped_graph(loaded, &links, &data);
}

#[test]
fn damaged_files_are_refused_not_trusted() {
    let vectors = unit_vectors(300, 11);
    let graph = build(&vectors);
    let dir = tempfile::tempdir().unwrap();
    let (links, data) = (dir.path().join("g"), dir.path().join("v"));
    graph.write_files(&links, &data).unwrap();

    let bytes = std::fs::read(&links).unwrap();
    std::fs::write(&links, &bytes[..bytes.len() - 3]).unwrap();
    assert!(GraphFile::read(&links, 0).is_err(), "truncated file");

    let mut bad = bytes.clone();
    let stride = 4 * (1 + 2 * shape().max_connections);
    let base = bytes.len() - 300 * stride;
    bad[base + 4..base + 8].copy_from_slice(&u32::MAX.to_ne_bytes());
    std::fs::write(&links, &bad).unwrap();
    let file = GraphFile::read(&links, 0).unwrap();
    let vector_file = VectorFile::read(&data, 0).unwrap();
    let error = Hnsw::from_files(shape(), file, vector_file, 0)
        .err()
        .unwrap();
    assert!(error.contains("bad list"), "{error}");
}

#[test]
fn concurrent_inserts_and_searches_stay_consistent() {
    let vectors = Arc::new(unit_vectors(4000, 12));
    let graph = Arc::new(Hnsw::new(shape(), vectors.len()));
    let done = Arc::new(AtomicBool::new(false));
    let searchers: Vec<_> = (0..2)
        .map(|t| {
            let (graph, done, vectors) = (graph.clone(), done.clone(), vectors.clone());
            std::thread::spawn(move || {
                let mut searches = 0;
                while !done.load(Ordering::Acquire) || searches < 10 {
                    let query = &vectors[(searches * 7 + t) % vectors.len()];
                    let len = graph.len() as u64;
                    for (slot, score) in graph.search(query, 5, 32, None) {
                        assert!(slot >= 1000 && slot < 1000 + len.max(1) + 4000);
                        assert!(score.is_finite());
                    }
                    searches += 1;
                }
            })
        })
        .collect();
    for chunk in (0..vectors.len()).collect::<Vec<_>>().chunks(500) {
        let items: Vec<(&[f32], u64)> = chunk
            .iter()
            .map(|&i| (vectors[i].as_slice(), 1000 + i as u64))
            .collect();
        graph.insert(&items);
    }
    done.store(true, Ordering::Release);
    searchers.into_iter().for_each(|s| s.join().unwrap());

    let queries = unit_vectors(50, 13);
    let recall = recall(&graph, &vectors, &queries, 64, None);
    assert!(recall >= 0.95, "recall@10 after concurrent build {recall}");
    assert_every_node_reachable(&graph, "after inserts with concurrent searches");
}

#[test]
fn levels_follow_the_geometric_distribution() {
    let mult = 1.0 / 16f64.ln();
    let levels: Vec<usize> = (0..100_000).map(|n| draw_level(n, mult)).collect();
    let above = levels.iter().filter(|&&l| l >= 1).count() as f64 / 1e5;
    assert!(
        (above - 1.0 / 16.0).abs() < 0.005,
        "share above level 0: {above}"
    );
    assert!(levels.iter().all(|&l| l <= MAX_LEVEL));
}

/// Nodes that a walk of the base level from the entry point does not reach.
fn unreachable_nodes(graph: &Hnsw) -> Vec<u32> {
    let len = graph.len();
    let Some((entry, _)) = graph.entry() else {
        return Vec::new();
    };
    let mut seen = vec![false; len];
    seen[entry as usize] = true;
    let mut stack = vec![entry];
    let mut links = Vec::new();
    while let Some(node) = stack.pop() {
        links.clear();
        graph.read_links(node, 0, &mut links);
        for &id in &links {
            if !std::mem::replace(&mut seen[id as usize], true) {
                stack.push(id);
            }
        }
    }
    (0..len as u32).filter(|&n| !seen[n as usize]).collect()
}

/// Anchors of every node counted from the lists: links from lower-ranked nodes.
fn counted_anchors(graph: &Hnsw) -> Vec<u32> {
    let mut counts = vec![0u32; graph.len()];
    let mut links = Vec::new();
    for owner in 0..graph.len() as u32 {
        links.clear();
        graph.read_links(owner, 0, &mut links);
        for &id in &links {
            counts[id as usize] += u32::from(graph.rank(owner) < graph.rank(id));
        }
    }
    counts
}

/// Checks that every node is reachable on the base level, and that the kept anchor counts
/// match the lists and show why: every node but the entry point, the only node of rank 0,
/// is anchored.
fn assert_every_node_reachable(graph: &Hnsw, when: &str) {
    let unreachable = unreachable_nodes(graph);
    assert!(
        unreachable.is_empty(),
        "{} of {} nodes unreachable {when}: {unreachable:?}",
        unreachable.len(),
        graph.len()
    );
    let kept: Vec<u32> = (0..graph.len() as u32).map(|n| graph.anchors(n)).collect();
    assert!(
        kept == counted_anchors(graph),
        "kept anchor counts differ from the lists {when}"
    );
    let entry = graph.entry().map(|(node, _)| node);
    let loose: Vec<u32> = (0..graph.len() as u32)
        .filter(|&n| Some(n) != entry && (graph.rank(n) == 0 || graph.anchors(n) == 0))
        .collect();
    assert!(loose.is_empty(), "nodes without anchor {when}: {loose:?}");
}

/// Removes every base-level link into `node`, as the heuristic may do.
fn cut_links_into(graph: &Hnsw, node: u32) {
    for owner in 0..graph.len() as u32 {
        let mut links = Vec::new();
        graph.read_links(owner, 0, &mut links);
        links.retain(|&id| id != node);
        let list = graph.links(owner, 0);
        for (place, &id) in links.iter().enumerate() {
            list[1 + place].store(id, Ordering::Release);
        }
        list[0].store(links.len() as u32, Ordering::Release);
    }
}

#[test]
fn parallel_builds_leave_every_node_reachable() {
    for seed in 0..2 {
        let graph = build_shaped(narrow_shape(), &unit_vectors(5000, 20 + seed));
        assert_every_node_reachable(&graph, "after a build with short lists");
    }
    let graph = build(&scaled_vectors(4000, 0.2, 30));
    assert_every_node_reachable(&graph, "after a build of vectors of many norms");
    let graph = build(&duplicated_vectors(3000, 50, 0.0, 31));
    assert_every_node_reachable(&graph, "after a build with exact duplicates");
    let graph = build(&duplicated_vectors(3000, 50, 0.01, 32));
    assert_every_node_reachable(&graph, "after a build with near duplicates");
}

/// Batches of 1 to 200 vectors into a graph of 2000 to 4000 nodes: each one small enough to
/// keep its ranks, and between them both kinds of vectors that lose their links most.
#[test]
fn small_batches_leave_every_node_reachable() {
    let mut vectors = scaled_vectors(2900, 0.3, 40);
    vectors.extend(duplicated_vectors(1000, 20, 0.01, 41));
    let graph = Hnsw::new(shape(), vectors.len());
    let items: Vec<(&[f32], u64)> = vectors.iter().map(|v| (v.as_slice(), 1)).collect();
    assert_eq!(graph.insert(&items[..2000]), 2000);
    let sizes = [1, 2, 5, 13, 40, 63, 64, 100, 200];
    let mut start = 2000;
    for size in sizes.iter().cycle() {
        let end = (start + size).min(items.len());
        assert_eq!(graph.insert(&items[start..end]), end - start);
        assert_every_node_reachable(&graph, &format!("after the batch ending at {end}"));
        start = end;
        if start == items.len() {
            break;
        }
    }
    assert_eq!(
        graph.writer.lock().ranked_len,
        2000,
        "a small batch ranked the graph afresh"
    );
}

#[test]
fn reload_counts_links_and_relinks_nodes_without_any() {
    let vectors = unit_vectors(2000, 50);
    let graph = build(&vectors);
    let entry = graph.entry().unwrap().0;
    let cut: Vec<u32> = (0..2000).step_by(97).filter(|&n| n != entry).collect();
    cut.iter().for_each(|&node| cut_links_into(&graph, node));
    assert_eq!(
        unreachable_nodes(&graph),
        cut,
        "the cut nodes are unreachable"
    );

    let dir = tempfile::tempdir().unwrap();
    let (links, data) = (dir.path().join("g"), dir.path().join("v"));
    graph.write_files(&links, &data).unwrap();
    let file = GraphFile::read(&links, 0).unwrap();
    let vector_file = VectorFile::read(&data, 0).unwrap();
    let loaded = Hnsw::from_files(shape(), file, vector_file, 0).unwrap();
    assert_every_node_reachable(&loaded, "after reloading a graph with unlinked nodes");
    for node in cut {
        let found = loaded.search(&vectors[node as usize], 1, 100, None);
        assert_eq!(
            found[0].0,
            1000 + u64::from(node),
            "node {node} by its own vector"
        );
    }
}

#[test]
fn reload_of_a_reachable_graph_keeps_it_reachable() {
    let graph = build(&scaled_vectors(3000, 0.2, 60));
    let dir = tempfile::tempdir().unwrap();
    let (links, data) = (dir.path().join("g"), dir.path().join("v"));
    graph.write_files(&links, &data).unwrap();
    let spare = 500;
    let file = GraphFile::read(&links, spare).unwrap();
    let vector_file = VectorFile::read(&data, spare).unwrap();
    let loaded = Hnsw::from_files(shape(), file, vector_file, spare).unwrap();
    assert_every_node_reachable(&loaded, "after a reload");

    let more = scaled_vectors(spare, 0.2, 61);
    let items: Vec<(&[f32], u64)> = more.iter().map(|v| (v.as_slice(), 1)).collect();
    assert_eq!(loaded.insert(&items), spare);
    assert_every_node_reachable(&loaded, "after inserting into a reloaded graph");
    let copy = loaded.with_room(10);
    assert_every_node_reachable(&copy, "in a copy with room");
}
