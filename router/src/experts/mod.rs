//! The router's expert pool: where its routed experts run, for the router's whole life.
//!
//! One [`ExpertPool`] per router owns one dispatch runtime, a connection ([`WorkerLink`]) per
//! worker keyed by the coordinator's [`WorkerId`], and the placement in force as an
//! `Arc<Route>` — a [`Placement`] paired with the links it sends on. A new placement version
//! is a diff: links to new workers are made, links to workers it no longer names are dropped
//! from the pool (a step still running on an older route keeps its own until it ends), and
//! the route is swapped between steps, never inside one ([`ExpertPool::step`]).
//!
//! - [`placement`]: a placement version as data, from the coordinator's map or (static
//!   `--workers` mode) from what the workers report;
//! - [`plan`]: pure call planning — one call per worker per layer — and failover re-planning;
//! - [`dispatch`]: a step's [`ExpertExecutor`](switchyard_engine::model::ExpertExecutor):
//!   send, overlap, collect, and re-plan failed calls once on the newest route;
//! - [`tail`]: tail tolerance — recent call times, hedging slow calls to replicas, adaptive
//!   deadlines, and suspect workers avoided until a probe answers;
//! - [`transport`]: the [`Transport`] seam and an in-memory implementation with faults;
//!   [`grpc`]: the gRPC one;
//! - [`follow`]: following the coordinator — the placement watch and the reports of the
//!   version in use, both reconnecting with capped exponential backoff.

pub mod dispatch;
pub mod follow;
pub mod grpc;
pub mod placement;
pub mod plan;
pub mod tail;
pub mod transport;

#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use switchyard_engine::ModelConfig;
use switchyard_proto::WorkerId;
use switchyard_proto::tls::ClusterLinks;
use switchyard_proto::v1::{Dtype, InfoResponse, PlacementMap};

pub use dispatch::PoolStep;
pub use grpc::{CallMode, GrpcTransport};
pub use placement::{ExpertShape, Placement};
pub use transport::{MemoryTransport, Transport, WorkerLink};

use crate::error::RouterError;
use crate::metrics::{DispatchMetrics, WorkerLabel};

#[derive(Clone, Debug)]
pub struct DispatchOptions {
    /// Hidden states on the wire: bf16 halves the bytes; f32 is exact.
    pub wire_dtype: Dtype,
    /// Deadline of each worker call: the ceiling of the adaptive one (see [`tail`]).
    pub deadline: Duration,
    /// Hedging and adaptive deadlines.
    pub tail: tail::TailOptions,
    /// Largest reply accepted, in bytes.
    pub max_message_bytes: usize,
    /// Run shared experts on the workers, each token's with one of its routed calls, instead
    /// of on the router (every worker then holds a copy).
    pub shared_on_workers: bool,
    /// A unary RPC per call, or one long-lived stream per worker.
    pub call_mode: CallMode,
    /// Micro-batches per step (at most one per sequence): while one's expert calls are in
    /// flight, the next one's attention runs. 1 runs each step whole.
    pub micro_batches: usize,
    /// Split only steps of at least this many tokens (0: every step of 2+ sequences).
    pub micro_batch_min_tokens: usize,
    /// Where per-layer latency, per-worker traffic and placement switches are recorded.
    pub metrics: DispatchMetrics,
    /// How worker and coordinator links run: mutual TLS with this router's certificate, or
    /// plaintext.
    pub links: ClusterLinks,
}

/// Steps below this many tokens run whole by default: measured on `mini` (2-core AVX2 EPYC,
/// one worker), splitting decode steps of 8–32 tokens cost 15–25 % of decode throughput, as each
/// micro-batch re-reads its experts' weights; steps of 256 prefill tokens gained up to 22 %.
pub const DEFAULT_MICRO_BATCH_MIN_TOKENS: usize = 256;

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            wire_dtype: Dtype::Bf16,
            deadline: Duration::from_secs(10),
            tail: tail::TailOptions::default(),
            max_message_bytes: 64 << 20,
            shared_on_workers: false,
            call_mode: CallMode::Unary,
            micro_batches: 2,
            micro_batch_min_tokens: DEFAULT_MICRO_BATCH_MIN_TOKENS,
            metrics: DispatchMetrics::default(),
            links: ClusterLinks::Insecure,
        }
    }
}

