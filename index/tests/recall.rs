//! Recall of graph searches against brute force on 20k random 256-d unit vectors, with and
//! without metadata filters.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::sync::OnceLock;

use common::{item, request, unit_vectors};
use mplug_index::{Collection, Filter};

const COUNT: usize = 20_000;
const DIM: usize = 256;
const QUERIES: usize = 200;
const K: usize = 10;

struct Fixture {
    _dir: tempfile::TempDir,
    collection: Collection,
    vectors: Vec<Vec<f32>>,
    queries: Vec<Vec<f32>>,
}

/// Half of the items are "even"; one in two hundred (0.5 %) is "rare".
fn metadata(i: usize) -> BTreeMap<String, String> {
    let parity = if i.is_multiple_of(2) { "even" } else { "odd" };
    let mut metadata = BTreeMap::from([("parity".to_string(), parity.to_string())]);
    if i.is_multiple_of(200) {
        metadata.insert("rare".to_string(), "yes".to_string());
    }
    metadata
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let collection = common::open(dir.path(), DIM);
        let vectors = unit_vectors(COUNT, DIM, 11);
        for start in (0..COUNT).step_by(5_000) {
            let batch = (start..start + 5_000).map(|i| {
                let mut it = item(&i.to_string(), vectors[i].clone());
                it.metadata = metadata(i);
                it
            });
            collection.upsert(batch.collect()).unwrap();
        }
        let queries = unit_vectors(QUERIES, DIM, 12);
        Fixture {
            _dir: dir,
            collection,
            vectors,
            queries,
        }
    })
}

/// Exact top-k ids among items whose index passes `keep`.
fn brute_force(f: &Fixture, query: &[f32], keep: impl Fn(usize) -> bool) -> Vec<String> {
    let mut scored: Vec<(f32, usize)> = (0..COUNT)
        .filter(|&i| keep(i))
        .map(|i| (f.vectors[i].iter().zip(query).map(|(a, b)| a * b).sum(), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0));
    scored.iter().take(K).map(|(_, i)| i.to_string()).collect()
}

/// Mean recall@K of searches with `filter` against brute force restricted by `keep`.
fn recall(filter: &Filter, keep: impl Fn(usize) -> bool + Copy) -> f32 {
    let f = fixture();
    let mut found = 0;
    for query in &f.queries {
        let mut req = request(query, K);
        req.filter = filter.clone();
        let hits = f.collection.search(&req).unwrap();
        assert_eq!(
            hits.len(),
            K,
            "a search must return k hits when k items match"
        );
        let truth: HashSet<String> = brute_force(f, query, keep).into_iter().collect();
        found += hits.iter().filter(|h| truth.contains(&h.id)).count();
    }
    found as f32 / (QUERIES * K) as f32
}

fn metadata_filter(key: &str, value: &str) -> Filter {
    Filter {
        kinds: None,
        metadata: BTreeMap::from([(key.to_string(), value.to_string())]),
    }
}

#[test]
fn unfiltered_recall_at_default_ef_is_at_least_095() {
    let recall = recall(&Filter::default(), |_| true);
    println!("unfiltered recall@{K}: {recall:.4}");
    assert!(recall >= 0.95, "recall@{K} = {recall}");
}

#[test]
fn half_selective_filter_keeps_recall_at_least_095() {
    let recall = recall(&metadata_filter("parity", "even"), |i| i % 2 == 0);
    println!("50 % filter recall@{K}: {recall:.4}");
    assert!(recall >= 0.95, "recall@{K} = {recall}");
}

#[test]
fn very_selective_filter_returns_the_exact_top_k() {
    let f = fixture();
    let filter = metadata_filter("rare", "yes");
    for query in &f.queries {
        let mut req = request(query, K);
        req.filter = filter.clone();
        let hits: Vec<String> = f
            .collection
            .search(&req)
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(hits, brute_force(f, query, |i| i % 200 == 0));
    }
}

#[test]
fn exact_search_matches_brute_force() {
    let f = fixture();
    for query in f.queries.iter().take(20) {
        let mut req = request(query, K);
        req.exact = true;
        let hits: Vec<String> = f
            .collection
            .search(&req)
            .unwrap()
            .into_iter()
            .map(|h| h.id)
            .collect();
        assert_eq!(hits, brute_force(f, query, |_| true));
    }
}
