//! A worker under a coordinator: register, heartbeat, and hold whatever the placement assigns
//! this worker — loading gained experts before reporting a version loaded, and dropping lost
//! ones only once no router can still call it for them.
//!
//! Two long-lived tasks keep the worker a member: [`Agent::run`] (re-)registers whenever the
//! coordinator does not know it and heartbeats the version it has loaded (or the one it could
//! not load, and why); [`Agent::follow`] watches the placement, reconnecting with capped
//! exponential backoff when the stream breaks. [`Agent::drain`] is the way out: it tells the
//! coordinator the worker is leaving and waits until no router uses a version that names it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use switchyard_proto::WorkerId;
use switchyard_proto::backoff::Backoff;
use switchyard_proto::client;
use switchyard_proto::tls::ClusterLinks;
use switchyard_proto::v1::{
    HeartbeatRequest, LeaveRequest, PlacementMap, PlacementUpdate, RegisterRequest,
};
use tokio::sync::watch;

use crate::worker::ExpertWorker;

/// Layer → experts.
pub type Assignment = BTreeMap<usize, BTreeSet<u32>>;

/// How this worker presents itself to the coordinator.
#[derive(Clone, Debug)]
pub struct Membership {
    pub coordinator: String,
    /// The address routers should use for this worker.
    pub advertise: String,
    pub memory_bytes: u64,
    pub device: String,
    pub model: String,
    /// How links to the coordinator run: mutual TLS with this worker's certificate (whose
    /// name the coordinator binds to the id it assigns), or plaintext.
    pub links: ClusterLinks,
}

/// Versions of this worker's own assignment kept at most; older ones are dropped (with a
/// warning) even if a router might still use them — a bound on memory, never reached while
/// routers keep up.
const MAX_HISTORY: usize = 64;

/// The experts `map` gives `worker`, by layer.
pub fn assignment(map: &PlacementMap, worker: WorkerId) -> Assignment {
    let mut out = Assignment::new();
    for layer in &map.layers {
        for (e, holders) in layer.experts.iter().enumerate() {
            if holders.worker_ids.contains(&worker.0) {
                out.entry(layer.layer as usize)
                    .or_default()
                    .insert(e as u32);
            }
        }
    }
    out
}

/// What the agent knows, shared by its tasks, the health check and the drain.
#[derive(Debug, Default, Clone, PartialEq)]
struct State {
    /// This worker's id while registered.
    id: Option<WorkerId>,
    /// The id it had last, offered back to the coordinator on re-registration.
    last_id: Option<WorkerId>,
    /// The newest target version whose experts are loaded.
    loaded: u64,
    /// A target version that could not be loaded, and why.
    failed: Option<(u64, String)>,
    /// The newest target version seen.
    target: u64,
    /// This worker's assignment in each placement version seen and possibly still in use.
    history: BTreeMap<u64, Assignment>,
    retain_from: u64,
    draining: bool,
    /// While draining: the first live version that gives this worker nothing.
    free_from: Option<u64>,
    /// The newest update, re-applied after a re-registration.
    last_update: Option<PlacementUpdate>,
    /// The drain is complete: no router uses a version that names this worker.
    drained: bool,
}

/// A worker's membership in a coordinated cluster.
#[derive(Debug)]
pub struct Agent {
    worker: Arc<ExpertWorker>,
    membership: Membership,
    state: Mutex<State>,
    /// Bumped on every state change the drain waits for.
    progress: watch::Sender<u64>,
    /// One update applied at a time, always the newest.
    applying: tokio::sync::Mutex<()>,
}

