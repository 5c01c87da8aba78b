//! Building blocks shared by every component: linear layers, layer norm, activations,
//! attention and mask helpers. Each block has an inference path on candle's fused kernels
//! and a differentiable path for training, chosen once at construction.
//!
//! TODO(dropout): the training path applies no dropout (the reference fine-tunes with
//! p = 0.1 in BERT layers); add it behind the same switch when the trainer needs it.

use candle_core::backend::BackendStorage;
use std::sync::Arc;

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp1, InplaceOp2, Layout,
    Module, Result, Shape, Tensor, D,
};
use candle_nn::{Init, VarBuilder};
use rayon::prelude::*;

use super::bf16::PackedBf16;
use super::config::Activation;
use super::packed::Epilogue;
use super::sgemm::{Isa, PackedF32};

/// Initialisation used when a [`VarBuilder`] creates fresh variables (training from scratch).
pub const WEIGHT_INIT: Init = Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// Which packed kernel [`Linear::pack`] moves a layer to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packing {
    /// Weights rounded to bf16 for the AVX512-BF16 kernel ([`super::bf16`]); the f32 weight
    /// tensor is kept (tied weights share it).
    Bf16,
    /// f32 weights for the given microkernel ([`super::sgemm`]); the weight tensor is
    /// released, so the layer holds one copy of its weights.
    F32(Isa),
}

/// A weight packed for one of the kernels.
#[derive(Debug, Clone)]
enum Packed {
    Bf16(Arc<PackedBf16>),
    F32(Arc<PackedF32>),
}

impl Packed {
    fn out_dim(&self) -> usize {
        match self {
            Self::Bf16(p) => p.out_dim(),
            Self::F32(p) => p.out_dim(),
        }
    }

    fn in_dim(&self) -> usize {
        match self {
            Self::Bf16(p) => p.in_dim(),
            Self::F32(p) => p.in_dim(),
        }
    }

    fn matmul(&self, xs: &[f32], rows: usize, epilogue: Epilogue) -> Vec<f32> {
        match self {
            Self::Bf16(p) => super::bf16::matmul(xs, rows, p, epilogue),
            Self::F32(p) => super::sgemm::matmul(xs, rows, p, epilogue),
        }
    }
}

/// `y = x Wᵀ + b` over the last dimension of an input of any rank.
///
/// After [`Linear::pack`] the weight is held packed for a CPU kernel: bf16 (inputs rounded
/// to bf16 per call, f32 accumulation, f32 in and out; see [`super::bf16`]) or f32 (see
/// [`super::sgemm`]). Packed layers run without a backward pass.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The (out, in) weight; `None` once only the packed f32 copy is kept.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    packed: Option<Packed>,
}