/// How long an unreachable worker's calls go to its replicas first before it is tried again.
pub const DOWN_FOR: Duration = Duration::from_millis(500);

/// How workers are named in metrics and the expert-load report: stable across placement
/// versions either way.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labels {
    /// The coordinator's worker id (coordinated mode).
    WorkerId,
    /// The worker's address (static `--workers` mode).
    Address,
}

/// One placement version and a link to every worker it names: what a step dispatches with.
#[derive(Debug)]
pub struct Route {
    pub placement: Placement,
    pub links: BTreeMap<WorkerId, Arc<dyn WorkerLink>>,
}

/// The router's expert workers, for the router's life.
pub struct ExpertPool {
    shape: ExpertShape,
    hidden: usize,
    identity: String,
    options: DispatchOptions,
    labels: Labels,
    transport: Arc<dyn Transport>,
    route: RwLock<Option<Arc<Route>>>,
    /// The links new routes are made from, kept across versions.
    links: Mutex<BTreeMap<WorkerId, Arc<dyn WorkerLink>>>,
    /// One switch at a time (the follower's; a test's).
    switching: tokio::sync::Mutex<()>,
    /// The coordinator followed and this router's id there, once following.
    following: std::sync::OnceLock<(String, String)>,
    /// Why the last attempt to switch to a newer placement failed, while it keeps failing.
    switch_error: Mutex<Option<String>>,
    /// Workers that could not be reached, and until when calls go to their replicas first.
    down: Mutex<BTreeMap<WorkerId, Instant>>,
    /// Workers that missed a call's time, avoided until a probe answers.
    suspects: tail::Suspects,
    /// Recent round trips and the hedge budget.
    call_times: tail::CallTimes,
    /// Steps running, by the placement version they dispatch with: an old version stays in
    /// use — and is reported as such — until its last step ends.
    steps: Mutex<BTreeMap<u64, usize>>,
    /// Woken when the version in use changes (a switch, the last step on an old version
    /// ending), so the coordinator hears of it at once.
    pub(crate) in_use_changed: Arc<tokio::sync::Notify>,
    /// Steps begun, the salt of each step's replica split.
    step_count: std::sync::atomic::AtomicU64,
    /// Tokens per expert and assignments per worker, counted by the backend, reported to the
    /// coordinator.
    load: Arc<crate::expert_load::ExpertLoad>,
    /// Dropped last, in the background: the links' connections live on it.
    runtime: Option<tokio::runtime::Runtime>,
}

impl fmt::Debug for ExpertPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExpertPool")
            .field("version", &self.version())
            .field("workers", &self.links().keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Drop for ExpertPool {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            // Safe from any context, async included; its tasks stop at their next await.
            rt.shutdown_background();
        }
    }
}

/// Runs `fut` on `handle` and waits for it from this (non-async) thread.
pub(crate) fn wait_on<T: Send + 'static>(
    handle: &tokio::runtime::Handle,
    fut: impl std::future::Future<Output = T> + Send + 'static,
) -> Result<T, RouterError> {
    let (tx, rx) = std::sync::mpsc::channel();
    handle.spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .map_err(|_| RouterError::Runtime("the dispatch runtime stopped".into()))
}

