//! mPLUG in candle: vision encoder, text encoder, fusion, heads, decoder, generation and
//! checkpoint loading.
//!
//! [`Mplug`] is the facade the engine and the trainer use. Build it from a checkpoint with
//! [`Mplug::load`] (shapes derived from the tensors, the rest from a small JSON config), or
//! from any [`VarBuilder`] with [`Mplug::new`] (with `cfg.differentiable` set, every forward
//! uses ops with a backward pass).

pub mod alloc;
pub mod attend;
pub mod bert;
pub mod bf16;
pub mod checkpoint;
pub mod config;
pub mod fusion;
pub mod generate;
pub mod nn;
pub mod packed;
pub mod sgemm;
pub mod vision;
pub mod vmath;

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;

pub use checkpoint::LoadReport;
pub use config::{GenerationOptions, MplugConfig};
pub use generate::Hypothesis;

use bert::{first_token, TextDecoder, TextEncoder};
use checkpoint::{is_ignored, is_ignored_always, read_tensors, TrackingBackend};
use fusion::Fusion;
use generate::{beam_search, SpecialTokens};
use nn::{l2_normalize, Linear, Packing};
use sgemm::Isa;
use vision::{VisionAdapter, VisionTransformer};

use crate::{Error, Result};

/// Tensors of a checkpoint, for [`Mplug::from_tensors`].
pub struct LoadSource<'a> {
    /// Float tensors by reference state-dict name.
    pub tensors: HashMap<String, Tensor>,
    /// Names present in the file but not read (always-ignored keys, integer buffers).
    pub skipped: Vec<String>,
    /// The file the tensors came from, for error messages.
    pub path: &'a Path,
}

/// How a requested dtype is realised on a device.
#[derive(Debug, Clone, Copy)]
struct Precision {
    /// The dtype tensors are loaded and activations computed in.
    load: DType,
    /// The packed kernel linear layers then move to, if any.
    packing: Option<Packing>,
}

/// Chooses the [`Precision`] for `dtype` on `device`. On the CPU, bf16 means bf16 linear
/// weights with f32 activations, and the products of the fused attention kernel on
/// bf16-rounded operands (the AVX512-BF16 and AMX kernels in [`bf16`]; the decoder's causal
/// self-attention and its cached decoding steps stay f32); it is refused when the
/// CPU lacks those instructions, and f16 is refused (no f16 kernel: without AVX512-FP16 it
/// could not beat f32). f32 uses the packed f32 kernel ([`sgemm`]) where the CPU has one.
/// Other devices compute in `dtype` throughout.
fn precision(device: &Device, dtype: DType) -> Result<Precision> {
    let refuse = |reason: &str| Error::UnsupportedDtype {
        dtype: format!("{dtype:?}").to_lowercase(),
        device: "cpu".into(),
        reason: reason.into(),
    };
    if !device.is_cpu() {
        return Ok(Precision {
            load: dtype,
            packing: None,
        });
    }
    match dtype {
        DType::BF16 if bf16::available() => {
            // Decided (and logged) now rather than at the first layer.
            bf16::prepare_tile_unit();
            Ok(Precision {
                load: DType::F32,
                packing: Some(Packing::Bf16),
            })
        }
        DType::BF16 => Err(refuse(
            "this CPU lacks the avx512_bf16 instructions the bf16 kernel needs; use f32",
        )),
        DType::F16 => Err(refuse("the CPU backend has no f16 kernel; use bf16 or f32")),
        DType::F32 => Ok(Precision {
            load: dtype,
            packing: Isa::detect().map(Packing::F32),
        }),
        _ => Ok(Precision {
            load: dtype,
            packing: None,
        }),
    }
}

