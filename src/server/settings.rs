//! The validated settings of a server.

use std::net::SocketAddr;
use std::path::PathBuf;

use mplug_index::HnswParams;

use super::auth::ApiKey;
use crate::engine::{EngineConfig, ModelSource};
use crate::{Error, Result};

/// Limits applied to client requests.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest `k` of a search. Default 1000.
    pub max_k: usize,
    /// `rerank_k` when a reranked search gives 0: `max(k, this)`. Default 32.
    pub default_rerank_k: usize,
    /// Largest `rerank_k`. Default 256 (mPLUG's `k_test`).
    pub max_rerank_k: usize,
    /// Largest text (query, item or question) in bytes. Default 16 KiB.
    pub max_text_bytes: usize,
    /// Largest decoded gRPC message in bytes. Default 32 MiB.
    pub max_message_bytes: usize,
    /// Items one ingest stream may have in flight before the server stops reading it.
    /// Default 32.
    pub ingest_window: usize,
    /// Largest beam size of a generation request. Default 10.
    pub max_beam_size: usize,
    /// Largest generation length in tokens. Default 64.
    pub max_generation_length: usize,
    /// Largest number of candidates in one Match request. Default 256.
    pub max_match_candidates: usize,
    /// Largest number of metadata entries per item. Default 64.
    pub max_metadata_entries: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_k: 1000,
            default_rerank_k: 32,
            max_rerank_k: 256,
            max_text_bytes: 16 << 10,
            max_message_bytes: 32 << 20,
            ingest_window: 32,
            max_beam_size: 10,
            max_generation_length: 64,
            max_match_candidates: 256,
            max_metadata_entries: 64,
        }
    }
}

/// TLS certificate chain and private key, both PEM files.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
}

/// Everything `serve` needs; build it with struct syntax and call [`Self::validate`].
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// gRPC listen address (port 0 picks a free port).
    pub listen: SocketAddr,
    /// Prometheus listen address; `None` disables the exporter.
    pub metrics_listen: Option<SocketAddr>,
    /// Required API key; mandatory when `listen` is not a loopback address.
    pub api_key: Option<ApiKey>,
    /// Serve TLS with these files; plaintext when `None`.
    pub tls: Option<TlsFiles>,
    /// Directory of the collection.
    pub data_dir: PathBuf,
    /// The model to load.
    pub model: ModelSource,
    /// Queue, thread, batch and cache sizes.
    pub engine: EngineConfig,
    /// Graph parameters used when the collection is created.
    pub hnsw: HnswParams,
    /// Request limits.
    pub limits: Limits,
}

impl ServerSettings {
    /// Refuses a non-loopback listen address without an API key and limits that cannot
    /// work together. Errors with `Error::InvalidArgument` naming the setting.
    pub fn validate(&self) -> Result<()> {
        if !self.listen.ip().is_loopback() && self.api_key.is_none() {
            return Err(invalid(
                "api_key",
                format!(
                    "an api key is required to listen on {}, which is not a loopback address",
                    self.listen
                ),
            ));
        }
        let limits = &self.limits;
        if limits.max_k == 0 || limits.max_k > mplug_index::MAX_K {
            let reason = format!("expected 1..={}, got {}", mplug_index::MAX_K, limits.max_k);
            return Err(invalid("max_k", reason));
        }
        if limits.max_rerank_k == 0 || limits.default_rerank_k > limits.max_rerank_k {
            return Err(invalid(
                "max_rerank_k",
                "must be at least default_rerank_k".into(),
            ));
        }
        if limits.ingest_window == 0 || limits.max_beam_size == 0 {
            return Err(invalid(
                "ingest_window",
                "windows and beams must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

fn invalid(field: &str, reason: String) -> Error {
    Error::InvalidArgument {
        field: field.into(),
        reason,
    }
}
