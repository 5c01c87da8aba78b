//! BERT pieces: embeddings, attention, feed-forward and layers, the text encoder and the
//! text decoder with its tied LM head and key/value cache.
//!
//! Upstream: `alibaba/AliceMind` mPLUG/models/xbert.py at commit
//! a6d5afe5c272960ce61dc73adb0877bc94b5d664 (HF-style `BertModel` / `BertLMHeadModel`,
//! post-LN layers, token types always 0).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};

use super::attend;
use super::config::{Activation, BertConfig, MaskConfig};
use super::nn::{
    additive_mask, attention, by_row_slices, causal_mask, split_heads, LayerNorm, Linear, Packing,
    FFN_SLICE_ROWS,
};

const EMBEDDING_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Word + position + token-type(0) embeddings followed by LayerNorm.
///
/// Upstream: `BertEmbeddings` in AliceMind mPLUG/models/xbert.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct BertEmbeddings {
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    norm: LayerNorm,
}

impl BertEmbeddings {
    /// Loads `word_embeddings`, `position_embeddings`, `token_type_embeddings`, `LayerNorm`.
    pub fn new(cfg: &BertConfig, differentiable: bool, vb: VarBuilder) -> Result<Self> {
        let h = cfg.hidden_size;
        let get = |rows: usize, name: &str| {
            vb.get_with_hints((rows, h), &format!("{name}.weight"), EMBEDDING_INIT)
        };
        Ok(Self {
            word: get(cfg.vocab_size, "word_embeddings")?,
            position: get(cfg.max_position_embeddings, "position_embeddings")?,
            token_type: get(cfg.type_vocab_size, "token_type_embeddings")?,
            norm: LayerNorm::new(h, cfg.layer_norm_eps, differentiable, vb.pp("LayerNorm"))?,
        })
    }

    /// The word-embedding matrix (vocab, hidden), which the LM head reuses.
    pub fn word_embeddings(&self) -> &Tensor {
        &self.word
    }

    /// (B, L) ids → (B, L, H), positions starting at `past`.
    pub fn forward(&self, ids: &Tensor, past: usize) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        let words = self.word.index_select(&flat, 0)?.reshape((b, l, ()))?;
        let pos = self.position.narrow(0, past, l)?;
        let xs = words
            .broadcast_add(&pos)?
            .broadcast_add(&self.token_type.get(0)?)?;
        self.norm.forward(&xs)
    }
}

/// Multi-head attention with its output block: `LN(x + dense(attn(q=x, kv)))`.
/// Used as self-attention (`attention`) and cross-attention (`crossattention`).
///
/// Upstream: `BertSelfAttention` + `BertSelfOutput` in AliceMind mPLUG/models/xbert.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct BertAttention {
    query: Linear,
    key: Linear,
    value: Linear,
    dense: Linear,
    norm: LayerNorm,
    heads: usize,
    differentiable: bool,
}

impl BertAttention {
    /// Loads `self.{query,key,value}` and `output.{dense,LayerNorm}`; keys and values read
    /// from inputs of width `kv_width`.
    pub fn new(
        cfg: &BertConfig,
        kv_width: usize,
        differentiable: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let s = vb.pp("self");
        let o = vb.pp("output");
        Ok(Self {
            query: Linear::new(h, h, true, s.pp("query"))?,
            key: Linear::new(kv_width, h, true, s.pp("key"))?,
            value: Linear::new(kv_width, h, true, s.pp("value"))?,
            dense: Linear::new(h, h, true, o.pp("dense"))?,
            norm: LayerNorm::new(h, cfg.layer_norm_eps, differentiable, o.pp("LayerNorm"))?,
            heads: cfg.num_attention_heads,
            differentiable,
        })
    }

    /// Projects a key/value source (B, L, kv_width) to per-head keys and values (B, H, L, d).
    pub fn project_kv(&self, kv: &Tensor) -> Result<(Tensor, Tensor)> {
        let k = split_heads(&self.key.forward(kv)?, self.heads)?;
        let v = split_heads(&self.value.forward(kv)?, self.heads)?;
        Ok((k, v))
    }

