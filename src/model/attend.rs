//! Fused multi-head attention for inference on f32 CPU tensors.
//!
//! Queries, keys and values are read in place from the projection outputs (B, L, H·d), so
//! packed q/k/v slices and a key/value source of batch 1 shared by every query row need no
//! head-split or broadcast copy. Each (batch, head) pair is one rayon task: scores
//! `scale · q kᵀ` into a per-thread buffer, the additive mask, a row softmax
//! ([`super::vmath::softmax`]), then `p v` written into its columns of the (B, Lq, H·d)
//! output. Compared with composed tensor ops this avoids the head-split and transpose copies
//! and the (B, H, Lq, Lk) score and probability tensors.
//!
//! The two products run in the precision of the model's linear layers ([`Products`]): in f32
//! on the `gemm` crate, single-threaded inside the task, or in bf16 on the kernels of
//! [`super::bf16`] (the AMX tile unit where the CPU has one). In bf16 each head's keys and
//! values are rounded and packed like weight panels ([`super::bf16::PackedHead`]): once per
//! head before the tasks when every batch entry shares them (one image against many texts),
//! otherwise inside each task.
//!
//! TODO(attention-speed): the f32 products stay on the `gemm` crate, which runs them at about
//! the packed linear kernel's FLOP rate at ViT-B shapes (9 % of an f32 ViT-B/16 forward on a
//! 2-core Xeon, 11 % on a 2-core AVX2 CPU), so moving them to that kernel would gain little;
//! the softmax (4 %) could still be fused into the score tiles while they are in registers.
//! In bf16, a task whose keys are its own and whose queries are few (a text's co-attention
//! over one candidate image) packs as many values as it multiplies: on the Xeon the bf16 rerank
//! runs 2.2–2.3× our f32, against 2.4–2.9× for the vision encoder.

#![expect(
    unsafe_code,
    reason = "the gemm crate multiplies strided views through raw pointers"
)]

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use super::bf16::{self, HeadBuffers, PackedHead, Rows};
use super::nn::Linear;

/// The arithmetic of the two attention products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Products {
    /// f32 operands and sums.
    #[default]
    F32,
    /// Scaled queries, keys, probabilities and values rounded to bf16, sums in f32 (see
    /// [`bf16::attend_head`]); only on CPUs where [`bf16::available`] is true.
    Bf16,
}

impl Products {
    /// The precision of `projection`'s kernel: bf16 when it runs on the packed bf16 kernel.
    pub fn of(projection: &Linear) -> Self {
        if projection.is_bf16() {
            Self::Bf16
        } else {
            Self::F32
        }
    }
}

/// `softmax(q kᵀ / √d + mask) v` per head for q (B, Lq, W), k and v (B or 1, Lk, W) and an
/// additive `mask` of shape (B, 1, 1, Lk), with `products` in f32 or bf16; returns
/// (B, Lq, W). Returns `None` when the fused kernel does not apply (other dtypes or devices,
/// tensors that need gradients, a mask of another shape, a last dimension that is not
/// contiguous), so the caller composes ops. Errors when `products` is bf16 on a CPU without
/// the bf16 instructions.
pub fn fused_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    products: Products,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    // Unit tests run the bf16 wiring on emulated products where the CPU lacks the kernels.
    if products == Products::Bf16 && !bf16::available() && !cfg!(test) {
        return Err(candle_core::Error::Msg(
            "bf16 attention on a CPU without avx512_bf16".into(),
        ));
    }
    let tensors = [Some(q), Some(k), Some(v), mask];
    let plain = tensors
        .iter()
        .flatten()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op() && t.rank() >= 3);
    let empty = [q, k, v].iter().any(|t| t.elem_count() == 0);
    if !plain || empty || q.rank() != 3 || k.rank() != 3 || v.dims() != k.dims() || heads == 0 {
        return Ok(None);
    }
    let (b, _, w) = q.dims3()?;
    let (bk, lk, wk) = k.dims3()?;
    if wk != w || w % heads != 0 || !(bk == b || bk == 1) {
        return Ok(None);
    }
    let mask = match mask {
        None => None,
        Some(m) if m.dims() == [b, 1, 1, lk] => Some(m.flatten_all()?.to_vec1::<f32>()?),
        Some(_) => return Ok(None),
    };
    let op = Attend {
        heads,
        width: w,
        mask,
        products,
    };
    q.apply_op3_no_bwd(k, v, &op).map(Some)
}

