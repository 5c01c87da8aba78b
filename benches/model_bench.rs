//! Model throughput at mPLUG-base shape (ViT-B/16 @ 384, BERT-base fusion) on random weights:
//! vision encoder images/s at batch 1 and 8, and ITM rerank of 16 candidates, in f32 and (on
//! CPUs with AVX512-BF16) bf16 weights and attention. Prints a table with the matmul FLOP rate
//! and its share of the machine's f32 peak, which it measures (12 independent chains of fused
//! multiply-adds on every thread) unless `--peak` gives it. With `--out DIR` it also writes the
//! weights and inputs it used, plus its outputs and timings, so `scripts/bench-model.sh` can
//! run PyTorch on the same weights.
//!
//! Run: `cargo bench --bench model_bench -- [--out DIR] [--iters N] [--peak GFLOPS] [--b1]
//! [--rerank] [--f32 | --bf16]`, the last four for profiling: `--b1` times the vision encoder at
//! batch 1 only, `--rerank` skips batch 8, `--f32` skips bf16 and `--bf16` skips f32. Only a full
//! f32 run writes outputs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mplug_search::model::{bf16, LoadSource, Mplug, MplugConfig, Tasks};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CANDIDATES: usize = 16;
const TEXT_LEN: usize = 30;

struct Args {
    out: Option<PathBuf>,
    iters: usize,
    /// The f32 peak in GFLOP/s given with `--peak`; measured when absent.
    peak: Option<f64>,
    b1_only: bool,
    rerank_only: bool,
    f32_only: bool,
    bf16_only: bool,
}

fn parse_args() -> Args {
    let mut args = Args {
        out: None,
        iters: 3,
        peak: None,
        b1_only: false,
        rerank_only: false,
        f32_only: false,
        bf16_only: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => args.out = it.next().map(PathBuf::from),
            "--iters" => args.iters = it.next().and_then(|s| s.parse().ok()).unwrap_or(3),
            "--peak" => {
                let value = it.next().and_then(|s| s.parse().ok());
                args.peak = Some(value.expect("--peak takes the f32 peak in GFLOP/s"));
            }
            "--b1" => args.b1_only = true,
            "--rerank" => args.rerank_only = true,
            "--f32" => args.f32_only = true,
            "--bf16" => args.bf16_only = true,
            _ => {}
        }
    }
    assert!(
        !(args.f32_only && args.bf16_only),
        "--f32 and --bf16 exclude each other"
    );
    args
}

fn base_config() -> MplugConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/configs/mplug_base.json");
    let mut cfg = MplugConfig::from_file(&path).expect("base config");
    cfg.vision.width = 768;
    cfg.vision.layers = 12;
    cfg.vision.patch_size = 16;
    cfg.vision.image_size = 384;
    cfg.text.hidden_size = 768;
    cfg.text.intermediate_size = 3072;
    cfg.text.num_hidden_layers = 1;
    cfg.text.vocab_size = 30522;
    cfg.text.max_position_embeddings = 512;
    cfg.text.type_vocab_size = 2;
    cfg.fusion.num_hidden_layers = 6;
    cfg.decoder.num_hidden_layers = 1;
    cfg.embed_dim = 256;
    cfg
}

/// Random weights of the retrieval modules, by reference state-dict name.
fn random_weights(cfg: &MplugConfig) -> HashMap<String, Tensor> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let tasks = Tasks {
        retrieval: true,
        ..Tasks::default()
    };
    Mplug::new(cfg, tasks, vb).expect("random model builds");
    let data = varmap.data().lock().expect("varmap lock");
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect()
}

fn build(cfg: &MplugConfig, weights: &HashMap<String, Tensor>, dtype: DType) -> Mplug {
    let path = PathBuf::from("random-base");
    let source = LoadSource {
        tensors: weights.clone(),
        skipped: Vec::new(),
        path: &path,
    };
    let tasks = Tasks {
        retrieval: true,
        ..Tasks::default()
    };
    Mplug::from_tensors(cfg.clone(), source, tasks, &Device::Cpu, dtype)
        .expect("model loads")
        .0
}

/// A case's timing: best wall seconds of the timed runs, and mean CPU seconds per run over
/// all threads of the process (NaN where unknown). On a shared machine the CPU time moves
/// less with other load than the wall time does.
struct Timing {
    wall: f64,
    cpu: f64,
}

