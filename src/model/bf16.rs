//! A CPU GEMM with bf16 weights, bf16-rounded activations and f32 accumulation, on the
//! AMX tile unit where the CPU has it, otherwise on the AVX512-BF16 dot-product instruction
//! (`vdpbf16ps`).
//!
//! Weights are rounded to bf16 once and packed into panels of [`NR`] output columns, with
//! each pair of adjacent input features stored side by side, the layout the instruction
//! consumes. Activations arrive in f32 and are rounded to bf16 (nearest even) per call.
//! A register-blocked microkernel computes [`MR`] × [`NR`] output tiles over the whole
//! reduction; rayon spreads tiles over threads. Bias, activation and a residual are applied
//! to each tile while it is still in cache.
//!
//! With AMX (AMX-TILE and AMX-BF16, and a Linux kernel that grants the process the tile
//! state), layers whose input width is a multiple of 32 run on the tile unit instead: the
//! packed panels are already the layout `tdpbf16ps` reads (pairs of inputs side by side per
//! column), so the same weights serve both kernels. One block is 32 rows × [`NR`] columns in
//! four accumulator tiles, fed by two activation tiles and two weight tiles per 32 inputs.
//! The tile unit does 16 times the multiply-adds per cycle of `vdpbf16ps`; on CPUs that
//! have both, `vdpbf16ps` is no faster than f32 FMAs, so AMX is what makes bf16 pay.
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
    let on_tiles = uses_amx(w);
    let (task_rows, task_cols) = if on_tiles {
        (amx::TASK_ROWS, amx::TASK_COLS)
    } else {
        (TASK_ROWS, TASK_COLS)
    };
    let a = round_rows(xs, rows, w.in_dim);
    let mut out = vec![0f32; rows * w.out_dim];
    let row_tasks = rows.div_ceil(task_rows);
    let col_tasks = w.out_dim.div_ceil(task_cols);
    let sink = Sink {
        dst: SharedOut(out.as_mut_ptr()),
        out_dim: w.out_dim,
        bias: w.bias.as_deref(),
        epilogue,
    };
    (0..row_tasks * col_tasks).into_par_iter().for_each(|task| {
        let (row0, col0) = (
            (task / col_tasks) * task_rows,
            (task % col_tasks) * task_cols,
        );
        let block = Block {
            rows: row0..(row0 + task_rows).min(rows),
            cols: col0..(col0 + task_cols).min(w.out_dim),
        };
        // SAFETY: the CPU checks above hold; each task writes only its own rows × columns
        // block of `out`, which is rows × out_dim long and outlives the parallel loop.
        unsafe {
            if on_tiles {
                amx::run_block(&a, w, &block, &sink);
            } else {
                run_block(&a, w, &block, &sink);
            }
        }
    });
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

/// Whether [`matmul`] runs `w` on the AMX tile unit: the CPU and kernel allow it and the
/// input width is a whole number of 32-input tile steps. The first call in a process makes
/// the decision of [`prepare_tile_unit`] if nothing made it yet.
pub fn uses_amx(w: &PackedBf16) -> bool {
    w.in_dim.is_multiple_of(amx::INPUTS) && amx::usable()
}

/// One parallel work item: the output rows and columns it computes, starting on a multiple
/// of its kernel's tile rows and of [`NR`].
struct Block {
    rows: std::ops::Range<usize>,
    cols: std::ops::Range<usize>,
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
    /// [`NR`]-column block and hands it to the sink, then releases the tiles.
    ///
    /// # Safety
    /// [`usable`] is true and `w.in_dim` is a multiple of [`INPUTS`]; `a` holds the rows
    /// rounded by [`super::round_rows`]; `block` lies within the matrix that `sink.dst`
    /// points to and no other thread writes it.
    #[cfg(target_arch = "x86_64")]
    pub(super) unsafe fn run_block(a: &[u32], w: &PackedBf16, block: &Block, sink: &Sink) {
        let pairs = w.pairs();
        let (row_end, col_end) = (block.rows.end, block.cols.end);
        let mut tile = Tile([0f32; ROWS * NR]);
        // SAFETY: the CPU supports AMX and the process holds the tile state (caller).
        let _tiles = unsafe { Configured::new(&Config::new()) };
        for col in block.cols.clone().step_by(NR) {
            let panel = &w.panels[(col / NR) * pairs * NR * 2..][..pairs * NR * 2];
            for row in block.rows.clone().step_by(ROWS) {
                let lhs = &a[row * pairs..][..ROWS * pairs];
                // SAFETY: tiles are configured; the slices hold what `product` reads.
                unsafe { product(lhs, panel, pairs, &mut tile) };
                let out = Span {
                    row,
                    col,
                    rows: (row_end - row).min(ROWS),
                    cols: (col_end - col).min(NR),
                };
                // SAFETY: forwarded from the caller: the span lies in this task's block.
                unsafe { sink.write(&tile.0, NR, &out) };
            }
        }
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

    /// `tile = a · panel` for 32 rows of `a` (`pairs` u32 pairs each) and one panel of
    /// [`NR`] columns, 32 inputs per step: two activation tiles (rows 0–15, 16–31) times
    /// two weight tiles (columns 0–15, 16–31) into four accumulators, stored at the end.
    ///
    /// # Safety
    /// Tiles are configured as [`Config::new`] describes; `pairs` is a positive multiple of
    /// 16; `a` holds 32 × `pairs` values and `panel` `pairs` × [`NR`] × 2.
    #[cfg(target_arch = "x86_64")]
    unsafe fn product(a: &[u32], panel: &[u16], pairs: usize, tile: &mut Tile) {
        assert!(pairs > 0 && pairs.is_multiple_of(INPUTS / 2));
        assert!(a.len() >= ROWS * pairs && panel.len() >= pairs * NR * 2);
        let steps = pairs / (INPUTS / 2);
        let row_bytes = pairs * 4;
        // SAFETY: every load reads 16 rows of 64 bytes: activation rows `r` and `16 + r` at
        // byte offset 64·step (inside a row of `row_bytes`), weight pairs 16·step.. at
        // `PANEL_PAIR_BYTES` apart (inside the panel); the stores write 32 rows of 128 bytes
        // into `tile`. Only tile registers, the named operands and flags change.
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
                "dec {steps}",
                "jnz 2b",
                "tilestored [{c} + {ldc}], tmm0",
                "tilestored [{c} + {ldc} + 64], tmm1",
                "tilestored [{c} + {ldc} + {half}], tmm2",
                "tilestored [{c} + {ldc} + {half} + 64], tmm3",
                a = inout(reg) a.as_ptr() => _,
                a16 = inout(reg) a.as_ptr().add(16 * pairs) => _,
                lda = in(reg) row_bytes,
                b = inout(reg) panel.as_ptr() => _,
                ldb = in(reg) PANEL_PAIR_BYTES,
                step_bytes = const (INPUTS / 2) * PANEL_PAIR_BYTES,
                steps = inout(reg) steps => _,
                c = in(reg) tile.0.as_mut_ptr(),
                ldc = in(reg) NR * 4,
                half = const 16 * NR * 4,
                options(nostack),
            );
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
        let (mut fast, mut slow) = (vec![0u32; 34], vec![0u32; 34]);
        // SAFETY: the CPU check above passed.
        unsafe { x86::round_row(&src, &mut fast) };
        round_row_scalar(&src, &mut slow);
        assert_eq!(fast, slow);
    }
}
