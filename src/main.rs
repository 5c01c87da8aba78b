//! The `mplug-search` command: serve, index a directory, search, caption, ask, embed, stats.

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

use anyhow::{bail, Context};
use clap::Parser;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};
use mplug_search::cli::{Cli, ClientArgs, Command, IndexArgs, SearchArgs};
use mplug_search::server::proto::{
    self, image_input, ingest_request::Content, mplug_search_client::MplugSearchClient,
    search_request::Query, IngestStatus,
};
use mplug_search::server::{start, RunningServer};
use mplug_search::train::{run_eval, run_train, TrainArgs};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// mimalloc, told to keep freed pages (see `model::alloc`), so the model's large per-op
/// buffers do not page-fault on every forward pass.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// File extensions `index` picks up.
const IMAGE_EXTENSIONS: [&str; 5] = ["png", "jpg", "jpeg", "webp", "gif"];

/// The largest message the client commands send or accept.
const CLIENT_MAX_MESSAGE_BYTES: usize = 64 << 20;

fn main() -> anyhow::Result<()> {
    match run_cli() {
        Err(error) if error.chain().any(|cause| cause.is::<StdoutClosed>()) => Ok(()),
        outcome => outcome,
    }
}

/// The reader of stdout went away (`mplug-search stats | head -2`): the command stops
/// quietly and exits with status 0, as a command that finished its output would.
#[derive(Debug, thiserror::Error)]
#[error("stdout is closed")]
struct StdoutClosed;

/// Writes `text` and a newline to stdout.
///
/// # Errors
/// [`StdoutClosed`] when the reader of stdout has gone away; any other write error as it is.
fn print_line(text: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{text}").and_then(|()| stdout.flush()) {
        Err(error) if error.kind() == std::io::ErrorKind::BrokenPipe => Err(StdoutClosed.into()),
        written => written.context("cannot write to stdout"),
    }
}

/// Writes `text` and a newline to stderr, dropping it when stderr is closed: a report line
/// lost with its reader must not stop the work it reports on.
fn report_line(text: impl std::fmt::Display) {
    let _ = writeln!(std::io::stderr().lock(), "{text}");
}

fn run_cli() -> anyhow::Result<()> {
    mplug_search::model::alloc::keep_freed_memory();
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).context("invalid --log filter")?;
    // A log line that cannot be written (stderr closed: `serve 2>&1 | head`) is dropped: the
    // subscriber would otherwise report it with a panicking `eprintln!` on a server thread.
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false)
        .init();

    let command = match cli.command {
        Command::Train(args) => return train(&args),
        Command::Eval(args) => {
            return print_line(run_eval(&args).context("evaluation failed")?);
        }
        command => command,
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run(command)).map_err(readable_status)
}

/// A gRPC error as its code and message, without the transport's metadata dump.
fn readable_status(error: anyhow::Error) -> anyhow::Error {
    match error.downcast::<tonic::Status>() {
        Ok(status) => anyhow::anyhow!("{:?}: {}", status.code(), status.message()),
        Err(error) => error,
    }
}

/// Trains a checkpoint and prints a one-line summary.
fn train(args: &TrainArgs) -> anyhow::Result<()> {
    let summary = run_train(args).context("training failed")?;
    let [itc, itm, caption, vqa] = summary.final_losses;
    print_line(format_args!(
        "trained {} parameters for {} steps in {:.0} s; final losses itc {itc:.4} itm {itm:.4} \
         caption {caption:.4} vqa {vqa:.4}; wrote {}",
        summary.parameters,
        summary.steps,
        summary.seconds,
        summary.out.display()
    ))
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve(args) => serve(args.settings()?).await,
        Command::Index(args) => index(args).await,
        Command::Search(args) => search(args).await,
        Command::Caption(args) => {
            let image = image_file(&args.file)?;
            let request = proto::CaptionRequest {
                image: Some(image),
                params: None,
            };
            with_client(&args.client, |mut client| async move {
                print_line(client.caption(request).await?.into_inner().text)
            })
            .await
        }
        Command::Ask(args) => {
            let image = image_file(&args.file)?;
            let request = proto::AskRequest {
                image: Some(image),
                question: args.question,
                params: None,
            };
            with_client(&args.client, |mut client| async move {
                print_line(client.ask(request).await?.into_inner().text)
            })
            .await
        }
        Command::Embed(args) => embed(args).await,
        Command::Train(_) | Command::Eval(_) => bail!("training runs outside the async runtime"),
        Command::Stats(args) => {
            with_client(&args, |mut client| async move {
                let stats = client.stats(proto::StatsRequest {}).await?.into_inner();
                print_line(serde_json::to_string_pretty(&stats_json(&stats))?)
            })
            .await
        }
    }
}

