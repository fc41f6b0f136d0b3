//! Cluster membership and the placement it implies: the coordinator's state, as a plain state
//! machine driven with explicit times so it tests without clocks or sockets.
//!
//! Workers register and heartbeat; a worker silent for a lease is dropped. Every membership
//! change re-runs [`placement::plan`] (staying close to the previous plan) into a new *target*
//! version. Workers load what the target gives them and report the version in heartbeats; when
//! every worker holding experts in the target has loaded it, it becomes the *live* version that
//! routers use. Routers therefore never see a placement naming experts a worker has not loaded.
//!
//! The handover back: routers report the version they dispatch with, and
//! [`ClusterState::retain_from`] tells workers the oldest version still in use, so a worker
//! drops an expert it lost only once no router can still send it calls for it. A router whose
//! reports stop is waited for a bounded grace period past its lease, then forgotten.
//!
//! Leaving and failing: a worker that leaves (SIGTERM) is *draining* — placed on nothing, kept
//! a member while it serves the routers that have not moved yet; a worker that reports it
//! cannot load its assignment is placed on nothing too, so its experts go elsewhere.

use std::collections::BTreeMap;

use crate::load::{ObservedLoad, RouterCounts};
use crate::placement::{
    self, Plan, Problem, Rebalance, RebalanceOptions, Slot, WorkerId, WorkerSpec,
};

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
    /// Leaving the cluster: placed on nothing, still serving.
    pub draining: bool,
    /// Why it could not load its assignment; it is then placed on nothing.
    pub load_error: Option<String>,
    /// The name in the certificate it registered with (mutual TLS): only that certificate
    /// may heartbeat or leave for this id. None over insecure links.
    pub identity: Option<String>,
}

impl Member {
    /// Whether placement may give it experts.
    fn placeable(&self) -> bool {
        !self.draining && self.load_error.is_none()
    }
}

/// A router, as its reports describe it.
#[derive(Clone, Debug, PartialEq)]
pub struct RouterMember {
    pub id: String,
    /// The live version it dispatches with (0: none yet).
    pub live_version: u64,
    pub last_seen_ms: u64,
    /// The name in the certificate its first report came with (mutual TLS): only that
    /// certificate may report, or leave, for this router id.
    pub identity: Option<String>,
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
    /// Asked of a placement that is not there yet or is still changing; retry later.
    #[error("{0}")]
    NotReady(String),
    /// A caller acting for a worker (or an address) another worker's certificate registered.
    #[error("{what} belongs to worker `{holder}`, not to the caller, worker `{caller}`")]
    NotYours {
        what: String,
        holder: String,
        caller: String,
    },
}

/// What [`ClusterState::rebalance`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct RebalanceOutcome {
    pub rebalance: Rebalance,
    /// The new target version, when the plan changed and this was not a dry run.
    pub version: Option<u64>,
    /// Bytes of expert weights the moves load.
    pub bytes: u64,
}

/// Default half-life of observed load: recent minutes dominate, a burst fades within a few.
pub const DEFAULT_LOAD_HALF_LIFE_MS: u64 = 60_000;

