//! Starting and stopping a server: bind, serve health and reflection at once, load the
//! model and the collection in the background, then report SERVING.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use mplug_index::{Collection, Metric, Settings};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::server::HealthReporter;
use tonic_health::ServingStatus;

use super::api::{Api, DecodeBudget, Ready, ReadySlot};
use super::auth::Authenticator;
use super::drain::Drain;
use super::proto::{mplug_search_server::MplugSearchServer, FILE_DESCRIPTOR_SET};
use super::settings::{ServerSettings, TlsFiles};
use super::writer::Writer;
use crate::engine::{Engine, MplugBackend};
use crate::{Error, Result};

/// Sub-directory of the data directory holding the collection.
pub const COLLECTION_DIR: &str = "collection";

/// How often the graph is dumped so that a restart after a crash can reload it.
const GRAPH_DUMP_INTERVAL: Duration = Duration::from_secs(300);
/// Keepalive probes on accepted connections, so dead peers are noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 connection receive window. The transport's allowance for buffered small frames
/// is half of it, so a large window lets clients stream many small items per connection.
const CONNECTION_WINDOW_BYTES: u32 = 32 << 20;
/// Most items one group commit writes.
const COMMIT_MAX_ITEMS: usize = 256;
/// After the grace period, how long handlers have to deliver their UNAVAILABLE answers
/// before the connections still open are closed.
const ANSWER_WAIT: Duration = Duration::from_secs(1);
/// After closing the connections, how long to wait for the transport to notice.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// gRPC service name reported by health.
pub const SERVICE_NAME: &str = "mplug_search.v1.MplugSearch";

/// A server started by [`start`].
pub struct RunningServer {
    /// The address actually bound (useful with port 0).
    pub addr: SocketAddr,
    ready: ReadySlot,
    loaded: Option<oneshot::Receiver<Result<()>>>,
    drain: Drain,
    grace: Duration,
    health: HealthReporter,
    serving: JoinHandle<Served>,
    dumper: JoinHandle<()>,
}

