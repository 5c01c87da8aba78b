//! What the engine needs from a model: the [`Backend`] trait and the values crossing it.
//!
//! The engine only schedules work; everything numeric happens behind this trait, so the
//! queueing and batching can be exercised without loading a checkpoint.

use std::sync::Arc;

use half::f16;

use crate::Result;

/// A decoded RGB image, at the model's resolution once a backend has decoded it.
pub type RgbImage = image::RgbImage;

/// Facts about the loaded model that the service reports and validates against.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Identifier stored in the collection; opening a collection of another model fails.
    pub model_id: String,
    /// Length of ITC vectors.
    pub embed_dim: usize,
    /// Default generation settings for captions.
    pub caption_defaults: GenerationSettings,
    /// Default generation settings for VQA answers.
    pub vqa_defaults: GenerationSettings,
}

/// Beam-search settings for one generation request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationSettings {
    /// Beam width; 1 is greedy decoding.
    pub beam_size: usize,
    /// Minimum generated length in tokens.
    pub min_length: usize,
    /// Maximum generated length in tokens.
    pub max_length: usize,
}

/// An image's full vision token sequence (the fusion and decoder memory), stored in f16
/// to halve the rerank cache's footprint.
#[derive(Debug, Clone, PartialEq)]
pub struct VisionTokens {
    /// Row-major `(tokens, width)` values.
    pub data: Vec<f16>,
    /// Number of tokens (CLS plus patches).
    pub tokens: usize,
    /// Width of each token.
    pub width: usize,
}

impl VisionTokens {
    /// Converts an f32 `(tokens, width)` buffer; `None` when the length does not match.
    pub fn from_f32(values: &[f32], tokens: usize, width: usize) -> Option<Self> {
        if values.len() != tokens * width {
            return None;
        }
        let data = values.iter().map(|&v| f16::from_f32(v)).collect();
        Some(Self {
            data,
            tokens,
            width,
        })
    }

    /// Bytes held by the values.
    pub fn byte_size(&self) -> usize {
        self.data.len() * std::mem::size_of::<f16>()
    }
}

/// Result of encoding one image.
#[derive(Debug, Clone)]
pub struct ImageEncoding {
    /// L2-normalised ITC vector.
    pub embedding: Vec<f32>,
    /// Full vision token sequence, for rerank and generation.
    pub tokens: Arc<VisionTokens>,
}

/// The two ITM logits of one (image, text) pair.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ItmScore {
    /// Logit of "no match" (index 0 of the ITM head).
    pub no_match: f32,
    /// Logit of "match" (index 1), the value mPLUG ranks by.
    pub matched: f32,
}

impl ItmScore {
    /// Softmax probability of "match" over the two logits.
    pub fn match_probability(&self) -> f32 {
        1.0 / (1.0 + (self.no_match - self.matched).exp())
    }
}

/// Generated text.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    /// The best hypothesis, detokenised and cleaned.
    pub text: String,
    /// Its length-normalised log-probability.
    pub score: f32,
}

/// A loaded model the engine drives. Implementations are called from several engine
/// threads at once, so they must be `Sync`.
pub trait Backend: Send + Sync + 'static {
    /// Facts about the model.
    fn info(&self) -> &ModelInfo;

    /// Decodes encoded image bytes to RGB: checks the header's pixel count before
    /// decoding (`Error::ImageTooLarge`), applies EXIF orientation, converts any colour
    /// type, and returns the image at the size the model encodes (the full-resolution pixels
    /// are not kept), so that decoded images waiting for the model cost little memory.
    /// `Error::ImageDecode` for bytes that are not a supported image.
    fn decode_image(&self, bytes: &[u8]) -> Result<RgbImage>;

    /// Encodes a batch of images into ITC vectors and vision token sequences.
    fn encode_images(&self, images: &[RgbImage]) -> Result<Vec<ImageEncoding>>;

    /// Encodes a batch of texts into ITC vectors.
    fn encode_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>>;

    /// ITM logits of one image against each text.
    fn match_image_texts(&self, image: &VisionTokens, texts: &[String]) -> Result<Vec<ItmScore>>;

    /// ITM logits of one text against each image.
    fn match_text_images(&self, text: &str, images: &[Arc<VisionTokens>]) -> Result<Vec<ItmScore>>;

    /// Captions an image.
    fn caption(&self, image: &VisionTokens, settings: &GenerationSettings) -> Result<Generated>;

    /// Answers a question about an image.
    fn answer(
        &self,
        image: &VisionTokens,
        question: &str,
        settings: &GenerationSettings,
    ) -> Result<Generated>;
}
