//! The AVX512-BF16 kernels over the packed weight layout ([`PackedBf16`]).
//!
//! [`blocked`] serves every batch on CPUs without AMX tiles: a register-blocked GEMM — an
//! [`MR`] × ([`NR`] · 16) tile of f32 accumulators in the zmm registers, fed by `vdpbf16ps`
//! with one broadcast activation pair and one 64-byte weight row per step — with the row loop
//! inside the column loop, so that each weight panel is read from memory once per band of rows
//! ([`BAND_BYTES`]) and from L2 for every tile after the first. At one row it is a plain
//! weight stream. [`few_rows`] serves the batches below [`super::matmul::AMX_MIN_ROWS`] on AMX
//! CPUs, where it was measured against the tiles: several weight blocks as parallel memory
//! streams, each weight byte read once per 4 rows. [`few_rows_fp8`] is the same stream over FP8
//! codes, widened to exact bf16 code values in registers by byte-table lookups and scaled per
//! block in f32 ([`rows_fp8`]); [`widen_fp8`] widens whole blocks, scale applied, for the GEMMs
//! of larger batches (bit for bit the checkpoint's bf16 dequantisation).

use std::arch::x86_64::*;

use crate::cpu::packed::{BLOCK_K, BLOCK_N, PackedCall, PackedFp8};

/// How far ahead (in bytes) each weight stream is prefetched.
const PREFETCH_BYTES: usize = 2048;

/// Row blocks `b0..b1` of a packed weight times up to 4 activation rows at a time: the whole
/// weight range is streamed once per 4 rows, which is what a decode step wants.
///
/// # Safety
/// AVX512-BF16 is present; the call's `x` holds `m` rows of `kp` bf16; `out` holds `m` rows of `n`
/// f32 and the caller owns columns of blocks `b0..b1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn few_rows(call: &PackedCall<'_>) {
    let w = call.w;
    let src = Stream {
        base: w.data.as_ptr().cast(),
        scales: std::ptr::null(),
        cols: w.n,
    };
    // SAFETY: forwarded from the caller.
    unsafe {
        few_rows_from::<false>(
            call.x, call.m, call.kp, &src, call.b0, call.b1, call.n, call.out,
        )
    }
}

/// [`few_rows`] over FP8 codes: the same stream at half the bytes, widened in registers
/// ([`rows_fp8`]).
///
/// # Safety
/// As [`few_rows`], with `w` for the call's weight, and AVX512-VBMI present.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn few_rows_fp8(
    x: &[u16],
    m: usize,
    kp: usize,
    w: &PackedFp8,
    b0: usize,
    b1: usize,
    n: usize,
    out: *mut f32,
) {
    let src = Stream {
        base: w.data.as_ptr(),
        scales: w.scales.as_ptr(),
        cols: w.n,
    };
    // SAFETY: forwarded from the caller.
    unsafe { few_rows_from::<true>(x, m, kp, &src, b0, b1, n, out) }
}

/// A packed weight as [`rows`] reads it.
struct Stream {
    /// Row block 0: bf16 elements, or FP8 codes for [`rows_fp8`].
    base: *const u8,
    /// FP8 only: one scale per block, `[row block][k block]`.
    scales: *const f32,
    /// Valid output columns (the weight's rows).
    cols: usize,
}

