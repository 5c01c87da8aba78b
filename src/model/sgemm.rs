//! A CPU GEMM for f32 linear layers, with weights packed once at load.
//!
//! Weights (out × in, as `nn.Linear` stores them) are packed into panels of `nr` output
//! columns, each stored input-feature-major, so one step of the reduction reads `nr`
//! consecutive weights. A register-blocked microkernel keeps an `mr` × `nr` tile of sums in
//! vector registers, broadcasting one activation per row and step. Each call packs the
//! activations too, per block of rows: tiles of `mr` rows in groups of [`GROUP`] reduction
//! steps (see [`pack_rows`]), so one pointer reaches every row of a step at fixed offsets.
//! Read in place, every row cost an address computation per step on the ports the
//! multiply-adds need; with packing the f32 ViT-B/16 encoder ran 4–10 % faster on a 2-core
//! Xeon with AVX-512, in alternating runs of both builds.
//!
//! Rayon spreads blocks of up to [`TASK_ROWS`] × [`TASK_COLS`] outputs over threads: each
//! block of rows is packed once, then its column blocks are tasks. Inside a block the
//! reduction is cut into slices of `kc` input features (24 KiB of one panel): each row tile's
//! activations for a slice stay in L1 while it passes over the block's panels, whose slices
//! stay in L2. While a slice runs, each row tile's kernel asks for its share of the next
//! slice's weights to be brought into L2, a few cache lines per group of steps (software
//! prefetch), so the first tile of a slice does not wait on the shared cache or memory for the
//! whole slice. At batch 1 the weights come from memory: in one process alternating both, the
//! f32 ViT-B/16 encoder ran 13 % faster at batch 1 and 4-5 % at batch 8 and in the rerank; the
//! same prefetches issued in one burst before each tile gained only 4 % at batch 1. Sums
//! wait between slices in the output itself (in a per-task buffer when the block ends in a
//! partial panel); after the last slice the shared epilogue (bias, activation, residual)
//! finishes the block in place: the output is never zero-filled first. The block and slice
//! sizes were the fastest of a sweep at ViT-B shapes (577 rows, 768 to 3072 features) on a
//! 2-core AVX2 machine, and stayed among the fastest on a 2-core Xeon with AVX-512.
//!
//! [`Isa::detect`] picks the microkernel: AVX-512F (12 × 32 tiles) or AVX2 with FMA
//! (6 × 16). On other CPUs nothing here runs and linear layers keep candle's matmul.

#![expect(
    unsafe_code,
    reason = "SIMD intrinsics need target_feature functions and raw-pointer loads"
)]

use rayon::prelude::*;

use super::packed::{Epilogue, SharedOut, Sink, Span};

/// Output rows of one parallel work item (a multiple of every kernel's row count).
const TASK_ROWS: usize = 144;

/// Output columns of one parallel work item (a multiple of every kernel's panel width).
const TASK_COLS: usize = 64;

/// Bytes of one panel's slice of the reduction.
const SLICE_BYTES: usize = 24 * 1024;

/// The instruction sets with an f32 microkernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2 with FMA: 6 × 16 tiles, 12 of the 16 ymm registers holding sums.
    Avx2,
    /// AVX-512F: 12 × 32 tiles, 24 of the 32 zmm registers holding sums.
    Avx512,
}

impl Isa {
    /// The widest microkernel the running CPU supports, or `None` when it has neither
    /// AVX-512F nor AVX2 with FMA (or is not x86-64).
    pub fn detect() -> Option<Self> {
        [Self::Avx512, Self::Avx2]
            .into_iter()
            .find(|isa| isa.supported())
    }

    /// Whether the running CPU has the instructions of this kernel.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Self::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                Self::Avx512 => is_x86_feature_detected!("avx512f"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Rows of a microkernel tile.
    fn mr(self) -> usize {
        match self {
            Self::Avx2 => 6,
            Self::Avx512 => 12,
        }
    }

    /// Columns of a microkernel tile and of a packed panel.
    fn nr(self) -> usize {
        match self {
            Self::Avx2 => 16,
            Self::Avx512 => 32,
        }
    }

    /// Input features per reduction slice.
    fn kc(self) -> usize {
        SLICE_BYTES / (4 * self.nr())
    }
}

