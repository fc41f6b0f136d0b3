use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use switchyard_coordinator::capacity::{self, WeightDType};
use switchyard_coordinator::membership::ModelShape;
use switchyard_coordinator::service::{self, CoordinatorNode};
use switchyard_proto::v1::ClusterStatusRequest;
use switchyard_proto::v1::coordinator_service_client::CoordinatorServiceClient;

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// The model the cluster serves: a checkpoint directory or a preset name (only its config
    /// is read, to size and place the experts).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: String,
    /// Address to serve on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50071")]
    listen: SocketAddr,
    /// Copies of each expert, on distinct workers, where memory allows (hot experts first).
    #[arg(long, env = "SWITCHYARD_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// A worker silent this long (milliseconds) is dropped and its experts re-placed.
    #[arg(long, env = "SWITCHYARD_LEASE_MS", default_value_t = 3000)]
    lease_ms: u64,
    /// How workers keep expert weights in memory, for sizing: f32, bf16 (FP8 checkpoints are
    /// held as bf16 today), fp8.
    #[arg(long, env = "SWITCHYARD_WEIGHT_DTYPE", default_value = "bf16")]
    weight_dtype: WeightDType,
    /// Serve Prometheus metrics at `http://ADDR/metrics`; port 0 picks a free port (printed).
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let config = crate::plan::load_config(&args.model)?;
    let moe = config
        .moe
        .as_ref()
        .context("the model has no routed experts to place")?;
    let shape = ModelShape {
        identity: config.identity(),
        layers: config.moe_layers().iter().map(|&l| l as u32).collect(),
        experts_per_layer: moe.n_routed_experts as u32,
        expert_bytes: capacity::expert_bytes(&config, args.weight_dtype),
    };
    let node = CoordinatorNode::new(
        shape,
        args.replicas,
        Duration::from_millis(args.lease_ms.max(10)),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("switchyard-coordinator")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let metrics_line = match args.metrics_listen {
            Some(m) => {
                let l = tokio::net::TcpListener::bind(m)
                    .await
                    .with_context(|| format!("binding --metrics-listen {m}"))?;
                let line = format!(" · metrics {}", l.local_addr()?);
                let n = node.clone();
                tokio::spawn(crate::metrics_http::serve(
                    l,
                    std::sync::Arc::new(move || n.render_metrics()),
                    crate::shutdown_signal(),
                ));
                line
            }
            None => String::new(),
        };
        println!(
            "listening on {}{metrics_line} · model {}",
            listener.local_addr()?,
            config.identity()
        );
        service::serve(node, listener, crate::shutdown_signal()).await?;
        anyhow::Ok(())
    })
}

#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    /// The coordinator's address.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    coordinator: String,
    /// Print the status as JSON.
    #[arg(long)]
    json: bool,
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let url = if args.coordinator.contains("://") {
        args.coordinator.clone()
    } else {
        format!("http://{}", args.coordinator)
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let s = runtime.block_on(async {
        let mut client = CoordinatorServiceClient::connect(url.clone())
            .await
            .with_context(|| format!("connecting to the coordinator at {url}"))?;
        let reply = client
            .cluster_status(ClusterStatusRequest {})
            .await
            .map_err(|s| anyhow::anyhow!("coordinator returned {:?}: {}", s.code(), s.message()))?;
        anyhow::Ok(reply.into_inner())
    })?;
    if args.json {
        let workers: Vec<_> = s
            .workers
            .iter()
            .map(|w| {
                serde_json::json!({
                    "worker_id": w.worker_id, "address": w.address, "device": w.device,
                    "memory_bytes": w.memory_bytes, "experts": w.experts,
                    "loaded_version": w.loaded_version, "ms_since_heartbeat": w.ms_since_heartbeat,
                    "draining": w.draining,
                    "load_error": (!w.load_error.is_empty()).then_some(&w.load_error),
                })
            })
            .collect();
        let routers: Vec<_> = s
            .routers
            .iter()
            .map(|r| {
                serde_json::json!({
                    "router_id": r.router_id, "live_version": r.live_version,
                    "ms_since_report": r.ms_since_report,
                })
            })
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "model": s.model, "target_version": s.target_version, "live_version": s.live_version,
                "placement_error": s.placement_error, "retain_from": s.retain_from,
                "workers": workers, "routers": routers,
            }))?
        );
        return Ok(());
    }
    println!(
        "model {} · placement target v{} · live v{} · workers keep versions from v{}",
        s.model, s.target_version, s.live_version, s.retain_from
    );
    if !s.placement_error.is_empty() {
        println!("no new placement: {}", s.placement_error);
    }
    println!(
        "{:>6}  {:<22} {:<8} {:>10} {:>8} {:>8} {:>12}",
        "worker", "address", "device", "memory", "experts", "loaded", "heartbeat"
    );
    for w in &s.workers {
        let healthy = if !w.load_error.is_empty() {
            " (load failed)"
        } else if w.draining {
            " (draining)"
        } else if w.loaded_version >= s.target_version {
            ""
        } else {
            " (loading)"
        };
        println!(
            "{:>6}  {:<22} {:<8} {:>8.1}Gi {:>8} {:>7}{} {:>9} ms ago",
            w.worker_id,
            w.address,
            w.device,
            w.memory_bytes as f64 / (1u64 << 30) as f64,
            w.experts,
            format!("v{}", w.loaded_version),
            healthy,
            w.ms_since_heartbeat
        );
        if !w.load_error.is_empty() {
            println!("        {}", w.load_error);
        }
    }
    for r in &s.routers {
        println!(
            "router  {:<28} on v{} · reported {} ms ago",
            r.router_id, r.live_version, r.ms_since_report
        );
    }
    Ok(())
}
