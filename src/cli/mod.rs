//! Command-line arguments. Every flag has a long name and an environment variable; the
//! raw arguments are turned into validated settings here and nowhere else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::engine::{EngineConfig, ModelSource, Precision};
use crate::model::Tasks;
use crate::server::auth::ApiKey;
use crate::server::settings::validate_listen;
use crate::server::{Limits, ServerSettings, TlsFiles, DEFAULT_SHUTDOWN_GRACE};
use crate::{Error, Result};

/// Image-text retrieval on mPLUG: ITC search, ITM rerank, captioning and VQA over gRPC.
#[derive(Debug, Parser)]
#[command(name = "mplug-search", version)]
pub struct Cli {
    /// Log filter (tracing-subscriber syntax, e.g. `info` or `mplug_search=debug`).
    #[arg(long, env = "MPLUG_SEARCH_LOG", default_value = "info", global = true)]
    pub log: String,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the gRPC server.
    Serve(ServeArgs),
    /// Index every image under a directory (item id = path relative to it).
    Index(IndexArgs),
    /// Search by text, or by image with `--image`.
    Search(SearchArgs),
    /// Caption an image.
    Caption(CaptionArgs),
    /// Ask a question about an image.
    Ask(AskArgs),
    /// Print the ITC vector of an image or a text as JSON.
    Embed(EmbedArgs),
    /// Print collection and engine statistics as JSON.
    Stats(ClientArgs),
    /// Train an mPLUG checkpoint (ITC, ITM and LM losses) on easy-VQA or a JSONL dataset.
    Train(crate::train::TrainArgs),
    /// Measure a checkpoint on held-out data (retrieval precision, rerank, caption, VQA).
    Eval(crate::train::EvalArgs),
}

/// A secret flag value (the API key): its `Debug` is redacted so that printing the
/// arguments never shows it.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;

    fn from_str(value: &str) -> std::result::Result<Self, Self::Err> {
        Ok(Self(value.to_owned()))
    }
}

/// Which checkpoint to load.
#[derive(Debug, Clone, Args)]
pub struct ModelArgs {
    /// Checkpoint file: `.safetensors`, AliceMind `.pth` or ModelScope `pytorch_model.bin`.
    /// Default: the built-in tiny model (written once under the data directory).
    #[arg(long, env = "MPLUG_SEARCH_CHECKPOINT", requires = "model_config")]
    pub checkpoint: Option<PathBuf>,

    /// The model's JSON config (heads, eps, stride, tokenizer, generation defaults); needed
    /// with `--checkpoint`.
    #[arg(long, env = "MPLUG_SEARCH_MODEL_CONFIG", requires = "checkpoint")]
    pub model_config: Option<PathBuf>,

    /// Largest image accepted, in pixels (width × height), checked before decoding (1 to
    /// 2^32).
    #[arg(
        long,
        env = "MPLUG_SEARCH_MAX_PIXELS",
        default_value_t = 64 << 20,
        value_parser = clap::value_parser!(u64).range(1..=1 << 32)
    )]
    pub max_pixels: u64,

    /// Arithmetic of the linear layers: `f32` (reference accuracy) or `bf16` (faster; needs
    /// a CPU with AVX512-BF16, refused at load otherwise).
    #[arg(long, env = "MPLUG_SEARCH_PRECISION", value_enum, default_value_t = Precision::F32)]
    pub precision: Precision,
}

impl ModelArgs {
    /// The model to load: the given checkpoint and config, or the built-in model written
    /// under `data_dir`. Errors when the built-in files cannot be written.
    fn source(&self, data_dir: &Path) -> Result<ModelSource> {
        let (checkpoint, config) = match (&self.checkpoint, &self.model_config) {
            (Some(checkpoint), Some(config)) => (checkpoint.clone(), config.clone()),
            _ => {
                let files = crate::embedded::materialise(data_dir)?;
                (files.checkpoint, files.config)
            }
        };
        Ok(ModelSource {
            checkpoint,
            config,
            tasks: Tasks::ALL,
            max_pixels: self.max_pixels,
            precision: self.precision,
        })
    }
}

