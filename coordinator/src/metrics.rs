//! Every metric the coordinator exports (Prometheus text at `/metrics` on `--metrics-listen`),
//! declared in one place; names prefixed `switchyard_coordinator_`.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug)]
pub struct CoordinatorMetrics {
    registry: Registry,
    pub workers: Gauge,
    pub target_version: Gauge,
    pub live_version: Gauge,
    /// 1 while a target placement waits for its workers to load it.
    pub placement_pending: Gauge,
    pub registrations: Counter,
    pub leases_expired: Counter,
    /// Workers leaving: placed on nothing, serving until routers move on.
    pub draining_workers: Gauge,
    /// Workers that could not load their assignment (placed on nothing).
    pub failed_workers: Gauge,
    /// Routers reporting the version they dispatch with.
    pub routers: Gauge,
    /// The oldest placement version workers keep experts for.
    pub retain_from: Gauge,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        CoordinatorMetrics::new()
    }
}

impl CoordinatorMetrics {
    pub fn new() -> CoordinatorMetrics {
        let mut r = Registry::with_prefix("switchyard_coordinator");
        let m = CoordinatorMetrics {
            workers: Gauge::default(),
            target_version: Gauge::default(),
            live_version: Gauge::default(),
            placement_pending: Gauge::default(),
            registrations: Counter::default(),
            leases_expired: Counter::default(),
            draining_workers: Gauge::default(),
            failed_workers: Gauge::default(),
            routers: Gauge::default(),
            retain_from: Gauge::default(),
            registry: Registry::default(),
        };
        r.register("workers", "Registered, live workers", m.workers.clone());
        r.register(
            "target_version",
            "Version of the placement being loaded",
            m.target_version.clone(),
        );
        r.register(
            "live_version",
            "Version of the placement routers use",
            m.live_version.clone(),
        );
        r.register(
            "placement_pending",
            "1 while the target placement is not live yet",
            m.placement_pending.clone(),
        );
        r.register(
            "registrations",
            "Worker registrations",
            m.registrations.clone(),
        );
        r.register(
            "leases_expired",
            "Workers dropped for missing heartbeats",
            m.leases_expired.clone(),
        );
        r.register(
            "draining_workers",
            "Workers leaving, placed on nothing while routers move on",
            m.draining_workers.clone(),
        );
        r.register(
            "failed_workers",
            "Workers that could not load their assignment, placed on nothing",
            m.failed_workers.clone(),
        );
        r.register(
            "routers",
            "Routers reporting the placement version they use",
            m.routers.clone(),
        );
        r.register(
            "retain_from_version",
            "The oldest placement version workers keep experts for",
            m.retain_from.clone(),
        );
        CoordinatorMetrics { registry: r, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
