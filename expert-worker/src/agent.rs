//! A worker under a coordinator: register, heartbeat, and hold whatever the target placement
//! assigns this worker — loading gained experts before reporting the version as loaded.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use switchyard_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use switchyard_proto::v1::{
    HeartbeatRequest, PlacementMap, RegisterRequest, WatchPlacementRequest,
};
use tonic::transport::Channel;

use crate::worker::ExpertWorker;

/// How this worker presents itself to the coordinator.
#[derive(Clone, Debug)]
pub struct Membership {
    pub coordinator: String,
    /// The address routers should use for this worker.
    pub advertise: String,
    pub memory_bytes: u64,
    pub device: String,
    pub model: String,
}

/// The experts `map` gives `worker`, by layer.
pub fn assignment(map: &PlacementMap, worker: u32) -> BTreeMap<usize, BTreeSet<u32>> {
    let mut out: BTreeMap<usize, BTreeSet<u32>> = BTreeMap::new();
    for layer in &map.layers {
        for (e, holders) in layer.experts.iter().enumerate() {
            if holders.worker_ids.contains(&worker) {
                out.entry(layer.layer as usize)
                    .or_default()
                    .insert(e as u32);
            }
        }
    }
    out
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Keeps this worker a member until the task is dropped: (re-)registers whenever the
/// coordinator does not know it (first start, lease lost, coordinator restarted), follows the
/// target placement, and heartbeats the version it has loaded.
pub async fn run(worker: Arc<ExpertWorker>, m: Membership) {
    let id = Arc::new(AtomicU32::new(u32::MAX));
    let loaded = Arc::new(AtomicU64::new(0));
    loop {
        let client = match Channel::from_shared(url(&m.coordinator)) {
            Ok(endpoint) => endpoint.tcp_nodelay(true).connect().await,
            Err(e) => {
                tracing::error!(coordinator = %m.coordinator, error = %e, "bad coordinator address");
                return;
            }
        };
        let Ok(channel) = client else {
            tracing::warn!(coordinator = %m.coordinator, "coordinator unreachable; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
            continue;
        };
        let mut client = CoordinatorServiceClient::new(channel);
        let registered = client
            .register(RegisterRequest {
                address: m.advertise.clone(),
                memory_bytes: m.memory_bytes,
                device: m.device.clone(),
                model: m.model.clone(),
            })
            .await;
        let reply = match registered {
            Ok(r) => r.into_inner(),
            Err(status) => {
                tracing::warn!(%status, "registration refused; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        id.store(reply.worker_id, Ordering::Relaxed);
        loaded.store(0, Ordering::Relaxed);
        tracing::info!(
            worker_id = reply.worker_id,
            "registered with the coordinator"
        );
        let follower = tokio::spawn(follow(
            client.clone(),
            worker.clone(),
            id.clone(),
            loaded.clone(),
        ));
        let period = Duration::from_millis((reply.lease_ms / 3).max(10));
        loop {
            tokio::time::sleep(period).await;
            let beat = client
                .heartbeat(HeartbeatRequest {
                    worker_id: id.load(Ordering::Relaxed),
                    loaded_version: loaded.load(Ordering::Relaxed),
                })
                .await;
            match beat {
                Ok(r) if r.get_ref().known => {}
                Ok(_) => {
                    tracing::warn!(
                        "the coordinator no longer knows this worker; registering again"
                    );
                    break;
                }
                Err(status) => {
                    tracing::warn!(%status, "heartbeat failed; reconnecting");
                    break;
                }
            }
        }
        follower.abort();
    }
}

/// Applies each new target placement, then marks its version loaded.
async fn follow(
    mut client: CoordinatorServiceClient<Channel>,
    worker: Arc<ExpertWorker>,
    id: Arc<AtomicU32>,
    loaded: Arc<AtomicU64>,
) {
    let Ok(stream) = client.watch_placement(WatchPlacementRequest {}).await else {
        return;
    };
    let mut stream = stream.into_inner();
    while let Ok(Some(update)) = stream.message().await {
        let Some(target) = update.target else {
            continue;
        };
        let me = id.load(Ordering::Relaxed);
        // Hold the live placement's experts too until the target replaces it: routers use the
        // live one until every worker has loaded the target.
        let mut mine = assignment(&target, me);
        if let Some(live) = &update.live {
            for (layer, experts) in assignment(live, me) {
                mine.entry(layer).or_default().extend(experts);
            }
        }
        // Applying is idempotent: a repeat gains nothing and drops nothing.
        let w = worker.clone();
        match tokio::task::spawn_blocking(move || w.apply(&mine)).await {
            Ok(Ok(())) => {
                loaded.fetch_max(target.version, Ordering::Relaxed);
                tracing::info!(version = target.version, "placement loaded");
            }
            Ok(Err(e)) => {
                tracing::error!(error = %e, version = target.version, "cannot load the assigned experts")
            }
            Err(e) => tracing::error!(error = %e, "expert loading task failed"),
        }
    }
}
