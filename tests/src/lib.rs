//! `switchyard-tests`: end-to-end tests of whole clusters (in `tests/`), and the sandbox they
//! share: expert workers as in-process gRPC servers on ephemeral loopback ports, shut down
//! when the sandbox drops.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use switchyard_expert_worker::{ExpertSpec, ExpertWorker, service};
use tokio::sync::oneshot;

/// A running in-process expert worker.
#[derive(Debug)]
pub struct LocalWorker {
    pub addr: String,
    pub worker: Arc<ExpertWorker>,
    shutdown: Option<oneshot::Sender<()>>,
}

/// Expert workers serving one checkpoint, on 127.0.0.1 ephemeral ports.
#[derive(Debug)]
pub struct Sandbox {
    pub workers: Vec<LocalWorker>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl Sandbox {
    /// Starts one worker per spec, each holding the experts its spec names.
    pub fn start(model: &Path, specs: &[&str]) -> Sandbox {
        Self::start_with(model, specs, |w| w)
    }

    /// Like [`Sandbox::start`], with each worker adjusted before it serves.
    pub fn start_with(
        model: &Path,
        specs: &[&str],
        adjust: impl Fn(ExpertWorker) -> ExpertWorker,
    ) -> Sandbox {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime starts");
        let mut workers = Vec::new();
        for spec in specs {
            let spec: ExpertSpec = spec.parse().expect("valid expert spec");
            let worker = Arc::new(adjust(
                ExpertWorker::load(model, &spec).expect("worker loads"),
            ));
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
                .expect("bind an ephemeral loopback port");
            let addr = listener.local_addr().expect("bound address").to_string();
            let (tx, rx) = oneshot::channel::<()>();
            runtime.spawn(service::serve(
                worker.clone(),
                listener,
                ClusterLinks::Insecure,
                async {
                    let _ = rx.await;
                },
            ));
            workers.push(LocalWorker {
                addr,
                worker,
                shutdown: Some(tx),
            });
        }
        Sandbox {
            workers,
            runtime: Some(runtime),
        }
    }

    /// Stops worker `i` (its server drains and closes), as a crash would for its clients.
    pub fn stop_worker(&mut self, i: usize) {
        if let Some(tx) = self.workers.get_mut(i).and_then(|w| w.shutdown.take()) {
            let _ = tx.send(());
        }
    }

    /// Serves worker `i` again on its old address (stopping it first if it runs), as a
    /// restarted process would; waits (bounded) for the port to be free.
    pub fn restart_worker(&mut self, i: usize) {
        self.stop_worker(i);
        let (addr, worker) = (self.workers[i].addr.clone(), self.workers[i].worker.clone());
        let runtime = self.runtime.as_ref().expect("runtime lives until drop");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match runtime.block_on(tokio::net::TcpListener::bind(&addr)) {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot rebind {addr}: {e}"
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        let (tx, rx) = oneshot::channel::<()>();
        runtime.spawn(service::serve(
            worker,
            listener,
            ClusterLinks::Insecure,
            async {
                let _ = rx.await;
            },
        ));
        self.workers[i].shutdown = Some(tx);
    }

    pub fn addrs(&self) -> Vec<String> {
        self.workers.iter().map(|w| w.addr.clone()).collect()
    }

    /// Runs async test code (e.g. a raw gRPC client) on the sandbox's runtime.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime
            .as_ref()
            .expect("runtime lives until drop")
            .block_on(fut)
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        for w in &mut self.workers {
            if let Some(tx) = w.shutdown.take() {
                let _ = tx.send(());
            }
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

async fn coordinator_client(
    addr: &str,
    links: &ClusterLinks,
) -> switchyard_proto::v1::coordinator_service_client::CoordinatorServiceClient<
    tonic::transport::Channel,
> {
    switchyard_proto::client::coordinator(addr, links)
        .await
        .expect("the coordinator is reachable")
}

/// A coordinated cluster in this process — a coordinator and expert workers that register
/// with it, each a gRPC server on an ephemeral loopback port — whose membership tests change
/// while it serves: workers added, drained (as SIGTERM does), killed, the coordinator
/// restarted on its address. Everything stops when it drops.
#[derive(Debug)]
pub struct Cluster {
    model: std::path::PathBuf,
    shape: ModelShape,
    replicas: usize,
    lease: Duration,
    coordinator_addr: String,
    coordinator: Option<(CoordinatorNode, oneshot::Sender<()>)>,
    balancing: Balancing,
    pub workers: Vec<ClusterWorker>,
    /// With mutual TLS: the cluster CA every node's certificate comes from.
    ca: Option<Arc<ClusterCa>>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// One worker of a [`Cluster`]; `running` is false once it was drained or killed.
#[derive(Debug)]
pub struct ClusterWorker {
    pub addr: String,
    pub worker: Arc<ExpertWorker>,
    pub agent: Arc<Agent>,
    pub running: bool,
    membership: Option<tokio::task::JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
}

use switchyard_coordinator::membership::ModelShape;
use switchyard_coordinator::service::{Balancing, CoordinatorNode};
use switchyard_expert_worker::agent::{self, Agent, Membership};
use switchyard_proto::tls::{ClusterCa, ClusterLinks, NodeIdentity, Role};
use switchyard_proto::v1::PlacementUpdate;
use switchyard_proto::v1::coordinator_service_server::CoordinatorService;

impl Cluster {
    /// A coordinator (`replicas` copies of each expert, workers' lease `lease`) and `workers`
    /// workers for the checkpoint in `model`; returns once a placement is live.
    pub fn start(model: &Path, replicas: usize, lease: Duration, workers: usize) -> Cluster {
        Cluster::start_balancing(model, replicas, lease, workers, Balancing::default())
    }

    /// Like [`Cluster::start`], the coordinator balancing load as `balancing` says.
    pub fn start_balancing(
        model: &Path,
        replicas: usize,
        lease: Duration,
        workers: usize,
        balancing: Balancing,
    ) -> Cluster {
        Cluster::start_with_links(model, replicas, lease, workers, balancing, false)
    }

    /// Like [`Cluster::start`], every link over mutual TLS: a cluster CA issues the
    /// coordinator's certificate and each worker's (`worker-<index>`).
    pub fn start_tls(model: &Path, replicas: usize, lease: Duration, workers: usize) -> Cluster {
        Cluster::start_with_links(model, replicas, lease, workers, Balancing::default(), true)
    }

    fn start_with_links(
        model: &Path,
        replicas: usize,
        lease: Duration,
        workers: usize,
        balancing: Balancing,
        tls: bool,
    ) -> Cluster {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a tokio runtime starts");
        let config = switchyard_engine::ModelConfig::from_dir(model).expect("the model's config");
        let shape = ModelShape {
            identity: config.identity(),
            layers: config.moe_layers().iter().map(|&l| l as u32).collect(),
            experts_per_layer: config.moe.as_ref().map_or(0, |m| m.n_routed_experts as u32),
            expert_bytes: switchyard_coordinator::capacity::expert_bytes(
                &config,
                switchyard_coordinator::capacity::WeightDType::F32,
            ),
        };
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind an ephemeral loopback port");
        let coordinator_addr = listener.local_addr().expect("bound address").to_string();
        let mut cluster = Cluster {
            model: model.to_path_buf(),
            shape,
            replicas,
            lease,
            coordinator_addr,
            coordinator: None,
            balancing,
            workers: Vec::new(),
            ca: tls.then(|| {
                Arc::new(ClusterCa::generate(Duration::from_secs(3600)).expect("a cluster CA"))
            }),
            runtime: Some(runtime),
        };
        cluster.serve_coordinator(listener);
        for _ in 0..workers {
            cluster.add_worker();
        }
        cluster.wait_for("a first live placement", Duration::from_secs(30), |u| {
            u.live.is_some()
        });
        cluster
    }

    /// The links of `node`: its certificate from the cluster CA, or plaintext without one.
    pub fn links_for(&self, node: &NodeIdentity) -> ClusterLinks {
        match &self.ca {
            Some(ca) => ClusterLinks::tls(ca.node_tls(node).expect("a node certificate")),
            None => ClusterLinks::Insecure,
        }
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.runtime.as_ref().expect("runtime lives until drop")
    }

    fn serve_coordinator(&mut self, listener: tokio::net::TcpListener) {
        let node = CoordinatorNode::with_balancing(
            self.shape.clone(),
            self.replicas,
            self.lease,
            self.balancing.clone(),
        )
        .with_links(self.links_for(&NodeIdentity::new(Role::Coordinator, "coordinator")));
        let (tx, rx) = oneshot::channel::<()>();
        self.rt().spawn(switchyard_coordinator::service::serve(
            node.clone(),
            listener,
            async {
                let _ = rx.await;
            },
        ));
        self.coordinator = Some((node, tx));
    }

    pub fn coordinator_addr(&self) -> &str {
        &self.coordinator_addr
    }

    /// The coordinator serving now.
    pub fn coordinator(&self) -> &CoordinatorNode {
        &self.coordinator.as_ref().expect("a coordinator runs").0
    }

    /// Starts a worker that registers with the coordinator; returns its index.
    pub fn add_worker(&mut self) -> usize {
        let model = self.model.clone();
        self.add_worker_from(&model)
    }

    /// Like [`Cluster::add_worker`], the worker reading its experts from the checkpoint in
    /// `model` (a broken copy, say).
    pub fn add_worker_from(&mut self, model: &Path) -> usize {
        self.start_worker(ExpertWorker::empty(model).expect("an empty worker opens"))
    }

    /// Like [`Cluster::add_worker`], the worker also holding every layer's shared expert.
    pub fn add_shared_worker(&mut self) -> usize {
        let worker = ExpertWorker::empty(&self.model)
            .and_then(|w| w.with_shared_experts(&self.model))
            .expect("a worker with shared experts opens");
        self.start_worker(worker)
    }

    fn start_worker(&mut self, worker: ExpertWorker) -> usize {
        let worker = Arc::new(worker);
        let listener = self
            .rt()
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind an ephemeral loopback port");
        let addr = listener.local_addr().expect("bound address").to_string();
        let links = self.links_for(&NodeIdentity::new(
            Role::Worker,
            format!("worker-{}", self.workers.len()),
        ));
        let agent = Agent::new(
            worker.clone(),
            Membership {
                coordinator: self.coordinator_addr.clone(),
                advertise: addr.clone(),
                memory_bytes: 1 << 40,
                device: "cpu".into(),
                model: self.shape.identity.clone(),
                links: links.clone(),
            },
        );
        let (tx, rx) = oneshot::channel::<()>();
        let rt = self.rt();
        let membership = rt.spawn(agent::run(agent.clone()));
        let ready = agent.clone();
        let health = rt.block_on(switchyard_proto::health::Health::new(service::SERVICE));
        rt.spawn(service::serve_with(
            worker.clone(),
            listener,
            links,
            health.0,
            health.1,
            move || ready.ready(),
            async {
                let _ = rx.await;
            },
        ));
        self.workers.push(ClusterWorker {
            addr,
            worker,
            agent,
            running: true,
            membership: Some(membership),
            shutdown: Some(tx),
        });
        self.workers.len() - 1
    }

    /// Worker `i` leaves as on SIGTERM: it drains (bounded by `limit`), then stops. Returns
    /// whether the drain completed.
    pub fn drain_worker(&mut self, i: usize, limit: Duration) -> bool {
        let agent = self.workers[i].agent.clone();
        let drained = self.rt().block_on(async move { agent.drain(limit).await });
        self.kill_worker(i);
        drained
    }

    /// Worker `i` dies at once: its membership stops and its server closes.
    pub fn kill_worker(&mut self, i: usize) {
        let w = &mut self.workers[i];
        if let Some(m) = w.membership.take() {
            m.abort();
        }
        if let Some(tx) = w.shutdown.take() {
            let _ = tx.send(());
        }
        w.running = false;
    }

    /// Indices of the workers still running.
    pub fn running(&self) -> Vec<usize> {
        (0..self.workers.len())
            .filter(|&i| self.workers[i].running)
            .collect()
    }

    /// Stops the coordinator and starts a new one (empty state) on the same address.
    pub fn restart_coordinator(&mut self) {
        if let Some((_, tx)) = self.coordinator.take() {
            let _ = tx.send(());
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        let listener = loop {
            match self
                .rt()
                .block_on(tokio::net::TcpListener::bind(&self.coordinator_addr))
            {
                Ok(l) => break l,
                Err(e) => {
                    assert!(
                        std::time::Instant::now() < deadline,
                        "cannot rebind {}: {e}",
                        self.coordinator_addr
                    );
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        };
        self.serve_coordinator(listener);
    }

    /// The coordinator's placement now.
    pub fn placement(&self) -> PlacementUpdate {
        let node = self.coordinator().clone();
        let admin = self.admin();
        self.rt()
            .block_on(async move {
                let request = switchyard_proto::v1::GetPlacementRequest {};
                match admin {
                    Some((addr, links)) => {
                        coordinator_client(&addr, &links)
                            .await
                            .get_placement(request)
                            .await
                    }
                    None => node.get_placement(tonic::Request::new(request)).await,
                }
            })
            .expect("GetPlacement answers")
            .into_inner()
    }

    /// The coordinator's view of the cluster now (`switchyard status`).
    pub fn status(&self) -> switchyard_proto::v1::ClusterStatusResponse {
        let node = self.coordinator().clone();
        let admin = self.admin();
        self.rt()
            .block_on(async move {
                let request = switchyard_proto::v1::ClusterStatusRequest {};
                match admin {
                    Some((addr, links)) => {
                        coordinator_client(&addr, &links)
                            .await
                            .cluster_status(request)
                            .await
                    }
                    None => node.cluster_status(tonic::Request::new(request)).await,
                }
            })
            .expect("ClusterStatus answers")
            .into_inner()
    }

    /// With mutual TLS, where and how an operator reaches the coordinator (its calls check the
    /// caller's certificate, so they go over the network with an admin one).
    fn admin(&self) -> Option<(String, ClusterLinks)> {
        self.ca.as_ref()?;
        Some((
            self.coordinator_addr.clone(),
            self.links_for(&NodeIdentity::new(Role::Admin, "admin")),
        ))
    }

    /// Waits (bounded: panics with `what` past `limit`) until `done` holds for the placement.
    pub fn wait_for(&self, what: &str, limit: Duration, done: impl Fn(&PlacementUpdate) -> bool) {
        let deadline = std::time::Instant::now() + limit;
        loop {
            let u = self.placement();
            if done(&u) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no {what} within {limit:?}: {:?}",
                (
                    u.target.as_ref().map(|t| t.version),
                    u.live.as_ref().map(|l| l.version),
                    u.retain_from
                )
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the placement has settled: the target is live, every expert has at least
    /// `copies` holders, and no router or worker is behind (every version before it released).
    pub fn wait_settled(&self, copies: usize, limit: Duration) {
        self.wait_for("settled placement", limit, |u| settled(u, copies));
    }

    /// Runs async test code on the cluster's runtime.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.rt().block_on(fut)
    }
}

/// Whether `u`'s target is live, gives every expert `copies` holders or more, and nothing
/// older is still retained.
/// Every position's logits of one forward pass over `prompt`, routed experts run by
/// `experts` (the model itself, or a pool of workers).
pub fn prompt_logits(
    model: &switchyard_engine::model::CausalLm,
    experts: &dyn switchyard_engine::model::ExpertExecutor,
    prompt: &[u32],
) -> Vec<f32> {
    use switchyard_engine::model::{ForwardOptions, LogitsFor, SeqInput};
    let mut cache = model.new_cache(prompt.len());
    model
        .forward_with(
            &mut [SeqInput {
                tokens: prompt,
                cache: &mut cache,
            }],
            &ForwardOptions {
                logits: LogitsFor::All,
                ..Default::default()
            },
            experts,
        )
        .expect("the forward pass runs")
        .logits
        .into_f32_vec()
}

pub fn settled(u: &PlacementUpdate, copies: usize) -> bool {
    let (Some(t), Some(l)) = (&u.target, &u.live) else {
        return false;
    };
    t.version == l.version
        && u.retain_from == l.version
        && l.layers
            .iter()
            .all(|layer| layer.experts.iter().all(|e| e.worker_ids.len() >= copies))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.workers.len() {
            self.kill_worker(i);
        }
        if let Some((_, tx)) = self.coordinator.take() {
            let _ = tx.send(());
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}
