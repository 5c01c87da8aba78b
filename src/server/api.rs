//! The `MplugSearch` service: thin handlers that validate, call the engine and the index,
//! and map results. Index calls run on the blocking pool; model calls run in the engine.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mplug_index::{Collection, Filter, Item, ItemKind, SearchRequest};
use tonic::{Request, Response, Status, Streaming};
use tracing::Instrument;

use super::convert::{self, invalid};
use super::drain::Drain;
use super::proto::{self, image_input, mplug_search_server::MplugSearch, text_input};
use super::settings::Limits;
use super::status::{code_of, kind_label};
use super::writer::Writer;
use crate::engine::{
    Backend, ContentHash, EncodeClass, Engine, GenerationSettings, ItmScore, RgbImage, VisionTokens,
};
use crate::{Error, Result};

/// What a loaded server holds.
pub struct Ready {
    /// The running engine.
    pub engine: Engine,
    /// The collection.
    pub collection: Arc<Collection>,
    /// Group commit of ingested items into the collection.
    pub writer: Writer,
    /// Bounds the images being decoded at once, and so the memory decoding takes.
    pub decodes: DecodeBudget,
}

/// How many images may be decoded at once, and how many pixels they may have together.
/// Decoding holds an image at full size until it is resized to the model's resolution, so
/// the pixel budget, not the core count, bounds the memory that decoding takes.
pub struct DecodeBudget {
    /// One permit per image being decoded.
    slots: tokio::sync::Semaphore,
    /// One permit per started megapixel (2^20 pixels) of the images being decoded.
    megapixels: tokio::sync::Semaphore,
    /// The most megapixel permits one image takes: the whole budget.
    budget: u32,
}

impl DecodeBudget {
    /// `slots` images at once (at least 1), together at most `pixels` pixels (at least one
    /// megapixel); a larger image waits until it can take the whole budget alone.
    pub fn new(slots: usize, pixels: u64) -> Self {
        // Permits are taken as a u32 count, and a semaphore holds at most MAX_PERMITS.
        let most = u32::try_from(tokio::sync::Semaphore::MAX_PERMITS).unwrap_or(u32::MAX);
        let budget = u32::try_from(pixels.div_ceil(MEGAPIXEL)).unwrap_or(most);
        let budget = budget.clamp(1, most);
        Self {
            slots: tokio::sync::Semaphore::new(slots.max(1)),
            megapixels: tokio::sync::Semaphore::new(budget as usize),
            budget,
        }
    }
}

/// Pixels per permit of [`DecodeBudget`].
const MEGAPIXEL: u64 = 1 << 20;

/// Set once the model and collection are loaded.
pub type ReadySlot = Arc<OnceLock<Arc<Ready>>>;

/// Implementation of the gRPC service.
#[derive(Clone)]
pub struct Api {
    ready: ReadySlot,
    limits: Arc<Limits>,
    drain: Drain,
}

/// Counter of finished RPCs (labels `method`, `outcome`).
pub const RPC_TOTAL_METRIC: &str = "mplug_search_rpc_total";
/// Histogram of RPC durations (label `method`).
pub const RPC_SECONDS_METRIC: &str = "mplug_search_rpc_duration_seconds";

impl Api {
    /// A service answering `UNAVAILABLE` until `ready` is set, and to requests still running
    /// when `drain`'s grace period ends.
    pub fn new(ready: ReadySlot, limits: Limits, drain: Drain) -> Self {
        Self {
            ready,
            limits: Arc::new(limits),
            drain,
        }
    }

    fn ready(&self) -> Result<Arc<Ready>> {
        self.ready.get().cloned().ok_or(Error::NotReady)
    }

