//! The durable side of a collection: one sled tree holding items, vectors, payloads, the
//! hash index and the collection's counters, under distinct key prefixes so that a whole
//! write batch is applied atomically.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::types::{ItemKind, Settings};
use crate::vector;

/// Directory of the sled database inside the collection directory.
pub(crate) const SLED_DIR: &str = "items.sled";

const KEY_SETTINGS: &[u8] = b"m/settings";
const KEY_EPOCH: &[u8] = b"m/epoch";
const KEY_NEXT_SLOT: &[u8] = b"m/next_slot";
const PREFIX_RECORD: u8 = b'i';
const PREFIX_VECTOR: u8 = b'v';
const PREFIX_PAYLOAD: u8 = b'p';
const PREFIX_HASH: u8 = b'h';

/// Everything about an item except its vector and payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct Record {
    /// Graph node holding the item's current vector.
    pub slot: u64,
    /// What the vector was embedded from.
    pub kind: ItemKind,
    /// Hash of the source content.
    pub content_hash: [u8; 32],
    /// Filterable attributes.
    pub metadata: BTreeMap<String, String>,
    /// Whether a payload is stored.
    pub has_payload: bool,
}

/// Handle on the sled database of one collection.
pub(crate) struct Store {
    db: sled::Db,
    path: PathBuf,
}

fn key(prefix: u8, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 1);
    key.push(prefix);
    key.extend_from_slice(id.as_bytes());
    key
}

fn hash_key(hash: &[u8; 32], id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(id.len() + 33);
    key.push(PREFIX_HASH);
    key.extend_from_slice(hash);
    key.extend_from_slice(id.as_bytes());
    key
}

fn read_u64(bytes: Option<sled::IVec>) -> u64 {
    bytes
        .and_then(|b| <[u8; 8]>::try_from(b.as_ref()).ok())
        .map_or(0, u64::from_be_bytes)
}

impl Store {
    /// Opens (creating if needed) the database under `dir`. The database's file lock is
    /// retried for up to [`LOCK_WAIT`]: a handle of the same collection that this process
    /// just dropped releases it only once the store's background writers have finished.
    /// A lock held longer (another process serving the collection) is an error.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join(SLED_DIR);
        let started = std::time::Instant::now();
        loop {
            let config = sled::Config::new()
                .path(&path)
                .mode(sled::Mode::HighThroughput);
            match config.open() {
                Ok(db) => return Ok(Self { db, path }),
                Err(e) if is_lock_held(&e) && started.elapsed() < LOCK_WAIT => {
                    std::thread::sleep(LOCK_RETRY);
                }
                Err(e) => return Err(Error::storage(&path, e)),
            }
        }
    }

    fn fail(&self, cause: impl std::fmt::Display) -> Error {
        Error::storage(&self.path, cause)
    }

    /// Records `requested` on first open; afterwards refuses a different dimension, metric
    /// or model id and stores the (possibly changed) graph parameters.
    pub fn reconcile_settings(&self, requested: &Settings) -> Result<()> {
        let stored = self.db.get(KEY_SETTINGS).map_err(|e| self.fail(e))?;
        if let Some(bytes) = stored {
            let stored: Settings = serde_json::from_slice(&bytes)
                .map_err(|e| self.fail(format!("stored settings are unreadable: {e}")))?;
            check_identity(&stored, requested)?;
            if stored == *requested {
                return Ok(());
            }
        }

        let json = serde_json::to_vec(requested).map_err(|e| self.fail(e))?;
        self.db
            .insert(KEY_SETTINGS, json)
            .map_err(|e| self.fail(e))?;
        self.flush()
    }

    /// Write epoch of the last applied batch (0 for a new collection).
    pub fn epoch(&self) -> Result<u64> {
        Ok(read_u64(self.db.get(KEY_EPOCH).map_err(|e| self.fail(e))?))
    }

    /// First slot never handed out.
    pub fn next_slot(&self) -> Result<u64> {
        Ok(read_u64(
            self.db.get(KEY_NEXT_SLOT).map_err(|e| self.fail(e))?,
        ))
    }

    /// The record of a live item.
    pub fn record(&self, id: &str) -> Result<Option<Record>> {
        let bytes = self
            .db
            .get(key(PREFIX_RECORD, id))
            .map_err(|e| self.fail(e))?;
        bytes.map(|b| self.decode_record(id, &b)).transpose()
    }

    fn decode_record(&self, id: &str, bytes: &[u8]) -> Result<Record> {
        bincode::deserialize(bytes).map_err(|e| self.fail(format!("record {id:?}: {e}")))
    }

    /// The stored vector of a live item.
    pub fn vector(&self, id: &str, dimension: usize) -> Result<Option<Vec<f32>>> {
        let bytes = self
            .db
            .get(key(PREFIX_VECTOR, id))
            .map_err(|e| self.fail(e))?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        vector::from_bytes(&bytes, dimension)
            .map(Some)
            .ok_or_else(|| self.fail(format!("vector of {id:?} has {} bytes", bytes.len())))
    }

    /// The stored payload of a live item.
    pub fn payload(&self, id: &str) -> Result<Option<Vec<u8>>> {
        let bytes = self
            .db
            .get(key(PREFIX_PAYLOAD, id))
            .map_err(|e| self.fail(e))?;
        Ok(bytes.map(|b| b.to_vec()))
    }

    /// Ids of live items whose content hash is `hash`, in id order.
    pub fn ids_with_hash(&self, hash: &[u8; 32]) -> Result<Vec<String>> {
        let mut prefix = vec![PREFIX_HASH];
        prefix.extend_from_slice(hash);
        let mut ids = Vec::new();
        for entry in self.db.scan_prefix(&prefix).keys() {
            let key = entry.map_err(|e| self.fail(e))?;
            ids.push(String::from_utf8_lossy(&key[prefix.len()..]).into_owned());
        }
        Ok(ids)
    }

    /// Every live item's id and record, in id order. A record that cannot be decoded is
    /// reported and skipped so that one damaged entry never prevents opening.
    pub fn records(&self) -> impl Iterator<Item = Result<(String, Record)>> + '_ {
        self.db
            .scan_prefix([PREFIX_RECORD])
            .filter_map(move |entry| {
                let (key, value) = match entry {
                    Ok(kv) => kv,
                    Err(e) => return Some(Err(self.fail(e))),
                };
                let id = String::from_utf8_lossy(&key[1..]).into_owned();
                match self.decode_record(&id, &value) {
                    Ok(record) => Some(Ok((id, record))),
                    Err(e) => {
                        tracing::error!(error = %e, "skipping damaged item record");
                        None
                    }
                }
            })
    }

    /// Applies a batch atomically, recording `epoch` as the new write epoch, and flushes it
    /// to disk before returning.
    pub fn commit(&self, batch: WriteBatch, epoch: u64) -> Result<()> {
        let mut batch = batch.batch;
        batch.insert(KEY_EPOCH, &epoch.to_be_bytes());
        self.db.apply_batch(batch).map_err(|e| self.fail(e))?;
        self.flush()
    }

    /// Flushes every pending write to disk.
    pub fn flush(&self) -> Result<()> {
        self.db.flush().map(|_| ()).map_err(|e| self.fail(e))
    }
}