/// Whether [`fused_attention`] can take `xs` and `mask`, judged before projecting: untracked
/// f32 CPU tensors and a mask of shape (B, 1, 1, Lk) or none.
pub fn applies(xs: &Tensor, mask: Option<&Tensor>) -> bool {
    let plain = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op();
    let mask_fits = mask.is_none_or(|m| plain(m) && m.rank() == 4 && m.dims()[1..3] == [1, 1]);
    plain(xs) && mask_fits
}

/// The fused attention as a candle op over (q, k, v).
struct Attend {
    heads: usize,
    width: usize,
    /// Additive mask, (B, Lk) row-major.
    mask: Option<Vec<f32>>,
    products: Products,
}

/// A (B, L, W) f32 view with a contiguous last dimension.
struct View<'a> {
    data: &'a [f32],
    start: usize,
    /// Batch stride; 0 when one batch entry is shared by all.
    batch: usize,
    row: usize,
    len: usize,
}

impl<'a> View<'a> {
    /// Checks the view and that every element it reaches for `batches` lies in storage.
    fn new(storage: &'a CpuStorage, layout: &Layout, batches: usize) -> Result<Self> {
        let CpuStorage::F32(data) = storage else {
            return Err(candle_core::Error::UnsupportedDTypeForOp(
                storage.dtype(),
                "attend",
            ));
        };
        let (dims, stride) = (layout.dims(), layout.stride());
        if dims.len() != 3 || stride[2] != 1 {
            return Err(candle_core::Error::RequiresContiguous { op: "attend" });
        }
        if dims.contains(&0) || batches == 0 {
            return Err(candle_core::Error::Msg("attend: empty input".into()));
        }
        let batch = if dims[0] == 1 { 0 } else { stride[0] };
        let start = layout.start_offset();
        let last = start + (batches - 1) * batch + (dims[1] - 1) * stride[1] + dims[2];
        if last > data.len() {
            return Err(candle_core::Error::Msg(
                "attend: view outside its storage".into(),
            ));
        }
        Ok(Self {
            data,
            start,
            batch,
            row: stride[1],
            len: dims[1],
        })
    }

    /// First element of head columns `col..` in batch `b`.
    fn at(&self, b: usize, col: usize) -> *const f32 {
        self.data[self.start + b * self.batch + col..].as_ptr()
    }

    /// Columns `col..col + cols` of every row of batch `b`.
    fn rows(&self, b: usize, col: usize, cols: usize) -> Rows<'a> {
        Rows {
            data: &self.data[self.start + b * self.batch + col..],
            rows: self.len,
            cols,
            stride: self.row,
        }
    }
}

/// The output pointer, shared by tasks that write disjoint (batch, head) column blocks.
struct SharedOut(*mut f32);

// SAFETY: every task writes only its own batch rows × head columns (see `Attend::head`).
unsafe impl Sync for SharedOut {}

/// A strided matrix operand: first element, column stride, row stride (in elements).
#[derive(Clone, Copy)]
struct Strided<P> {
    ptr: P,
    cs: isize,
    rs: isize,
}

/// `dst = beta · lhs · rhs` for an (m × k) lhs and a (k × n) rhs, on one thread.
struct Product {
    m: usize,
    n: usize,
    k: usize,
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    beta: f32,
}

