//! A CPU GEMM with bf16 weights, bf16-rounded activations and f32 accumulation, on the
//! AMX tile unit where the CPU has it, otherwise on the AVX512-BF16 dot-product instruction
//! (`vdpbf16ps`).
//!
//! Weights are rounded to bf16 once and packed into panels of [`NR`] output columns, with
//! each pair of adjacent input features stored side by side, the layout the instruction
//! consumes. Activations arrive in f32 and are rounded to bf16 (nearest even) per call.
//! A register-blocked microkernel computes [`MR`] × [`NR`] output tiles over the whole
//! reduction; rayon spreads tiles over threads. Bias, activation and a residual are applied
//! to each tile while it is still in cache (on the tile unit, once per work item, see below).
//!
//! With AMX (AMX-TILE and AMX-BF16, and a Linux kernel that grants the process the tile
//! state), layers whose input width is a multiple of 32 run on the tile unit instead: the
//! packed panels are already the layout `tdpbf16ps` reads (pairs of inputs side by side per
//! column), so the same weights serve both kernels. One block is 32 rows × [`NR`] columns in
//! four accumulator tiles, fed by two activation tiles and two weight tiles per 32 inputs,
//! stored straight into the output (through a buffer at a partial edge); bias, activation
//! and residual are applied in place once the work item's block is complete, over rows of its
//! full width. Run per 32 × 32 block right after the stores, the epilogue waited on them and
//! paid a call per 32 values: it took 19 % of a profile of the bf16 rerank of 16 candidates,
//! against 30 % for the tile products, and the rerank ran 17 % faster once per work item. The
//! tile unit does 16 times the multiply-adds per cycle of `vdpbf16ps`; on CPUs that have both,
//! `vdpbf16ps` is no faster than f32 FMAs, so AMX is what makes bf16 pay. While the first four
//! row blocks of a panel run, each step prefetches a share of the next panel into L2: in one
//! process alternating both, the bf16 vision encoder ran about 5 % faster at batch 1, 1–7 %
//! at batch 8, and the rerank no differently.
//!
//! [`attend_head`] runs both products of one attention head on the same drivers: the scaled
//! queries and the probabilities are rounded like activations, the keys and the values are
//! packed per head like weight panels (keys as the rows of a weight, values as its columns),
//! and both reductions are padded with zeros to whole tile steps.
//!
//! [`available`] says whether the running CPU has the instructions; nothing here may be
//! called when it does not (the callers check once at model load).

#![expect(
    unsafe_code,
    reason = "AVX-512 intrinsics need target_feature functions and raw-pointer loads; AMX \
              needs inline assembly and a system call"
)]

use rayon::prelude::*;

use super::packed::{Epilogue, SharedOut, Sink, Span};

/// Output columns per packed panel and microkernel tile: two 16-lane vectors.
pub const NR: usize = 32;

/// Output rows per microkernel tile.
pub const MR: usize = 8;

/// Rows of one parallel work item (a multiple of [`MR`]).
const TASK_ROWS: usize = 4 * MR;

