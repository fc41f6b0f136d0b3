//! The blocked bf16 weight layout the fast GEMM kernels read.
//!
//! `W: [n, k]` is stored as 16 × 32 blocks: for each group of 16 output rows (`nb`) and each
//! 32-wide slice of the input (`kb`), a 1 KiB block `[16 pairs of k][16 rows][2]`. That is
//! exactly an AMX `tdpbf16ps` B tile, and for small batches an AVX512-BF16 kernel multiplies a
//! broadcast pair of activations by one 64-byte block row to advance 16 outputs at once — no
//! horizontal sums. The blocks of one row group are contiguous, so a GEMV streams memory in
//! order. Rows are padded to a multiple of 16 and columns to a multiple of 32 with zeros.
//!
//! [`PackedFp8`] is the same layout of FP8 e4m3 codes, one byte per element, with one scale per
//! block (an FP8 checkpoint's 128 × 128 block scales cover whole 16 × 32 blocks). Within a block
//! each 64 bytes hold two consecutive block rows interleaved 8 bytes at a time
//! (`fp8_offset`): AVX-512's byte unpacks work within 128-bit lanes, and this order makes a
//! looked-up high and low byte unpack straight into the two rows' bf16.

/// Rows per block (one AMX tile's columns of f32 results).
pub const BLOCK_N: usize = 16;
/// Input elements per block (one AMX tile row of bf16 pairs).
pub const BLOCK_K: usize = 32;
const BLOCK: usize = BLOCK_N * BLOCK_K;

/// One task's share of a GEMM over a packed weight, as every packed kernel takes it.
#[derive(Clone, Copy)]
pub(crate) struct PackedCall<'a> {
    /// `m` rows of `kp` bf16 activations (the kernel's layout: AMX wants them tile by tile).
    pub x: &'a [u16],
    pub m: usize,
    pub kp: usize,
    pub w: &'a PackedBf16,
    /// The row blocks of `w` (16 outputs each) this task computes.
    pub b0: usize,
    pub b1: usize,
    /// Output row length: `out` holds `m` rows of `n` f32.
    pub n: usize,
    pub out: *mut f32,
}

#[derive(Clone)]
pub struct PackedBf16 {
    /// bf16 bits, block-major.
    pub(crate) data: Vec<u16>,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl std::fmt::Debug for PackedBf16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedBf16([{}, {}])", self.n, self.k)
    }
}

impl PackedBf16 {
    /// Packs a row-major `[n, k]` matrix of bf16 bits.
    pub fn pack(w: &[u16], n: usize, k: usize) -> PackedBf16 {
        let (np, kp) = (n.next_multiple_of(BLOCK_N), k.next_multiple_of(BLOCK_K));
        let kbs = kp / BLOCK_K;
        let mut data = vec![0u16; np * kp];
        for (j, row) in w.chunks_exact(k).enumerate().take(n) {
            let (nb, jj) = (j / BLOCK_N, j % BLOCK_N);
            for (p, &v) in row.iter().enumerate() {
                let (kb, kr) = (p / BLOCK_K, p % BLOCK_K);
                data[(nb * kbs + kb) * BLOCK + (kr / 2) * 2 * BLOCK_N + jj * 2 + kr % 2] = v;
            }
        }
        PackedBf16 { data, n, k }
    }

    /// Back to row-major `[n, k]` bf16 bits.
    pub fn unpack(&self) -> Vec<u16> {
        let kbs = self.k_padded() / BLOCK_K;
        let mut out = vec![0u16; self.n * self.k];
        for j in 0..self.n {
            let (nb, jj) = (j / BLOCK_N, j % BLOCK_N);
            for p in 0..self.k {
                let (kb, kr) = (p / BLOCK_K, p % BLOCK_K);
                out[j * self.k + p] =
                    self.data[(nb * kbs + kb) * BLOCK + (kr / 2) * 2 * BLOCK_N + jj * 2 + kr % 2];
            }
        }
        out
    }

