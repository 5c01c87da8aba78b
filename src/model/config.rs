//! The model configuration: the small JSON file that sits next to a checkpoint.
//!
//! The file carries only what tensors cannot say: head counts, layer-norm eps, activations,
//! the fusion schedule (`fusion_layers`, `stride_layer`), mask constants, the tokenizer and
//! the generation defaults. Widths, layer counts, the image grid and the vocabulary size are
//! derived from the checkpoint at load time ([`MplugConfig::resolve_from`]); a config built in
//! code (for training from scratch) sets them explicitly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// Element-wise activation applied inside a feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// CLIP's `x * sigmoid(1.702 x)`.
    QuickGelu,
    /// The exact GELU, `0.5 x (1 + erf(x / sqrt 2))`.
    Gelu,
}

/// The CLIP vision transformer. Width, depth, patch and resolution default to 0, meaning
/// "derive from the checkpoint".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VisionConfig {
    /// Token width (768 for ViT-B, 1024 for ViT-L).
    #[serde(default)]
    pub width: usize,
    /// Number of residual blocks.
    #[serde(default)]
    pub layers: usize,
    /// Attention heads; 0 means `width / 64`, the rule CLIP's own builder uses.
    #[serde(default)]
    pub num_attention_heads: usize,
    /// Patch edge in pixels (kernel and stride of the patch convolution).
    #[serde(default)]
    pub patch_size: usize,
    /// Square input resolution in pixels; the grid is `image_size / patch_size`.
    #[serde(default)]
    pub image_size: usize,
    /// LayerNorm epsilon of every vision LayerNorm (CLIP: 1e-5).
    pub layer_norm_eps: f64,
    /// MLP activation (CLIP: `quick_gelu`).
    pub hidden_act: Activation,
}

impl VisionConfig {
    /// Heads actually used: the configured count, or `width / 64` when it is 0.
    pub fn heads(&self) -> usize {
        if self.num_attention_heads == 0 {
            self.width / 64
        } else {
            self.num_attention_heads
        }
    }

    /// Patches per side of the image grid.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size.max(1)
    }

    /// Vision tokens per image: the grid plus the class token.
    pub fn num_tokens(&self) -> usize {
        self.grid() * self.grid() + 1
    }
}

/// The vision-to-text width adapter (`visn_fc` + `visn_layer_norm`), present only when the
/// vision width differs from the text width.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// Whether the adapter exists; derived from the checkpoint (`visn_fc.weight`).
    #[serde(default)]
    pub present: bool,
    /// LayerNorm epsilon of `visn_layer_norm` (reference: 1e-12).
    pub layer_norm_eps: f64,
}

/// BERT hyper-parameters shared by the text encoder, the fusion layers and the decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    /// Hidden width (768 for the released models). Derived when 0.
    #[serde(default)]
    pub hidden_size: usize,
    /// Attention heads (12 × 64 in the released models).
    pub num_attention_heads: usize,
    /// Feed-forward width. Derived when 0.
    #[serde(default)]
    pub intermediate_size: usize,
    /// Text encoder layers. Derived when 0 (6 in the released models).
    #[serde(default)]
    pub num_hidden_layers: usize,
    /// LayerNorm epsilon (1e-12).
    pub layer_norm_eps: f64,
    /// Vocabulary size. Derived when 0 (30522 for bert-base-uncased).
    #[serde(default)]
    pub vocab_size: usize,
    /// Learned positions. Derived when 0 (512).
    #[serde(default)]
    pub max_position_embeddings: usize,
    /// Token-type rows (2); only type 0 is ever used. Derived when 0.
    #[serde(default)]
    pub type_vocab_size: usize,
    /// Feed-forward activation (`gelu`, the erf form).
    pub hidden_act: Activation,
}

/// The skip-connected fusion network.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusionConfig {
    /// Layers stored in the checkpoint, dead ones included. Derived when 0.
    #[serde(default)]
    pub num_hidden_layers: usize,
    /// How many of the last stored layers run (6 in the released models).
    pub fusion_layers: usize,
    /// Local index k is a connected-attention layer when `k != 0 && k % stride_layer == 0`.
    pub stride_layer: usize,
}

impl FusionConfig {
    /// State-dict index of the first live layer.
    pub fn start_layer(&self) -> usize {
        self.num_hidden_layers.saturating_sub(self.fusion_layers)
    }

    /// Whether live layer `k` (local index) is a connected-attention layer.
    pub fn is_connected(&self, k: usize) -> bool {
        self.stride_layer != 0 && k != 0 && k.is_multiple_of(self.stride_layer)
    }
}

/// The text decoder (captioning and VQA).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Decoder layers (12 in the released models). Derived when 0.
    #[serde(default)]
    pub num_hidden_layers: usize,
}

/// Additive attention-mask constants, applied as `(1 - m) * constant`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MaskConfig {
    /// Text self-attention and causal masks (reference: -10000).
    pub text: f64,
    /// Image and decoder-memory masks (reference fp32: -1e9).
    pub image: f64,
}