impl Linear {
    /// Loads `weight` (out, in) and, when `bias` is true, `bias` (out).
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((out_dim, in_dim), "weight", WEIGHT_INIT)?;
        let bias = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self::from_tensors(weight, bias))
    }

    /// Builds the layer from tensors already at hand.
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            weight: Some(weight),
            bias,
            packed: None,
        }
    }

    /// Whether the layer runs on the packed bf16 kernel.
    pub fn is_bf16(&self) -> bool {
        matches!(self.packed, Some(Packed::Bf16(_)))
    }

    /// Switches the layer to a packed kernel (see [`Packing`]); packing again repacks from
    /// the same values. Errors when the weight is not a CPU tensor, or for [`Packing::F32`]
    /// when it is not f32; the caller checks that the CPU has the kernel's instructions.
    pub fn pack(&mut self, packing: Packing) -> Result<()> {
        if let (Packing::F32(_), Some(w)) = (packing, &self.weight) {
            if !w.device().is_cpu() || w.dtype() != DType::F32 {
                return Err(candle_core::Error::Msg(format!(
                    "the f32 kernel needs an f32 CPU weight, not {:?}",
                    w.dtype()
                )));
            }
        }
        let (weight, out_dim, in_dim) = self.weight_values()?;
        if in_dim == 0 || out_dim == 0 {
            return Ok(());
        }
        let bias = match &self.bias {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        self.packed = Some(match packing {
            Packing::Bf16 => {
                if self.weight.is_none() {
                    let shape = (out_dim, in_dim);
                    self.weight = Some(Tensor::from_vec(weight.clone(), shape, &Device::Cpu)?);
                }
                Packed::Bf16(Arc::new(PackedBf16::pack(&weight, out_dim, in_dim, bias)))
            }
            Packing::F32(isa) => {
                self.weight = None;
                let packed = PackedF32::pack(&weight, out_dim, in_dim, bias, isa);
                Packed::F32(Arc::new(packed))
            }
        });
        Ok(())
    }

    /// The weight as row-major f32 values with its (out, in) dims, from the tensor or the
    /// packed f32 copy.
    fn weight_values(&self) -> Result<(Vec<f32>, usize, usize)> {
        match (&self.weight, &self.packed) {
            (Some(w), _) => {
                let (out_dim, in_dim) = w.dims2()?;
                let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
                Ok((values, out_dim, in_dim))
            }
            (None, Some(Packed::F32(p))) => Ok((p.unpack(), p.out_dim(), p.in_dim())),
            (None, _) => Err(no_weights()),
        }
    }

    /// Output features.
    fn out_dim(&self) -> Result<usize> {
        match (&self.packed, &self.weight) {
            (Some(p), _) => Ok(p.out_dim()),
            (None, Some(w)) => w.dim(0),
            (None, None) => Err(no_weights()),
        }
    }

    /// `act(x Wᵀ + b) + residual` with the bias, activation and residual applied in one pass
    /// over the output where possible (packed kernels, untracked f32 CPU tensors); otherwise
    /// composed of differentiable ops. `residual` has the output's shape.
    pub fn forward_with(
        &self,
        xs: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let dims = xs.dims().to_vec();
        let in_dim = dims[dims.len() - 1];
        let rows = xs.elem_count() / in_dim.max(1);
        let mut out = dims;
        let last = out.len() - 1;
        out[last] = self.out_dim()?;
        let flat = xs.reshape((rows, in_dim))?;
        let residual = residual.map(|r| r.reshape((rows, out[last]))).transpose()?;
        let ys = match (&self.packed, &self.weight) {
            (Some(p), _) => packed_linear(p, &flat, act, residual.as_ref())?,
            (None, Some(w)) => self.f32_linear(w, &flat, act, residual.as_ref())?,
            (None, None) => return Err(no_weights()),
        };
        ys.reshape(out)
    }

    fn f32_linear(
        &self,
        weight: &Tensor,
        xs: &Tensor,
        act: Option<Activation>,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let ys = xs.matmul(&weight.t()?)?;
        let fusable = ys.device().is_cpu() && ys.dtype() == DType::F32 && !ys.track_op();
        let bias_fusable = self.bias.as_ref().is_none_or(|b| !b.track_op());
        if fusable && bias_fusable && residual.is_none_or(|r| !r.track_op()) {
            let bias = match &self.bias {
                Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                None => None,
            };
            let op = BiasActivation { bias, act };
            match residual {
                Some(r) => ys.inplace_op2(&r.to_dtype(DType::F32)?.contiguous()?, &op)?,
                None => ys.inplace_op1(&op)?,
            }
            return Ok(ys);
        }
        let ys = match &self.bias {
            Some(b) => ys.broadcast_add(b)?,
            None => ys,
        };
        let ys = match act {
            Some(act) => activate(&ys, act)?,
            None => ys,
        };
        match residual {
            Some(r) => ys + r,
            None => Ok(ys),
        }
    }
}

/// Rows per slice of a bf16 feed-forward block run by [`by_row_slices`]. Run over all rows
/// at once, the block's f32 intermediate (four times the input's width) goes out to memory
/// and back: on the AMX tile unit of a 2-core Xeon, a 9712-row BERT-base block (a rerank's
/// connected layer) took 123 ms whole and 84-92 ms in slices of 256 to 1024 rows, whose
/// 3072-wide intermediate stays in cache. The f32 kernel gained nothing from slicing (its
/// products are slow enough to hide the traffic), so only bf16 blocks slice. A slice still
/// makes 18 or more parallel work items per product at BERT-base widths, enough for a few
/// cores.
///
/// TODO(ffn-slices): the slice size is not derived from the cache size or the core count; on
/// hosts with many cores a slice per core at a time would keep them busier.
pub const FFN_SLICE_ROWS: usize = 384;

