//! The real server on 127.0.0.1 with the tiny parity model, exercised over gRPC.

mod common;

use std::collections::HashMap;

use common::*;
use mplug_search::server::proto::{
    self, image_input, ingest_request::Content, match_request::Anchor, search_request::Query,
    text_input, IngestStatus,
};
use tonic::Code;

const COLORS: [(&str, [u8; 3]); 3] = [
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
];

fn image_item(id: &str, bytes: Vec<u8>, color: &str) -> proto::IngestRequest {
    proto::IngestRequest {
        id: id.into(),
        content: Some(Content::Image(bytes)),
        metadata: HashMap::from([("color".to_string(), color.to_string())]),
    }
}

fn text_item(id: &str, text: &str) -> proto::IngestRequest {
    proto::IngestRequest {
        id: id.into(),
        content: Some(Content::Text(text.into())),
        metadata: HashMap::new(),
    }
}

fn corpus() -> Vec<proto::IngestRequest> {
    let mut items = Vec::new();
    for (n, (name, rgb)) in COLORS.iter().enumerate() {
        items.push(image_item(
            &format!("img/{name}.png"),
            shape_png(64, *rgb, n as u32),
            name,
        ));
        items.push(text_item(
            &format!("txt/{name}"),
            &format!("a {name} square"),
        ));
    }
    items
}

async fn ingest(
    client: &mut proto::mplug_search_client::MplugSearchClient<tonic::transport::Channel>,
    items: Vec<proto::IngestRequest>,
) -> Vec<proto::IngestResponse> {
    let response = client
        .ingest(futures::stream::iter(items))
        .await
        .expect("ingest starts");
    let mut stream = response.into_inner();
    let mut results = Vec::new();
    while let Some(result) = stream.message().await.expect("ingest stream stays healthy") {
        results.push(result);
    }
    results
}

fn statuses(results: &[proto::IngestResponse]) -> Vec<IngestStatus> {
    results.iter().map(|r| r.status()).collect()
}

