//! Expert load: how many tokens each routed expert of each MoE layer received, and how many
//! (token, expert) assignments each worker served, over a resettable window. Counted on the
//! router from the gate's own routing, so the counts are exact: per layer they add up to the
//! tokens that went through it times `top_k`. Workers are named by their label — the
//! coordinator's worker id, or the address in static mode — so a worker keeps its figures
//! across placement versions. Beside the window, the same counts since start-up, never reset:
//! what a router reports to its coordinator, which rebalances placement on them.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use switchyard_engine::model::Routing;

use switchyard_proto::WorkerId;

/// `max / mean` of `values`; `None` when they are all zero (nothing to compare).
pub fn max_over_mean(values: &[u64]) -> Option<f64> {
    let total: u64 = values.iter().sum();
    if values.is_empty() || total == 0 {
        return None;
    }
    let mean = total as f64 / values.len() as f64;
    values.iter().max().map(|&m| m as f64 / mean)
}

#[derive(Debug)]
struct Window {
    started: Instant,
    started_unix: f64,
    /// Tokens through each MoE layer.
    tokens: Vec<u64>,
    /// `[moe layer][expert]`.
    counts: Vec<Vec<u64>>,
    /// Assignments per worker label, per MoE layer.
    workers: BTreeMap<String, Vec<u64>>,
}

impl Window {
    fn new(layers: usize, experts: usize) -> Window {
        Window {
            started: Instant::now(),
            started_unix: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64()),
            tokens: vec![0; layers],
            counts: vec![vec![0; experts]; layers],
            workers: BTreeMap::new(),
        }
    }
}

/// Counts since start-up.
#[derive(Debug)]
struct Totals {
    /// `[moe layer][expert]`.
    counts: Vec<Vec<u64>>,
    /// Assignments per worker, per MoE layer.
    workers: BTreeMap<WorkerId, Vec<u64>>,
}

#[derive(Debug)]
struct Counts {
    window: Window,
    totals: Totals,
}

/// The counters, shared by the step loop (writes) and the endpoints (reads).
#[derive(Debug)]
pub struct ExpertLoad {
    /// Model layer index of each MoE layer, in order.
    moe_layers: Vec<usize>,
    experts: usize,
    top_k: usize,
    counts: Mutex<Counts>,
}

/// [`ExpertLoad::totals`]: per MoE layer (model index), tokens per expert; per (MoE layer,
/// worker), assignments served.
pub type LoadTotals = (Vec<(usize, Vec<u64>)>, Vec<(usize, WorkerId, u64)>);

/// One layer's load in a [`LoadSnapshot`].
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct LayerLoad {
    /// The model's layer index.
    pub layer: usize,
    /// Tokens that went through the layer.
    pub tokens: u64,
    /// Tokens per expert, indexed by expert id.
    pub experts: Vec<u64>,
    /// (token, expert) assignments per worker (its id, or its address in static mode).
    pub workers: BTreeMap<String, u64>,
    /// Max / mean tokens per expert (null with no tokens).
    pub expert_imbalance: Option<f64>,
    /// Max / mean assignments per worker (null with no tokens or workers).
    pub worker_imbalance: Option<f64>,
}

/// The expert-load endpoint's reply (HTTP `GET /v1/expert_load`, gRPC `ExpertLoad`).
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize, PartialEq)]
pub struct LoadSnapshot {
    /// Unix time the window began (start-up or the last reset).
    pub window_start_unix: f64,
    pub window_seconds: f64,
    pub experts_per_layer: usize,
    pub top_k: usize,
    pub layers: Vec<LayerLoad>,
}

impl ExpertLoad {
    pub fn new(moe_layers: Vec<usize>, experts: usize, top_k: usize) -> ExpertLoad {
        let n = moe_layers.len();
        ExpertLoad {
            moe_layers,
            experts,
            top_k,
            counts: Mutex::new(Counts {
                window: Window::new(n, experts),
                totals: Totals {
                    counts: vec![vec![0; experts]; n],
                    workers: BTreeMap::new(),
                },
            }),
        }
    }

    /// Counts one step's routing of model layer `layer`; `served` is the (token, expert)
    /// assignments each worker served in it (empty with local experts), and `label` how a
    /// worker is reported.
    pub fn record(
        &self,
        layer: usize,
        routing: &Routing,
        served: &BTreeMap<WorkerId, u64>,
        label: &dyn Fn(WorkerId) -> String,
    ) {
        let Some(i) = self.moe_layers.iter().position(|&l| l == layer) else {
            return;
        };
        let Ok(mut c) = self.counts.lock() else {
            return;
        };
        let layers = self.moe_layers.len();
        let Counts { window: w, totals } = &mut *c;
        w.tokens[i] += routing.tokens() as u64;
        for &e in &routing.ids {
            if let Some(n) = w.counts[i].get_mut(e as usize) {
                *n += 1;
                totals.counts[i][e as usize] += 1;
            }
        }
        for (&worker, &n) in served {
            w.workers
                .entry(label(worker))
                .or_insert_with(|| vec![0; layers])[i] += n;
            totals
                .workers
                .entry(worker)
                .or_insert_with(|| vec![0; layers])[i] += n;
        }
    }

