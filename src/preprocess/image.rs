//! Image decoding, PIL-exact bicubic resizing and CLIP normalisation.
//!
//! The reference transform (`alibaba/AliceMind` mPLUG/dataset/__init__.py `test_transform` at
//! commit a6d5afe5c272960ce61dc73adb0877bc94b5d664) is PIL `convert('RGB')`, a square
//! `Resize((R, R), BICUBIC)`, `ToTensor` and `Normalize` with CLIP's mean/std. The resize here
//! reproduces Pillow's separable 8-bit resampler (bicubic a = -0.5, support scaled by the
//! downscale factor, 22-bit fixed-point coefficients, horizontal pass first with an 8-bit
//! intermediate), so the resized pixels equal Pillow's bit for bit; what can differ is only
//! JPEG decoding (see the tolerance on [`ImagePreprocessor::decode`]).

use std::io::Cursor;

use candle_core::{Device, Tensor};
use image::{DynamicImage, ImageDecoder, ImageFormat, ImageReader, Limits, RgbImage};

use crate::{Error, Result};

/// CLIP normalisation mean per RGB channel.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];

/// CLIP normalisation standard deviation per RGB channel.
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

/// Default pixel cap: 64 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 64 * 1024 * 1024;

/// Fixed-point precision of Pillow's 8-bit resampling coefficients.
const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Bicubic support radius (in source pixels, before scaling).
const BICUBIC_SUPPORT: f64 = 2.0;

/// Decodes and prepares images for the vision encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImagePreprocessor {
    /// Square output size in pixels (the checkpoint's `vision.image_size`).
    pub resolution: u32,
    /// Largest accepted `width × height`, checked from the header before decoding.
    pub max_pixels: u64,
}

impl ImagePreprocessor {
    /// A preprocessor for `resolution` with the default pixel cap.
    pub fn new(resolution: u32) -> Self {
        Self {
            resolution,
            max_pixels: DEFAULT_MAX_PIXELS,
        }
    }

    /// Decodes PNG, JPEG, WebP or GIF (first frame) bytes, applies the EXIF orientation and
    /// converts to 8-bit RGB (grey, alpha, 16-bit and CMYK inputs included; alpha is dropped
    /// as PIL's `convert('RGB')` does). JPEG decoding may differ from libjpeg-turbo by a few
    /// levels on some pixels (measured on the fixture photo: see the preprocessing test).
    /// Errors: [`Error::ImageTooLarge`] when the header announces more than `max_pixels`
    /// pixels (nothing is decoded then), [`Error::ImageDecode`] otherwise.
    pub fn decode(&self, bytes: &[u8]) -> Result<RgbImage> {
        let decode_err = |e: &dyn std::fmt::Display| Error::ImageDecode {
            reason: e.to_string(),
        };
        let open = || {
            ImageReader::new(Cursor::new(bytes))
                .with_guessed_format()
                .map_err(|e| decode_err(&e))
        };
        let reader = open()?;
        match reader.format() {
            Some(ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP | ImageFormat::Gif) => {}
            other => {
                let reason = format!("unsupported format {other:?}, expected PNG/JPEG/WebP/GIF");
                return Err(Error::ImageDecode { reason });
            }
        }
        self.check_size(reader.into_dimensions().map_err(|e| decode_err(&e))?)?;

        let mut reader = open()?;
        let mut limits = Limits::default();
        limits.max_alloc = Some(self.max_pixels.saturating_mul(16));
        reader.limits(limits);
        let mut decoder = reader.into_decoder().map_err(|e| decode_err(&e))?;
        let orientation = decoder.orientation().map_err(|e| decode_err(&e))?;
        let mut img = DynamicImage::from_decoder(decoder).map_err(|e| decode_err(&e))?;
        img.apply_orientation(orientation);
        Ok(into_rgb8(img))
    }

    /// [`Self::decode`], then [`Self::resize`] to the model's resolution: what a service keeps
    /// of an image between decoding and encoding. The full-resolution pixels live only for
    /// the length of this call, so an image held in a queue costs R × R × 3 bytes whatever
    /// its size. Errors as for [`Self::decode`].
    pub fn load(&self, bytes: &[u8]) -> Result<RgbImage> {
        let decoded = self.decode(bytes)?;
        Ok(self.resize(&decoded))
    }