const _: () = assert!(amx::TASK_ROWS.is_multiple_of(amx::ROWS) && amx::ROWS.is_multiple_of(MR));

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
                panels[at] = to_bf16(w);
            }
        }
        Self {
            panels,
            bias,
            out_dim,
            in_dim,
        }
    }

    /// A 0 × 0 weight, to be repacked.
    fn empty() -> Self {
        Self {
            panels: Vec::new(),
            bias: None,
            out_dim: 0,
            in_dim: 0,
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
/// Panics (a caller bug, not input) when `xs` or the residual has the wrong length, the
/// weight has no inputs or [`available`] is false.
pub fn matmul(xs: &[f32], rows: usize, w: &PackedBf16, epilogue: Epilogue) -> Vec<f32> {
    assert!(
        available(),
        "bf16 kernels called on a CPU without avx512_bf16"
    );
    assert!(w.in_dim > 0, "a bf16 weight needs at least one input");
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
    // SAFETY: the CPU has the instructions of both drivers (checked above); `driver_for` picks
    // the tile unit only where it is usable for `w`; the lengths were checked above.
    unsafe { matmul_with(xs, rows, w, epilogue, driver_for(w)) }
}

/// [`matmul`] on `driver`, the lengths already checked. The output is not zero-filled first:
/// the blocks tile it and every driver writes each value of its block.
///
/// # Safety
/// `driver` may run on this CPU for `w`; `xs` holds rows × in_dim values and the residual,
/// if any, rows × out_dim.
unsafe fn matmul_with(
    xs: &[f32],
    rows: usize,
    w: &PackedBf16,
    epilogue: Epilogue,
    driver: Driver,
) -> Vec<f32> {
    let a = round_rows(xs, rows, w.in_dim);
    let len = rows * w.out_dim;
    let mut out = Vec::with_capacity(len);
    let (task_rows, task_cols) = driver.task;
    let col_tasks = w.out_dim.div_ceil(task_cols);
    let sink = Sink {
        dst: SharedOut(out.as_mut_ptr()),
        stride: w.out_dim,
        bias: w.bias.as_deref(),
        epilogue,
    };
    let tasks = rows.div_ceil(task_rows) * col_tasks;
    (0..tasks).into_par_iter().for_each(|task| {
        let (row0, col0) = (
            (task / col_tasks) * task_rows,
            (task % col_tasks) * task_cols,
        );
        let block = Block {
            rows: row0..(row0 + task_rows).min(rows),
            cols: col0..(col0 + task_cols).min(w.out_dim),
        };
        // SAFETY: the caller vouches for the driver; each task writes only its own rows ×
        // columns block of `out`, which has room for rows × out_dim values and outlives the
        // parallel loop.
        unsafe { (driver.run)(&a, w, &block, &sink) };
    });
    // SAFETY: the blocks tile the rows × out_dim output and the driver wrote every value of
    // each block (see `Driver::run`).
    unsafe { out.set_len(len) };
    out
}

/// Decides once per process whether the AMX tile unit can be used, asking the kernel for the
/// tile state if the CPU has AMX, and logs the outcome (`info` when it is used, `warn` with
/// the error when the kernel refuses). Later calls do nothing. Call it at model load, before
/// other threads start: the kernel refuses the request (`ENOSPC`) while any thread's
/// alternate signal stack is too small for the tile state, and a seccomp filter that kills
/// on `arch_prctl` would end the process here rather than mid-request.
pub fn prepare_tile_unit() {
    amx::usable();
}

/// Whether the bf16 kernels ([`matmul`], [`attend_head`]) run `w` on the AMX tile unit: the
/// CPU and kernel allow it and the input width is a whole number of 32-input tile steps. The
/// first call in a process makes the decision of [`prepare_tile_unit`] if nothing made it yet.
pub fn uses_amx(w: &PackedBf16) -> bool {
    w.in_dim.is_multiple_of(amx::INPUTS) && amx::usable()
}

/// One parallel work item: the output rows and columns it computes, starting on a multiple
/// of its kernel's tile rows and of [`NR`].
struct Block {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
}

/// The bits of `v` rounded to bf16 (nearest even), as the AVX512-BF16 conversions give them:
/// subnormal inputs become zero of the same sign (the instructions treat them as zero
/// whatever the floating-point control register says).
fn to_bf16(v: f32) -> u16 {
    let v = if v.is_subnormal() {
        0f32.copysign(v)
    } else {
        v
    };
    half::bf16::from_f32(v).to_bits()
}

/// Rounds row-major f32 rows to bf16 pairs: one u32 per input pair (first value in the low
/// half), rows padded with zeros to a multiple of [`amx::ROWS`] (itself a multiple of
/// [`MR`]) and an odd width padded by one.
fn round_rows(xs: &[f32], rows: usize, in_dim: usize) -> Vec<u32> {
    let pairs = in_dim.div_ceil(2);
    let padded = rows.div_ceil(amx::ROWS) * amx::ROWS;
    let mut a = vec![0u32; padded * pairs];
    a.par_chunks_mut(pairs)
        .zip(xs.par_chunks(in_dim))
        .for_each(|(dst, src)| round_row(src, 1.0, dst));
    a
}

/// Rounds `scale · src` to bf16 pairs into the first `src.len().div_ceil(2)` values of `dst`,
/// with AVX512-BF16 where [`available`], otherwise in scalar code (same bits).
fn round_row(src: &[f32], scale: f32, dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if available() {
        // SAFETY: the CPU has the instructions, checked just above.
        return unsafe { x86::round_row(src, scale, dst) };
    }
    round_row_scalar(src, scale, dst);
}

/// Scalar rounding of `scale · src` to bf16 pairs (round to nearest even).
fn round_row_scalar(src: &[f32], scale: f32, dst: &mut [u32]) {
    let round = |v: f32| to_bf16(v * scale) as u32;
    for (d, pair) in dst.iter_mut().zip(src.chunks(2)) {
        *d = round(pair[0]) | (pair.get(1).map_or(0, |&v| round(v)) << 16);
    }
}

/// # Safety
/// The CPU has the features [`available`] checks; `block` lies within the matrix that
/// `sink.dst` points to (rows × out_dim) and no other thread writes it.
unsafe fn run_block(a: &[u32], w: &PackedBf16, block: &Block, sink: &Sink) {
    let pairs = w.pairs();
    let (row_end, col_end) = (block.rows.end, block.cols.end);
    let mut tile = [0f32; MR * NR];
    for col in block.cols.clone().step_by(NR) {
        let panel = &w.panels[(col / NR) * pairs * NR * 2..][..pairs * NR * 2];
        for row in block.rows.clone().step_by(MR) {
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

/// A row-major f32 operand read in place: `rows` rows of `cols` values, row `i` starting at
/// `data[i * stride]`. Indexing outside `data` panics.
#[derive(Debug, Clone, Copy)]
pub struct Rows<'a> {
    /// The first value of the first row.
    pub data: &'a [f32],
    /// Row count.
    pub rows: usize,
    /// Values per row.
    pub cols: usize,
    /// Values from the start of one row to the next (at least `cols`).
    pub stride: usize,
}

impl<'a> Rows<'a> {
    fn row(&self, i: usize) -> &'a [f32] {
        &self.data[i * self.stride..][..self.cols]
    }
}

impl PackedBf16 {
    /// Repacks in place as the weight whose rows are `src`'s rows: `src.rows` outputs,
    /// `in_dim` (at least `src.cols`) inputs with the missing ones zero, no bias. Reuses the
    /// allocation. The result equals [`Self::pack`] of the same matrix.
    fn repack_rows(&mut self, src: Rows, in_dim: usize) {
        assert!(in_dim >= src.cols, "in_dim must cover the source columns");
        self.reset(src.rows, in_dim);
        let pairs = self.pairs();
        let mut row = vec![0u32; src.cols.div_ceil(2)];
        for n in 0..src.rows {
            round_row(src.row(n), 1.0, &mut row);
            let first = (n / NR) * pairs * NR + n % NR;
            for (p, &pair) in row.iter().enumerate() {
                let at = 2 * (first + p * NR);
                self.panels[at] = pair as u16;
                self.panels[at + 1] = (pair >> 16) as u16;
            }
        }
    }

    /// Repacks in place as the weight whose rows are `src`'s columns: `src.cols` outputs,
    /// `in_dim` (at least `src.rows`) inputs with the missing ones zero, no bias. Reuses the
    /// allocation. The result equals [`Self::pack`] of the transposed matrix.
    fn repack_columns(&mut self, src: Rows, in_dim: usize) {
        assert!(in_dim >= src.rows, "in_dim must cover the source rows");
        self.reset(src.cols, in_dim);
        let pairs = self.pairs();
        for p in 0..src.rows.div_ceil(2) {
            let first = src.row(2 * p);
            let second = (2 * p + 1 < src.rows).then(|| src.row(2 * p + 1));
            for panel in 0..src.cols.div_ceil(NR) {
                let cols = panel * NR..((panel + 1) * NR).min(src.cols);
                let dst = &mut self.panels[(panel * pairs + p) * NR * 2..][..NR * 2];
                interleave(&first[cols.clone()], second.map(|s| &s[cols]), dst);
            }
        }
    }

    /// Zeroes the panels for an `out_dim` × `in_dim` weight without a bias.
    fn reset(&mut self, out_dim: usize, in_dim: usize) {
        (self.out_dim, self.in_dim, self.bias) = (out_dim, in_dim, None);
        let len = out_dim.div_ceil(NR) * self.pairs() * NR * 2;
        self.panels.clear();
        self.panels.resize(len, 0);
    }
}

/// Writes `first[c]` and `second[c]` (zero without a second row), rounded to bf16, side by
/// side for every column `c`: the pair layout of one panel row. Full panels of two rows take
/// the AVX512-BF16 path where [`available`].
fn interleave(first: &[f32], second: Option<&[f32]>, dst: &mut [u16]) {
    #[cfg(target_arch = "x86_64")]
    if let Some(second) = second.filter(|_| first.len() == NR && available()) {
        // SAFETY: the CPU has the instructions; both rows hold NR values and `dst` 2·NR.
        return unsafe { x86::interleave(first, second, dst) };
    }
    for (c, &v) in first.iter().enumerate() {
        dst[2 * c] = to_bf16(v);
        dst[2 * c + 1] = second.map_or(0, |s| to_bf16(s[c]));
    }
}

/// Rounds the rows of `src` times `scale` to bf16 pairs in `dst`: `pairs` per row (at least
/// `src.cols.div_ceil(2)`; the rest zero), rows padded with zeros to a multiple of
/// [`amx::ROWS`], the layout [`matmul`]'s kernels read activations in.
fn round_into(src: Rows, scale: f32, pairs: usize, dst: &mut Vec<u32>) {
    let used = src.cols.div_ceil(2);
    assert!(pairs >= used, "pairs must cover the source columns");
    dst.resize(src.rows.next_multiple_of(amx::ROWS) * pairs, 0);
    let (rows, padding) = dst.split_at_mut(src.rows * pairs);
    for (i, row) in rows.chunks_exact_mut(pairs).enumerate() {
        round_row(src.row(i), scale, row);
        row[used..].fill(0);
    }
    padding.fill(0);
}

/// A block driver, [`run_block`] (vdpbf16ps) or `amx::run_block` (tile unit), with the size
/// of the parallel work items [`matmul`] gives it.
#[derive(Clone, Copy)]
struct Driver {
    /// Computes one block and hands every value of it to the sink. Its safety contract: the
    /// CPU has the driver's instructions (for the tile unit also `w.in_dim` a multiple of 32
    /// and the tile state granted: see [`uses_amx`]); `a` holds the block's rows rounded to
    /// `w.pairs()` pairs each, padded to whole tiles of rows; the block lies within the
    /// output behind the sink, which no other thread writes there.
    run: unsafe fn(&[u32], &PackedBf16, &Block, &Sink),
    /// Rows and columns of one work item.
    task: (usize, usize),
}

/// The driver for `w` on this CPU: the tile unit where [`uses_amx`] allows, else vdpbf16ps.
fn driver_for(w: &PackedBf16) -> Driver {
    if uses_amx(w) {
        Driver {
            run: amx::run_block,
            task: (amx::TASK_ROWS, amx::TASK_COLS),
        }
    } else {
        Driver {
            run: run_block,
            task: (TASK_ROWS, TASK_COLS),
        }
    }
}

/// `out = a · wᵀ` on the calling thread for `rows` activation rows rounded by
/// [`round_into`] with `w.pairs()` pairs per row; `out` is row-major, `w.out_dim()` wide.
///
/// # Safety
/// `driver` may run on this CPU for `w` (see [`driver_for`]).
unsafe fn product(a: &[u32], rows: usize, w: &PackedBf16, out: &mut [f32], driver: Driver) {
    assert!(a.len() >= rows.next_multiple_of(amx::ROWS) * w.pairs());
    assert!(out.len() >= rows * w.out_dim);
    let sink = Sink {
        dst: SharedOut(out.as_mut_ptr()),
        stride: w.out_dim,
        bias: None,
        epilogue: Epilogue::default(),
    };
    let block = Block {
        rows: 0..rows,
        cols: 0..w.out_dim,
    };
    // SAFETY: `a` holds the padded rows the drivers read and `out` the block they write,
    // which only this call holds; the caller vouches for the driver.
    unsafe { (driver.run)(a, w, &block, &sink) }
}

/// The keys and values of one attention head, rounded to bf16 and packed for
/// [`attend_head`]: keys as the rows of a weight, values as its columns, both reductions
/// padded with zeros to whole tile steps. Heads whose keys and values serve several query
/// sets (one image against many texts) are packed once and shared.
#[derive(Debug, Clone)]
pub struct PackedHead {
    keys: PackedBf16,
    values: PackedBf16,
}

impl Default for PackedHead {
    fn default() -> Self {
        Self {
            keys: PackedBf16::empty(),
            values: PackedBf16::empty(),
        }
    }
}

impl PackedHead {
    /// Packs keys `k` and values `v` (Lk × d each), reusing the allocation.
    ///
    /// Panics (a caller bug) when the shapes disagree or are empty.
    pub fn pack(&mut self, k: Rows, v: Rows) {
        assert!(
            k.rows == v.rows && k.cols == v.cols,
            "k and v shapes disagree"
        );
        assert!(
            k.rows > 0 && k.cols > 0,
            "attention needs keys of positive width"
        );
        self.keys
            .repack_rows(k, k.cols.next_multiple_of(amx::INPUTS));
        self.values
            .repack_columns(v, k.rows.next_multiple_of(amx::INPUTS));
    }

    /// Keys (and values) of the head.
    fn len(&self) -> usize {
        self.keys.out_dim
    }

    /// Width of a key (and of a value).
    fn width(&self) -> usize {
        self.values.out_dim
    }
}

/// Buffers of [`attend_head`], kept by a thread across heads so that their memory is reused.
#[derive(Debug, Default)]
pub struct HeadBuffers {
    queries: Vec<u32>,
    scores: Vec<f32>,
    probs: Vec<u32>,
    context: Vec<f32>,
}

/// One attention head in bf16: `softmax(scale · q kᵀ + mask) v` for queries `q` (Lq × d),
/// the keys and values of `head` (Lk × d) and an additive `mask` of Lk values. The scaled
/// queries and the probabilities are rounded to bf16 (nearest even) like the packed keys and
/// values; products sum in f32 on the tile unit where [`uses_amx`] allows, otherwise on
/// `vdpbf16ps`; the softmax runs in f32. Returns the Lq × d context, row-major, held in
/// `buffers`.
///
/// Panics (a caller bug) when [`available`] is false or the shapes disagree. In the crate's
/// unit tests on CPUs without the instructions, the products run on a scalar emulation of
/// the drivers instead, so that callers' wiring is tested everywhere.
pub fn attend_head<'b>(
    q: Rows,
    head: &PackedHead,
    scale: f32,
    mask: Option<&[f32]>,
    buffers: &'b mut HeadBuffers,
) -> &'b [f32] {
    #[cfg(test)]
    if !available() {
        // SAFETY: the emulated driver runs on any CPU.
        return unsafe { attend_head_with(q, head, scale, mask, buffers, emulation::driver) };
    }
    assert!(
        available(),
        "bf16 kernels called on a CPU without avx512_bf16"
    );
    // SAFETY: the CPU has the instructions of both drivers; `driver_for` picks the tile unit
    // only where it is usable for the weight at hand.
    unsafe { attend_head_with(q, head, scale, mask, buffers, driver_for) }
}

/// [`attend_head`] with the block driver chosen by `driver`.
///
/// # Safety
/// Every driver `driver` returns may run on this CPU for the weight it is given.
unsafe fn attend_head_with<'b>(
    q: Rows,
    head: &PackedHead,
    scale: f32,
    mask: Option<&[f32]>,
    buffers: &'b mut HeadBuffers,
    driver: fn(&PackedBf16) -> Driver,
) -> &'b [f32] {
    let (lq, lk) = (q.rows, head.len());
    assert_eq!(q.cols, head.width(), "queries and keys differ in width");
    assert!(mask.is_none_or(|m| m.len() == lk), "mask length must be Lk");
    let b = buffers;
    round_into(q, scale, head.keys.pairs(), &mut b.queries);
    b.scores.resize(lq * lk, 0.0);
    // SAFETY: forwarded from the caller.
    unsafe {
        product(
            &b.queries,
            lq,
            &head.keys,
            &mut b.scores,
            driver(&head.keys),
        )
    };

    b.scores
        .chunks_exact_mut(lk)
        .for_each(|row| super::vmath::softmax(row, mask));
    let probs = Rows {
        data: &b.scores,
        rows: lq,
        cols: lk,
        stride: lk,
    };
    round_into(probs, 1.0, head.values.pairs(), &mut b.probs);

    b.context.resize(lq * q.cols, 0.0);
    let values = &head.values;
    // SAFETY: forwarded from the caller.
    unsafe { product(&b.probs, lq, values, &mut b.context, driver(values)) };
    &b.context
}

