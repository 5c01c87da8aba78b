//! Shutdown is bounded: clients holding streams open cannot keep the server alive, new
//! clients are refused during the drain, and every acknowledged item survives.

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::*;
use mplug_search::server::proto::{self, ingest_request::Content, IngestStatus};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Streaming};
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest, HealthCheckResponse};

/// Far longer than any test may take: only the drain's own end can stop the server.
const TEST_TIMEOUT: Duration = Duration::from_secs(30);

fn text_item(id: &str) -> proto::IngestRequest {
    proto::IngestRequest {
        id: id.into(),
        content: Some(Content::Text(format!("a caption for {id}"))),
        metadata: HashMap::new(),
    }
}

/// An ingest stream the test keeps open: its sender and its results.
async fn open_ingest(
    addr: SocketAddr,
) -> (
    mpsc::Sender<proto::IngestRequest>,
    Streaming<proto::IngestResponse>,
) {
    let (items, input) = mpsc::channel(4);
    let results = client(addr)
        .await
        .ingest(ReceiverStream::new(input))
        .await
        .expect("ingest stream opens")
        .into_inner();
    (items, results)
}

async fn ingest_one(
    items: &mpsc::Sender<proto::IngestRequest>,
    results: &mut Streaming<proto::IngestResponse>,
    id: &str,
) {
    items.send(text_item(id)).await.expect("item sent");
    let result = results
        .message()
        .await
        .expect("stream")
        .expect("one result");
    assert_eq!(result.status(), IngestStatus::Indexed, "{result:?}");
}

/// A health watch: a stream the server never ends by itself.
async fn watch_health(addr: SocketAddr) -> Streaming<HealthCheckResponse> {
    let channel = channel(addr).await;
    let request = HealthCheckRequest {
        service: String::new(),
    };
    let mut watch = HealthClient::new(channel)
        .watch(request)
        .await
        .expect("watch opens")
        .into_inner();
    watch.message().await.expect("watch").expect("first status");
    watch
}

async fn assert_survived(data_dir: &std::path::Path, ids: &[&str]) {
    let server = serve(settings(data_dir, None)).await;
    let mut client = client(server.addr).await;
    for id in ids {
        let request = proto::GetRequest {
            id: (*id).into(),
            include_vector: false,
        };
        client
            .get(request)
            .await
            .expect("acknowledged item survived");
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_after_the_grace_period_while_clients_hold_streams_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings(dir.path(), None);
    let grace = Duration::from_millis(500);
    settings.shutdown_grace = grace;
    let server = serve(settings).await;
    let addr = server.addr;
    let (items, mut results) = open_ingest(addr).await;
    ingest_one(&items, &mut results, "kept").await;
    let _watch = watch_health(addr).await;

    let started = Instant::now();
    tokio::time::timeout(TEST_TIMEOUT, server.shutdown())
        .await
        .expect("shutdown ends although streams stay open")
        .expect("clean shutdown");
    assert!(started.elapsed() >= grace, "the grace period is given");

    let ended = results.message().await.expect_err("the server ended it");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the listener is closed"
    );
    drop(items);
    assert_survived(dir.path(), &["kept"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_the_drain_open_streams_work_new_clients_are_refused_and_hurry_ends_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings(dir.path(), None);
    settings.shutdown_grace = Duration::from_secs(3600);
    let server = serve(settings).await;
    let addr = server.addr;
    let (items, mut results) = open_ingest(addr).await;
    ingest_one(&items, &mut results, "before").await;

    let (hurry, hurried) = tokio::sync::oneshot::channel::<()>();
    let stopping = tokio::spawn(server.shutdown_or(async {
        let _ = hurried.await;
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "new clients are refused during the drain"
    );
    ingest_one(&items, &mut results, "during").await;
    assert!(
        !stopping.is_finished(),
        "the drain waits for the open stream"
    );

    let started = Instant::now();
    hurry.send(()).expect("shutdown still waiting");
    tokio::time::timeout(TEST_TIMEOUT, stopping)
        .await
        .expect("hurry ends the drain")
        .expect("shutdown task joins")
        .expect("clean shutdown");
    assert!(started.elapsed() < Duration::from_secs(10));
    let ended = results.message().await.expect_err("the server ended it");
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    drop(items);
    assert_survived(dir.path(), &["before", "during"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_watches_end_with_not_serving_and_do_not_hold_the_drain() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut settings = settings(dir.path(), None);
    settings.shutdown_grace = Duration::from_secs(3600);
    let server = serve(settings).await;
    let mut watch = watch_health(server.addr).await;

    tokio::time::timeout(TEST_TIMEOUT, server.shutdown())
        .await
        .expect("a health watch does not hold the drain")
        .expect("clean shutdown");
    // The watch may repeat SERVING first; its last status is NOT_SERVING, then it ends cleanly.
    let mut last = None;
    while let Some(status) = watch.message().await.expect("the watch ends cleanly") {
        last = Some(status.status);
    }
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing;
    assert_eq!(last, Some(not_serving as i32));
}
