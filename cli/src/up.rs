//! `switchyard up`: a whole local cluster — expert workers and a router — as child processes.

use std::io::BufRead;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use switchyard_engine::ModelConfig;
use switchyard_engine::synth::{self, SynthDType, SynthOptions};
use switchyard_proto::v1::GenerateRequest;

use crate::router::{DispatchArgs, ServeArgs};

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Checkpoint directory (Hugging Face layout). Without it, `--preset` is synthesised into
    /// the cache directory (once) and served.
    #[arg(long, env = "SWITCHYARD_MODEL")]
    pub(crate) model: Option<PathBuf>,
    /// Built-in model to synthesise when no --model is given (any `synth --preset`).
    #[arg(long, env = "SWITCHYARD_PRESET", default_value = "tiny")]
    pub(crate) preset: String,
    /// With a synthesised preset: make the gate prefer some experts (see `synth --expert-skew`).
    #[arg(long, env = "SWITCHYARD_EXPERT_SKEW", default_value_t = 0.0)]
    pub(crate) expert_skew: f32,
    /// Where synthesised models are kept (default: $XDG_CACHE_HOME/switchyard or ~/.cache/switchyard).
    #[arg(long, env = "SWITCHYARD_CACHE_DIR")]
    pub(crate) cache_dir: Option<PathBuf>,
    /// Expert workers to start; the routed experts of every MoE layer are split evenly.
    #[arg(long, env = "SWITCHYARD_WORKERS_COUNT", default_value_t = 2)]
    pub(crate) workers: usize,
    /// One expert worker per listed CUDA device (`--device cuda:N` each), instead of
    /// `--workers` CPU workers; needs a binary built with `--features cuda`.
    #[arg(
        long,
        env = "SWITCHYARD_GPUS",
        value_delimiter = ',',
        conflicts_with = "workers"
    )]
    pub(crate) gpus: Vec<usize>,
    /// Where each router runs its projections, dense FFNs, shared experts and LM head (`cpu`,
    /// `cuda:N`, or `cuda:0,1,…` split over those GPUs; passed on as `router --device`).
    #[arg(long, env = "SWITCHYARD_ROUTER_DEVICE", default_value = "cpu")]
    pub(crate) router_device: switchyard_engine::Devices,
    /// Memory each worker offers for expert weights.
    #[arg(long, env = "SWITCHYARD_WORKER_MEMORY", default_value = "64GiB", value_parser = switchyard_coordinator::capacity::parse_bytes)]
    pub(crate) worker_memory: u64,
    /// Copies of each routed expert, on distinct workers.
    #[arg(long, env = "SWITCHYARD_REPLICAS", default_value_t = 1)]
    pub(crate) replicas: usize,
    /// A worker silent this long (milliseconds) is dropped and its experts re-placed.
    #[arg(long, env = "SWITCHYARD_LEASE_MS", default_value_t = 3000)]
    pub(crate) lease_ms: u64,
    #[command(flatten)]
    pub(crate) balancing: crate::coordinator::BalancingArgs,
    /// Start the nodes a cluster file places on this host instead (see `cluster_file.rs`);
    /// the other sizing flags are then ignored.
    #[arg(long, env = "SWITCHYARD_CLUSTER")]
    pub(crate) cluster: Option<PathBuf>,
    /// With --cluster: this host's name in the file (default: start every node in it).
    #[arg(long, env = "SWITCHYARD_HOST", requires = "cluster")]
    pub(crate) host: Option<String>,
    /// Routers to start; they share the workers (data-parallel attention).
    #[arg(long, env = "SWITCHYARD_ROUTERS", default_value_t = 1)]
    pub(crate) routers: usize,
    /// Compute threads per worker process.
    #[arg(long, env = "SWITCHYARD_WORKER_THREADS", default_value_t = 1)]
    pub(crate) worker_threads: usize,
    /// The router's gRPC address; port 0 picks a free port (printed).
    #[arg(
        long,
        env = "SWITCHYARD_ROUTER_ADDR",
        default_value = "127.0.0.1:50051",
        value_parser = crate::addr::socket_addr
    )]
    pub(crate) router_addr: std::net::SocketAddr,
    /// Also serve the OpenAI-compatible HTTP API from the (first) router on this address
    /// (`HOST:PORT`, a host name or an IP); port 0 picks a free port (printed).
    #[arg(long, env = "SWITCHYARD_HTTP_ADDR", value_parser = crate::addr::socket_addr)]
    pub(crate) http_addr: Option<std::net::SocketAddr>,
    #[command(flatten)]
    pub(crate) dispatch: DispatchArgs,
    #[command(flatten)]
    pub(crate) serve: ServeArgs,
    /// Every node's `--weight-dtype` (the coordinator sizes experts by it too).
    #[command(flatten)]
    pub(crate) weights: crate::weights::WeightArgs,
    /// Once the cluster is up, generate 16 greedy tokens from these prompt ids through the
    /// router, print them, and shut the cluster down (a smoke test of the whole path).
    #[arg(long, value_delimiter = ',')]
    pub(crate) demo_prompt_ids: Vec<u32>,
    /// With --demo-prompt-ids: print the generation as JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Nodes' certificates for mutual TLS between them, as `switchyard certs` writes them
    /// (`coordinator`, `router-N`, `worker-N`, `admin`). Default on one host: a throw-away
    /// cluster CA for this run; a cluster file needs this (or --insecure-cluster).
    #[arg(
        long,
        env = "SWITCHYARD_CLUSTER_CERTS",
        value_name = "DIR",
        conflicts_with = "insecure_cluster"
    )]
    pub(crate) cluster_certs: Option<PathBuf>,
    /// Run the links between the nodes in plaintext, unauthenticated (see `worker --help`).
    #[arg(long, env = "SWITCHYARD_INSECURE_CLUSTER")]
    pub(crate) insecure_cluster: bool,
}

