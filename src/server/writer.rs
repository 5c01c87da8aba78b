//! Group commit for the collection: upserts that arrive while a batch is being written are
//! collected into the next batch, so concurrent writers (the items of an ingest stream, or
//! several streams) share one durable flush instead of paying one each.
//!
//! Every caller is answered only after the batch holding its item is durable. A batch that
//! the collection refuses as a whole is retried item by item, so one bad item never fails
//! the others.

use std::sync::Arc;

use mplug_index::{Collection, Item, UpsertOutcome};
use tokio::sync::{mpsc, oneshot};

use crate::{Error, Result};

/// Histogram of the items per group commit.
pub const COMMIT_ITEMS_METRIC: &str = "mplug_search_commit_batch_items";

/// An item waiting for its batch, and where to send its outcome.
struct Pending {
    item: Item,
    done: oneshot::Sender<Result<UpsertOutcome>>,
}

/// Handle of the writer thread; cheap to clone. The thread ends when every handle is dropped,
/// after answering what was already queued.
#[derive(Clone)]
pub struct Writer {
    sender: mpsc::Sender<Pending>,
}

impl Writer {
    /// Starts the writer thread over `collection`; a batch holds at most `max_batch` items
    /// (at least 1) and up to `max_batch` more may wait in its queue.
    ///
    /// # Errors
    /// [`Error::TaskFailed`] when the thread cannot be spawned.
    pub fn start(collection: Arc<Collection>, max_batch: usize) -> Result<Self> {
        let max_batch = max_batch.max(1);
        let (sender, receiver) = mpsc::channel(max_batch);
        std::thread::Builder::new()
            .name("mplug-writer".into())
            .spawn(move || run(&collection, receiver, max_batch))
            .map_err(|error| Error::TaskFailed {
                task: "writer",
                reason: error.to_string(),
            })?;
        Ok(Self { sender })
    }

    /// Stores `item` with the next group commit and returns once it is durable.
    ///
    /// # Errors
    /// The collection's error for this item, or [`Error::TaskFailed`] when the writer thread
    /// is gone.
    pub async fn upsert(&self, item: Item) -> Result<UpsertOutcome> {
        let (done, outcome) = oneshot::channel();
        self.sender
            .send(Pending { item, done })
            .await
            .map_err(|_| writer_gone())?;
        outcome.await.map_err(|_| writer_gone())?
    }
}

fn writer_gone() -> Error {
    Error::TaskFailed {
        task: "writer",
        reason: "the writer thread stopped".into(),
    }
}

/// Blocks for the first item, takes whatever else is already queued, commits, repeats.
fn run(collection: &Collection, mut receiver: mpsc::Receiver<Pending>, max_batch: usize) {
    while let Some(first) = receiver.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < max_batch {
            match receiver.try_recv() {
                Ok(pending) => batch.push(pending),
                Err(_) => break,
            }
        }
        metrics::histogram!(COMMIT_ITEMS_METRIC).record(batch.len() as f64);
        commit(collection, batch);
    }
}

/// Writes `batch` as one atomic upsert, or item by item when the batch as a whole fails.
fn commit(collection: &Collection, batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Pending { item, done } = batch.into_iter().next().expect("batch holds one item");
        let _ = done.send(upsert_one(collection, item));
        return;
    }

    let items = batch.iter().map(|pending| pending.item.clone()).collect();
    match collection.upsert(items) {
        Ok(outcomes) => {
            for (pending, outcome) in batch.into_iter().zip(outcomes) {
                let _ = pending.done.send(Ok(outcome));
            }
        }
        Err(error) => {
            let items = batch.len();
            tracing::warn!(%error, items, "group commit failed; writing items one by one");
            for Pending { item, done } in batch {
                let _ = done.send(upsert_one(collection, item));
            }
        }
    }
}

fn upsert_one(collection: &Collection, item: Item) -> Result<UpsertOutcome> {
    let outcomes = collection.upsert(vec![item])?;
    outcomes
        .into_iter()
        .next()
        .ok_or_else(|| Error::TaskFailed {
            task: "writer",
            reason: "the collection returned no outcome for an item".into(),
        })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::Path;

    use mplug_index::{HnswParams, ItemKind, Metric, Settings};

    use super::*;

    fn item(id: &str, vector: Vec<f32>) -> Item {
        Item {
            id: id.into(),
            kind: ItemKind::Text,
            vector,
            metadata: BTreeMap::new(),
            content_hash: [id.len() as u8; 32],
            payload: Some(id.as_bytes().to_vec()),
        }
    }

    fn open(dir: &Path) -> Arc<Collection> {
        let settings = Settings {
            dimension: 4,
            metric: Metric::Cosine,
            hnsw: HnswParams::default(),
            model_id: "writer-test".into(),
        };
        Arc::new(Collection::open(dir, settings).expect("collection opens"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_upserts_are_all_durable_and_a_bad_item_fails_alone() {
        let dir = tempfile::tempdir().expect("temp dir");
        let collection = open(dir.path());
        let writer = Writer::start(collection.clone(), 16).expect("writer starts");

        let mut tasks = Vec::new();
        for i in 0..64_u8 {
            let writer = writer.clone();
            let vector = if i == 13 {
                vec![0.0; 4]
            } else {
                vec![1.0, f32::from(i), 0.5, -1.0]
            };
            tasks.push(tokio::spawn(async move {
                writer.upsert(item(&format!("item-{i}"), vector)).await
            }));
        }
        for (i, task) in tasks.into_iter().enumerate() {
            let outcome = task.await.expect("task joins");
            if i == 13 {
                assert!(outcome.is_err(), "a zero vector is refused");
            } else {
                assert_eq!(outcome.expect("stored"), UpsertOutcome::Inserted);
            }
        }

        assert_eq!(collection.stats().expect("stats").texts, 63);
        assert!(collection.get("item-13").expect("get").is_none());
        assert!(collection.get("item-63").expect("get").is_some());
    }

    #[test]
    fn a_failed_batch_is_retried_item_by_item() {
        let dir = tempfile::tempdir().expect("temp dir");
        let collection = open(dir.path());
        let mut outcomes = Vec::new();
        let batch = [("good-a", 1.0), ("bad", 0.0), ("good-b", 2.0)]
            .into_iter()
            .map(|(id, x)| {
                let (done, outcome) = oneshot::channel();
                outcomes.push(outcome);
                Pending {
                    item: item(id, vec![x, x, 0.0, 0.0]),
                    done,
                }
            })
            .collect();

        commit(&collection, batch);

        let got: Vec<bool> = outcomes
            .into_iter()
            .map(|mut outcome| outcome.try_recv().expect("answered").is_ok())
            .collect();
        assert_eq!(got, [true, false, true]);
        assert_eq!(collection.stats().expect("stats").texts, 2);
    }
}
