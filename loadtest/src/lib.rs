//! `switchyard-loadtest`: drives a router with a closed loop (`concurrency` requests in
//! flight) or an open loop (Poisson arrivals at `rate` per second), over gRPC or HTTP, and
//! reports throughput, latency percentiles, errors by kind and — read from the router's
//! expert-load endpoint — how evenly the tokens fell on experts and workers.
//!
//! - [`workload`]: what to send (length distributions, JSONL datasets);
//! - [`client`]: how (gRPC `Generate` stream or HTTP SSE), timing every token;
//! - [`stats`]: percentiles and utilisation figures (pure);
//! - [`report`]: the JSON report (schema in `docs/loadtest-report.schema.json`) and the table;
//! - [`plot`]: SVG pictures of the same.

pub mod client;
pub mod plot;
pub mod report;
pub mod stats;
pub mod workload;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand_distr::{Distribution, Exp};
use tokio::sync::Mutex;

pub use client::{RequestRecord, RequestSettings, Target};
pub use report::Report;
use workload::Workload;

#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error("{0}")]
    Input(String),
    #[error("cannot reach the router: {0}")]
    Connect(String),
    #[error("writing {path}: {reason}")]
    Output { path: String, reason: String },
}

/// How requests arrive.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Arrivals {
    /// A fixed number in flight: each finished request is replaced at once.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` requests per second, whatever is in flight.
    Open { rate: f64 },
}

/// When a run stops.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Stop {
    Requests(usize),
    Duration(Duration),
}

#[derive(Clone, Debug)]
pub struct LoadtestConfig {
    pub arrivals: Arrivals,
    pub stop: Stop,
    /// Requests sent (one at a time) and discarded before measuring.
    pub warmup: usize,
    pub workload: Workload,
    pub settings: RequestSettings,
    pub seed: u64,
    /// Open loop: at most this many requests in flight (a bound on the load generator itself).
    pub max_in_flight: usize,
    /// Hottest / coldest experts listed per layer.
    pub top_experts: usize,
}

/// Live progress, for a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicUsize,
    pub failed: AtomicUsize,
}

/// Runs the load test against `target` and returns the report. `progress` is updated as
/// requests finish.
pub async fn run(
    target: Target,
    config: &LoadtestConfig,
    progress: Arc<Progress>,
) -> Result<Report, LoadtestError> {
    if let Arrivals::Open { rate } = config.arrivals
        && !(rate.is_finite() && rate > 0.0)
    {
        return Err(LoadtestError::Input(format!(
            "--rate must be a positive number of requests per second, got {rate}"
        )));
    }
    if let Arrivals::Closed { concurrency: 0 } = config.arrivals {
        return Err(LoadtestError::Input(
            "--concurrency must be >= 1, got 0".into(),
        ));
    }
    let mut rng = StdRng::seed_from_u64(config.seed);
    for i in 0..config.warmup {
        let item = config.workload.item(i, &mut rng);
        let rec = target.send(&item, &config.settings, 0.0).await;
        if let Some(e) = rec.error {
            return Err(LoadtestError::Connect(format!(
                "warm-up request failed: {e}"
            )));
        }
    }
    // Count only the measured run's tokens; a router without the endpoint still gets a report.
    let load_before = target.expert_load(true, &config.settings).await;
    let start = Instant::now();
    let records = match config.arrivals {
        Arrivals::Closed { concurrency } => {
            closed_loop(&target, config, concurrency, start, rng, &progress).await
        }
        Arrivals::Open { rate } => open_loop(&target, config, rate, start, rng, &progress).await,
    };
    let wall = start.elapsed();
    let load = match load_before {
        Ok(_) => target.expert_load(false, &config.settings).await.ok(),
        Err(_) => None,
    };
    Ok(Report::build(config, records, wall, load))
}

fn more(config: &LoadtestConfig, issued: usize, start: Instant) -> bool {
    match config.stop {
        Stop::Requests(n) => issued < n,
        Stop::Duration(d) => start.elapsed() < d,
    }
}

async fn closed_loop(
    target: &Target,
    config: &LoadtestConfig,
    concurrency: usize,
    start: Instant,
    rng: StdRng,
    progress: &Arc<Progress>,
) -> Vec<RequestRecord> {
    let issued = Arc::new(AtomicUsize::new(0));
    let rng = Arc::new(Mutex::new(rng));
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (target, config) = (target.clone(), config.clone());
        let (issued, rng, records, progress) = (
            issued.clone(),
            rng.clone(),
            records.clone(),
            progress.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                let i = issued.fetch_add(1, Ordering::AcqRel);
                if !more(&config, i, start) {
                    break;
                }
                let item = config.workload.item(i, &mut *rng.lock().await);
                let rec = target
                    .send(&item, &config.settings, start.elapsed().as_secs_f64())
                    .await;
                tally(&progress, &rec);
                records.lock().await.push(rec);
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut out = std::mem::take(&mut *records.lock().await);
    out.sort_by(|a, b| a.started_s.total_cmp(&b.started_s));
    out
}

async fn open_loop(
    target: &Target,
    config: &LoadtestConfig,
    rate: f64,
    start: Instant,
    mut rng: StdRng,
    progress: &Arc<Progress>,
) -> Vec<RequestRecord> {
    let gaps = Exp::new(rate).unwrap_or_else(|_| Exp::new(1.0).expect("1 is a valid rate"));
    let in_flight = Arc::new(tokio::sync::Semaphore::new(config.max_in_flight.max(1)));
    let records = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    let mut next = Duration::ZERO;
    let mut i = 0;
    while more(config, i, start) {
        tokio::time::sleep_until((start + next).into()).await;
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break;
        };
        let item = config.workload.item(i, &mut rng);
        let (target, settings) = (target.clone(), config.settings.clone());
        let (records, progress) = (records.clone(), progress.clone());
        tasks.push(tokio::spawn(async move {
            let rec = target
                .send(&item, &settings, start.elapsed().as_secs_f64())
                .await;
            drop(permit);
            tally(&progress, &rec);
            records.lock().await.push(rec);
        }));
        i += 1;
        next += Duration::from_secs_f64(gaps.sample(&mut rng));
    }
    for t in tasks {
        let _ = t.await;
    }
    let mut out = std::mem::take(&mut *records.lock().await);
    out.sort_by(|a, b| a.started_s.total_cmp(&b.started_s));
    out
}

fn tally(progress: &Progress, rec: &RequestRecord) {
    progress.done.fetch_add(1, Ordering::Relaxed);
    if rec.error.is_some() {
        progress.failed.fetch_add(1, Ordering::Relaxed);
    }
}
