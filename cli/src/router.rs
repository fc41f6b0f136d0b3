use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use switchyard_engine::ModelConfig;
use switchyard_engine::tensor::Compute;
use switchyard_proto::v1::Dtype;
use switchyard_router::experts::tail::TailOptions;
use switchyard_router::experts::{CallMode, DispatchOptions};
use switchyard_router::metrics::RouterMetrics;
use switchyard_router::node::{Experts, RouterNode};
use switchyard_router::server::ServingOptions;

/// A finite multiple, 0 or more.
fn non_negative(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|e| format!("not a number: {e}"))?;
    if v.is_finite() && v >= 0.0 {
        Ok(v)
    } else {
        Err(format!("must be a finite number >= 0, got {s}"))
    }
}

/// How the router talks to its expert workers.
#[derive(clap::Args, Debug, Clone)]
pub struct DispatchArgs {
    /// Hidden states on the wire: `bf16` halves the bytes, `f32` is exact.
    #[arg(long, env = "SWITCHYARD_WIRE_DTYPE", default_value = "bf16", value_parser = ["bf16", "f32"])]
    pub wire_dtype: String,
    /// Deadline of each expert call, in milliseconds: the ceiling of the adaptive deadline
    /// (`--expert-deadline-p99`).
    #[arg(long, env = "SWITCHYARD_EXPERT_DEADLINE_MS", default_value_t = 10_000)]
    pub expert_deadline_ms: u64,
    /// Each expert call's deadline is this many times the recent p99 of calls like it (same
    /// layer, similar rows), between `--expert-deadline-min-ms` and `--expert-deadline-ms`;
    /// 0 keeps the fixed deadline. A stalled worker with no replica then fails its calls in
    /// about a second instead of holding every request for the full deadline.
    #[arg(long, env = "SWITCHYARD_EXPERT_DEADLINE_P99", default_value_t = 20.0, value_parser = non_negative)]
    pub expert_deadline_p99: f64,
    /// The adaptive deadline's floor, in milliseconds.
    #[arg(
        long,
        env = "SWITCHYARD_EXPERT_DEADLINE_MIN_MS",
        default_value_t = 1_000
    )]
    pub expert_deadline_min_ms: u64,
    /// Send an expert call again to replicas of its experts once it has waited this many times
    /// the recent p99 of calls like it, taking whichever answer comes first (hedged requests);
    /// its worker is avoided until it answers a health probe. At most one call in ten is
    /// hedged over time. 0 never hedges.
    #[arg(long, env = "SWITCHYARD_HEDGE_AFTER_P99", default_value_t = 3.0, value_parser = non_negative)]
    pub hedge_after_p99: f64,
    /// Never hedge a call sooner than this many milliseconds.
    #[arg(long, env = "SWITCHYARD_HEDGE_MIN_MS", default_value_t = 10)]
    pub hedge_min_ms: u64,
    /// Where shared experts run: on the `router`, overlapped with the expert calls, or on the
    /// `workers`, each token's with one of its routed calls (workers need --with-shared-expert).
    #[arg(long, env = "SWITCHYARD_SHARED_EXPERT_ON", default_value = "router", value_parser = ["router", "workers"])]
    pub shared_expert_on: String,
    /// How expert calls travel: `unary` (an RPC each) or `stream` (one long-lived
    /// bidirectional stream per worker, no per-call stream set-up).
    #[arg(long, env = "SWITCHYARD_EXPERT_CALLS", default_value = "unary", value_parser = ["unary", "stream"])]
    pub expert_calls: String,
    /// Split each step into this many micro-batches of whole sequences and about equal tokens
    /// (fewer when the step has fewer sequences): while one's expert calls are in flight, the
    /// next one's attention runs. 1 runs each step whole.
    /// (Default 2; `bench` given it measures 1 and this many side by side.)
    #[arg(long, env = "SWITCHYARD_MICRO_BATCHES", value_parser = clap::value_parser!(u32).range(1..=64))]
    pub micro_batches: Option<u32>,
    /// Split only steps of at least this many tokens; smaller ones run whole (their expert
    /// GEMMs are bound by reading the weights, which each micro-batch would read again).
    /// 0 splits every step of two or more sequences.
    #[arg(long, env = "SWITCHYARD_MICRO_BATCH_MIN_TOKENS", default_value_t = switchyard_router::experts::DEFAULT_MICRO_BATCH_MIN_TOKENS)]
    pub micro_batch_min_tokens: usize,
}