/// Times `iters` runs after one warm-up.
fn time<T>(iters: usize, mut f: impl FnMut() -> T) -> (Timing, T) {
    let mut out = f();
    let mut best = f64::INFINITY;
    let cpu_start = cpu_seconds();
    for _ in 0..iters {
        let start = Instant::now();
        out = f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    let cpu = (cpu_seconds() - cpu_start) / iters as f64;
    (Timing { wall: best, cpu }, out)
}

/// CPU time of every thread of this process so far (Linux's per-thread scheduler
/// statistics), or NaN where they cannot be read.
fn cpu_seconds() -> f64 {
    let Ok(threads) = std::fs::read_dir("/proc/self/task") else {
        return f64::NAN;
    };
    let nanos: u64 = threads
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    nanos as f64 * 1e-9
}

/// Matmul FLOPs (2 per multiply-add) of the vision tower for one image.
fn vision_flops(cfg: &MplugConfig) -> f64 {
    let (w, l) = (cfg.vision.width as f64, cfg.vision.num_tokens() as f64);
    let p = cfg.vision.patch_size as f64;
    let patch = 2.0 * (l - 1.0) * 3.0 * p * p * w;
    let per_layer = 2.0 * l * 12.0 * w * w + 4.0 * l * l * w;
    patch + cfg.vision.layers as f64 * per_layer
}

/// Matmul FLOPs of one ITM rerank of `CANDIDATES` texts against one image, following the
/// fusion schedule: image keys/values are projected once until a connected layer.
fn rerank_flops(cfg: &MplugConfig) -> f64 {
    let b = CANDIDATES as f64;
    let (lt, lv) = (TEXT_LEN as f64, cfg.vision.num_tokens() as f64);
    let (h, f) = (
        cfg.text.hidden_size as f64,
        cfg.text.intermediate_size as f64,
    );
    let linear = |rows: f64, i: f64, o: f64| 2.0 * rows * i * o;
    let attend = |rows: f64, keys: f64| 4.0 * rows * keys * h;
    let ffn = |rows: f64| linear(rows, h, f) + linear(rows, f, h);
    let mut shared = true;
    let mut total = 0.0;
    for k in 0..cfg.fusion.fusion_layers {
        if cfg.fusion.is_connected(k) {
            shared = false;
            let rows = b * (lv + lt);
            total += 4.0 * linear(rows, h, h) + attend(rows, lv + lt) + ffn(rows);
        } else {
            let image_rows = if shared { lv } else { b * lv };
            total += 6.0 * linear(b * lt, h, h) + attend(b * lt, lt) + attend(b * lt, lv);
            total += 2.0 * linear(image_rows, h, h);
            total += ffn(b * lt);
        }
    }
    total + linear(b, h, 2.0)
}

struct Inputs {
    pixels: Tensor,
    t: Tensor,
    t_mask: Tensor,
}

fn inputs() -> Inputs {
    let dev = Device::Cpu;
    let pixels = Tensor::randn(0f32, 1.0, (8, 3, 384, 384), &dev).expect("pixels");
    let t = Tensor::randn(0f32, 1.0, (CANDIDATES, TEXT_LEN, 768), &dev).expect("text");
    let lens: Vec<u32> = (0..CANDIDATES).map(|i| 8 + (i as u32 * 7) % 22).collect();
    let mask: Vec<u32> = lens
        .iter()
        .flat_map(|&n| (0..TEXT_LEN as u32).map(move |j| u32::from(j < n)))
        .collect();
    let t_mask = Tensor::from_vec(mask, (CANDIDATES, TEXT_LEN), &dev).expect("mask");
    Inputs { pixels, t, t_mask }
}

struct Row {
    name: String,
    seconds: f64,
    cpu_seconds: f64,
    per_second: f64,
    flops: f64,
}

impl Row {
    fn gflops(&self) -> f64 {
        self.flops / self.seconds / 1e9
    }
}

/// FLOPs per call of each case.
struct Flops {
    image: f64,
    rerank: f64,
}

/// What one precision produced: timings, ITC image embeddings of image 0, ITM logits (not
/// with `--b1`).
struct Outcome {
    rows: Vec<Row>,
    embeds: Tensor,
    itm: Option<Tensor>,
}

fn run(model: &Mplug, inp: &Inputs, label: &str, args: &Args, flops: &Flops) -> Outcome {
    let mut rows = Vec::new();
    let mut v1 = None;
    let batches: &[usize] = if args.b1_only || args.rerank_only {
        &[1]
    } else {
        &[1, 8]
    };
    for &batch in batches {
        let px = inp.pixels.narrow(0, 0, batch).expect("batch");
        let (s, v) = time(args.iters, || model.encode_image(&px).expect("vision"));
        println!("vision b{batch} {label}: {:.1} ms", s.wall * 1e3);
        rows.push(Row {
            name: format!("vision b{batch} {label}"),
            seconds: s.wall,
            cpu_seconds: s.cpu,
            per_second: batch as f64 / s.wall,
            flops: flops.image * batch as f64,
        });
        v1.get_or_insert(v);
    }
    let v = v1.expect("vision ran");
    let embeds = model.image_embeds(&v).expect("itc");
    if args.b1_only {
        return Outcome {
            rows,
            embeds,
            itm: None,
        };
    }
    let (s, itm) = time(args.iters, || {
        let (_, tf) = model.fuse(&inp.t, &inp.t_mask, &v).expect("fusion");
        model.itm_logits(&tf).expect("itm")
    });
    println!("itm rerank x{CANDIDATES} {label}: {:.1} ms", s.wall * 1e3);
    rows.push(Row {
        name: format!("itm rerank x{CANDIDATES} {label}"),
        seconds: s.wall,
        cpu_seconds: s.cpu,
        per_second: 1.0 / s.wall,
        flops: flops.rerank,
    });
    Outcome {
        rows,
        embeds,
        itm: Some(itm),
    }
}

/// The f32 multiply-add peak of this machine in GFLOP/s: every rayon thread at once runs 12
/// independent chains of fused multiply-adds on the widest vectors the CPU has (AVX-512F or
/// AVX2 with FMA), for about a tenth of a second; best of three. NaN on other CPUs.
fn fma_peak_gflops() -> f64 {
    const ITERS: u64 = 50_000_000;
    let Some(lanes) = fma::lanes() else {
        return f64::NAN;
    };
    let flops = rayon::current_num_threads() as f64 * ITERS as f64 * 12.0 * 2.0 * lanes as f64;
    (0..3)
        .map(|_| {
            let start = Instant::now();
            let sums = rayon::broadcast(|_| fma::chains(ITERS));
            std::hint::black_box(sums);
            flops / start.elapsed().as_secs_f64() / 1e9
        })
        .fold(f64::NAN, f64::max)
}

/// Chains of fused multiply-adds for [`fma_peak_gflops`].
#[expect(unsafe_code, reason = "vector intrinsics behind a CPU feature check")]
mod fma {
    /// f32 lanes of the widest vectors [`chains`] uses on this CPU, if any.
    pub fn lanes() -> Option<usize> {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                return Some(16);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Some(8);
            }
        }
        None
    }

    /// Runs `iters` steps of 12 independent multiply-add chains; returns their sum so the work
    /// cannot be dropped. Call only where [`lanes`] is `Some`.
    pub fn chains(iters: u64) -> f32 {
        #[cfg(target_arch = "x86_64")]
        match lanes() {
            // SAFETY: the CPU has AVX-512F.
            Some(16) => return unsafe { x86::avx512(iters) },
            // SAFETY: the CPU has AVX2 and FMA.
            Some(8) => return unsafe { x86::avx2(iters) },
            _ => {}
        }
        let _ = iters;
        f32::NAN
    }

    #[cfg(target_arch = "x86_64")]
    mod x86 {
        use std::arch::x86_64::*;

        #[target_feature(enable = "avx512f")]
        pub unsafe fn avx512(iters: u64) -> f32 {
            let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
            let mut acc = [_mm512_setzero_ps(); 12];
            for _ in 0..iters {
                for x in &mut acc {
                    *x = _mm512_fmadd_ps(*x, a, b);
                }
            }
            acc.iter().map(|x| _mm512_reduce_add_ps(*x)).sum()
        }

        #[target_feature(enable = "avx2,fma")]
        pub unsafe fn avx2(iters: u64) -> f32 {
            let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
            let mut acc = [_mm256_setzero_ps(); 12];
            for _ in 0..iters {
                for x in &mut acc {
                    *x = _mm256_fmadd_ps(*x, a, b);
                }
            }
            let mut lanes = [0f32; 8];
            acc.iter().fold(0.0, |sum, x| {
                // SAFETY: `lanes` has room for 8 values.
                unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), *x) };
                sum + lanes.iter().sum::<f32>()
            })
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

