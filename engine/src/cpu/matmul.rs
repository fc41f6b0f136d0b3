//! `out = x · Wᵀ` for row-major activations and `[out_features, in_features]` weights.
//!
//! Decode is memory-bound: every weight byte is read once per step, so the kernels stream
//! weight rows in their stored precision and widen in registers. With AVX512-BF16 the
//! activations are rounded to bf16 once per call and `vdpbf16ps` does two multiply-adds per
//! lane; with AVX-512 only, bf16 weights are widened with a shift and fed to f32 FMAs. Tiles are
//! 4 activation rows × 4 weight rows so that a prefill reuses each loaded weight vector 4 times.
//!
//! Weights packed at load ([`PackedBf16`], wherever AVX512-BF16 is present) take the faster
//! road: AMX tiles for batches where the CPU has them, the register-blocked GEMM of
//! `packed_avx512` otherwise. The row-major kernels here serve the rest.

use std::cell::RefCell;

use half::bf16;

use crate::cpu::packed::{BLOCK_K, BLOCK_N, PackedBf16, PackedCall, PackedFp8};
use crate::error::{EngineError, Result};
use crate::tensor::{CpuStorage, Tensor};

/// Below this many multiply-adds a GEMM runs on the calling thread: splitting it costs more
/// than it saves.
const PARALLEL_MIN_MACS: usize = 1 << 16;

#[derive(Clone, Copy)]
struct OutPtr(*mut f32);
// SAFETY: every task writes a disjoint set of output columns; see `matmul_t`.
unsafe impl Send for OutPtr {}
unsafe impl Sync for OutPtr {}

impl OutPtr {
    // A method, so closures capture the whole (Sync) wrapper rather than its raw field.
    fn get(self) -> *mut f32 {
        self.0
    }
}

thread_local! {
    static BF16_SCRATCH: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// A pool thread's panel of FP8 weight widened to bf16 for the GEMMs of larger batches.
    static FP8_PANEL: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// Kernel sets, best first (the derived order is that ranking).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Isa {
    Avx512Bf16,
    Avx512,
    /// AVX2 with FMA (every x86-64 server since Haswell / Zen 1): 8 lanes.
    Avx2,
    Portable,
}

fn isa() -> Isa {
    use std::sync::OnceLock;
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(|| {
        let detected = detect_isa();
        // SWITCHYARD_KERNELS=portable|avx2|avx512 picks a lower kernel set than the CPU
        // allows, to measure the sets against each other; never a higher one.
        let asked = match std::env::var("SWITCHYARD_KERNELS").as_deref() {
            Ok("portable") => Isa::Portable,
            Ok("avx2") => Isa::Avx2,
            Ok("avx512") => Isa::Avx512,
            _ => detected,
        };
        // Declared best first: the larger of the two is the lower set.
        asked.max(detected)
    })
}

/// The kernel set this process uses: `avx512-bf16`, `avx512`, `avx2` or `portable`.
pub fn kernels() -> &'static str {
    match isa() {
        Isa::Avx512Bf16 => "avx512-bf16",
        Isa::Avx512 => "avx512",
        Isa::Avx2 => "avx2",
        Isa::Portable => "portable",
    }
}

/// Whether the AVX-512 kernels are in use (the element-wise ops follow the same choice).
pub(super) fn uses_avx512() -> bool {
    matches!(isa(), Isa::Avx512 | Isa::Avx512Bf16)
}

/// Whether AVX2 + FMA kernels may be used (true on AVX-512 CPUs too).
pub(super) fn uses_avx2() -> bool {
    isa() != Isa::Portable
}

