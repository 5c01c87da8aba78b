//! The cross-modal skip-connected fusion network.
//!
//! Upstream: `FusionModel` / `FusionEncoder` in `alibaba/AliceMind` mPLUG/models/xbert.py at
//! commit a6d5afe5c272960ce61dc73adb0877bc94b5d664. Only the last `fusion_layers` stored layers
//! run; local index k selects asymmetric co-attention (`k == 0 || k % stride != 0`) or
//! connected attention over `concat(v, t)` with an outer residual on the vision stream.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::bert::BertLayer;
use super::config::{BertConfig, FusionConfig, MaskConfig};
use super::nn::{additive_mask, Packing};

/// The live fusion layers with their schedule.
#[derive(Debug, Clone)]
pub struct Fusion {
    layers: Vec<BertLayer>,
    connected: Vec<bool>,
    masks: MaskConfig,
}

/// Outputs of a fusion pass.
#[derive(Debug, Clone)]
pub struct FusionOutput {
    /// Vision stream after fusion (B, Lv, H); equals the input when no layer is connected.
    pub v: Tensor,
    /// Text stream after fusion (B, Lt, H); `t[:, 0]` feeds the ITM head.
    pub t: Tensor,
}

impl Fusion {
    /// Loads state-dict layers `start_layer..num_hidden_layers` of `fusion_encoder.encoder`
    /// (pass `fusion_encoder` as `vb`). Dead layers and embeddings are never read.
    pub fn new(
        cfg: &FusionConfig,
        bert: &BertConfig,
        masks: &MaskConfig,
        differentiable: bool,
        vb: VarBuilder,
    ) -> Result<Self> {
        let start = cfg.start_layer();
        let width = bert.hidden_size;
        let mut layers = Vec::new();
        let mut connected = Vec::new();
        for (k, i) in (start..cfg.num_hidden_layers).enumerate() {
            let lvb = vb.pp(format!("encoder.layer.{i}"));
            let is_connected = cfg.is_connected(k);
            // A connected layer never runs its cross-attention, so it is not loaded.
            let cross = (!is_connected).then_some(width);
            layers.push(BertLayer::new(bert, cross, differentiable, lvb)?);
            connected.push(is_connected);
        }
        Ok(Self {
            layers,
            connected,
            masks: masks.clone(),
        })
    }

    /// Moves every live layer's linear layers to a packed kernel.
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        self.layers.iter_mut().try_for_each(|l| l.pack(packing))
    }

    /// Number of live layers.
    pub fn num_layers(&self) -> usize {
        self.layers.len()
    }

    /// Fuses text `t` (B, Lt, H) under 0/1 `t_mask` (B, Lt) with vision `v` (B, Lv, H)
    /// (all vision tokens valid). A `v` of batch 1 is shared by every text row (a rerank of
    /// B candidates against one image): its keys and values are projected once until a
    /// connected layer makes the vision stream row-specific. `on_layer` sees each live layer's
    /// output: (B, Lt, H) for co-attention, concat(v, t) before the split for connected
    /// layers.
    pub fn forward_with(
        &self,
        t: &Tensor,
        t_mask: &Tensor,
        v: &Tensor,
        mut on_layer: impl FnMut(usize, &Tensor),
    ) -> Result<FusionOutput> {
        let dtype = t.dtype();
        let b = t.dim(0)?;
        let (vb, lv, h) = v.dims3()?;
        let mut shared = vb == 1 && b > 1;
        let text_mask = additive_mask(t_mask, self.masks.text, dtype)?;
        let ones = Tensor::ones((b, lv), t_mask.dtype(), t.device())?;
        let image_mask = additive_mask(&ones, self.masks.image, dtype)?;
        let joint_mask = Tensor::cat(&[&image_mask, &text_mask], 3)?;
        let (mut v, mut t) = (v.clone(), t.clone());
        for (k, layer) in self.layers.iter().enumerate() {
            if self.connected[k] {
                if shared {
                    v = v.broadcast_as((b, lv, h))?.contiguous()?;
                    shared = false;
                }
                let x = Tensor::cat(&[&v, &t], 1)?;
                let a = layer.attention.forward(&x, &x, Some(&joint_mask))?;
                let y = layer.ffn.forward(&a)?;
                on_layer(k, &y);
                v = (v + y.narrow(1, 0, lv)?)?;
                t = y.narrow(1, lv, y.dim(1)? - lv)?;
            } else {
                let a = layer.attention.forward(&t, &t, Some(&text_mask))?;
                let cross = layer.crossattention.as_ref().ok_or_else(|| {
                    candle_core::Error::Msg("co-attention layer without cross-attention".into())
                })?;
                let c = if shared {
                    cross.forward_shared(&a, &v)?
                } else {
                    cross.forward(&a, &v, Some(&image_mask))?
                };
                t = layer.ffn.forward(&c)?;
                on_layer(k, &t);
            }
        }
        if shared {
            v = v.broadcast_as((b, lv, h))?;
        }
        Ok(FusionOutput { v, t })
    }

    /// [`Self::forward_with`] without the per-layer hook.
    pub fn forward(&self, t: &Tensor, t_mask: &Tensor, v: &Tensor) -> Result<FusionOutput> {
        self.forward_with(t, t_mask, v, |_, _| {})
    }
}
