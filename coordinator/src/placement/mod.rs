//! Expert placement as pure functions: [`plan`] (problem → plan, on every membership change)
//! and [`rebalance`] (the plan in force → a better one for the observed load, within a move
//! budget). See `README.md` beside this file.

use std::collections::{BTreeMap, BTreeSet};

mod balance;
pub use balance::{
    Rebalance, RebalanceOptions, imbalance, mean_imbalance, rebalance, worker_loads,
};

pub use switchyard_proto::WorkerId;

/// A routed expert of one MoE layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub layer: u32,
    pub expert: u32,
}

#[derive(Clone, Debug, PartialEq)]
pub struct WorkerSpec {
    pub id: WorkerId,
    /// Bytes this worker can give to expert weights.
    pub memory_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Problem {
    /// MoE layer indices.
    pub layers: Vec<u32>,
    pub experts_per_layer: u32,
    /// Bytes of one expert of one layer.
    pub expert_bytes: u64,
    pub workers: Vec<WorkerSpec>,
    /// Copies wanted of every expert (at least 1).
    pub replicas: usize,
    /// Extra copies per layer beyond `replicas` of each, given to the experts with the most
    /// load per copy (DeepSeek's redundant experts), while slots last.
    pub redundant: usize,
    /// Observed tokens per (layer, expert); missing entries count as equal load.
    pub load: BTreeMap<Slot, f64>,
    /// The plan in force, to stay close to.
    pub previous: Option<Plan>,
}

/// Which workers hold each expert.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub holders: BTreeMap<Slot, Vec<WorkerId>>,
}

impl Plan {
    /// The experts each worker holds.
    pub fn by_worker(&self) -> BTreeMap<WorkerId, Vec<Slot>> {
        let mut out: BTreeMap<WorkerId, Vec<Slot>> = BTreeMap::new();
        for (slot, workers) in &self.holders {
            for w in workers {
                out.entry(*w).or_default().push(*slot);
            }
        }
        out
    }

    /// Expert copies that are new in `self` compared with `previous` (what must be loaded).
    pub fn moves_from(&self, previous: &Plan) -> usize {
        self.holders
            .iter()
            .map(|(slot, ws)| {
                let before: BTreeSet<&WorkerId> = previous
                    .holders
                    .get(slot)
                    .map(|v| v.iter().collect())
                    .unwrap_or_default();
                ws.iter().filter(|w| !before.contains(w)).count()
            })
            .sum()
    }
}

#[derive(Clone, Debug, thiserror::Error, PartialEq)]
pub enum PlacementError {
    #[error("no live workers to place experts on")]
    NoWorkers,
    #[error(
        "the model does not fit: one copy of every routed expert needs {needed} expert slots \
         ({needed_bytes} bytes), the workers have {available} ({expert_bytes} bytes each)"
    )]
    DoesNotFit {
        needed: u64,
        needed_bytes: u64,
        available: u64,
        expert_bytes: u64,
    },
    #[error("`{field}` {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Places every expert; see the module README for the rules.
