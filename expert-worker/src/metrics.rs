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
        let mut r = Registry::with_prefix("switchyard_worker");
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
        WorkerMetrics { registry: r, ..m }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