    /// Runs one RPC inside a span with a request id, records its metrics and logs one line. An
    /// answer larger than the message limit, which the transport could not send, is replaced by
    /// [`Error::ResponseTooLarge`]; work still running when the drain's grace period ends is
    /// dropped and answered [`Error::Stopping`].
    async fn observe<T: prost::Message>(
        &self,
        method: &'static str,
        work: impl Future<Output = Result<T>>,
    ) -> std::result::Result<Response<T>, Status> {
        let request_id = uuid::Uuid::new_v4();
        let span = tracing::info_span!("rpc", method, %request_id);
        let start = Instant::now();
        let result = tokio::select! {
            result = work.instrument(span.clone()) => result,
            () = self.drain.expired() => Err(Error::Stopping),
        };
        let result = result
            .and_then(|value| fits(method, &value, self.limits.max_message_bytes).map(|()| value));
        let seconds = start.elapsed().as_secs_f64();
        metrics::histogram!(RPC_SECONDS_METRIC, "method" => method).record(seconds);

        let _entered = span.enter();
        let millis = seconds * 1e3;
        match result {
            Ok(value) => {
                metrics::counter!(RPC_TOTAL_METRIC, "method" => method, "outcome" => "ok")
                    .increment(1);
                tracing::info!(millis, "ok");
                Ok(Response::new(value))
            }
            Err(error) => {
                let code = code_of(&error);
                let outcome = kind_label(code);
                metrics::counter!(RPC_TOTAL_METRIC, "method" => method, "outcome" => outcome)
                    .increment(1);
                match code {
                    tonic::Code::Internal | tonic::Code::FailedPrecondition => {
                        tracing::error!(millis, %error, "failed")
                    }
                    _ => tracing::info!(millis, %error, "refused"),
                }
                Err(Status::from(error))
            }
        }
    }
}

/// Refuses an answer whose encoding exceeds `limit` bytes, saying what to ask for instead.
fn fits(method: &'static str, value: &impl prost::Message, limit: usize) -> Result<()> {
    let bytes = value.encoded_len();
    if bytes <= limit {
        return Ok(());
    }
    let hint = match method {
        "search" => "ask for fewer hits (a smaller k)",
        _ => "the server's message limit is too small for this answer",
    };
    Err(Error::ResponseTooLarge { bytes, limit, hint })
}

/// Runs index or decoding work on the blocking pool.
pub(crate) async fn blocking<R: Send + 'static>(
    task: &'static str,
    work: impl FnOnce() -> Result<R> + Send + 'static,
) -> Result<R> {
    let span = tracing::Span::current();
    let joined = tokio::task::spawn_blocking(move || span.in_scope(work)).await;
    joined.map_err(|error| Error::TaskFailed {
        task,
        reason: error.to_string(),
    })?
}

/// An image as a handler first sees it: features already known, or pixels to encode.
pub(crate) enum ImageSource {
    Tokens(Arc<VisionTokens>),
    Pixels {
        image: RgbImage,
        /// The stored item's id and content hash, when the features belong in the cache.
        cache_id: Option<(String, ContentHash)>,
    },
}

/// Vision tokens computed for stored items, to be inserted in the cache.
type FreshTokens = Vec<((String, ContentHash), Arc<VisionTokens>)>;

/// Encodes pixel sources on the calling (engine) thread; returns the tokens in order and
/// the newly computed ones that belong in the cache.
fn materialize(
    backend: &dyn Backend,
    sources: Vec<ImageSource>,
) -> Result<(Vec<Arc<VisionTokens>>, FreshTokens)> {
    let mut pixels = Vec::new();
    for source in &sources {
        if let ImageSource::Pixels { image, .. } = source {
            pixels.push(image.clone());
        }
    }
    let encoded = if pixels.is_empty() {
        Vec::new()
    } else {
        backend.encode_images(&pixels)?
    };

    let mut encoded = encoded.into_iter();
    let (mut tokens, mut fresh) = (Vec::new(), Vec::new());
    for source in sources {
        match source {
            ImageSource::Tokens(known) => tokens.push(known),
            ImageSource::Pixels { cache_id, .. } => {
                let made = encoded.next().ok_or_else(|| Error::TaskFailed {
                    task: "encode",
                    reason: "the model returned fewer encodings than images".into(),
                })?;
                if let Some(id) = cache_id {
                    fresh.push((id, made.tokens.clone()));
                }
                tokens.push(made.tokens);
            }
        }
    }
    Ok((tokens, fresh))
}

