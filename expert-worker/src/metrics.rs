//! Every metric an expert worker exports (Prometheus text at `/metrics` on
//! `--metrics-listen`), declared in one place; names prefixed `switchyard_worker_`.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabel {
    pub layer: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabel {
    version: &'static str,
    node: &'static str,
}

#[derive(Debug)]
pub struct WorkerMetrics {
    registry: Registry,
    /// (token, expert) rows computed, per layer.
    pub tokens: Family<LayerLabel, Counter>,
    pub calls: Counter,
    pub rows_per_call: Histogram,
    /// Seconds computing calls.
    pub busy_seconds: Counter<f64, AtomicU64>,
    /// From a call's arrival to the start of its compute.
    pub queue_wait: Histogram,
    pub failed_calls: Counter,
    pub expert_bytes: Gauge,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        WorkerMetrics::new()
    }
}

impl WorkerMetrics {
    pub fn new() -> WorkerMetrics {
        // `switchyard_build_info` as on every node; the rest under `switchyard_worker_`.
        let mut root = Registry::with_prefix("switchyard");
        let build_info: Family<BuildLabel, Gauge> = Family::default();
        build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
                node: "worker",
            })
            .set(1);
        root.register(
            "build_info",
            "The build serving: 1, labelled with its version and the node kind",
            build_info,
        );
        let r = root.sub_registry_with_prefix("worker");
        let m = WorkerMetrics {
            tokens: Family::default(),
            calls: Counter::default(),
            rows_per_call: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            busy_seconds: Counter::default(),
            queue_wait: Histogram::new(exponential_buckets(0.000_05, 2.0, 18)),
            failed_calls: Counter::default(),
            expert_bytes: Gauge::default(),
            registry: Registry::default(),
        };
        r.register(
            "tokens",
            "(token, expert) rows computed, per layer",
            m.tokens.clone(),
        );
        r.register("calls", "Expert calls served", m.calls.clone());
        r.register(
            "rows_per_call",
            "Token rows per call",
            m.rows_per_call.clone(),
        );
        r.register(
            "busy_seconds",
            "Seconds computing calls",
            m.busy_seconds.clone(),
        );
        r.register(
            "queue_wait_seconds",
            "From a call's arrival to the start of its compute",
            m.queue_wait.clone(),
        );
        r.register(
            "failed_calls",
            "Calls answered with an error",
            m.failed_calls.clone(),
        );
        r.register(
            "expert_bytes",
            "Bytes of routed-expert weights held",
            m.expert_bytes.clone(),
        );
        WorkerMetrics {
            registry: root,
            ..m
        }
    }

    /// The Prometheus text exposition.
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
        let text = WorkerMetrics::new().render();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "switchyard_build_info{{version=\"{version}\",node=\"worker\"}} 1"
            )),
            "{text}"
        );
        assert!(text.contains("switchyard_worker_calls_total"), "{text}");
    }
}
