//! Node health: the standard `grpc.health.v1` service every Switchyard node serves (so load
//! balancers, Kubernetes gRPC probes and `grpc_health_probe` work without our protos), and the
//! same state for HTTP `/health`.
//!
//! Health says what a node can do now, not that it started: each node gives [`Health::watch`]
//! a check of its own state (a worker: it holds what its placement assigns it; a router: its
//! scheduler runs and its placement covers every routed expert), evaluated on an interval, and
//! [`Health::drain`] turns the node NOT_SERVING for good before it stops taking work.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::HealthServer;
use tonic_health::server::HealthReporter;

/// A node's readiness as last evaluated: serving or not, and why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Readiness {
    pub serving: bool,
    /// Empty while serving; otherwise what is missing, for logs and `/health` bodies.
    pub reason: String,
}

/// The handle a node keeps to report its health; cheap to clone.
#[derive(Clone, Debug)]
pub struct Health {
    reporter: HealthReporter,
    service: String,
    now: Arc<Mutex<Readiness>>,
    draining: Arc<AtomicBool>,
}

impl Health {
    /// A health service for `service_name` (and the whole server, `""`), NOT_SERVING until
    /// the node says otherwise.
    pub async fn new(
        service_name: &str,
    ) -> (
        Health,
        HealthServer<impl tonic_health::pb::health_server::Health>,
    ) {
        let (reporter, server) = tonic_health::server::health_reporter();
        let health = Health {
            reporter,
            service: service_name.to_string(),
            now: Arc::new(Mutex::new(Readiness {
                serving: false,
                reason: "starting".into(),
            })),
            draining: Arc::new(AtomicBool::new(false)),
        };
        health.publish(false).await;
        (health, server)
    }

    async fn publish(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        self.reporter.set_service_status("", status).await;
        self.reporter
            .set_service_status(&self.service, status)
            .await;
    }

    /// Records a new readiness; logs and publishes it when it changed. A draining node stays
    /// NOT_SERVING whatever `ready` says.
    pub async fn set(&self, ready: Result<(), String>) {
        let next = match (self.is_draining(), ready) {
            (true, _) => Readiness {
                serving: false,
                reason: "draining: the node is shutting down".into(),
            },
            (false, Ok(())) => Readiness {
                serving: true,
                reason: String::new(),
            },
            (false, Err(reason)) => Readiness {
                serving: false,
                reason,
            },
        };
        let changed = {
            let mut now = self.now.lock().unwrap_or_else(|e| e.into_inner());
            let changed = now.serving != next.serving;
            *now = next.clone();
            changed
        };
        if changed {
            if next.serving {
                tracing::info!(service = %self.service, "health: serving");
            } else {
                tracing::warn!(service = %self.service, reason = %next.reason, "health: not serving");
            }
            self.publish(next.serving).await;
        }
    }

    /// Evaluates `check` every `every` and publishes the result, until the runtime stops.
    pub fn watch(
        &self,
        every: Duration,
        check: impl Fn() -> Result<(), String> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                health.set(check()).await;
            }
        })
    }

    /// Turns the node NOT_SERVING for the rest of its life: call first on SIGTERM, before it
    /// stops taking work, so load balancers move away while it still answers.
    pub async fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
        self.set(Ok(())).await;
    }

    /// Ends every open `Watch` stream (their last message said NOT_SERVING), so a server's
    /// graceful shutdown does not wait on watchers forever. Call once draining, as serving
    /// stops; `Check` then answers NOT_FOUND.
    pub async fn close(&self) {
        let mut reporter = self.reporter.clone();
        reporter.clear_service_status("").await;
        reporter.clear_service_status(&self.service).await;
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// The readiness last recorded.
    pub fn readiness(&self) -> Readiness {
        self.now.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic_health::pb::HealthCheckRequest;

    async fn status(server: &impl tonic_health::pb::health_server::Health, service: &str) -> i32 {
        server
            .check(tonic::Request::new(HealthCheckRequest {
                service: service.into(),
            }))
            .await
            .map(|r| r.into_inner().status)
            .unwrap_or(-1)
    }

    #[tokio::test]
    async fn health_follows_the_check_and_draining_is_final() {
        let (health, _server) = Health::new("x.Service").await;
        // The service the server wraps, over the same statuses.
        let server =
            tonic_health::server::HealthService::from_health_reporter(health.reporter.clone());
        let not_serving = ServingStatus::NotServing as i32;
        let serving = ServingStatus::Serving as i32;
        // Not serving until told.
        assert_eq!(status(&server, "").await, not_serving);
        assert_eq!(status(&server, "x.Service").await, not_serving);
        health.set(Ok(())).await;
        assert_eq!(status(&server, "").await, serving);
        assert_eq!(status(&server, "x.Service").await, serving);
        health.set(Err("no placement".into())).await;
        assert_eq!(status(&server, "x.Service").await, not_serving);
        assert_eq!(health.readiness().reason, "no placement");
        health.set(Ok(())).await;
        health.drain().await;
        assert_eq!(status(&server, "x.Service").await, not_serving);
        health.set(Ok(())).await;
        assert_eq!(status(&server, "").await, not_serving, "draining is final");
        assert!(health.readiness().reason.contains("draining"));
        // Closing ends watchers; checks then find no service.
        health.close().await;
        assert_eq!(status(&server, "x.Service").await, -1);
    }
}
