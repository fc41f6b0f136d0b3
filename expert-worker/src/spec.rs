//! Which experts a worker holds: `--experts SPEC`.
//!
//! - `all`: every routed expert of every MoE layer;
//! - `0-31` or `0-7,16,20-23`: these experts in every MoE layer;
//! - `3:0-7;4:8-15`: per layer (layers not named hold nothing).

use std::collections::{BTreeMap, BTreeSet};

use switchyard_engine::ModelConfig;
use switchyard_engine::model::ExpertSelection;

use crate::error::WorkerError;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExpertSpec {
    All,
    EveryLayer(BTreeSet<u32>),
    PerLayer(BTreeMap<usize, BTreeSet<u32>>),
}

fn parse_set(text: &str) -> Result<BTreeSet<u32>, WorkerError> {
    let mut out = BTreeSet::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim().parse::<u32>().map_err(|_| {
                WorkerError::Spec(format!("{s:?} in {text:?} is not an expert number"))
            })
        };
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(WorkerError::Spec(format!("range {part:?} is empty")));
                }
                out.extend(a..=b);
            }
            None => {
                out.insert(num(part)?);
            }
        }
    }
    if out.is_empty() {
        return Err(WorkerError::Spec(format!("{text:?} names no experts")));
    }
    Ok(out)
}

impl std::str::FromStr for ExpertSpec {
    type Err = WorkerError;

    fn from_str(s: &str) -> Result<Self, WorkerError> {
        let s = s.trim();
        if s == "all" {
            return Ok(ExpertSpec::All);
        }
        if !s.contains(':') {
            return Ok(ExpertSpec::EveryLayer(parse_set(s)?));
        }
        let mut layers = BTreeMap::new();
        for entry in s.split(';').map(str::trim).filter(|e| !e.is_empty()) {
            let (layer, set) = entry
                .split_once(':')
                .ok_or_else(|| WorkerError::Spec(format!("{entry:?} must be LAYER:EXPERTS")))?;
            let layer: usize = layer
                .trim()
                .parse()
                .map_err(|_| WorkerError::Spec(format!("{layer:?} is not a layer number")))?;
            layers
                .entry(layer)
                .or_insert_with(BTreeSet::new)
                .extend(parse_set(set)?);
        }
        Ok(ExpertSpec::PerLayer(layers))
    }
}

impl ExpertSpec {
    /// The concrete selection for a model, checking every layer and expert exists.
    pub fn resolve(&self, config: &ModelConfig) -> Result<ExpertSelection, WorkerError> {
        let moe = config
            .moe
            .as_ref()
            .ok_or_else(|| WorkerError::Spec("the model has no routed experts".into()))?;
        let n = moe.n_routed_experts as u32;
        let layers = config.moe_layers();
        let map: BTreeMap<usize, BTreeSet<u32>> = match self {
            ExpertSpec::All => layers.iter().map(|&l| (l, (0..n).collect())).collect(),
            ExpertSpec::EveryLayer(set) => layers.iter().map(|&l| (l, set.clone())).collect(),
            ExpertSpec::PerLayer(map) => {
                if let Some(bad) = map.keys().find(|l| !config.is_moe_layer(**l)) {
                    return Err(WorkerError::Spec(format!(
                        "layer {bad} is not an MoE layer (MoE layers: {}..{})",
                        layers.first().copied().unwrap_or(0),
                        layers.last().map_or(0, |l| l + 1)
                    )));
                }
                map.clone()
            }
        };
        if let Some((l, e)) = map
            .iter()
            .find_map(|(l, set)| set.iter().find(|&&e| e >= n).map(|e| (l, e)))
        {
            return Err(WorkerError::Spec(format!(
                "expert {e} of layer {l} is out of range: the model has {n} routed experts"
            )));
        }
        Ok(ExpertSelection::Only(map))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges_lists_and_per_layer_maps() {
        assert_eq!("all".parse::<ExpertSpec>().unwrap(), ExpertSpec::All);
        assert_eq!(
            "0-3,8".parse::<ExpertSpec>().unwrap(),
            ExpertSpec::EveryLayer([0, 1, 2, 3, 8].into())
        );
        assert_eq!(
            "3:0-1;4:5".parse::<ExpertSpec>().unwrap(),
            ExpertSpec::PerLayer(BTreeMap::from([(3, [0, 1].into()), (4, [5].into())]))
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (spec, needle) in [
            ("5-2", "empty"),
            ("x", "not an expert"),
            ("3:", "no experts"),
            ("a:1", "layer"),
        ] {
            let err = spec.parse::<ExpertSpec>().unwrap_err().to_string();
            assert!(err.contains(needle), "{spec}: {err}");
        }
    }
}
