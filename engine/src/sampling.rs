//! Turning one row of logits into the next token: penalties, temperature, top-k, min-p, top-p
//! and a seeded draw, plus log-probabilities for clients that ask for them.
//!
//! The order follows vLLM and transformers: OpenAI's `logit_bias` added to the raw logits,
//! penalties on them, then temperature,
//! then the top-k / min-p / top-p cuts on the softmax, then the draw. Greedy decoding
//! (temperature 0) takes the arg-max of the penalised logits.

use std::collections::HashMap;

use rand::{Rng, SeedableRng, rngs::StdRng};

#[derive(Clone, Debug, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// 0 means no top-k cut.
    pub top_k: usize,
    /// 1 means no nucleus cut.
    pub top_p: f32,
    /// Drop tokens less likely than `min_p ×` the most likely one; 0 keeps all.
    pub min_p: f32,
    /// transformers' repetition penalty over prompt and output tokens; 1 is none.
    pub repetition_penalty: f32,
    /// OpenAI's presence penalty over output tokens; 0 is none.
    pub presence_penalty: f32,
    /// OpenAI's frequency penalty over output tokens; 0 is none.
    pub frequency_penalty: f32,
    pub seed: u64,
    /// OpenAI's `logit_bias`: `(token, bias)` added to the token's logit before anything else
    /// (greedy decoding included); -100 bans a token, +100 all but forces it.
    pub logit_bias: Vec<(u32, f32)>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logit_bias: Vec::new(),
        }
    }
}

impl SamplingParams {
    /// Whether the logits are changed before the draw (bias or penalties).
    fn adjusts_logits(&self) -> bool {
        !self.logit_bias.is_empty()
            || self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
    }
}

/// The log-probability of a chosen token and its most likely alternatives.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenLogprobs {
    pub token: u32,
    pub logprob: f32,
    /// `(token, logprob)`, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Picks the next tokens of one sequence. Keeps the sequence's token counts for the penalties
/// and its random state, so a preempted and recomputed sequence continues the same draw.
#[derive(Debug)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    probs: Vec<(usize, f32)>,
    penalised: Vec<f32>,
    /// Output tokens so far and how often each was drawn.
    output_counts: HashMap<u32, u32>,
    /// Prompt tokens (for the repetition penalty).
    prompt_tokens: Vec<u32>,
}

impl Sampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Sampler {
        let rng = StdRng::seed_from_u64(params.seed);
        let mut prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt.to_vec()
        } else {
            Vec::new()
        };
        prompt_tokens.sort_unstable();
        prompt_tokens.dedup();
        Sampler {
            params,
            rng,
            probs: Vec::new(),
            penalised: Vec::new(),
            output_counts: HashMap::new(),
            prompt_tokens,
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Draws the next token and records it as output.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let token = if self.params.adjusts_logits() {
            let mut penalised = std::mem::take(&mut self.penalised);
            penalised.clear();
            penalised.extend_from_slice(logits);
            self.adjust(&mut penalised);
            let t = self.draw(&penalised);
            self.penalised = penalised;
            t
        } else {
            self.draw(logits)
        };
        *self.output_counts.entry(token).or_insert(0) += 1;
        token
    }

    fn adjust(&self, logits: &mut [f32]) {
        let p = &self.params;
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = logits.get_mut(t as usize) {
                *l += bias;
            }
        }
        if p.repetition_penalty != 1.0 {
            let seen = self
                .prompt_tokens
                .iter()
                .copied()
                .chain(self.output_counts.keys().copied());
            for t in seen {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 {
                        *l / p.repetition_penalty
                    } else {
                        *l * p.repetition_penalty
                    };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &n) in &self.output_counts {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * n as f32;
                }
            }
        }
    }

    fn draw(&mut self, logits: &[f32]) -> u32 {
        let p = &self.params;
        if p.temperature == 0.0 {
            return argmax(logits) as u32;
        }
        let t = p.temperature;
        // Shift by the largest logit before dividing: a tiny temperature (1e-38) would
        // otherwise overflow `l / t` to infinity and the softmax to NaN; shifted, the best
        // token scales to 0 and the rest to large negatives, which is the greedy limit.
        let top = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        if !top.is_finite() {
            return argmax(logits) as u32;
        }
        self.probs.clear();
        self.probs
            .extend(logits.iter().enumerate().map(|(i, &l)| (i, (l - top) / t)));
        let by_logit = |a: &(usize, f32), b: &(usize, f32)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
        if p.top_k > 0 && p.top_k < self.probs.len() {
            self.probs.select_nth_unstable_by(p.top_k - 1, by_logit);
            self.probs.truncate(p.top_k);
        }
        self.probs.sort_unstable_by(by_logit);
        let max = self.probs[0].1;
        let mut sum = 0.0;
        for q in self.probs.iter_mut() {
            q.1 = (q.1 - max).exp();
            sum += q.1;
        }
        for q in self.probs.iter_mut() {
            q.1 /= sum;
        }
        if p.min_p > 0.0 {
            let floor = self.probs[0].1 * p.min_p;
            let kept = self.probs.iter().take_while(|q| q.1 >= floor).count();
            self.probs.truncate(kept.max(1));
        }
        let mut kept = 0;
        let mut mass = 0.0;
        for q in self.probs.iter() {
            mass += q.1;
            kept += 1;
            if mass >= p.top_p {
                break;
            }
        }
        self.probs.truncate(kept);
        let draw: f32 = self.rng.random::<f32>() * mass;
        let mut acc = 0.0;
        for &(i, q) in &self.probs {
            acc += q;
            if draw < acc {
                return i as u32;
            }
        }
        self.probs[kept - 1].0 as u32
    }
}

