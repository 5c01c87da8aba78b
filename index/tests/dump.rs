//! The graph dump is a cache: a damaged, missing or stale dump makes open rebuild the graph
//! from the stored items, never fail. A store that holds fewer writes than its dump is
//! refused instead, keeping the dump.

mod common;

use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};

use common::{ids, item, open, request, settings, unit_vectors};
use mplug_index::{Collection, Error, GraphOrigin};

const DIM: usize = 24;
const COUNT: usize = 1_500;

fn populated(dir: &Path) -> Vec<Vec<f32>> {
    let vectors = unit_vectors(COUNT, DIM, 21);
    let collection = open(dir, DIM);
    let items = (0..COUNT).map(|i| item(&i.to_string(), vectors[i].clone()));
    collection.upsert(items.collect()).unwrap();
    collection.close().unwrap();
    vectors
}

/// Files of the current dump directory.
fn dump_file(dir: &Path, suffix: &str) -> PathBuf {
    let graph = dir.join("graph");
    let current = fs::read_to_string(graph.join("CURRENT")).unwrap();
    let dump = graph.join(current.trim());
    fs::read_dir(&dump)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.to_string_lossy().ends_with(suffix))
        .unwrap()
}

/// Reopens, expects `origin`, checks every item is found, then closes (dumping again).
fn reopen_and_check(dir: &Path, vectors: &[Vec<f32>], origin: GraphOrigin) {
    let collection = open(dir, DIM);
    assert_eq!(collection.graph_origin(), origin);
    assert_eq!(collection.stats().unwrap().images, COUNT as u64);
    for i in (0..COUNT).step_by(37) {
        assert_eq!(
            ids(&collection, &request(&vectors[i], 1)),
            vec![i.to_string()]
        );
    }
    collection.close().unwrap();
}

#[test]
fn flipped_bytes_in_the_graph_file_force_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let path = dump_file(dir.path(), ".hnsw.graph");
    let mut bytes = fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle..middle + 16]
        .iter_mut()
        .for_each(|b| *b ^= 0xA5);
    fs::write(&path, bytes).unwrap();

    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Reloaded);
}

#[test]
fn truncated_data_file_forces_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let path = dump_file(dir.path(), ".hnsw.data");
    let len = fs::metadata(&path).unwrap().len();
    let file = OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(len / 3).unwrap();

    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);
}

#[test]
fn garbage_manifest_pointer_or_missing_dump_forces_a_rebuild() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let manifest = dump_file(dir.path(), "manifest.json");
    let mut fields: serde_json::Value =
        serde_json::from_slice(&fs::read(&manifest).unwrap()).unwrap();
    fields["points"] = serde_json::json!(1u64 << 50);
    fs::write(&manifest, serde_json::to_vec(&fields).unwrap()).unwrap();
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);

    fs::write(dump_file(dir.path(), "manifest.json"), b"{ not json").unwrap();
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);

    fs::write(dir.path().join("graph/CURRENT"), b"../../etc").unwrap();
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);

    fs::remove_dir_all(dir.path().join("graph")).unwrap();
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);
}

#[test]
fn a_dump_of_another_collection_is_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let other = tempfile::tempdir().unwrap();
    let collection = open(other.path(), DIM);
    let foreign = unit_vectors(COUNT, DIM, 22);
    let items = (0..COUNT).map(|i| item(&format!("other-{i}"), foreign[i].clone()));
    collection.upsert(items.collect()).unwrap();
    collection.close().unwrap();

    fs::remove_dir_all(dir.path().join("graph")).unwrap();
    copy_into(&other.path().join("graph"), dir.path());
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Reloaded);
}

/// Copies `from` (a directory) into `into`, as `cp -a`.
fn copy_into(from: &Path, into: &Path) {
    let copied = std::process::Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(into)
        .status()
        .unwrap();
    assert!(copied.success());
}

#[test]
fn a_dump_of_a_diverged_copy_is_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let copy = tempfile::tempdir().unwrap();
    copy_into(&dir.path().join("."), copy.path());
    // The same writes on the same ids on both sides, so the same epochs, slots and ids, but
    // another vector for the new item.
    let extra = unit_vectors(2, DIM, 23);
    for (path, vector) in [(dir.path(), &extra[0]), (copy.path(), &extra[1])] {
        let collection = open(path, DIM);
        assert_eq!(collection.graph_origin(), GraphOrigin::Reloaded);
        collection.delete("1").unwrap();
        collection
            .upsert(vec![item("new", vector.clone())])
            .unwrap();
        collection.close().unwrap();
    }

    fs::remove_dir_all(dir.path().join("graph")).unwrap();
    copy_into(&copy.path().join("graph"), dir.path());
    let collection = open(dir.path(), DIM);
    assert_eq!(collection.graph_origin(), GraphOrigin::Rebuilt);
    assert_eq!(ids(&collection, &request(&vectors[2], 1)), vec!["2"]);
    assert_eq!(ids(&collection, &request(&extra[0], 1)), vec!["new"]);
    assert!(!ids(&collection, &request(&vectors[1], 5)).contains(&"1".to_string()));
}

/// Opens `dir` expecting the refusal of a store that lost acknowledged writes, with the
/// collection's settings and with graph parameters the dump was not built with; the dump
/// that still holds the writes must survive every attempt.
fn assert_refused_as_behind(dir: &Path) {
    let mut other_shape = settings(DIM);
    other_shape.hnsw.ef_construction += 1;
    for settings in [settings(DIM), other_shape] {
        let Err(error) = Collection::open(dir, settings) else {
            panic!("a store behind its dump was opened");
        };
        assert!(matches!(error, Error::Storage { .. }), "{error}");
        assert!(
            error.to_string().contains("lost acknowledged writes"),
            "{error}"
        );
        let current = fs::read_to_string(dir.join("graph").join("CURRENT")).unwrap();
        assert!(dir.join("graph").join(current.trim()).exists());
    }
}

