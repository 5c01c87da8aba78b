//! Checkpoint loading: real-shape name coverage (mPLUG-base ViT-B/16@384 stride 3, mPLUG-large
//! ViT-L/14@336 stride 6 with the adapter), task subsets, and errors for missing or misshapen
//! tensors.
//!
//! The real-shape tests list every key of the reference state dicts (momentum copies, queues,
//! buffers, CLIP text tower and dead fusion layers included) with their real shapes and back
//! each by a zero-stride broadcast tensor, so ~1 B parameters cost no memory. From the tensor
//! map on, this is the code path `Mplug::load` runs; reading the two file formats is covered
//! by the parity fixtures.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mplug_search::model::{LoadSource, Mplug, MplugConfig, Tasks};
use mplug_search::Error;

/// Real-model dimensions, as in the architecture spec's tables.
struct Dims {
    vision_width: usize,
    vision_layers: usize,
    patch: usize,
    clip_text_width: usize,
    clip_embed: usize,
}

const BASE: Dims = Dims {
    vision_width: 768,
    vision_layers: 12,
    patch: 16,
    clip_text_width: 512,
    clip_embed: 512,
};

const LARGE: Dims = Dims {
    vision_width: 1024,
    vision_layers: 24,
    patch: 14,
    clip_text_width: 768,
    clip_embed: 768,
};

const H: usize = 768;
const VOCAB: usize = 30522;

type Shapes = Vec<(String, Vec<usize>)>;

fn push(out: &mut Shapes, name: String, shape: &[usize]) {
    out.push((name, shape.to_vec()));
}

fn linear(out: &mut Shapes, p: &str, o: usize, i: usize) {
    push(out, format!("{p}.weight"), &[o, i]);
    push(out, format!("{p}.bias"), &[o]);
}

fn norm(out: &mut Shapes, p: &str, w: usize) {
    push(out, format!("{p}.weight"), &[w]);
    push(out, format!("{p}.bias"), &[w]);
}

fn clip_block(out: &mut Shapes, p: &str, w: usize) {
    push(out, format!("{p}.attn.in_proj_weight"), &[3 * w, w]);
    push(out, format!("{p}.attn.in_proj_bias"), &[3 * w]);
    linear(out, &format!("{p}.attn.out_proj"), w, w);
    norm(out, &format!("{p}.ln_1"), w);
    linear(out, &format!("{p}.mlp.c_fc"), 4 * w, w);
    linear(out, &format!("{p}.mlp.c_proj"), w, 4 * w);
    norm(out, &format!("{p}.ln_2"), w);
}

fn clip(out: &mut Shapes, p: &str, d: &Dims) {
    let (w, v) = (d.vision_width, format!("{p}.visual"));
    push(out, format!("{v}.conv1.weight"), &[w, 3, d.patch, d.patch]);
    push(out, format!("{v}.class_embedding"), &[w]);
    push(out, format!("{v}.positional_embedding"), &[577, w]);
    norm(out, &format!("{v}.ln_pre"), w);
    for i in 0..d.vision_layers {
        clip_block(out, &format!("{v}.transformer.resblocks.{i}"), w);
    }
    norm(out, &format!("{v}.ln_post"), w);
    push(out, format!("{v}.proj"), &[w, d.clip_embed]);
    let t = d.clip_text_width;
    for i in 0..12 {
        clip_block(out, &format!("{p}.transformer.resblocks.{i}"), t);
    }
    push(out, format!("{p}.token_embedding.weight"), &[49408, t]);
    push(out, format!("{p}.positional_embedding"), &[77, t]);
    norm(out, &format!("{p}.ln_final"), t);
    push(out, format!("{p}.text_projection"), &[t, d.clip_embed]);
    push(out, format!("{p}.logit_scale"), &[]);
}

fn bert_attention(out: &mut Shapes, p: &str) {
    for x in ["query", "key", "value"] {
        linear(out, &format!("{p}.self.{x}"), H, H);
    }
    linear(out, &format!("{p}.output.dense"), H, H);
    norm(out, &format!("{p}.output.LayerNorm"), H);
}

