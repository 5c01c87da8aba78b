use std::collections::HashSet;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use super::*;

const DIM: usize = 32;

/// Nodes per thousand that may be unreachable after a parallel build. The neighbour
/// heuristic can prune every link into a node, and which node (if any) depends on the
/// order in which parallel inserts link; a lost link from a race would lose far more.
const MAX_LOST_PER_THOUSAND: usize = 1;

fn shape() -> Shape {
    Shape {
        dimension: DIM,
        max_connections: 12,
        ef_construction: 100,
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

fn build(vectors: &[Vec<f32>]) -> Hnsw {
    let graph = Hnsw::new(shape(), vectors.len());
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
        lost.len() <= MAX_LOST_PER_THOUSAND * vectors.len() / 1000,
        "nodes not found by their own vector: {lost:?}"
    );
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

#[test]
fn dump_and_reload_give_the_same_graph() {
    let vectors = unit_vectors(1500, 9);
    let graph = build(&vectors);
    let dir = tempfile::tempdir().unwrap();
    let (links, data) = (dir.path().join("g"), dir.path().join("v"));
    graph.write_files(&links, &data).unwrap();

    let spare = 16;
    let file = GraphFile::read(&links, spare).unwrap();
    let vector_file = VectorFile::read(&data, spare).unwrap();
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
    let base = 8 + 11 * 4 + 300;
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
    let checked: Vec<usize> = (0..vectors.len()).step_by(3).collect();
    let lost = checked.iter().filter(|&&i| {
        let found = graph.search(&vectors[i], 1, 200, None);
        found.first().map(|h| h.0) != Some(1000 + i as u64)
    });
    let allowed = MAX_LOST_PER_THOUSAND * checked.len() / 1000;
    assert!(
        lost.count() <= allowed,
        "more than {allowed} nodes unreachable after a concurrent build"
    );
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
