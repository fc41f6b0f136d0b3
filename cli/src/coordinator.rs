use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use switchyard_coordinator::capacity::{self, WeightDType};
use switchyard_coordinator::membership::ModelShape;
use switchyard_coordinator::service::{self, Balancing, CoordinatorNode};
use switchyard_proto::tls::Role;
use switchyard_proto::v1::coordinator_service_client::CoordinatorServiceClient;
use switchyard_proto::v1::{ClusterStatusRequest, LayerBalance, RebalanceRequest};

#[derive(clap::Args, Debug)]
pub struct CoordinatorArgs {
    /// The model the cluster serves: a checkpoint directory or a preset name (only its config
    /// is read, to size and place the experts).
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: String,
    /// Address to serve on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50071", value_parser = crate::addr::socket_addr)]
    listen: SocketAddr,
    /// Copies of each expert, on distinct workers, where memory allows (hot experts first).
    #[arg(long, env = "SWITCHYARD_REPLICAS", default_value_t = 1)]
    replicas: usize,
    /// A worker silent this long (milliseconds) is dropped and its experts re-placed.
    #[arg(long, env = "SWITCHYARD_LEASE_MS", default_value_t = 3000)]
    lease_ms: u64,
    /// How workers keep expert weights in memory, for sizing: f32, bf16, fp8, or auto — as
    /// stored (fp8 for a checkpoint with a `quantization_config`, the workers' `--weight-dtype
    /// auto` on CPUs with AVX512-BF16; f32 for an f32 one; bf16 otherwise).
    #[arg(long, env = crate::weights::ENV, default_value = "auto")]
    weight_dtype: SizingDType,
    /// Serve Prometheus metrics at `http://ADDR/metrics`; port 0 picks a free port (printed).
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN", value_parser = crate::addr::socket_addr)]
    metrics_listen: Option<SocketAddr>,
    #[command(flatten)]
    balancing: BalancingArgs,
    #[command(flatten)]
    cluster: crate::cluster_tls::ClusterTlsArgs,
    #[command(flatten)]
    metrics_auth: crate::metrics_http::MetricsAuthArgs,
}

/// Load balancing flags, shared by `coordinator` and `up` (which passes them on).
#[derive(clap::Args, Debug, Clone)]
pub struct BalancingArgs {
    /// Rebalance expert placement for the load routers report every SECONDS (0: never;
    /// `switchyard rebalance` runs one at any time). A rebalance loads what workers gain
    /// before routers switch, so no step waits for it.
    #[arg(
        long,
        env = "SWITCHYARD_REBALANCE_INTERVAL",
        default_value_t = 0.0,
        value_name = "SECONDS"
    )]
    pub rebalance_interval: f64,
    /// Expert copies one rebalance may load (a move loads one, a swap two).
    #[arg(long, env = "SWITCHYARD_REBALANCE_MAX_MOVES", default_value_t = 32)]
    pub rebalance_max_moves: usize,
    /// Least predicted drop in the mean per-layer worker imbalance (max / mean load) worth
    /// moving experts for, e.g. 0.05 for 1.40 → 1.35.
    #[arg(long, env = "SWITCHYARD_REBALANCE_THRESHOLD", default_value_t = 0.05)]
    pub rebalance_threshold: f64,
    /// Extra copies per MoE layer, beyond `--replicas` of each expert, for the experts with
    /// the most load per copy (DeepSeek's redundant experts), where memory allows.
    #[arg(long, env = "SWITCHYARD_REDUNDANT_EXPERTS", default_value_t = 0)]
    pub redundant_experts: usize,
    /// Observed load loses half its weight after SECONDS (0: never), so placement follows
    /// recent traffic.
    #[arg(
        long,
        env = "SWITCHYARD_LOAD_HALF_LIFE",
        default_value_t = 60.0,
        value_name = "SECONDS"
    )]
    pub load_half_life: f64,
}

fn seconds(flag: &str, v: f64) -> anyhow::Result<Duration> {
    if !v.is_finite() || !(0.0..=1e9).contains(&v) {
        anyhow::bail!("`{flag}` must be a number of seconds from 0 to 1e9, got {v}");
    }
    Ok(Duration::from_secs_f64(v))
}

