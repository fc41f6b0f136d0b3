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
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use switchyard_engine::model::{ExpertExecutor, Pending, PendingExperts, Routing};
use switchyard_engine::{EngineError, Tensor};
use switchyard_proto::WorkerId;
use switchyard_proto::codec;

use super::plan::{self, TokenWork, WorkerCall};
use super::tail;
use super::transport::{WorkerReply, call_failed};
use super::{ExpertPool, Route};
use crate::error::RouterError;
use crate::metrics::{LayerLabel, OutcomeLabel, ReasonLabel};

/// A reply of one round of calls: `(call index, result, round trip)`.
type Reply = (usize, Result<WorkerReply, RouterError>, Duration);

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
        let round = self.send(&self.route, layer, calls)?;
        Ok(InFlight {
            step: self,
            layer,
            round,
            started,
        })
    }

    /// Collects a layer's replies into `[tokens, hidden]`, re-planning failed calls once on
    /// the newest route, avoiding every worker that failed.
    fn collect_layer(&self, sent: InFlight<'_>, x: &Tensor) -> Result<Tensor, RouterError> {
        let options = &self.pool.options;
        let InFlight {
            layer, mut round, ..
        } = sent;
        let (tokens, hidden) = x.dims2()?;
        let xd = x.as_f32()?;
        let mut out = Tensor::zeros(&[tokens, hidden]);
        let od = out.as_f32_mut()?;
        // Whatever waits here, the compute threads need not spin: workers may share this
        // machine's cores.
        switchyard_engine::cpu::pool::global().rest();
        let failed = self.collect(layer, &mut round, xd, od)?;
        if failed.is_empty() {
            return Ok(out);
        }
        let calls = &round.calls;
        // One more round, on the newest route (the placement may have moved on since the step
        // began), avoiding every worker that failed.
        let latest = self.pool.route().unwrap_or_else(|| self.route.clone());
        // A worker that is gone or slow is avoided. One that only lacked an expert is avoided
        // only if the newest placement is the one it failed on: otherwise that placement says
        // truly what it holds now.
        let moved_on = latest.placement.version() != self.route.placement.version();
        let mut avoid: BTreeSet<WorkerId> = failed
            .iter()
            .filter(|(_, e)| !(moved_on && expert_moved(e)))
            .map(|(i, _)| calls[*i].worker)
            .collect();
        // Hedges that failed failed on their workers too.
        avoid.extend(round.hedge_failures.iter().copied());
        // Workers down or suspect are avoided as well, unless no other holder is left.
        let mut avoid_all = self.pool.down_workers();
        avoid_all.extend(avoid.iter().copied());
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
                let token = row as u64 + self.salt;
                latest
                    .placement
                    .serving(layer, e, token, &avoid_all)
                    .or_else(|| latest.placement.serving(layer, e, token, &avoid))
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
        let mut retry = self.send(&latest, layer, retry)?;
        match self.collect(layer, &mut retry, xd, od)?.into_iter().next() {
            None => Ok(out),
            Some((_, e)) => Err(e),
        }
    }

    /// Sends calls on `route`'s links concurrently: one round, whose replies
    /// [`PoolStep::collect`] gathers.
    fn send(
        &self,
        route: &Arc<Route>,
        layer: usize,
        calls: Vec<WorkerCall>,
    ) -> Result<Round, RouterError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut round = Round {
            route: route.clone(),
            calls: Vec::with_capacity(calls.len()),
            hedge_at: Vec::with_capacity(calls.len()),
            owner: Vec::with_capacity(calls.len()),
            originals: calls.len(),
            hedges: BTreeMap::new(),
            hedge_failures: BTreeSet::new(),
            tx,
            rx,
        };
        for (i, call) in calls.into_iter().enumerate() {
            self.send_one(&mut round, layer, call, i)?;
        }
        Ok(round)
    }

    /// Sends `call` on its worker's link as the next call of `round`, on behalf of original
    /// call `owner` (itself, or the call it hedges), bounded by its adaptive deadline; keeps
    /// it, without its hidden rows, in `round.calls`. An original is given its hedge time.
    fn send_one(
        &self,
        round: &mut Round,
        layer: usize,
        mut call: WorkerCall,
        owner: usize,
    ) -> Result<(), RouterError> {
        let index = round.calls.len();
        let route = &round.route;
        let link = route.links.get(&call.worker).cloned().ok_or_else(|| {
            RouterError::Placement(format!(
                "placement version {} names worker {} for layer {layer} but has no link to it",
                route.placement.version(),
                call.worker
            ))
        })?;
        let options = &self.pool.options;
        let m = &options.metrics;
        let p99 = self.pool.call_times().p99(layer, call.rows.len());
        let deadline = tail::call_deadline(p99, &options.tail, options.deadline);
        let hedge_at = (index < round.originals)
            .then(|| tail::hedge_delay(p99, &options.tail, deadline))
            .flatten()
            .map(|after| Instant::now() + after);
        let label = self.pool.label(link.as_ref());
        let bytes = call.request.hidden.as_ref().map_or(0, |h| h.data.len());
        m.calls.get_or_create(&label).inc();
        m.rows_sent
            .get_or_create(&label)
            .inc_by(call.rows.len() as u64);
        m.bytes_sent.get_or_create(&label).inc_by(bytes as u64);
        let hidden_rows = call.request.hidden.take();
        round.calls.push(call.clone());
        round.hedge_at.push(hedge_at);
        round.owner.push(owner);
        call.request.hidden = hidden_rows;
        let fut = link.forward(call.request, deadline);
        let tx = round.tx.clone();
        // Spawned, and waited on through a plain channel, so callers need no async context.
        self.pool.handle().spawn(async move {
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
            // The round may be over (a hedge won, or the layer failed): then nobody listens.
            let _ = tx.send((index, result, sent.elapsed()));
        });
        Ok(())
    }

    /// Gathers a round's replies into `od`, hedging calls that pass their hedge time; returns
    /// the original calls that failed in a way another worker could fix (other failures are
    /// returned as the error). A hedged call counts as answered when either it or every call
    /// of its hedge has answered, whichever is first; the other's replies are dropped.
    fn collect(
        &self,
        layer: usize,
        round: &mut Round,
        xd: &[f32],
        od: &mut [f32],
    ) -> Result<Vec<(usize, RouterError)>, RouterError> {
        let options = &self.pool.options;
        let m = &options.metrics;
        // Each call is bounded by its deadline already; this only guards the channel.
        let backstop = options.deadline + Duration::from_secs(5);
        let n = round.originals;
        let mut answered = vec![false; n];
        let mut left = n;
        let mut failed = Vec::new();
        // Originals that failed while their hedge is still out.
        let mut parked: BTreeMap<usize, RouterError> = BTreeMap::new();
        while left > 0 {
            let next_hedge = (0..n)
                .filter(|&i| !answered[i])
                .filter_map(|i| round.hedge_at[i])
                .min();
            let wait = next_hedge.map_or(backstop, |t| t.saturating_duration_since(Instant::now()));
            let (k, result, round_trip) = match round.rx.recv_timeout(wait) {
                Ok(reply) => reply,
                Err(RecvTimeoutError::Timeout) if next_hedge.is_some() => {
                    self.hedge_due(layer, round, &answered, xd)?;
                    continue;
                }
                Err(_) => {
                    return Err(RouterError::Runtime(format!(
                        "layer {layer}: a worker call outlived its deadline"
                    )));
                }
            };
            let i = round.owner[k];
            if let Err(e) = &result {
                // Counted, and its worker marked, even when the other side has answered.
                self.call_failed(&round.route, &round.calls[k], e);
                if k >= n {
                    round.hedge_failures.insert(round.calls[k].worker);
                }
            }
            if answered[i] {
                continue;
            }
            let reply = match result {
                Ok(reply) => reply,
                Err(e) => {
                    // A hedge's failure, whatever it is, leaves the original to answer.
                    if k < n && !plan::retryable(&e) {
                        return Err(e);
                    }
                    let hedge = round.hedges.get_mut(&i);
                    if k < n {
                        // The original failed: its hedge, if still out, may yet answer.
                        if hedge.is_some_and(|h| !h.failed) {
                            parked.insert(i, e);
                        } else {
                            failed.push((i, e));
                            answered[i] = true;
                            left -= 1;
                        }
                    } else if let Some(h) = hedge {
                        h.failed = true;
                        // The hedge failed: the original, if still out, may yet answer.
                        if let Some(original) = parked.remove(&i) {
                            failed.push((i, original));
                            answered[i] = true;
                            left -= 1;
                        }
                    }
                    continue;
                }
            };
            if k < n {
                self.add_reply(layer, round, k, reply, round_trip, od)?;
                if round.hedges.contains_key(&i) {
                    m.hedges
                        .get_or_create(&OutcomeLabel { outcome: "lost" })
                        .inc();
                }
                answered[i] = true;
                left -= 1;
                continue;
            }
            let Some(h) = round.hedges.get_mut(&i) else {
                continue;
            };
            h.replies.push((k, reply, round_trip));
            if h.replies.len() == h.parts && !h.failed {
                for (k, reply, round_trip) in std::mem::take(&mut h.replies) {
                    self.add_reply(layer, round, k, reply, round_trip, od)?;
                }
                m.hedges
                    .get_or_create(&OutcomeLabel { outcome: "won" })
                    .inc();
                answered[i] = true;
                left -= 1;
            }
        }
        Ok(failed)
    }

    /// Hedges every unanswered original of `round` past its hedge time: marks its worker
    /// suspect and sends its work to other holders of its experts, if there are any and the
    /// hedge budget allows.
    fn hedge_due(
        &self,
        layer: usize,
        round: &mut Round,
        answered: &[bool],
        xd: &[f32],
    ) -> Result<(), RouterError> {
        let now = Instant::now();
        let options = &self.pool.options;
        let outcome = |outcome: &'static str| {
            options
                .metrics
                .hedges
                .get_or_create(&OutcomeLabel { outcome })
                .inc()
        };
        for (i, &done) in answered.iter().enumerate() {
            match round.hedge_at[i] {
                Some(at) if at <= now && !done => round.hedge_at[i] = None,
                _ => continue,
            }
            let slow = round.calls[i].worker;
            if let Some(link) = round.route.links.get(&slow) {
                self.pool.mark_suspect(link);
            }
            let mut avoid = self.pool.down_workers();
            avoid.insert(slow);
            let placement = &round.route.placement;
            let parts = match plan::build_calls(
                layer,
                xd,
                self.pool.hidden,
                plan::work_of(&round.calls[i]),
                &|row, e| placement.serving(layer, e, u64::from(row) + self.salt, &avoid),
                options.wire_dtype,
            ) {
                Ok(parts) => parts,
                Err(_) => {
                    outcome("no_replica");
                    continue;
                }
            };
            if !self.pool.call_times().take_hedge() {
                outcome("no_budget");
                continue;
            }
            outcome("sent");
            tracing::debug!(layer, worker = %slow, to = ?parts.iter().map(|c| c.worker).collect::<Vec<_>>(), "expert call past its hedge time; sent to replicas too");
            round.hedges.insert(
                i,
                Hedge {
                    parts: parts.len(),
                    replies: Vec::new(),
                    failed: false,
                },
            );
            for call in parts {
                self.send_one(round, layer, call, i)?;
            }
        }
        Ok(())
    }

    /// How `worker` of `route` is named in the dispatch metrics.
    fn worker_label(&self, route: &Route, worker: WorkerId) -> crate::metrics::WorkerLabel {
        match route.links.get(&worker) {
            Some(link) => self.pool.label(link.as_ref()),
            None => crate::metrics::WorkerLabel {
                worker: worker.0.to_string(),
            },
        }
    }

    /// Counts a failed call, and marks its worker down (unreachable) or suspect (too slow).
    fn call_failed(&self, route: &Route, call: &WorkerCall, e: &RouterError) {
        let label = self.worker_label(route, call.worker);
        self.pool
            .options
            .metrics
            .failed_calls
            .get_or_create(&label)
            .inc();
        if unreachable(e) {
            self.pool.mark_down(call.worker);
        } else if timed_out(e)
            && let Some(link) = route.links.get(&call.worker)
        {
            self.pool.mark_suspect(link);
        }
    }

    /// Adds call `k`'s reply into `od`, recording its times.
    fn add_reply(
        &self,
        layer: usize,
        round: &Round,
        k: usize,
        reply: WorkerReply,
        round_trip: Duration,
        od: &mut [f32],
    ) -> Result<(), RouterError> {
        let options = &self.pool.options;
        let hidden = self.pool.hidden;
        let call = &round.calls[k];
        let label = self.worker_label(&round.route, call.worker);
        self.pool
            .call_times()
            .record(layer, call.rows.len(), round_trip);
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
        Ok(())
    }
}