pub fn plan(p: &Problem) -> Result<Plan, PlacementError> {
    if p.workers.is_empty() {
        return Err(PlacementError::NoWorkers);
    }
    if p.expert_bytes == 0 {
        return Err(PlacementError::Invalid {
            field: "expert_bytes",
            reason: "must be > 0, got 0".into(),
        });
    }
    if p.replicas == 0 {
        return Err(PlacementError::Invalid {
            field: "replicas",
            reason: "must be >= 1, got 0".into(),
        });
    }
    let slots: Vec<Slot> = p
        .layers
        .iter()
        .flat_map(|&layer| (0..p.experts_per_layer).map(move |expert| Slot { layer, expert }))
        .collect();
    let capacity: BTreeMap<WorkerId, u64> = p
        .workers
        .iter()
        .map(|w| (w.id, w.memory_bytes / p.expert_bytes))
        .collect();
    let available: u64 = capacity.values().sum();
    let needed = slots.len() as u64;
    if needed > available {
        return Err(PlacementError::DoesNotFit {
            needed,
            needed_bytes: needed * p.expert_bytes,
            available,
            expert_bytes: p.expert_bytes,
        });
    }
    let load_of = |s: &Slot| load_of(&p.load, s);
    // Hottest first; ties by (layer, expert) so the order is total.
    let mut order = slots.clone();
    order.sort_by(|a, b| load_of(b).total_cmp(&load_of(a)).then(a.cmp(b)));

    let mut st = Packing {
        capacity,
        holders: slots.iter().map(|s| (*s, Vec::new())).collect(),
        layer_load: BTreeMap::new(),
        total_load: p.workers.iter().map(|w| (w.id, 0.0)).collect(),
        count: BTreeMap::new(),
        quota: BTreeMap::new(),
    };
    let wanted = p.replicas.min(p.workers.len());
    // Copies beyond `wanted` per layer, so far (the redundant ones).
    let mut extras: BTreeMap<u32, usize> = BTreeMap::new();

    // Rule 3: keep what the previous plan had on live workers, while room lasts and up to a
    // fair share of each layer, so a joining worker takes over the excess of every layer (not
    // whole layers: a layer's dispatch waits on its slowest worker) and nothing else moves.
    if let Some(prev) = &p.previous {
        let mut copies: BTreeMap<u32, usize> = BTreeMap::new();
        let mut beyond: BTreeMap<u32, usize> = BTreeMap::new();
        for (slot, ws) in &prev.holders {
            *copies.entry(slot.layer).or_default() += ws.len().min(wanted);
            *beyond.entry(slot.layer).or_default() += ws.len().saturating_sub(wanted);
        }
        for (layer, b) in beyond {
            *copies.entry(layer).or_default() += b.min(p.redundant);
        }
        // Each worker's share of a layer: copies / workers, the remainder handed out by a
        // rotation over layers so the totals stay fair too.
        let n = p.workers.len();
        let mut ids: Vec<WorkerId> = p.workers.iter().map(|w| w.id).collect();
        ids.sort();
        let fair = |w: WorkerId, layer: u32| {
            let c = copies.get(&layer).copied().unwrap_or(0);
            let rank = ids.iter().position(|&x| x == w).unwrap_or(0);
            let pos = p.layers.iter().position(|&l| l == layer).unwrap_or(0);
            c / n + usize::from((rank + pos) % n < c % n)
        };
        for &w in &ids {
            for &layer in &p.layers {
                st.quota.insert((w, layer), fair(w, layer));
            }
        }
        for s in &order {
            for w in prev.holders.get(s).into_iter().flatten() {
                let held = st.holders[s].len();
                let extra = held >= wanted;
                let allowed = !extra || extras.get(&s.layer).copied().unwrap_or(0) < p.redundant;
                let room = st.capacity.get(w).is_some_and(|c| *c > 0);
                let share = !st.over_quota(*w, s.layer);
                if allowed && !st.holders[s].contains(w) && room && share {
                    st.take(*s, *w, load_of(s));
                    if extra {
                        *extras.entry(s.layer).or_default() += 1;
                    }
                }
            }
        }
    }
    let short = PlacementError::DoesNotFit {
        needed,
        needed_bytes: needed * p.expert_bytes,
        available,
        expert_bytes: p.expert_bytes,
    };
    // Rule 4: one copy of everything, hottest first, to the worker with the least load in
    // that layer (then in all layers) that has room.
    for s in &order {
        if st.holders[s].is_empty() {
            let w = st.least_loaded(*s).ok_or_else(|| short.clone())?;
            st.take(*s, w, load_of(s));
        }
    }
    // Rule 5: extra replicas, hottest first, one round per copy so heat decides who gets them.
    for copy in 2..=wanted {
        for s in &order {
            if st.holders[s].len() >= copy {
                continue;
            }
            match st.least_loaded(*s) {
                Some(w) => st.take(*s, w, load_of(s)),
                None => break,
            }
        }
    }
    // Rule 6: redundant copies, one per layer per round (so short room is shared by the
    // layers), each to the expert with the most load per copy that can still take one.
    for _ in 0..p.redundant {
        let mut placed = false;
        for &layer in &p.layers {
            if extras.get(&layer).copied().unwrap_or(0) >= p.redundant {
                continue;
            }
            let mut candidates: Vec<Slot> = (0..p.experts_per_layer)
                .map(|expert| Slot { layer, expert })
                .collect();
            let per_copy = |s: &Slot| load_of(s) / st.holders[s].len().max(1) as f64;
            candidates.sort_by(|a, b| per_copy(b).total_cmp(&per_copy(a)).then(a.cmp(b)));
            if let Some((s, w)) = candidates
                .iter()
                .find_map(|s| st.least_loaded(*s).map(|w| (*s, w)))
            {
                st.take(s, w, load_of(&s));
                *extras.entry(layer).or_default() += 1;
                placed = true;
            }
        }
        if !placed {
            break;
        }
    }
    let mut holders = st.holders;
    for ws in holders.values_mut() {
        ws.sort();
    }
    Ok(Plan { holders })
}

