//! Inner product kernels, chosen once at run time from the CPU's features.
//!
//! The AVX-512 and AVX2+FMA kernels keep several independent accumulators so that the fused
//! multiply-adds of consecutive blocks overlap; every kernel reads only the common prefix of
//! its two slices, so slices of different lengths are never read out of bounds.

#![allow(unsafe_code)]

/// Signature shared by every kernel.
type Kernel = fn(&[f32], &[f32]) -> f32;

/// An inner product kernel that the running CPU supports.
#[derive(Clone, Copy)]
pub(crate) struct Dot {
    kernel: Kernel,
    name: &'static str,
}

impl Dot {
    /// The fastest kernel the CPU supports: AVX-512F, then AVX2 with FMA, then scalar.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Self {
                    kernel: x86::dot_avx512_checked,
                    name: "avx512f",
                };
            }
            let avx2 = std::arch::is_x86_feature_detected!("avx2");
            if avx2 && std::arch::is_x86_feature_detected!("fma") {
                return Self {
                    kernel: x86::dot_avx2_checked,
                    name: "avx2+fma",
                };
            }
        }
        Self::scalar()
    }

    /// The portable kernel.
    pub fn scalar() -> Self {
        Self {
            kernel: dot_scalar,
            name: "scalar",
        }
    }

    /// Name of the instruction set the kernel uses.
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Inner product over the common prefix of `a` and `b`.
    #[inline]
    pub fn call(&self, a: &[f32], b: &[f32]) -> f32 {
        (self.kernel)(a, b)
    }
}

/// Portable inner product in eight independent lanes, which the compiler vectorises with
/// whatever the baseline target offers.
pub(crate) fn dot_scalar(a: &[f32], b: &[f32]) -> f32 {
    const LANES: usize = 8;
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; LANES];
    let chunks_a = a.chunks_exact(LANES);
    let chunks_b = b.chunks_exact(LANES);
    let tail: f32 = chunks_a
        .remainder()
        .iter()
        .zip(chunks_b.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (ca, cb) in chunks_a.zip(chunks_b) {
        for lane in 0..LANES {
            acc[lane] += ca[lane] * cb[lane];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// Hints the CPU to start loading `data` into the cache; `lines` cache lines of 64 bytes at
/// most, never past the end of the slice. A no-op on other architectures.
#[inline]
pub(crate) fn prefetch<T>(data: &[T], lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let bytes = std::mem::size_of_val(data);
        let ptr = data.as_ptr().cast::<i8>();
        for line in 0..lines.min(bytes.div_ceil(64)) {
            // SAFETY: the address lies inside `data` (line * 64 < bytes); a prefetch never
            // faults and reads nothing observable. SSE is part of the x86_64 baseline.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(ptr.add(line * 64)) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (data, lines);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// AVX-512 kernel behind a safe signature; only handed out by [`super::Dot::detect`]
    /// after the CPU reported AVX-512F.
    pub(super) fn dot_avx512_checked(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `Dot::detect` selects this function only when AVX-512F is available.
        unsafe { dot_avx512(a, b) }
    }

    /// AVX2+FMA kernel behind a safe signature; only handed out by [`super::Dot::detect`]
    /// after the CPU reported both features.
    pub(super) fn dot_avx2_checked(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: `Dot::detect` selects this function only when AVX2 and FMA are available.
        unsafe { dot_avx2(a, b) }
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    unsafe fn dot_avx512(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm512_setzero_ps(); 4];
        let mut i = 0;
        while i + 64 <= n {
            for (lane, sum) in acc.iter_mut().enumerate() {
                let offset = i + lane * 16;
                // SAFETY: offset + 16 <= i + 64 <= n, inside both slices.
                let (x, y) = unsafe {
                    (
                        _mm512_loadu_ps(pa.add(offset)),
                        _mm512_loadu_ps(pb.add(offset)),
                    )
                };
                *sum = _mm512_fmadd_ps(x, y, *sum);
            }
            i += 64;
        }
        while i + 16 <= n {
            // SAFETY: i + 16 <= n, inside both slices.
            let (x, y) = unsafe { (_mm512_loadu_ps(pa.add(i)), _mm512_loadu_ps(pb.add(i))) };
            acc[0] = _mm512_fmadd_ps(x, y, acc[0]);
            i += 16;
        }
        let pairs = _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3]));
        let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
        _mm512_reduce_add_ps(pairs) + tail
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (lane, sum) in acc.iter_mut().enumerate() {
                let offset = i + lane * 8;
                // SAFETY: offset + 8 <= i + 32 <= n, inside both slices.
                let (x, y) = unsafe {
                    (
                        _mm256_loadu_ps(pa.add(offset)),
                        _mm256_loadu_ps(pb.add(offset)),
                    )
                };
                *sum = _mm256_fmadd_ps(x, y, *sum);
            }
            i += 32;
        }
        while i + 8 <= n {
            // SAFETY: i + 8 <= n, inside both slices.
            let (x, y) = unsafe { (_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i))) };
            acc[0] = _mm256_fmadd_ps(x, y, acc[0]);
            i += 8;
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let half = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps::<1>(sum));
        let quad = _mm_add_ps(half, _mm_movehl_ps(half, half));
        let single = _mm_add_ss(quad, _mm_shuffle_ps::<0b01>(quad, quad));
        let tail: f32 = a[i..n].iter().zip(&b[i..n]).map(|(x, y)| x * y).sum();
        _mm_cvtss_f32(single) + tail
    }

    #[cfg(test)]
    pub(super) fn available() -> Vec<(&'static str, super::Kernel)> {
        let mut kernels: Vec<(&'static str, super::Kernel)> = Vec::new();
        if std::arch::is_x86_feature_detected!("avx512f") {
            kernels.push(("avx512f", dot_avx512_checked));
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            kernels.push(("avx2+fma", dot_avx2_checked));
        }
        kernels
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut state = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    fn naive(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum()
    }

    #[test]
    fn every_available_kernel_matches_the_naive_sum_at_awkward_lengths() {
        #[cfg(target_arch = "x86_64")]
        let mut kernels = x86::available();
        #[cfg(not(target_arch = "x86_64"))]
        let mut kernels: Vec<(&'static str, Kernel)> = Vec::new();
        kernels.push(("scalar", dot_scalar));
        kernels.push(("detected", |a, b| Dot::detect().call(a, b)));
        for len in [
            0, 1, 7, 8, 15, 16, 17, 31, 33, 63, 64, 65, 100, 256, 257, 768,
        ] {
            let a = pseudo_random(len, len as u32 + 1);
            let b = pseudo_random(len, len as u32 + 99);
            let expected = naive(&a, &b);
            for (name, kernel) in &kernels {
                let got = f64::from(kernel(&a, &b));
                let tolerance = 1e-4 * (1.0 + expected.abs()) * (len as f64).sqrt().max(1.0);
                assert!(
                    (got - expected).abs() <= tolerance,
                    "{name} at length {len}: {got} vs {expected}"
                );
            }
        }
    }

    #[test]
    fn kernels_read_only_the_common_prefix() {
        let a = pseudo_random(40, 3);
        let b = pseudo_random(19, 4);
        let expected = naive(&a[..19], &b) as f32;
        assert!((Dot::detect().call(&a, &b) - expected).abs() < 1e-4);
        assert!((dot_scalar(&b, &a) - expected).abs() < 1e-4);
        assert!(!Dot::detect().name().is_empty());
    }
}
