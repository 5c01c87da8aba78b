//! The durable side of a collection: one sled tree holding items, vectors, payloads, the
//! hash index and the collection's counters, under distinct key prefixes so that a whole
//! write batch is applied atomically.
//!
//! Every key written costs sled a descent, a copy of the leaf it lands in and, as leaves
//! fill, splits that rewrite the parent, so a collection created by this version keeps an
//! item's record and vector in one entry ([`Layout::Joined`]). Collections created before
//! keep them under two keys ([`Layout::Split`]) and are read and written that way.

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
const KEY_LAYOUT: &[u8] = b"m/layout";
const KEY_COLLECTION_ID: &[u8] = b"m/collection_id";
const KEY_LIVE_DIGEST: &[u8] = b"m/live_digest";
const KEY_LINEAGE: &[u8] = b"m/lineage";
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

/// Where an item's record and vector are kept, fixed when the collection is created.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// Record under `i` + id, vector under `v` + id: collections created before the joined
    /// layout existed, recognised by having data but no `m/layout` key.
    Split,
    /// One entry under `i` + id: the bincode record followed by the vector's little-endian
    /// bytes. Recorded as `m/layout` = 2.
    Joined,
}

impl Layout {
    /// Number stored under `m/layout`; the split layout predates the key and is never
    /// written.
    const JOINED_CODE: u64 = 2;
}