/// Binds `settings.listen`, starts serving (health NOT_SERVING, API UNAVAILABLE) and
/// loads the model and collection in the background. Errors: invalid settings, a port
/// that cannot be bound, unreadable TLS files.
pub async fn start(settings: ServerSettings) -> Result<RunningServer> {
    settings.validate()?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .map_err(|source| io_error(&settings.listen.to_string(), source))?;
    let addr = listener
        .local_addr()
        .map_err(|source| io_error(&settings.listen.to_string(), source))?;
    if let Some(metrics) = settings.metrics_listen {
        start_metrics(metrics)?;
    }

    let ready: ReadySlot = Arc::new(OnceLock::new());
    let (mut health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status(SERVICE_NAME, ServingStatus::NotServing)
        .await;
    health
        .set_service_status("", ServingStatus::NotServing)
        .await;

    let drain = Drain::default();
    let api = Api::new(ready.clone(), settings.limits.clone(), drain.clone());
    let max_message = settings.limits.max_message_bytes;
    let auth = Authenticator::new(settings.api_key.clone());
    let search = MplugSearchServer::new(api)
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let search = InterceptedService::new(search, auth.clone());
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .build_v1()
        .map_err(|error| invalid_setting("reflection", error.to_string()))?;
    let reflection_v1 = InterceptedService::new(reflection_v1, auth.clone());
    // Older clients (grpcurl before 1.9, many language runtimes) only speak v1alpha.
    let reflection_v1alpha = reflection()
        .build_v1alpha()
        .map_err(|error| invalid_setting("reflection", error.to_string()))?;
    let reflection_v1alpha = InterceptedService::new(reflection_v1alpha, auth);

    let mut builder = Server::builder().initial_connection_window_size(CONNECTION_WINDOW_BYTES);
    if let Some(tls) = &settings.tls {
        builder = builder
            .tls_config(tls_config(tls)?)
            .map_err(|error| invalid_setting("tls", error_chain(&error)))?;
    }
    let router = builder
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(search);
    let incoming = TcpIncoming::from_listener(listener, true, Some(TCP_KEEPALIVE))
        .map_err(|error| invalid_setting("listen", error.to_string()))?;
    // The shutdown ends the stream of connections, which closes the listening socket and
    // starts the transport's graceful close; the signal itself never fires.
    let incoming = drain.listener(incoming);
    let serving =
        tokio::spawn(router.serve_with_incoming_shutdown(incoming, std::future::pending::<()>()));
    let (auth, tls) = (settings.api_key.is_some(), settings.tls.is_some());
    tracing::info!(%addr, auth, tls, "listening");

    let (loaded_tx, loaded) = oneshot::channel();
    let load_slot = ready.clone();
    let reporter = health.clone();
    let settings_grace = settings.shutdown_grace;
    let load_drain = drain.clone();
    tokio::spawn(async move {
        let outcome = load(&settings, &load_slot).await;
        if outcome.is_ok() && !load_drain.is_closing() {
            set_health(&mut health, ServingStatus::Serving).await;
            // A shutdown that started meanwhile (it marks itself closing before it ends the
            // health services) may have ended them before this report: end them again.
            if load_drain.is_closing() {
                end_health(&mut health).await;
            } else {
                tracing::info!("model loaded; serving");
            }
        }
        let _ = loaded_tx.send(outcome);
    });
    let dumper = tokio::spawn(dump_periodically(ready.clone()));
    Ok(RunningServer {
        addr,
        ready,
        loaded: Some(loaded),
        drain,
        grace: settings_grace,
        health: reporter,
        serving,
        dumper,
    })
}

impl RunningServer {
    /// Waits until the model and the collection are loaded; returns their load error.
    pub async fn wait_ready(&mut self) -> Result<()> {
        let Some(loaded) = self.loaded.take() else {
            return Ok(());
        };
        loaded.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Stops the server within its grace period (`ServerSettings::shutdown_grace`), then
    /// dumps the graph and closes the collection.
    ///
    /// Health turns NOT_SERVING and the listening socket closes at once, so new clients are
    /// refused; open connections are asked to finish (HTTP/2 GOAWAY). Requests in flight
    /// run on until the grace period ends; then the ones left, ingest streams included, are
    /// answered UNAVAILABLE and, a second later, the connections still open are closed.
    /// Everything acknowledged is durable already; the final dump saves a rebuild at the
    /// next start. Errors: the dump's or the close's.
    pub async fn shutdown(self) -> Result<()> {
        self.shutdown_or(std::future::pending()).await
    }

    /// [`Self::shutdown`], ending the grace period early when `hurry` completes (for
    /// example on a second signal); the graph is still dumped and the collection closed.
    pub async fn shutdown_or(mut self, hurry: impl std::future::Future<Output = ()>) -> Result<()> {
        self.drain.close_listener();
        end_health(&mut self.health).await;
        let grace_secs = self.grace.as_secs_f64();
        tracing::info!(grace_secs, "stopped accepting; draining requests in flight");
        let drained = tokio::select! {
            served = &mut self.serving => Some(served),
            () = tokio::time::sleep(self.grace) => {
                tracing::warn!(grace_secs, "grace period over; ending requests still running");
                None
            }
            () = hurry => {
                tracing::warn!("drain cut short; ending requests still running");
                None
            }
        };
        let served = match drained {
            Some(served) => Some(served),
            None => self.end_remaining().await,
        };
        if let Some(Ok(Err(error))) = served {
            tracing::warn!(%error, "server ended with an error");
        }
        self.dumper.abort();
        let Some(ready) = self.ready.get().cloned() else {
            return Ok(());
        };
        let collection = ready.collection.clone();
        drop(ready);
        super::api::blocking("close", move || {
            collection.dump_graph()?;
            if let Ok(collection) = Arc::try_unwrap(collection) {
                collection.close()?;
            }
            Ok(())
        })
        .await?;
        tracing::info!("stopped; graph saved");
        Ok(())
    }
}

impl RunningServer {
    /// Answers the requests still running UNAVAILABLE, then closes the connections still
    /// open; `None` when the transport did not stop even then (its task is aborted).
    async fn end_remaining(
        &mut self,
    ) -> Option<std::result::Result<Served, tokio::task::JoinError>> {
        self.drain.expire();
        if let Ok(served) = tokio::time::timeout(ANSWER_WAIT, &mut self.serving).await {
            return Some(served);
        }
        self.drain.sever();
        if let Ok(served) = tokio::time::timeout(CLOSE_WAIT, &mut self.serving).await {
            return Some(served);
        }
        tracing::warn!("the transport did not stop after closing its connections; aborting it");
        self.serving.abort();
        None
    }
}

/// What the transport's task returns.
type Served = std::result::Result<(), tonic::transport::Error>;

async fn load(settings: &ServerSettings, slot: &ReadySlot) -> Result<()> {
    let source = settings.model.clone();
    let max_pixels = source.max_pixels;
    let backend = super::api::blocking("load model", move || MplugBackend::load(&source)).await?;
    let info = backend.info_snapshot();
    let engine = Engine::start(Arc::new(backend), &settings.engine)?;

    let index_settings = Settings {
        dimension: info.embed_dim,
        metric: Metric::Cosine,
        hnsw: settings.hnsw.clone(),
        model_id: info.model_id.clone(),
    };
    let dir = settings.data_dir.join(COLLECTION_DIR);
    let collection = super::api::blocking("open collection", move || {
        std::fs::create_dir_all(&dir).map_err(|source| io_error(&dir.to_string_lossy(), source))?;
        Ok(Collection::open(&dir, index_settings)?)
    })
    .await?;
    tracing::info!(
        model = info.model_id,
        dimension = info.embed_dim,
        "collection open"
    );

    let collection = Arc::new(collection);
    let ready = Ready {
        engine,
        writer: Writer::start(collection.clone(), COMMIT_MAX_ITEMS)?,
        decodes: DecodeBudget::new(
            concurrent_decodes(),
            DECODE_BUDGET_IMAGES.saturating_mul(max_pixels),
        ),
        collection,
    };
    let _ = slot.set(Arc::new(ready));
    Ok(())
}

async fn dump_periodically(ready: ReadySlot) {
    let mut ticks = tokio::time::interval(GRAPH_DUMP_INTERVAL);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        let Some(ready) = ready.get().cloned() else {
            continue;
        };
        let collection = ready.collection.clone();
        let dumped = super::api::blocking("dump graph", move || Ok(collection.dump_graph()?));
        if let Err(error) = dumped.await {
            tracing::warn!(%error, "periodic graph dump failed");
        }
    }
}

/// Reports NOT_SERVING, then unregisters the services. Health watches never end by
/// themselves: once they have NOT_SERVING, unregistering ends them, so that they do not hold
/// a drain for its whole grace period. A check on a connection still open is then answered
/// NOT_FOUND.
async fn end_health(health: &mut HealthReporter) {
    set_health(health, ServingStatus::NotServing).await;
    for service in [SERVICE_NAME, ""] {
        health.clear_service_status(service).await;
    }
}

/// Reports `status` for the search service and for the server as a whole.
async fn set_health(health: &mut HealthReporter, status: ServingStatus) {
    for service in [SERVICE_NAME, ""] {
        health.set_service_status(service, status).await;
    }
}

/// Largest images (`--max-pixels` each) that may be decoded at once; smaller ones share the
/// same pixel budget, up to one per core.
const DECODE_BUDGET_IMAGES: u64 = 2;

/// Images decoded at once at most: one per core, so decoding uses the cores; the pixel
/// budget bounds their memory.
fn concurrent_decodes() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// The server identity from the PEM files; each file must hold what its flag names (an
/// unencrypted key: the server cannot ask for a passphrase).
fn tls_config(files: &TlsFiles) -> Result<ServerTlsConfig> {
    let cert = read_pem(&files.cert, "tls_cert", &["CERTIFICATE"])?;
    let key_kinds = ["PRIVATE KEY", "RSA PRIVATE KEY", "EC PRIVATE KEY"];
    let key = read_pem(&files.key, "tls_key", &key_kinds)?;
    Ok(ServerTlsConfig::new().identity(Identity::from_pem(cert, key)))
}

/// The bytes of the PEM file at `path`, which must hold a block of one of `kinds`.
pub(crate) fn read_pem(path: &Path, field: &str, kinds: &[&str]) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_owned(),
        source,
    })?;
    let text = String::from_utf8_lossy(&bytes);
    let found = kinds
        .iter()
        .any(|kind| text.contains(&format!("-----BEGIN {kind}-----")));
    if !found {
        let reason = format!(
            "{} holds no PEM block of {}",
            path.display(),
            kinds.join(" or ")
        );
        return Err(invalid_setting(field, reason));
    }
    Ok(bytes)
}

/// An error and its sources, outermost first.
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

fn start_metrics(addr: SocketAddr) -> Result<()> {
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&super::METRIC_BUCKETS_SECONDS)
        .map_err(|error| invalid_setting("metrics", error.to_string()))?;
    let (recorder, exporter) = builder
        .build()
        .map_err(|error| invalid_setting("metrics_listen", error.to_string()))?;
    if metrics::set_global_recorder(recorder).is_err() {
        tracing::warn!("a metrics recorder is already installed; keeping it");
    }
    tokio::spawn(async move {
        if exporter.await.is_err() {
            tracing::warn!("the metrics exporter stopped");
        }
    });
    tracing::info!(%addr, "metrics exporter listening");
    Ok(())
}

fn io_error(what: &str, source: std::io::Error) -> Error {
    Error::Io {
        path: what.into(),
        source,
    }
}

fn invalid_setting(field: &str, reason: String) -> Error {
    Error::InvalidArgument {
        field: field.into(),
        reason,
    }
}