/// Rows in fours over blocks in streams, for either element type (`FP8`: the codes' kernel,
/// which needs AVX512-VBMI too).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn few_rows_from<const FP8: bool>(
    x: &[u16],
    m: usize,
    kp: usize,
    w: &Stream,
    b0: usize,
    b1: usize,
    n: usize,
    out: *mut f32,
) {
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(4);
        let mut nb = b0;
        // Several row blocks at once: each is its own sequential memory stream, and one
        // stream per core leaves DRAM bandwidth unused.
        while nb < b1 {
            let left = b1 - nb;
            // SAFETY: forwarded from the caller; blocks nb..nb+NB are < b1.
            if FP8 {
                unsafe {
                    nb += match (mr, left) {
                        (1, 4..) => rows_fp8::<1, 4>(x, i, kp, w, nb, n, out),
                        (2, 2..) => rows_fp8::<2, 2>(x, i, kp, w, nb, n, out),
                        (3, 2..) => rows_fp8::<3, 2>(x, i, kp, w, nb, n, out),
                        (4, 2..) => rows_fp8::<4, 2>(x, i, kp, w, nb, n, out),
                        (1, _) => rows_fp8::<1, 1>(x, i, kp, w, nb, n, out),
                        (2, _) => rows_fp8::<2, 1>(x, i, kp, w, nb, n, out),
                        (3, _) => rows_fp8::<3, 1>(x, i, kp, w, nb, n, out),
                        _ => rows_fp8::<4, 1>(x, i, kp, w, nb, n, out),
                    };
                }
                continue;
            }
            // SAFETY: as above.
            unsafe {
                let step = match (mr, left) {
                    (1, 4..) => rows::<1, 4>(x, i, kp, w, nb, n, out),
                    (2, 4..) => rows::<2, 4>(x, i, kp, w, nb, n, out),
                    (3, 2..) => rows::<3, 2>(x, i, kp, w, nb, n, out),
                    (4, 2..) => rows::<4, 2>(x, i, kp, w, nb, n, out),
                    (1, _) => rows::<1, 1>(x, i, kp, w, nb, n, out),
                    (2, _) => rows::<2, 1>(x, i, kp, w, nb, n, out),
                    (3, _) => rows::<3, 1>(x, i, kp, w, nb, n, out),
                    _ => rows::<4, 1>(x, i, kp, w, nb, n, out),
                };
                nb += step;
            }
        }
        i += mr;
    }
}

/// 32 e4m3 codes — one 64-byte bf16 block row — widened to bf16 with their block's scale.
///
/// A code's sign, exponent and mantissa shifted into an f16's fields make the f16 of its value
/// / 256 (subnormal codes land on f16 subnormals, which the conversion widens exactly), so
/// `f16 → f32` times `scale · 256`, rounded to bf16 once, gives the same bits as
/// `bf16(f32(code) · scale)`: the checkpoint's own dequantisation.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[inline]
fn fp8_row(codes: __m256i, scale256: __m512) -> __m512bh {
    // Sign-extended, then shifted by 7: the sign lands on bit 15 (and a copy on bit 14, which
    // the mask clears), exponent and mantissa on bits 13..7.
    let wide = _mm512_slli_epi16::<7>(_mm512_cvtepi8_epi16(codes));
    let half = _mm512_and_si512(wide, _mm512_set1_epi16(0xBF80u16 as i16));
    let lo = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
    let hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(half));
    _mm512_cvtne2ps_pbh(_mm512_mul_ps(hi, scale256), _mm512_mul_ps(lo, scale256))
}

/// The bf16 bits of every non-negative e4m3 code (`0x7f`, NaN, is never packed), split into
/// high and low bytes: the tables `vpermi2b` looks codes up in, 128 entries each.
static FP8_HI: [u8; 128] = fp8_bytes(true);
static FP8_LO: [u8; 128] = fp8_bytes(false);

const fn fp8_bytes(high: bool) -> [u8; 128] {
    let mut t = [0u8; 128];
    let mut c = 1;
    while c < 127 {
        let (e, m) = ((c >> 3) as u16, (c & 7) as u16);
        // bf16: exponent bias 127 against e4m3's 7; a subnormal code (e = 0) is m · 2^-9,
        // normalised by shifting the mantissa up to its leading one.
        let bits = if e > 0 {
            ((e + 120) << 7) | (m << 4)
        } else {
            let lead = 15 - m.leading_zeros() as u16; // 0..=2
            ((lead + 118) << 7) | ((m << (7 - lead)) & 0x7f)
        };
        t[c] = if high { (bits >> 8) as u8 } else { bits as u8 };
        c += 1;
    }
    t
}

