//! A CPU GEMM with bf16 weights, bf16-rounded activations and f32 accumulation, on the
//! AVX512-BF16 dot-product instruction (`vdpbf16ps`).
//!
//! Weights are rounded to bf16 once and packed into panels of [`NR`] output columns, with
//! each pair of adjacent input features stored side by side, the layout the instruction
//! consumes. Activations arrive in f32 and are rounded to bf16 (nearest even) per call.
//! A register-blocked microkernel computes [`MR`] × [`NR`] output tiles over the whole
//! reduction; rayon spreads tiles over threads. Bias, activation and a residual are applied
//! to each tile while it is still in cache.
//!
//! [`available`] says whether the running CPU has the instructions; nothing here may be
//! called when it does not (the callers check once at model load).

#![expect(
    unsafe_code,
    reason = "AVX-512 intrinsics need target_feature functions and raw-pointer loads"
)]

use rayon::prelude::*;

use super::packed::{Epilogue, SharedOut, Sink, Span};

/// Output columns per packed panel and microkernel tile: two 16-lane vectors.
pub const NR: usize = 32;

/// Output rows per microkernel tile.
pub const MR: usize = 8;

/// Rows of one parallel work item (a multiple of [`MR`]).
const TASK_ROWS: usize = 4 * MR;

/// Columns of one parallel work item (a multiple of [`NR`]).
const TASK_COLS: usize = 4 * NR;

/// Whether this CPU can run the bf16 kernels (AVX512F, AVX512BW and AVX512-BF16).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A weight matrix (out × in, as `nn.Linear` stores it) rounded to bf16 and packed for the
/// kernel, with its optional f32 bias.
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    /// Panels of `NR` columns; in each, for every input pair `p`, `NR` columns × 2 values.
    panels: Vec<u16>,
    bias: Option<Vec<f32>>,
    out_dim: usize,
    in_dim: usize,
}

impl PackedBf16 {
    /// Rounds `weight` (row-major `out_dim × in_dim`) to bf16 (nearest even) and packs it.
    /// `bias`, when given, has `out_dim` entries.
    pub fn pack(weight: &[f32], out_dim: usize, in_dim: usize, bias: Option<Vec<f32>>) -> Self {
        let pairs = in_dim.div_ceil(2);
        let panel_count = out_dim.div_ceil(NR);
        let mut panels = vec![0u16; panel_count * pairs * NR * 2];
        for (n, row) in weight.chunks_exact(in_dim).enumerate() {
            let (panel, col) = (n / NR, n % NR);
            for (k, &w) in row.iter().enumerate() {
                let at = ((panel * pairs + k / 2) * NR + col) * 2 + k % 2;
                panels[at] = half::bf16::from_f32(w).to_bits();
            }
        }
        Self {
            panels,
            bias,
            out_dim,
            in_dim,
        }
    }

    /// Output features (rows of the original weight).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Input features (columns of the original weight).
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    fn pairs(&self) -> usize {
        self.in_dim.div_ceil(2)
    }
}

/// Computes `epilogue(xs · Wᵀ + b)` for row-major `xs` (rows × in_dim) into a new row-major
/// (rows × out_dim) vector.
///
/// Panics (a caller bug, not input) when `xs` or the residual has the wrong length or
/// [`available`] is false.
pub fn matmul(xs: &[f32], rows: usize, w: &PackedBf16, epilogue: Epilogue) -> Vec<f32> {
    assert!(
        available(),
        "bf16 kernels called on a CPU without avx512_bf16"
    );
    assert_eq!(
        xs.len(),
        rows * w.in_dim,
        "input length must be rows × in_dim"
    );
    if let Some(r) = epilogue.residual {
        assert_eq!(
            r.len(),
            rows * w.out_dim,
            "residual length must be rows × out_dim"
        );
    }
    let a = round_rows(xs, rows, w.in_dim);
    let mut out = vec![0f32; rows * w.out_dim];
    let row_tasks = rows.div_ceil(TASK_ROWS);
    let col_tasks = w.out_dim.div_ceil(TASK_COLS);
    let sink = Sink {
        dst: SharedOut(out.as_mut_ptr()),
        out_dim: w.out_dim,
        bias: w.bias.as_deref(),
        epilogue,
    };
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let block = Block {
            row0: (task / col_tasks) * TASK_ROWS,
            col0: (task % col_tasks) * TASK_COLS,
            rows,
        };
        // SAFETY: the CPU check above holds; each task writes only its own rows × columns
        // block of `out`, which is rows × out_dim long and outlives the parallel loop.
        unsafe { run_block(&a, w, &block, &sink) };
    });
    out
}