    fn check_size(&self, (width, height): (u32, u32)) -> Result<()> {
        if width as u64 * height as u64 > self.max_pixels {
            return Err(Error::ImageTooLarge {
                width,
                height,
                max_pixels: self.max_pixels,
            });
        }
        if width == 0 || height == 0 {
            let reason = format!("image is {width}x{height}, expected a non-empty image");
            return Err(Error::ImageDecode { reason });
        }
        Ok(())
    }

    /// Squashes to `resolution × resolution` with Pillow's bicubic resampler; an image that
    /// already has that size is returned unchanged, as Pillow's `resize` does.
    pub fn resize(&self, img: &RgbImage) -> RgbImage {
        let r = self.resolution;
        if img.dimensions() == (r, r) {
            return img.clone();
        }
        resize_bicubic(img, r, r)
    }

    /// Resizes each image (those of the resolution already, e.g. from [`Self::load`], are
    /// taken as they are) and stacks them into a (B, 3, R, R) f32 tensor normalised with
    /// [`CLIP_MEAN`] / [`CLIP_STD`].
    pub fn to_tensor(&self, images: &[RgbImage], device: &Device) -> Result<Tensor> {
        let (r, side) = (self.resolution as usize, self.resolution);
        let mut data = Vec::with_capacity(images.len() * 3 * r * r);
        for img in images {
            if img.dimensions() == (side, side) {
                data.extend(normalise(img));
            } else {
                data.extend(normalise(&self.resize(img)));
            }
        }
        Ok(Tensor::from_vec(data, (images.len(), 3, r, r), device)?)
    }
}

/// The pixel count (width × height) the header of an encoded image announces, read without
/// decoding; `None` when the format is unknown or the header cannot be read.
pub fn header_pixels(bytes: &[u8]) -> Option<u64> {
    let reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .ok()?;
    let (width, height) = reader.into_dimensions().ok()?;
    Some(width as u64 * height as u64)
}

/// 8-bit RGB from a decoded image without a second full-size copy where the decoder gave
/// 8-bit RGB or RGBA (alpha dropped in place, as PIL's `convert('RGB')` drops it); other
/// colour types convert through a copy.
fn into_rgb8(img: DynamicImage) -> RgbImage {
    match img {
        DynamicImage::ImageRgb8(rgb) => rgb,
        DynamicImage::ImageRgba8(rgba) => {
            let (width, height) = rgba.dimensions();
            let mut raw = rgba.into_raw();
            let pixels = raw.len() / 4;
            for i in 0..pixels {
                raw.copy_within(4 * i..4 * i + 3, 3 * i);
            }
            raw.truncate(3 * pixels);
            RgbImage::from_raw(width, height, raw).expect("three bytes per pixel")
        }
        other => other.to_rgb8(),
    }
}

/// Channel-major `(x / 255 - mean) / std`, in f32 like torchvision.
fn normalise(img: &RgbImage) -> Vec<f32> {
    let (w, h) = img.dimensions();
    let raw = img.as_raw();
    let mut out = Vec::with_capacity(raw.len());
    for c in 0..3 {
        for i in 0..(w * h) as usize {
            let x = raw[i * 3 + c] as f32 / 255.0;
            out.push((x - CLIP_MEAN[c]) / CLIP_STD[c]);
        }
    }
    out
}

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Per-output-pixel source window and fixed-point weights of one axis.
struct Coefficients {
    /// (first source index, tap count) per output pixel.
    bounds: Vec<(usize, usize)>,
    /// `taps` weights per output pixel.
    weights: Vec<i32>,
    taps: usize,
}

fn coefficients(in_size: usize, out_size: usize) -> Coefficients {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filter_scale;
    let taps = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * taps];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize - xmin;
        let w: Vec<f64> = (0..xmax)
            .map(|x| bicubic((x as f64 + xmin as f64 - center + 0.5) / filter_scale))
            .collect();
        let total: f64 = w.iter().sum();
        for (x, wx) in w.iter().enumerate() {
            let k = if total != 0.0 { wx / total } else { *wx };
            let fixed = k * (1u32 << PRECISION_BITS) as f64;
            let rounded = if k < 0.0 { -0.5 + fixed } else { 0.5 + fixed };
            weights[xx * taps + x] = rounded as i32;
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        bounds,
        weights,
        taps,
    }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// One horizontal pass over an RGB8 row `src` (pixel `i` at byte `i * stride`), appending the