/// A weight matrix (out × in, as `nn.Linear` stores it) packed for one [`Isa`]'s kernel,
/// with its optional bias.
#[derive(Debug, Clone)]
pub struct PackedF32 {
    /// Panels of `nr` columns, each `in_dim` × `nr` values (input-feature-major); the last
    /// panel is padded with zero columns.
    panels: Vec<f32>,
    bias: Option<Vec<f32>>,
    out_dim: usize,
    in_dim: usize,
    isa: Isa,
}

impl PackedF32 {
    /// Packs `weight` (row-major `out_dim × in_dim`) for `isa`'s kernel. `bias`, when given,
    /// has `out_dim` entries.
    pub fn pack(
        weight: &[f32],
        out_dim: usize,
        in_dim: usize,
        bias: Option<Vec<f32>>,
        isa: Isa,
    ) -> Self {
        let nr = isa.nr();
        let mut panels = vec![0f32; out_dim.div_ceil(nr) * in_dim * nr];
        for (n, row) in weight.chunks_exact(in_dim.max(1)).enumerate() {
            let (panel, col) = (n / nr, n % nr);
            let dst = &mut panels[panel * in_dim * nr..];
            for (k, &w) in row.iter().enumerate() {
                dst[k * nr + col] = w;
            }
        }
        Self {
            panels,
            bias,
            out_dim,
            in_dim,
            isa,
        }
    }

    /// The weight back in its original row-major `out_dim × in_dim` layout (exact).
    pub fn unpack(&self) -> Vec<f32> {
        let nr = self.isa.nr();
        let mut weight = Vec::with_capacity(self.out_dim * self.in_dim);
        for n in 0..self.out_dim {
            let panel = &self.panels[(n / nr) * self.in_dim * nr..];
            weight.extend((0..self.in_dim).map(|k| panel[k * nr + n % nr]));
        }
        weight
    }

    /// Output features (rows of the original weight).
    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    /// Input features (columns of the original weight).
    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// The bias, if any.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    /// The kernel the weight is packed for.
    pub fn isa(&self) -> Isa {
        self.isa
    }
}

