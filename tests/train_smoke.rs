//! A few training steps on synthetic coloured shapes: the losses fall, and the written
//! checkpoint loads back through `Mplug::load` with the outputs of the trained model.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use mplug_search::model::{Mplug, Tasks};
use mplug_search::train::trainer::{prepare_run, CONFIG_FILE, WEIGHTS_FILE};
use mplug_search::train::TrainArgs;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    train: TrainArgs,
}

/// Writes 8 images (4 colours × square/disc) and a manifest with a caption and a question
/// for each.
fn write_dataset(dir: &Path) -> std::path::PathBuf {
    let colours = [
        ("red", [230, 20, 20]),
        ("blue", [20, 20, 230]),
        ("green", [20, 230, 20]),
    ];
    let colours = colours.iter().chain(&[("yellow", [230, 230, 20])]);
    let mut lines = Vec::new();
    for (c, (name, rgb)) in colours.enumerate() {
        for (shape, is_disc) in [("square", false), ("disc", true)] {
            let image = image::RgbImage::from_fn(32, 32, |x, y| {
                let (dx, dy) = (x as i32 - 16, y as i32 - 16);
                let inside = if is_disc {
                    dx * dx + dy * dy < 100
                } else {
                    dx.abs() < 9 && dy.abs() < 9
                };
                image::Rgb(if inside { *rgb } else { [245, 240, 235] })
            });
            let file = format!("{c}-{shape}.png");
            image.save(dir.join(&file)).expect("temp dir is writable");
            lines.push(format!(
                r#"{{"image": "{file}", "caption": "a {name} {shape}"}}"#
            ));
            lines.push(format!(
                r#"{{"image": "{file}", "question": "what color is it?", "answer": "{name}"}}"#
            ));
        }
    }
    let manifest = dir.join("data.jsonl");
    std::fs::write(&manifest, lines.join("\n")).expect("write manifest");
    manifest
}

fn tiny_args(dir: &Path, manifest: &Path) -> TrainArgs {
    let out = dir.join("model");
    let argv = [
        "train",
        "--manifest",
        manifest.to_str().expect("utf-8 temp path"),
        "--images",
        dir.to_str().expect("utf-8 temp path"),
        "--out",
        out.to_str().expect("utf-8 temp path"),
        "--epochs",
        "100",
        "--max-steps",
        "40",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--checkpoint-every",
        "0",
        "--f16",
        "false",
        "--image-size",
        "32",
        "--patch-size",
        "16",
        "--vision-width",
        "32",
        "--hidden",
        "32",
        "--heads",
        "2",
        "--vision-layers",
        "1",
        "--text-layers",
        "1",
        "--fusion-layers",
        "2",
        "--decoder-layers",
        "1",
        "--embed-dim",
        "16",
    ];
    Cli::try_parse_from(argv)
        .expect("test arguments parse")
        .train
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs())
        .and_then(|d| d.flatten_all())
        .and_then(|d| d.max(0))
        .and_then(|d| d.to_scalar::<f32>())
        .expect("same shapes")
}

#[test]
fn training_reduces_the_loss_and_the_checkpoint_reloads_with_the_same_outputs() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = write_dataset(dir.path());
    let args = tiny_args(dir.path(), &manifest);

    let prepared = prepare_run(&args).expect("run prepares");
    let mut trainer = prepared.trainer;
    let summary = trainer
        .fit(&prepared.dataset, &prepared.pixels)
        .expect("training runs");

    eprintln!("{summary:?}");
    assert_eq!(summary.steps, 40);
    let initial: f32 = summary.initial_losses.iter().sum();
    let last: f32 = summary.final_losses.iter().sum();
    assert!(
        summary.final_losses.iter().all(|l| l.is_finite()),
        "{summary:?}"
    );
    assert!(last < 0.7 * initial, "loss went from {initial} to {last}");

    let out = &args.out;
    let loaded = Mplug::load(
        &out.join(WEIGHTS_FILE),
        &out.join(CONFIG_FILE),
        Tasks::ALL,
        &Device::Cpu,
        DType::F32,
    )
    .expect("checkpoint loads");
    let trained = trainer.model();

    // The trained model uses the differentiable ops and the loaded one the fused kernels,
    // so outputs agree to float rounding rather than bit for bit.
    let tolerance = 1e-4;
    let pixels = prepared.pixels.narrow(0, 0, 4).expect("4 images");
    let v_trained = trained.encode_image(&pixels).expect("encode");
    let v_loaded = loaded.encode_image(&pixels).expect("encode");
    assert!(max_abs_diff(&v_trained, &v_loaded) < tolerance);

    let e_trained = trained.image_embeds(&v_trained).expect("embeds");
    let e_loaded = loaded.image_embeds(&v_loaded).expect("embeds");
    assert!(max_abs_diff(&e_trained, &e_loaded) < tolerance);

    let ids = Tensor::new(&[[2u32, 5, 6, 0]; 4], &Device::Cpu).expect("ids");
    let mask = Tensor::new(&[[1u32, 1, 1, 0]; 4], &Device::Cpu).expect("mask");
    let t_trained = trained.encode_text(&ids, &mask).expect("text");
    let t_loaded = loaded.encode_text(&ids, &mask).expect("text");
    let (_, f_trained) = trained.fuse(&t_trained, &mask, &v_trained).expect("fuse");
    let (_, f_loaded) = loaded.fuse(&t_loaded, &mask, &v_loaded).expect("fuse");
    let itm_trained = trained.itm_logits(&f_trained).expect("itm");
    let itm_loaded = loaded.itm_logits(&f_loaded).expect("itm");
    assert!(max_abs_diff(&itm_trained, &itm_loaded) < tolerance);

    let memory_mask =
        Tensor::ones(v_loaded.dims()[..2].to_vec(), DType::U32, &Device::Cpu).expect("memory mask");
    let lm_trained = trained
        .decoder_logits(&ids, &mask, &v_trained, &memory_mask)
        .expect("decoder");
    let lm_loaded = loaded
        .decoder_logits(&ids, &mask, &v_loaded, &memory_mask)
        .expect("decoder");
    assert!(max_abs_diff(&lm_trained, &lm_loaded) < tolerance);
}

