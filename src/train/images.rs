//! Decoding a dataset's images once into one normalised pixel tensor.

use std::path::PathBuf;

use candle_core::{Device, Tensor};
use rayon::prelude::*;

use crate::preprocess::ImagePreprocessor;
use crate::Result;

/// Decodes and normalises every image in `paths` with the model's preprocessing, returning
/// (N, 3, R, R) f32 pixels on `device` in `paths` order.
///
/// # Errors
/// [`crate::Error::Io`] naming an unreadable file, and the preprocessor's decode errors.
pub fn load_pixels(
    preprocessor: &ImagePreprocessor,
    paths: &[PathBuf],
    device: &Device,
) -> Result<Tensor> {
    let tensors = paths
        .par_iter()
        .map(|path| {
            let bytes = std::fs::read(path).map_err(|source| crate::Error::Io {
                path: path.clone(),
                source,
            })?;
            let image = preprocessor.decode(&bytes)?;
            preprocessor.to_tensor(std::slice::from_ref(&image), &Device::Cpu)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    Ok(Tensor::cat(&tensors, 0)?.to_device(device)?)
}
