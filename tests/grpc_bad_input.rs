//! Every kind of bad input gets a clear status and the server keeps serving.

mod common;

use std::collections::HashMap;

use common::*;
use mplug_search::server::proto::{self, ingest_request::Content, search_request::Query};
use tonic::Code;

type Client = proto::mplug_search_client::MplugSearchClient<tonic::transport::Channel>;

async fn embed_image_code(client: &mut Client, image: Vec<u8>) -> (Code, String) {
    let status = client
        .embed_image(proto::EmbedImageRequest { image })
        .await
        .expect_err("bad image is refused");
    (status.code(), status.message().to_string())
}

async fn search_code(client: &mut Client, request: proto::SearchRequest) -> Code {
    client
        .search(request)
        .await
        .expect_err("bad search is refused")
        .code()
}

async fn assert_still_serving(client: &mut Client) {
    let request = proto::EmbedTextRequest {
        text: "still here".into(),
    };
    client
        .embed_text(request)
        .await
        .expect("server keeps serving");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_images_are_invalid_arguments() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;

    let png = shape_png(64, [10, 20, 30], 0);
    let mut corrupt = rgb_jpeg();
    let middle = corrupt.len() / 2;
    corrupt[middle..].iter_mut().for_each(|b| *b = 0xFF);
    let cases = [
        ("truncated", png[..png.len() / 2].to_vec()),
        ("corrupt", corrupt),
        ("not an image", b"hello, this is plain text".to_vec()),
        ("zero bytes", Vec::new()),
        ("bomb", png_claiming(100_000, 100_000)),
    ];
    for (name, bytes) in cases {
        let (code, message) = embed_image_code(&mut client, bytes).await;
        assert_eq!(code, Code::InvalidArgument, "{name}: {message}");
        assert!(!message.is_empty(), "{name}");
        assert_still_serving(&mut client).await;
    }
    let (_, bomb) = embed_image_code(&mut client, png_claiming(100_000, 100_000)).await;
    assert!(bomb.contains("100000x100000"), "{bomb}");

    let item = proto::IngestRequest {
        id: "broken".into(),
        content: Some(Content::Image(b"GIF89a broken".to_vec())),
        metadata: HashMap::new(),
    };
    let response = client
        .ingest(futures::stream::iter(vec![item]))
        .await
        .expect("ingest");
    let result = response
        .into_inner()
        .message()
        .await
        .expect("stream")
        .expect("one result");
    assert_eq!(result.status(), proto::IngestStatus::Rejected);
    assert!(!result.reason.is_empty());
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_texts_k_ids_and_messages_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;
    let search = |query: Query, k: u32| proto::SearchRequest {
        query: Some(query),
        k,
        ..Default::default()
    };

    let text = |t: &str| Query::Text(t.into());
    assert_eq!(
        search_code(&mut client, search(text(""), 3)).await,
        Code::InvalidArgument
    );
    let huge = "word ".repeat(10_000);
    assert_eq!(
        search_code(&mut client, search(text(&huge), 3)).await,
        Code::InvalidArgument
    );
    assert_eq!(
        search_code(&mut client, search(text("a"), 0)).await,
        Code::InvalidArgument
    );
    let absurd = search(text("a"), u32::MAX);
    assert_eq!(
        search_code(&mut client, absurd).await,
        Code::InvalidArgument
    );
    let unknown = search(Query::ItemId("no/such/item".into()), 3);
    assert_eq!(search_code(&mut client, unknown).await, Code::NotFound);
    let no_query = proto::SearchRequest {
        k: 3,
        ..Default::default()
    };
    assert_eq!(
        search_code(&mut client, no_query).await,
        Code::InvalidArgument
    );
    let kinds = proto::SearchRequest {
        target_kinds: vec![42],
        ..search(text("a"), 3)
    };
    assert_eq!(search_code(&mut client, kinds).await, Code::InvalidArgument);
    assert_still_serving(&mut client).await;

    let oversized = proto::EmbedImageRequest {
        image: vec![0u8; 2 << 20],
    };
    let status = client
        .embed_image(oversized)
        .await
        .expect_err("oversized message");
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    assert_still_serving(&mut client).await;

    let code = invalid_utf8_filter_code(server.addr).await;
    assert_eq!(code, Code::InvalidArgument);
    assert_still_serving(&mut client).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reranked_search_with_k_above_max_rerank_k_is_refused_not_reranked_in_full() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = settings(dir.path(), None);
    let max = settings.limits.max_rerank_k as u32;
    let server = serve(settings).await;
    let mut client = client(server.addr).await;
    let reranked = |k: u32, rerank_k: u32| proto::SearchRequest {
        query: Some(Query::Text("a red square".into())),
        k,
        rerank: true,
        rerank_k,
        ..Default::default()
    };

    for rerank_k in [0, max + 1, 1000] {
        let status = client
            .search(reranked(1000, rerank_k))
            .await
            .expect_err("k above the rerank limit");
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(&max.to_string()), "{status:?}");
    }
    client
        .search(reranked(max, 0))
        .await
        .expect("k at the rerank limit");
    let plain = proto::SearchRequest {
        rerank: false,
        ..reranked(1000, 0)
    };
    client
        .search(plain)
        .await
        .expect("k above it without rerank");
    server.shutdown().await.expect("clean shutdown");
}

