//! A collection: the sled store, the in-memory slot table and the graph, kept in step by a
//! single writer while any number of searches run.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::graph::{DumpDir, Graph, LoadedDump, Owner};
use crate::search::MAX_EF;
use crate::slots::{Postings, SlotInfo, SlotTable};
use crate::store::{item_digest, next_lineage, ItemWrite, Record, Store, WriteBatch};
use crate::types::{GraphOrigin, HnswParams, Item, ItemKind, Settings, Stats, UpsertOutcome};
use crate::vector;

/// Longest accepted item id, in bytes.
pub const MAX_ID_BYTES: usize = 1024;
/// Largest accepted dimension.
pub const MAX_DIMENSION: usize = 65_536;
/// Vectors read and inserted per step while (re)building a graph, bounding extra memory.
const BUILD_CHUNK: usize = 50_000;
/// Chunk of a build that can be stopped (a background compaction): short enough that a
/// dropped collection waits well under a second for it.
const STOPPABLE_CHUNK: usize = 2_048;
/// Compaction is not started for fewer tombstones than this.
const COMPACT_MIN_TOMBSTONES: usize = 64;

/// A durable collection of embeddings with an HNSW graph over them.
///
/// sled holds every item; a write is acknowledged only after it is applied atomically and
/// flushed. sled's flush writes and syncs its log, so everything acknowledged survives the
/// process being killed; on power loss the guarantee is only as strong as the file system's
/// and the device's handling of that sync. The graph is a cache: dumped by
/// [`Collection::dump_graph`] and [`Collection::close`], reloaded when its epoch matches the
/// stored one, rebuilt from sled otherwise.
///
/// `Collection` is `Send + Sync`. Writes (upsert, delete) are serialised by one writer lock;
/// searches take no lock for their duration, only short ones to copy shared pointers.
pub struct Collection {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub dir: PathBuf,
    pub settings: Settings,
    pub store: Store,
    pub dumps: DumpDir,
    pub graph: RwLock<Arc<Graph>>,
    pub slots: SlotTable,
    pub postings: Postings,
    /// Serialises writes; holds the first slot not yet handed out.
    pub writer: Mutex<u64>,
    /// Epoch of the last committed batch; the graph always reflects it once the writer lock
    /// is released.
    pub epoch: AtomicU64,
    /// Epoch of the dump on disk, or `u64::MAX` when none is valid.
    pub dumped_epoch: AtomicU64,
    /// True when the graph differs from the dump on disk.
    pub dirty: AtomicBool,
    pub images: AtomicU64,
    pub texts: AtomicU64,
    pub origin: GraphOrigin,
    pub compaction: Mutex<Option<JoinHandle<()>>>,
    pub compacting: Mutex<()>,
    /// Set when the collection is dropped: a running compaction stops unfinished.
    pub closing: AtomicBool,
    /// Live-set digest and lineage of the last committed batch; changed only under the
    /// writer lock.
    pub history: Mutex<History>,
    /// Slot and vector of each version that the write batch in flight (or the last one)
    /// replaces, by id. While a replacement is committed the store already holds the new
    /// version but the slot table still the old one, so an exact scan scores the old version
    /// from here; refilled by each batch under the writer lock.
    pub superseded: RwLock<HashMap<String, (u64, Vec<f32>)>>,
    /// Set when a batch could not be committed: the store may or may not hold it, so the
    /// collection refuses further writes until it is reopened.
    pub write_failed: AtomicBool,
}

const NO_DUMP: u64 = u64::MAX;

fn check_settings(settings: &Settings) -> Result<()> {
    let HnswParams {
        max_connections: m,
        ef_construction,
        ef_search,
        compact_tombstone_ratio: ratio,
        exact_scan_fraction: fraction,
        ..
    } = settings.hnsw;
    let checks = [
        (
            "dimension",
            (1..=MAX_DIMENSION).contains(&settings.dimension),
            format!("1..={MAX_DIMENSION}"),
        ),
        ("max_connections", (2..=255).contains(&m), "2..=255".into()),
        (
            "ef_construction",
            (m..=MAX_EF).contains(&ef_construction),
            format!("max_connections..={MAX_EF}"),
        ),
        (
            "ef_search",
            (1..=MAX_EF).contains(&ef_search),
            format!("1..={MAX_EF}"),
        ),
        (
            "compact_tombstone_ratio",
            ratio > 0.0 && ratio <= 1.0,
            "in (0, 1]".into(),
        ),
        (
            "exact_scan_fraction",
            (0.0..=1.0).contains(&fraction),
            "in [0, 1]".into(),
        ),
    ];
    for (field, ok, expected) in checks {
        if !ok {
            return Err(Error::invalid(field, format!("expected {expected}")));
        }
    }
    if settings.model_id.is_empty() {
        return Err(Error::invalid("model_id", "expected a non-empty model id"));
    }
    Ok(())
}

/// Live items read from the store on open.
struct Loaded {
    live: Vec<(u64, String)>,
    max_slot: Option<u64>,
}