impl Ready {
    async fn get_item(&self, id: String) -> Result<Item> {
        convert::item_id("item_id", &id)?;
        let collection = self.collection.clone();
        let found = blocking("get", move || {
            let item = collection.get(&id)?;
            item.ok_or(Error::NotFound { id })
        });
        found.await
    }

    /// Decodes image bytes on the blocking pool within [`Self::decodes`]: the pixel count its
    /// header announces is taken from the budget while it decodes (one megapixel for a header
    /// that cannot be read: decoding then fails at once).
    pub(crate) async fn decode(&self, bytes: Vec<u8>) -> Result<RgbImage> {
        if bytes.is_empty() {
            return Err(Error::ImageDecode {
                reason: "the image is empty (zero bytes)".into(),
            });
        }
        let budget = &self.decodes;
        let pixels = crate::preprocess::header_pixels(&bytes).unwrap_or(1);
        let share = u32::try_from(pixels.div_ceil(MEGAPIXEL)).unwrap_or(u32::MAX);
        let share = share.clamp(1, budget.budget);
        let shut = |_| Error::ShuttingDown;
        let _slot = budget.slots.acquire().await.map_err(shut)?;
        let _pixels = budget.megapixels.acquire_many(share).await.map_err(shut)?;
        let backend = self.engine.backend().clone();
        blocking("decode", move || backend.decode_image(&bytes)).await
    }

    /// The image of a stored item: its cached features, or its decoded payload.
    async fn stored_image(&self, id: String) -> Result<ImageSource> {
        if let Some((tokens, hash)) = self.engine.cache().get(&id) {
            if self.collection.contains(&id, &hash)? {
                return Ok(ImageSource::Tokens(tokens));
            }
            self.engine.cache().remove(&id);
        }
        let item = self.get_item(id.clone()).await?;
        if item.kind != ItemKind::Image {
            return Err(invalid(
                "item_id",
                format!("item {id:?} is a text, expected an image"),
            ));
        }
        let image = self.decode(item.payload.unwrap_or_default()).await?;
        Ok(ImageSource::Pixels {
            image,
            cache_id: Some((id, item.content_hash)),
        })
    }

    async fn image_input(&self, input: Option<proto::ImageInput>) -> Result<ImageSource> {
        let source = input.and_then(|input| input.source);
        match source {
            Some(image_input::Source::Data(bytes)) => Ok(ImageSource::Pixels {
                image: self.decode(bytes).await?,
                cache_id: None,
            }),
            Some(image_input::Source::ItemId(id)) => self.stored_image(id).await,
            None => Err(invalid("image", "one of data or item_id is required")),
        }
    }

    async fn stored_text(&self, id: String) -> Result<String> {
        let item = self.get_item(id.clone()).await?;
        if item.kind != ItemKind::Text {
            return Err(invalid(
                "item_id",
                format!("item {id:?} is an image, expected a text"),
            ));
        }
        String::from_utf8(item.payload.unwrap_or_default()).map_err(|_| Error::TaskFailed {
            task: "get",
            reason: format!("stored text of {id:?} is not UTF-8"),
        })
    }

    async fn text_input(&self, input: proto::TextInput, limits: &Limits) -> Result<String> {
        match input.source {
            Some(text_input::Source::Text(text)) => {
                convert::text("text", &text, limits)?;
                Ok(text)
            }
            Some(text_input::Source::ItemId(id)) => self.stored_text(id).await,
            None => Err(invalid("text", "one of text or item_id is required")),
        }
    }

    /// Runs heavy work needing image features, then caches the features it computed.
    async fn with_images<R, F>(&self, sources: Vec<ImageSource>, work: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Backend, Vec<Arc<VisionTokens>>) -> Result<R> + Send + 'static,
    {
        let run = move |backend: &dyn Backend| {
            let (tokens, fresh) = materialize(backend, sources)?;
            Ok((work(backend, tokens)?, fresh))
        };
        let (answer, fresh) = self.engine.run_heavy(run).await?;
        for ((id, hash), tokens) in fresh {
            self.engine.cache().insert(&id, hash, tokens);
        }
        Ok(answer)
    }
}