async fn ingest_all(
    client: &mut Client,
    items: Vec<proto::IngestRequest>,
) -> Vec<proto::IngestResponse> {
    let response = client
        .ingest(futures::stream::iter(items))
        .await
        .expect("ingest");
    let mut stream = response.into_inner();
    let mut results = Vec::new();
    while let Some(result) = stream.message().await.expect("ingest stream") {
        results.push(result);
    }
    results
}

fn text_item(id: String, metadata: HashMap<String, String>) -> proto::IngestRequest {
    proto::IngestRequest {
        content: Some(Content::Text(format!("a caption numbered {id}"))),
        id,
        metadata,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_search_answer_over_the_message_limit_is_resource_exhausted_not_unencodable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let settings = settings(dir.path(), None);
    let limit = settings.limits.max_message_bytes;
    let server = serve(settings).await;
    let mut client = client(server.addr).await;

    let huge: HashMap<String, String> = (0..64)
        .map(|i| (format!("key{i:02}"), "x".repeat(16_000)))
        .collect();
    let results = ingest_all(&mut client, vec![text_item("huge".into(), huge)]).await;
    assert_eq!(
        results[0].status(),
        proto::IngestStatus::Rejected,
        "{results:?}"
    );
    assert!(results[0].reason.contains("16384"), "{}", results[0].reason);

    let metadata: HashMap<String, String> = (0..15)
        .map(|i| (format!("key{i:02}"), "y".repeat(1000)))
        .collect();
    let items = (0..100)
        .map(|i| text_item(format!("item-{i:03}"), metadata.clone()))
        .collect();
    let results = ingest_all(&mut client, items).await;
    assert!(
        results
            .iter()
            .all(|r| r.status() == proto::IngestStatus::Indexed),
        "{results:?}"
    );

    let search = |k: u32| proto::SearchRequest {
        query: Some(Query::Text("a caption".into())),
        k,
        ..Default::default()
    };
    let status = client
        .search(search(100))
        .await
        .expect_err("answer too large");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains(&limit.to_string()), "{status:?}");
    assert!(status.message().contains("smaller k"), "{status:?}");
    let hits = client
        .search(search(10))
        .await
        .expect("fits")
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 10);
    server.shutdown().await.expect("clean shutdown");
}

/// A search request whose metadata filter values are raw bytes, so that a test can send
/// what the real `map<string, string>` field cannot hold: invalid UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawSearchRequest {
    #[prost(string, tag = "1")]
    text: String,
    #[prost(uint32, tag = "5")]
    k: u32,
    #[prost(map = "string, bytes", tag = "6")]
    filter: HashMap<String, Vec<u8>>,
}

async fn invalid_utf8_filter_code(addr: std::net::SocketAddr) -> Code {
    let channel = channel(addr).await;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("channel ready");
    let request = RawSearchRequest {
        text: "a square".into(),
        k: 3,
        filter: HashMap::from([("color".to_string(), vec![0xFF, 0xFE, b'r'])]),
    };
    let path = "/mplug_search.v1.MplugSearch/Search"
        .parse()
        .expect("valid path");
    let codec = tonic::codec::ProstCodec::<RawSearchRequest, proto::SearchResponse>::default();
    let answer = grpc.unary(tonic::Request::new(request), path, codec).await;
    answer.expect_err("invalid UTF-8 is refused").code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_filter_key_is_refused_with_a_short_message() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;
    let request = proto::SearchRequest {
        query: Some(Query::Text("a red circle".into())),
        k: 3,
        filter: HashMap::from([("k".repeat(20_000), "v".to_string())]),
        ..Default::default()
    };
    let status = client.search(request).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("16384"), "{}", status.message());
    assert!(status.message().len() < 1000, "{}", status.message());
    assert_still_serving(&mut client).await;
    server.shutdown().await.expect("clean shutdown");
}
