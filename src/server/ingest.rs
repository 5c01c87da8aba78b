//! The ingest stream: items are read while fewer than `ingest_window` are in flight,
//! processed concurrently (so that their encodes share bulk batches), and answered in the
//! order they arrived, each only after its upsert is durable.
//!
//! Per item: validate; if the id already holds the same content, answer UNCHANGED (or
//! store the new metadata with the stored vector); if other ids hold the same content,
//! reuse their vector and answer DUPLICATE; else decode, encode in the bulk queue, upsert
//! and answer INDEXED. Any failure rejects that item only, with the reason.

use std::sync::Arc;
use std::time::Duration;

use futures::stream::FuturesOrdered;
use futures::StreamExt;
use mplug_index::{Item, ItemKind, UpsertOutcome};
use prost::Message;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};
use tracing::Instrument;

use super::api::{blocking, Ready};
use super::convert;
use super::drain::Drain;
use super::proto::{self, ingest_request::Content, IngestStatus};
use super::settings::Limits;
use crate::engine::EncodeClass;
use crate::{Error, Result};

/// Counter of ingested items (label `status`).
pub const INGEST_ITEMS_METRIC: &str = "mplug_search_ingest_items_total";

/// How long an item waits before retrying a full bulk queue.
const BULK_RETRY_DELAY: Duration = Duration::from_millis(20);

/// Bytes of received items waiting for a place in the window. Reading ahead drains the
/// transport's buffers, whose per-connection allowance for small frames would otherwise run
/// out when a client sends many small items one frame each.
const READ_AHEAD_BYTES: usize = 16 << 20;

/// What an item counts against [`READ_AHEAD_BYTES`] at least: its in-memory overhead.
const READ_AHEAD_MIN_COST: usize = 256;

type Responses = std::pin::Pin<
    Box<dyn futures::Stream<Item = std::result::Result<proto::IngestResponse, Status>> + Send>,
>;

/// Starts processing `input` and returns the stream of per-item results. When `drain`'s
/// grace period ends, the stream stops reading and ends with UNAVAILABLE; items answered
/// before that are durable, the others were not acknowledged and may or may not be stored.
pub fn run(
    ready: Arc<Ready>,
    limits: Arc<Limits>,
    drain: Drain,
    input: Streaming<proto::IngestRequest>,
) -> Responses {
    let (sender, receiver) = mpsc::channel(limits.ingest_window);
    let span = tracing::info_span!("rpc", method = "ingest", request_id = %uuid::Uuid::new_v4());
    tokio::spawn(pump(ready, limits, drain, input, sender).instrument(span));
    Box::pin(ReceiverStream::new(receiver))
}

type Sender = mpsc::Sender<std::result::Result<proto::IngestResponse, Status>>;

/// Items being processed, in arrival order, with their ids. An item whose id is already
/// in flight is held back until that one is answered, so the later one wins.
struct InFlight<F: std::future::Future> {
    futures: FuturesOrdered<F>,
    ids: std::collections::VecDeque<String>,
    held: Option<proto::IngestRequest>,
}

impl<F: std::future::Future> InFlight<F> {
    fn admit(&mut self, item: proto::IngestRequest, start: impl FnOnce(proto::IngestRequest) -> F) {
        if self.ids.contains(&item.id) {
            self.held = Some(item);
            return;
        }
        self.ids.push_back(item.id.clone());
        self.futures.push_back(start(item));
    }

    fn len(&self) -> usize {
        self.ids.len() + usize::from(self.held.is_some())
    }
}

/// A received item, holding its share of the read-ahead budget until it is admitted.
type Received = std::result::Result<(proto::IngestRequest, OwnedSemaphorePermit), Status>;

