//! Preprocessing against `tests/fixtures/parity/preprocess.goldens.safetensors` (PIL
//! `convert('RGB')` → bicubic `Resize((R, R))` → `ToTensor` → CLIP `Normalize`).
//!
//! Tolerances: PNG decoding is exact. JPEG decoding may differ from libjpeg-turbo by a few
//! levels; the resize is exact on identical input, so resizing the reference's own decoded
//! pixels must reproduce its uint8 output exactly and its tensors within 1e-5. From our own
//! JPEG decode, the normalised tensors stay within the bound asserted below.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use mplug_search::preprocess::ImagePreprocessor;

const IMAGES: [&str; 3] = ["easy_vqa_test_0.png", "easy_vqa_test_1.png", "rocket.jpg"];

/// Largest per-pixel difference allowed between our JPEG decode and libjpeg-turbo's, in
/// 8-bit levels.
const JPEG_LEVELS: u8 = 2;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/parity")
}

fn goldens() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir().join("preprocess.goldens.safetensors"), &Device::Cpu)
        .expect("preprocess goldens load")
}

fn as_image(t: &Tensor) -> RgbImage {
    let (h, w, _) = t.dims3().unwrap();
    let raw = t.flatten_all().unwrap().to_vec1::<u8>().unwrap();
    RgbImage::from_raw(w as u32, h as u32, raw).unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn decode_all(pre: &ImagePreprocessor) -> Vec<RgbImage> {
    IMAGES
        .iter()
        .map(|f| {
            let bytes = std::fs::read(dir().join("images").join(f)).expect("image file");
            pre.decode(&bytes).expect("image decodes")
        })
        .collect()
}

#[test]
fn decoding_matches_pil() {
    let g = goldens();
    let images = decode_all(&ImagePreprocessor::new(64));
    for (i, img) in images.iter().enumerate() {
        let want = as_image(&g[&format!("img{i}_rgb_u8")]);
        assert_eq!(img.dimensions(), want.dimensions(), "image {i} size");
        let worst = img
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        println!("image {i}: max decode difference {worst} levels");
        let limit = if IMAGES[i].ends_with(".png") {
            0
        } else {
            JPEG_LEVELS
        };
        assert!(
            worst <= limit,
            "image {i} decodes {worst} levels away from PIL"
        );
    }
}

#[test]
fn resize_is_bit_exact_on_reference_pixels() {
    let g = goldens();
    let pre = ImagePreprocessor::new(64);
    for i in 0..3 {
        let src = as_image(&g[&format!("img{i}_rgb_u8")]);
        let want = as_image(&g[&format!("img{i}_res64_u8")]);
        assert_eq!(pre.resize(&src), want, "image {i} resized to 64");
    }
    for res in [64u32, 384] {
        let pre = ImagePreprocessor::new(res);
        let src: Vec<RgbImage> = (0..3)
            .map(|i| as_image(&g[&format!("img{i}_rgb_u8")]))
            .collect();
        let t = pre.to_tensor(&src, &Device::Cpu).unwrap();
        let d = max_diff(&t, &g[&format!("res{res}")]);
        println!("res{res} from reference pixels: max|diff| {d:.3e}");
        assert!(d <= 1e-5, "res{res} differs by {d}");
    }
}

#[test]
fn full_pipeline_is_within_jpeg_tolerance() {
    let g = goldens();
    for res in [64u32, 384] {
        let pre = ImagePreprocessor::new(res);
        let t = pre.to_tensor(&decode_all(&pre), &Device::Cpu).unwrap();
        assert_eq!(t.dtype(), DType::F32);
        let want = &g[&format!("res{res}")];
        let png = max_diff(&t.narrow(0, 0, 2).unwrap(), &want.narrow(0, 0, 2).unwrap());
        let jpeg = max_diff(&t.narrow(0, 2, 1).unwrap(), &want.narrow(0, 2, 1).unwrap());
        println!("res{res}: PNG max|diff| {png:.3e}, JPEG max|diff| {jpeg:.3e}");
        assert!(png <= 1e-5, "res{res} PNG images differ by {png}");
        // JPEG_LEVELS levels over the smallest CLIP std.
        let bound = JPEG_LEVELS as f32 / 255.0 / 0.2613 + 1e-5;
        assert!(jpeg <= bound, "res{res} JPEG image differs by {jpeg}");
    }
}
