//! Expert placement as a pure function: problem → plan. See `README.md` beside this file.

use std::collections::{BTreeMap, BTreeSet};

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

#[derive(Clone, Debug, PartialEq)]
pub struct Problem {
    /// MoE layer indices.
    pub layers: Vec<u32>,
    pub experts_per_layer: u32,
    /// Bytes of one expert of one layer.
    pub expert_bytes: u64,
    pub workers: Vec<WorkerSpec>,
    /// Copies wanted of every expert (at least 1).
    pub replicas: usize,
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

#[derive(Debug, thiserror::Error, PartialEq)]
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
    let mut capacity: BTreeMap<WorkerId, u64> = p
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
    let load_of = |s: &Slot| p.load.get(s).copied().unwrap_or(1.0).max(0.0);
    // Hottest first; ties by (layer, expert) so the order is total.
    let mut order = slots.clone();
    order.sort_by(|a, b| load_of(b).total_cmp(&load_of(a)).then(a.cmp(b)));

    let mut holders: BTreeMap<Slot, Vec<WorkerId>> =
        slots.iter().map(|s| (*s, Vec::new())).collect();
    let mut worker_load: BTreeMap<WorkerId, f64> = capacity.keys().map(|w| (*w, 0.0)).collect();
    let wanted = p.replicas.min(p.workers.len());

    // Rule 3: keep what the previous plan had on live workers, while room lasts and up to a
    // fair share of each layer, so a joining worker takes over the excess of every layer (not
    // whole layers: a layer's dispatch waits on its slowest worker) and nothing else moves.
    if let Some(prev) = &p.previous {
        let mut copies: BTreeMap<u32, usize> = BTreeMap::new();
        for (slot, ws) in &prev.holders {
            *copies.entry(slot.layer).or_default() += ws.len().min(wanted);
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
        let mut kept: BTreeMap<(WorkerId, u32), usize> = BTreeMap::new();
        for s in &order {
            for w in prev.holders.get(s).into_iter().flatten() {
                let held = &holders[s];
                let room = capacity.get(w).is_some_and(|c| *c > 0);
                let share = kept.get(&(*w, s.layer)).copied().unwrap_or(0) < fair(*w, s.layer);
                if held.len() < wanted && !held.contains(w) && room && share {
                    take(
                        &mut capacity,
                        &mut worker_load,
                        &mut holders,
                        *s,
                        *w,
                        load_of(s),
                    );
                    *kept.entry((*w, s.layer)).or_default() += 1;
                }
            }
        }
    }
    // Rule 4: one copy of everything, hottest first, to the least-loaded worker with room.
    for s in &order {
        if holders[s].is_empty() {
            let w = least_loaded(&capacity, &worker_load, &holders[s]).ok_or(
                PlacementError::DoesNotFit {
                    needed,
                    needed_bytes: needed * p.expert_bytes,
                    available,
                    expert_bytes: p.expert_bytes,
                },
            )?;
            take(
                &mut capacity,
                &mut worker_load,
                &mut holders,
                *s,
                w,
                load_of(s),
            );
        }
    }
    // Rule 5: extra replicas, hottest first, one round per copy so heat decides who gets them.
    for copy in 2..=wanted {
        for s in &order {
            if holders[s].len() >= copy {
                continue;
            }
            match least_loaded(&capacity, &worker_load, &holders[s]) {
                Some(w) => take(
                    &mut capacity,
                    &mut worker_load,
                    &mut holders,
                    *s,
                    w,
                    load_of(s),
                ),
                None => break,
            }
        }
    }
    for ws in holders.values_mut() {
        ws.sort();
    }
    Ok(Plan { holders })
}

fn take(
    capacity: &mut BTreeMap<WorkerId, u64>,
    worker_load: &mut BTreeMap<WorkerId, f64>,
    holders: &mut BTreeMap<Slot, Vec<WorkerId>>,
    s: Slot,
    w: WorkerId,
    load: f64,
) {
    if let Some(c) = capacity.get_mut(&w) {
        *c -= 1;
    }
    if let Some(ws) = holders.get_mut(&s) {
        // Copies split the expert's load: move the other holders' shares down.
        let before = ws.len() as f64;
        for other in ws.iter() {
            if let Some(l) = worker_load.get_mut(other) {
                *l -= load / before - load / (before + 1.0);
            }
        }
        ws.push(w);
        if let Some(l) = worker_load.get_mut(&w) {
            *l += load / (before + 1.0);
        }
    }
}

fn least_loaded(
    capacity: &BTreeMap<WorkerId, u64>,
    load: &BTreeMap<WorkerId, f64>,
    exclude: &[WorkerId],
) -> Option<WorkerId> {
    capacity
        .iter()
        .filter(|(w, c)| **c > 0 && !exclude.contains(w))
        .min_by(|(a, _), (b, _)| load[*a].total_cmp(&load[*b]).then(a.cmp(b)))
        .map(|(w, _)| *w)
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
            load: BTreeMap::new(),
            previous: None,
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
