//! `switchyard loadtest`: drive a router and report throughput, latency and expert
//! utilisation. The work is in `switchyard-loadtest`; this is flags and printing.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use switchyard_loadtest::workload::{Length, Workload};
use switchyard_loadtest::{
    Arrivals, LoadtestConfig, Progress, RequestSettings, Stop, Target, plot,
};

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["router", "http"])))]
pub struct LoadtestArgs {
    /// A router's gRPC address (`host:port`): requests use the streaming `Generate`.
    #[arg(long, env = "SWITCHYARD_ROUTER")]
    router: Option<String>,
    /// A router's HTTP address instead (`host:port` or URL): streamed `/v1/completions`.
    #[arg(long, env = "SWITCHYARD_HTTP")]
    http: Option<String>,
    /// Closed loop: keep this many requests in flight (the default, with 8).
    #[arg(long, conflicts_with = "rate")]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Requests to send (the default, with 100).
    #[arg(long, conflicts_with = "duration")]
    requests: Option<usize>,
    /// Or send for this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Requests sent one at a time and not measured, before the run.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Prompt tokens: `128` or a uniform range `64:256` (random token ids).
    #[arg(long, default_value = "128")]
    prompt_len: Length,
    /// Output tokens: `64` or a uniform range `32:128`.
    #[arg(long, default_value = "64")]
    output_len: Length,
    /// Prompts from a JSONL file instead, one object per line: `{"prompt": "..."}` or
    /// `{"prompt_ids": [...]}`, optionally with `"max_tokens"`.
    #[arg(long)]
    dataset: Option<PathBuf>,
    /// Sampling temperature of every request (0 is greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Stop at end-of-sequence tokens (by default outputs run to their length).
    #[arg(long)]
    respect_eos: bool,
    /// Per-request timeout, in seconds.
    #[arg(long, default_value_t = 600.0)]
    timeout_s: f64,
    /// The router's API key, if it needs one.
    #[arg(long, env = "SWITCHYARD_API_KEY")]
    api_key: Option<String>,
    /// Seed of the random prompts and lengths.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Open loop: most requests in flight at once (bounds the load generator).
    #[arg(long, default_value_t = 4096)]
    max_in_flight: usize,
    /// Hottest and coldest experts listed per layer.
    #[arg(long, default_value_t = 3)]
    top_experts: usize,
    /// Write the full report as JSON (schema: docs/loadtest-report.schema.json).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write SVG plots here: expert heatmap, tokens per worker, latency CDFs.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print the report as JSON on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

pub fn run(args: LoadtestArgs) -> anyhow::Result<()> {
    let arrivals = match (args.concurrency, args.rate) {
        (_, Some(rate)) => Arrivals::Open { rate },
        (c, None) => Arrivals::Closed {
            concurrency: c.unwrap_or(8),
        },
    };
    let stop = match (args.requests, args.duration) {
        (_, Some(d)) if !(d.is_finite() && d > 0.0) => {
            bail!("--duration must be a positive number of seconds, got {d}")
        }
        (_, Some(d)) => Stop::Duration(Duration::from_secs_f64(d)),
        (n, None) => Stop::Requests(n.unwrap_or(100)),
    };
    if !(args.timeout_s.is_finite() && args.timeout_s > 0.0) {
        bail!("--timeout-s must be positive, got {}", args.timeout_s);
    }
    let settings = RequestSettings {
        temperature: args.temperature,
        ignore_eos: !args.respect_eos,
        timeout: Duration::from_secs_f64(args.timeout_s),
        api_key: args.api_key.clone(),
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let report = runtime.block_on(async {
        let target = match (&args.router, &args.http) {
            (Some(r), _) => Target::grpc(r).await?,
            (None, Some(h)) => Target::http(h)?,
            (None, None) => bail!("give --router or --http"),
        };
        let workload = match &args.dataset {
            Some(path) => Workload::read_dataset(path, args.output_len)?,
            None => {
                let (vocab, _) = target
                    .model_info(&settings)
                    .await
                    .context("asking the router for its model")?;
                Workload::Synthetic {
                    prompt_len: args.prompt_len,
                    output_len: args.output_len,
                    vocab,
                }
            }
        };
        let config = LoadtestConfig {
            arrivals,
            stop,
            warmup: args.warmup,
            workload,
            settings: settings.clone(),
            seed: args.seed,
            max_in_flight: args.max_in_flight,
            top_experts: args.top_experts,
        };
        let progress = Arc::new(Progress::default());
        let bar = progress_bar(&args, stop);
        let ticker = bar.clone().map(|bar| {
            let progress = progress.clone();
            tokio::spawn(async move {
                loop {
                    bar.set_position(progress.done.load(Ordering::Relaxed) as u64);
                    bar.set_message(format!(
                        "{} failed",
                        progress.failed.load(Ordering::Relaxed)
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            })
        });
        let report = switchyard_loadtest::run(target, &config, progress).await;
        if let Some(t) = ticker {
            t.abort();
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        anyhow::Ok(report?)
    })?;
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(&report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(dir) = &args.plot {
        for f in plot::write_all(&report, dir)? {
            eprintln!("wrote {}", f.display());
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        print!("{}", report.table());
    }
    if report.requests.ok == 0 {
        bail!("every request failed: {:?}", report.requests.errors);
    }
    Ok(())
}

fn progress_bar(args: &LoadtestArgs, stop: Stop) -> Option<indicatif::ProgressBar> {
    if args.quiet || args.json {
        return None;
    }
    let bar = match stop {
        Stop::Requests(n) => indicatif::ProgressBar::new(n as u64),
        Stop::Duration(_) => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{bar:40}] {pos}/{len} requests · {msg}",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    Some(bar)
}