impl DispatchArgs {
    /// The same settings as command-line flags, for child processes.
    pub fn to_args(&self) -> Vec<String> {
        [
            "--wire-dtype",
            &self.wire_dtype,
            "--shared-expert-on",
            &self.shared_expert_on,
            "--expert-deadline-ms",
            &self.expert_deadline_ms.to_string(),
            "--expert-deadline-p99",
            &self.expert_deadline_p99.to_string(),
            "--expert-deadline-min-ms",
            &self.expert_deadline_min_ms.to_string(),
            "--hedge-after-p99",
            &self.hedge_after_p99.to_string(),
            "--hedge-min-ms",
            &self.hedge_min_ms.to_string(),
            "--expert-calls",
            &self.expert_calls,
            "--micro-batches",
            &self.micro_batches().to_string(),
            "--micro-batch-min-tokens",
            &self.micro_batch_min_tokens.to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The micro-batches per step in effect.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches.map_or(2, |k| k as usize)
    }

    pub fn options(&self) -> DispatchOptions {
        DispatchOptions {
            wire_dtype: if self.wire_dtype == "f32" {
                Dtype::F32
            } else {
                Dtype::Bf16
            },
            deadline: Duration::from_millis(self.expert_deadline_ms.max(1)),
            tail: TailOptions {
                hedge_after_p99: self.hedge_after_p99,
                hedge_min: Duration::from_millis(self.hedge_min_ms),
                deadline_p99: self.expert_deadline_p99,
                deadline_min: Duration::from_millis(self.expert_deadline_min_ms),
            },
            shared_on_workers: self.shared_expert_on == "workers",
            call_mode: if self.expert_calls == "stream" {
                CallMode::Stream
            } else {
                CallMode::Unary
            },
            micro_batches: self.micro_batches(),
            micro_batch_min_tokens: self.micro_batch_min_tokens,
            ..Default::default()
        }
    }
}

/// How the router serves clients: names, keys, the KV cache and the batch sizes.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Name clients use for the model (`model` in requests, `/v1/models`). Default: the
    /// checkpoint directory's name.
    #[arg(long, env = "SWITCHYARD_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Require this key from clients (`authorization: Bearer KEY` or `x-api-key`) on the
    /// gRPC and HTTP APIs; health checks stay open.
    #[arg(long, env = "SWITCHYARD_API_KEY", conflicts_with = "api_key_file")]
    pub api_key: Option<String>,
    /// Read the API key from this file (surrounding whitespace is dropped).
    #[arg(long, env = "SWITCHYARD_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Require the API key on `/metrics` too (the HTTP API's and `--metrics-listen`'s), which
    /// is otherwise open like `/health`.
    #[arg(long, env = "SWITCHYARD_METRICS_AUTH")]
    pub metrics_auth: bool,
    /// Serve the client APIs (gRPC and HTTP) over TLS with this certificate chain (PEM, leaf
    /// first); vLLM's `--ssl-certfile` is the same flag.
    #[arg(
        long,
        env = "SWITCHYARD_TLS_CERT",
        alias = "ssl-certfile",
        requires = "tls_key",
        value_name = "PEM"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM); `--ssl-keyfile`.
    #[arg(
        long,
        env = "SWITCHYARD_TLS_KEY",
        alias = "ssl-keyfile",
        requires = "tls_cert",
        value_name = "PEM"
    )]
    pub tls_key: Option<PathBuf>,
    /// Memory for the paged KV cache, e.g. `512MiB`, `4GiB`. Admission and preemption work
    /// within it.
    #[arg(long, env = "SWITCHYARD_KV_CACHE_MEMORY", default_value = "1GiB", value_parser = switchyard_coordinator::capacity::parse_bytes)]
    pub kv_cache_memory: u64,
    /// Tokens per KV cache block.
    #[arg(long, env = "SWITCHYARD_KV_BLOCK_SIZE", default_value_t = 16)]
    pub kv_block_size: usize,
    /// Sequences in the running batch at most (vLLM's `--max-num-seqs`).
    #[arg(
        long,
        env = "SWITCHYARD_MAX_BATCH_SIZE",
        default_value_t = 64,
        visible_alias = "max-num-seqs"
    )]
    pub max_batch_size: usize,
    /// Tokens per step at most: one per decoding sequence, the rest for prefill chunks
    /// (vLLM's `--max-num-batched-tokens`).
    #[arg(
        long,
        env = "SWITCHYARD_MAX_BATCH_TOKENS",
        default_value_t = 1024,
        visible_alias = "max-num-batched-tokens"
    )]
    pub max_batch_tokens: usize,
    /// Prompt + output tokens a request may reach; at most the model's
    /// `max_position_embeddings` (the default).
    #[arg(long, env = "SWITCHYARD_MAX_MODEL_LEN")]
    pub max_model_len: Option<usize>,
    /// Requests waiting for a batch slot at most; past it clients get RESOURCE_EXHAUSTED
    /// (HTTP 429) with a retry hint.
    #[arg(long, env = "SWITCHYARD_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Output tokens for requests that give no maximum (capped by the context).
    #[arg(long, env = "SWITCHYARD_DEFAULT_MAX_TOKENS", default_value_t = 256)]
    pub default_max_tokens: usize,
    /// When a step fails for want of an expert worker (gone, stopped, its experts not yet
    /// placed again), its requests wait and are recomputed for up to this many milliseconds
    /// before they fail; 0 fails them at once.
    #[arg(long, env = "SWITCHYARD_STEP_RETRY_MS", default_value_t = switchyard_router::server::DEFAULT_STEP_RETRY.as_millis() as u64)]
    pub step_retry_ms: u64,
}

