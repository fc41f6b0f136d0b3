//! Which workers serve each routed expert, in one placement version: built from the
//! coordinator's `PlacementMap` itself (coordinated mode) or from what the workers report
//! holding (static `--workers` mode). Pure data; the pool pairs it with connections.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_engine::ModelConfig;
use switchyard_proto::WorkerId;
use switchyard_proto::v1::{InfoResponse, PlacementMap};

use crate::error::RouterError;

/// What a placement must cover: every routed expert of every MoE layer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpertShape {
    /// Model layer index of each MoE layer.
    pub moe_layers: Vec<usize>,
    pub experts: usize,
}

impl ExpertShape {
    pub fn of(config: &ModelConfig) -> Result<ExpertShape, RouterError> {
        let moe = config
            .moe
            .as_ref()
            .ok_or_else(|| RouterError::Placement("the model has no routed experts".into()))?;
        Ok(ExpertShape {
            moe_layers: config.moe_layers(),
            experts: moe.n_routed_experts,
        })
    }
}

/// Per MoE layer, expert → the workers holding it, in the order calls prefer them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The coordinator's version (0 in static mode).
    version: u64,
    layers: BTreeMap<usize, Vec<Vec<WorkerId>>>,
}

fn check_covered(
    shape: &ExpertShape,
    layers: &BTreeMap<usize, Vec<Vec<WorkerId>>>,
) -> Result<(), RouterError> {
    let mut missing = Vec::new();
    for &layer in &shape.moe_layers {
        let holders = layers.get(&layer);
        for e in 0..shape.experts {
            if holders.and_then(|h| h.get(e)).is_none_or(Vec::is_empty) {
                missing.push(format!("{layer}:{e}"));
            }
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    let shown: Vec<_> = missing.iter().take(8).cloned().collect();
    Err(RouterError::Placement(format!(
        "{} routed experts are on no worker (layer:expert {}{})",
        missing.len(),
        shown.join(", "),
        if missing.len() > 8 { ", …" } else { "" }
    )))
}

impl Placement {
    /// The coordinator's map as it is: its worker ids, its order of holders (first =
    /// preferred). Refused unless it covers every routed expert and gives an address for
    /// every worker it names.
    pub fn from_map(shape: &ExpertShape, map: &PlacementMap) -> Result<Placement, RouterError> {
        let addressed: BTreeSet<u32> = map.workers.iter().map(|w| w.worker_id).collect();
        let mut layers = BTreeMap::new();
        for l in &map.layers {
            let layer = l.layer as usize;
            if !shape.moe_layers.contains(&layer) {
                return Err(RouterError::Placement(format!(
                    "placement version {} names layer {layer}, which is not a MoE layer of this model",
                    map.version
                )));
            }
            if l.experts.len() != shape.experts {
                return Err(RouterError::Placement(format!(
                    "placement version {} has {} experts in layer {layer}, this model {}",
                    map.version,
                    l.experts.len(),
                    shape.experts
                )));
            }
            let mut experts = Vec::with_capacity(shape.experts);
            for (e, holders) in l.experts.iter().enumerate() {
                if let Some(w) = holders.worker_ids.iter().find(|w| !addressed.contains(w)) {
                    return Err(RouterError::Placement(format!(
                        "placement version {} puts expert {layer}:{e} on worker w{w}, which it gives no address",
                        map.version
                    )));
                }
                experts.push(holders.worker_ids.iter().map(|&w| WorkerId(w)).collect());
            }
            layers.insert(layer, experts);
        }
        check_covered(shape, &layers)?;
        Ok(Placement {
            version: map.version,
            layers,
        })
    }

    /// What the workers hold, each worker's id its position in the `--workers` list. Where
    /// several hold an expert (replicas), they share its tokens ([`Placement::serving`]).
    pub fn from_infos(
        shape: &ExpertShape,
        workers: &[(WorkerId, InfoResponse)],
    ) -> Result<Placement, RouterError> {
        let mut layers = BTreeMap::new();
        for &layer in &shape.moe_layers {
            let mut owners: Vec<Vec<WorkerId>> = vec![Vec::new(); shape.experts];
            for (id, info) in workers {
                for le in info.layers.iter().filter(|le| le.layer as usize == layer) {
                    for &e in &le.experts {
                        if let Some(holders) = owners.get_mut(e as usize)
                            && !holders.contains(id)
                        {
                            holders.push(*id);
                        }
                    }
                }
            }
            for holders in &mut owners {
                holders.sort();
            }
            layers.insert(layer, owners);
        }
        check_covered(shape, &layers)?;
        Ok(Placement { version: 0, layers })
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Every worker holding `expert` of `layer`, preferred first.
    pub fn holders(&self, layer: usize, expert: u32) -> &[WorkerId] {
        self.layers
            .get(&layer)
            .and_then(|l| l.get(expert as usize))
            .map_or(&[], Vec::as_slice)
    }

    /// The worker serving `expert` of `layer`.
    pub fn worker(&self, layer: usize, expert: u32) -> Option<WorkerId> {
        self.holders(layer, expert).first().copied()
    }

    /// The worker serving `token`'s share of `expert` of `layer`: its holders not in `avoid`
    /// take turns by token (`token % holders`), so replicas split an expert's tokens evenly
    /// and the same token numbers always go to the same replica. `None` if every holder is
    /// avoided.
    pub fn serving(
        &self,
        layer: usize,
        expert: u32,
        token: u64,
        avoid: &BTreeSet<WorkerId>,
    ) -> Option<WorkerId> {
        let holders = self.holders(layer, expert);
        let live = holders.iter().filter(|w| !avoid.contains(w)).count();
        if live == 0 {
            return None;
        }
        holders
            .iter()
            .filter(|w| !avoid.contains(w))
            .nth((token % live as u64) as usize)
            .copied()
    }

    /// The first worker holding `expert` of `layer` that is not in `avoid` (a replica, when
    /// the usual one failed).
    pub fn worker_avoiding(
        &self,
        layer: usize,
        expert: u32,
        avoid: &BTreeSet<WorkerId>,
    ) -> Option<WorkerId> {
        self.holders(layer, expert)
            .iter()
            .find(|w| !avoid.contains(w))
            .copied()
    }

    /// Every worker this placement sends calls to.
    pub fn workers(&self) -> BTreeSet<WorkerId> {
        self.layers.values().flatten().flatten().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1::{ExpertHolders, LayerExperts, LayerPlacement, WorkerAddress};

    fn shape() -> ExpertShape {
        ExpertShape {
            moe_layers: vec![1, 2],
            experts: 4,
        }
    }

    fn info(layers: &[(u32, std::ops::Range<u32>)]) -> InfoResponse {
        InfoResponse {
            layers: layers
                .iter()
                .map(|(l, r)| LayerExperts {
                    layer: *l,
                    experts: r.clone().collect(),
                })
                .collect(),
            ..Default::default()
        }
    }

    fn map(version: u64, holders: &[&[u32]]) -> PlacementMap {
        let ids: BTreeSet<u32> = holders.iter().flat_map(|h| h.iter().copied()).collect();
        PlacementMap {
            version,
            workers: ids
                .iter()
                .map(|&w| WorkerAddress {
                    worker_id: w,
                    address: format!("10.0.0.{w}:1"),
                })
                .collect(),
            layers: [1, 2]
                .iter()
                .map(|&layer| LayerPlacement {
                    layer,
                    experts: holders
                        .iter()
                        .map(|h| ExpertHolders {
                            worker_ids: h.to_vec(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_coordinator_s_map_is_used_as_it_is_ids_and_order_included() {
        let p = Placement::from_map(&shape(), &map(7, &[&[5, 2], &[2], &[9], &[9, 5]])).unwrap();
        assert_eq!(p.version(), 7);
        assert_eq!(p.holders(1, 0), &[WorkerId(5), WorkerId(2)]);
        let none = BTreeSet::new();
        assert_eq!(p.serving(2, 3, 0, &none), Some(WorkerId(9)));
        assert_eq!(p.serving(2, 3, 1, &none), Some(WorkerId(5)));
        let avoid = BTreeSet::from([WorkerId(9)]);
        assert_eq!(p.serving(1, 3, 0, &avoid), Some(WorkerId(5)));
        assert_eq!(p.serving(1, 3, 1, &avoid), Some(WorkerId(5)));
        assert_eq!(p.serving(1, 2, 0, &avoid), None);
        assert_eq!(
            p.workers(),
            BTreeSet::from([WorkerId(2), WorkerId(5), WorkerId(9)])
        );
    }

    #[test]
    fn maps_that_miss_an_expert_or_an_address_are_refused() {
        let err = Placement::from_map(&shape(), &map(3, &[&[1], &[1], &[], &[1]]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2 routed experts") && err.contains("1:2"),
            "{err}"
        );
        let mut m = map(3, &[&[1], &[1], &[1], &[1]]);
        m.workers.clear();
        let err = Placement::from_map(&shape(), &m).unwrap_err().to_string();
        assert!(err.contains("no address"), "{err}");
        let mut m = map(3, &[&[1], &[1], &[1], &[1]]);
        m.layers[0].layer = 0;
        let err = Placement::from_map(&shape(), &m).unwrap_err().to_string();
        assert!(err.contains("not a MoE layer"), "{err}");
    }

    #[test]
    fn static_workers_replicas_take_turns_in_id_order() {
        let p = Placement::from_infos(
            &shape(),
            &[
                (WorkerId(2), info(&[(1, 0..4), (2, 0..4)])),
                (WorkerId(0), info(&[(1, 0..4), (2, 0..2)])),
                (WorkerId(1), info(&[(2, 2..4)])),
            ],
        )
        .unwrap();
        assert_eq!(p.version(), 0);
        let none = BTreeSet::new();
        assert_eq!(p.serving(1, 1, 0, &none), Some(WorkerId(0)));
        assert_eq!(p.serving(1, 1, 1, &none), Some(WorkerId(2)));
        assert_eq!(p.holders(2, 3), &[WorkerId(1), WorkerId(2)]);
        let failed = BTreeSet::from([WorkerId(0)]);
        assert_eq!(p.serving(1, 1, 0, &failed), Some(WorkerId(2)));
    }

    #[test]
    fn static_workers_missing_an_expert_are_named() {
        let err = Placement::from_infos(&shape(), &[(WorkerId(0), info(&[(1, 0..4), (2, 0..3)]))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2:3") && err.contains("1 routed experts"),
            "{err}"
        );
    }
}