    /// Appends row `j` (`k` values) to `out`, widened to f32: an embedding lookup from a tied
    /// LM-head weight.
    pub fn row_into(&self, j: usize, out: &mut Vec<f32>) {
        let kbs = self.k_padded() / BLOCK_K;
        let (nb, jj) = (j / BLOCK_N, j % BLOCK_N);
        for kb in 0..kbs {
            let block = &self.data[(nb * kbs + kb) * BLOCK..(nb * kbs + kb + 1) * BLOCK];
            let take = (self.k - kb * BLOCK_K).min(BLOCK_K);
            for kr in 0..take {
                let bits = block[(kr / 2) * 2 * BLOCK_N + jj * 2 + kr % 2];
                out.push(f32::from(half::bf16::from_bits(bits)));
            }
        }
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn k_padded(&self) -> usize {
        self.k.next_multiple_of(BLOCK_K)
    }

    pub fn row_blocks(&self) -> usize {
        self.n.div_ceil(BLOCK_N)
    }
}

/// FP8 e4m3 weights `[n, k]` in the blocked layout of [`PackedBf16`] (each block widens to the
/// bf16 block; `fp8_offset` orders the bytes within it), with each block's dequantisation
/// scale.
#[derive(Clone)]
pub struct PackedFp8 {
    /// e4m3 codes, block-major; padding is `0x00` (+0).
    pub(crate) data: Vec<u8>,
    /// One per block, `[row block][k block]`: the checkpoint's `weight_scale_inv` over it.
    pub(crate) scales: Vec<f32>,
    pub(crate) n: usize,
    pub(crate) k: usize,
}

impl std::fmt::Debug for PackedFp8 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedFp8([{}, {}])", self.n, self.k)
    }
}

/// Why a FP8 weight cannot be kept FP8.
#[derive(Debug, PartialEq, Eq)]
pub enum Fp8PackError {
    /// The checkpoint's scale blocks do not cover whole 16 × 32 blocks.
    Block([usize; 2]),
    /// A NaN code (`0x7f` / `0xff`) at this row-major index.
    NaN(usize),
}

impl std::fmt::Display for Fp8PackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fp8PackError::Block(b) => write!(
                f,
                "scale blocks of {b:?} do not cover whole {BLOCK_N} x {BLOCK_K} blocks \
                 (rows a multiple of {BLOCK_N}, columns of {BLOCK_K})"
            ),
            Fp8PackError::NaN(i) => write!(f, "element {i} is a NaN code"),
        }
    }
}

impl PackedFp8 {
    /// Packs row-major `[n, k]` e4m3 `codes` whose `[⌈n/block[0]⌉, ⌈k/block[1]⌉]` row-major
    /// `scales` dequantise them.
    pub fn pack(
        codes: &[u8],
        n: usize,
        k: usize,
        scales: &[f32],
        block: [usize; 2],
    ) -> Result<PackedFp8, Fp8PackError> {
        let [br, bc] = block;
        if br == 0 || bc == 0 || br % BLOCK_N != 0 || bc % BLOCK_K != 0 {
            return Err(Fp8PackError::Block(block));
        }
        if let Some(i) = codes.iter().position(|&b| b & 0x7f == 0x7f) {
            return Err(Fp8PackError::NaN(i));
        }
        let (np, kp) = (n.next_multiple_of(BLOCK_N), k.next_multiple_of(BLOCK_K));
        let (nbs, kbs) = (np / BLOCK_N, kp / BLOCK_K);
        let scale_cols = k.div_ceil(bc);
        let mut data = vec![0u8; np * kp];
        for (j, row) in codes.chunks_exact(k).enumerate().take(n) {
            let (nb, jj) = (j / BLOCK_N, j % BLOCK_N);
            for (p, &v) in row.iter().enumerate() {
                let (kb, kr) = (p / BLOCK_K, p % BLOCK_K);
                data[(nb * kbs + kb) * BLOCK + fp8_offset(kr, jj)] = v;
            }
        }
        let mut block_scales = Vec::with_capacity(nbs * kbs);
        for nb in 0..nbs {
            for kb in 0..kbs {
                block_scales.push(scales[(nb * BLOCK_N / br) * scale_cols + kb * BLOCK_K / bc]);
            }
        }
        Ok(PackedFp8 {
            data,
            scales: block_scales,
            n,
            k,
        })
    }

