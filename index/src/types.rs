//! Values exchanged with callers: settings, items, search requests and answers.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Similarity used to rank items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Metric {
    /// Cosine similarity. Vectors are normalised to unit length on upsert and on search, so
    /// scores lie in `[-1, 1]`.
    Cosine,
    /// Inner product. Stored vectors must have a norm of at most one, with a rounding
    /// allowance of 1e-3 (they are kept as given); the score is the raw inner product of the
    /// query and the stored vector.
    InnerProduct,
}

/// What an item was embedded from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ItemKind {
    /// An image.
    Image,
    /// A text.
    Text,
}

/// Parameters of the HNSW graph and of the search planner.
///
/// `max_connections` and `ef_construction` shape the graph: changing them on an existing
/// collection is allowed and makes the next open rebuild the graph instead of reloading it.
/// The other fields only affect searches and maintenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HnswParams {
    /// Neighbours kept per node on the upper layers (twice this on the base layer), 2..=255.
    /// Default 24.
    pub max_connections: usize,
    /// Width of the candidate list while inserting, `max_connections..=`[`crate::MAX_EF`].
    /// Default 200.
    pub ef_construction: usize,
    /// Width of the candidate list while searching when a request gives none,
    /// `1..=`[`crate::MAX_EF`]; raised to `k` when smaller. Default 512, chosen so that
    /// recall@10 stays at or above 0.95 even on unstructured random 256-d data; embeddings of
    /// real content reach that recall with a much smaller value, which makes searches
    /// proportionally faster.
    pub ef_search: usize,
    /// Share of tombstoned graph nodes past which a background compaction rebuilds the graph
    /// without them, in `(0, 1]`. Default 0.25.
    pub compact_tombstone_ratio: f32,
    /// A filtered search scans the matching items exactly instead of walking the graph when
    /// at most this many items are estimated to match. Default 4096.
    pub exact_scan_max_matches: usize,
    /// A filtered search also scans exactly when the estimated share of matching items is
    /// below this fraction, in `[0, 1]`. Default 0.02.
    pub exact_scan_fraction: f32,
}

impl Default for HnswParams {
    fn default() -> Self {
        Self {
            max_connections: 24,
            ef_construction: 200,
            ef_search: 512,
            compact_tombstone_ratio: 0.25,
            exact_scan_max_matches: 4096,
            exact_scan_fraction: 0.02,
        }
    }
}

/// What a collection is: opening an existing collection with a different `dimension`,
/// `metric` or `model_id` is refused with [`crate::Error::SettingsMismatch`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Number of components of every vector, 1..=65536.
    pub dimension: usize,
    /// Similarity used to rank items.
    pub metric: Metric,
    /// Graph and planner parameters.
    pub hnsw: HnswParams,
    /// Identifier of the model that produced the vectors; vectors of different models are
    /// not comparable, so a collection keeps one.
    pub model_id: String,
}

/// One stored embedding with what the caller needs to use a hit.
#[derive(Debug, Clone, PartialEq)]
pub struct Item {
    /// Caller-chosen identifier, 1..=1024 bytes.
    pub id: String,
    /// What the vector was embedded from.
    pub kind: ItemKind,
    /// The embedding; normalised by the index for [`Metric::Cosine`].
    pub vector: Vec<f32>,
    /// String attributes usable as equality filters.
    pub metadata: BTreeMap<String, String>,
    /// Hash of the content the vector was computed from; an upsert with the same id, hash,
    /// kind and metadata is a no-op.
    pub content_hash: [u8; 32],
    /// The raw blob the item came from (image bytes or text), returned by `get` only.
    pub payload: Option<Vec<u8>>,
}

/// What an upsert did with one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpsertOutcome {
    /// The id was new.
    Inserted,
    /// The id existed with other content; its old vector will never be returned again.
    Replaced,
    /// The id existed with the same hash, kind, metadata and payload presence: nothing written.
    Unchanged,
}

/// Restricts a search to matching items. The default matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Filter {
    /// Accepted kinds; `None` accepts every kind, an empty list accepts none.
    pub kinds: Option<Vec<ItemKind>>,
    /// Every pair must be present with exactly this value; empty accepts everything.
    pub metadata: BTreeMap<String, String>,
}

impl Filter {
    /// True when the filter accepts every item.
    pub fn is_empty(&self) -> bool {
        self.kinds.is_none() && self.metadata.is_empty()
    }

    /// True when an item of this kind and metadata passes.
    pub fn accepts(&self, kind: ItemKind, metadata: &BTreeMap<String, String>) -> bool {
        let kind_ok = self
            .kinds
            .as_ref()
            .is_none_or(|kinds| kinds.contains(&kind));
        kind_ok
            && self
                .metadata
                .iter()
                .all(|(key, value)| metadata.get(key) == Some(value))
    }
}

/// A nearest-neighbour query.
#[derive(Debug, Clone)]
pub struct SearchRequest<'a> {
    /// Query vector of the collection's dimension; normalised internally.
    pub vector: &'a [f32],
    /// Number of hits wanted, 1..=[`crate::MAX_K`].
    pub k: usize,
    /// Candidate list width; `None` uses the collection's `ef_search`. Raised to `k`.
    pub ef: Option<usize>,
    /// Which items may be returned.
    pub filter: Filter,
    /// Scan every matching item instead of walking the graph.
    pub exact: bool,
}

/// One search result, best first in the returned list.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    /// Item id.
    pub id: String,
    /// Item kind.
    pub kind: ItemKind,
    /// Cosine similarity or inner product with the query (higher is better).
    pub score: f32,
    /// Item metadata.
    pub metadata: BTreeMap<String, String>,
}

/// Where the in-memory graph came from when the collection was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GraphOrigin {
    /// The collection had no items.
    Empty,
    /// Loaded from a dump whose epoch matched the stored one.
    Reloaded,
    /// Rebuilt from the stored items (missing, torn, stale or foreign dump).
    Rebuilt,
}

/// Counters describing a collection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    /// Live image items.
    pub images: u64,
    /// Live text items.
    pub texts: u64,
    /// Graph nodes whose item was deleted or replaced; removed by compaction.
    pub tombstones: u64,
    /// Nodes in the graph, live and tombstoned.
    pub graph_points: u64,
    /// Write epoch the in-memory graph reflects (bumped by every write batch).
    pub graph_epoch: u64,
    /// Epoch of the graph dump on disk, if a valid one was written or loaded.
    pub dumped_epoch: Option<u64>,
    /// Disk space the files of the collection directory occupy (allocated blocks, so
    /// file holes count for nothing).
    pub bytes_on_disk: u64,
}