/// resampled pixels to `out`.
fn resample_line(src: &[u8], coeff: &Coefficients, out: &mut Vec<u8>, stride: usize) {
    for (o, &(xmin, n)) in coeff.bounds.iter().enumerate() {
        let k = &coeff.weights[o * coeff.taps..o * coeff.taps + n];
        for c in 0..3 {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (x, &kx) in k.iter().enumerate() {
                acc += src[(xmin + x) * stride + c] as i64 * kx as i64;
            }
            out.push(clip8(acc));
        }
    }
}

/// Pillow's `Image.resize((w, h), BICUBIC)` on an RGB8 image.
pub fn resize_bicubic(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    let (w0, h0) = (img.width() as usize, img.height() as usize);
    let (w1, h1) = (width as usize, height as usize);
    if (w0, h0) == (w1, h1) {
        return img.clone();
    }
    let vert = coefficients(h0, h1);
    let horiz_needed = w0 != w1;
    let (first, last) = if h0 != h1 {
        let first = vert.bounds[0].0;
        let (lb, ln) = vert.bounds[h1 - 1];
        (first, lb + ln)
    } else {
        (0, h0)
    };

    let raw = img.as_raw();
    let (mid, mid_w) = if horiz_needed {
        let horiz = coefficients(w0, w1);
        let mut mid = Vec::with_capacity((last - first) * w1 * 3);
        for y in first..last {
            let row = &raw[y * w0 * 3..(y + 1) * w0 * 3];
            resample_line(row, &horiz, &mut mid, 3);
        }
        (mid, w1)
    } else {
        (raw[first * w0 * 3..last * w0 * 3].to_vec(), w0)
    };
    if h0 == h1 {
        return RgbImage::from_raw(mid_w as u32, h1 as u32, mid).expect("buffer holds w*h*3 bytes");
    }

    let mut out = vec![0u8; w1 * h1 * 3];
    let row_bytes = mid_w * 3;
    for (yy, &(ymin, n)) in vert.bounds.iter().enumerate() {
        let k = &vert.weights[yy * vert.taps..yy * vert.taps + n];
        let start = ymin - first;
        for x in 0..row_bytes {
            let mut acc: i64 = 1 << (PRECISION_BITS - 1);
            for (y, &ky) in k.iter().enumerate() {
                acc += mid[(start + y) * row_bytes + x] as i64 * ky as i64;
            }
            out[yy * row_bytes + x] = clip8(acc);
        }
    }
    RgbImage::from_raw(w1 as u32, h1 as u32, out).expect("buffer holds w*h*3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{ImageEncoder, Rgba, RgbaImage};

    fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), format)
            .expect("encodes");
        out
    }

    fn gradient() -> RgbImage {
        RgbImage::from_fn(6, 4, |x, y| image::Rgb([x as u8 * 40, y as u8 * 60, 200]))
    }

    #[test]
    fn load_keeps_only_the_model_resolution_and_encodes_like_the_full_image() {
        let pre = ImagePreprocessor::new(8);
        let big = RgbImage::from_fn(301, 177, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 13 % 256) as u8,
                ((x + y) % 256) as u8,
            ])
        });
        let bytes = encode(&DynamicImage::ImageRgb8(big.clone()), ImageFormat::Png);

        let loaded = pre.load(&bytes).unwrap();
        assert_eq!(loaded.dimensions(), (8, 8));
        assert_eq!(loaded, pre.resize(&big));
        let values = |img: RgbImage| {
            let pixels = pre.to_tensor(&[img], &Device::Cpu).unwrap();
            pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        };
        assert_eq!(values(loaded), values(big));
    }

    #[test]
    fn rgb_conversion_in_place_equals_the_copying_one() {
        let rgba = RgbaImage::from_fn(5, 3, |x, y| Rgba([x as u8 * 50, y as u8 * 70, 7, 128]));
        let rgb = RgbImage::from_fn(4, 2, |x, y| image::Rgb([x as u8, y as u8, 3]));
        let grey = image::GrayImage::from_fn(3, 3, |x, y| image::Luma([(x * 3 + y) as u8 * 20]));
        for img in [
            DynamicImage::ImageRgba8(rgba),
            DynamicImage::ImageRgb8(rgb),
            DynamicImage::ImageLuma8(grey),
        ] {
            assert_eq!(into_rgb8(img.clone()), img.to_rgb8());
        }
    }

    #[test]
    fn header_pixels_are_read_without_decoding() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(300, 7));
        let png = encode(&img, ImageFormat::Png);
        assert_eq!(header_pixels(&png), Some(2100));
        assert_eq!(header_pixels(b"not an image"), None);
    }

    #[test]
    fn resizing_to_the_same_size_keeps_every_pixel() {
        let pre = ImagePreprocessor::new(6);
        let square = RgbImage::from_fn(6, 6, |x, y| image::Rgb([x as u8 * 40, y as u8, 9]));
        assert_eq!(pre.resize(&square), square);
        assert_eq!(
            resize_bicubic(&square, 6, 6),
            square,
            "Pillow's filter is exact at 1:1"
        );
    }

    #[test]
    fn decodes_grey_alpha_and_sixteen_bit_to_rgb() {
        let pre = ImagePreprocessor::new(8);
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(3, 2, image::Luma([77])));
        let rgb = pre.decode(&encode(&grey, ImageFormat::Png)).unwrap();
        assert!(rgb.pixels().all(|p| p.0 == [77, 77, 77]));

        let rgba = RgbaImage::from_pixel(3, 2, Rgba([10, 20, 30, 0]));
        let rgb = pre
            .decode(&encode(&DynamicImage::ImageRgba8(rgba), ImageFormat::Png))
            .unwrap();
        assert!(
            rgb.pixels().all(|p| p.0 == [10, 20, 30]),
            "alpha is dropped, not composited"
        );

        let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_pixel(
            2,
            2,
            image::Rgb([65535, 0, 32896]),
        );
        let rgb = pre
            .decode(&encode(&DynamicImage::ImageRgb16(deep), ImageFormat::Png))
            .unwrap();
        assert!(rgb.pixels().all(|p| p.0 == [255, 0, 128]));
    }

    #[test]
    fn decodes_gif_and_webp() {
        let pre = ImagePreprocessor::new(8);
        let img = DynamicImage::ImageRgb8(gradient());
        let gif = pre.decode(&encode(&img, ImageFormat::Gif)).unwrap();
        assert_eq!(gif.dimensions(), (6, 4));
        let webp = pre.decode(&encode(&img, ImageFormat::WebP)).unwrap();
        assert_eq!(webp, gradient(), "lossless WebP round-trips");
    }

    #[test]
    fn applies_exif_orientation() {
        // Big-endian TIFF header, one IFD entry: Orientation (0x0112), SHORT, 1, value 6.
        let exif: Vec<u8> = vec![
            b'M', b'M', 0, 42, 0, 0, 0, 8, 0, 1, 0x01, 0x12, 0, 3, 0, 0, 0, 1, 0, 6, 0, 0, 0, 0, 0,
            0,
        ];
        let img = gradient();
        let mut png = Vec::new();
        let mut enc = image::codecs::png::PngEncoder::new(&mut png);
        enc.set_exif_metadata(exif).unwrap();
        enc.write_image(img.as_raw(), 6, 4, image::ExtendedColorType::Rgb8)
            .unwrap();
        let out = ImagePreprocessor::new(8).decode(&png).unwrap();
        assert_eq!(
            out.dimensions(),
            (4, 6),
            "orientation 6 rotates by 90 degrees"
        );
        assert_eq!(out, image::imageops::rotate90(&img));
    }

    #[test]
    fn rejects_unknown_bytes() {
        let pre = ImagePreprocessor::new(8);
        assert!(matches!(
            pre.decode(b"not an image"),
            Err(Error::ImageDecode { .. })
        ));
    }

    #[test]
    fn normalises_with_clip_constants() {
        let img = RgbImage::from_pixel(2, 2, image::Rgb([255, 0, 128]));
        let t = ImagePreprocessor::new(2)
            .to_tensor(&[img], &Device::Cpu)
            .unwrap();
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!((v[0] - (1.0 - CLIP_MEAN[0]) / CLIP_STD[0]).abs() < 1e-6);
        assert!((v[4] - (0.0 - CLIP_MEAN[1]) / CLIP_STD[1]).abs() < 1e-6);
    }

    #[test]
    fn resize_to_same_size_is_identity() {
        let img = RgbImage::from_fn(5, 4, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(resize_bicubic(&img, 5, 4), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        let out = resize_bicubic(&img, 16, 50);
        assert!(out.pixels().all(|p| p.0 == [200, 10, 99]));
    }

    #[test]
    fn header_cap_rejects_before_decoding() {
        let img = DynamicImage::ImageRgb8(RgbImage::new(20, 20));
        let mut png = Vec::new();
        img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)
            .unwrap();
        let pre = ImagePreprocessor {
            resolution: 8,
            max_pixels: 399,
        };
        assert!(matches!(
            pre.decode(&png),
            Err(Error::ImageTooLarge { width: 20, .. })
        ));
    }
}