/// Prints `rows`, each against the f32 row of the same case in `f32_rows` (cycled); without
/// f32 rows the last column is empty.
fn print_table(rows: &[Row], f32_rows: &[Row], peak: f64) {
    println!(
        "{:<26} {:>10} {:>10} {:>10} {:>9} {:>7} {:>8}",
        "case", "ms", "cpu ms", "items/s", "GFLOP/s", "% peak", "vs f32"
    );
    let mut bases = f32_rows.iter().cycle();
    for r in rows {
        let ratio = bases.next().map_or("-".to_string(), |b| {
            format!("{:.2}x", b.seconds / r.seconds)
        });
        println!(
            "{:<26} {:>10.1} {:>10.1} {:>10.3} {:>9.1} {:>7.1} {:>8}",
            r.name,
            r.seconds * 1e3,
            r.cpu_seconds * 1e3,
            r.per_second,
            r.gflops(),
            100.0 * r.gflops() / peak,
            ratio
        );
    }
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("same shapes")
}

fn main() {
    mplug_search::model::alloc::keep_freed_memory();
    let args = parse_args();
    let cfg = base_config();
    let weights = random_weights(&cfg);
    let inp = inputs();
    let flops = Flops {
        image: vision_flops(&cfg),
        rerank: rerank_flops(&cfg),
    };
    let (peak, how) = match args.peak {
        Some(given) => (given, "given"),
        None => (fma_peak_gflops(), "measured"),
    };
    println!(
        "threads: {}, GFLOP per image {:.1}, per rerank {:.1}, f32 peak {peak:.0} GFLOP/s ({how})",
        rayon::current_num_threads(),
        flops.image / 1e9,
        flops.rerank / 1e9,
    );
    println!("load average before: {}", load_average());

    let full = (!args.bf16_only).then(|| {
        let f32_model = build(&cfg, &weights, DType::F32);
        run(&f32_model, &inp, "f32", &args, &flops)
    });
    let mut rows = Vec::new();
    if args.f32_only {
        println!("bf16: not run (--f32)");
    } else if bf16::available() {
        let bf16_model = build(&cfg, &weights, DType::BF16);
        let half = run(&bf16_model, &inp, "bf16", &args, &flops);
        if let Some(full) = &full {
            print_bf16_diffs(&half, full);
        }
        rows = half.rows;
    } else {
        println!("bf16: not run (this CPU has no avx512_bf16)");
    }
    println!("load average after: {}", load_average());
    let Some(full) = full else {
        print_table(&rows, &[], peak);
        return;
    };
    let f32_len = full.rows.len();
    rows.splice(0..0, full.rows);
    print_table(&rows, &rows[..f32_len], peak);

    let complete = !args.b1_only && !args.rerank_only;
    if let (Some(dir), Some(itm), true) = (&args.out, &full.itm, complete) {
        write_outputs(dir, &weights, &inp, &full.embeds, itm, &rows);
    }
}

