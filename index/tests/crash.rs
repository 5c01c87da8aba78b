//! Crash safety: a child process writes batches and reports each acknowledged one; the
//! parent kills it with SIGKILL at random moments, reopens the collection and checks that
//! every acknowledged write is there with its exact vector.
//!
//! The child is this test binary re-executed with `CHILD_DIR_ENV` set, running the ignored
//! test `child_writer`.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{hash_of, item, request};
use mplug_index::{Collection, Item};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHILD_DIR_ENV: &str = "MPLUG_INDEX_CRASH_DIR";
const CHILD_ROUND_ENV: &str = "MPLUG_INDEX_CRASH_ROUND";
const DIM: usize = 16;
const NEW_PER_BATCH: usize = 40;
const ROUNDS: u64 = 24;
/// Items of the previous batch replaced (version 1) and deleted in each batch.
const REPLACED: [usize; 3] = [1, 5, 9];
const DELETED: [usize; 2] = [2, 7];

fn id(round: u64, batch: u64, i: usize) -> String {
    format!("r{round}-b{batch}-i{i}")
}

/// Deterministic unit vector for an id and version.
fn vector_for(id: &str, version: u32) -> Vec<f32> {
    let seed = u64::from_le_bytes(hash_of(id, version)[..8].try_into().unwrap());
    let mut rng = StdRng::seed_from_u64(seed);
    let v: Vec<f32> = (0..DIM).map(|_| rng.gen_range(-1.0f32..1.0)).collect();
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.into_iter().map(|x| x / norm).collect()
}

fn versioned(id: &str, version: u32) -> Item {
    let mut it = item(id, vector_for(id, version));
    it.content_hash = hash_of(id, version);
    it.payload = Some(id.as_bytes().to_vec());
    it
}

/// Writes one batch: new items, then replacements and deletes in the previous batch.
fn write_batch(collection: &Collection, round: u64, batch: u64) {
    let items = (0..NEW_PER_BATCH).map(|i| versioned(&id(round, batch, i), 0));
    collection.upsert(items.collect()).unwrap();
    if batch == 0 {
        return;
    }
    let replaced = REPLACED
        .iter()
        .map(|&i| versioned(&id(round, batch - 1, i), 1));
    collection.upsert(replaced.collect()).unwrap();
    for i in DELETED {
        collection.delete(&id(round, batch - 1, i)).unwrap();
    }
}

#[test]
#[ignore = "child process of killed_writer_never_loses_acknowledged_batches"]
fn child_writer() {
    let (Ok(dir), Ok(round)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_ROUND_ENV))
    else {
        return;
    };
    let round: u64 = round.parse().unwrap();
    let collection = common::open(Path::new(&dir), DIM);
    println!("OPENED");
    for batch in 0.. {
        write_batch(&collection, round, batch);
        println!("ACK {batch}");
        if batch % 5 == 4 {
            collection.dump_graph().unwrap();
        }
        if batch % 11 == 10 {
            collection.compact().unwrap();
        }
    }
}

/// Runs one child, kills it after a random delay, returns the acknowledged batch count.
fn run_child(dir: &Path, round: u64, rng: &mut StdRng) -> u64 {
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_writer",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (sender, receiver) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = sender.send(line);
        }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let opened = std::iter::from_fn(|| {
        let left = deadline.saturating_duration_since(Instant::now());
        receiver.recv_timeout(left).ok()
    })
    .any(|line| line.ends_with("OPENED"));
    assert!(opened, "child failed to open in round {round}");
    std::thread::sleep(Duration::from_millis(rng.gen_range(5..400)));
    child.kill().unwrap();
    child.wait().unwrap();
    reader.join().unwrap();

    let acked = receiver
        .try_iter()
        .filter_map(|line| line.rsplit_once("ACK ")?.1.trim().parse().ok());
    acked.max().map_or(0, |last: u64| last + 1)
}

/// Checks every write of the acknowledged batches; the first unacknowledged batch's new
/// items must be all present or all absent (a batch is atomic).
fn verify(collection: &Collection, round: u64, acked: u64) {
    for batch in 0..acked {
        // The unacknowledged next batch may have replaced or deleted items of the last
        // acknowledged one before the kill.
        let settled = batch + 1 < acked;
        for i in 0..NEW_PER_BATCH {
            let id = id(round, batch, i);
            let got = collection.get(&id).unwrap();
            let touched = REPLACED.contains(&i) || DELETED.contains(&i);
            let versions: &[u32] = match (settled, touched) {
                (true, true) if DELETED.contains(&i) => &[],
                (true, true) => &[1],
                (false, true) => &[0, 1],
                (_, false) => &[0],
            };
            let Some(got) = got else {
                assert!(DELETED.contains(&i), "acknowledged {id} is missing");
                continue;
            };
            assert!(!versions.is_empty(), "{id} was deleted but is present");
            let matches = |version: &u32| {
                let expected = vector_for(&id, *version);
                let close = got
                    .vector
                    .iter()
                    .zip(&expected)
                    .all(|(a, b)| (a - b).abs() < 1e-6);
                close && got.content_hash == hash_of(&id, *version)
            };
            assert!(versions.iter().any(matches), "{id} has the wrong vector");
            assert_eq!(got.payload.as_deref(), Some(id.as_bytes()));
        }
    }
    let pending: BTreeSet<bool> = (0..NEW_PER_BATCH)
        .map(|i| collection.contains(&id(round, acked, i), &hash_of(&id(round, acked, i), 0)))
        .map(Result::unwrap)
        .collect();
    assert!(
        pending.len() <= 1,
        "batch {acked} of round {round} was applied partially"
    );
}

#[test]
fn killed_writer_never_loses_acknowledged_batches() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = StdRng::seed_from_u64(0xC0FFEE);
    let started = Instant::now();
    let mut rounds = Vec::new();

    for round in 0..ROUNDS {
        let acked = run_child(dir.path(), round, &mut rng);
        rounds.push(acked);
        let collection = common::open(dir.path(), DIM);
        for (past, &acked) in rounds.iter().enumerate() {
            verify(&collection, past as u64, acked);
        }
        let probe = id(round, 0, 0);
        if acked > 1 {
            let found = common::ids(&collection, &request(&vector_for(&probe, 0), 1));
            assert_eq!(found, vec![probe], "graph lost an acknowledged item");
        }
        drop(collection);
    }
    let total: u64 = rounds.iter().sum();
    println!(
        "{ROUNDS} rounds, {total} acknowledged batches in {:?}",
        started.elapsed()
    );
    assert!(
        total > 0,
        "no child acknowledged anything; the test checked nothing"
    );
}