async fn serve(settings: mplug_search::server::ServerSettings) -> anyhow::Result<()> {
    let mut server = start(settings).await.context("cannot start the server")?;
    // Signals are taken from now on. One that arrives while the model and the collection load
    // takes effect once they are loaded, so that a graph rebuild is finished and dumped
    // rather than lost with the process.
    let first_signal = tokio::spawn(async {
        let received = shutdown_signal().await;
        tracing::info!("shutdown signal received");
        received
    });
    server
        .wait_ready()
        .await
        .context("cannot load the model or the collection")?;
    first_signal.await.context("the signal listener failed")??;
    tracing::info!("shutting down; a second signal ends the wait for requests in flight");
    let second_signal = async {
        match shutdown_signal().await {
            Ok(()) => tracing::info!("second signal"),
            Err(_) => std::future::pending().await,
        }
    };
    server
        .shutdown_or(second_signal)
        .await
        .context("shutdown failed")?;
    Ok(())
}

/// Waits for ctrl-c (SIGINT) or, on Unix, SIGTERM, so that service managers stop the server
/// cleanly and the graph is dumped. Called again during the shutdown, it waits for the
/// next signal.
async fn shutdown_signal() -> anyhow::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let interrupt = tokio::signal::ctrl_c();
        tokio::select! {
            interrupted = interrupt => interrupted.context("cannot listen for ctrl-c"),
            _ = terminate.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c()
            .await
            .context("cannot listen for ctrl-c")
    }
}

/// Adds the API key to every request.
#[derive(Clone)]
struct KeyHeader(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for KeyHeader {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = MplugSearchClient<InterceptedService<Channel, KeyHeader>>;

/// Connects to `--server`, or starts an embedded server when `--data-dir` is given, runs
/// `work` and stops the embedded server.
async fn with_client<F, Fut, T>(args: &ClientArgs, work: F) -> anyhow::Result<T>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let mut embedded: Option<RunningServer> = None;
    let url = match args.embedded_settings()? {
        Some(settings) => {
            let mut server = start(settings)
                .await
                .context("cannot start the embedded server")?;
            server
                .wait_ready()
                .await
                .context("cannot load the model or the collection")?;
            let url = format!("http://{}", server.addr);
            embedded = Some(server);
            url
        }
        None => args.server.clone(),
    };
    let channel = args
        .endpoint(&url)?
        .connect()
        .await
        .with_context(|| format!("cannot connect to {url}"))?;
    let key = match &args.api_key {
        Some(key) => Some(
            format!("Bearer {}", key.0)
                .parse()
                .context("api key is not ASCII")?,
        ),
        None => None,
    };
    let client = MplugSearchClient::with_interceptor(channel, KeyHeader(key))
        .max_decoding_message_size(CLIENT_MAX_MESSAGE_BYTES)
        .max_encoding_message_size(CLIENT_MAX_MESSAGE_BYTES);
    let outcome = work(client).await;
    if let Some(server) = embedded {
        server
            .shutdown()
            .await
            .context("embedded server shutdown failed")?;
    }
    outcome
}

fn image_file(path: &Path) -> anyhow::Result<proto::ImageInput> {
    let bytes = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    Ok(proto::ImageInput {
        source: Some(image_input::Source::Data(bytes)),
    })
}

async fn search(args: SearchArgs) -> anyhow::Result<()> {
    let query = match (&args.text, &args.image) {
        (Some(text), None) => Query::Text(text.clone()),
        (None, Some(path)) => {
            Query::Image(std::fs::read(path).with_context(|| format!("{}", path.display()))?)
        }
        _ => bail!("give a query text or --image FILE"),
    };
    let mut filter = HashMap::new();
    for pair in &args.filter {
        let (key, value) = pair
            .split_once('=')
            .with_context(|| format!("{pair}: expected key=value"))?;
        if filter.insert(key.to_string(), value.to_string()).is_some() {
            bail!("--filter {key} given twice: an item has one value per key");
        }
    }
    let request = proto::SearchRequest {
        query: Some(query),
        k: args.k,
        rerank: args.rerank,
        rerank_k: args.rerank_k,
        filter,
        target_kinds: Vec::new(),
    };
    with_client(&args.client, |mut client| async move {
        for hit in client.search(request).await?.into_inner().hits {
            let line = json!({
                "id": hit.id,
                "kind": hit.kind().as_str_name(),
                "itc_score": hit.itc_score,
                "itm_score": hit.itm_score,
                "metadata": hit.metadata,
            });
            print_line(line)?;
        }
        Ok(())
    })
    .await
}

async fn embed(args: mplug_search::cli::EmbedArgs) -> anyhow::Result<()> {
    let image = match &args.image {
        Some(path) => Some(std::fs::read(path).with_context(|| format!("{}", path.display()))?),
        None => None,
    };
    let text = args.text.clone();
    with_client(&args.client, |mut client| async move {
        let answer = match (image, text) {
            (Some(image), _) => {
                client
                    .embed_image(proto::EmbedImageRequest { image })
                    .await?
            }
            (None, Some(text)) => client.embed_text(proto::EmbedTextRequest { text }).await?,
            (None, None) => bail!("give --image FILE or --text TEXT"),
        };
        print_line(serde_json::to_string(&answer.into_inner().vector)?)
    })
    .await
}

fn stats_json(stats: &proto::StatsResponse) -> serde_json::Value {
    let queue = |q: &proto::QueueStats| {
        json!({
            "name": q.name,
            "depth": q.depth,
            "capacity": q.capacity,
            "dropped": q.dropped,
            "rejected": q.rejected,
        })
    };
    let queues: Vec<_> = stats.queues.iter().map(queue).collect();
    json!({
        "images": stats.images,
        "texts": stats.texts,
        "model_id": stats.model_id,
        "dimension": stats.dimension,
        "queues": queues,
        "cache_hit_ratio": stats.cache_hit_ratio,
        "cache_bytes": stats.cache_bytes,
        "cache_budget_bytes": stats.cache_budget_bytes,
        "cache_entries": stats.cache_entries,
        "tombstones": stats.tombstones,
        "bytes_on_disk": stats.bytes_on_disk,
        "max_message_bytes": stats.max_message_bytes,
    })
}

/// Image files under `dir`, sorted, with their ids (relative paths with `/`), and the number
/// of entries that could not be read or named (each reported on stderr). A path whose part
/// under `dir` is not valid UTF-8 has no lossless id, so it is reported and skipped.
fn image_files(dir: &Path) -> (Vec<(std::path::PathBuf, String)>, u64) {
    let (mut files, mut unreadable) = (Vec::new(), 0);
    for entry in walkdir::WalkDir::new(dir)
        .follow_links(true)
        .sort_by_file_name()
    {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                report_line(format_args!(
                    "{}: {error}",
                    error.path().unwrap_or(dir).display()
                ));
                unreadable += 1;
                continue;
            }
        };
        let extension = entry
            .path()
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_lowercase);
        let wanted = extension.is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.as_str()));
        if !entry.file_type().is_file() || !wanted {
            continue;
        }
        let Ok(relative) = entry.path().strip_prefix(dir) else {
            continue;
        };
        let id: Option<Vec<&str>> = relative
            .components()
            .map(|c| c.as_os_str().to_str())
            .collect();
        let Some(id) = id else {
            report_line(format_args!(
                "{}: file name is not valid UTF-8",
                entry.path().display()
            ));
            unreadable += 1;
            continue;
        };
        files.push((entry.path().to_owned(), id.join("/")));
    }
    (files, unreadable)
}