/// Sizes of the engine.
#[derive(Debug, Clone, Args)]
pub struct EngineArgs {
    /// Query encodes that may wait before RESOURCE_EXHAUSTED (1 to 1000000).
    #[arg(
        long,
        env = "MPLUG_SEARCH_INTERACTIVE_QUEUE",
        default_value_t = 64,
        value_parser = count(MAX_QUEUE)
    )]
    pub interactive_queue: usize,
    /// Ingest encodes that may wait (ingest waits for room instead of failing; 1 to
    /// 1000000).
    #[arg(
        long,
        env = "MPLUG_SEARCH_BULK_QUEUE",
        default_value_t = 256,
        value_parser = count(MAX_QUEUE)
    )]
    pub bulk_queue: usize,
    /// Rerank, match, caption and VQA requests that may wait (1 to 1000000).
    #[arg(
        long,
        env = "MPLUG_SEARCH_HEAVY_QUEUE",
        default_value_t = 32,
        value_parser = count(MAX_QUEUE)
    )]
    pub heavy_queue: usize,
    /// Threads encoding queries (1 to 256).
    #[arg(
        long,
        env = "MPLUG_SEARCH_INTERACTIVE_THREADS",
        default_value_t = 1,
        value_parser = count(MAX_THREADS)
    )]
    pub interactive_threads: usize,
    /// Threads running heavy requests (1 to 256).
    #[arg(
        long,
        env = "MPLUG_SEARCH_HEAVY_THREADS",
        default_value_t = 1,
        value_parser = count(MAX_THREADS)
    )]
    pub heavy_threads: usize,
    /// Most images or texts per encode batch (1 to 4096).
    #[arg(
        long,
        env = "MPLUG_SEARCH_MAX_BATCH",
        default_value_t = 16,
        value_parser = count(MAX_BATCH)
    )]
    pub max_batch: usize,
    /// How long a query encode batch waits to fill, in milliseconds; 0 batches only the
    /// requests already waiting, so an idle server answers at once.
    #[arg(
        long,
        env = "MPLUG_SEARCH_INTERACTIVE_BATCH_DEADLINE_MS",
        default_value_t = 0
    )]
    pub interactive_batch_deadline_ms: u64,
    /// How long a bulk ingest encode batch waits to fill, in milliseconds.
    #[arg(long, env = "MPLUG_SEARCH_BULK_BATCH_DEADLINE_MS", default_value_t = 5)]
    pub bulk_batch_deadline_ms: u64,
    /// Byte budget of the rerank feature cache, in MiB.
    #[arg(
        long,
        env = "MPLUG_SEARCH_CACHE_MIB",
        default_value_t = 512,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(0..=1 << 20)
    )]
    pub cache_mib: usize,
}

/// Largest accepted engine queue length.
const MAX_QUEUE: u64 = 1_000_000;

/// Largest accepted engine thread count.
const MAX_THREADS: u64 = 256;

/// Largest accepted encode batch.
const MAX_BATCH: u64 = 4096;

/// Parser of a count from 1 to `max`, so that clap refuses 0 or an absurd size before
/// anything starts.
fn count(max: u64) -> clap::builder::RangedU64ValueParser<usize> {
    clap::builder::RangedU64ValueParser::<usize>::new().range(1..=max)
}

impl EngineArgs {
    fn config(&self) -> EngineConfig {
        EngineConfig {
            interactive_queue: self.interactive_queue,
            bulk_queue: self.bulk_queue,
            heavy_queue: self.heavy_queue,
            interactive_threads: self.interactive_threads,
            heavy_threads: self.heavy_threads,
            max_batch: self.max_batch,
            interactive_batch_deadline: Duration::from_millis(self.interactive_batch_deadline_ms),
            bulk_batch_deadline: Duration::from_millis(self.bulk_batch_deadline_ms),
            cache_bytes: self.cache_mib << 20,
        }
    }
}