/// The AMX path: tile configuration, the 32 × [`NR`] block product and its driver.
mod amx {
    use std::sync::OnceLock;

    use super::{Block, PackedBf16, Sink, Span, NR};

    /// Rows of one block: two tiles of 16 rows.
    pub(super) const ROWS: usize = 32;

    /// Rows of one parallel work item: four blocks, so that each weight panel loaded from
    /// the shared cache serves 128 rows (with 32 rows per task, streaming the panels took as
    /// long as the tile products).
    pub(super) const TASK_ROWS: usize = 4 * ROWS;

    /// Columns of one parallel work item: four panels.
    pub(super) const TASK_COLS: usize = 4 * NR;

    /// Inputs per tile step: a tile row holds 64 bytes, 32 bf16 values.
    pub(super) const INPUTS: usize = 32;

    /// Bytes of the next panel each row block prefetches per tile step: a quarter of the
    /// step's 2 KiB, so the first [`AHEAD_BLOCKS`] row blocks of a panel together bring the
    /// next panel into L2 while they run.
    const AHEAD_BYTES: usize = 512;

    // The kernel's assembly issues eight 64-byte prefetches per step.
    const _: () = assert!(AHEAD_BYTES == 8 * 64);

    /// Row blocks of a panel that prefetch the next one.
    const AHEAD_BLOCKS: usize = (INPUTS / 2) * PANEL_PAIR_BYTES / AHEAD_BYTES;