fn check_identity(stored: &Settings, requested: &Settings) -> Result<()> {
    let mismatch = |field, stored: String, requested: String| Error::SettingsMismatch {
        field,
        stored,
        requested,
    };
    if stored.dimension != requested.dimension {
        let (s, r) = (
            stored.dimension.to_string(),
            requested.dimension.to_string(),
        );
        return Err(mismatch("dimension", s, r));
    }
    if stored.metric != requested.metric {
        let (s, r) = (
            format!("{:?}", stored.metric),
            format!("{:?}", requested.metric),
        );
        return Err(mismatch("metric", s, r));
    }
    if stored.model_id != requested.model_id {
        let (s, r) = (stored.model_id.clone(), requested.model_id.clone());
        return Err(mismatch("model_id", s, r));
    }
    Ok(())
}

/// Writes collected for one atomic commit.
#[derive(Default)]
pub(crate) struct WriteBatch {
    batch: sled::Batch,
}

/// One item to write.
pub(crate) struct ItemWrite<'a> {
    /// Item id.
    pub id: &'a str,
    /// New record.
    pub record: &'a Record,
    /// Prepared vector.
    pub vector: &'a [f32],
    /// Payload to store, if any.
    pub payload: Option<&'a [u8]>,
    /// Record being replaced, if any.
    pub previous: Option<&'a Record>,
}

impl WriteBatch {
    /// Stores an item, replacing the hash entry and payload of its previous version.
    pub fn put(&mut self, write: &ItemWrite<'_>) -> Result<()> {
        if let Some(previous) = write.previous {
            self.batch
                .remove(hash_key(&previous.content_hash, write.id));
        }
        let record = bincode::serialize(write.record)
            .map_err(|e| Error::storage(SLED_DIR, format!("encoding {:?}: {e}", write.id)))?;
        self.batch.insert(key(PREFIX_RECORD, write.id), record);
        self.batch
            .insert(key(PREFIX_VECTOR, write.id), vector::to_bytes(write.vector));
        self.batch
            .insert(hash_key(&write.record.content_hash, write.id), &[]);

        match write.payload {
            Some(bytes) => self.batch.insert(key(PREFIX_PAYLOAD, write.id), bytes),
            None => self.batch.remove(key(PREFIX_PAYLOAD, write.id)),
        }
        Ok(())
    }

    /// Removes every entry of an item.
    pub fn remove(&mut self, id: &str, record: &Record) {
        self.batch.remove(key(PREFIX_RECORD, id));
        self.batch.remove(key(PREFIX_VECTOR, id));
        self.batch.remove(key(PREFIX_PAYLOAD, id));
        self.batch.remove(hash_key(&record.content_hash, id));
    }

    /// Records the first slot not yet handed out.
    pub fn set_next_slot(&mut self, next_slot: u64) {
        self.batch.insert(KEY_NEXT_SLOT, &next_slot.to_be_bytes());
    }
}

/// How long an open waits for the database's file lock.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
/// Pause between attempts to take the lock.
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether sled failed because another handle holds the database's file lock (sled reports
/// it only through the message of an `Other` I/O error).
fn is_lock_held(error: &sled::Error) -> bool {
    matches!(error, sled::Error::Io(io) if io.to_string().starts_with("could not acquire lock"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_waits_for_a_handle_that_is_being_dropped() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = Store::open(dir.path()).expect("first open");
        let closing = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            drop(first);
        });

        let second = Store::open(dir.path());
        closing.join().expect("closing thread joins");
        assert!(second.is_ok(), "the lock was taken once released");
    }

    #[test]
    fn a_lock_held_past_the_wait_is_an_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let _held = Store::open(dir.path()).expect("first open");
        let Err(error) = Store::open(dir.path()) else {
            panic!("a second open while the first is held must fail");
        };
        assert!(
            error.to_string().contains("could not acquire lock"),
            "{error}"
        );
    }
}
