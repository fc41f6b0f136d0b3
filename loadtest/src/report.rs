//! The load-test report: everything a run measured, as JSON (`--report`, schema in
//! `docs/loadtest-report.schema.json`) and as the table printed at the end.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::stats::{self, LoadSnapshot, Percentiles, Utilisation};
use crate::workload::{Length, Workload};
use crate::{Arrivals, LoadtestConfig, RequestRecord, Stop};

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunConfig {
    /// `closed` or `open`.
    pub arrivals: String,
    pub concurrency: Option<usize>,
    pub rate: Option<f64>,
    pub requests: Option<usize>,
    pub duration_s: Option<f64>,
    pub warmup: usize,
    /// e.g. `synthetic prompt=128 output=32:64` or `dataset (N prompts) output=64`.
    pub workload: String,
    pub temperature: f32,
    pub ignore_eos: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub total: usize,
    pub ok: usize,
    pub failed: usize,
    /// Failures by kind (gRPC code or `http NNN`).
    pub errors: BTreeMap<String, usize>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub requests_per_s: f64,
    pub output_tokens_per_s: f64,
    pub input_tokens_per_s: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub ttft: Percentiles,
    pub inter_token: Percentiles,
    pub e2e: Percentiles,
}

/// One request, for CDFs and offline analysis.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRow {
    pub started_s: f64,
    pub prompt_tokens: u32,
    pub output_tokens: u32,
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub config: RunConfig,
    pub duration_s: f64,
    pub requests: Counts,
    pub throughput: Throughput,
    /// Milliseconds, successful requests only.
    pub latency_ms: Latency,
    /// From the router's expert-load endpoint over the run; null if it could not be read.
    pub expert_utilisation: Option<Utilisation>,
    pub per_request: Vec<RequestRow>,
}

fn describe(l: &Length) -> String {
    match l {
        Length::Fixed(n) => n.to_string(),
        Length::Uniform(a, b) => format!("{a}:{b}"),
    }
}

