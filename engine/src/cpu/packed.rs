//! The blocked bf16 weight layout the fast GEMM kernels read.
//!
//! `W: [n, k]` is stored as 16 × 32 blocks: for each group of 16 output rows (`nb`) and each
//! 32-wide slice of the input (`kb`), a 1 KiB block `[16 pairs of k][16 rows][2]`. That is
//! exactly an AMX `tdpbf16ps` B tile, and for small batches an AVX512-BF16 kernel multiplies a
//! broadcast pair of activations by one 64-byte block row to advance 16 outputs at once — no
//! horizontal sums. The blocks of one row group are contiguous, so a GEMV streams memory in
//! order. Rows are padded to a multiple of 16 and columns to a multiple of 32 with zeros.

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

#[cfg(test)]
mod tests {
    use super::*;

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
