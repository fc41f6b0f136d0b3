//! One step's routed experts: a [`PoolStep`] holds the route in force when the step began and
//! runs each MoE layer on it — [`PoolStep::begin`] plans one call per worker and sends them
//! concurrently on the pool's runtime, returning the layer [`InFlight`]; the engine computes
//! meanwhile (the shared expert, other micro-batches) and [`InFlight::finish`] adds the
//! combined rows as they come back.
//!
//! A call that fails in a way another worker can fix (its worker is gone or too slow, or no
//! longer holds the expert because the placement moved on) is re-planned once, on the newest
//! route, avoiding the workers that failed, and sent again; with no holder left the layer
//! fails with the original error, which names the worker.
//!
//! Copies of a hidden row per layer on the router: gathered from the layer input straight
//! into the request's wire bytes (1), framed by prost/HTTP/2 (2); its combined reply read off
//! the socket (3) and decoded straight into the layer's sum (4). (It was six: a gathered f32
//! copy before encoding and a decoded f32 copy before adding are gone.)

use std::collections::{BTreeMap, BTreeSet};
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_engine::model::{ExpertExecutor, Pending, PendingExperts, Routing};
use switchyard_engine::{EngineError, Tensor};
use switchyard_proto::WorkerId;
use switchyard_proto::codec;

use super::plan::{self, TokenWork, WorkerCall};
use super::transport::{WorkerReply, call_failed};
use super::{ExpertPool, Route};
use crate::error::RouterError;
use crate::metrics::{LayerLabel, ReasonLabel};

/// Where the replies of one round of calls arrive, as `(call index, result, round trip)`.
type Replies = Receiver<(usize, Result<WorkerReply, RouterError>, Duration)>;

/// The pool's experts for one step, on one route.
#[derive(Debug)]
pub struct PoolStep<'a> {
    pool: &'a ExpertPool,
    route: Arc<Route>,
    /// Turns the replica split from step to step (see [`Placement::serving`]).
    ///
    /// [`Placement::serving`]: super::placement::Placement::serving
    salt: u64,
    /// (token, expert) assignments each worker served, per layer, in this step.
    served: Mutex<BTreeMap<usize, BTreeMap<WorkerId, u64>>>,
}

impl Drop for PoolStep<'_> {
    fn drop(&mut self) {
        self.pool.step_ended(self.route.placement.version());
    }
}

