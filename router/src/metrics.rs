//! Every metric the router exports, declared in one place. Prometheus text at `/metrics`;
//! names prefixed `switchyard_`; labels stay low-cardinality (outcome, phase, layer, worker —
//! never expert: per-expert counts are too many series at DeepSeek-V3 scale, 58 × 256, and are
//! served as JSON by the expert-load endpoint instead).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PhaseLabel {
    pub phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LayerLabel {
    pub layer: u32,
}

/// A worker: the coordinator's worker id, or its address in static `--workers` mode — the
/// same across placement versions either way.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerLabel {
    pub worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ImbalanceLabel {
    pub layer: u32,
    /// `expert` or `worker`: max / mean tokens over which.
    pub over: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabel {
    pub version: &'static str,
    pub node: &'static str,
}

/// Every value of [`DispatchMetrics::hedges`]' `outcome` label.
pub const HEDGE_OUTCOMES: [&str; 5] = ["sent", "won", "lost", "no_replica", "no_budget"];

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Every value of [`RouterMetrics::requests`]' `outcome` label; each series exists from the
/// start, at 0, so a rate over `failed` reads 0 rather than no data.
pub const OUTCOMES: [&str; 7] = [
    "length",
    "stop",
    "failed",
    "cancelled",
    "deadline",
    "rejected",
    "invalid",
];

/// Every value of [`RouterMetrics::step_phase_seconds`]' `phase` label.
pub const PHASES: [&str; 7] = [
    "attention",
    "dense_ffn",
    "gate",
    "experts",
    "shared_expert",
    "other",
    "sampling",
];

fn latency_histogram() -> Histogram {
    // 0.25 ms .. ~33 s.
    Histogram::new(exponential_buckets(0.000_25, 2.0, 18))
}

/// What the expert pool records per layer and per worker, and how its placement follows the
/// coordinator. Cheap to clone (shared handles).
#[derive(Clone, Debug)]
pub struct DispatchMetrics {
    pub layer_seconds: HistogramFamily<LayerLabel>,
    /// Per call: the worker's queue and compute time, as its reply reports it.
    pub worker_seconds: HistogramFamily<LayerLabel>,
    /// Per call: the round trip less the worker's time — the network and both ends' hand-offs.
    pub network_seconds: HistogramFamily<LayerLabel>,
    pub calls: Family<WorkerLabel, Counter>,
    pub bytes_sent: Family<WorkerLabel, Counter>,
    pub bytes_received: Family<WorkerLabel, Counter>,
    pub rows_sent: Family<WorkerLabel, Counter>,
    pub failed_calls: Family<WorkerLabel, Counter>,
    /// Calls re-planned and sent again: `worker_lost` (unavailable, too slow) or
    /// `expert_moved` (the worker no longer held an expert).
    pub retried_calls: Family<ReasonLabel, Counter>,
    /// Hedges of slow calls, by what came of them: `sent`, `won` (the hedge answered first),
    /// `lost` (the slow call answered first), `no_replica` (nobody else holds its experts),
    /// `no_budget` (the hedge budget was spent).
    pub hedges: Family<OutcomeLabel, Counter>,
    /// Workers avoided as suspect (a call missed its time) until a health probe answers.
    pub suspect_workers: Gauge,
    /// The placement version in use (0 in static mode or before the first).
    pub placement_version: Gauge,
    /// Placement versions switched to.
    pub placement_switches: Counter,
    /// Attempts to switch to a new placement version that failed (each is retried).
    pub placement_switch_failures: Counter,
    /// Workers the pool holds connections to.
    pub workers: Gauge,
}

impl Default for DispatchMetrics {
    fn default() -> Self {
        DispatchMetrics {
            layer_seconds: Family::new_with_constructor(latency_histogram),
            worker_seconds: Family::new_with_constructor(latency_histogram),
            network_seconds: Family::new_with_constructor(latency_histogram),
            calls: Family::default(),
            bytes_sent: Family::default(),
            bytes_received: Family::default(),
            rows_sent: Family::default(),
            failed_calls: Family::default(),
            retried_calls: Family::default(),
            hedges: Family::default(),
            suspect_workers: Gauge::default(),
            placement_version: Gauge::default(),
            placement_switches: Counter::default(),
            placement_switch_failures: Counter::default(),
            workers: Gauge::default(),
        }
    }
}

impl DispatchMetrics {
    /// Pre-creates the series that count failures, so they read 0 before the first one.
    pub fn touch(&self, worker: &WorkerLabel) {
        let _ = self.calls.get_or_create(worker);
        let _ = self.failed_calls.get_or_create(worker);
        for reason in ["worker_lost", "expert_moved"] {
            let _ = self.retried_calls.get_or_create(&ReasonLabel { reason });
        }
        for outcome in HEDGE_OUTCOMES {
            let _ = self.hedges.get_or_create(&OutcomeLabel { outcome });
        }
    }
}

/// The router's metrics and the registry that renders them.
#[derive(Debug)]
pub struct RouterMetrics {
    registry: Registry,
    /// Requests by how they ended: `length`, `stop`, `failed`, `cancelled`, `deadline`,
    /// `rejected` (queue full), `invalid`.
    pub requests: Family<OutcomeLabel, Counter>,
    pub queue_depth: Gauge,
    pub running: Gauge,
    pub kv_blocks_used: Gauge,
    pub kv_blocks_free: Gauge,
    pub preemptions: Counter,
    /// Steps that failed for want of an expert worker, their sequences re-queued.
    pub retried_steps: Counter,
    pub time_to_first_token: Histogram,
    pub inter_token_latency: Histogram,
    pub request_duration: Histogram,
    pub prompt_tokens: Counter,
    pub generation_tokens: Counter,
    /// Seconds spent per step phase: `attention`, `dense_ffn`, `gate`, `experts` (dispatch
    /// and wait when remote), `shared_expert`, `other`, `sampling`.
    pub step_phase_seconds: Family<PhaseLabel, Counter<f64, AtomicU64>>,
    pub step_duration: Histogram,
    pub step_tokens: Histogram,
    /// Per MoE layer, max / mean tokens per expert and per worker over the expert-load window.
    pub imbalance: Family<ImbalanceLabel, Gauge<f64, AtomicU64>>,
    pub dispatch: DispatchMetrics,
    /// 1, labelled with the version and the node kind (`switchyard_build_info`).
    pub build_info: Family<BuildLabel, Gauge>,
}

impl RouterMetrics {
    pub fn new() -> Arc<RouterMetrics> {
        let mut r = Registry::with_prefix("switchyard");
        let m = RouterMetrics {
            requests: Family::default(),
            queue_depth: Gauge::default(),
            running: Gauge::default(),
            kv_blocks_used: Gauge::default(),
            kv_blocks_free: Gauge::default(),
            preemptions: Counter::default(),
            retried_steps: Counter::default(),
            time_to_first_token: latency_histogram(),
            inter_token_latency: latency_histogram(),
            request_duration: latency_histogram(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            step_phase_seconds: Family::default(),
            step_duration: latency_histogram(),
            step_tokens: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            imbalance: Family::default(),
            dispatch: DispatchMetrics::default(),
            build_info: Family::default(),
            registry: Registry::default(),
        };
        for outcome in OUTCOMES {
            let _ = m.requests.get_or_create(&OutcomeLabel { outcome });
        }
        for phase in PHASES {
            let _ = m.step_phase_seconds.get_or_create(&PhaseLabel { phase });
        }
        m.build_info
            .get_or_create(&BuildLabel {
                version: env!("CARGO_PKG_VERSION"),
                node: "router",
            })
            .set(1);
        r.register(
            "build_info",
            "The build serving: 1, labelled with its version and the node kind",
            m.build_info.clone(),
        );
        r.register("requests", "Requests by outcome", m.requests.clone());
        r.register(
            "queue_depth",
            "Requests waiting for a batch slot",
            m.queue_depth.clone(),
        );
        r.register(
            "running_sequences",
            "Sequences in the running batch",
            m.running.clone(),
        );
        r.register(
            "kv_blocks_used",
            "KV cache blocks in use",
            m.kv_blocks_used.clone(),
        );
        r.register(
            "kv_blocks_free",
            "KV cache blocks free",
            m.kv_blocks_free.clone(),
        );
        r.register(
            "preemptions",
            "Sequences preempted for KV blocks",
            m.preemptions.clone(),
        );
        r.register(
            "retried_steps",
            "Steps that failed for want of an expert worker; their sequences waited and were recomputed",
            m.retried_steps.clone(),
        );
        r.register(
            "time_to_first_token_seconds",
            "Arrival to first token",
            m.time_to_first_token.clone(),
        );
        r.register(
            "inter_token_latency_seconds",
            "Time between consecutive tokens of a sequence",
            m.inter_token_latency.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Arrival to last token",
            m.request_duration.clone(),
        );
        r.register(
            "prompt_tokens",
            "Prompt tokens admitted",
            m.prompt_tokens.clone(),
        );
        r.register(
            "generation_tokens",
            "Tokens generated",
            m.generation_tokens.clone(),
        );
        r.register(
            "step_phase_seconds",
            "Seconds of scheduler steps by phase",
            m.step_phase_seconds.clone(),
        );
        r.register(
            "step_duration_seconds",
            "One forward step",
            m.step_duration.clone(),
        );
        r.register(
            "step_tokens",
            "Tokens per forward step",
            m.step_tokens.clone(),
        );
        r.register(
            "expert_load_imbalance",
            "Max over mean tokens per expert or per worker, per MoE layer, over the expert-load window",
            m.imbalance.clone(),
        );
        r.register(
            "dispatch_layer_seconds",
            "One MoE layer's expert calls, send to last reply",
            m.dispatch.layer_seconds.clone(),
        );
        r.register(
            "dispatch_bytes_sent",
            "Hidden-state bytes sent to each worker",
            m.dispatch.bytes_sent.clone(),
        );
        r.register(
            "dispatch_bytes_received",
            "Bytes received from each worker",
            m.dispatch.bytes_received.clone(),
        );
        r.register(
            "dispatch_rows_sent",
            "Token rows sent to each worker",
            m.dispatch.rows_sent.clone(),
        );
        r.register(
            "dispatch_failed_calls",
            "Expert calls to each worker that failed",
            m.dispatch.failed_calls.clone(),
        );
        r.register(
            "dispatch_worker_seconds",
            "Per expert call, the worker's queue and compute time",
            m.dispatch.worker_seconds.clone(),
        );
        r.register(
            "dispatch_network_seconds",
            "Per expert call, the round trip less the worker's time",
            m.dispatch.network_seconds.clone(),
        );
        r.register(
            "dispatch_calls",
            "Expert calls sent to each worker",
            m.dispatch.calls.clone(),
        );
        r.register(
            "dispatch_retried_calls",
            "Expert calls re-planned and sent again, by reason",
            m.dispatch.retried_calls.clone(),
        );
        r.register(
            "dispatch_hedges",
            "Hedged expert calls (sent again to a replica after missing a multiple of the recent p99), by outcome",
            m.dispatch.hedges.clone(),
        );
        r.register(
            "dispatch_suspect_workers",
            "Expert workers avoided while replicas exist, until a health probe answers",
            m.dispatch.suspect_workers.clone(),
        );
        r.register(
            "placement_version",
            "The placement version this router dispatches with",
            m.dispatch.placement_version.clone(),
        );
        r.register(
            "placement_switches",
            "Placement versions switched to",
            m.dispatch.placement_switches.clone(),
        );
        r.register(
            "placement_switch_failures",
            "Failed attempts to switch to a new placement version (retried with backoff)",
            m.dispatch.placement_switch_failures.clone(),
        );
        r.register(
            "expert_workers",
            "Expert workers this router holds connections to",
            m.dispatch.workers.clone(),
        );
        Arc::new(RouterMetrics { registry: r, ..m })
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn outcome(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn phase(&self, phase: &'static str, seconds: f64) {
        self.step_phase_seconds
            .get_or_create(&PhaseLabel { phase })
            .inc_by(seconds);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prefixed_names_and_labels() {
        let m = RouterMetrics::new();
        m.outcome("length");
        m.phase("attention", 0.5);
        m.dispatch
            .bytes_sent
            .get_or_create(&WorkerLabel { worker: "3".into() })
            .inc_by(10);
        let text = m.render();
        assert!(
            text.contains("switchyard_requests_total{outcome=\"length\"} 1"),
            "{text}"
        );
        assert!(text.contains("switchyard_step_phase_seconds_total{phase=\"attention\"} 0.5"));
        assert!(text.contains("switchyard_dispatch_bytes_sent_total{worker=\"3\"} 10"));
        assert!(text.contains("# TYPE switchyard_time_to_first_token_seconds histogram"));
        assert!(text.trim_end().ends_with("# EOF"));
    }

    #[test]
    fn every_outcome_and_phase_reads_zero_before_it_happens() {
        let text = RouterMetrics::new().render();
        for outcome in OUTCOMES {
            assert!(
                text.contains(&format!(
                    "switchyard_requests_total{{outcome=\"{outcome}\"}} 0"
                )),
                "{outcome}: {text}"
            );
        }
        for phase in PHASES {
            assert!(
                text.contains(&format!(
                    "switchyard_step_phase_seconds_total{{phase=\"{phase}\"}} 0"
                )),
                "{phase}"
            );
        }
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!(
                "switchyard_build_info{{version=\"{version}\",node=\"router\"}} 1"
            )),
            "{text}"
        );
    }
}
