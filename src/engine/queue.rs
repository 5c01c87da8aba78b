//! Request queues and the worker threads that drain them.
//!
//! Encode queues (interactive and bulk) batch requests: a worker takes the first waiting
//! request, then keeps collecting until the batch holds `max_batch` inputs or the batch
//! deadline passes, and runs one model call per input kind. The heavy queue runs one
//! task at a time. Requests whose caller has gone away are skipped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use tokio::sync::oneshot;
use tracing::Span;

use super::backend::{Backend, ImageEncoding, RgbImage};
use crate::{Error, Result};

/// Reply channel of one request.
pub(crate) type Reply<T> = oneshot::Sender<Result<T>>;

/// One encode request: a few inputs of one kind and where to send the vectors.
pub(crate) enum EncodeJob {
    /// Images to encode into ITC vectors and vision tokens.
    Images {
        images: Vec<RgbImage>,
        reply: Reply<Vec<ImageEncoding>>,
        span: Span,
        enqueued: Instant,
    },
    /// Texts to encode into ITC vectors.
    Texts {
        texts: Vec<String>,
        reply: Reply<Vec<Vec<f32>>>,
        span: Span,
        enqueued: Instant,
    },
}

impl EncodeJob {
    fn len(&self) -> usize {
        match self {
            Self::Images { images, .. } => images.len(),
            Self::Texts { texts, .. } => texts.len(),
        }
    }

    fn is_abandoned(&self) -> bool {
        match self {
            Self::Images { reply, .. } => reply.is_closed(),
            Self::Texts { reply, .. } => reply.is_closed(),
        }
    }
}

/// A unit of heavy work (rerank, match, caption, VQA) with its own reply.
pub(crate) trait HeavyTask: Send {
    /// True when nobody waits for the answer any more.
    fn is_abandoned(&self) -> bool;

    /// Runs the work and sends the answer.
    fn run(self: Box<Self>, backend: &dyn Backend);
}

/// A closure run on the heavy thread inside the caller's span.
pub(crate) struct Call<R, F> {
    pub(crate) work: F,
    pub(crate) reply: Reply<R>,
    pub(crate) span: Span,
}

impl<R, F> HeavyTask for Call<R, F>
where
    R: Send,
    F: FnOnce(&dyn Backend) -> Result<R> + Send,
{
    fn is_abandoned(&self) -> bool {
        self.reply.is_closed()
    }

    fn run(self: Box<Self>, backend: &dyn Backend) {
        let _entered = self.span.enter();
        let answer = (self.work)(backend);
        // The caller may have gone away meanwhile; then the answer is simply dropped.
        let _ = self.reply.send(answer);
    }
}

/// Batching limits of an encode worker.
#[derive(Debug, Clone, Copy)]
pub(crate) struct BatchLimits {
    pub(crate) max_batch: usize,
    pub(crate) deadline: Duration,
}

/// Counters shared between a queue's producers and its worker.
#[derive(Debug, Default)]
pub(crate) struct QueueCounters {
    /// Name of the queue, the label of its metrics.
    pub(crate) queue: &'static str,
    pub(crate) dropped: AtomicU64,
    pub(crate) rejected: AtomicU64,
    pub(crate) batches: AtomicU64,
    pub(crate) batched_inputs: AtomicU64,
}

impl QueueCounters {
    /// Publishes the number of requests waiting in the queue.
    pub(crate) fn record_depth(&self, depth: usize) {
        metrics::gauge!(super::QUEUE_DEPTH_METRIC, "queue" => self.queue).set(depth as f64);
    }
}

/// Drains an encode queue until every sender is gone.
pub(crate) fn run_encode_worker(
    rx: Receiver<EncodeJob>,
    backend: Arc<dyn Backend>,
    limits: BatchLimits,
    counters: Arc<QueueCounters>,
) {
    while let Ok(first) = rx.recv() {
        let batch = collect_batch(&rx, first, limits);
        counters.record_depth(rx.len());
        let live = drop_abandoned(batch, &counters);
        if live.is_empty() {
            continue;
        }
        counters.batches.fetch_add(1, Ordering::Relaxed);
        let inputs: usize = live.iter().map(EncodeJob::len).sum();
        counters
            .batched_inputs
            .fetch_add(inputs as u64, Ordering::Relaxed);
        run_batch(live, backend.as_ref());
    }
}

fn collect_batch(
    rx: &Receiver<EncodeJob>,
    first: EncodeJob,
    limits: BatchLimits,
) -> Vec<EncodeJob> {
    let deadline = Instant::now() + limits.deadline;
    let mut size = first.len();
    let mut batch = vec![first];
    while size < limits.max_batch {
        match rx.recv_deadline(deadline) {
            Ok(job) => {
                size += job.len();
                batch.push(job);
            }
            Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
        }
    }
    batch
}