    /// Where row block `block` (counted from the task's first) of the panel at `col` starts
    /// prefetching the next panel (the next column block's first panel after the last one),
    /// or null for blocks past [`AHEAD_BLOCKS`], which prefetch nothing. The address may lie
    /// past the weights: prefetches never fault.
    fn next_panel_share(w: &PackedBf16, col: usize, block: usize) -> *const u16 {
        if block >= AHEAD_BLOCKS {
            return std::ptr::null();
        }
        let panel_len = w.pairs() * NR * 2;
        let share = panel_len / AHEAD_BLOCKS;
        w.panels
            .as_ptr()
            .wrapping_add((col / NR + 1) * panel_len + block * share)
    }

    /// Bytes between consecutive input pairs of a packed panel.
    const PANEL_PAIR_BYTES: usize = NR * 2 * 2;

    /// Whether the CPU has AMX-TILE and AMX-BF16 and the kernel granted this process the
    /// tile state (Linux asks each process to request it once; without it the first tile
    /// instruction faults). Decided once per process.
    pub(super) fn usable() -> bool {
        static USABLE: OnceLock<bool> = OnceLock::new();
        *USABLE.get_or_init(|| {
            if !cpu_has_amx() {
                tracing::debug!("no AMX on this CPU; bf16 layers run on vdpbf16ps");
                return false;
            }
            match request_tile_state() {
                Ok(()) => {
                    tracing::info!("bf16 linear layers run on the AMX tile unit");
                    true
                }
                Err(error) => {
                    tracing::warn!(%error, "AMX tile state refused; bf16 layers run on vdpbf16ps");
                    false
                }
            }
        })
    }

