//! The CLIP vision transformer and the vision-to-text width adapter.
//!
//! Upstream: `openai/CLIP` `clip/model.py` (`VisualTransformer`, `ResidualAttentionBlock`) as
//! vendored in `alibaba/AliceMind` mPLUG/models/visual_transformers.py at commit
//! a6d5afe5c272960ce61dc73adb0877bc94b5d664, called with `skip_last_layer=True`: `ln_post` on
//! every token and the projection skipped.

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::attend::{fused_attention, Products};
use super::config::{AdapterConfig, VisionConfig};
use super::nn::{
    attention, by_row_slices, split_heads, LayerNorm, Linear, Packing, FFN_SLICE_ROWS,
};

/// Multi-head self-attention with packed q/k/v (`nn.MultiheadAttention` layout).
///
/// Upstream: `torch.nn.MultiheadAttention` as used by CLIP `ResidualAttentionBlock`
/// (openai/CLIP clip/model.py, vendored at AliceMind a6d5afe5c272960ce61dc73adb0877bc94b5d664).
#[derive(Debug, Clone)]
pub struct VisionAttention {
    in_proj: Linear,
    out_proj: Linear,
    heads: usize,
    differentiable: bool,
}

impl VisionAttention {
    /// Loads `in_proj_weight` (3W, W), `in_proj_bias`, `out_proj.{weight,bias}`.
    pub fn new(cfg: &VisionConfig, differentiable: bool, vb: VarBuilder) -> Result<Self> {
        let w = cfg.width;
        let weight = vb.get_with_hints((3 * w, w), "in_proj_weight", super::nn::WEIGHT_INIT)?;
        let bias = vb.get_with_hints(3 * w, "in_proj_bias", Init::Const(0.0))?;
        Ok(Self {
            in_proj: Linear::from_tensors(weight, Some(bias)),
            out_proj: Linear::new(w, w, true, vb.pp("out_proj"))?,
            heads: cfg.heads(),
            differentiable,
        })
    }

    /// (B, L, W) → (B, L, W), no mask.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_residual(xs, None)
    }

    /// [`Self::forward`] with `residual` (B, L, W) added to the output projection.
    pub fn forward_residual(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let w = xs.dim(D::Minus1)?;
        let qkv = self.in_proj.forward(xs)?;
        let q = qkv.narrow(D::Minus1, 0, w)?;
        let k = qkv.narrow(D::Minus1, w, w)?;
        let v = qkv.narrow(D::Minus1, 2 * w, w)?;
        let ys = match fused_attention(&q, &k, &v, self.heads, Products::of(&self.in_proj), None)? {
            Some(ys) => ys,
            None => {
                let [q, k, v] = [q, k, v].map(|t| split_heads(&t, self.heads));
                attention(&q?, &k?, &v?, None, self.differentiable)?
            }
        };
        self.out_proj.forward_with(&ys, None, residual)
    }

    /// Moves both projections to a packed kernel (see [`Linear::pack`]).
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.in_proj.pack(packing)?;
        self.out_proj.pack(packing)
    }
}

/// Pre-LN residual block: `x += attn(ln_1(x)); x += mlp(ln_2(x))`.
///
/// Upstream: `ResidualAttentionBlock` in AliceMind mPLUG/models/visual_transformers.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct VisionBlock {
    ln_1: LayerNorm,
    attn: VisionAttention,
    ln_2: LayerNorm,
    c_fc: Linear,
    c_proj: Linear,
    cfg: VisionConfig,
}

impl VisionBlock {
    /// Loads one `transformer.resblocks.{i}`.
    pub fn new(cfg: &VisionConfig, differentiable: bool, vb: VarBuilder) -> Result<Self> {
        let (w, eps) = (cfg.width, cfg.layer_norm_eps);
        Ok(Self {
            ln_1: LayerNorm::new(w, eps, differentiable, vb.pp("ln_1"))?,
            attn: VisionAttention::new(cfg, differentiable, vb.pp("attn"))?,
            ln_2: LayerNorm::new(w, eps, differentiable, vb.pp("ln_2"))?,
            c_fc: Linear::new(w, 4 * w, true, vb.pp("mlp").pp("c_fc"))?,
            c_proj: Linear::new(4 * w, w, true, vb.pp("mlp").pp("c_proj"))?,
            cfg: cfg.clone(),
        })
    }

    /// (B, L, W) → (B, L, W); the MLP on the bf16 kernel in slices of [`FFN_SLICE_ROWS`] rows.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self
            .attn
            .forward_residual(&self.ln_1.forward(xs)?, Some(xs))?;
        if self.c_fc.is_bf16() {
            return by_row_slices(&xs, FFN_SLICE_ROWS, |x| self.mlp(x));
        }
        self.mlp(&xs)
    }

    /// `x + c_proj(act(c_fc(ln_2(x))))`.
    fn mlp(&self, xs: &Tensor) -> Result<Tensor> {
        let act = Some(self.cfg.hidden_act);
        let h = self.c_fc.forward_with(&self.ln_2.forward(xs)?, act, None)?;
        self.c_proj.forward_with(&h, None, Some(xs))
    }

    /// Moves the block's linear layers to a packed kernel (see [`Linear::pack`]).
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.attn.pack(packing)?;
        self.c_fc.pack(packing)?;
        self.c_proj.pack(packing)
    }
}

/// The CLIP vision tower up to `ln_post` (all tokens), without the projection.
///
/// Upstream: `VisualTransformer` in AliceMind mPLUG/models/visual_transformers.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct VisionTransformer {
    patch_weight: Tensor,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: LayerNorm,
    blocks: Vec<VisionBlock>,
    ln_post: LayerNorm,
    cfg: VisionConfig,
}

