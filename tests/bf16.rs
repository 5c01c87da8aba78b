//! The CPU bf16 path (bf16 linear weights, f32 activations) against the f32 model on the
//! tiny random-weight fixtures: ITC embeddings within 1e-2, ITM logits and captions close.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mplug_search::engine::{parity_model_paths, Backend, ModelSource, MplugBackend, Precision};
use mplug_search::model::{bf16, Mplug, Tasks};
use mplug_search::Error;

/// Largest allowed |bf16 − f32| on an L2-normalised ITC embedding.
const ITC_TOL: f32 = 1e-2;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/parity")
        .join(name)
}

fn load(cfg: &str, dtype: DType) -> Mplug {
    let ckpt = fixture(&format!("{cfg}.safetensors"));
    let config = fixture(&format!("{cfg}.mplug.json"));
    Mplug::load(&ckpt, &config, Tasks::ALL, &Device::Cpu, dtype).expect("fixture loads")
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .and_then(|d| d.abs()?.max_all()?.to_scalar::<f32>())
        .expect("same shapes")
}

/// ITC embeddings and ITM logits of both precisions, for one config.
fn compare(cfg: &str) {
    let (f32_model, bf16_model) = (load(cfg, DType::F32), load(cfg, DType::BF16));
    let gold = candle_core::safetensors::load(
        fixture(&format!("{cfg}.goldens.safetensors")),
        &Device::Cpu,
    )
    .expect("goldens load");
    let (pixels, ids, mask) = (
        &gold["pixel_values"],
        &gold["input_ids"],
        &gold["attention_mask"],
    );
    let run = |m: &Mplug| {
        let v = m.encode_image(pixels).expect("vision");
        let t = m.encode_text(ids, mask).expect("text");
        let (_, fused) = m
            .fuse(&t, mask, &v.narrow(0, 0, 1).unwrap())
            .expect("fusion");
        (
            m.image_embeds(&v).expect("image itc"),
            m.text_embeds(&t).expect("text itc"),
            m.itm_logits(&fused).expect("itm"),
        )
    };
    let (want, got) = (run(&f32_model), run(&bf16_model));
    let image = max_diff(&want.0, &got.0);
    let text = max_diff(&want.1, &got.1);
    let itm = max_diff(&want.2, &got.2);
    println!("{cfg}: bf16 vs f32 image itc {image:.2e}, text itc {text:.2e}, itm {itm:.2e}");
    assert!(
        image <= ITC_TOL,
        "{cfg}: image embeddings differ by {image}"
    );
    assert!(text <= ITC_TOL, "{cfg}: text embeddings differ by {text}");
    assert!(itm <= 5e-2, "{cfg}: itm logits differ by {itm}");
    assert!(
        image > 0.0,
        "{cfg}: the bf16 path did not run (identical to f32)"
    );
}

/// On a CPU without AVX512-BF16, asking for bf16 is refused with a clear error.
fn assert_refused() {
    let ckpt = fixture("tiny_base.safetensors");
    let config = fixture("tiny_base.mplug.json");
    let refused = Mplug::load(&ckpt, &config, Tasks::ALL, &Device::Cpu, DType::BF16);
    let Err(error) = refused else {
        panic!("bf16 must be refused without the instructions");
    };
    assert!(matches!(error, Error::UnsupportedDtype { .. }), "{error}");
}

#[test]
fn bf16_itc_embeddings_stay_within_1e_2_of_f32() {
    if !bf16::available() {
        assert_refused();
        return;
    }
    compare("tiny_base");
    compare("tiny_large");
}

#[test]
fn the_service_backend_encodes_in_bf16_close_to_f32() {
    let (checkpoint, config) = parity_model_paths(Path::new(env!("CARGO_MANIFEST_DIR")));
    let source = |precision| ModelSource {
        checkpoint: checkpoint.clone(),
        config: config.clone(),
        tasks: Tasks::ALL,
        max_pixels: 1 << 20,
        precision,
    };
    if !bf16::available() {
        let refused = MplugBackend::load(&source(Precision::Bf16));
        assert!(matches!(refused, Err(Error::UnsupportedDtype { .. })));
        return;
    }
    let f32_backend = MplugBackend::load(&source(Precision::F32)).expect("f32 loads");
    let bf16_backend = MplugBackend::load(&source(Precision::Bf16)).expect("bf16 loads");
    let texts = vec!["a red circle".to_string(), "two blue squares".to_string()];
    let want = f32_backend.encode_texts(&texts).expect("f32 encodes");
    let got = bf16_backend.encode_texts(&texts).expect("bf16 encodes");
    for (w, g) in want.iter().zip(&got) {
        let diff = w
            .iter()
            .zip(g)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(
            diff <= ITC_TOL && diff > 0.0,
            "bf16 text embedding differs by {diff}"
        );
    }
}