impl Agent {
    pub fn new(worker: Arc<ExpertWorker>, membership: Membership) -> Arc<Agent> {
        Arc::new(Agent {
            worker,
            membership,
            state: Mutex::new(State::default()),
            progress: watch::channel(0).0,
            applying: tokio::sync::Mutex::new(()),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.progress.send_modify(|p| *p += 1);
    }

    /// This worker's id, while registered.
    pub fn worker_id(&self) -> Option<WorkerId> {
        self.state().id
    }

    /// Whether the worker holds what its placement assigns it, and why not.
    pub fn ready(&self) -> Result<(), String> {
        let s = self.state();
        if s.draining {
            return Err("draining: leaving the cluster".into());
        }
        let Some(id) = s.id else {
            return Err(format!(
                "not registered with the coordinator at {}",
                self.membership.coordinator
            ));
        };
        if let Some((version, why)) = &s.failed
            && *version >= s.target
        {
            return Err(format!(
                "{id} cannot load placement version {version}: {why}"
            ));
        }
        if s.target == 0 {
            return Err(format!("{id} has no placement yet"));
        }
        if s.loaded < s.target {
            return Err(format!("{id} is loading placement version {}", s.target));
        }
        Ok(())
    }

    /// Keeps this worker registered and heartbeating until the task is dropped: registers
    /// whenever the coordinator does not know it (first start, lease lost, coordinator
    /// restarted), reconnecting with backoff.
    pub async fn run(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        loop {
            let mut client = match client::coordinator(
                &self.membership.coordinator,
                &self.membership.links,
            )
            .await
            {
                Ok(c) => c,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(coordinator = %self.membership.coordinator, error = %e, retry_in = ?wait, "coordinator unreachable");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            let previous = self.state().last_id;
            let registered = client
                .register(RegisterRequest {
                    address: self.membership.advertise.clone(),
                    memory_bytes: self.membership.memory_bytes,
                    device: self.membership.device.clone(),
                    model: self.membership.model.clone(),
                    previous_worker_id: previous.map(|w| w.0),
                })
                .await;
            let reply = match registered {
                Ok(r) => r.into_inner(),
                Err(status) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(%status, retry_in = ?wait, "registration refused");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            backoff.reset();
            let id = WorkerId(reply.worker_id);
            {
                let mut s = self.state();
                s.id = Some(id);
                s.last_id = Some(id);
                // The coordinator knows nothing of an old failure of this new member.
                s.failed = None;
            }
            self.bump();
            // Updates that came while unregistered were not applied: apply the newest now,
            // under this id (a plan that did not change publishes no new update).
            tokio::spawn(self.clone().apply_latest());
            tracing::info!(worker = %id, "registered with the coordinator");
            let draining = self.state().draining;
            if draining {
                // Re-registered mid-drain (the coordinator restarted): leave again.
                let _ = client
                    .leave(LeaveRequest {
                        worker_id: id.0,
                        done: false,
                    })
                    .await;
            }
            let period = Duration::from_millis((reply.lease_ms / 3).max(10));
            loop {
                tokio::time::sleep(period).await;
                let (loaded, failed) = {
                    let s = self.state();
                    (s.loaded, s.failed.clone())
                };
                let beat = client
                    .heartbeat(HeartbeatRequest {
                        worker_id: id.0,
                        loaded_version: loaded,
                        failed_version: failed.as_ref().map_or(0, |f| f.0),
                        load_error: failed.map(|f| f.1).unwrap_or_default(),
                    })
                    .await;
                match beat {
                    Ok(r) if r.get_ref().known => {}
                    Ok(_) => {
                        tracing::warn!(worker = %id, "the coordinator no longer knows this worker; registering again");
                        break;
                    }
                    Err(status) => {
                        tracing::warn!(worker = %id, %status, "heartbeat failed; reconnecting");
                        break;
                    }
                }
            }
            self.state().id = None;
            self.bump();
        }
    }

    /// Follows the placement until the task is dropped: applies every update, and reconnects
    /// with capped exponential backoff (logging each attempt) whenever the watch breaks.
    pub async fn follow(self: Arc<Self>) {
        let mut backoff = Backoff::new(Duration::from_secs(5));
        loop {
            let mut stream = match client::watch_placement(
                &self.membership.coordinator,
                &self.membership.links,
            )
            .await
            {
                Ok(s) => s,
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(coordinator = %self.membership.coordinator, error = %e, retry_in = ?wait, "cannot watch the placement");
                    tokio::time::sleep(wait).await;
                    continue;
                }
            };
            backoff.reset();
            tracing::info!(coordinator = %self.membership.coordinator, "watching the placement");
            loop {
                match stream.message().await {
                    Ok(Some(update)) => {
                        self.state().last_update = Some(update);
                        self.clone().apply_latest().await;
                    }
                    Ok(None) => {
                        tracing::warn!("the placement watch ended; reconnecting");
                        break;
                    }
                    Err(status) => {
                        tracing::warn!(%status, "the placement watch broke; reconnecting");
                        break;
                    }
                }
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
    }

    /// Applies the newest placement update: holds its target and live assignments and every
    /// older one a router may still use, loading what is missing before reporting the target
    /// loaded.
    async fn apply_latest(self: Arc<Self>) {
        let _one_at_a_time = self.applying.lock().await;
        let Some(update) = self.state().last_update.clone() else {
            return;
        };
        let Some(keep) = self.plan(&update) else {
            return;
        };
        let target = update.target.as_ref().map_or(0, |t| t.version);
        let worker = self.worker.clone();
        let applied = if worker.holding() == keep {
            Ok(())
        } else {
            tokio::task::spawn_blocking(move || worker.apply(&keep).map_err(|e| e.to_string()))
                .await
                .unwrap_or_else(|e| Err(format!("the loading task failed: {e}")))
        };
        {
            let mut s = self.state();
            if s.id.is_none() {
                // Re-registered meanwhile: the next update is applied afresh.
                return;
            }
            match applied {
                Ok(()) if target > 0 => {
                    if target > s.loaded {
                        tracing::info!(version = target, "placement loaded");
                    }
                    s.loaded = s.loaded.max(target);
                }
                Ok(()) => {}
                Err(e) => {
                    tracing::error!(version = target, error = %e, "cannot load the assigned experts");
                    s.failed = Some((target, e));
                }
            }
        }
        self.bump();
    }

    /// Records an update and returns what to hold now (`None` while unregistered).
    fn plan(&self, update: &PlacementUpdate) -> Option<Assignment> {
        let mut s = self.state();
        let id = s.id?;
        if let Some(t) = &update.target {
            s.target = s.target.max(t.version);
            s.history.insert(t.version, assignment(t, id));
        }
        if let Some(l) = &update.live {
            let mine = assignment(l, id);
            if s.draining && mine.is_empty() && s.free_from.is_none() {
                s.free_from = Some(l.version);
            }
            s.history.insert(l.version, mine);
        }
        s.retain_from = update.retain_from;
        let current = [&update.target, &update.live]
            .iter()
            .filter_map(|m| m.as_ref().map(|m| m.version))
            .min()
            .unwrap_or(u64::MAX);
        // Versions no router uses any more go; the current target and live always stay.
        let floor = update.retain_from.min(current);
        s.history.retain(|&v, _| v >= floor);
        while s.history.len() > MAX_HISTORY {
            if let Some((v, _)) = s.history.pop_first() {
                tracing::warn!(
                    version = v,
                    "dropping an old placement still possibly in use: too many versions kept"
                );
            }
        }
        if let Some(free) = s.free_from
            && update.retain_from >= free
            && !s.drained
        {
            tracing::info!(
                version = free,
                "drained: no router uses a placement that names this worker"
            );
            s.drained = true;
        }
        let mut keep = Assignment::new();
        for a in s.history.values() {
            for (layer, experts) in a {
                keep.entry(*layer).or_default().extend(experts);
            }
        }
        Some(keep)
    }

    /// Leaves the cluster without failing a call: tells the coordinator (which places this
    /// worker's experts elsewhere), keeps serving until no router uses a placement that names
    /// this worker, then says it is done. Returns whether the drain completed within `limit`;
    /// past it, or with the coordinator unreachable, the worker may stop anyway. A zero
    /// `limit` leaves at once without draining.
    pub async fn drain(self: &Arc<Self>, limit: Duration) -> bool {
        self.state().draining = true;
        if limit.is_zero() {
            // No drain asked for: leave at once, so the coordinator need not wait a lease.
            let id = self.state().id;
            if let Some(id) = id {
                let _ = tokio::time::timeout(Duration::from_secs(1), self.leave(id, true)).await;
            }
            return false;
        }
        let deadline = tokio::time::Instant::now() + limit;
        let mut progress = self.progress.subscribe();
        let mut told = None;
        loop {
            let (id, drained) = {
                let s = self.state();
                (s.id, s.drained)
            };
            if drained {
                break;
            }
            if let Some(id) = id
                && told != Some(id)
            {
                match self.leave(id, false).await {
                    Ok(true) => {
                        tracing::info!(worker = %id, "draining: the coordinator is moving this worker's experts");
                        told = Some(id);
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::warn!(worker = %id, error = %e, "cannot tell the coordinator this worker is leaving")
                    }
                }
            }
            let wait = tokio::time::sleep_until(deadline);
            tokio::select! {
                _ = wait => {
                    tracing::warn!(limit = ?limit, "drain did not complete in time; stopping anyway");
                    if let Some(id) = id {
                        let _ = tokio::time::timeout(Duration::from_secs(1), self.leave(id, true)).await;
                    }
                    return false;
                }
                _ = progress.changed() => {}
                // Retry telling the coordinator now and then.
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        let id = self.state().id;
        if let Some(id) = id {
            let _ = self.leave(id, true).await;
        }
        true
    }

    async fn leave(&self, id: WorkerId, done: bool) -> Result<bool, String> {
        client::coordinator(&self.membership.coordinator, &self.membership.links)
            .await?
            .leave(LeaveRequest {
                worker_id: id.0,
                done,
            })
            .await
            .map(|r| r.into_inner().known)
            .map_err(|s| s.to_string())
    }
}

/// Aborts its task when dropped, so a task spawned for another one ends with it.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs `agent`'s membership and placement tasks until dropped or aborted.
pub async fn run(agent: Arc<Agent>) {
    let _follower = AbortOnDrop(tokio::spawn(agent.clone().follow()));
    agent.run().await;
}