impl BalancingArgs {
    pub fn balancing(&self) -> anyhow::Result<Balancing> {
        if !self.rebalance_threshold.is_finite() || self.rebalance_threshold < 0.0 {
            anyhow::bail!(
                "`--rebalance-threshold` must be a finite number >= 0, got {}",
                self.rebalance_threshold
            );
        }
        let interval = seconds("--rebalance-interval", self.rebalance_interval)?;
        Ok(Balancing {
            redundant: self.redundant_experts,
            load_half_life: seconds("--load-half-life", self.load_half_life)?,
            interval: (!interval.is_zero()).then_some(interval),
            max_moves: self.rebalance_max_moves,
            threshold: self.rebalance_threshold,
        })
    }

    /// The same flags for a `coordinator` child process.
    pub fn to_flags(&self) -> Vec<String> {
        [
            ("--rebalance-interval", self.rebalance_interval.to_string()),
            (
                "--rebalance-max-moves",
                self.rebalance_max_moves.to_string(),
            ),
            (
                "--rebalance-threshold",
                self.rebalance_threshold.to_string(),
            ),
            ("--redundant-experts", self.redundant_experts.to_string()),
            ("--load-half-life", self.load_half_life.to_string()),
        ]
        .into_iter()
        .flat_map(|(f, v)| [f.to_string(), v])
        .collect()
    }
}

/// `--weight-dtype` as the coordinator sizes experts by it.
#[derive(Clone, Copy, Debug)]
pub enum SizingDType {
    /// As the checkpoint stores them.
    Auto,
    Exact(WeightDType),
}

impl std::str::FromStr for SizingDType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(SizingDType::Auto),
            other => other
                .parse()
                .map(SizingDType::Exact)
                .map_err(|e| format!("{e} (or auto)")),
        }
    }
}

impl SizingDType {
    /// The dtype of `model`'s experts (a checkpoint directory or a preset, which is bf16).
    fn resolve(self, model: &str) -> WeightDType {
        if let SizingDType::Exact(d) = self {
            return d;
        }
        let config = std::fs::read_to_string(Path::new(model).join("config.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        match config {
            Some(c) if c.get("quantization_config").is_some() => WeightDType::Fp8,
            Some(c) if c.get("torch_dtype").and_then(|d| d.as_str()) == Some("float32") => {
                WeightDType::F32
            }
            _ => WeightDType::Bf16,
        }
    }
}

pub fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    let links = args.cluster.links(Role::Coordinator)?;
    let metrics_key = args.metrics_auth.key()?;
    let config = crate::plan::load_config(&args.model)?;
    let moe = config
        .moe
        .as_ref()
        .context("the model has no routed experts to place")?;
    let shape = ModelShape {
        identity: config.identity(),
        layers: config.moe_layers().iter().map(|&l| l as u32).collect(),
        experts_per_layer: moe.n_routed_experts as u32,
        expert_bytes: capacity::expert_bytes(&config, args.weight_dtype.resolve(&args.model)),
    };
    let node = CoordinatorNode::with_balancing(
        shape,
        args.replicas,
        Duration::from_millis(args.lease_ms.max(10)),
        args.balancing.balancing()?,
    )
    .with_links(links);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("switchyard-coordinator")
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let (n, checked) = (node.clone(), node.clone());
        let metrics_line = crate::metrics_http::listen(
            args.metrics_listen,
            std::sync::Arc::new(move || n.render_metrics()),
            std::sync::Arc::new(move || checked.ready()),
            metrics_key,
        )
        .await?;
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
    /// An `admin` (or any cluster) certificate to ask with, e.g. `switchyard certs`' admin.
    #[command(flatten)]
    cluster: crate::cluster_tls::ClusterTlsArgs,
}