fn bert(out: &mut Shapes, p: &str, layers: usize, cross: bool) {
    let e = format!("{p}.embeddings");
    push(out, format!("{e}.word_embeddings.weight"), &[VOCAB, H]);
    push(out, format!("{e}.position_embeddings.weight"), &[512, H]);
    push(out, format!("{e}.token_type_embeddings.weight"), &[2, H]);
    norm(out, &format!("{e}.LayerNorm"), H);
    for i in 0..layers {
        let l = format!("{p}.encoder.layer.{i}");
        bert_attention(out, &format!("{l}.attention"));
        if cross {
            bert_attention(out, &format!("{l}.crossattention"));
        }
        linear(out, &format!("{l}.intermediate.dense"), 3072, H);
        linear(out, &format!("{l}.output.dense"), H, 3072);
        norm(out, &format!("{l}.output.LayerNorm"), H);
    }
}

/// Every float key of a fine-tuned AliceMind checkpoint (union of the retrieval, caption and
/// VQA state dicts), with momentum copies; integer buffers are returned separately.
fn reference_keys(d: &Dims, adapter: bool) -> (Shapes, Vec<String>) {
    let mut main = Shapes::new();
    clip(&mut main, "visual_encoder", d);
    if adapter {
        linear(&mut main, "visn_fc", H, d.vision_width);
        norm(&mut main, "visn_layer_norm", H);
    }
    bert(&mut main, "text_encoder", 6, false);
    bert(&mut main, "fusion_encoder", 12, true);
    linear(&mut main, "vision_proj", 256, H);
    linear(&mut main, "text_proj", 256, H);
    bert(&mut main, "text_decoder.bert", 12, true);
    let cls = "text_decoder.cls.predictions";
    push(&mut main, format!("{cls}.bias"), &[VOCAB]);
    linear(&mut main, &format!("{cls}.transform.dense"), H, H);
    norm(&mut main, &format!("{cls}.transform.LayerNorm"), H);
    linear(&mut main, &format!("{cls}.decoder"), VOCAB, H);

    let mut all = main.clone();
    for (name, shape) in &main {
        let (module, rest) = name.split_once('.').unwrap_or((name, ""));
        all.push((format!("{module}_m.{rest}"), shape.clone()));
    }
    linear(&mut all, "itm_head", 2, H);
    push(&mut all, "temp".into(), &[]);
    push(&mut all, "image_queue".into(), &[256, 65536]);
    push(&mut all, "text_queue".into(), &[256, 65536]);
    let ints = [
        "idx_queue",
        "queue_ptr",
        "text_encoder.embeddings.position_ids",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(["text_decoder.bert.embeddings.position_ids".to_string()])
    .collect();
    (all, ints)
}

fn config(name: &str) -> MplugConfig {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/configs")
        .join(name);
    MplugConfig::from_file(&path).expect("config loads")
}

fn broadcast_zeros(shapes: &Shapes) -> HashMap<String, Tensor> {
    let zero = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    shapes
        .iter()
        .map(|(n, s)| (n.clone(), zero.broadcast_as(s.as_slice()).unwrap()))
        .collect()
}

fn load_real(
    dims: &Dims,
    adapter: bool,
    cfg: &str,
    tasks: Tasks,
) -> (Mplug, BTreeSet<String>, u64) {
    let (shapes, ints) = reference_keys(dims, adapter);
    let path = PathBuf::from("real-shape.safetensors");
    let source = LoadSource {
        tensors: broadcast_zeros(&shapes),
        skipped: ints,
        path: &path,
    };
    let (model, report) =
        Mplug::from_tensors(config(cfg), source, tasks, &Device::Cpu, DType::F32).expect("loads");
    assert!(
        report.unused.is_empty(),
        "unknown keys: {:?}",
        report.unused
    );
    let sizes: HashMap<_, _> = shapes.iter().cloned().collect();
    let params = report
        .consumed
        .iter()
        .map(|n| sizes[n].iter().product::<usize>() as u64)
        .sum();
    (model, report.ignored, params)
}

#[test]
fn base_real_shapes_load_with_every_key_accounted_for() {
    let (model, ignored, params) = load_real(&BASE, false, "mplug_base.json", Tasks::ALL);
    let c = model.config();
    assert_eq!(
        (c.vision.width, c.vision.layers, c.vision.patch_size),
        (768, 12, 16)
    );
    assert_eq!(
        (c.vision.image_size, c.vision.heads(), c.adapter.present),
        (384, 12, false)
    );
    assert_eq!(
        (c.text.num_hidden_layers, c.fusion.num_hidden_layers),
        (6, 12)
    );
    assert_eq!(
        (c.decoder.num_hidden_layers, c.text.vocab_size, c.embed_dim),
        (12, 30522, 256)
    );
    assert!(ignored.contains("fusion_encoder.encoder.layer.5.output.dense.weight"));
    assert!(!ignored.contains("fusion_encoder.encoder.layer.6.output.dense.weight"));
    // Local k = 3 (state-dict layer 9) is connected: its cross-attention never runs.
    assert!(ignored.contains("fusion_encoder.encoder.layer.9.crossattention.self.query.weight"));
    assert!(!ignored.contains("fusion_encoder.encoder.layer.8.crossattention.self.query.weight"));
    // The spec counts 347.4 M live parameters, including that unused cross-attention.
    let unused_cross = 4 * (H * H + H) + 2 * H;
    let total = params + unused_cross as u64;
    println!(
        "base: {params} consumed parameters, {total} with the connected layer's cross-attention"
    );
    assert!(
        (347_300_000..347_500_000).contains(&total),
        "base live parameters {total}"
    );
}

#[test]
fn large_real_shapes_load_with_every_key_accounted_for() {
    let (model, ignored, params) = load_real(&LARGE, true, "mplug_large.json", Tasks::ALL);
    let c = model.config();
    assert_eq!(
        (c.vision.width, c.vision.layers, c.vision.patch_size),
        (1024, 24, 14)
    );
    assert_eq!(
        (c.vision.image_size, c.vision.heads(), c.adapter.present),
        (336, 16, true)
    );
    assert!(ignored.contains("visn_fc_m.weight"));
    assert!(!ignored
        .iter()
        .any(|n| n.starts_with("fusion_encoder.encoder.layer.6.")));
    println!("large: {params} consumed parameters");
    assert!(
        (565_500_000..565_700_000).contains(&params),
        "large live parameters {params}"
    );
}

#[test]
fn caption_only_checkpoint_needs_no_text_encoder_or_fusion() {
    let (mut shapes, ints) = reference_keys(&BASE, false);
    shapes.retain(|(n, _)| !n.starts_with("text_encoder") && !n.starts_with("fusion_encoder"));
    let path = PathBuf::from("caption.pth");
    let source = |shapes: &Shapes| LoadSource {
        tensors: broadcast_zeros(shapes),
        skipped: ints.clone(),
        path: &path,
    };
    let tasks = Tasks {
        caption: true,
        ..Tasks::default()
    };
    let loaded = Mplug::from_tensors(
        config("mplug_base.json"),
        source(&shapes),
        tasks,
        &Device::Cpu,
        DType::F32,
    );
    assert!(
        loaded.is_ok(),
        "caption-only load failed: {:?}",
        loaded.err()
    );
    let vqa = Tasks {
        vqa: true,
        ..Tasks::default()
    };
    let err = Mplug::from_tensors(
        config("mplug_base.json"),
        source(&shapes),
        vqa,
        &Device::Cpu,
        DType::F32,
    )
    .expect_err("VQA needs the text encoder");
    match err {
        Error::MissingTensor {
            path,
            name,
            expected,
        } => {
            assert_eq!(path, PathBuf::from("caption.pth"));
            assert_eq!(name, "text_encoder.embeddings.word_embeddings.weight");
            assert_eq!(expected, vec![30522, 768]);
        }
        other => panic!("expected MissingTensor, got {other}"),
    }
}

fn tiny(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

/// Rewrites the tiny safetensors fixture with `edit` applied, into a temp dir.
fn edited_checkpoint(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> PathBuf {
    let mut tensors =
        candle_core::safetensors::load(tiny("tiny_base.safetensors"), &Device::Cpu).unwrap();
    edit(&mut tensors);
    let out = dir.join("edited.safetensors");
    candle_core::safetensors::save(&tensors, &out).unwrap();
    out
}

#[test]
fn missing_tensor_error_names_tensor_shape_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let name = "fusion_encoder.encoder.layer.2.crossattention.self.key.weight";
    let ckpt = edited_checkpoint(dir.path(), |t| {
        t.remove(name);
    });
    let err = Mplug::load(
        &ckpt,
        &tiny("tiny_base.mplug.json"),
        Tasks::ALL,
        &Device::Cpu,
        DType::F32,
    )
    .expect_err("a live tensor is missing");
    let msg = err.to_string();
    assert!(matches!(err, Error::MissingTensor { .. }), "{msg}");
    assert!(
        msg.contains(name) && msg.contains("[64, 64]") && msg.contains("edited.safetensors"),
        "{msg}"
    );
}

#[test]
fn misshapen_tensor_error_names_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let name = "text_proj.weight";
    let ckpt = edited_checkpoint(dir.path(), |t| {
        t.insert(
            name.into(),
            Tensor::zeros((16, 32), DType::F32, &Device::Cpu).unwrap(),
        );
    });
    let err = Mplug::load(
        &ckpt,
        &tiny("tiny_base.mplug.json"),
        Tasks::ALL,
        &Device::Cpu,
        DType::F32,
    )
    .expect_err("a tensor has the wrong shape");
    match err {
        Error::TensorShape {
            name: n,
            got,
            expected,
            ..
        } => {
            assert_eq!(
                (n.as_str(), got, expected),
                (name, vec![16, 32], vec![16, 64])
            );
        }
        other => panic!("expected TensorShape, got {other}"),
    }
}

#[test]
fn momentum_weights_are_never_read() {
    // The fixture's momentum copies hold different random values; a loader that picked them
    // up instead of the main weights would change the model. Load the .pth (which has them)
    // and check nothing with `_m.` was consumed.
    let (_, report) = Mplug::load_with_report(
        &tiny("tiny_base.pth"),
        &tiny("tiny_base.mplug.json"),
        Tasks::ALL,
        &Device::Cpu,
        DType::F32,
    )
    .unwrap();
    assert!(report
        .consumed
        .iter()
        .all(|n| !n.split('.').next().unwrap().ends_with("_m")));
    assert!(report
        .ignored
        .contains("visual_encoder_m.visual.conv1.weight"));
    assert!(report.ignored.contains("queue_ptr"));
}

#[test]
fn garbage_file_is_a_checkpoint_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("junk.bin");
    std::fs::write(&path, b"definitely not a checkpoint").unwrap();
    let err = Mplug::load(
        &path,
        &tiny("tiny_base.mplug.json"),
        Tasks::ALL,
        &Device::Cpu,
        DType::F32,
    )
    .expect_err("junk is rejected");
    assert!(matches!(err, Error::Checkpoint { .. }), "{err}");
}

