//! Cluster membership and the placement it implies: the coordinator's state, as a plain state
//! machine driven with explicit times so it tests without clocks or sockets.
//!
//! Workers register and heartbeat; a worker silent for a lease is dropped. Every membership
//! change re-runs [`placement::plan`] (staying close to the previous plan) into a new *target*
//! version. Workers load what the target gives them and report the version in heartbeats; when
//! every worker holding experts in the target has loaded it, it becomes the *live* version that
//! routers use. Routers therefore never see a placement naming experts a worker has not loaded.

use std::collections::BTreeMap;

use crate::placement::{self, Plan, Problem, Slot, WorkerId, WorkerSpec};

/// What the coordinator knows about the model it places.
#[derive(Clone, Debug, PartialEq)]
pub struct ModelShape {
    /// `ModelConfig::identity()`: workers serving another model are refused.
    pub identity: String,
    pub layers: Vec<u32>,
    pub experts_per_layer: u32,
    pub expert_bytes: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Member {
    pub id: WorkerId,
    pub address: String,
    pub device: String,
    pub memory_bytes: u64,
    pub last_seen_ms: u64,
    pub loaded_version: u64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Versioned {
    pub version: u64,
    pub plan: Plan,
    /// Addresses of the workers the plan names, as of this version.
    pub addresses: BTreeMap<WorkerId, String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum MembershipError {
    #[error("worker serves model {got:?}, this cluster {want:?}")]
    WrongModel { got: String, want: String },
    #[error("`{field}` {reason}")]
    Invalid { field: &'static str, reason: String },
}

#[derive(Debug)]
pub struct ClusterState {
    model: ModelShape,
    replicas: usize,
    lease_ms: u64,
    next_id: u32,
    members: BTreeMap<WorkerId, Member>,
    version: u64,
    target: Option<Versioned>,
    live: Option<Versioned>,
    placement_error: Option<String>,
}

impl ClusterState {
    pub fn new(model: ModelShape, replicas: usize, lease_ms: u64) -> ClusterState {
        ClusterState {
            model,
            replicas: replicas.max(1),
            lease_ms,
            next_id: 0,
            members: BTreeMap::new(),
            version: 0,
            target: None,
            live: None,
            placement_error: None,
        }
    }

    /// Starts version numbers above `base`, so a restarted coordinator (seeded from the wall
    /// clock) never reuses a version routers and workers have already seen.
    pub fn with_version_base(mut self, base: u64) -> ClusterState {
        self.version = base;
        self
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    pub fn model(&self) -> &ModelShape {
        &self.model
    }

    pub fn members(&self) -> impl Iterator<Item = &Member> {
        self.members.values()
    }

    pub fn target(&self) -> Option<&Versioned> {
        self.target.as_ref()
    }

    pub fn live(&self) -> Option<&Versioned> {
        self.live.as_ref()
    }

    pub fn placement_error(&self) -> Option<&str> {
        self.placement_error.as_deref()
    }

    /// Admits a worker and re-plans. Returns its id.
    pub fn register(
        &mut self,
        address: &str,
        memory_bytes: u64,
        device: &str,
        model: &str,
        now_ms: u64,
    ) -> Result<WorkerId, MembershipError> {
        if model != self.model.identity {
            return Err(MembershipError::WrongModel {
                got: model.into(),
                want: self.model.identity.clone(),
            });
        }
        if address.is_empty() {
            return Err(MembershipError::Invalid {
                field: "address",
                reason: "must not be empty".into(),
            });
        }
        // A worker re-registering from the same address replaces its old entry.
        let stale: Vec<WorkerId> = self
            .members
            .values()
            .filter(|m| m.address == address)
            .map(|m| m.id)
            .collect();
        for id in stale {
            self.members.remove(&id);
        }
        let id = WorkerId(self.next_id);
        self.next_id += 1;
        self.members.insert(
            id,
            Member {
                id,
                address: address.into(),
                device: device.into(),
                memory_bytes,
                last_seen_ms: now_ms,
                loaded_version: 0,
            },
        );
        self.replan();
        Ok(id)
    }

    /// Records a heartbeat; false if the worker is unknown (it must register again).
    pub fn heartbeat(&mut self, id: WorkerId, loaded_version: u64, now_ms: u64) -> bool {
        let Some(m) = self.members.get_mut(&id) else {
            return false;
        };
        m.last_seen_ms = now_ms;
        m.loaded_version = m.loaded_version.max(loaded_version);
        self.maybe_promote();
        true
    }

    /// Drops workers silent for longer than the lease; re-plans if any went. Returns them.
    pub fn expire(&mut self, now_ms: u64) -> Vec<WorkerId> {
        let gone: Vec<WorkerId> = self
            .members
            .values()
            .filter(|m| now_ms.saturating_sub(m.last_seen_ms) > self.lease_ms)
            .map(|m| m.id)
            .collect();
        for id in &gone {
            self.members.remove(id);
        }
        if !gone.is_empty() {
            self.replan();
        }
        gone
    }

    fn replan(&mut self) {
        let problem = Problem {
            layers: self.model.layers.clone(),
            experts_per_layer: self.model.experts_per_layer,
            expert_bytes: self.model.expert_bytes,
            workers: self
                .members
                .values()
                .map(|m| WorkerSpec {
                    id: m.id,
                    memory_bytes: m.memory_bytes,
                })
                .collect(),
            replicas: self.replicas,
            load: BTreeMap::new(),
            previous: self.target.as_ref().map(|t| t.plan.clone()),
        };
        match placement::plan(&problem) {
            Ok(plan) => {
                self.version += 1;
                self.placement_error = None;
                self.target = Some(Versioned {
                    version: self.version,
                    addresses: self
                        .members
                        .values()
                        .map(|m| (m.id, m.address.clone()))
                        .collect(),
                    plan,
                });
                self.maybe_promote();
            }
            Err(e) => {
                // Keep serving on the last live placement; say why there is no new one.
                self.target = None;
                self.placement_error = Some(e.to_string());
            }
        }
    }

    /// The target goes live once every worker it assigns experts to has loaded it.
    fn maybe_promote(&mut self) {
        let Some(target) = &self.target else { return };
        if self
            .live
            .as_ref()
            .is_some_and(|l| l.version >= target.version)
        {
            return;
        }
        let ready = target.plan.by_worker().keys().all(|w| {
            self.members
                .get(w)
                .is_some_and(|m| m.loaded_version >= target.version)
        });
        if ready {
            self.live = Some(target.clone());
        }
    }

    /// The experts `worker` should hold in the target placement.
    pub fn assignment(&self, worker: WorkerId) -> Vec<Slot> {
        self.target
            .as_ref()
            .and_then(|t| t.plan.by_worker().remove(&worker))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> ModelShape {
        ModelShape {
            identity: "m".into(),
            layers: vec![1, 2],
            experts_per_layer: 8,
            expert_bytes: 10,
        }
    }

    #[test]
    fn target_goes_live_only_when_every_assigned_worker_loaded_it() {
        let mut c = ClusterState::new(shape(), 1, 1000);
        let a = c.register("a:1", 1000, "cpu", "m", 0).unwrap();
        assert_eq!(c.target().unwrap().version, 1);
        assert!(c.live().is_none());
        let b = c.register("b:1", 1000, "cpu", "m", 0).unwrap();
        // The joining worker takes its fair share; both must load version 2.
        assert_eq!(c.target().unwrap().version, 2);
        assert_eq!((c.assignment(a).len(), c.assignment(b).len()), (8, 8));
        assert!(c.heartbeat(b, 2, 10));
        assert!(c.live().is_none());
        assert!(c.heartbeat(a, 2, 10));
        assert_eq!(c.live().unwrap().version, 2);
    }

    #[test]
    fn silent_worker_is_dropped_and_its_experts_move() {
        let mut c = ClusterState::new(shape(), 1, 100);
        let a = c.register("a:1", 100, "cpu", "m", 0).unwrap();
        // 16 experts do not fit one worker's 10 slots: no placement yet, and why.
        assert!(c.target().is_none());
        assert!(c.placement_error().unwrap().contains("does not fit"));
        let b = c.register("b:1", 100, "cpu", "m", 0).unwrap();
        assert_eq!((c.assignment(a).len(), c.assignment(b).len()), (8, 8));
        let v = c.target().unwrap().version;
        c.heartbeat(a, v, 50);
        c.heartbeat(b, v, 50);
        assert_eq!(c.live().unwrap().version, v);
        // b stops heartbeating.
        c.heartbeat(a, v, 120);
        assert_eq!(c.expire(160), vec![b]);
        assert!(
            !c.heartbeat(b, v, 170),
            "an expired worker must register again"
        );
        // a alone cannot hold everything: no target, and live stays where it was.
        assert!(c.target().is_none());
        assert_eq!(c.live().unwrap().version, v);
        // A new worker joins: what b held lands on it; live moves once both loaded it.
        let d = c.register("d:1", 100, "cpu", "m", 200).unwrap();
        let v2 = c.target().unwrap().version;
        assert!(v2 > v);
        assert_eq!(c.assignment(a).len(), 8, "a keeps what it had");
        assert_eq!(c.assignment(d).len(), 8);
        c.heartbeat(a, v2, 210);
        assert_eq!(
            c.live().unwrap().version,
            v,
            "not live until d has loaded it"
        );
        c.heartbeat(d, v2, 210);
        assert_eq!(c.live().unwrap().version, v2);
        assert!(
            c.live()
                .unwrap()
                .addresses
                .values()
                .all(|addr| addr != "b:1")
        );
    }

    #[test]
    fn workers_of_another_model_are_refused() {
        let mut c = ClusterState::new(shape(), 1, 100);
        let err = c
            .register("a:1", 100, "cpu", "other", 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("other") && err.contains("\"m\""), "{err}");
    }

    #[test]
    fn re_registering_from_the_same_address_replaces_the_old_entry() {
        let mut c = ClusterState::new(shape(), 1, 100);
        let a = c.register("a:1", 1000, "cpu", "m", 0).unwrap();
        let a2 = c.register("a:1", 1000, "cpu", "m", 5).unwrap();
        assert_ne!(a, a2);
        assert_eq!(c.members().count(), 1);
        assert_eq!(c.assignment(a2).len(), 16);
    }
}
