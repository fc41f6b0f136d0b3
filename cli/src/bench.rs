use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use switchyard_engine::bench::{self, BenchOptions, BenchReport};
use switchyard_engine::model::{CausalLm, LoadOptions};
use switchyard_router::experts::DispatchOptions;
use switchyard_router::metrics::{RouterMetrics, WorkerLabel};
use switchyard_router::node::{Experts, RouterNode};
use switchyard_router::server::ServingOptions;

use crate::router::DispatchArgs;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Checkpoint directory (Hugging Face layout).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Batch sizes to measure, comma-separated (default 1,8; 1,8,32 with --workers).
    #[arg(long, value_delimiter = ',')]
    batch: Vec<usize>,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 64)]
    gen_len: usize,
    /// Seed of the random prompts.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Also run the model as a router plus this many local `switchyard worker` processes
    /// (experts split evenly), and report both side by side.
    #[arg(long, default_value_t = 0)]
    workers: usize,
    /// Compute threads of each worker process.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// With --workers: where the workers run their experts (`cpu` or `cuda:N`).
    #[arg(long, default_value = "cpu")]
    worker_device: switchyard_engine::Device,
    /// Where the model's projections, dense FFNs, shared experts and LM head run, in the
    /// single-process run and in the router (`cpu`, `cuda:N` or `cuda:0,1,…`), as
    /// `router --device`.
    #[arg(long, default_value = "cpu")]
    router_device: switchyard_engine::Devices,
    #[command(flatten)]
    dispatch: DispatchArgs,
    #[command(flatten)]
    weights: crate::weights::WeightArgs,
    /// With --workers: give the router (this process) and the workers cores of their own, so
    /// the overlap shows as it would on separate machines: the router core 0, every worker
    /// core 1 (sched_setaffinity; Linux). Use with `--threads 1`.
    #[arg(long)]
    pin: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// Binds the calling thread (and the threads and processes it starts from now on) to `core`.
fn pin_to(core: usize) -> anyhow::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is the empty set; CPU_SET writes within it; the call reads
        // `size_of` bytes of it.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        if rc != 0 {
            bail!(
                "--pin: cannot bind to core {core}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = core;
        bail!("--pin needs Linux (sched_setaffinity)")
    }
}

/// Worker processes, killed and reaped on drop.
struct Nodes(Vec<Child>);

