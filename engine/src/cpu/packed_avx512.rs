//! The AVX512-BF16 kernels over the packed weight layout ([`PackedBf16`]).
//!
//! [`blocked`] serves every batch on CPUs without AMX tiles: a register-blocked GEMM — an
//! [`MR`] × ([`NR`] · 16) tile of f32 accumulators in the zmm registers, fed by `vdpbf16ps`
//! with one broadcast activation pair and one 64-byte weight row per step — with the row loop
//! inside the column loop, so that each weight panel is read from memory once per band of rows
//! ([`BAND_BYTES`]) and from L2 for every tile after the first. At one row it is a plain
//! weight stream. [`few_rows`] serves the batches below [`super::matmul::AMX_MIN_ROWS`] on AMX
//! CPUs, where it was measured against the tiles: several weight blocks as parallel memory
//! streams, each weight byte read once per 4 rows.

use std::arch::x86_64::*;

use crate::cpu::packed::{BLOCK_K, BLOCK_N, PackedBf16, PackedCall};

/// How far ahead (in bf16 elements) each weight stream is prefetched.
const PREFETCH_ELEMS: usize = 1024;

/// Row blocks `b0..b1` of a packed weight times up to 4 activation rows at a time: the whole
/// weight range is streamed once per 4 rows, which is what a decode step wants.
///
/// # Safety
/// AVX512-BF16 is present; the call's `x` holds `m` rows of `kp` bf16; `out` holds `m` rows of `n`
/// f32 and the caller owns columns of blocks `b0..b1`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn few_rows(call: &PackedCall<'_>) {
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
    let mut i = 0;
    while i < m {
        let mr = (m - i).min(4);
        let mut nb = b0;
        // Several row blocks at once: each is its own sequential memory stream, and one
        // stream per core leaves DRAM bandwidth unused.
        while nb < b1 {
            let left = b1 - nb;
            // SAFETY: forwarded from the caller; blocks nb..nb+NB are < b1.
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

/// Rows `i..i+M` times row blocks `nb..nb+NB`; returns NB.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
unsafe fn rows<const M: usize, const NB: usize>(
    x: &[u16],
    i: usize,
    kp: usize,
    w: &PackedBf16,
    nb: usize,
    n: usize,
    out: *mut f32,
) -> usize {
    let kbs = kp / BLOCK_K;
    let stride = kbs * BLOCK_K * BLOCK_N;
    // Two accumulators per (row, block) (even / odd pairs) hide the dot-product latency.
    let mut acc = [[[_mm512_setzero_ps(); 2]; NB]; M];
    // SAFETY: blocks nb..nb+NB lie inside the packed data.
    let base = unsafe { w.data.as_ptr().add(nb * stride) };
    for kb in 0..kbs {
        for kk in 0..BLOCK_K / 2 {
            let mut wv = [unsafe { std::mem::zeroed::<__m512bh>() }; NB];
            for (b, v) in wv.iter_mut().enumerate() {
                let at = b * stride + (kb * BLOCK_K / 2 + kk) * 2 * BLOCK_N;
                // Short streams keep the hardware prefetcher cold; run ahead of it.
                _mm_prefetch::<_MM_HINT_T0>(base.wrapping_add(at + PREFETCH_ELEMS).cast());
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
        let cols = (n - blk * BLOCK_N).min(BLOCK_N);
        let mask: __mmask16 = if cols == 16 {
            0xffff
        } else {
            ((1u32 << cols) - 1) as __mmask16
        };
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
                        last_cols: (n - (nb + nr - 1) * BLOCK_N).min(BLOCK_N),
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