/// Reads `input` into a queue holding at most about [`READ_AHEAD_BYTES`]; the queue ends
/// after the stream's end or error, or when the receiver is dropped (even while the client
/// sends nothing, so that an abandoned stream does not stay open).
fn read_ahead(mut input: Streaming<proto::IngestRequest>) -> mpsc::UnboundedReceiver<Received> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let budget = Arc::new(Semaphore::new(READ_AHEAD_BYTES));
    tokio::spawn(
        async move {
            loop {
                let next = tokio::select! {
                    next = input.message() => next,
                    () = sender.closed() => return,
                };
                let item = match next {
                    Ok(Some(item)) => item,
                    Ok(None) => return,
                    Err(status) => {
                        let _ = sender.send(Err(status));
                        return;
                    }
                };
                let cost = item
                    .encoded_len()
                    .clamp(READ_AHEAD_MIN_COST, READ_AHEAD_BYTES);
                let cost = u32::try_from(cost).expect("the read-ahead budget fits in u32");
                let Ok(permit) = budget.clone().acquire_many_owned(cost).await else {
                    return;
                };
                if sender.send(Ok((item, permit))).is_err() {
                    return;
                }
            }
        }
        .in_current_span(),
    );
    receiver
}

async fn pump(
    ready: Arc<Ready>,
    limits: Arc<Limits>,
    drain: Drain,
    input: Streaming<proto::IngestRequest>,
    sender: Sender,
) {
    let mut input = read_ahead(input);
    let start = |item| ingest_one(ready.clone(), limits.clone(), item);
    let mut flight = InFlight {
        futures: FuturesOrdered::new(),
        ids: Default::default(),
        held: None,
    };
    let (mut received, mut ended) = (0_u64, None);
    while ended.is_none() || flight.len() > 0 {
        let open = ended.is_none() && flight.held.is_none() && flight.len() < limits.ingest_window;
        tokio::select! {
            () = drain.expired() => {
                let in_flight = flight.len();
                tracing::info!(received, in_flight, "server stopping; ingest stream ended");
                // A client that reads no answers gets none: the connection closes soon after.
                let _ = sender.try_send(Err(Status::from(Error::Stopping)));
                return;
            }
            Some(done) = flight.futures.next(), if !flight.futures.is_empty() => {
                flight.ids.pop_front();
                if let Some(item) = flight.held.take() {
                    flight.admit(item, start);
                }
                if sender.send(Ok(done)).await.is_err() {
                    tracing::info!(received, "client went away; in-flight items dropped");
                    return;
                }
            }
            next = input.recv(), if open => {
                match next {
                    Some(Ok((item, _permit))) => {
                        received += 1;
                        flight.admit(item, start);
                    }
                    None => ended = Some(None),
                    Some(Err(status)) => ended = Some(Some(status)),
                }
            }
        }
    }
    if let Some(Some(status)) = ended {
        tracing::info!(received, %status, "ingest stream ended with an error");
        let _ = sender.send(Err(status)).await;
        return;
    }
    tracing::info!(received, "ingest stream done");
}

async fn ingest_one(
    ready: Arc<Ready>,
    limits: Arc<Limits>,
    request: proto::IngestRequest,
) -> proto::IngestResponse {
    let id = request.id.clone();
    let (status, reason, duplicate_of) = match store(&ready, &limits, request).await {
        Ok((status, duplicate_of)) => (status, String::new(), duplicate_of),
        Err(error) => (IngestStatus::Rejected, error.to_string(), Vec::new()),
    };
    let label = status.as_str_name();
    metrics::counter!(INGEST_ITEMS_METRIC, "status" => label).increment(1);
    if status == IngestStatus::Rejected {
        tracing::info!(id, reason, "item rejected");
    }
    proto::IngestResponse {
        id,
        status: status as i32,
        reason,
        duplicate_of,
    }
}