    /// Attends from `xs` (B, Lq, H) to projected keys/values, then applies the output block.
    pub fn attend(
        &self,
        xs: &Tensor,
        k: &Tensor,
        v: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        let q = split_heads(&self.query.forward(xs)?, self.heads)?;
        let ctx = attention(&q, k, v, mask, self.differentiable)?;
        self.norm
            .forward(&self.dense.forward_with(&ctx, None, Some(xs))?)
    }

    /// Unmasked attention from every row of `xs` (B, Lq, H) to one shared key/value source
    /// `kv` (1, Lk, W): the projection runs once and all rows' queries share one matmul.
    pub fn forward_shared(&self, xs: &Tensor, kv: &Tensor) -> Result<Tensor> {
        if let Some(ys) = self.forward_fused(xs, kv, None)? {
            return Ok(ys);
        }
        let (b, lq, h) = xs.dims3()?;
        let heads = self.heads;
        let d = h / heads;
        let (k, v) = self.project_kv(kv)?;
        let q = self
            .query
            .forward(xs)?
            .reshape((b * lq, heads, d))?
            .transpose(0, 1)?
            .contiguous()?
            .unsqueeze(0)?;
        let ctx = attention(&q, &k, &v, None, self.differentiable)?;
        let ctx = ctx.reshape((b, lq, h))?;
        self.norm
            .forward(&self.dense.forward_with(&ctx, None, Some(xs))?)
    }

    /// `attend` with keys and values projected from `kv`.
    pub fn forward(&self, xs: &Tensor, kv: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        if let Some(ys) = self.forward_fused(xs, kv, mask)? {
            return Ok(ys);
        }
        let (k, v) = self.project_kv(kv)?;
        self.attend(xs, &k, &v, mask)
    }

    /// [`Self::forward`] on the fused attention kernel, or `None` where it does not apply
    /// (see [`attend::fused_attention`]); `kv` may have batch 1 for every row of `xs`.
    fn forward_fused(
        &self,
        xs: &Tensor,
        kv: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<Option<Tensor>> {
        if self.differentiable || !attend::applies(xs, mask) {
            return Ok(None);
        }
        let q = self.query.forward(xs)?;
        let (k, v) = (self.key.forward(kv)?, self.value.forward(kv)?);
        let products = attend::Products::of(&self.query);
        let Some(ctx) = attend::fused_attention(&q, &k, &v, self.heads, products, mask)? else {
            return Ok(None);
        };
        let ys = self.dense.forward_with(&ctx, None, Some(xs))?;
        self.norm.forward(&ys).map(Some)
    }

    /// Moves the four projections to a packed kernel (see [`Linear::pack`]).
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        for linear in [
            &mut self.query,
            &mut self.key,
            &mut self.value,
            &mut self.dense,
        ] {
            linear.pack(packing)?;
        }
        Ok(())
    }
}

/// `LN(x + W2·act(W1·x))`.
///
/// Upstream: `BertIntermediate` + `BertOutput` in AliceMind mPLUG/models/xbert.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct BertFeedForward {
    intermediate: Linear,
    output: Linear,
    norm: LayerNorm,
    act: Activation,
}

impl BertFeedForward {
    /// Loads `intermediate.dense`, `output.dense` and `output.LayerNorm`.
    pub fn new(cfg: &BertConfig, differentiable: bool, vb: VarBuilder) -> Result<Self> {
        let (h, f) = (cfg.hidden_size, cfg.intermediate_size);
        let o = vb.pp("output");
        Ok(Self {
            intermediate: Linear::new(h, f, true, vb.pp("intermediate").pp("dense"))?,
            output: Linear::new(f, h, true, o.pp("dense"))?,
            norm: LayerNorm::new(h, cfg.layer_norm_eps, differentiable, o.pp("LayerNorm"))?,
            act: cfg.hidden_act,
        })
    }