impl ExpertPool {
    /// An empty pool for `config`'s routed experts: no route until [`ExpertPool::switch`].
    pub fn new(
        config: &ModelConfig,
        transport: Arc<dyn Transport>,
        options: DispatchOptions,
        labels: Labels,
    ) -> Result<Arc<ExpertPool>, RouterError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("switchyard-dispatch")
            .enable_all()
            .build()
            .map_err(|e| RouterError::Runtime(format!("cannot start the dispatch runtime: {e}")))?;
        let moe = config.moe.as_ref();
        let load = Arc::new(crate::expert_load::ExpertLoad::new(
            config.moe_layers(),
            moe.map_or(0, |m| m.n_routed_experts),
            moe.map_or(0, |m| m.num_experts_per_tok),
        ));
        let suspects = tail::Suspects::new(options.metrics.suspect_workers.clone());
        Ok(Arc::new(ExpertPool {
            step_count: std::sync::atomic::AtomicU64::new(0),
            load,
            shape: ExpertShape::of(config)?,
            hidden: config.hidden_size,
            identity: config.identity(),
            options,
            labels,
            transport,
            route: RwLock::new(None),
            links: Mutex::new(BTreeMap::new()),
            switching: tokio::sync::Mutex::new(()),
            following: std::sync::OnceLock::new(),
            steps: Mutex::new(BTreeMap::new()),
            down: Mutex::new(BTreeMap::new()),
            suspects,
            call_times: tail::CallTimes::default(),
            switch_error: Mutex::new(None),
            in_use_changed: Arc::new(tokio::sync::Notify::new()),
            runtime: Some(runtime),
        }))
    }

    /// Static mode over gRPC: the workers at `addrs` (worker `i` is `WorkerId(i)`), checked to
    /// serve this model and to hold every routed expert between them. Call from a plain
    /// thread, not from async code.
    pub fn connect_static(
        config: &ModelConfig,
        addrs: &[String],
        options: DispatchOptions,
    ) -> Result<Arc<ExpertPool>, RouterError> {
        let transport = Arc::new(GrpcTransport::new(
            options.max_message_bytes,
            options.call_mode,
            options.links.clone(),
        ));
        Self::from_workers(config, transport, addrs, options)
    }

    /// Static mode over any transport (see [`ExpertPool::connect_static`]).
    pub fn from_workers(
        config: &ModelConfig,
        transport: Arc<dyn Transport>,
        addrs: &[String],
        options: DispatchOptions,
    ) -> Result<Arc<ExpertPool>, RouterError> {
        let pool = ExpertPool::new(config, transport, options, Labels::Address)?;
        let links = {
            let _in_runtime = pool.handle().enter();
            addrs
                .iter()
                .enumerate()
                .map(|(i, addr)| pool.transport.connect(WorkerId(i as u32), addr))
                .collect::<Result<Vec<_>, _>>()?
        };
        let deadline = pool.options.deadline;
        let ask = links.clone();
        let infos = wait_on(&pool.handle(), async move {
            let mut out = Vec::with_capacity(ask.len());
            for link in ask {
                out.push((link.worker(), link.info(deadline).await?));
            }
            Ok::<_, RouterError>(out)
        })??;
        for (id, info) in &infos {
            pool.check_worker(*id, &addrs[id.0 as usize], info)?;
        }
        let placement = Placement::from_infos(&pool.shape, &infos)?;
        let links: BTreeMap<_, _> = links.into_iter().map(|l| (l.worker(), l)).collect();
        pool.install(placement, links);
        Ok(pool)
    }

    /// A worker serves this model (and, when shared experts run on the workers, holds them).
    fn check_worker(
        &self,
        id: WorkerId,
        addr: &str,
        info: &InfoResponse,
    ) -> Result<(), RouterError> {
        if info.model != self.identity || info.hidden_size as usize != self.hidden {
            return Err(RouterError::Placement(format!(
                "worker {id} ({addr}) serves model {:?}, this router {:?}",
                info.model, self.identity
            )));
        }
        if self.options.shared_on_workers
            && let Some(layer) = self
                .shape
                .moe_layers
                .iter()
                .find(|l| !info.shared_expert_layers.contains(&(**l as u32)))
        {
            return Err(RouterError::Placement(format!(
                "shared experts run on the workers, but worker {id} ({addr}) lacks the shared expert of layer {layer} (start it with --with-shared-expert)"
            )));
        }
        Ok(())
    }

    /// Switches to the coordinator's `map` if it is newer than the route in use: links to the
    /// workers it adds are made (and, with shared experts on the workers, checked), links to
    /// the workers it drops leave the pool, and the new route serves the next step. Returns
    /// whether it switched; on error the route in use stays.
    pub async fn switch(&self, map: &PlacementMap) -> Result<bool, RouterError> {
        let _one_at_a_time = self.switching.lock().await;
        if self
            .route()
            .is_some_and(|r| r.placement.version() >= map.version)
        {
            return Ok(false);
        }
        let placement = Placement::from_map(&self.shape, map)?;
        let used = placement.workers();
        let current = self.links();
        let mut next = BTreeMap::new();
        let mut added = Vec::new();
        for w in map
            .workers
            .iter()
            .filter(|w| used.contains(&WorkerId(w.worker_id)))
        {
            let id = WorkerId(w.worker_id);
            match current.get(&id) {
                Some(link) if link.addr() == w.address => {
                    next.insert(id, link.clone());
                }
                _ => {
                    let link = {
                        let _in_runtime = self.handle().enter();
                        self.transport.connect(id, &w.address)?
                    };
                    added.push(link.clone());
                    next.insert(id, link);
                }
            }
        }
        if self.options.shared_on_workers {
            // Workers of this model were checked by the coordinator; shared experts were not.
            for link in &added {
                let info = link.info(self.options.deadline).await?;
                self.check_worker(link.worker(), link.addr(), &info)?;
            }
        }
        let dropped: Vec<WorkerId> = current
            .keys()
            .filter(|id| !next.contains_key(id))
            .copied()
            .collect();
        tracing::info!(
            version = map.version,
            workers = next.len(),
            added = ?added.iter().map(|l| l.worker()).collect::<Vec<_>>(),
            dropped = ?dropped,
            "switched to a new placement"
        );
        self.install(placement, next);
        Ok(true)
    }

    fn install(&self, placement: Placement, links: BTreeMap<WorkerId, Arc<dyn WorkerLink>>) {
        let m = &self.options.metrics;
        for link in links.values() {
            m.touch(&self.label(link.as_ref()));
        }
        m.placement_version.set(placement.version() as i64);
        m.workers.set(links.len() as i64);
        m.placement_switches.inc();
        let route = Arc::new(Route {
            placement,
            links: links.clone(),
        });
        self.suspects.retain(&links);
        *self.links.lock().unwrap_or_else(|e| e.into_inner()) = links;
        *self.route.write().unwrap_or_else(|e| e.into_inner()) = Some(route);
    }

    /// The route in force now (`None` before the first placement).
    pub fn route(&self) -> Option<Arc<Route>> {
        self.route.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn links(&self) -> BTreeMap<WorkerId, Arc<dyn WorkerLink>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The placement version in use (0 before the first, and in static mode).
    pub fn version(&self) -> u64 {
        self.route().map_or(0, |r| r.placement.version())
    }

    /// The experts for one step: the route in force now, for the whole step. The step counts
    /// as using its version until it is dropped.
    pub fn step(&self) -> Result<PoolStep<'_>, RouterError> {
        // Under the lock, so a report of the version in use cannot miss a step that took the
        // route just before a switch.
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let route = self.route().ok_or_else(|| {
            RouterError::NoPlacement("no live placement of the routed experts yet".into())
        })?;
        *steps.entry(route.placement.version()).or_default() += 1;
        let salt = self
            .step_count
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(PoolStep::new(self, route, salt))
    }

    /// The expert-load counters of the steps run on this pool.
    pub fn load(&self) -> &Arc<crate::expert_load::ExpertLoad> {
        &self.load
    }

    /// Calls go to replicas of `worker` first for a while ([`DOWN_FOR`]): it could not be
    /// reached, and a dead worker stays in the placement until its lease runs out.
    pub(crate) fn mark_down(&self, worker: WorkerId) {
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        if !down.contains_key(&worker) {
            tracing::warn!(worker = %worker, "expert worker unreachable; its calls go to replicas first");
        }
        down.insert(worker, Instant::now() + DOWN_FOR);
    }

    /// Records how the last switch attempt went (`None`: it worked).
    pub(crate) fn set_switch_error(&self, error: Option<String>) {
        *self.switch_error.lock().unwrap_or_else(|e| e.into_inner()) = error;
    }

    /// Why switching to the newest placement keeps failing, if it does: the router still
    /// serves, correctly, on the placement it has (workers keep its experts while it reports
    /// using it), but operators should know.
    pub fn switch_error(&self) -> Option<String> {
        self.switch_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The workers calls avoid while they have replicas: unreachable ones for a while,
    /// suspect ones until they answer a probe.
    pub(crate) fn down_workers(&self) -> std::collections::BTreeSet<WorkerId> {
        let mut avoid = self.suspects.all();
        let mut down = self.down.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        down.retain(|_, until| *until > now);
        avoid.extend(down.keys().copied());
        avoid
    }

    /// `link`'s worker missed a call's time: avoid it until it answers a probe.
    pub(crate) fn mark_suspect(&self, link: &Arc<dyn WorkerLink>) {
        self.suspects.mark(link.clone(), &self.handle());
    }

    /// Workers suspect now (see [`tail::Suspects`]).
    pub fn suspect_workers(&self) -> std::collections::BTreeSet<WorkerId> {
        self.suspects.all()
    }

    pub(crate) fn call_times(&self) -> &tail::CallTimes {
        &self.call_times
    }

    /// A step on `version` ended.
    pub(crate) fn step_ended(&self, version: u64) {
        let mut steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let last = match steps.get_mut(&version) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                steps.remove(&version);
                true
            }
            None => false,
        };
        drop(steps);
        if last && version < self.version() {
            self.in_use_changed.notify_one();
        }
    }

    /// The oldest placement version this router may still send calls for: that of its oldest
    /// running step, or the route in force. What it reports to the coordinator.
    pub fn version_in_use(&self) -> u64 {
        let steps = self.steps.lock().unwrap_or_else(|e| e.into_inner());
        let current = self.version();
        steps.keys().next().map_or(current, |&v| v.min(current))
    }

    /// Whether the pool can serve every routed expert now, and why not.
    pub fn ready(&self) -> Result<(), String> {
        match self.route() {
            Some(_) => Ok(()),
            None => Err("no live placement of the routed experts yet".into()),
        }
    }

    /// How `link`'s worker is named in metrics and the expert-load report.
    pub fn label(&self, link: &dyn WorkerLink) -> WorkerLabel {
        WorkerLabel {
            worker: match self.labels {
                Labels::WorkerId => link.worker().0.to_string(),
                Labels::Address => link.addr().to_string(),
            },
        }
    }

    pub fn options(&self) -> &DispatchOptions {
        &self.options
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// The dispatch runtime's handle (the pool keeps it running).
    pub fn handle(&self) -> tokio::runtime::Handle {
        match &self.runtime {
            Some(rt) => rt.handle().clone(),
            // Only during drop, when nothing calls this.
            None => unreachable!("the pool's runtime lives until the pool is dropped"),
        }
    }

    /// Follows the coordinator at `coordinator` (see [`follow`]) and waits up to `wait` for a
    /// first live placement. Call from a plain thread, not from async code.
    pub fn coordinated(
        config: &ModelConfig,
        coordinator: &str,
        options: DispatchOptions,
        wait: Duration,
    ) -> Result<Arc<ExpertPool>, RouterError> {
        let transport = Arc::new(GrpcTransport::new(
            options.max_message_bytes,
            options.call_mode,
            options.links.clone(),
        ));
        let pool = ExpertPool::new(config, transport, options, Labels::WorkerId)?;
        follow::start(&pool, coordinator, &follow::router_id());
        pool.wait_for_route(wait).map_err(|_| {
            RouterError::NoPlacement(format!(
                "the coordinator at {coordinator} had no live placement within {wait:?}"
            ))
        })?;
        Ok(pool)
    }

    /// On shutdown: tells the coordinator followed (if any) that this router is gone.
    pub async fn leave(&self) {
        if let Some((coordinator, id)) = self.following.get() {
            follow::leave(coordinator, id, &self.options.links).await;
        }
    }

    /// Waits (up to `wait`) until the pool has a route.
    pub fn wait_for_route(&self, wait: Duration) -> Result<(), RouterError> {
        let deadline = Instant::now() + wait;
        while self.route().is_none() {
            if Instant::now() >= deadline {
                return Err(RouterError::NoPlacement(format!(
                    "no live placement within {wait:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }
}
