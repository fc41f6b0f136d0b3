//! What the streaming cluster tests (`churn`, `rebalance`) share: serving options for the tiny
//! model, one greedy request's tokens, and the failed expert calls a router counted.

// Not every test binary uses every helper.
#![allow(dead_code)]

use switchyard_router::metrics::RouterMetrics;
use switchyard_router::request::RawRequest;
use switchyard_router::scheduler::Event;
use switchyard_router::server::{ServingOptions, ServingState};

pub fn serving() -> ServingOptions {
    ServingOptions {
        model_name: "tiny".into(),
        metrics_auth: false,
        api_tls: None,
        api_key: None,
        kv_cache_bytes: 64 << 20,
        block_size: 16,
        max_batch_size: 32,
        max_batch_tokens: 256,
        max_waiting: 256,
        step_retry: switchyard_router::server::DEFAULT_STEP_RETRY,
        default_max_tokens: 16,
        max_model_len: None,
        metrics: RouterMetrics::new(),
    }
}

/// One request's tokens, or why it failed.
pub fn tokens(state: &ServingState, request: RawRequest) -> Result<Vec<u32>, String> {
    let mut stream = state.submit(request).map_err(|e| e.to_string())?;
    let mut tokens = Vec::new();
    while let Some(event) = stream.events.blocking_recv() {
        match event {
            Event::Token { id, .. } => tokens.push(id),
            Event::Finished { .. } => return Ok(tokens),
            Event::Failed(e) => return Err(e.to_string()),
        }
    }
    Err("the stream ended without finishing".into())
}

/// Expert calls that failed, summed over workers, from the rendered metrics.
pub fn failed_calls(metrics: &RouterMetrics) -> u64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("switchyard_dispatch_failed_calls_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}