    /// (B, L, H) → (B, L, H); on the bf16 kernel in slices of [`FFN_SLICE_ROWS`] rows.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.intermediate.is_bf16() {
            return by_row_slices(xs, FFN_SLICE_ROWS, |x| self.forward_rows(x));
        }
        self.forward_rows(xs)
    }

    /// `LN(x + W2·act(W1·x))` on all rows of `xs` at once.
    fn forward_rows(&self, xs: &Tensor) -> Result<Tensor> {
        let h = self.intermediate.forward_with(xs, Some(self.act), None)?;
        self.norm
            .forward(&self.output.forward_with(&h, None, Some(xs))?)
    }

    /// Moves both projections to a packed kernel (see [`Linear::pack`]).
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.intermediate.pack(packing)?;
        self.output.pack(packing)
    }
}

/// One post-LN layer: self-attention, optional cross-attention, feed-forward.
///
/// Upstream: `BertLayer` in AliceMind mPLUG/models/xbert.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct BertLayer {
    /// Self-attention block.
    pub attention: BertAttention,
    /// Cross-attention block (decoder and fusion layers only).
    pub crossattention: Option<BertAttention>,
    /// Feed-forward block.
    pub ffn: BertFeedForward,
}

impl BertLayer {
    /// Loads one `encoder.layer.{i}`; `cross_kv_width` adds a cross-attention block.
    pub fn new(
        cfg: &BertConfig,
        cross_kv_width: Option<usize>,
        differentiable: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let crossattention = cross_kv_width
            .map(|w| BertAttention::new(cfg, w, differentiable, vb.pp("crossattention")))
            .transpose()?;
        Ok(Self {
            attention: BertAttention::new(cfg, h, differentiable, vb.pp("attention"))?,
            crossattention,
            ffn: BertFeedForward::new(cfg, differentiable, vb)?,
        })
    }

    /// Moves every linear layer of the layer to a packed kernel.
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.attention.pack(packing)?;
        if let Some(cross) = &mut self.crossattention {
            cross.pack(packing)?;
        }
        self.ffn.pack(packing)
    }
}

/// The BERT text encoder (`text_encoder`): embeddings and self-attention layers.
///
/// Upstream: `BertModel` (no pooler) in AliceMind mPLUG/models/xbert.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct TextEncoder {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    masks: MaskConfig,
}

impl TextEncoder {
    /// Loads `embeddings.*` and `encoder.layer.{0..n}.*` under `vb`.
    pub fn new(
        cfg: &BertConfig,
        masks: &MaskConfig,
        differentiable: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| {
                BertLayer::new(
                    cfg,
                    None,
                    differentiable,
                    vb.pp(format!("encoder.layer.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: BertEmbeddings::new(cfg, differentiable, vb.pp("embeddings"))?,
            layers,
            masks: masks.clone(),
        })
    }

    /// Moves every layer's linear layers to a packed kernel; embeddings stay f32.
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.pack(packing))
    }

    /// The embedding output (B, L, H), before any layer.
    pub fn embed(&self, ids: &Tensor) -> Result<Tensor> {
        self.embeddings.forward(ids, 0)
    }

    /// (B, L) ids and 0/1 mask → last hidden state (B, L, H); padded positions are computed
    /// too.
    pub fn forward(&self, ids: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mut xs = self.embed(ids)?;
        let m = additive_mask(mask, self.masks.text, xs.dtype())?;
        for layer in &self.layers {
            xs = layer.attention.forward(&xs, &xs, Some(&m))?;
            xs = layer.ffn.forward(&xs)?;
        }
        Ok(xs)
    }
}

/// `Dense → act → LN → tied word embeddings + bias`.
///
/// Upstream: `BertLMPredictionHead` in AliceMind mPLUG/models/xbert.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct LmHead {
    dense: Linear,
    norm: LayerNorm,
    decoder: Linear,
    act: Activation,
}