impl Report {
    pub fn build(
        config: &LoadtestConfig,
        records: Vec<RequestRecord>,
        wall: Duration,
        load: Option<LoadSnapshot>,
    ) -> Report {
        let secs = wall.as_secs_f64().max(1e-9);
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.error.is_none()).collect();
        let mut errors = BTreeMap::new();
        for r in &records {
            if let Some(e) = &r.error {
                *errors.entry(e.clone()).or_insert(0) += 1;
            }
        }
        let prompt_tokens: u64 = ok.iter().map(|r| u64::from(r.prompt_tokens)).sum();
        let output_tokens: u64 = ok.iter().map(|r| u64::from(r.output_tokens)).sum();
        let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_ms).collect();
        let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_ms.iter().copied()).collect();
        let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_ms).collect();
        let (arrivals, concurrency, rate) = match config.arrivals {
            Arrivals::Closed { concurrency } => ("closed", Some(concurrency), None),
            Arrivals::Open { rate } => ("open", None, Some(rate)),
        };
        let (requests, duration_s) = match config.stop {
            Stop::Requests(n) => (Some(n), None),
            Stop::Duration(d) => (None, Some(d.as_secs_f64())),
        };
        let workload = match &config.workload {
            Workload::Synthetic {
                prompt_len,
                output_len,
                ..
            } => format!(
                "synthetic prompt={} output={}",
                describe(prompt_len),
                describe(output_len)
            ),
            Workload::Dataset { lines, output_len } => format!(
                "dataset ({} prompts) output={}",
                lines.len(),
                describe(output_len)
            ),
        };
        Report {
            schema_version: SCHEMA_VERSION,
            config: RunConfig {
                arrivals: arrivals.into(),
                concurrency,
                rate,
                requests,
                duration_s,
                warmup: config.warmup,
                workload,
                temperature: config.settings.temperature,
                ignore_eos: config.settings.ignore_eos,
            },
            duration_s: secs,
            requests: Counts {
                total: records.len(),
                ok: ok.len(),
                failed: records.len() - ok.len(),
                errors,
            },
            throughput: Throughput {
                requests_per_s: ok.len() as f64 / secs,
                output_tokens_per_s: output_tokens as f64 / secs,
                input_tokens_per_s: prompt_tokens as f64 / secs,
                prompt_tokens,
                output_tokens,
            },
            latency_ms: Latency {
                ttft: stats::percentiles(&ttft),
                inter_token: stats::percentiles(&itl),
                e2e: stats::percentiles(&e2e),
            },
            expert_utilisation: load.map(|l| stats::utilisation(&l, config.top_experts)),
            per_request: records
                .iter()
                .map(|r| RequestRow {
                    started_s: r.started_s,
                    prompt_tokens: r.prompt_tokens,
                    output_tokens: r.output_tokens,
                    ttft_ms: r.ttft_ms,
                    e2e_ms: r.e2e_ms,
                    error: r.error.clone(),
                })
                .collect(),
        }
    }

    /// The human-readable summary.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let c = &self.requests;
        let _ = writeln!(
            s,
            "{} requests in {:.2} s ({} loop, {}): {} ok, {} failed",
            c.total, self.duration_s, self.config.arrivals, self.config.workload, c.ok, c.failed
        );
        for (kind, n) in &c.errors {
            let _ = writeln!(s, "  error {kind}: {n}");
        }
        let t = &self.throughput;
        let _ = writeln!(
            s,
            "throughput: {:.2} req/s · {:.1} output tok/s · {:.1} input tok/s",
            t.requests_per_s, t.output_tokens_per_s, t.input_tokens_per_s
        );
        let _ = writeln!(
            s,
            "{:<16}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "latency (ms)", "mean", "p50", "p90", "p99", "max"
        );
        for (name, p) in [
            ("time to first", &self.latency_ms.ttft),
            ("inter-token", &self.latency_ms.inter_token),
            ("end to end", &self.latency_ms.e2e),
        ] {
            let _ = writeln!(
                s,
                "{name:<16}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                p.mean, p.p50, p.p90, p.p99, p.max
            );
        }
        let Some(u) = &self.expert_utilisation else {
            let _ = writeln!(s, "expert utilisation: not available from this router");
            return s;
        };
        let f = |v: Option<f64>| v.map_or_else(|| "-".into(), |v| format!("{v:.2}"));
        let _ = writeln!(
            s,
            "expert utilisation over {:.1} s ({} MoE layers × {} experts, top-{}): max/mean tokens per expert {} mean, {} worst; per worker {} mean",
            u.window_seconds,
            u.layers.len(),
            u.experts_per_layer,
            u.top_k,
            f(u.mean_expert_imbalance),
            f(u.max_expert_imbalance),
            f(u.mean_worker_imbalance)
        );
        let _ = writeln!(
            s,
            "{:>6}{:>10}{:>10}{:>10}  {:<36}  coldest (tokens)",
            "layer", "tokens", "expert", "worker", "hottest (tokens)"
        );
        let list = |v: &[stats::ExpertTokens]| {
            v.iter()
                .map(|e| format!("{} ({})", e.expert, e.tokens))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for l in &u.layers {
            let _ = writeln!(
                s,
                "{:>6}{:>10}{:>10}{:>10}  {:<36}  {}",
                l.layer,
                l.tokens,
                f(l.expert_imbalance),
                f(l.worker_imbalance),
                list(&l.hottest),
                list(&l.coldest)
            );
        }
        let shares: Vec<String> = u
            .worker_share
            .iter()
            .map(|(w, share)| format!("worker {w} {:.1}%", share * 100.0))
            .collect();
        if !shares.is_empty() {
            let _ = writeln!(s, "share of tokens: {}", shares.join(" · "));
        }
        s
    }
}