    /// The counts since start-up (see [`LoadTotals`]).
    pub fn totals(&self) -> LoadTotals {
        let Ok(c) = self.counts.lock() else {
            return (Vec::new(), Vec::new());
        };
        let experts = self
            .moe_layers
            .iter()
            .zip(&c.totals.counts)
            .map(|(&l, v)| (l, v.clone()))
            .collect();
        let workers = c
            .totals
            .workers
            .iter()
            .flat_map(|(&w, per_layer)| {
                self.moe_layers
                    .iter()
                    .zip(per_layer)
                    .filter(|(_, n)| **n > 0)
                    .map(move |(&l, &n)| (l, w, n))
            })
            .collect();
        (experts, workers)
    }

    /// The window's counts; `reset` starts a new window.
    pub fn snapshot(&self, reset: bool) -> LoadSnapshot {
        let Ok(mut c) = self.counts.lock() else {
            return LoadSnapshot {
                window_start_unix: 0.0,
                window_seconds: 0.0,
                experts_per_layer: self.experts,
                top_k: self.top_k,
                layers: Vec::new(),
            };
        };
        let w = &c.window;
        let layers = self
            .moe_layers
            .iter()
            .enumerate()
            .map(|(i, &layer)| {
                let workers: BTreeMap<String, u64> =
                    w.workers.iter().map(|(id, v)| (id.clone(), v[i])).collect();
                let worker_counts: Vec<u64> = workers.values().copied().collect();
                LayerLoad {
                    layer,
                    tokens: w.tokens[i],
                    expert_imbalance: max_over_mean(&w.counts[i]),
                    worker_imbalance: max_over_mean(&worker_counts),
                    experts: w.counts[i].clone(),
                    workers,
                }
            })
            .collect();
        let snapshot = LoadSnapshot {
            window_start_unix: w.started_unix,
            window_seconds: w.started.elapsed().as_secs_f64(),
            experts_per_layer: self.experts,
            top_k: self.top_k,
            layers,
        };
        if reset {
            c.window = Window::new(self.moe_layers.len(), self.experts);
        }
        snapshot
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn imbalance_is_max_over_mean() {
        assert_eq!(max_over_mean(&[1, 1, 1, 1]), Some(1.0));
        assert_eq!(max_over_mean(&[4, 0, 0, 0]), Some(4.0));
        assert_eq!(max_over_mean(&[3, 1]), Some(1.5));
        assert_eq!(max_over_mean(&[0, 0]), None);
        assert_eq!(max_over_mean(&[]), None);
    }

    #[test]
    fn counts_experts_and_workers_and_resets() {
        let load = ExpertLoad::new(vec![1, 2], 4, 2);
        // Two tokens in layer 1: experts (0, 3) and (3, 1); experts 0-1 on worker 0, 2-3 on 1.
        let routing = Routing {
            k: 2,
            ids: vec![0, 3, 3, 1],
            weights: vec![0.5; 4],
        };
        let served = BTreeMap::from([(WorkerId(0), 2), (WorkerId(1), 2)]);
        let label = |w: WorkerId| format!("10.0.0.{}:1", w.0);
        load.record(1, &routing, &served, &label);
        load.record(0, &routing, &served, &label); // a dense layer: ignored
        let s = load.snapshot(true);
        assert_eq!(s.layers.len(), 2);
        let l = &s.layers[0];
        assert_eq!((l.layer, l.tokens), (1, 2));
        assert_eq!(l.experts, vec![1, 1, 0, 2]);
        assert_eq!(l.experts.iter().sum::<u64>(), l.tokens * s.top_k as u64);
        assert_eq!(
            l.workers,
            BTreeMap::from([("10.0.0.0:1".into(), 2), ("10.0.0.1:1".into(), 2)])
        );
        assert_eq!(l.expert_imbalance, Some(2.0));
        assert_eq!(l.worker_imbalance, Some(1.0));
        assert_eq!(s.layers[1].expert_imbalance, None);
        // The reset emptied the window, not the totals since start-up.
        let after = load.snapshot(false);
        assert_eq!(after.layers[0].tokens, 0);
        let (experts, workers) = load.totals();
        assert_eq!(experts, vec![(1, vec![1, 1, 0, 2]), (2, vec![0; 4])]);
        assert_eq!(workers, vec![(1, WorkerId(0), 2), (1, WorkerId(1), 2)]);
    }
}
