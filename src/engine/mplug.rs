//! The [`Backend`] over the candle mPLUG model, its image preprocessor and tokenizer.
//!
//! Vision tokens leave the model in f32 and are kept in f16 (see [`VisionTokens`]); they
//! are widened back to the model's dtype for fusion and decoding, so a reranked score may
//! differ from a fresh computation by the f16 rounding of the image features.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::backend::{
    Backend, Generated, GenerationSettings, ImageEncoding, ItmScore, ModelInfo, RgbImage,
    VisionTokens,
};
use crate::model::{GenerationOptions, Mplug, Tasks};
use crate::preprocess::{ImagePreprocessor, MplugTokenizer, TokenBatch};
use crate::{Error, Result};

/// Where the model comes from and what to load.
#[derive(Debug, Clone)]
pub struct ModelSource {
    /// Checkpoint file (`.safetensors`, AliceMind `.pth` or ModelScope `.bin`).
    pub checkpoint: PathBuf,
    /// The small JSON config next to the checkpoint.
    pub config: PathBuf,
    /// Modules to load; requests needing a module not loaded fail with
    /// `Error::ModuleNotLoaded`.
    pub tasks: Tasks,
    /// Largest image (width × height) accepted, checked from the header before decoding.
    pub max_pixels: u64,
    /// Arithmetic of the linear layers.
    pub precision: Precision,
}

/// Arithmetic of the model's linear layers on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Precision {
    /// f32 throughout: matches the reference implementation to about 1e-6.
    #[default]
    F32,
    /// bf16 weights and inputs with f32 accumulation (needs AVX512-BF16): about 2.5-3.5x
    /// the f32 throughput, embeddings within about 1e-3 of f32.
    Bf16,
}

impl Precision {
    fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
        }
    }
}

/// mPLUG on the CPU in f32.
pub struct MplugBackend {
    model: Mplug,
    tokenizer: MplugTokenizer,
    preprocessor: ImagePreprocessor,
    device: Device,
    info: ModelInfo,
    length_penalty: (f64, f64),
    vocab: (u32, u32),
}

impl MplugBackend {
    /// Loads the checkpoint and its tokenizer. Errors are the model's load errors
    /// (missing tensor, wrong shape, unreadable file, invalid config, bf16 on a CPU without
    /// AVX512-BF16).
    pub fn load(source: &ModelSource) -> Result<Self> {
        let device = Device::Cpu;
        let model = Mplug::load(
            &source.checkpoint,
            &source.config,
            source.tasks,
            &device,
            source.precision.dtype(),
        )?;
        let cfg = model.config();
        let tokenizer = MplugTokenizer::from_config(&cfg.tokenizer)?;
        let resolution = u32::try_from(cfg.vision.image_size).map_err(|_| Error::Config {
            path: source.config.clone(),
            reason: format!("vision.image_size {} is too large", cfg.vision.image_size),
        })?;
        let mut preprocessor = ImagePreprocessor::new(resolution);
        preprocessor.max_pixels = source.max_pixels;

        let generation = &cfg.generation;
        let info = ModelInfo {
            model_id: cfg.model_id.clone(),
            embed_dim: cfg.embed_dim,
            caption_defaults: settings_of(&generation.caption),
            vqa_defaults: settings_of(&generation.vqa),
        };
        let length_penalty = (
            generation.caption.length_penalty,
            generation.vqa.length_penalty,
        );
        let vocab = (cfg.text.vocab_size as u32, cfg.tokenizer.unk_id);
        Ok(Self {
            model,
            tokenizer,
            preprocessor,
            device,
            info,
            length_penalty,
            vocab,
        })
    }

    /// A copy of the model's facts, for use after the backend moves into the engine.
    pub fn info_snapshot(&self) -> ModelInfo {
        self.info.clone()
    }

    /// The checkpoint's model, for callers that need more than the backend's methods.
    pub fn model(&self) -> &Mplug {
        &self.model
    }

    fn tokens_tensor(&self, images: &[&VisionTokens]) -> Result<Tensor> {
        let first = images.first().ok_or_else(|| Error::InvalidArgument {
            field: "images".into(),
            reason: "at least one image is needed".into(),
        })?;
        let (tokens, width) = (first.tokens, first.width);
        let mut data = Vec::with_capacity(images.len() * tokens * width);
        for image in images {
            if (image.tokens, image.width) != (tokens, width) {
                return Err(Error::InvalidArgument {
                    field: "images".into(),
                    reason: "vision token sequences of different shapes".into(),
                });
            }
            data.extend_from_slice(&image.data);
        }
        let xs = Tensor::from_vec(data, (images.len(), tokens, width), &self.device)?;
        Ok(xs.to_dtype(DType::F32)?)
    }

    /// Token tensors with ids beyond the checkpoint's embedding table mapped to `[UNK]`:
    /// a vocabulary file larger than the table (as with the tiny test checkpoints) must
    /// degrade the text, not fail the request.
    fn token_tensors(&self, mut batch: TokenBatch) -> Result<(Tensor, Tensor)> {
        let (size, unk) = self.vocab;
        for id in batch.ids.iter_mut().flatten() {
            if *id >= size {
                *id = unk;
            }
        }
        batch.tensors(&self.device)
    }

