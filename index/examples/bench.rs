//! Benchmark of the index against hnswlib on the same unit vectors.
//!
//! Run through `index/scripts/bench.sh`, which prepares a Python environment with hnswlib.
//! Each phase of our index runs in a fresh process (this binary re-executed) so that memory
//! and reopen time are measured from a cold start. Prints one table at the end.
//!
//! Reopen is timed twice on both sides, with the same page-cache state for both: "reopen"
//! after reading the files through (a restart soon after a close), "cold" after evicting the
//! files from the page cache (a restart after the system reclaimed them, or a reboot), which
//! measures the disk as much as the library.
//!
//! Two kinds of data (`--data`): `uniform` draws every component uniformly, the hardest case
//! for any graph index; `clustered` draws from a mixture of Gaussians around a few hundred
//! centres in a low-rank subspace plus a little full-rank noise, closer to real embeddings
//! whose intrinsic dimension is far below 256.
//!
//! `--rounds N` repeats the query phase N times, ours and hnswlib's alternating on the same
//! built indexes (hnswlib's saved one is loaded again), and reports each library's median QPS
//! and reopen time, which evens out a host whose speed drifts during the run. Our cold reopen
//! runs once, before the rounds; hnswlib's runs in every round (its median is shown).
//!
//! `--log FILTER` (a tracing filter such as `mplug_index=debug`) prints the index's events to
//! stderr with their time since start, phase children included, e.g. the steps of a reopen.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use mplug_index::{Collection, Filter, GraphOrigin, HnswParams, Item, ItemKind, Metric};
use mplug_index::{SearchRequest, Settings};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rayon::prelude::*;
use serde_json::{json, Value};

const K: usize = 10;
/// Score difference under which two results count as tied when judging recall.
const TIE: f64 = 1e-5;
const BATCH: usize = 10_000;

/// Command-line options; every one has a default.
#[derive(Debug, Clone)]
struct Options {
    sizes: Vec<usize>,
    dim: usize,
    queries: usize,
    efs: Vec<usize>,
    max_connections: usize,
    ef_construction: usize,
    work_dir: PathBuf,
    python: Option<PathBuf>,
    phase: Option<String>,
    size: usize,
    data: String,
    log: Option<String>,
    rounds: usize,
}

fn parse_list(value: &str) -> Vec<usize> {
    value
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

fn parse_options() -> Options {
    let mut o = Options {
        sizes: vec![100_000],
        dim: 256,
        queries: 1_000,
        efs: vec![16, 32, 64, 128, 256, 512],
        max_connections: HnswParams::default().max_connections,
        ef_construction: HnswParams::default().ef_construction,
        work_dir: PathBuf::from(".bench-data"),
        python: None,
        phase: None,
        size: 0,
        data: "uniform".to_string(),
        log: None,
        rounds: 1,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let (flag, value) = (pair[0].as_str(), pair.get(1).map_or("", String::as_str));
        match flag {
            "--sizes" => o.sizes = parse_list(value),
            "--dim" => o.dim = value.parse().unwrap_or(o.dim),
            "--queries" => o.queries = value.parse().unwrap_or(o.queries),
            "--efs" => o.efs = parse_list(value),
            "--m" => o.max_connections = value.parse().unwrap_or(o.max_connections),
            "--ef-construction" => o.ef_construction = value.parse().unwrap_or(o.ef_construction),
            "--work-dir" => o.work_dir = PathBuf::from(value),
            "--python" => o.python = Some(PathBuf::from(value)),
            "--phase" => o.phase = Some(value.to_string()),
            "--size" => o.size = value.parse().unwrap_or(0),
            "--data" => o.data = value.to_string(),
            "--log" => o.log = Some(value.to_string()),
            "--rounds" => o.rounds = value.parse::<usize>().unwrap_or(1).max(1),
            other => eprintln!("ignoring unknown flag {other}"),
        }
    }
    o
}

fn unit_vectors(count: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; count * dim];
    out.par_chunks_mut(dim).enumerate().for_each(|(i, v)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        v.iter_mut().for_each(|x| *x = rng.gen_range(-1.0f32..1.0));
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
    });
    out
}

/// Subspace rank, number of centres and spreads of the clustered data.
const RANK: usize = 24;
const CENTRES: usize = 300;
const SPREAD: f32 = 0.35;
const NOISE: f32 = 0.04;

