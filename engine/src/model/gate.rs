//! The MoE gate: scores every routed expert and picks each token's experts.
//!
//! The gate only produces routing — `(expert ids, weights)` per token. Who runs the experts
//! (this process, or expert workers across the network) is the caller's business.

use crate::checkpoint::{Checkpoint, Precision};
use crate::config::{MoeConfig, ScoringFunc, TopkMethod};
use crate::cpu::{self, ops};
use crate::error::{EngineError, Result};
use crate::tensor::Tensor;

/// Each token's chosen experts and their weights, `[tokens, k]` row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Routing {
    pub k: usize,
    pub ids: Vec<u32>,
    pub weights: Vec<f32>,
}

impl Routing {
    pub fn tokens(&self) -> usize {
        self.ids.len().checked_div(self.k).unwrap_or(0)
    }

    /// The `(expert, weight)` pairs of token `t`.
    pub fn token(&self, t: usize) -> impl Iterator<Item = (u32, f32)> + '_ {
        let r = t * self.k..(t + 1) * self.k;
        self.ids[r.clone()]
            .iter()
            .copied()
            .zip(self.weights[r].iter().copied())
    }
}

#[derive(Debug)]
pub struct Gate {
    /// `[n_routed_experts, hidden]`, f32 like the reference computes it.
    weight: Tensor,
    /// `e_score_correction_bias`: added for selection only.
    bias: Option<Vec<f32>>,
    config: MoeConfig,
    /// The same gate on a device, after [`offload`](Gate::offload).
    #[cfg(feature = "cuda")]
    device: Option<crate::cuda::GpuGate>,
}

