//! The coordinator's gRPC face: `switchyard.v1.CoordinatorService`.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_proto::v1::coordinator_service_server::{
    CoordinatorService, CoordinatorServiceServer,
};
use switchyard_proto::v1::{
    ClusterStatusRequest, ClusterStatusResponse, ExpertHolders, GetPlacementRequest,
    HeartbeatRequest, HeartbeatResponse, LayerBalance, LayerPlacement, LeaveRequest, LeaveResponse,
    PlacementMap, PlacementUpdate, RebalanceRequest, RebalanceResponse, RegisterRequest,
    RegisterResponse, RouterReport, RouterReportResponse, RouterStatus, WatchPlacementRequest,
    WorkerAddress, WorkerStatus,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::load::RouterCounts;
use crate::membership::{ClusterState, MembershipError, ModelShape, RebalanceOutcome, Versioned};
use crate::placement::{self, RebalanceOptions, Slot, WorkerId};
use switchyard_proto::health::Health;
use switchyard_proto::tls::{ClusterLinks, Role, TlsError};

impl From<MembershipError> for Status {
    fn from(e: MembershipError) -> Self {
        match e {
            MembershipError::WrongModel { .. } => Status::failed_precondition(e.to_string()),
            MembershipError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            MembershipError::NotReady(_) => Status::unavailable(e.to_string()),
            MembershipError::NotYours { .. } => Status::permission_denied(e.to_string()),
        }
    }
}

/// Load balancing: what placement does with the load routers report.
#[derive(Clone, Debug, PartialEq)]
pub struct Balancing {
    /// Extra copies per MoE layer for the experts with the most load per copy.
    pub redundant: usize,
    /// Observed load loses half its weight after this long (zero: never).
    pub load_half_life: Duration,
    /// Rebalance this often; `None`: only when asked (`switchyard rebalance`).
    pub interval: Option<Duration>,
    /// Expert copies one rebalance may load.
    pub max_moves: usize,
    /// Least drop in mean per-layer imbalance worth moving experts for.
    pub threshold: f64,
}

impl Default for Balancing {
    fn default() -> Self {
        Balancing {
            redundant: 0,
            load_half_life: Duration::from_millis(crate::membership::DEFAULT_LOAD_HALF_LIFE_MS),
            interval: None,
            max_moves: 32,
            threshold: 0.05,
        }
    }
}

/// The coordinator: cluster state behind a lock, and a channel that carries every placement
/// change to watchers.
#[derive(Clone, Debug)]
pub struct CoordinatorNode {
    state: Arc<Mutex<ClusterState>>,
    updates: Arc<watch::Sender<PlacementUpdate>>,
    /// Set when serving stops: open watch streams end.
    closing: Arc<watch::Sender<bool>>,
    /// Bumped by [`CoordinatorNode::drop_watchers`]: open watch streams end, as on a broken
    /// connection, and their watchers must reconnect.
    kicks: Arc<watch::Sender<u64>>,
    start: Instant,
    metrics: Arc<crate::metrics::CoordinatorMetrics>,
    balancing: Balancing,
    /// Over TLS: who may call what (workers register and heartbeat for their own id, routers
    /// report, admins rebalance), and the server's certificate.
    links: ClusterLinks,
}

fn to_map(model: &ModelShape, v: &Versioned) -> PlacementMap {
    PlacementMap {
        version: v.version,
        workers: v
            .addresses
            .iter()
            .map(|(id, addr)| WorkerAddress {
                worker_id: id.0,
                address: addr.clone(),
            })
            .collect(),
        layers: model
            .layers
            .iter()
            .map(|&layer| LayerPlacement {
                layer,
                experts: (0..model.experts_per_layer)
                    .map(|expert| ExpertHolders {
                        worker_ids: v
                            .plan
                            .holders
                            .get(&Slot { layer, expert })
                            .map(|ws| ws.iter().map(|w| w.0).collect())
                            .unwrap_or_default(),
                    })
                    .collect(),
            })
            .collect(),
    }
}

fn update_of(state: &ClusterState, now_ms: u64) -> PlacementUpdate {
    PlacementUpdate {
        target: state.target().map(|t| to_map(state.model(), t)),
        live: state.live().map(|l| to_map(state.model(), l)),
        retain_from: state.retain_from(now_ms),
    }
}

impl CoordinatorNode {
    pub fn new(model: ModelShape, replicas: usize, lease: Duration) -> CoordinatorNode {
        CoordinatorNode::with_balancing(model, replicas, lease, Balancing::default())
    }

    pub fn with_balancing(
        model: ModelShape,
        replicas: usize,
        lease: Duration,
        balancing: Balancing,
    ) -> CoordinatorNode {
        // Versions from this instance start at the wall clock in microseconds: above anything an
        // earlier instance published, so watchers never mistake a new map for an old one.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let state = ClusterState::new(model, replicas, lease.as_millis() as u64)
            .with_version_base(base)
            .with_redundant(balancing.redundant)
            .with_load_half_life_ms(balancing.load_half_life.as_millis() as u64);
        let (tx, _) = watch::channel(update_of(&state, 0));
        CoordinatorNode {
            state: Arc::new(Mutex::new(state)),
            updates: Arc::new(tx),
            closing: Arc::new(watch::channel(false).0),
            kicks: Arc::new(watch::channel(0).0),
            start: Instant::now(),
            metrics: Arc::new(crate::metrics::CoordinatorMetrics::new()),
            balancing,
            links: ClusterLinks::Insecure,
        }
    }

    /// Serves and checks callers over `links` (mutual TLS with the coordinator's certificate).
    pub fn with_links(mut self, links: ClusterLinks) -> CoordinatorNode {
        self.links = links;
        self
    }

    /// The worker a call comes from (its certificate's name), refused unless it is one.
    fn worker_caller<T>(&self, request: &Request<T>, call: &str) -> Result<Option<String>, Status> {
        Ok(self
            .links
            .authorize(request, &[Role::Worker], call)?
            .map(|id| id.name))
    }

    /// Prometheus text of the coordinator's metrics, gauges read from the state now.
    pub fn render_metrics(&self) -> String {
        if let Ok(s) = self.state.lock() {
            let m = &self.metrics;
            m.workers.set(s.members().count() as i64);
            let target = s.target().map_or(0, |t| t.version);
            let live = s.live().map_or(0, |l| l.version);
            m.target_version.set(target as i64);
            m.live_version.set(live as i64);
            m.placement_pending.set(i64::from(target != live));
            m.draining_workers
                .set(s.members().filter(|w| w.draining).count() as i64);
            m.failed_workers
                .set(s.members().filter(|w| w.load_error.is_some()).count() as i64);
            m.routers.set(s.routers().count() as i64);
            m.retain_from.set(s.retain_from(self.now_ms()) as i64);
            m.predicted_imbalance
                .set(placement::mean_imbalance(&s.predicted_imbalance()));
            m.observed_imbalance
                .set(placement::mean_imbalance(&s.observed_imbalance()));
            m.load_tokens.set(s.load().total(self.now_ms()));
        }
        self.metrics.render()
    }

    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    /// Runs `f` on the state and publishes the placement if it changed.
    fn with_state<T>(&self, f: impl FnOnce(&mut ClusterState, u64) -> T) -> Result<T, Status> {
        let now = self.now_ms();
        let mut state = self
            .state
            .lock()
            .map_err(|_| Status::internal("coordinator state poisoned"))?;
        let out = f(&mut state, now);
        let update = update_of(&state, now);
        self.updates.send_if_modified(|current| {
            if *current != update {
                *current = update;
                true
            } else {
                false
            }
        });
        Ok(out)
    }

    /// Drops workers whose lease ran out, every quarter lease, until the process stops.
    pub async fn sweep(self) {
        let lease = self.state.lock().map(|s| s.lease_ms()).unwrap_or(5000);
        let mut tick = tokio::time::interval(Duration::from_millis((lease / 4).max(10)));
        loop {
            tick.tick().await;
            if let Ok(gone) = self.with_state(|s, now| s.expire(now)) {
                for id in gone {
                    self.metrics.leases_expired.inc();
                    tracing::warn!(worker = %id, "worker lease expired; re-placing its experts");
                }
            }
        }
    }

    /// Re-places experts for the observed load now; `None` fields fall back to the node's
    /// [`Balancing`]. Counts and logs a rebalance that changed the placement.
    pub fn rebalance_now(
        &self,
        dry_run: bool,
        max_moves: Option<usize>,
        threshold: Option<f64>,
    ) -> Result<RebalanceOutcome, Status> {
        let opts = RebalanceOptions {
            max_moves: max_moves.unwrap_or(self.balancing.max_moves),
            threshold: threshold.unwrap_or(self.balancing.threshold),
        };
        if !opts.threshold.is_finite() || opts.threshold < 0.0 {
            return Err(Status::invalid_argument(format!(
                "`threshold` must be a finite number >= 0, got {}",
                opts.threshold
            )));
        }
        let out = self.with_state(|s, _| s.rebalance(&opts, dry_run))??;
        let r = &out.rebalance;
        let (before, after) = (
            placement::mean_imbalance(&r.before),
            placement::mean_imbalance(&r.after),
        );
        if let Some(version) = out.version {
            self.metrics.rebalances.inc();
            self.metrics.rebalance_moves.inc_by(r.moves as u64);
            self.metrics.rebalance_bytes.inc_by(out.bytes);
            tracing::info!(
                version,
                moves = r.moves,
                bytes = out.bytes,
                imbalance_before = before,
                imbalance_after = after,
                "rebalanced expert placement"
            );
        } else {
            tracing::debug!(
                dry_run,
                applied = r.applied,
                imbalance_before = before,
                imbalance_after = after,
                "rebalance changed nothing"
            );
        }
        Ok(out)
    }

    /// Rebalances every `interval` until the process stops; a round that cannot run (a
    /// placement still loading, no load yet) waits for the next.
    pub async fn rebalance_every(self, interval: Duration) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if let Err(e) = self.rebalance_now(false, None, None) {
                tracing::debug!(error = %e.message(), "periodic rebalance skipped");
            }
        }
    }

    pub fn into_server(self) -> CoordinatorServiceServer<Self> {
        CoordinatorServiceServer::new(self)
    }

    /// Ends every open placement watch as a broken connection would: watchers see their
    /// stream end and must reconnect (fault injection for tests and operators).
    pub fn drop_watchers(&self) {
        self.kicks.send_modify(|k| *k += 1);
    }

    /// Whether the state can be read (it cannot after a panic while it was held).
    pub fn ready(&self) -> Result<(), String> {
        self.state
            .lock()
            .map(|_| ())
            .map_err(|_| "the coordinator state is poisoned".to_string())
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<PlacementUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorService for CoordinatorNode {
    type WatchPlacementStream = UpdateStream;

    #[instrument(skip_all, fields(address = %request.get_ref().address))]
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let caller = self.worker_caller(&request, "Register")?;
        let r = request.into_inner();
        let previous = r.previous_worker_id.map(WorkerId);
        let (id, lease) = self.with_state(|s, now| {
            s.register_as(
                caller.as_deref(),
                &r.address,
                r.memory_bytes,
                &r.device,
                &r.model,
                previous,
                now,
            )
            .map(|id| (id, s.lease_ms()))
        })??;
        self.metrics.registrations.inc();
        tracing::info!(worker = %id, address = %r.address, identity = caller.as_deref().unwrap_or(""), "worker registered");
        Ok(Response::new(RegisterResponse {
            worker_id: id.0,
            lease_ms: lease,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let caller = self.worker_caller(&request, "Heartbeat")?;
        let r = request.into_inner();
        let failed = (r.failed_version > 0).then_some((r.failed_version, r.load_error.as_str()));
        let id = WorkerId(r.worker_id);
        let known = self.with_state(|s, now| {
            s.check_caller(id, caller.as_deref())?;
            Ok::<_, MembershipError>(s.heartbeat(id, r.loaded_version, failed, now))
        })??;
        // Logged once the caller is known to speak for this worker.
        if let Some((version, why)) = failed {
            tracing::warn!(
                worker = r.worker_id,
                version,
                error = why,
                "worker cannot load its placement; placing its experts elsewhere"
            );
        }
        Ok(Response::new(HeartbeatResponse { known }))
    }

    #[instrument(skip_all, fields(worker = request.get_ref().worker_id, done = request.get_ref().done))]
    async fn leave(
        &self,
        request: Request<LeaveRequest>,
    ) -> Result<Response<LeaveResponse>, Status> {
        let caller = self.worker_caller(&request, "Leave")?;
        let r = request.into_inner();
        let id = WorkerId(r.worker_id);
        let known = self.with_state(|s, now| {
            s.check_caller(id, caller.as_deref())?;
            Ok::<_, MembershipError>(s.leave(id, r.done, now))
        })??;
        if r.done {
            tracing::info!(worker = r.worker_id, "worker left");
        } else {
            tracing::info!(
                worker = r.worker_id,
                "worker draining; placing its experts elsewhere"
            );
        }
        Ok(Response::new(LeaveResponse { known }))
    }

    async fn report_router(
        &self,
        request: Request<RouterReport>,
    ) -> Result<Response<RouterReportResponse>, Status> {
        let caller = self
            .links
            .authorize(&request, &[Role::Router], "ReportRouter")?
            .map(|id| id.name);
        let r = request.into_inner();
        if r.router_id.is_empty() || r.router_id.len() > 128 {
            return Err(Status::invalid_argument(format!(
                "`router_id` must be 1 to 128 bytes, got {}",
                r.router_id.len()
            )));
        }
        let lease_ms = self.with_state(|s, now| {
            s.check_router(&r.router_id, caller.as_deref())?;
            if r.leaving {
                s.router_left(&r.router_id);
            } else {
                let counts = router_counts(s.model(), &r)?;
                s.report_router_as(caller.as_deref(), &r.router_id, r.live_version, counts, now);
            }
            Ok::<_, Status>(s.lease_ms())
        })??;
        if r.leaving {
            tracing::info!(router = %r.router_id, "router left");
        }
        Ok(Response::new(RouterReportResponse { lease_ms }))
    }

    async fn get_placement(
        &self,
        request: Request<GetPlacementRequest>,
    ) -> Result<Response<PlacementUpdate>, Status> {
        self.links.authorize(&request, &Role::ALL, "GetPlacement")?;
        Ok(Response::new(self.updates.borrow().clone()))
    }

    #[instrument(skip_all)]
    async fn watch_placement(
        &self,
        request: Request<WatchPlacementRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        self.links.authorize(
            &request,
            &[Role::Router, Role::Worker, Role::Admin],
            "WatchPlacement",
        )?;
        // Ends when the coordinator shuts down, so a graceful shutdown does not wait forever on
        // watchers and they reconnect to whoever serves next.
        let mut closing = self.closing.subscribe();
        let mut kicks = self.kicks.subscribe();
        kicks.borrow_and_update();
        let mut updates = self.updates.subscribe();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let current = updates.borrow_and_update().clone();
            if tx.send(Ok(current)).await.is_err() {
                return;
            }
            loop {
                tokio::select! {
                    changed = updates.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        let update = updates.borrow_and_update().clone();
                        if tx.send(Ok(update)).await.is_err() {
                            break;
                        }
                    }
                    // `closing` only ever turns true (or its sender goes): either way, stop.
                    _ = closing.changed() => break,
                    _ = kicks.changed() => {
                        let _ = tx.send(Err(Status::unavailable("placement watch dropped"))).await;
                        break;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cluster_status(
        &self,
        request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
        self.links
            .authorize(&request, &Role::ALL, "ClusterStatus")?;
        let now = self.now_ms();
        let state = self
            .state
            .lock()
            .map_err(|_| Status::internal("coordinator state poisoned"))?;
        let by_worker = state
            .target()
            .map(|t| t.plan.by_worker())
            .unwrap_or_default();
        Ok(Response::new(ClusterStatusResponse {
            workers: state
                .members()
                .map(|m| WorkerStatus {
                    worker_id: m.id.0,
                    address: m.address.clone(),
                    device: m.device.clone(),
                    memory_bytes: m.memory_bytes,
                    loaded_version: m.loaded_version,
                    ms_since_heartbeat: now.saturating_sub(m.last_seen_ms),
                    experts: by_worker.get(&m.id).map_or(0, |v| v.len() as u32),
                    draining: m.draining,
                    load_error: m.load_error.clone().unwrap_or_default(),
                })
                .collect(),
            target_version: state.target().map_or(0, |t| t.version),
            live_version: state.live().map_or(0, |l| l.version),
            model: state.model().identity.clone(),
            placement_error: state.placement_error().unwrap_or_default().to_string(),
            routers: state
                .routers()
                .map(|r| RouterStatus {
                    router_id: r.id.clone(),
                    live_version: r.live_version,
                    ms_since_report: now.saturating_sub(r.last_seen_ms),
                })
                .collect(),
            retain_from: state.retain_from(now),
            load_tokens: state.load().total(now),
            balance: {
                let predicted = state.predicted_imbalance();
                balance_rows(&predicted, &predicted, &state.observed_imbalance())
            },
            rebalances: self.metrics.rebalances.get(),
        }))
    }

    #[instrument(skip_all, fields(dry_run = request.get_ref().dry_run))]
    async fn rebalance(
        &self,
        request: Request<RebalanceRequest>,
    ) -> Result<Response<RebalanceResponse>, Status> {
        self.links
            .authorize(&request, &[Role::Admin, Role::Router], "Rebalance")?;
        let r = request.into_inner();
        let out = self.rebalance_now(r.dry_run, r.max_moves.map(|m| m as usize), r.threshold)?;
        let observed = self
            .state
            .lock()
            .map(|s| s.observed_imbalance())
            .unwrap_or_default();
        let rb = &out.rebalance;
        Ok(Response::new(RebalanceResponse {
            applied: rb.applied,
            moves: rb.moves as u32,
            bytes: out.bytes,
            version: out.version.unwrap_or(0),
            layers: balance_rows(&rb.before, &rb.after, &observed),
            mean_before: placement::mean_imbalance(&rb.before),
            mean_after: placement::mean_imbalance(&rb.after),
        }))
    }
}

fn balance_rows(
    before: &std::collections::BTreeMap<u32, f64>,
    after: &std::collections::BTreeMap<u32, f64>,
    observed: &std::collections::BTreeMap<u32, f64>,
) -> Vec<LayerBalance> {
    before
        .iter()
        .map(|(&layer, &b)| LayerBalance {
            layer,
            before: b,
            after: after.get(&layer).copied().unwrap_or(b),
            observed: observed.get(&layer).copied().unwrap_or(0.0),
        })
        .collect()
}

/// A report's counts, checked against the model: known MoE layers, one count per expert,
/// workers named once per layer.
fn router_counts(model: &ModelShape, r: &RouterReport) -> Result<Option<RouterCounts>, Status> {
    if r.expert_tokens.is_empty() && r.worker_assignments.is_empty() {
        return Ok(None);
    }
    let mut counts = RouterCounts::default();
    for l in &r.expert_tokens {
        if !model.layers.contains(&l.layer) {
            return Err(Status::invalid_argument(format!(
                "`expert_tokens.layer` {} is not a MoE layer of {} (MoE layers: {:?})",
                l.layer, model.identity, model.layers
            )));
        }
        if l.tokens.len() != model.experts_per_layer as usize {
            return Err(Status::invalid_argument(format!(
                "`expert_tokens.tokens` of layer {} has {} counts, the model {} experts",
                l.layer,
                l.tokens.len(),
                model.experts_per_layer
            )));
        }
        for (e, &n) in l.tokens.iter().enumerate() {
            counts.experts.insert(
                Slot {
                    layer: l.layer,
                    expert: e as u32,
                },
                n,
            );
        }
    }
    for w in &r.worker_assignments {
        if !model.layers.contains(&w.layer) {
            return Err(Status::invalid_argument(format!(
                "`worker_assignments.layer` {} is not a MoE layer of {}",
                w.layer, model.identity
            )));
        }
        counts
            .workers
            .insert((w.layer, WorkerId(w.worker_id)), w.assignments);
    }
    Ok(Some(counts))
}

/// Why the coordinator could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cluster TLS: {0}")]
    Tls(#[from] TlsError),
    #[error("serving failed: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// Serves the coordinator on `listener` (TCP_NODELAY) until `shutdown`, sweeping leases.
pub async fn serve(
    node: CoordinatorNode,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let sweeper = tokio::spawn(node.clone().sweep());
    let rebalancer = node
        .balancing
        .interval
        .filter(|i| !i.is_zero())
        .map(|i| tokio::spawn(node.clone().rebalance_every(i)));
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let (health, health_service) = Health::new("switchyard.v1.CoordinatorService").await;
    let checked = node.clone();
    let monitor = health.watch(Duration::from_millis(500), move || checked.ready());
    health.set(node.ready()).await;
    let closing = node.closing.clone();
    let shutdown = async move {
        shutdown.await;
        health.drain().await;
        health.close().await;
        closing.send_replace(true);
    };
    let mut server = node.links.server()?;
    let result = server
        .add_service(health_service)
        .add_service(node.into_server())
        .add_optional_service(switchyard_proto::reflection::v1())
        .add_optional_service(switchyard_proto::reflection::v1alpha())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
        .map_err(ServeError::from);
    sweeper.abort();
    if let Some(r) = rebalancer {
        r.abort();
    }
    monitor.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn metrics_follow_registrations_and_placement_versions() {
        let node = CoordinatorNode::new(
            ModelShape {
                identity: "m".into(),
                layers: vec![1, 2],
                experts_per_layer: 8,
                expert_bytes: 10,
            },
            1,
            Duration::from_secs(5),
        );
        let before = node.render_metrics();
        assert!(
            before.contains("switchyard_coordinator_workers 0"),
            "{before}"
        );
        node.register(Request::new(RegisterRequest {
            address: "127.0.0.1:1".into(),
            memory_bytes: 1000,
            device: "cpu".into(),
            model: "m".into(),
            previous_worker_id: None,
        }))
        .await
        .unwrap();
        let text = node.render_metrics();
        assert!(text.contains("switchyard_coordinator_workers 1"), "{text}");
        assert!(text.contains("switchyard_coordinator_registrations_total 1"));
        assert!(
            text.contains("switchyard_coordinator_draining_workers 0"),
            "{text}"
        );
        node.report_router(Request::new(RouterReport {
            router_id: "r".into(),
            live_version: 0,
            leaving: false,
            ..Default::default()
        }))
        .await
        .unwrap();
        assert!(
            node.render_metrics()
                .contains("switchyard_coordinator_routers 1")
        );
        // A target exists, not yet loaded by the worker: pending.
        assert!(
            text.contains("switchyard_coordinator_placement_pending 1"),
            "{text}"
        );
    }

    #[tokio::test]
    async fn load_reports_are_checked_and_rebalance_needs_a_live_placement() {
        use switchyard_proto::v1::ExpertTokens;
        let node = CoordinatorNode::new(
            ModelShape {
                identity: "m".into(),
                layers: vec![1, 2],
                experts_per_layer: 8,
                expert_bytes: 10,
            },
            1,
            Duration::from_secs(5),
        );
        let report = |layer, tokens: Vec<u64>| RouterReport {
            router_id: "r".into(),
            expert_tokens: vec![ExpertTokens { layer, tokens }],
            ..Default::default()
        };
        let err = node
            .report_router(Request::new(report(0, vec![1; 8])))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("`expert_tokens.layer` 0"), "{err:?}");
        let err = node
            .report_router(Request::new(report(1, vec![1; 3])))
            .await
            .unwrap_err();
        assert!(
            err.message().contains("3 counts") && err.message().contains("8 experts"),
            "{err:?}"
        );
        node.report_router(Request::new(report(1, vec![5; 8])))
            .await
            .unwrap();
        assert!(
            node.render_metrics()
                .contains("switchyard_coordinator_load_tokens 40")
        );
        let err = node
            .rebalance(Request::new(RebalanceRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
        let err = node
            .rebalance(Request::new(RebalanceRequest {
                threshold: Some(f64::NAN),
                ..Default::default()
            }))
            .await
            .unwrap_err();
        assert!(err.message().contains("`threshold`"), "{err:?}");
    }

    #[tokio::test]
    async fn the_interval_rebalances_a_skewed_live_placement_by_itself() {
        use switchyard_proto::v1::ExpertTokens;
        let node = CoordinatorNode::with_balancing(
            ModelShape {
                identity: "m".into(),
                layers: vec![1],
                experts_per_layer: 8,
                expert_bytes: 10,
            },
            1,
            Duration::from_secs(5),
            Balancing {
                load_half_life: Duration::ZERO,
                interval: Some(Duration::from_millis(20)),
                threshold: 0.0,
                ..Default::default()
            },
        );
        let mut ids = Vec::new();
        for a in ["127.0.0.1:1", "127.0.0.1:2"] {
            let r = node
                .register(Request::new(RegisterRequest {
                    address: a.into(),
                    memory_bytes: 1000,
                    device: "cpu".into(),
                    model: "m".into(),
                    previous_worker_id: None,
                }))
                .await
                .unwrap();
            ids.push(r.into_inner().worker_id);
        }
        let loaded = |node: &CoordinatorNode| {
            let version = node
                .updates
                .borrow()
                .target
                .as_ref()
                .map_or(0, |t| t.version);
            let node = node.clone();
            let ids = ids.clone();
            async move {
                for &worker_id in &ids {
                    node.heartbeat(Request::new(HeartbeatRequest {
                        worker_id,
                        loaded_version: version,
                        ..Default::default()
                    }))
                    .await
                    .unwrap();
                }
                version
            }
        };
        let v1 = loaded(&node).await;
        // Worker 0's experts are the hot ones.
        node.report_router(Request::new(RouterReport {
            router_id: "r".into(),
            live_version: v1,
            expert_tokens: vec![ExpertTokens {
                layer: 1,
                tokens: vec![100, 100, 100, 100, 5, 5, 5, 5],
            }],
            ..Default::default()
        }))
        .await
        .unwrap();
        let task = tokio::spawn(node.clone().rebalance_every(Duration::from_millis(20)));
        let rebalanced = tokio::time::timeout(Duration::from_secs(10), async {
            while node.metrics.rebalances.get() == 0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await;
        task.abort();
        assert!(rebalanced.is_ok(), "no rebalance within 10 s");
        let target = node
            .updates
            .borrow()
            .target
            .as_ref()
            .map_or(0, |t| t.version);
        assert!(target > v1);
        assert!(
            node.render_metrics()
                .contains("switchyard_coordinator_rebalances_total 1")
        );
    }
}
