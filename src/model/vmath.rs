//! Row-wise maths of the inference kernels (the attention softmax, the activations in the
//! epilogue of linear layers, layer normalisation) on AVX-512 or AVX2 with FMA: `exp` and `erf`
//! as branch-free polynomials the compiler turns into 16- or 8-lane vector code, sums and
//! maxima kept in 64 partial lanes (the same summation order on both, so both give the same
//! bits). CPUs with neither keep the scalar code of [`super::nn::activation_value`] and
//! `f32::exp` (and the same layer-norm code, unvectorised).
//!
//! The polynomial `exp` is within 2 ulp of the correctly rounded value over the f32 range
//! (Cody-Waite reduction by ln 2, a degree-6 minimax polynomial on [-ln2/2, ln2/2]). The
//! polynomial `erf` (for the exact GELU, where the composed ops call libm's `erff`) is within
//! 1.4e-7 of the exact value, about 2 ulp where the error is largest, near 0.84: a degree-6
//! polynomial in x² on [0, 1], then `1 - e^(-x²) Q(x)` with a degree-10 polynomial `Q` fitted
//! to `erfc(x) e^(x²)` on [1, 3.92], beyond which `erf` rounds to 1. Both `erf` polynomials are
//! relative-error least-squares fits on Chebyshev nodes.

#![expect(
    unsafe_code,
    reason = "vector code paths are target_feature functions, called after a CPU check"
)]

use super::config::Activation;
use super::nn::activation_value;

/// Below this, `exp` underflows to zero (the smallest normal f32 is e^-87.34).
const EXP_MIN: f32 = -87.336_55;

/// Above this, `exp` overflows to infinity.
const EXP_MAX: f32 = 88.722_83;

/// Lanes of partial sums and maxima: four 512-bit registers or eight 256-bit ones, enough
/// independent chains to hide the adds' latency on either, in the same order on both.
const LANES: usize = 64;

/// `e^x` from a polynomial: NaN for NaN, 0 below [`EXP_MIN`], infinity above [`EXP_MAX`].
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let c = x.clamp(EXP_MIN, EXP_MAX);
    let n = (c * std::f32::consts::LOG2_E).round_ties_even();
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, c));
    let p = 1.987_569_1e-4f32;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = (p * r).mul_add(r, r) + 1.0;
    // 2^n for n in [-126, 128], split in two so the exponent field never overflows.
    let half = (n * 0.5).floor();
    let y = p * pow2(half) * pow2(n - half);
    if x.is_nan() {
        x
    } else if x < EXP_MIN {
        0.0
    } else if x > EXP_MAX {
        f32::INFINITY
    } else {
        y
    }
}

/// `erf(x) / x` on [0, 1] as a polynomial in x², highest power first.
const ERF_SMALL: [f32; 7] = [
    7.898_21e-5,
    -8.024_354e-4,
    0.005_190_053_5,
    -0.026_854_81,
    0.112_836_12,
    -0.376_126_3,
    // The fit's constant term is erf'(0) to f32 precision.
    std::f32::consts::FRAC_2_SQRT_PI,
];

/// `erfc(x) e^(x²)` on [1, 3.92] as a polynomial in `x - 2`, highest power first.
const ERFC_SCALED: [f32; 11] = [
    1.651_977_2e-6,
    -1.451_199_8e-5,
    6.126_359e-5,
    -1.934_101_9e-4,
    5.912_467e-4,
    -0.001_824_021,
    0.005_439_221_4,
    -0.015_462_962,
    0.041_803_3,
    -0.106_796_27,
    0.255_395_65,
];

/// Beyond this, `erf` rounds to ±1 in f32.
const ERF_ONE: f32 = 3.92;

/// A polynomial at `x` by Horner's rule, coefficients highest power first.
#[inline(always)]
fn horner<const N: usize>(x: f32, coeffs: &[f32; N]) -> f32 {
    coeffs[1..].iter().fold(coeffs[0], |p, &c| p.mul_add(x, c))
}

/// `erf(x)` from polynomials (see the module doc); ±1 for infinities and, since the only
/// caller multiplies by `x`, also for NaN.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let small = a * horner(a * a, &ERF_SMALL);
    let c = a.min(ERF_ONE);
    let large = 1.0 - exp(-(c * c)) * horner(c - 2.0, &ERFC_SCALED);
    let r = if a <= 1.0 { small } else { large };
    r.copysign(x)
}