impl Gate {
    pub fn new(config: &MoeConfig, ck: &Checkpoint, prefix: &str, hidden: usize) -> Result<Gate> {
        let e = config.n_routed_experts;
        let weight = ck.load(&format!("{prefix}.weight"), &[e, hidden], Precision::F32)?;
        let bias_name = format!("{prefix}.e_score_correction_bias");
        let bias = if config.topk_method == TopkMethod::NoAuxTc {
            Some(ck.load(&bias_name, &[e], Precision::F32)?.into_f32_vec())
        } else {
            None
        };
        Ok(Gate {
            weight,
            bias,
            config: config.clone(),
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// Builds a gate from tensors (tests and tools).
    pub fn from_parts(config: &MoeConfig, weight: Tensor, bias: Option<Vec<f32>>) -> Result<Gate> {
        let (e, _) = weight.dims2()?;
        if e != config.n_routed_experts || bias.as_ref().is_some_and(|b| b.len() != e) {
            return Err(EngineError::Shape(format!(
                "gate weight has {e} rows for {} experts",
                config.n_routed_experts
            )));
        }
        Ok(Gate {
            weight: weight.to_f32(),
            bias,
            config: config.clone(),
            #[cfg(feature = "cuda")]
            device: None,
        })
    }

    /// Routes on `compute` from now on (the first GPU of a group): the f32 logits GEMM and the
    /// selection run there and only the routing comes back. The host copy stays, so the CPU
    /// path and this one are the same gate.
    pub fn offload(&mut self, compute: &crate::tensor::Compute) -> Result<()> {
        use crate::tensor::Compute;
        match compute {
            Compute::Cpu => {}
            #[cfg(feature = "cuda")]
            Compute::Cuda(gpu) => {
                self.device = Some(crate::cuda::GpuGate::from_gate(gpu.clone(), self)?);
            }
            #[cfg(feature = "cuda")]
            Compute::CudaGroup(group) => {
                let gpu = group.gpus()[0].clone();
                self.device = Some(crate::cuda::GpuGate::from_gate(gpu, self)?);
            }
        }
        Ok(())
    }

    /// `[n_routed_experts, hidden]` f32.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// The correction bias (`e_score_correction_bias`), when the gate selects with one.
    pub fn bias(&self) -> Option<&[f32]> {
        self.bias.as_deref()
    }

    pub fn config(&self) -> &MoeConfig {
        &self.config
    }

    /// `x: [tokens, hidden]` → routing `[tokens, num_experts_per_tok]`.
    pub fn forward(&self, x: &Tensor) -> Result<Routing> {
        let (tokens, _) = x.dims2()?;
        #[cfg(feature = "cuda")]
        if let Some(device) = &self.device {
            return device.forward_host(x);
        }
        let e = self.config.n_routed_experts;
        // [tokens, n_routed_experts]
        let mut logits = vec![0.0f32; tokens * e];
        cpu::matmul_t(x.as_f32()?, tokens, &self.weight, &mut logits)?;
        Ok(self.route_logits(&logits))
    }

    /// Routing from gate logits `[tokens, n_routed_experts]` (whole rows; a trailing partial
    /// row is ignored).
    pub fn route_logits(&self, logits: &[f32]) -> Routing {
        let e = self.config.n_routed_experts;
        let tokens = logits.len() / e.max(1);
        let k = self.config.num_experts_per_tok;
        let mut routing = Routing {
            k,
            ids: Vec::with_capacity(tokens * k),
            weights: Vec::with_capacity(tokens * k),
        };
        let mut scratch = GateScratch::new(e, self.config.n_group);
        for row in logits.chunks_exact(e) {
            self.route_token(row, &mut scratch, &mut routing);
        }
        routing
    }

    fn route_token(&self, logits: &[f32], s: &mut GateScratch, out: &mut Routing) {
        let c = &self.config;
        s.scores.clear();
        match c.scoring_func {
            ScoringFunc::Sigmoid => s.scores.extend(logits.iter().map(|&l| ops::sigmoid(l))),
            ScoringFunc::Softmax => {
                s.scores.extend_from_slice(logits);
                ops::softmax_inplace(&mut s.scores);
            }
        }
        s.choice.clear();
        match &self.bias {
            Some(b) => s.choice.extend(s.scores.iter().zip(b).map(|(x, y)| x + y)),
            None => s.choice.extend_from_slice(&s.scores),
        }
        let per_group = c.n_routed_experts / c.n_group;
        let group_limited = c.n_group > 1 && c.topk_method != TopkMethod::Greedy;
        if group_limited {
            s.group_scores.clear();
            for g in s.choice.chunks_exact(per_group) {
                let score = match c.topk_method {
                    // Sum of the group's two best biased scores.
                    TopkMethod::NoAuxTc => {
                        let (mut a, mut b) = (f32::NEG_INFINITY, f32::NEG_INFINITY);
                        for &v in g {
                            if v > a {
                                b = a;
                                a = v;
                            } else if v > b {
                                b = v;
                            }
                        }
                        a + b
                    }
                    _ => g.iter().copied().fold(f32::NEG_INFINITY, f32::max),
                };
                s.group_scores.push(score);
            }
            top_k_indices(&s.group_scores, c.topk_group, &mut s.order);
            s.keep.clear();
            s.keep.resize(c.n_group, false);
            for &g in &s.order {
                s.keep[g] = true;
            }
            // Dropped groups can never be chosen (DeepSeek's reference masks them with -inf).
            for (i, v) in s.choice.iter_mut().enumerate() {
                if !s.keep[i / per_group] {
                    *v = f32::NEG_INFINITY;
                }
            }
        }
        top_k_indices(&s.choice, c.num_experts_per_tok, &mut s.order);
        let start = out.weights.len();
        for &i in &s.order {
            out.ids.push(i as u32);
            out.weights.push(s.scores[i]);
        }
        let w = &mut out.weights[start..];
        if c.norm_topk_prob && c.num_experts_per_tok > 1 {
            let denom = w.iter().sum::<f32>() + 1e-20;
            for v in w.iter_mut() {
                *v /= denom;
            }
        }
        for v in w.iter_mut() {
            *v *= c.routed_scaling_factor;
        }
    }
}

struct GateScratch {
    scores: Vec<f32>,
    choice: Vec<f32>,
    group_scores: Vec<f32>,
    keep: Vec<bool>,
    order: Vec<usize>,
}

impl GateScratch {
    fn new(experts: usize, groups: usize) -> Self {
        GateScratch {
            scores: Vec::with_capacity(experts),
            choice: Vec::with_capacity(experts),
            group_scores: Vec::with_capacity(groups),
            keep: Vec::with_capacity(groups),
            order: Vec::with_capacity(experts),
        }
    }
}

/// Indices of the `k` largest values, best first; ties go to the lower index.
fn top_k_indices(values: &[f32], k: usize, out: &mut Vec<usize>) {
    out.clear();
    out.extend(0..values.len());
    let cmp = |a: &usize, b: &usize| values[*b].total_cmp(&values[*a]).then(a.cmp(b));
    if k < out.len() {
        out.select_nth_unstable_by(k, cmp);
        out.truncate(k);
    }
    out.sort_by(cmp);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(method: TopkMethod, scoring: ScoringFunc) -> MoeConfig {
        MoeConfig {
            n_routed_experts: 8,
            n_shared_experts: 1,
            moe_intermediate_size: 4,
            num_experts_per_tok: 2,
            n_group: 4,
            topk_group: 2,
            routed_scaling_factor: 2.5,
            norm_topk_prob: true,
            scoring_func: scoring,
            topk_method: method,
            layers: crate::config::MoeLayers::DeepSeek {
                first_k_dense_replace: 0,
                moe_layer_freq: 1,
            },
            naming: crate::config::MoeNaming::DEEPSEEK,
        }
    }

    /// A gate whose logits equal the input row (identity weight over 8 features).
    fn identity_gate(c: &MoeConfig, bias: Option<Vec<f32>>) -> Gate {
        let mut w = vec![0.0; 64];
        for i in 0..8 {
            w[i * 8 + i] = 1.0;
        }
        Gate::from_parts(c, Tensor::from_f32(&[8, 8], w).unwrap(), bias).unwrap()
    }

    #[test]
    fn group_limited_gate_never_picks_from_dropped_groups() {
        let c = config(TopkMethod::NoAuxTc, ScoringFunc::Sigmoid);
        // Groups: {0,1} {2,3} {4,5} {6,7}. Expert 0 is the single best score, but group {0,1}'s
        // top-2 sum is below groups {2,3} and {4,5}.
        let logits = vec![3.0, -6.0, 1.0, 1.0, 1.2, 1.2, -3.0, -3.0];
        let gate = identity_gate(&c, Some(vec![0.0; 8]));
        let r = gate
            .forward(&Tensor::from_f32(&[1, 8], logits).unwrap())
            .unwrap();
        let mut ids = r.ids.clone();
        ids.sort();
        assert!(ids.iter().all(|&i| (2..6).contains(&i)), "{ids:?}");
        assert_eq!(r.ids[0], 4);
    }

    #[test]
    fn correction_bias_changes_selection_but_not_weights() {
        let c = config(TopkMethod::NoAuxTc, ScoringFunc::Sigmoid);
        let logits = vec![2.0, 1.9, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0];
        let mut bias = vec![0.0; 8];
        bias[1] = -5.0; // pushes expert 1 out; expert 0's group partner no longer wins
        let plain = identity_gate(&c, Some(vec![0.0; 8]))
            .forward(&Tensor::from_f32(&[1, 8], logits.clone()).unwrap())
            .unwrap();
        assert_eq!(plain.ids, vec![0, 1]);
        let biased = identity_gate(&c, Some(bias))
            .forward(&Tensor::from_f32(&[1, 8], logits.clone()).unwrap())
            .unwrap();
        assert!(!biased.ids.contains(&1), "{:?}", biased.ids);
        // Weights come from unbiased scores, normalised, times the scaling factor.
        let s: Vec<f32> = biased
            .ids
            .iter()
            .map(|&i| ops::sigmoid(logits[i as usize]))
            .collect();
        let sum: f32 = s.iter().sum();
        for (w, s) in biased.weights.iter().zip(&s) {
            assert!((w - s / sum * 2.5).abs() < 1e-6);
        }
        assert!((plain.weights.iter().sum::<f32>() - 2.5).abs() < 1e-5);
    }

    #[test]
    fn softmax_greedy_gate_takes_global_top_k_unnormalised() {
        let mut c = config(TopkMethod::Greedy, ScoringFunc::Softmax);
        c.norm_topk_prob = false;
        c.routed_scaling_factor = 1.0;
        let logits = vec![0.0, 5.0, 0.0, 0.0, 0.0, 0.0, 4.0, 0.0];
        let r = identity_gate(&c, None)
            .forward(&Tensor::from_f32(&[1, 8], logits.clone()).unwrap())
            .unwrap();
        assert_eq!(r.ids, vec![1, 6]);
        let mut p = logits.clone();
        ops::softmax_inplace(&mut p);
        assert!((r.weights[0] - p[1]).abs() < 1e-6 && (r.weights[1] - p[6]).abs() < 1e-6);
    }

    #[test]
    fn top_k_breaks_ties_by_lower_index() {
        let mut out = Vec::new();
        top_k_indices(&[1.0, 2.0, 2.0, 0.5], 2, &mut out);
        assert_eq!(out, vec![1, 2]);
    }
}
