//! Behaviour of a collection: upserts, reads, deletes, validation, compaction, reopening.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use common::{hash_of, ids, item, open, request, settings, unit_vectors};
use mplug_index::{
    Collection, Error, Filter, GraphOrigin, ItemKind, Settings, UpsertOutcome, MAX_EF,
};

const DIM: usize = 32;

#[test]
fn upsert_reports_inserted_unchanged_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), DIM);
    let vectors = unit_vectors(3, DIM, 1);

    let first = collection
        .upsert(vec![item("a", vectors[0].clone())])
        .unwrap();
    assert_eq!(first, vec![UpsertOutcome::Inserted]);
    let again = collection
        .upsert(vec![item("a", vectors[0].clone())])
        .unwrap();
    assert_eq!(again, vec![UpsertOutcome::Unchanged]);
    assert_eq!(
        collection.stats().unwrap().graph_epoch,
        1,
        "a no-op must not write"
    );

    let mut changed = item("a", vectors[1].clone());
    changed.content_hash = hash_of("a", 1);
    let replaced = collection.upsert(vec![changed]).unwrap();
    assert_eq!(replaced, vec![UpsertOutcome::Replaced]);
    let stored = collection.get("a").unwrap().unwrap();
    assert_eq!(stored.vector, vectors[1]);
    assert!(collection.contains("a", &hash_of("a", 1)).unwrap());
    assert!(!collection.contains("a", &hash_of("a", 0)).unwrap());
}

#[test]
fn get_returns_payload_and_metadata_and_hash_lookup_finds_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), DIM);
    let vectors = unit_vectors(2, DIM, 2);
    let mut a = item("a", vectors[0].clone());
    a.payload = Some(b"image bytes".to_vec());
    a.metadata.insert("album".into(), "x".into());
    let mut b = item("b", vectors[1].clone());
    b.content_hash = a.content_hash;
    collection.upsert(vec![a.clone(), b]).unwrap();

    let got = collection.get("a").unwrap().unwrap();
    assert_eq!(got.payload.as_deref(), Some(&b"image bytes"[..]));
    assert_eq!(got.metadata, a.metadata);
    assert_eq!(collection.get("missing").unwrap(), None);
    assert_eq!(
        collection.find_by_hash(&a.content_hash).unwrap(),
        vec!["a", "b"]
    );
}

#[test]
fn invalid_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), DIM);
    let good = unit_vectors(1, DIM, 3).remove(0);

    let wrong = collection.upsert(vec![item("a", vec![1.0; DIM + 1])]);
    assert!(matches!(
        wrong,
        Err(Error::WrongDimension {
            got: 33,
            expected: 32,
            ..
        })
    ));
    let mut nan = good.clone();
    nan[4] = f32::NAN;
    let nan = collection.upsert(vec![item("a", nan)]);
    assert!(matches!(nan, Err(Error::NonFinite { position: 4, .. })));
    let zero = collection.upsert(vec![item("a", vec![0.0; DIM])]);
    assert!(matches!(zero, Err(Error::ZeroVector { .. })));
    let empty = collection.upsert(vec![item("", good.clone())]);
    assert!(matches!(
        empty,
        Err(Error::InvalidArgument { field: "id", .. })
    ));

    for k in [0, mplug_index::MAX_K + 1] {
        let bad_k = collection.search(&request(&good, k));
        assert!(matches!(
            bad_k,
            Err(Error::InvalidArgument { field: "k", .. })
        ));
    }
    let mut bad_ef = request(&good, 1);
    bad_ef.ef = Some(0);
    assert!(matches!(
        collection.search(&bad_ef),
        Err(Error::InvalidArgument { field: "ef", .. })
    ));
    let missing = collection.delete("nope");
    assert!(matches!(missing, Err(Error::UnknownId { id }) if id == "nope"));
    assert_eq!(
        collection.stats().unwrap().images,
        0,
        "rejected batches write nothing"
    );
}

/// A setting's name and a change that puts it out of range.
type OutOfRange = (&'static str, fn(&mut Settings));

#[test]
fn out_of_range_graph_settings_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [OutOfRange; 4] = [
        ("max_connections", |s| s.hnsw.max_connections = 1),
        ("ef_construction", |s| s.hnsw.ef_construction = 4),
        ("ef_construction", |s| s.hnsw.ef_construction = MAX_EF + 1),
        ("ef_search", |s| s.hnsw.ef_search = MAX_EF + 1),
    ];
    for (field, change) in cases {
        let mut wrong = settings(DIM);
        change(&mut wrong);
        let result = Collection::open(dir.path(), wrong);
        assert!(
            matches!(&result, Err(Error::InvalidArgument { field: f, .. }) if *f == field),
            "{field}: {:?}",
            result.err()
        );
    }
    open(dir.path(), DIM).close().unwrap();
}

