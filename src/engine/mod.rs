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
pub use cache::{CacheStats, FeatureCache};
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
    /// How long an encode worker waits for more requests before closing a batch.
    pub batch_deadline: Duration,
    /// Byte budget of the rerank feature cache.
    pub cache_bytes: usize,
}

impl Default for EngineConfig {
    /// One thread per class (the reference machine has two cores), queues of 64/256/32,
    /// batches of 16 inputs or 5 ms, a 512 MiB cache.
    fn default() -> Self {
        Self {
            interactive_queue: 64,
            bulk_queue: 256,
            heavy_queue: 32,
            interactive_threads: 1,
            heavy_threads: 1,
            max_batch: 16,
            batch_deadline: Duration::from_millis(5),
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
        metrics::gauge!(QUEUE_DEPTH_METRIC, "queue" => self.name).set(self.sender.len() as f64);
        sent.map_err(|error| match error {
            TrySendError::Full(_) => Error::QueueFull {
                queue: self.name,
                capacity: self.capacity,
            },
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
            batches: self.counters.batches.load(Relaxed),
            batched_inputs: self.counters.batched_inputs.load(Relaxed),
        }
    }
}

/// Gauge of requests waiting per queue (label `queue`).
pub const QUEUE_DEPTH_METRIC: &str = "mplug_search_engine_queue_depth";

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
            deadline: config.batch_deadline,
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
        let run = move || queue::run_encode_worker(rx, worker_backend, limits, counters);
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
        counters: Arc::new(QueueCounters::default()),
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