impl Collection {
    /// Opens the collection in `dir`, creating it when absent.
    ///
    /// Errors: [`Error::InvalidArgument`] for out-of-range settings,
    /// [`Error::SettingsMismatch`] when the collection exists with another dimension, metric
    /// or model id, [`Error::Storage`] when the directory or database cannot be used, or when
    /// the database holds fewer writes than the graph dump beside it (it lost writes it had
    /// acknowledged; the dump is kept). A missing or damaged graph dump is not an error: the
    /// graph is rebuilt ([`GraphOrigin::Rebuilt`]).
    pub fn open(dir: &Path, settings: Settings) -> Result<Self> {
        check_settings(&settings)?;
        std::fs::create_dir_all(dir).map_err(|e| Error::storage(dir, e))?;
        let started = std::time::Instant::now();
        let dumps = DumpDir::new(dir);
        let (store, dump) = open_with_dump(dir, &dumps, &settings);
        let store = store?;
        store.reconcile_settings(&settings)?;
        let epoch = store.epoch()?;
        if let Some(owner) = dumps.recorded_owner() {
            refuse_store_behind_dump(dir, &store, owner, epoch)?;
        }
        let next_slot = store.next_slot()?;

        let tables = Tables {
            slots: SlotTable::default(),
            postings: Postings::default(),
            counts: [AtomicU64::new(0), AtomicU64::new(0)],
        };
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(elapsed_ms, "store and graph dump ready");
        let Initial {
            graph,
            origin,
            max_slot,
            history,
        } = initial_state(&store, dump, &settings, epoch, &tables)?;
        let next_slot = next_slot.max(max_slot.map_or(0, |s| s + 1));
        let Tables {
            slots,
            postings,
            counts,
        } = tables;
        tracing::info!(
            ?origin,
            kernel = graph.kernel(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "collection open"
        );
        let dirty = origin == GraphOrigin::Rebuilt;
        let dumped = if origin == GraphOrigin::Reloaded {
            epoch
        } else {
            NO_DUMP
        };
        dumps.remove_stale(dumps.current().as_deref().filter(|_| !dirty));

        let [images, texts] = counts;
        let inner = Inner {
            dir: dir.to_path_buf(),
            settings,
            store,
            dumps,
            graph: RwLock::new(Arc::new(graph)),
            slots,
            postings,
            writer: Mutex::new(next_slot),
            epoch: AtomicU64::new(epoch),
            dumped_epoch: AtomicU64::new(dumped),
            dirty: AtomicBool::new(dirty),
            images,
            texts,
            origin,
            compaction: Mutex::new(None),
            compacting: Mutex::new(()),
            closing: AtomicBool::new(false),
            history: Mutex::new(history),
            write_failed: AtomicBool::new(false),
            superseded: RwLock::new(HashMap::new()),
        };
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// The settings the collection was opened with.
    pub fn settings(&self) -> &Settings {
        &self.inner.settings
    }

    /// Where the graph came from when the collection was opened.
    pub fn graph_origin(&self) -> GraphOrigin {
        self.inner.origin
    }

    /// Stores a batch of items; every item is durable (applied atomically with the batch and
    /// flushed) and searchable when this returns. Outcomes are in input order; an id given
    /// twice is applied in order, so the last one wins.
    ///
    /// Vectors are normalised for [`Metric::Cosine`]. Errors: validation errors for the first
    /// invalid item (nothing is written then), [`Error::Storage`] if the commit fails.
    pub fn upsert(&self, items: Vec<Item>) -> Result<Vec<UpsertOutcome>> {
        let prepared = self.inner.prepare_items(items)?;
        let outcomes = self.inner.write_items(prepared)?;
        self.maybe_compact();
        Ok(outcomes)
    }

    /// Deletes a live item. Errors: [`Error::UnknownId`] when no live item has this id.
    pub fn delete(&self, id: &str) -> Result<()> {
        self.inner.delete(id)?;
        self.maybe_compact();
        Ok(())
    }

    /// The item with this id, payload included, or `None`.
    pub fn get(&self, id: &str) -> Result<Option<Item>> {
        self.inner.get(id)
    }

    /// True when a live item has this id and content hash: a cheap check for resuming an
    /// interrupted ingest.
    pub fn contains(&self, id: &str, content_hash: &[u8; 32]) -> Result<bool> {
        let record = self.inner.store.record(id)?;
        Ok(record.is_some_and(|r| r.content_hash == *content_hash))
    }

    /// Ids of live items with this content hash, in id order (exact duplicates).
    pub fn find_by_hash(&self, hash: &[u8; 32]) -> Result<Vec<String>> {
        self.inner.store.ids_with_hash(hash)
    }

    /// Rebuilds the graph without tombstones. Writes wait only while the items written
    /// during the rebuild are added and the new graph is swapped in; searches never wait.
    pub fn compact(&self) -> Result<()> {
        self.inner.compact()
    }

    /// Writes the graph to disk when it changed since the last dump, so the next open can
    /// reload it. Writes wait while the dump is written; searches do not.
    pub fn dump_graph(&self) -> Result<()> {
        self.inner.dump_graph()
    }

    /// Counters: items by kind, tombstones, epochs, bytes on disk.
    pub fn stats(&self) -> Result<Stats> {
        self.inner.stats()
    }

    /// Waits for a background compaction, dumps the graph and flushes the store.
    ///
    /// Errors: [`Error::Storage`] when the dump or the flush fails; the store is flushed
    /// even when the dump failed. After a failed write the graph is not dumped (it may hold
    /// nodes the store lacks) and close reports that.
    pub fn close(self) -> Result<()> {
        self.inner.wait_for_compaction();
        let dumped = self.inner.dump_graph();
        let flushed = self.inner.store.flush();
        dumped.and(flushed)
    }

    /// Starts a background compaction when tombstones pass the configured share of the
    /// graph and none is running.
    fn maybe_compact(&self) {
        let graph = Arc::clone(&self.inner.graph.read());
        let tombstones = graph.len().saturating_sub(self.inner.live_count());
        let ratio = tombstones as f32 / graph.len().max(1) as f32;
        let threshold = self.inner.settings.hnsw.compact_tombstone_ratio;
        if tombstones < COMPACT_MIN_TOMBSTONES || ratio < threshold {
            return;
        }

        let mut slot = self.inner.compaction.lock();
        if slot.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let inner = Arc::clone(&self.inner);
        *slot = Some(std::thread::spawn(move || {
            if let Err(e) = inner.compact() {
                tracing::error!(error = %e, "background compaction failed");
            }
        }));
    }
}

/// Dropping a collection without [`Collection::close`] stops a background compaction (within
/// one short chunk of its build, discarding it) and waits for its thread, so the store is
/// released when the drop returns and the directory can be opened again at once. The graph
/// is not dumped; the next open reloads the last dump or rebuilds.
impl Drop for Collection {
    fn drop(&mut self) {
        self.inner.closing.store(true, Ordering::Release);
        self.inner.wait_for_compaction();
    }
}

fn kind_index(kind: ItemKind) -> usize {
    match kind {
        ItemKind::Image => 0,
        ItemKind::Text => 1,
    }
}

/// The in-memory tables an open fills: slot table, metadata postings, counts by kind.
struct Tables {
    slots: SlotTable,
    postings: Postings,
    counts: [AtomicU64; 2],
}

impl Tables {
    fn add(&self, slot: u64, info: SlotInfo) {
        self.postings.add(slot, &info.metadata);
        self.counts[kind_index(info.kind)].fetch_add(1, Ordering::Relaxed);
        self.slots.publish(slot, info);
    }
}

/// Scans every record in the store into the tables.
fn load_records(store: &Store, tables: &Tables) -> Result<Loaded> {
    let mut live = Vec::new();
    let mut max_slot = None;
    for entry in store.records() {
        let (id, record) = entry?;
        let info = SlotInfo {
            id: id.clone(),
            kind: record.kind,
            metadata: record.metadata,
        };
        tables.add(record.slot, info);
        max_slot = max_slot.max(Some(record.slot));
        live.push((record.slot, id));
    }
    Ok(Loaded { live, max_slot })
}

/// Opens the store while another thread reads the current graph dump: at a million items
/// each takes seconds, mostly spent waiting on the disk and on fresh memory. The dump is read
/// before the store's lock is held, so when another process replaced it meanwhile (the
/// current dump name changed), it is read again once the lock is ours.
fn open_with_dump(
    dir: &Path,
    dumps: &DumpDir,
    settings: &Settings,
) -> (Result<Store>, std::result::Result<LoadedDump, String>) {
    let started = std::time::Instant::now();
    let load = || {
        let dump = dumps.load(settings.dimension, &settings.hnsw);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(elapsed_ms, ok = dump.is_ok(), "graph dump loaded");
        dump
    };
    let before = dumps.current();
    let (store, dump) = std::thread::scope(|scope| {
        let reader = scope.spawn(load);
        let store = Store::open(dir);
        let elapsed_ms = started.elapsed().as_millis() as u64;
        tracing::debug!(elapsed_ms, ok = store.is_ok(), "store opened");
        let dump = reader
            .join()
            .unwrap_or_else(|_| Err("graph dump reader panicked".into()));
        (store, dump)
    });
    if store.is_ok() && dumps.current() != before {
        drop(dump);
        return (store, load());
    }
    (store, dump)
}

/// Refuses to open a store that holds fewer writes than the graph dump beside it, whose
/// manifest records `(collection id, epoch)` in `owner`: the dump of the same collection
/// reflects a later write epoch, or the store holds no writes at all while the directory
/// holds a dump of some. A dump only ever reflects writes the store had made durable, so
/// either way the store lost writes it acknowledged (damaged, or replaced by an older copy),
/// or the directory mixes two collections. Opening would serve the older state and the next
/// dump would delete the newer one, which still holds the lost vectors. The check reads the
/// manifest only, so it holds even when the dump cannot be loaded with today's settings.
fn refuse_store_behind_dump(
    dir: &Path,
    store: &Store,
    (collection, dump_epoch): (String, u64),
    epoch: u64,
) -> Result<()> {
    let same_collection = collection == store.collection_id();
    if dump_epoch <= epoch || !(same_collection || epoch == 0) {
        return Ok(());
    }
    let reason = format!(
        "the store is at write epoch {epoch} but the graph dump in {} reflects epoch \
         {dump_epoch} of collection {collection}: the store has lost acknowledged writes \
         (damaged, or replaced by an older copy), or the graph directory belongs to another \
         collection; restore the store, or remove the graph directory to open the store as it \
         is",
        dir.join(crate::graph::GRAPH_DIR).display(),
    );
    Err(Error::storage(dir.join(crate::store::SLED_DIR), reason))
}

/// What an open starts from: the graph, where it came from, the highest slot in use and the
/// history of the writes.
struct Initial {
    graph: Graph,
    origin: GraphOrigin,
    /// The highest slot in use, live or in the graph.
    max_slot: Option<u64>,
    history: History,
}

/// The digest of a set of live items: the XOR of their [`item_digest`] shares.
fn digest_of<'a>(items: impl Iterator<Item = (u64, &'a str)>) -> u128 {
    items.fold(0, |digest, (slot, id)| digest ^ item_digest(slot, id))
}