impl Product {
    /// # Safety
    /// Every element the strides reach is inside a live allocation, and no other thread
    /// touches the destination elements.
    unsafe fn run(&self) {
        let (d, l, r) = (self.dst, self.lhs, self.rhs);
        // SAFETY: forwarded from the caller.
        unsafe {
            gemm::gemm(
                self.m,
                self.n,
                self.k,
                d.ptr,
                d.cs,
                d.rs,
                false,
                l.ptr,
                l.cs,
                l.rs,
                r.ptr,
                r.cs,
                r.rs,
                0.0,
                self.beta,
                false,
                false,
                false,
                Parallelism::None,
            )
        }
    }
}

/// Per-thread buffers of [`Attend`].
#[derive(Default)]
struct Scratch {
    /// Scores and probabilities of one head in f32.
    scores: Vec<f32>,
    /// Operands and results of one head in bf16.
    bf16: HeadBuffers,
    /// Keys and values of one (batch, head) pair in bf16, when they are not shared.
    packed: PackedHead,
}

impl Attend {
    /// One (batch, head) pair into its block of `dst`, in the precision of `self.products`;
    /// `shared` holds each head's packed keys and values when every batch entry uses the same
    /// (bf16 only), and is empty otherwise.
    ///
    /// # Safety
    /// The views were checked by [`View::new`] for the batch count; `dst` points to a
    /// (B, Lq, W) buffer whose block for (`b`, `h`) no other thread writes.
    unsafe fn head(
        &self,
        qkv: [&View; 3],
        task: (usize, usize),
        dst: &SharedOut,
        s: &mut Scratch,
        shared: &[PackedHead],
    ) {
        let [_, k, v] = qkv;
        let (b, h) = task;
        let head = match (self.products, shared.get(h)) {
            (Products::F32, _) => {
                // SAFETY: forwarded from the caller.
                return unsafe { self.head_f32(qkv, task, dst, &mut s.scores) };
            }
            (Products::Bf16, Some(head)) => head,
            (Products::Bf16, None) => {
                let hd = self.width / self.heads;
                s.packed.pack(k.rows(b, h * hd, hd), v.rows(b, h * hd, hd));
                &s.packed
            }
        };
        let mask = self.mask.as_ref().map(|m| &m[b * k.len..][..k.len]);
        // SAFETY: forwarded from the caller.
        unsafe { self.head_bf16(qkv[0], (head, mask), task, dst, &mut s.bf16) }
    }

    /// Each head's keys and values packed for bf16, when every batch entry shares them
    /// (keys and values of batch 1); empty otherwise, and in f32.
    fn shared_heads(&self, k: &View, v: &View) -> Vec<PackedHead> {
        if self.products != Products::Bf16 || k.batch != 0 {
            return Vec::new();
        }
        let hd = self.width / self.heads;
        (0..self.heads)
            .into_par_iter()
            .map(|h| {
                let mut head = PackedHead::default();
                head.pack(k.rows(0, h * hd, hd), v.rows(0, h * hd, hd));
                head
            })
            .collect()
    }

    /// [`Self::head`] in bf16 on `head`'s packed keys and values with the batch entry's
    /// `mask`: the context from [`bf16::attend_head`] copied into `dst`.
    ///
    /// # Safety
    /// As for [`Self::head`].
    unsafe fn head_bf16(
        &self,
        q: &View,
        (head, mask): (&PackedHead, Option<&[f32]>),
        (b, h): (usize, usize),
        dst: &SharedOut,
        buffers: &mut HeadBuffers,
    ) {
        let (lq, w) = (q.len, self.width);
        let hd = w / self.heads;
        let col = h * hd;
        let scale = 1.0 / (hd as f32).sqrt();
        let context = bf16::attend_head(q.rows(b, col, hd), head, scale, mask, buffers);
        for (i, row) in context.chunks_exact(hd).enumerate() {
            // SAFETY: row i of batch b, columns col..col + hd, is inside the (B, Lq, W)
            // output and belongs to this task alone.
            unsafe {
                let at = dst.0.add((b * lq + i) * w + col);
                std::ptr::copy_nonoverlapping(row.as_ptr(), at, hd);
            }
        }
    }

