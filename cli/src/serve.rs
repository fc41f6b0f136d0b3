//! `switchyard serve MODEL_OR_PRESET`: the one-command server, spelled as `vllm serve` users
//! expect — a local cluster (as `up`) serving the OpenAI-compatible HTTP API on
//! `--host`/`--port` and the gRPC API beside it on `--grpc-port`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::bail;

use crate::router::{DispatchArgs, ServeArgs};
use crate::up::{self, UpArgs};

#[derive(clap::Args, Debug)]
pub struct ServeCmdArgs {
    /// A checkpoint directory (Hugging Face layout) or a built-in preset name (`tiny`, `mini`,
    /// `deepseek-v3`, … see `synth --help`), synthesised once into the cache.
    #[arg(value_name = "MODEL_OR_PRESET")]
    model: String,
    /// Host (name or IP) the HTTP API binds to.
    #[arg(long, env = "SWITCHYARD_SERVE_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port of the OpenAI-compatible HTTP API; 0 picks a free one (printed).
    #[arg(long, env = "SWITCHYARD_SERVE_PORT", default_value_t = 8000)]
    port: u16,
    /// Port of the gRPC API, on the same host; 0 picks a free one (printed).
    #[arg(long, env = "SWITCHYARD_SERVE_GRPC_PORT", default_value_t = 50051)]
    grpc_port: u16,
    /// With a preset: make the gate prefer some experts (see `synth --expert-skew`).
    #[arg(long, default_value_t = 0.0)]
    expert_skew: f32,
    /// Where synthesised presets are kept (default: $XDG_CACHE_HOME/switchyard or ~/.cache/switchyard).
    #[arg(long, env = "SWITCHYARD_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Expert workers to start (CPU); the routed experts of every MoE layer are split evenly.
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// One expert worker per listed CUDA device instead of `--workers` CPU workers.
    #[arg(long, value_delimiter = ',', conflicts_with = "workers")]
    gpus: Vec<usize>,
    /// Compute threads per worker process.
    #[arg(long, default_value_t = 1)]
    worker_threads: usize,
    /// Memory each worker offers for expert weights.
    #[arg(long, default_value = "64GiB", value_parser = switchyard_coordinator::capacity::parse_bytes)]
    worker_memory: u64,
    /// Copies of each routed expert, on distinct workers.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Routers to start; they share the workers (data-parallel attention). The first serves
    /// the HTTP API.
    #[arg(long, default_value_t = 1)]
    routers: usize,
    /// Where the router runs its projections, dense FFNs, shared experts and LM head (`cpu`,
    /// `cuda:N`, or `cuda:0,1,…` split over those GPUs).
    #[arg(long, default_value = "cpu", conflicts_with = "tensor_parallel_size")]
    router_device: switchyard_engine::Devices,
    /// vLLM's spelling of the router's split: N GPUs, `cuda:0` … `cuda:N-1` (the router's
    /// weights and GEMMs; routed experts live on the workers).
    #[arg(long)]
    tensor_parallel_size: Option<usize>,
    /// A worker silent this long (milliseconds) is dropped and its experts re-placed.
    #[arg(long, default_value_t = 3000)]
    lease_ms: u64,
    #[command(flatten)]
    balancing: crate::coordinator::BalancingArgs,
    #[command(flatten)]
    dispatch: DispatchArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    weights: crate::weights::WeightArgs,
    /// Nodes' certificates (a `switchyard certs` directory) for the mutual TLS between them;
    /// default: a throw-away cluster CA for this run.
    #[arg(
        long,
        env = "SWITCHYARD_CLUSTER_CERTS",
        value_name = "DIR",
        conflicts_with = "insecure_cluster"
    )]
    cluster_certs: Option<PathBuf>,
    /// Run the links between the nodes in plaintext, unauthenticated.
    #[arg(long, env = "SWITCHYARD_INSECURE_CLUSTER")]
    insecure_cluster: bool,
}

/// What `MODEL_OR_PRESET` names: a checkpoint directory, or a preset to synthesise.
#[derive(Debug, PartialEq)]
enum ModelSource {
    Dir(PathBuf),
    Preset(String),
}

