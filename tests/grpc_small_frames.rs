//! A client that sends every ingest item in its own small HTTP/2 DATA frame, as several
//! gRPC implementations do, streams thousands of short texts on one connection without the
//! server closing the connection, and every item is answered.

mod common;

use bytes::{Buf, Bytes, BytesMut};
use common::{serve, settings};
use mplug_search::server::proto::{self, ingest_request::Content, IngestStatus};
use prost::Message;

const ITEMS: usize = 6000;

/// One gRPC message: the uncompressed flag, the length, the encoded item.
fn grpc_frame(message: &impl Message) -> Bytes {
    let body = message.encode_to_vec();
    let mut frame = BytesMut::with_capacity(5 + body.len());
    frame.extend_from_slice(&[0]);
    frame.extend_from_slice(&u32::try_from(body.len()).expect("small").to_be_bytes());
    frame.extend_from_slice(&body);
    frame.freeze()
}

/// Splits the received bytes into decoded responses, keeping a partial message in `buffer`.
fn decode_responses(buffer: &mut BytesMut) -> Vec<proto::IngestResponse> {
    let mut out = Vec::new();
    while buffer.len() >= 5 {
        let len = u32::from_be_bytes([buffer[1], buffer[2], buffer[3], buffer[4]]) as usize;
        if buffer.len() < 5 + len {
            break;
        }
        buffer.advance(5);
        let body = buffer.split_to(len);
        out.push(proto::IngestResponse::decode(body).expect("response decodes"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_small_frames_on_one_stream_are_all_answered() {
    let dir = tempfile::tempdir().expect("temp dir");
    let server = serve(settings(dir.path(), None)).await;
    let tcp = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("tcp connects");
    let (client, connection) = h2::client::handshake(tcp).await.expect("h2 handshake");
    tokio::spawn(connection);
    let mut client = client.ready().await.expect("h2 ready");

    let request = http::Request::post(format!(
        "http://{}/mplug_search.v1.MplugSearch/Ingest",
        server.addr
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .body(())
    .expect("request builds");
    let (response, mut send) = client.send_request(request, false).expect("stream opens");

    let sender = tokio::spawn(async move {
        for i in 0..ITEMS {
            let item = proto::IngestRequest {
                id: format!("t{i}"),
                content: Some(Content::Text(format!("x{i}"))),
                ..Default::default()
            };
            let frame = grpc_frame(&item);
            send.reserve_capacity(frame.len());
            while send.capacity() < frame.len() {
                let granted = std::future::poll_fn(|cx| send.poll_capacity(cx)).await;
                granted.expect("stream open").expect("capacity granted");
            }
            send.send_data(frame, false).expect("frame sent");
        }
        send.send_data(Bytes::new(), true).expect("stream ends");
    });

    let mut body = response.await.expect("response headers").into_body();
    let mut buffer = BytesMut::new();
    let mut indexed = 0;
    while let Some(chunk) = body.data().await {
        let chunk = chunk.expect("the connection stays open");
        let _ = body.flow_control().release_capacity(chunk.len());
        buffer.extend_from_slice(&chunk);
        for answer in decode_responses(&mut buffer) {
            assert_eq!(answer.status(), IngestStatus::Indexed, "{answer:?}");
            indexed += 1;
        }
    }
    sender.await.expect("sender joins");
    let trailers = body.trailers().await.expect("trailers").unwrap_or_default();
    let grpc_status = trailers.get("grpc-status").map(|v| v.as_bytes().to_vec());
    assert_eq!(grpc_status.as_deref(), Some(&b"0"[..]), "{trailers:?}");
    assert_eq!(indexed, ITEMS);
    server.shutdown().await.expect("clean shutdown");
}