impl ServeArgs {
    pub fn options(
        &self,
        model_dir: &std::path::Path,
        metrics: Arc<RouterMetrics>,
    ) -> anyhow::Result<ServingOptions> {
        let api_key = match (&self.api_key, &self.api_key_file) {
            (Some(k), _) => Some(k.trim().to_string()),
            (None, Some(path)) => Some(
                std::fs::read_to_string(path)
                    .with_context(|| format!("reading --api-key-file {}", path.display()))?
                    .trim()
                    .to_string(),
            ),
            (None, None) => None,
        };
        if api_key.as_deref() == Some("") {
            anyhow::bail!("the API key must not be empty");
        }
        if self.metrics_auth && api_key.is_none() {
            anyhow::bail!("--metrics-auth needs --api-key or --api-key-file");
        }
        let model_name = match &self.served_model_name {
            Some(n) => n.clone(),
            None => std::fs::canonicalize(model_dir)
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "switchyard".into()),
        };
        let api_tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(switchyard_router::api_tls::ApiTls::load(cert, key)?),
            _ => None,
        };
        Ok(ServingOptions {
            model_name,
            api_key,
            metrics_auth: self.metrics_auth,
            api_tls,
            kv_cache_bytes: self.kv_cache_memory,
            block_size: self.kv_block_size,
            max_batch_size: self.max_batch_size,
            max_batch_tokens: self.max_batch_tokens,
            max_waiting: self.max_waiting,
            default_max_tokens: self.default_max_tokens,
            max_model_len: self.max_model_len,
            step_retry: Duration::from_millis(self.step_retry_ms),
            metrics,
        })
    }

    /// `--metrics-auth` and its key, for the workers and coordinator `up` starts beside the
    /// router (empty without `--metrics-auth`).
    pub fn metrics_auth_args(&self) -> Vec<String> {
        if !self.metrics_auth {
            return Vec::new();
        }
        let mut a = vec!["--metrics-auth".to_string()];
        if let Some(k) = &self.api_key {
            a.extend(["--api-key".into(), k.clone()]);
        }
        if let Some(f) = &self.api_key_file {
            a.extend(["--api-key-file".into(), f.display().to_string()]);
        }
        a
    }

    /// The same settings as command-line flags, for child processes.
    pub fn to_args(&self) -> Vec<String> {
        let mut a = vec![
            "--kv-cache-memory".to_string(),
            self.kv_cache_memory.to_string(),
            "--kv-block-size".into(),
            self.kv_block_size.to_string(),
            "--max-batch-size".into(),
            self.max_batch_size.to_string(),
            "--max-batch-tokens".into(),
            self.max_batch_tokens.to_string(),
            "--max-waiting".into(),
            self.max_waiting.to_string(),
            "--default-max-tokens".into(),
            self.default_max_tokens.to_string(),
            "--step-retry-ms".into(),
            self.step_retry_ms.to_string(),
        ];
        if let Some(n) = &self.served_model_name {
            a.extend(["--served-model-name".into(), n.clone()]);
        }
        if let Some(n) = self.max_model_len {
            a.extend(["--max-model-len".into(), n.to_string()]);
        }
        if let Some(k) = &self.api_key {
            a.extend(["--api-key".into(), k.clone()]);
        }
        if let Some(f) = &self.api_key_file {
            a.extend(["--api-key-file".into(), f.display().to_string()]);
        }
        if self.metrics_auth {
            a.push("--metrics-auth".into());
        }
        for (flag, path) in [("--tls-cert", &self.tls_cert), ("--tls-key", &self.tls_key)] {
            if let Some(p) = path {
                a.extend([flag.to_string(), p.display().to_string()]);
            }
        }
        a
    }
}