impl LmHead {
    /// Loads `predictions.transform.*` and `predictions.bias`; the output weight is `tied`.
    pub fn new(
        cfg: &BertConfig,
        tied: Tensor,
        differentiable: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let p = vb.pp("predictions");
        let t = p.pp("transform");
        let bias = p.get_with_hints(cfg.vocab_size, "bias", Init::Const(0.0))?;
        Ok(Self {
            dense: Linear::new(h, h, true, t.pp("dense"))?,
            norm: LayerNorm::new(h, cfg.layer_norm_eps, differentiable, t.pp("LayerNorm"))?,
            decoder: Linear::from_tensors(tied, Some(bias)),
            act: cfg.hidden_act,
        })
    }

    /// (B, L, H) → (B, L, vocab) logits.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let xs = self.dense.forward_with(xs, Some(self.act), None)?;
        self.decoder.forward(&self.norm.forward(&xs)?)
    }

    /// Moves the transform and the tied output projection to a packed kernel.
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.dense.pack(packing)?;
        self.decoder.pack(packing)
    }
}

/// Per-layer keys and values kept across decoding steps.
#[derive(Debug, Clone)]
struct LayerCache {
    self_kv: Option<(Tensor, Tensor)>,
    cross_kv: (Tensor, Tensor),
}

/// Decoder state for incremental generation: the memory's projected keys/values (computed
/// once), its additive mask, and the self-attention keys/values of every decoded position.
#[derive(Debug, Clone)]
pub struct DecoderCache {
    layers: Vec<LayerCache>,
    memory_mask: Tensor,
    len: usize,
}

impl DecoderCache {
    /// Positions decoded so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing has been decoded yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Keeps rows `index` (a U32 vector over the batch) in this order, e.g. after a beam step.
    pub fn select(&mut self, index: &Tensor) -> Result<()> {
        for layer in &mut self.layers {
            if let Some((k, v)) = &layer.self_kv {
                layer.self_kv = Some((k.index_select(index, 0)?, v.index_select(index, 0)?));
            }
            let (k, v) = &layer.cross_kv;
            layer.cross_kv = (k.index_select(index, 0)?, v.index_select(index, 0)?);
        }
        self.memory_mask = self.memory_mask.index_select(index, 0)?;
        Ok(())
    }
}

/// The text decoder (`text_decoder`): BERT with causal self-attention, cross-attention to a
/// memory, and the LM head tied to its own word embeddings.
///
/// Upstream: `BertLMHeadModel` in AliceMind mPLUG/models/xbert.py at
/// a6d5afe5c272960ce61dc73adb0877bc94b5d664.
#[derive(Debug, Clone)]
pub struct TextDecoder {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    head: LmHead,
    masks: MaskConfig,
}

impl TextDecoder {
    /// Loads `bert.embeddings`, `bert.encoder.layer.{0..layers}` and `cls.predictions` under
    /// `vb`; cross-attention reads memories of width `memory_width`.
    pub fn new(
        cfg: &BertConfig,
        layers: usize,
        memory_width: usize,
        masks: &MaskConfig,
        differentiable: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bert = vb.pp("bert");
        let embeddings = BertEmbeddings::new(cfg, differentiable, bert.pp("embeddings"))?;
        let layers = (0..layers)
            .map(|i| {
                let lvb = bert.pp(format!("encoder.layer.{i}"));
                BertLayer::new(cfg, Some(memory_width), differentiable, lvb)
            })
            .collect::<Result<Vec<_>>>()?;
        let tied = embeddings.word_embeddings().clone();
        Ok(Self {
            embeddings,
            layers,
            head: LmHead::new(cfg, tied, differentiable, vb.pp("cls"))?,
            masks: masks.clone(),
        })
    }