    #[cfg(target_arch = "x86_64")]
    fn cpu_has_amx() -> bool {
        const AMX_BF16: u32 = 1 << 22;
        const AMX_TILE: u32 = 1 << 24;
        let leaf = std::arch::x86_64::__cpuid_count(7, 0);
        leaf.edx & AMX_BF16 != 0 && leaf.edx & AMX_TILE != 0
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn cpu_has_amx() -> bool {
        false
    }

    /// Asks Linux for permission to use the tile data state (`ARCH_REQ_XCOMP_PERM` for
    /// `XFEATURE_XTILEDATA`). Errors: the kernel's refusal, or `Unsupported` elsewhere.
    #[cfg(all(target_arch = "x86_64", target_os = "linux"))]
    fn request_tile_state() -> std::io::Result<()> {
        const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
        const XFEATURE_XTILEDATA: libc::c_long = 18;
        // SAFETY: arch_prctl with this request only changes which state components the
        // process may use; it touches no memory.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_arch_prctl,
                ARCH_REQ_XCOMP_PERM,
                XFEATURE_XTILEDATA,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    #[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
    fn request_tile_state() -> std::io::Result<()> {
        Err(std::io::ErrorKind::Unsupported.into())
    }

    /// The output block of one [`product`], row-major with [`NR`] columns.
    #[repr(C, align(64))]
    struct Tile([f32; ROWS * NR]);

    /// The tile layout of [`product`]: palette 1, eight tiles of 16 rows × 64 bytes
    /// (tmm0–3 accumulate, tmm4–5 hold activations, tmm6–7 weights).
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    impl Config {
        fn new() -> Self {
            let mut bytes = [0u8; 64];
            bytes[0] = 1;
            for tile in 0..8 {
                bytes[16 + 2 * tile..18 + 2 * tile].copy_from_slice(&64u16.to_le_bytes());
                bytes[48 + tile] = 16;
            }
            Self(bytes)
        }
    }

    /// One task's block on the tile unit: configures the tiles, multiplies every 32-row ×
    /// [`NR`]-column block, then releases the tiles and has the sink finish the whole block.
    /// Whole blocks are stored straight into the output; the epilogue runs once the block is
    /// complete, over rows of the block's full width, instead of after each 32 × 32 tile:
    /// per tile, the epilogue's loads waited on the tile stores just before them, and calls
    /// on 32 values cost more than their arithmetic.
    ///
    /// # Safety
    /// [`usable`] is true and `w.in_dim` is a multiple of [`INPUTS`]; `a` holds the rows
    /// rounded by [`super::round_rows`] or [`super::round_into`]; `block` lies within the
    /// matrix that `sink.dst` points to and no other thread writes it.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn run_block(a: &[u32], w: &PackedBf16, block: &Block, sink: &Sink) {
        let pairs = w.pairs();
        let (row_end, col_end) = (block.rows.end, block.cols.end);
        let mut tile = Tile([0f32; ROWS * NR]);
        // SAFETY: the CPU supports AMX and the process holds the tile state (caller).
        let tiles = unsafe { Configured::new(&Config::new()) };
        for col in block.cols.clone().step_by(NR) {
            let panel = &w.panels[(col / NR) * pairs * NR * 2..][..pairs * NR * 2];
            for row in block.rows.clone().step_by(ROWS) {
                let lhs = &a[row * pairs..][..ROWS * pairs];
                let ahead = next_panel_share(w, col, (row - block.rows.start) / ROWS);
                let span = Span {
                    row,
                    col,
                    rows: (row_end - row).min(ROWS),
                    cols: (col_end - col).min(NR),
                };
                // SAFETY: tiles are configured; the slices hold what `product` reads; a whole
                // span (32 rows × NR columns) lies in this task's block of the output, whose
                // rows are `sink.stride` values apart; a partial one goes through `tile`.
                unsafe {
                    if span.rows == ROWS && span.cols == NR {
                        product(lhs, panel, pairs, ahead, sink.at(row, col), sink.stride);
                    } else {
                        product(lhs, panel, pairs, ahead, tile.0.as_mut_ptr(), NR);
                        sink.store(&tile.0, NR, &span);
                    }
                }
            }
        }
        drop(tiles);

        let whole = Span {
            row: block.rows.start,
            col: block.cols.start,
            rows: block.rows.len(),
            cols: block.cols.len(),
        };
        // SAFETY: the loops above wrote every value of the block, which is this task's.
        unsafe { sink.finish(&whole) };
    }

    /// Tiles configured on this thread until dropped, which releases them, on a panic too:
    /// a thread left with configured tiles makes every context switch save 8 KiB more.
    struct Configured;

    impl Configured {
        /// # Safety
        /// The CPU supports AMX and the process holds the tile state.
        #[cfg(target_arch = "x86_64")]
        unsafe fn new(config: &Config) -> Self {
            // SAFETY: forwarded from the caller; the configuration is 64 valid bytes.
            unsafe {
                std::arch::asm!("ldtilecfg [{}]", in(reg) config.0.as_ptr(), options(nostack))
            };
            Self
        }
    }

    impl Drop for Configured {
        fn drop(&mut self) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: tiles were configured by `new` on this thread (a guard never moves to
            // another thread inside `run_block`); releasing them touches no memory.
            unsafe {
                std::arch::asm!("tilerelease", options(nostack, nomem))
            };
        }
    }

    #[cfg(not(target_arch = "x86_64"))]
    pub(super) unsafe fn run_block(_: &[u32], _: &PackedBf16, _: &Block, _: &Sink) {
        unreachable!("AMX is never usable off x86_64");
    }

    /// `c = a · panel` for 32 rows of `a` (`pairs` u32 pairs each) and one panel of [`NR`]
    /// columns, 32 inputs per step: two activation tiles (rows 0–15, 16–31) times two weight
    /// tiles (columns 0–15, 16–31) into four accumulators, stored at the end as 32 rows of
    /// [`NR`] values from `c`, `ldc` values apart. Each step also asks for [`AHEAD_BYTES`]
    /// from `ahead` on to be brought into L2, unless `ahead` is null (see
    /// [`next_panel_share`]).
    ///
    /// # Safety
    /// Tiles are configured as [`Config::new`] describes; `pairs` is a positive multiple of
    /// 16; `a` holds 32 × `pairs` values and `panel` `pairs` × [`NR`] × 2; `c` may be written
    /// at 32 rows of [`NR`] values, `ldc` apart. `ahead` (null for none) is only prefetched,
    /// [`AHEAD_BYTES`] per step, so any address will do.
    #[cfg(target_arch = "x86_64")]
    unsafe fn product(
        a: &[u32],
        panel: &[u16],
        pairs: usize,
        ahead: *const u16,
        c: *mut f32,
        ldc: usize,
    ) {
        assert!(pairs > 0 && pairs.is_multiple_of(INPUTS / 2));
        assert!(a.len() >= ROWS * pairs && panel.len() >= pairs * NR * 2);
        let steps = pairs / (INPUTS / 2);
        let row_bytes = pairs * 4;
        // SAFETY: every load reads 16 rows of 64 bytes: activation rows `r` and `16 + r` at
        // byte offset 64·step (inside a row of `row_bytes`), weight pairs 16·step.. at
        // `PANEL_PAIR_BYTES` apart (inside the panel); the stores write 32 rows of 128 bytes
        // from `c`, `ldc` values apart (the caller's contract); prefetches read nothing and
        // never fault. Only tile registers, the named operands and flags change.
        unsafe {
            std::arch::asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                "2:",
                "tileloadd tmm4, [{a} + {lda}]",
                "tileloadd tmm5, [{a16} + {lda}]",
                "tileloadd tmm6, [{b} + {ldb}]",
                "tileloadd tmm7, [{b} + {ldb} + 64]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                "add {a}, 64",
                "add {a16}, 64",
                "add {b}, {step_bytes}",
                "test {ahead}, {ahead}",
                "jz 3f",
                "prefetcht1 [{ahead}]",
                "prefetcht1 [{ahead} + 64]",
                "prefetcht1 [{ahead} + 128]",
                "prefetcht1 [{ahead} + 192]",
                "prefetcht1 [{ahead} + 256]",
                "prefetcht1 [{ahead} + 320]",
                "prefetcht1 [{ahead} + 384]",
                "prefetcht1 [{ahead} + 448]",
                "add {ahead}, {ahead_bytes}",
                "3:",
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {ldc}], tmm0",
                "tilestored [{c} + {ldc} + 64], tmm1",
                "tilestored [{c16} + {ldc}], tmm2",
                "tilestored [{c16} + {ldc} + 64], tmm3",
                a = inout(reg) a.as_ptr() => _,
                a16 = inout(reg) a.as_ptr().add(16 * pairs) => _,
                lda = in(reg) row_bytes,
                b = inout(reg) panel.as_ptr() => _,
                ldb = in(reg) PANEL_PAIR_BYTES,
                step_bytes = const (INPUTS / 2) * PANEL_PAIR_BYTES,
                steps = inout(reg) steps => _,
                ahead = inout(reg) ahead => _,
                ahead_bytes = const AHEAD_BYTES,
                c = in(reg) c,
                c16 = in(reg) c.add(16 * ldc),
                ldc = in(reg) ldc * 4,
                options(nostack),
            );
        }
    }
}