/// Two block rows of 64 interleaved codes ([`crate::cpu::packed::fp8_offset`]) to their exact
/// bf16 values, unscaled: `vpermi2b` looks up each code's high and low byte (its low 7 bits
/// index the 128-entry tables), the sign is put back, and the byte unpacks (within 128-bit
/// lanes, which the interleave was made for) pair them into the rows' words.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
#[inline]
fn fp8_rows_exact(codes: __m512i, t: &Fp8Tables) -> (__m512bh, __m512bh) {
    let hi = _mm512_permutex2var_epi8(t.hi0, codes, t.hi1);
    // hi | (codes & 0x80): the sign bit.
    let hi = _mm512_ternarylogic_epi32::<0xF8>(hi, codes, t.sign);
    let lo = _mm512_permutex2var_epi8(t.lo0, codes, t.lo1);
    // SAFETY (of the transmutes): both are 512 plain bits.
    unsafe {
        (
            std::mem::transmute::<__m512i, __m512bh>(_mm512_unpacklo_epi8(lo, hi)),
            std::mem::transmute::<__m512i, __m512bh>(_mm512_unpackhi_epi8(lo, hi)),
        )
    }
}

/// The lookup tables in registers.
#[derive(Clone, Copy)]
struct Fp8Tables {
    hi0: __m512i,
    hi1: __m512i,
    lo0: __m512i,
    lo1: __m512i,
    sign: __m512i,
}

impl Fp8Tables {
    #[target_feature(enable = "avx512f")]
    fn load() -> Fp8Tables {
        // SAFETY: each table is 128 bytes: two 64-byte loads.
        unsafe {
            Fp8Tables {
                hi0: _mm512_loadu_si512(FP8_HI.as_ptr().cast()),
                hi1: _mm512_loadu_si512(FP8_HI.as_ptr().add(64).cast()),
                lo0: _mm512_loadu_si512(FP8_LO.as_ptr().cast()),
                lo1: _mm512_loadu_si512(FP8_LO.as_ptr().add(64).cast()),
                sign: _mm512_set1_epi8(0x80u8 as i8),
            }
        }
    }
}

/// Whole blocks of FP8 codes to bf16 bits in [`crate::cpu::packed::PackedBf16`]'s layout, one
/// scale per block, bit for bit the checkpoint's dequantisation: what the register-blocked and
/// AMX GEMMs read when the weight is FP8.
///
/// # Safety
/// AVX512-BF16 and AVX512-VBMI are present; `src` and `dst` hold the same whole number of
/// blocks and `scales` one per block.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
pub(crate) unsafe fn widen_fp8(src: &[u8], scales: &[f32], dst: &mut [u16]) {
    const BLOCK: usize = BLOCK_K * BLOCK_N;
    // Byte i of two block rows in order comes from byte UNDO[i] of their interleave.
    let mut undo = [0u8; 64];
    for (i, u) in undo.iter_mut().enumerate() {
        let (row, j) = (i / 32, i % 32);
        *u = ((j / 8) * 16 + row * 8 + j % 8) as u8;
    }
    // SAFETY: 64 bytes.
    let undo = unsafe { _mm512_loadu_si512(undo.as_ptr().cast()) };
    for ((s, d), &scale) in src
        .chunks_exact(BLOCK)
        .zip(dst.chunks_exact_mut(BLOCK))
        .zip(scales)
    {
        let scale256 = _mm512_set1_ps(scale * 256.0);
        for g in 0..BLOCK / 64 {
            // SAFETY: group g (two rows) of a whole block in both.
            unsafe {
                let codes = _mm512_permutexvar_epi8(
                    undo,
                    _mm512_loadu_si512(s.as_ptr().add(g * 64).cast()),
                );
                let even = fp8_row(_mm512_castsi512_si256(codes), scale256);
                let odd = fp8_row(_mm512_extracti64x4_epi64::<1>(codes), scale256);
                let at = d.as_mut_ptr().add(g * 64);
                _mm512_storeu_si512(at.cast(), std::mem::transmute::<__m512bh, __m512i>(even));
                _mm512_storeu_si512(
                    at.add(32).cast(),
                    std::mem::transmute::<__m512bh, __m512i>(odd),
                );
            }
        }
    }
}