#[test]
fn settings_mismatch_names_both_values() {
    let dir = tempfile::tempdir().unwrap();
    open(dir.path(), DIM).close().unwrap();

    let err = Collection::open(dir.path(), settings(DIM * 2))
        .err()
        .unwrap();
    let message = err.to_string();
    assert!(
        message.contains("32") && message.contains("64"),
        "{message}"
    );
    let mut other_model = settings(DIM);
    other_model.model_id = "other-model".into();
    let err = Collection::open(dir.path(), other_model).err().unwrap();
    assert!(matches!(
        &err,
        Error::SettingsMismatch {
            field: "model_id",
            ..
        }
    ));
    let message = err.to_string();
    assert!(
        message.contains("test-model") && message.contains("other-model"),
        "{message}"
    );
}

#[test]
fn deleted_and_replaced_vectors_are_never_returned() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), DIM);
    let vectors = unit_vectors(400, DIM, 4);
    let items = (0..200)
        .map(|i| item(&format!("{i}"), vectors[i].clone()))
        .collect();
    collection.upsert(items).unwrap();

    for i in (0..200).step_by(3) {
        collection.delete(&format!("{i}")).unwrap();
    }
    for i in (1..200).step_by(3) {
        let mut moved = item(&format!("{i}"), vectors[200 + i].clone());
        moved.content_hash = hash_of(&format!("{i}"), 1);
        collection.upsert(vec![moved]).unwrap();
    }

    for i in 0..200 {
        let id = format!("{i}");
        let found = ids(&collection, &request(&vectors[i], 5));
        let stale = i % 3 != 2 && found.first() == Some(&id);
        assert!(!stale, "old vector of {id} was returned");
        if i % 3 == 0 {
            assert!(!found.contains(&id), "deleted {id} was returned");
        }
        if i % 3 == 1 {
            assert_eq!(ids(&collection, &request(&vectors[200 + i], 1)), vec![id]);
        }
    }
}

#[test]
fn compaction_keeps_every_live_item_and_drops_tombstones() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), DIM);
    let vectors = unit_vectors(300, DIM, 5);
    let items = (0..300)
        .map(|i| item(&format!("{i}"), vectors[i].clone()))
        .collect();
    collection.upsert(items).unwrap();
    for i in (0..300).step_by(5) {
        collection.delete(&format!("{i}")).unwrap();
    }

    collection.compact().unwrap();
    let stats = collection.stats().unwrap();
    assert_eq!(
        (stats.images, stats.tombstones, stats.graph_points),
        (240, 0, 240)
    );
    for i in (0..300).filter(|i| i % 5 != 0) {
        let exact = ids(&collection, &request(&vectors[i], 1));
        assert_eq!(exact, vec![format!("{i}")]);
    }
}

#[test]
fn tombstone_ratio_triggers_background_compaction() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), DIM);
    let vectors = unit_vectors(400, DIM, 6);
    let items = (0..400)
        .map(|i| item(&format!("{i}"), vectors[i].clone()))
        .collect();
    collection.upsert(items).unwrap();
    for i in 0..150 {
        collection.delete(&format!("{i}")).unwrap();
    }

    collection.close().unwrap();

    let reopened = open(dir.path(), DIM);
    assert_eq!(reopened.graph_origin(), GraphOrigin::Reloaded);
    let stats = reopened.stats().unwrap();
    assert_eq!(stats.images, 250);
    assert!(
        stats.tombstones < 150,
        "compaction should have run: {stats:?}"
    );
    assert_eq!(stats.graph_points, 250 + stats.tombstones);
}

#[test]
fn reopen_after_clean_close_reloads_the_graph() {
    let dir = tempfile::tempdir().unwrap();
    let vectors = unit_vectors(500, DIM, 7);
    let collection = open(dir.path(), DIM);
    assert_eq!(collection.graph_origin(), GraphOrigin::Empty);
    let items = (0..500)
        .map(|i| item(&format!("{i}"), vectors[i].clone()))
        .collect();
    collection.upsert(items).unwrap();
    collection.delete("7").unwrap();
    collection.close().unwrap();

    let reopened = open(dir.path(), DIM);
    assert_eq!(reopened.graph_origin(), GraphOrigin::Reloaded);
    let stats = reopened.stats().unwrap();
    assert_eq!(
        (stats.images, stats.tombstones, stats.dumped_epoch),
        (499, 1, Some(2))
    );
    assert_eq!(ids(&reopened, &request(&vectors[42], 1)), vec!["42"]);
    assert!(!ids(&reopened, &request(&vectors[7], 3)).contains(&"7".to_string()));

    reopened
        .upsert(vec![item("new", vectors[7].clone())])
        .unwrap();
    assert_eq!(ids(&reopened, &request(&vectors[7], 1)), vec!["new"]);
}