/// Fills the tables and returns the graph and what else an open starts from.
///
/// A dump that reflects `epoch` and whose items have the digest the store recorded for its
/// live items carries exactly the store's records, so the tables are filled from it without
/// scanning the store. Otherwise the records are scanned and the graph is rebuilt from the
/// stored vectors.
fn initial_state(
    store: &Store,
    dump: std::result::Result<LoadedDump, String>,
    settings: &Settings,
    epoch: u64,
    tables: &Tables,
) -> Result<Initial> {
    let (recorded, lineage) = (store.live_digest()?, store.lineage()?);
    match dump {
        Ok(dump) if dump.collection != store.collection_id() => tracing::info!(
            dump = %dump.collection,
            store = %store.collection_id(),
            "graph dump belongs to another collection; rebuilding the graph"
        ),
        Ok(dump) if dump.epoch != epoch => tracing::info!(
            dump = dump.epoch,
            store = epoch,
            "graph dump reflects another write epoch; rebuilding the graph"
        ),
        Ok(dump) if lineage.is_none() || dump.lineage != lineage => tracing::info!(
            "graph dump and store have other write lineages (a diverged copy, or one of them \
             written before lineages); rebuilding the graph"
        ),
        Ok(LoadedDump {
            graph,
            items,
            lineage: Some(lineage),
            ..
        }) if !items.is_empty() && graph.len() >= items.len() => {
            let digest = digest_of(items.iter().map(|(slot, info)| (*slot, info.id.as_str())));
            if recorded.is_none_or(|r| r == digest) {
                // Nodes of a batch whose commit failed sit in the graph on slots no item has.
                let listed = items.iter().map(|(slot, _)| *slot).max();
                let max_slot = listed.max(graph.slots().into_iter().max());
                for (slot, info) in items {
                    tables.add(slot, info);
                }
                let origin = GraphOrigin::Reloaded;
                let history = History { digest, lineage };
                return Ok(Initial {
                    graph,
                    origin,
                    max_slot,
                    history,
                });
            }
            tracing::info!("graph dump lists other live items than the store; rebuilding the graph")
        }
        Ok(LoadedDump { graph, items, .. }) => tracing::info!(
            points = graph.len(),
            items = items.len(),
            "graph dump has no items or fewer points than items"
        ),
        Err(reason) => tracing::info!(%reason, "rebuilding the graph"),
    }
    rebuild(store, settings, epoch, tables, recorded)
}