/// A child node; stopped (SIGTERM, then SIGKILL after a grace period) and reaped on drop.
struct Node {
    name: String,
    child: Child,
    addr: String,
    /// Its HTTP API address, for routers that serve one.
    http: Option<String>,
    /// Its Prometheus endpoint, for workers.
    metrics: Option<String>,
    /// Its exit has been reported.
    reported: bool,
}

impl Node {
    fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        #[cfg(unix)]
        // SAFETY: signalling our own child by pid; it has not been reaped (try_wait said so).
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        tracing::warn!(node = %self.name, "did not stop in time; killing");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every node of the cluster; stops them all, router first, when dropped.
struct Cluster(Vec<Node>);

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in self.0.iter_mut().rev() {
            node.stop(Duration::from_secs(10));
        }
    }
}

fn cache_dir(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(d) = &args.cache_dir {
        return Ok(d.clone());
    }
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME") {
        return Ok(PathBuf::from(x).join("switchyard"));
    }
    let home = std::env::var_os("HOME")
        .context("no --cache-dir, XDG_CACHE_HOME or HOME to keep models in")?;
    Ok(PathBuf::from(home).join(".cache").join("switchyard"))
}

/// The model to serve: `--model`, or the preset synthesised into the cache (once).
fn resolve_model(args: &UpArgs) -> anyhow::Result<PathBuf> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let dir = cache_dir(args)?
        .join("models")
        .join(if args.expert_skew == 0.0 {
            format!("{}-bf16-seed0", args.preset)
        } else {
            format!("{}-bf16-seed0-skew{}", args.preset, args.expert_skew)
        });
    if dir.join("config.json").exists() {
        // Models cached before synth wrote tokenizers get one now.
        if !dir.join("tokenizer.json").exists() {
            let config = ModelConfig::from_dir(&dir)?;
            switchyard_engine::tokenizer::write_synthetic(&dir, config.vocab_size, 0)
                .with_context(|| format!("adding a tokenizer to {}", dir.display()))?;
        }
        return Ok(dir);
    }
    // Write beside, then rename: a crash never leaves a half-written model in the cache.
    let tmp = dir.with_extension(format!("partial-{}", std::process::id()));
    let options = SynthOptions {
        preset: args.preset.clone(),
        dtype: SynthDType::Bf16,
        expert_skew: args.expert_skew,
        ..Default::default()
    };
    synth::synth(&tmp, &options)
        .with_context(|| format!("synthesising preset {:?}", args.preset))?;
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => {}
        // Another `up` finished first: use its copy.
        Err(_) if dir.join("config.json").exists() => {
            let _ = std::fs::remove_dir_all(&tmp);
        }
        Err(e) => {
            return Err(e).with_context(|| format!("moving the model into {}", dir.display()));
        }
    }
    Ok(dir)
}

/// `up` stopped by Ctrl-C (2) or SIGTERM (15) before the cluster was up: every node started
/// so far is stopped, and the process exits 128 + the signal, without an error message.
#[derive(Debug, thiserror::Error)]
#[error("stopped by signal {0} while the cluster was starting")]
pub struct StoppedDuringStartup(pub i32);