/// An expert's observed load; missing entries count as 1 (equal load), negatives as 0.
pub(crate) fn load_of(load: &BTreeMap<Slot, f64>, s: &Slot) -> f64 {
    load.get(s).copied().unwrap_or(1.0).max(0.0)
}

/// The plan being built: slots left per worker, holders, and the predicted load per worker
/// (copies of an expert split its load evenly, as routers split its tokens).
struct Packing {
    capacity: BTreeMap<WorkerId, u64>,
    holders: BTreeMap<Slot, Vec<WorkerId>>,
    layer_load: BTreeMap<(WorkerId, u32), f64>,
    total_load: BTreeMap<WorkerId, f64>,
    /// Copies per (worker, layer), and each one's fair share of the layer when re-planning.
    count: BTreeMap<(WorkerId, u32), usize>,
    quota: BTreeMap<(WorkerId, u32), usize>,
}

impl Packing {
    /// Whether `w` holds its fair share of `layer` already (never, without a previous plan).
    fn over_quota(&self, w: WorkerId, layer: u32) -> bool {
        self.quota
            .get(&(w, layer))
            .is_some_and(|q| self.count.get(&(w, layer)).copied().unwrap_or(0) >= *q)
    }

    fn take(&mut self, s: Slot, w: WorkerId, load: f64) {
        if let Some(c) = self.capacity.get_mut(&w) {
            *c -= 1;
        }
        *self.count.entry((w, s.layer)).or_default() += 1;
        let Some(ws) = self.holders.get_mut(&s) else {
            return;
        };
        // Copies split the expert's load: move the other holders' shares down.
        let before = ws.len() as f64;
        let drop = if before > 0.0 {
            load / before - load / (before + 1.0)
        } else {
            0.0
        };
        for other in ws.iter() {
            *self.layer_load.entry((*other, s.layer)).or_default() -= drop;
            *self.total_load.entry(*other).or_default() -= drop;
        }
        ws.push(w);
        *self.layer_load.entry((w, s.layer)).or_default() += load / (before + 1.0);
        *self.total_load.entry(w).or_default() += load / (before + 1.0);
    }

