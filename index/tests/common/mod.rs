//! Helpers shared by the integration tests.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::Path;

use mplug_index::{
    Collection, Filter, HnswParams, Item, ItemKind, Metric, SearchRequest, Settings,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Settings for a cosine collection of `dimension` with default graph parameters.
pub fn settings(dimension: usize) -> Settings {
    Settings {
        dimension,
        metric: Metric::Cosine,
        hnsw: HnswParams::default(),
        model_id: "test-model".to_string(),
    }
}

/// `count` random unit vectors drawn from a seeded generator.
pub fn unit_vectors(count: usize, dimension: usize, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let v: Vec<f32> = (0..dimension)
                .map(|_| rng.gen_range(-1.0f32..1.0))
                .collect();
            let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / norm).collect()
        })
        .collect()
}

/// Content hash derived from the id and a version number.
pub fn hash_of(id: &str, version: u32) -> [u8; 32] {
    let mut bytes = id.as_bytes().to_vec();
    bytes.extend_from_slice(&version.to_le_bytes());
    *blake3::hash(&bytes).as_bytes()
}

/// An image item without metadata or payload.
pub fn item(id: &str, vector: Vec<f32>) -> Item {
    Item {
        id: id.to_string(),
        kind: ItemKind::Image,
        vector,
        metadata: BTreeMap::new(),
        content_hash: hash_of(id, 0),
        payload: None,
    }
}

/// A search request for the `k` best items.
pub fn request(vector: &[f32], k: usize) -> SearchRequest<'_> {
    SearchRequest {
        vector,
        k,
        ef: None,
        filter: Filter::default(),
        exact: false,
    }
}

/// Opens a collection with default settings of `dimension` in `dir`.
pub fn open(dir: &Path, dimension: usize) -> Collection {
    Collection::open(dir, settings(dimension)).expect("collection opens")
}

/// Ids of the hits of a search.
pub fn ids(collection: &Collection, request: &SearchRequest<'_>) -> Vec<String> {
    let hits = collection.search(request).expect("search succeeds");
    hits.into_iter().map(|h| h.id).collect()
}