    /// [`Self::head`] in f32, using `scores` as scratch.
    ///
    /// # Safety
    /// As for [`Self::head`].
    unsafe fn head_f32(
        &self,
        qkv: [&View; 3],
        task: (usize, usize),
        dst: &SharedOut,
        scores: &mut Vec<f32>,
    ) {
        let ([q, k, v], (b, h)) = (qkv, task);
        let (lq, lk, w) = (q.len, k.len, self.width);
        let hd = w / self.heads;
        let col = h * hd;
        // The product overwrites every score, so a buffer that is long enough is not cleared.
        if scores.len() < lq * lk {
            scores.resize(lq * lk, 0.0);
        }
        let scores = &mut scores[..lq * lk];
        let logits = Product {
            m: lq,
            n: lk,
            k: hd,
            dst: Strided {
                ptr: scores.as_mut_ptr(),
                cs: 1,
                rs: lk as isize,
            },
            lhs: Strided {
                ptr: q.at(b, col),
                cs: 1,
                rs: q.row as isize,
            },
            rhs: Strided {
                ptr: k.at(b, col),
                cs: k.row as isize,
                rs: 1,
            },
            beta: 1.0 / (hd as f32).sqrt(),
        };
        // SAFETY: q and k rows lie in their storage (checked by `View::new`); `scores`
        // holds lq × lk values and is this task's own.
        unsafe { logits.run() };

        let mask = self.mask.as_ref().map(|m| &m[b * lk..][..lk]);
        scores
            .chunks_exact_mut(lk)
            .for_each(|row| super::vmath::softmax(row, mask));

        let context = Product {
            m: lq,
            n: hd,
            k: lk,
            // SAFETY: batch b, column `col` is inside the (B, Lq, W) output.
            dst: Strided {
                ptr: unsafe { dst.0.add(b * lq * w + col) },
                cs: 1,
                rs: w as isize,
            },
            lhs: Strided {
                ptr: scores.as_ptr(),
                cs: 1,
                rs: lk as isize,
            },
            rhs: Strided {
                ptr: v.at(b, col),
                cs: 1,
                rs: v.row as isize,
            },
            beta: 1.0,
        };
        // SAFETY: v rows lie in their storage; the destination block (lq rows of batch b,
        // columns col..col + hd, row stride w) belongs to this task alone.
        unsafe { context.run() };
    }
}

