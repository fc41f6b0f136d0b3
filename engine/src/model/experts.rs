//! Routed experts as a grouped computation.
//!
//! This layer does not carry the gate: it consumes a [`Routing`] and returns the weighted sum
//! of the chosen experts per token. Rows are gathered per expert, each expert runs one GEMM
//! over all of its rows, and results are scatter-added with their routing weights — never a
//! per-token loop over experts.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rayon::prelude::*;

use crate::checkpoint::Checkpoint;
use crate::config::{Activation, MoeNaming};
use crate::error::{EngineError, Result};
use crate::model::gate::Routing;
use crate::model::mlp::Mlp;
use crate::tensor::Compute;
use crate::tensor::Tensor;

/// The experts of one MoE layer that this process holds: in host memory, or (feature `cuda`)
/// on a CUDA device. Cloning shares the weights: a worker builds its next expert set from the
/// current one while calls still run on the current one.
#[derive(Clone, Debug, Default)]
pub struct RoutedExperts {
    layer: usize,
    held: Held,
}

/// Where one layer's experts are: a worker keeps all of them in one place.
#[derive(Clone, Debug, Default)]
enum Held {
    #[default]
    Empty,
    Host(BTreeMap<u32, Arc<Mlp>>),
    #[cfg(feature = "cuda")]
    Device(crate::cuda::GpuExperts),
}

/// Rows of the batch routed to one expert, with their weights.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ExpertGroup {
    pub expert: u32,
    pub rows: Vec<u32>,
    pub weights: Vec<f32>,
}

/// Groups routing by expert, in expert order. Each group's rows are in token order.
pub fn group_by_expert(routing: &Routing) -> Vec<ExpertGroup> {
    let mut groups: BTreeMap<u32, ExpertGroup> = BTreeMap::new();
    for t in 0..routing.tokens() {
        for (e, w) in routing.token(t) {
            let g = groups.entry(e).or_insert_with(|| ExpertGroup {
                expert: e,
                ..Default::default()
            });
            g.rows.push(t as u32);
            g.weights.push(w);
        }
    }
    groups.into_values().collect()
}

impl RoutedExperts {
    /// Loads `experts` of `layer` from `{block}.experts.{e}` with the checkpoint's naming.
    pub fn load(
        ck: &Checkpoint,
        naming: &MoeNaming,
        layer: usize,
        experts: &BTreeSet<u32>,
        hidden: usize,
        intermediate: usize,
    ) -> Result<RoutedExperts> {
        let prefix = naming.block_prefix(layer);
        let loaded = experts
            .par_iter()
            .map(|&e| {
                Ok((
                    e,
                    Mlp::load(
                        ck,
                        &format!("{prefix}.experts.{e}"),
                        naming.projections,
                        hidden,
                        intermediate,
                        Activation::Silu,
                    )?,
                ))
            })
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(RoutedExperts::from_experts(layer, loaded))
    }

    /// Loads `experts` of `layer` where `compute` says: host memory, or a CUDA device.
    pub fn load_on(
        compute: &Compute,
        ck: &Checkpoint,
        naming: &MoeNaming,
        layer: usize,
        experts: &BTreeSet<u32>,
        hidden: usize,
        intermediate: usize,
    ) -> Result<RoutedExperts> {
        match compute {
            Compute::Cpu => RoutedExperts::load(ck, naming, layer, experts, hidden, intermediate),
            #[cfg(feature = "cuda")]
            Compute::Cuda(gpu) => Ok(RoutedExperts {
                layer,
                held: Held::Device(crate::cuda::GpuExperts::load(
                    gpu.clone(),
                    ck,
                    naming,
                    layer,
                    experts,
                    hidden,
                    intermediate,
                )?),
            }),
            #[cfg(feature = "cuda")]
            Compute::CudaGroup(group) => Err(crate::EngineError::Device(format!(
                "routed experts are held on one device each, not split over {group:?}: run one expert worker per GPU (`switchyard up --gpus`)"
            ))),
        }
    }

    /// Experts already loaded, keyed by id.
    pub fn from_experts(layer: usize, experts: BTreeMap<u32, Mlp>) -> RoutedExperts {
        RoutedExperts {
            layer,
            held: Held::Host(experts.into_iter().map(|(e, m)| (e, Arc::new(m))).collect()),
        }
    }

    /// None of `layer`'s experts yet.
    pub fn empty(layer: usize) -> RoutedExperts {
        RoutedExperts {
            layer,
            held: Held::Empty,
        }
    }

