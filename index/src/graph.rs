//! The HNSW graph over slot numbers, and the dump files that let an open skip rebuilding it.
//!
//! A dump lives in its own directory under `graph/` next to a manifest with the write epoch
//! it reflects and a checksum of each file ([`crate::checksum`]); `graph/CURRENT` names the
//! active dump and is replaced by an atomic rename only once the new dump is complete and
//! synced. A missing, torn, stale or foreign dump is reported as a reason to rebuild, never
//! as an error.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::checksum::{self, Checksum};
use crate::error::{Error, Result};
use crate::hnsw::{Accept, GraphFile, Hnsw, Shape, VectorFile};
use crate::slots::SlotInfo;
use crate::types::HnswParams;

/// Directory holding graph dumps inside the collection directory.
pub(crate) const GRAPH_DIR: &str = "graph";
const CURRENT_FILE: &str = "CURRENT";
const MANIFEST_FILE: &str = "manifest.json";
const BASENAME: &str = "nodes";
const DUMP_FORMAT: u32 = 4;

/// The HNSW graph of a collection; node data ids are slot numbers.
pub(crate) struct Graph {
    hnsw: Hnsw,
}

impl Graph {
    /// An empty graph of `dimension`-d vectors with room for `capacity` nodes.
    pub fn new(params: &HnswParams, dimension: usize, capacity: usize) -> Self {
        let shape = Shape {
            dimension,
            max_connections: params.max_connections,
            ef_construction: params.ef_construction,
        };
        Self {
            hnsw: Hnsw::new(shape, capacity),
        }
    }

    /// Adds vectors under their slots, in parallel for large batches. The caller makes room
    /// first ([`Graph::has_room`]); vectors past the capacity are left out and logged.
    pub fn insert(&self, items: &[(&[f32], u64)]) {
        self.hnsw.insert(items);
    }

    /// True when `extra` more vectors fit.
    pub fn has_room(&self, extra: usize) -> bool {
        self.hnsw.has_room(extra)
    }

    /// A copy with room for at least `extra` more vectors.
    pub fn with_room(&self, extra: usize) -> Self {
        Self {
            hnsw: self.hnsw.with_room(extra),
        }
    }

    /// Nodes in the graph, live or tombstoned.
    pub fn len(&self) -> usize {
        self.hnsw.len()
    }

    /// Up to `count` nearest slots the filter accepts, as `(slot, inner product)`, nearest
    /// first. Nodes the filter rejects are still walked through.
    pub fn search(
        &self,
        query: &[f32],
        count: usize,
        ef: usize,
        accept: Option<Accept<'_>>,
    ) -> Vec<(u64, f32)> {
        self.hnsw.search(query, count, ef, accept)
    }

    /// Slot numbers of every node.
    pub fn slots(&self) -> Vec<u64> {
        self.hnsw.slots()
    }

    /// Instruction set of the inner product kernel the graph uses.
    pub fn kernel(&self) -> &'static str {
        self.hnsw.kernel()
    }
}

/// What a dump claims to contain.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// Id of the collection the dump belongs to (empty in dumps written before ids).
    #[serde(default)]
    collection: String,
    epoch: u64,
    /// Lineage of the store's writes at that epoch, in hex (empty in dumps written before
    /// lineages).
    #[serde(default)]
    lineage: String,
    basename: String,
    points: usize,
    items: usize,
    dimension: usize,
    max_connections: usize,
    ef_construction: usize,
    files: Vec<FileSum>,
}

#[derive(Debug, Serialize, Deserialize)]
struct FileSum {
    name: String,
    len: u64,
    checksum: String,
}

/// Which state of which store a dump reflects.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner<'a> {
    /// Id of the collection.
    pub collection: &'a str,
    /// Write epoch of the store.
    pub epoch: u64,
    /// Lineage of the store's writes up to that epoch.
    pub lineage: u128,
}

/// Where the graph of a collection is dumped.
pub(crate) struct DumpDir {
    root: PathBuf,
}

fn io_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::storage(path, e)
}

fn checksum_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = File::open(path)?;
    let mut sum = Checksum::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        sum.update(&buffer[..read]);
        len += read as u64;
    }
    Ok((len, sum.hex()))
}

fn sync_file(path: &Path) -> std::io::Result<()> {
    File::open(path)?.sync_all()
}