impl CustomOp3 for Attend {
    fn name(&self) -> &'static str {
        "attend"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let batches = l1.dims()[0];
        let q = View::new(s1, l1, batches)?;
        let k = View::new(s2, l2, batches)?;
        let v = View::new(s3, l3, batches)?;
        let lq = q.len;
        let mut out = vec![0f32; batches * lq * self.width];
        let dst = SharedOut(out.as_mut_ptr());
        let shared = self.shared_heads(&k, &v);
        (0..batches * self.heads).into_par_iter().for_each_init(
            Scratch::default,
            |scratch, task| {
                let task = (task / self.heads, task % self.heads);
                // SAFETY: the views were checked for `batches`; each task writes its own
                // (batch, head) block of `out`, which outlives the loop.
                unsafe { self.head([&q, &k, &v], task, &dst, scratch, &shared) };
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((batches, lq, self.width))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::nn::{attention, split_heads};
    use candle_core::Device;

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> Tensor {
        let b = q.dim(0).unwrap();
        let (k, v) = (
            k.repeat((b / k.dim(0).unwrap(), 1, 1)).unwrap(),
            v.repeat((b / v.dim(0).unwrap(), 1, 1)).unwrap(),
        );
        let split = |t: &Tensor| split_heads(&t.contiguous().unwrap(), heads).unwrap();
        attention(&split(q), &split(&k), &split(&v), mask, false).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn matches_composed_ops_on_packed_views_with_mask() -> Result<()> {
        let dev = Device::Cpu;
        let (b, lq, w, heads) = (3, 7, 24, 4);
        let qkv = Tensor::randn(0f32, 1.0, (b, lq, 3 * w), &dev)?;
        let (q, k, v) = (
            qkv.narrow(2, 0, w)?,
            qkv.narrow(2, w, w)?,
            qkv.narrow(2, 2 * w, w)?,
        );
        let keep = Tensor::new(
            &[
                [1f32, 1., 1., 0., 0., 1., 1.],
                [1.; 7],
                [1., 0., 1., 1., 1., 1., 0.],
            ],
            &dev,
        )?;
        let mask = ((keep.ones_like()? - keep)? * -10000.0)?.reshape((b, 1, 1, lq))?;
        let fused =
            fused_attention(&q, &k, &v, heads, Products::F32, Some(&mask))?.expect("fused applies");
        let want = composed(&q, &k, &v, heads, Some(&mask));
        let diff = max_diff(&fused, &want);
        assert!(diff < 1e-5, "fused attention differs by {diff}");
        Ok(())
    }

    #[test]
    fn shared_keys_and_values_broadcast_over_queries() -> Result<()> {
        let dev = Device::Cpu;
        let (b, lq, lk, w, heads) = (4, 5, 9, 16, 2);
        let q = Tensor::randn(0f32, 1.0, (b, lq, w), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, lk, w), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, lk, w), &dev)?;
        let fused =
            fused_attention(&q, &k, &v, heads, Products::F32, None)?.expect("fused applies");
        let diff = max_diff(&fused, &composed(&q, &k, &v, heads, None));
        assert!(diff < 1e-5, "shared attention differs by {diff}");
        Ok(())
    }

    /// bf16 products against f32 ones on the same operands: rounding moves outputs of size
    /// about 1 by up to about 1e-2; a head or a mask row taken from the wrong place moves
    /// them by far more.
    fn assert_bf16_close(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) {
        let run = |products| {
            fused_attention(q, k, v, heads, products, mask)
                .unwrap()
                .expect("fused applies")
        };
        let diff = max_diff(&run(Products::Bf16), &run(Products::F32));
        assert!(diff < 3e-2, "bf16 attention differs from f32 by {diff}");
        assert!(diff > 0.0, "the bf16 products did not run");
    }

    /// An additive (B, 1, 1, Lk) mask hiding each key with probability `hidden`.
    fn random_mask(b: usize, lk: usize, hidden: f64) -> Result<Tensor> {
        let keep = Tensor::rand(0f32, 1.0, (b, lk), &Device::Cpu)?
            .ge(hidden)?
            .to_dtype(DType::F32)?;
        ((keep.ones_like()? - keep)? * -10000.0)?.reshape((b, 1, 1, lk))
    }

    #[test]
    fn bf16_products_follow_f32_on_packed_views_with_mask() -> Result<()> {
        let dev = Device::Cpu;
        let (b, l, w, heads) = (3, 40, 96, 3);
        let qkv = Tensor::randn(0f32, 1.0, (b, l, 3 * w), &dev)?;
        let [q, k, v] = [0, 1, 2].map(|i| qkv.narrow(2, i * w, w).unwrap());
        let mask = random_mask(b, l, 0.3)?;
        assert_bf16_close(&q, &k, &v, heads, Some(&mask));
        Ok(())
    }

    #[test]
    fn bf16_products_share_one_packing_of_batch_one_keys() -> Result<()> {
        let dev = Device::Cpu;
        let (b, lq, lk, w, heads) = (5, 7, 50, 64, 2);
        let q = Tensor::randn(0f32, 1.0, (b, lq, w), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, lk, w), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, lk, w), &dev)?;
        let mask = random_mask(b, lk, 0.2)?;
        assert_bf16_close(&q, &k, &v, heads, Some(&mask));
        assert_bf16_close(&q, &k, &v, heads, None);
        Ok(())
    }

    #[test]
    fn other_mask_shapes_fall_back() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (1, 3, 8), &dev)?;
        let causal = Tensor::zeros((1, 1, 3, 3), DType::F32, &dev)?;
        assert!(fused_attention(&q, &q, &q, 2, Products::F32, Some(&causal))?.is_none());
        Ok(())
    }
}