/// Handle on the sled database of one collection.
pub(crate) struct Store {
    db: sled::Db,
    path: PathBuf,
    layout: Layout,
    collection_id: String,
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

/// Appends a vector's bytes as [`vector::to_bytes`] encodes them.
fn append_vector(out: &mut Vec<u8>, vector: &[f32]) {
    out.extend(vector.iter().flat_map(|x| x.to_le_bytes()));
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
                Ok(db) => {
                    let layout = settle_layout(&db).map_err(|e| Error::storage(&path, e))?;
                    let collection_id =
                        settle_collection_id(&db, &path).map_err(|e| Error::storage(&path, e))?;
                    return Ok(Self {
                        db,
                        path,
                        layout,
                        collection_id,
                    });
                }
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

    /// A random id given to the collection when it is first opened (or first opened by a
    /// version that knows ids); graph dumps record it, so a dump of another collection is
    /// never taken for this one's.
    pub fn collection_id(&self) -> &str {
        &self.collection_id
    }

    /// How this collection lays out its items.
    #[cfg(test)]
    fn layout(&self) -> Layout {
        self.layout
    }

    /// An empty batch for this store's layout.
    pub fn batch(&self) -> WriteBatch {
        WriteBatch {
            batch: sled::Batch::default(),
            layout: self.layout,
        }
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

    /// The digest of the live items (see [`item_digest`]) as written with the last batch;
    /// `None` for a collection that has not recorded one yet.
    pub fn live_digest(&self) -> Result<Option<u128>> {
        self.read_u128(KEY_LIVE_DIGEST)
    }

    /// The lineage of the writes (see [`next_lineage`]) as written with the last batch;
    /// `None` for a collection that has not recorded one yet.
    pub fn lineage(&self) -> Result<Option<u128>> {
        self.read_u128(KEY_LINEAGE)
    }

    /// Starts a new lineage after the current one (see [`next_lineage`]) and records it, so
    /// that no dump written before is taken for the state from here on.
    pub fn renew_lineage(&self, epoch: u64) -> Result<u128> {
        let lineage = next_lineage(self.lineage()?.unwrap_or(0), epoch, &self.path);
        self.db
            .insert(KEY_LINEAGE, &lineage.to_be_bytes())
            .map_err(|e| self.fail(e))?;
        Ok(lineage)
    }

    fn read_u128(&self, key: &[u8]) -> Result<Option<u128>> {
        let bytes = self.db.get(key).map_err(|e| self.fail(e))?;
        Ok(bytes
            .and_then(|b| <[u8; 16]>::try_from(b.as_ref()).ok())
            .map(u128::from_be_bytes))
    }

    /// Records the digest of the live items found by a full scan of the records.
    pub fn set_live_digest(&self, digest: u128) -> Result<()> {
        self.db
            .insert(KEY_LIVE_DIGEST, &digest.to_be_bytes())
            .map_err(|e| self.fail(e))?;
        Ok(())
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

    /// Decodes a record; in the joined layout the vector bytes that follow it are left
    /// unread.
    fn decode_record(&self, id: &str, bytes: &[u8]) -> Result<Record> {
        bincode::deserialize(bytes).map_err(|e| self.fail(format!("record {id:?}: {e}")))
    }

    /// The stored vector of a live item.
    pub fn vector(&self, id: &str, dimension: usize) -> Result<Option<Vec<f32>>> {
        match self.layout {
            Layout::Split => self.split_vector(id, dimension),
            Layout::Joined => Ok(self.entry(id, dimension)?.and_then(|(_, vector)| vector)),
        }
    }

    /// The record of an item and its vector (`None` when the vector is missing), read in
    /// one lookup where the layout keeps them together.
    pub fn entry(&self, id: &str, dimension: usize) -> Result<Option<(Record, Option<Vec<f32>>)>> {
        if self.layout == Layout::Split {
            let Some(record) = self.record(id)? else {
                return Ok(None);
            };
            return Ok(Some((record, self.split_vector(id, dimension)?)));
        }
        let bytes = self
            .db
            .get(key(PREFIX_RECORD, id))
            .map_err(|e| self.fail(e))?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        let mut rest: &[u8] = &bytes;
        let record = bincode::deserialize_from::<_, Record>(&mut rest)
            .map_err(|e| self.fail(format!("record {id:?}: {e}")))?;
        let vector = self.decode_vector(id, rest, dimension)?;
        Ok(Some((record, Some(vector))))
    }

    fn split_vector(&self, id: &str, dimension: usize) -> Result<Option<Vec<f32>>> {
        let bytes = self
            .db
            .get(key(PREFIX_VECTOR, id))
            .map_err(|e| self.fail(e))?;
        bytes
            .map(|b| self.decode_vector(id, &b, dimension))
            .transpose()
    }

    fn decode_vector(&self, id: &str, bytes: &[u8], dimension: usize) -> Result<Vec<f32>> {
        vector::from_bytes(bytes, dimension)
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

/// Reads the layout of an existing database, or records the joined layout in a new, empty
/// one (flushed, so it is durable before any item is written). A layout number this
/// version does not know is refused.
fn settle_layout(db: &sled::Db) -> std::result::Result<Layout, String> {
    let stored = db.get(KEY_LAYOUT).map_err(|e| e.to_string())?;
    match stored {
        Some(bytes) => match read_u64(Some(bytes)) {
            Layout::JOINED_CODE => Ok(Layout::Joined),
            other => Err(format!(
                "unknown item layout {other} under m/layout; this version reads the split \
                 layout (no m/layout key) and layout {}",
                Layout::JOINED_CODE
            )),
        },
        None if db.is_empty() => {
            let code = Layout::JOINED_CODE.to_be_bytes();
            db.insert(KEY_LAYOUT, &code).map_err(|e| e.to_string())?;
            db.flush().map_err(|e| e.to_string())?;
            Ok(Layout::Joined)
        }
        None => Ok(Layout::Split),
    }
}

/// Reads the collection's id, or draws one and records it (flushed). Run after
/// [`settle_layout`], which tells a new database by its emptiness.
fn settle_collection_id(db: &sled::Db, path: &Path) -> std::result::Result<String, String> {
    if let Some(bytes) = db.get(KEY_COLLECTION_ID).map_err(|e| e.to_string())? {
        return String::from_utf8(bytes.to_vec()).map_err(|e| format!("collection id: {e}"));
    }
    let id = format!("{:032x}", unique_hash(&[], path));
    db.insert(KEY_COLLECTION_ID, id.as_bytes())
        .map_err(|e| e.to_string())?;
    db.flush().map_err(|e| e.to_string())?;
    Ok(id)
}

/// Writes collected for one atomic commit, encoded for the store's layout.
pub(crate) struct WriteBatch {
    batch: sled::Batch,
    layout: Layout,
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
    /// Stores an item, replacing the hash entry and payload of its previous version. A
    /// payload key exists exactly when the record says `has_payload`, so an item whose
    /// previous version had none (or that is new) needs no payload removal.
    pub fn put(&mut self, write: &ItemWrite<'_>) -> Result<()> {
        let id = write.id;
        if let Some(previous) = write.previous {
            if previous.content_hash != write.record.content_hash {
                self.batch.remove(hash_key(&previous.content_hash, id));
            }
        }
        let mut record = Vec::with_capacity(64 + write.vector.len() * 4);
        bincode::serialize_into(&mut record, write.record)
            .map_err(|e| Error::storage(SLED_DIR, format!("encoding {id:?}: {e}")))?;
        match self.layout {
            Layout::Split => {
                let vector = vector::to_bytes(write.vector);
                self.batch.insert(key(PREFIX_VECTOR, id), vector);
            }
            Layout::Joined => append_vector(&mut record, write.vector),
        }
        self.batch.insert(key(PREFIX_RECORD, id), record);
        self.batch
            .insert(hash_key(&write.record.content_hash, id), &[]);

        let had_payload = write.previous.is_some_and(|p| p.has_payload);
        match write.payload {
            Some(bytes) => self.batch.insert(key(PREFIX_PAYLOAD, id), bytes),
            None if had_payload => self.batch.remove(key(PREFIX_PAYLOAD, id)),
            None => {}
        }
        Ok(())
    }

    /// Removes every entry of an item.
    pub fn remove(&mut self, id: &str, record: &Record) {
        self.batch.remove(key(PREFIX_RECORD, id));
        if self.layout == Layout::Split {
            self.batch.remove(key(PREFIX_VECTOR, id));
        }
        self.batch.remove(key(PREFIX_PAYLOAD, id));
        self.batch.remove(hash_key(&record.content_hash, id));
    }

    /// Records the first slot not yet handed out.
    pub fn set_next_slot(&mut self, next_slot: u64) {
        self.batch.insert(KEY_NEXT_SLOT, &next_slot.to_be_bytes());
    }

    /// Records the digest of the live items once this batch is applied.
    pub fn set_live_digest(&mut self, digest: u128) {
        self.batch.insert(KEY_LIVE_DIGEST, &digest.to_be_bytes());
    }

    /// Records the lineage of the writes once this batch is applied.
    pub fn set_lineage(&mut self, lineage: u128) {
        self.batch.insert(KEY_LINEAGE, &lineage.to_be_bytes());
    }
}

/// One live item's share of the live-set digest: the digest of a set of items is the XOR
/// of their shares, so a write updates it in constant time and any renamed, added, missing
/// or moved item changes it.
pub fn item_digest(slot: u64, id: &str) -> u128 {
    xxhash_rust::xxh3::xxh3_128_with_seed(id.as_bytes(), slot)
}

/// The lineage after one more write batch: a hash of the previous lineage, the batch's
/// epoch, the time, the process and the store's path. Two copies of a collection that each
/// take writes get different lineages even at equal epochs, so a dump of one is never taken
/// for the state of the other.
pub fn next_lineage(previous: u128, epoch: u64, path: &Path) -> u128 {
    let mut seed = previous.to_be_bytes().to_vec();
    seed.extend_from_slice(&epoch.to_be_bytes());
    unique_hash(&seed, path)
}

/// A 128-bit hash of `seed`, the time, the process id and `path`: a value no other store,
/// process or moment draws.
fn unique_hash(seed: &[u8], path: &Path) -> u128 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut bytes = seed.to_vec();
    bytes.extend_from_slice(&nanos.to_be_bytes());
    bytes.extend_from_slice(&std::process::id().to_be_bytes());
    bytes.extend_from_slice(path.as_os_str().as_encoded_bytes());
    xxhash_rust::xxh3::xxh3_128(&bytes)
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
pub(crate) mod tests {
    use super::*;

    fn record(slot: u64, hash: u8, has_payload: bool) -> Record {
        Record {
            slot,
            kind: ItemKind::Text,
            content_hash: [hash; 32],
            metadata: BTreeMap::from([("album".to_string(), "x".to_string())]),
            has_payload,
        }
    }

    fn put(store: &Store, id: &str, new: &Record, vector: &[f32], previous: Option<&Record>) {
        let payload = new.has_payload.then_some(&b"bytes"[..]);
        let mut batch = store.batch();
        let write = ItemWrite {
            id,
            record: new,
            vector,
            payload,
            previous,
        };
        batch.put(&write).expect("record encodes");
        store.commit(batch, new.slot + 1).expect("commit");
    }

    /// Writes one item the way collections created before the joined layout hold it.
    pub(crate) fn write_split_item(db: &sled::Db, id: &str, record: &Record, vector: &[f32]) {
        let encoded = bincode::serialize(record).expect("record encodes");
        db.insert(key(PREFIX_RECORD, id), encoded).expect("insert");
        db.insert(key(PREFIX_VECTOR, id), vector::to_bytes(vector))
            .expect("insert");
        db.insert(hash_key(&record.content_hash, id), &[])
            .expect("insert");
        db.insert(KEY_EPOCH, &1u64.to_be_bytes()).expect("insert");
        db.flush().expect("flush");
    }

    #[test]
    fn a_new_store_joins_record_and_vector_under_one_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.layout(), Layout::Joined);
        let new = record(0, 1, false);
        put(&store, "a", &new, &[1.0, -2.5, 3.0], None);

        assert_eq!(store.record("a").expect("read"), Some(new.clone()));
        assert_eq!(
            store.vector("a", 3).expect("read"),
            Some(vec![1.0, -2.5, 3.0])
        );
        assert!(
            store.vector("a", 4).is_err(),
            "a wrong dimension is reported"
        );
        let raw = store.db.get(key(PREFIX_VECTOR, "a")).expect("read");
        assert_eq!(raw, None, "no separate vector key");
        let records: Vec<_> = store.records().map(|r| r.expect("record")).collect();
        assert_eq!(records, vec![("a".to_string(), new)]);
        drop(store);

        let reopened = Store::open(dir.path()).expect("reopen");
        assert_eq!(reopened.layout(), Layout::Joined);
        assert_eq!(
            reopened.vector("a", 3).expect("read"),
            Some(vec![1.0, -2.5, 3.0])
        );
    }

    #[test]
    fn a_store_written_with_split_keys_is_read_and_written_that_way() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path().join(SLED_DIR)).expect("raw open");
        let old = record(0, 1, false);
        write_split_item(&db, "a", &old, &[0.5, 0.25]);
        drop(db);

        let store = Store::open(dir.path()).expect("open");
        assert_eq!(store.layout(), Layout::Split);
        assert_eq!(store.record("a").expect("read"), Some(old.clone()));
        assert_eq!(store.vector("a", 2).expect("read"), Some(vec![0.5, 0.25]));

        let new = record(1, 2, false);
        put(&store, "a", &new, &[2.0, 4.0], Some(&old));
        put(&store, "b", &record(2, 3, false), &[1.0, 1.0], None);
        assert_eq!(store.vector("a", 2).expect("read"), Some(vec![2.0, 4.0]));
        let raw = store.db.get(key(PREFIX_VECTOR, "b")).expect("read");
        assert_eq!(raw.as_deref(), Some(&vector::to_bytes(&[1.0, 1.0])[..]));
        assert_eq!(
            store.ids_with_hash(&[1; 32]).expect("scan"),
            Vec::<String>::new()
        );
        assert_eq!(store.ids_with_hash(&[2; 32]).expect("scan"), vec!["a"]);

        let mut batch = store.batch();
        batch.remove("b", &record(2, 3, false));
        store.commit(batch, 9).expect("commit");
        let raw = store.db.get(key(PREFIX_VECTOR, "b")).expect("read");
        assert_eq!(raw, None, "a delete removes the separate vector key");
        drop(store);
        let reopened = Store::open(dir.path()).expect("reopen");
        assert_eq!(
            reopened.layout(),
            Layout::Split,
            "the layout is never changed"
        );
    }

    #[test]
    fn an_unknown_layout_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = sled::open(dir.path().join(SLED_DIR)).expect("raw open");
        db.insert(KEY_LAYOUT, &7u64.to_be_bytes()).expect("insert");
        db.flush().expect("flush");
        drop(db);

        let Err(error) = Store::open(dir.path()) else {
            panic!("an unknown layout must be refused");
        };
        assert!(
            error.to_string().contains("unknown item layout 7"),
            "{error}"
        );
    }

