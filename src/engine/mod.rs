//! Inference threads, request queues, batching and the vision feature cache.
//!
//! The model runs on dedicated OS threads, never on the async runtime. Requests fall in
//! three classes, each with its own bounded queue and its own worker thread(s):
//!
//! - **interactive**: query encodes for search and embed requests;
//! - **bulk**: ingest encodes;
//! - **heavy**: rerank, match, caption and VQA.
//!
//! Because every class has its own threads, a query encode never waits behind a bulk
//! batch or a beam search: the operating system shares the cores between them. A full
//! queue answers [`Error::QueueFull`] at once (admission control, no unbounded
//! buffering). Each request carries the caller's tracing span and a oneshot reply; a
//! request whose caller has gone away is skipped when its turn comes and counted.

mod backend;
mod cache;
mod mplug;
mod queue;

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Sender, TrySendError};
use tokio::sync::oneshot;

pub use backend::{
    Backend, Generated, GenerationSettings, ImageEncoding, ItmScore, ModelInfo, RgbImage,
    VisionTokens,
};
pub use cache::{CacheStats, ContentHash, FeatureCache};
pub use mplug::{parity_model_paths, ModelSource, MplugBackend, Precision};
use queue::{BatchLimits, Call, EncodeJob, HeavyTask, QueueCounters};

use crate::{Error, Result};

/// Sizes of the engine's queues, threads and batches, and the cache budget.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineConfig {
    /// Requests that may wait in the interactive queue.
    pub interactive_queue: usize,
    /// Requests that may wait in the bulk queue.
    pub bulk_queue: usize,
    /// Requests that may wait in the heavy queue.
    pub heavy_queue: usize,
    /// Worker threads for interactive encodes.
    pub interactive_threads: usize,
    /// Worker threads for heavy work.
    pub heavy_threads: usize,
    /// Most inputs (images or texts) per encode batch.
    pub max_batch: usize,
    /// How long an interactive encode worker waits for more requests before closing a
    /// batch. Zero batches only what is already waiting: requests that arrive while the
    /// model runs form the next batch, so an idle server answers at once.
    pub interactive_batch_deadline: Duration,
    /// How long the bulk encode worker waits for more requests before closing a batch.
    pub bulk_batch_deadline: Duration,
    /// Byte budget of the rerank feature cache.
    pub cache_bytes: usize,
}

impl Default for EngineConfig {
    /// One thread per class (the reference machine has two cores), queues of 64/256/32,
    /// batches of 16 inputs, interactive batches of what is waiting, bulk batches closed
    /// after 5 ms, a 512 MiB cache.
    fn default() -> Self {
        Self {
            interactive_queue: 64,
            bulk_queue: 256,
            heavy_queue: 32,
            interactive_threads: 1,
            heavy_threads: 1,
            max_batch: 16,
            interactive_batch_deadline: Duration::ZERO,
            bulk_batch_deadline: Duration::from_millis(5),
            cache_bytes: 512 << 20,
        }
    }
}

/// Which encode queue a request uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EncodeClass {
    /// Queries: kept fast even while bulk and heavy work runs.
    Interactive,
    /// Ingest.
    Bulk,
}

/// Depth, capacity and drop count of one queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueStats {
    /// `interactive`, `bulk` or `heavy`.
    pub name: &'static str,
    /// Requests waiting now.
    pub depth: usize,
    /// Most requests that may wait.
    pub capacity: usize,
    /// Requests skipped because their caller went away.
    pub dropped: u64,
    /// Requests refused with `QueueFull` because the queue was full.
    pub rejected: u64,
    /// Batches (or heavy tasks) run so far.
    pub batches: u64,
    /// Inputs run in those batches.
    pub batched_inputs: u64,
}

struct Queue<T> {
    name: &'static str,
    sender: Sender<T>,
    capacity: usize,
    counters: Arc<QueueCounters>,
}

impl<T> Queue<T> {
    fn push(&self, item: T) -> Result<()> {
        let sent = self.sender.try_send(item);
        self.counters.record_depth(self.sender.len());
        sent.map_err(|error| match error {
            TrySendError::Full(_) => {
                metrics::counter!(QUEUE_REJECTED_METRIC, "queue" => self.name).increment(1);
                let counter = &self.counters.rejected;
                counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Error::QueueFull {
                    queue: self.name,
                    capacity: self.capacity,
                }
            }
            TrySendError::Disconnected(_) => Error::ShuttingDown,
        })
    }