#[derive(clap::Args, Debug)]
pub struct RouterArgs {
    /// Checkpoint directory (Hugging Face layout). The router loads no routed-expert weights.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    model: PathBuf,
    /// Expert worker addresses, comma-separated; together they must hold every routed expert.
    /// A model without routed experts (Llama, Qwen3, Gemma 3, Mistral) needs none: the router
    /// runs it whole.
    #[arg(
        long,
        env = "SWITCHYARD_WORKERS",
        value_delimiter = ',',
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
    #[arg(long, env = "SWITCHYARD_LISTEN", default_value = "127.0.0.1:50051", value_parser = crate::addr::socket_addr)]
    listen: SocketAddr,
    /// Also serve the OpenAI-compatible HTTP API on this address; port 0 picks a free port.
    #[arg(long, env = "SWITCHYARD_HTTP_LISTEN", value_parser = crate::addr::socket_addr)]
    http_listen: Option<SocketAddr>,
    /// Serve Prometheus metrics at `http://ADDR/metrics` on a listener of their own, with or
    /// without the HTTP API (which serves them too); port 0 picks a free port (printed).
    #[arg(long, env = "SWITCHYARD_METRICS_LISTEN", value_parser = crate::addr::socket_addr)]
    metrics_listen: Option<SocketAddr>,
    /// Where the router's projections, dense FFNs, shared experts, MoE gates and LM head run: `cpu`,
    /// `cuda:N`, or several GPUs of this node, `cuda:0,1,…`, that split every projection
    /// between them (queries and the output projection by heads, MLPs by their intermediate
    /// slice, the LM head by vocabulary; partial sums reduced over NCCL). Needs a binary built
    /// with `--features cuda` (and libnccl for a list); checked at start-up, before anything
    /// loads. Attention over the KV cache, norms, RoPE and sampling stay on the CPU.
    #[arg(long, env = "SWITCHYARD_DEVICE", default_value = "cpu")]
    device: switchyard_engine::Devices,
    #[command(flatten)]
    dispatch: DispatchArgs,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    weights: crate::weights::WeightArgs,
    /// On SIGTERM: seconds to finish the requests in flight (health says NOT_SERVING from the
    /// signal on). The process exits at the latest this long plus 10 s after the signal, or at
    /// a second signal.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT_S", default_value_t = 30)]
    drain_timeout_s: u64,
    /// Links to the workers and the coordinator (a dense model, run whole, has none).
    #[command(flatten)]
    cluster: crate::cluster_tls::ClusterTlsArgs,
}

