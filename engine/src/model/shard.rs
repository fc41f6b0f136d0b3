//! How one projection is split over the GPUs of a node (tensor parallelism,
//! `router --device cuda:0,1,…`): which rows and columns of a weight each rank holds, and how
//! the ranks' results make the whole.
//!
//! Pure functions over host slices: the CUDA path (`cuda::parallel`) uploads exactly these
//! shards and combines exactly this way, and the CPU tests below check that the pieces add up
//! to the unsplit projection.

use std::ops::Range;

use crate::error::{EngineError, Result};

/// How a weight `W: [out, in]` is divided among ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parallel {
    /// Column-parallel: each rank computes a slice of the outputs (rows of `W`), whole
    /// `granule`s of them (a head of a Q projection); the host writes each slice into its
    /// columns of the output.
    Columns { granule: usize },
    /// Row-parallel: each rank takes a slice of the inputs (columns of `W`), whole `granule`s
    /// (a head's values into the output projection); the ranks' partial outputs sum to the
    /// output, reduced over NCCL.
    Rows { granule: usize },
    /// A stacked gate-and-up weight `[2 · inter, in]`: each rank holds the same slice of the
    /// gate rows and of the up rows, so its gated activation is complete and feeds the
    /// row-parallel down projection with the same slice ([`Parallel::Rows`] with granule 1).
    GluColumns,
}

/// One rank's part of a weight: the rows it holds (in order, stacked) and the columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Shard {
    pub rows: Vec<Range<usize>>,
    pub cols: Range<usize>,
}

impl Shard {
    pub fn out_features(&self) -> usize {
        self.rows.iter().map(ExactSizeIterator::len).sum()
    }

    pub fn in_features(&self) -> usize {
        self.cols.len()
    }
}

/// `total` split into `ranks` contiguous ranges of whole `granule`s, as even as can be (the
/// first ranks take one granule more). Every rank gets at least one granule: a rank with
/// nothing would still have to join each reduction, and such a split only adds traffic.
pub fn split(total: usize, granule: usize, ranks: usize, what: &str) -> Result<Vec<Range<usize>>> {
    if ranks == 0 || granule == 0 || !total.is_multiple_of(granule) {
        return Err(EngineError::Shape(format!(
            "{what}: {total} cannot be split over {ranks} rank(s) in units of {granule}"
        )));
    }
    let units = total / granule;
    if units < ranks {
        return Err(EngineError::Shape(format!(
            "{what}: {units} unit(s) of {granule} cannot be split over {ranks} GPUs (at most {units})"
        )));
    }
    let (base, extra) = (units / ranks, units % ranks);
    let mut start = 0;
    Ok((0..ranks)
        .map(|r| {
            let len = (base + usize::from(r < extra)) * granule;
            let range = start..start + len;
            start += len;
            range
        })
        .collect())
}

/// Each rank's part of a weight `[out_features, in_features]` split as `parallel`.
pub fn shards(
    parallel: Parallel,
    out_features: usize,
    in_features: usize,
    ranks: usize,
    what: &str,
) -> Result<Vec<Shard>> {
    Ok(match parallel {
        Parallel::Columns { granule } => split(out_features, granule, ranks, what)?
            .into_iter()
            .map(|rows| Shard {
                rows: std::iter::once(rows).collect(),
                cols: 0..in_features,
            })
            .collect(),
        Parallel::Rows { granule } => split(in_features, granule, ranks, what)?
            .into_iter()
            .map(|cols| Shard {
                rows: std::iter::once(0..out_features).collect(),
                cols,
            })
            .collect(),
        Parallel::GluColumns => {
            if !out_features.is_multiple_of(2) {
                return Err(EngineError::Shape(format!(
                    "{what}: a stacked gate-and-up weight needs an even row count, has {out_features}"
                )));
            }
            let inter = out_features / 2;
            split(inter, 1, ranks, what)?
                .into_iter()
                .map(|r| Shard {
                    rows: vec![r.clone(), inter + r.start..inter + r.end],
                    cols: 0..in_features,
                })
                .collect()
        }
    })
}

/// The rank's part of row-major `w: [_, in_features]`, row-major `[shard.out, shard.in]`.
pub fn submatrix<T: Copy>(w: &[T], in_features: usize, shard: &Shard) -> Vec<T> {
    let mut out = Vec::with_capacity(shard.out_features() * shard.in_features());
    for rows in &shard.rows {
        for r in rows.clone() {
            let row = &w[r * in_features..(r + 1) * in_features];
            out.extend_from_slice(&row[shard.cols.clone()]);
        }
    }
    out
}

/// Columns `cols` of row-major `x: [tokens, width]`, as `[tokens, cols.len()]`.
pub fn take_columns(x: &[f32], width: usize, cols: Range<usize>) -> Vec<f32> {
    x.chunks_exact(width)
        .flat_map(|row| row[cols.clone()].iter().copied())
        .collect()
}