    #[test]
    fn replacing_or_deleting_an_item_leaves_no_stale_payload_or_hash() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open");
        let with_payload = record(0, 1, true);
        put(&store, "a", &with_payload, &[1.0], None);
        assert_eq!(
            store.payload("a").expect("read").as_deref(),
            Some(&b"bytes"[..])
        );

        let without = record(1, 2, false);
        put(&store, "a", &without, &[2.0], Some(&with_payload));
        assert_eq!(store.payload("a").expect("read"), None);
        assert_eq!(
            store.ids_with_hash(&[1; 32]).expect("scan"),
            Vec::<String>::new()
        );

        let same_hash = Record {
            slot: 2,
            metadata: BTreeMap::new(),
            ..without.clone()
        };
        put(&store, "a", &same_hash, &[3.0], Some(&without));
        assert_eq!(store.ids_with_hash(&[2; 32]).expect("scan"), vec!["a"]);

        let mut batch = store.batch();
        batch.remove("a", &same_hash);
        store.commit(batch, 9).expect("commit");
        assert_eq!(store.record("a").expect("read"), None);
        assert_eq!(store.vector("a", 1).expect("read"), None);
        assert_eq!(
            store.ids_with_hash(&[2; 32]).expect("scan"),
            Vec::<String>::new()
        );
    }

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
