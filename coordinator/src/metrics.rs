//! Every metric the coordinator exports (Prometheus text at `/metrics` on `--metrics-listen`),
//! declared in one place; names prefixed `switchyard_coordinator_`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
    node: &'static str,
}

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
    /// Rebalances that changed the placement.
    pub rebalances: Counter,
    /// Expert copies loaded by rebalances.
    pub rebalance_moves: Counter,
    pub rebalance_bytes: Counter,
    /// Mean over MoE layers of the live placement's predicted max / mean worker load.
    pub predicted_imbalance: Gauge<f64, AtomicU64>,
    /// The same, measured by routers (decayed counts).
    pub observed_imbalance: Gauge<f64, AtomicU64>,
    /// Decayed tokens routed to experts, all layers.
    pub load_tokens: Gauge<f64, AtomicU64>,
}

impl Default for CoordinatorMetrics {
    fn default() -> Self {
        CoordinatorMetrics::new()
    }
}

impl CoordinatorMetrics {
    pub fn new() -> CoordinatorMetrics {
        // `switchyard_build_info` as on every node; the rest under `switchyard_coordinator_`.
        let mut root = Registry::with_prefix("switchyard");
        let build_info: Family<BuildLabel, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
                node: "coordinator",
            })
            .set(1);
        root.register(
            "build_info",
            "The build serving: 1, labelled with its version and the node kind",
            build_info,
        );
        let r = root.sub_registry_with_prefix("coordinator");
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
            rebalances: Counter::default(),
            rebalance_moves: Counter::default(),
            rebalance_bytes: Counter::default(),
            predicted_imbalance: Gauge::default(),
            observed_imbalance: Gauge::default(),
            load_tokens: Gauge::default(),
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
        r.register(
            "rebalances",
            "Rebalances that changed the expert placement",
            m.rebalances.clone(),
        );
        r.register(
            "rebalance_moved_experts",
            "Expert copies loaded by workers because of rebalances",
            m.rebalance_moves.clone(),
        );
        r.register(
            "rebalance_loaded_bytes",
            "Bytes of expert weights loaded because of rebalances",
            m.rebalance_bytes.clone(),
        );
        r.register(
            "predicted_imbalance",
            "Mean over MoE layers of the live placement's predicted max / mean worker load under the observed load",
            m.predicted_imbalance.clone(),
        );
        r.register(
            "observed_imbalance",
            "Mean over MoE layers of the max / mean worker load routers measured (decayed)",
            m.observed_imbalance.clone(),
        );
        r.register(
            "load_tokens",
            "Decayed tokens routed to experts over all MoE layers, as routers report them",
            m.load_tokens.clone(),
        );
        CoordinatorMetrics {
            registry: root,
            ..m
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_is_shared_and_the_rest_keeps_its_prefix() {
        let text = CoordinatorMetrics::new().render();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "switchyard_build_info{{version=\"{version}\",node=\"coordinator\"}} 1"
            )),
            "{text}"
        );
        assert!(
            text.contains("switchyard_coordinator_registrations_total"),
            "{text}"
        );
    }
}