/// One round of a layer's calls: the originals, then any hedges, all answering on one
/// channel by their index in `calls`.
#[derive(Debug)]
struct Round {
    route: Arc<Route>,
    /// The calls sent, without their hidden rows: the originals first.
    calls: Vec<WorkerCall>,
    /// Per call: when it is due a hedge (originals only; `None` once hedged or never).
    hedge_at: Vec<Option<Instant>>,
    /// Per call: the original it answers for (itself, or the call it hedges).
    owner: Vec<usize>,
    originals: usize,
    /// By original: its hedge.
    hedges: BTreeMap<usize, Hedge>,
    /// Workers a hedge call failed on.
    hedge_failures: BTreeSet<WorkerId>,
    tx: Sender<Reply>,
    rx: Receiver<Reply>,
}

/// An original call's work, sent again to other holders of its experts.
#[derive(Debug)]
struct Hedge {
    /// Calls the hedge was split into.
    parts: usize,
    /// Its calls' replies so far, added only once all are in (the original may win still).
    replies: Vec<(usize, WorkerReply, Duration)>,
    failed: bool,
}

/// The call ran out of time: its worker may be stopped or overloaded.
fn timed_out(e: &RouterError) -> bool {
    matches!(
        e,
        RouterError::Worker {
            code: tonic::Code::DeadlineExceeded,
            ..
        }
    )
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
    round: Round,
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
