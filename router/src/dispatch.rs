//! Expert dispatch: one MoE layer's routed-expert work, out to the workers and back.
//!
//! [`plan_calls`] is the pure part: each worker gets one request carrying the hidden row of every
//! token that chose any of its experts — once, however many of its experts the token chose —
//! with that token's `(expert, weight)` pairs for the worker. [`Dispatcher`] sends the requests
//! concurrently through a [`Transport`] and adds the workers' combined rows. It implements the
//! engine's [`ExpertExecutor`], so the model runs unchanged with its experts elsewhere.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Receiver;
use std::time::Duration;

use switchyard_engine::model::{ExpertExecutor, Routing};
use switchyard_engine::{EngineError, Tensor};
use switchyard_proto::codec;
use switchyard_proto::v1::{self, Dtype, ForwardRequest};

use crate::error::RouterError;
use crate::placement::Placement;

/// A worker's index in the router's pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct WorkerId(pub u32);

impl fmt::Display for WorkerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "w{}", self.0)
    }
}

pub type ForwardFuture = Pin<Box<dyn Future<Output = Result<v1::Tensor, RouterError>> + Send>>;

/// How requests reach workers: gRPC in production ([`crate::grpc`]), in-memory in tests.
pub trait Transport: Send + Sync {
    fn forward(&self, worker: WorkerId, request: ForwardRequest) -> ForwardFuture;
}

/// One worker's share of a layer: the batch rows it got, and the request carrying them.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerCall {
    pub worker: WorkerId,
    /// Batch row of each request row.
    pub rows: Vec<u32>,
    pub request: ForwardRequest,
}

/// One token's routed work for a layer: its batch row, its `(expert, weight)` pairs, and
/// whether its shared expert travels with one of its calls.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenWork {
    pub row: u32,
    pub pairs: Vec<(u32, f32)>,
    pub shared: bool,
}

/// Splits one layer's routing into one call per worker (pure).
///
/// With `shared_on_workers`, each token's shared expert travels with one of its routed calls:
/// the worker, among those the token already visits, with the fewest shared rows so far.
pub fn plan_calls(
    layer: usize,
    x: &[f32],
    hidden: usize,
    routing: &Routing,
    placement: &Placement,
    dtype: Dtype,
    shared_on_workers: bool,
) -> Result<Vec<WorkerCall>, RouterError> {
    let work = (0..routing.tokens()).map(|t| TokenWork {
        row: t as u32,
        pairs: routing.token(t).collect(),
        shared: shared_on_workers,
    });
    build_calls(
        layer,
        x,
        hidden,
        work,
        &|e| placement.worker(layer, e),
        dtype,
    )
}

/// Groups tokens' work (in row order) into one call per worker, each token's row once per
/// worker; `worker_for(expert)` says who runs an expert.
pub fn build_calls(
    layer: usize,
    x: &[f32],
    hidden: usize,
    work: impl IntoIterator<Item = TokenWork>,
    worker_for: &dyn Fn(u32) -> Option<WorkerId>,
    dtype: Dtype,
) -> Result<Vec<WorkerCall>, RouterError> {
    #[derive(Default)]
    struct Builder {
        rows: Vec<u32>,
        offsets: Vec<u32>,
        ids: Vec<u32>,
        weights: Vec<f32>,
        shared_rows: Vec<u32>,
    }
    let mut builders: BTreeMap<WorkerId, Builder> = BTreeMap::new();
    for token in work {
        let t = token.row;
        for (e, w) in token.pairs {
            let worker = worker_for(e).ok_or_else(|| {
                RouterError::Placement(format!("expert {e} of layer {layer} has no live worker"))
            })?;
            let b = builders.entry(worker).or_insert_with(|| Builder {
                offsets: vec![0],
                ..Default::default()
            });
            if b.rows.last() != Some(&t) {
                b.rows.push(t);
                b.offsets.push(b.ids.len() as u32);
            }
            b.ids.push(e);
            b.weights.push(w);
            if let Some(end) = b.offsets.last_mut() {
                *end = b.ids.len() as u32;
            }
        }
        if token.shared
            && let Some(b) = builders
                .values_mut()
                .filter(|b| b.rows.last() == Some(&t))
                .min_by_key(|b| b.shared_rows.len())
        {
            b.shared_rows.push(b.rows.len() as u32 - 1);
        }
    }
    Ok(builders
        .into_iter()
        .map(|(worker, b)| {
            let mut rows_data = Vec::with_capacity(b.rows.len() * hidden);
            for &r in &b.rows {
                rows_data.extend_from_slice(&x[r as usize * hidden..(r as usize + 1) * hidden]);
            }
            WorkerCall {
                worker,
                request: ForwardRequest {
                    layer: layer as u32,
                    hidden: Some(codec::encode(&rows_data, &[b.rows.len(), hidden], dtype)),
                    offsets: b.offsets,
                    expert_ids: b.ids,
                    weights: b.weights,
                    reply_dtype: dtype as i32,
                    shared_rows: b.shared_rows,
                    call_id: 0,
                },
                rows: b.rows,
            }
        })
        .collect())
}