/// Writes `part: [tokens, cols.len()]` into columns `cols` of row-major `out: [tokens, width]`.
pub fn put_columns(out: &mut [f32], width: usize, cols: Range<usize>, part: &[f32]) {
    if cols.is_empty() {
        return;
    }
    for (row, src) in out
        .chunks_exact_mut(width)
        .zip(part.chunks_exact(cols.len()))
    {
        row[cols.clone()].copy_from_slice(src);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::ops;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        (0..n)
            .map(|i| {
                let x = (i as u32).wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
                (x % 2001) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    /// `x [t, k] · w [n, k]ᵀ` in f64, summed in order (the reference the shards must meet).
    fn matmul(x: &[f32], t: usize, w: &[f32], n: usize, k: usize) -> Vec<f32> {
        let mut out = vec![0.0; t * n];
        for i in 0..t {
            for j in 0..n {
                let dot: f64 = (0..k)
                    .map(|c| f64::from(x[i * k + c]) * f64::from(w[j * k + c]))
                    .sum();
                out[i * n + j] = dot as f32;
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn split_is_even_contiguous_and_in_whole_granules() {
        assert_eq!(split(10, 1, 3, "w").unwrap(), vec![0..4, 4..7, 7..10]);
        assert_eq!(split(12, 4, 2, "w").unwrap(), vec![0..8, 8..12]);
        assert_eq!(split(8, 2, 4, "w").unwrap(), vec![0..2, 2..4, 4..6, 6..8]);
        assert_eq!(split(5, 5, 1, "w").unwrap(), vec![0..5]);
    }

    #[test]
    fn split_refuses_what_cannot_give_every_rank_a_granule() {
        let err = split(2 * 128, 128, 4, "q_b_proj").unwrap_err().to_string();
        assert!(
            err.contains("q_b_proj") && err.contains("2 unit(s) of 128") && err.contains("4 GPUs"),
            "{err}"
        );
        let err = split(10, 4, 2, "o_proj").unwrap_err().to_string();
        assert!(err.contains("in units of 4"), "{err}");
        assert!(split(4, 1, 0, "w").is_err());
        assert!(shards(Parallel::GluColumns, 7, 3, 2, "mlp").is_err());
    }

    #[test]
    fn column_shards_concatenate_to_the_whole_projection() {
        let (t, k, n, granule) = (3, 16, 24, 4);
        let (x, w) = (pseudo(t * k, 1), pseudo(n * k, 2));
        let want = matmul(&x, t, &w, n, k);
        for ranks in 1..=6 {
            let mut got = vec![f32::NAN; t * n];
            for s in shards(Parallel::Columns { granule }, n, k, ranks, "w").unwrap() {
                let part = matmul(&x, t, &submatrix(&w, k, &s), s.out_features(), k);
                put_columns(&mut got, n, s.rows[0].clone(), &part);
            }
            assert_eq!(got, want, "{ranks} ranks");
        }
    }

    #[test]
    fn row_shards_sum_to_the_whole_projection() {
        let (t, k, n, granule) = (3, 24, 10, 6);
        let (x, w) = (pseudo(t * k, 3), pseudo(n * k, 4));
        let want = matmul(&x, t, &w, n, k);
        for ranks in 1..=4 {
            let mut got = vec![0.0f32; t * n];
            for s in shards(Parallel::Rows { granule }, n, k, ranks, "w").unwrap() {
                let xs = take_columns(&x, k, s.cols.clone());
                let part = matmul(&xs, t, &submatrix(&w, k, &s), n, s.in_features());
                for (g, p) in got.iter_mut().zip(&part) {
                    *g += p;
                }
            }
            assert!(max_diff(&got, &want) < 1e-5, "{ranks} ranks");
        }
    }

    /// A gated MLP split by its intermediate dimension (gate-and-up column-parallel, down
    /// row-parallel) sums to the whole MLP: each rank's SwiGLU sees matching gate and up rows.
    #[test]
    fn glu_shards_with_row_parallel_down_sum_to_the_whole_mlp() {
        let (t, hidden, inter) = (2, 8, 12);
        let x = pseudo(t * hidden, 5);
        let gate_up = pseudo(2 * inter * hidden, 6);
        let down = pseudo(hidden * inter, 7);
        let mlp = |gate_up: &[f32], down: &[f32], inter: usize| {
            let gu = matmul(&x, t, gate_up, 2 * inter, hidden);
            let mut act = Vec::new();
            for row in gu.chunks_exact(2 * inter) {
                let mut a = row[..inter].to_vec();
                ops::silu_mul_inplace(&mut a, &row[inter..]);
                act.extend(a);
            }
            matmul(&act, t, down, hidden, inter)
        };
        let want = mlp(&gate_up, &down, inter);
        for ranks in 1..=4 {
            let gu_shards = shards(Parallel::GluColumns, 2 * inter, hidden, ranks, "gu").unwrap();
            let down_shards =
                shards(Parallel::Rows { granule: 1 }, hidden, inter, ranks, "down").unwrap();
            let mut got = vec![0.0f32; t * hidden];
            for (g, d) in gu_shards.iter().zip(&down_shards) {
                assert_eq!(g.rows[0], d.cols, "gate rows and down columns match");
                let part = mlp(
                    &submatrix(&gate_up, hidden, g),
                    &submatrix(&down, inter, d),
                    d.in_features(),
                );
                for (o, p) in got.iter_mut().zip(&part) {
                    *o += p;
                }
            }
            assert!(max_diff(&got, &want) < 1e-5, "{ranks} ranks");
        }
    }

    #[test]
    fn take_and_put_columns_round_trip() {
        let x = pseudo(4 * 6, 8);
        let mut y = vec![0.0; 4 * 6];
        for cols in [0..2, 2..5, 5..6] {
            let part = take_columns(&x, 6, cols.clone());
            assert_eq!(part.len(), 4 * cols.len());
            put_columns(&mut y, 6, cols, &part);
        }
        assert_eq!(x, y);
    }
}