fn generation(
    params: Option<proto::GenerationParams>,
    defaults: GenerationSettings,
    limits: &Limits,
) -> Result<GenerationSettings> {
    let params = params.unwrap_or_default();
    let pick = |value: Option<u32>, default: usize| value.map_or(default, |v| v as usize);
    let settings = GenerationSettings {
        beam_size: pick(params.beam_size, defaults.beam_size),
        min_length: pick(params.min_length, defaults.min_length),
        max_length: pick(params.max_length, defaults.max_length),
    };
    if settings.beam_size == 0 || settings.beam_size > limits.max_beam_size {
        let reason = format!(
            "expected 1..={}, got {}",
            limits.max_beam_size, settings.beam_size
        );
        return Err(invalid("beam_size", reason));
    }
    let max = limits.max_generation_length;
    if settings.max_length == 0 || settings.max_length > max {
        return Err(invalid(
            "max_length",
            format!("expected 1..={max}, got {}", settings.max_length),
        ));
    }
    if settings.min_length > settings.max_length {
        return Err(invalid("min_length", "must not exceed max_length"));
    }
    Ok(settings)
}

/// The query of a search once embedded, and what rerank needs of it.
enum Query {
    Text(String),
    Image(ImageSource),
    /// A stored image whose features are fetched only if rerank needs them.
    StoredImage(String),
}

type IngestStream =
    Pin<Box<dyn futures::Stream<Item = std::result::Result<proto::IngestResponse, Status>> + Send>>;

#[tonic::async_trait]
impl MplugSearch for Api {
    type IngestStream = IngestStream;

    async fn ingest(
        &self,
        request: Request<Streaming<proto::IngestRequest>>,
    ) -> std::result::Result<Response<IngestStream>, Status> {
        let ready = self.ready().map_err(Status::from)?;
        let input = request.into_inner();
        let stream = super::ingest::run(ready, self.limits.clone(), self.drain.clone(), input);
        Ok(Response::new(stream))
    }

    async fn search(
        &self,
        request: Request<proto::SearchRequest>,
    ) -> std::result::Result<Response<proto::SearchResponse>, Status> {
        self.observe("search", self.search_inner(request.into_inner()))
            .await
    }

