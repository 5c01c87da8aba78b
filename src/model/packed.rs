//! What the packed-weight GEMMs ([`super::bf16`] and [`super::sgemm`]) share: the epilogue
//! that turns a finished tile of `x·Wᵀ` into output values, and the pointer through which
//! parallel tasks write their disjoint blocks of the output.

#![expect(
    unsafe_code,
    reason = "parallel tasks write disjoint blocks of one output through a raw pointer"
)]

use super::config::Activation;

/// What happens to each output tile after the matmul: `act(x·Wᵀ + bias) + residual`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// Activation applied after the bias, if any.
    pub act: Option<Activation>,
    /// Row-major (rows × out_dim) values added last, if any.
    pub residual: Option<&'a [f32]>,
}

/// The output pointer, shared by tasks that write disjoint blocks.
pub(crate) struct SharedOut(pub(crate) *mut f32);

// SAFETY: tasks write disjoint blocks through the pointer; every user documents its split.
unsafe impl Sync for SharedOut {}

/// Where a computed tile goes in the output: `rows` × `cols` values from (`row`, `col`).
pub(crate) struct Span {
    pub(crate) row: usize,
    pub(crate) col: usize,
    pub(crate) rows: usize,
    pub(crate) cols: usize,
}

/// The destination of finished tiles: a row-major output, the layer's bias and the call's
/// epilogue.
pub(crate) struct Sink<'a> {
    pub(crate) dst: SharedOut,
    /// Values from the start of one output row to the next (the output's width when it is a
    /// whole matrix; wider when it is a column block of a larger one). A residual is read
    /// with the same layout.
    pub(crate) stride: usize,
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) epilogue: Epilogue<'a>,
}

impl Sink<'_> {
    /// Writes `act(tile + bias) + residual` for `span`, reading the tile row-major with
    /// `stride` values per row: [`Self::store`], then [`Self::finish`] in place.
    ///
    /// # Safety
    /// `span` lies within the output behind `dst`, which no other thread writes there.
    pub(crate) unsafe fn write(&self, tile: &[f32], stride: usize, span: &Span) {
        // SAFETY: forwarded from the caller.
        unsafe {
            self.store(tile, stride, span);
            self.finish(span);
        }
    }

    /// Copies `span` from the tile (row-major, `stride` values per row) to the output as it
    /// is, for [`Self::finish`] to complete.
    ///
    /// # Safety
    /// As for [`Self::write`].
    pub(crate) unsafe fn store(&self, tile: &[f32], stride: usize, span: &Span) {
        for r in 0..span.rows {
            let src = &tile[r * stride..][..span.cols];
            // SAFETY: the row's `cols` values from `at` are inside the output and owned by
            // this task (the caller's contract).
            unsafe {
                let dst = self.at(span.row + r, span.col);
                std::ptr::copy_nonoverlapping(src.as_ptr(), dst, span.cols);
            }
        }
    }

    /// Where output value (`row`, `col`) lives; the rows that follow are [`Self::stride`]
    /// values apart.
    ///
    /// # Safety
    /// (`row`, `col`) lies within the output behind `dst`.
    pub(crate) unsafe fn at(&self, row: usize, col: usize) -> *mut f32 {
        // SAFETY: in bounds (the caller's contract).
        unsafe { self.dst.0.add(row * self.stride + col) }
    }

    /// Applies the bias, activation and residual in place to `span` of the output, whose
    /// values the task has already written (by [`Self::store`] or directly through
    /// [`Self::at`]). Does nothing without a bias, activation or residual.
    ///
    /// # Safety
    /// As for [`Self::write`], and every value of `span` is initialised.
    pub(crate) unsafe fn finish(&self, span: &Span) {
        let Epilogue { act, residual } = self.epilogue;
        if self.bias.is_none() && act.is_none() && residual.is_none() {
            return;
        }
        for r in 0..span.rows {
            let at = (span.row + r) * self.stride + span.col;
            // SAFETY: the row's `cols` values from `at` are inside the output, owned by this
            // task and initialised (the caller's contract).
            let out = unsafe { std::slice::from_raw_parts_mut(self.dst.0.add(at), span.cols) };
            let bias = self.bias.map(|b| &b[span.col..][..span.cols]);
            let residual = residual.map(|r| &r[at..][..span.cols]);
            super::vmath::finish(out, bias, act, residual);
        }
    }
}

/// Helpers shared by the tests of both kernels.
#[cfg(test)]
pub(crate) mod testing {
    /// `round(x)·round(W)ᵀ + b` accumulated in f64, for row-major `xs` (rows × k) and `w`
    /// (n × k); `round` models the kernel's operand precision.
    pub(crate) fn reference(
        xs: &[f32],
        w: &[f32],
        b: &[f32],
        (rows, n, k): (usize, usize, usize),
        round: impl Fn(f32) -> f32,
    ) -> Vec<f32> {
        let mut out = vec![0f32; rows * n];
        for i in 0..rows {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|p| round(xs[i * k + p]) as f64 * round(w[j * k + p]) as f64)
                    .sum();
                out[i * n + j] = (dot + b[j] as f64) as f32;
            }
        }
        out
    }

    /// Input (rows × k), weight (n × k) and bias (n) of a linear layer, drawn by [`random`]
    /// with seeds `seed`, `seed + 1` and `seed + 2`.
    pub(crate) fn operands(
        (rows, n, k): (usize, usize, usize),
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
        (
            random(rows * k, seed),
            random(n * k, seed + 1),
            random(n, seed + 2),
        )
    }

    /// Largest absolute difference between two equally long slices: zero where they are equal
    /// (infinities included) or both NaN, infinite where only one is NaN.
    pub(crate) fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(a, b)| match (a.is_nan(), b.is_nan()) {
                (true, true) => 0.0,
                (false, false) if a == b => 0.0,
                (false, false) => (a - b).abs(),
                _ => f32::INFINITY,
            })
            .fold(0f32, f32::max)
    }

    /// `len` values uniform in [-1, 1) from a generator seeded with `seed`.
    pub(crate) fn random(len: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..len).map(|_| rng.gen_range(-1.0f32..1.0)).collect()
    }
}