/// A scalar emulation of the block drivers, so that tests exercise everything around them
/// on any CPU.
#[cfg(test)]
mod emulation {
    use super::{Block, Driver, PackedBf16, Sink, Span, NR};

    /// The block drivers' arithmetic in scalar code: bf16 pairs multiplied and summed in f32,
    /// one output row at a time.
    ///
    /// # Safety
    /// As for the drivers: `block` lies within the output behind `sink.dst`.
    pub(super) unsafe fn emulated_block(a: &[u32], w: &PackedBf16, block: &Block, sink: &Sink) {
        let pairs = w.pairs();
        let wide = |x: u16| f32::from_bits((x as u32) << 16);
        let mut tile = [0f32; NR];
        for row in block.rows.clone() {
            for col in block.cols.clone().step_by(NR) {
                let panel = &w.panels[(col / NR) * pairs * NR * 2..][..pairs * NR * 2];
                for (c, sum) in tile.iter_mut().enumerate() {
                    *sum = (0..pairs).fold(0.0, |acc, p| {
                        let (x, at) = (a[row * pairs + p], (p * NR + c) * 2);
                        let acc = wide(x as u16).mul_add(wide(panel[at]), acc);
                        wide((x >> 16) as u16).mul_add(wide(panel[at + 1]), acc)
                    });
                }
                let span = Span {
                    row,
                    col,
                    rows: 1,
                    cols: (block.cols.end - col).min(NR),
                };
                // SAFETY: forwarded from the caller.
                unsafe { sink.write(&tile, NR, &span) };
            }
        }
    }

    /// The emulated driver, with work items small enough that odd shapes split into several.
    pub(super) const EMULATED: Driver = Driver {
        run: emulated_block,
        task: (16, 2 * NR),
    };

    /// Picks [`EMULATED`] for any weight.
    pub(super) fn driver(_: &PackedBf16) -> Driver {
        EMULATED
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{MR, NR};

    /// Rounds `scale` times one f32 row to bf16 pairs, 16 values per instruction, the tail
    /// in scalar.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-BF16; `dst` holds `src.len().div_ceil(2)`.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn round_row(src: &[f32], scale: f32, dst: &mut [u32]) {
        assert!(dst.len() >= src.len().div_ceil(2));
        let full = src.len() / 16;
        let factor = _mm512_set1_ps(scale);
        for i in 0..full {
            // SAFETY: 16 values from 16·i are inside `src`; 8 pairs from 8·i inside `dst`.
            unsafe {
                let v = _mm512_mul_ps(_mm512_loadu_ps(src.as_ptr().add(16 * i)), factor);
                let h = std::mem::transmute::<__m256bh, __m256i>(_mm512_cvtneps_pbh(v));
                _mm256_storeu_si256(dst.as_mut_ptr().add(8 * i).cast(), h);
            }
        }
        super::round_row_scalar(&src[16 * full..], scale, &mut dst[8 * full..]);
    }

    /// Word order that puts the 16 bf16 values of one row beside those of the next.
    const INTERLEAVE: [u16; 32] = {
        let mut order = [0u16; 32];
        let mut i = 0;
        while i < 16 {
            order[2 * i] = i as u16;
            order[2 * i + 1] = i as u16 + 16;
            i += 1;
        }
        order
    };