/// When the config asks for a resolution whose grid differs from the checkpoint's position
/// table, resizes the table bilinearly (class row kept), as the reference fine-tune loaders
/// do. A config without `vision.image_size` keeps the checkpoint's grid.
fn adapt_positions(cfg: &MplugConfig, tensors: &mut HashMap<String, Tensor>) -> Result<()> {
    const TABLE: &str = "visual_encoder.visual.positional_embedding";
    let patch = tensors
        .get("visual_encoder.visual.conv1.weight")
        .and_then(|w| w.dims().get(2).copied());
    let (Some(patch), Some(table)) = (patch, tensors.get(TABLE)) else {
        return Ok(());
    };
    if cfg.vision.image_size == 0 {
        return Ok(());
    }
    let grid = cfg.vision.image_size / patch;
    if table.dim(0)? != grid * grid + 1 {
        let resized = vision::resize_pos_embed(table, grid)?;
        tensors.insert(TABLE.to_string(), resized);
    }
    Ok(())
}

/// Which tasks to load modules for. The vision encoder is always loaded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Tasks {
    /// ITC embeddings and ITM rerank: text encoder, fusion, ITC projections, ITM head.
    pub retrieval: bool,
    /// Captioning: the decoder (no text encoder or fusion).
    pub caption: bool,
    /// VQA: text encoder, fusion and decoder.
    pub vqa: bool,
}

impl Tasks {
    /// Every task.
    pub const ALL: Tasks = Tasks {
        retrieval: true,
        caption: true,
        vqa: true,
    };

    fn text_encoder(&self) -> bool {
        self.retrieval || self.vqa
    }

    fn decoder(&self) -> bool {
        self.caption || self.vqa
    }
}

/// ITC projections and the ITM head.
///
/// Upstream: `vision_proj`, `text_proj`, `itm_head` in `alibaba/AliceMind`
/// mPLUG/models/model_retrieval_mplug.py at a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct RetrievalHeads {
    vision_proj: Linear,
    text_proj: Linear,
    itm_head: Linear,
}

impl RetrievalHeads {
    /// Loads `vision_proj`, `text_proj` (embed_dim × hidden) and `itm_head` (2 × hidden).
    pub fn new(cfg: &MplugConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (h, e) = (cfg.text.hidden_size, cfg.embed_dim);
        Ok(Self {
            vision_proj: Linear::new(h, e, true, vb.pp("vision_proj"))?,
            text_proj: Linear::new(h, e, true, vb.pp("text_proj"))?,
            itm_head: Linear::new(h, 2, true, vb.pp("itm_head"))?,
        })
    }
}

/// The mPLUG model: the modules the requested [`Tasks`] need. `Send + Sync`; every method
/// takes `&self`.
#[derive(Debug, Clone)]
pub struct Mplug {
    cfg: MplugConfig,
    vision: VisionTransformer,
    adapter: Option<VisionAdapter>,
    text: Option<TextEncoder>,
    fusion: Option<Fusion>,
    heads: Option<RetrievalHeads>,
    decoder: Option<TextDecoder>,
    dtype: DType,
}

