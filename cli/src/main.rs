//! `switchyard`: the one binary. Each subcommand is a thin shell over the library crates.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod addr;
mod bench;
mod cluster_file;
mod cluster_tls;
mod coordinator;
mod generate;
mod loadtest;
mod metrics_http;
mod plan;
mod router;
mod serve;
mod synth;
mod up;
mod weights;
mod worker;

#[derive(Parser, Debug)]
#[command(
    name = "switchyard",
    version,
    about = "Serve DeepSeek-V3-class MoE models across many machines"
)]
struct Cli {
    #[command(flatten)]
    runtime: RuntimeArgs,
    #[command(subcommand)]
    command: Command,
}

/// Flags every command shares.
#[derive(clap::Args, Debug)]
struct RuntimeArgs {
    /// Compute threads (default: all cores). Decode is memory-bound; more threads than cores
    /// only adds contention.
    #[arg(long, env = "SWITCHYARD_THREADS", global = true)]
    threads: Option<usize>,
    /// Log filter, e.g. `info` or `switchyard_engine=debug`. Logs go to stderr.
    #[arg(long, env = "SWITCHYARD_LOG", default_value = "warn", global = true)]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Write a random-weight checkpoint of a built-in preset in the Hugging Face layout.
    Synth(synth::SynthArgs),
    /// Generate tokens from a checkpoint in this process.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode throughput and peak memory.
    Bench(bench::BenchArgs),
    /// Serve a subset of the routed experts over gRPC (one node of a cluster).
    Worker(worker::WorkerArgs),
    /// Serve the inference API, dispatching routed experts to workers (one node of a cluster).
    Router(router::RouterArgs),
    /// Serve cluster membership and expert placement (one node of a cluster).
    Coordinator(coordinator::CoordinatorArgs),
    /// Show a cluster's workers, their experts and placement versions, from its coordinator.
    Status(coordinator::StatusArgs),
    /// Re-place experts for the load routers report, now (or show the plan with --dry-run):
    /// moves, and predicted per-layer worker imbalance before and after.
    Rebalance(coordinator::RebalanceArgs),
    /// Load-test a router: throughput, latency percentiles, errors, expert utilisation.
    Loadtest(loadtest::LoadtestArgs),
    /// Plan expert placement for a cluster without loading anything: experts and memory per
    /// worker, KV-cache room, wire bytes.
    Plan(plan::PlanArgs),
    /// Start a whole local cluster — expert workers and a router — on a synthetic model unless
    /// --model names one; Ctrl-C stops it.
    Up(up::UpArgs),
    /// Issue a cluster CA and node certificates, for the mutual TLS of a cluster started by
    /// hand (`--cluster-ca`, `--cert`, `--key` on each node).
    Certs(cluster_tls::CertsArgs),
    /// Serve a model the way `vllm serve` does: a local cluster with the OpenAI-compatible
    /// HTTP API on --host/--port (127.0.0.1:8000) and gRPC on --grpc-port; Ctrl-C stops it.
    Serve(serve::ServeCmdArgs),
}

/// Keeps large activation buffers on the heap once touched. glibc serves allocations past its
/// mmap threshold (at most 32 MiB) with a fresh mmap and returns them with munmap: a prefill's
/// per-layer outputs (tens of MiB each) then fault in every page on each call and shoot down
/// TLBs on each free, which cost about 15% of a batch-8 prefill in a profile. Raising the
/// threshold and the trim threshold makes freed buffers reusable, already mapped.
fn keep_large_buffers_mapped() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only adjusts allocator parameters; called once before any threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 4 << 30);
    }
}

fn main() -> ExitCode {
    keep_large_buffers_mapped();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_new(&cli.runtime.log)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
    if let Some(threads) = cli.runtime.threads {
        if threads == 0 {
            eprintln!("error: `--threads` must be >= 1, got 0");
            return ExitCode::from(2);
        }
        // Both pools: the kernels' compute pool and rayon's (loading, per-expert work).
        let got = switchyard_engine::cpu::pool::init_global(threads);
        if got != threads {
            eprintln!("error: asked for {threads} compute threads, could start {got}");
            return ExitCode::FAILURE;
        }
        if let Err(e) = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global()
        {
            eprintln!("error: cannot start {threads} compute threads: {e}");
            return ExitCode::FAILURE;
        }
    }
    let result = match cli.command {
        Command::Synth(args) => synth::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Loadtest(args) => loadtest::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Worker(args) => worker::run(args),
        Command::Router(args) => router::run(args),
        Command::Up(args) => up::run(args),
        Command::Serve(args) => serve::run(args),
        Command::Certs(args) => cluster_tls::certs(args),
        Command::Plan(args) => plan::run(args),
        Command::Coordinator(args) => coordinator::run(args),
        Command::Status(args) => coordinator::status(args),
        Command::Rebalance(args) => coordinator::rebalance(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Asked to stop while starting: every node is stopped; that is not an error.
        Err(e) if e.downcast_ref::<up::StoppedDuringStartup>().is_some() => {
            let signal = e
                .downcast_ref::<up::StoppedDuringStartup>()
                .map_or(2, |s| s.0);
            ExitCode::from(128 + signal as u8)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Makes sure a node that is asked to stop does stop, even if its drain or a server's
/// shutdown is wedged: on its own thread and runtime (so a blocked main runtime cannot delay
/// it), it waits for the first Ctrl-C / SIGTERM, then exits the process `limit` later, or at
/// once on a second signal. Start it before serving.
pub(crate) fn exit_watchdog(limit: std::time::Duration) {
    let spawned = std::thread::Builder::new()
        .name("switchyard-exit-watchdog".into())
        .spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                tracing::warn!("cannot start the exit watchdog's runtime");
                return;
            };
            rt.block_on(async {
                shutdown_signal().await;
                tokio::select! {
                    _ = tokio::time::sleep(limit) => {
                        eprintln!("error: still not stopped {limit:?} after the signal; exiting");
                        std::process::exit(1);
                    }
                    _ = shutdown_signal() => {
                        eprintln!("error: second signal; exiting now");
                        std::process::exit(130);
                    }
                }
            });
        });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "cannot start the exit watchdog");
    }
}

/// Resolves on Ctrl-C or SIGTERM: servers drain and stop.
pub(crate) async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