/// `2^e` for an integral `e` in [-126, 127], by integer arithmetic on the bits: adding
/// 1.5 · 2^23 leaves `e` in the low mantissa bits.
#[inline(always)]
fn pow2(e: f32) -> f32 {
    const SHIFTER: f32 = 12_582_912.0;
    let bits = (e + SHIFTER)
        .to_bits()
        .wrapping_sub(SHIFTER.to_bits() - 127);
    f32::from_bits(bits << 23)
}

/// The widest vector path the running CPU can take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Avx512,
    Avx2,
    Scalar,
}

fn path() -> Path {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("fma") {
            return Path::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Path::Avx2;
        }
    }
    Path::Scalar
}

/// An activation in place: QuickGELU `x · sigmoid(1.702 x)`, or the exact GELU
/// `0.5 x (1 + erf(x / sqrt 2))` (within 1e-7 · |x| of libm's `erff` in it, see the module doc).
pub fn activate(xs: &mut [f32], act: Activation) {
    #[cfg(target_arch = "x86_64")]
    match (path(), act) {
        // SAFETY (all four): the CPU has AVX-512F or AVX2, and FMA, as `path` found.
        (Path::Avx512, Activation::QuickGelu) => return unsafe { avx512::quick_gelu(xs) },
        (Path::Avx512, Activation::Gelu) => return unsafe { avx512::gelu(xs) },
        (Path::Avx2, Activation::QuickGelu) => return unsafe { avx2::quick_gelu(xs) },
        (Path::Avx2, Activation::Gelu) => return unsafe { avx2::gelu(xs) },
        (Path::Scalar, _) => {}
    }
    xs.iter_mut().for_each(|x| *x = activation_value(act, *x));
}

/// The epilogue of a linear layer on one row of its output, in place:
/// `out = act(out + bias) + residual`, each step only where given.
///
/// Panics (a caller bug, not input) when `bias` or `residual` is not as long as `out`.
pub fn finish(
    out: &mut [f32],
    bias: Option<&[f32]>,
    act: Option<Activation>,
    residual: Option<&[f32]>,
) {
    let n = out.len();
    for (what, len) in [
        ("bias", bias.map(<[f32]>::len)),
        ("residual", residual.map(<[f32]>::len)),
    ] {
        assert!(
            len.is_none_or(|len| len == n),
            "{what} of {len:?} values for {n}"
        );
    }
    #[cfg(target_arch = "x86_64")]
    match path() {
        // SAFETY: the CPU has AVX-512F and FMA.
        Path::Avx512 => return unsafe { avx512::finish(out, bias, act, residual) },
        // SAFETY: the CPU has AVX2 and FMA.
        Path::Avx2 => return unsafe { avx2::finish(out, bias, act, residual) },
        Path::Scalar => {}
    }
    add(out, bias);
    if let Some(act) = act {
        activate(out, act);
    }
    add(out, residual);
}

/// Adds `ys` (if given) to `xs`, element-wise.
#[inline(always)]
fn add(xs: &mut [f32], ys: Option<&[f32]>) {
    if let Some(ys) = ys {
        xs.iter_mut().zip(ys).for_each(|(x, y)| *x += y);
    }
}

/// Adds the additive `mask` (same length) if given, then a softmax in place:
/// `exp(x - max) / sum`.
///
/// Panics (a caller bug, not input) when the mask's length differs from the row's.
pub fn softmax(row: &mut [f32], mask: Option<&[f32]>) {
    if let Some(mask) = mask {
        assert_eq!(mask.len(), row.len(), "a softmax mask must match its row");
    }
    #[cfg(target_arch = "x86_64")]
    match path() {
        // SAFETY: the CPU has AVX-512F and FMA.
        Path::Avx512 => return unsafe { avx512::softmax(row, mask) },
        // SAFETY: the CPU has AVX2 and FMA.
        Path::Avx2 => return unsafe { avx2::softmax(row, mask) },
        Path::Scalar => {}
    }
    softmax_scalar(row, mask);
}