    /// The worker with room, not holding `s`, with the least load in `s`'s layer; then one
    /// still under its fair share of the layer; then the least load in all layers; then the
    /// lowest id.
    fn least_loaded(&self, s: Slot) -> Option<WorkerId> {
        let exclude = self.holders.get(&s).map_or(&[][..], Vec::as_slice);
        let key = |w: &WorkerId| {
            (
                self.layer_load.get(&(*w, s.layer)).copied().unwrap_or(0.0),
                self.over_quota(*w, s.layer),
                self.total_load.get(w).copied().unwrap_or(0.0),
            )
        };
        self.capacity
            .iter()
            .filter(|(w, c)| **c > 0 && !exclude.contains(w))
            .min_by(|(a, _), (b, _)| {
                let (ka, kb) = (key(a), key(b));
                ka.0.total_cmp(&kb.0)
                    .then(ka.1.cmp(&kb.1))
                    .then(ka.2.total_cmp(&kb.2))
                    .then(a.cmp(b))
            })
            .map(|(w, _)| *w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problem(
        workers: u32,
        slots_each: u64,
        layers: u32,
        experts: u32,
        replicas: usize,
    ) -> Problem {
        Problem {
            layers: (3..3 + layers).collect(),
            experts_per_layer: experts,
            expert_bytes: 100,
            workers: (0..workers)
                .map(|i| WorkerSpec {
                    id: WorkerId(i),
                    memory_bytes: slots_each * 100,
                })
                .collect(),
            replicas,
            ..Default::default()
        }
    }

    fn check_invariants(p: &Problem, plan: &Plan) {
        let slots = p.layers.len() * p.experts_per_layer as usize;
        assert_eq!(plan.holders.len(), slots, "every expert has an entry");
        for (s, ws) in &plan.holders {
            assert!(!ws.is_empty(), "{s:?} unplaced");
            let distinct: BTreeSet<_> = ws.iter().collect();
            assert_eq!(
                distinct.len(),
                ws.len(),
                "{s:?} has two copies on one worker"
            );
        }
        for (w, held) in plan.by_worker() {
            let spec = p
                .workers
                .iter()
                .find(|s| s.id == w)
                .expect("only live workers hold experts");
            assert!(
                held.len() as u64 * p.expert_bytes <= spec.memory_bytes,
                "{w} over its memory"
            );
        }
    }

    #[test]
    fn every_expert_placed_within_memory_across_shapes() {
        for (workers, slots_each, layers, experts, replicas) in [
            (1, 64, 2, 32, 1),
            (3, 30, 2, 32, 1),
            (4, 64, 3, 16, 2),
            (7, 20, 4, 32, 3),
            (32, 1000, 58, 256, 2),
        ] {
            let p = problem(workers, slots_each, layers, experts, replicas);
            let plan = plan(&p).unwrap();
            check_invariants(&p, &plan);
        }
    }

    #[test]
    fn same_input_gives_same_plan() {
        let mut p = problem(5, 40, 3, 32, 2);
        p.load = (0..32)
            .map(|e| {
                (
                    Slot {
                        layer: 4,
                        expert: e,
                    },
                    (e * 7 % 13) as f64,
                )
            })
            .collect();
        assert_eq!(plan(&p).unwrap(), plan(&p).unwrap());
    }

    #[test]
    fn model_that_does_not_fit_is_refused_with_the_shortfall() {
        let err = plan(&problem(2, 10, 2, 16, 1)).unwrap_err().to_string();
        assert!(
            err.contains("32 expert slots") && err.contains("have 20"),
            "{err}"
        );
    }

    #[test]
    fn joining_worker_takes_a_fair_share_and_nothing_else_moves() {
        let p = problem(4, 100, 3, 32, 1);
        let before = plan(&p).unwrap();
        let mut joined = problem(5, 100, 3, 32, 1);
        joined.previous = Some(before.clone());
        let after = plan(&joined).unwrap();
        check_invariants(&joined, &after);
        let newcomer = after.by_worker().get(&WorkerId(4)).map_or(0, Vec::len);
        // 96 experts over 5 workers: the others keep at most a fair 20 each, the newcomer takes
        // the rest (16), and only those move.
        assert!((16..=20).contains(&newcomer), "{newcomer}");
        assert_eq!(after.moves_from(&before), newcomer);
    }

    #[test]
    fn joining_worker_takes_part_of_every_layer_not_whole_layers() {
        // One worker held everything; a second joins: each layer ends up split evenly.
        let one = problem(1, 100, 4, 16, 1);
        let first = plan(&one).unwrap();
        let mut two = problem(2, 100, 4, 16, 1);
        two.previous = Some(first.clone());
        let second = plan(&two).unwrap();
        check_invariants(&two, &second);
        for &layer in &two.layers {
            let on_new = second
                .holders
                .iter()
                .filter(|(s, ws)| s.layer == layer && ws.contains(&WorkerId(1)))
                .count();
            assert_eq!(on_new, 8, "layer {layer}");
        }
        assert_eq!(second.moves_from(&first), 32);
    }

    #[test]
    fn leaving_worker_moves_only_what_it_held() {
        for seed in 0..5u32 {
            let p = problem(6, 100, 2, 48, 1);
            let before = plan(&p).unwrap();
            let gone = WorkerId(seed % 6);
            let held = before.by_worker()[&gone].len();
            let mut left = p.clone();
            left.workers.retain(|w| w.id != gone);
            left.previous = Some(before.clone());
            let after = plan(&left).unwrap();
            check_invariants(&left, &after);
            assert_eq!(after.moves_from(&before), held, "leaving {gone}");
        }
    }

    #[test]
    fn hot_experts_get_the_replicas_when_room_is_short() {
        // 32 experts, 2 workers x 20 slots: room for 8 extra copies.
        let mut p = problem(2, 20, 1, 32, 2);
        p.load = (0..32)
            .map(|e| {
                (
                    Slot {
                        layer: 3,
                        expert: e,
                    },
                    if e < 8 { 100.0 } else { 1.0 },
                )
            })
            .collect();
        let plan = plan(&p).unwrap();
        check_invariants(&p, &plan);
        for (s, ws) in &plan.holders {
            assert_eq!(ws.len(), if s.expert < 8 { 2 } else { 1 }, "{s:?}");
        }
    }

    #[test]
    fn load_is_balanced_across_workers() {
        let mut p = problem(4, 100, 1, 64, 1);
        p.load = (0..64)
            .map(|e| {
                (
                    Slot {
                        layer: 3,
                        expert: e,
                    },
                    1.0 + (e % 5) as f64 * 10.0,
                )
            })
            .collect();
        let plan = plan(&p).unwrap();
        let loads: Vec<f64> = plan
            .by_worker()
            .values()
            .map(|slots| slots.iter().map(|s| p.load[s]).sum())
            .collect();
        let (max, min) = loads
            .iter()
            .fold((f64::MIN, f64::MAX), |(a, b), &l| (a.max(l), b.min(l)));
        assert!(max / min < 1.1, "{loads:?}");
    }
}