fn print_bf16_diffs(half: &Outcome, full: &Outcome) {
    println!(
        "bf16 vs f32: ITC image embeddings max|diff| {:.2e}",
        max_diff(&half.embeds, &full.embeds)
    );
    if let (Some(h), Some(f)) = (&half.itm, &full.itm) {
        println!("bf16 vs f32: ITM logits max|diff| {:.2e}", max_diff(h, f));
    }
}

fn write_outputs(
    dir: &Path,
    weights: &HashMap<String, Tensor>,
    inp: &Inputs,
    emb: &Tensor,
    itm: &Tensor,
    rows: &[Row],
) {
    std::fs::create_dir_all(dir).expect("out dir");
    candle_core::safetensors::save(weights, dir.join("weights.safetensors")).expect("weights");
    let tensors: HashMap<String, Tensor> = [
        ("pixels", inp.pixels.clone()),
        ("t", inp.t.clone()),
        ("t_mask", inp.t_mask.clone()),
        ("image_embeds", emb.clone()),
        ("itm_logits", itm.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    candle_core::safetensors::save(&tensors, dir.join("io.safetensors")).expect("io");
    let json: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            serde_json::json!({
                "case": r.name,
                "seconds": r.seconds,
                "cpu_seconds": r.cpu_seconds,
                "per_second": r.per_second,
                "flops": r.flops,
            })
        })
        .collect();
    std::fs::write(
        dir.join("candle.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("timings");
}
