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
        capacity: capacity.clone(),
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
        st.quota = fair_shares(p, &capacity, |layer| {
            copies.get(&layer).copied().unwrap_or(0)
        });
        for s in &order {
            for w in prev.holders.get(s).into_iter().flatten() {
                let held = st.holders[s].len();
                let extra = held >= wanted;
                let allowed = !extra || extras.get(&s.layer).copied().unwrap_or(0) < p.redundant;
                let room = st.capacity.get(w).is_some_and(|c| *c > 0);
                let share = !st.over_quota(*w, s.layer);
                if allowed && !st.holders[s].contains(w) && room && share {
                    st.take(*s, *w, 0.0);
                    if extra {
                        *extras.entry(s.layer).or_default() += 1;
                    }
                }
            }
        }
    }
    // Rules 4-6: how many copies each expert gets, then where the new ones go.
    let counts = copy_counts(p, &st, wanted, &mut extras, &order);
    let share = |s: &Slot| load_of(s) / counts.get(s).copied().unwrap_or(1).max(1) as f64;
    st.settle(share);
    let mut per_layer: BTreeMap<u32, usize> = BTreeMap::new();
    for (s, c) in &counts {
        *per_layer.entry(s.layer).or_default() += c;
    }
    st.quota = fair_shares(p, &capacity, |layer| {
        per_layer.get(&layer).copied().unwrap_or(0)
    });
    // Rule 7: the copies still to place, largest share first over all layers (longest
    // processing time first, as EPLB packs), each to the worker with the least load in that
    // layer; no fixed count per layer, so a hot copy's worker takes fewer of that layer.
    let mut units: Vec<(f64, Slot)> = counts
        .iter()
        .flat_map(|(s, &c)| {
            let missing = c.saturating_sub(st.holders[s].len());
            std::iter::repeat_n((share(s), *s), missing)
        })
        .collect();
    units.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    for (load, s) in units {
        match st.least_loaded(s) {
            Some(w) => st.take(s, w, load),
            // Room for every first copy was reserved; only an extra copy can find every
            // worker with room already holding it, and it is then not made.
            None if st.holders[&s].is_empty() => {
                return Err(PlacementError::DoesNotFit {
                    needed,
                    needed_bytes: needed * p.expert_bytes,
                    available,
                    expert_bytes: p.expert_bytes,
                });
            }
            None => {}
        }
    }
    let mut holders = st.holders;
    for ws in holders.values_mut() {
        ws.sort();
    }
    Ok(Plan { holders })
}

/// Copies of every expert: what rule 3 kept (at least one), then rule 5's replicas up to
/// `wanted`, hottest first, then rule 6's redundant copies, one per layer per round (so short
/// room is shared by the layers), each to the expert with the most load per copy (EPLB's
/// replication rule) — all within the slots left after a first copy of everything unplaced.
fn copy_counts(
    p: &Problem,
    st: &Packing,
    wanted: usize,
    extras: &mut BTreeMap<u32, usize>,
    order: &[Slot],
) -> BTreeMap<Slot, usize> {
    let workers = p.workers.len();
    let mut count: BTreeMap<Slot, usize> = st
        .holders
        .iter()
        .map(|(s, ws)| (*s, ws.len().max(1)))
        .collect();
    let first = st.holders.values().filter(|ws| ws.is_empty()).count() as u64;
    let mut free = st.capacity.values().sum::<u64>().saturating_sub(first);
    for copy in 2..=wanted {
        for s in order {
            if free == 0 {
                return count;
            }
            if let Some(c) = count.get_mut(s)
                && *c < copy
            {
                *c += 1;
                free -= 1;
            }
        }
    }
    for _ in 0..p.redundant {
        let mut placed = false;
        for &layer in &p.layers {
            if free == 0 {
                return count;
            }
            let made = extras.entry(layer).or_default();
            if *made >= p.redundant {
                continue;
            }
            let per_copy = |s: &Slot| load_of(&p.load, s) / count[s] as f64;
            let hottest = (0..p.experts_per_layer)
                .map(|expert| Slot { layer, expert })
                .filter(|s| count[s] < workers)
                .min_by(|a, b| per_copy(b).total_cmp(&per_copy(a)).then(a.cmp(b)));
            if let Some(s) = hottest {
                *count.entry(s).or_default() += 1;
                *made += 1;
                free -= 1;
                placed = true;
            }
        }
        if !placed {
            break;
        }
    }
    count
}