    async fn r#match(
        &self,
        request: Request<proto::MatchRequest>,
    ) -> std::result::Result<Response<proto::MatchResponse>, Status> {
        self.observe("match", self.match_inner(request.into_inner()))
            .await
    }

    async fn caption(
        &self,
        request: Request<proto::CaptionRequest>,
    ) -> std::result::Result<Response<proto::GenerateResponse>, Status> {
        let request = request.into_inner();
        self.observe("caption", async {
            let ready = self.ready()?;
            let defaults = ready.engine.info().caption_defaults;
            let settings = generation(request.params, defaults, &self.limits)?;
            let source = ready.image_input(request.image).await?;
            let run = move |backend: &dyn Backend, tokens: Vec<Arc<VisionTokens>>| {
                backend.caption(&tokens[0], &settings)
            };
            let generated = ready.with_images(vec![source], run).await?;
            Ok(proto::GenerateResponse {
                text: generated.text,
                score: generated.score,
            })
        })
        .await
    }

    async fn ask(
        &self,
        request: Request<proto::AskRequest>,
    ) -> std::result::Result<Response<proto::GenerateResponse>, Status> {
        let request = request.into_inner();
        self.observe("ask", async {
            let ready = self.ready()?;
            convert::text("question", &request.question, &self.limits)?;
            let defaults = ready.engine.info().vqa_defaults;
            let settings = generation(request.params, defaults, &self.limits)?;
            let source = ready.image_input(request.image).await?;
            let question = request.question;
            let run = move |backend: &dyn Backend, tokens: Vec<Arc<VisionTokens>>| {
                backend.answer(&tokens[0], &question, &settings)
            };
            let generated = ready.with_images(vec![source], run).await?;
            Ok(proto::GenerateResponse {
                text: generated.text,
                score: generated.score,
            })
        })
        .await
    }

    async fn embed_image(
        &self,
        request: Request<proto::EmbedImageRequest>,
    ) -> std::result::Result<Response<proto::EmbedResponse>, Status> {
        self.observe("embed_image", async {
            let ready = self.ready()?;
            let image = ready.decode(request.into_inner().image).await?;
            let encoded = ready.engine.encode_image(EncodeClass::Interactive, image);
            let vector = encoded.await?.embedding;
            let model_id = ready.engine.info().model_id.clone();
            Ok(proto::EmbedResponse { vector, model_id })
        })
        .await
    }

    async fn embed_text(
        &self,
        request: Request<proto::EmbedTextRequest>,
    ) -> std::result::Result<Response<proto::EmbedResponse>, Status> {
        self.observe("embed_text", async {
            let ready = self.ready()?;
            let text = request.into_inner().text;
            convert::text("text", &text, &self.limits)?;
            let vector = ready.engine.encode_text(EncodeClass::Interactive, text);
            let vector = vector.await?;
            let model_id = ready.engine.info().model_id.clone();
            Ok(proto::EmbedResponse { vector, model_id })
        })
        .await
    }

    async fn get(
        &self,
        request: Request<proto::GetRequest>,
    ) -> std::result::Result<Response<proto::GetResponse>, Status> {
        self.observe("get", async {
            let ready = self.ready()?;
            let request = request.into_inner();
            let item = ready.get_item(request.id).await?;
            Ok(get_response(item, request.include_vector))
        })
        .await
    }

    async fn delete(
        &self,
        request: Request<proto::DeleteRequest>,
    ) -> std::result::Result<Response<proto::DeleteResponse>, Status> {
        self.observe("delete", async {
            let ready = self.ready()?;
            let id = request.into_inner().id;
            convert::item_id("id", &id)?;
            let collection = ready.collection.clone();
            let deleted_id = id.clone();
            let deleted = blocking("delete", move || match collection.delete(&deleted_id) {
                Err(mplug_index::Error::UnknownId { id }) => Err(Error::NotFound { id }),
                other => Ok(other?),
            });
            deleted.await?;
            ready.engine.cache().remove(&id);
            Ok(proto::DeleteResponse {})
        })
        .await
    }

    async fn stats(
        &self,
        _request: Request<proto::StatsRequest>,
    ) -> std::result::Result<Response<proto::StatsResponse>, Status> {
        self.observe("stats", async {
            let ready = self.ready()?;
            let collection = ready.collection.clone();
            let stats = blocking("stats", move || Ok(collection.stats()?)).await?;
            Ok(stats_response(&ready, &stats, &self.limits))
        })
        .await
    }
}

fn get_response(item: Item, include_vector: bool) -> proto::GetResponse {
    let payload = item.payload.unwrap_or_default();
    let (text, image_bytes) = match item.kind {
        ItemKind::Text => (String::from_utf8_lossy(&payload).into_owned(), 0),
        ItemKind::Image => (String::new(), payload.len() as u64),
    };
    proto::GetResponse {
        id: item.id,
        kind: convert::kind_to_proto(item.kind) as i32,
        metadata: item.metadata.into_iter().collect(),
        text,
        image_bytes,
        content_hash: blake3::Hash::from_bytes(item.content_hash)
            .to_hex()
            .to_string(),
        vector: if include_vector {
            item.vector
        } else {
            Vec::new()
        },
    }
}

