//! Durable vector index: HNSW (hnsw_rs) over items stored in sled. The graph is a cache of
//! what sled holds.

/// Errors raised by the index.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Service's fault: the storage layer failed.
    #[error("storage failure at {path}: {reason}")]
    Storage {
        /// Collection directory.
        path: std::path::PathBuf,
        /// What went wrong.
        reason: String,
    },
}
