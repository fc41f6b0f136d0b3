//! The expert load routers observe, as the coordinator keeps it: routers report cumulative
//! counts (tokens per (layer, expert), assignments per (layer, worker)); the coordinator adds
//! each report's growth since that router's last one to an exponentially decayed total, so
//! recent traffic weighs most and a router restart or a lost report loses nothing but its own
//! gap. Decay scales every entry alike, so ratios (imbalance, who is hot) do not depend on
//! when they are read.

use std::collections::BTreeMap;

use crate::placement::{Slot, WorkerId};

/// One router's counts since it started.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RouterCounts {
    pub experts: BTreeMap<Slot, u64>,
    /// (token, expert) assignments each worker served, per (MoE layer, worker).
    pub workers: BTreeMap<(u32, WorkerId), u64>,
}

#[derive(Debug)]
pub struct ObservedLoad {
    half_life_ms: u64,
    at_ms: u64,
    experts: BTreeMap<Slot, f64>,
    workers: BTreeMap<(u32, WorkerId), f64>,
    last: BTreeMap<String, RouterCounts>,
}

/// `new - old`, or `new` when the counter went backwards (a restarted counter).
fn growth(new: u64, old: Option<u64>) -> u64 {
    match old {
        Some(o) if o <= new => new - o,
        _ => new,
    }
}

impl ObservedLoad {
    /// Half of a count's weight is gone after `half_life_ms` (0: no decay).
    pub fn new(half_life_ms: u64) -> ObservedLoad {
        ObservedLoad {
            half_life_ms,
            at_ms: 0,
            experts: BTreeMap::new(),
            workers: BTreeMap::new(),
            last: BTreeMap::new(),
        }
    }

    fn decay_to(&mut self, now_ms: u64) {
        let dt = now_ms.saturating_sub(self.at_ms);
        self.at_ms = self.at_ms.max(now_ms);
        if dt == 0 || self.half_life_ms == 0 {
            return;
        }
        let f = 0.5f64.powf(dt as f64 / self.half_life_ms as f64);
        self.experts.values_mut().for_each(|v| *v *= f);
        self.workers.values_mut().for_each(|v| *v *= f);
    }

    /// Adds what `router`'s counts grew by since its last report.
    pub fn add(&mut self, router: &str, counts: RouterCounts, now_ms: u64) {
        self.decay_to(now_ms);
        let last = self.last.remove(router).unwrap_or_default();
        for (slot, &n) in &counts.experts {
            let d = growth(n, last.experts.get(slot).copied());
            if d > 0 {
                *self.experts.entry(*slot).or_default() += d as f64;
            }
        }
        for (key, &n) in &counts.workers {
            let d = growth(n, last.workers.get(key).copied());
            if d > 0 {
                *self.workers.entry(*key).or_default() += d as f64;
            }
        }
        self.last.insert(router.to_string(), counts);
    }

    /// A router that is gone: its baseline is dropped (what it reported stays, decaying).
    pub fn forget(&mut self, router: &str) {
        self.last.remove(router);
    }

    /// Decayed tokens per (layer, expert).
    pub fn experts(&self) -> &BTreeMap<Slot, f64> {
        &self.experts
    }

    /// Decayed tokens over all experts of all layers, as of `now_ms`.
    pub fn total(&self, now_ms: u64) -> f64 {
        let sum: f64 = self.experts.values().sum();
        if self.half_life_ms == 0 {
            return sum;
        }
        let dt = now_ms.saturating_sub(self.at_ms) as f64;
        sum * 0.5f64.powf(dt / self.half_life_ms as f64)
    }

    /// Per layer, the observed max / mean assignments over `workers` (layers nothing was
    /// reported for are left out).
    pub fn observed_imbalance(&self, layers: &[u32], workers: &[WorkerId]) -> BTreeMap<u32, f64> {
        let mut out = BTreeMap::new();
        if workers.is_empty() {
            return out;
        }
        for &layer in layers {
            let loads: Vec<f64> = workers
                .iter()
                .map(|w| self.workers.get(&(layer, *w)).copied().unwrap_or(0.0))
                .collect();
            let total: f64 = loads.iter().sum();
            if total > 0.0 {
                let max = loads.iter().copied().fold(0.0, f64::max);
                out.insert(layer, max / (total / loads.len() as f64));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(e0: u64, e1: u64) -> RouterCounts {
        RouterCounts {
            experts: BTreeMap::from([
                (
                    Slot {
                        layer: 1,
                        expert: 0,
                    },
                    e0,
                ),
                (
                    Slot {
                        layer: 1,
                        expert: 1,
                    },
                    e1,
                ),
            ]),
            workers: BTreeMap::from([((1, WorkerId(0)), e0), ((1, WorkerId(1)), e1)]),
        }
    }

    fn get(l: &ObservedLoad, expert: u32) -> f64 {
        l.experts()[&Slot { layer: 1, expert }]
    }

    #[test]
    fn reports_add_their_growth_per_router() {
        let mut l = ObservedLoad::new(0);
        l.add("a", counts(10, 2), 0);
        l.add("a", counts(15, 2), 100);
        l.add("b", counts(1, 1), 100);
        assert_eq!((get(&l, 0), get(&l, 1)), (16.0, 3.0));
        l.add("b", counts(4, 1), 200);
        assert_eq!(get(&l, 0), 19.0);
        // A restarted counter (lower than before) counts from zero.
        l.add("b", counts(2, 1), 300);
        assert_eq!((get(&l, 0), get(&l, 1)), (21.0, 3.0));
    }

    #[test]
    fn old_load_decays_by_half_per_half_life() {
        let mut l = ObservedLoad::new(1000);
        l.add("a", counts(100, 0), 0);
        l.add("a", counts(100, 0), 1000);
        assert!((get(&l, 0) - 50.0).abs() < 1e-9);
        l.add("a", counts(150, 0), 2000);
        assert!((get(&l, 0) - 75.0).abs() < 1e-9);
        assert!((l.total(3000) - 37.5).abs() < 1e-9);
    }

    #[test]
    fn observed_imbalance_is_max_over_mean_per_layer() {
        let mut l = ObservedLoad::new(0);
        l.add("a", counts(30, 10), 0);
        let im = l.observed_imbalance(&[1, 2], &[WorkerId(0), WorkerId(1)]);
        assert_eq!(im, BTreeMap::from([(1, 1.5)]));
        // A worker that got nothing counts in the mean.
        let im = l.observed_imbalance(&[1], &[WorkerId(0), WorkerId(1), WorkerId(2)]);
        assert!((im[&1] - 30.0 / (40.0 / 3.0)).abs() < 1e-12);
    }
}