/// Runs `f` on a client of the coordinator at `addr` (`HOST:PORT`), over `cluster`'s links
/// with an admin certificate.
pub(crate) fn with_client<T>(
    addr: &str,
    cluster: &crate::cluster_tls::ClusterTlsArgs,
    f: impl AsyncFnOnce(
        &mut CoordinatorServiceClient<tonic::transport::Channel>,
    ) -> Result<T, tonic::Status>,
) -> anyhow::Result<T> {
    let links = cluster.client_links()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut client = switchyard_proto::client::coordinator(addr, &links)
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the coordinator at {addr}: {e}"))?;
        f(&mut client)
            .await
            .map_err(|s| anyhow::anyhow!("coordinator returned {:?}: {}", s.code(), s.message()))
    })
}

fn balance_json(rows: &[LayerBalance]) -> Vec<serde_json::Value> {
    rows.iter()
        .map(|l| {
            serde_json::json!({
                "layer": l.layer, "before": l.before, "after": l.after,
                "observed": (l.observed > 0.0).then_some(l.observed),
            })
        })
        .collect()
}

pub fn status(args: StatusArgs) -> anyhow::Result<()> {
    let s = with_client(&args.coordinator, &args.cluster, async |c| {
        Ok(c.cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner())
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
                "load_tokens": s.load_tokens, "rebalances": s.rebalances,
                "imbalance": balance_json(&s.balance),
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
    if s.load_tokens > 0.0 {
        let mean = |f: fn(&LayerBalance) -> f64| {
            let v: Vec<f64> = s.balance.iter().map(f).filter(|x| *x > 0.0).collect();
            v.iter().sum::<f64>() / v.len().max(1) as f64
        };
        println!(
            "load: {:.0} tokens (decayed) · worker imbalance (max / mean per layer, mean of layers): predicted {:.3}, observed {:.3} · {} rebalance{}",
            s.load_tokens,
            mean(|l| l.before),
            mean(|l| l.observed),
            s.rebalances,
            if s.rebalances == 1 { "" } else { "s" }
        );
    } else {
        println!("load: no expert load reported by routers yet");
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct RebalanceArgs {
    /// The coordinator's address.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    coordinator: String,
    /// An `admin` certificate to ask with (`switchyard certs` issues one).
    #[command(flatten)]
    cluster: crate::cluster_tls::ClusterTlsArgs,
    /// Print the plan, change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Expert copies to load at most (default: the coordinator's `--rebalance-max-moves`).
    #[arg(long)]
    max_moves: Option<u32>,
    /// Least drop in mean imbalance worth it (default: the coordinator's
    /// `--rebalance-threshold`).
    #[arg(long)]
    threshold: Option<f64>,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
}

pub fn rebalance(args: RebalanceArgs) -> anyhow::Result<()> {
    let r = with_client(&args.coordinator, &args.cluster, async |c| {
        Ok(c.rebalance(RebalanceRequest {
            dry_run: args.dry_run,
            max_moves: args.max_moves,
            threshold: args.threshold,
        })
        .await?
        .into_inner())
    })?;
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "dry_run": args.dry_run, "applied": r.applied, "moves": r.moves, "bytes": r.bytes,
                "version": (r.version > 0).then_some(r.version),
                "mean_imbalance_before": r.mean_before, "mean_imbalance_after": r.mean_after,
                "layers": balance_json(&r.layers),
            }))?
        );
        return Ok(());
    }
    let verdict = match (r.applied, args.dry_run) {
        (false, _) => "nothing worth moving: the placement stays".to_string(),
        (true, true) => format!("dry run: would load {} expert copies", r.moves),
        (true, false) => format!(
            "placement v{} loading {} expert copies; routers switch once workers hold them",
            r.version, r.moves
        ),
    };
    println!(
        "{verdict} · {:.1} MiB · predicted worker imbalance (mean over layers) {:.3} → {:.3}",
        r.bytes as f64 / (1u64 << 20) as f64,
        r.mean_before,
        r.mean_after
    );
    println!(
        "{:>6} {:>9} {:>9} {:>9}",
        "layer", "before", "after", "observed"
    );
    for l in &r.layers {
        let observed = if l.observed > 0.0 {
            format!("{:.3}", l.observed)
        } else {
            "-".into()
        };
        println!(
            "{:>6} {:>9.3} {:>9.3} {:>9}",
            l.layer, l.before, l.after, observed
        );
    }
    Ok(())
}