impl Mplug {
    /// Loads a checkpoint (`.pth`, `.bin` or `.safetensors`, by content) with its JSON config.
    /// On the CPU, `DType::BF16` keeps activations in f32 and runs every linear layer on the
    /// packed bf16 kernel (see [`Self::pack_bf16`]); `DType::F16` is refused; `DType::F32`
    /// runs linear layers on the packed f32 kernel where the CPU has one and the config does
    /// not ask for differentiable ops (see [`Self::pack_f32`]).
    /// Errors: [`Error::Io`]/[`Error::Config`] for the config, [`Error::Checkpoint`] for an
    /// unreadable file, [`Error::MissingTensor`]/[`Error::TensorShape`] naming the tensor, the
    /// expected shape and the file, [`Error::UnsupportedDtype`] for a dtype the device cannot
    /// run (bf16 on a CPU without avx512_bf16, f16 on any CPU).
    pub fn load(
        checkpoint: &Path,
        config: &Path,
        tasks: Tasks,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Self::load_with_report(checkpoint, config, tasks, device, dtype)?.0)
    }

    /// [`Self::load`], also saying which checkpoint names were consumed, ignored or unused.
    pub fn load_with_report(
        checkpoint: &Path,
        config: &Path,
        tasks: Tasks,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, LoadReport)> {
        precision(device, dtype)?;
        let cfg = MplugConfig::from_file(config)?;
        let (tensors, skipped) = read_tensors(checkpoint, |name| !is_ignored_always(name))?;
        let source = LoadSource {
            tensors,
            skipped,
            path: checkpoint,
        };
        Self::from_tensors(cfg, source, tasks, device, dtype)
    }

    /// Builds the model from named tensors already in memory (names as in the reference state
    /// dict), resolving `cfg`'s shape fields from them; errors name `source.path`.
    pub fn from_tensors(
        mut cfg: MplugConfig,
        source: LoadSource,
        tasks: Tasks,
        device: &Device,
        dtype: DType,
    ) -> Result<(Self, LoadReport)> {
        let mut source = source;
        adapt_positions(&cfg, &mut source.tensors)?;
        let precision = precision(device, dtype)?;
        cfg.resolve_from(&source.tensors, source.path)?;
        let names: Vec<String> = source.tensors.keys().cloned().collect();
        let backend = TrackingBackend::new(Arc::new(source.tensors), source.path);
        let mut model = Self::from_backend(&cfg, tasks, &backend, device, precision.load)?;
        match precision.packing {
            Some(Packing::Bf16) => model.pack_bf16()?,
            Some(Packing::F32(isa)) if !cfg.differentiable => model.pack_f32(isa)?,
            _ => {}
        }

        let mut report = LoadReport {
            consumed: backend.consumed(),
            ..LoadReport::default()
        };
        for name in names.into_iter().chain(source.skipped) {
            if report.consumed.contains(&name) {
                continue;
            }
            if is_ignored(&name, &cfg) {
                report.ignored.insert(name);
            } else {
                report.unused.insert(name);
            }
        }
        Ok((model, report))
    }

    /// Builds the model over a [`TrackingBackend`], turning a failed lookup into its
    /// structured error.
    pub fn from_backend(
        cfg: &MplugConfig,
        tasks: Tasks,
        backend: &TrackingBackend,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let vb = backend.var_builder(dtype, device);
        Self::new(cfg, tasks, vb).map_err(|e| backend.take_problem().unwrap_or(e))
    }

    /// Builds the modules `tasks` need from `vb` (e.g. a checkpoint or a `VarMap`); every
    /// shape comes from `cfg`, which must be complete (see [`MplugConfig::resolve_from`]).
    pub fn new(cfg: &MplugConfig, tasks: Tasks, vb: VarBuilder) -> Result<Self> {
        let d = cfg.differentiable;
        let hidden = cfg.text.hidden_size;
        let vision = VisionTransformer::new(&cfg.vision, d, vb.pp("visual_encoder.visual"))?;
        let adapter = match cfg.adapter.present {
            true => Some(VisionAdapter::new(
                &cfg.adapter,
                cfg.vision.width,
                hidden,
                d,
                vb.clone(),
            )?),
            false => None,
        };
        let (text, fusion) = if tasks.text_encoder() {
            let text = TextEncoder::new(&cfg.text, &cfg.masks, d, vb.pp("text_encoder"))?;
            let fusion = Fusion::new(
                &cfg.fusion,
                &cfg.text,
                &cfg.masks,
                d,
                vb.pp("fusion_encoder"),
            )?;
            (Some(text), Some(fusion))
        } else {
            (None, None)
        };
        let heads = tasks
            .retrieval
            .then(|| RetrievalHeads::new(cfg, vb.clone()))
            .transpose()?;
        let decoder = if tasks.decoder() {
            let layers = cfg.decoder.num_hidden_layers;
            let dvb = vb.pp("text_decoder");
            Some(TextDecoder::new(
                &cfg.text, layers, hidden, &cfg.masks, d, dvb,
            )?)
        } else {
            None
        };
        Ok(Self {
            cfg: cfg.clone(),
            vision,
            adapter,
            text,
            fusion,
            heads,
            decoder,
            dtype: vb.dtype(),
        })
    }

    /// Moves every linear layer (not embeddings or the patch embedding) to the packed bf16
    /// kernel: weights rounded to bf16 once, activations stay f32 and are rounded per call,
    /// sums accumulate in f32. The attention products that take the fused kernel (all but the
    /// decoder's causal self-attention and its cached decoding steps) then run on the bf16
    /// kernels too ([`attend::Products`]). [`Self::load`] does this for
    /// `DType::BF16` on the CPU. Errors with [`Error::UnsupportedDtype`] when the CPU lacks
    /// avx512_bf16 or the model is not f32 on the CPU.
    pub fn pack_bf16(&mut self) -> Result<()> {
        if !bf16::available() || !self.vision.is_cpu_f32() {
            return Err(Error::UnsupportedDtype {
                dtype: "bf16".into(),
                device: "cpu".into(),
                reason: "the bf16 kernel needs an f32 CPU model and avx512_bf16".into(),
            });
        }
        self.pack_linears(Packing::Bf16)
    }

    /// Moves every linear layer (as [`Self::pack_bf16`] does) to the packed f32 kernel for
    /// `isa`: weights packed once for its microkernel, the unpacked copy released, so the
    /// model holds one f32 copy of each weight (the LM head's tied word embeddings excepted:
    /// the embedding table keeps its own). The model then runs inference only. [`Self::load`]
    /// does this for `DType::F32` on the CPU. Errors with [`Error::UnsupportedDtype`] when
    /// the CPU lacks `isa`'s instructions or the model is not f32 on the CPU.
    pub fn pack_f32(&mut self, isa: Isa) -> Result<()> {
        if !isa.supported() || !self.vision.is_cpu_f32() {
            return Err(Error::UnsupportedDtype {
                dtype: "f32".into(),
                device: "cpu".into(),
                reason: format!("the packed f32 kernel needs an f32 CPU model and {isa:?}"),
            });
        }
        self.pack_linears(Packing::F32(isa))
    }

    /// Moves every linear layer of every loaded module to `packing`'s kernel.
    fn pack_linears(&mut self, packing: Packing) -> Result<()> {
        self.vision.pack(packing)?;
        if let Some(a) = &mut self.adapter {
            a.pack(packing)?;
        }
        if let Some(t) = &mut self.text {
            t.pack(packing)?;
        }
        if let Some(f) = &mut self.fusion {
            f.pack(packing)?;
        }
        if let Some(h) = &mut self.heads {
            for linear in [&mut h.vision_proj, &mut h.text_proj, &mut h.itm_head] {
                linear.pack(packing)?;
            }
        }
        if let Some(d) = &mut self.decoder {
            d.pack(packing)?;
        }
        Ok(())
    }

    /// The resolved configuration (shapes filled in).
    pub fn config(&self) -> &MplugConfig {
        &self.cfg
    }

    /// The vision tower alone: (B, 3, R, R) → (B, Lv, Wv) after `ln_post`.
    pub fn vision_tower(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.forward(&pixels.to_dtype(self.dtype)?)?)
    }

    /// The vision tower's input tokens after `ln_pre` (B, Lv, Wv), before any block.
    pub fn vision_embed(&self, pixels: &Tensor) -> Result<Tensor> {
        Ok(self.vision.embed(&pixels.to_dtype(self.dtype)?)?)
    }

    /// Image tokens V (B, Lv, H): the vision tower, then the width adapter when present.
    pub fn encode_image(&self, pixels: &Tensor) -> Result<Tensor> {
        let xs = self.vision_tower(pixels)?;
        match &self.adapter {
            Some(a) => Ok(a.forward(&xs)?),
            None => Ok(xs),
        }
    }

    /// L2-normalised ITC image embeddings (B, E) from V.
    pub fn image_embeds(&self, v: &Tensor) -> Result<Tensor> {
        let heads = self.heads()?;
        Ok(l2_normalize(&heads.vision_proj.forward(&first_token(v)?)?)?)
    }

    /// Text tokens T (B, Lt, H) from ids (B, Lt) and a 0/1 mask (B, Lt).
    pub fn encode_text(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let text = self.text.as_ref().ok_or(Error::ModuleNotLoaded {
            module: "text encoder",
        })?;
        Ok(text.forward(ids, mask)?)
    }

    /// The text encoder's embedding output (B, Lt, H), before any layer.
    pub fn text_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let text = self.text.as_ref().ok_or(Error::ModuleNotLoaded {
            module: "text encoder",
        })?;
        Ok(text.embed(ids)?)
    }

    /// L2-normalised ITC text embeddings (B, E) from T.
    pub fn text_embeds(&self, t: &Tensor) -> Result<Tensor> {
        let heads = self.heads()?;
        Ok(l2_normalize(&heads.text_proj.forward(&first_token(t)?)?)?)
    }

    /// Fuses T (B, Lt, H) under its 0/1 mask with V (B, Lv, H); returns (V', T'), both with
    /// batch B. V may have batch 1 to rerank B texts against one image: it is then shared
    /// without being copied per text, which is much cheaper than repeating it.
    pub fn fuse(&self, t: &Tensor, t_mask: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let out = self.fusion()?.forward(t, t_mask, v)?;
        Ok((out.v, out.t))
    }

    /// The fusion network, for callers that want per-layer outputs.
    pub fn fusion(&self) -> Result<&Fusion> {
        self.fusion
            .as_ref()
            .ok_or(Error::ModuleNotLoaded { module: "fusion" })
    }

    /// ITM logits (B, 2) from T'; index 1 is "match".
    pub fn itm_logits(&self, t_fused: &Tensor) -> Result<Tensor> {
        Ok(self.heads()?.itm_head.forward(&first_token(t_fused)?)?)
    }

    /// Teacher-forced decoder logits (B, L, vocab) for ids (B, L) with 0/1 mask, attending to
    /// `memory` (B, M, H) under its 0/1 mask (B, M).
    pub fn decoder_logits(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        memory: &Tensor,
        memory_mask: &Tensor,
    ) -> Result<Tensor> {
        Ok(self.decoder()?.forward(ids, mask, memory, memory_mask)?)
    }

    /// The VQA decoder memory: `concat(V', T')` and `concat(ones, q_mask)` after encoding and
    /// fusing the question with V.
    pub fn vqa_memory(
        &self,
        v: &Tensor,
        q_ids: &Tensor,
        q_mask: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let t = self.encode_text(q_ids, q_mask)?;
        let (v2, t2) = self.fuse(&t, q_mask, v)?;
        let memory = Tensor::cat(&[&v2, &t2], 1)?;
        let ones = Tensor::ones((v.dim(0)?, v.dim(1)?), q_mask.dtype(), q_mask.device())?;
        let mask = Tensor::cat(&[&ones, q_mask], 1)?;
        Ok((memory, mask))
    }

    /// Captions images from V (B, Lv, H): n-best per image, best first.
    pub fn caption(&self, v: &Tensor, opts: &GenerationOptions) -> Result<Vec<Vec<Hypothesis>>> {
        let ones = Tensor::ones((v.dim(0)?, v.dim(1)?), DType::U32, v.device())?;
        Ok(beam_search(
            self.decoder()?,
            v,
            &ones,
            opts,
            self.special_tokens(),
        )?)
    }

    /// Answers questions (ids and 0/1 mask, B × Lq) about images V (B, Lv, H): n-best per item,
    /// best first.
    pub fn answer(
        &self,
        v: &Tensor,
        q_ids: &Tensor,
        q_mask: &Tensor,
        opts: &GenerationOptions,
    ) -> Result<Vec<Vec<Hypothesis>>> {
        let (memory, mask) = self.vqa_memory(v, q_ids, q_mask)?;
        Ok(beam_search(
            self.decoder()?,
            &memory,
            &mask,
            opts,
            self.special_tokens(),
        )?)
    }

    fn special_tokens(&self) -> SpecialTokens {
        SpecialTokens {
            start: self.cfg.tokenizer.cls_id,
            end: self.cfg.tokenizer.sep_id,
        }
    }

    fn heads(&self) -> Result<&RetrievalHeads> {
        self.heads.as_ref().ok_or(Error::ModuleNotLoaded {
            module: "retrieval heads",
        })
    }

    fn decoder(&self) -> Result<&TextDecoder> {
        self.decoder
            .as_ref()
            .ok_or(Error::ModuleNotLoaded { module: "decoder" })
    }
}