/// Scans the store's records into the tables and builds the graph from their vectors. The
/// store gets the digest of what it holds and a new lineage, so no earlier dump is reloaded
/// for the state from here on.
fn rebuild(
    store: &Store,
    settings: &Settings,
    epoch: u64,
    tables: &Tables,
    recorded: Option<u128>,
) -> Result<Initial> {
    let loaded = load_records(store, tables)?;
    let digest = digest_of(loaded.live.iter().map(|(slot, id)| (*slot, id.as_str())));
    if recorded != Some(digest) {
        store.set_live_digest(digest)?;
    }
    let history = History {
        digest,
        lineage: store.renew_lineage(epoch)?,
    };
    let (dimension, max_slot) = (settings.dimension, loaded.max_slot);
    if loaded.live.is_empty() {
        let graph = Graph::new(&settings.hnsw, dimension, 0);
        let origin = GraphOrigin::Empty;
        return Ok(Initial {
            graph,
            origin,
            max_slot,
            history,
        });
    }
    let mut graph = Graph::new(&settings.hnsw, dimension, loaded.live.len());
    build_into(store, &mut graph, dimension, &loaded.live, None);
    let origin = GraphOrigin::Rebuilt;
    Ok(Initial {
        graph,
        origin,
        max_slot,
        history,
    })
}

/// Reads the vectors of `live` items from the store and inserts them, chunk by chunk. An
/// item whose vector is missing or damaged is reported and skipped. With `stop`, the build
/// checks it before each of its smaller chunks and returns false, unfinished, once it is
/// set; otherwise it returns true.
fn build_into(
    store: &Store,
    graph: &mut Graph,
    dimension: usize,
    live: &[(u64, String)],
    stop: Option<&AtomicBool>,
) -> bool {
    if !graph.has_room(live.len()) {
        *graph = graph.with_room(live.len());
    }
    let chunk_len = if stop.is_some() {
        STOPPABLE_CHUNK
    } else {
        BUILD_CHUNK
    };
    for chunk in live.chunks(chunk_len) {
        if stop.is_some_and(|s| s.load(Ordering::Acquire)) {
            return false;
        }
        let mut vectors = Vec::with_capacity(chunk.len());
        for (slot, id) in chunk {
            match store.vector(id, dimension) {
                Ok(Some(v)) => vectors.push((v, *slot)),
                Ok(None) => tracing::error!(%id, "item has no stored vector; skipped"),
                Err(e) => tracing::error!(error = %e, "damaged vector; item skipped"),
            }
        }
        let refs: Vec<(&[f32], u64)> = vectors.iter().map(|(v, s)| (v.as_slice(), *s)).collect();
        graph.insert(&refs);
    }
    true
}