#[test]
fn a_store_that_lost_every_write_is_refused_and_its_dump_kept() {
    let dir = tempfile::tempdir().unwrap();
    populated(dir.path());
    fs::remove_dir_all(dir.path().join("items.sled")).unwrap();

    assert_refused_as_behind(dir.path());
    assert_refused_as_behind(dir.path());

    fs::remove_dir_all(dir.path().join("graph")).unwrap();
    let collection = open(dir.path(), DIM);
    assert_eq!(collection.graph_origin(), GraphOrigin::Empty);
}

#[test]
fn a_store_older_than_its_dump_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let backup = tempfile::tempdir().unwrap();
    copy_into(&dir.path().join("items.sled"), backup.path());
    let collection = open(dir.path(), DIM);
    collection.delete("5").unwrap();
    collection.close().unwrap();
    fs::remove_dir_all(dir.path().join("items.sled")).unwrap();
    copy_into(&backup.path().join("items.sled"), dir.path());

    assert_refused_as_behind(dir.path());

    fs::remove_dir_all(dir.path().join("graph")).unwrap();
    reopen_and_check(dir.path(), &vectors, GraphOrigin::Rebuilt);
}

#[test]
fn dump_older_than_the_last_write_is_not_reloaded() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let collection = open(dir.path(), DIM);
    assert_eq!(collection.graph_origin(), GraphOrigin::Reloaded);
    collection.delete("3").unwrap();
    drop(collection);

    let reopened = open(dir.path(), DIM);
    assert_eq!(reopened.graph_origin(), GraphOrigin::Rebuilt);
    assert_eq!(reopened.stats().unwrap().images, COUNT as u64 - 1);
    assert!(!ids(&reopened, &request(&vectors[3], 5)).contains(&"3".to_string()));
    assert_eq!(ids(&reopened, &request(&vectors[4], 1)), vec!["4"]);
}

#[test]
fn reload_restores_ids_kinds_metadata_and_slots_from_the_dump() {
    use mplug_index::{Filter, ItemKind};
    use std::collections::BTreeMap;

    let dir = tempfile::tempdir().unwrap();
    let vectors = unit_vectors(400, DIM, 31);
    let tagged = |i: usize| {
        let mut it = item(&format!("t{i}"), vectors[i].clone());
        it.kind = if i.is_multiple_of(2) {
            ItemKind::Image
        } else {
            ItemKind::Text
        };
        let group = if i.is_multiple_of(4) { "four" } else { "rest" };
        it.metadata = BTreeMap::from([("group".to_string(), group.to_string())]);
        it
    };
    let collection = open(dir.path(), DIM);
    collection.upsert((0..300).map(tagged).collect()).unwrap();
    collection.delete("t0").unwrap();
    collection.close().unwrap();

    let collection = open(dir.path(), DIM);
    assert_eq!(collection.graph_origin(), GraphOrigin::Reloaded);
    let stats = collection.stats().unwrap();
    assert_eq!((stats.images, stats.texts), (149, 150));
    let mut wanted = request(&vectors[8], 5);
    wanted.filter = Filter {
        kinds: Some(vec![ItemKind::Image]),
        metadata: BTreeMap::from([("group".to_string(), "four".to_string())]),
    };
    let hits = collection.search(&wanted).unwrap();
    assert_eq!(hits[0].id, "t8");
    assert!(hits
        .iter()
        .all(|h| h.kind == ItemKind::Image && h.metadata["group"] == "four"));
    assert!(!ids(&collection, &request(&vectors[0], 5)).contains(&"t0".to_string()));

    collection.upsert((300..400).map(tagged).collect()).unwrap();
    let mut moved = tagged(5);
    moved.vector = vectors[399].clone();
    moved.content_hash = common::hash_of("t5", 1);
    collection.upsert(vec![moved]).unwrap();
    collection.close().unwrap();

    let collection = open(dir.path(), DIM);
    assert_eq!(collection.graph_origin(), GraphOrigin::Reloaded);
    assert_eq!(
        collection.stats().unwrap().images + collection.stats().unwrap().texts,
        399
    );
    assert_eq!(ids(&collection, &request(&vectors[350], 1)), vec!["t350"]);
    let near_399 = ids(&collection, &request(&vectors[399], 2));
    assert!(near_399.contains(&"t5".to_string()) && near_399.contains(&"t399".to_string()));
    assert!(!ids(&collection, &request(&vectors[5], 3)).contains(&"t5".to_string()));
}

/// An open reads the dump while it waits for the store's lock; when the process holding
/// the lock writes a newer dump before letting go, the open reloads that one.
#[test]
fn an_open_waiting_for_the_lock_reloads_the_dump_written_meanwhile() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = populated(dir.path());
    let first = open(dir.path(), DIM);
    first
        .upsert(vec![item("late", vectors[0].clone())])
        .unwrap();

    let path = dir.path().to_path_buf();
    let opener = std::thread::spawn(move || open(&path, DIM));
    std::thread::sleep(std::time::Duration::from_millis(300));
    first.close().unwrap();

    let second = opener.join().unwrap();
    assert_eq!(second.graph_origin(), GraphOrigin::Reloaded);
    let found = ids(&second, &request(&vectors[0], 2));
    assert!(found.contains(&"late".to_string()), "{found:?}");
}