/// What a node's start-up waits on besides the node: a signal to `up`.
struct Startup<'a> {
    runtime: &'a tokio::runtime::Runtime,
    signals: &'a mut Signals,
    /// Every node's `--weight-dtype`, handed over in its variable.
    weight_dtype: &'static str,
}

impl Startup<'_> {
    /// Waits up to `d` for Ctrl-C or SIGTERM; the signal's number if one came.
    fn signal(&mut self, d: Duration) -> Option<i32> {
        let signals = &mut *self.signals;
        self.runtime
            .block_on(async { tokio::time::timeout(d, signals.recv()).await.ok() })
    }
}

/// Starts `switchyard ARGS` and waits for its `listening on ADDR` line, saying on stderr
/// that it starts and, every 5 s, that it still does; a signal to `up` stops it at once.
fn spawn(
    name: String,
    args: &[String],
    threads: usize,
    start: &mut Startup<'_>,
) -> anyhow::Result<Node> {
    let exe = std::env::current_exe().context("locating the switchyard binary")?;
    let mut command = Command::new(exe);
    command
        .args(args)
        .env("SWITCHYARD_THREADS", threads.max(1).to_string())
        .env(crate::weights::ENV, start.weight_dtype)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; it only asks the kernel to SIGTERM this child if
        // `up` itself dies, so a killed `up` leaves no orphans.
        unsafe {
            command.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
    }
    let mut child = command
        .spawn()
        .with_context(|| format!("starting {name}"))?;
    let stdout = child.stdout.take().context("child stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        // Keep draining so the child never blocks on a full pipe.
        for _ in lines {}
    });
    let mut node = Node {
        name: name.clone(),
        child,
        addr: String::new(),
        http: None,
        metrics: None,
        reported: false,
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(300);
    let mut told = started;
    eprintln!("{name}: starting (pid {})", node.child.id());
    loop {
        match rx.try_recv() {
            Ok(line) => {
                node.addr = line
                    .split_whitespace()
                    .nth(2)
                    .unwrap_or_default()
                    .to_string();
                // Routers print `· http ADDR` when they serve HTTP.
                let words: Vec<&str> = line.split_whitespace().collect();
                node.http = words
                    .windows(2)
                    .find(|w| w[0] == "http")
                    .map(|w| w[1].to_string());
                node.metrics = words
                    .windows(2)
                    .find(|w| w[0] == "metrics")
                    .map(|w| format!("http://{}/metrics", w[1]));
                return Ok(node);
            }
            Err(_) => {
                if let Some(signal) = start.signal(Duration::from_millis(100)) {
                    // A node still starting holds nothing to drain.
                    node.stop(Duration::from_secs(1));
                    return Err(StoppedDuringStartup(signal).into());
                }
                if let Ok(Some(status)) = node.child.try_wait() {
                    bail!("{name} exited during start-up ({status})");
                }
                let now = Instant::now();
                if now > deadline {
                    node.stop(Duration::from_secs(1));
                    bail!("{name} did not start within 300 s");
                }
                if now.duration_since(told) >= Duration::from_secs(5) {
                    told = now;
                    eprintln!(
                        "{name}: still starting ({} s)",
                        now.duration_since(started).as_secs()
                    );
                }
            }
        }
    }
}