/// Layer normalisation of one row into `out`: `(x - mean) / sqrt(var + eps) · weight + bias`,
/// with the mean corrected by a second pass over `x - mean` (so a row of equal values gives
/// exactly `bias`, even far from zero) and then the (biased) variance of the row.
///
/// Panics (a caller bug, not input) when `weight`, `bias` or `out` is not as long as `row`.
pub fn layer_norm(row: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = row.len();
    assert!(
        weight.len() == n && bias.len() == n && out.len() == n,
        "layer norm of {n} values with {} weights, {} biases and room for {}",
        weight.len(),
        bias.len(),
        out.len()
    );
    #[cfg(target_arch = "x86_64")]
    match path() {
        // SAFETY: the CPU has AVX-512F and FMA.
        Path::Avx512 => return unsafe { avx512::layer_norm(row, weight, bias, eps, out) },
        // SAFETY: the CPU has AVX2 and FMA.
        Path::Avx2 => return unsafe { avx2::layer_norm(row, weight, bias, eps, out) },
        Path::Scalar => {}
    }
    layer_norm_body(row, weight, bias, eps, out);
}

/// [`softmax`] in scalar code.
fn softmax_scalar(row: &mut [f32], mask: Option<&[f32]>) {
    if let Some(m) = mask {
        row.iter_mut().zip(m).for_each(|(x, m)| *x += m);
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0f32;
    for x in row.iter_mut() {
        *x = (*x - max).exp();
        sum += *x;
    }
    row.iter_mut().for_each(|x| *x /= sum);
}

/// The bodies of the vector paths, written for the compiler to vectorise.
#[inline(always)]
fn quick_gelu_body(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x /= exp(-1.702 * *x) + 1.0;
    }
}

#[inline(always)]
fn finish_body(
    out: &mut [f32],
    bias: Option<&[f32]>,
    act: Option<Activation>,
    residual: Option<&[f32]>,
) {
    add(out, bias);
    match act {
        Some(Activation::QuickGelu) => quick_gelu_body(out),
        Some(Activation::Gelu) => gelu_body(out),
        None => {}
    }
    add(out, residual);
}

#[inline(always)]
fn gelu_body(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = (erf(*x * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * *x;
    }
}

#[inline(always)]
fn softmax_body(row: &mut [f32], mask: Option<&[f32]>) {
    let max = add_mask_and_max(row, mask);

    let mut sums = [0f32; LANES];
    let mut chunks = row.chunks_exact_mut(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk) {
            *x = exp(*x - max);
            *s += *x;
        }
    }
    for (s, x) in sums.iter_mut().zip(chunks.into_remainder()) {
        *x = exp(*x - max);
        *s += *x;
    }
    let inv = 1.0 / sums.iter().sum::<f32>();

    row.iter_mut().for_each(|x| *x *= inv);
}

/// Adds `mask` to `row` (if given) and returns the row's maximum, in one pass with
/// [`LANES`] independent maxima.
#[inline(always)]
fn add_mask_and_max(row: &mut [f32], mask: Option<&[f32]>) -> f32 {
    // `x > m` rather than `f32::max`, which costs a NaN check per lane and step.
    let greater = |m: f32, x: f32| if x > m { x } else { m };
    let mut maxima = [f32::NEG_INFINITY; LANES];
    if let Some(mask) = mask {
        let mut chunks = row.chunks_exact_mut(LANES);
        let mut masks = mask.chunks_exact(LANES);
        for (chunk, mask) in (&mut chunks).zip(&mut masks) {
            for ((m, x), add) in maxima.iter_mut().zip(chunk).zip(mask) {
                *x += add;
                *m = greater(*m, *x);
            }
        }
        let tail = chunks.into_remainder().iter_mut().zip(masks.remainder());
        for (m, (x, add)) in maxima.iter_mut().zip(tail) {
            *x += add;
            *m = greater(*m, *x);
        }
    } else {
        let mut chunks = row.chunks_exact(LANES);
        for chunk in &mut chunks {
            for (m, x) in maxima.iter_mut().zip(chunk) {
                *m = greater(*m, *x);
            }
        }
        for (m, x) in maxima.iter_mut().zip(chunks.remainder()) {
            *m = greater(*m, *x);
        }
    }
    maxima.into_iter().fold(f32::NEG_INFINITY, greater)
}

#[inline(always)]
fn layer_norm_body(row: &[f32], weight: &[f32], bias: &[f32], eps: f32, out: &mut [f32]) {
    let n = row.len() as f32;
    let mean = lane_sum(row, |x| x) / n;
    let mean = mean + lane_sum(row, |x| x - mean) / n;
    let var = lane_sum(row, |x| (x - mean) * (x - mean)) / n;
    let inv = 1.0 / (var + eps).sqrt();

    for (((o, x), w), b) in out.iter_mut().zip(row).zip(weight).zip(bias) {
        *o = (x - mean) * inv * w + b;
    }
}