impl Default for MaskConfig {
    fn default() -> Self {
        Self {
            text: -10000.0,
            image: -1e9,
        }
    }
}

/// WordPiece tokenizer settings and mPLUG's text conventions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenizerConfig {
    /// WordPiece vocabulary, one token per line; relative paths are relative to the config.
    pub vocab_file: PathBuf,
    /// Lower-case and strip accents before WordPiece (true for bert-base-uncased).
    pub lower_case: bool,
    /// `[PAD]` id.
    pub pad_id: u32,
    /// `[UNK]` id.
    pub unk_id: u32,
    /// `[CLS]` id, also the decoder's start token.
    pub cls_id: u32,
    /// `[SEP]` id, also the decoder's end token.
    pub sep_id: u32,
    /// `[MASK]` id.
    pub mask_id: u32,
    /// Padded length of retrieval texts (30).
    pub retrieval_max_len: usize,
    /// Words kept by caption cleaning before tokenising retrieval texts (30).
    pub retrieval_max_words: usize,
    /// Question truncation length when truncation is enabled (25).
    pub question_max_len: usize,
    /// Whether encoder-side texts end with `[SEP]` (false for AliceMind checkpoints).
    pub sep_on_encoder_text: bool,
}

/// Beam-search settings for one task.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerationOptions {
    /// Beams per item; 1 is greedy decoding.
    pub beam_size: usize,
    /// Steps during which `[SEP]` is forbidden.
    pub min_length: usize,
    /// Maximum decoding steps (tokens after `[CLS]`).
    pub max_length: usize,
    /// Hypotheses returned per item (at most `beam_size`).
    pub n_best: usize,
    /// Exponent of the length penalty `((5 + len) / 6)^alpha` (reference: 0.6).
    #[serde(default = "default_length_penalty")]
    pub length_penalty: f64,
}

fn default_length_penalty() -> f64 {
    0.6
}

/// Generation defaults per task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Captioning (reference: beam 5, min 8, max 25).
    pub caption: GenerationOptions,
    /// VQA (reference: beam 5, min 1, max 10).
    pub vqa: GenerationOptions,
}

/// The complete model configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MplugConfig {
    /// Identifier recorded by collections built with this model.
    pub model_id: String,
    /// Vision transformer.
    pub vision: VisionConfig,
    /// Vision-to-text width adapter.
    pub adapter: AdapterConfig,
    /// Text encoder (and the BERT dimensions shared with fusion and decoder).
    pub text: BertConfig,
    /// Fusion schedule.
    pub fusion: FusionConfig,
    /// Text decoder depth.
    pub decoder: DecoderConfig,
    /// ITC embedding width (256 in the released models). Derived when 0.
    #[serde(default)]
    pub embed_dim: usize,
    /// Attention-mask constants.
    #[serde(default)]
    pub masks: MaskConfig,
    /// Tokenizer.
    pub tokenizer: TokenizerConfig,
    /// Generation defaults.
    pub generation: GenerationConfig,
    /// Use only ops with a backward pass (explicit layer norm and softmax). Training sets this;
    /// inference leaves it false and gets the fused kernels. Not part of the file format.
    #[serde(skip)]
    pub differentiable: bool,
}