/// One item after validation.
pub(crate) struct Prepared {
    item: Item,
    vector: Vec<f32>,
}

/// What every write batch carries forward.
#[derive(Debug, Clone, Copy)]
pub(crate) struct History {
    /// Digest of the live items (see [`item_digest`]).
    digest: u128,
    /// Lineage of the writes (see [`next_lineage`]).
    lineage: u128,
}

/// One item whose write is being committed, to apply in memory.
struct Applied {
    slot: u64,
    info: SlotInfo,
    vector: Vec<f32>,
    previous: Option<Record>,
}

impl Inner {
    /// Waits for the background compaction's thread, if one was started.
    fn wait_for_compaction(&self) {
        let pending = self.compaction.lock().take();
        if let Some(handle) = pending {
            let _ = handle.join();
        }
    }

    pub fn live_count(&self) -> usize {
        (self.images.load(Ordering::Relaxed) + self.texts.load(Ordering::Relaxed)) as usize
    }

    fn prepare_items(&self, items: Vec<Item>) -> Result<Vec<Prepared>> {
        let (dimension, metric) = (self.settings.dimension, self.settings.metric);
        items
            .into_iter()
            .map(|item| {
                if item.id.is_empty() || item.id.len() > MAX_ID_BYTES {
                    let reason =
                        format!("id of {} bytes, expected 1..={MAX_ID_BYTES}", item.id.len());
                    return Err(Error::invalid("id", reason));
                }
                let (vector, _) =
                    vector::prepare(&item.id, &item.vector, dimension, metric, false)?;
                Ok(Prepared { item, vector })
            })
            .collect()
    }