    /// [`super::interleave`] of two full panel rows: 16 columns per step.
    ///
    /// # Safety
    /// The CPU has AVX512F, AVX512BW and AVX512-BF16; `first` and `second` hold NR values
    /// and `dst` 2·NR.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn interleave(first: &[f32], second: &[f32], dst: &mut [u16]) {
        assert!(first.len() >= NR && second.len() >= NR && dst.len() >= 2 * NR);
        // SAFETY: INTERLEAVE is 64 bytes.
        let order = unsafe { _mm512_loadu_si512(INTERLEAVE.as_ptr().cast()) };
        for half in 0..NR / 16 {
            // SAFETY: 16 values from 16·half are inside both rows; 32 words from 32·half
            // inside `dst`.
            unsafe {
                let a = _mm512_loadu_ps(first.as_ptr().add(16 * half));
                let b = _mm512_loadu_ps(second.as_ptr().add(16 * half));
                // Words 0–15 come from the second operand (`a`), 16–31 from the first.
                let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(b, a));
                let paired = _mm512_permutexvar_epi16(order, both);
                _mm512_storeu_si512(dst.as_mut_ptr().add(32 * half).cast(), paired);
            }
        }
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
        half::bf16::from_bits(to_bf16(v)).to_f32()
    }

    use crate::model::packed::testing::{max_diff, operands, random};

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
            let diff = max_diff(&got, &want);
            // Only the f32 accumulation order differs from the f64 reference.
            assert!(diff < 1e-4, "({rows}, {n}, {k}): max diff {diff}");
        }
    }

    #[test]
    fn tile_unit_matches_reference_on_odd_rows_and_columns() {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        for (rows, n, k) in [
            (1, 1, 32),
            (33, 45, 64),
            (150, 100, 96),
            (5, 31, 768),
            (300, 161, 64),
        ] {
            let packed = assert_activation_and_residual((rows, n, k), (2, 3));
            assert_eq!(uses_amx(&packed), amx::usable());
        }
        if !amx::usable() {
            eprintln!("only the vdpbf16ps kernel ran: this CPU or kernel offers no AMX");
        }
    }

    #[test]
    fn epilogue_applies_activation_then_residual() {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        assert_activation_and_residual((10, 35, 17), (4, 7));
    }

    /// Checks `matmul` with bias, QuickGELU and a residual against the f64 reference, for
    /// operands and residual drawn from `seeds`; returns the packed weight.
    fn assert_activation_and_residual(
        (rows, n, k): (usize, usize, usize),
        seeds: (u64, u64),
    ) -> PackedBf16 {
        let (xs, w, b) = operands((rows, n, k), seeds.0);
        let res = random(rows * n, seeds.1);
        let packed = PackedBf16::pack(&w, n, k, Some(b.clone()));
        let epilogue = Epilogue {
            act: Some(Activation::QuickGelu),
            residual: Some(&res),
        };
        let got = matmul(&xs, rows, &packed, epilogue);
        let want = reference(&xs, &w, &b, rows, n, k);
        for ((g, w), r) in got.iter().zip(&want).zip(&res) {
            let w = activation_value(Activation::QuickGelu, *w) + r;
            assert!(
                (g - w).abs() < 1e-4,
                "({rows}, {n}, {k}): got {g}, want {w}"
            );
        }
        packed
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
        (src[6], src[7]) = (f32::from_bits(0x0040_0000), -f32::from_bits(3));
        let (mut fast, mut slow) = (vec![0u32; 34], vec![0u32; 34]);
        // SAFETY: the CPU check above passed.
        unsafe { x86::round_row(&src, 0.125, &mut fast) };
        round_row_scalar(&src, 0.125, &mut slow);
        assert_eq!(fast, slow);
    }

    #[test]
    fn subnormals_round_to_zero_of_their_sign() {
        let tiny = f32::from_bits(0x0040_0000);
        assert_eq!(to_bf16(tiny), 0);
        assert_eq!(to_bf16(-tiny), 0x8000);
        assert_eq!(
            to_bf16(f32::MIN_POSITIVE),
            0x0080,
            "the smallest normal stays"
        );
        let mut pair = [0u32];
        round_row_scalar(&[tiny, 1.0], 1.0, &mut pair);
        assert_eq!(pair[0], 0x3f80 << 16);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_interleave_matches_scalar() {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        let (mut first, mut second) = (random(NR, 11), random(NR, 12));
        (first[1], second[2]) = (f32::from_bits(0x0040_0000), -f32::from_bits(1));
        let (mut fast, mut slow) = (vec![0u16; 2 * NR], vec![0u16; 2 * NR]);
        // SAFETY: the CPU check above passed; both rows hold NR values.
        unsafe { x86::interleave(&first, &second, &mut fast) };
        for c in 0..NR {
            (slow[2 * c], slow[2 * c + 1]) = (to_bf16(first[c]), to_bf16(second[c]));
        }
        assert_eq!(fast, slow);
    }

    /// `rows` × `cols` values `stride` apart, the gaps filled with values that must not be
    /// read, and the same matrix compacted.
    fn strided(rows: usize, cols: usize, stride: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
        let data = random(rows * stride, seed);
        let compact = data
            .chunks(stride)
            .flat_map(|row| row[..cols].to_vec())
            .collect();
        (data, compact)
    }

    fn rows_of(data: &[f32], rows: usize, cols: usize, stride: usize) -> Rows<'_> {
        Rows {
            data,
            rows,
            cols,
            stride,
        }
    }

    #[test]
    fn repacked_rows_and_columns_equal_packing_the_padded_matrix() {
        let mut packed = PackedBf16::empty();
        for (rows, cols, stride, in_pad) in [(45, 24, 72, 32), (33, 64, 192, 64), (7, 3, 3, 4)] {
            let (data, compact) = strided(rows, cols, stride, rows as u64);
            let src = rows_of(&data, rows, cols, stride);

            let mut weight = vec![0f32; rows * in_pad];
            for (dst, row) in weight.chunks_mut(in_pad).zip(compact.chunks(cols)) {
                dst[..cols].copy_from_slice(row);
            }
            packed.repack_rows(src, in_pad);
            let want = PackedBf16::pack(&weight, rows, in_pad, None);
            assert_eq!(packed.panels, want.panels, "rows of {rows} × {cols}");
            assert_eq!((packed.out_dim, packed.in_dim), (rows, in_pad));

            let keys = rows.next_multiple_of(32);
            let mut transposed = vec![0f32; cols * keys];
            for (r, row) in compact.chunks(cols).enumerate() {
                row.iter()
                    .enumerate()
                    .for_each(|(c, &x)| transposed[c * keys + r] = x);
            }
            packed.repack_columns(src, keys);
            let want = PackedBf16::pack(&transposed, cols, keys, None);
            assert_eq!(packed.panels, want.panels, "columns of {rows} × {cols}");
            assert_eq!((packed.out_dim, packed.in_dim), (cols, keys));
        }
    }

    #[test]
    fn rounded_rows_are_padded_with_zeros_over_stale_values() {
        let (data, compact) = strided(5, 7, 9, 3);
        let mut dst = vec![u32::MAX; 200];
        round_into(rows_of(&data, 5, 7, 9), 0.5, 6, &mut dst);
        assert_eq!(dst.len(), amx::ROWS * 6);
        for (i, row) in dst.chunks(6).enumerate() {
            let mut want = vec![0u32; 6];
            if i < 5 {
                round_row_scalar(&compact[i * 7..][..7], 0.5, &mut want);
            }
            assert_eq!(row, want, "row {i}");
        }
    }

    #[test]
    fn parallel_blocks_cover_the_output_with_emulated_products() {
        for (rows, n, k) in [(41, 129, 130), (100, 70, 64), (1, 1, 1), (16, 64, 3)] {
            let (xs, w, b) = operands((rows, n, k), 5);
            let res = random(rows * n, 6);
            let packed = PackedBf16::pack(&w, n, k, Some(b.clone()));
            let epilogue = Epilogue {
                act: Some(Activation::QuickGelu),
                residual: Some(&res),
            };
            // SAFETY: the emulated driver runs on any CPU; the lengths fit the shape.
            let got = unsafe { matmul_with(&xs, rows, &packed, epilogue, emulation::EMULATED) };
            let want = reference(&xs, &w, &b, rows, n, k);
            for ((g, w), r) in got.iter().zip(&want).zip(&res) {
                let w = activation_value(Activation::QuickGelu, *w) + r;
                assert!(
                    (g - w).abs() < 1e-4,
                    "({rows}, {n}, {k}): got {g}, want {w}"
                );
            }
        }
    }

    /// `softmax(round(scale·q) round(k)ᵀ + mask)` rounded to bf16, times round(v), in f64:
    /// the same rounded operands as the kernels, exact sums.
    fn reference_head(q: &[f32], k: &[f32], v: &[f32], d: usize, mask: &[f32]) -> Vec<f32> {
        let scale = 1.0 / (d as f32).sqrt();
        let round = |x: f32| bf16_round(x) as f64;
        let (lq, lk) = (q.len() / d, k.len() / d);
        let mut out = vec![0f32; lq * d];
        for i in 0..lq {
            let logits: Vec<f64> = (0..lk)
                .map(|j| {
                    let dot: f64 = (0..d)
                        .map(|c| round(q[i * d + c] * scale) * round(k[j * d + c]))
                        .sum();
                    dot + mask[j] as f64
                })
                .collect();
            let max = logits.iter().cloned().fold(f64::MIN, f64::max);
            let exps: Vec<f64> = logits.iter().map(|l| (l - max).exp()).collect();
            let total: f64 = exps.iter().sum();
            for c in 0..d {
                out[i * d + c] = (0..lk)
                    .map(|j| round((exps[j] / total) as f32) * round(v[j * d + c]))
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    /// A packed head and buffers, kept from one checked head to the next.
    type Reused = (PackedHead, HeadBuffers);

    /// Runs one head on strided q, k, v (as packed q/k/v projections lay them out) with a
    /// mask and checks it against [`reference_head`], reusing what earlier heads left.
    fn check_head(shape: (usize, usize, usize), reused: &mut Reused, real: bool) {
        let (lq, lk, d) = shape;
        let stride = 3 * d;
        let (q_data, q) = strided(lq, d, stride, 21);
        let (kv_data, _) = strided(lk, stride, stride, 22);
        let gather = |offset: usize| -> Vec<f32> {
            kv_data
                .chunks(stride)
                .flat_map(|row| row[offset..offset + d].to_vec())
                .collect()
        };
        let (k, v) = (gather(d), gather(2 * d));
        let mask: Vec<f32> = (0..lk)
            .map(|j| if j % 5 == 3 { -10000.0 } else { 0.0 })
            .collect();
        let (head, buffers) = reused;
        head.pack(
            rows_of(&kv_data[d..], lk, d, stride),
            rows_of(&kv_data[2 * d..], lk, d, stride),
        );
        let (q_rows, scale) = (rows_of(&q_data, lq, d, stride), 1.0 / (d as f32).sqrt());
        let got = if real {
            attend_head(q_rows, head, scale, Some(&mask), buffers).to_vec()
        } else {
            let emulated = emulation::driver;
            // SAFETY: the emulated driver runs on any CPU.
            unsafe { attend_head_with(q_rows, head, scale, Some(&mask), buffers, emulated) }
                .to_vec()
        };
        let want = reference_head(&q, &k, &v, d, &mask);
        let diff = max_diff(&got, &want);
        // Sums in f32 rather than f64, and a probability now and then rounded the other way.
        assert!(diff < 1e-3, "{shape:?}: max diff {diff}");
    }

    /// (Lq, Lk, d) of the checked heads, odd and even, the ViT-B/16 head last; the emulated
    /// driver takes fewer of its queries, the real ones all 577.
    fn head_shapes(vit_queries: usize) -> [(usize, usize, usize); 5] {
        [
            (37, 45, 24),
            (1, 3, 8),
            (33, 64, 32),
            (2, 1, 1),
            (vit_queries, 577, 64),
        ]
    }

    #[test]
    fn attention_head_matches_the_rounded_reference_with_emulated_products() {
        let mut reused = Reused::default();
        for shape in head_shapes(70) {
            check_head(shape, &mut reused, false);
        }
    }

    #[test]
    fn attention_head_on_this_cpus_kernels_matches_the_rounded_reference() {
        if !available() {
            eprintln!("skipped: this CPU has no avx512_bf16");
            return;
        }
        let mut reused = Reused::default();
        for shape in head_shapes(577) {
            check_head(shape, &mut reused, true);
        }
    }
}