fn gaussian(rng: &mut StdRng) -> f32 {
    let u: f32 = rng.gen_range(f32::EPSILON..1.0);
    let v: f32 = rng.gen_range(0.0..1.0);
    (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
}

/// Vectors from a mixture of Gaussians around `CENTRES` centres in a random rank-`RANK`
/// subspace, plus isotropic noise, normalised. The subspace and centres depend only on the
/// dimension, so data and queries share them; `seed` picks the samples.
fn clustered_vectors(count: usize, dim: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(7);
    let basis: Vec<f32> = (0..RANK * dim).map(|_| gaussian(&mut rng)).collect();
    let centres: Vec<f32> = (0..CENTRES * RANK).map(|_| gaussian(&mut rng)).collect();
    let mut out = vec![0f32; count * dim];
    out.par_chunks_mut(dim).enumerate().for_each(|(i, v)| {
        let mut rng = StdRng::seed_from_u64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let centre = rng.gen_range(0..CENTRES);
        for r in 0..RANK {
            let coordinate = centres[centre * RANK + r] + SPREAD * gaussian(&mut rng);
            let axis = &basis[r * dim..(r + 1) * dim];
            v.iter_mut()
                .zip(axis)
                .for_each(|(x, a)| *x += coordinate * a);
        }
        let scale = (RANK as f32).sqrt() * 1.2;
        v.iter_mut()
            .for_each(|x| *x += NOISE * scale * gaussian(&mut rng));
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter_mut().for_each(|x| *x /= norm);
    });
    out
}

fn vectors_of(o: &Options, count: usize, seed: u64) -> Vec<f32> {
    match o.data.as_str() {
        "clustered" => clustered_vectors(count, o.dim, seed),
        _ => unit_vectors(count, o.dim, seed),
    }
}

fn write_f32(path: &Path, data: &[f32]) {
    let bytes: Vec<u8> = data.iter().flat_map(|x| x.to_le_bytes()).collect();
    fs::write(path, bytes).expect("bench data is writable");
}

fn read_f32(path: &Path) -> Vec<f32> {
    let bytes = fs::read(path).expect("bench data is readable");
    bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Exact top-K ids per query, written as little-endian u32.
fn ground_truth(data: &[f32], queries: &[f32], dim: usize) -> Vec<u32> {
    queries
        .par_chunks(dim)
        .flat_map_iter(|q| {
            let mut scored: Vec<(f32, u32)> = data
                .chunks(dim)
                .enumerate()
                .map(|(i, v)| (dot(q, v), i as u32))
                .collect();
            scored.select_nth_unstable_by(K - 1, |a, b| b.0.total_cmp(&a.0));
            scored.truncate(K);
            scored.into_iter().map(|(_, i)| i)
        })
        .collect()
}

fn size_dir(o: &Options, size: usize) -> PathBuf {
    o.work_dir.join(format!("{}-n{size}-d{}", o.data, o.dim))
}

/// Writes vectors, queries and ground truth for one size unless already present.
fn prepare_data(o: &Options, size: usize) {
    let dir = size_dir(o, size);
    if dir.join("truth.u32").exists() {
        return;
    }
    fs::create_dir_all(&dir).expect("work dir is creatable");
    let data = vectors_of(o, size, 1);
    let queries = vectors_of(o, o.queries, 2);
    write_f32(&dir.join("vectors.f32"), &data);
    write_f32(&dir.join("queries.f32"), &queries);
    let started = Instant::now();
    let truth = ground_truth(&data, &queries, o.dim);
    eprintln!(
        "ground truth for {size} in {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let bytes: Vec<u8> = truth.iter().flat_map(|x| x.to_le_bytes()).collect();
    fs::write(dir.join("truth.u32"), bytes).expect("truth is writable");
}

fn rss_bytes() -> u64 {
    let statm = fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn settings(o: &Options) -> Settings {
    Settings {
        dimension: o.dim,
        metric: Metric::Cosine,
        hnsw: HnswParams {
            max_connections: o.max_connections,
            ef_construction: o.ef_construction,
            ..HnswParams::default()
        },
        model_id: "bench".into(),
    }
}

/// Child phase: builds the collection from scratch and closes it (dumping the graph).
fn phase_build(o: &Options) -> Value {
    let dir = size_dir(o, o.size);
    let data = read_f32(&dir.join("vectors.f32"));
    let collection_dir = dir.join("collection");
    let _ = fs::remove_dir_all(&collection_dir);
    let rss_before = rss_bytes();
    let collection = Collection::open(&collection_dir, settings(o)).expect("collection opens");

    let started = Instant::now();
    for (b, chunk) in data.chunks(BATCH * o.dim).enumerate() {
        let items = chunk.chunks(o.dim).enumerate().map(|(i, v)| {
            let n = b * BATCH + i;
            Item {
                id: n.to_string(),
                kind: ItemKind::Image,
                vector: v.to_vec(),
                metadata: Default::default(),
                content_hash: *blake3::hash(&n.to_le_bytes()).as_bytes(),
                payload: None,
            }
        });
        collection.upsert(items.collect()).expect("upsert succeeds");
    }
    let build_s = started.elapsed().as_secs_f64();
    let rss_built = rss_bytes();
    let started = Instant::now();
    collection.close().expect("close succeeds");
    json!({
        "build_s": build_s,
        "build_rss_per_vector": (rss_built.saturating_sub(rss_before)) as f64 / o.size as f64,
        "dump_s": started.elapsed().as_secs_f64(),
    })
}

/// Reads every file under `path` through the page cache (`warm`), or drops their clean pages
/// from it after flushing them (not `warm`), so that a reopen starts from a known state.
#[expect(unsafe_code, reason = "posix_fadvise is only reachable through libc")]
fn set_page_cache(path: &Path, warm: bool) {
    use std::os::fd::AsRawFd;

    let Ok(meta) = fs::metadata(path) else { return };
    if meta.is_dir() {
        let entries = fs::read_dir(path).expect("collection dir is listable");
        for entry in entries.flatten() {
            set_page_cache(&entry.path(), warm);
        }
        return;
    }
    let mut file = fs::File::open(path).expect("collection file is readable");
    if warm {
        let _ = std::io::copy(&mut file, &mut std::io::sink());
        return;
    }
    let _ = file.sync_all();
    // SAFETY: the descriptor is open for the call; the advice changes no file contents.
    let _ = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// Child phase: reopens the collection with its files evicted from the page cache.
fn phase_cold_reopen(o: &Options) -> Value {
    let dir = size_dir(o, o.size).join("collection");
    set_page_cache(&dir, false);
    let started = Instant::now();
    let collection = Collection::open(&dir, settings(o)).expect("reopen");
    let cold_reopen_s = started.elapsed().as_secs_f64();
    let reloaded = collection.graph_origin() == GraphOrigin::Reloaded;
    collection.close().expect("close succeeds");
    json!({ "cold_reopen_s": cold_reopen_s, "cold_reloaded": reloaded })
}

/// What recall is judged against: the indexed vectors, the queries and the true top K ids.
struct Data {
    vectors: Vec<f32>,
    queries: Vec<f32>,
    truth: Vec<u32>,
}

/// Child phase: reopens the collection and measures queries single-threaded.
fn phase_query(o: &Options) -> Value {
    let dir = size_dir(o, o.size);
    let queries = read_f32(&dir.join("queries.f32"));
    let truth = fs::read(dir.join("truth.u32")).expect("truth is readable");
    let truth: Vec<u32> = truth
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    set_page_cache(&dir.join("collection"), true);
    let rss_before = rss_bytes();
    let started = Instant::now();
    let collection = Collection::open(&dir.join("collection"), settings(o)).expect("reopen");
    let reopen_s = started.elapsed().as_secs_f64();
    let reloaded = collection.graph_origin() == GraphOrigin::Reloaded;
    let rss_per_vector = rss_bytes().saturating_sub(rss_before) as f64 / o.size as f64;

    let data = Data {
        vectors: read_f32(&dir.join("vectors.f32")),
        queries,
        truth,
    };
    let runs: Vec<Value> = o
        .efs
        .iter()
        .map(|&ef| query_run(&collection, o, &data, ef))
        .collect();
    let disk = collection.stats().map(|s| s.bytes_on_disk).unwrap_or(0);
    // A clean close leaves a current dump even when this open had to rebuild the graph.
    collection.close().expect("close succeeds");
    json!({
        "reopen_s": reopen_s,
        "reloaded": reloaded,
        "rss_per_vector": rss_per_vector,
        "disk_per_vector": disk as f64 / o.size as f64,
        "runs": runs,
    })
}

/// Inner product in f64, the precision the recall judges ties in.
fn dot64(a: &[f32], b: &[f32]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum()
}

/// Correct answers among one query's returned ids: an id counts when it is one of the true
/// top K, or when its exact score is within [`TIE`] of the lowest true top-K score (a tie at
/// float precision, which the f32 ground truth may have broken either way). hnswlib's side
/// (`scripts/hnswlib_bench.py`) counts the same way.
fn correct(data: &[f32], dim: usize, query: &[f32], truth: &[u32], returned: &[u32]) -> usize {
    let vector = |id: u32| &data[id as usize * dim..][..dim];
    let lowest = truth
        .iter()
        .map(|&id| dot64(query, vector(id)))
        .fold(f64::INFINITY, f64::min);
    returned
        .iter()
        .take(K)
        .filter(|&&id| truth.contains(&id) || dot64(query, vector(id)) >= lowest - TIE)
        .count()
}

fn query_run(collection: &Collection, o: &Options, data: &Data, ef: usize) -> Value {
    let started = Instant::now();
    let mut returned = Vec::with_capacity(data.queries.len() / o.dim);
    for q in data.queries.chunks(o.dim) {
        let request = SearchRequest {
            vector: q,
            k: K,
            ef: Some(ef),
            filter: Filter::default(),
            exact: false,
        };
        returned.push(collection.search(&request).expect("search succeeds"));
    }
    let seconds = started.elapsed().as_secs_f64();

    let found: usize = returned
        .iter()
        .zip(data.queries.chunks(o.dim).zip(data.truth.chunks(K)))
        .map(|(hits, (q, truth))| {
            let ids: Vec<u32> = hits
                .iter()
                .map(|h| h.id.parse().expect("ids are numbers"))
                .collect();
            correct(&data.vectors, o.dim, q, truth, &ids)
        })
        .sum();
    json!({
        "ef": ef,
        "qps": returned.len() as f64 / seconds,
        "recall": found as f64 / (data.truth.len() as f64),
    })
}

fn run_child(o: &Options, size: usize, phase: &str) -> Value {
    let exe = std::env::current_exe().expect("own path is known");
    let efs: Vec<String> = o.efs.iter().map(usize::to_string).collect();
    let output = Command::new(exe)
        .args([
            "--phase",
            phase,
            "--size",
            &size.to_string(),
            "--dim",
            &o.dim.to_string(),
        ])
        .args([
            "--efs",
            &efs.join(","),
            "--m",
            &o.max_connections.to_string(),
        ])
        .args(["--ef-construction", &o.ef_construction.to_string()])
        .args(["--work-dir", &o.work_dir.to_string_lossy()])
        .args(["--data", &o.data])
        .args(o.log.iter().flat_map(|filter| ["--log", filter]))
        .stderr(std::process::Stdio::inherit())
        .output()
        .expect("bench child runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    serde_json::from_str(line).unwrap_or(Value::Null)
}

/// Median over `rounds` (one library's query phases) of each run's QPS and of the reopen
/// times; everything else is taken from the first round.
fn median_rounds(rounds: &[Value]) -> Value {
    let median = |values: Vec<f64>| {
        let mut values: Vec<f64> = values.into_iter().filter(|v| v.is_finite()).collect();
        values.sort_by(f64::total_cmp);
        values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
    };
    let mut out = rounds.first().cloned().unwrap_or(Value::Null);
    for key in ["reopen_s", "cold_reopen_s"] {
        if let Some(field) = out.get_mut(key) {
            *field = json!(median(rounds.iter().map(|r| num(r, key)).collect()));
        }
    }
    let runs = out.get_mut("runs").and_then(Value::as_array_mut);
    for (i, run) in runs.into_iter().flatten().enumerate() {
        let qps = rounds.iter().map(|r| num(&r["runs"][i], "qps")).collect();
        run["qps"] = json!(median(qps));
    }
    out
}

fn run_hnswlib(o: &Options, size: usize, python: &Path) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/hnswlib_bench.py");
    let efs: Vec<String> = o.efs.iter().map(usize::to_string).collect();
    let output = Command::new(python)
        .arg(script)
        .args([
            "--dir",
            &size_dir(o, size).to_string_lossy(),
            "--dim",
            &o.dim.to_string(),
        ])
        .args([
            "--m",
            &o.max_connections.to_string(),
            "--efc",
            &o.ef_construction.to_string(),
        ])
        .args(["--efs", &efs.join(","), "--k", &K.to_string()])
        .args((o.rounds > 1).then_some("--keep"))
        .output()
        .expect("hnswlib bench runs");
    if !output.status.success() {
        eprintln!(
            "hnswlib bench failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or("{}");
    serde_json::from_str(line).unwrap_or(Value::Null)
}

fn num(v: &Value, key: &str) -> f64 {
    v.get(key).and_then(Value::as_f64).unwrap_or(f64::NAN)
}

/// One-minute load average, as `/proc/loadavg` reports it.
fn load_average() -> f64 {
    let text = fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let first = text.split_whitespace().next();
    first.and_then(|l| l.parse().ok()).unwrap_or(f64::NAN)
}

/// One library's measurements for one size.
struct Row<'a> {
    library: &'a str,
    data: &'a str,
    size: usize,
    build_s: f64,
    query: &'a Value,
    load: f64,
}

fn print_rows(out: &mut impl Write, row: &Row<'_>) {
    let Row {
        library,
        data,
        size,
        build_s,
        query,
        load,
    } = *row;
    let throughput = size as f64 / build_s;
    let empty = Vec::new();
    let runs = query
        .get("runs")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    for run in runs {
        let _ = writeln!(
            out,
            concat!(
                "| {library:<11} | {data:<9} | {size:>9} | {throughput:>10.0} | {:>4} ",
                "| {:>8.0} | {:>9.4} | {:>9.0} | {:>8.2} | {:>6.2} | {load:>4.1} |"
            ),
            num(run, "ef"),
            num(run, "qps"),
            num(run, "recall"),
            num(query, "rss_per_vector"),
            num(query, "reopen_s"),
            num(query, "cold_reopen_s"),
            library = library,
            data = data,
            size = size,
            throughput = throughput,
            load = load,
        );
    }
}

/// One query run: `(ef, qps, recall)`.
fn runs_of(query: &Value) -> Vec<(f64, f64, f64)> {
    let empty = Vec::new();
    let runs = query
        .get("runs")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    runs.iter()
        .map(|r| (num(r, "ef"), num(r, "qps"), num(r, "recall")))
        .collect()
}

/// Our QPS at exactly `recall`, read off our recall/QPS curve (runs in increasing `ef`) by
/// linear interpolation between the two runs around it; `None` when no run reaches it, and
/// the fastest run's QPS when even the smallest `ef` exceeds it (no extrapolation).
fn interpolated_qps(ours: &[(f64, f64, f64)], recall: f64) -> Option<f64> {
    let first = ours.first()?;
    if first.2 >= recall {
        return Some(first.1);
    }
    ours.windows(2).find_map(|pair| {
        let ((_, low_qps, low), (_, high_qps, high)) = (pair[0], pair[1]);
        (low < recall && recall <= high)
            .then(|| low_qps + (high_qps - low_qps) * (recall - low) / (high - low))
    })
}

/// For every hnswlib run, our fastest run with at least its recall (the comparison at equal
/// recall, since the two graphs reach different recall at the same `ef`), and our QPS
/// interpolated at exactly its recall, which a coarse grid of `ef` values would otherwise
/// understate.
fn print_matched(out: &mut impl Write, size: usize, ours: &Value, theirs: &Value) {
    let mut ours = runs_of(ours);
    ours.sort_by(|a, b| a.0.total_cmp(&b.0));
    for (ef, qps, recall) in runs_of(theirs) {
        let best = ours
            .iter()
            .filter(|run| run.2 >= recall)
            .max_by(|a, b| a.1.total_cmp(&b.1));
        let (Some(&(our_ef, our_qps, our_recall)), Some(at_recall)) =
            (best, interpolated_qps(&ours, recall))
        else {
            let _ = writeln!(
                out,
                "| {size:>9} | {ef:>10} | {recall:>9.4} | {qps:>8.0} | none reaches it |"
            );
            continue;
        };
        let _ = writeln!(
            out,
            concat!(
                "| {size:>9} | {ef:>10} | {recall:>9.4} | {qps:>8.0} | {our_ef:>6} ",
                "| {our_recall:>9.4} | {our_qps:>8.0} | {ratio:>12.2} ",
                "| {at_recall:>12.0} | {at_ratio:>12.2} |"
            ),
            size = size,
            ef = ef,
            recall = recall,
            qps = qps,
            our_ef = our_ef,
            our_recall = our_recall,
            our_qps = our_qps,
            ratio = our_qps / qps,
            at_recall = at_recall,
            at_ratio = at_recall / qps,
        );
    }
}

fn main() {
    let o = parse_options();
    if let Some(filter) = &o.log {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_timer(tracing_subscriber::fmt::time::uptime())
            .with_writer(std::io::stderr)
            .init();
    }
    match o.phase.as_deref() {
        Some("build") => return println!("{}", phase_build(&o)),
        Some("query") => return println!("{}", phase_query(&o)),
        Some("cold-reopen") => return println!("{}", phase_cold_reopen(&o)),
        _ => {}
    }

    let mut table = Vec::new();
    let mut matched = Vec::new();
    for &size in &o.sizes {
        prepare_data(&o, size);
        let build = run_child(&o, size, "build");
        let cold = run_child(&o, size, "cold-reopen");
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        // A saved hnswlib index left by an interrupted run may have other parameters.
        let _ = fs::remove_file(size_dir(&o, size).join("hnswlib.bin"));
        for _ in 0..o.rounds {
            let mut query = run_child(&o, size, "query");
            if let (Some(query), Some(cold)) = (query.as_object_mut(), cold.as_object()) {
                query.extend(cold.clone());
            }
            eprintln!("mplug-index n={size}: build {build} query {query}");
            ours.push(query);
            if let Some(python) = &o.python {
                let hnswlib = run_hnswlib(&o, size, python);
                eprintln!("hnswlib n={size}: {hnswlib}");
                theirs.push(hnswlib);
            }
        }
        let _ = fs::remove_file(size_dir(&o, size).join("hnswlib.bin"));
        let query = median_rounds(&ours);
        let row = Row {
            library: "mplug-index",
            data: &o.data,
            size,
            build_s: num(&build, "build_s"),
            query: &query,
            load: load_average(),
        };
        print_rows(&mut table, &row);
        if !theirs.is_empty() {
            let hnswlib = median_rounds(&theirs);
            let row = Row {
                library: "hnswlib",
                build_s: num(&hnswlib, "build_s"),
                query: &hnswlib,
                load: load_average(),
                ..row
            };
            print_rows(&mut table, &row);
            print_matched(&mut matched, size, &query, &hnswlib);
        }
    }

    println!(
        "\nM = {}, ef_construction = {}, dim = {}, {} queries, k = {K}, queries single-threaded; \
         build uses all cores (ours: durable batches of {BATCH}); QPS and reopen: median of \
         {} rounds, the libraries alternating",
        o.max_connections, o.ef_construction, o.dim, o.queries, o.rounds
    );
    println!(concat!(
        "| library     | data      |         n |  build v/s |   ef |      QPS ",
        "| recall@10 | RSS B/vec | reopen s | cold s | load |"
    ));
    println!(concat!(
        "|-------------|-----------|-----------|------------|------|----------",
        "|-----------|-----------|----------|--------|------|"
    ));
    print!("{}", String::from_utf8_lossy(&table));
    if matched.is_empty() {
        return;
    }
    println!(concat!(
        "\nAt equal recall: each hnswlib run, our fastest run with at least its recall, and our ",
        "QPS interpolated at its recall"
    ));
    println!(concat!(
        "|         n | hnswlib ef | recall@10 |      QPS | our ef | recall@10 |      QPS ",
        "| ours/hnswlib |  QPS interp. | ratio interp |"
    ));
    println!(concat!(
        "|-----------|------------|-----------|----------|--------|-----------|----------",
        "|--------------|--------------|--------------|"
    ));
    print!("{}", String::from_utf8_lossy(&matched));
}