/// `f` over slices of the rows of `xs` (…, in), joined into (…, out): whole when it has at
/// most `slice_rows` rows, otherwise in as few slices of at most `slice_rows` rows as
/// possible, of equal size rounded up to whole 32-row tiles where that stays within
/// `slice_rows` (the last one may be shorter). `f` maps (n, in) rows to (n, out) rows, each
/// row on its own. Errors are `f`'s and the shapes'.
pub fn by_row_slices(
    xs: &Tensor,
    slice_rows: usize,
    f: impl Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let dims = xs.dims().to_vec();
    let in_dim = dims.last().copied().unwrap_or(1).max(1);
    let rows = xs.elem_count() / in_dim;
    let limit = slice_rows.max(1);
    if rows <= limit {
        return f(xs);
    }

    let count = rows.div_ceil(limit);
    let size = rows.div_ceil(count).next_multiple_of(32).min(limit);
    let flat = xs.reshape((rows, in_dim))?;
    let parts = (0..rows)
        .step_by(size)
        .map(|start| f(&flat.narrow(0, start, size.min(rows - start))?))
        .collect::<Result<Vec<_>>>()?;
    let joined = Tensor::cat(&parts, 0)?;

    let mut out = dims;
    let last = out.len() - 1;
    out[last] = joined.dim(1)?;
    joined.reshape(out)
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, None, None)
    }
}

/// The error of a [`Linear`] left with neither a weight tensor nor a packed f32 weight (a
/// state its methods never produce).
fn no_weights() -> candle_core::Error {
    candle_core::Error::Msg("linear layer without weights".into())
}

/// Runs a packed kernel on (rows, in) `xs` (as f32), with an optional (rows, out) residual.
fn packed_linear(
    packed: &Packed,
    xs: &Tensor,
    act: Option<Activation>,
    residual: Option<&Tensor>,
) -> Result<Tensor> {
    let op = PackedLinear {
        packed: packed.clone(),
        act,
    };
    let xs = xs.to_dtype(DType::F32)?.contiguous()?;
    match residual {
        Some(r) => xs.apply_op2_no_bwd(&r.to_dtype(DType::F32)?.contiguous()?, &op),
        None => xs.apply_op1_no_bwd(&op),
    }
}

/// Contiguous f32 CPU data of a tensor's storage, or an error naming `op`.
fn f32_slice<'a>(storage: &'a CpuStorage, layout: &Layout, op: &'static str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::UnsupportedDTypeForOp(
            storage.dtype(),
            op,
        ));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::RequiresContiguous { op });
    };
    Ok(&data[start..end])
}

/// A packed matmul as a candle op on (rows, in) inputs; the second operand, when present,
/// is the residual.
struct PackedLinear {
    packed: Packed,
    act: Option<Activation>,
}

impl PackedLinear {
    fn run(&self, xs: &[f32], residual: Option<&[f32]>, rows: usize) -> Result<CpuStorage> {
        let (n, k) = (self.packed.out_dim(), self.packed.in_dim());
        if xs.len() != rows * k || residual.is_some_and(|r| r.len() != rows * n) {
            return Err(candle_core::Error::Msg(format!(
                "packed linear expects ({rows}, {k}) inputs and ({rows}, {n}) residuals"
            )));
        }
        let epilogue = Epilogue {
            act: self.act,
            residual,
        };
        Ok(CpuStorage::F32(self.packed.matmul(xs, rows, epilogue)))
    }
}

impl CustomOp1 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(storage, layout, "packed-linear")?;
        let rows = layout.dims()[0];
        let shape = Shape::from((rows, self.packed.out_dim()));
        Ok((self.run(xs, None, rows)?, shape))
    }
}

impl CustomOp2 for PackedLinear {
    fn name(&self) -> &'static str {
        "packed-linear-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let xs = f32_slice(s1, l1, "packed-linear-residual")?;
        let residual = f32_slice(s2, l2, "packed-linear-residual")?;
        let rows = l1.dims()[0];
        let shape = Shape::from((rows, self.packed.out_dim()));
        Ok((self.run(xs, Some(residual), rows)?, shape))
    }
}

/// In place on a fresh (rows, out) f32 matmul output: `act(y + bias)`, then `+ residual`
/// when run as the two-operand op, by [`super::vmath::finish`] (the composed ops' arithmetic,
/// except that the exact GELU's `erf` is a polynomial within 1.4e-7 of libm's).
struct BiasActivation {
    bias: Option<Vec<f32>>,
    act: Option<Activation>,
}

