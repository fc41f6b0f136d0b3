//! How even a plan is for an observed load, and the rebalancer that makes it more even within
//! a move budget.
//!
//! A layer's dispatch waits on its slowest worker, so balance is judged per layer: a worker's
//! predicted load in a layer is the load of the experts it holds there, each expert's load
//! split evenly over its copies (as routers split its tokens), and the layer's imbalance is
//! the most loaded worker over the mean of all workers.

use std::collections::{BTreeMap, BTreeSet};

use super::{PlacementError, Plan, Problem, Slot, WorkerId, load_of, plan};

/// Predicted load of each of `workers` (in that order) in `layer`.
pub fn worker_loads(
    plan: &Plan,
    layer: u32,
    workers: &[WorkerId],
    load: &BTreeMap<Slot, f64>,
) -> Vec<f64> {
    let mut out = vec![0.0; workers.len()];
    let layer_slots = Slot { layer, expert: 0 }..=Slot {
        layer,
        expert: u32::MAX,
    };
    for (s, holders) in plan.holders.range(layer_slots) {
        let share = load_of(load, s) / holders.len().max(1) as f64;
        for h in holders {
            if let Some(i) = workers.iter().position(|w| w == h) {
                out[i] += share;
            }
        }
    }
    out
}

/// Per MoE layer of `p`, the predicted max / mean worker load of `plan` under `p.load` (1.0
/// for a layer without load).
pub fn imbalance(plan: &Plan, p: &Problem) -> BTreeMap<u32, f64> {
    let workers: Vec<WorkerId> = p.workers.iter().map(|w| w.id).collect();
    p.layers
        .iter()
        .map(|&layer| {
            let loads = worker_loads(plan, layer, &workers, &p.load);
            (layer, max_over_mean(&loads))
        })
        .collect()
}

/// The mean over layers of [`imbalance`]'s figures (1.0 for none).
pub fn mean_imbalance(per_layer: &BTreeMap<u32, f64>) -> f64 {
    if per_layer.is_empty() {
        return 1.0;
    }
    per_layer.values().sum::<f64>() / per_layer.len() as f64
}