    fn stats(&self) -> QueueStats {
        use std::sync::atomic::Ordering::Relaxed;
        QueueStats {
            name: self.name,
            depth: self.sender.len(),
            capacity: self.capacity,
            dropped: self.counters.dropped.load(Relaxed),
            rejected: self.counters.rejected.load(Relaxed),
            batches: self.counters.batches.load(Relaxed),
            batched_inputs: self.counters.batched_inputs.load(Relaxed),
        }
    }
}

/// Gauge of requests waiting per queue (label `queue`).
pub const QUEUE_DEPTH_METRIC: &str = "mplug_search_engine_queue_depth";
/// Counter of requests refused because their queue was full (label `queue`).
pub const QUEUE_REJECTED_METRIC: &str = "mplug_search_engine_rejected_total";

struct Inner {
    backend: Arc<dyn Backend>,
    interactive: Queue<EncodeJob>,
    bulk: Queue<EncodeJob>,
    heavy: Queue<Box<dyn HeavyTask>>,
    cache: FeatureCache,
    _threads: Vec<JoinHandle<()>>,
}

/// Handle to the running engine; cheap to clone. The worker threads stop once every
/// handle is dropped and their queues are drained.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("model", &self.inner.backend.info().model_id)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts the worker threads. Fails with `Error::InvalidArgument` when a queue,
    /// thread count or batch size is zero, or `Error::Io` when a thread cannot spawn.
    pub fn start(backend: Arc<dyn Backend>, config: &EngineConfig) -> Result<Self> {
        validate(config)?;
        let limits = BatchLimits {
            max_batch: config.max_batch,
            deadline: config.interactive_batch_deadline,
        };
        let bulk_limits = BatchLimits {
            deadline: config.bulk_batch_deadline,
            ..limits
        };
        let mut threads = Vec::new();

        let (interactive, rx) = queue("interactive", config.interactive_queue);
        for n in 0..config.interactive_threads {
            let (rx, backend, counters) =
                (rx.clone(), backend.clone(), interactive.counters.clone());
            let run = move || queue::run_encode_worker(rx, backend, limits, counters);
            threads.push(spawn(format!("engine-interactive-{n}"), run)?);
        }

        let (bulk, rx) = queue("bulk", config.bulk_queue);
        let (worker_backend, counters) = (backend.clone(), bulk.counters.clone());
        let run = move || queue::run_encode_worker(rx, worker_backend, bulk_limits, counters);
        threads.push(spawn("engine-bulk-0".into(), run)?);

        let (heavy, rx) = queue("heavy", config.heavy_queue);
        for n in 0..config.heavy_threads {
            let (rx, backend, counters) = (rx.clone(), backend.clone(), heavy.counters.clone());
            let run = move || queue::run_heavy_worker(rx, backend, counters);
            threads.push(spawn(format!("engine-heavy-{n}"), run)?);
        }

        let cache = FeatureCache::new(config.cache_bytes);
        let inner = Inner {
            backend,
            interactive,
            bulk,
            heavy,
            cache,
            _threads: threads,
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Facts about the loaded model.
    pub fn info(&self) -> &ModelInfo {
        self.inner.backend.info()
    }

    /// The model, for work that belongs on the caller's thread (image decoding).
    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.inner.backend
    }

    /// The rerank feature cache.
    pub fn cache(&self) -> &FeatureCache {
        &self.inner.cache
    }

    /// Encodes one image in the given class's queue; see [`Engine::encode_images`].
    pub async fn encode_image(&self, class: EncodeClass, image: RgbImage) -> Result<ImageEncoding> {
        let encoded = self.encode_images(class, vec![image]).await?;
        encoded.into_iter().next().ok_or_else(no_encoding)
    }

    /// Encodes one text in the given class's queue; see [`Engine::encode_texts`].
    pub async fn encode_text(&self, class: EncodeClass, text: String) -> Result<Vec<f32>> {
        let vectors = self.encode_texts(class, vec![text]).await?;
        vectors.into_iter().next().ok_or_else(no_encoding)
    }

    /// Encodes images in the given class's queue. `Error::QueueFull` when it is full.
    pub async fn encode_images(
        &self,
        class: EncodeClass,
        images: Vec<RgbImage>,
    ) -> Result<Vec<ImageEncoding>> {
        let (reply, answer) = oneshot::channel();
        let job = EncodeJob::Images {
            images,
            reply,
            span: tracing::Span::current(),
            enqueued: Instant::now(),
        };
        self.encode_queue(class).push(job)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Encodes texts into ITC vectors in the given class's queue.
    pub async fn encode_texts(
        &self,
        class: EncodeClass,
        texts: Vec<String>,
    ) -> Result<Vec<Vec<f32>>> {
        let (reply, answer) = oneshot::channel();
        let job = EncodeJob::Texts {
            texts,
            reply,
            span: tracing::Span::current(),
            enqueued: Instant::now(),
        };
        self.encode_queue(class).push(job)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Runs `work` on a heavy thread (rerank, match, caption, VQA). `Error::QueueFull`
    /// when the heavy queue is full. Dropping the returned future before the work starts
    /// cancels it.
    pub async fn run_heavy<R, F>(&self, work: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&dyn Backend) -> Result<R> + Send + 'static,
    {
        let (reply, answer) = oneshot::channel();
        let span = tracing::Span::current();
        let task: Box<dyn HeavyTask> = Box::new(Call { work, reply, span });
        self.inner.heavy.push(task)?;
        answer.await.map_err(|_| Error::ShuttingDown)?
    }

    /// Depths and counters of the three queues.
    pub fn queue_stats(&self) -> Vec<QueueStats> {
        vec![
            self.inner.interactive.stats(),
            self.inner.bulk.stats(),
            self.inner.heavy.stats(),
        ]
    }

    fn encode_queue(&self, class: EncodeClass) -> &Queue<EncodeJob> {
        match class {
            EncodeClass::Interactive => &self.inner.interactive,
            EncodeClass::Bulk => &self.inner.bulk,
        }
    }
}

impl EngineConfig {
    /// Refuses a configuration the engine cannot run: every queue, thread count and the
    /// batch size must be at least 1. Errors with `Error::InvalidArgument` naming the field.
    pub fn validate(&self) -> Result<()> {
        validate(self)
    }
}

fn validate(config: &EngineConfig) -> Result<()> {
    let checks = [
        ("interactive_queue", config.interactive_queue),
        ("bulk_queue", config.bulk_queue),
        ("heavy_queue", config.heavy_queue),
        ("interactive_threads", config.interactive_threads),
        ("heavy_threads", config.heavy_threads),
        ("max_batch", config.max_batch),
    ];
    for (field, value) in checks {
        if value == 0 {
            return Err(Error::InvalidArgument {
                field: field.into(),
                reason: "must be at least 1".into(),
            });
        }
    }
    Ok(())
}

fn queue<T>(name: &'static str, capacity: usize) -> (Queue<T>, crossbeam_channel::Receiver<T>) {
    let (sender, receiver) = crossbeam_channel::bounded(capacity);
    let queue = Queue {
        name,
        sender,
        capacity,
        counters: Arc::new(QueueCounters {
            queue: name,
            ..QueueCounters::default()
        }),
    };
    (queue, receiver)
}

fn spawn(name: String, run: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(run)
        .map_err(|source| Error::Io {
            path: name.into(),
            source,
        })
}

/// The error for a batch that came back shorter than it was sent.
fn no_encoding() -> Error {
    Error::TaskFailed {
        task: "encode",
        reason: "the model returned no encoding".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// A backend whose outputs are simple functions of the inputs, which records batch
    /// sizes and which blocks on inputs named "block" until released.
    struct ScriptedBackend {
        info: ModelInfo,
        text_batches: Mutex<Vec<usize>>,
        gate: Mutex<crossbeam_channel::Receiver<()>>,
        blocked: std::sync::atomic::AtomicUsize,
    }

    impl ScriptedBackend {
        fn new() -> (Arc<Self>, crossbeam_channel::Sender<()>) {
            let (release, gate) = crossbeam_channel::unbounded();
            let settings = GenerationSettings {
                beam_size: 1,
                min_length: 1,
                max_length: 4,
            };
            let info = ModelInfo {
                model_id: "scripted".into(),
                embed_dim: 2,
                caption_defaults: settings,
                vqa_defaults: settings,
            };
            let backend = Self {
                info,
                text_batches: Mutex::new(Vec::new()),
                gate: Mutex::new(gate),
                blocked: Default::default(),
            };
            (Arc::new(backend), release)
        }

        fn wait_if_blocked(&self, input: &str) {
            if input == "block" {
                self.blocked
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let gate = self
                    .gate
                    .lock()
                    .expect("gate lock is never poisoned in tests");
                gate.recv().expect("test keeps the release sender alive");
            }
        }
    }

    impl Backend for ScriptedBackend {
        fn info(&self) -> &ModelInfo {
            &self.info
        }

        fn decode_image(&self, _bytes: &[u8]) -> Result<RgbImage> {
            Ok(RgbImage::new(1, 1))
        }

        fn encode_images(&self, images: &[RgbImage]) -> Result<Vec<ImageEncoding>> {
            let tokens = Arc::new(VisionTokens::from_f32(&[1.0], 1, 1).expect("1x1 tokens"));
            let encode = |image: &RgbImage| ImageEncoding {
                embedding: vec![image.width() as f32, 0.0],
                tokens: tokens.clone(),
            };
            Ok(images.iter().map(encode).collect())
        }

        fn encode_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
            self.text_batches
                .lock()
                .expect("no poisoning")
                .push(texts.len());
            texts.iter().for_each(|text| self.wait_if_blocked(text));
            Ok(texts
                .iter()
                .map(|text| vec![text.len() as f32, 1.0])
                .collect())
        }

        fn match_image_texts(&self, _: &VisionTokens, texts: &[String]) -> Result<Vec<ItmScore>> {
            let score = |text: &String| ItmScore {
                no_match: 0.0,
                matched: text.len() as f32,
            };
            Ok(texts.iter().map(score).collect())
        }

        fn match_text_images(
            &self,
            text: &str,
            images: &[Arc<VisionTokens>],
        ) -> Result<Vec<ItmScore>> {
            self.wait_if_blocked(text);
            Ok(vec![
                ItmScore {
                    no_match: 0.0,
                    matched: 1.0
                };
                images.len()
            ])
        }

        fn caption(&self, _: &VisionTokens, _: &GenerationSettings) -> Result<Generated> {
            Err(Error::ModuleNotLoaded { module: "decoder" })
        }

        fn answer(&self, _: &VisionTokens, _: &str, _: &GenerationSettings) -> Result<Generated> {
            Err(Error::ModuleNotLoaded { module: "decoder" })
        }
    }

    fn config() -> EngineConfig {
        EngineConfig {
            interactive_queue: 4,
            bulk_queue: 4,
            heavy_queue: 1,
            interactive_batch_deadline: Duration::from_millis(200),
            bulk_batch_deadline: Duration::from_millis(200),
            ..EngineConfig::default()
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a current-thread runtime builds")
    }

    #[test]
    fn concurrent_encodes_share_a_batch_and_get_their_own_outputs() {
        let (backend, _release) = ScriptedBackend::new();
        let engine = Engine::start(backend.clone(), &config()).expect("engine starts");
        let texts = ["a", "bb", "ccc", "dddd"];

        let answers = runtime().block_on(async {
            let calls = texts
                .iter()
                .map(|text| engine.encode_texts(EncodeClass::Interactive, vec![text.to_string()]));
            futures::future::join_all(calls).await
        });

        for (text, answer) in texts.iter().zip(answers) {
            assert_eq!(
                answer.expect("encode succeeds"),
                vec![vec![text.len() as f32, 1.0]]
            );
        }
        let batches = backend.text_batches.lock().expect("no poisoning").clone();
        assert!(
            batches.len() < texts.len(),
            "expected batching, got batches {batches:?}"
        );
        assert_eq!(batches.iter().sum::<usize>(), texts.len());
    }

    #[test]
    fn without_a_deadline_requests_waiting_behind_a_busy_worker_share_one_batch() {
        let (backend, release) = ScriptedBackend::new();
        let config = EngineConfig {
            interactive_batch_deadline: Duration::ZERO,
            ..config()
        };
        let engine = Engine::start(backend.clone(), &config).expect("engine starts");
        let rt = runtime();
        let first_engine = engine.clone();
        let first = rt.spawn(async move {
            first_engine
                .encode_texts(EncodeClass::Interactive, vec!["block".into()])
                .await
        });
        wait_until(|| backend.blocked.load(std::sync::atomic::Ordering::SeqCst) == 1);

        let waiting: Vec<_> = ["a", "bb", "ccc"]
            .iter()
            .map(|text| {
                let engine = engine.clone();
                let text = text.to_string();
                rt.spawn(async move {
                    engine
                        .encode_texts(EncodeClass::Interactive, vec![text])
                        .await
                })
            })
            .collect();
        wait_until(|| engine.queue_stats()[0].depth == 3);
        release.send(()).expect("gate is open");

        rt.block_on(first)
            .expect("task joins")
            .expect("encode succeeds");
        for task in waiting {
            rt.block_on(task)
                .expect("task joins")
                .expect("encode succeeds");
        }
        let batches = backend.text_batches.lock().expect("no poisoning").clone();
        assert_eq!(
            batches,
            [1, 3],
            "the idle request ran alone, the waiting ones together"
        );
    }

    #[test]
    fn interactive_encodes_proceed_while_heavy_and_bulk_work_is_blocked() {
        let (backend, release) = ScriptedBackend::new();
        let engine = Engine::start(backend.clone(), &config()).expect("engine starts");
        let rt = runtime();

        let heavy_engine = engine.clone();
        let heavy = rt.spawn(async move {
            let tokens = Arc::new(VisionTokens::from_f32(&[0.0], 1, 1).expect("1x1"));
            heavy_engine
                .run_heavy(move |b| b.match_text_images("block", &[tokens]))
                .await
        });
        let bulk_engine = engine.clone();
        let bulk = rt.spawn(async move {
            bulk_engine
                .encode_texts(EncodeClass::Bulk, vec!["block".into()])
                .await
        });

        wait_until(|| backend.blocked.load(std::sync::atomic::Ordering::SeqCst) == 2);
        let quick = rt.block_on(engine.encode_texts(EncodeClass::Interactive, vec!["q".into()]));
        assert_eq!(
            quick.expect("interactive encode succeeds"),
            vec![vec![1.0, 1.0]]
        );
        assert!(!heavy.is_finished() && !bulk.is_finished());

        release.send(()).expect("gate is open");
        release.send(()).expect("gate is open");
        let heavy = rt
            .block_on(heavy)
            .expect("task joins")
            .expect("heavy succeeds");
        assert_eq!(heavy.len(), 1);
        rt.block_on(bulk)
            .expect("task joins")
            .expect("bulk succeeds");
    }

    #[test]
    fn full_queue_is_refused_and_abandoned_requests_are_skipped() {
        let (backend, release) = ScriptedBackend::new();
        let engine = Engine::start(backend.clone(), &config()).expect("engine starts");
        let rt = runtime();
        let block = |engine: Engine| async move {
            let tokens = Arc::new(VisionTokens::from_f32(&[0.0], 1, 1).expect("1x1"));
            engine
                .run_heavy(move |b| b.match_text_images("block", &[tokens]))
                .await
        };

        let running = rt.spawn(block(engine.clone()));
        wait_until(|| backend.blocked.load(std::sync::atomic::Ordering::SeqCst) == 1);
        let waiting = rt.spawn(block(engine.clone()));
        wait_until(|| engine.queue_stats()[2].depth == 1);
        let refused = rt.block_on(block(engine.clone()));
        assert!(matches!(
            refused,
            Err(Error::QueueFull {
                queue: "heavy",
                capacity: 1
            })
        ));
        assert_eq!(engine.queue_stats()[2].rejected, 1);

        waiting.abort();
        assert!(
            rt.block_on(waiting).is_err(),
            "the waiting request was cancelled"
        );
        release.send(()).expect("gate is open");
        rt.block_on(running)
            .expect("task joins")
            .expect("first heavy task succeeds");
        wait_until(|| engine.queue_stats()[2].dropped == 1);
        assert_eq!(backend.blocked.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    fn wait_until(condition: impl Fn() -> bool) {
        let start = Instant::now();
        while !condition() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "condition not reached in 10 s"
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn zero_sizes_are_rejected() {
        let (backend, _release) = ScriptedBackend::new();
        let config = EngineConfig {
            max_batch: 0,
            ..EngineConfig::default()
        };
        let error = Engine::start(backend, &config).expect_err("zero batch is invalid");
        assert!(error.to_string().contains("max_batch"), "{error}");
    }
}
