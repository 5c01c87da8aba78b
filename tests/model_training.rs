//! Training mode: with `differentiable` set, a model built on a `VarMap` backpropagates ITC,
//! ITM and LM losses into every parameter, and computes the same function as inference.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, IndexOp, Tensor, D};
use candle_nn::{loss, VarBuilder, VarMap};
use mplug_search::model::checkpoint::read_tensors;
use mplug_search::model::{LoadSource, Mplug, MplugConfig, Tasks};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

/// The tiny_base config with every shape field set, as a trainer would build it.
fn tiny_config() -> MplugConfig {
    let mut cfg = MplugConfig::from_file(&fixture("tiny_base.mplug.json")).unwrap();
    cfg.vision.width = 64;
    cfg.vision.layers = 2;
    cfg.vision.patch_size = 16;
    cfg.vision.image_size = 64;
    cfg.text.hidden_size = 64;
    cfg.text.intermediate_size = 128;
    cfg.text.num_hidden_layers = 2;
    cfg.text.vocab_size = 512;
    cfg.text.max_position_embeddings = 64;
    cfg.text.type_vocab_size = 2;
    cfg.fusion.num_hidden_layers = 7;
    cfg.decoder.num_hidden_layers = 2;
    cfg.embed_dim = 16;
    cfg.differentiable = true;
    cfg
}

fn losses(model: &Mplug, dev: &Device) -> candle_core::Result<Tensor> {
    let pixels = Tensor::randn(0f32, 1.0, (2, 3, 64, 64), dev)?;
    let ids = Tensor::new(&[[101u32, 7, 8, 9], [101, 10, 11, 0]], dev)?;
    let mask = Tensor::new(&[[1u32, 1, 1, 1], [1, 1, 1, 0]], dev)?;
    let v = model.encode_image(&pixels).unwrap();
    let t = model.encode_text(&ids, &mask).unwrap();

    let sims = model
        .image_embeds(&v)
        .unwrap()
        .matmul(&model.text_embeds(&t).unwrap().t()?)?;
    let targets = Tensor::new(&[0u32, 1], dev)?;
    let itc = loss::cross_entropy(&(sims / 0.07)?, &targets)?;

    let (_, t_fused) = model.fuse(&t, &mask, &v).unwrap();
    let itm = loss::cross_entropy(
        &model.itm_logits(&t_fused).unwrap(),
        &Tensor::new(&[1u32, 0], dev)?,
    )?;

    let (memory, memory_mask) = model.vqa_memory(&v, &ids, &mask).unwrap();
    let logits = model
        .decoder_logits(&ids, &mask, &memory, &memory_mask)
        .unwrap();
    let next = logits.i((.., ..3))?.reshape(((), 512))?;
    let lm = loss::cross_entropy(&next, &ids.i((.., 1..))?.flatten_all()?)?;

    let ones = Tensor::ones((2, v.dim(1)?), DType::U32, dev)?;
    let cap = model.decoder_logits(&ids, &mask, &v, &ones).unwrap();
    let cap = cap.i((.., ..3))?.reshape(((), 512))?;
    let lm_caption = loss::cross_entropy(&cap, &ids.i((.., 1..))?.flatten_all()?)?;
    itc + itm + lm + lm_caption
}

#[test]
fn every_parameter_receives_a_gradient() {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &dev);
    let model = Mplug::new(&tiny_config(), Tasks::ALL, vb).expect("builds on a VarMap");
    let total = losses(&model, &dev).unwrap();
    assert!(total.to_scalar::<f32>().unwrap().is_finite());
    let grads = total.backward().unwrap();

    let data = varmap.data().lock().unwrap();
    let mut missing = Vec::new();
    for (name, var) in data.iter() {
        match grads.get(var.as_tensor()) {
            Some(g) => assert!(g.sum_all().unwrap().to_scalar::<f32>().unwrap().is_finite()),
            None => missing.push(name.clone()),
        }
    }
    assert!(missing.is_empty(), "no gradient for {missing:?}");
    let (_, report) = Mplug::load_with_report(
        &fixture("tiny_base.safetensors"),
        &fixture("tiny_base.mplug.json"),
        Tasks::ALL,
        &dev,
        DType::F32,
    )
    .unwrap();
    let names: std::collections::BTreeSet<String> = data.keys().cloned().collect();
    assert_eq!(
        names, report.consumed,
        "the VarMap holds exactly the checkpoint's live tensors"
    );
}

#[test]
fn differentiable_ops_compute_the_inference_function() {
    let dev = Device::Cpu;
    let path = fixture("tiny_base.safetensors");
    let load = |differentiable: bool| {
        let mut cfg = MplugConfig::from_file(&fixture("tiny_base.mplug.json")).unwrap();
        cfg.differentiable = differentiable;
        let (tensors, skipped) = read_tensors(&path, |_| true).unwrap();
        let source = LoadSource {
            tensors,
            skipped,
            path: &path,
        };
        Mplug::from_tensors(cfg, source, Tasks::ALL, &dev, DType::F32)
            .unwrap()
            .0
    };
    let (fast, slow) = (load(false), load(true));
    let gold =
        candle_core::safetensors::load(fixture("tiny_base.goldens.safetensors"), &dev).unwrap();
    let run = |m: &Mplug| {
        let v = m.encode_image(&gold["pixel_values"]).unwrap();
        let t = m
            .encode_text(&gold["input_ids"], &gold["attention_mask"])
            .unwrap();
        let v = v.i(0..1).unwrap().repeat((4, 1, 1)).unwrap();
        let (_, tf) = m.fuse(&t, &gold["attention_mask"], &v).unwrap();
        m.itm_logits(&tf).unwrap()
    };
    let diff = (run(&fast) - run(&slow)).unwrap().abs().unwrap();
    let diff = diff
        .max_keepdim(D::Minus1)
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(diff < 1e-5, "training and inference paths differ by {diff}");
}