/// [`rows`] over FP8 codes: rows `i..i+M` times row blocks `nb..nb+NB`; returns NB.
///
/// Each 64 bytes of a block widen to two block rows of exact bf16 code values
/// ([`fp8_rows_exact`]); a block's products are summed unscaled, then added to the row's sum
/// times the block's scale, in f32.
///
/// # Safety
/// As [`rows`], `w` an FP8 stream.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16,avx512vbmi")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows_fp8<const M: usize, const NB: usize>(
    x: &[u16],
    i: usize,
    kp: usize,
    w: &Stream,
    nb: usize,
    n: usize,
    out: *mut f32,
) -> usize {
    let kbs = kp / BLOCK_K;
    let stride = kbs * BLOCK_K * BLOCK_N;
    let tables = Fp8Tables::load();
    let mut total = [[_mm512_setzero_ps(); NB]; M];
    // SAFETY: blocks nb..nb+NB lie inside the packed data.
    let base = unsafe { w.base.add(nb * stride) };
    for kb in 0..kbs {
        let mut acc = [[_mm512_setzero_ps(); NB]; M];
        for g in 0..BLOCK_K / 4 {
            let mut wv = [[unsafe { std::mem::zeroed::<__m512bh>() }; 2]; NB];
            for (b, v) in wv.iter_mut().enumerate() {
                let at = b * stride + kb * BLOCK_K * BLOCK_N + g * 64;
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at + PREFETCH_BYTES).cast());
                // SAFETY: group g (block rows 2g, 2g + 1) of block (nb + b, kb).
                let codes = unsafe { _mm512_loadu_si512(base.add(at).cast()) };
                let (even, odd) = fp8_rows_exact(codes, &tables);
                *v = [even, odd];
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: pairs 2g and 2g + 1 of slice kb of row i + r are inside x.
                let (p0, p1) = unsafe {
                    let at = x
                        .as_ptr()
                        .add((i + r) * kp + kb * BLOCK_K + 4 * g)
                        .cast::<i32>();
                    (at.read_unaligned(), at.add(1).read_unaligned())
                };
                let (x0, x1): (__m512bh, __m512bh) = unsafe {
                    (
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(p0)),
                        std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(p1)),
                    )
                };
                for (a, v) in row.iter_mut().zip(&wv) {
                    *a = _mm512_dpbf16_ps(_mm512_dpbf16_ps(*a, x0, v[0]), x1, v[1]);
                }
            }
        }
        for b in 0..NB {
            // SAFETY: one scale per block of the weight.
            let scale = _mm512_set1_ps(unsafe { *w.scales.add((nb + b) * kbs + kb) });
            for r in 0..M {
                total[r][b] = _mm512_fmadd_ps(acc[r][b], scale, total[r][b]);
            }
        }
    }
    for b in 0..NB {
        let blk = nb + b;
        let cols = (w.cols - blk * BLOCK_N).min(BLOCK_N);
        let mask = ((1u32 << cols) - 1) as __mmask16;
        for (r, row) in total.iter().enumerate() {
            // SAFETY: masked store of the valid columns of row i + r.
            unsafe { _mm512_mask_storeu_ps(out.add((i + r) * n + blk * BLOCK_N), mask, row[b]) };
        }
    }
    NB
}

