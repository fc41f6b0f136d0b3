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
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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
        let mut child = Command::new(&exe)
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
        api_key: None,
        kv_cache_bytes: 64 << 20,
        block_size: 16,
        max_batch_size: 1,
        max_batch_tokens: 16,
        max_waiting: 1,
        default_max_tokens: 1,
        metrics: RouterMetrics::new(),
    }
}

fn print_table(title: &str, report: &BenchReport) {
    println!(
        "{title} · weights {:.1} MiB · {} threads",
        report.weights_bytes as f64 / (1 << 20) as f64,
        report.threads
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

pub fn run(mut args: BenchArgs) -> anyhow::Result<()> {
    if args.batch.is_empty() {
        args.batch = if args.workers > 0 {
            vec![1, 8, 32]
        } else {
            vec![1, 8]
        };
    }
    let bench_options = BenchOptions {
        batch_sizes: args.batch.clone(),
        prompt_len: args.prompt_len,
        gen_len: args.gen_len,
        seed: args.seed,
    };
    let compute = switchyard_engine::tensor::Compute::open_all(&args.router_device)
        .with_context(|| format!("opening --router-device {}", args.router_device))?;
    let mut model = CausalLm::load(&args.model, &LoadOptions::default())
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
    let (_nodes, addrs) = start_workers(&args, moe.n_routed_experts, has_shared)?;
    // Both placements of the shared expert, when the model has one.
    let modes: &[bool] = if has_shared { &[false, true] } else { &[false] };
    let mut runs = Vec::new();
    for &on_workers in modes {
        let options = DispatchOptions {
            shared_on_workers: on_workers,
            ..args.dispatch.options()
        };
        // The router node as `switchyard router --workers` assembles it; the benchmark drives
        // its model and expert pool directly, without the scheduler.
        let node = RouterNode::load(
            &args.model,
            &compute,
            Experts::Workers(addrs.clone()),
            options,
            &bench_serving(),
        )?;
        let pool = node.pool().context("the router node has no expert pool")?;
        let step = pool.step()?;
        let report = bench::run_with(node.model(), &bench_options, &step)?;
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
        let per_token_layer =
            (sent + received) as f64 / (tokens * config.moe_layers().len()) as f64;
        let ratios: Vec<f64> = local
            .rows
            .iter()
            .zip(&report.rows)
            .map(|(l, d)| d.decode_tok_s / l.decode_tok_s)
            .collect();
        drop(step);
        drop(node);
        runs.push((
            if on_workers { "workers" } else { "router" },
            report,
            ratios,
            per_token_layer,
        ));
    }
    if args.json {
        let distributed: Vec<_> = runs
            .iter()
            .map(|(mode, report, ratios, bytes)| {
                serde_json::json!({
                    "shared_expert_on": mode,
                    "report": report,
                    "decode_ratio": ratios,
                    "wire_bytes_per_token_per_moe_layer": bytes,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "in_process": local,
                "workers": args.workers,
                "wire_dtype": args.dispatch.wire_dtype,
                "distributed": distributed,
            }))?
        );
    } else {
        print_table("in-process", &local);
        for (mode, report, ratios, bytes) in &runs {
            print_table(
                &format!(
                    "router + {} worker processes, shared expert on the {mode} ({} on the wire)",
                    args.workers, args.dispatch.wire_dtype
                ),
                report,
            );
            for (b, r) in args.batch.iter().zip(ratios) {
                println!("batch {b:>3}: distributed / in-process decode = {r:.2}");
            }
            println!("wire bytes per token per MoE layer (both directions): {bytes:.0}");
        }
    }
    Ok(())
}