/// The sum of `f(x)` over `xs` in [`LANES`] partial sums (element `i` goes to lane
/// `i % LANES`), added up in lane order at the end.
#[inline(always)]
fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f32) -> f32 {
    let mut sums = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for chunk in &mut chunks {
        for (s, x) in sums.iter_mut().zip(chunk) {
            *s += f(*x);
        }
    }
    for (s, x) in sums.iter_mut().zip(chunks.remainder()) {
        *s += f(*x);
    }
    sums.iter().sum()
}

/// A module of the vector paths compiled for one set of target features: each function is
/// the shared body, which the compiler vectorises for those features.
macro_rules! vector_paths {
    ($name:ident, $features:literal, $cpu:literal) => {
        #[cfg(target_arch = "x86_64")]
        mod $name {
            /// # Safety
            #[doc = $cpu]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn quick_gelu(xs: &mut [f32]) {
                super::quick_gelu_body(xs);
            }

            /// # Safety
            #[doc = $cpu]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn finish(
                out: &mut [f32],
                bias: Option<&[f32]>,
                act: Option<super::Activation>,
                residual: Option<&[f32]>,
            ) {
                super::finish_body(out, bias, act, residual);
            }

            /// # Safety
            #[doc = $cpu]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn gelu(xs: &mut [f32]) {
                super::gelu_body(xs);
            }

            /// # Safety
            #[doc = $cpu]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn softmax(row: &mut [f32], mask: Option<&[f32]>) {
                super::softmax_body(row, mask);
            }

            /// # Safety
            #[doc = $cpu]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn layer_norm(
                row: &[f32],
                weight: &[f32],
                bias: &[f32],
                eps: f32,
                out: &mut [f32],
            ) {
                super::layer_norm_body(row, weight, bias, eps, out);
            }
        }
    };
}

