//! Which worker serves each routed expert: built from what the workers say they hold.

use std::collections::{BTreeMap, BTreeSet};

use switchyard_engine::ModelConfig;
use switchyard_proto::v1::InfoResponse;

use crate::dispatch::WorkerId;
use crate::error::RouterError;

/// Per MoE layer, expert → the workers holding it, lowest id (the one normally used) first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    layers: BTreeMap<usize, Vec<Vec<WorkerId>>>,
}

impl Placement {
    /// Every routed expert of every MoE layer must be held by some worker. Where several hold
    /// one (replicas), the lowest worker id serves it and the others stand by for failover.
    pub fn from_workers(
        config: &ModelConfig,
        workers: &[(WorkerId, InfoResponse)],
    ) -> Result<Placement, RouterError> {
        let n = config
            .moe
            .as_ref()
            .ok_or_else(|| RouterError::Placement("the model has no routed experts".into()))?
            .n_routed_experts;
        let mut layers = BTreeMap::new();
        let mut missing = Vec::new();
        for layer in config.moe_layers() {
            let mut owners: Vec<Vec<WorkerId>> = vec![Vec::new(); n];
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
            for (e, holders) in owners.iter_mut().enumerate() {
                if holders.is_empty() {
                    missing.push(format!("{layer}:{e}"));
                }
                holders.sort();
            }
            layers.insert(layer, owners);
        }
        if !missing.is_empty() {
            let shown: Vec<_> = missing.iter().take(8).cloned().collect();
            return Err(RouterError::Placement(format!(
                "{} routed experts are on no worker (layer:expert {}{})",
                missing.len(),
                shown.join(", "),
                if missing.len() > 8 { ", …" } else { "" }
            )));
        }
        Ok(Placement { layers })
    }

    /// The worker serving `expert` of `layer`.
    pub fn worker(&self, layer: usize, expert: u32) -> Option<WorkerId> {
        self.worker_avoiding(layer, expert, &BTreeSet::new())
    }

    /// The first worker holding `expert` of `layer` that is not in `avoid` (a replica, when the
    /// usual one failed).
    pub fn worker_avoiding(
        &self,
        layer: usize,
        expert: u32,
        avoid: &BTreeSet<WorkerId>,
    ) -> Option<WorkerId> {
        self.layers
            .get(&layer)?
            .get(expert as usize)?
            .iter()
            .find(|w| !avoid.contains(w))
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1::LayerExperts;

    fn config() -> ModelConfig {
        let json = switchyard_engine::synth::preset_config("tiny").unwrap();
        ModelConfig::from_json_str(&json.to_string()).unwrap()
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

    #[test]
    fn every_expert_maps_to_the_worker_holding_it() {
        let c = config();
        let p = Placement::from_workers(
            &c,
            &[
                (WorkerId(0), info(&[(1, 0..8), (2, 0..16)])),
                (WorkerId(1), info(&[(1, 8..16)])),
            ],
        )
        .unwrap();
        assert_eq!(p.worker(1, 3), Some(WorkerId(0)));
        assert_eq!(p.worker(1, 12), Some(WorkerId(1)));
        assert_eq!(p.worker(2, 12), Some(WorkerId(0)));
    }

    #[test]
    fn replicas_stand_by_in_id_order() {
        let c = config();
        let p = Placement::from_workers(
            &c,
            &[
                (WorkerId(2), info(&[(1, 0..16), (2, 0..16)])),
                (WorkerId(0), info(&[(1, 0..16), (2, 0..16)])),
            ],
        )
        .unwrap();
        assert_eq!(p.worker(1, 5), Some(WorkerId(0)));
        let failed = BTreeSet::from([WorkerId(0)]);
        assert_eq!(p.worker_avoiding(1, 5, &failed), Some(WorkerId(2)));
        let both = BTreeSet::from([WorkerId(0), WorkerId(2)]);
        assert_eq!(p.worker_avoiding(1, 5, &both), None);
    }

    #[test]
    fn unplaced_experts_are_named() {
        let c = config();
        let err = Placement::from_workers(&c, &[(WorkerId(0), info(&[(1, 0..16), (2, 0..15)]))])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("2:15") && err.contains("1 routed experts"),
            "{err}"
        );
    }
}
