//! Element-wise and row-wise ops: norms, activations, softmax.

/// In-place RMSNorm over rows of `x` (`[rows, dim]`): `x * rsqrt(mean(x²) + eps) * weight`.
pub fn rms_norm_inplace(x: &mut [f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    for row in x.chunks_exact_mut(dim) {
        let mean_sq = row.iter().map(|v| v * v).sum::<f32>() / dim as f32;
        let inv = 1.0 / (mean_sq + eps).sqrt();
        for (v, w) in row.iter_mut().zip(weight) {
            *v = *v * inv * w;
        }
    }
}

/// `silu(gate) * up`, written into `gate`.
pub fn silu_mul_inplace(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = silu_mul(*g, *u);
    }
}

/// `silu(g) · u`, one element of SwiGLU.
#[inline]
pub fn silu_mul(g: f32, u: f32) -> f32 {
    g / (1.0 + (-g).exp()) * u
}

/// `gate = gelu_tanh(gate) * up` (GeGLU with transformers' `gelu_pytorch_tanh`).
pub fn gelu_tanh_mul_inplace(gate: &mut [f32], up: &[f32]) {
    for (g, u) in gate.iter_mut().zip(up) {
        *g = gelu_tanh_mul(*g, *u);
    }
}

/// `gelu_tanh(x) · u`, one element of GeGLU.
#[inline]
pub fn gelu_tanh_mul(x: f32, u: f32) -> f32 {
    const SQRT_2_OVER_PI: f32 = 0.797_884_6;
    0.5 * x * (1.0 + (SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)).tanh()) * u
}

/// `tanh(x / cap) · cap` in place: logit soft-capping.
pub fn softcap_inplace(x: &mut [f32], cap: f32) {
    for v in x.iter_mut() {
        *v = (*v / cap).tanh() * cap;
    }
}

/// Numerically stable softmax in place.
pub fn softmax_inplace(x: &mut [f32]) {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut sum = 0.0;
    for v in x.iter_mut() {
        *v = (*v - max).exp();
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in x.iter_mut() {
        *v *= inv;
    }
}

pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// `acc += a * x`.
pub fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { avx512::axpy(acc, a, x) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are present (checked above).
        return unsafe { avx2::axpy(acc, a, x) };
    }
    for (o, v) in acc.iter_mut().zip(x) {
        *o += a * v;
    }
}

/// Asks the CPU to start loading `x` into cache (a hint: no effect on results). For reads the
/// hardware prefetchers cannot predict, such as one head's slice of successive cached rows a
/// page or more apart.
#[inline]
pub fn prefetch(x: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in x.chunks(16) {
        // SAFETY: a prefetch is only a hint; the address is inside `x`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr().cast(),
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = x;
}

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if avx512() {
        // SAFETY: AVX-512F is present (checked above).
        return unsafe { avx512::dot(a, b) };
    }
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 and FMA are present (checked above).
        return unsafe { avx2::dot(a, b) };
    }
    let mut acc = [0.0f32; 8];
    let chunks = a.len() / 8;
    for c in 0..chunks {
        for l in 0..8 {
            acc[l] += a[c * 8 + l] * b[c * 8 + l];
        }
    }
    let mut s: f32 = acc.iter().sum();
    for i in chunks * 8..a.len() {
        s += a[i] * b[i];
    }
    s
}

/// Attention's inner products run once per (query, key) and head: AVX-512 when the matmul
/// kernels use it (`SWITCHYARD_KERNELS` applies here too).
#[cfg(target_arch = "x86_64")]
fn avx512() -> bool {
    super::matmul::uses_avx512()
}