async fn index(args: IndexArgs) -> anyhow::Result<()> {
    let metadata = std::fs::metadata(&args.dir);
    let metadata = metadata.with_context(|| format!("{}", args.dir.display()))?;
    if !metadata.is_dir() {
        bail!("{}: not a directory", args.dir.display());
    }
    let (files, unreadable) = image_files(&args.dir);
    let total = files.len() as u64;
    let progress = ProgressBar::new(total);
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} {per_sec} eta {eta} {msg}")
        .context("invalid progress template")?;
    progress.set_style(style);

    let run = IngestRun {
        files,
        root: args.dir.clone(),
        max_file_bytes: args.max_file_mib << 20,
        progress,
    };
    let counts = with_client(&args.client, |client| run.ingest(client)).await?;
    let summary = json!(counts);
    if let Err(error) = print_line(summary) {
        if !error.is::<StdoutClosed>() {
            return Err(error);
        }
    }

    let stored: u64 = counts
        .iter()
        .filter(|(status, _)| **status != IngestStatus::Rejected.as_str_name())
        .map(|(_, count)| count)
        .sum();
    let failed = unreadable + total.saturating_sub(stored);
    if failed > 0 {
        bail!("{failed} files were not indexed (reasons above); the others are stored");
    }
    Ok(())
}

/// Items acknowledged by the server, by ingest status name.
type IngestCounts = std::collections::BTreeMap<&'static str, u64>;