/// The three dump files for a basename: links and levels, slots and vectors, then the
/// live items (slot, id, kind, metadata) the graph's epoch had, so that a reload need not
/// scan the store.
fn dump_files(basename: &str) -> [String; 3] {
    [
        format!("{basename}.hnsw.graph"),
        format!("{basename}.hnsw.data"),
        format!("{basename}.items"),
    ]
}

/// Live items as dumped: slot and what a search needs about the item.
pub(crate) type DumpedItems = Vec<(u64, SlotInfo)>;

/// A dump read back by [`DumpDir::load`].
pub(crate) struct LoadedDump {
    /// Id of the collection the dump was written for.
    pub collection: String,
    /// Write epoch of the store that the dump reflects.
    pub epoch: u64,
    /// Lineage of the store's writes at that epoch; `None` in dumps written before lineages.
    pub lineage: Option<u128>,
    /// The graph, checked and ranked.
    pub graph: Graph,
    /// The live items of that epoch.
    pub items: DumpedItems,
}

impl DumpDir {
    /// Dumps under `collection/graph`.
    pub fn new(collection: &Path) -> Self {
        Self {
            root: collection.join(GRAPH_DIR),
        }
    }

    fn current_name(&self) -> Option<String> {
        let name = fs::read_to_string(self.root.join(CURRENT_FILE)).ok()?;
        let name = name.trim().to_string();
        let plain = !name.is_empty() && !name.contains(['/', '\\']) && name != "..";
        plain.then_some(name)
    }

    /// Writes `graph` and the live `items`, which reflect the store state `owner`, as the new
    /// current dump, then deletes older dumps. On failure the previous dump stays current.
    pub fn write(
        &self,
        graph: &Graph,
        items: &[(u64, &SlotInfo)],
        owner: Owner<'_>,
        params: &HnswParams,
    ) -> Result<()> {
        let epoch = owner.epoch;
        fs::create_dir_all(&self.root).map_err(|e| io_error(&self.root, e))?;
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let name = format!("dump-{epoch}-{nanos}");
        let dir = self.root.join(&name);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(|e| io_error(&dir, e))?;
        }
        fs::create_dir_all(&dir).map_err(|e| io_error(&dir, e))?;

        let [graph_file, vector_file, items_file] = dump_files(BASENAME).map(|n| dir.join(n));
        graph
            .hnsw
            .write_files(&graph_file, &vector_file)
            .map_err(|e| io_error(&dir, format!("graph dump failed: {e}")))?;
        write_items(&items_file, items)?;

