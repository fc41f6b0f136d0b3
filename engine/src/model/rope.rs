//! Rotary position embedding: DeepSeek's interleaved pairs or the rotate-half layout, with
//! YaRN, llama3 and linear frequency scaling.
//!
//! Pair `i` rotates by `pos · inv_freq[i]`. Interleaved, the pair is `(x[2i], x[2i+1])`
//! (transformers de-interleaves DeepSeek's q and k before rotating; both get the same
//! permutation, so scores are identical); rotate-half, it is `(x[i], x[i + d/2])`.

use crate::config::{
    Llama3Scaling, RopeConfig, RopeScaling, RopeStyle, YarnConfig, yarn_get_mscale,
};

#[derive(Debug, Clone)]
pub struct Rope {
    inv_freq: Vec<f32>,
    /// Scale applied to cos and sin (YaRN's attention factor; 1 otherwise).
    attention_factor: f32,
    style: RopeStyle,
}

impl Rope {
    pub fn new(config: &RopeConfig, dim: usize) -> Rope {
        let base = config.theta;
        // Frequencies in f32 as the reference computes them.
        let pos_freqs: Vec<f64> = (0..dim / 2)
            .map(|i| (base as f32).powf((2 * i) as f32 / dim as f32) as f64)
            .collect();
        let plain = || {
            pos_freqs
                .iter()
                .map(|p| 1.0 / *p as f32)
                .collect::<Vec<f32>>()
        };
        let (inv_freq, attention_factor) = match &config.scaling {
            RopeScaling::None => (plain(), 1.0),
            RopeScaling::Linear(factor) => {
                (plain().iter().map(|f| f / *factor as f32).collect(), 1.0)
            }
            RopeScaling::Yarn(y) => yarn(y, base, dim, &pos_freqs),
            RopeScaling::Llama3(l) => (llama3(l, &plain()), 1.0),
        };
        Rope {
            inv_freq,
            attention_factor,
            style: config.style,
        }
    }

    pub fn dim(&self) -> usize {
        self.inv_freq.len() * 2
    }

    /// Each pair's frequency, scaling applied.
    pub fn inv_freq(&self) -> &[f32] {
        &self.inv_freq
    }

    /// The factor on cos and sin (YaRN's attention factor; 1 otherwise).
    pub fn attention_factor(&self) -> f32 {
        self.attention_factor
    }

    pub fn style(&self) -> RopeStyle {
        self.style
    }

    /// Rotates `x` (length `dim`) in place for position `pos`. Allocates its angles: to rotate
    /// many vectors of one position, use [`cos_sin`](Self::cos_sin) once and
    /// [`apply_cos_sin`](Self::apply_cos_sin) on each.
    pub fn apply(&self, x: &mut [f32], pos: usize) {
        let mut cs = vec![0.0; self.dim()];
        self.cos_sin(pos, &mut cs);
        self.apply_cos_sin(x, &cs);
    }

    /// `cos` then `sin` of every pair's angle at `pos` (scaled by the attention factor) into
    /// `out: [dim]`, to rotate many heads of one token with [`apply_cos_sin`](Self::apply_cos_sin).
    pub fn cos_sin(&self, pos: usize, out: &mut [f32]) {
        let half = self.inv_freq.len();
        let p = pos as f32;
        let (cos, sin) = out.split_at_mut(half);
        for (i, &f) in self.inv_freq.iter().enumerate() {
            let (s, c) = (p * f).sin_cos();
            cos[i] = c * self.attention_factor;
            sin[i] = s * self.attention_factor;
        }
    }

    /// Rotates `x` (length `dim`) by angles from [`cos_sin`](Self::cos_sin).
    pub fn apply_cos_sin(&self, x: &mut [f32], cs: &[f32]) {
        let half = self.inv_freq.len();
        let (cos, sin) = cs.split_at(half);
        match self.style {
            RopeStyle::Interleaved => {
                for i in 0..half {
                    let (c, s) = (cos[i], sin[i]);
                    let (a, b) = (x[2 * i], x[2 * i + 1]);
                    x[2 * i] = a * c - b * s;
                    x[2 * i + 1] = b * c + a * s;
                }
            }
            RopeStyle::Half => {
                let (lo, hi) = x.split_at_mut(half);
                for i in 0..half {
                    let (c, s) = (cos[i], sin[i]);
                    let (a, b) = (lo[i], hi[i]);
                    lo[i] = a * c - b * s;
                    hi[i] = b * c + a * s;
                }
            }
        }
    }
}