pub fn run(args: RouterArgs) -> anyhow::Result<()> {
    crate::exit_watchdog(Duration::from_secs(args.drain_timeout_s + 10));
    let compute = Compute::open_all(&args.device)
        .with_context(|| format!("opening --device {}", args.device))?;
    let metrics = RouterMetrics::new();
    let options = args.serve.options(&args.model, metrics)?;
    let dense = ModelConfig::from_dir(&args.model)?.moe.is_none();
    if dense && (args.coordinator.is_some() || !args.workers.is_empty()) {
        bail!(
            "{} has no routed experts: the router runs it whole; drop --workers / --coordinator",
            args.model.display()
        );
    }
    if !dense && args.coordinator.is_none() && args.workers.is_empty() {
        bail!("the model has routed experts: give --workers ADDR,... or --coordinator ADDR");
    }
    let links = if dense {
        switchyard_proto::tls::ClusterLinks::Insecure
    } else {
        args.cluster.links(switchyard_proto::tls::Role::Router)?
    };
    let (experts, workers) = match &args.coordinator {
        _ if dense => (
            Experts::InProcess,
            "dense model, no expert workers".to_string(),
        ),
        Some(coordinator) => (
            Experts::Coordinator {
                addr: coordinator.clone(),
                wait: Duration::from_secs(args.placement_wait_s),
            },
            format!("placement from {coordinator}"),
        ),
        None => (
            Experts::Workers(args.workers.clone()),
            format!("{} expert workers", args.workers.len()),
        ),
    };
    let node = RouterNode::load(
        &args.model,
        &compute,
        experts,
        args.weights.weight_dtype,
        DispatchOptions {
            links,
            ..args.dispatch.options()
        },
        &options,
    )
    .with_context(|| match &args.coordinator {
        Some(c) => format!(
            "starting the router on {} (coordinator {c})",
            args.model.display()
        ),
        None => format!("starting the router on {}", args.model.display()),
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("switchyard-router")
        .build()
        .context("starting the async runtime")?;
    let result = runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        let http = match args.http_listen {
            Some(http_addr) => {
                let l = tokio::net::TcpListener::bind(http_addr)
                    .await
                    .with_context(|| format!("binding --http-listen {http_addr}"))?;
                Some(l)
            }
            None => None,
        };
        let http_line = match &http {
            Some(l) => format!(" · http {}", l.local_addr()?),
            None => String::new(),
        };
        let state = node.state();
        let metrics = state.metrics.clone();
        let checked = state.clone();
        let metrics_key = state.api_key.clone().filter(|_| state.metrics_auth);
        let metrics_line = crate::metrics_http::listen(
            args.metrics_listen,
            Arc::new(move || metrics.render()),
            Arc::new(move || checked.ready()),
            metrics_key,
        )
        .await?;
        println!(
            "listening on {addr}{http_line}{metrics_line} · {workers} · model {} · kv cache {} blocks of {} tokens",
            state.limits.model_name,
            state.scheduler.config().kv_blocks,
            state.scheduler.config().block_size
        );
        node.serve(listener, http, crate::shutdown_signal()).await?;
        anyhow::Ok(())
    });
    drop(runtime);
    // The dispatch runtime inside goes last, outside any async context.
    drop(node);
    result
}