pub fn run(mut args: UpArgs) -> anyhow::Result<()> {
    if !args.gpus.is_empty() {
        args.workers = args.gpus.len();
        // Fail here, once and clearly, rather than in every worker process.
        for &gpu in &args.gpus {
            switchyard_engine::Device::Cuda(gpu)
                .check()
                .with_context(|| format!("--gpus: device {gpu}"))?;
        }
    }
    args.router_device.check().context("--router-device")?;
    if args.workers == 0 {
        bail!("--workers must be >= 1, got 0");
    }
    if args.routers == 0 {
        bail!("--routers must be >= 1, got 0");
    }
    if !args.demo_prompt_ids.is_empty() && args.serve.tls_cert.is_some() {
        bail!(
            "--demo-prompt-ids calls the router in plaintext; drop --tls-cert, or generate with `switchyard generate --router ADDR --tls-ca CA.pem`"
        );
    }
    // Catch Ctrl-C and SIGTERM from the start, so one that arrives while nodes are starting
    // still stops them all cleanly instead of killing `up` outright.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut signals = runtime.block_on(async { Signals::new() })?;
    if let Some(path) = &args.cluster {
        return run_file(&args, path, runtime, signals);
    }
    let model = resolve_model(&args)?;
    let config = ModelConfig::from_dir(&model)?;
    // A dense model (no routed experts) runs whole on the router: no coordinator, no workers.
    let experts = config.moe.as_ref().map(|m| m.n_routed_experts);
    if let Some(experts) = experts
        && args.workers > experts
    {
        bail!(
            "--workers must be <= the model's {experts} routed experts, got {}",
            args.workers
        );
    }
    let shared_on_workers = args.dispatch.shared_expert_on == "workers";
    let model_arg = model.display().to_string();
    // Kept to the end of the run: a throw-away CA's directory goes with it.
    let certs = crate::cluster_tls::NodeCerts::for_up(
        args.insecure_cluster,
        args.cluster_certs.as_deref(),
        Some((args.workers, args.routers)),
    )?;
    let mut cluster = Cluster(Vec::new());
    let mut start = Startup {
        runtime: &runtime,
        signals: &mut signals,
        weight_dtype: args.weights.value(),
    };
    let coordinator = match experts {
        Some(_) => Some(start_experts(
            &args,
            &model_arg,
            shared_on_workers,
            &certs,
            &mut cluster,
            &mut start,
        )?),
        None => None,
    };
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut routers = Vec::new();
    for r in 0..args.routers {
        // The first router takes --router-addr; the others pick free ports beside it.
        let listen = if r == 0 {
            args.router_addr.to_string()
        } else {
            "127.0.0.1:0".to_string()
        };
        let mut router_args: Vec<String> = [
            "router",
            "--model",
            &model_arg,
            "--listen",
            &listen,
            "--device",
            &args.router_device.to_string(),
        ]
        .map(String::from)
        .to_vec();
        router_args.extend(args.dispatch.to_args());
        if let Some(coordinator) = &coordinator {
            router_args.extend(["--coordinator".to_string(), coordinator.clone()]);
            router_args.extend(certs.node(&format!("router-{r}")).to_flags());
        }
        router_args.extend(args.serve.to_args());
        if r == 0
            && let Some(http) = &args.http_addr
        {
            router_args.extend(["--http-listen".to_string(), http.to_string()]);
        }
        // A router starts serving once the coordinator has a live placement.
        let name = if args.routers == 1 {
            "router".to_string()
        } else {
            format!("router {r}")
        };
        cluster
            .0
            .push(spawn(name, &router_args, cores, &mut start)?);
        routers.push(cluster.0.last().map(|n| n.addr.clone()).unwrap_or_default());
    }

    for node in &cluster.0 {
        match &node.http {
            Some(http) => eprintln!(
                "{} · pid {} · {} · http {http}",
                node.name,
                node.child.id(),
                node.addr
            ),
            None => eprintln!(
                "{} · pid {} · {}{}",
                node.name,
                node.child.id(),
                node.addr,
                node.metrics
                    .as_ref()
                    .map_or_else(String::new, |m| format!(" · metrics {m}"))
            ),
        }
    }
    let http = cluster.0.iter().find_map(|n| n.http.clone());
    let s = if routers.len() > 1 { "s" } else { "" };
    // The line scripts read: the router's address.
    match (&coordinator, experts) {
        (Some(coordinator), Some(experts)) => {
            let held = experts_per_worker(coordinator, &certs).unwrap_or_default();
            eprintln!("{}", certs.describe());
            eprintln!(
                "switchyard up: router{s} {} · coordinator {coordinator} · {} workers holding {} of {} routed experts per MoE layer · model {}",
                routers.join(", "),
                args.workers,
                held,
                experts,
                model.display()
            );
        }
        _ => eprintln!(
            "switchyard up: router{s} {} · dense model, no expert workers · model {}",
            routers.join(", "),
            model.display()
        ),
    }
    finish(&args, &routers, http.as_deref(), cluster, &runtime, signals)
}