        let manifest = self.describe(&dir, graph, items.len(), owner, params)?;
        self.publish(&dir, &name, &manifest)?;
        self.remove_stale(Some(&name));
        Ok(())
    }

    /// Syncs and checksums the files of a dump written under [`BASENAME`] and describes
    /// the dump.
    fn describe(
        &self,
        dir: &Path,
        graph: &Graph,
        items: usize,
        owner: Owner<'_>,
        params: &HnswParams,
    ) -> Result<Manifest> {
        let mut files = Vec::new();
        for name in dump_files(BASENAME) {
            let path = dir.join(&name);
            sync_file(&path).map_err(|e| io_error(&path, e))?;
            let (len, checksum) = checksum_file(&path).map_err(|e| io_error(&path, e))?;
            files.push(FileSum {
                name,
                len,
                checksum,
            });
        }
        Ok(Manifest {
            format: DUMP_FORMAT,
            collection: owner.collection.to_string(),
            epoch: owner.epoch,
            lineage: format!("{:032x}", owner.lineage),
            basename: BASENAME.to_string(),
            points: graph.len(),
            items,
            dimension: graph.hnsw.shape().dimension,
            max_connections: params.max_connections,
            ef_construction: params.ef_construction,
            files,
        })
    }

    fn publish(&self, dir: &Path, name: &str, manifest: &Manifest) -> Result<()> {
        let manifest_path = dir.join(MANIFEST_FILE);
        let json = serde_json::to_vec_pretty(manifest).map_err(|e| io_error(dir, e))?;
        write_synced(&manifest_path, &json)?;
        sync_file(dir).map_err(|e| io_error(dir, e))?;

        let temp = self.root.join(format!("{CURRENT_FILE}.tmp"));
        write_synced(&temp, name.as_bytes())?;
        let current = self.root.join(CURRENT_FILE);
        fs::rename(&temp, &current).map_err(|e| io_error(&current, e))?;
        sync_file(&self.root).map_err(|e| io_error(&self.root, e))
    }

    /// Deletes every dump directory except `keep`; failures only cost disk space.
    pub fn remove_stale(&self, keep: Option<&str>) {
        let Ok(entries) = fs::read_dir(&self.root) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_dump = name.starts_with("dump-") && entry.path().is_dir();
            if is_dump && Some(name.as_str()) != keep {
                if let Err(e) = fs::remove_dir_all(entry.path()) {
                    tracing::warn!(path = %entry.path().display(), error = %e, "stale dump kept");
                }
            }
        }
    }

    /// Name of the current dump directory when one is recorded.
    pub fn current(&self) -> Option<String> {
        self.current_name()
    }

    /// Collection id and write epoch that the current dump's manifest records, whether or
    /// not the dump itself can be loaded with today's settings; `None` when there is no
    /// current dump or its manifest is unreadable.
    pub fn recorded_owner(&self) -> Option<(String, u64)> {
        let dir = self.root.join(self.current_name()?);
        let manifest = read_manifest(&dir).ok()?;
        Some((manifest.collection, manifest.epoch))
    }

    /// Loads the current dump (graph and live items) if it has `dimension`, was built with
    /// the graph parameters of `params` and every checksum matches; otherwise returns why
    /// not. The caller compares [`LoadedDump::epoch`] with the store's epoch.
    pub fn load(
        &self,
        dimension: usize,
        params: &HnswParams,
    ) -> std::result::Result<LoadedDump, String> {
        let name = self.current_name().ok_or("no current dump")?;
        let dir = self.root.join(&name);
        let manifest = read_manifest(&dir)?;
        let expected = (DUMP_FORMAT, dimension);
        let found = (manifest.format, manifest.dimension);
        if expected != found {
            return Err(format!(
                "dump has format/dimension {found:?}, need {expected:?}"
            ));
        }
        let shape = (manifest.max_connections, manifest.ef_construction);
        if shape != (params.max_connections, params.ef_construction) {
            return Err(format!("dump was built with connections/ef {shape:?}"));
        }

        check_lengths(&dir, &manifest)?;
        let (graph, items) = reload(&dir, &manifest, dimension, params)?;
        let found = (graph.len(), items.len());
        if found != (manifest.points, manifest.items) {
            return Err(format!(
                "dump holds {found:?} points and items, manifest says {:?}",
                (manifest.points, manifest.items)
            ));
        }
        check_items(&graph, &items)?;
        Ok(LoadedDump {
            collection: manifest.collection,
            epoch: manifest.epoch,
            lineage: u128::from_str_radix(&manifest.lineage, 16).ok(),
            graph,
            items,
        })
    }
}

/// Checks that every dumped item sits on its own slot of the graph, so that an item list
/// which passed its checksum but does not fit the graph (an item on a slot the graph lacks,
/// two items on one slot) is refused rather than trusted.
fn check_items(graph: &Graph, items: &DumpedItems) -> std::result::Result<(), String> {
    let mut slots = graph.slots();
    slots.sort_unstable();
    let mut taken = vec![false; slots.len()];
    for (slot, info) in items {
        let position = slots.binary_search(slot).ok();
        let Some(position) = position.filter(|&p| !taken[p]) else {
            return Err(format!(
                "item {:?} is on slot {slot}, which no free node has",
                info.id
            ));
        };
        taken[position] = true;
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut file = File::create(path).map_err(|e| io_error(path, e))?;
    file.write_all(bytes).map_err(|e| io_error(path, e))?;
    file.sync_all().map_err(|e| io_error(path, e))
}

fn read_manifest(dir: &Path) -> std::result::Result<Manifest, String> {
    let bytes = fs::read(dir.join(MANIFEST_FILE)).map_err(|e| format!("manifest: {e}"))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("manifest: {e}"))
}

/// Checks the file list and lengths against the manifest, and that the point count fits the
/// vector file, so that a damaged manifest never sizes an allocation (cheap, before any read).
fn check_lengths(dir: &Path, manifest: &Manifest) -> std::result::Result<(), String> {
    let expected = dump_files(&manifest.basename);
    let listed: Vec<&str> = manifest.files.iter().map(|f| f.name.as_str()).collect();
    if listed != expected.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(format!("manifest lists files {listed:?}"));
    }
    for file in &manifest.files {
        let len = fs::metadata(dir.join(&file.name)).map(|m| m.len());
        if len.as_ref().ok() != Some(&file.len) {
            return Err(format!(
                "{} has length {len:?}, expected {}",
                file.name, file.len
            ));
        }
    }
    let per_point = 8 + 4 * manifest.dimension as u64;
    let fits = (manifest.points as u64).checked_mul(per_point);
    if fits.is_none_or(|bytes| bytes > manifest.files[1].len) {
        return Err(format!(
            "{} points cannot fit the vector file",
            manifest.points
        ));
    }
    Ok(())
}

