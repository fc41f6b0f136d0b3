//! Following the coordinator: two tasks on the pool's runtime, for as long as the pool lives.
//!
//! - The **watch** streams placement updates and switches the pool to each new live version.
//!   A switch that fails (a worker's link cannot be made, a worker lacks the shared experts)
//!   is retried with capped exponential backoff until it succeeds or a newer version replaces
//!   it; each failure is logged and counted. A broken watch reconnects the same way, and the
//!   router keeps serving on the last placement meanwhile.
//! - The **report** tells the coordinator, every third of its lease and right after each
//!   switch, which version this router dispatches with — so workers drop the experts of a
//!   version only once no router uses it — and its expert-load counts since start-up, which
//!   the coordinator places and rebalances experts by.

use std::sync::{Arc, Weak};
use std::time::Duration;

use switchyard_proto::backoff::Backoff;
use switchyard_proto::client;
use switchyard_proto::tls::ClusterLinks;
use switchyard_proto::v1::{ExpertTokens, PlacementMap, RouterReport, WorkerAssignments};

use super::ExpertPool;

/// A name for this router process, unique enough across a cluster's routers and restarts.
pub fn router_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!(
        "router-{}-{:x}",
        std::process::id(),
        nanos & 0xffff_ffff_ffff
    )
}

/// Tells the coordinator this router is gone, so workers need not keep the experts of its
/// version for it (best effort, bounded: a router that cannot is forgotten after its grace).
pub async fn leave(coordinator: &str, router_id: &str, links: &ClusterLinks) {
    let sent = tokio::time::timeout(Duration::from_secs(2), async {
        let mut client = client::coordinator(coordinator, links).await?;
        client
            .report_router(RouterReport {
                router_id: router_id.to_string(),
                live_version: 0,
                leaving: true,
                ..Default::default()
            })
            .await
            .map_err(|s| s.to_string())
    })
    .await;
    match sent {
        Ok(Ok(_)) => tracing::info!(%coordinator, "told the coordinator this router is leaving"),
        Ok(Err(e)) => {
            tracing::warn!(%coordinator, error = %e, "cannot tell the coordinator this router is leaving")
        }
        Err(_) => {
            tracing::warn!(%coordinator, "cannot tell the coordinator this router is leaving: timed out")
        }
    }
}

/// Starts following `coordinator` with `pool`; the tasks end when the pool is dropped.
pub fn start(pool: &Arc<ExpertPool>, coordinator: &str, router_id: &str) {
    let _ = pool
        .following
        .set((coordinator.to_string(), router_id.to_string()));
    let handle = pool.handle();
    let links = pool.options().links.clone();
    handle.spawn(watch(
        Arc::downgrade(pool),
        coordinator.to_string(),
        links.clone(),
    ));
    handle.spawn(report(
        Arc::downgrade(pool),
        pool.in_use_changed.clone(),
        coordinator.to_string(),
        router_id.to_string(),
        links,
    ));
}

/// Tries to switch to `map`; false (logged and counted) if it failed.
async fn try_switch(pool: &ExpertPool, map: &PlacementMap) -> bool {
    match pool.switch(map).await {
        Ok(true) => {
            pool.set_switch_error(None);
            pool.in_use_changed.notify_one();
            true
        }
        Ok(false) => true,
        Err(e) => {
            pool.set_switch_error(Some(format!(
                "cannot switch to placement version {}: {e}",
                map.version
            )));
            pool.options().metrics.placement_switch_failures.inc();
            tracing::error!(version = map.version, error = %e, "cannot switch to the new placement; retrying, serving on the old one meanwhile");
            false
        }
    }
}

async fn watch(pool: Weak<ExpertPool>, coordinator: String, links: ClusterLinks) {
    let mut reconnect = Backoff::new(Duration::from_secs(5));
    // The newest live map not switched to yet, and when to try it again.
    let mut pending: Option<PlacementMap> = None;
    let mut retry = Backoff::new(Duration::from_secs(5));
    loop {
        let mut stream = match client::watch_placement(&coordinator, &links).await {
            Ok(s) => s,
            Err(e) => {
                let wait = reconnect.next_delay();
                tracing::warn!(%coordinator, error = %e, retry_in = ?wait, "cannot watch the placement; serving on the last one");
                tokio::time::sleep(wait).await;
                continue;
            }
        };
        reconnect.reset();
        tracing::info!(%coordinator, "watching the placement");
        loop {
            let retry_in = retry.peek();
            let next = tokio::select! {
                m = stream.message() => Some(m),
                _ = tokio::time::sleep(retry_in), if pending.is_some() => None,
            };
            match next {
                Some(Ok(Some(update))) => {
                    if let Some(live) = update.live
                        && pending.as_ref().is_none_or(|p| live.version >= p.version)
                    {
                        pending = Some(live);
                        retry.reset();
                    }
                }
                Some(Ok(None)) => {
                    tracing::warn!(%coordinator, "the placement watch ended; reconnecting");
                    break;
                }
                Some(Err(status)) => {
                    tracing::warn!(%coordinator, %status, "the placement watch broke; reconnecting");
                    break;
                }
                None => {}
            }
            let Some(map) = pending.take() else { continue };
            let Some(p) = pool.upgrade() else { return };
            if !try_switch(&p, &map).await {
                retry.next_delay();
                pending = Some(map);
            }
        }
        tokio::time::sleep(reconnect.next_delay()).await;
    }
}

async fn report(
    pool: Weak<ExpertPool>,
    changed: Arc<tokio::sync::Notify>,
    coordinator: String,
    router_id: String,
    links: ClusterLinks,
) {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut period = Duration::from_millis(500);
    let mut client = None;
    loop {
        // Never held across an await: the pool must be free to drop (and stop this task).
        let Some((version, (experts, workers))) = pool
            .upgrade()
            .map(|p| (p.version_in_use(), p.load().totals()))
        else {
            return;
        };
        let expert_tokens: Vec<ExpertTokens> = experts
            .into_iter()
            .map(|(layer, tokens)| ExpertTokens {
                layer: layer as u32,
                tokens,
            })
            .collect();
        let worker_assignments: Vec<WorkerAssignments> = workers
            .into_iter()
            .map(|(layer, w, n)| WorkerAssignments {
                layer: layer as u32,
                worker_id: w.0,
                assignments: n,
            })
            .collect();
        if client.is_none() {
            client = client::coordinator(&coordinator, &links).await.ok();
        }
        let sent = match client.as_mut() {
            Some(c) => c
                .report_router(RouterReport {
                    router_id: router_id.clone(),
                    live_version: version,
                    leaving: false,
                    expert_tokens,
                    worker_assignments,
                })
                .await
                .map_err(|s| s.to_string()),
            None => Err("coordinator unreachable".to_string()),
        };
        let wait = match sent {
            Ok(reply) => {
                backoff.reset();
                period = Duration::from_millis((reply.into_inner().lease_ms / 3).max(10));
                period
            }
            Err(e) => {
                client = None;
                let wait = backoff.next_delay().min(period);
                tracing::debug!(%coordinator, error = %e, retry_in = ?wait, "cannot report the placement version");
                wait
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = changed.notified() => {}
        }
    }
}