/// Starts the coordinator and the expert workers; returns the coordinator's address.
fn start_experts(
    args: &UpArgs,
    model_arg: &str,
    shared_on_workers: bool,
    certs: &crate::cluster_tls::NodeCerts,
    cluster: &mut Cluster,
    start: &mut Startup<'_>,
) -> anyhow::Result<String> {
    args.balancing.balancing()?;
    let mut coordinator_args: Vec<String> = [
        "coordinator",
        "--model",
        model_arg,
        "--listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "127.0.0.1:0",
        "--replicas",
        &args.replicas.to_string(),
        "--lease-ms",
        &args.lease_ms.to_string(),
    ]
    .map(String::from)
    .to_vec();
    coordinator_args.extend(args.balancing.to_flags());
    coordinator_args.extend(certs.node("coordinator").to_flags());
    coordinator_args.extend(args.serve.metrics_auth_args());
    cluster
        .0
        .push(spawn("coordinator".into(), &coordinator_args, 1, start)?);
    let coordinator = cluster.0[0].addr.clone();
    for w in 0..args.workers {
        let mut worker_args: Vec<String> = [
            "worker",
            "--model",
            model_arg,
            "--coordinator",
            &coordinator,
            "--memory",
            &args.worker_memory.to_string(),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            // `up` stops the whole cluster at once: there is no one to drain to.
            "--drain-timeout-s",
            "0",
        ]
        .map(String::from)
        .to_vec();
        if shared_on_workers {
            worker_args.push("--with-shared-expert".into());
        }
        worker_args.extend(certs.node(&format!("worker-{w}")).to_flags());
        worker_args.extend(args.serve.metrics_auth_args());
        if let Some(gpu) = args.gpus.get(w) {
            worker_args.extend(["--device".to_string(), format!("cuda:{gpu}")]);
        }
        cluster.0.push(spawn(
            format!("worker {w}"),
            &worker_args,
            args.worker_threads,
            start,
        )?);
    }
    Ok(coordinator)
}

/// Runs the demo generation, or serves until a signal.
fn finish(
    args: &UpArgs,
    routers: &[String],
    http: Option<&str>,
    mut cluster: Cluster,
    runtime: &tokio::runtime::Runtime,
    signals: Signals,
) -> anyhow::Result<()> {
    if !args.demo_prompt_ids.is_empty() {
        let Some(router) = routers.first() else {
            bail!("--demo-prompt-ids needs a router on this host");
        };
        let request = GenerateRequest {
            prompt_ids: args.demo_prompt_ids.clone(),
            max_new_tokens: 16,
            ignore_eos: true,
            ..Default::default()
        };
        let start = Instant::now();
        let reply = crate::generate::generate_via_router(router, request.clone())?;
        let seconds = start.elapsed().as_secs_f64();
        // Every router shares the same workers and must agree.
        for other in routers.iter().skip(1) {
            let again = crate::generate::generate_via_router(other, request.clone())?;
            if again.token_ids != reply.token_ids {
                bail!(
                    "router {other} generated {:?}, router {router} {:?}",
                    again.token_ids,
                    reply.token_ids
                );
            }
        }
        crate::generate::print_remote(router, &args.demo_prompt_ids, &reply, seconds, args.json);
        return Ok(());
    }
    for r in routers {
        println!("router {r}");
    }
    if let Some(h) = http {
        println!("http {h}");
    }
    eprintln!("serving; Ctrl-C or SIGTERM stops every node");
    wait(&mut cluster, runtime, signals)
}