fn max_over_mean(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    if loads.is_empty() || total <= 0.0 {
        return 1.0;
    }
    let max = loads.iter().copied().fold(f64::MIN, f64::max);
    max / (total / loads.len() as f64)
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RebalanceOptions {
    /// Expert copies a rebalance may load (a move loads one, a swap two).
    pub max_moves: usize,
    /// The least drop in mean per-layer imbalance worth the moves; below it the plan stays.
    pub threshold: f64,
}

/// What [`rebalance`] decided.
#[derive(Clone, Debug, PartialEq)]
pub struct Rebalance {
    /// The improved plan if it was worth it (`applied`), else the plan in force.
    pub plan: Plan,
    /// Expert copies `plan` loads that the previous plan did not have.
    pub moves: usize,
    /// Predicted imbalance per layer of the plan in force and of the improved plan.
    pub before: BTreeMap<u32, f64>,
    pub after: BTreeMap<u32, f64>,
    pub applied: bool,
}

/// Improves the plan in force (`p.previous`, or a fresh [`plan`] when it no longer fits the
/// workers) for `p.load`: greedily, on the most imbalanced layer first, the change that lowers
/// its most loaded worker the most per copy loaded — an expert moved to a worker with room, two
/// experts swapped, a redundant copy given to a hotter expert, or a copy added where the
/// redundancy budget allows — until `max_moves` copies are spent or no change helps. Kept only
/// if the mean per-layer imbalance drops by `threshold` or more.
pub fn rebalance(p: &Problem, opts: &RebalanceOptions) -> Result<Rebalance, PlacementError> {
    let start = match &p.previous {
        Some(prev) if fits(p, prev) => prev.clone(),
        _ => plan(p)?,
    };
    let before = imbalance(&start, p);
    let mut search = Search::new(p, &start);
    search.run(opts.max_moves);
    let improved = search.into_plan(p);
    let after = imbalance(&improved, p);
    let empty = Plan::default();
    let previous = p.previous.as_ref().unwrap_or(&empty);
    let gain = mean_imbalance(&before) - mean_imbalance(&after);
    let applied = improved != start && gain >= opts.threshold && gain > 0.0;
    let (plan, after) = if applied {
        (improved, after)
    } else {
        (start, before.clone())
    };
    Ok(Rebalance {
        moves: plan.moves_from(previous),
        plan,
        before,
        after,
        applied,
    })
}

/// Whether `plan` is still a valid plan for `p`: every expert held, only by live workers,
/// copies on distinct workers, no worker over its slots.
fn fits(p: &Problem, plan: &Plan) -> bool {
    let live: BTreeMap<WorkerId, u64> = p
        .workers
        .iter()
        .map(|w| (w.id, w.memory_bytes / p.expert_bytes.max(1)))
        .collect();
    let mut used: BTreeMap<WorkerId, u64> = BTreeMap::new();
    for &layer in &p.layers {
        for expert in 0..p.experts_per_layer {
            let Some(ws) = plan.holders.get(&Slot { layer, expert }) else {
                return false;
            };
            let distinct: BTreeSet<&WorkerId> = ws.iter().collect();
            if ws.is_empty() || distinct.len() != ws.len() {
                return false;
            }
            for w in ws {
                *used.entry(*w).or_default() += 1;
            }
        }
    }
    let slots = p.layers.len() * p.experts_per_layer as usize;
    plan.holders.len() == slots
        && used
            .iter()
            .all(|(w, n)| live.get(w).is_some_and(|cap| n <= cap))
}

/// One layer in the search: its experts' loads, holders (worker indices) and the predicted
/// load per worker.
struct LayerState {
    layer: u32,
    load: Vec<f64>,
    holders: Vec<Vec<usize>>,
    worker_load: Vec<f64>,
}

impl LayerState {
    fn share(&self, e: usize) -> f64 {
        self.load[e] / self.holders[e].len().max(1) as f64
    }

    fn copies(&self) -> usize {
        self.holders.iter().map(Vec::len).sum()
    }

    fn recompute(&mut self) {
        self.worker_load.iter_mut().for_each(|l| *l = 0.0);
        for e in 0..self.holders.len() {
            let share = self.share(e);
            for &w in &self.holders[e] {
                self.worker_load[w] += share;
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Change {
    /// Expert `e`'s copy on `from` goes to `to` (which has room).
    Move { e: usize, from: usize, to: usize },
    /// `e` on `a` and `f` on `b` trade places.
    Swap {
        e: usize,
        a: usize,
        f: usize,
        b: usize,
    },
    /// `f`'s copy on `w` (one of several) becomes a copy of `e`.
    Reassign { e: usize, f: usize, w: usize },
    /// A new copy of `e` on `w` (which has room).
    Add { e: usize, w: usize },
}

impl Change {
    fn cost(self) -> usize {
        match self {
            Change::Swap { .. } => 2,
            _ => 1,
        }
    }
}

struct Search {
    workers: Vec<WorkerId>,
    layers: Vec<LayerState>,
    /// Slots left per worker.
    room: Vec<u64>,
    min_copies: usize,
    /// Most copies a layer may have.
    max_copies: usize,
}

/// A layer's worst worker load and how many workers share it (fewer is better at equal max).
fn objective(loads: &[f64]) -> (f64, usize) {
    let max = loads.iter().copied().fold(f64::MIN, f64::max);
    let eps = tolerance(loads);
    (max, loads.iter().filter(|&&l| l >= max - eps).count())
}

fn tolerance(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    1e-9 * (total / loads.len().max(1) as f64).max(1e-12)
}

impl Search {
    fn new(p: &Problem, start: &Plan) -> Search {
        let mut workers: Vec<WorkerId> = p.workers.iter().map(|w| w.id).collect();
        workers.sort();
        let index: BTreeMap<WorkerId, usize> =
            workers.iter().enumerate().map(|(i, w)| (*w, i)).collect();
        let mut room: Vec<u64> = workers
            .iter()
            .map(|id| {
                p.workers
                    .iter()
                    .find(|w| w.id == *id)
                    .map_or(0, |w| w.memory_bytes / p.expert_bytes.max(1))
            })
            .collect();
        let layers = p
            .layers
            .iter()
            .map(|&layer| {
                let experts = p.experts_per_layer as usize;
                let mut holders = vec![Vec::new(); experts];
                for (e, hs) in holders.iter_mut().enumerate() {
                    let slot = Slot {
                        layer,
                        expert: e as u32,
                    };
                    for w in start.holders.get(&slot).into_iter().flatten() {
                        if let Some(&i) = index.get(w) {
                            hs.push(i);
                            room[i] = room[i].saturating_sub(1);
                        }
                    }
                }
                let load = (0..experts)
                    .map(|e| {
                        load_of(
                            &p.load,
                            &Slot {
                                layer,
                                expert: e as u32,
                            },
                        )
                    })
                    .collect();
                let mut l = LayerState {
                    layer,
                    load,
                    holders,
                    worker_load: vec![0.0; workers.len()],
                };
                l.recompute();
                l
            })
            .collect();
        let min_copies = p.replicas.clamp(1, workers.len().max(1));
        Search {
            max_copies: min_copies * p.experts_per_layer as usize + p.redundant,
            min_copies,
            workers,
            layers,
            room,
        }
    }

    /// Spends up to `budget` copies, worst layer first.
    fn run(&mut self, budget: usize) {
        let mut left = budget;
        let mut stuck: BTreeSet<usize> = BTreeSet::new();
        while left > 0 {
            let worst = (0..self.layers.len())
                .filter(|i| !stuck.contains(i))
                .max_by(|&a, &b| {
                    let (ia, ib) = (
                        max_over_mean(&self.layers[a].worker_load),
                        max_over_mean(&self.layers[b].worker_load),
                    );
                    ia.total_cmp(&ib).then(b.cmp(&a))
                });
            let Some(i) = worst else { break };
            match self.best_change(i, left) {
                Some(change) => {
                    left -= change.cost();
                    let frees_room = matches!(change, Change::Move { .. } | Change::Add { .. });
                    self.apply(i, change);
                    if frees_room {
                        // Room moved: a layer stuck for want of it may move again.
                        stuck.clear();
                    }
                }
                None => {
                    stuck.insert(i);
                }
            }
        }
    }

    /// The change to layer `i` that lowers its worst worker the most per copy, among those
    /// costing at most `left`; none if nothing helps.
    fn best_change(&self, i: usize, left: usize) -> Option<Change> {
        let l = &self.layers[i];
        let n = self.workers.len();
        let current = objective(&l.worker_load);
        let eps = tolerance(&l.worker_load);
        let a = (0..n).find(|&w| l.worker_load[w] >= current.0 - eps)?;
        let on_a: Vec<usize> = (0..l.holders.len())
            .filter(|&e| l.holders[e].contains(&a) && l.load[e] > 0.0)
            .collect();
        let mut best: Option<(f64, usize, Change)> = None;
        let mut consider = |change: Change, loads: &[f64]| {
            if change.cost() > left {
                return;
            }
            let (max, at_max) = objective(loads);
            let better = max < current.0 - eps || (max <= current.0 + eps && at_max < current.1);
            if !better {
                return;
            }
            let gain = (current.0 - max) / change.cost() as f64;
            let key = (gain, usize::MAX - at_max);
            if best
                .as_ref()
                .is_none_or(|(g, m, _)| key.0 > *g + eps || (key.0 >= *g - eps && key.1 > *m))
            {
                best = Some((key.0, key.1, change));
            }
        };
        let mut loads = l.worker_load.clone();
        for &e in &on_a {
            let share = l.share(e);
            for to in 0..n {
                if self.room[to] > 0 && !l.holders[e].contains(&to) {
                    loads.copy_from_slice(&l.worker_load);
                    loads[a] -= share;
                    loads[to] += share;
                    consider(Change::Move { e, from: a, to }, &loads);
                }
            }
            for f in 0..l.holders.len() {
                if f == e || l.holders[f].contains(&a) {
                    continue;
                }
                let fs = l.share(f);
                if fs < share {
                    for &b in &l.holders[f] {
                        if !l.holders[e].contains(&b) {
                            loads.copy_from_slice(&l.worker_load);
                            loads[a] += fs - share;
                            loads[b] += share - fs;
                            consider(Change::Swap { e, a, f, b }, &loads);
                        }
                    }
                }
            }
            let ce = l.holders[e].len() as f64;
            let grown = l.load[e] / (ce + 1.0);
            for f in 0..l.holders.len() {
                if f == e || l.holders[f].len() <= self.min_copies {
                    continue;
                }
                let cf = l.holders[f].len() as f64;
                for &w in &l.holders[f] {
                    if l.holders[e].contains(&w) {
                        continue;
                    }
                    loads.copy_from_slice(&l.worker_load);
                    for &h in &l.holders[e] {
                        loads[h] += grown - share;
                    }
                    loads[w] += grown;
                    for &h in &l.holders[f] {
                        loads[h] += if h == w {
                            -l.load[f] / cf
                        } else {
                            l.load[f] / (cf - 1.0) - l.load[f] / cf
                        };
                    }
                    consider(Change::Reassign { e, f, w }, &loads);
                }
            }
            if l.copies() < self.max_copies && l.holders[e].len() < n {
                for w in 0..n {
                    if self.room[w] > 0 && !l.holders[e].contains(&w) {
                        loads.copy_from_slice(&l.worker_load);
                        for &h in &l.holders[e] {
                            loads[h] += grown - share;
                        }
                        loads[w] += grown;
                        consider(Change::Add { e, w }, &loads);
                    }
                }
            }
        }
        best.map(|(_, _, c)| c)
    }

    fn apply(&mut self, i: usize, change: Change) {
        let l = &mut self.layers[i];
        let replace = |hs: &mut Vec<usize>, old: usize, new: usize| {
            if let Some(x) = hs.iter_mut().find(|x| **x == old) {
                *x = new;
            }
        };
        match change {
            Change::Move { e, from, to } => {
                replace(&mut l.holders[e], from, to);
                self.room[from] += 1;
                self.room[to] -= 1;
            }
            Change::Swap { e, a, f, b } => {
                replace(&mut l.holders[e], a, b);
                replace(&mut l.holders[f], b, a);
            }
            Change::Reassign { e, f, w } => {
                l.holders[f].retain(|&x| x != w);
                l.holders[e].push(w);
            }
            Change::Add { e, w } => {
                l.holders[e].push(w);
                self.room[w] -= 1;
            }
        }
        l.recompute();
    }

    fn into_plan(self, p: &Problem) -> Plan {
        let mut holders = BTreeMap::new();
        for l in &self.layers {
            for (e, hs) in l.holders.iter().enumerate() {
                let mut ws: Vec<WorkerId> = hs.iter().map(|&i| self.workers[i]).collect();
                ws.sort();
                holders.insert(
                    Slot {
                        layer: l.layer,
                        expert: e as u32,
                    },
                    ws,
                );
            }
        }
        debug_assert_eq!(holders.len(), p.layers.len() * p.experts_per_layer as usize);
        Plan { holders }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::WorkerSpec;

    /// `workers` × `slots` each, `layers` MoE layers of `experts`, Zipf(`s`) loads shuffled
    /// per layer by `seed`.
    fn zipf_problem(
        workers: u32,
        slots: u64,
        layers: u32,
        experts: u32,
        s: f64,
        seed: u64,
    ) -> Problem {
        let mut load = BTreeMap::new();
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        for layer in 0..layers {
            let mut ranks: Vec<u32> = (0..experts).collect();
            for i in (1..ranks.len()).rev() {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ranks.swap(i, (x >> 33) as usize % (i + 1));
            }
            for (expert, &rank) in ranks.iter().enumerate() {
                load.insert(
                    Slot {
                        layer,
                        expert: expert as u32,
                    },
                    1000.0 / f64::from(rank + 1).powf(s),
                );
            }
        }
        Problem {
            layers: (0..layers).collect(),
            experts_per_layer: experts,
            expert_bytes: 10,
            workers: (0..workers)
                .map(|i| WorkerSpec {
                    id: WorkerId(i),
                    memory_bytes: slots * 10,
                })
                .collect(),
            replicas: 1,
            load,
            ..Default::default()
        }
    }

    /// The plan the cluster had before any load was known.
    fn in_force(p: &Problem) -> Problem {
        let blind = Problem {
            load: BTreeMap::new(),
            previous: None,
            ..p.clone()
        };
        Problem {
            previous: Some(plan(&blind).unwrap()),
            ..p.clone()
        }
    }

    fn opts(max_moves: usize) -> RebalanceOptions {
        RebalanceOptions {
            max_moves,
            threshold: 0.0,
        }
    }

    fn check_valid(p: &Problem, plan: &Plan) {
        assert!(
            fits(p, plan),
            "the plan must hold every expert within memory"
        );
    }

    #[test]
    fn rebalance_lowers_max_worker_load_under_zipf_skew() {
        for seed in 0..4 {
            // mini's shape: 7 MoE layers × 64 experts, 4 workers with room to spare.
            let p = in_force(&zipf_problem(4, 7 * 64 / 4 + 16, 7, 64, 1.0, seed));
            let r = rebalance(&p, &opts(200)).unwrap();
            check_valid(&p, &r.plan);
            let (before, after) = (mean_imbalance(&r.before), mean_imbalance(&r.after));
            assert!(r.applied && after < before, "{before} -> {after}");
            assert!(
                r.after.values().all(|&x| x <= 1.10),
                "seed {seed}: {:?}",
                r.after
            );
            assert!(r.moves <= 200);
        }
    }

    #[test]
    fn flat_load_moves_nothing() {
        let mut p = zipf_problem(4, 40, 3, 32, 0.0, 1);
        p = in_force(&p);
        let r = rebalance(&p, &opts(100)).unwrap();
        assert_eq!(r.moves, 0);
        assert!(!r.applied);
        assert_eq!(Some(&r.plan), p.previous.as_ref());
    }

    #[test]
    fn moves_stay_within_budget() {
        for budget in [0, 1, 2, 3, 7, 20] {
            let p = in_force(&zipf_problem(5, 30, 4, 32, 1.2, budget as u64));
            let r = rebalance(&p, &opts(budget)).unwrap();
            check_valid(&p, &r.plan);
            assert!(r.moves <= budget, "{} moves for budget {budget}", r.moves);
        }
    }

    #[test]
    fn every_expert_keeps_a_copy_during_a_move() {
        // Each copy is loaded before the plan goes live (membership's job); here: the new plan
        // covers every expert, and a moved expert's new holders differ from the old only by
        // the moves counted.
        let p = in_force(&zipf_problem(3, 30, 2, 32, 1.0, 9));
        let r = rebalance(&p, &opts(50)).unwrap();
        check_valid(&p, &r.plan);
        let prev = p.previous.as_ref().unwrap();
        assert_eq!(r.plan.holders.len(), prev.holders.len());
        assert!(r.plan.holders.values().all(|ws| !ws.is_empty()));
        assert_eq!(r.moves, r.plan.moves_from(prev));
    }

    #[test]
    fn small_gain_keeps_the_plan_in_force() {
        let p = in_force(&zipf_problem(4, 40, 3, 32, 0.3, 2));
        let r = rebalance(
            &p,
            &RebalanceOptions {
                max_moves: 100,
                threshold: 10.0,
            },
        )
        .unwrap();
        assert!(!r.applied);
        assert_eq!(r.moves, 0);
        assert_eq!(r.before, r.after);
    }

    #[test]
    fn redundant_copies_follow_the_load() {
        // One expert carries half of the layer: with two redundant slots it should get both.
        let mut p = zipf_problem(4, 20, 1, 16, 0.0, 0);
        p.redundant = 2;
        for (s, l) in p.load.iter_mut() {
            *l = if s.expert == 5 { 15.0 } else { 1.0 };
        }
        let fresh = plan(&p).unwrap();
        assert_eq!(
            fresh.holders[&Slot {
                layer: 0,
                expert: 5
            }]
                .len(),
            3
        );
        // Placed blind (redundant copies on arbitrary experts), then rebalanced.
        let p = in_force(&p);
        let blind = p.previous.clone().unwrap();
        assert_eq!(blind.holders.values().map(Vec::len).sum::<usize>(), 18);
        let r = rebalance(&p, &opts(10)).unwrap();
        check_valid(&p, &r.plan);
        assert!(
            r.plan.holders[&Slot {
                layer: 0,
                expert: 5
            }]
                .len()
                >= 3
        );
        assert!(r.plan.holders.values().map(Vec::len).sum::<usize>() <= 18);
        assert!(r.after[&0] < r.before[&0]);
    }

    #[test]
    fn a_plan_for_gone_workers_is_replanned_first() {
        let mut p = in_force(&zipf_problem(4, 40, 2, 32, 1.0, 3));
        p.workers.pop();
        let r = rebalance(&p, &opts(10)).unwrap();
        check_valid(&p, &r.plan);
        assert!(!r.plan.by_worker().contains_key(&WorkerId(3)));
    }

    #[test]
    fn deepseek_v3_shape_with_32_redundant_experts_balances() {
        // 58 MoE layers × 256 experts + 32 redundant: 288 slots per layer, 2 per worker per
        // layer on 144 workers; every slot is taken, so only swaps and reassignments help.
        let mut p = zipf_problem(144, 2 * 58, 58, 256, 1.0, 7);
        p.redundant = 32;
        let p = in_force(&p);
        let r = rebalance(&p, &opts(2000)).unwrap();
        check_valid(&p, &r.plan);
        let (before, after) = (mean_imbalance(&r.before), mean_imbalance(&r.after));
        assert!(after < before, "{before} -> {after}");
    }

    /// DeepSeek's EPLB for one layer (`replicate_experts`, then `balanced_packing` of the
    /// copies, `slots` per worker), as `tools/eplb_compare.py` transcribes it: the predicted
    /// max / mean worker load.
    fn eplb_imbalance(load: &[f64], copies: usize, workers: usize) -> f64 {
        let mut count = vec![1usize; load.len()];
        let mut phy: Vec<usize> = (0..load.len()).collect();
        for _ in load.len()..copies {
            let best = (0..load.len())
                .max_by(|&a, &b| {
                    (load[a] / count[a] as f64)
                        .total_cmp(&(load[b] / count[b] as f64))
                        .then(b.cmp(&a))
                })
                .unwrap();
            count[best] += 1;
            phy.push(best);
        }
        let mut items: Vec<f64> = phy.iter().map(|&e| load[e] / count[e] as f64).collect();
        items.sort_by(|a, b| b.total_cmp(a));
        let per = copies / workers;
        let (mut packs, mut held) = (vec![0.0f64; workers], vec![0usize; workers]);
        for item in items {
            let w = (0..workers)
                .filter(|&w| held[w] < per)
                .min_by(|&a, &b| packs[a].total_cmp(&packs[b]))
                .unwrap();
            packs[w] += item;
            held[w] += 1;
        }
        max_over_mean(&packs)
    }

    /// `p.load` with a quarter of each layer's experts trading loads at random.
    fn drifted(p: &Problem, seed: u64) -> Problem {
        let mut load = p.load.clone();
        let mut x = seed.wrapping_add(99);
        let mut next = |n: usize| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as usize % n
        };
        for &layer in &p.layers {
            let e = p.experts_per_layer as usize;
            let mut chosen: Vec<u32> = (0..e as u32).collect();
            for i in (1..e).rev() {
                chosen.swap(i, next(i + 1));
            }
            chosen.truncate(e / 4);
            let values: Vec<f64> = chosen
                .iter()
                .map(|&expert| p.load[&Slot { layer, expert }])
                .collect();
            for (i, &expert) in chosen.iter().enumerate() {
                load.insert(Slot { layer, expert }, values[(i + 1) % values.len()]);
            }
        }
        Problem { load, ..p.clone() }
    }

    /// A smaller DeepSeek-like shape: 8 MoE layers × 64 experts + 16 redundant on 20 full
    /// workers (4 slots per layer each).
    fn eplb_shape(seed: u64) -> Problem {
        let mut p = zipf_problem(20, 4 * 8, 8, 64, 1.0, seed);
        p.redundant = 16;
        p
    }

    #[test]
    fn a_plan_for_the_load_is_at_least_as_even_as_eplb() {
        for seed in 0..4 {
            let p = eplb_shape(seed);
            let ours = mean_imbalance(&imbalance(&plan(&p).unwrap(), &p));
            let theirs: f64 = p
                .layers
                .iter()
                .map(|&layer| {
                    let load: Vec<f64> = (0..64)
                        .map(|expert| p.load[&Slot { layer, expert }])
                        .collect();
                    eplb_imbalance(&load, 80, 20)
                })
                .sum::<f64>()
                / p.layers.len() as f64;
            assert!(
                ours <= theirs + 1e-9,
                "seed {seed}: ours {ours}, EPLB {theirs}"
            );
        }
    }

    #[test]
    fn a_drifting_load_is_rebalanced_as_even_as_a_fresh_plan_within_the_budget() {
        for seed in 0..3 {
            let first = eplb_shape(seed);
            let in_force = plan(&first).unwrap();
            let p = Problem {
                previous: Some(in_force.clone()),
                ..drifted(&first, seed)
            };
            let fresh = plan(&Problem {
                previous: None,
                ..p.clone()
            })
            .unwrap();
            let r = rebalance(&p, &opts(300)).unwrap();
            check_valid(&p, &r.plan);
            let fresh_im = mean_imbalance(&imbalance(&fresh, &p));
            let (before, after) = (mean_imbalance(&r.before), mean_imbalance(&r.after));
            assert!(
                after <= fresh_im * 1.05 && after < before,
                "seed {seed}: {before} -> {after}, a fresh plan {fresh_im}"
            );
            assert!(r.moves <= 300, "seed {seed}: {} moves", r.moves);
        }
    }
}
