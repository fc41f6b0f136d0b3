//! Which worker serves each routed expert: built from what the workers say they hold.

use std::collections::BTreeMap;

use switchyard_engine::ModelConfig;
use switchyard_proto::v1::InfoResponse;

use crate::dispatch::WorkerId;
use crate::error::RouterError;

/// Per MoE layer, expert → the worker that serves it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    layers: BTreeMap<usize, Vec<WorkerId>>,
}

impl Placement {
    /// Every routed expert of every MoE layer must be held by some worker. Where several hold
    /// one (replicas), the lowest worker id serves it; balancing replicas is the coordinator's.
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
            let mut owners: Vec<Option<WorkerId>> = vec![None; n];
            for (id, info) in workers {
                for le in info.layers.iter().filter(|le| le.layer as usize == layer) {
                    for &e in &le.experts {
                        if let Some(slot) = owners.get_mut(e as usize) {
                            slot.get_or_insert(*id);
                        }
                    }
                }
            }
            let placed: Vec<WorkerId> = owners
                .iter()
                .enumerate()
                .filter_map(|(e, o)| {
                    if o.is_none() {
                        missing.push(format!("{layer}:{e}"));
                    }
                    *o
                })
                .collect();
            layers.insert(layer, placed);
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
        self.layers.get(&layer)?.get(expert as usize).copied()
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