/// Each worker's fair share of every layer's `copies(layer)`: in proportion to its slots, the
/// remainder handed out by a rotation over layers so the totals stay fair too.
fn fair_shares(
    p: &Problem,
    capacity: &BTreeMap<WorkerId, u64>,
    copies: impl Fn(u32) -> usize,
) -> BTreeMap<(WorkerId, u32), usize> {
    let ids: Vec<WorkerId> = capacity.keys().copied().collect();
    let n = ids.len();
    let total: u128 = capacity
        .values()
        .map(|&c| u128::from(c))
        .sum::<u128>()
        .max(1);
    let mut out = BTreeMap::new();
    for (pos, &layer) in p.layers.iter().enumerate() {
        let c = copies(layer);
        let mut shares: Vec<usize> = ids
            .iter()
            .map(|w| (c as u128 * u128::from(capacity[w]) / total) as usize)
            .collect();
        let left = c.saturating_sub(shares.iter().sum());
        for j in 0..left.min(n) {
            shares[(j + n - pos % n) % n] += 1;
        }
        for (w, q) in ids.iter().zip(shares) {
            out.insert((*w, layer), q);
        }
    }
    out
}

/// An expert's observed load; missing entries count as 1 (equal load), negatives as 0.
pub(crate) fn load_of(load: &BTreeMap<Slot, f64>, s: &Slot) -> f64 {
    load.get(s).copied().unwrap_or(1.0).max(0.0)
}

/// The plan being built: slots left per worker, holders, and the predicted load per worker
/// (each copy of an expert carries its share of the expert's load, as routers split its
/// tokens over the copies).
struct Packing {
    capacity: BTreeMap<WorkerId, u64>,
    holders: BTreeMap<Slot, Vec<WorkerId>>,
    layer_load: BTreeMap<(WorkerId, u32), f64>,
    total_load: BTreeMap<WorkerId, f64>,
    /// Copies per (worker, layer), and each one's fair share of the layer.
    count: BTreeMap<(WorkerId, u32), usize>,
    quota: BTreeMap<(WorkerId, u32), usize>,
}

impl Packing {
    /// Whether `w` holds its fair share of `layer` already.
    fn over_quota(&self, w: WorkerId, layer: u32) -> bool {
        self.quota
            .get(&(w, layer))
            .is_some_and(|q| self.count.get(&(w, layer)).copied().unwrap_or(0) >= *q)
    }

    /// `w` takes a copy of `s` carrying `load`.
    fn take(&mut self, s: Slot, w: WorkerId, load: f64) {
        if let Some(c) = self.capacity.get_mut(&w) {
            *c -= 1;
        }
        *self.count.entry((w, s.layer)).or_default() += 1;
        if let Some(ws) = self.holders.get_mut(&s) {
            ws.push(w);
        }
        *self.layer_load.entry((w, s.layer)).or_default() += load;
        *self.total_load.entry(w).or_default() += load;
    }

    /// Recounts the loads of the copies placed so far at `share` per copy.
    fn settle(&mut self, share: impl Fn(&Slot) -> f64) {
        self.layer_load.clear();
        self.total_load.values_mut().for_each(|l| *l = 0.0);
        for (s, ws) in &self.holders {
            for w in ws {
                *self.layer_load.entry((*w, s.layer)).or_default() += share(s);
                *self.total_load.entry(*w).or_default() += share(s);
            }
        }
    }

    /// The worker with room, not holding `s`, with the least load in `s`'s layer; then one still
    /// under its fair share of the layer; then the least load in all layers; then the lowest id.
    fn least_loaded(&self, s: Slot) -> Option<WorkerId> {
        let exclude = self.holders.get(&s).map_or(&[][..], Vec::as_slice);
        let key = |w: &WorkerId| {
            (
                self.over_quota(*w, s.layer),
                self.layer_load.get(&(*w, s.layer)).copied().unwrap_or(0.0),
                self.total_load.get(w).copied().unwrap_or(0.0),
            )
        };
        self.capacity
            .iter()
            .filter(|(w, c)| **c > 0 && !exclude.contains(w))
            .min_by(|(a, _), (b, _)| {
                let (ka, kb) = (key(a), key(b));
                ka.1.total_cmp(&kb.1)
                    .then(ka.0.cmp(&kb.0))
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
