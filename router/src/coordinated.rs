//! Remote experts that follow the coordinator: the workers named by the live placement,
//! re-connected whenever a new version goes live. Each request takes a snapshot, so a
//! placement switch happens between requests, never inside a step.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use switchyard_engine::ModelConfig;
use switchyard_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use switchyard_proto::v1::{GetPlacementRequest, PlacementMap, WatchPlacementRequest};
use tonic::transport::Channel;

use crate::dispatch::DispatchOptions;
use crate::error::RouterError;
use crate::remote::RemoteExperts;

pub struct CoordinatedExperts {
    current: RwLock<Arc<RemoteExperts>>,
    version: AtomicU64,
    config: ModelConfig,
    options: DispatchOptions,
    runtime: tokio::runtime::Runtime,
}

impl std::fmt::Debug for CoordinatedExperts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CoordinatedExperts")
            .field("version", &self.version.load(Ordering::Relaxed))
            .finish()
    }
}

fn url(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

fn addresses(map: &PlacementMap) -> Vec<String> {
    map.workers.iter().map(|w| w.address.clone()).collect()
}

impl CoordinatedExperts {
    /// Waits (up to `wait`) for a live placement, connects to its workers, and keeps following
    /// the coordinator. Call from a plain thread, not from async code.
    pub fn connect(
        config: &ModelConfig,
        coordinator: &str,
        options: DispatchOptions,
        wait: Duration,
    ) -> Result<Arc<CoordinatedExperts>, RouterError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("switchyard-placement")
            .enable_all()
            .build()
            .map_err(|e| {
                RouterError::Runtime(format!("cannot start the placement runtime: {e}"))
            })?;
        let coordinator_url = url(coordinator);
        let deadline = Instant::now() + wait;
        let live = loop {
            let fetched = runtime.block_on(async {
                let mut client = CoordinatorServiceClient::connect(coordinator_url.clone())
                    .await
                    .ok()?;
                client
                    .get_placement(GetPlacementRequest {})
                    .await
                    .ok()
                    .map(|r| r.into_inner())
            });
            match fetched.and_then(|u| u.live) {
                Some(live) => break live,
                None if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
                None => {
                    return Err(RouterError::Placement(format!(
                        "the coordinator at {coordinator} had no live placement within {wait:?}"
                    )));
                }
            }
        };
        let first = RemoteExperts::connect(config, &addresses(&live), options.clone())?;
        let this = Arc::new(CoordinatedExperts {
            current: RwLock::new(Arc::new(first)),
            version: AtomicU64::new(live.version),
            config: config.clone(),
            options,
            runtime,
        });
        let follower = Arc::downgrade(&this);
        this.runtime.spawn(async move {
            loop {
                let Ok(mut client) = CoordinatorServiceClient::<Channel>::connect(coordinator_url.clone()).await else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                let Ok(stream) = client.watch_placement(WatchPlacementRequest {}).await else {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                };
                let mut stream = stream.into_inner();
                while let Ok(Some(update)) = stream.message().await {
                    let Some(live) = update.live else { continue };
                    let Some(me) = follower.upgrade() else { return };
                    if live.version <= me.version.load(Ordering::Relaxed) {
                        continue;
                    }
                    // Connecting blocks: keep it off the async threads.
                    let switched = tokio::task::spawn_blocking(move || me.switch_to(&live)).await;
                    if let Ok(Err(e)) = switched {
                        tracing::error!(error = %e, "cannot switch to the new placement; keeping the old one");
                    }
                }
                // The coordinator went away: keep serving on the last placement and reconnect.
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        });
        Ok(this)
    }

    fn switch_to(&self, live: &PlacementMap) -> Result<(), RouterError> {
        let next = RemoteExperts::connect(&self.config, &addresses(live), self.options.clone())?;
        let old = {
            let mut current = self.current.write().unwrap_or_else(|e| e.into_inner());
            std::mem::replace(&mut *current, Arc::new(next))
        };
        self.version.store(live.version, Ordering::Relaxed);
        tracing::info!(
            version = live.version,
            workers = live.workers.len(),
            "switched to a new placement"
        );
        // The old pool's runtime must not be dropped on an async thread; this runs on a
        // blocking one, and requests holding a snapshot keep it alive until they finish.
        drop(old);
        Ok(())
    }

    /// The placement in force now, for one request.
    pub fn snapshot(&self) -> Arc<RemoteExperts> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Relaxed)
    }
}