#[test]
fn kind_filter_and_exact_search_agree_with_graph_search() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), DIM);
    let vectors = unit_vectors(600, DIM, 8);
    let items = (0..600)
        .map(|i| {
            let mut it = item(&format!("{i}"), vectors[i].clone());
            it.kind = if i % 2 == 0 {
                ItemKind::Image
            } else {
                ItemKind::Text
            };
            it
        })
        .collect();
    collection.upsert(items).unwrap();

    let mut texts = request(&vectors[10], 10);
    texts.filter = Filter {
        kinds: Some(vec![ItemKind::Text]),
        metadata: BTreeMap::new(),
    };
    let hits = collection.search(&texts).unwrap();
    assert_eq!(hits.len(), 10);
    assert!(hits.iter().all(|h| h.kind == ItemKind::Text));
    let mut exact = texts.clone();
    exact.exact = true;
    let exact_hits = collection.search(&exact).unwrap();
    assert_eq!(exact_hits.len(), 10);
    assert!(exact_hits.windows(2).all(|w| w[0].score >= w[1].score));
    let missing_kind = Filter {
        kinds: Some(vec![]),
        metadata: BTreeMap::new(),
    };
    let mut none = request(&vectors[0], 3);
    none.filter = missing_kind;
    assert!(collection.search(&none).unwrap().is_empty());
}

#[test]
fn searches_run_while_one_writer_upserts() {
    let dir = tempfile::tempdir().unwrap();
    let collection = Arc::new(open(dir.path(), DIM));
    let vectors = unit_vectors(2_000, DIM, 9);
    let first = (0..500)
        .map(|i| item(&format!("{i}"), vectors[i].clone()))
        .collect();
    collection.upsert(first).unwrap();
    let done = Arc::new(AtomicBool::new(false));

    let readers: Vec<_> = (0..3)
        .map(|r| {
            let (collection, done, vectors) = (collection.clone(), done.clone(), vectors.clone());
            std::thread::spawn(move || {
                let mut searches = 0;
                while !done.load(Ordering::Acquire) || searches < 50 {
                    let q = &vectors[(searches * 7 + r) % 500];
                    assert_eq!(collection.search(&request(q, 5)).unwrap().len(), 5);
                    searches += 1;
                }
            })
        })
        .collect();
    for start in (500..2_000).step_by(100) {
        let batch = (start..start + 100).map(|i| item(&format!("{i}"), vectors[i].clone()));
        collection.upsert(batch.collect()).unwrap();
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        reader.join().unwrap();
    }
    assert_eq!(collection.stats().unwrap().images, 2_000);
}

#[test]
fn a_replaced_item_stays_visible_to_searches_while_it_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let collection = open(dir.path(), 16);
    let vectors = unit_vectors(300, 16, 21);
    let id = |i: usize| format!("r{i}");
    let items = (0..300).map(|i| item(&id(i), vectors[i].clone()));
    collection.upsert(items.collect()).unwrap();

    // The writer goes on past 150 versions until the searcher has run 1000 searches, so
    // a slow or busy machine still interleaves that many searches with the rewrites.
    let stop = AtomicBool::new(false);
    let done = AtomicUsize::new(0);
    let (searched, missed) = std::thread::scope(|scope| {
        let searcher = scope.spawn(|| {
            let (mut searched, mut missed) = (0usize, Vec::new());
            for n in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = n % 300;
                let mut wanted = request(&vectors[i], 3);
                wanted.exact = n % 4 == 0;
                let found = ids(&collection, &wanted);
                if found.iter().filter(|f| **f == id(i)).count() != 1 {
                    missed.push((id(i), found));
                }
                searched += 1;
                done.store(searched, Ordering::Relaxed);
            }
            (searched, missed)
        });
        let mut version = 1u32;
        let searching = || done.load(Ordering::Relaxed) <= 1000 && !searcher.is_finished();
        while version < 150 || (searching() && version < 10_000) {
            let batch = (0..300).filter(|i| i % 3 == version as usize % 3).map(|i| {
                let mut rewritten = item(&id(i), vectors[i].clone());
                rewritten.content_hash = hash_of(&id(i), version);
                rewritten
            });
            collection.upsert(batch.collect()).unwrap();
            version += 1;
        }
        stop.store(true, Ordering::Relaxed);
        searcher.join().unwrap()
    });
    assert!(searched > 1000, "only {searched} searches ran");
    assert!(
        missed.is_empty(),
        "{} of {searched}: {:?}",
        missed.len(),
        &missed[..1]
    );
}