/// Rows `i..i+M` times row blocks `nb..nb+NB`; returns NB.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<const M: usize, const NB: usize>(
    x: &[u16],
    i: usize,
    kp: usize,
    w: &Stream,
    nb: usize,
    n: usize,
    out: *mut f32,
) -> usize {
    let kbs = kp / BLOCK_K;
    // Bytes per row block.
    let stride = kbs * BLOCK_K * BLOCK_N * 2;
    // Two accumulators per (row, block) (even / odd pairs) hide the dot-product latency.
    let mut acc = [[[_mm512_setzero_ps(); 2]; NB]; M];
    // SAFETY: blocks nb..nb+NB lie inside the packed data.
    let base = unsafe { w.base.add(nb * stride) };
    for kb in 0..kbs {
        for kk in 0..BLOCK_K / 2 {
            let mut wv = [unsafe { std::mem::zeroed::<__m512bh>() }; NB];
            for (b, v) in wv.iter_mut().enumerate() {
                let at = b * stride + (kb * BLOCK_K / 2 + kk) * 2 * BLOCK_N * 2;
                // Short streams keep the hardware prefetcher cold; run ahead of it.
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at + PREFETCH_BYTES).cast());
                // SAFETY: 64-byte row kk of block (nb + b, kb).
                let raw = unsafe { _mm512_loadu_si512(base.add(at).cast()) };
                *v = unsafe { std::mem::transmute::<__m512i, __m512bh>(raw) };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                // SAFETY: the pair (2kk, 2kk+1) of slice kb of row i + r is inside x.
                let pair = unsafe {
                    x.as_ptr()
                        .add((i + r) * kp + kb * BLOCK_K + 2 * kk)
                        .cast::<i32>()
                        .read_unaligned()
                };
                let xv: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair)) };
                for (b, a) in row.iter_mut().enumerate() {
                    a[kk & 1] = _mm512_dpbf16_ps(a[kk & 1], xv, wv[b]);
                }
            }
        }
    }
    for b in 0..NB {
        let blk = nb + b;
        let cols = (w.cols - blk * BLOCK_N).min(BLOCK_N);
        let mask = ((1u32 << cols) - 1) as __mmask16;
        for (r, row) in acc.iter().enumerate() {
            // SAFETY: masked store of the valid columns of row i + r.
            unsafe {
                _mm512_mask_storeu_ps(
                    out.add((i + r) * n + blk * BLOCK_N),
                    mask,
                    _mm512_add_ps(row[b][0], row[b][1]),
                )
            };
        }
    }
    NB
}

/// Activation rows per register tile.
pub(super) const MR: usize = 6;
/// Weight blocks (16 outputs each) per register tile: `MR × NR` accumulators plus `NR` weight
/// vectors fill 28 of the 32 zmm registers.
pub(super) const NR: usize = 4;
/// Weight k-blocks (32 inputs each) per pass: a tile's weight panel (`NR` blocks × `KC_BLOCKS`
/// × 1 KiB = 256 KiB) stays in L2 while every row tile of the band runs over it.
const KC_BLOCKS: usize = 64;
/// Bytes of activations one band of rows may take (`rows × KC_BLOCKS × 64`), beside the
/// weight panel in a 1 MiB L2.
const BAND_BYTES: usize = 384 << 10;

/// `out[0..m, blocks b0..b1] = x · Wᵀ` for all `m` rows, every element stored.
///
/// Loops, outermost first: k passes of [`KC_BLOCKS`] (later passes add to what the first
/// stored), bands of rows that fit [`BAND_BYTES`], groups of [`NR`] blocks, tiles of [`MR`]
/// rows. Within a band a weight panel is reused by every row tile; within a pass the band's
/// activations are reused by every column group.
///
/// # Safety
/// As [`few_rows`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn blocked(call: &PackedCall<'_>) {
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
    let kbs = kp / BLOCK_K;
    let stride = kbs * BLOCK_K * BLOCK_N;
    let band = (BAND_BYTES / (KC_BLOCKS.min(kbs) * BLOCK_K * 2)).max(MR) / MR * MR;
    let mut kb0 = 0;
    while kb0 < kbs {
        let kblocks = KC_BLOCKS.min(kbs - kb0);
        let accumulate = kb0 > 0;
        let mut r0 = 0;
        while r0 < m {
            let r1 = (r0 + band).min(m);
            let mut nb = b0;
            while nb < b1 {
                let nr = NR.min(b1 - nb);
                let mut i = r0;
                while i < r1 {
                    let mr = MR.min(r1 - i);
                    let t = Tile {
                        // SAFETY: row i, k-block kb0 of x; block nb, k-block kb0 of the weight;
                        // row i, column nb · 16 of the output — all inside their buffers.
                        x: unsafe { x.as_ptr().add(i * kp + kb0 * BLOCK_K) },
                        kp,
                        w: unsafe { w.data.as_ptr().add(nb * stride + kb0 * BLOCK_K * BLOCK_N) },
                        stride,
                        kblocks,
                        out: unsafe { out.add(i * n + nb * BLOCK_N) },
                        n,
                        last_cols: (w.n - (nb + nr - 1) * BLOCK_N).min(BLOCK_N),
                        accumulate,
                    };
                    // SAFETY: forwarded; the tile's rows and blocks exist.
                    unsafe {
                        match mr {
                            6 => cols::<6>(nr, &t),
                            5 => cols::<5>(nr, &t),
                            4 => cols::<4>(nr, &t),
                            3 => cols::<3>(nr, &t),
                            2 => cols::<2>(nr, &t),
                            _ => cols::<1>(nr, &t),
                        }
                    }
                    i += mr;
                }
                nb += nr;
            }
            r0 = r1;
        }
        kb0 += kblocks;
    }
}