impl MplugConfig {
    /// Reads a config file. A relative `tokenizer.vocab_file` is made relative to the file's
    /// folder. Errors with [`Error::Io`] or [`Error::Config`].
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg: Self = serde_json::from_str(&text).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        if cfg.tokenizer.vocab_file.is_relative() {
            let dir = path.parent().unwrap_or(Path::new("."));
            cfg.tokenizer.vocab_file = dir.join(&cfg.tokenizer.vocab_file);
        }
        Ok(cfg)
    }

    /// Fills every shape field from checkpoint tensors (names as in the reference state dict,
    /// ignored keys already removed). A field set in the file must agree with the tensors.
    /// Errors with [`Error::Config`] naming the field when it does not, or when no tensor
    /// can tell a needed size.
    pub fn resolve_from(&mut self, tensors: &HashMap<String, Tensor>, path: &Path) -> Result<()> {
        let shapes = ShapeSource { tensors, path };
        self.resolve_vision(&shapes)?;
        self.resolve_text(&shapes)?;

        let fusion = shapes.count_layers("fusion_encoder.encoder.layer.");
        set_derived(
            &mut self.fusion.num_hidden_layers,
            fusion,
            "fusion.num_hidden_layers",
            path,
        )?;
        let decoder = shapes.count_layers("text_decoder.bert.encoder.layer.");
        set_derived(
            &mut self.decoder.num_hidden_layers,
            decoder,
            "decoder.num_hidden_layers",
            path,
        )?;
        let embed = shapes
            .dim("vision_proj.weight", 0)
            .or_else(|| shapes.dim("text_proj.weight", 0));
        if let Some(embed) = embed {
            set_derived(&mut self.embed_dim, embed, "embed_dim", path)?;
        }

        check_heads(self.vision.width, self.vision.heads(), "vision", path)?;
        check_heads(
            self.text.hidden_size,
            self.text.num_attention_heads,
            "text",
            path,
        )
    }

    fn resolve_vision(&mut self, shapes: &ShapeSource) -> Result<()> {
        let path = shapes.path;
        let prefix = "visual_encoder.visual.";
        let Some(width) = shapes.dim(&format!("{prefix}conv1.weight"), 0) else {
            return Ok(());
        };
        let patch = shapes.dim(&format!("{prefix}conv1.weight"), 2).unwrap_or(0);
        let rows = shapes
            .dim(&format!("{prefix}positional_embedding"), 0)
            .unwrap_or(1);
        let grid = (rows.saturating_sub(1) as f64).sqrt().round() as usize;
        if grid * grid + 1 != rows {
            return Err(Error::Config {
                path: path.to_path_buf(),
                reason: format!("positional_embedding has {rows} rows, expected grid^2 + 1"),
            });
        }
        let layers = shapes.count_layers(&format!("{prefix}transformer.resblocks."));
        let v = &mut self.vision;
        set_derived(&mut v.width, width, "vision.width", path)?;
        set_derived(&mut v.patch_size, patch, "vision.patch_size", path)?;
        set_derived(&mut v.image_size, grid * patch, "vision.image_size", path)?;
        set_derived(&mut v.layers, layers, "vision.layers", path)?;
        self.adapter.present = shapes.tensors.contains_key("visn_fc.weight");
        Ok(())
    }

    fn resolve_text(&mut self, shapes: &ShapeSource) -> Result<()> {
        let path = shapes.path;
        let emb = if shapes
            .tensors
            .contains_key("text_encoder.embeddings.word_embeddings.weight")
        {
            "text_encoder.embeddings."
        } else {
            "text_decoder.bert.embeddings."
        };
        let word = format!("{emb}word_embeddings.weight");
        let t = &mut self.text;
        if let (Some(vocab), Some(hidden)) = (shapes.dim(&word, 0), shapes.dim(&word, 1)) {
            set_derived(&mut t.vocab_size, vocab, "text.vocab_size", path)?;
            set_derived(&mut t.hidden_size, hidden, "text.hidden_size", path)?;
        }
        if let Some(n) = shapes.dim(&format!("{emb}position_embeddings.weight"), 0) {
            set_derived(
                &mut t.max_position_embeddings,
                n,
                "text.max_position_embeddings",
                path,
            )?;
        }
        if let Some(n) = shapes.dim(&format!("{emb}token_type_embeddings.weight"), 0) {
            set_derived(&mut t.type_vocab_size, n, "text.type_vocab_size", path)?;
        }
        let ffn = ["text_encoder", "text_decoder.bert", "fusion_encoder"]
            .iter()
            .find_map(|m| shapes.dim(&format!("{m}.encoder.layer.0.intermediate.dense.weight"), 0));
        if let Some(ffn) = ffn {
            set_derived(
                &mut t.intermediate_size,
                ffn,
                "text.intermediate_size",
                path,
            )?;
        }
        let layers = shapes.count_layers("text_encoder.encoder.layer.");
        set_derived(
            &mut t.num_hidden_layers,
            layers,
            "text.num_hidden_layers",
            path,
        )
    }
}

struct ShapeSource<'a> {
    tensors: &'a HashMap<String, Tensor>,
    path: &'a Path,
}

impl ShapeSource<'_> {
    fn dim(&self, name: &str, axis: usize) -> Option<usize> {
        self.tensors
            .get(name)
            .and_then(|t| t.dims().get(axis).copied())
    }

    /// One more than the largest `N` among names `{prefix}N.…`; 0 when none.
    fn count_layers(&self, prefix: &str) -> usize {
        self.tensors
            .keys()
            .filter_map(|k| k.strip_prefix(prefix))
            .filter_map(|rest| rest.split('.').next()?.parse::<usize>().ok())
            .map(|i| i + 1)
            .max()
            .unwrap_or(0)
    }
}

/// Sets a derived field; a non-zero configured value must agree. A derived 0 (the module is
/// absent from the checkpoint) leaves the configured value alone.
fn set_derived(field: &mut usize, derived: usize, name: &str, path: &Path) -> Result<()> {
    if derived == 0 {
        return Ok(());
    }
    if *field != 0 && *field != derived {
        return Err(Error::Config {
            path: path.to_path_buf(),
            reason: format!("{name} is {} but the checkpoint says {derived}", *field),
        });
    }
    *field = derived;
    Ok(())
}

/// Errors with [`Error::Config`] unless `heads` splits a known `width` evenly (a width of 0
/// means the module is not loaded).
fn check_heads(width: usize, heads: usize, module: &str, path: &Path) -> Result<()> {
    if width == 0 || (heads > 0 && width.is_multiple_of(heads)) {
        return Ok(());
    }
    Err(Error::Config {
        path: path.to_path_buf(),
        reason: format!(
            "{module}.num_attention_heads {heads} does not divide the checkpoint's width {width}"
        ),
    })
}