fn drop_abandoned(batch: Vec<EncodeJob>, counters: &QueueCounters) -> Vec<EncodeJob> {
    let before = batch.len();
    let live: Vec<EncodeJob> = batch
        .into_iter()
        .filter(|job| !job.is_abandoned())
        .collect();
    let dropped = (before - live.len()) as u64;
    if dropped > 0 {
        counters.dropped.fetch_add(dropped, Ordering::Relaxed);
        tracing::debug!(dropped, "skipped encode requests whose caller went away");
    }
    live
}

/// Inputs of one request, its reply, its span and when it was queued.
type Job<I, O> = (Vec<I>, Reply<Vec<O>>, Span, Instant);
type ImageJob = Job<RgbImage, ImageEncoding>;
type TextJob = Job<String, Vec<f32>>;

fn run_batch(batch: Vec<EncodeJob>, backend: &dyn Backend) {
    let mut image_jobs: Vec<ImageJob> = Vec::new();
    let mut text_jobs: Vec<TextJob> = Vec::new();
    for job in batch {
        match job {
            EncodeJob::Images {
                images,
                reply,
                span,
                enqueued,
            } => image_jobs.push((images, reply, span, enqueued)),
            EncodeJob::Texts {
                texts,
                reply,
                span,
                enqueued,
            } => text_jobs.push((texts, reply, span, enqueued)),
        }
    }

    if !image_jobs.is_empty() {
        run_grouped(image_jobs, |images| backend.encode_images(images));
    }
    if !text_jobs.is_empty() {
        run_grouped(text_jobs, |texts| backend.encode_texts(texts));
    }
}

/// Runs all jobs of one kind as a single model call and splits the outputs back. When
/// the joint call fails, each job is retried alone so that it gets its own error.
fn run_grouped<I, O>(jobs: Vec<Job<I, O>>, encode: impl Fn(&[I]) -> Result<Vec<O>>) {
    for (inputs, _, span, enqueued) in &jobs {
        span.in_scope(|| {
            let waited_ms = enqueued.elapsed().as_secs_f64() * 1e3;
            tracing::debug!(
                inputs = inputs.len(),
                waited_ms,
                batch_jobs = jobs.len(),
                "encoding"
            );
        });
    }

    let sizes: Vec<usize> = jobs.iter().map(|(inputs, ..)| inputs.len()).collect();
    let joined: Vec<I> = Vec::new();
    let (joined, replies) = jobs.into_iter().fold(
        (joined, Vec::new()),
        |(mut joined, mut replies), (inputs, reply, ..)| {
            joined.extend(inputs);
            replies.push(reply);
            (joined, replies)
        },
    );

    match encode(&joined) {
        Ok(outputs) if outputs.len() == joined.len() => split_outputs(outputs, &sizes, replies),
        Ok(outputs) => {
            let error = Error::Candle(candle_core::Error::Msg(format!(
                "model returned {} outputs for {} inputs",
                outputs.len(),
                joined.len()
            )));
            send_each(replies, &error);
        }
        Err(_) if replies.len() > 1 => retry_alone(joined, &sizes, replies, &encode),
        Err(error) => send_each(replies, &error),
    }
}

fn split_outputs<O>(outputs: Vec<O>, sizes: &[usize], replies: Vec<Reply<Vec<O>>>) {
    let mut outputs = outputs.into_iter();
    for (size, reply) in sizes.iter().zip(replies) {
        let part: Vec<O> = outputs.by_ref().take(*size).collect();
        let _ = reply.send(Ok(part));
    }
}

fn retry_alone<I, O>(
    joined: Vec<I>,
    sizes: &[usize],
    replies: Vec<Reply<Vec<O>>>,
    encode: &impl Fn(&[I]) -> Result<Vec<O>>,
) {
    let mut inputs = joined.into_iter();
    for (size, reply) in sizes.iter().zip(replies) {
        let part: Vec<I> = inputs.by_ref().take(*size).collect();
        let _ = reply.send(encode(&part));
    }
}

fn send_each<O>(replies: Vec<Reply<O>>, error: &Error) {
    for reply in replies {
        let copy = Error::Candle(candle_core::Error::Msg(error.to_string()));
        let _ = reply.send(Err(copy));
    }
}

/// Drains the heavy queue until every sender is gone.
pub(crate) fn run_heavy_worker(
    rx: Receiver<Box<dyn HeavyTask>>,
    backend: Arc<dyn Backend>,
    counters: Arc<QueueCounters>,
) {
    while let Ok(task) = rx.recv() {
        counters.record_depth(rx.len());
        if task.is_abandoned() {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            tracing::debug!("skipped a heavy request whose caller went away");
            continue;
        }
        task.run(backend.as_ref());
    }
}