fn detect_isa() -> Isa {
    {
        #[cfg(target_arch = "x86_64")]
        {
            let base = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            if base && is_x86_feature_detected!("avx512bf16") {
                return Isa::Avx512Bf16;
            }
            if base {
                return Isa::Avx512;
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }
}

/// Whether [`Tensor::pack_for_matmul`] layouts have kernels on this CPU (AVX512-BF16).
pub fn packed_kernels_available() -> bool {
    isa() == Isa::Avx512Bf16
}

/// Whether FP8 weights can stay FP8 here: the packed kernels, and AVX512-VBMI for the byte
/// lookups that widen the codes (every AVX512-BF16 CPU but Intel's Cooper Lake has it).
pub fn fp8_kernels_available() -> bool {
    use std::sync::OnceLock;
    static FP8: OnceLock<bool> = OnceLock::new();
    *FP8.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            packed_kernels_available() && is_x86_feature_detected!("avx512vbmi")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Whether AMX tiles are usable (CPU support, and the kernel granted this process the tile
/// state). Batches of [`AMX_MIN_ROWS`] rows or more then run on the tile units.
pub fn amx_available() -> bool {
    use std::sync::OnceLock;
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            packed_kernels_available()
                && std::env::var_os("SWITCHYARD_NO_AMX").is_none()
                && amx::request()
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// Rows from which a packed GEMM uses AMX tiles: a tile pass costs the same for 1 or 16 rows,
/// so below this the AVX512-BF16 kernel wins. Measured on decode, two runs alternating: at 2
/// rows AVX512-BF16 is ahead (Qwen3-0.6B 41-43 vs 36-37 tok/s, `mini` 103-111 vs 101-102), at
/// 3 they tie, from 4 AMX leads (at 8 rows 114-120 vs 74-75).
pub const AMX_MIN_ROWS: usize = 3;

/// Which kernel multiplies a packed weight.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum PackedPath {
    /// AVX512-BF16, the weight streamed once per 4 rows: below [`AMX_MIN_ROWS`] on AMX CPUs,
    /// where it was measured against the tiles, and FP8 weights up to [`FP8_STREAM_MAX_ROWS`].
    FewRows,
    /// AVX512-BF16, register-blocked over panels kept in cache: every batch without AMX. At
    /// one row it streams the weight as fast as [`PackedPath::FewRows`] or faster (Zen 4,
    /// `cargo bench --bench matmul`), and from 8 rows it is 2–4× faster.
    Blocked,
    /// AMX tiles.
    Amx,
}

/// Rows up to which an FP8 weight is streamed and widened in registers; above, each panel is
/// widened to bf16 once in cache and every row tile of the GEMM reuses it.
pub const FP8_STREAM_MAX_ROWS: usize = 4;

impl PackedPath {
    fn for_rows(m: usize, fp8: bool) -> PackedPath {
        if fp8 && m <= FP8_STREAM_MAX_ROWS {
            return PackedPath::FewRows;
        }
        match (amx_available(), m >= AMX_MIN_ROWS) {
            (true, true) => PackedPath::Amx,
            (true, false) => PackedPath::FewRows,
            (false, _) => PackedPath::Blocked,
        }
    }
}

/// A weight in one of the packed layouts.
#[derive(Clone, Copy)]
enum Packed<'a> {
    Bf16(&'a PackedBf16),
    Fp8(&'a PackedFp8),
}

impl Packed<'_> {
    fn dims(self) -> (usize, usize, usize, usize) {
        match self {
            Packed::Bf16(w) => (w.n(), w.k(), w.k_padded(), w.row_blocks()),
            Packed::Fp8(w) => (w.n(), w.k(), w.k_padded(), w.row_blocks()),
        }
    }
}

/// Bytes of bf16 weight one widened FP8 panel takes: it stays in L2 while the GEMM's row
/// tiles pass over it.
const FP8_PANEL_BYTES: usize = 512 << 10;

/// `x: [m, k]` f32 times a packed weight into `out: [m, n]`, every element written (stored,
/// never read), so `out` may be uninitialised.
///
/// # Safety
/// `out` is valid for writes of `m · n` f32s and not otherwise accessed meanwhile.
unsafe fn matmul_packed(x: &[f32], m: usize, w: Packed<'_>, out: *mut f32) {
    let path = PackedPath::for_rows(m, matches!(w, Packed::Fp8(_)));
    // SAFETY: guaranteed by the caller.
    unsafe { matmul_packed_with(x, m, w, out, path) }
}

/// # Safety
/// As [`matmul_packed`]; `path` is [`PackedPath::Amx`] only where [`amx_available`].
unsafe fn matmul_packed_with(x: &[f32], m: usize, w: Packed<'_>, out: *mut f32, path: PackedPath) {
    let use_amx = path == PackedPath::Amx;
    let (n, k, kp, blocks) = w.dims();
    // Activations as bf16, each row padded with zeros to the packed width. For AMX the rows are
    // padded to whole 16-row tiles and laid out tile by tile — `[row tile][k block][16 rows ×
    // 32]` — so each tile load reads 1 KiB of consecutive memory instead of 16 rows a whole
    // row apart (one page apart at k = 2048).
    let rows = if use_amx { m.next_multiple_of(16) } else { m };
    BF16_SCRATCH.with(|scratch| {
        let mut xb = scratch.borrow_mut();
        xb.clear();
        xb.resize(rows * kp, 0);
        if use_amx {
            let kbs = kp / BLOCK_K;
            for (r, src) in x.chunks_exact(k).enumerate() {
                let (mt, rr) = (r / 16, r % 16);
                for (kb, chunk) in src.chunks(BLOCK_K).enumerate() {
                    let base = ((mt * kbs + kb) * 16 + rr) * BLOCK_K;
                    to_bf16_bits(chunk, &mut xb[base..base + chunk.len()]);
                }
            }
        } else {
            for (dst, src) in xb.chunks_exact_mut(kp).zip(x.chunks_exact(k)) {
                to_bf16_bits(src, &mut dst[..k]);
            }
        }
        let xb = &xb[..];
        let ptr = OutPtr(out);
        let pool = super::pool::global();
        let tasks = if m * n * k < PARALLEL_MIN_MACS {
            1
        } else {
            (pool.threads() * 4).min(blocks.div_ceil(2))
        };
        // Whole pairs of row blocks per task (the AMX kernel works on pairs), whole register
        // tiles for the blocked kernel.
        let unit = if path == PackedPath::Blocked {
            super::packed_avx512::NR
        } else {
            2
        };
        let per = blocks.div_ceil(tasks.max(1)).next_multiple_of(unit);
        pool.run(blocks.div_ceil(per), &|t| {
            let (b0, b1) = (t * per, ((t + 1) * per).min(blocks));
            #[cfg(target_arch = "x86_64")]
            // SAFETY: AVX512-BF16 (and AMX when chosen) are present; `xb` holds `rows` padded
            // rows; this task owns output columns of blocks b0..b1.
            unsafe {
                match w {
                    Packed::Bf16(w) => packed_kernel(
                        path,
                        &PackedCall {
                            x: xb,
                            m,
                            kp,
                            w,
                            b0,
                            b1,
                            n,
                            out: ptr.get(),
                        },
                    ),
                    Packed::Fp8(w) if path == PackedPath::FewRows => {
                        super::packed_avx512::few_rows_fp8(xb, m, kp, w, b0, b1, n, ptr.get())
                    }
                    Packed::Fp8(w) => {
                        let panel = (FP8_PANEL_BYTES / (kp * BLOCK_N * 2))
                            .max(1)
                            .next_multiple_of(unit);
                        FP8_PANEL.with(|buf| {
                            let mut buf = buf.borrow_mut();
                            let mut p0 = b0;
                            while p0 < b1 {
                                let p1 = (p0 + panel).min(b1);
                                w.widen_blocks(p0, p1, &mut buf);
                                // The panel as a weight of its own: block 0 is block p0, and
                                // its rows are the outputs from column p0 · 16 on.
                                let part = PackedBf16 {
                                    data: std::mem::take(&mut *buf),
                                    n: (n - p0 * BLOCK_N).min((p1 - p0) * BLOCK_N),
                                    k,
                                };
                                let call = PackedCall {
                                    x: xb,
                                    m,
                                    kp,
                                    w: &part,
                                    b0: 0,
                                    b1: p1 - p0,
                                    n,
                                    out: ptr.get().add(p0 * BLOCK_N),
                                };
                                packed_kernel(path, &call);
                                *buf = part.data;
                                p0 = p1;
                            }
                        });
                    }
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            let _ = (t, b0, b1, xb, ptr, unit);
        });
    });
}

/// Runs `path`'s bf16 kernel on one task's share.
///
/// # Safety
/// As the kernels: AVX512-BF16 (and AMX for [`PackedPath::Amx`]) present, `call` in bounds.
#[cfg(target_arch = "x86_64")]
unsafe fn packed_kernel(path: PackedPath, call: &PackedCall<'_>) {
    // SAFETY: forwarded from the caller.
    unsafe {
        match path {
            PackedPath::Amx => amx::gemm_packed(call),
            PackedPath::Blocked => super::packed_avx512::blocked(call),
            PackedPath::FewRows => super::packed_avx512::few_rows(call),
        }
    }
}

/// `dst[i] = bf16(src[i])` as bits, rounded to nearest even, NaNs kept quiet — bit for bit
/// what `half::bf16::from_f32` gives, sixteen lanes at a time where AVX-512 is present (the
/// scalar conversion was ~6% of a dense prefill, on one thread while the pool waited).
pub fn to_bf16_bits(src: &[f32], dst: &mut [u16]) {
    assert_eq!(src.len(), dst.len(), "to_bf16_bits: lengths differ");
    #[cfg(target_arch = "x86_64")]
    if matches!(isa(), Isa::Avx512 | Isa::Avx512Bf16) {
        // SAFETY: AVX-512 F/BW are present (checked by `isa`).
        unsafe { to_bf16_bits_avx512(src, dst) };
        return;
    }
    for (d, &v) in dst.iter_mut().zip(src) {
        *d = bf16::from_f32(v).to_bits();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn to_bf16_bits_avx512(src: &[f32], dst: &mut [u16]) {
    use std::arch::x86_64::*;
    let whole = src.len() / 16 * 16;
    let (abs_mask, inf, lsb, round, quiet) = (
        _mm512_set1_epi32(0x7FFF_FFFF),
        _mm512_set1_epi32(0x7F80_0000),
        _mm512_set1_epi32(1),
        _mm512_set1_epi32(0x7FFF),
        _mm512_set1_epi32(0x0040),
    );
    for i in (0..whole).step_by(16) {
        // SAFETY: i + 16 <= whole <= len of both slices; unaligned loads and stores.
        unsafe {
            let x = _mm512_loadu_si512(src.as_ptr().add(i).cast());
            let hi = _mm512_srli_epi32::<16>(x);
            // Round to nearest even: add 0x7FFF plus the bit that becomes the last one kept.
            let bias = _mm512_add_epi32(round, _mm512_and_si512(hi, lsb));
            let rounded = _mm512_srli_epi32::<16>(_mm512_add_epi32(x, bias));
            // NaNs are not rounded (that could carry into the exponent): truncated, made quiet.
            let nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(x, abs_mask), inf);
            let r = _mm512_mask_or_epi32(rounded, nan, hi, quiet);
            _mm256_storeu_si256(dst.as_mut_ptr().add(i).cast(), _mm512_cvtepi32_epi16(r));
        }
    }
    for (d, &v) in dst[whole..].iter_mut().zip(&src[whole..]) {
        *d = half::bf16::from_f32(v).to_bits();
    }
}

fn check_shapes(x: usize, m: usize, n: usize, k: usize, out: usize) -> Result<()> {
    if x != m * k || out != m * n {
        return Err(EngineError::Shape(format!(
            "matmul: x has {x} elements for [{m}, {k}], out has {out} for [{m}, {n}]"
        )));
    }
    Ok(())
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]` for f32 slices, `w` holding `n` whole rows of `k` (a
/// leading part of a larger matrix is one).
pub fn matmul_t_f32(x: &[f32], m: usize, k: usize, w: &[f32], out: &mut [f32]) -> Result<()> {
    let n = w.len().checked_div(k).unwrap_or(0);
    if n * k != w.len() {
        return Err(EngineError::Shape(format!(
            "matmul: w has {} elements, not whole rows of {k}",
            w.len()
        )));
    }
    check_shapes(x.len(), m, n, k, out.len())?;
    if m > 0 && n > 0 {
        run_split(m, n, k, out, |n0, n1, o| {
            gemm_f32(isa(), x, m, k, w, n0, n1, n, o)
        });
    }
    Ok(())
}

/// `out[m, n] = Σ_k x[m, k] · w[n, k]`; `x` is `[m, k]` f32, `w` is `[n, k]` f32 or bf16.
pub fn matmul_t(x: &[f32], m: usize, w: &Tensor, out: &mut [f32]) -> Result<()> {
    let (n, k) = w.dims2()?;
    check_shapes(x.len(), m, n, k, out.len())?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    match w.cpu_storage() {
        CpuStorage::F32(wd) => run_split(m, n, k, out, |n0, n1, o| {
            gemm_f32(isa(), x, m, k, wd, n0, n1, n, o)
        }),
        // SAFETY: `out` holds m · n elements (checked above).
        CpuStorage::Bf16Packed(pw) => unsafe {
            matmul_packed(x, m, Packed::Bf16(pw), out.as_mut_ptr())
        },
        // SAFETY: as above.
        CpuStorage::Fp8Packed(pw) => unsafe {
            matmul_packed(x, m, Packed::Fp8(pw), out.as_mut_ptr())
        },
        CpuStorage::Bf16(wd) => {
            // SAFETY: bf16 is a transparent u16.
            let wbits: &[u16] =
                unsafe { std::slice::from_raw_parts(wd.as_ptr().cast::<u16>(), wd.len()) };
            if isa() == Isa::Avx512Bf16 {
                BF16_SCRATCH.with(|scratch| {
                    let mut xb = scratch.borrow_mut();
                    xb.clear();
                    xb.resize(x.len(), 0);
                    to_bf16_bits(x, &mut xb);
                    let xb = &xb[..];
                    run_split(m, n, k, out, |n0, n1, o| {
                        gemm_bf16_dp(xb, m, k, wbits, n0, n1, n, o)
                    });
                });
            } else {
                run_split(m, n, k, out, |n0, n1, o| {
                    gemm_bf16_widen(isa(), x, m, k, wbits, n0, n1, n, o)
                });
            }
        }
    }
    Ok(())
}

/// [`matmul_t`] into uninitialised memory (a new output need not be zeroed first: that memset
/// was ~4% of a dense prefill). Every element of `out` is written.
pub fn matmul_t_uninit(
    x: &[f32],
    m: usize,
    w: &Tensor,
    out: &mut [std::mem::MaybeUninit<f32>],
) -> Result<()> {
    let (n, k) = w.dims2()?;
    check_shapes(x.len(), m, n, k, out.len())?;
    let packed = match w.cpu_storage() {
        CpuStorage::Bf16Packed(pw) => Some(Packed::Bf16(pw)),
        CpuStorage::Fp8Packed(pw) => Some(Packed::Fp8(pw)),
        CpuStorage::F32(_) | CpuStorage::Bf16(_) => None,
    };
    if let Some(pw) = packed {
        if m > 0 && n > 0 {
            // SAFETY: `out` holds m · n elements, all of which the packed kernels store.
            unsafe { matmul_packed(x, m, pw, out.as_mut_ptr().cast()) };
        }
        return Ok(());
    }
    // The other kernels accumulate into `out`: start from zeros.
    for v in out.iter_mut() {
        v.write(0.0);
    }
    // SAFETY: every element was just initialised; MaybeUninit<f32> has f32's layout.
    let out = unsafe { &mut *(std::ptr::from_mut(out) as *mut [f32]) };
    matmul_t(x, m, w, out)
}

/// Splits the output columns across the thread pool when the GEMM is big enough.
fn run_split(
    m: usize,
    n: usize,
    k: usize,
    out: &mut [f32],
    kernel: impl Fn(usize, usize, OutPtr) + Sync,
) {
    let ptr = OutPtr(out.as_mut_ptr());
    let pool = super::pool::global();
    let threads = pool.threads();
    if threads <= 1 || m * n * k < PARALLEL_MIN_MACS || n < 8 {
        kernel(0, n, ptr);
        return;
    }
    // A few chunks per thread balance uneven progress; chunks stay whole 4-row tiles.
    let chunks = (threads * 4).min(n / 4).max(1);
    let per = n.div_ceil(chunks).next_multiple_of(4);
    pool.run(n.div_ceil(per), &|c| {
        let n0 = c * per;
        let n1 = (n0 + per).min(n);
        kernel(n0, n1, ptr);
    });
}

#[allow(clippy::too_many_arguments)]
fn gemm_f32(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[f32],
    n0: usize,
    n1: usize,
    ldo: usize,
    o: OutPtr,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: the CPU has AVX-512F/BW/VL (checked by `isa`); slices are in bounds
        // (checked by `matmul_t`); tasks write disjoint columns.
        Isa::Avx512 | Isa::Avx512Bf16 => {
            unsafe { avx512::gemm_f32(x, m, k, w, n0, n1, ldo, o.0) };
            return;
        }
        // SAFETY: as above, with AVX2 and FMA.
        Isa::Avx2 => {
            unsafe { avx2::gemm(x, m, k, w, n0, n1, ldo, o.0) };
            return;
        }
        Isa::Portable => {}
    }
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in n0..n1 {
            let wr = &w[j * k..(j + 1) * k];
            let v = super::ops::dot(xr, wr);
            // SAFETY: i < m, j < n; this task owns column range n0..n1.
            unsafe { *o.0.add(i * ldo + j) = v };
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_bf16_widen(
    isa: Isa,
    x: &[f32],
    m: usize,
    k: usize,
    w: &[u16],
    n0: usize,
    n1: usize,
    ldo: usize,
    o: OutPtr,
) {
    #[cfg(target_arch = "x86_64")]
    match isa {
        // SAFETY: as in `gemm_f32`.
        Isa::Avx512 | Isa::Avx512Bf16 => {
            unsafe { avx512::gemm_bf16_widen(x, m, k, w, n0, n1, ldo, o.0) };
            return;
        }
        // SAFETY: as in `gemm_f32`.
        Isa::Avx2 => {
            unsafe { avx2::gemm(x, m, k, w, n0, n1, ldo, o.0) };
            return;
        }
        Isa::Portable => {}
    }
    for i in 0..m {
        let xr = &x[i * k..(i + 1) * k];
        for j in n0..n1 {
            let wr = &w[j * k..(j + 1) * k];
            let mut acc = 0.0f32;
            for (a, &b) in xr.iter().zip(wr) {
                acc += a * crate::dtype::bf16_bits_to_f32(b);
            }
            // SAFETY: as above.
            unsafe { *o.0.add(i * ldo + j) = acc };
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn gemm_bf16_dp(
    x: &[u16],
    m: usize,
    k: usize,
    w: &[u16],
    n0: usize,
    n1: usize,
    ldo: usize,
    o: OutPtr,
) {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: only called when `isa()` found AVX512-BF16; bounds as in `gemm_f32`.
        unsafe { avx512::gemm_bf16_dp(x, m, k, w, n0, n1, ldo, o.0) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (x, m, k, w, n0, n1, ldo, o);
        unreachable!("AVX512-BF16 is only detected on x86_64");
    }
}

/// `out[m, n] += Σ_k x[m, k] · w[k, n]` where `w` is given as `k` rows of length `n`
/// (rows of a weight matrix used without transposing, as the absorbed MLA query needs).
pub fn matmul_nn_rows(
    x: &[f32],
    m: usize,
    k: usize,
    w: &Tensor,
    row0: usize,
    out: &mut [f32],
) -> Result<()> {
    let (rows, n) = w.dims2()?;
    if row0 + k > rows || x.len() != m * k || out.len() != m * n {
        return Err(EngineError::Shape(format!(
            "matmul_nn_rows: rows {row0}..{} of [{rows}, {n}] with x [{m}, {k}] ({} elements), out {} elements",
            row0 + k,
            x.len(),
            out.len()
        )));
    }
    match w.cpu_storage() {
        CpuStorage::Bf16Packed(_) | CpuStorage::Fp8Packed(_) => {
            return Err(EngineError::Shape(
                "matmul_nn_rows needs a row-major weight, got a packed one".into(),
            ));
        }
        CpuStorage::F32(wd) => {
            for i in 0..m {
                let o = &mut out[i * n..(i + 1) * n];
                for r in 0..k {
                    let a = x[i * k + r];
                    let wr = &wd[(row0 + r) * n..(row0 + r + 1) * n];
                    for (oj, &wj) in o.iter_mut().zip(wr) {
                        *oj += a * wj;
                    }
                }
            }
        }
        CpuStorage::Bf16(wd) => {
            for i in 0..m {
                let o = &mut out[i * n..(i + 1) * n];
                for r in 0..k {
                    let a = x[i * k + r];
                    let wr = &wd[(row0 + r) * n..(row0 + r + 1) * n];
                    for (oj, &wj) in o.iter_mut().zip(wr) {
                        *oj += a * f32::from(wj);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    const MR: usize = 4;
    const NR: usize = 4;
    const PREFETCH_ROWS: usize = 8;

    #[inline(always)]
    fn tail_mask16(rem: usize) -> __mmask16 {
        if rem >= 16 {
            0xffff
        } else {
            ((1u32 << rem) - 1) as __mmask16
        }
    }

    #[inline(always)]
    fn tail_mask32(rem: usize) -> __mmask32 {
        if rem >= 32 {
            0xffff_ffff
        } else {
            ((1u64 << rem) - 1) as __mmask32
        }
    }

    macro_rules! tiled {
        ($name:ident, $xt:ty, $tile:ty, $features:literal) => {
            #[target_feature(enable = $features)]
            #[allow(clippy::too_many_arguments)]
            pub(super) unsafe fn $name(
                x: &[$xt],
                m: usize,
                k: usize,
                w: &[<$tile as Tile>::W],
                n0: usize,
                n1: usize,
                ldo: usize,
                out: *mut f32,
            ) {
                let mut j = n0;
                while j < n1 {
                    let nr = (n1 - j).min(NR);
                    let mut i = 0;
                    while i < m {
                        let mr = (m - i).min(MR);
                        // SAFETY: rows i..i+mr of x and j..j+nr of w are in bounds; the
                        // caller owns output columns n0..n1.
                        unsafe {
                            match (mr, nr) {
                                (4, 4) => <$tile>::run::<4, 4>(x, k, w, i, j, ldo, out),
                                (4, 3) => <$tile>::run::<4, 3>(x, k, w, i, j, ldo, out),
                                (4, 2) => <$tile>::run::<4, 2>(x, k, w, i, j, ldo, out),
                                (4, 1) => <$tile>::run::<4, 1>(x, k, w, i, j, ldo, out),
                                (3, 4) => <$tile>::run::<3, 4>(x, k, w, i, j, ldo, out),
                                (3, 3) => <$tile>::run::<3, 3>(x, k, w, i, j, ldo, out),
                                (3, 2) => <$tile>::run::<3, 2>(x, k, w, i, j, ldo, out),
                                (3, 1) => <$tile>::run::<3, 1>(x, k, w, i, j, ldo, out),
                                (2, 4) => <$tile>::run::<2, 4>(x, k, w, i, j, ldo, out),
                                (2, 3) => <$tile>::run::<2, 3>(x, k, w, i, j, ldo, out),
                                (2, 2) => <$tile>::run::<2, 2>(x, k, w, i, j, ldo, out),
                                (2, 1) => <$tile>::run::<2, 1>(x, k, w, i, j, ldo, out),
                                (1, 4) => <$tile>::run::<1, 4>(x, k, w, i, j, ldo, out),
                                (1, 3) => <$tile>::run::<1, 3>(x, k, w, i, j, ldo, out),
                                (1, 2) => <$tile>::run::<1, 2>(x, k, w, i, j, ldo, out),
                                _ => <$tile>::run::<1, 1>(x, k, w, i, j, ldo, out),
                            }
                        }
                        i += mr;
                    }
                    j += nr;
                }
            }
        };
    }

    pub(super) trait Tile {
        type W;
    }

    /// A weight element type the FMA tile can widen to 16 f32 lanes.
    pub(super) trait Widen: Sized {
        /// Loads up to 16 elements (`mask`) at `ptr` as f32.
        ///
        /// # Safety
        /// The masked elements must be readable.
        unsafe fn load16(ptr: *const Self, mask: __mmask16) -> __m512;
    }

    impl Widen for f32 {
        #[inline(always)]
        unsafe fn load16(ptr: *const f32, mask: __mmask16) -> __m512 {
            // SAFETY: forwarded from the caller; AVX-512F is enabled by every caller.
            unsafe { _mm512_maskz_loadu_ps(mask, ptr) }
        }
    }

    impl Widen for u16 {
        /// bf16 bits: widening is a 16-bit shift into the high half of each f32.
        #[inline(always)]
        unsafe fn load16(ptr: *const u16, mask: __mmask16) -> __m512 {
            // SAFETY: forwarded from the caller; AVX-512BW/VL are enabled by every caller.
            unsafe {
                let raw = _mm256_maskz_loadu_epi16(mask, ptr.cast());
                _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)))
            }
        }
    }

    /// f32 activations × f32 or bf16 weights (widened in registers), 16 lanes of FMA.
    pub(super) struct FmaTile<W>(std::marker::PhantomData<W>);
    impl<W> Tile for FmaTile<W> {
        type W = W;
    }
    impl<W: Widen> FmaTile<W> {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn run<const M: usize, const N: usize>(
            x: &[f32],
            k: usize,
            w: &[W],
            i: usize,
            j: usize,
            ldo: usize,
            out: *mut f32,
        ) {
            let mut acc = [[_mm512_setzero_ps(); N]; M];
            let mut p = 0;
            while p < k {
                let mask = tail_mask16(k - p);
                let mut wv = [_mm512_setzero_ps(); N];
                for (c, v) in wv.iter_mut().enumerate() {
                    // SAFETY: masked load stays within row j + c.
                    *v = unsafe { W::load16(w.as_ptr().add((j + c) * k + p), mask) };
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: masked load stays within row i + r.
                    let xv =
                        unsafe { _mm512_maskz_loadu_ps(mask, x.as_ptr().add((i + r) * k + p)) };
                    for (c, a) in row.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(xv, wv[c], *a);
                    }
                }
                p += 16;
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    // SAFETY: (i + r, j + c) is inside the output.
                    unsafe { *out.add((i + r) * ldo + j + c) = _mm512_reduce_add_ps(*a) };
                }
            }
        }
    }

    /// bf16 activations × bf16 weights with `vdpbf16ps`: 32 k-elements per instruction.
    pub(super) struct DpTile;
    impl Tile for DpTile {
        type W = u16;
    }
    impl DpTile {
        #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
        #[allow(clippy::too_many_arguments)]
        unsafe fn run<const M: usize, const N: usize>(
            x: &[u16],
            k: usize,
            w: &[u16],
            i: usize,
            j: usize,
            ldo: usize,
            out: *mut f32,
        ) {
            let mut acc = [[_mm512_setzero_ps(); N]; M];
            // Rows are short (a few KiB), so the hardware prefetcher keeps restarting; fetch the
            // rows a couple of tiles ahead. Prefetching past the end is harmless.
            let ahead = w.as_ptr().wrapping_add((j + PREFETCH_ROWS) * k);
            let mut p = 0;
            while p < k {
                let mask = tail_mask32(k - p);
                let mut wv = [_mm512_setzero_si512(); N];
                for (c, v) in wv.iter_mut().enumerate() {
                    if M == 1 {
                        _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(c * k + p).cast());
                    }
                    // SAFETY: masked load stays within row j + c.
                    *v = unsafe {
                        _mm512_maskz_loadu_epi16(mask, w.as_ptr().add((j + c) * k + p).cast())
                    };
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    // SAFETY: masked load stays within row i + r.
                    let xv = unsafe {
                        _mm512_maskz_loadu_epi16(mask, x.as_ptr().add((i + r) * k + p).cast())
                    };
                    let xv: __m512bh = unsafe { std::mem::transmute(xv) };
                    for (c, a) in row.iter_mut().enumerate() {
                        // SAFETY: same-size bit reinterpretation.
                        let wb: __m512bh = unsafe { std::mem::transmute(wv[c]) };
                        *a = _mm512_dpbf16_ps(*a, xv, wb);
                    }
                }
                p += 32;
            }
            for (r, row) in acc.iter().enumerate() {
                for (c, a) in row.iter().enumerate() {
                    // SAFETY: (i + r, j + c) is inside the output.
                    unsafe { *out.add((i + r) * ldo + j + c) = _mm512_reduce_add_ps(*a) };
                }
            }
        }
    }

    tiled!(gemm_f32, f32, FmaTile<f32>, "avx512f,avx512bw,avx512vl");
    tiled!(
        gemm_bf16_widen,
        f32,
        FmaTile<u16>,
        "avx512f,avx512bw,avx512vl"
    );
    tiled!(
        gemm_bf16_dp,
        u16,
        DpTile,
        "avx512f,avx512bw,avx512vl,avx512bf16"
    );
}

/// The AVX2 + FMA kernels, for CPUs without AVX-512: 8-lane f32 FMA tiles of up to 4
/// activation rows × 3 weight rows (12 accumulators, 3 widened weights and one activation
/// vector: the 16 ymm registers), bf16 weights widened in registers.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::super::ops::avx2::hsum;

    const MR: usize = 4;
    const NR: usize = 3;

    /// A weight element type widened to 8 f32 lanes.
    pub(super) trait Widen8: Copy {
        /// Loads 8 elements at `ptr` as f32.
        ///
        /// # Safety
        /// 8 elements at `ptr` must be readable; AVX2 must be enabled by the caller.
        unsafe fn load8(ptr: *const Self) -> __m256;
        fn to_f32(self) -> f32;
    }

    impl Widen8 for f32 {
        #[inline(always)]
        unsafe fn load8(ptr: *const f32) -> __m256 {
            // SAFETY: forwarded from the caller.
            unsafe { _mm256_loadu_ps(ptr) }
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            self
        }
    }

    impl Widen8 for u16 {
        /// bf16 bits: widening is a 16-bit shift into the high half of each f32.
        #[inline(always)]
        unsafe fn load8(ptr: *const u16) -> __m256 {
            // SAFETY: forwarded from the caller.
            unsafe {
                let raw = _mm_loadu_si128(ptr.cast());
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(raw)))
            }
        }
        #[inline(always)]
        fn to_f32(self) -> f32 {
            crate::dtype::bf16_bits_to_f32(self)
        }
    }

    /// `out[i + r, j + c] = x[i + r] · w[j + c]` for r < M, c < N.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<W: Widen8, const M: usize, const N: usize>(
        x: &[f32],
        k: usize,
        w: &[W],
        i: usize,
        j: usize,
        ldo: usize,
        out: *mut f32,
    ) {
        let mut acc = [[_mm256_setzero_ps(); N]; M];
        let body = k - k % 8;
        let mut p = 0;
        while p < body {
            let mut wv = [_mm256_setzero_ps(); N];
            for (c, v) in wv.iter_mut().enumerate() {
                // SAFETY: p + 8 <= k within row j + c.
                *v = unsafe { W::load8(w.as_ptr().add((j + c) * k + p)) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: p + 8 <= k within row i + r.
                let xv = unsafe { _mm256_loadu_ps(x.as_ptr().add((i + r) * k + p)) };
                for (c, a) in row.iter_mut().enumerate() {
                    *a = _mm256_fmadd_ps(xv, wv[c], *a);
                }
            }
            p += 8;
        }
        for (r, row) in acc.iter().enumerate() {
            let xr = &x[(i + r) * k..(i + r + 1) * k];
            for (c, a) in row.iter().enumerate() {
                let wr = &w[(j + c) * k..(j + c + 1) * k];
                let mut sum = hsum(*a);
                for q in body..k {
                    sum += xr[q] * wr[q].to_f32();
                }
                // SAFETY: (i + r, j + c) is inside the output.
                unsafe { *out.add((i + r) * ldo + j + c) = sum };
            }
        }
    }

    /// `out[i, j] = x[i] · w[j]` for every row i < m and weight row n0 <= j < n1.
    ///
    /// # Safety
    /// AVX2 and FMA are present; `x` holds m rows and `w` n1 rows of k; `out` (row stride
    /// `ldo`) is writable at columns n0..n1 of m rows and not otherwise accessed meanwhile.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn gemm<W: Widen8>(
        x: &[f32],
        m: usize,
        k: usize,
        w: &[W],
        n0: usize,
        n1: usize,
        ldo: usize,
        out: *mut f32,
    ) {
        let mut j = n0;
        while j < n1 {
            let nr = (n1 - j).min(NR);
            let mut i = 0;
            while i < m {
                let mr = (m - i).min(MR);
                // SAFETY: rows i..i+mr of x and j..j+nr of w are in bounds (the caller's).
                unsafe {
                    match (mr, nr) {
                        (4, 3) => tile::<W, 4, 3>(x, k, w, i, j, ldo, out),
                        (4, 2) => tile::<W, 4, 2>(x, k, w, i, j, ldo, out),
                        (4, 1) => tile::<W, 4, 1>(x, k, w, i, j, ldo, out),
                        (3, 3) => tile::<W, 3, 3>(x, k, w, i, j, ldo, out),
                        (3, 2) => tile::<W, 3, 2>(x, k, w, i, j, ldo, out),
                        (3, 1) => tile::<W, 3, 1>(x, k, w, i, j, ldo, out),
                        (2, 3) => tile::<W, 2, 3>(x, k, w, i, j, ldo, out),
                        (2, 2) => tile::<W, 2, 2>(x, k, w, i, j, ldo, out),
                        (2, 1) => tile::<W, 2, 1>(x, k, w, i, j, ldo, out),
                        (1, 3) => tile::<W, 1, 3>(x, k, w, i, j, ldo, out),
                        (1, 2) => tile::<W, 1, 2>(x, k, w, i, j, ldo, out),
                        _ => tile::<W, 1, 1>(x, k, w, i, j, ldo, out),
                    }
                }
                i += mr;
            }
            j += nr;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod amx {
    use std::arch::asm;

    use crate::cpu::packed::{BLOCK_K, BLOCK_N, PackedCall};

    /// Asks Linux for permission to use the AMX tile state (`arch_prctl(ARCH_REQ_XCOMP_PERM,
    /// XFEATURE_XTILEDATA)`); without it the first tile instruction faults.
    pub(super) fn request() -> bool {
        // CPUID.(7,0):EDX bit 22 = AMX-BF16, bit 24 = AMX-TILE.
        let edx = std::arch::x86_64::__cpuid_count(7, 0).edx;
        if edx & (1 << 22) == 0 || edx & (1 << 24) == 0 {
            return false;
        }
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a plain Linux syscall (158 = arch_prctl) with integer arguments.
        unsafe {
            asm!("syscall", inlateout("rax") 158i64 => ret, in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA, lateout("rcx") _, lateout("r11") _, options(nostack));
        }
        ret == 0
    }

    #[repr(C, align(64))]
    struct TileConfig([u8; 64]);

    /// Every tile 16 rows × 64 bytes.
    fn config() -> TileConfig {
        let mut c = TileConfig([0; 64]);
        c.0[0] = 1; // palette 1
        for t in 0..8 {
            c.0[16 + 2 * t] = 64;
            c.0[48 + t] = 16;
        }
        c
    }

    /// Bytes of weights one panel keeps hot in L2 while every row tile passes over it.
    const PANEL_BYTES: usize = 256 << 10;

    /// Row blocks `b0..b1` (an even count, or running to the end) of a packed weight times all
    /// `m` activation rows, 16 rows × 32 outputs per tile pass.
    ///
    /// The blocks go in panels of about [`PANEL_BYTES`]: every row tile runs over one panel
    /// before the next is touched, so a weight is read from memory once per call rather than
    /// once per 16 rows (which made large prefills memory-bound).
    ///
    /// # Safety
    /// AMX must be granted; `x` holds `m` rounded up to 16 rows of `kp` bf16, tile by tile
    /// (`[row tile][k block][16 × 32]`).
    pub(super) unsafe fn gemm_packed(call: &PackedCall<'_>) {
        let PackedCall {
            x,
            m,
            kp,
            w,
            b0,
            b1,
            n,
            out,
        } = *call;
        let cfg = config();
        let kbs = kp / BLOCK_K;
        let block_bytes = BLOCK_K * BLOCK_N * 2;
        // Four 16 × 16 f32 result tiles: (row tile 0, 1) × (column block 0, 1).
        const TILE: usize = 16 * BLOCK_N;
        let mut c = [0f32; 4 * TILE];
        let mtiles = m.div_ceil(16);
        // SAFETY: a valid palette-1 configuration.
        unsafe { asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr(), options(nostack)) };
        let panel = (PANEL_BYTES / (kbs * block_bytes)).max(2) & !1;
        let mut p0 = b0;
        while p0 < b1 {
            let p1 = (p0 + panel).min(b1);
            let mut mt = 0;
            while mt < mtiles {
                // Two row tiles at a time where there are two: each weight tile loaded then
                // feeds two tile products.
                let pair = mt + 1 < mtiles;
                let mut nb = p0;
                while nb < p1 {
                    // An odd last block pairs with itself; its second result is dropped.
                    let nb2 = if nb + 1 < p1 { nb + 1 } else { nb };
                    // Whole tiles (every row < m, two full column blocks) are stored straight
                    // into the output, a row of the output apart; the rest go through `c`
                    // and are copied in part below.
                    let row_tiles = if pair { 2 } else { 1 };
                    let direct =
                        (mt + row_tiles) * 16 <= m && nb2 != nb && (nb2 + 1) * BLOCK_N <= w.n;
                    let (cp, cs) = if direct {
                        // SAFETY: row mt·16 < m and column nb·16 < n of the output.
                        (unsafe { out.add(mt * 16 * n + nb * BLOCK_N) }, n * 4)
                    } else {
                        (c.as_mut_ptr(), 64)
                    };
                    // Tile (row tile r, column block t) of this step.
                    let at = |r: usize, t: usize| -> *mut f32 {
                        // SAFETY: inside the output (direct) or inside `c`.
                        unsafe {
                            if direct {
                                cp.add(r * 16 * n + t * BLOCK_N)
                            } else {
                                cp.add((r * 2 + t) * TILE)
                            }
                        }
                    };
                    // SAFETY: pointers stay inside x (m rounded up to 16 rows, so row tile
                    // mt + 1 exists when `pair`) and the packed data (kbs blocks each).
                    unsafe {
                        let a = x.as_ptr().add(mt * 16 * kp);
                        let a2 = x.as_ptr().add((mt + 1).min(mtiles - 1) * 16 * kp);
                        let w0 = w.data.as_ptr().add(nb * kbs * BLOCK_K * BLOCK_N);
                        let w1 = w.data.as_ptr().add(nb2 * kbs * BLOCK_K * BLOCK_N);
                        if pair {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "tilezero tmm2",
                                "tilezero tmm3",
                                "2:",
                                "tileloadd tmm4, [{a} + {astride}*1]",
                                "tileloadd tmm6, [{w0} + {wstride}*1]",
                                "tileloadd tmm7, [{w1} + {wstride}*1]",
                                "tileloadd tmm5, [{a2} + {astride}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "tdpbf16ps tmm2, tmm5, tmm6",
                                "tdpbf16ps tmm3, tmm5, tmm7",
                                "add {a}, {ab}",
                                "add {a2}, {ab}",
                                "add {w0}, {bb}",
                                "add {w1}, {bb}",
                                "dec {cnt}",
                                "jnz 2b",
                                "tilestored [{c0} + {cstride}*1], tmm0",
                                "tilestored [{c1} + {cstride}*1], tmm1",
                                "tilestored [{c2} + {cstride}*1], tmm2",
                                "tilestored [{c3} + {cstride}*1], tmm3",
                                a = inout(reg) a => _,
                                a2 = inout(reg) a2 => _,
                                w0 = inout(reg) w0 => _,
                                w1 = inout(reg) w1 => _,
                                cnt = inout(reg) kbs => _,
                                astride = in(reg) 64usize,
                                wstride = in(reg) 64usize,
                                bb = in(reg) block_bytes,
                                ab = in(reg) 16 * BLOCK_K * 2,
                                c0 = in(reg) at(0, 0),
                                c1 = in(reg) at(0, 1),
                                c2 = in(reg) at(1, 0),
                                c3 = in(reg) at(1, 1),
                                cstride = in(reg) cs,
                                options(nostack),
                            );
                        } else {
                            asm!(
                                "tilezero tmm0",
                                "tilezero tmm1",
                                "2:",
                                "tileloadd tmm4, [{a} + {astride}*1]",
                                "tileloadd tmm6, [{w0} + {wstride}*1]",
                                "tileloadd tmm7, [{w1} + {wstride}*1]",
                                "tdpbf16ps tmm0, tmm4, tmm6",
                                "tdpbf16ps tmm1, tmm4, tmm7",
                                "add {a}, {ab}",
                                "add {w0}, {bb}",
                                "add {w1}, {bb}",
                                "dec {cnt}",
                                "jnz 2b",
                                "tilestored [{c0} + {cstride}*1], tmm0",
                                "tilestored [{c1} + {cstride}*1], tmm1",
                                a = inout(reg) a => _,
                                w0 = inout(reg) w0 => _,
                                w1 = inout(reg) w1 => _,
                                cnt = inout(reg) kbs => _,
                                astride = in(reg) 64usize,
                                wstride = in(reg) 64usize,
                                bb = in(reg) block_bytes,
                                ab = in(reg) 16 * BLOCK_K * 2,
                                c0 = in(reg) at(0, 0),
                                c1 = in(reg) at(0, 1),
                                cstride = in(reg) cs,
                                options(nostack),
                            );
                        }
                    }
                    let col_tiles = if nb2 != nb { 2 } else { 1 };
                    for rt in (0..row_tiles).filter(|_| !direct) {
                        let r0 = (mt + rt) * 16;
                        for (t, blk) in [nb, nb2].into_iter().enumerate().take(col_tiles) {
                            let tile = &c[(rt * 2 + t) * TILE..(rt * 2 + t + 1) * TILE];
                            let cols = (w.n - blk * BLOCK_N).min(BLOCK_N);
                            for r in 0..16.min(m.saturating_sub(r0)) {
                                let src = &tile[r * 16..r * 16 + cols];
                                // SAFETY: row r0 + r < m, columns of block blk < n.
                                unsafe {
                                    std::ptr::copy_nonoverlapping(
                                        src.as_ptr(),
                                        out.add((r0 + r) * n + blk * BLOCK_N),
                                        cols,
                                    );
                                }
                            }
                        }
                    }
                    nb = nb2 + 1;
                }
                mt += if pair { 2 } else { 1 };
            }
            p0 = p1;
        }
        // SAFETY: releases this thread's tile state.
        unsafe { asm!("tilerelease", options(nostack)) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Into a buffer that held NaNs, every storage and batch size gives what `matmul_t` gives
    /// into zeros: every element is written, none is read.
    #[test]
    fn matmul_into_uninitialised_memory_writes_every_element() {
        use std::mem::MaybeUninit;
        for &(m, n, k) in &[(1, 17, 40), (5, 33, 64), (40, 64, 1024), (33, 50, 96)] {
            let x = pseudo(m * k, 7);
            let f = Tensor::from_f32(&[n, k], pseudo(n * k, 8)).unwrap();
            for w in [f.clone(), f.to_bf16(), f.to_bf16().pack_for_matmul()] {
                let mut want = vec![0.0; m * n];
                matmul_t(&x, m, &w, &mut want).unwrap();
                let mut buf = vec![MaybeUninit::new(f32::NAN); m * n];
                matmul_t_uninit(&x, m, &w, &mut buf).unwrap();
                // SAFETY: every element was initialised (to NaN, then by the GEMM).
                let got: Vec<f32> = buf.iter().map(|v| unsafe { v.assume_init() }).collect();
                assert_eq!(got, want, "{m}x{n}x{k} {:?}", w.dtype());
            }
        }
    }

    /// The vector conversion gives `half`'s bits for every kind of value: ties to even both
    /// ways, carries into the exponent, the largest finite values rounding to infinity,
    /// subnormals, infinities and NaNs (signalling ones made quiet), and a tail shorter than a
    /// vector.
    #[test]
    fn bf16_conversion_matches_half_bit_for_bit() {
        let mut values: Vec<f32> = [
            0x3F80_8000u32, // tie, even below: stays
            0x3F81_8000,    // tie, odd below: rounds up
            0x3F80_8001,
            0x3F80_7FFF,
            0x3FFF_FFFF, // carries into the exponent
            0x7F7F_FFFF, // largest finite: rounds to infinity
            0x0000_0001, // smallest subnormal
            0x0040_8000,
            0x7F80_0000, // infinity
            0xFF80_0000,
            0x7F80_0001, // signalling NaN
            0x7FC0_0000,
            0xFFFF_FFFF,
            0x8000_0000,
            0xBF81_8000,
        ]
        .iter()
        .map(|&b| f32::from_bits(b))
        .collect();
        let mut s = 12345u32;
        for _ in 0..10_000 {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            values.push(f32::from_bits(s));
        }
        for len in [values.len(), 37, 16, 15, 1, 0] {
            let src = &values[..len];
            let mut got = vec![0u16; len];
            to_bf16_bits(src, &mut got);
            for (i, (&v, &g)) in src.iter().zip(&got).enumerate() {
                assert_eq!(
                    g,
                    bf16::from_f32(v).to_bits(),
                    "value {i}: {:#010x}",
                    v.to_bits()
                );
            }
        }
    }

    fn reference(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k)
                    .map(|p| x[i * k + p] as f64 * w[j * k + p] as f64)
                    .sum::<f64>() as f32;
            }
        }
        out
    }

    fn pseudo(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2654435761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn f32_matmul_matches_reference_on_ragged_shapes() {
        for &(m, n, k) in &[
            (1, 1, 1),
            (1, 7, 33),
            (3, 5, 17),
            (4, 4, 16),
            (5, 9, 100),
            (13, 70, 300),
        ] {
            let x = pseudo(m * k, 1);
            let w = pseudo(n * k, 2);
            let wt = Tensor::from_f32(&[n, k], w.clone()).unwrap();
            let mut out = vec![0.0; m * n];
            matmul_t(&x, m, &wt, &mut out).unwrap();
            let r = reference(&x, m, k, &w, n);
            for (a, b) in out.iter().zip(&r) {
                assert!((a - b).abs() < 1e-4, "{m}x{n}x{k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn bf16_matmul_matches_reference_within_bf16_rounding() {
        for &(m, n, k) in &[(1, 3, 31), (2, 9, 64), (6, 33, 129), (16, 64, 1024)] {
            let x = pseudo(m * k, 3);
            let w = pseudo(n * k, 4);
            let wt = Tensor::from_f32(&[n, k], w.clone()).unwrap().to_bf16();
            let wr: Vec<f32> = wt.to_f32().as_f32().unwrap().to_vec();
            let mut out = vec![0.0; m * n];
            matmul_t(&x, m, &wt, &mut out).unwrap();
            let r = reference(&x, m, k, &wr, n);
            for (a, b) in out.iter().zip(&r) {
                // Activations may be rounded to bf16 too: relative error ~2^-8 per term.
                let tol = 2e-2 * (k as f32).sqrt();
                assert!((a - b).abs() < tol, "{m}x{n}x{k}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn packed_matmul_matches_row_major_for_every_batch_size() {
        // Small batches take the streaming AVX512-BF16 kernel, larger ones the blocked one, or
        // AMX tiles where present.
        for &(m, n, k) in &[
            (1, 17, 40),
            (3, 16, 32),
            (4, 40, 64),
            (8, 33, 96),
            (19, 48, 100),
            (40, 64, 1024),
            (70, 50, 96),
            // AMX: several weight panels of 2 blocks, an odd last block, k of 50 blocks.
            (33, 300, 1600),
            // Blocked: a second k pass (66 blocks), ragged row and column tiles.
            (13, 20, 2100),
            // Blocked: two row bands and three k passes (130 blocks, the last of 2).
            (100, 70, 4160),
        ] {
            let x = pseudo(m * k, 5);
            let w = Tensor::from_f32(&[n, k], pseudo(n * k, 6))
                .unwrap()
                .to_bf16();
            let packed = w.clone().pack_for_matmul();
            let mut a = vec![0.0; m * n];
            let mut b = vec![0.0; m * n];
            matmul_t(&x, m, &w, &mut a).unwrap();
            matmul_t(&x, m, &packed, &mut b).unwrap();
            for (p, q) in a.iter().zip(&b) {
                assert!(
                    (p - q).abs() < 1e-3 * (k as f32).sqrt(),
                    "{m}x{n}x{k}: {p} vs {q}"
                );
            }
            // Both packed kernels on every shape, whichever the dispatcher would pick.
            let CpuStorage::Bf16Packed(pw) = packed.cpu_storage() else {
                continue; // no AVX512-BF16 here: nothing was packed
            };
            let mut paths = vec![PackedPath::FewRows, PackedPath::Blocked];
            if amx_available() {
                paths.push(PackedPath::Amx);
            }
            for path in paths {
                let mut c = vec![f32::NAN; m * n];
                // SAFETY: c holds m · n elements.
                unsafe { matmul_packed_with(&x, m, Packed::Bf16(pw), c.as_mut_ptr(), path) };
                for (p, q) in a.iter().zip(&c) {
                    assert!(
                        (p - q).abs() < 1e-3 * (k as f32).sqrt(),
                        "{path:?} {m}x{n}x{k}: {p} vs {q}"
                    );
                }
            }
        }
    }

    /// An FP8 weight on every packed kernel: the GEMMs over panels widened in cache multiply
    /// bit for bit as the checkpoint's bf16 dequantisation does; the stream that widens in
    /// registers and scales per block in f32 is within f32 rounding of the exact products
    /// (closer than the bf16 dequantisation, which rounds every weight).
    #[test]
    fn fp8_matmul_equals_its_bf16_dequantisation_on_every_kernel() {
        if !fp8_kernels_available() {
            eprintln!("SKIPPED: no AVX512-BF16 + VBMI here, FP8 weights are widened at load");
            return;
        }
        for &(m, n, k) in &[
            (1, 17, 40),
            (2, 300, 256),
            (3, 20, 2100),
            (4, 40, 1600),
            (5, 33, 96),
            (13, 20, 2100),
            (33, 300, 1600),
            (100, 70, 4160),
        ] {
            let x = pseudo(m * k, 9);
            let values = pseudo(n * k, 10);
            let (codes, scales) = crate::synth::quantize_fp8_blocks(&values, n, k, 128);
            let fp8 = PackedFp8::pack(&codes, n, k, &scales, [128, 128]).unwrap();
            let bf16 = fp8.to_bf16();
            let mut paths = vec![PackedPath::Blocked];
            if amx_available() {
                paths.push(PackedPath::Amx);
            }
            for path in paths {
                let mut want = vec![f32::NAN; m * n];
                let mut got = vec![f32::NAN; m * n];
                // SAFETY: both hold m · n elements.
                unsafe {
                    matmul_packed_with(&x, m, Packed::Bf16(&bf16), want.as_mut_ptr(), path);
                    matmul_packed_with(&x, m, Packed::Fp8(&fp8), got.as_mut_ptr(), path);
                }
                let same = want
                    .iter()
                    .zip(&got)
                    .all(|(a, b)| a.to_bits() == b.to_bits());
                assert!(same, "{path:?} {m}x{n}x{k}: FP8 and its bf16 differ");
            }
            // The stream against the exact products of bf16 activations and FP8 weights.
            let mut got = vec![f32::NAN; m * n];
            // SAFETY: got holds m · n elements.
            unsafe {
                matmul_packed_with(
                    &x,
                    m,
                    Packed::Fp8(&fp8),
                    got.as_mut_ptr(),
                    PackedPath::FewRows,
                )
            };
            let sc = k.div_ceil(128);
            for i in 0..m {
                for j in 0..n {
                    let (mut exact, mut size) = (0f64, 0f64);
                    for p in 0..k {
                        let a = f64::from(bf16::from_f32(x[i * k + p]).to_f32());
                        let w = f64::from(crate::dtype::f8e4m3_to_f32(codes[j * k + p]))
                            * f64::from(scales[(j / 128) * sc + p / 128]);
                        exact += a * w;
                        size += (a * w).abs();
                    }
                    let g = f64::from(got[i * n + j]);
                    assert!(
                        (g - exact).abs() <= 1e-5 * size + 1e-6,
                        "FewRows {m}x{n}x{k} [{i}, {j}]: {g} vs exact {exact}"
                    );
                }
            }
            // What the dispatcher picks, through the public entry point.
            let t = Tensor::from_fp8_packed(fp8.clone());
            let mut c = vec![0.0; m * n];
            matmul_t(&x, m, &t, &mut c).unwrap();
            let mut d = vec![0.0; m * n];
            // SAFETY: d holds m · n elements.
            unsafe {
                let path = PackedPath::for_rows(m, true);
                matmul_packed_with(&x, m, Packed::Fp8(&fp8), d.as_mut_ptr(), path)
            };
            assert_eq!(c, d, "{m}x{n}x{k}");
        }
    }

    /// The kernels this CPU does not pick by itself (the AVX-512 widening one and the portable
    /// loops), run directly so they are checked here too.
    #[test]
    fn fallback_kernels_match_reference() {
        let mut isas = vec![Isa::Portable];
        // Every AVX-512 CPU has AVX2 and FMA too.
        if isa() != Isa::Portable {
            isas.push(Isa::Avx2);
        }
        if matches!(isa(), Isa::Avx512 | Isa::Avx512Bf16) {
            isas.push(Isa::Avx512);
        }
        // Every tile shape (rows 1–4 × columns 1–3, and 5+ rows for a second row tile), k
        // below, at and past one 8-lane step, with and without a tail.
        for &(m, n, k) in &[
            (1, 5, 33),
            (6, 9, 100),
            (4, 3, 8),
            (5, 7, 7),
            (9, 4, 2048),
            (2, 1, 17),
        ] {
            let x = pseudo(m * k, 7);
            let wf = pseudo(n * k, 8);
            let wb: Vec<u16> = wf.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            let wr: Vec<f32> = wb
                .iter()
                .map(|&b| crate::dtype::bf16_bits_to_f32(b))
                .collect();
            for &isa in &isas {
                let mut out = vec![0.0; m * n];
                gemm_f32(isa, &x, m, k, &wf, 0, n, n, OutPtr(out.as_mut_ptr()));
                for (a, b) in out.iter().zip(&reference(&x, m, k, &wf, n)) {
                    assert!((a - b).abs() < 1e-4, "{isa:?} f32 {m}x{n}x{k}: {a} vs {b}");
                }
                gemm_bf16_widen(isa, &x, m, k, &wb, 0, n, n, OutPtr(out.as_mut_ptr()));
                for (a, b) in out.iter().zip(&reference(&x, m, k, &wr, n)) {
                    assert!((a - b).abs() < 1e-4, "{isa:?} bf16 {m}x{n}x{k}: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn matmul_rejects_mismatched_shapes() {
        let w = Tensor::from_f32(&[2, 3], vec![0.0; 6]).unwrap();
        let mut out = vec![0.0; 2];
        assert!(matmul_t(&[0.0; 4], 1, &w, &mut out).is_err());
    }

    #[test]
    fn matmul_nn_rows_uses_the_requested_rows() {
        // w = [[1, 2], [3, 4], [5, 6]]; rows 1..3 times x = [1, 1] -> [8, 10].
        let w = Tensor::from_f32(&[3, 2], vec![1., 2., 3., 4., 5., 6.]).unwrap();
        let mut out = vec![0.0; 2];
        matmul_nn_rows(&[1.0, 1.0], 1, 2, &w, 1, &mut out).unwrap();
        assert_eq!(out, vec![8.0, 10.0]);
    }
}