/// `--cluster FILE`: the nodes the file places on this host (`--host`), at their addresses.
fn run_file(
    args: &UpArgs,
    path: &std::path::Path,
    runtime: tokio::runtime::Runtime,
    mut signals: Signals,
) -> anyhow::Result<()> {
    use crate::cluster_file::{ClusterFile, on_this_host};
    let file = ClusterFile::read(path)?;
    let certs = crate::cluster_tls::NodeCerts::for_up(
        args.insecure_cluster,
        args.cluster_certs.as_deref(),
        None,
    )?;
    let model = file.model.display().to_string();
    let coordinator = file.coordinator.addr.clone();
    let mut cluster = Cluster(Vec::new());
    let mut start = Startup {
        runtime: &runtime,
        signals: &mut signals,
        weight_dtype: args.weights.value(),
    };
    let strings = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    if on_this_host(&file.coordinator.host, &args.host) {
        args.balancing.balancing()?;
        let mut a = strings(&[
            "coordinator",
            "--model",
            &model,
            "--listen",
            &coordinator,
            "--replicas",
            &file.replicas.to_string(),
            "--lease-ms",
            &file.lease_ms.to_string(),
        ]);
        a.extend(args.balancing.to_flags());
        a.extend(certs.node("coordinator").to_flags());
        a.extend(args.serve.metrics_auth_args());
        cluster
            .0
            .push(spawn("coordinator".into(), &a, 1, &mut start)?);
    }
    for (i, w) in file
        .workers
        .iter()
        .enumerate()
        .filter(|(_, w)| on_this_host(&w.host, &args.host))
    {
        let mut a = strings(&[
            "worker",
            "--model",
            &model,
            "--coordinator",
            &coordinator,
            "--memory",
            &w.memory,
            "--listen",
            &w.addr,
            "--advertise",
            &w.addr,
            "--device",
            &w.device,
        ]);
        a.extend(certs.node(&format!("worker-{i}")).to_flags());
        a.extend(args.serve.metrics_auth_args());
        cluster
            .0
            .push(spawn(format!("worker {i}"), &a, w.threads, &mut start)?);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut routers = Vec::new();
    for (i, r) in file
        .routers
        .iter()
        .enumerate()
        .filter(|(_, r)| on_this_host(&r.host, &args.host))
    {
        let mut a = strings(&[
            "router",
            "--model",
            &model,
            "--coordinator",
            &coordinator,
            "--listen",
            &r.addr,
        ]);
        a.extend(args.dispatch.to_args());
        a.extend(certs.node(&format!("router-{i}")).to_flags());
        a.extend(strings(&[
            "--device",
            &r.device
                .clone()
                .unwrap_or_else(|| args.router_device.to_string()),
        ]));
        a.extend(args.serve.to_args());
        if let Some(http) = &r.http {
            a.extend(strings(&["--http-listen", http]));
        }
        cluster
            .0
            .push(spawn(format!("router {i}"), &a, cores, &mut start)?);
        routers.push(r.addr.clone());
    }
    if cluster.0.is_empty() {
        bail!(
            "{} places no node on host {:?}",
            path.display(),
            args.host.as_deref().unwrap_or_default()
        );
    }
    for node in &cluster.0 {
        eprintln!("{} · pid {} · {}", node.name, node.child.id(), node.addr);
    }
    eprintln!(
        "switchyard up: {} nodes from {} · coordinator {coordinator}",
        cluster.0.len(),
        path.display()
    );
    let http = cluster.0.iter().find_map(|n| n.http.clone());
    finish(args, &routers, http.as_deref(), cluster, &runtime, signals)
}

/// Until a signal, or until a node dies (then everything stops: a half cluster serves errors).
/// Ctrl-C and SIGTERM, registered once.
struct Signals {
    #[cfg(unix)]
    term: tokio::signal::unix::Signal,
    #[cfg(unix)]
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Signals> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            Ok(Signals {
                term: signal(SignalKind::terminate()).context("catching SIGTERM")?,
                int: signal(SignalKind::interrupt()).context("catching SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(Signals {})
    }

    /// The next Ctrl-C (2) or SIGTERM (15).
    async fn recv(&mut self) -> i32 {
        #[cfg(unix)]
        tokio::select! {
            _ = self.term.recv() => 15,
            _ = self.int.recv() => 2,
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            2
        }
    }
}

fn wait(
    cluster: &mut Cluster,
    runtime: &tokio::runtime::Runtime,
    mut signals: Signals,
) -> anyhow::Result<()> {
    runtime.block_on(async {
        let mut signal = std::pin::pin!(signals.recv());
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = &mut signal => {
                    eprintln!("stopping the cluster");
                    return Ok(());
                }
                _ = tick.tick() => {
                    for node in cluster.0.iter_mut() {
                        if let Ok(Some(status)) = node.child.try_wait() {
                            // A lost worker's experts are re-placed on the others; without the
                            // coordinator or the router there is no cluster.
                            if node.name.starts_with("worker") {
                                if !node.reported {
                                    eprintln!("{} exited ({status}); the coordinator re-places its experts", node.name);
                                    node.reported = true;
                                }
                                continue;
                            }
                            bail!("{} exited ({status}); stopping the cluster", node.name);
                        }
                    }
                }
            }
        }
    })
}

/// "16, 16": expert copies per worker (all layers), from the coordinator.
fn experts_per_worker(
    coordinator: &str,
    certs: &crate::cluster_tls::NodeCerts,
) -> anyhow::Result<String> {
    use switchyard_proto::v1::ClusterStatusRequest;
    let status = crate::coordinator::with_client(coordinator, &certs.node("admin"), async |c| {
        Ok(c.cluster_status(ClusterStatusRequest {})
            .await?
            .into_inner())
    })?;
    let counts: Vec<String> = status
        .workers
        .iter()
        .map(|w| w.experts.to_string())
        .collect();
    Ok(format!("{} (all layers)", counts.join(", ")))
}