/// Log-probabilities of the model's distribution (raw logits, before penalties and
/// temperature, as vLLM reports them) for `token` and the `top_n` most likely tokens.
pub fn logprobs(logits: &[f32], token: u32, top_n: usize) -> TokenLogprobs {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let lp = |i: usize| logits.get(i).map_or(f32::NEG_INFINITY, |&l| l - lse);
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(top_n);
    if top_n > 0 {
        let mut idx: Vec<usize> = (0..logits.len()).collect();
        let by = |a: &usize, b: &usize| logits[*b].total_cmp(&logits[*a]).then(a.cmp(b));
        let n = top_n.min(idx.len());
        if n < idx.len() {
            idx.select_nth_unstable_by(n - 1, by);
            idx.truncate(n);
        }
        idx.sort_unstable_by(by);
        top.extend(idx.into_iter().map(|i| (i as u32, lp(i))));
    }
    TokenLogprobs {
        token,
        logprob: lp(token as usize),
        top,
    }
}

/// Index of the largest value; ties go to the lowest index.
pub fn argmax(values: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in values.iter().enumerate() {
        if v > values[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampler(params: SamplingParams) -> Sampler {
        Sampler::new(params, &[])
    }

    #[test]
    fn greedy_sampler_takes_the_first_maximum() {
        let mut s = sampler(SamplingParams::default());
        assert_eq!(s.sample(&[0.1, 3.0, 3.0, -1.0]), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_respects_top_k() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let params = SamplingParams {
            temperature: 1.0,
            top_k: 3,
            seed: 7,
            ..Default::default()
        };
        let mut top3: Vec<usize> = (0..50).collect();
        top3.sort_by(|a, b| logits[*b].total_cmp(&logits[*a]));
        top3.truncate(3);
        let draws = |seed| {
            let mut s = sampler(SamplingParams {
                seed,
                ..params.clone()
            });
            (0..200).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        let a = draws(7);
        assert_eq!(a, draws(7));
        assert_ne!(a, draws(8));
        assert!(a.iter().all(|t| top3.contains(&(*t as usize))));
        // All three survive the cut and get drawn.
        for t in &top3 {
            assert!(a.contains(&(*t as u32)));
        }
    }

    #[test]
    fn tiny_top_p_is_greedy() {
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            top_p: 1e-6,
            seed: 1,
            ..Default::default()
        });
        for _ in 0..20 {
            assert_eq!(s.sample(&[0.0, 2.0, 1.9]), 1);
        }
    }

    #[test]
    fn tiny_temperature_is_greedy_not_nan() {
        for temperature in [1e-38, f32::MIN_POSITIVE, 1e-6] {
            let mut s = sampler(SamplingParams {
                temperature,
                seed: 7,
                ..Default::default()
            });
            for _ in 0..20 {
                assert_eq!(s.sample(&[30.0, 90.0, 89.5, -40.0]), 1, "t = {temperature}");
            }
        }
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        // Probabilities ≈ 0.66, 0.24, 0.09, 0.003: min_p 0.2 keeps only the first two.
        let logits = [3.0, 2.0, 1.0, -2.5];
        let mut s = sampler(SamplingParams {
            temperature: 1.0,
            min_p: 0.2,
            seed: 3,
            ..Default::default()
        });
        let draws: Vec<u32> = (0..300).map(|_| s.sample(&logits)).collect();
        assert!(draws.iter().all(|&t| t < 2), "{draws:?}");
        assert!(draws.contains(&0) && draws.contains(&1));
    }

    #[test]
    fn frequency_penalty_steers_greedy_away_from_repeats() {
        let logits = [1.0, 0.9, 0.0];
        let mut s = sampler(SamplingParams {
            frequency_penalty: 0.2,
            ..Default::default()
        });
        // 0 wins once; then 1.0 - 0.2 < 0.9, so 1 wins; then both are penalised once.
        assert_eq!(s.sample(&logits), 0);
        assert_eq!(s.sample(&logits), 1);
        assert_eq!(s.sample(&logits), 0);
    }

    #[test]
    fn logit_bias_bans_and_forces_tokens_greedy_or_sampled() {
        let logits = [2.0, 1.0, 0.0, -1.0];
        let mut banned = sampler(SamplingParams {
            logit_bias: vec![(0, -100.0)],
            ..Default::default()
        });
        assert_eq!(banned.sample(&logits), 1);
        let mut forced = sampler(SamplingParams {
            temperature: 1.0,
            seed: 5,
            logit_bias: vec![(3, 100.0)],
            ..Default::default()
        });
        assert!((0..200).all(|_| forced.sample(&logits) == 3));
        // Out-of-range ids are the validator's to refuse; here they change nothing.
        let mut ignored = sampler(SamplingParams {
            logit_bias: vec![(99, 100.0)],
            ..Default::default()
        });
        assert_eq!(ignored.sample(&logits), 0);
    }

    #[test]
    fn presence_penalty_is_paid_once_per_token() {
        let logits = [1.0, 0.5];
        let mut s = sampler(SamplingParams {
            presence_penalty: 0.4,
            ..Default::default()
        });
        assert_eq!(s.sample(&logits), 0);
        // 0.6 > 0.5 however often 0 repeats.
        for _ in 0..5 {
            assert_eq!(s.sample(&logits), 0);
        }
    }

    #[test]
    fn repetition_penalty_covers_prompt_tokens_and_both_signs() {
        let params = SamplingParams {
            repetition_penalty: 2.0,
            ..Default::default()
        };
        // Token 0 (in the prompt) drops from 1.0 to 0.5, below token 1's 0.8.
        let mut s = Sampler::new(params.clone(), &[0]);
        assert_eq!(s.sample(&[1.0, 0.8]), 1);
        // Negative logits are multiplied: -0.1 → -0.2, below -0.15.
        let mut s = Sampler::new(params, &[0]);
        assert_eq!(s.sample(&[-0.1, -0.15]), 1);
    }

    #[test]
    fn logprobs_are_normalised_and_ranked() {
        let logits = [0.0f32, 2.0, 1.0];
        let lp = logprobs(&logits, 2, 2);
        let total: f32 = (0..3).map(|i| logprobs(&logits, i, 0).logprob.exp()).sum();
        assert!((total - 1.0).abs() < 1e-5);
        assert_eq!(lp.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 2]);
        assert!((lp.logprob - lp.top[1].1).abs() < 1e-6);
        assert!(lp.top[0].1 > lp.top[1].1);
    }
}
