//! Health, reflection and metrics of the real server on 127.0.0.1.

mod common;

use std::io::{Read, Write};

use common::*;
use mplug_search::server::proto;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};

const SERVICE: &str = "mplug_search.v1.MplugSearch";

async fn health_of(addr: std::net::SocketAddr) -> ServingStatus {
    let channel = channel(addr).await;
    let request = HealthCheckRequest {
        service: SERVICE.into(),
    };
    let answer = HealthClient::new(channel)
        .check(request)
        .await
        .expect("health answers");
    answer.into_inner().status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_stays_not_serving_until_a_model_loads() {
    let dir = tempfile::tempdir().expect("temp dir");
    let mut broken = settings(dir.path(), None);
    broken.model.checkpoint = dir.path().join("missing.safetensors");
    let mut server = mplug_search::server::start(broken)
        .await
        .expect("server starts");
    assert!(
        server.wait_ready().await.is_err(),
        "a missing checkpoint fails the load"
    );

    assert_eq!(health_of(server.addr).await, ServingStatus::NotServing);
    let mut client = client(server.addr).await;
    let stats = client
        .stats(proto::StatsRequest {})
        .await
        .expect_err("not loaded");
    assert_eq!(stats.code(), tonic::Code::Unavailable);
    server.shutdown().await.expect("clean shutdown");

    let server = serve(settings(dir.path(), None)).await;
    assert_eq!(health_of(server.addr).await, ServingStatus::Serving);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_service_and_metrics_count_requests() {
    let dir = tempfile::tempdir().expect("temp dir");
    let metrics_port = free_port();
    let mut with_metrics = settings(dir.path(), None);
    with_metrics.metrics_listen = Some(([127, 0, 0, 1], metrics_port).into());
    let server = serve(with_metrics).await;

    let services = reflected_services(server.addr).await;
    assert!(services.contains(&SERVICE.to_string()), "{services:?}");
    assert!(
        services.contains(&"grpc.health.v1.Health".to_string()),
        "{services:?}"
    );
    let served = |names: Vec<String>| -> Vec<String> {
        let reflection = |name: &String| name.starts_with("grpc.reflection.");
        names.into_iter().filter(|name| !reflection(name)).collect()
    };
    let older = reflected_services_v1alpha(server.addr).await;
    assert_eq!(
        served(older),
        served(services),
        "v1alpha lists the same services"
    );
    let mut client = client(server.addr).await;
    client.stats(proto::StatsRequest {}).await.expect("stats");

    let body = tokio::task::spawn_blocking(move || scrape(metrics_port))
        .await
        .expect("scrape joins");
    assert!(body.contains("mplug_search_rpc_total"), "{body}");
    assert!(body.contains("method=\"stats\""), "{body}");
    server.shutdown().await.expect("clean shutdown");
}

/// An async fn listing the services through one version of the reflection API; the two
/// versions have the same messages in different modules.
macro_rules! list_services {
    ($name:ident, $version:ident) => {
        async fn $name(addr: std::net::SocketAddr) -> Vec<String> {
            use tonic_reflection::pb::$version::{
                server_reflection_client::ServerReflectionClient,
                server_reflection_request::MessageRequest,
                server_reflection_response::MessageResponse, ServerReflectionRequest,
            };
            let channel = channel(addr).await;
            let request = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let answer = ServerReflectionClient::new(channel)
                .server_reflection_info(futures::stream::iter(vec![request]))
                .await
                .expect("reflection answers");
            let first = answer.into_inner().message().await.expect("stream");
            match first.and_then(|f| f.message_response) {
                Some(MessageResponse::ListServicesResponse(list)) => {
                    list.service.into_iter().map(|s| s.name).collect()
                }
                other => panic!("unexpected reflection answer {other:?}"),
            }
        }
    };
}

list_services!(reflected_services, v1);
list_services!(reflected_services_v1alpha, v1alpha);

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binds a free port");
    listener.local_addr().expect("has an address").port()
}

fn scrape(port: u16) -> String {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).expect("metrics listen");
    let request = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n";
    stream.write_all(request.as_bytes()).expect("request sent");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response read");
    body
}