fn stats_response(
    ready: &Ready,
    stats: &mplug_index::Stats,
    limits: &Limits,
) -> proto::StatsResponse {
    let cache = ready.engine.cache().stats();
    let queue = |q: crate::engine::QueueStats| proto::QueueStats {
        name: q.name.into(),
        depth: q.depth as u64,
        capacity: q.capacity as u64,
        dropped: q.dropped,
        rejected: q.rejected,
    };
    let info = ready.engine.info();
    proto::StatsResponse {
        images: stats.images,
        texts: stats.texts,
        model_id: info.model_id.clone(),
        dimension: info.embed_dim as u32,
        queues: ready.engine.queue_stats().into_iter().map(queue).collect(),
        cache_hit_ratio: cache.hit_ratio(),
        cache_bytes: cache.bytes,
        cache_budget_bytes: cache.budget,
        cache_entries: cache.entries,
        tombstones: stats.tombstones,
        bytes_on_disk: stats.bytes_on_disk,
        max_message_bytes: limits.max_message_bytes as u64,
    }
}

impl Api {
    async fn search_inner(&self, request: proto::SearchRequest) -> Result<proto::SearchResponse> {
        let ready = self.ready()?;
        let k = convert::k(request.k, &self.limits)?;
        let mut kinds = convert::target_kinds(&request.target_kinds)?;
        let metadata = convert::metadata("filter", request.filter, &self.limits)?;
        let query = request
            .query
            .ok_or_else(|| invalid("query", "one of text, image or item_id is required"))?;
        let (vector, query) = self.embed_query(&ready, query).await?;

        let candidates = if request.rerank {
            let own = match query {
                Query::Text(_) => ItemKind::Text,
                Query::Image(_) | Query::StoredImage(_) => ItemKind::Image,
            };
            if kinds.as_ref().is_some_and(|kinds| kinds.contains(&own)) {
                let reason = "rerank scores image-text pairs: target the other modality only";
                return Err(invalid("target_kinds", reason));
            }
            let other = if own == ItemKind::Text {
                ItemKind::Image
            } else {
                ItemKind::Text
            };
            kinds = Some(vec![other]);
            convert::rerank_k(request.rerank_k, k, &self.limits)?
        } else {
            k
        };

        let filter = Filter { kinds, metadata };
        let collection = ready.collection.clone();
        let hits = blocking("search", move || {
            let request = SearchRequest {
                vector: &vector,
                k: candidates,
                ef: None,
                filter,
                exact: false,
            };
            Ok(collection.search(&request)?)
        })
        .await?;

        let scores = if request.rerank && !hits.is_empty() {
            Some(self.rerank(&ready, query, &hits).await?)
        } else {
            None
        };
        Ok(proto::SearchResponse {
            hits: rank(hits, scores, k),
        })
    }

    async fn embed_query(
        &self,
        ready: &Ready,
        query: proto::search_request::Query,
    ) -> Result<(Vec<f32>, Query)> {
        use proto::search_request::Query as Q;
        let class = EncodeClass::Interactive;
        match query {
            Q::Text(text) => {
                convert::text("text", &text, &self.limits)?;
                let vector = ready.engine.encode_text(class, text.clone()).await?;
                Ok((vector, Query::Text(text)))
            }
            Q::Image(bytes) => {
                let image = ready.decode(bytes).await?;
                let encoded = ready.engine.encode_image(class, image).await?;
                let query = Query::Image(ImageSource::Tokens(encoded.tokens));
                Ok((encoded.embedding, query))
            }
            Q::ItemId(id) => {
                let item = ready.get_item(id.clone()).await?;
                let query = match item.kind {
                    ItemKind::Image => Query::StoredImage(id),
                    ItemKind::Text => {
                        let payload = item.payload.unwrap_or_default();
                        Query::Text(String::from_utf8_lossy(&payload).into_owned())
                    }
                };
                Ok((item.vector, query))
            }
        }
    }