    fn itm(&self, texts: &[&str], v: &Tensor) -> Result<Vec<ItmScore>> {
        let batch = self.tokenizer.encode_retrieval(texts)?;
        let (ids, mask) = self.token_tensors(batch)?;
        let t = self.model.encode_text(&ids, &mask)?;
        let (_, t_fused) = self.model.fuse(&t, &mask, v)?;
        let logits = self.model.itm_logits(&t_fused)?.to_vec2::<f32>()?;
        let score = |row: Vec<f32>| ItmScore {
            no_match: row[0],
            matched: row[1],
        };
        Ok(logits.into_iter().map(score).collect())
    }

    fn options(&self, settings: &GenerationSettings, length_penalty: f64) -> GenerationOptions {
        GenerationOptions {
            beam_size: settings.beam_size,
            min_length: settings.min_length,
            max_length: settings.max_length,
            n_best: 1,
            length_penalty,
        }
    }

    fn best(&self, hypotheses: Vec<Vec<crate::model::Hypothesis>>) -> Result<Generated> {
        let best = hypotheses
            .into_iter()
            .next()
            .and_then(|n| n.into_iter().next());
        let best = best.ok_or_else(|| {
            Error::Candle(candle_core::Error::Msg(
                "beam search returned no hypothesis".into(),
            ))
        })?;
        Ok(Generated {
            text: self.tokenizer.decode(&best.ids),
            score: best.score,
        })
    }
}

fn settings_of(options: &GenerationOptions) -> GenerationSettings {
    GenerationSettings {
        beam_size: options.beam_size,
        min_length: options.min_length,
        max_length: options.max_length,
    }
}

impl Backend for MplugBackend {
    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn decode_image(&self, bytes: &[u8]) -> Result<RgbImage> {
        self.preprocessor.load(bytes)
    }

    fn encode_images(&self, images: &[RgbImage]) -> Result<Vec<ImageEncoding>> {
        let pixels = self.preprocessor.to_tensor(images, &self.device)?;
        let v = self.model.encode_image(&pixels)?;
        let embeds = self.model.image_embeds(&v)?.to_vec2::<f32>()?;
        let (_, tokens, width) = v.dims3()?;
        let v = v.to_dtype(DType::F32)?.to_vec3::<f32>()?;

        let encode = |(embedding, rows): (Vec<f32>, Vec<Vec<f32>>)| {
            let flat: Vec<f32> = rows.into_iter().flatten().collect();
            let tokens = VisionTokens::from_f32(&flat, tokens, width)
                .expect("a (tokens, width) slice of V has tokens × width values");
            ImageEncoding {
                embedding,
                tokens: Arc::new(tokens),
            }
        };
        Ok(embeds.into_iter().zip(v).map(encode).collect())
    }

    fn encode_texts(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        let batch = self.tokenizer.encode_retrieval(&texts)?;
        let (ids, mask) = self.token_tensors(batch)?;
        let t = self.model.encode_text(&ids, &mask)?;
        Ok(self.model.text_embeds(&t)?.to_vec2::<f32>()?)
    }

    fn match_image_texts(&self, image: &VisionTokens, texts: &[String]) -> Result<Vec<ItmScore>> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        // A batch-1 V is shared by every text row inside the fusion (no copy per text).
        let v = self.tokens_tensor(&[image])?;
        let texts: Vec<&str> = texts.iter().map(String::as_str).collect();
        self.itm(&texts, &v)
    }

    fn match_text_images(&self, text: &str, images: &[Arc<VisionTokens>]) -> Result<Vec<ItmScore>> {
        if images.is_empty() {
            return Ok(Vec::new());
        }
        let refs: Vec<&VisionTokens> = images.iter().map(Arc::as_ref).collect();
        let v = self.tokens_tensor(&refs)?;
        let texts = vec![text; images.len()];
        self.itm(&texts, &v)
    }

    fn caption(&self, image: &VisionTokens, settings: &GenerationSettings) -> Result<Generated> {
        let v = self.tokens_tensor(&[image])?;
        let options = self.options(settings, self.length_penalty.0);
        self.best(self.model.caption(&v, &options)?)
    }

    fn answer(
        &self,
        image: &VisionTokens,
        question: &str,
        settings: &GenerationSettings,
    ) -> Result<Generated> {
        let v = self.tokens_tensor(&[image])?;
        let batch = self.tokenizer.encode_question(&[question], true)?;
        let (ids, mask) = self.token_tensors(batch)?;
        let options = self.options(settings, self.length_penalty.1);
        self.best(self.model.answer(&v, &ids, &mask, &options)?)
    }
}

/// The checkpoint and config used by tests and examples: the tiny parity model.
pub fn parity_model_paths(repository_root: &Path) -> (PathBuf, PathBuf) {
    let dir = repository_root.join("tests/fixtures/parity");
    (
        dir.join("tiny_base.safetensors"),
        dir.join("tiny_base.mplug.json"),
    )
}