    /// Moves every linear layer and the LM head to a packed kernel; embeddings stay f32.
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.pack(packing))?;
        self.head.pack(packing)
    }

    /// Teacher-forced logits (B, L, vocab) for ids (B, L) with 0/1 mask, attending to
    /// `memory` (B, M, W) under its 0/1 `memory_mask` (B, M).
    pub fn forward(
        &self,
        ids: &Tensor,
        mask: &Tensor,
        memory: &Tensor,
        memory_mask: &Tensor,
    ) -> Result<Tensor> {
        let mut xs = self.embeddings.forward(ids, 0)?;
        let self_mask = causal_mask(mask, self.masks.text, xs.dtype())?;
        let mem_mask = additive_mask(memory_mask, self.masks.image, xs.dtype())?;
        for layer in &self.layers {
            xs = layer.attention.forward(&xs, &xs, Some(&self_mask))?;
            xs = cross(layer)?.forward(&xs, memory, Some(&mem_mask))?;
            xs = layer.ffn.forward(&xs)?;
        }
        self.head.forward(&xs)
    }

    /// Starts incremental decoding against `memory` (B, M, W) with 0/1 `memory_mask`.
    pub fn start(&self, memory: &Tensor, memory_mask: &Tensor) -> Result<DecoderCache> {
        let layers = self
            .layers
            .iter()
            .map(|layer| {
                let cross_kv = cross(layer)?.project_kv(memory)?;
                Ok(LayerCache {
                    self_kv: None,
                    cross_kv,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let memory_mask = additive_mask(memory_mask, self.masks.image, memory.dtype())?;
        Ok(DecoderCache {
            layers,
            memory_mask,
            len: 0,
        })
    }

    /// Decodes `ids` (B, n) following the cached positions and returns the logits of the
    /// last new position (B, vocab). Positions within `ids` attend causally.
    pub fn step(&self, ids: &Tensor, cache: &mut DecoderCache) -> Result<Tensor> {
        let n = ids.dim(1)?;
        let mut xs = self.embeddings.forward(ids, cache.len)?;
        let self_mask = step_mask(n, cache.len, self.masks.text, xs.dtype(), xs.device())?;
        for (layer, lc) in self.layers.iter().zip(cache.layers.iter_mut()) {
            let (k, v) = layer.attention.project_kv(&xs)?;
            let (k, v) = match &lc.self_kv {
                Some((pk, pv)) => (Tensor::cat(&[pk, &k], 2)?, Tensor::cat(&[pv, &v], 2)?),
                None => (k, v),
            };
            xs = layer.attention.attend(&xs, &k, &v, self_mask.as_ref())?;
            lc.self_kv = Some((k, v));
            let (ck, cv) = &lc.cross_kv;
            xs = cross(layer)?.attend(&xs, ck, cv, Some(&cache.memory_mask))?;
            xs = layer.ffn.forward(&xs)?;
        }
        cache.len += n;
        let last = xs.narrow(1, n - 1, 1)?;
        self.head.forward(&last)?.squeeze(1)
    }
}

fn cross(layer: &BertLayer) -> Result<&BertAttention> {
    layer
        .crossattention
        .as_ref()
        .ok_or_else(|| candle_core::Error::Msg("decoder layer without cross-attention".into()))
}

/// Additive (1, 1, n, past + n) causal mask for `n` new positions; `None` when n is 1.
fn step_mask(
    n: usize,
    past: usize,
    constant: f64,
    dtype: DType,
    dev: &candle_core::Device,
) -> Result<Option<Tensor>> {
    if n == 1 {
        return Ok(None);
    }
    let total = past + n;
    let rows = Tensor::arange(past as u32, total as u32, dev)?.reshape((n, 1))?;
    let cols = Tensor::arange(0u32, total as u32, dev)?.reshape((1, total))?;
    let blocked = cols.broadcast_gt(&rows)?.to_dtype(DType::F32)?;
    let m = (blocked * constant)?
        .to_dtype(dtype)?
        .reshape((1, 1, n, total))?;
    Ok(Some(m))
}

/// Takes the first position of (B, L, H): (B, H).
pub fn first_token(xs: &Tensor) -> Result<Tensor> {
    xs.narrow(1, 0, 1)?.squeeze(1)
}