fn text_search(text: &str, k: u32, rerank: bool) -> proto::SearchRequest {
    proto::SearchRequest {
        query: Some(Query::Text(text.into())),
        k,
        rerank,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rpc_answers_over_grpc() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;

    let results = ingest(&mut client, corpus()).await;
    assert_eq!(
        statuses(&results),
        vec![IngestStatus::Indexed; 6],
        "{results:?}"
    );
    let again = ingest(&mut client, corpus()).await;
    assert_eq!(
        statuses(&again),
        vec![IngestStatus::Unchanged; 6],
        "{again:?}"
    );
    let copy = image_item("img/red-copy.png", shape_png(64, [255, 0, 0], 0), "red");
    let duplicate = ingest(&mut client, vec![copy]).await;
    assert_eq!(duplicate[0].status(), IngestStatus::Duplicate);
    assert_eq!(duplicate[0].duplicate_of, vec!["img/red.png".to_string()]);

    let plain = client
        .search(text_search("a red square", 3, false))
        .await
        .expect("search");
    let hits = plain.into_inner().hits;
    assert_eq!(hits.len(), 3);
    assert!(hits.windows(2).all(|w| w[0].itc_score >= w[1].itc_score));
    assert!(hits.iter().all(|hit| hit.itm_score.is_none()));

    let reranked = client
        .search(text_search("a red square", 2, true))
        .await
        .expect("rerank");
    let hits = reranked.into_inner().hits;
    assert_eq!(hits.len(), 2);
    assert!(hits.iter().all(|hit| hit.kind() == proto::ItemKind::Image));
    let itm: Vec<f32> = hits
        .iter()
        .map(|h| h.itm_score.expect("reranked hit has itm"))
        .collect();
    assert!(itm[0] >= itm[1], "ranked by ITM logit: {itm:?}");

    let by_image = proto::SearchRequest {
        query: Some(Query::Image(shape_png(64, [0, 0, 255], 2))),
        k: 3,
        rerank: true,
        ..Default::default()
    };
    let hits = client
        .search(by_image)
        .await
        .expect("image query")
        .into_inner()
        .hits;
    assert!(hits
        .iter()
        .all(|hit| hit.kind() == proto::ItemKind::Text && hit.itm_score.is_some()));

    let filtered = proto::SearchRequest {
        query: Some(Query::ItemId("img/green.png".into())),
        k: 5,
        filter: HashMap::from([("color".to_string(), "green".to_string())]),
        ..Default::default()
    };
    let hits = client
        .search(filtered)
        .await
        .expect("by id")
        .into_inner()
        .hits;
    assert_eq!(hits.len(), 1);
    assert_eq!(hits[0].id, "img/green.png");
    assert!((hits[0].itc_score - 1.0).abs() < 1e-4);

    check_match_generate_embed(&mut client).await;
    check_get_delete_stats(&mut client).await;
    server.shutdown().await.expect("clean shutdown");
}

async fn check_match_generate_embed(
    client: &mut proto::mplug_search_client::MplugSearchClient<tonic::transport::Channel>,
) {
    let texts = ["a red square", "a blue square"].map(|t| proto::TextInput {
        source: Some(text_input::Source::Text(t.into())),
    });
    let image = proto::ImageInput {
        source: Some(image_input::Source::ItemId("img/red.png".into())),
    };
    let request = proto::MatchRequest {
        anchor: Some(Anchor::Image(image.clone())),
        texts: texts.to_vec(),
        images: vec![],
    };
    let scores = client
        .r#match(request)
        .await
        .expect("match")
        .into_inner()
        .scores;
    assert_eq!(scores.len(), 2);
    assert!(scores
        .iter()
        .all(|s| (0.0..=1.0).contains(&s.match_probability)));
    let reverse = proto::MatchRequest {
        anchor: Some(Anchor::Text(texts[0].clone())),
        images: vec![image.clone(), image.clone()],
        texts: vec![],
    };
    let reverse = client
        .r#match(reverse)
        .await
        .expect("reverse match")
        .into_inner()
        .scores;
    assert!((reverse[0].itm_logit - scores[0].itm_logit).abs() < 1e-3);

    let caption = proto::CaptionRequest {
        image: Some(image.clone()),
        params: None,
    };
    let caption = client.caption(caption).await.expect("caption").into_inner();
    assert!(caption.score.is_finite());
    let ask = proto::AskRequest {
        image: Some(image),
        question: "what color is the shape?".into(),
        params: Some(proto::GenerationParams {
            beam_size: Some(1),
            max_length: Some(4),
            min_length: None,
        }),
    };
    assert!(client
        .ask(ask)
        .await
        .expect("ask")
        .into_inner()
        .score
        .is_finite());

    let embed = proto::EmbedTextRequest {
        text: "a red square".into(),
    };
    let vector = client
        .embed_text(embed)
        .await
        .expect("embed text")
        .into_inner()
        .vector;
    let norm: f32 = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    assert!((norm - 1.0).abs() < 1e-4, "unit vector, norm {norm}");
    let embed = proto::EmbedImageRequest { image: rgb_jpeg() };
    let image_vector = client
        .embed_image(embed)
        .await
        .expect("embed image")
        .into_inner()
        .vector;
    assert_eq!(image_vector.len(), vector.len());
}

async fn check_get_delete_stats(
    client: &mut proto::mplug_search_client::MplugSearchClient<tonic::transport::Channel>,
) {
    let get = proto::GetRequest {
        id: "txt/blue".into(),
        include_vector: true,
    };
    let item = client.get(get.clone()).await.expect("get").into_inner();
    assert_eq!(
        (item.text.as_str(), item.kind()),
        ("a blue square", proto::ItemKind::Text)
    );
    assert!(!item.vector.is_empty());

    let delete = proto::DeleteRequest {
        id: "txt/blue".into(),
    };
    client.delete(delete.clone()).await.expect("delete");
    assert_eq!(
        client.get(get).await.expect_err("deleted").code(),
        Code::NotFound
    );
    assert_eq!(
        client.delete(delete).await.expect_err("twice").code(),
        Code::NotFound
    );

    let stats = client
        .stats(proto::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!((stats.images, stats.texts), (4, 2));
    assert_eq!(stats.queues.len(), 3);
    assert!(
        stats.cache_hit_ratio > 0.0,
        "rerank of stored images hits the cache"
    );
    assert_eq!(stats.model_id, "tiny_base");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn searches_run_during_an_ingest_and_data_survives_a_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut writer = client(server.addr).await;
    let reader = client(server.addr).await;

    let items: Vec<_> = (0..60u32)
        .map(|n| {
            image_item(
                &format!("bulk/{n}"),
                shape_png(48, [n as u8 * 4, 80, 160], n),
                "bulk",
            )
        })
        .collect();
    let ingest_task = tokio::spawn(async move { ingest(&mut writer, items).await });
    let mut searches = 0;
    while !ingest_task.is_finished() {
        let mut reader = reader.clone();
        reader
            .search(text_search("a square", 5, false))
            .await
            .expect("search during ingest");
        searches += 1;
    }
    let results = ingest_task.await.expect("ingest task joins");
    assert_eq!(statuses(&results), vec![IngestStatus::Indexed; 60]);
    assert!(searches > 0);
    server.shutdown().await.expect("clean shutdown");

    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;
    let stats = client
        .stats(proto::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert_eq!(stats.images, 60);
    let item = proto::GetRequest {
        id: "bulk/7".into(),
        include_vector: false,
    };
    let image_bytes = client
        .get(item)
        .await
        .expect("item survived")
        .into_inner()
        .image_bytes;
    assert!(image_bytes > 0);

    // The feature cache starts empty after a restart: rerank recomputes from stored images.
    let hits = client
        .search(text_search("a square", 3, true))
        .await
        .expect("rerank");
    assert!(hits
        .into_inner()
        .hits
        .iter()
        .all(|hit| hit.itm_score.is_some()));
    let stats = client
        .stats(proto::StatsRequest {})
        .await
        .expect("stats")
        .into_inner();
    assert!(
        stats.cache_entries >= 3,
        "recomputed features are cached: {stats:?}"
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_enforced_when_configured_and_required_beyond_loopback() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), Some(API_KEY))).await;
    let mut anonymous = client(server.addr).await;
    let stats = anonymous.stats(proto::StatsRequest {}).await;
    assert_eq!(stats.expect_err("no key").code(), Code::Unauthenticated);

    let mut request = tonic::Request::new(proto::StatsRequest {});
    let bearer = format!("Bearer {API_KEY}").parse().expect("valid metadata");
    request.metadata_mut().insert("authorization", bearer);
    anonymous.stats(request).await.expect("bearer key accepted");
    let mut request = tonic::Request::new(proto::StatsRequest {});
    let wrong = "integration-test-key-WRONG"
        .parse()
        .expect("valid metadata");
    request.metadata_mut().insert("x-api-key", wrong);
    let refused = anonymous.stats(request).await.expect_err("wrong key");
    assert_eq!(refused.code(), Code::Unauthenticated);
    server.shutdown().await.expect("clean shutdown");

    let mut open = settings(dir.path(), None);
    open.listen = "0.0.0.0:0".parse().expect("valid address");
    let refused = mplug_search::server::start(open)
        .await
        .err()
        .expect("refused to start");
    assert!(refused.to_string().contains("api key"), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn odd_but_valid_images_are_indexed() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;
    let items = vec![
        image_item("gray", gray_png(), "x"),
        image_item("rgba", rgba_png(), "x"),
        image_item("rgb16", rgb16_png(), "x"),
        image_item("jpeg", rgb_jpeg(), "x"),
        image_item("cmyk", cmyk_jpeg(), "x"),
    ];
    let results = ingest(&mut client, items).await;
    assert_eq!(
        statuses(&results),
        vec![IngestStatus::Indexed; 5],
        "{results:?}"
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_id_in_one_stream_keeps_the_last_content() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;
    let items = vec![
        text_item("note", "first version"),
        text_item("other", "unrelated"),
        text_item("note", "second version"),
    ];
    let results = ingest(&mut client, items).await;
    assert_eq!(statuses(&results), vec![IngestStatus::Indexed; 3]);

    let get = proto::GetRequest {
        id: "note".into(),
        include_vector: false,
    };
    let item = client.get(get).await.expect("get").into_inner();
    assert_eq!(item.text, "second version");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_lists_at_most_sixteen_of_the_ids_holding_its_content() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let mut client = client(server.addr).await;
    let first = ingest(&mut client, vec![text_item("copy-00", "the same words")]).await;
    assert_eq!(statuses(&first), vec![IngestStatus::Indexed]);
    // One at a time, so that each copy finds all the earlier ones stored.
    for i in 1..20 {
        let id = format!("copy-{i:02}");
        let results = ingest(&mut client, vec![text_item(&id, "the same words")]).await;
        assert_eq!(statuses(&results), vec![IngestStatus::Duplicate], "{id}");
        let listed: Vec<String> = (0..i.min(16)).map(|j| format!("copy-{j:02}")).collect();
        assert_eq!(results[0].duplicate_of, listed, "{id}");
    }
    server.shutdown().await.expect("clean shutdown");
}