/// The same with AVX2 and FMA, on CPUs without AVX-512.
#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    super::matmul::uses_avx2()
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    /// The sum of the 8 lanes (the GEMM tiles in `matmul.rs` use it too).
    #[inline(always)]
    pub(in crate::cpu) fn hsum(v: __m256) -> f32 {
        // SAFETY: SSE / AVX register shuffles only; every caller enables AVX2.
        unsafe {
            let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
            let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
            _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
        }
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut acc0, mut acc1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: every load reads 8 floats at i <= n - 8 of both slices.
        unsafe {
            while i + 16 <= n {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i + 8)),
                    _mm256_loadu_ps(b.as_ptr().add(i + 8)),
                    acc1,
                );
                i += 16;
            }
            if i + 8 <= n {
                acc0 = _mm256_fmadd_ps(
                    _mm256_loadu_ps(a.as_ptr().add(i)),
                    _mm256_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                i += 8;
            }
        }
        let mut s = hsum(_mm256_add_ps(acc0, acc1));
        for j in i..n {
            s += a[j] * b[j];
        }
        s
    }

    /// # Safety
    /// The CPU must support AVX2 and FMA.
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
        let n = acc.len().min(x.len());
        let va = _mm256_set1_ps(a);
        let mut i = 0;
        // SAFETY: every access covers 8 floats at i <= n - 8 of both slices.
        unsafe {
            while i + 8 <= n {
                let o = acc.as_mut_ptr().add(i);
                _mm256_storeu_ps(
                    o,
                    _mm256_fmadd_ps(va, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(o)),
                );
                i += 8;
            }
        }
        for j in i..n {
            acc[j] += a * x[j];
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn dot(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (mut acc0, mut acc1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        let mut i = 0;
        // SAFETY: every load reads 16 floats at i < n - 15 of both slices.
        unsafe {
            while i + 32 <= n {
                acc0 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i)),
                    _mm512_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                acc1 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i + 16)),
                    _mm512_loadu_ps(b.as_ptr().add(i + 16)),
                    acc1,
                );
                i += 32;
            }
            if i + 16 <= n {
                acc0 = _mm512_fmadd_ps(
                    _mm512_loadu_ps(a.as_ptr().add(i)),
                    _mm512_loadu_ps(b.as_ptr().add(i)),
                    acc0,
                );
                i += 16;
            }
        }
        let mut s = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
        for j in i..n {
            s += a[j] * b[j];
        }
        s
    }

    /// # Safety
    /// The CPU must support AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn axpy(acc: &mut [f32], a: f32, x: &[f32]) {
        let n = acc.len().min(x.len());
        let va = _mm512_set1_ps(a);
        let mut i = 0;
        // SAFETY: every access covers 16 floats at i < n - 15 of both slices.
        unsafe {
            while i + 16 <= n {
                let o = acc.as_mut_ptr().add(i);
                _mm512_storeu_ps(
                    o,
                    _mm512_fmadd_ps(va, _mm512_loadu_ps(x.as_ptr().add(i)), _mm512_loadu_ps(o)),
                );
                i += 16;
            }
        }
        for j in i..n {
            acc[j] += a * x[j];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rms_norm_normalises_each_row() {
        let mut x = vec![3.0, 4.0, 0.0, 0.0];
        rms_norm_inplace(&mut x, &[1.0, 2.0], 0.0);
        let inv = 1.0 / (12.5f32).sqrt();
        assert!((x[0] - 3.0 * inv).abs() < 1e-6 && (x[1] - 8.0 * inv).abs() < 1e-6);
    }

    #[test]
    fn dot_and_axpy_match_the_plain_loops_on_every_length() {
        for n in [0usize, 1, 7, 15, 16, 17, 31, 32, 33, 64, 100, 128, 129] {
            let a: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37).sin()).collect();
            let b: Vec<f32> = (0..n).map(|i| (i as f32 * 0.11).cos()).collect();
            let want: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            assert!((dot(&a, &b) - want).abs() < 1e-4, "dot n={n}");
            let mut acc = b.clone();
            axpy(&mut acc, 0.5, &a);
            for i in 0..n {
                assert!(
                    (acc[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6,
                    "axpy n={n} i={i}"
                );
            }
            // The AVX2 path too where AVX-512 would be picked first.
            #[cfg(target_arch = "x86_64")]
            if avx2() {
                // SAFETY: AVX2 and FMA are present (checked above).
                let got = unsafe { avx2::dot(&a, &b) };
                assert!((got - want).abs() < 1e-4, "avx2 dot n={n}");
                let mut acc = b.clone();
                // SAFETY: as above.
                unsafe { avx2::axpy(&mut acc, 0.5, &a) };
                for i in 0..n {
                    assert!(
                        (acc[i] - (b[i] + 0.5 * a[i])).abs() < 1e-6,
                        "avx2 axpy n={n}"
                    );
                }
            }
        }
    }

    #[test]
    fn softmax_sums_to_one_and_survives_large_inputs() {
        let mut x = vec![1000.0, 1000.0, f32::NEG_INFINITY];
        softmax_inplace(&mut x);
        assert_eq!(x, vec![0.5, 0.5, 0.0]);
    }
}
