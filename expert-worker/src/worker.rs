//! The expert worker's logic: what it holds, validating a call, running it, counting load.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use switchyard_engine::checkpoint::{Checkpoint, WeightFormat};
use switchyard_engine::config::MoeNaming;
use switchyard_engine::model::ExpertSelection;
use switchyard_engine::model::experts::{ExpertGroup, RoutedExperts};
use switchyard_engine::model::mlp::Mlp;
use switchyard_engine::tensor::Compute;
use switchyard_engine::{Device, ModelConfig, Tensor};
use switchyard_proto::codec;
use switchyard_proto::v1::{self, Dtype, ForwardRequest, InfoResponse, LayerExperts};

use crate::error::WorkerError;
use crate::spec::ExpertSpec;

/// Default cap on one call's hidden-state bytes (64 MiB: 4,681 rows of DeepSeek-V3 in bf16).
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 64 << 20;

/// Load counters, per (layer, expert) and overall.
#[derive(Debug)]
pub struct WorkerStats {
    experts: usize,
    /// `[num_layers * experts]`: rows each expert ran.
    tokens: Vec<AtomicU64>,
    pub calls: AtomicU64,
    pub rows: AtomicU64,
    pub busy_nanos: AtomicU64,
}

impl WorkerStats {
    fn new(layers: usize, experts: usize) -> Self {
        WorkerStats {
            experts,
            tokens: (0..layers * experts).map(|_| AtomicU64::new(0)).collect(),
            calls: AtomicU64::new(0),
            rows: AtomicU64::new(0),
            busy_nanos: AtomicU64::new(0),
        }
    }

