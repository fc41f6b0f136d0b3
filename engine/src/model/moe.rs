//! The MoE block of one layer: gate, routed experts (wherever they run), shared experts.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::model::experts::RoutedExperts;
use crate::model::gate::{Gate, Routing};
use crate::model::mlp::Mlp;
use crate::tensor::Tensor;

/// Runs the routed experts of a layer for a batch. The engine's in-process experts implement
/// it; the router's expert pool implements it with remote expert workers.
///
/// A layer's experts are *started* and later *waited for*, so the caller can compute other
/// things meanwhile — the layer's shared expert, or another micro-batch's attention. An
/// executor that computes in this process does the work in `start` and hands back a result
/// that is ready at once, so one code path serves both.
pub trait ExpertExecutor: Sync {
    /// `x: [tokens, hidden]` → `[tokens, hidden]`, Σ weight × expert(x) over each token's
    /// routed experts.
    fn run(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<Tensor>;

    /// Starts [`run`](Self::run)'s work and returns its pending result; the default runs it
    /// now.
    fn start<'a>(&'a self, layer: usize, x: &Tensor, routing: &Routing) -> Result<Pending<'a>> {
        Ok(Box::new(Ready(self.run(layer, x, routing)?)))
    }

    /// Whether `run` also adds each token's shared experts (they then run where the routed
    /// experts do, and the caller skips its own copy).
    fn runs_shared_experts(&self) -> bool {
        false
    }
}

/// A layer's routed-expert work in flight.
pub trait PendingExperts: Send {
    /// Waits for the result: `[tokens, hidden]`. `x` is the input the work was started on
    /// (an executor may need it again, to send failed work elsewhere).
    fn wait(self: Box<Self>, x: &Tensor) -> Result<Tensor>;
}

/// A pending result that borrows its executor for `'a`.
pub type Pending<'a> = Box<dyn PendingExperts + 'a>;

/// A result computed already.
#[derive(Debug)]
pub struct Ready(pub Tensor);

impl PendingExperts for Ready {
    fn wait(self: Box<Self>, _x: &Tensor) -> Result<Tensor> {
        Ok(self.0)
    }
}

/// Where one MoE block's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct MoeTimings {
    pub gate: Duration,
    /// The routed experts: compute here, or sending to remote workers plus the time blocked
    /// waiting for them (what other work — the shared expert, other micro-batches — did not
    /// hide).
    pub experts: Duration,
    pub shared_expert: Duration,
}

#[derive(Debug)]
pub struct Moe {
    pub gate: Gate,
    /// Routed experts held by this process (empty when they live on workers).
    pub experts: RoutedExperts,
    pub shared: Option<Mlp>,
}

/// One MoE block's routed experts in flight: what [`Moe::start`] hands to [`Moe::finish`].
pub struct MoeStarted<'a> {
    routing: Routing,
    pending: Pending<'a>,
    gate: Duration,
    /// Time spent starting the routed experts (local compute, or sending).
    sending: Duration,
}

impl std::fmt::Debug for MoeStarted<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoeStarted")
            .field("tokens", &self.routing.tokens())
            .finish()
    }
}

impl Moe {
    /// `x: [tokens, hidden] → ([tokens, hidden], routing)`.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        executor: &dyn ExpertExecutor,
    ) -> Result<(Tensor, Routing, MoeTimings)> {
        let started = self.start(layer, x, executor)?;
        self.finish(x, started, executor)
    }

    /// Gates `x: [tokens, hidden]` and starts its routed experts.
    pub fn start<'a>(
        &self,
        layer: usize,
        x: &Tensor,
        executor: &'a dyn ExpertExecutor,
    ) -> Result<MoeStarted<'a>> {
        let t = Instant::now();
        let routing = self.gate.forward(x)?;
        let gate = t.elapsed();
        let t = Instant::now();
        let pending = executor.start(layer, x, &routing)?;
        Ok(MoeStarted {
            routing,
            pending,
            gate,
            sending: t.elapsed(),
        })
    }

    /// Runs the shared expert over `x` (the input `started` began on) while the routed experts
    /// are in flight, then waits for them and adds both: `([tokens, hidden], routing)`.
    pub fn finish(
        &self,
        x: &Tensor,
        started: MoeStarted<'_>,
        executor: &dyn ExpertExecutor,
    ) -> Result<(Tensor, Routing, MoeTimings)> {
        let t = Instant::now();
        let shared = self
            .shared
            .as_ref()
            .filter(|_| !executor.runs_shared_experts())
            .map(|s| s.forward(x))
            .transpose()?;
        let shared_expert = t.elapsed();
        let t = Instant::now();
        let mut out = started.pending.wait(x)?;
        let timings = MoeTimings {
            gate: started.gate,
            experts: started.sending + t.elapsed(),
            shared_expert,
        };
        if let Some(shared) = shared {
            for (o, s) in out.as_f32_mut()?.iter_mut().zip(shared.as_f32()?) {
                *o += s;
            }
        }
        Ok((out, started.routing, timings))
    }
}