fn model_source(value: &str) -> anyhow::Result<ModelSource> {
    let path = Path::new(value);
    if path.is_dir() {
        if !path.join("config.json").is_file() {
            bail!(
                "MODEL_OR_PRESET: {value} has no config.json, so it is not a Hugging Face checkpoint; \
                 serve a preset ({}) or make a checkpoint with `switchyard synth --preset tiny --out DIR`",
                switchyard_engine::synth::PRESETS.join(", ")
            );
        }
        return Ok(ModelSource::Dir(path.to_path_buf()));
    }
    if switchyard_engine::synth::PRESETS.contains(&value) {
        return Ok(ModelSource::Preset(value.to_string()));
    }
    bail!(
        "MODEL_OR_PRESET: {value} is neither a directory nor a preset; presets: {} (or make a \
         checkpoint with `switchyard synth --preset tiny --out DIR`)",
        switchyard_engine::synth::PRESETS.join(", ")
    )
}

/// `HOST:PORT` from a host that may be a name or an IPv6 literal.
fn addr(host: &str, port: u16, flag: &str) -> anyhow::Result<SocketAddr> {
    let joined = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    crate::addr::socket_addr(&joined).map_err(|e| anyhow::anyhow!("{flag}: {e}"))
}

fn router_device(args: &ServeCmdArgs) -> anyhow::Result<switchyard_engine::Devices> {
    let Some(n) = args.tensor_parallel_size else {
        return Ok(args.router_device.clone());
    };
    if n == 0 {
        bail!("--tensor-parallel-size must be >= 1, got 0");
    }
    let list: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    format!("cuda:{}", list.join(","))
        .parse()
        .map_err(|e| anyhow::anyhow!("--tensor-parallel-size {n}: {e}"))
}

pub fn run(args: ServeCmdArgs) -> anyhow::Result<()> {
    let (model, preset) = match model_source(&args.model)? {
        ModelSource::Dir(dir) => (Some(dir), "tiny".to_string()),
        ModelSource::Preset(p) => (None, p),
    };
    let http_addr = addr(&args.host, args.port, "--host/--port")?;
    let router_addr = addr(&args.host, args.grpc_port, "--host/--grpc-port")?;
    let router_device = router_device(&args)?;
    up::run(UpArgs {
        model,
        preset,
        expert_skew: args.expert_skew,
        cache_dir: args.cache_dir,
        workers: args.workers,
        gpus: args.gpus,
        router_device,
        worker_memory: args.worker_memory,
        replicas: args.replicas,
        lease_ms: args.lease_ms,
        balancing: args.balancing,
        cluster: None,
        host: None,
        routers: args.routers,
        worker_threads: args.worker_threads,
        router_addr,
        http_addr: Some(http_addr),
        dispatch: args.dispatch,
        serve: args.serve,
        weights: args.weights,
        demo_prompt_ids: Vec::new(),
        json: false,
        cluster_certs: args.cluster_certs,
        insecure_cluster: args.insecure_cluster,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_preset_a_checkpoint_and_neither_are_told_apart() {
        assert_eq!(
            model_source("tiny").unwrap(),
            ModelSource::Preset("tiny".into())
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_str().unwrap();
        let err = model_source(path).unwrap_err().to_string();
        assert!(
            err.contains("no config.json") && err.contains("synth"),
            "{err}"
        );
        std::fs::write(dir.path().join("config.json"), "{}").unwrap();
        assert_eq!(
            model_source(path).unwrap(),
            ModelSource::Dir(dir.path().to_path_buf())
        );
        let err = model_source("no-such-model").unwrap_err().to_string();
        assert!(
            err.contains("neither a directory nor a preset") && err.contains("mini"),
            "{err}"
        );
    }

    #[test]
    fn hosts_may_be_names_or_ipv6_literals() {
        assert_eq!(
            addr("127.0.0.1", 8000, "--port").unwrap(),
            "127.0.0.1:8000".parse().unwrap()
        );
        assert_eq!(
            addr("::1", 8000, "--port").unwrap(),
            "[::1]:8000".parse().unwrap()
        );
        assert!(addr("localhost", 0, "--port").unwrap().ip().is_loopback());
        let err = addr("no such host!", 1, "--host/--port")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("--host/--port: "), "{err}");
    }
}