/// Llama 3.1's scaling: long wavelengths divided by the factor, short ones kept, a smooth blend
/// between (f32, as transformers computes it).
fn llama3(l: &Llama3Scaling, inv_freq: &[f32]) -> Vec<f32> {
    let factor = l.factor as f32;
    let old = l.original_max_position_embeddings as f32;
    let (low, high) = (l.low_freq_factor as f32, l.high_freq_factor as f32);
    let low_freq_wavelen = old / low;
    let high_freq_wavelen = old / high;
    inv_freq
        .iter()
        .map(|&f| {
            let wavelen = 2.0 * std::f32::consts::PI / f;
            let scaled = if wavelen > low_freq_wavelen {
                f / factor
            } else {
                f
            };
            if wavelen < high_freq_wavelen || wavelen > low_freq_wavelen {
                scaled
            } else {
                let smooth = (old / wavelen - low) / (high - low);
                (1.0 - smooth) * scaled / factor + smooth * scaled
            }
        })
        .collect()
}

fn yarn(y: &YarnConfig, base: f64, dim: usize, pos_freqs: &[f64]) -> (Vec<f32>, f32) {
    let attention_factor = y.attention_factor.unwrap_or_else(|| {
        if y.mscale != 0.0 && y.mscale_all_dim != 0.0 {
            yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)
        } else {
            yarn_get_mscale(y.factor, 1.0)
        }
    });
    let correction_dim = |rotations: f64| {
        (dim as f64
            * (y.original_max_position_embeddings as f64
                / (rotations * 2.0 * std::f64::consts::PI))
                .ln())
            / (2.0 * base.ln())
    };
    let low = correction_dim(y.beta_fast).floor().max(0.0);
    let high = correction_dim(y.beta_slow).ceil().min(dim as f64 - 1.0);
    let high = if low == high { high + 0.001 } else { high };
    let inv_freq = pos_freqs
        .iter()
        .enumerate()
        .map(|(i, &p)| {
            let ramp =
                (((i as f32 - low as f32) / (high as f32 - low as f32)).clamp(0.0, 1.0)) as f64;
            let extrapolation_factor = 1.0 - ramp;
            let extrapolation = (1.0 / p as f32) as f64;
            let interpolation = (1.0 / (y.factor as f32 * p as f32)) as f64;
            (interpolation * (1.0 - extrapolation_factor) + extrapolation * extrapolation_factor)
                as f32
        })
        .collect();
    (inv_freq, attention_factor as f32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_preserves_norm_and_relative_positions() {
        let rope = Rope::new(
            &RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None,
                style: RopeStyle::Interleaved,
            },
            8,
        );
        let q0: Vec<f32> = (0..8).map(|i| i as f32 * 0.3 - 1.0).collect();
        let k0: Vec<f32> = (0..8).map(|i| 1.0 - i as f32 * 0.2).collect();
        let dot_at = |pq: usize, pk: usize| {
            let (mut q, mut k) = (q0.clone(), k0.clone());
            rope.apply(&mut q, pq);
            rope.apply(&mut k, pk);
            q.iter().zip(&k).map(|(a, b)| a * b).sum::<f32>()
        };
        // Scores depend only on the distance between positions.
        assert!((dot_at(5, 3) - dot_at(12, 10)).abs() < 1e-4);
        let mut q = q0.clone();
        rope.apply(&mut q, 7);
        let n = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>();
        assert!((n(&q) - n(&q0)).abs() < 1e-4);
    }

    #[test]
    fn yarn_interpolates_low_frequencies_and_keeps_high_ones() {
        let plain = Rope::new(
            &RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::None,
                style: RopeStyle::Interleaved,
            },
            64,
        );
        let yarn = Rope::new(
            &RopeConfig {
                theta: 10000.0,
                scaling: RopeScaling::Yarn(YarnConfig {
                    factor: 40.0,
                    original_max_position_embeddings: 4096,
                    beta_fast: 32.0,
                    beta_slow: 1.0,
                    mscale: 1.0,
                    mscale_all_dim: 1.0,
                    attention_factor: None,
                }),
                style: RopeStyle::Interleaved,
            },
            64,
        );
        assert_eq!(yarn.inv_freq[0], plain.inv_freq[0]);
        let last = plain.inv_freq.len() - 1;
        assert!((yarn.inv_freq[last] * 40.0 - plain.inv_freq[last]).abs() < 1e-9);
        assert_eq!(yarn.attention_factor, 1.0);
    }
}