async fn store(
    ready: &Ready,
    limits: &Limits,
    request: proto::IngestRequest,
) -> Result<(IngestStatus, Vec<String>)> {
    convert::item_id("id", &request.id)?;
    let metadata = convert::metadata("metadata", request.metadata, limits)?;
    let (kind, payload) = match request.content {
        Some(Content::Image(bytes)) => (ItemKind::Image, bytes),
        Some(Content::Text(text)) => {
            convert::text("text", &text, limits)?;
            (ItemKind::Text, text.into_bytes())
        }
        None => {
            return Err(convert::invalid(
                "content",
                "one of image or text is required",
            ))
        }
    };
    if payload.is_empty() {
        return Err(Error::ImageDecode {
            reason: "the image is empty (zero bytes)".into(),
        });
    }
    let content_hash = convert::content_hash(kind, &payload);
    let item = Item {
        id: request.id,
        kind,
        vector: Vec::new(),
        metadata,
        content_hash,
        payload: Some(payload),
    };

    if let Some(status) = reuse_stored(ready, item.clone()).await? {
        return Ok(status);
    }
    let item = embed(ready, item).await?;
    let status = match upsert(ready, item).await? {
        // A concurrent stream stored the same content under this id first.
        UpsertOutcome::Unchanged => IngestStatus::Unchanged,
        UpsertOutcome::Inserted | UpsertOutcome::Replaced => IngestStatus::Indexed,
    };
    Ok((status, Vec::new()))
}

/// Most ids an answer lists in `duplicate_of`.
const DUPLICATES_LISTED: usize = 16;

/// Stores the item without model work when its content is already stored: under the
/// same id (UNCHANGED, or INDEXED with new metadata) or under other ids (DUPLICATE, listing
/// the first [`DUPLICATES_LISTED`] of them).
async fn reuse_stored(
    ready: &Ready,
    mut item: Item,
) -> Result<Option<(IngestStatus, Vec<String>)>> {
    let collection = ready.collection.clone();
    let (id, hash) = (item.id.clone(), item.content_hash);
    let known = blocking("ingest lookup", move || {
        if collection.contains(&id, &hash)? {
            return Ok((collection.get(&id)?, Vec::new()));
        }
        let mut others = collection.find_by_hash(&hash)?;
        others.truncate(DUPLICATES_LISTED);
        let source = match others.first() {
            Some(other) => collection.get(other)?,
            None => None,
        };
        Ok((source, others))
    })
    .await?;

    let (Some(source), others) = known else {
        return Ok(None);
    };
    if others.is_empty() && source.metadata == item.metadata && source.kind == item.kind {
        return Ok(Some((IngestStatus::Unchanged, Vec::new())));
    }
    if !others.is_empty() {
        // The id may have held other content whose features are cached.
        ready.engine.cache().remove(&item.id);
    }
    item.vector = source.vector;
    upsert(ready, item).await?;
    let status = if others.is_empty() {
        IngestStatus::Indexed
    } else {
        IngestStatus::Duplicate
    };
    Ok(Some((status, others)))
}

/// Computes the item's vector in the bulk queue, waiting while the queue is full, and
/// caches an image's vision tokens for rerank.
async fn embed(ready: &Ready, mut item: Item) -> Result<Item> {
    let payload = item.payload.clone().unwrap_or_default();
    match item.kind {
        ItemKind::Text => {
            let text = String::from_utf8(payload)
                .map_err(|_| convert::invalid("text", "stored text must be UTF-8"))?;
            item.vector =
                retry_full(|| ready.engine.encode_text(EncodeClass::Bulk, text.clone())).await?;
            ready.engine.cache().remove(&item.id);
        }
        ItemKind::Image => {
            let image = ready.decode(payload).await?;
            let encoded =
                retry_full(|| ready.engine.encode_image(EncodeClass::Bulk, image.clone())).await?;
            let cache = ready.engine.cache();
            cache.insert(&item.id, item.content_hash, encoded.tokens);
            item.vector = encoded.embedding;
        }
    }
    Ok(item)
}

/// Bulk work waits for room instead of failing: the stream's window bounds memory.
async fn retry_full<T, F, Fut>(mut attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    loop {
        match attempt().await {
            Err(Error::QueueFull { .. }) => tokio::time::sleep(BULK_RETRY_DELAY).await,
            other => return other,
        }
    }
}

/// Stores the item with the next group commit; returns once it is durable.
async fn upsert(ready: &Ready, item: Item) -> Result<UpsertOutcome> {
    ready.writer.upsert(item).await
}