    /// Row blocks `b0..b1` widened into `dst` in [`PackedBf16`]'s layout:
    /// `bf16(f32(code) · scale)` per element, bit for bit the checkpoint's bf16 dequantisation.
    pub fn widen_blocks(&self, b0: usize, b1: usize, dst: &mut Vec<u16>) {
        let kbs = self.k_padded() / BLOCK_K;
        let src = &self.data[b0 * kbs * BLOCK..b1 * kbs * BLOCK];
        dst.clear();
        dst.resize(src.len(), 0);
        let scales = &self.scales[b0 * kbs..b1 * kbs];
        #[cfg(target_arch = "x86_64")]
        if crate::cpu::matmul::fp8_kernels_available() {
            // SAFETY: AVX512-BF16 and VBMI are present; the slices are whole blocks.
            unsafe { super::packed_avx512::widen_fp8(src, scales, dst) };
            return;
        }
        widen_portable(src, scales, dst);
    }

    /// The weights stacked along rows (gate over up, q over k over v), when every part but the
    /// last ends on a whole row block and all have one `k`: the blocks then simply follow.
    pub fn concat_rows(parts: &[&PackedFp8]) -> Option<PackedFp8> {
        let (last, init) = parts.split_last()?;
        if init.iter().any(|p| p.n % BLOCK_N != 0) || parts.iter().any(|p| p.k != last.k) {
            return None;
        }
        Some(PackedFp8 {
            data: parts.iter().flat_map(|p| p.data.iter().copied()).collect(),
            scales: parts
                .iter()
                .flat_map(|p| p.scales.iter().copied())
                .collect(),
            n: parts.iter().map(|p| p.n).sum(),
            k: last.k,
        })
    }

    /// The dequantised weight as a packed bf16 one.
    pub fn to_bf16(&self) -> PackedBf16 {
        let mut data = Vec::new();
        self.widen_blocks(0, self.row_blocks(), &mut data);
        PackedBf16 {
            data,
            n: self.n,
            k: self.k,
        }
    }

    /// Bytes held: the codes and the block scales.
    pub fn size_in_bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }

    pub fn n(&self) -> usize {
        self.n
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn k_padded(&self) -> usize {
        self.k.next_multiple_of(BLOCK_K)
    }

    pub fn row_blocks(&self) -> usize {
        self.n.div_ceil(BLOCK_N)
    }
}

/// Where element `(k offset kr, row jj)` of a block sits in a [`PackedFp8`] block: its place in
/// the bf16 block is `(kr / 2) · 32 + jj · 2 + kr % 2`, in block row `kr / 2`; rows `2g` and
/// `2g + 1` share bytes `64g..64g + 64`, alternating 8 bytes of one and 8 of the other.
pub(crate) fn fp8_offset(kr: usize, jj: usize) -> usize {
    let (row, j) = (kr / 2, jj * 2 + kr % 2);
    (row / 2) * 64 + (j / 8) * 16 + (row % 2) * 8 + j % 8
}