/// Where the replies of one round of calls arrive, as `(call index, result)`.
type Replies = Receiver<(usize, Result<v1::Tensor, RouterError>)>;

/// The work a call carried, to send again elsewhere.
fn work_of(call: &WorkerCall) -> Vec<TokenWork> {
    let r = &call.request;
    call.rows
        .iter()
        .enumerate()
        .map(|(j, &row)| {
            let span = r.offsets[j] as usize..r.offsets[j + 1] as usize;
            TokenWork {
                row,
                pairs: r.expert_ids[span.clone()]
                    .iter()
                    .copied()
                    .zip(r.weights[span].iter().copied())
                    .collect(),
                shared: r.shared_rows.contains(&(j as u32)),
            }
        })
        .collect()
}

/// Failures a replica can fix: the worker is gone or too slow, not the request.
fn retryable(e: &RouterError) -> bool {
    match e {
        RouterError::Worker { code, .. } => {
            matches!(
                code,
                tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            )
        }
        RouterError::Connect { .. } => true,
        _ => false,
    }
}

/// What crossed the wire, per worker.
#[derive(Debug, Default)]
pub struct WireStats {
    pub calls: AtomicU64,
    pub rows: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

#[derive(Clone, Debug)]
pub struct DispatchOptions {
    /// Hidden states on the wire: bf16 halves the bytes; f32 is exact.
    pub wire_dtype: Dtype,
    /// Deadline of each worker call.
    pub deadline: Duration,
    /// Largest reply accepted, in bytes.
    pub max_message_bytes: usize,
    /// Run shared experts on the workers, each token's with one of its routed calls, instead
    /// of on the router (every worker then holds a copy).
    pub shared_on_workers: bool,
    /// A unary RPC per call, or one long-lived stream per worker.
    pub call_mode: crate::grpc::CallMode,
    /// Where per-layer latency and per-worker traffic are recorded.
    pub metrics: crate::metrics::DispatchMetrics,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        DispatchOptions {
            wire_dtype: Dtype::Bf16,
            deadline: Duration::from_secs(10),
            max_message_bytes: 64 << 20,
            shared_on_workers: false,
            call_mode: crate::grpc::CallMode::Unary,
            metrics: crate::metrics::DispatchMetrics::default(),
        }
    }
}

/// Runs routed experts on remote workers.
pub struct Dispatcher {
    placement: Placement,
    transport: Arc<dyn Transport>,
    runtime: tokio::runtime::Handle,
    hidden: usize,
    options: DispatchOptions,
    stats: BTreeMap<WorkerId, WireStats>,
}