/// Flags of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// gRPC listen address. Anything but loopback requires `--api-key`.
    #[arg(long, env = "MPLUG_SEARCH_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Prometheus metrics listen address; metrics are off when absent.
    #[arg(long, env = "MPLUG_SEARCH_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// API key clients must send (`authorization: Bearer <key>` or `x-api-key`).
    #[arg(long, env = "MPLUG_SEARCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// TLS certificate chain (PEM); needs `--tls-key`.
    #[arg(long, env = "MPLUG_SEARCH_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs `--tls-cert`.
    #[arg(long, env = "MPLUG_SEARCH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Directory holding the collection.
    #[arg(long, env = "MPLUG_SEARCH_DATA_DIR", default_value = ".data")]
    pub data_dir: PathBuf,
    /// Largest request message, in MiB.
    #[arg(
        long,
        env = "MPLUG_SEARCH_MAX_MESSAGE_MIB",
        default_value_t = 32,
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1024)
    )]
    pub max_message_mib: usize,
    /// Seconds a shutdown (SIGTERM or ctrl-c) lets requests in flight finish; then the ones
    /// left, open ingest streams included, are answered UNAVAILABLE and their connections
    /// closed. A second signal ends the wait at once. The graph is dumped either way.
    #[arg(
        long,
        env = "MPLUG_SEARCH_SHUTDOWN_GRACE_SECS",
        default_value_t = DEFAULT_SHUTDOWN_GRACE.as_secs(),
        value_parser = clap::value_parser!(u64).range(0..=3600)
    )]
    pub shutdown_grace_secs: u64,
    /// Model flags.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Engine flags.
    #[command(flatten)]
    pub engine: EngineArgs,
}

impl ServeArgs {
    /// Validated server settings. The listen address, the API key and the engine sizes are
    /// checked before the built-in model is written under the data directory, so a refused
    /// start leaves that directory untouched. Errors name the offending flag.
    pub fn settings(&self) -> Result<ServerSettings> {
        let api_key = self
            .api_key
            .as_ref()
            .map(|key| ApiKey::new(&key.0))
            .transpose()?;
        validate_listen(self.listen, api_key.as_ref())?;
        let engine = self.engine.config();
        engine.validate()?;
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert: cert.clone(),
                key: key.clone(),
            }),
            _ => None,
        };
        let settings = ServerSettings {
            listen: self.listen,
            metrics_listen: self.metrics_listen,
            api_key,
            tls,
            data_dir: self.data_dir.clone(),
            model: self.model.source(&self.data_dir)?,
            engine,
            hnsw: Default::default(),
            limits: Limits {
                max_message_bytes: self.max_message_mib << 20,
                ..Limits::default()
            },
            shutdown_grace: Duration::from_secs(self.shutdown_grace_secs),
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// How a client command reaches a server: a running one, or an embedded one over a
/// local data directory.
#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// URL of a running server.
    #[arg(
        long,
        env = "MPLUG_SEARCH_SERVER",
        default_value = "http://127.0.0.1:50051"
    )]
    pub server: String,
    /// API key to send.
    #[arg(long, env = "MPLUG_SEARCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<Secret>,
    /// CA certificate (PEM) that signs the server's certificate, for an `https://` server
    /// whose certificate the system roots do not cover (a private CA or a self-signed one).
    #[arg(long, env = "MPLUG_SEARCH_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// Name to check the server's certificate against, when it differs from the host in
    /// `--server` (for example when connecting by IP address).
    #[arg(long, env = "MPLUG_SEARCH_TLS_DOMAIN")]
    pub tls_domain: Option<String>,
    /// Run an embedded server over this data directory instead of connecting to `--server`.
    #[arg(
        long,
        env = "MPLUG_SEARCH_EMBEDDED_DATA_DIR",
        conflicts_with = "server"
    )]
    pub data_dir: Option<PathBuf>,
    /// Model flags (for the embedded server).
    #[command(flatten)]
    pub model: ModelArgs,
}

