//! Model throughput at mPLUG-base shape (ViT-B/16 @ 384, BERT-base fusion) on random weights:
//! vision encoder images/s at batch 1 and 8, and ITM rerank of 16 candidates, in f32 and bf16.
//! Prints a table. With `--out DIR` it also writes the weights and inputs it used, plus its
//! outputs and timings, so `scripts/bench-model.sh` can run PyTorch on the same weights.
//!
//! Run: `cargo bench --bench model_bench -- [--out DIR] [--iters N]`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mplug_search::model::{LoadSource, Mplug, MplugConfig, Tasks};

const CANDIDATES: usize = 16;
const TEXT_LEN: usize = 30;

struct Args {
    out: Option<PathBuf>,
    iters: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        out: None,
        iters: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--out" => args.out = it.next().map(PathBuf::from),
            "--iters" => args.iters = it.next().and_then(|s| s.parse().ok()).unwrap_or(3),
            _ => {}
        }
    }
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

/// Best wall time in seconds of `iters` runs after one warm-up.
fn time<T>(iters: usize, mut f: impl FnMut() -> T) -> (f64, T) {
    let mut out = f();
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let start = Instant::now();
        out = f();
        best = best.min(start.elapsed().as_secs_f64());
    }
    (best, out)
}

/// Multiply-add FLOPs of the vision tower for one image.
fn vision_flops(cfg: &MplugConfig) -> f64 {
    let (w, l) = (cfg.vision.width as f64, cfg.vision.num_tokens() as f64);
    let p = cfg.vision.patch_size as f64;
    let patch = 2.0 * (l - 1.0) * 3.0 * p * p * w;
    let per_layer = 2.0 * l * 12.0 * w * w + 4.0 * l * l * w;
    patch + cfg.vision.layers as f64 * per_layer
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
    per_second: f64,
    gflops: f64,
}

fn run(
    model: &Mplug,
    inp: &Inputs,
    dtype: DType,
    iters: usize,
    flops: f64,
) -> (Vec<Row>, Tensor, Tensor) {
    let label = format!("{dtype:?}").to_lowercase();
    let mut rows = Vec::new();
    let mut v1 = None;
    for batch in [1usize, 8] {
        let px = inp.pixels.narrow(0, 0, batch).expect("batch");
        let (s, v) = time(iters, || model.encode_image(&px).expect("vision"));
        println!("vision b{batch} {label}: {:.1} ms", s * 1e3);
        rows.push(Row {
            name: format!("vision b{batch} {label}"),
            seconds: s,
            per_second: batch as f64 / s,
            gflops: flops * batch as f64 / s / 1e9,
        });
        v1.get_or_insert(v);
    }
    let v = v1.expect("vision ran");
    let embeds = model
        .image_embeds(&v)
        .expect("itc")
        .to_dtype(DType::F32)
        .expect("f32");
    let t = inp.t.to_dtype(dtype).expect("dtype");
    let (s, logits) = time(iters, || {
        let (_, tf) = model.fuse(&t, &inp.t_mask, &v).expect("fusion");
        model.itm_logits(&tf).expect("itm")
    });
    rows.push(Row {
        name: format!("itm rerank x{CANDIDATES} {label}"),
        seconds: s,
        per_second: 1.0 / s,
        gflops: 0.0,
    });
    (rows, embeds, logits.to_dtype(DType::F32).expect("f32"))
}

fn main() {
    let args = parse_args();
    let cfg = base_config();
    let weights = random_weights(&cfg);
    let inp = inputs();
    let flops = vision_flops(&cfg);
    println!(
        "threads: {}, vision GFLOP/image: {:.1}",
        rayon::current_num_threads(),
        flops / 1e9
    );

    let f32_model = build(&cfg, &weights, DType::F32);
    let (rows, emb32, itm32) = run(&f32_model, &inp, DType::F32, args.iters, flops);

    println!(
        "{:<26} {:>10} {:>12} {:>9}",
        "case", "ms", "items/s", "GFLOP/s"
    );
    for r in &rows {
        let g = if r.gflops > 0.0 {
            format!("{:.1}", r.gflops)
        } else {
            "-".into()
        };
        println!(
            "{:<26} {:>10.1} {:>12.3} {:>9}",
            r.name,
            r.seconds * 1e3,
            r.per_second,
            g
        );
    }
    // TODO(bf16-cpu): time a bf16 path once the CPU backend has a half-precision matmul. Its
    // f16 matmul is no substitute: without AVX512-FP16 the gemm crate widens f16 operands to
    // f32 while packing and runs the f32 kernels, so it cannot beat f32.
    println!("bf16: not run (candle 0.9.2 CPU backend has no bf16 matmul)");

    if let Some(dir) = args.out {
        write_outputs(&dir, &weights, &inp, &emb32, &itm32, &rows);
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
                "per_second": r.per_second,
                "gflops": r.gflops,
            })
        })
        .collect();
    std::fs::write(
        dir.join("candle.json"),
        serde_json::to_string_pretty(&json).expect("json"),
    )
    .expect("timings");
}