/// One register tile's operands.
struct Tile {
    /// Row `i`, first k of the pass, of the bf16 activations (rows `kp` apart).
    x: *const u16,
    kp: usize,
    /// Block `nb`, first k-block of the pass; the next block is `stride` elements on.
    w: *const u16,
    stride: usize,
    kblocks: usize,
    /// Row `i`, column `nb · 16` of the output (rows `n` apart).
    out: *mut f32,
    n: usize,
    /// Valid columns of the tile's last block (16 but at the right edge).
    last_cols: usize,
    /// Add to the output (a later k pass) instead of storing.
    accumulate: bool,
}

/// [`tile`] with `M` rows and `nr` (1 to [`NR`]) blocks.
///
/// # Safety
/// As [`tile`].
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn cols<const M: usize>(nr: usize, t: &Tile) {
    // SAFETY: forwarded.
    unsafe {
        match nr {
            4 => tile::<M, 4>(t),
            3 => tile::<M, 3>(t),
            2 => tile::<M, 2>(t),
            _ => tile::<M, 1>(t),
        }
    }
}

/// `M` rows × `NB` blocks over `t.kblocks` k-blocks.
///
/// # Safety
/// AVX512-BF16 is present and `t` points at `M` rows and `NB` blocks inside their buffers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn tile<const M: usize, const NB: usize>(t: &Tile) {
    let mut acc = [[_mm512_setzero_ps(); NB]; M];
    // In a block, pair p of the 32 inputs is a 64-byte row of 16 outputs; a block's k-blocks
    // are consecutive, so the pass is one run of `kblocks · 16` rows per block.
    for p in 0..t.kblocks * (BLOCK_K / 2) {
        let mut wv = [unsafe { std::mem::zeroed::<__m512bh>() }; NB];
        for (b, v) in wv.iter_mut().enumerate() {
            // SAFETY: row p of block b of the pass.
            let raw = unsafe { _mm512_loadu_si512(t.w.add(b * t.stride + p * 2 * BLOCK_N).cast()) };
            *v = unsafe { std::mem::transmute::<__m512i, __m512bh>(raw) };
        }
        for (r, row) in acc.iter_mut().enumerate() {
            // SAFETY: pair p of row r of the pass.
            let pair = unsafe { t.x.add(r * t.kp + 2 * p).cast::<i32>().read_unaligned() };
            let xv: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(pair)) };
            for (a, &v) in row.iter_mut().zip(&wv) {
                *a = _mm512_dpbf16_ps(*a, xv, v);
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (b, &a) in row.iter().enumerate() {
            let cols = if b + 1 == NB { t.last_cols } else { BLOCK_N };
            let mask: __mmask16 = ((1u32 << cols) - 1) as __mmask16;
            // SAFETY: the valid columns of block b in row r of the output.
            unsafe {
                let at = t.out.add(r * t.n + b * BLOCK_N);
                let v = if t.accumulate {
                    _mm512_add_ps(a, _mm512_maskz_loadu_ps(mask, at))
                } else {
                    a
                };
                _mm512_mask_storeu_ps(at, mask, v);
            }
        }
    }
}
