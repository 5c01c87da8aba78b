//! The validated settings of a server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// Largest `rerank_k`, and so the largest `k` of a reranked search. Default 256 (mPLUG's
    /// `k_test`).
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
    /// Largest total of an item's metadata keys and values, in bytes. Default 16 KiB, so
    /// that `max_k` hits with the longest ids and this much metadata each fit in the default
    /// message limit (about 18 MB of 32 MiB).
    pub max_metadata_bytes: usize,
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
            max_metadata_bytes: 16 << 10,
        }
    }
}

/// How long a shutdown waits for requests in flight by default.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(15);

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
    /// How long a shutdown lets requests in flight finish before answering the ones left
    /// UNAVAILABLE and closing their connections. Default [`DEFAULT_SHUTDOWN_GRACE`].
    pub shutdown_grace: Duration,
}

impl ServerSettings {
    /// Refuses a non-loopback listen address without an API key, an engine configuration
    /// that cannot run and limits that cannot work together. Errors with
    /// `Error::InvalidArgument` naming the setting.
    pub fn validate(&self) -> Result<()> {
        validate_listen(self.listen, self.api_key.as_ref())?;
        self.engine.validate()?;
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

/// Refuses to listen on a non-loopback address without an API key. Callers check this
/// before touching the data directory, so a refused start leaves no files behind. Errors
/// with `Error::InvalidArgument` for `api_key`.
pub fn validate_listen(listen: SocketAddr, api_key: Option<&ApiKey>) -> Result<()> {
    if listen.ip().is_loopback() || api_key.is_some() {
        return Ok(());
    }
    let reason =
        format!("an api key is required to listen on {listen}, which is not a loopback address");
    Err(invalid("api_key", reason))
}

fn invalid(field: &str, reason: String) -> Error {
    Error::InvalidArgument {
        field: field.into(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ModelSource;
    use crate::model::Tasks;

    fn settings(engine: EngineConfig) -> ServerSettings {
        ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            api_key: None,
            tls: None,
            data_dir: PathBuf::from("unused"),
            model: ModelSource {
                checkpoint: PathBuf::from("unused.safetensors"),
                config: PathBuf::from("unused.json"),
                tasks: Tasks::ALL,
                max_pixels: 1,
                precision: Default::default(),
            },
            engine,
            hnsw: Default::default(),
            limits: Limits::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }

    #[test]
    fn an_engine_that_cannot_run_is_refused_before_binding() {
        assert!(settings(EngineConfig::default()).validate().is_ok());
        let engine = EngineConfig {
            max_batch: 0,
            ..EngineConfig::default()
        };
        let error = settings(engine).validate().expect_err("max_batch 0");
        assert!(error.to_string().contains("max_batch"), "{error}");
    }
}
