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
    HeartbeatRequest, HeartbeatResponse, LayerPlacement, PlacementMap, PlacementUpdate,
    RegisterRequest, RegisterResponse, WatchPlacementRequest, WorkerAddress, WorkerStatus,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Response, Status};
use tracing::instrument;

use crate::membership::{ClusterState, MembershipError, ModelShape, Versioned};
use crate::placement::{Slot, WorkerId};

impl From<MembershipError> for Status {
    fn from(e: MembershipError) -> Self {
        match e {
            MembershipError::WrongModel { .. } => Status::failed_precondition(e.to_string()),
            MembershipError::Invalid { .. } => Status::invalid_argument(e.to_string()),
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
    start: Instant,
    metrics: Arc<crate::metrics::CoordinatorMetrics>,
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

fn update_of(state: &ClusterState) -> PlacementUpdate {
    PlacementUpdate {
        target: state.target().map(|t| to_map(state.model(), t)),
        live: state.live().map(|l| to_map(state.model(), l)),
    }
}

impl CoordinatorNode {
    pub fn new(model: ModelShape, replicas: usize, lease: Duration) -> CoordinatorNode {
        // Versions from this instance start at the wall clock in microseconds: above anything an
        // earlier instance published, so watchers never mistake a new map for an old one.
        let base = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let state =
            ClusterState::new(model, replicas, lease.as_millis() as u64).with_version_base(base);
        let (tx, _) = watch::channel(update_of(&state));
        CoordinatorNode {
            state: Arc::new(Mutex::new(state)),
            updates: Arc::new(tx),
            closing: Arc::new(watch::channel(false).0),
            start: Instant::now(),
            metrics: Arc::new(crate::metrics::CoordinatorMetrics::new()),
        }
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
        let update = update_of(&state);
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

    pub fn into_server(self) -> CoordinatorServiceServer<Self> {
        CoordinatorServiceServer::new(self)
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
        let r = request.into_inner();
        let (id, lease) = self.with_state(|s, now| {
            s.register(&r.address, r.memory_bytes, &r.device, &r.model, now)
                .map(|id| (id, s.lease_ms()))
        })??;
        self.metrics.registrations.inc();
        tracing::info!(worker = %id, address = %r.address, "worker registered");
        Ok(Response::new(RegisterResponse {
            worker_id: id.0,
            lease_ms: lease,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<HeartbeatRequest>,
    ) -> Result<Response<HeartbeatResponse>, Status> {
        let r = request.into_inner();
        let known =
            self.with_state(|s, now| s.heartbeat(WorkerId(r.worker_id), r.loaded_version, now))?;
        Ok(Response::new(HeartbeatResponse { known }))
    }

    async fn get_placement(
        &self,
        _request: Request<GetPlacementRequest>,
    ) -> Result<Response<PlacementUpdate>, Status> {
        Ok(Response::new(self.updates.borrow().clone()))
    }

    #[instrument(skip_all)]
    async fn watch_placement(
        &self,
        _request: Request<WatchPlacementRequest>,
    ) -> Result<Response<UpdateStream>, Status> {
        // Ends when the coordinator shuts down, so a graceful shutdown does not wait forever on
        // watchers and they reconnect to whoever serves next.
        let mut closing = self.closing.subscribe();
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
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn cluster_status(
        &self,
        _request: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusResponse>, Status> {
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
                })
                .collect(),
            target_version: state.target().map_or(0, |t| t.version),
            live_version: state.live().map_or(0, |l| l.version),
            model: state.model().identity.clone(),
            placement_error: state.placement_error().unwrap_or_default().to_string(),
        }))
    }
}

/// Serves the coordinator on `listener` (TCP_NODELAY) until `shutdown`, sweeping leases.
pub async fn serve(
    node: CoordinatorNode,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let sweeper = tokio::spawn(node.clone().sweep());
    let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
    let closing = node.closing.clone();
    let shutdown = async move {
        shutdown.await;
        closing.send_replace(true);
    };
    let result = tonic::transport::Server::builder()
        .add_service(switchyard_proto::health::serving("switchyard.v1.CoordinatorService").await)
        .add_service(node.into_server())
        .add_optional_service(switchyard_proto::reflection::v1())
        .add_optional_service(switchyard_proto::reflection::v1alpha())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    sweeper.abort();
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
        }))
        .await
        .unwrap();
        let text = node.render_metrics();
        assert!(text.contains("switchyard_coordinator_workers 1"), "{text}");
        assert!(text.contains("switchyard_coordinator_registrations_total 1"));
        // A target exists, not yet loaded by the worker: pending.
        assert!(
            text.contains("switchyard_coordinator_placement_pending 1"),
            "{text}"
        );
    }
}
