//! Search latency of the real gRPC server on 127.0.0.1, idle and while a bulk ingest
//! runs, and the ingest throughput. Prints one table.
//!
//! `cargo bench --bench service_load [-- CHECKPOINT CONFIG]`; without arguments it uses
//! the tiny parity checkpoint, which measures the service's own overhead more than the
//! model.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mplug_search::engine::{parity_model_paths, EngineConfig, ModelSource};
use mplug_search::model::Tasks;
use mplug_search::server::proto::{
    self, ingest_request::Content, mplug_search_client::MplugSearchClient, search_request::Query,
};
use mplug_search::server::{start, Limits, ServerSettings};

const INGEST_ITEMS: u32 = 400;
const IDLE_SEARCHES: usize = 200;

fn main() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("the bench runtime starts");
    runtime.block_on(run());
}

fn model() -> ModelSource {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (checkpoint, config) = match args.as_slice() {
        [checkpoint, config, ..] => (PathBuf::from(checkpoint), PathBuf::from(config)),
        _ => parity_model_paths(&PathBuf::from(env!("CARGO_MANIFEST_DIR"))),
    };
    ModelSource {
        checkpoint,
        config,
        tasks: Tasks::ALL,
        max_pixels: 64 << 20,
        precision: Default::default(),
    }
}

fn png(n: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(96, 96, |x, y| {
        image::Rgb([(x * n % 256) as u8, (y * 3 % 256) as u8, (n % 256) as u8])
    });
    let mut bytes = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut bytes, image::ImageFormat::Png)
        .expect("bench image encodes");
    bytes.into_inner()
}

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = ServerSettings {
        listen: "127.0.0.1:0".parse().expect("valid address"),
        metrics_listen: None,
        api_key: None,
        tls: None,
        data_dir: dir.path().to_owned(),
        model: model(),
        engine: EngineConfig::default(),
        hnsw: Default::default(),
        limits: Limits::default(),
        shutdown_grace: mplug_search::server::DEFAULT_SHUTDOWN_GRACE,
    };
    let mut server = start(settings).await.expect("server starts");
    server.wait_ready().await.expect("model loads");
    let url = format!("http://{}", server.addr);
    let client = MplugSearchClient::connect(url)
        .await
        .expect("client connects");

    let warm: Vec<_> = (0..50).map(item).collect();
    ingest(client.clone(), warm).await;
    let idle = searches(client.clone(), IDLE_SEARCHES, None).await;

    let items: Vec<_> = (50..50 + INGEST_ITEMS).map(item).collect();
    let started = Instant::now();
    let bulk = tokio::spawn(ingest(client.clone(), items));
    let busy = searches(client.clone(), usize::MAX, Some(&bulk)).await;
    bulk.await.expect("ingest joins");
    let ingest_seconds = started.elapsed().as_secs_f64();

    println!("| measurement | searches | p50 ms | p99 ms |");
    println!("|---|---|---|---|");
    row("text search, idle", &idle);
    row("text search, during ingest", &busy);
    println!();
    let rate = f64::from(INGEST_ITEMS) / ingest_seconds;
    println!("ingest: {INGEST_ITEMS} images in {ingest_seconds:.2} s = {rate:.1} images/s");
    server.shutdown().await.expect("clean shutdown");
}

fn item(n: u32) -> proto::IngestRequest {
    proto::IngestRequest {
        id: format!("bench/{n}"),
        content: Some(Content::Image(png(n))),
        metadata: Default::default(),
    }
}

type Client = MplugSearchClient<tonic::transport::Channel>;

async fn ingest(mut client: Client, items: Vec<proto::IngestRequest>) {
    let mut results = client
        .ingest(futures::stream::iter(items))
        .await
        .expect("ingest")
        .into_inner();
    while results.message().await.expect("ingest stream").is_some() {}
}

async fn searches(
    mut client: Client,
    count: usize,
    until: Option<&tokio::task::JoinHandle<()>>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while latencies.len() < count && until.is_none_or(|task| !task.is_finished()) {
        let request = proto::SearchRequest {
            query: Some(Query::Text(format!("a picture number {}", latencies.len()))),
            k: 10,
            ..Default::default()
        };
        let start = Instant::now();
        client.search(request).await.expect("search");
        latencies.push(start.elapsed());
    }
    latencies
}

fn row(name: &str, latencies: &[Duration]) {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let at = |q: f64| {
        let index = ((sorted.len() as f64 - 1.0) * q).round() as usize;
        sorted
            .get(index)
            .map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
    };
    println!(
        "| {name} | {} | {:.2} | {:.2} |",
        sorted.len(),
        at(0.5),
        at(0.99)
    );
}