impl BiasActivation {
    fn apply(&self, ys: &mut [f32], residual: Option<&[f32]>, width: usize) {
        let rows = ys.par_chunks_mut(width).enumerate();
        rows.for_each(|(i, row)| {
            let residual = residual.map(|r| &r[i * width..][..width]);
            super::vmath::finish(row, self.bias.as_deref(), self.act, residual);
        });
    }
}

/// Mutable contiguous f32 data of a fresh matmul output.
fn f32_slice_mut<'a>(storage: &'a mut CpuStorage, layout: &Layout) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(data) = storage else {
        return Err(candle_core::Error::UnsupportedDTypeForOp(
            storage.dtype(),
            "bias-act",
        ));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(candle_core::Error::RequiresContiguous { op: "bias-act" });
    };
    Ok(&mut data[start..end])
}

impl InplaceOp1 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-act"
    }

    fn cpu_fwd(&self, storage: &mut CpuStorage, layout: &Layout) -> Result<()> {
        let width = layout.dims()[layout.dims().len() - 1].max(1);
        self.apply(f32_slice_mut(storage, layout)?, None, width);
        Ok(())
    }
}

impl InplaceOp2 for BiasActivation {
    fn name(&self) -> &'static str {
        "bias-act-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<()> {
        let width = l1.dims()[l1.dims().len() - 1].max(1);
        let residual = f32_slice(s2, l2, "bias-act-residual")?;
        let ys = f32_slice_mut(s1, l1)?;
        if residual.len() != ys.len() {
            return Err(candle_core::Error::Msg(format!(
                "residual of {} values for an output of {}",
                residual.len(),
                ys.len()
            )));
        }
        self.apply(ys, Some(residual), width);
        Ok(())
    }
}

/// Layer normalisation over the last dimension with affine weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
    differentiable: bool,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of width `dim`.
    pub fn new(dim: usize, eps: f64, differentiable: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(dim, "bias", Init::Const(0.0))?;
        Ok(Self {
            weight,
            bias,
            eps,
            differentiable,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !self.differentiable {
            let xs = xs.contiguous()?;
            let eps = self.eps as f32;
            if xs.device().is_cpu() && xs.dtype() == DType::F32 {
                return xs.apply_op3_no_bwd(&self.weight, &self.bias, &FusedLayerNorm { eps });
            }
            return candle_nn::ops::layer_norm(&xs, &self.weight, &self.bias, eps);
        }
        let dtype = xs.dtype();
        let xs = xs.to_dtype(DType::F32)?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        normed
            .to_dtype(dtype)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// Rows per parallel work item of [`FusedLayerNorm`].
const NORM_ROWS: usize = 16;

/// Layer normalisation over the last dimension of contiguous f32 storage
/// ([`super::vmath::layer_norm`] per row), rows spread over all threads, without a backward
/// pass. Its operands are the input, the weight and the bias.
struct FusedLayerNorm {
    eps: f32,
}

impl CustomOp3 for FusedLayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let op = self.name();
        let xs = f32_slice(xs, xs_layout, op)?;
        let weight = f32_slice(weight, weight_layout, op)?;
        let bias = f32_slice(bias, bias_layout, op)?;
        let dim = xs_layout.dims().last().copied();
        let vector = |l: &Layout| (l.dims().len() == 1).then(|| l.dims()[0]);
        let (w_dims, b_dims) = (vector(weight_layout), vector(bias_layout));
        let Some(dim) = dim.filter(|&d| w_dims == Some(d) && b_dims == Some(d)) else {
            return Err(candle_core::Error::Msg(format!(
                "{op}: input of shape {:?} with a weight of shape {:?} and a bias of shape {:?}",
                xs_layout.dims(),
                weight_layout.dims(),
                bias_layout.dims()
            )));
        };

        let mut out = vec![0f32; xs.len()];
        if dim > 0 {
            out.par_chunks_mut(dim * NORM_ROWS)
                .zip(xs.par_chunks(dim * NORM_ROWS))
                .for_each(|(out, xs)| {
                    for (out, row) in out.chunks_exact_mut(dim).zip(xs.chunks_exact(dim)) {
                        super::vmath::layer_norm(row, weight, bias, self.eps, out);
                    }
                });
        }
        Ok((CpuStorage::F32(out), xs_layout.shape().clone()))
    }
}

/// Applies an [`Activation`]. Untracked f32 CPU tensors go through one fused pass on all
/// threads ([`super::vmath::activate`], within 1e-7 · |x| of the composed ops); tensors that
/// need gradients (or other dtypes and devices) use composed, differentiable ops.
pub fn activate(xs: &Tensor, act: Activation) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 && !xs.track_op() {
        return xs.contiguous()?.apply_op1_no_bwd(&FusedActivation(act));
    }
    activate_composed(xs, act)
}