/// One parallel work item: `TASK_ROWS` rows from `row0` and `TASK_COLS` columns from `col0`,
/// clipped to the matrix.
struct Block {
    row0: usize,
    col0: usize,
    rows: usize,
}

/// Rounds row-major f32 rows to bf16 pairs: one u32 per input pair (first value in the low
/// half), rows padded with zeros to a multiple of [`MR`] and an odd width padded by one.
fn round_rows(xs: &[f32], rows: usize, in_dim: usize) -> Vec<u32> {
    let pairs = in_dim.div_ceil(2);
    let padded = rows.div_ceil(MR) * MR;
    let mut a = vec![0u32; padded * pairs];
    a.par_chunks_mut(pairs)
        .zip(xs.par_chunks(in_dim))
        .for_each(|(dst, src)| round_row(src, dst));
    a
}

fn round_row(src: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `matmul` checked the CPU features before any row is rounded.
        unsafe { x86::round_row(src, dst) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    round_row_scalar(src, dst);
}

/// Scalar rounding of one row to bf16 pairs (round to nearest even).
fn round_row_scalar(src: &[f32], dst: &mut [u32]) {
    for (d, pair) in dst.iter_mut().zip(src.chunks(2)) {
        let lo = half::bf16::from_f32(pair[0]).to_bits() as u32;
        let hi = pair
            .get(1)
            .map_or(0, |&v| half::bf16::from_f32(v).to_bits() as u32);
        *d = lo | (hi << 16);
    }
}

/// # Safety
/// The CPU has the features [`available`] checks; `block` lies within the matrix that
/// `sink.dst` points to (rows × out_dim) and no other thread writes it.
unsafe fn run_block(a: &[u32], w: &PackedBf16, block: &Block, sink: &Sink) {
    let pairs = w.pairs();
    let row_end = (block.row0 + TASK_ROWS).min(block.rows);
    let col_end = (block.col0 + TASK_COLS).min(w.out_dim);
    let mut tile = [0f32; MR * NR];
    for col in (block.col0..col_end).step_by(NR) {
        let panel = &w.panels[(col / NR) * pairs * NR * 2..][..pairs * NR * 2];
        for row in (block.row0..row_end).step_by(MR) {
            let lhs = &a[row * pairs..][..MR * pairs];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: the caller guarantees the CPU features; slices are sized by `pairs`.
            unsafe {
                x86::tile(lhs, panel, pairs, &mut tile)
            };
            let out = Span {
                row,
                col,
                rows: (row_end - row).min(MR),
                cols: (col_end - col).min(NR),
            };
            // SAFETY: forwarded from the caller: the span lies in this task's block.
            unsafe { sink.write(&tile, NR, &out) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// Rounds one f32 row to bf16 pairs, 16 values per instruction, the tail in scalar.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-BF16; `dst` holds `src.len().div_ceil(2)`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn round_row(src: &[f32], dst: &mut [u32]) {
        let full = src.len() / 16;
        for i in 0..full {
            // SAFETY: 16 values from 16·i are inside `src`; 8 pairs from 8·i inside `dst`.
            unsafe {
                let v = _mm512_loadu_ps(src.as_ptr().add(16 * i));
                let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.as_mut_ptr().add(8 * i).cast(), h);
            }
        }
        super::round_row_scalar(&src[16 * full..], &mut dst[8 * full..]);
    }

    /// One MR × NR tile over all `pairs` input pairs, written row-major (stride NR) to `out`.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-BF16; `a` holds MR × `pairs` values and
    /// `panel` `pairs` × NR × 2.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn tile(a: &[u32], panel: &[u16], pairs: usize, out: &mut [f32; MR * NR]) {
        assert!(a.len() >= MR * pairs && panel.len() >= pairs * NR * 2);
        let mut acc = [[_mm512_setzero_ps(); 2]; MR];
        let (ap, wp) = (a.as_ptr(), panel.as_ptr());
        for p in 0..pairs {
            // SAFETY: in bounds by the assertion above.
            let (w0, w1): (__m512bh, __m512bh) = unsafe {
                let w = wp.add(p * NR * 2);
                (
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.cast())),
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(w.add(32).cast())),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate() {
                // SAFETY: in bounds by the assertion above.
                let x = unsafe { *ap.add(r * pairs + p) };
                // SAFETY: same-size reinterpretation of 16 lanes of 32 bits.
                let x = unsafe {
                    std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(x as i32))
                };
                acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            // SAFETY: row r of the MR × NR tile is inside `out`.
            unsafe {
                _mm512_storeu_ps(out.as_mut_ptr().add(r * NR), acc[0]);
                _mm512_storeu_ps(out.as_mut_ptr().add(r * NR + 16), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Activation;
    use crate::model::nn::activation_value;

    fn bf16_round(v: f32) -> f32 {
        half::bf16::from_f32(v).to_f32()
    }

    use crate::model::packed::testing::{operands, random};

    /// Reference on the same bf16-rounded operands, accumulated in f64.
    fn reference(xs: &[f32], w: &[f32], b: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        crate::model::packed::testing::reference(xs, w, b, (rows, n, k), bf16_round)
    }

    #[test]
    fn matches_reference_on_odd_shapes() {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        for (rows, n, k) in [
            (1, 1, 1),
            (7, 33, 19),
            (13, 70, 37),
            (41, 129, 130),
            (9, 31, 300),
        ] {
            let (xs, w, b) = operands((rows, n, k), 1);
            let packed = PackedBf16::pack(&w, n, k, Some(b.clone()));
            let got = matmul(&xs, rows, &packed, Epilogue::default());
            let want = reference(&xs, &w, &b, rows, n, k);
            let diff = got
                .iter()
                .zip(&want)
                .map(|(g, w)| (g - w).abs())
                .fold(0f32, f32::max);
            // Only the f32 accumulation order differs from the f64 reference.
            assert!(diff < 1e-4, "({rows}, {n}, {k}): max diff {diff}");
        }
    }

    #[test]
    fn epilogue_applies_activation_then_residual() {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        let (rows, n, k) = (10, 35, 17);
        let (xs, w, b) = operands((rows, n, k), 4);
        let res = random(rows * n, 7);
        let packed = PackedBf16::pack(&w, n, k, Some(b.clone()));
        let epilogue = Epilogue {
            act: Some(Activation::QuickGelu),
            residual: Some(&res),
        };
        let got = matmul(&xs, rows, &packed, epilogue);
        let want = reference(&xs, &w, &b, rows, n, k);
        for ((g, w), r) in got.iter().zip(&want).zip(&res) {
            let w = activation_value(Activation::QuickGelu, *w) + r;
            assert!((g - w).abs() < 1e-4, "got {g}, want {w}");
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_rounding_matches_scalar() {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        let mut src = random(67, 8);
        src[3] = 1.0 + f32::EPSILON * 64.0;
        src[5] = -3.0e-3;
        let (mut fast, mut slow) = (vec![0u32; 34], vec![0u32; 34]);
        // SAFETY: the CPU check above passed.
        unsafe { x86::round_row(&src, &mut fast) };
        round_row_scalar(&src, &mut slow);
        assert_eq!(fast, slow);
    }
}
