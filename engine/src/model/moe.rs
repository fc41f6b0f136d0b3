//! The MoE block of one layer: gate, routed experts (wherever they run), shared experts.

use std::time::{Duration, Instant};

use crate::error::Result;
use crate::model::experts::RoutedExperts;
use crate::model::gate::{Gate, Routing};
use crate::model::mlp::Mlp;
use crate::tensor::Tensor;

/// Runs the routed experts of a layer for a batch. The engine's in-process experts implement
/// it; the router's dispatcher implements it with remote expert workers.
pub trait ExpertExecutor: Sync {
    /// `x: [tokens, hidden]` → `[tokens, hidden]`, Σ weight × expert(x) over each token's
    /// routed experts.
    fn run(&self, layer: usize, x: &Tensor, routing: &Routing) -> Result<Tensor>;

    /// Like [`run`](Self::run), calling `meanwhile` while the routed experts are in flight — a
    /// remote executor sends its calls, runs `meanwhile` (the shared expert), then waits. The
    /// default, for executors that compute in this process, runs one after the other.
    fn run_overlapped(
        &self,
        layer: usize,
        x: &Tensor,
        routing: &Routing,
        meanwhile: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Tensor> {
        let out = self.run(layer, x, routing)?;
        meanwhile()?;
        Ok(out)
    }

    /// Whether `run` also adds each token's shared experts (they then run where the routed
    /// experts do, and the caller skips its own copy).
    fn runs_shared_experts(&self) -> bool {
        false
    }
}

/// Where one MoE block's time went.
#[derive(Clone, Copy, Debug, Default)]
pub struct MoeTimings {
    pub gate: Duration,
    /// The routed experts: compute here, or sending and waiting on remote workers (less the
    /// shared expert computed meanwhile).
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

impl Moe {
    /// `x: [tokens, hidden] → ([tokens, hidden], routing)`.
    pub fn forward(
        &self,
        layer: usize,
        x: &Tensor,
        executor: &dyn ExpertExecutor,
    ) -> Result<(Tensor, Routing, MoeTimings)> {
        let start = Instant::now();
        let routing = self.gate.forward(x)?;
        let gate = start.elapsed();
        let mut shared = None;
        let mut shared_time = Duration::ZERO;
        let local_shared = self
            .shared
            .as_ref()
            .filter(|_| !executor.runs_shared_experts());
        let experts_start = Instant::now();
        let mut out = executor.run_overlapped(layer, x, &routing, &mut || {
            let t = Instant::now();
            shared = local_shared.map(|s| s.forward(x)).transpose()?;
            shared_time = t.elapsed();
            Ok(())
        })?;
        let timings = MoeTimings {
            gate,
            experts: experts_start.elapsed().saturating_sub(shared_time),
            shared_expert: shared_time,
        };
        if let Some(shared) = shared {
            for (o, s) in out.as_f32_mut()?.iter_mut().zip(shared.as_f32()?) {
                *o += s;
            }
        }
        Ok((out, routing, timings))
    }
}
