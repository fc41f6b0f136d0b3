use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchyard_engine::tensor::Compute;
use switchyard_expert_worker::{ExpertSpec, ExpertWorker, agent, service};
use switchyard_proto::health::Health;
use switchyard_proto::tls::Role;

#[derive(clap::Args, Debug)]
pub struct WorkerArgs {
    /// Checkpoint directory (Hugging Face layout). Only this worker's experts are read.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Experts to hold: `all`, `0-31` (in every MoE layer), or per layer `3:0-7;4:8-15`.
    #[arg(
        long,
        env = "SWITCHYARD_EXPERTS",
        required_unless_present = "coordinator",
        conflicts_with = "coordinator"
    )]
    experts: Option<ExpertSpec>,
    /// Join a coordinator instead: hold whatever its placement assigns this worker.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    coordinator: Option<String>,
    /// With --coordinator: memory this worker offers for expert weights, e.g. `16GiB`.
    #[arg(long, env = "SWITCHYARD_WORKER_MEMORY", value_parser = switchyard_coordinator::capacity::parse_bytes, default_value = "64GiB")]
    memory: u64,
    /// With --coordinator: the address routers should use (default: the bound listen address).
    #[arg(long, env = "SWITCHYARD_ADVERTISE")]
    advertise: Option<String>,
    /// Address to serve on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50061", value_parser = crate::addr::socket_addr)]
    listen: SocketAddr,
    /// Largest hidden-state payload of one call, in bytes; bigger calls get INVALID_ARGUMENT.
    #[arg(long, env = "SWITCHYARD_MAX_MESSAGE_BYTES", default_value_t = switchyard_expert_worker::worker::DEFAULT_MAX_MESSAGE_BYTES)]
    max_message_bytes: usize,
    /// Also hold the shared expert of each held layer, for routers started with
    /// `--shared-expert-on workers`.
    #[arg(long, env = "SWITCHYARD_WITH_SHARED_EXPERT")]
    with_shared_expert: bool,
    /// Serve Prometheus metrics at `http://ADDR/metrics`; port 0 picks a free port (printed).
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN", value_parser = crate::addr::socket_addr)]
    metrics_listen: Option<SocketAddr>,
    /// Where the routed experts live and run: `cpu`, or `cuda:N` (a binary built with
    /// `--features cuda`; checked at start-up, before anything loads).
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: switchyard_engine::Device,
    /// On SIGTERM, with --coordinator: how long to keep serving while the coordinator moves
    /// this worker's experts and routers move past it (a drain that fails no call), in
    /// seconds. The process exits at the latest this long plus 10 s after the signal, or at
    /// a second signal.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT_S", default_value_t = 30)]
    drain_timeout_s: u64,
    #[command(flatten)]
    weights: crate::weights::WeightArgs,
    #[command(flatten)]
    cluster: crate::cluster_tls::ClusterTlsArgs,
    #[command(flatten)]
    metrics_auth: crate::metrics_http::MetricsAuthArgs,
}

pub fn run(args: WorkerArgs) -> anyhow::Result<()> {
    // Before loading anything: a missing certificate is found in milliseconds, not after
    // minutes of reading weights.
    let links = args.cluster.links(Role::Worker)?;
    let metrics_key = args.metrics_auth.key()?;
    crate::exit_watchdog(Duration::from_secs(args.drain_timeout_s + 10));
    let compute =
        Compute::open(args.device).with_context(|| format!("opening --device {}", args.device))?;
    let worker = match &args.experts {
        Some(spec) => load(&args, spec, compute)?,
        None => ExpertWorker::empty_on(&args.model, compute, args.weights.weight_dtype)
            .with_context(|| format!("opening {}", args.model.display()))?,
    }
    .with_max_message_bytes(args.max_message_bytes);
    let worker = if args.with_shared_expert {
        worker
            .with_shared_experts(&args.model)
            .context("loading the shared experts")?
    } else {
        worker
    };
    let worker = Arc::new(worker);
    let model = switchyard_engine::ModelConfig::from_dir(&args.model)?.identity();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchyard-worker")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let info = worker.info();
        let w = worker.clone();
        let (health, health_service) = Health::new(service::SERVICE).await;
        let seen = health.clone();
        let metrics_line = crate::metrics_http::listen(
            args.metrics_listen,
            Arc::new(move || w.metrics.render()),
            Arc::new(move || {
                let now = seen.readiness();
                if now.serving { Ok(()) } else { Err(now.reason) }
            }),
            metrics_key,
        )
        .await?;
        let agent = args.coordinator.as_ref().map(|coordinator| {
            agent::Agent::new(
                worker.clone(),
                agent::Membership {
                    coordinator: coordinator.clone(),
                    advertise: args.advertise.clone().unwrap_or_else(|| addr.to_string()),
                    memory_bytes: args.memory,
                    device: args.device.to_string(),
                    model,
                    links: links.clone(),
                },
            )
        });
        let membership = agent.clone().map(|a| tokio::spawn(agent::run(a)));
        // One line on stdout, parsed by `switchyard up` and tests to find the port.
        match &args.coordinator {
            Some(c) => println!("listening on {addr}{metrics_line} · placement from {c}"),
            None => println!(
                "listening on {addr}{metrics_line} · {} layers · {:.1} MiB of experts",
                info.layers.len(),
                info.expert_bytes as f64 / (1 << 20) as f64
            ),
        }
        tracing::info!(%addr, "expert worker serving");
        let ready = {
            let agent = agent.clone();
            move || agent.as_ref().map_or(Ok(()), |a| a.ready())
        };
        let drain_limit = Duration::from_secs(args.drain_timeout_s);
        let shutdown = {
            let health = health.clone();
            async move {
                crate::shutdown_signal().await;
                tracing::info!("stopping: draining first");
                health.drain().await;
                if let Some(agent) = &agent {
                    agent.drain(drain_limit).await;
                }
            }
        };
        service::serve_with(
            worker,
            listener,
            links,
            health,
            health_service,
            ready,
            shutdown,
        )
        .await?;
        if let Some(m) = membership {
            m.abort();
        }
        tracing::info!("expert worker stopped");
        Ok(())
    })
}

fn load(args: &WorkerArgs, spec: &ExpertSpec, compute: Compute) -> anyhow::Result<ExpertWorker> {
    let bar = indicatif::ProgressBar::new(0).with_message("loading experts");
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} layers")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let worker = ExpertWorker::load_on(
        &args.model,
        spec,
        compute,
        args.weights.weight_dtype,
        &|done, total| {
            bar.set_length(total as u64);
            bar.set_position(done as u64);
        },
    )
    .with_context(|| format!("loading experts {spec:?} from {}", args.model.display()))?;
    bar.finish_and_clear();
    Ok(worker)
}