/// Why `index` skipped a file without sending it.
#[derive(Debug, thiserror::Error)]
enum Skipped {
    /// The file is over `--max-file-mib`.
    #[error("{size} bytes, larger than --max-file-mib {limit_mib} MiB; skipped")]
    OverFileLimit { size: u64, limit_mib: u64 },
    /// The item would exceed the largest message that can be sent: the server's limit, or
    /// the client's own when that is lower.
    #[error("too large for the message limit ({})", size_text(.limit))]
    OverMessageLimit { limit: u64 },
    /// The file cannot be read.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// `bytes` in MiB when it is a whole number of them, in bytes otherwise.
fn size_text(bytes: &u64) -> String {
    let bytes = *bytes;
    if bytes > 0 && bytes.is_multiple_of(1 << 20) {
        format!("{} MiB", bytes >> 20)
    } else {
        format!("{bytes} bytes")
    }
}

/// The files of one `index` run and how to report on them.
struct IngestRun {
    files: Vec<(std::path::PathBuf, String)>,
    root: std::path::PathBuf,
    max_file_bytes: u64,
    progress: ProgressBar,
}

/// The largest item `index` can send: the server's message limit (0: not reported), and never
/// more than the client's own.
fn sendable(server_max_message_bytes: u64) -> u64 {
    let client = CLIENT_MAX_MESSAGE_BYTES as u64;
    match server_max_message_bytes {
        0 => client,
        server => server.min(client),
    }
}

impl IngestRun {
    /// Streams the files to the server and counts its answers. A file that cannot be read
    /// or is too large to send is reported and skipped; when the stream itself fails, the
    /// error is reported and the files it did not acknowledge stay uncounted.
    async fn ingest(self, mut client: Client) -> anyhow::Result<IngestCounts> {
        let stats = client.stats(proto::StatsRequest {}).await?.into_inner();
        let (sender, receiver) = tokio::sync::mpsc::channel(64);
        let reader = tokio::spawn(read_files(
            self.files,
            self.max_file_bytes,
            sendable(stats.max_message_bytes),
            sender,
            self.progress.clone(),
        ));

        let mut counts = IngestCounts::new();
        let input = tokio_stream::wrappers::ReceiverStream::new(receiver);
        let streamed = async {
            let mut results = client.ingest(input).await?.into_inner();
            while let Some(result) = results.next().await {
                let result = result?;
                let status = result.status();
                if status == IngestStatus::Rejected {
                    let line = format!(
                        "{}: {}",
                        self.root.join(&result.id).display(),
                        result.reason
                    );
                    self.progress.suspend(|| report_line(&line));
                }
                *counts.entry(status.as_str_name()).or_default() += 1;
                self.progress.inc(1);
            }
            Ok::<(), tonic::Status>(())
        };
        if let Err(status) = streamed.await {
            // The stream is gone: stop reading files that can no longer be sent.
            reader.abort();
            let line = format!(
                "{}: the ingest stream failed ({:?}: {}); files it had not acknowledged are \
                 not stored",
                self.root.display(),
                status.code(),
                status.message()
            );
            self.progress.suspend(|| report_line(&line));
        }
        if let Err(error) = reader.await {
            if !error.is_cancelled() {
                return Err(error).context("file reader failed");
            }
        }
        self.progress.finish();
        Ok(counts)
    }
}

/// Reads each file into an ingest item and sends it, reporting and skipping files that
/// cannot be read, are over `max_file_bytes`, or would make a message over
/// `max_message_bytes` (0: unknown, not checked). Stops when the stream is gone.
async fn read_files(
    files: Vec<(std::path::PathBuf, String)>,
    max_file_bytes: u64,
    max_message_bytes: u64,
    sender: tokio::sync::mpsc::Sender<proto::IngestRequest>,
    progress: ProgressBar,
) {
    for (path, id) in files {
        match read_item(&path, id, max_file_bytes, max_message_bytes).await {
            Ok(item) => {
                if sender.send(item).await.is_err() {
                    break;
                }
            }
            Err(reason) => {
                progress.suspend(|| report_line(format_args!("{}: {reason}", path.display())));
                progress.inc(1);
            }
        }
    }
}

async fn read_item(
    path: &Path,
    id: String,
    max_file_bytes: u64,
    max_message_bytes: u64,
) -> Result<proto::IngestRequest, Skipped> {
    let size = tokio::fs::metadata(path).await?.len();
    if size > max_file_bytes {
        let limit_mib = max_file_bytes >> 20;
        return Err(Skipped::OverFileLimit { size, limit_mib });
    }
    let bytes = tokio::fs::read(path).await?;
    let metadata = HashMap::from([("path".to_string(), id.clone())]);
    let item = proto::IngestRequest {
        id,
        content: Some(Content::Image(bytes)),
        metadata,
    };
    let limit = max_message_bytes;
    if limit > 0 && prost::Message::encoded_len(&item) as u64 > limit {
        return Err(Skipped::OverMessageLimit { limit });
    }
    Ok(item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_sized_for_the_lower_of_the_two_message_limits() {
        let client = CLIENT_MAX_MESSAGE_BYTES as u64;
        assert_eq!(sendable(1 << 20), 1 << 20);
        assert_eq!(
            sendable(128 << 20),
            client,
            "the client's own limit is lower"
        );
        assert_eq!(sendable(0), client, "a server that reports no limit");
    }
}