    /// ITM match logits of the query against each candidate, in candidate order.
    async fn rerank(
        &self,
        ready: &Ready,
        query: Query,
        hits: &[mplug_index::Hit],
    ) -> Result<Vec<ItmScore>> {
        let query = match query {
            Query::StoredImage(id) => Query::Image(ready.stored_image(id).await?),
            other => other,
        };
        match query {
            Query::Text(text) => {
                let mut sources = Vec::with_capacity(hits.len());
                for hit in hits {
                    sources.push(ready.stored_image(hit.id.clone()).await?);
                }
                let run = move |backend: &dyn Backend, tokens: Vec<Arc<VisionTokens>>| {
                    backend.match_text_images(&text, &tokens)
                };
                ready.with_images(sources, run).await
            }
            Query::Image(source) => {
                let mut texts = Vec::with_capacity(hits.len());
                for hit in hits {
                    texts.push(ready.stored_text(hit.id.clone()).await?);
                }
                let run = move |backend: &dyn Backend, tokens: Vec<Arc<VisionTokens>>| {
                    backend.match_image_texts(&tokens[0], &texts)
                };
                ready.with_images(vec![source], run).await
            }
            Query::StoredImage(id) => Err(Error::TaskFailed {
                task: "rerank",
                reason: format!("stored image {id:?} was not resolved"),
            }),
        }
    }

    async fn match_inner(&self, request: proto::MatchRequest) -> Result<proto::MatchResponse> {
        use proto::match_request::Anchor;
        let ready = self.ready()?;
        let count = request.images.len() + request.texts.len();
        if count == 0 || count > self.limits.max_match_candidates {
            let reason = format!(
                "expected 1..={} candidates, got {count}",
                self.limits.max_match_candidates
            );
            return Err(invalid("candidates", reason));
        }
        let scores = match request.anchor {
            Some(Anchor::Image(image)) if request.images.is_empty() => {
                let source = ready.image_input(Some(image)).await?;
                let mut texts = Vec::with_capacity(request.texts.len());
                for text in request.texts {
                    texts.push(ready.text_input(text, &self.limits).await?);
                }
                let run = move |backend: &dyn Backend, tokens: Vec<Arc<VisionTokens>>| {
                    backend.match_image_texts(&tokens[0], &texts)
                };
                ready.with_images(vec![source], run).await?
            }
            Some(Anchor::Text(text)) if request.texts.is_empty() => {
                let text = ready.text_input(text, &self.limits).await?;
                let mut sources = Vec::with_capacity(request.images.len());
                for image in request.images {
                    sources.push(ready.image_input(Some(image)).await?);
                }
                let run = move |backend: &dyn Backend, tokens: Vec<Arc<VisionTokens>>| {
                    backend.match_text_images(&text, &tokens)
                };
                ready.with_images(sources, run).await?
            }
            Some(_) => {
                let reason = "an image anchor takes texts, a text anchor takes images";
                return Err(invalid("candidates", reason));
            }
            None => return Err(invalid("anchor", "one of image or text is required")),
        };
        let score = |s: ItmScore| proto::MatchScore {
            itm_logit: s.matched,
            match_probability: s.match_probability(),
        };
        Ok(proto::MatchResponse {
            scores: scores.into_iter().map(score).collect(),
        })
    }
}