/// [`activate`] from differentiable tensor ops.
fn activate_composed(xs: &Tensor, act: Activation) -> Result<Tensor> {
    match act {
        Activation::Gelu => xs.gelu_erf(),
        Activation::QuickGelu => xs.broadcast_mul(&candle_nn::ops::sigmoid(&(xs * 1.702)?)?),
    }
}

/// Elements per parallel work item of [`FusedActivation`].
const ACTIVATION_CHUNK: usize = 16 * 1024;

/// An [`Activation`] as one multi-threaded element-wise pass over contiguous f32 storage,
/// without a backward pass.
struct FusedActivation(Activation);

/// One element of an [`Activation`], with the arithmetic of the composed candle ops.
pub(crate) fn activation_value(act: Activation, v: f32) -> f32 {
    match act {
        Activation::Gelu => {
            (candle_core::cpu::erf::erf_f32(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v
        }
        Activation::QuickGelu => v * ((-(v * 1.702f32)).exp() + 1.0).recip(),
    }
}

impl CustomOp1 for FusedActivation {
    fn name(&self) -> &'static str {
        "fused-activation"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let src = f32_slice(storage, layout, self.name())?;
        let mut dst = src.to_vec();
        dst.par_chunks_mut(ACTIVATION_CHUNK)
            .for_each(|d| super::vmath::activate(d, self.0));
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// Softmax over the last dimension: fused for inference, composed of differentiable ops
/// for training.
pub fn softmax_last(xs: &Tensor, differentiable: bool) -> Result<Tensor> {
    if differentiable {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&xs.contiguous()?)
    }
}

/// Scaled dot-product attention. `q` is (B, H, Lq, d), `k`/`v` are (B, H, Lk, d), `mask` is
/// additive and broadcastable to (B, H, Lq, Lk). Returns (B, Lq, H·d).
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    differentiable: bool,
) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let scale = 1.0 / (d as f64).sqrt();
    // Scaling the (Lq, d) queries is cheaper than scaling the (Lq, Lk) scores.
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let scores = match mask {
        Some(m) => scores.broadcast_add(m)?,
        None => scores,
    };
    let probs = softmax_last(&scores, differentiable)?;
    probs
        .matmul(&v.contiguous()?)?
        .transpose(1, 2)?
        .reshape((b, lq, h * d))
}

/// Splits (B, L, H·d) into (B, H, L, d), contiguous.
pub fn split_heads(xs: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, l, w) = xs.dims3()?;
    xs.reshape((b, l, heads, w / heads))?
        .transpose(1, 2)?
        .contiguous()
}

/// Turns a (B, L) 0/1 mask of any dtype into an additive (B, 1, 1, L) mask
/// `(1 - m) * constant` in `dtype`.
pub fn additive_mask(mask: &Tensor, constant: f64, dtype: DType) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let m = mask.to_dtype(DType::F32)?;
    let inverted = (m.ones_like()? - m)?;
    (inverted * constant)?
        .to_dtype(dtype)?
        .reshape((b, 1, 1, l))
}

/// An additive (B, 1, L, L) mask that combines a causal pattern with a (B, L) padding mask,
/// as BERT decoders build it: `(1 - causal·m) * constant`.
pub fn causal_mask(mask: &Tensor, constant: f64, dtype: DType) -> Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let dev = mask.device();
    let rows = Tensor::arange(0u32, l as u32, dev)?.reshape((l, 1))?;
    let cols = Tensor::arange(0u32, l as u32, dev)?.reshape((1, l))?;
    let causal = cols.broadcast_le(&rows)?.to_dtype(DType::F32)?;
    let m = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
    let allowed = causal.reshape((1, 1, l, l))?.broadcast_mul(&m)?;
    ((allowed.ones_like()? - allowed)? * constant)?.to_dtype(dtype)
}