    fn write_items(&self, prepared: Vec<Prepared>) -> Result<Vec<UpsertOutcome>> {
        let mut next_slot = self.writer.lock();
        self.check_writable()?;
        let stored = self.stored_records(&prepared)?;
        let mut batch = self.store.batch();
        let mut pending: HashMap<String, Record> = HashMap::new();
        let mut outcomes = Vec::with_capacity(prepared.len());
        let mut applied = Vec::new();

        for (Prepared { item, vector }, stored) in prepared.into_iter().zip(stored) {
            let previous = pending.get(&item.id).cloned().or(stored);
            let record = Record {
                slot: *next_slot,
                kind: item.kind,
                content_hash: item.content_hash,
                metadata: item.metadata,
                has_payload: item.payload.is_some(),
            };
            if previous.as_ref().is_some_and(|p| same_content(p, &record)) {
                outcomes.push(UpsertOutcome::Unchanged);
                continue;
            }

            *next_slot += 1;
            batch.put(&ItemWrite {
                id: &item.id,
                record: &record,
                vector: &vector,
                payload: item.payload.as_deref(),
                previous: previous.as_ref(),
            })?;
            outcomes.push(if previous.is_some() {
                UpsertOutcome::Replaced
            } else {
                UpsertOutcome::Inserted
            });
            pending.insert(item.id.clone(), record.clone());
            let info = SlotInfo {
                id: item.id,
                kind: record.kind,
                metadata: record.metadata,
            };
            applied.push(Applied {
                slot: record.slot,
                info,
                vector,
                previous,
            });
        }
        if applied.is_empty() {
            return Ok(outcomes);
        }

        let epoch = self.epoch.load(Ordering::Acquire) + 1;
        batch.set_next_slot(*next_slot);
        let digest = applied
            .iter()
            .fold(self.history.lock().digest, |digest, a| {
                let replaced = a
                    .previous
                    .as_ref()
                    .map_or(0, |p| item_digest(p.slot, &a.info.id));
                digest ^ replaced ^ item_digest(a.slot, &a.info.id)
            });
        let history = self.advance(&mut batch, epoch, digest);
        self.commit_and_insert(batch, epoch, applied)?;
        *self.history.lock() = history;
        self.epoch.store(epoch, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        Ok(outcomes)
    }

    /// The stored record of each prepared item's id, looked up in parallel. Caller holds the
    /// writer lock, so no record changes meanwhile.
    fn stored_records(&self, prepared: &[Prepared]) -> Result<Vec<Option<Record>>> {
        prepared
            .par_iter()
            .map(|p| self.store.record(&p.item.id))
            .collect()
    }

    /// Commits `batch` while the new vectors go into the graph, so that the graph insertion
    /// runs during the store's write and flush instead of after them. The items are published
    /// (see [`Inner::publish`]) once both are done: a replaced id keeps its old version in
    /// graph searches until the new one is durable and in the graph. When the commit fails
    /// they are never published; their nodes count as tombstones and leave with the next
    /// compaction, and the collection refuses further writes. Caller holds the writer lock.
    fn commit_and_insert(
        &self,
        batch: WriteBatch,
        epoch: u64,
        applied: Vec<Applied>,
    ) -> Result<()> {
        let mut graph = Arc::clone(&self.graph.read());
        if !graph.has_room(applied.len()) {
            graph = Arc::new(graph.with_room(applied.len()));
            *self.graph.write() = Arc::clone(&graph);
        }
        let (vectors, entries): (Vec<_>, Vec<_>) = applied
            .into_iter()
            .map(|a| ((a.vector, a.slot), (a.slot, a.info, a.previous)))
            .unzip();
        let nodes: Vec<(&[f32], u64)> = vectors.iter().map(|(v, s)| (v.as_slice(), *s)).collect();
        self.keep_superseded(&entries)?;

        std::thread::scope(|scope| {
            let commit = scope.spawn(move || self.store.commit(batch, epoch));
            graph.insert(&nodes);
            commit
                .join()
                .unwrap_or_else(|_| Err(Error::storage(&self.dir, "the store commit panicked")))
        })
        .map_err(|e| self.failed_write(e))?;

        self.publish(entries);
        Ok(())
    }

    /// Replaces [`Inner::superseded`] with the stored vectors of the versions `entries`
    /// replace, read before the batch that replaces them is committed. Caller holds the
    /// writer lock.
    fn keep_superseded(&self, entries: &[(u64, SlotInfo, Option<Record>)]) -> Result<()> {
        let dimension = self.settings.dimension;
        let mut kept = HashMap::new();
        for (_, info, previous) in entries {
            let Some(previous) = previous else {
                continue;
            };
            let stored = self.store.entry(&info.id, dimension)?;
            let vector = stored.filter(|(record, _)| record.slot == previous.slot);
            if let Some(vector) = vector.and_then(|(_, vector)| vector) {
                kept.insert(info.id.clone(), (previous.slot, vector));
            }
        }
        *self.superseded.write() = kept;
        Ok(())
    }

    /// The history after a batch of write `epoch` that leaves `digest` as the live-set
    /// digest, recorded in `batch`.
    fn advance(&self, batch: &mut WriteBatch, epoch: u64, digest: u128) -> History {
        let lineage = next_lineage(self.history.lock().lineage, epoch, &self.dir);
        batch.set_live_digest(digest);
        batch.set_lineage(lineage);
        History { digest, lineage }
    }

    /// Errors: [`Error::Storage`] once a batch could not be committed.
    fn check_writable(&self) -> Result<()> {
        if self.write_failed.load(Ordering::Acquire) {
            let reason = "a write batch could not be committed; reopen the collection to write";
            return Err(Error::storage(&self.dir, reason));
        }
        Ok(())
    }

    /// Marks the collection as refusing writes after `error` failed a commit.
    fn failed_write(&self, error: Error) -> Error {
        self.write_failed.store(true, Ordering::Release);
        error
    }

    /// Makes committed writes visible: publishes each new slot, then tombstones the slot it
    /// replaces.
    fn publish(&self, entries: Vec<(u64, SlotInfo, Option<Record>)>) {
        for (slot, info, previous) in entries {
            self.postings.add(slot, &info.metadata);
            self.count(info.kind).fetch_add(1, Ordering::Relaxed);
            self.slots.publish(slot, info);
            // The new version goes live before the old one is tombstoned, so that a search
            // always finds one of the two.
            if let Some(previous) = &previous {
                self.forget(previous);
            }
        }
    }

    fn forget(&self, record: &Record) {
        self.slots.kill(record.slot);
        self.postings.remove(record.slot, &record.metadata);
        self.count(record.kind).fetch_sub(1, Ordering::Relaxed);
    }

    fn count(&self, kind: ItemKind) -> &AtomicU64 {
        match kind {
            ItemKind::Image => &self.images,
            ItemKind::Text => &self.texts,
        }
    }

    fn delete(&self, id: &str) -> Result<()> {
        let _writer = self.writer.lock();
        self.check_writable()?;
        let record = self
            .store
            .record(id)?
            .ok_or_else(|| Error::UnknownId { id: id.to_string() })?;
        let mut batch = self.store.batch();
        batch.remove(id, &record);
        let epoch = self.epoch.load(Ordering::Acquire) + 1;
        let digest = self.history.lock().digest ^ item_digest(record.slot, id);
        let history = self.advance(&mut batch, epoch, digest);

        self.store
            .commit(batch, epoch)
            .map_err(|e| self.failed_write(e))?;
        *self.history.lock() = history;
        self.forget(&record);
        self.epoch.store(epoch, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    /// Reads record, vector and payload, retrying when a write moved the item in between.
    fn get(&self, id: &str) -> Result<Option<Item>> {
        for _ in 0..8 {
            let Some((record, vector)) = self.store.entry(id, self.settings.dimension)? else {
                return Ok(None);
            };
            let payload = self.store.payload(id)?;
            let again = self.store.record(id)?;
            let (Some(vector), true) = (vector, again.as_ref() == Some(&record)) else {
                continue;
            };
            let payload = payload.filter(|_| record.has_payload);
            return Ok(Some(Item {
                id: id.to_string(),
                kind: record.kind,
                vector,
                metadata: record.metadata,
                content_hash: record.content_hash,
                payload,
            }));
        }
        let _writer = self.writer.lock();
        self.get_locked(id)
    }

    fn get_locked(&self, id: &str) -> Result<Option<Item>> {
        let Some((record, vector)) = self.store.entry(id, self.settings.dimension)? else {
            return Ok(None);
        };
        let vector = vector.ok_or_else(|| self.damaged(id))?;
        Ok(Some(Item {
            id: id.to_string(),
            kind: record.kind,
            vector,
            metadata: record.metadata,
            content_hash: record.content_hash,
            payload: self.store.payload(id)?.filter(|_| record.has_payload),
        }))
    }

    fn damaged(&self, id: &str) -> Error {
        Error::storage(&self.dir, format!("item {id:?} has a record but no vector"))
    }

    pub fn compact(&self) -> Result<()> {
        let _running = self.compacting.lock();
        let live: Vec<(u64, String)> = self
            .slots
            .view()
            .iter_live()
            .map(|(slot, info)| (slot, info.id.clone()))
            .collect();
        let dimension = self.settings.dimension;
        let mut graph = Graph::new(&self.settings.hnsw, dimension, live.len());
        if !build_into(
            &self.store,
            &mut graph,
            dimension,
            &live,
            Some(&self.closing),
        ) {
            return Ok(());
        }
        let built: HashSet<u64> = graph.slots().into_iter().collect();

        let _writer = self.writer.lock();
        let missing: Vec<(u64, String)> = self
            .slots
            .view()
            .iter_live()
            .filter(|(slot, _)| !built.contains(slot))
            .map(|(slot, info)| (slot, info.id.clone()))
            .collect();
        build_into(&self.store, &mut graph, dimension, &missing, None);
        *self.graph.write() = Arc::new(graph);
        self.dirty.store(true, Ordering::Release);
        Ok(())
    }

    fn dump_graph(&self) -> Result<()> {
        let _writer = self.writer.lock();
        if self.write_failed.load(Ordering::Acquire) {
            let reason = "graph not dumped: a write batch could not be committed, so the \
                          graph may hold nodes the store lacks";
            return Err(Error::storage(&self.dir, reason));
        }
        if !self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        let graph = Arc::clone(&self.graph.read());
        if graph.len() == 0 {
            return Ok(());
        }
        let epoch = self.epoch.load(Ordering::Acquire);
        let view = self.slots.view();
        let items: Vec<(u64, &SlotInfo)> = view.iter_live().collect();
        let owner = Owner {
            collection: self.store.collection_id(),
            epoch,
            lineage: self.history.lock().lineage,
        };
        self.dumps
            .write(&graph, &items, owner, &self.settings.hnsw)?;
        self.dumped_epoch.store(epoch, Ordering::Release);
        self.dirty.store(false, Ordering::Release);
        Ok(())
    }

    fn stats(&self) -> Result<Stats> {
        let graph = Arc::clone(&self.graph.read());
        let dumped = self.dumped_epoch.load(Ordering::Acquire);
        Ok(Stats {
            images: self.images.load(Ordering::Relaxed),
            texts: self.texts.load(Ordering::Relaxed),
            tombstones: graph.len().saturating_sub(self.live_count()) as u64,
            graph_points: graph.len() as u64,
            graph_epoch: self.epoch.load(Ordering::Acquire),
            dumped_epoch: (dumped != NO_DUMP).then_some(dumped),
            bytes_on_disk: dir_size(&self.dir),
        })
    }
}

/// True when re-upserting `new` over `old` would change nothing.
fn same_content(old: &Record, new: &Record) -> bool {
    old.content_hash == new.content_hash
        && old.kind == new.kind
        && old.metadata == new.metadata
        && old.has_payload == new.has_payload
}

/// Bytes the files under `dir` occupy on disk: allocated blocks, so the holes that pad graph
/// dumps count for nothing; unreadable entries count as zero.
fn dir_size(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;

    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.metadata() {
            Ok(meta) if meta.is_dir() => dir_size(&entry.path()),
            Ok(meta) => meta.blocks() * 512,
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::store::tests::write_split_item;
    use crate::types::{Filter, SearchRequest};

    const DIM: usize = 4;

    fn settings() -> Settings {
        Settings {
            dimension: DIM,
            metric: crate::types::Metric::Cosine,
            hnsw: HnswParams::default(),
            model_id: "test-model".into(),
        }
    }

    fn axis(i: usize) -> Vec<f32> {
        let mut v = vec![0.0; DIM];
        v[i] = 1.0;
        v
    }

    fn item(id: &str, i: usize, hash: u8) -> Item {
        Item {
            id: id.into(),
            kind: ItemKind::Image,
            vector: axis(i),
            metadata: BTreeMap::new(),
            content_hash: [hash; 32],
            payload: Some(id.as_bytes().to_vec()),
        }
    }

    fn nearest(collection: &Collection, i: usize) -> String {
        let query = axis(i);
        let request = SearchRequest {
            vector: &query,
            k: 1,
            ef: None,
            filter: Filter::default(),
            exact: false,
        };
        let hits = collection.search(&request).expect("search");
        hits.first().map(|h| h.id.clone()).unwrap_or_default()
    }

    fn random_items(count: usize, dimension: usize, version: u8) -> Vec<Item> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(u64::from(version));
        (0..count)
            .map(|i| Item {
                id: i.to_string(),
                kind: ItemKind::Image,
                vector: (0..dimension)
                    .map(|_| rng.gen_range(-1.0f32..1.0))
                    .collect(),
                metadata: BTreeMap::new(),
                content_hash: [version; 32],
                payload: None,
            })
            .collect()
    }

    #[test]
    fn a_dropped_collection_stops_its_compaction_and_releases_the_store() {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings {
            dimension: 16,
            hnsw: HnswParams {
                ef_construction: 64,
                ..HnswParams::default()
            },
            ..settings()
        };
        let collection = Collection::open(dir.path(), settings.clone()).expect("open");
        collection
            .upsert(random_items(10_000, 16, 0))
            .expect("upsert");
        // Every item replaced: half the graph is tombstones, so a compaction starts.
        collection
            .upsert(random_items(10_000, 16, 1))
            .expect("upsert");
        let running = collection.inner.compaction.lock();
        assert!(running.as_ref().is_some_and(|h| !h.is_finished()));
        drop(running);

        let inner = Arc::downgrade(&collection.inner);
        drop(collection);
        assert!(
            inner.upgrade().is_none(),
            "a compaction still holds the store"
        );
        let reopened = Collection::open(dir.path(), settings).expect("reopen");
        assert_eq!(reopened.stats().expect("stats").images, 10_000);
    }

    #[test]
    fn nodes_of_a_failed_commit_are_never_dumped_or_served_under_another_id() {
        let dir = tempfile::tempdir().expect("temp dir");
        let settings = Settings {
            dimension: 16,
            ..settings()
        };
        let collection = Collection::open(dir.path(), settings.clone()).expect("open");
        collection.upsert(random_items(50, 16, 0)).expect("upsert");
        collection.dump_graph().expect("dump");
        // What a failed commit leaves: a node on the next slot that no item has.
        let orphan = random_items(1, 16, 9).remove(0).vector;
        let slot = *collection.inner.writer.lock();
        collection
            .inner
            .graph
            .read()
            .insert(&[(orphan.as_slice(), slot)]);
        *collection.inner.writer.lock() += 1;
        collection.inner.write_failed.store(true, Ordering::Release);

        let refused = collection.upsert(random_items(1, 16, 3));
        assert!(matches!(refused, Err(Error::Storage { .. })));
        assert!(
            collection.close().is_err(),
            "close must report the skipped dump"
        );
        let reopened = Collection::open(dir.path(), settings).expect("reopen");
        let mut fresh = random_items(1, 16, 5);
        fresh[0].id = "fresh".into();
        reopened.upsert(fresh).expect("upsert");
        for exact in [false, true] {
            let request = SearchRequest {
                vector: &orphan,
                k: 1,
                ef: None,
                filter: Filter::default(),
                exact,
            };
            let hits = reopened.search(&request).expect("search");
            assert!(
                hits.iter().all(|h| h.score < 0.99),
                "orphan served: {hits:?}"
            );
        }
    }

    /// A collection whose items sit under separate record and vector keys, as collections
    /// created before the joined layout hold them.
    fn split_collection(dir: &Path) {
        let db = sled::open(dir.join(crate::store::SLED_DIR)).expect("raw open");
        let json = serde_json::to_vec(&settings()).expect("settings encode");
        db.insert("m/settings", json).expect("insert");
        db.insert("m/next_slot", &2u64.to_be_bytes())
            .expect("insert");
        for (slot, id) in ["a", "b"].into_iter().enumerate() {
            let record = Record {
                slot: slot as u64,
                kind: ItemKind::Image,
                content_hash: [slot as u8; 32],
                metadata: BTreeMap::new(),
                has_payload: false,
            };
            write_split_item(&db, id, &record, &axis(slot));
        }
    }

    #[test]
    fn a_collection_with_split_keys_opens_and_keeps_working() {
        let dir = tempfile::tempdir().expect("temp dir");
        split_collection(dir.path());

        let collection = Collection::open(dir.path(), settings()).expect("open");
        assert_eq!(collection.graph_origin(), GraphOrigin::Rebuilt);
        assert_eq!(
            collection.get("b").expect("get").expect("b").vector,
            axis(1)
        );
        assert_eq!(nearest(&collection, 1), "b");
        let outcomes = collection
            .upsert(vec![item("a", 2, 7), item("c", 3, 8), item("b", 1, 1)])
            .expect("upsert");
        let expected = [
            UpsertOutcome::Replaced,
            UpsertOutcome::Inserted,
            UpsertOutcome::Replaced,
        ];
        assert_eq!(outcomes, expected, "b gains a payload, so it is replaced");
        collection.delete("b").expect("delete");
        collection.close().expect("close");

        std::fs::remove_dir_all(dir.path().join(crate::graph::GRAPH_DIR))
            .expect("graph dump removed");
        let reopened = Collection::open(dir.path(), settings()).expect("reopen");
        assert_eq!(reopened.graph_origin(), GraphOrigin::Rebuilt);
        let a = reopened.get("a").expect("get").expect("a");
        assert_eq!((a.vector, a.payload), (axis(2), Some(b"a".to_vec())));
        assert_eq!(reopened.get("b").expect("get"), None);
        assert_eq!(nearest(&reopened, 3), "c");
        assert_eq!(nearest(&reopened, 2), "a");
        assert_eq!(
            reopened.find_by_hash(&[0; 32]).expect("scan"),
            Vec::<String>::new()
        );
        assert_eq!(reopened.stats().expect("stats").images, 2);
    }
}
