//! Latency summaries and expert-utilisation figures: pure functions over what a run recorded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Percentiles of one latency, in milliseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: usize,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

/// The `q`-quantile (0..=1) of sorted values by linear interpolation between closest ranks.
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let pos = q.clamp(0.0, 1.0) * (n - 1) as f64;
            let lo = pos.floor() as usize;
            let hi = pos.ceil() as usize;
            sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
        }
    }
}

/// Summarises values (any order).
pub fn percentiles(values: &[f64]) -> Percentiles {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Percentiles::default();
    }
    Percentiles {
        count: v.len(),
        mean: v.iter().sum::<f64>() / v.len() as f64,
        p50: quantile(&v, 0.50),
        p90: quantile(&v, 0.90),
        p99: quantile(&v, 0.99),
        max: v[v.len() - 1],
    }
}

/// The expert-load window as the router reports it (`GET /v1/expert_load`).
pub use switchyard_router::expert_load::{LayerLoad, LoadSnapshot};

/// One expert and its tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExpertTokens {
    pub expert: u32,
    pub tokens: u64,
}

/// One layer's utilisation in the report.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LayerUtilisation {
    pub layer: usize,
    pub tokens: u64,
    pub expert_imbalance: Option<f64>,
    pub worker_imbalance: Option<f64>,
    /// Most-used experts first.
    pub hottest: Vec<ExpertTokens>,
    /// Least-used experts first.
    pub coldest: Vec<ExpertTokens>,
    /// Experts that got no token.
    pub idle_experts: usize,
}

/// Expert utilisation over a run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Utilisation {
    pub window_seconds: f64,
    pub experts_per_layer: usize,
    pub top_k: usize,
    /// Mean over layers of max / mean tokens per expert.
    pub mean_expert_imbalance: Option<f64>,
    pub max_expert_imbalance: Option<f64>,
    pub mean_worker_imbalance: Option<f64>,
    pub layers: Vec<LayerUtilisation>,
    /// Each worker's share of all (token, expert) assignments, 0..1, by worker id.
    /// By worker label: the coordinator's worker id, or the address in static mode.
    pub worker_share: BTreeMap<String, f64>,
    /// The full counts, `[layer][expert]`, for plots and offline analysis.
    pub counts: Vec<Vec<u64>>,
}

fn mean_of(values: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = values.collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Turns a load snapshot into the report's figures; `n` hottest and coldest per layer.
pub fn utilisation(s: &LoadSnapshot, n: usize) -> Utilisation {
    let mut worker_total: BTreeMap<String, u64> = BTreeMap::new();
    let layers: Vec<LayerUtilisation> = s
        .layers
        .iter()
        .map(|l| {
            for (w, &c) in &l.workers {
                *worker_total.entry(w.clone()).or_insert(0) += c;
            }
            let mut ranked: Vec<ExpertTokens> = l
                .experts
                .iter()
                .enumerate()
                .map(|(e, &t)| ExpertTokens {
                    expert: e as u32,
                    tokens: t,
                })
                .collect();
            ranked.sort_by(|a, b| b.tokens.cmp(&a.tokens).then(a.expert.cmp(&b.expert)));
            let hottest = ranked.iter().take(n).copied().collect();
            let coldest = ranked.iter().rev().take(n).copied().collect();
            LayerUtilisation {
                layer: l.layer,
                tokens: l.tokens,
                expert_imbalance: l.expert_imbalance,
                worker_imbalance: l.worker_imbalance,
                hottest,
                coldest,
                idle_experts: l.experts.iter().filter(|&&t| t == 0).count(),
            }
        })
        .collect();
    let total: u64 = worker_total.values().sum();
    let worker_share = worker_total
        .iter()
        .map(|(w, &c)| {
            (
                w.clone(),
                if total == 0 {
                    0.0
                } else {
                    c as f64 / total as f64
                },
            )
        })
        .collect();
    Utilisation {
        window_seconds: s.window_seconds,
        experts_per_layer: s.experts_per_layer,
        top_k: s.top_k,
        mean_expert_imbalance: mean_of(layers.iter().filter_map(|l| l.expert_imbalance)),
        max_expert_imbalance: layers
            .iter()
            .filter_map(|l| l.expert_imbalance)
            .reduce(f64::max),
        mean_worker_imbalance: mean_of(layers.iter().filter_map(|l| l.worker_imbalance)),
        worker_share,
        counts: s.layers.iter().map(|l| l.experts.clone()).collect(),
        layers,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&v);
        assert_eq!(p.count, 100);
        assert!((p.p50 - 50.5).abs() < 1e-9);
        assert!((p.p90 - 90.1).abs() < 1e-9);
        assert!((p.p99 - 99.01).abs() < 1e-9);
        assert_eq!(p.max, 100.0);
        assert!((p.mean - 50.5).abs() < 1e-9);
        assert_eq!(percentiles(&[]), Percentiles::default());
        assert_eq!(percentiles(&[7.0]).p99, 7.0);
    }

    #[test]
    fn utilisation_ranks_experts_and_shares_workers() {
        let s = LoadSnapshot {
            window_seconds: 2.0,
            experts_per_layer: 4,
            top_k: 2,
            layers: vec![
                LayerLoad {
                    layer: 1,
                    tokens: 5,
                    experts: vec![6, 0, 3, 1],
                    workers: BTreeMap::from([("0".into(), 6), ("1".into(), 4)]),
                    expert_imbalance: Some(2.4),
                    worker_imbalance: Some(1.2),
                },
                LayerLoad {
                    layer: 2,
                    tokens: 5,
                    experts: vec![2, 3, 2, 3],
                    workers: BTreeMap::from([("0".into(), 5), ("1".into(), 5)]),
                    expert_imbalance: Some(1.2),
                    worker_imbalance: Some(1.0),
                },
            ],
            ..Default::default()
        };
        let u = utilisation(&s, 2);
        let l = &u.layers[0];
        assert_eq!(
            l.hottest,
            vec![
                ExpertTokens {
                    expert: 0,
                    tokens: 6
                },
                ExpertTokens {
                    expert: 2,
                    tokens: 3
                }
            ]
        );
        assert_eq!(
            l.coldest[0],
            ExpertTokens {
                expert: 1,
                tokens: 0
            }
        );
        assert_eq!(l.idle_experts, 1);
        assert!((u.worker_share["0"] - 0.55).abs() < 1e-9);
        assert!((u.worker_share["1"] - 0.45).abs() < 1e-9);
        assert!((u.mean_expert_imbalance.unwrap() - 1.8).abs() < 1e-9);
        assert_eq!(u.max_expert_imbalance, Some(2.4));
        assert_eq!(u.counts, vec![vec![6, 0, 3, 1], vec![2, 3, 2, 3]]);
    }
}