#[derive(Debug)]
pub struct ClusterState {
    model: ModelShape,
    replicas: usize,
    /// Extra copies per layer for the hottest experts.
    redundant: usize,
    load: ObservedLoad,
    lease_ms: u64,
    /// How long past its lease a silent router still counts as using its version.
    router_grace_ms: u64,
    next_id: u32,
    members: BTreeMap<WorkerId, Member>,
    routers: BTreeMap<String, RouterMember>,
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
            redundant: 0,
            load: ObservedLoad::new(DEFAULT_LOAD_HALF_LIFE_MS),
            lease_ms,
            router_grace_ms: lease_ms.saturating_mul(3),
            next_id: 0,
            members: BTreeMap::new(),
            routers: BTreeMap::new(),
            version: 0,
            target: None,
            live: None,
            placement_error: None,
        }
    }

    /// Extra copies per layer, beyond `replicas` of each expert, for the experts with the most
    /// load per copy.
    pub fn with_redundant(mut self, redundant: usize) -> ClusterState {
        self.redundant = redundant;
        self
    }

    /// How fast observed load fades: half its weight after `half_life_ms` (0: never).
    pub fn with_load_half_life_ms(mut self, half_life_ms: u64) -> ClusterState {
        self.load = ObservedLoad::new(half_life_ms);
        self
    }

    /// How long past its lease a silent router is still waited for (default: three leases).
    pub fn with_router_grace_ms(mut self, grace_ms: u64) -> ClusterState {
        self.router_grace_ms = grace_ms;
        self
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

    pub fn routers(&self) -> impl Iterator<Item = &RouterMember> {
        self.routers.values()
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

    /// Admits a worker and re-plans. Returns its id: `previous` (the id it had before a lost
    /// lease or a coordinator restart) when no other member holds it, a fresh one otherwise.
    pub fn register(
        &mut self,
        address: &str,
        memory_bytes: u64,
        device: &str,
        model: &str,
        previous: Option<WorkerId>,
        now_ms: u64,
    ) -> Result<WorkerId, MembershipError> {
        self.register_as(None, address, memory_bytes, device, model, previous, now_ms)
    }

    /// [`ClusterState::register`] for a worker whose certificate names it `identity`: it may
    /// not take an address another identity holds, and only `identity` may heartbeat or leave
    /// for the id it gets. Workers may share a certificate (one Kubernetes Secret for a
    /// Deployment's pods): they are told apart by address, as without TLS.
    #[allow(clippy::too_many_arguments)]
    pub fn register_as(
        &mut self,
        identity: Option<&str>,
        address: &str,
        memory_bytes: u64,
        device: &str,
        model: &str,
        previous: Option<WorkerId>,
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
        if let Some(caller) = identity
            && let Some(other) = self
                .members
                .values()
                .find(|m| m.address == address && m.identity.as_deref() != Some(caller))
        {
            return Err(MembershipError::NotYours {
                what: format!("address {address}"),
                holder: other.identity.clone().unwrap_or_default(),
                caller: caller.into(),
            });
        }
        // A worker re-registering from the same address replaces its old entry (of the same
        // identity: another one's address was refused above).
        let stale: Vec<WorkerId> = self
            .members
            .values()
            .filter(|m| m.address == address)
            .map(|m| m.id)
            .collect();
        for id in stale {
            self.members.remove(&id);
        }
        let id = match previous {
            Some(p) if !self.members.contains_key(&p) => p,
            _ => {
                // Past every id given out, including ones workers bring from before a restart.
                while self.members.contains_key(&WorkerId(self.next_id)) {
                    self.next_id += 1;
                }
                WorkerId(self.next_id)
            }
        };
        self.next_id = self.next_id.max(id.0.saturating_add(1));
        self.members.insert(
            id,
            Member {
                id,
                address: address.into(),
                device: device.into(),
                memory_bytes,
                last_seen_ms: now_ms,
                loaded_version: 0,
                draining: false,
                load_error: None,
                identity: identity.map(String::from),
            },
        );
        self.replan();
        Ok(id)
    }

    /// Fails if `id` is a member registered by another certificate than `identity`'s. Unknown
    /// ids and insecure links (no identity) pass: the call then answers as it would.
    pub fn check_caller(
        &self,
        id: WorkerId,
        identity: Option<&str>,
    ) -> Result<(), MembershipError> {
        let (Some(caller), Some(m)) = (identity, self.members.get(&id)) else {
            return Ok(());
        };
        if m.identity.as_deref() == Some(caller) {
            Ok(())
        } else {
            Err(MembershipError::NotYours {
                what: id.to_string(),
                holder: m.identity.clone().unwrap_or_default(),
                caller: caller.into(),
            })
        }
    }

    /// Records a heartbeat; false if the worker is unknown (it must register again).
    /// `failed` is a target version the worker could not load and why: from then on it is
    /// placed on nothing and its experts go elsewhere (it stays a member and serves what it
    /// holds).
    pub fn heartbeat(
        &mut self,
        id: WorkerId,
        loaded_version: u64,
        failed: Option<(u64, &str)>,
        now_ms: u64,
    ) -> bool {
        let current_target = self.target.as_ref().map(|t| t.version);
        let Some(m) = self.members.get_mut(&id) else {
            return false;
        };
        m.last_seen_ms = now_ms;
        m.loaded_version = m.loaded_version.max(loaded_version);
        let mut replan = false;
        if let Some((version, why)) = failed
            && m.load_error.is_none()
            && Some(version) == current_target
        {
            m.load_error = Some(format!("cannot load placement version {version}: {why}"));
            replan = true;
        }
        if replan {
            self.replan();
        } else {
            self.maybe_promote();
        }
        true
    }

    /// A worker leaves: with `done` false it starts draining (its experts are placed on the
    /// others; it stays a member until it says it is done or its lease runs out); with `done`
    /// it is forgotten now. False if the worker is unknown.
    pub fn leave(&mut self, id: WorkerId, done: bool, now_ms: u64) -> bool {
        let Some(m) = self.members.get_mut(&id) else {
            return false;
        };
        m.last_seen_ms = now_ms;
        if done {
            self.members.remove(&id);
            self.replan();
        } else if !m.draining {
            m.draining = true;
            self.replan();
        }
        true
    }

    /// A router that shut down: no version is kept for it any more.
    pub fn router_left(&mut self, id: &str) {
        self.routers.remove(id);
        self.load.forget(id);
    }

    /// Records a router's report of the version it dispatches with and, when it sent them,
    /// its expert-load counts since it started.
    pub fn report_router(
        &mut self,
        id: &str,
        live_version: u64,
        counts: Option<RouterCounts>,
        now_ms: u64,
    ) {
        self.report_router_as(None, id, live_version, counts, now_ms);
    }

    /// [`ClusterState::report_router`] from a router whose certificate names it `identity`
    /// (checked first with [`ClusterState::check_router`]).
    pub fn report_router_as(
        &mut self,
        identity: Option<&str>,
        id: &str,
        live_version: u64,
        counts: Option<RouterCounts>,
        now_ms: u64,
    ) {
        if let Some(counts) = counts {
            self.load.add(id, counts, now_ms);
        }
        self.routers.insert(
            id.to_string(),
            RouterMember {
                id: id.to_string(),
                live_version,
                last_seen_ms: now_ms,
                identity: identity.map(String::from),
            },
        );
    }

    /// Fails if router `id` first reported with another certificate than `identity`'s: one
    /// router may not report load, or leave, for another (leaving would let workers drop
    /// versions that router still dispatches with).
    pub fn check_router(&self, id: &str, identity: Option<&str>) -> Result<(), MembershipError> {
        let (Some(caller), Some(r)) = (identity, self.routers.get(id)) else {
            return Ok(());
        };
        match r.identity.as_deref() {
            Some(holder) if holder != caller => Err(MembershipError::NotYours {
                what: format!("router id {id:?}"),
                holder: holder.to_string(),
                caller: caller.into(),
            }),
            _ => Ok(()),
        }
    }

    /// The oldest placement version a router may still dispatch with: workers keep the
    /// experts of every version from this one on. Routers silent past their lease and the
    /// grace period no longer count. For the first lease after start-up — when routers that
    /// followed an earlier coordinator have not reported yet — it is 0: keep everything.
    pub fn retain_from(&self, now_ms: u64) -> u64 {
        if now_ms < self.lease_ms {
            return 0;
        }
        let live = self.live.as_ref().map_or(0, |l| l.version);
        let horizon = self.lease_ms.saturating_add(self.router_grace_ms);
        self.routers
            .values()
            .filter(|r| r.live_version > 0 && now_ms.saturating_sub(r.last_seen_ms) <= horizon)
            .map(|r| r.live_version)
            .chain(std::iter::once(live))
            .min()
            .unwrap_or(live)
    }

    /// Drops workers silent for longer than the lease, and routers silent past lease and grace;
    /// re-plans if a worker went. Returns the workers dropped.
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
        let horizon = self.lease_ms.saturating_add(self.router_grace_ms);
        self.routers
            .retain(|_, r| now_ms.saturating_sub(r.last_seen_ms) <= horizon);
        if !gone.is_empty() {
            self.replan();
        }
        gone
    }

    /// The placement problem as the cluster stands: placeable workers, observed load, the
    /// target plan to stay close to.
    fn problem(&self) -> Problem {
        Problem {
            layers: self.model.layers.clone(),
            experts_per_layer: self.model.experts_per_layer,
            expert_bytes: self.model.expert_bytes,
            workers: self
                .members
                .values()
                .filter(|m| m.placeable())
                .map(|m| WorkerSpec {
                    id: m.id,
                    memory_bytes: m.memory_bytes,
                })
                .collect(),
            replicas: self.replicas,
            redundant: self.redundant,
            load: self.load.experts().clone(),
            previous: self.target.as_ref().map(|t| t.plan.clone()),
        }
    }

    /// The observed load (decayed tokens per expert).
    pub fn load(&self) -> &ObservedLoad {
        &self.load
    }

    /// Per layer, the live plan's predicted imbalance under the observed load.
    pub fn predicted_imbalance(&self) -> BTreeMap<u32, f64> {
        match &self.live {
            Some(live) => placement::imbalance(&live.plan, &self.problem()),
            None => BTreeMap::new(),
        }
    }

    /// Per layer, the imbalance routers measured over the live plan's workers.
    pub fn observed_imbalance(&self) -> BTreeMap<u32, f64> {
        let workers: Vec<WorkerId> = self
            .live
            .as_ref()
            .map(|l| l.plan.by_worker().into_keys().collect())
            .unwrap_or_default();
        self.load.observed_imbalance(&self.model.layers, &workers)
    }

    /// Re-places experts for the observed load (see [`placement::rebalance`]); unless
    /// `dry_run`, a changed plan becomes the new target, which goes live once its workers have
    /// loaded what they gain. Refused while a target is still loading.
    pub fn rebalance(
        &mut self,
        opts: &RebalanceOptions,
        dry_run: bool,
    ) -> Result<RebalanceOutcome, MembershipError> {
        let (Some(target), Some(live)) = (&self.target, &self.live) else {
            return Err(MembershipError::NotReady(
                self.placement_error
                    .clone()
                    .unwrap_or_else(|| "no live placement to rebalance yet".into()),
            ));
        };
        if target.version != live.version {
            return Err(MembershipError::NotReady(format!(
                "placement version {} is still loading (live: {}); rebalance after it goes live",
                target.version, live.version
            )));
        }
        let rebalance = placement::rebalance(&self.problem(), opts)
            .map_err(|e| MembershipError::NotReady(format!("cannot rebalance: {e}")))?;
        let bytes = rebalance.moves as u64 * self.model.expert_bytes;
        let mut version = None;
        if rebalance.applied && !dry_run {
            self.set_target(rebalance.plan.clone());
            version = self.target.as_ref().map(|t| t.version);
            self.maybe_promote();
        }
        Ok(RebalanceOutcome {
            rebalance,
            version,
            bytes,
        })
    }

    /// Makes `plan` the target, as a new version if it differs from the current one.
    fn set_target(&mut self, plan: Plan) {
        // Only the workers the plan uses: routers connect to exactly these.
        let used = plan.by_worker();
        let addresses: BTreeMap<WorkerId, String> = self
            .members
            .values()
            .filter(|m| used.contains_key(&m.id))
            .map(|m| (m.id, m.address.clone()))
            .collect();
        let unchanged = self
            .target
            .as_ref()
            .is_some_and(|t| t.plan == plan && t.addresses == addresses);
        if !unchanged {
            self.version += 1;
            self.target = Some(Versioned {
                version: self.version,
                addresses,
                plan,
            });
        }
    }

    fn replan(&mut self) {
        let problem = self.problem();
        match placement::plan(&problem) {
            Ok(plan) => {
                self.placement_error = None;
                self.set_target(plan);
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
    fn workers_sharing_a_certificate_are_told_apart_by_address() {
        let mut c = ClusterState::new(shape(), 1, 1000);
        let reg = |c: &mut ClusterState, who: &str, addr: &str| {
            c.register_as(Some(who), addr, 1000, "cpu", "m", None, 0)
        };
        let a = reg(&mut c, "worker-0", "a:1").unwrap();
        let b = reg(&mut c, "worker-0", "b:1").unwrap();
        assert_ne!(a, b);
        assert_eq!(
            c.members().count(),
            2,
            "one shared certificate, two workers"
        );
        assert!(c.check_caller(a, Some("worker-0")).is_ok());
        assert!(c.check_caller(b, Some("worker-0")).is_ok());
        let err = c.check_caller(a, Some("rogue")).unwrap_err();
        assert!(matches!(err, MembershipError::NotYours { .. }), "{err}");
        assert!(err.to_string().contains("worker-0") && err.to_string().contains("rogue"));
        // Another certificate may not take an address to receive its calls.
        assert!(matches!(
            reg(&mut c, "rogue", "a:1"),
            Err(MembershipError::NotYours { .. })
        ));
        // The same worker re-registering from its address replaces its old entry.
        let a2 = reg(&mut c, "worker-0", "a:1").unwrap();
        assert_eq!(c.members().count(), 2);
        assert!(c.members().any(|m| m.id == a2 && m.address == "a:1"));
        // Unknown ids and insecure links (no identity) pass: the call answers as it would.
        assert!(c.check_caller(WorkerId(99), Some("rogue")).is_ok());
        assert!(c.check_caller(b, None).is_ok());
    }

    #[test]
    fn a_router_id_answers_only_to_the_certificate_it_first_reported_with() {
        let mut c = ClusterState::new(shape(), 1, 1000);
        assert!(c.check_router("r1", Some("router-0")).is_ok());
        c.report_router_as(Some("router-0"), "r1", 0, None, 0);
        assert!(c.check_router("r1", Some("router-0")).is_ok());
        let err = c.check_router("r1", Some("router-1")).unwrap_err();
        assert!(err.to_string().contains("r1"), "{err}");
        assert!(c.check_router("r2", Some("router-1")).is_ok());
    }

    #[test]
    fn target_goes_live_only_when_every_assigned_worker_loaded_it() {
        let mut c = ClusterState::new(shape(), 1, 1000);
        let a = c.register("a:1", 1000, "cpu", "m", None, 0).unwrap();
        assert_eq!(c.target().unwrap().version, 1);
        assert!(c.live().is_none());
        let b = c.register("b:1", 1000, "cpu", "m", None, 0).unwrap();
        // The joining worker takes its fair share; both must load version 2.
        assert_eq!(c.target().unwrap().version, 2);
        assert_eq!((c.assignment(a).len(), c.assignment(b).len()), (8, 8));
        assert!(c.heartbeat(b, 2, None, 10));
        assert!(c.live().is_none());
        assert!(c.heartbeat(a, 2, None, 10));
        assert_eq!(c.live().unwrap().version, 2);
    }

    #[test]
    fn silent_worker_is_dropped_and_its_experts_move() {
        let mut c = ClusterState::new(shape(), 1, 100);
        let a = c.register("a:1", 100, "cpu", "m", None, 0).unwrap();
        // 16 experts do not fit one worker's 10 slots: no placement yet, and why.
        assert!(c.target().is_none());
        assert!(c.placement_error().unwrap().contains("does not fit"));
        let b = c.register("b:1", 100, "cpu", "m", None, 0).unwrap();
        assert_eq!((c.assignment(a).len(), c.assignment(b).len()), (8, 8));
        let v = c.target().unwrap().version;
        c.heartbeat(a, v, None, 50);
        c.heartbeat(b, v, None, 50);
        assert_eq!(c.live().unwrap().version, v);
        // b stops heartbeating.
        c.heartbeat(a, v, None, 120);
        assert_eq!(c.expire(160), vec![b]);
        assert!(
            !c.heartbeat(b, v, None, 170),
            "an expired worker must register again"
        );
        // a alone cannot hold everything: no target, and live stays where it was.
        assert!(c.target().is_none());
        assert_eq!(c.live().unwrap().version, v);
        // A new worker joins: what b held lands on it; live moves once both loaded it.
        let d = c.register("d:1", 100, "cpu", "m", None, 200).unwrap();
        let v2 = c.target().unwrap().version;
        assert!(v2 > v);
        assert_eq!(c.assignment(a).len(), 8, "a keeps what it had");
        assert_eq!(c.assignment(d).len(), 8);
        c.heartbeat(a, v2, None, 210);
        assert_eq!(
            c.live().unwrap().version,
            v,
            "not live until d has loaded it"
        );
        c.heartbeat(d, v2, None, 210);
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
            .register("a:1", 100, "cpu", "other", None, 0)
            .unwrap_err()
            .to_string();
        assert!(err.contains("other") && err.contains("\"m\""), "{err}");
    }

    #[test]
    fn re_registering_from_the_same_address_replaces_the_old_entry() {
        let mut c = ClusterState::new(shape(), 1, 100);
        let a = c.register("a:1", 1000, "cpu", "m", None, 0).unwrap();
        let a2 = c.register("a:1", 1000, "cpu", "m", None, 5).unwrap();
        assert_ne!(a, a2);
        assert_eq!(c.members().count(), 1);
        assert_eq!(c.assignment(a2).len(), 16);
    }

    /// Registers `n` workers and has all of them load the target, which goes live.
    fn live_cluster(c: &mut ClusterState, n: usize, now: u64) -> Vec<WorkerId> {
        let ids: Vec<WorkerId> = (0..n)
            .map(|i| {
                c.register(&format!("w{i}:1"), 1000, "cpu", "m", None, now)
                    .unwrap()
            })
            .collect();
        let v = c.target().unwrap().version;
        for &id in &ids {
            c.heartbeat(id, v, None, now);
        }
        assert_eq!(c.live().unwrap().version, v);
        ids
    }

    #[test]
    fn a_worker_keeps_its_id_across_a_coordinator_restart_unless_taken() {
        let mut c = ClusterState::new(shape(), 1, 100);
        let a = c
            .register("a:1", 1000, "cpu", "m", Some(WorkerId(7)), 0)
            .unwrap();
        assert_eq!(a, WorkerId(7));
        // Taken by a: b gets a fresh id, above every id seen.
        let b = c
            .register("b:1", 1000, "cpu", "m", Some(WorkerId(7)), 0)
            .unwrap();
        assert_eq!(b, WorkerId(8));
        let d = c.register("d:1", 1000, "cpu", "m", None, 0).unwrap();
        assert_eq!(d, WorkerId(9));
    }

    /// Router counts where expert `e` of every layer got `weight(e)` tokens.
    fn skewed(weight: impl Fn(u32) -> u64) -> RouterCounts {
        RouterCounts {
            experts: [1, 2]
                .iter()
                .flat_map(|&layer| (0..8).map(move |expert| Slot { layer, expert }))
                .map(|s| (s, weight(s.expert)))
                .collect(),
            workers: BTreeMap::new(),
        }
    }

    #[test]
    fn rebalance_goes_live_only_once_loaded_and_old_copies_stay_until_routers_move() {
        let mut c = ClusterState::new(shape(), 1, 100).with_load_half_life_ms(0);
        let ids = live_cluster(&mut c, 2, 0);
        let v1 = c.live().unwrap().version;
        let opts = RebalanceOptions {
            max_moves: 8,
            threshold: 0.01,
        };
        // Flat load: nothing to do.
        c.report_router("r", v1, Some(skewed(|_| 10)), 150);
        let flat = c.rebalance(&opts, false).unwrap();
        assert!(!flat.rebalance.applied && flat.version.is_none());
        // Worker 0 holds experts 0-3 of each layer: make them hot.
        c.report_router("r", v1, Some(skewed(|e| if e < 4 { 100 } else { 20 })), 200);
        let predicted = mean_of(&c.predicted_imbalance());
        assert!(predicted > 1.5, "{predicted}");
        let dry = c.rebalance(&opts, true).unwrap();
        assert!(dry.rebalance.applied && dry.version.is_none());
        assert_eq!(c.target().unwrap().version, v1, "a dry run changes nothing");
        let done = c.rebalance(&opts, false).unwrap();
        let v2 = done.version.unwrap();
        assert!(v2 > v1 && done.rebalance.moves > 0 && done.rebalance.moves <= 8);
        assert_eq!(done.bytes, done.rebalance.moves as u64 * 10);
        assert!(mean_of(&done.rebalance.after) < predicted);
        // A second rebalance waits for this one to go live.
        assert!(matches!(
            c.rebalance(&opts, false),
            Err(MembershipError::NotReady(_))
        ));
        // Routers keep v1 — every expert still held where v1 says — until all workers loaded.
        c.heartbeat(ids[0], v2, None, 210);
        assert_eq!(c.live().unwrap().version, v1);
        c.heartbeat(ids[1], v2, None, 220);
        assert_eq!(c.live().unwrap().version, v2);
        // Workers keep v1's experts while the router still dispatches with it.
        c.report_router("r", v1, None, 230);
        assert_eq!(c.retain_from(240), v1);
        c.report_router("r", v2, None, 250);
        assert_eq!(c.retain_from(260), v2);
        assert!(mean_of(&c.predicted_imbalance()) < predicted);
    }

    fn mean_of(m: &BTreeMap<u32, f64>) -> f64 {
        placement::mean_imbalance(m)
    }

    #[test]
    fn membership_changes_place_by_the_observed_load() {
        // Room for 10 copies per worker, 16 experts, one redundant copy per layer: the hot
        // expert of each layer gets it when the second worker joins.
        let mut c = ClusterState::new(shape(), 1, 100)
            .with_redundant(1)
            .with_load_half_life_ms(0);
        let a = c.register("a:1", 200, "cpu", "m", None, 0).unwrap();
        c.report_router("r", 0, Some(skewed(|e| if e == 6 { 500 } else { 10 })), 10);
        let _b = c.register("b:1", 200, "cpu", "m", None, 20).unwrap();
        let t = c.target().unwrap();
        for layer in [1, 2] {
            assert_eq!(t.plan.holders[&Slot { layer, expert: 6 }].len(), 2);
            let copies: usize = (0..8)
                .map(|expert| t.plan.holders[&Slot { layer, expert }].len())
                .sum();
            assert_eq!(copies, 9);
        }
        assert!(c.assignment(a).len() <= 20);
    }

    #[test]
    fn retain_from_waits_for_the_slowest_router_then_for_its_grace_only() {
        let mut c = ClusterState::new(shape(), 1, 100).with_router_grace_ms(200);
        live_cluster(&mut c, 1, 0);
        assert_eq!(
            c.retain_from(50),
            0,
            "within the first lease everything is kept"
        );
        let v1 = c.live().unwrap().version;
        c.report_router("r1", v1, None, 100);
        c.report_router("r2", v1, None, 100);
        let w2 = c.register("w9:1", 1000, "cpu", "m", None, 110).unwrap();
        let v2 = c.target().unwrap().version;
        for m in c.members().map(|m| m.id).collect::<Vec<_>>() {
            c.heartbeat(m, v2, None, 120);
        }
        assert_eq!(c.live().unwrap().version, v2);
        assert!(!c.assignment(w2).is_empty());
        assert_eq!(c.retain_from(150), v1, "both routers still on v1");
        c.report_router("r1", v2, None, 160);
        assert_eq!(c.retain_from(170), v1, "r2 still on v1");
        // r2 goes silent: counted through its lease (100) and the grace (200), then not.
        c.report_router("r3", v1, None, 380);
        c.router_left("r3");
        c.report_router("r1", v2, None, 380);
        assert_eq!(c.retain_from(400), v1);
        assert_eq!(c.retain_from(401), v2);
        c.expire(401);
        assert_eq!(
            c.routers().map(|r| r.id.as_str()).collect::<Vec<_>>(),
            ["r1"]
        );
    }

    #[test]
    fn a_draining_worker_is_placed_on_nothing_and_goes_when_done() {
        let mut c = ClusterState::new(shape(), 1, 1000);
        let ids = live_cluster(&mut c, 2, 0);
        let v = c.live().unwrap().version;
        assert!(c.leave(ids[1], false, 10));
        let t = c.target().unwrap();
        assert!(t.version > v);
        assert_eq!(
            c.assignment(ids[0]).len(),
            16,
            "the other worker takes everything"
        );
        assert!(c.assignment(ids[1]).is_empty());
        assert!(
            !t.addresses.contains_key(&ids[1]),
            "routers need not connect to it"
        );
        assert!(
            c.members().any(|m| m.id == ids[1] && m.draining),
            "still a member"
        );
        // Live only once the remaining worker loaded the new target.
        assert_eq!(c.live().unwrap().version, v);
        let t = t.version;
        c.heartbeat(ids[0], t, None, 20);
        assert_eq!(c.live().unwrap().version, t);
        // Done: forgotten, and no new version for a plan that did not change.
        assert!(c.leave(ids[1], true, 30));
        assert_eq!(c.members().count(), 1);
        assert_eq!(c.target().unwrap().version, t);
        assert!(!c.leave(ids[1], true, 40), "unknown now");
    }

    #[test]
    fn a_worker_that_cannot_load_is_placed_on_nothing() {
        let mut c = ClusterState::new(shape(), 1, 1000);
        let a = c.register("a:1", 1000, "cpu", "m", None, 0).unwrap();
        let b = c.register("b:1", 1000, "cpu", "m", None, 0).unwrap();
        let t = c.target().unwrap().version;
        c.heartbeat(a, t, None, 5);
        // A failure for an old version changes nothing.
        c.heartbeat(b, 0, Some((t - 1, "stale")), 6);
        assert_eq!(c.target().unwrap().version, t);
        c.heartbeat(b, 0, Some((t, "out of memory")), 7);
        let t2 = c.target().unwrap().version;
        assert!(t2 > t);
        assert_eq!(c.assignment(a).len(), 16);
        assert!(c.assignment(b).is_empty());
        let err = c.members().find(|m| m.id == b).unwrap().load_error.clone();
        assert!(err.unwrap().contains("out of memory"));
        c.heartbeat(a, t2, None, 8);
        assert_eq!(c.live().unwrap().version, t2, "live without waiting for b");
    }
}