fn write_items(path: &Path, items: &[(u64, &SlotInfo)]) -> Result<()> {
    let file = File::create(path).map_err(|e| io_error(path, e))?;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, file);
    bincode::serialize_into(&mut out, items).map_err(|e| io_error(path, e))?;
    out.flush().map_err(|e| io_error(path, e))
}

/// Reads the items file whole; returns its checksum and bytes.
fn read_items(path: &Path) -> std::result::Result<(String, Vec<u8>), String> {
    let bytes = fs::read(path).map_err(|e| format!("items: {e}"))?;
    Ok((checksum::of(&bytes), bytes))
}

/// Reads the three files in parallel (each hashed while read), compares the checksums
/// with the manifest and assembles the graph, with room for a quarter more nodes before
/// the first copy. The items are decoded only after their checksum matched.
fn reload(
    dir: &Path,
    manifest: &Manifest,
    dimension: usize,
    params: &HnswParams,
) -> std::result::Result<(Graph, DumpedItems), String> {
    let started = std::time::Instant::now();
    let spare = manifest.points / 4 + 1024;
    let paths = dump_files(&manifest.basename).map(|n| dir.join(n));
    let (graph, vectors, items) = std::thread::scope(|scope| {
        let graph = scope.spawn(|| GraphFile::read(&paths[0], spare));
        let items = scope.spawn(|| read_items(&paths[2]));
        let vectors = VectorFile::read(&paths[1], spare);
        let panicked = |what: &str| format!("{what} reader panicked");
        let graph = graph.join().map_err(|_| panicked("graph"));
        let items = items.join().map_err(|_| panicked("items"));
        (graph.and_then(|g| g), vectors, items.and_then(|i| i))
    });
    let (graph, vectors, (items_sum, items)) = (graph?, vectors?, items?);
    let mapped = vectors.is_mapped();
    let elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(
        mapped,
        points = manifest.points,
        elapsed_ms,
        "graph dump read"
    );
    let sums = [&graph.checksum, &vectors.checksum, &items_sum];
    for (file, sum) in manifest.files.iter().zip(sums) {
        if *sum != file.checksum {
            return Err(format!("{} checksum mismatch", file.name));
        }
    }
    let shape = Shape {
        dimension,
        max_connections: params.max_connections,
        ef_construction: params.ef_construction,
    };
    let items = bincode::deserialize(&items).map_err(|e| format!("items: {e}"))?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(elapsed_ms, "dumped items decoded");
    let hnsw = Hnsw::from_files(shape, graph, vectors, spare)?;
    let elapsed_ms = started.elapsed().as_millis() as u64;
    tracing::debug!(elapsed_ms, "graph assembled");
    Ok((Graph { hnsw }, items))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ItemKind;

    fn item(slot: u64, id: &str) -> (u64, SlotInfo) {
        let info = SlotInfo {
            id: id.into(),
            kind: ItemKind::Text,
            metadata: Default::default(),
        };
        (slot, info)
    }

    #[test]
    fn dumped_items_must_each_sit_on_their_own_graph_slot() {
        let graph = Graph::new(&HnswParams::default(), 2, 8);
        let vectors = [[1.0f32, 0.0], [0.0, 1.0], [0.6, 0.8]];
        let nodes: Vec<(&[f32], u64)> = vectors
            .iter()
            .zip([7, 3, 11])
            .map(|(v, s)| (&v[..], s))
            .collect();
        graph.insert(&nodes);

        assert!(check_items(&graph, &vec![item(11, "a"), item(3, "b")]).is_ok());
        let twice = check_items(&graph, &vec![item(3, "a"), item(3, "b")]);
        assert!(twice.unwrap_err().contains("\"b\""));
        let absent = check_items(&graph, &vec![item(1 << 40, "c")]);
        assert!(absent.unwrap_err().contains("\"c\""));
    }
}