impl VisionTransformer {
    /// Loads `visual_encoder.visual.*` (pass that prefix in `vb`).
    pub fn new(cfg: &VisionConfig, differentiable: bool, vb: VarBuilder) -> Result<Self> {
        let (w, p, eps) = (cfg.width, cfg.patch_size, cfg.layer_norm_eps);
        let conv = vb.get_with_hints((w, 3, p, p), "conv1.weight", super::nn::WEIGHT_INIT)?;
        let patch_weight = conv.reshape((w, 3 * p * p))?;
        let pos_init = Init::Randn {
            mean: 0.0,
            stdev: 0.01,
        };
        let class_embedding = vb.get_with_hints(w, "class_embedding", pos_init)?;
        let pe_shape = (cfg.num_tokens(), w);
        let positional_embedding = vb.get_with_hints(pe_shape, "positional_embedding", pos_init)?;
        let blocks = (0..cfg.layers)
            .map(|i| {
                VisionBlock::new(
                    cfg,
                    differentiable,
                    vb.pp(format!("transformer.resblocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_weight,
            class_embedding,
            positional_embedding,
            ln_pre: LayerNorm::new(w, eps, differentiable, vb.pp("ln_pre"))?,
            blocks,
            ln_post: LayerNorm::new(w, eps, differentiable, vb.pp("ln_post"))?,
            cfg: cfg.clone(),
        })
    }

    /// Patch embedding + class token + positions + `ln_pre`: (B, 3, R, R) → (B, L, W).
    pub fn embed(&self, pixels: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = pixels.dims4()?;
        let p = self.cfg.patch_size;
        let (gh, gw) = (h / p, w / p);
        let patches = pixels
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b, gh * gw, c * p * p))?;
        let xs = patches.broadcast_matmul(&self.patch_weight.t()?)?;
        let width = self.cfg.width;
        let cls = self
            .class_embedding
            .reshape((1, 1, width))?
            .expand((b, 1, width))?;
        let xs = Tensor::cat(&[&cls.to_dtype(xs.dtype())?, &xs], 1)?;
        let pos = self.positional_embedding.narrow(0, 0, xs.dim(1)?)?;
        let xs = xs.broadcast_add(&pos)?;
        self.ln_pre.forward(&xs)
    }

    /// Whether the weights are f32 tensors on the CPU.
    pub fn is_cpu_f32(&self) -> bool {
        self.patch_weight.device().is_cpu() && self.patch_weight.dtype() == candle_core::DType::F32
    }

    /// Moves every block's linear layers to a packed kernel; the patch embedding stays f32.
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.blocks.iter_mut().try_for_each(|b| b.pack(packing))
    }

    /// (B, 3, R, R) pixels → (B, L, W) tokens after `ln_post`.
    pub fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let mut xs = self.embed(pixels)?;
        for block in &self.blocks {
            xs = block.forward(&xs)?;
        }
        self.ln_post.forward(&xs)
    }
}

/// `V = LayerNorm(visn_fc(x))`, mapping the vision width to the text width.
///
/// Upstream: `visn_fc` / `visn_layer_norm` in AliceMind mPLUG/models/model_retrieval_mplug.py
/// at a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct VisionAdapter {
    fc: Linear,
    norm: LayerNorm,
}

impl VisionAdapter {
    /// Loads `visn_fc` (text width × vision width) and `visn_layer_norm` from the root `vb`.
    pub fn new(
        cfg: &AdapterConfig,
        vision_width: usize,
        text_width: usize,
        differentiable: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self {
            fc: Linear::new(vision_width, text_width, true, vb.pp("visn_fc"))?,
            norm: LayerNorm::new(
                text_width,
                cfg.layer_norm_eps,
                differentiable,
                vb.pp("visn_layer_norm"),
            )?,
        })
    }

    /// (B, L, Wv) → (B, L, Wt).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.norm.forward(&self.fc.forward(xs)?)
    }

    /// Moves the projection to a packed kernel (see [`Linear::pack`]).
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.fc.pack(packing)
    }
}

/// Resizes a (1 + g², W) position table to a new grid with bilinear interpolation
/// (`align_corners=False`), keeping the class row, as the reference fine-tune loaders do when a
/// checkpoint's grid differs from the target resolution.
pub fn resize_pos_embed(table: &Tensor, new_grid: usize) -> Result<Tensor> {
    let (rows, width) = table.dims2()?;
    let old = ((rows - 1) as f64).sqrt().round() as usize;
    let src = table.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
    let scale = old as f64 / new_grid as f64;
    let coord = |o: usize| {
        let x = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (x.floor() as usize).min(old - 1);
        let i1 = (i0 + 1).min(old - 1);
        (i0, i1, x - i0 as f64)
    };
    let mut out = Vec::with_capacity((new_grid * new_grid + 1) * width);
    out.extend_from_slice(&src[0]);
    for oy in 0..new_grid {
        let (y0, y1, fy) = coord(oy);
        for ox in 0..new_grid {
            let (x0, x1, fx) = coord(ox);
            let row = |y: usize, x: usize| &src[1 + y * old + x];
            let corners = [row(y0, x0), row(y0, x1), row(y1, x0), row(y1, x1)];
            for c in 0..width {
                let [a, b, d, e] = corners.map(|r| r[c] as f64);
                let top = a * (1.0 - fx) + b * fx;
                let bottom = d * (1.0 - fx) + e * fx;
                out.push((top * (1.0 - fy) + bottom * fy) as f32);
            }
        }
    }
    Tensor::from_vec(out, (new_grid * new_grid + 1, width), table.device())?.to_dtype(table.dtype())
}