/// `tiny_args` for a short run into `out`, starting from `init` when given.
fn args_with(dir: &Path, manifest: &Path, out: &Path, init: Option<&Path>) -> TrainArgs {
    let mut args = tiny_args(dir, manifest);
    args.out = out.to_path_buf();
    args.max_steps = 3;
    args.init_checkpoint = init.map(Path::to_path_buf);
    args
}

/// Outputs of every head on a fixed input: image embeddings, ITM logits, decoder logits.
fn head_outputs(model: &Mplug, pixels: &Tensor) -> Vec<Tensor> {
    let device = Device::Cpu;
    let image = model.encode_image(pixels).expect("encode");
    let embeds = model.image_embeds(&image).expect("embeds");
    let ids = Tensor::new(&[[2u32, 5, 6, 0]; 4], &device).expect("ids");
    let mask = Tensor::new(&[[1u32, 1, 1, 0]; 4], &device).expect("mask");
    let text = model.encode_text(&ids, &mask).expect("text");
    let (_, fused) = model.fuse(&text, &mask, &image).expect("fuse");
    let itm = model.itm_logits(&fused).expect("itm");
    let memory_mask =
        Tensor::ones(image.dims()[..2].to_vec(), DType::U32, &device).expect("memory mask");
    let lm = model
        .decoder_logits(&ids, &mask, &image, &memory_mask)
        .expect("decoder");
    vec![embeds, itm, lm]
}

#[test]
fn init_checkpoint_starts_from_the_saved_weights_and_rejects_other_shapes() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = write_dataset(dir.path());
    let first = args_with(dir.path(), &manifest, &dir.path().join("first"), None);
    let prepared = prepare_run(&first).expect("run prepares");
    let mut trainer = prepared.trainer;
    trainer
        .fit(&prepared.dataset, &prepared.pixels)
        .expect("training runs");
    let weights = first.out.join(WEIGHTS_FILE);
    let second_out = dir.path().join("second");

    // A different seed changes the random initialisation, which the checkpoint replaces.
    let mut resumed_args = args_with(dir.path(), &manifest, &second_out, Some(&weights));
    resumed_args.seed = 7;
    let resumed = prepare_run(&resumed_args).expect("init from checkpoint");
    let mut fresh_args = args_with(dir.path(), &manifest, &second_out, None);
    fresh_args.seed = 7;
    let fresh = prepare_run(&fresh_args).expect("fresh run prepares");

    let pixels = prepared.pixels.narrow(0, 0, 4).expect("4 images");
    let saved = head_outputs(trainer.model(), &pixels);
    let loaded = head_outputs(resumed.trainer.model(), &pixels);
    let random = head_outputs(fresh.trainer.model(), &pixels);
    for ((s, l), r) in saved.iter().zip(&loaded).zip(&random) {
        assert_eq!(max_abs_diff(s, l), 0.0, "f32 checkpoint reloads exactly");
        assert!(max_abs_diff(s, r) > 1e-3, "a fresh model differs");
    }

    let mut wider = args_with(dir.path(), &manifest, &second_out, Some(&weights));
    wider.shape.hidden = 48;
    let error = match prepare_run(&wider) {
        Ok(_) => panic!("a checkpoint of another shape must be rejected"),
        Err(error) => error,
    };
    assert!(
        matches!(error, mplug_search::Error::TensorShape { .. }),
        "{error}"
    );
}

#[test]
fn init_checkpoint_flag_parses() {
    let cli = Cli::try_parse_from(["train", "--init-checkpoint", "base/model.safetensors"])
        .expect("flag parses");
    assert_eq!(
        cli.train.init_checkpoint.as_deref(),
        Some(Path::new("base/model.safetensors"))
    );
}

#[test]
fn init_checkpoint_rejects_a_vocabulary_built_from_other_texts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let manifest = write_dataset(dir.path());
    let first = args_with(dir.path(), &manifest, &dir.path().join("first"), None);
    let prepared = prepare_run(&first).expect("run prepares");
    prepared.trainer.save(&first.out).expect("checkpoint saves");

    let mut text = std::fs::read_to_string(&manifest).expect("read manifest");
    text.push_str("\n{\"image\": \"0-disc.png\", \"caption\": \"a crimson zigzag\"}");
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, text).expect("write manifest");
    let weights = first.out.join(WEIGHTS_FILE);
    let resumed = args_with(
        dir.path(),
        &other,
        &dir.path().join("second"),
        Some(&weights),
    );
    let error = match prepare_run(&resumed) {
        Ok(_) => panic!("a different vocabulary must be rejected"),
        Err(error) => error,
    };
    assert!(
        matches!(error, mplug_search::Error::Checkpoint { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("vocabulary"), "{error}");
}