#[test]
fn position_table_is_resized_to_the_configured_resolution() {
    let path = tiny("tiny_base.safetensors");
    let mut cfg = MplugConfig::from_file(&tiny("tiny_base.mplug.json")).unwrap();
    cfg.vision.image_size = 96;
    let (tensors, skipped) =
        mplug_search::model::checkpoint::read_tensors(&path, |_| true).unwrap();
    let source = LoadSource {
        tensors,
        skipped,
        path: &path,
    };
    let (model, _) =
        Mplug::from_tensors(cfg, source, Tasks::ALL, &Device::Cpu, DType::F32).unwrap();
    assert_eq!(model.config().vision.num_tokens(), 37);
    let pixels = Tensor::zeros((1, 3, 96, 96), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(model.encode_image(&pixels).unwrap().dims(), &[1, 37, 64]);
}

#[test]
fn f16_on_cpu_is_refused_and_bf16_needs_avx512_bf16() {
    for dtype in [DType::BF16, DType::F16] {
        let loaded = Mplug::load(
            &tiny("tiny_large.safetensors"),
            &tiny("tiny_large.mplug.json"),
            Tasks::ALL,
            &Device::Cpu,
            dtype,
        );
        if dtype == DType::BF16 && mplug_search::model::bf16::available() {
            assert!(loaded.is_ok(), "bf16 loads on a CPU with avx512_bf16");
            continue;
        }
        let err = loaded.expect_err("no kernel for this half type on this CPU");
        assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
    }
}

#[test]
fn config_whose_head_count_does_not_split_the_checkpoint_width_is_refused_at_load() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity");
    let text = std::fs::read_to_string(fixtures.join("tiny_base.mplug.json")).expect("config");
    let mut config: serde_json::Value = serde_json::from_str(&text).expect("json");
    config["text"]["num_attention_heads"] = serde_json::json!(3);
    config["tokenizer"]["vocab_file"] = serde_json::json!(fixtures.join("vocab.txt"));
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bad.mplug.json");
    std::fs::write(&path, config.to_string()).expect("write config");

    let checkpoint = fixtures.join("tiny_base.safetensors");
    let loaded = Mplug::load(&checkpoint, &path, Tasks::ALL, &Device::Cpu, DType::F32);

    match loaded {
        Ok(_) => panic!("a head count of 3 cannot split width 64"),
        Err(Error::Config { reason, .. }) => {
            assert!(reason.contains("num_attention_heads 3"), "{reason}")
        }
        Err(other) => panic!("expected a config error, got {other}"),
    }
}
