use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use switchyard_engine::model::{DeepseekModel, ExpertSelection, LoadOptions};
use switchyard_proto::v1::Dtype;
use switchyard_router::RemoteExperts;
use switchyard_router::coordinated::CoordinatedExperts;
use switchyard_router::dispatch::DispatchOptions;
use switchyard_router::grpc::CallMode;
use switchyard_router::server::{self, ExpertSource, RouterNode};

/// How the router talks to its expert workers.
#[derive(clap::Args, Debug, Clone)]
pub struct DispatchArgs {
    /// Hidden states on the wire: `bf16` halves the bytes, `f32` is exact.
    #[arg(long, env = "SWITCHYARD_WIRE_DTYPE", default_value = "bf16", value_parser = ["bf16", "f32"])]
    pub wire_dtype: String,
    /// Deadline of each expert call, in milliseconds.
    #[arg(long, env = "SWITCHYARD_EXPERT_DEADLINE_MS", default_value_t = 10_000)]
    pub expert_deadline_ms: u64,
    /// Where shared experts run: on the `router`, overlapped with the expert calls, or on the
    /// `workers`, each token's with one of its routed calls (workers need --with-shared-expert).
    #[arg(long, env = "SWITCHYARD_SHARED_EXPERT_ON", default_value = "router", value_parser = ["router", "workers"])]
    pub shared_expert_on: String,
    /// How expert calls travel: `unary` (an RPC each) or `stream` (one long-lived
    /// bidirectional stream per worker, no per-call stream set-up).
    #[arg(long, env = "SWITCHYARD_EXPERT_CALLS", default_value = "unary", value_parser = ["unary", "stream"])]
    pub expert_calls: String,
}

impl DispatchArgs {
    pub fn options(&self) -> DispatchOptions {
        DispatchOptions {
            wire_dtype: if self.wire_dtype == "f32" {
                Dtype::F32
            } else {
                Dtype::Bf16
            },
            deadline: Duration::from_millis(self.expert_deadline_ms.max(1)),
            shared_on_workers: self.shared_expert_on == "workers",
            call_mode: if self.expert_calls == "stream" {
                CallMode::Stream
            } else {
                CallMode::Unary
            },
            ..Default::default()
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RouterArgs {
    /// Checkpoint directory (Hugging Face layout). The router loads no routed-expert weights.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Expert worker addresses, comma-separated; together they must hold every routed expert.
    #[arg(
        long,
        env = "SWITCHYARD_WORKERS",
        value_delimiter = ',',
        required_unless_present = "coordinator",
        conflicts_with = "coordinator"
    )]
    workers: Vec<String>,
    /// Follow a coordinator's live placement instead of a fixed --workers list.
    #[arg(long, env = "SWITCHYARD_COORDINATOR")]
    coordinator: Option<String>,
    /// With --coordinator: how long to wait for a first live placement, in seconds.
    #[arg(long, env = "SWITCHYARD_PLACEMENT_WAIT_S", default_value_t = 120)]
    placement_wait_s: u64,
    /// Address to serve the gRPC API on; port 0 picks a free port (the bound address is printed).
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    #[command(flatten)]
    dispatch: DispatchArgs,
}

pub fn run(args: RouterArgs) -> anyhow::Result<()> {
    let model = DeepseekModel::load(
        &args.model,
        &LoadOptions {
            experts: ExpertSelection::None,
        },
    )
    .with_context(|| format!("loading {}", args.model.display()))?;
    let (source, workers) = match &args.coordinator {
        Some(coordinator) => {
            let experts = CoordinatedExperts::connect(
                model.config(),
                coordinator,
                args.dispatch.options(),
                Duration::from_secs(args.placement_wait_s),
            )
            .with_context(|| format!("following the coordinator at {coordinator}"))?;
            (
                ExpertSource::Coordinated(experts),
                format!("placement from {coordinator}"),
            )
        }
        None => {
            let experts =
                RemoteExperts::connect(model.config(), &args.workers, args.dispatch.options())
                    .context("connecting to the expert workers")?;
            (
                ExpertSource::Static(Arc::new(experts)),
                format!("{} expert workers", args.workers.len()),
            )
        }
    };
    let node = RouterNode::new(Arc::new(model), source.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchyard-router")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("listening on {addr} · {workers}");
        server::serve(node, listener, crate::shutdown_signal()).await?;
        anyhow::Ok(())
    });
    drop(runtime);
    // The dispatch runtimes inside go last, outside any async context.
    drop(source);
    result
}