/// Builds the hits: by ITM match logit when reranked (ties keep ITC order), else as the
/// index ranked them; at most `k`.
fn rank(hits: Vec<mplug_index::Hit>, scores: Option<Vec<ItmScore>>, k: usize) -> Vec<proto::Hit> {
    let mut ranked: Vec<(mplug_index::Hit, Option<f32>)> = match scores {
        Some(scores) => hits
            .into_iter()
            .zip(scores.into_iter().map(|s| Some(s.matched)))
            .collect(),
        None => hits.into_iter().map(|hit| (hit, None)).collect(),
    };
    ranked.sort_by(|a, b| b.1.unwrap_or(f32::MIN).total_cmp(&a.1.unwrap_or(f32::MIN)));
    ranked.truncate(k);
    let hit = |(hit, itm_score): (mplug_index::Hit, Option<f32>)| proto::Hit {
        id: hit.id,
        kind: convert::kind_to_proto(hit.kind) as i32,
        itc_score: hit.score,
        itm_score,
        metadata: hit.metadata.into_iter().collect(),
    };
    ranked.into_iter().map(hit).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use mplug_index::{HnswParams, Metric, Settings};

    use super::*;
    use crate::engine::{parity_model_paths, EngineConfig, ModelSource, MplugBackend};
    use crate::model::Tasks;

    fn ready(dir: &Path) -> Ready {
        let (checkpoint, config) = parity_model_paths(Path::new(env!("CARGO_MANIFEST_DIR")));
        let source = ModelSource {
            checkpoint,
            config,
            tasks: Tasks::ALL,
            max_pixels: 1 << 20,
            precision: Default::default(),
        };
        let backend = MplugBackend::load(&source).expect("parity model loads");
        let settings = Settings {
            dimension: backend.info_snapshot().embed_dim,
            metric: Metric::Cosine,
            hnsw: HnswParams::default(),
            model_id: "cache-test".into(),
        };
        let engine = Engine::start(Arc::new(backend), &EngineConfig::default()).expect("engine");
        let collection = Arc::new(Collection::open(dir, settings).expect("collection opens"));
        Ready {
            engine,
            writer: Writer::start(collection.clone(), 8).expect("writer"),
            decodes: DecodeBudget::new(2, 1 << 22),
            collection,
        }
    }

    fn png() -> Vec<u8> {
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(8, 8, image::Rgb([200, 10, 10]))
            .write_to(&mut bytes, image::ImageFormat::Png)
            .expect("png encodes");
        bytes.into_inner()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn images_that_fill_the_pixel_budget_decode_one_at_a_time() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut ready = ready(dir.path());
        // One megapixel for everything: each 1000 × 1040 image needs the whole budget.
        ready.decodes = DecodeBudget::new(4, 1 << 20);
        let ready = Arc::new(ready);
        let mut bytes = std::io::Cursor::new(Vec::new());
        image::RgbImage::from_pixel(1000, 1040, image::Rgb([9, 99, 199]))
            .write_to(&mut bytes, image::ImageFormat::Png)
            .expect("png encodes");
        let bytes = bytes.into_inner();
        let decodes = (0..3).map(|_| {
            let (ready, bytes) = (ready.clone(), bytes.clone());
            tokio::spawn(async move { ready.decode(bytes).await })
        });
        for decoded in futures::future::join_all(decodes).await {
            let image = decoded.expect("task").expect("decodes");
            assert_eq!(image.get_pixel(0, 0).0, [9, 99, 199]);
        }
        assert_eq!(
            ready.decodes.megapixels.available_permits(),
            1,
            "budget returned"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_features_are_used_only_while_the_item_holds_their_content() {
        let dir = tempfile::tempdir().expect("temp dir");
        let ready = ready(dir.path());
        let dimension = ready.collection.settings().dimension;
        let item = Item {
            id: "x".into(),
            kind: ItemKind::Image,
            vector: vec![1.0; dimension],
            metadata: Default::default(),
            content_hash: [1; 32],
            payload: Some(png()),
        };
        ready.writer.upsert(item).await.expect("stored");
        let tokens = Arc::new(VisionTokens::from_f32(&[0.25; 4], 2, 2).expect("2x2"));

        ready.engine.cache().insert("x", [1; 32], tokens.clone());
        let current = ready.stored_image("x".into()).await.expect("stored image");
        assert!(matches!(current, ImageSource::Tokens(t) if Arc::ptr_eq(&t, &tokens)));

        ready.engine.cache().insert("x", [2; 32], tokens.clone());
        let stale = ready.stored_image("x".into()).await.expect("stored image");
        assert!(
            matches!(stale, ImageSource::Pixels { .. }),
            "stale entry ignored"
        );
        assert!(
            ready.engine.cache().get("x").is_none(),
            "stale entry dropped"
        );

        ready.engine.cache().insert("x", [1; 32], tokens);
        ready.collection.delete("x").expect("deleted");
        let gone = ready.stored_image("x".into()).await;
        assert!(
            matches!(gone, Err(Error::NotFound { .. })),
            "deleted item not served"
        );
    }
}