/// Row-wise L2 normalisation of a (B, E) tensor, as `F.normalize` with eps 1e-12.
pub fn l2_normalize(xs: &Tensor) -> Result<Tensor> {
    let norm = xs.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    xs.broadcast_div(&norm.clamp(1e-12, f64::INFINITY)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn differentiable_layer_norm_matches_fused() -> Result<()> {
        use crate::model::packed::testing::random;
        let dev = Device::Cpu;
        // Seeded inputs: with unseeded ones, candle's one-pass variance at mean 3 strayed past
        // the 2e-5 bound below in about 1 run in 200.
        let seeded = |len: usize, seed: u64, scale: f64, offset: f64| {
            (Tensor::from_vec(random(len, seed), len, &dev)? * scale)? + offset
        };
        for (width, offset) in [(1, 0.0), (8, 0.0), (100, 3.0), (768, 0.0), (768, 50.0)] {
            let seed = width as u64;
            let xs = seeded(15 * width, seed, 1.7, offset)?.reshape((3, 5, width))?;
            let w = seeded(width, seed + 1, 0.17, 1.0)?;
            let b = seeded(width, seed + 2, 0.17, 0.0)?;
            let mut ln = LayerNorm {
                weight: w.clone(),
                bias: b.clone(),
                eps: 1e-5,
                differentiable: false,
            };
            let fused = ln.forward(&xs)?;
            ln.differentiable = true;
            let slow = ln.forward(&xs)?;
            let candle = candle_nn::ops::layer_norm(&xs, &w, &b, 1e-5)?;

            let reference = layer_norm_f64(&xs, &w, &b, 1e-5)?;
            let diff = (&fused - reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 3e-5, "{width} wide, mean {offset}: {diff} from f64");
            // A large mean costs the others precision: candle's one-pass variance cancels,
            // and both sum in one f32 chain.
            if offset <= 3.0 {
                for (other, name) in [(slow, "composed ops"), (candle, "candle's layer_norm")] {
                    let diff = (&fused - other)?.abs()?.max_all()?.to_scalar::<f32>()?;
                    assert!(
                        diff < 2e-5,
                        "{width} wide, mean {offset}: {name} differ by {diff}"
                    );
                }
            }
        }
        Ok(())
    }

    /// Layer norm over the last dimension computed in f64.
    fn layer_norm_f64(xs: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
        let xs = xs.to_dtype(DType::F64)?;
        let mean = xs.mean_keepdim(D::Minus1)?;
        let centred = xs.broadcast_sub(&mean)?;
        let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
        let normed = centred.broadcast_div(&(var + eps)?.sqrt()?)?;
        let (w, b) = (w.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
        normed
            .broadcast_mul(&w)?
            .broadcast_add(&b)?
            .to_dtype(DType::F32)
    }

    #[test]
    fn fused_layer_norm_refuses_weights_that_do_not_fit_the_rows() -> Result<()> {
        let dev = Device::Cpu;
        let ones = |shape: &[usize]| Tensor::ones(shape, DType::F32, &dev);
        for (input, weight) in [(&[2, 8][..], &[7][..]), (&[2, 8], &[1, 8]), (&[], &[1])] {
            let ln = LayerNorm {
                weight: ones(weight)?,
                bias: ones(weight)?.zeros_like()?,
                eps: 1e-5,
                differentiable: false,
            };
            let err = ln.forward(&ones(input)?).expect_err("refused");
            let want = format!("input of shape {input:?} with a weight of shape {weight:?}");
            assert!(err.to_string().contains(&want), "{err}");
        }
        Ok(())
    }

    #[test]
    fn fused_activations_match_composed() -> Result<()> {
        let xs = Tensor::randn(0f32, 3.0, (7, 40_000), &Device::Cpu)?;
        for act in [Activation::Gelu, Activation::QuickGelu] {
            let fused = activate(&xs, act)?;
            let composed = activate_composed(&xs, act)?;
            let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{act:?} differs by {diff}");
        }
        Ok(())
    }

    #[test]
    fn packed_f32_linear_matches_candle_path() -> Result<()> {
        let Some(isa) = Isa::detect() else {
            eprintln!("skipped: this CPU has no packed f32 kernel");
            return Ok(());
        };
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 0.2, (37, 29), &dev)?;
        let bias = Tensor::randn(0f32, 0.2, 37, &dev)?;
        let xs = Tensor::randn(0f32, 1.0, (2, 7, 29), &dev)?;
        let residual = Tensor::randn(0f32, 1.0, (2, 7, 37), &dev)?;
        let plain = Linear::from_tensors(weight, Some(bias));
        let mut packed = plain.clone();
        packed.pack(Packing::F32(isa))?;
        assert!(packed.weight.is_none(), "packing f32 keeps one copy");
        for (act, res) in [(None, Some(&residual)), (Some(Activation::QuickGelu), None)] {
            let want = plain.forward_with(&xs, act, res)?;
            let got = packed.forward_with(&xs, act, res)?;
            assert_eq!(got.dims(), [2, 7, 37]);
            let diff = (got - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(diff < 1e-5, "{act:?}: packed differs by {diff}");
        }
        // Packing for bf16 afterwards restores the weight tensor from the packed values.
        packed.pack(Packing::Bf16)?;
        let restored = packed.weight.as_ref().expect("bf16 keeps the tensor");
        let original = plain.weight.as_ref().expect("unpacked");
        let diff = (restored - original)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn causal_mask_blocks_future_and_padding() -> Result<()> {
        let dev = Device::Cpu;
        let mask = Tensor::new(&[[1u32, 1, 0]], &dev)?;
        let m = causal_mask(&mask, -100.0, DType::F32)?;
        let rows = m.squeeze(0)?.squeeze(0)?.to_vec2::<f32>()?;
        assert_eq!(rows[0], vec![0.0, -100.0, -100.0]);
        assert_eq!(rows[1], vec![0.0, 0.0, -100.0]);
        assert_eq!(rows[2], vec![0.0, 0.0, -100.0]);
        Ok(())
    }

    #[test]
    fn row_slices_join_to_the_whole_result() -> Result<()> {
        let w = Tensor::randn(0f32, 1.0, (5, 3), &Device::Cpu)?;
        for (batch, len) in [(1, 1), (2, 3), (1, 384), (1, 385), (4, 250), (3, 1000)] {
            let xs = Tensor::randn(0f32, 1.0, (batch, len, 3), &Device::Cpu)?;
            let calls = std::cell::RefCell::new(Vec::new());
            let f = |x: &Tensor| {
                calls.borrow_mut().push(x.elem_count() / 3);
                x.broadcast_matmul(&w.t()?)?.tanh()
            };
            let sliced = by_row_slices(&xs, 384, f)?;
            let rows = batch * len;
            let whole = xs.reshape((rows, 3))?.matmul(&w.t()?)?.tanh()?;
            assert_eq!(sliced.dims(), &[batch, len, 5]);
            let diff = (sliced.reshape((rows, 5))? - whole)?.abs()?.max_all()?;
            let diff = diff.to_scalar::<f32>()?;
            assert!(diff < 1e-6, "{batch} × {len}: {diff}");

            let calls = calls.into_inner();
            assert_eq!(calls.iter().sum::<usize>(), rows);
            assert_eq!(calls.len(), rows.div_ceil(384));
            assert!(calls.iter().all(|&n| n <= 384), "{calls:?}");
            let full = &calls[..calls.len() - 1];
            assert!(
                full.iter().all(|&n| n % 32 == 0 && n == calls[0]),
                "{calls:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn row_slices_never_exceed_a_limit_that_is_not_whole_tiles() -> Result<()> {
        for (rows, limit) in [(79, 40), (11, 10), (100, 1), (700, 300)] {
            let xs = Tensor::zeros((rows, 2), DType::F32, &Device::Cpu)?;
            let calls = std::cell::RefCell::new(Vec::new());
            let f = |x: &Tensor| {
                calls.borrow_mut().push(x.dim(0)?);
                Ok(x.clone())
            };
            by_row_slices(&xs, limit, f)?;
            let calls = calls.into_inner();
            assert_eq!(calls.iter().sum::<usize>(), rows);
            assert_eq!(
                calls.len(),
                rows.div_ceil(limit),
                "{rows} by {limit}: {calls:?}"
            );
            assert!(
                calls.iter().all(|&n| n <= limit),
                "{rows} by {limit}: {calls:?}"
            );
        }
        Ok(())
    }

    #[test]
    fn l2_normalize_gives_unit_rows() -> Result<()> {
        let xs = Tensor::new(&[[3f32, 4.0], [0.0, 2.0]], &Device::Cpu)?;
        let n = l2_normalize(&xs)?.to_vec2::<f32>()?;
        assert_eq!(n, vec![vec![0.6, 0.8], vec![0.0, 1.0]]);
        Ok(())
    }
}