impl<'a> PoolStep<'a> {
    pub(crate) fn new(pool: &'a ExpertPool, route: Arc<Route>, salt: u64) -> PoolStep<'a> {
        PoolStep {
            pool,
            route,
            salt,
            served: Mutex::new(BTreeMap::new()),
        }
    }

    /// The (token, expert) assignments each worker served in `layer` so far in this step.
    pub fn served(&self, layer: usize) -> BTreeMap<WorkerId, u64> {
        self.served
            .lock()
            .map(|s| s.get(&layer).cloned().unwrap_or_default())
            .unwrap_or_default()
    }

    /// The route this step dispatches with.
    pub fn route(&self) -> &Arc<Route> {
        &self.route
    }

    /// How worker `id` of this route is named in metrics and the expert-load report.
    pub fn label(&self, id: WorkerId) -> String {
        match self.route.links.get(&id) {
            Some(link) => self.pool.label(link.as_ref()).worker,
            None => id.0.to_string(),
        }
    }

    /// Sends one layer's calls concurrently and sums the replies: `[tokens, hidden]`.
    pub fn dispatch(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> Result<Tensor, RouterError> {
        self.begin(layer, x, routing)?.finish(x)
    }

    /// Plans and sends one layer's calls; the replies are collected by [`InFlight::finish`].
    pub fn begin(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> Result<InFlight<'_>, RouterError> {
        let started = Instant::now();
        let options = &self.pool.options;
        let (_, hidden) = x.dims2()?;
        let calls = plan::plan_calls(
            layer,
            x.as_f32()?,
            hidden,
            routing,
            &plan::Serving {
                placement: &self.route.placement,
                down: &self.pool.down_workers(),
                salt: self.salt,
            },
            options,
        )?;
        let (rx, calls) = self.send(&self.route, layer, calls)?;
        Ok(InFlight {
            step: self,
            layer,
            calls,
            rx,
            started,
        })
    }

    /// Collects a layer's replies into `[tokens, hidden]`, re-planning failed calls once on
    /// the newest route, avoiding every worker that failed.
    fn collect_layer(&self, sent: InFlight<'_>, x: &Tensor) -> Result<Tensor, RouterError> {
        let options = &self.pool.options;
        let InFlight {
            layer, calls, rx, ..
        } = sent;
        let (tokens, hidden) = x.dims2()?;
        let xd = x.as_f32()?;
        let mut out = Tensor::zeros(&[tokens, hidden]);
        let od = out.as_f32_mut()?;
        // Whatever waits here, the compute threads need not spin: workers may share this
        // machine's cores.
        switchyard_engine::cpu::pool::global().rest();
        let failed = self.collect(layer, &self.route, &calls, rx, od)?;
        if failed.is_empty() {
            return Ok(out);
        }
        // One more round, on the newest route (the placement may have moved on since the step
        // began), avoiding every worker that failed.
        let latest = self.pool.route().unwrap_or_else(|| self.route.clone());
        // A worker that is gone or slow is avoided. One that only lacked an expert is avoided
        // only if the newest placement is the one it failed on: otherwise that placement says
        // truly what it holds now.
        let moved_on = latest.placement.version() != self.route.placement.version();
        let avoid: BTreeSet<WorkerId> = failed
            .iter()
            .filter(|(_, e)| !(moved_on && expert_moved(e)))
            .map(|(i, _)| calls[*i].worker)
            .collect();
        let mut work: Vec<TokenWork> = failed
            .iter()
            .flat_map(|(i, _)| plan::work_of(&calls[*i]))
            .collect();
        work.sort_by_key(|w| w.row);
        let first_error = || {
            failed
                .iter()
                .map(|(_, e)| e)
                .next()
                .map(clone_error)
                .unwrap_or_else(|| RouterError::Runtime("failover without a failure".into()))
        };
        let retry = match plan::build_calls(
            layer,
            xd,
            hidden,
            work,
            &|row, e| {
                latest
                    .placement
                    .serving(layer, e, row as u64 + self.salt, &avoid)
            },
            options.wire_dtype,
        ) {
            Ok(calls) => calls,
            // No other holder for some expert: report the original failure, which names the
            // worker.
            Err(_) => return Err(first_error()),
        };
        for (_, e) in &failed {
            let reason = if expert_moved(e) {
                "expert_moved"
            } else {
                "worker_lost"
            };
            options
                .metrics
                .retried_calls
                .get_or_create(&ReasonLabel { reason })
                .inc();
            tracing::warn!(layer, error = %e, version = latest.placement.version(), "expert call failed; re-planned on the newest placement");
        }
        let (rx, retry) = self.send(&latest, layer, retry)?;
        match self
            .collect(layer, &latest, &retry, rx, od)?
            .into_iter()
            .next()
        {
            None => Ok(out),
            Some((_, e)) => Err(e),
        }
    }

    /// Sends calls on `route`'s links concurrently, each bounded by the call deadline; replies
    /// arrive on the returned channel as `(index, result)`. Returns the calls without their
    /// hidden rows (kept for collecting and failover).
    fn send(
        &self,
        route: &Route,
        layer: usize,
        calls: Vec<WorkerCall>,
    ) -> Result<(Replies, Vec<WorkerCall>), RouterError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let m = &self.pool.options.metrics;
        let deadline = self.pool.options.deadline;
        let handle = self.pool.handle();
        let mut sent = Vec::with_capacity(calls.len());
        for (i, mut call) in calls.into_iter().enumerate() {
            let link = route.links.get(&call.worker).cloned().ok_or_else(|| {
                RouterError::Placement(format!(
                    "placement version {} names worker {} for layer {layer} but has no link to it",
                    route.placement.version(),
                    call.worker
                ))
            })?;
            let hidden_rows = call.request.hidden.take();
            sent.push(call.clone());
            call.request.hidden = hidden_rows;
            let bytes = call.request.hidden.as_ref().map_or(0, |h| h.data.len());
            let label = self.pool.label(link.as_ref());
            m.calls.get_or_create(&label).inc();
            m.rows_sent
                .get_or_create(&label)
                .inc_by(call.rows.len() as u64);
            m.bytes_sent.get_or_create(&label).inc_by(bytes as u64);
            let fut = link.forward(call.request, deadline);
            let tx = tx.clone();
            // Spawned, and waited on through a plain channel, so callers need no async context.
            handle.spawn(async move {
                let sent = Instant::now();
                let result = match tokio::time::timeout(deadline, fut).await {
                    Ok(r) => r,
                    Err(_) => Err(call_failed(
                        link.worker(),
                        link.addr(),
                        layer,
                        tonic::Code::DeadlineExceeded,
                        format!("no reply within {deadline:?}"),
                    )),
                };
                let _ = tx.send((i, result, sent.elapsed()));
            });
        }
        Ok((rx, sent))
    }

    /// Adds every successful reply into `od`; returns the calls that failed in a way another
    /// worker could fix (other failures are returned as the error).
    fn collect(
        &self,
        layer: usize,
        route: &Route,
        calls: &[WorkerCall],
        rx: Replies,
        od: &mut [f32],
    ) -> Result<Vec<(usize, RouterError)>, RouterError> {
        let options = &self.pool.options;
        let hidden = self.pool.hidden;
        // Each call is bounded by the deadline already; this only guards the channel.
        let backstop = options.deadline + Duration::from_secs(5);
        let mut failed = Vec::new();
        for _ in 0..calls.len() {
            let (i, result, round_trip) = rx.recv_timeout(backstop).map_err(|_| {
                RouterError::Runtime(format!(
                    "layer {layer}: a worker call outlived its deadline"
                ))
            })?;
            let call = &calls[i];
            let label = match route.links.get(&call.worker) {
                Some(link) => self.pool.label(link.as_ref()),
                None => crate::metrics::WorkerLabel {
                    worker: call.worker.0.to_string(),
                },
            };
            let reply = match result {
                Ok(reply) => reply,
                Err(e) => {
                    options.metrics.failed_calls.get_or_create(&label).inc();
                    if unreachable(&e) {
                        self.pool.mark_down(call.worker);
                    }
                    if plan::retryable(&e) {
                        failed.push((i, e));
                        continue;
                    }
                    return Err(e);
                }
            };
            let layer_label = LayerLabel {
                layer: layer as u32,
            };
            let worker_time = reply.worker_seconds();
            options
                .metrics
                .worker_seconds
                .get_or_create(&layer_label)
                .observe(worker_time);
            options
                .metrics
                .network_seconds
                .get_or_create(&layer_label)
                .observe((round_trip.as_secs_f64() - worker_time).max(0.0));
            let reply = reply.output;
            options
                .metrics
                .bytes_received
                .get_or_create(&label)
                .inc_by(reply.data.len() as u64);
            let n = codec::expect_rows("output", &reply, hidden)?;
            if n != call.rows.len() {
                return Err(RouterError::Runtime(format!(
                    "worker {} returned {n} rows for layer {layer}, expected {}",
                    call.worker,
                    call.rows.len()
                )));
            }
            // Decoded straight into the sum.
            codec::add_rows(
                "output",
                &reply,
                options.max_message_bytes as u64,
                hidden,
                &call.rows,
                od,
            )?;
            if let Ok(mut served) = self.served.lock() {
                *served
                    .entry(layer)
                    .or_default()
                    .entry(call.worker)
                    .or_default() += call.request.expert_ids.len() as u64;
            }
        }
        Ok(failed)
    }
}

/// The worker could not be reached at all (refused, reset): a dead process, most likely.
fn unreachable(e: &RouterError) -> bool {
    matches!(
        e,
        RouterError::Worker {
            code: tonic::Code::Unavailable,
            ..
        } | RouterError::Connect { .. }
    )
}

/// The worker answered that it does not hold an expert of the call.
fn expert_moved(e: &RouterError) -> bool {
    matches!(
        e,
        RouterError::Worker {
            code: tonic::Code::FailedPrecondition,
            ..
        }
    )
}

/// One layer's calls in flight, from [`PoolStep::begin`].
#[derive(Debug)]
pub struct InFlight<'a> {
    step: &'a PoolStep<'a>,
    layer: usize,
    /// The calls sent, without their hidden rows.
    calls: Vec<WorkerCall>,
    rx: Replies,
    started: Instant,
}