vector_paths!(avx2, "avx2,fma", "The CPU has AVX2 and FMA.");
vector_paths!(avx512, "avx512f,avx2,fma", "The CPU has AVX-512F and FMA.");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_over_the_range() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.5 {
            let want = (x as f64).exp() as f32;
            let got = exp(x);
            worst = worst.max(got.to_bits().abs_diff(want.to_bits()));
            x += 0.000_37;
        }
        assert!(worst <= 2, "worst error {worst} ulp");
    }

    #[test]
    fn exp_edges() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        let top = exp(88.7);
        let want = (88.7f32 as f64).exp() as f32;
        assert!(
            top.is_finite() && (top / want - 1.0).abs() < 1e-6,
            "{top} vs {want}"
        );
    }

    /// Where the CPU takes the AVX-512 path, asserts that the AVX2 function `narrow` gives
    /// `wide`'s bits on `input`.
    #[cfg(target_arch = "x86_64")]
    fn assert_avx2_agrees(input: &[f32], wide: &[f32], narrow: unsafe fn(&mut [f32])) {
        if path() != Path::Avx512 {
            return;
        }
        assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
        let mut got = input.to_vec();
        // SAFETY: the CPU has AVX2 and FMA, asserted above.
        unsafe { narrow(&mut got) };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(wide),
            bits(&got),
            "both vector widths give the same bits"
        );
    }

    #[test]
    fn quick_gelu_matches_scalar() {
        let mut xs: Vec<f32> = (0..1003).map(|i| (i as f32 - 500.0) * 0.037).collect();
        xs.extend([60.0, -60.0, 0.0, -0.0]);
        let want: Vec<f32> = xs
            .iter()
            .map(|&x| activation_value(Activation::QuickGelu, x))
            .collect();
        let input = xs.clone();
        activate(&mut xs, Activation::QuickGelu);
        #[cfg(target_arch = "x86_64")]
        assert_avx2_agrees(&input, &xs, avx2::quick_gelu);
        for (g, w) in xs.iter().zip(&want) {
            assert!(
                (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                "got {g}, want {w}"
            );
        }
    }

    #[test]
    fn erf_is_within_its_bound_of_f64() {
        let mut worst = 0f64;
        let mut x = -6.0f32;
        while x < 6.0 {
            let want = candle_core::cpu::erf::erf_f64(x as f64);
            worst = worst.max((erf(x) as f64 - want).abs());
            x += 0.000_13;
        }
        assert!(worst < 1.4e-7, "worst error {worst:e}");
        assert_eq!(erf(0.0), 0.0);
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf(1e-30), 1.128_379_2e-30);
    }

    #[test]
    fn gelu_matches_scalar_and_both_widths_agree() {
        let mut xs: Vec<f32> = (0..4001).map(|i| (i as f32 - 2000.0) * 0.0037).collect();
        xs.extend([60.0, -60.0, 5.5, -5.5, 0.0, -0.0, f32::INFINITY, f32::NAN]);
        let want: Vec<f32> = xs
            .iter()
            .map(|&x| activation_value(Activation::Gelu, x))
            .collect();
        let input = xs.clone();
        activate(&mut xs, Activation::Gelu);
        #[cfg(target_arch = "x86_64")]
        assert_avx2_agrees(&input, &xs, avx2::gelu);
        for (&x, (g, w)) in input.iter().zip(xs.iter().zip(&want)) {
            if w.is_nan() || w.is_infinite() {
                assert!(
                    g.to_bits() == w.to_bits() || g.is_nan() && w.is_nan(),
                    "GELU of {x}"
                );
                continue;
            }
            let bound = 1e-7 * x.abs().max(1.0) + f32::EPSILON * w.abs();
            assert!((g - w).abs() <= bound, "GELU of {x}: got {g}, want {w}");
        }
    }

    #[test]
    fn layer_norm_of_equal_values_is_the_bias() {
        for (len, value) in [(1, 1000.1), (7, -7.7), (768, 0.1), (1000, 12345.6)] {
            let row = vec![value; len];
            let bias: Vec<f32> = (0..len).map(|i| i as f32 * 0.01).collect();
            let mut out = vec![f32::NAN; len];
            layer_norm(&row, &vec![1.5; len], &bias, 1e-12, &mut out);
            assert_eq!(out, bias, "{len} values of {value}");
        }
    }

    #[test]
    fn layer_norm_matches_f64_and_both_widths_agree() {
        for (len, offset) in [(1, 0.0), (7, 1.0), (64, 0.0), (577, -20.0), (768, 50.0)] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 11) as f32 * 0.3 - 1.5 + offset)
                .collect();
            let weight: Vec<f32> = (0..len).map(|i| 1.0 + (i % 5) as f32 * 0.1).collect();
            let bias: Vec<f32> = (0..len).map(|i| (i % 3) as f32 * 0.2 - 0.2).collect();
            let mut got = vec![0f32; len];
            layer_norm(&row, &weight, &bias, 1e-5, &mut got);

            let n = len as f64;
            let mean = row.iter().map(|&x| x as f64).sum::<f64>() / n;
            let var = row.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
            for (i, g) in got.iter().enumerate() {
                let want = (row[i] as f64 - mean) / (var + 1e-5).sqrt() * weight[i] as f64
                    + bias[i] as f64;
                assert!(
                    (*g as f64 - want).abs() < 1e-5,
                    "len {len}: got {g}, want {want}"
                );
            }
            #[cfg(target_arch = "x86_64")]
            if path() == Path::Avx512 {
                let mut narrow = vec![0f32; len];
                assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
                // SAFETY: the CPU has AVX2 and FMA, asserted above.
                unsafe { avx2::layer_norm(&row, &weight, &bias, 1e-5, &mut narrow) };
                assert_eq!(got, narrow, "both vector widths give the same bits");
            }
        }
    }

    #[test]
    fn softmax_matches_scalar_with_mask() {
        for len in [1, 7, 8, 9, 577] {
            let row: Vec<f32> = (0..len)
                .map(|i| ((i * 37) % 11) as f32 * 0.9 - 4.0)
                .collect();
            let mask: Vec<f32> = (0..len)
                .map(|i| if i % 5 == 3 { -10000.0 } else { 0.0 })
                .collect();
            let (mut got, mut want) = (row.clone(), row.clone());
            softmax(&mut got, Some(&mask));
            softmax_scalar(&mut want, Some(&mask));
            #[cfg(target_arch = "x86_64")]
            if path() == Path::Avx512 {
                let mut narrow = row;
                assert!(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"));
                // SAFETY: the CPU has AVX2 and FMA, asserted above.
                unsafe { avx2::softmax(&mut narrow, Some(&mask)) };
                assert_eq!(got, narrow, "both vector widths give the same bits");
            }
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-6, "len {len}: got {g}, want {w}");
            }
            let sum: f32 = got.iter().sum();
            assert!((sum - 1.0).abs() < 1e-5, "len {len}: sum {sum}");
        }
    }
}