/// Computes `epilogue(xs · Wᵀ + b)` for row-major `xs` (rows × in_dim) into a new row-major
/// (rows × out_dim) vector, on all rayon threads.
///
/// Panics (a caller bug, not input) when `xs` or the residual has the wrong length or the
/// CPU lacks the instructions of the kernel `w` is packed for.
pub fn matmul(xs: &[f32], rows: usize, w: &PackedF32, epilogue: Epilogue) -> Vec<f32> {
    assert!(
        w.isa.supported(),
        "{:?} kernel called on a CPU without it",
        w.isa
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
    // SAFETY: the CPU supports `w.isa` and the lengths are right, both checked above.
    unsafe { matmul_with(xs, rows, w, epilogue, microkernel) }
}

/// [`matmul`] with the microkernel passed in and the lengths already checked.
///
/// # Safety
/// `kernel` may be called for tiles of `w.isa`'s shape (see [`microkernel`]); `xs` holds
/// `rows × w.in_dim` values and the residual, if any, `rows × w.out_dim`.
unsafe fn matmul_with(
    xs: &[f32],
    rows: usize,
    w: &PackedF32,
    epilogue: Epilogue,
    kernel: Kernel,
) -> Vec<f32> {
    let len = rows * w.out_dim;
    let mut out = Vec::with_capacity(len);
    let sink = Sink {
        dst: SharedOut(out.as_mut_ptr()),
        stride: w.out_dim,
        bias: w.bias.as_deref(),
        epilogue,
    };
    let (mr, col_tasks) = (w.isa.mr(), w.out_dim.div_ceil(TASK_COLS));
    let task_rows = task_rows(rows, mr);
    (0..rows.div_ceil(task_rows))
        .into_par_iter()
        .for_each(|row_task| {
            let row0 = row_task * task_rows;
            let block_rows = (rows - row0).min(task_rows);
            let packed = pack_rows(
                &xs[row0 * w.in_dim..][..block_rows * w.in_dim],
                w.in_dim,
                mr,
            );
            (0..col_tasks)
                .into_par_iter()
                .for_each_init(Vec::new, |sums, col_task| {
                    let col0 = col_task * TASK_COLS;
                    let block = Span {
                        row: row0,
                        col: col0,
                        rows: block_rows,
                        cols: (w.out_dim - col0).min(TASK_COLS),
                    };
                    // SAFETY: `kernel` fits `w.isa` (the caller's promise); each task writes only
                    // its own block of the output, which has room for rows × out_dim values and
                    // outlives the loop.
                    unsafe { run_block(&packed, w, &block, &sink, sums, kernel) };
                });
        });
    // SAFETY: the blocks tile the rows × out_dim output and each wrote every value of its
    // block (see `run_block`).
    unsafe { out.set_len(len) };
    out
}

/// Rows per parallel work item: the fewest items of at most [`TASK_ROWS`] rows, made about
/// equal and rounded up to whole tiles of `mr` rows, so that no item is left a sliver of rows
/// that streams a whole block of weights for a few outputs (577 rows, a ViT-B/16 image at
/// 384 px, become four items of 120 and one of 97 rather than four of 144 and one of 1).
fn task_rows(rows: usize, mr: usize) -> usize {
    let tasks = rows.div_ceil(TASK_ROWS).max(1);
    rows.div_ceil(tasks)
        .next_multiple_of(mr)
        .clamp(mr, TASK_ROWS)
}

/// Reduction steps per group of packed activations (see [`pack_rows`]); every slice of the
/// reduction starts at a whole group.
const GROUP: usize = 16;

// Every kernel's slices of the reduction start at whole groups.
const _: () = assert!(
    SLICE_BYTES.is_multiple_of(4 * 32 * GROUP) && SLICE_BYTES.is_multiple_of(4 * 16 * GROUP)
);

/// `xs` (row-major, `in_dim` values per row) packed for the microkernel: tiles of `mr` rows;
/// each tile is groups of [`GROUP`] reduction steps, and each group holds those columns of the
/// tile's rows, one row after another. So a step's activations lie [`GROUP`] values apart
/// from one pointer, and packing is a copy of whole 64-byte pieces of rows. Columns past
/// `in_dim` (to a whole group) and rows past the end of `xs` are zeros.
fn pack_rows(xs: &[f32], in_dim: usize, mr: usize) -> Vec<f32> {
    let tile_len = in_dim.next_multiple_of(GROUP) * mr;
    let rows = xs.len().checked_div(in_dim).unwrap_or(0);
    let mut packed = vec![0f32; rows.div_ceil(mr) * tile_len];
    if tile_len == 0 {
        return packed;
    }
    for (dst, tile) in packed
        .chunks_exact_mut(tile_len)
        .zip(xs.chunks(in_dim * mr))
    {
        for (r, row) in tile.chunks_exact(in_dim).enumerate() {
            // Whole groups as fixed-size arrays, which compile to vector moves rather than a
            // `memcpy` call per 64 bytes.
            let (groups, rest) = row.as_chunks::<GROUP>();
            for (group, piece) in groups.iter().enumerate() {
                let at = (group * mr + r) * GROUP;
                dst[at..][..GROUP].copy_from_slice(piece);
            }
            if !rest.is_empty() {
                let at = (groups.len() * mr + r) * GROUP;
                dst[at..][..rest.len()].copy_from_slice(rest);
            }
        }
    }
    packed
}

/// One microkernel call: `c = (accumulate ? c : 0) + a · b` for an `mr` × `nr` tile, of
/// which only the first `rows` rows are computed and stored.
struct Tile {
    /// `kc` steps of `mr` packed activations, in groups (see [`pack_rows`]).
    a: *const f32,
    /// Rows of the tile that hold input rows (1 to `mr`).
    rows: usize,
    /// `kc` × `nr` packed weights.
    b: *const f32,
    kc: usize,
    /// First sum of the tile: its first `rows` rows of `nr`, `ldc` apart (the rows past
    /// them may lie outside the buffer and are never touched).
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    /// Cache lines ([`LINE`] values each) from here to bring into L2 while the tile runs,
    /// spread over its groups of steps: this tile's share of the next slice's weights. Only
    /// prefetched, never read, so any address is safe.
    ahead: *const f32,
    ahead_lines: usize,
}

/// A microkernel for one [`Isa`]'s tile shape.
type Kernel = unsafe fn(Isa, &Tile);

/// # Safety
/// `kernel` may be called for `w.isa`'s tiles; `xs` holds the block's rows packed by
/// [`pack_rows`] for `w.isa`'s tile rows; `block` lies within the rows × out_dim output behind
/// `sink.dst`, and no other thread writes it.
unsafe fn run_block(
    xs: &[f32],
    w: &PackedF32,
    block: &Span,
    sink: &Sink,
    sums: &mut Vec<f32>,
    kernel: Kernel,
) {
    // SAFETY: forwarded from the caller.
    let dest = unsafe { Sums::for_block(w, block, sink, sums) };
    for p in (0..w.in_dim.max(1)).step_by(w.isa.kc()) {
        // SAFETY: forwarded from the caller; `dest` reaches the block's sums.
        unsafe { run_slice(xs, w, block, &dest, p, kernel) };
    }

    // SAFETY: forwarded from the caller; every value of the block is now written, in the
    // output or in `sums` (the block's rows, `dest.ldc` apart).
    unsafe {
        if !dest.direct {
            sink.store(sums, dest.ldc, block);
        }
        sink.finish(block);
    }
}

/// Where a block's sums accumulate: whole panels straight in the output (the kernel touches
/// only a tile's live rows), a block that ends in a partial panel in a task buffer, copied to
/// the output at the end.
struct Sums {
    /// The block's first sum.
    base: *mut f32,
    /// Values from one row of sums to the next.
    ldc: usize,
    /// Whether `base` points into the output.
    direct: bool,
}

impl Sums {
    /// # Safety
    /// `block` lies within the output behind `sink.dst`.
    unsafe fn for_block(w: &PackedF32, block: &Span, sink: &Sink, sums: &mut Vec<f32>) -> Self {
        let (mr, nr) = (w.isa.mr(), w.isa.nr());
        if block.cols.is_multiple_of(nr) {
            return Self {
                // SAFETY: the block's first value lies in the output (the caller's contract).
                base: unsafe { sink.at(block.row, block.col) },
                ldc: sink.stride,
                direct: true,
            };
        }
        let ldc = block.cols.next_multiple_of(nr);
        sums.resize(block.rows.div_ceil(mr) * mr * ldc, 0.0);
        Self {
            base: sums.as_mut_ptr(),
            ldc,
            direct: false,
        }
    }
}

/// The reduction slice from step `p` for every tile of the block: overwrites the sums at the
/// first slice, adds to them after.
///
/// # Safety
/// As for [`run_block`]; `dest` reaches the block's live rows of sums, whole panels wide.
unsafe fn run_slice(
    xs: &[f32],
    w: &PackedF32,
    block: &Span,
    dest: &Sums,
    p: usize,
    kernel: Kernel,
) {
    let (mr, nr, k, kc_max) = (w.isa.mr(), w.isa.nr(), w.in_dim, w.isa.kc());
    let kc = (k - p.min(k)).min(kc_max);
    let tile_len = k.next_multiple_of(GROUP) * mr;
    let (tiles, panels) = (block.rows.div_ceil(mr), block.cols.div_ceil(nr));
    for i in 0..tiles {
        let a = &xs[i * tile_len + p * mr..][..kc.next_multiple_of(GROUP) * mr];
        for j in 0..panels {
            let panel = &w.panels[(block.col / nr + j) * k * nr + p * nr..][..kc * nr];
            let ahead = share(next_slice(w, block.col / nr + j, p + kc_max), i, tiles);
            let tile = Tile {
                a: a.as_ptr(),
                rows: (block.rows - i * mr).min(mr),
                b: panel.as_ptr(),
                kc,
                // SAFETY: the tile's first live row lies in the block's sums.
                c: unsafe { dest.base.add(i * mr * dest.ldc + j * nr) },
                ldc: dest.ldc,
                accumulate: p > 0,
                ahead: ahead.as_ptr(),
                ahead_lines: ahead.len().div_ceil(LINE),
            };
            // SAFETY: `a` holds kc steps of mr activations (in whole groups) and `b` kc × nr
            // weights; `c` reaches the tile's live rows of nr sums, `ldc` apart, written by
            // the first slice before later ones read them; `kernel` fits `w.isa`.
            unsafe { kernel(w.isa, &tile) };
        }
    }
}

/// f32 values per cache line.
const LINE: usize = 16;

/// Part `part` of `parts` of `values`, cut at cache lines.
fn share(values: &[f32], part: usize, parts: usize) -> &[f32] {
    let lines = values.len().div_ceil(LINE);
    let (from, to) = (lines * part / parts, lines * (part + 1) / parts);
    &values[(from * LINE).min(values.len())..(to * LINE).min(values.len())]
}

/// The packed weights of `panel` for the reduction slice that starts at step `p`, or, past
/// the last step, the first slice of the panel one column block further (the block this
/// thread usually takes next); empty past the last panel.
fn next_slice(w: &PackedF32, panel: usize, p: usize) -> &[f32] {
    let (nr, k, kc) = (w.isa.nr(), w.in_dim, w.isa.kc());
    let (panel, p) = if p < k {
        (panel, p)
    } else {
        (panel + TASK_COLS / nr, 0)
    };
    let start = (panel * k + p) * nr;
    let len = (k - p).min(kc) * nr;
    w.panels.get(start..start + len).unwrap_or(&[])
}

/// Runs `isa`'s microkernel on one tile.
///
/// # Safety
/// The CPU supports `isa`; the tile's pointers reach the values [`Tile`] describes.
unsafe fn microkernel(isa: Isa, tile: &Tile) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: forwarded from the caller.
    unsafe {
        match isa {
            Isa::Avx2 => x86::tile_avx2(tile),
            Isa::Avx512 => x86::tile_avx512(tile),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{isa:?} is never supported off x86-64: {}", tile.kc);
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{Tile, GROUP};

    /// The vector operations the microkernel needs, for one register width.
    trait Lanes {
        /// One register of f32 lanes.
        type V: Copy;
        /// Lanes per register.
        const WIDTH: usize;
        unsafe fn zero() -> Self::V;
        unsafe fn load(p: *const f32) -> Self::V;
        unsafe fn store(p: *mut f32, v: Self::V);
        unsafe fn splat(x: f32) -> Self::V;
        /// `a · b + c`, fused.
        unsafe fn fmadd(a: Self::V, b: Self::V, c: Self::V) -> Self::V;
    }

    /// 256-bit registers (AVX + FMA).
    struct Ymm;

    impl Lanes for Ymm {
        type V = __m256;
        const WIDTH: usize = 8;
        #[inline(always)]
        unsafe fn zero() -> __m256 {
            _mm256_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m256 {
            // SAFETY: the caller passes 8 readable values.
            unsafe { _mm256_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m256) {
            // SAFETY: the caller passes room for 8 values.
            unsafe { _mm256_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m256 {
            _mm256_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m256, b: __m256, c: __m256) -> __m256 {
            _mm256_fmadd_ps(a, b, c)
        }
    }

    /// 512-bit registers (AVX-512F).
    struct Zmm;

    impl Lanes for Zmm {
        type V = __m512;
        const WIDTH: usize = 16;
        #[inline(always)]
        unsafe fn zero() -> __m512 {
            _mm512_setzero_ps()
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> __m512 {
            // SAFETY: the caller passes 16 readable values.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store(p: *mut f32, v: __m512) {
            // SAFETY: the caller passes room for 16 values.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        #[inline(always)]
        unsafe fn splat(x: f32) -> __m512 {
            _mm512_set1_ps(x)
        }
        #[inline(always)]
        unsafe fn fmadd(a: __m512, b: __m512, c: __m512) -> __m512 {
            _mm512_fmadd_ps(a, b, c)
        }
    }

    /// Registers of `W` lanes emulated with plain arrays, so that tests run either tile
    /// shape through the shared loop on any x86-64 CPU.
    #[cfg(test)]
    struct Emulated<const W: usize>;

    #[cfg(test)]
    impl<const W: usize> Lanes for Emulated<W> {
        type V = [f32; W];
        const WIDTH: usize = W;
        unsafe fn zero() -> [f32; W] {
            [0.0; W]
        }
        unsafe fn load(p: *const f32) -> [f32; W] {
            // SAFETY: the caller passes W readable values.
            unsafe { p.cast::<[f32; W]>().read_unaligned() }
        }
        unsafe fn store(p: *mut f32, v: [f32; W]) {
            // SAFETY: the caller passes room for W values.
            unsafe { p.cast::<[f32; W]>().write_unaligned(v) }
        }
        unsafe fn splat(x: f32) -> [f32; W] {
            [x; W]
        }
        unsafe fn fmadd(a: [f32; W], b: [f32; W], c: [f32; W]) -> [f32; W] {
            std::array::from_fn(|i| a[i].mul_add(b[i], c[i]))
        }
    }

    /// Calls `$tile::<$lanes, $mr, R, 2>(t)` for the tile's live row count `R`.
    macro_rules! by_rows {
        ($t:expr, $lanes:ty, $mr:literal, [$($r:literal)*]) => {
            match $t.rows {
                $($r => tile::<$lanes, $mr, $r, 2>($t),)*
                _ => tile::<$lanes, $mr, $mr, 2>($t),
            }
        };
    }

    /// `isa`'s tile shape with emulated registers: the same loop as the real kernel.
    ///
    /// # Safety
    /// The tile's pointers reach what `isa`'s kernel would read and write.
    #[cfg(test)]
    pub(super) unsafe fn tile_emulated(isa: super::Isa, t: &Tile) {
        // SAFETY: forwarded from the caller.
        unsafe {
            match isa {
                super::Isa::Avx2 => by_rows!(t, Emulated<8>, 6, [1 2 3 4 5]),
                super::Isa::Avx512 => by_rows!(t, Emulated<16>, 12, [1 2 3 4 5 6 7 8 9 10 11]),
            }
        }
    }

    /// The 6 × 16 AVX2 tile.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; the tile's pointers reach `kc` steps of 6 values of `a` (in
    /// whole groups), `kc` × 16 of `b` and the tile's live rows of 16 sums.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn tile_avx2(t: &Tile) {
        // SAFETY: forwarded from the caller.
        unsafe { by_rows!(t, Ymm, 6, [1 2 3 4 5]) }
    }

    /// The 12 × 32 AVX-512 tile.
    ///
    /// # Safety
    /// The CPU has AVX-512F; the tile's pointers reach `kc` steps of 12 values of `a` (in whole
    /// groups), `kc` × 32 of `b` and the tile's live rows of 32 sums.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn tile_avx512(t: &Tile) {
        // SAFETY: forwarded from the caller.
        unsafe { by_rows!(t, Zmm, 12, [1 2 3 4 5 6 7 8 9 10 11]) }
    }

    /// `ROWS` × `NV` registers of sums over `t.kc` steps, each step one broadcast per row and
    /// one fused multiply-add per register, for the first `ROWS` rows of a tile of `MR`: a
    /// partial last tile of rows (one row while decoding) costs only its own rows.
    ///
    /// # Safety
    /// As the callers above, for `MR` rows of activations, `ROWS` rows of sums and
    /// `NV · L::WIDTH` columns.
    #[inline(always)]
    unsafe fn tile<L: Lanes, const MR: usize, const ROWS: usize, const NV: usize>(t: &Tile) {
        let width = NV * L::WIDTH;
        // SAFETY (whole body): every offset stays within what the caller guarantees.
        unsafe {
            let mut acc = [[L::zero(); NV]; ROWS];
            if t.accumulate {
                for (r, row) in acc.iter_mut().enumerate() {
                    for (v, sum) in row.iter_mut().enumerate() {
                        *sum = L::load(t.c.add(r * t.ldc + v * L::WIDTH));
                    }
                }
            }
            let (mut group, mut b) = (t.a, t.b);
            let per_group = t.ahead_lines.div_ceil(t.kc.div_ceil(GROUP).max(1));
            let (mut ahead, mut left) = (t.ahead, t.ahead_lines);
            for first in (0..t.kc).step_by(GROUP) {
                for _ in 0..per_group.min(left) {
                    _mm_prefetch::<_MM_HINT_T1>(ahead.cast());
                    ahead = ahead.wrapping_add(super::LINE);
                    left -= 1;
                }
                let mut a = group;
                for _ in first..(first + GROUP).min(t.kc) {
                    let mut w = [L::zero(); NV];
                    for (v, w) in w.iter_mut().enumerate() {
                        *w = L::load(b.add(v * L::WIDTH));
                    }
                    for (r, row) in acc.iter_mut().enumerate() {
                        let x = L::splat(*a.add(r * GROUP));
                        for (sum, w) in row.iter_mut().zip(&w) {
                            *sum = L::fmadd(x, *w, *sum);
                        }
                    }
                    a = a.add(1);
                    b = b.add(width);
                }
                group = group.add(MR * GROUP);
            }
            for (r, row) in acc.iter().enumerate() {
                for (v, sum) in row.iter().enumerate() {
                    L::store(t.c.add(r * t.ldc + v * L::WIDTH), *sum);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::Activation;
    use crate::model::nn::activation_value;

    use crate::model::packed::testing::{max_diff, operands, random};

    /// `x·Wᵀ + b` accumulated in f64.
    fn reference(xs: &[f32], w: &[f32], b: &[f32], rows: usize, n: usize, k: usize) -> Vec<f32> {
        crate::model::packed::testing::reference(xs, w, b, (rows, n, k), |x| x)
    }

    #[test]
    fn prefetch_shares_cover_the_next_slice_once() {
        for (len, parts) in [(0, 3), (5, 1), (16, 10), (40, 12), (6144, 10), (6150, 7)] {
            let values: Vec<f32> = (0..len).map(|i| i as f32).collect();
            let joined: Vec<f32> = (0..parts)
                .flat_map(|part| share(&values, part, parts).to_vec())
                .collect();
            assert_eq!(joined, values, "{len} values in {parts} parts");
        }
    }

    #[test]
    fn next_slice_follows_the_reduction_then_the_next_column_block() {
        for isa in [Isa::Avx2, Isa::Avx512] {
            let (nr, kc) = (isa.nr(), isa.kc());
            let (out, k) = (TASK_COLS + nr + 3, 2 * kc + 5);
            let weight: Vec<f32> = (0..out * k).map(|i| i as f32).collect();
            let w = PackedF32::pack(&weight, out, k, None, isa);
            let at = |panel: usize, p: usize, steps: usize| {
                &w.panels[(panel * k + p) * nr..][..steps * nr]
            };

            assert_eq!(next_slice(&w, 1, kc), at(1, kc, kc));
            assert_eq!(next_slice(&w, 1, 2 * kc), at(1, 2 * kc, 5));
            let next_block = TASK_COLS / nr;
            assert_eq!(next_slice(&w, 1, 3 * kc), at(1 + next_block, 0, kc));
            let last = out.div_ceil(nr) - 1;
            assert!(next_slice(&w, last, 3 * kc).is_empty(), "{isa:?}");
        }
    }

    fn supported() -> Vec<Isa> {
        let isas: Vec<Isa> = [Isa::Avx2, Isa::Avx512]
            .into_iter()
            .filter(|isa| isa.supported())
            .collect();
        if isas.is_empty() {
            eprintln!("skipped: this CPU has neither AVX2 with FMA nor AVX-512F");
        }
        isas
    }

    #[test]
    fn matches_f64_reference_on_odd_shapes() {
        for isa in supported() {
            for (rows, n, k) in [
                (1, 1, 1),
                (5, 17, 3),
                (7, 33, 19),
                (13, 70, 37),
                (41, 129, 130),
                (49, 31, 300),
                (50, 160, 513),
                (2, 40, 1100),
            ] {
                let (xs, w, b) = operands((rows, n, k), 1);
                let packed = PackedF32::pack(&w, n, k, Some(b.clone()), isa);
                let got = matmul(&xs, rows, &packed, Epilogue::default());
                let want = reference(&xs, &w, &b, rows, n, k);
                // Only the f32 accumulation order differs from the f64 reference.
                let tol = 1e-6 * k as f32;
                let diff = max_diff(&got, &want);
                assert!(diff < tol, "{isa:?} ({rows}, {n}, {k}): max diff {diff}");
            }
        }
    }

    /// Both tile shapes through the blocking, slicing and epilogue, with registers
    /// emulated, so the AVX-512 layout is checked on CPUs without AVX-512 too.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn both_tile_shapes_match_the_reference_with_emulated_registers() {
        for isa in [Isa::Avx2, Isa::Avx512] {
            for (rows, n, k) in [(1, 1, 1), (13, 70, 37), (29, 161, 900), (150, 96, 513)] {
                let (xs, w, b) = operands((rows, n, k), 12);
                let packed = PackedF32::pack(&w, n, k, Some(b.clone()), isa);
                // SAFETY: the emulated kernel needs no CPU feature and reads what the real
                // one for `isa` would.
                let got = unsafe {
                    matmul_with(&xs, rows, &packed, Epilogue::default(), x86::tile_emulated)
                };
                let want = reference(&xs, &w, &b, rows, n, k);
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-6 * k as f32, "{isa:?} ({rows}, {n}, {k}): {diff}");
            }
        }
    }

    #[test]
    fn no_bias_and_empty_reduction() {
        for isa in supported() {
            let (rows, n, k) = (9, 20, 5);
            let (xs, w) = (random(rows * k, 4), random(n * k, 5));
            let packed = PackedF32::pack(&w, n, k, None, isa);
            let got = matmul(&xs, rows, &packed, Epilogue::default());
            let want = reference(&xs, &w, &[0.0; 20], rows, n, k);
            assert!(max_diff(&got, &want) < 1e-5, "{isa:?}");

            let b = random(n, 6);
            let packed = PackedF32::pack(&[], n, 0, Some(b.clone()), isa);
            let got = matmul(&[], 3, &packed, Epilogue::default());
            assert_eq!(got, [b.clone(), b.clone(), b].concat(), "{isa:?}");
        }
    }

    #[test]
    fn epilogue_applies_activation_then_residual() {
        for isa in supported() {
            let (rows, n, k) = (53, 135, 300);
            let (xs, w, b) = operands((rows, n, k), 7);
            let res = random(rows * n, 10);
            let packed = PackedF32::pack(&w, n, k, Some(b.clone()), isa);
            for act in [Activation::QuickGelu, Activation::Gelu] {
                let epilogue = Epilogue {
                    act: Some(act),
                    residual: Some(&res),
                };
                let got = matmul(&xs, rows, &packed, epilogue);
                let want: Vec<f32> = reference(&xs, &w, &b, rows, n, k)
                    .iter()
                    .zip(&res)
                    .map(|(y, r)| activation_value(act, *y) + r)
                    .collect();
                let diff = max_diff(&got, &want);
                assert!(diff < 1e-4, "{isa:?} {act:?}: max diff {diff}");
            }
        }
    }

    #[test]
    fn rows_split_into_the_fewest_even_tasks_of_whole_tiles() {
        for mr in [6, 12] {
            for rows in 1..3000 {
                let per_task = task_rows(rows, mr);
                assert!(
                    per_task.is_multiple_of(mr) && per_task <= TASK_ROWS,
                    "{rows}, {mr}"
                );
                let tasks = rows.div_ceil(per_task);
                assert_eq!(
                    tasks,
                    rows.div_ceil(TASK_ROWS),
                    "{rows} rows, {mr}-row tiles"
                );
                assert!(rows > (tasks - 1) * per_task, "the last task has rows");
            }
        }
        assert_eq!(task_rows(577, 12), 120);
    }

    #[test]
    fn packed_rows_hold_groups_of_columns_row_after_row_with_zeros_past_the_end() {
        for (rows, in_dim, mr) in [
            (1, 1, 12),
            (13, 70, 12),
            (5, 130, 6),
            (24, 64, 12),
            (0, 5, 6),
        ] {
            let xs = random(rows * in_dim, 3);
            let packed = pack_rows(&xs, in_dim, mr);
            let tile_len = in_dim.next_multiple_of(GROUP) * mr;
            assert_eq!(packed.len(), rows.div_ceil(mr) * tile_len);
            for (i, got) in packed.iter().enumerate() {
                let (tile, at) = (i / tile_len, i % tile_len);
                let (group, r, step) = (at / (mr * GROUP), at / GROUP % mr, at % GROUP);
                let (row, col) = (tile * mr + r, group * GROUP + step);
                let want = if row < rows && col < in_dim {
                    xs[row * in_dim + col]
                } else {
                    0.0
                };
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "({rows}, {in_dim}, {mr}) at {i}"
                );
            }
        }
    }

    #[test]
    fn unpack_restores_the_weight() {
        for isa in [Isa::Avx2, Isa::Avx512] {
            let w = random(37 * 11, 11);
            let packed = PackedF32::pack(&w, 37, 11, None, isa);
            assert_eq!(packed.unpack(), w, "{isa:?}");
        }
    }
}