impl ClientArgs {
    /// The endpoint of `url`: plaintext for `http://`; for `https://`, TLS verified against
    /// `--tls-ca` when given, else the system's root certificates, with the name from
    /// `--tls-domain` when given.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a malformed URL, TLS options given for an `http://`
    /// URL, an unknown scheme, or a CA file without a certificate; [`Error::Io`] when the CA
    /// file cannot be read.
    pub fn endpoint(&self, url: &str) -> Result<Endpoint> {
        let invalid = |reason: String| Error::InvalidArgument {
            field: "server".into(),
            reason,
        };
        let endpoint =
            Endpoint::from_shared(url.to_string()).map_err(|e| invalid(format!("{url}: {e}")))?;
        let tls_options = self.tls_ca.is_some() || self.tls_domain.is_some();
        match url.split_once("://").map(|(scheme, _)| scheme) {
            Some("http") if tls_options => Err(invalid(format!(
                "{url} is plaintext; --tls-ca and --tls-domain need an https:// server"
            ))),
            Some("http") => Ok(endpoint),
            Some("https") => endpoint
                .tls_config(self.client_tls()?)
                .map_err(|e| invalid(format!("{url}: {e}"))),
            _ => Err(invalid(format!(
                "{url}: expected an http:// or https:// URL"
            ))),
        }
    }

    fn client_tls(&self) -> Result<ClientTlsConfig> {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.tls_ca {
            Some(path) => {
                let pem = crate::server::run::read_pem(path, "tls_ca", &["CERTIFICATE"])?;
                tls.ca_certificate(Certificate::from_pem(pem))
            }
            None => tls.with_native_roots(),
        };
        if let Some(domain) = &self.tls_domain {
            tls = tls.domain_name(domain.clone());
        }
        Ok(tls)
    }

    /// Settings of the embedded server on a free loopback port when `--data-dir` is set,
    /// `None` otherwise. Errors when the built-in model cannot be written there.
    pub fn embedded_settings(&self) -> Result<Option<ServerSettings>> {
        let Some(data_dir) = self.data_dir.clone() else {
            return Ok(None);
        };
        let model = self.model.source(&data_dir)?;
        Ok(Some(ServerSettings {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            metrics_listen: None,
            api_key: None,
            tls: None,
            data_dir,
            model,
            engine: EngineConfig::default(),
            hnsw: Default::default(),
            limits: Limits::default(),
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }))
    }
}

/// Flags of `index`.
#[derive(Debug, Args)]
pub struct IndexArgs {
    /// Directory to walk.
    pub dir: PathBuf,
    /// Files larger than this many MiB are reported and skipped instead of sent. Files too
    /// large for the server's message limit (`serve --max-message-mib`) are skipped too.
    #[arg(
        long,
        env = "MPLUG_SEARCH_INDEX_MAX_FILE_MIB",
        default_value_t = 31,
        value_parser = clap::value_parser!(u64).range(1..=1024)
    )]
    pub max_file_mib: u64,
    /// Connection flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `search`.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// Query text (omit with `--image`).
    pub text: Option<String>,
    /// Query image file.
    #[arg(long, env = "MPLUG_SEARCH_QUERY_IMAGE", conflicts_with = "text")]
    pub image: Option<PathBuf>,
    /// Number of hits.
    #[arg(long, short, env = "MPLUG_SEARCH_K", default_value_t = 10)]
    pub k: u32,
    /// Rerank candidates with the ITM head. The environment variable takes the usual
    /// spellings of a boolean (`1`/`0`, `true`/`false`, `yes`/`no`, `on`/`off`).
    #[arg(
        long,
        env = "MPLUG_SEARCH_RERANK",
        value_parser = clap::builder::BoolishValueParser::new()
    )]
    pub rerank: bool,
    /// Candidates to rerank (0 = server default).
    #[arg(long, env = "MPLUG_SEARCH_RERANK_K", default_value_t = 0)]
    pub rerank_k: u32,
    /// Metadata filter `key=value`: the key ends at the first `=`, and the value is the rest,
    /// commas included. Repeat the flag for several pairs (all must match); the environment
    /// variable holds one pair.
    #[arg(long, env = "MPLUG_SEARCH_FILTER")]
    pub filter: Vec<String>,
    /// Connection flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `caption`.