    /// The experts of `self` in `keep` plus those of `gained` (same layer), sharing their
    /// weights: how a worker moves to a new placement while calls still run on the current
    /// set. Both sides are where the worker computes, or empty.
    pub fn merged(&self, keep: &BTreeSet<u32>, gained: RoutedExperts) -> RoutedExperts {
        let held = match (self.held.clone(), gained.held) {
            (Held::Host(mut have), Held::Host(new)) => {
                have.retain(|e, _| keep.contains(e));
                have.extend(new);
                Held::Host(have)
            }
            (Held::Host(mut have), Held::Empty) => {
                have.retain(|e, _| keep.contains(e));
                Held::Host(have)
            }
            #[cfg(feature = "cuda")]
            (Held::Device(mut have), Held::Device(new)) => {
                have.retain(keep);
                have.extend(new);
                Held::Device(have)
            }
            #[cfg(feature = "cuda")]
            (Held::Device(mut have), Held::Empty) => {
                have.retain(keep);
                Held::Device(have)
            }
            // Nothing to keep: the gained experts are the whole set. (A worker never mixes
            // host and device experts; were it to, the held side would be dropped here.)
            (_, new) => new,
        };
        RoutedExperts {
            layer: self.layer,
            held,
        }
    }

    pub fn holds(&self, expert: u32) -> bool {
        match &self.held {
            Held::Empty => false,
            Held::Host(experts) => experts.contains_key(&expert),
            #[cfg(feature = "cuda")]
            Held::Device(g) => g.holds(expert),
        }
    }

    pub fn expert_ids(&self) -> Vec<u32> {
        match &self.held {
            Held::Empty => Vec::new(),
            Held::Host(experts) => experts.keys().copied().collect(),
            #[cfg(feature = "cuda")]
            Held::Device(g) => g.expert_ids().collect(),
        }
    }

    pub fn size_in_bytes(&self) -> usize {
        match &self.held {
            Held::Empty => 0,
            Held::Host(experts) => experts.values().map(|m| m.size_in_bytes()).sum(),
            #[cfg(feature = "cuda")]
            Held::Device(g) => g.size_in_bytes(),
        }
    }

    /// `x: [tokens, hidden]` with routing → `[tokens, hidden]`: Σ weight × expert(x) per token.
    pub fn forward(&self, x: &Tensor, routing: &Routing) -> Result<Tensor> {
        let (tokens, _) = x.dims2()?;
        if routing.tokens() != tokens {
            return Err(EngineError::Shape(format!(
                "routing covers {} tokens, activations have {tokens}",
                routing.tokens()
            )));
        }
        self.forward_groups(x, &group_by_expert(routing))
    }

    /// Runs pre-grouped rows (what an expert worker receives) → `[tokens, hidden]`.
    pub fn forward_groups(&self, x: &Tensor, groups: &[ExpertGroup]) -> Result<Tensor> {
        let empty = BTreeMap::new();
        let experts = match &self.held {
            Held::Empty => &empty,
            Held::Host(experts) => experts,
            #[cfg(feature = "cuda")]
            Held::Device(g) => return g.forward_groups(x, groups),
        };
        let (tokens, hidden) = x.dims2()?;
        let xd = x.as_f32()?;
        for g in groups {
            if !experts.contains_key(&g.expert) {
                return Err(EngineError::input(
                    "expert",
                    format!(
                        "expert {} of layer {} is not held here",
                        g.expert, self.layer
                    ),
                ));
            }
            if let Some(&r) = g.rows.iter().find(|&&r| r as usize >= tokens) {
                return Err(EngineError::input(
                    "rows",
                    format!("row {r} out of range for {tokens} tokens"),
                ));
            }
        }
        // One task per expert: each runs its whole MLP on one thread, so the gather, the
        // activation and both GEMMs of different experts proceed side by side with no
        // synchronisation between them. A single big group still splits its GEMMs.
        let run_expert = |g: &ExpertGroup| -> Result<Tensor> {
            let mlp = &experts[&g.expert];
            // [rows, hidden]
            let mut gathered = Vec::with_capacity(g.rows.len() * hidden);
            for &r in &g.rows {
                gathered.extend_from_slice(&xd[r as usize * hidden..(r as usize + 1) * hidden]);
            }
            mlp.forward(&Tensor::from_f32(&[g.rows.len(), hidden], gathered)?)
        };
        let results: Vec<std::sync::Mutex<Option<Result<Tensor>>>> =
            groups.iter().map(|_| std::sync::Mutex::new(None)).collect();
        crate::cpu::pool::global().run(groups.len(), &|i| {
            let y = run_expert(&groups[i]);
            if let Ok(mut slot) = results[i].lock() {
                *slot = Some(y);
            }
        });
        let partials = results
            .into_iter()
            .enumerate()
            .map(|(i, slot)| {
                let y = slot.into_inner().ok().flatten().ok_or_else(|| {
                    EngineError::Shape(format!("expert group {i} produced no output"))
                })??;
                Ok((i, y))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut out = Tensor::zeros(&[tokens, hidden]);
        let od = out.as_f32_mut()?;
        // Scatter-add in expert order so results do not depend on thread timing.
        for (i, y) in partials {
            let g = &groups[i];
            let yd = y.as_f32()?;
            for (j, (&r, &w)) in g.rows.iter().zip(&g.weights).enumerate() {
                let o = &mut od[r as usize * hidden..(r as usize + 1) * hidden];
                crate::cpu::ops::axpy(o, w, &yd[j * hidden..(j + 1) * hidden]);
            }
        }
        Ok(out)
    }
}