impl Drop for Nodes {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn start_workers(
    args: &BenchArgs,
    experts: usize,
    shared: bool,
) -> anyhow::Result<(Nodes, Vec<String>)> {
    let exe = std::env::current_exe().context("locating the switchyard binary")?;
    // Workers inherit the core this thread is on while it starts them.
    if args.pin {
        pin_to(1)?;
    }
    let nodes = spawn_workers(args, experts, shared, &exe);
    if args.pin {
        pin_to(0)?;
    }
    nodes
}

fn spawn_workers(
    args: &BenchArgs,
    experts: usize,
    shared: bool,
    exe: &std::path::Path,
) -> anyhow::Result<(Nodes, Vec<String>)> {
    let mut nodes = Nodes(Vec::new());
    let mut addrs = Vec::new();
    let per = experts.div_ceil(args.workers);
    for w in 0..args.workers {
        let (lo, hi) = (w * per, ((w + 1) * per).min(experts));
        if lo >= hi {
            bail!(
                "--workers {} is more than the {experts} routed experts",
                args.workers
            );
        }
        let mut child = Command::new(exe)
            .args(["worker", "--model"])
            .arg(&args.model)
            .args([
                "--experts",
                &format!("{lo}-{}", hi - 1),
                "--listen",
                "127.0.0.1:0",
            ])
            .args(shared.then_some("--with-shared-expert"))
            .args(["--device", &args.worker_device.to_string()])
            .env("SWITCHYARD_THREADS", args.worker_threads.to_string())
            .env(crate::weights::ENV, args.weights.value())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        nodes.0.push(child);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            if let Some(Ok(line)) = std::io::BufReader::new(stdout).lines().next() {
                let _ = tx.send(line);
            }
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .with_context(|| format!("worker {w} did not report its address"))?;
        let addr = line
            .split_whitespace()
            .nth(2)
            .context("worker address line")?
            .to_string();
        addrs.push(addr);
    }
    Ok((nodes, addrs))
}

/// A router node's serving settings for the benchmark, which drives the model directly: the
/// scheduler it starts stays idle, so its KV pool is the smallest that starts.
fn bench_serving() -> ServingOptions {
    ServingOptions {
        model_name: "bench".into(),
        metrics_auth: false,
        api_tls: None,
        api_key: None,
        kv_cache_bytes: 64 << 20,
        block_size: 16,
        max_batch_size: 1,
        max_batch_tokens: 16,
        max_waiting: 1,
        step_retry: switchyard_router::server::DEFAULT_STEP_RETRY,
        default_max_tokens: 1,
        max_model_len: None,
        metrics: RouterMetrics::new(),
    }
}

fn print_table(title: &str, report: &BenchReport) {
    println!(
        "{title} · weights {:.1} MiB · {} threads · {} kernels",
        report.weights_bytes as f64 / (1 << 20) as f64,
        report.threads,
        report.kernels
    );
    println!(
        "{:>6} {:>8} {:>8} {:>14} {:>12} {:>14} {:>14}",
        "batch", "prompt", "gen", "prefill tok/s", "prefill ms", "decode tok/s", "step ms"
    );
    for r in &report.rows {
        println!(
            "{:>6} {:>8} {:>8} {:>14.1} {:>12.1} {:>14.1} {:>14.2}",
            r.batch,
            r.prompt_len,
            r.gen_len,
            r.prefill_tok_s,
            r.prefill_ms,
            r.decode_tok_s,
            r.decode_step_ms
        );
    }
}

/// One distributed run's figures.
#[derive(serde::Serialize)]
struct Distributed {
    shared_expert_on: &'static str,
    micro_batches: usize,
    report: BenchReport,
    /// Per batch size: distributed / in-process decode tok/s.
    decode_ratio: Vec<f64>,
    /// Per batch size: what distribution added to a decode step, per MoE layer, in µs.
    us_per_moe_layer: Vec<f64>,
    /// Per batch size, per decode step: the router's own work (the step less its wait for
    /// experts), `A`, and one worker's compute, `E`, in ms.
    router_ms: Vec<f64>,
    worker_ms: Vec<f64>,
    /// Per batch size: the best a perfect overlap of the two could give over running them one
    /// after the other, (A + E) / max(A, E).
    ideal_overlap: Vec<f64>,
    wire_bytes_per_token_per_moe_layer: f64,
}

/// The seconds the workers reported computing (queue and compute), summed over calls, from
/// the router's `dispatch_worker_seconds` histogram.
fn worker_seconds(metrics: &RouterMetrics) -> f64 {
    metrics
        .render()
        .lines()
        .filter(|l| l.starts_with("switchyard_dispatch_worker_seconds_sum"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    if args.batch.is_empty() {
        args.batch = if args.workers > 0 {
            vec![1, 8, 32]
        } else {
            vec![1, 8]
        };
    }
    if args.pin {
        if args.workers == 0 {
            bail!("--pin separates the router's core from the workers': give --workers N");
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if cores < 2 {
            bail!("--pin needs at least 2 cores, this machine has {cores}");
        }
        pin_to(0)?;
    }
    let bench_options = BenchOptions {
        batch_sizes: args.batch.clone(),
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        seed: args.seed,
        micro_batches: 1,
        micro_batch_min_tokens: 0,
    };
    let compute = switchyard_engine::tensor::Compute::open_all(&args.router_device)
        .with_context(|| format!("opening --router-device {}", args.router_device))?;
    let load = LoadOptions {
        weights: args.weights.weight_dtype,
        ..LoadOptions::default()
    };
    let mut model = CausalLm::load(&args.model, &load)
        .with_context(|| format!("loading {}", args.model.display()))?;
    model.offload(&compute)?;
    let local = bench::run(&model, &bench_options)?;
    if args.workers == 0 {
        if args.json {
            println!("{}", serde_json::to_string_pretty(&local)?);
        } else {
            print_table(&format!("model {}", args.model.display()), &local);
            if let Some(peak) = local.peak_rss_bytes {
                println!(
                    "peak memory (RSS): {:.1} MiB",
                    peak as f64 / (1 << 20) as f64
                );
            }
        }
        return Ok(());
    }
    let config = model.config().clone();
    drop(model);
    let moe = config
        .moe
        .as_ref()
        .context("the model has no routed experts")?;
    let has_shared = moe.n_shared_experts > 0;
    let moe_layers = config.moe_layers().len().max(1);
    let (_nodes, addrs) = start_workers(&args, moe.n_routed_experts, has_shared)?;
    // Both placements of the shared expert, when the model has one; with --micro-batches K,
    // 1 and K micro-batches side by side.
    let modes: &[bool] = if has_shared { &[false, true] } else { &[false] };
    let splits: Vec<usize> = match args.dispatch.micro_batches {
        Some(k) if k > 1 => vec![1, k as usize],
        _ => vec![args.dispatch.micro_batches()],
    };
    let mut runs = Vec::new();
    for &on_workers in modes {
        for &micro_batches in &splits {
            let options = DispatchOptions {
                shared_on_workers: on_workers,
                micro_batches,
                ..args.dispatch.options()
            };
            let serving = bench_serving();
            let metrics = serving.metrics.clone();
            // The router node as `switchyard router --workers` assembles it; the benchmark
            // drives its model and expert pool directly, without the scheduler.
            let node = RouterNode::load(
                &args.model,
                &compute,
                Experts::Workers(addrs.clone()),
                args.weights.weight_dtype,
                options,
                &serving,
            )?;
            let pool = node.pool().context("the router node has no expert pool")?;
            let step = pool.step()?;
            let probe = || worker_seconds(&metrics);
            let report = bench::run_probed(
                node.model(),
                &BenchOptions {
                    micro_batches,
                    micro_batch_min_tokens: args.dispatch.micro_batch_min_tokens,
                    ..bench_options.clone()
                },
                &step,
                Some(&probe),
            )?;
            // Wire volume per token per MoE layer, over everything this run sent and received.
            let m = &pool.options().metrics;
            let (mut sent, mut received) = (0u64, 0u64);
            for addr in &addrs {
                let label = WorkerLabel {
                    worker: addr.clone(),
                };
                sent += m.bytes_sent.get_or_create(&label).get();
                received += m.bytes_received.get_or_create(&label).get();
            }
            let tokens: usize = args
                .batch
                .iter()
                .map(|b| b * (args.prompt_len + args.gen_len))
                .sum();
            let pairs = || local.rows.iter().zip(&report.rows);
            let router_ms: Vec<f64> = report
                .rows
                .iter()
                .map(|d| d.decode_step_ms - d.decode_expert_wait_ms)
                .collect();
            let worker_ms: Vec<f64> = report
                .rows
                .iter()
                .map(|d| d.decode_probe_ms.unwrap_or(0.0) / args.workers as f64)
                .collect();
            let distributed = Distributed {
                shared_expert_on: if on_workers { "workers" } else { "router" },
                micro_batches,
                decode_ratio: pairs()
                    .map(|(l, d)| d.decode_tok_s / l.decode_tok_s)
                    .collect(),
                us_per_moe_layer: pairs()
                    .map(|(l, d)| (d.decode_step_ms - l.decode_step_ms) * 1e3 / moe_layers as f64)
                    .collect(),
                ideal_overlap: router_ms
                    .iter()
                    .zip(&worker_ms)
                    .map(|(a, e)| (a + e) / a.max(*e).max(1e-9))
                    .collect(),
                router_ms,
                worker_ms,
                wire_bytes_per_token_per_moe_layer: (sent + received) as f64
                    / (tokens * moe_layers) as f64,
                report,
            };
            drop(step);
            drop(node);
            runs.push(distributed);
        }
    }
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "in_process": local,
                "workers": args.workers,
                "pinned": args.pin,
                "wire_dtype": args.dispatch.wire_dtype,
                "distributed": runs,
            }))?
        );
        return Ok(());
    }
    print_table("in-process", &local);
    for d in &runs {
        print_table(
            &format!(
                "router + {} worker processes{}, shared expert on the {}, {} micro-batch(es) ({} on the wire)",
                args.workers,
                if args.pin { " (pinned)" } else { "" },
                d.shared_expert_on,
                d.micro_batches,
                args.dispatch.wire_dtype
            ),
            &d.report,
        );
        for (i, b) in args.batch.iter().enumerate() {
            println!(
                "batch {b:>3}: distributed / in-process decode = {:.2} · +{:.0} µs per MoE layer · router A {:.2} ms, worker E {:.2} ms per step, ideal overlap {:.2}×",
                d.decode_ratio[i],
                d.us_per_moe_layer[i],
                d.router_ms[i],
                d.worker_ms[i],
                d.ideal_overlap[i]
            );
        }
        println!(
            "wire bytes per token per MoE layer (both directions): {:.0}",
            d.wire_bytes_per_token_per_moe_layer
        );
    }
    // K micro-batches against 1, in the same run: the gain and its share of the ideal.
    for k in runs.iter().filter(|d| d.micro_batches > 1) {
        let Some(one) = runs
            .iter()
            .find(|d| d.micro_batches == 1 && d.shared_expert_on == k.shared_expert_on)
        else {
            continue;
        };
        for (i, b) in args.batch.iter().enumerate() {
            let gain = one.report.rows[i].decode_step_ms / k.report.rows[i].decode_step_ms;
            let ideal = one.ideal_overlap[i];
            println!(
                "batch {b:>3}, shared expert on the {}: {} micro-batches decode {gain:.2}× of 1 (ideal {ideal:.2}×: {:.0}% of the ideal gain)",
                k.shared_expert_on,
                k.micro_batches,
                if ideal > 1.0 {
                    (gain - 1.0) / (ideal - 1.0) * 100.0
                } else {
                    0.0
                }
            );
        }
    }
    Ok(())
}
