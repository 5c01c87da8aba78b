//! The shape of a model trained from scratch, and the full config built from it.

use std::path::PathBuf;

use super::vocab::Vocabulary;
use crate::model::config::{
    Activation, AdapterConfig, BertConfig, DecoderConfig, FusionConfig, GenerationConfig,
    GenerationOptions, MaskConfig, TokenizerConfig, VisionConfig,
};
use crate::model::MplugConfig;

/// Sizes of a model trained from scratch. The defaults give the embedded easy-VQA model
/// (about 0.52 M parameters).
#[derive(Debug, Clone, clap::Args)]
pub struct ModelShape {
    /// Identifier written to the config (collections record it).
    #[arg(
        long,
        env = "MPLUG_TRAIN_MODEL_ID",
        default_value = "mplug-tiny-easyvqa"
    )]
    pub model_id: String,

    /// Square input resolution in pixels.
    #[arg(long, env = "MPLUG_TRAIN_IMAGE_SIZE", default_value_t = 64)]
    pub image_size: usize,

    /// Patch edge in pixels (image_size / patch_size patches per side).
    #[arg(long, env = "MPLUG_TRAIN_PATCH_SIZE", default_value_t = 8)]
    pub patch_size: usize,

    /// Vision transformer width.
    #[arg(long, env = "MPLUG_TRAIN_VISION_WIDTH", default_value_t = 64)]
    pub vision_width: usize,

    /// Vision transformer blocks.
    #[arg(long, env = "MPLUG_TRAIN_VISION_LAYERS", default_value_t = 2)]
    pub vision_layers: usize,

    /// Text-side hidden width (text encoder, fusion, decoder); a width adapter maps the
    /// vision tokens to it when it differs from the vision width.
    #[arg(long, env = "MPLUG_TRAIN_HIDDEN", default_value_t = 64)]
    pub hidden: usize,

    /// Attention heads of every transformer (vision and text side).
    #[arg(long, env = "MPLUG_TRAIN_HEADS", default_value_t = 4)]
    pub heads: usize,

    /// Text encoder layers.
    #[arg(long, env = "MPLUG_TRAIN_TEXT_LAYERS", default_value_t = 2)]
    pub text_layers: usize,

    /// Fusion layers (all live).
    #[arg(long, env = "MPLUG_TRAIN_FUSION_LAYERS", default_value_t = 2)]
    pub fusion_layers: usize,

    /// Fusion stride: live layer k != 0 with k % stride == 0 is a connected-attention layer.
    #[arg(long, env = "MPLUG_TRAIN_STRIDE_LAYER", default_value_t = 2)]
    pub stride_layer: usize,

    /// Decoder layers.
    #[arg(long, env = "MPLUG_TRAIN_DECODER_LAYERS", default_value_t = 2)]
    pub decoder_layers: usize,

    /// ITC embedding width.
    #[arg(long, env = "MPLUG_TRAIN_EMBED_DIM", default_value_t = 64)]
    pub embed_dim: usize,

    /// Padded length of retrieval texts (queries and captions), `[CLS]` included.
    #[arg(long, env = "MPLUG_TRAIN_RETRIEVAL_MAX_LEN", default_value_t = 16)]
    pub retrieval_max_len: usize,
}

/// Builds a complete config (every shape field set) for `shape` and `vocab`, whose file name
/// relative to the config is `vocab_file`.
///
/// Follows the reference's conventions: QuickGELU and eps 1e-5 in the vision tower, erf GELU
/// and eps 1e-12 on the text side, no `[SEP]` on encoder texts. Generation uses a small beam
/// because captions and answers are short.
pub fn tiny_config(shape: &ModelShape, vocab: &Vocabulary, vocab_file: &str) -> MplugConfig {
    let ids = vocab.special_ids();
    let text = BertConfig {
        hidden_size: shape.hidden,
        num_attention_heads: shape.heads,
        intermediate_size: 4 * shape.hidden,
        num_hidden_layers: shape.text_layers,
        layer_norm_eps: 1e-12,
        vocab_size: vocab.len(),
        max_position_embeddings: 64,
        type_vocab_size: 2,
        hidden_act: Activation::Gelu,
    };
    MplugConfig {
        model_id: shape.model_id.clone(),
        vision: VisionConfig {
            width: shape.vision_width,
            layers: shape.vision_layers,
            num_attention_heads: shape.heads,
            patch_size: shape.patch_size,
            image_size: shape.image_size,
            layer_norm_eps: 1e-5,
            hidden_act: Activation::QuickGelu,
        },
        adapter: AdapterConfig {
            present: shape.vision_width != shape.hidden,
            layer_norm_eps: 1e-12,
        },
        text,
        fusion: FusionConfig {
            num_hidden_layers: shape.fusion_layers,
            fusion_layers: shape.fusion_layers,
            stride_layer: shape.stride_layer,
        },
        decoder: DecoderConfig {
            num_hidden_layers: shape.decoder_layers,
        },
        embed_dim: shape.embed_dim,
        masks: MaskConfig::default(),
        tokenizer: TokenizerConfig {
            vocab_file: PathBuf::from(vocab_file),
            lower_case: true,
            pad_id: ids.pad,
            unk_id: ids.unk,
            cls_id: ids.cls,
            sep_id: ids.sep,
            mask_id: ids.mask,
            retrieval_max_len: shape.retrieval_max_len,
            retrieval_max_words: 30,
            question_max_len: 25,
            sep_on_encoder_text: false,
        },
        generation: GenerationConfig {
            caption: generation(3, 8),
            vqa: generation(3, 5),
        },
        differentiable: false,
    }
}

fn generation(beam_size: usize, max_length: usize) -> GenerationOptions {
    GenerationOptions {
        beam_size,
        min_length: 1,
        max_length,
        n_best: 1,
        length_penalty: 0.6,
    }
}