impl InFlight<'_> {
    /// Waits for every reply and sums them: `[tokens, hidden]` (`x`: the layer's input).
    pub fn finish(self, x: &Tensor) -> Result<Tensor, RouterError> {
        let (step, layer, started) = (self.step, self.layer, self.started);
        let result = step.collect_layer(self, x);
        step.pool
            .options
            .metrics
            .layer_seconds
            .get_or_create(&LayerLabel {
                layer: layer as u32,
            })
            .observe(started.elapsed().as_secs_f64());
        result
    }
}

impl PendingExperts for InFlight<'_> {
    fn wait(self: Box<Self>, x: &Tensor) -> switchyard_engine::Result<Tensor> {
        (*self).finish(x).map_err(executor_error)
    }
}

/// A copy of a worker failure (the error itself is not `Clone`).
fn clone_error(e: &RouterError) -> RouterError {
    match e {
        RouterError::Worker {
            worker,
            addr,
            layer,
            code,
            message,
        } => RouterError::Worker {
            worker: *worker,
            addr: addr.clone(),
            layer: *layer,
            code: *code,
            message: message.clone(),
        },
        RouterError::Connect {
            worker,
            addr,
            reason,
        } => RouterError::Connect {
            worker: *worker,
            addr: addr.clone(),
            reason: reason.clone(),
        },
        e => RouterError::Runtime(e.to_string()),
    }
}

impl ExpertExecutor for PoolStep<'_> {
    fn run(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> switchyard_engine::Result<Tensor> {
        self.dispatch(layer, x, routing).map_err(executor_error)
    }

    fn start<'a>(
        &'a self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
    ) -> switchyard_engine::Result<Pending<'a>> {
        Ok(Box::new(
            self.begin(layer, x, routing).map_err(executor_error)?,
        ))
    }

    fn runs_shared_experts(&self) -> bool {
        self.pool.options.shared_on_workers
    }
}

/// The engine carries the dispatcher's error typed, so the router gets it back as it was.
fn executor_error(e: RouterError) -> EngineError {
    match e {
        // The router's own work (the overlapped shared expert) failed: keep its error as it was.
        RouterError::Engine(e) => e,
        e => EngineError::Executor(Box::new(e)),
    }
}