impl fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Dispatcher")
            .field("workers", &self.stats.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Dispatcher {
    /// `runtime` drives the transport's futures; `run` may be called from any thread that is
    /// not one of that runtime's async workers.
    pub fn new(
        placement: Placement,
        transport: Arc<dyn Transport>,
        runtime: tokio::runtime::Handle,
        hidden: usize,
        workers: &[WorkerId],
        options: DispatchOptions,
    ) -> Dispatcher {
        Dispatcher {
            placement,
            transport,
            runtime,
            hidden,
            options,
            stats: workers.iter().map(|&w| (w, WireStats::default())).collect(),
        }
    }

    pub fn stats(&self, worker: WorkerId) -> Option<&WireStats> {
        self.stats.get(&worker)
    }

    /// Which worker serves `expert` of `layer` first (where its tokens are sent).
    pub fn worker_for(&self, layer: usize, expert: u32) -> Option<WorkerId> {
        self.placement.worker(layer, expert)
    }

    /// Sends one layer's calls concurrently and sums the replies: `[tokens, hidden]`.
    pub fn dispatch(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, RouterError> {
        self.dispatch_overlapped(layer, x, routing, &mut || Ok(()))
    }

    /// Like [`Dispatcher::dispatch`], running `meanwhile` between sending and waiting.
    pub fn dispatch_overlapped(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        meanwhile: &mut dyn FnMut() -> switchyard_engine::Result<()>,
    ) -> Result<Tensor, RouterError> {
        let started = std::time::Instant::now();
        let result = self.dispatch_inner(layer, x, routing, meanwhile);
        self.options
            .metrics
            .layer_seconds
            .get_or_create(&crate::metrics::LayerLabel {
                layer: layer as u32,
            })
            .observe(started.elapsed().as_secs_f64());
        result
    }

    fn dispatch_inner(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        meanwhile: &mut dyn FnMut() -> switchyard_engine::Result<()>,
    ) -> Result<Tensor, RouterError> {
        let (tokens, hidden) = x.dims2()?;
        let xd = x.as_f32()?;
        let calls = plan_calls(
            layer,
            xd,
            hidden,
            routing,
            &self.placement,
            self.options.wire_dtype,
            self.options.shared_on_workers,
        )?;
        let mut out = Tensor::zeros(&[tokens, hidden]);
        let od = out.as_f32_mut()?;
        let (rx, calls) = self.send(calls);
        // The calls are in flight: do the router's own work (the shared expert) now, then let
        // the compute threads sleep while we wait — workers may share this machine's cores.
        meanwhile()?;
        switchyard_engine::cpu::pool::global().rest();
        let failed = self.collect(layer, &calls, rx, od, hidden)?;
        if failed.is_empty() {
            return Ok(out);
        }
        // One failover round: the failed calls' work goes to replicas on other workers.
        let avoid: BTreeSet<WorkerId> = failed.iter().map(|(i, _)| calls[*i].worker).collect();
        let mut work: Vec<TokenWork> = failed
            .iter()
            .flat_map(|(i, _)| work_of(&calls[*i]))
            .collect();
        work.sort_by_key(|w| w.row);
        let retry = match build_calls(
            layer,
            xd,
            hidden,
            work,
            &|e| self.placement.worker_avoiding(layer, e, &avoid),
            self.options.wire_dtype,
        ) {
            Ok(calls) => calls,
            // No replica for some expert: report the original failure, which names the worker.
            Err(_) => {
                return Err(failed
                    .into_iter()
                    .next()
                    .map(|(_, e)| e)
                    .unwrap_or_else(|| RouterError::Runtime("failover".into())));
            }
        };
        for (_, e) in &failed {
            tracing::warn!(layer, error = %e, "expert call failed; retrying on replicas");
        }
        let (rx, retry) = self.send(retry);
        match self
            .collect(layer, &retry, rx, od, hidden)?
            .into_iter()
            .next()
        {
            None => Ok(out),
            Some((_, e)) => Err(e),
        }
    }

    /// Sends calls concurrently; replies arrive on the returned channel as `(index, result)`.
    /// Returns the calls without their hidden rows (kept for collecting and failover).
    fn send(&self, calls: Vec<WorkerCall>) -> (Replies, Vec<WorkerCall>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut sent = Vec::with_capacity(calls.len());
        for (i, mut call) in calls.into_iter().enumerate() {
            let hidden_rows = call.request.hidden.take();
            sent.push(call.clone());
            call.request.hidden = hidden_rows;
            let bytes = call.request.hidden.as_ref().map_or(0, |h| h.data.len());
            if let Some(s) = self.stats.get(&call.worker) {
                s.calls.fetch_add(1, Ordering::Relaxed);
                s.rows.fetch_add(call.rows.len() as u64, Ordering::Relaxed);
                s.bytes_sent.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            let label = crate::metrics::WorkerLabel {
                worker: call.worker.0,
            };
            let m = &self.options.metrics;
            m.rows_sent
                .get_or_create(&label)
                .inc_by(call.rows.len() as u64);
            m.bytes_sent.get_or_create(&label).inc_by(bytes as u64);
            let fut = self.transport.forward(call.worker, call.request);
            let tx = tx.clone();
            // Spawned, and waited on through a plain channel, so callers need no async context.
            self.runtime.spawn(async move {
                let _ = tx.send((i, fut.await));
            });
        }
        (rx, sent)
    }

    /// Adds every successful reply into `od`; returns the calls that failed in a way a replica
    /// could fix (other failures are returned as the error).
    fn collect(
        &self,
        layer: usize,
        calls: &[WorkerCall],
        rx: Replies,
        od: &mut [f32],
        hidden: usize,
    ) -> Result<Vec<(usize, RouterError)>, RouterError> {
        // The transport enforces the deadline per call; this is only a backstop.
        let backstop = self.options.deadline + Duration::from_secs(5);
        let mut failed = Vec::new();
        for _ in 0..calls.len() {
            let (i, result) = rx.recv_timeout(backstop).map_err(|_| {
                RouterError::Runtime(format!(
                    "layer {layer}: a worker call outlived its deadline"
                ))
            })?;
            let call = &calls[i];
            let label = crate::metrics::WorkerLabel {
                worker: call.worker.0,
            };
            let reply = match result {
                Ok(reply) => reply,
                Err(e) => {
                    self.options
                        .metrics
                        .failed_calls
                        .get_or_create(&label)
                        .inc();
                    if retryable(&e) {
                        failed.push((i, e));
                        continue;
                    }
                    return Err(e);
                }
            };
            if let Some(s) = self.stats.get(&call.worker) {
                s.bytes_received
                    .fetch_add(reply.data.len() as u64, Ordering::Relaxed);
            }
            self.options
                .metrics
                .bytes_received
                .get_or_create(&label)
                .inc_by(reply.data.len() as u64);
            let n = codec::expect_rows("output", &reply, self.hidden)?;
            if n != call.rows.len() {
                return Err(RouterError::Runtime(format!(
                    "worker {} returned {n} rows for layer {layer}, expected {}",
                    call.worker,
                    call.rows.len()
                )));
            }
            let values = codec::decode("output", &reply, self.options.max_message_bytes as u64)?;
            for (j, &r) in call.rows.iter().enumerate() {
                let dst = &mut od[r as usize * hidden..(r as usize + 1) * hidden];
                for (d, v) in dst.iter_mut().zip(&values[j * hidden..(j + 1) * hidden]) {
                    *d += v;
                }
            }
        }
        Ok(failed)
    }
}

impl ExpertExecutor for Dispatcher {
    fn run(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> switchyard_engine::Result<Tensor> {
        self.dispatch(layer, x, routing).map_err(executor_error)
    }

    fn run_overlapped(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        meanwhile: &mut dyn FnMut() -> switchyard_engine::Result<()>,
    ) -> switchyard_engine::Result<Tensor> {
        self.dispatch_overlapped(layer, x, routing, meanwhile)
            .map_err(executor_error)
    }

    fn runs_shared_experts(&self) -> bool {
        self.options.shared_on_workers
    }
}

fn executor_error(e: RouterError) -> EngineError {
    match e {
        // The router's own work (the overlapped shared expert) failed: keep its error as it was.
        RouterError::Engine(e) => e,
        e => EngineError::Executor(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchyard_proto::v1::{InfoResponse, LayerExperts};

    fn placement(split: &[(u32, std::ops::Range<u32>)]) -> Placement {
        let json = switchyard_engine::synth::preset_config("tiny").unwrap();
        let config = switchyard_engine::ModelConfig::from_json_str(&json.to_string()).unwrap();
        let workers: Vec<_> = split
            .iter()
            .map(|(w, r)| {
                (
                    WorkerId(*w),
                    InfoResponse {
                        layers: config
                            .moe_layers()
                            .iter()
                            .map(|&l| LayerExperts {
                                layer: l as u32,
                                experts: r.clone().collect(),
                            })
                            .collect(),
                        ..Default::default()
                    },
                )
            })
            .collect();
        Placement::from_workers(&config, &workers).unwrap()
    }

    #[test]
    fn a_token_goes_to_a_worker_once_however_many_of_its_experts_it_chose() {
        let p = placement(&[(0, 0..8), (1, 8..16)]);
        // Token 0 chose 4 experts all on worker 0; token 1 split 2 + 2; token 2 all on worker 1.
        let routing = Routing {
            k: 4,
            ids: vec![0, 1, 2, 3, 4, 5, 9, 10, 12, 13, 14, 15],
            weights: (0..12).map(|i| i as f32).collect(),
        };
        let hidden = 2;
        let x: Vec<f32> = (0..6).map(|v| v as f32).collect();
        let calls = plan_calls(1, &x, hidden, &routing, &p, Dtype::F32, false).unwrap();
        assert_eq!(calls.len(), 2);
        let (w0, w1) = (&calls[0], &calls[1]);
        assert_eq!((w0.worker, w0.rows.clone()), (WorkerId(0), vec![0, 1]));
        assert_eq!((w1.worker, w1.rows.clone()), (WorkerId(1), vec![1, 2]));
        assert_eq!(w0.request.offsets, vec![0, 4, 6]);
        assert_eq!(w0.request.expert_ids, vec![0, 1, 2, 3, 4, 5]);
        assert_eq!(w1.request.offsets, vec![0, 2, 6]);
        assert_eq!(w1.request.weights, vec![6.0, 7.0, 8.0, 9.0, 10.0, 11.0]);
        let rows = codec::decode("h", w1.request.hidden.as_ref().unwrap(), 1 << 20).unwrap();
        assert_eq!(rows, vec![2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn each_token_s_shared_expert_rides_with_exactly_one_call_balanced() {
        let p = placement(&[(0, 0..8), (1, 8..16)]);
        // Tokens 0-3 each visit both workers; token 4 only worker 1.
        let routing = Routing {
            k: 2,
            ids: vec![0, 8, 1, 9, 2, 10, 3, 11, 12, 13],
            weights: vec![1.0; 10],
        };
        let x = vec![0.0; 5 * 2];
        let calls = plan_calls(1, &x, 2, &routing, &p, Dtype::F32, true).unwrap();
        let shared: Vec<Vec<u32>> = calls
            .iter()
            .map(|c| {
                c.request
                    .shared_rows
                    .iter()
                    .map(|&i| c.rows[i as usize])
                    .collect()
            })
            .collect();
        let mut all: Vec<u32> = shared.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3, 4], "every token exactly once");
        assert!(shared[1].contains(&4), "token 4 can only go to worker 1");
        assert_eq!((shared[0].len(), shared[1].len()), (2, 3), "balanced");
    }

    #[test]
    fn workers_with_no_chosen_expert_get_no_call() {
        let p = placement(&[(0, 0..8), (1, 8..16)]);
        let routing = Routing {
            k: 2,
            ids: vec![0, 1],
            weights: vec![0.5, 0.5],
        };
        let calls = plan_calls(2, &[1.0, 2.0], 2, &routing, &p, Dtype::Bf16, false).unwrap();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].worker, WorkerId(0));
    }
}
