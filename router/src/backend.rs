//! What the scheduler runs a step on: the model and wherever its routed experts are. Behind a
//! trait so the scheduler's batching, paging and preemption are testable without a model.

use std::sync::Arc;

use switchyard_engine::EngineError;
use switchyard_engine::model::{
    CausalLm, ExpertExecutor, ForwardOptions, ForwardTimings, KvLayout, LogitsFor, SeqInput,
};

use crate::error::RouterError;
use crate::expert_load::ExpertLoad;
use crate::experts::ExpertPool;

/// One forward step over a batch of sequences.
pub trait Backend: Send + Sync + 'static {
    fn kv_layout(&self, block_size: usize) -> KvLayout;
    fn vocab_size(&self) -> usize;
    /// The model's end-of-sequence tokens.
    fn eos_token_ids(&self) -> &[u32];
    /// Runs every sequence's new tokens through the model, appending them to its cache.
    fn step(&self, seqs: &mut [SeqInput<'_>]) -> Result<StepOutput, RouterError>;

    /// Tokens per expert and worker, when the backend counts them.
    fn expert_load(&self) -> Option<Arc<ExpertLoad>> {
        None
    }

    /// Whether a step could run now, and why not (e.g. no placement of the routed experts).
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }

    /// Something an operator should know while the backend still serves (a placement switch
    /// that keeps failing).
    fn warning(&self) -> Option<String> {
        None
    }
}

/// One step's result.
#[derive(Debug, Default)]
pub struct StepOutput {
    /// The logits of each sequence's last new token: `[sequences, vocab]`, row-major.
    pub logits: Vec<f32>,
    pub timings: ForwardTimings,
}

/// The engine's model, its routed experts local or on expert workers.
#[derive(Debug, Clone)]
pub struct ModelBackend {
    model: Arc<CausalLm>,
    /// `None`: the model holds its own experts (or has none).
    experts: Option<Arc<ExpertPool>>,
    load: Arc<ExpertLoad>,
}

impl ModelBackend {
    pub fn local(model: Arc<CausalLm>) -> ModelBackend {
        ModelBackend::new(model, None)
    }

    pub fn remote(model: Arc<CausalLm>, experts: Arc<ExpertPool>) -> ModelBackend {
        ModelBackend::new(model, Some(experts))
    }

    fn new(model: Arc<CausalLm>, experts: Option<Arc<ExpertPool>>) -> ModelBackend {
        let c = model.config();
        let (n, k) = c
            .moe
            .as_ref()
            .map_or((0, 0), |m| (m.n_routed_experts, m.num_experts_per_tok));
        // With workers, the pool's counters: it reports them to the coordinator.
        let load = match &experts {
            Some(pool) => pool.load().clone(),
            None => Arc::new(ExpertLoad::new(c.moe_layers(), n, k)),
        };
        ModelBackend {
            model,
            experts,
            load,
        }
    }

    pub fn model(&self) -> &Arc<CausalLm> {
        &self.model
    }

    pub fn experts(&self) -> Option<&Arc<ExpertPool>> {
        self.experts.as_ref()
    }
}

impl Backend for ModelBackend {
    fn kv_layout(&self, block_size: usize) -> KvLayout {
        self.model.kv_layout(block_size)
    }

    fn vocab_size(&self) -> usize {
        self.model.config().vocab_size
    }

    fn eos_token_ids(&self) -> &[u32] {
        &self.model.config().eos_token_ids
    }

    fn expert_load(&self) -> Option<Arc<ExpertLoad>> {
        Some(self.load.clone())
    }

    fn ready(&self) -> Result<(), String> {
        self.experts.as_ref().map_or(Ok(()), |p| p.ready())
    }

    fn warning(&self) -> Option<String> {
        self.experts.as_ref().and_then(|p| p.switch_error())
    }

    fn step(&self, seqs: &mut [SeqInput<'_>]) -> Result<StepOutput, RouterError> {
        let options = ForwardOptions {
            logits: LogitsFor::Last,
            record_routing: true,
            // Micro-batches pay only when the experts compute elsewhere meanwhile.
            micro_batches: self
                .experts
                .as_ref()
                .map_or(1, |p| p.options().micro_batches),
            micro_batch_min_tokens: self
                .experts
                .as_ref()
                .map_or(0, |p| p.options().micro_batch_min_tokens),
            ..Default::default()
        };
        // One route per step: a placement switch lands between steps, never inside one.
        let step = self.experts.as_ref().map(|p| p.step()).transpose()?;
        let out = match &step {
            None => self.model.forward(seqs, &options),
            Some(step) => {
                let executor: &dyn ExpertExecutor = step;
                self.model.forward_with(seqs, &options, executor)
            }
        };
        let out = out.map_err(|e| match e {
            // The dispatcher's own error, typed: a worker's deadline stays a deadline.
            EngineError::Executor(e) => match e.downcast::<RouterError>() {
                Ok(e) => *e,
                Err(e) => RouterError::Runtime(e.to_string()),
            },
            e => RouterError::Engine(e),
        })?;
        for (layer, routing) in &out.routing {
            let served = step.as_ref().map(|s| s.served(*layer)).unwrap_or_default();
            let label = |w: switchyard_proto::WorkerId| {
                step.as_ref()
                    .map_or_else(|| w.0.to_string(), |s| s.label(w))
            };
            self.load.record(*layer, routing, &served, &label);
        }
        Ok(StepOutput {
            logits: out.logits.into_f32_vec(),
            timings: out.timings,
        })
    }
}