    /// Rows expert `expert` of `layer` has run since start.
    pub fn tokens(&self, layer: usize, expert: u32) -> u64 {
        self.tokens
            .get(layer * self.experts + expert as usize)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

/// A loaded expert worker.
#[derive(Debug)]
pub struct ExpertWorker {
    model: String,
    hidden: usize,
    n_experts: usize,
    /// What it holds; replaced whole when the coordinator re-places experts. The lock is held
    /// only to clone or swap the `Arc`: a call computes on the set it started with, and a new
    /// set never waits for calls (nor calls for a load).
    layers: RwLock<Arc<HeldLayers>>,
    /// One placement change at a time: each works out its diff from the set before it.
    applying: Mutex<()>,
    dir: PathBuf,
    intermediate: usize,
    /// The checkpoint's MoE tensor names (DeepSeek / Qwen3-MoE or Mixtral).
    naming: MoeNaming,
    /// Where the routed experts (and any shared experts) live and run.
    compute: Compute,
    /// How FP8 weights are held, for every load after the first too.
    weights: WeightFormat,
    /// Shared experts of the held layers, when this worker also runs them.
    shared: BTreeMap<usize, SharedExpert>,
    max_message_bytes: usize,
    pub stats: WorkerStats,
    pub metrics: crate::metrics::WorkerMetrics,
}

/// The routed experts held, by layer.
type HeldLayers = BTreeMap<usize, RoutedExperts>;

fn bytes_of(layers: &HeldLayers) -> usize {
    layers.values().map(RoutedExperts::size_in_bytes).sum()
}

/// A layer's shared expert, held where the worker's routed experts run.
#[derive(Debug)]
enum SharedExpert {
    Host(Mlp),
    #[cfg(feature = "cuda")]
    Device(switchyard_engine::cuda::GpuExperts),
}

impl ExpertWorker {
    /// Loads the experts `spec` names from the checkpoint in `dir`, and nothing else.
    pub fn load(dir: &Path, spec: &ExpertSpec) -> Result<ExpertWorker, WorkerError> {
        Self::load_with_progress(dir, spec, &|_, _| {})
    }

    /// Like [`ExpertWorker::load`], calling `progress(layers_loaded, layers_total)` as it goes.
    pub fn load_with_progress(
        dir: &Path,
        spec: &ExpertSpec,
        progress: &dyn Fn(usize, usize),
    ) -> Result<ExpertWorker, WorkerError> {
        Self::load_on(dir, spec, Compute::Cpu, WeightFormat::AsStored, progress)
    }

    /// Loads the experts `spec` names onto `compute` (host memory or a CUDA device), where
    /// this worker then runs them, FP8 weights held as `weights` says.
    pub fn load_on(
        dir: &Path,
        spec: &ExpertSpec,
        compute: Compute,
        weights: WeightFormat,
        progress: &dyn Fn(usize, usize),
    ) -> Result<ExpertWorker, WorkerError> {
        let config = ModelConfig::from_dir(dir)?;
        let ExpertSelection::Only(selection) = spec.resolve(&config)? else {
            return Err(WorkerError::Spec(
                "a worker needs an explicit expert set".into(),
            ));
        };
        let moe = config
            .moe
            .as_ref()
            .ok_or_else(|| WorkerError::Spec("the model has no routed experts".into()))?;
        let mut ck = Checkpoint::open(dir)?;
        ck.set_weight_format(weights)?;
        let mut layers = BTreeMap::new();
        let total = selection.values().filter(|e| !e.is_empty()).count();
        progress(0, total);
        for (layer, experts) in selection.iter().filter(|(_, e)| !e.is_empty()) {
            let loaded = RoutedExperts::load_on(
                &compute,
                &ck,
                &moe.naming,
                *layer,
                experts,
                config.hidden_size,
                moe.moe_intermediate_size,
            )?;
            layers.insert(*layer, loaded);
            progress(layers.len(), total);
        }
        let metrics = crate::metrics::WorkerMetrics::new();
        metrics.expert_bytes.set(
            layers
                .values()
                .map(RoutedExperts::size_in_bytes)
                .sum::<usize>() as i64,
        );
        Ok(ExpertWorker {
            model: config.identity(),
            hidden: config.hidden_size,
            n_experts: moe.n_routed_experts,
            stats: WorkerStats::new(config.num_hidden_layers, moe.n_routed_experts),
            metrics,
            layers: RwLock::new(Arc::new(layers)),
            applying: Mutex::new(()),
            dir: dir.to_path_buf(),
            intermediate: moe.moe_intermediate_size,
            naming: moe.naming,
            compute,
            weights,
            shared: BTreeMap::new(),
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
        })
    }

    /// Also loads the shared expert of every MoE layer, so routers can send each
    /// token's shared-expert work along with its routed call (`--shared-expert-on workers`).
    pub fn with_shared_experts(mut self, dir: &Path) -> Result<ExpertWorker, WorkerError> {
        let config = ModelConfig::from_dir(dir)?;
        let moe = config
            .moe
            .as_ref()
            .ok_or_else(|| WorkerError::Spec("the model has no routed experts".into()))?;
        if moe.n_shared_experts == 0 {
            return Err(WorkerError::Spec("the model has no shared experts".into()));
        }
        let mut ck = Checkpoint::open(dir)?;
        ck.set_weight_format(self.weights)?;
        let (hidden, intermediate) = (
            config.hidden_size,
            moe.moe_intermediate_size * moe.n_shared_experts,
        );
        // Every MoE layer: under a coordinator the held layers change over time.
        for layer in config.moe_layers() {
            let prefix = format!("{}.shared_experts", moe.naming.block_prefix(layer));
            let shared = match &self.compute {
                Compute::Cpu => SharedExpert::Host(Mlp::new(&ck, &prefix, hidden, intermediate)?),
                #[cfg(feature = "cuda")]
                Compute::Cuda(gpu) => {
                    SharedExpert::Device(switchyard_engine::cuda::GpuExperts::load_mlp(
                        gpu.clone(),
                        &ck,
                        &prefix,
                        layer,
                        hidden,
                        intermediate,
                    )?)
                }
                #[cfg(feature = "cuda")]
                Compute::CudaGroup(_) => {
                    let mut mlp = Mlp::new(&ck, &prefix, hidden, intermediate)?;
                    mlp.offload(&self.compute)?;
                    SharedExpert::Host(mlp)
                }
            };
            self.shared.insert(layer, shared);
        }
        Ok(self)
    }

    /// The experts held now. The lock is taken for the `Arc` clone alone, so nothing that
    /// holds the result can block a placement change or be blocked by one.
    fn held(&self) -> Arc<HeldLayers> {
        self.layers
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Makes this worker hold exactly `assignment` (layer → experts): loads what it gains from
    /// the checkpoint first, then swaps the new set in. Calls keep being served from the old
    /// set until the swap, and calls already running finish on it; what the new set lost is
    /// freed when the last of them ends.
    pub fn apply(&self, assignment: &BTreeMap<usize, BTreeSet<u32>>) -> Result<(), WorkerError> {
        let _one_at_a_time = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let held = self.held();
        let current: BTreeMap<usize, BTreeSet<u32>> = held
            .iter()
            .map(|(l, e)| (*l, e.expert_ids().into_iter().collect()))
            .collect();
        // Opened only if something is missing: a repeated placement update reads nothing.
        let mut ck: Option<Checkpoint> = None;
        let mut gained = BTreeMap::new();
        for (layer, want) in assignment {
            let have = current.get(layer).cloned().unwrap_or_default();
            let missing: BTreeSet<u32> = want.difference(&have).copied().collect();
            if let Some(&bad) = missing.iter().find(|&&e| e as usize >= self.n_experts) {
                return Err(WorkerError::Spec(format!(
                    "expert {bad} of layer {layer} is out of range: the model has {} routed experts",
                    self.n_experts
                )));
            }
            if !missing.is_empty() {
                if ck.is_none() {
                    let mut opened = Checkpoint::open(&self.dir)?;
                    opened.set_weight_format(self.weights)?;
                    ck = Some(opened);
                }
                let Some(ck) = ck.as_ref() else { continue };
                let loaded = RoutedExperts::load_on(
                    &self.compute,
                    ck,
                    &self.naming,
                    *layer,
                    &missing,
                    self.hidden,
                    self.intermediate,
                )?;
                gained.insert(*layer, loaded);
            }
        }
        let mut next = HeldLayers::new();
        for (layer, want) in assignment.iter().filter(|(_, w)| !w.is_empty()) {
            let new = gained
                .remove(layer)
                .unwrap_or_else(|| RoutedExperts::empty(*layer));
            let merged = match held.get(layer) {
                Some(have) => have.merged(want, new),
                None => new,
            };
            next.insert(*layer, merged);
        }
        let bytes: usize = next.values().map(RoutedExperts::size_in_bytes).sum();
        *self.layers.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(next);
        self.metrics.expert_bytes.set(bytes as i64);
        Ok(())
    }

    /// An empty worker for `dir`'s model, to be filled by [`ExpertWorker::apply`].
    pub fn empty(dir: &Path) -> Result<ExpertWorker, WorkerError> {
        Self::empty_on(dir, Compute::Cpu, WeightFormat::AsStored)
    }

    /// An empty worker whose experts will live on `compute`, FP8 weights held as `weights`
    /// says.
    pub fn empty_on(
        dir: &Path,
        compute: Compute,
        weights: WeightFormat,
    ) -> Result<ExpertWorker, WorkerError> {
        Self::load_on(
            dir,
            &ExpertSpec::PerLayer(BTreeMap::new()),
            compute,
            weights,
            &|_, _| {},
        )
    }

    /// Where this worker's routed experts live.
    pub fn device(&self) -> Device {
        self.compute.device()
    }

    pub fn with_max_message_bytes(mut self, bytes: usize) -> Self {
        self.max_message_bytes = bytes;
        self
    }

    pub fn max_message_bytes(&self) -> usize {
        self.max_message_bytes
    }

    pub fn hidden_size(&self) -> usize {
        self.hidden
    }

    /// Bytes of expert weights resident.
    pub fn expert_bytes(&self) -> usize {
        bytes_of(&self.held())
    }

    /// What this worker holds (layer → experts), as of now.
    pub fn holding(&self) -> BTreeMap<usize, BTreeSet<u32>> {
        self.held()
            .iter()
            .map(|(&l, e)| (l, e.expert_ids().into_iter().collect()))
            .collect()
    }

    pub fn info(&self) -> InfoResponse {
        let held = self.held();
        InfoResponse {
            layers: held
                .iter()
                .map(|(&layer, e)| LayerExperts {
                    layer: layer as u32,
                    experts: e.expert_ids(),
                })
                .collect(),
            hidden_size: self.hidden as u32,
            dtype: "bf16".into(),
            device: self.compute.device().to_string(),
            expert_bytes: bytes_of(&held) as u64,
            model: self.model.clone(),
            shared_expert_layers: self.shared.keys().map(|&l| l as u32).collect(),
        }
    }

    /// Runs one call: Σ weight × expert(row) for every row, over this worker's experts.
    pub fn forward(&self, req: &ForwardRequest) -> Result<v1::Tensor, WorkerError> {
        let start = Instant::now();
        let layer = req.layer as usize;
        let layers = self.held();
        let experts = layers.get(&layer).ok_or_else(|| {
            WorkerError::NotHeld(format!(
                "layer {layer} is not held by this worker (it holds layers {:?})",
                layers.keys().collect::<Vec<_>>()
            ))
        })?;
        let hidden = req
            .hidden
            .as_ref()
            .ok_or_else(|| WorkerError::invalid("hidden", "is required"))?;
        let rows = codec::expect_rows("hidden", hidden, self.hidden)?;
        let x = codec::decode("hidden", hidden, self.max_message_bytes as u64)?;
        let groups = self.groups(req, rows, experts)?;
        let x = Tensor::from_f32(&[rows, self.hidden], x)?;
        let mut out = experts.forward_groups(&x, &groups)?;
        if !req.shared_rows.is_empty() {
            self.add_shared(layer, &req.shared_rows, &x, &mut out)?;
        }
        let reply_dtype = match Dtype::try_from(req.reply_dtype).unwrap_or(Dtype::Unspecified) {
            Dtype::Unspecified => Dtype::try_from(hidden.dtype).unwrap_or(Dtype::F32),
            d => d,
        };
        let encoded = codec::encode(out.as_f32()?, &[rows, self.hidden], reply_dtype);
        for g in &groups {
            if let Some(c) = self
                .stats
                .tokens
                .get(layer * self.n_experts + g.expert as usize)
            {
                c.fetch_add(g.rows.len() as u64, Ordering::Relaxed);
            }
        }
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        self.stats.rows.fetch_add(rows as u64, Ordering::Relaxed);
        let busy = start.elapsed();
        self.stats
            .busy_nanos
            .fetch_add(busy.as_nanos() as u64, Ordering::Relaxed);
        let m = &self.metrics;
        m.tokens
            .get_or_create(&crate::metrics::LayerLabel { layer: req.layer })
            .inc_by(groups.iter().map(|g| g.rows.len() as u64).sum());
        m.calls.inc();
        m.rows_per_call.observe(rows as f64);
        m.busy_seconds.inc_by(busy.as_secs_f64());
        Ok(encoded)
    }

    /// `out[r] += shared_expert(x[r])` for the listed rows.
    fn add_shared(
        &self,
        layer: usize,
        rows: &[u32],
        x: &Tensor,
        out: &mut Tensor,
    ) -> Result<(), WorkerError> {
        let shared = self.shared.get(&layer).ok_or_else(|| {
            WorkerError::NotHeld(format!(
                "the shared expert of layer {layer} is not held by this worker"
            ))
        })?;
        let (n, h) = x.dims2()?;
        if let Some(&r) = rows.iter().find(|&&r| r as usize >= n) {
            return Err(WorkerError::invalid(
                "shared_rows",
                format!("must be < rows ({n}), got {r}"),
            ));
        }
        // The MLP of x[rows[j]] is row j of y (host), or row rows[j] of y (device, which
        // gathers the rows itself: one group of them with unit weights).
        let (y, by_row) = match shared {
            SharedExpert::Host(mlp) => {
                let xd = x.as_f32()?;
                let mut gathered = Vec::with_capacity(rows.len() * h);
                for &r in rows {
                    gathered.extend_from_slice(&xd[r as usize * h..(r as usize + 1) * h]);
                }
                let y = mlp.forward(&Tensor::from_f32(&[rows.len(), h], gathered)?)?;
                (y, false)
            }
            #[cfg(feature = "cuda")]
            SharedExpert::Device(mlp) => {
                let group = ExpertGroup {
                    expert: 0,
                    rows: rows.to_vec(),
                    weights: vec![1.0; rows.len()],
                };
                (mlp.forward_groups(x, std::slice::from_ref(&group))?, true)
            }
        };
        let (yd, od) = (y.as_f32()?, out.as_f32_mut()?);
        for (j, &r) in rows.iter().enumerate() {
            let src = if by_row { r as usize } else { j };
            for (o, v) in od[r as usize * h..(r as usize + 1) * h]
                .iter_mut()
                .zip(&yd[src * h..(src + 1) * h])
            {
                *o += v;
            }
        }
        Ok(())
    }

    /// Validates the flattened routing and groups it by expert.
    fn groups(
        &self,
        req: &ForwardRequest,
        rows: usize,
        experts: &RoutedExperts,
    ) -> Result<Vec<ExpertGroup>, WorkerError> {
        let offsets = &req.offsets;
        if offsets.len() != rows + 1 {
            return Err(WorkerError::invalid(
                "offsets",
                format!(
                    "must have rows + 1 = {} entries, got {}",
                    rows + 1,
                    offsets.len()
                ),
            ));
        }
        if req.expert_ids.len() != req.weights.len() {
            return Err(WorkerError::invalid(
                "weights",
                format!(
                    "must have one entry per expert id ({}), got {}",
                    req.expert_ids.len(),
                    req.weights.len()
                ),
            ));
        }
        if offsets[0] != 0
            || offsets.windows(2).any(|w| w[0] > w[1])
            || offsets[rows] as usize != req.expert_ids.len()
        {
            return Err(WorkerError::invalid(
                "offsets",
                format!(
                    "must start at 0, never decrease and end at the number of pairs ({}), got {offsets:?}",
                    req.expert_ids.len()
                ),
            ));
        }
        let mut groups: BTreeMap<u32, ExpertGroup> = BTreeMap::new();
        for r in 0..rows {
            for p in offsets[r] as usize..offsets[r + 1] as usize {
                let (e, w) = (req.expert_ids[p], req.weights[p]);
                if !w.is_finite() {
                    return Err(WorkerError::invalid(
                        "weights",
                        format!("must be finite, got {w} for row {r}"),
                    ));
                }
                if e as usize >= self.n_experts {
                    return Err(WorkerError::invalid(
                        "expert_ids",
                        format!(
                            "must be < {} (the model's routed experts), got {e}",
                            self.n_experts
                        ),
                    ));
                }
                if !experts.holds(e) {
                    return Err(WorkerError::NotHeld(format!(
                        "expert {e} of layer {} is not held by this worker",
                        req.layer
                    )));
                }
                let g = groups.entry(e).or_insert_with(|| ExpertGroup {
                    expert: e,
                    ..Default::default()
                });
                g.rows.push(r as u32);
                g.weights.push(w);
            }
        }
        Ok(groups.into_values().collect())
    }
}