#[derive(Debug, Args)]
pub struct CaptionArgs {
    /// Image file.
    pub file: PathBuf,
    /// Connection flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `ask`.
#[derive(Debug, Args)]
pub struct AskArgs {
    /// Image file.
    pub file: PathBuf,
    /// The question.
    pub question: String,
    /// Connection flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

/// Flags of `embed`.
#[derive(Debug, Args)]
pub struct EmbedArgs {
    /// Image file to embed.
    #[arg(
        long,
        env = "MPLUG_SEARCH_EMBED_IMAGE",
        conflicts_with = "text",
        required_unless_present = "text"
    )]
    pub image: Option<PathBuf>,
    /// Text to embed.
    #[arg(long, env = "MPLUG_SEARCH_EMBED_TEXT")]
    pub text: Option<String>,
    /// Connection flags.
    #[command(flatten)]
    pub client: ClientArgs,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_parse_and_a_public_bind_needs_a_key() {
        Cli::command_for_tests().debug_assert();
        let cli = Cli::parse_from(["mplug-search", "serve", "--listen", "0.0.0.0:9000"]);
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        let error = args.settings().expect_err("public bind without key");
        assert!(error.to_string().contains("api key"), "{error}");

        let key = "a-very-secret-key-123456";
        let cli = Cli::parse_from(["mplug-search", "serve", "--api-key", key]);
        assert!(!format!("{cli:?}").contains(key), "arguments print the key");
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        assert!(args.settings().is_ok());
    }

    #[test]
    fn filter_values_keep_their_commas() {
        let cli = Cli::parse_from([
            "mplug-search",
            "search",
            "red",
            "--filter",
            "path=x,y.png",
            "--filter",
            "shape=circle",
        ]);
        let Command::Search(args) = cli.command else {
            panic!("expected search");
        };
        assert_eq!(args.filter, ["path=x,y.png", "shape=circle"]);
    }

    #[test]
    fn boolean_flags_take_the_usual_spellings() {
        for (spelling, expected) in [("1", true), ("yes", true), ("0", false), ("off", false)] {
            let cli = Cli::parse_from(["mplug-search", "train", "--f16", spelling]);
            let Command::Train(args) = cli.command else {
                panic!("expected train");
            };
            assert_eq!(args.f16, expected, "--f16 {spelling}");
        }
    }

    #[test]
    fn zero_and_absurd_engine_sizes_are_refused_while_parsing() {
        let flags = [
            "--max-batch",
            "--interactive-threads",
            "--heavy-threads",
            "--interactive-queue",
            "--bulk-queue",
            "--heavy-queue",
        ];
        for flag in flags {
            let error = Cli::try_parse_from(["mplug-search", "serve", flag, "0"])
                .expect_err("a zero size is refused");
            assert_eq!(
                error.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flag}"
            );
            assert!(error.to_string().contains(flag), "{flag}: {error}");
            assert!(Cli::try_parse_from(["mplug-search", "serve", flag, "1"]).is_ok());
            let huge = Cli::try_parse_from(["mplug-search", "serve", flag, "18446744073709551615"])
                .expect_err("an absurd size is refused");
            assert_eq!(
                huge.kind(),
                clap::error::ErrorKind::ValueValidation,
                "{flag}"
            );
        }
        let pixels = [
            "mplug-search",
            "serve",
            "--max-pixels",
            "18446744073709551615",
        ];
        let error = Cli::try_parse_from(pixels).expect_err("an absurd pixel cap is refused");
        assert_eq!(error.kind(), clap::error::ErrorKind::ValueValidation);
    }

    #[test]
    fn a_refused_public_bind_leaves_the_data_dir_untouched() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data_dir = dir.path().join("data");
        let data_dir = data_dir.to_str().expect("utf-8 temp path");
        let argv = ["mplug-search", "serve", "--listen", "0.0.0.0:9000"];
        let cli = Cli::parse_from(argv.into_iter().chain(["--data-dir", data_dir]));
        let Command::Serve(args) = cli.command else {
            panic!("expected serve");
        };
        let error = args.settings().expect_err("public bind without key");
        assert!(error.to_string().contains("api key"), "{error}");
        assert!(
            !Path::new(data_dir).exists(),
            "the refused start wrote into the data directory"
        );
    }

    impl Cli {
        fn command_for_tests() -> clap::Command {
            <Self as clap::CommandFactory>::command()
        }
    }
}