/// Whole blocks of codes to bf16 bits in [`PackedBf16`]'s order, one scale per block, one
/// element at a time.
fn widen_portable(src: &[u8], scales: &[f32], dst: &mut [u16]) {
    for ((d, s), &scale) in dst
        .chunks_exact_mut(BLOCK)
        .zip(src.chunks_exact(BLOCK))
        .zip(scales)
    {
        for (o, d) in d.iter_mut().enumerate() {
            // Element o of the bf16 block: k offset 2 · (o / 32) + o % 2, row (o % 32) / 2.
            let b = s[fp8_offset(2 * (o / 32) + o % 2, (o % 32) / 2)];
            *d = half::bf16::from_f32(crate::dtype::f8e4m3_to_f32(b) * scale).to_bits();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes and scales of a `[n, k]` weight in 128 × 128 scale blocks, every code but NaN.
    fn fp8_weight(n: usize, k: usize) -> (Vec<u8>, Vec<f32>) {
        let codes = (0..n * k)
            .map(|i| {
                let b = (i * 37 + i / 7) as u8;
                if b & 0x7f == 0x7f { 0x7e } else { b }
            })
            .collect();
        let scales = (0..n.div_ceil(128) * k.div_ceil(128))
            .map(|i| 1.0 / 448.0 * (1.0 + i as f32 * 0.37))
            .collect();
        (codes, scales)
    }

    #[test]
    fn fp8_widens_bit_for_bit_as_the_checkpoint_dequantisation() {
        for (n, k) in [(16, 32), (17, 33), (130, 260), (300, 129)] {
            let (codes, scales) = fp8_weight(n, k);
            let packed = PackedFp8::pack(&codes, n, k, &scales, [128, 128]).unwrap();
            let want: Vec<u16> = (0..n * k)
                .map(|i| {
                    let (r, c) = (i / k, i % k);
                    let s = scales[(r / 128) * k.div_ceil(128) + c / 128];
                    half::bf16::from_f32(crate::dtype::f8e4m3_to_f32(codes[i]) * s).to_bits()
                })
                .collect();
            assert_eq!(packed.to_bf16().unpack(), want, "{n}x{k}");
            let mut portable = vec![0u16; packed.data.len()];
            widen_portable(&packed.data, &packed.scales, &mut portable);
            let mut widened = Vec::new();
            packed.widen_blocks(0, packed.row_blocks(), &mut widened);
            assert_eq!(
                widened, portable,
                "{n}x{k}: the kernels' widening and the loop's"
            );
            assert_eq!(
                packed.size_in_bytes(),
                packed.data.len() + packed.scales.len() * 4
            );
        }
    }

    #[test]
    fn fp8_offsets_place_every_element_of_a_block_once() {
        let mut seen = [false; BLOCK];
        for kr in 0..BLOCK_K {
            for jj in 0..BLOCK_N {
                let o = fp8_offset(kr, jj);
                assert!(!seen[o], "({kr}, {jj}) lands on {o} twice");
                seen[o] = true;
            }
        }
        // Block rows 0 and 1 (k 0..4) interleave 8 bytes at a time in the first 64.
        assert_eq!(
            (fp8_offset(0, 0), fp8_offset(1, 0), fp8_offset(0, 4)),
            (0, 1, 16)
        );
        assert_eq!(
            (fp8_offset(2, 0), fp8_offset(0, 15), fp8_offset(4, 0)),
            (8, 54, 64)
        );
    }

    #[test]
    fn fp8_rows_concatenate_as_their_bf16_would() {
        let (a, sa) = fp8_weight(32, 100);
        let (b, sb) = fp8_weight(20, 100);
        let pa = PackedFp8::pack(&a, 32, 100, &sa, [128, 128]).unwrap();
        let pb = PackedFp8::pack(&b, 20, 100, &sb, [128, 128]).unwrap();
        let joined = PackedFp8::concat_rows(&[&pa, &pb]).unwrap();
        let mut want = pa.to_bf16().unpack();
        want.extend(pb.to_bf16().unpack());
        assert_eq!((joined.n, joined.k), (52, 100));
        assert_eq!(joined.to_bf16().unpack(), want);
        // A first part that ends inside a row block cannot simply be followed.
        assert!(PackedFp8::concat_rows(&[&pb, &pa]).is_none());
    }

    #[test]
    fn fp8_packing_refuses_nan_codes_and_blocks_that_split_a_tile() {
        let (mut codes, scales) = fp8_weight(32, 64);
        assert_eq!(
            PackedFp8::pack(&codes, 32, 64, &scales, [8, 128]).unwrap_err(),
            Fp8PackError::Block([8, 128])
        );
        codes[70] = 0xff;
        assert_eq!(
            PackedFp8::pack(&codes, 32, 64, &scales, [128, 128]).unwrap_err(),
            Fp8PackError::NaN(70)
        );
    }

    #[test]
    fn pack_unpack_round_trips_ragged_shapes() {
        for (n, k) in [(1, 1), (16, 32), (17, 33), (40, 64), (3, 100)] {
            let w: Vec<u16> = (0..n * k).map(|i| i as u16 ^ 0x5a5a).collect();
            let p = PackedBf16::pack(&w, n, k);
            assert_eq!(
                p.data.len(),
                n.next_multiple_of(16) * k.next_multiple_of(32)
            );
            assert_eq!(p.unpack(), w, "{n}x{k}");
            for j in 0..n {
                let mut row = Vec::new();
                p.row_into(j, &mut row);
                let want: Vec<f32> = w[j * k..(j + 1) * k]
                    .iter()
                    .map(|&b| f32::from(half::bf16::from_bits(b)))
                    .collect();
                assert_eq!(row, want, "{n}x{k} row {j}");
            }
        }
    }
}
