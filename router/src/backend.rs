//! What the scheduler runs a step on: the model and wherever its routed experts are. Behind a
//! trait so the scheduler's batching, paging and preemption are testable without a model.

use std::sync::Arc;

use switchyard_engine::EngineError;
use switchyard_engine::model::{
    CausalLm, ExpertExecutor, ForwardOptions, ForwardTimings, KvLayout, LogitsFor, SeqInput,
};

use crate::load::ExpertLoad;

use crate::error::RouterError;
use crate::server::ExpertSource;

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
    /// `None`: the model holds its own experts.
    experts: Option<ExpertSource>,
    load: Arc<ExpertLoad>,
}

impl ModelBackend {
    pub fn local(model: Arc<CausalLm>) -> ModelBackend {
        ModelBackend::new(model, None)
    }

    pub fn remote(model: Arc<CausalLm>, experts: ExpertSource) -> ModelBackend {
        ModelBackend::new(model, Some(experts))
    }

    fn new(model: Arc<CausalLm>, experts: Option<ExpertSource>) -> ModelBackend {
        let c = model.config();
        let (n, k) = c
            .moe
            .as_ref()
            .map_or((0, 0), |m| (m.n_routed_experts, m.num_experts_per_tok));
        let load = Arc::new(ExpertLoad::new(c.moe_layers(), n, k));
        ModelBackend {
            model,
            experts,
            load,
        }
    }

    pub fn model(&self) -> &Arc<CausalLm> {
        &self.model
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

    fn step(&self, seqs: &mut [SeqInput<'_>]) -> Result<StepOutput, RouterError> {
        let options = ForwardOptions {
            logits: LogitsFor::Last,
            record_routing: true,
            ..Default::default()
        };
        // One placement per step: a switch lands between steps, never inside one.
        let (out, experts) = match &self.experts {
            None => (self.model.forward(seqs, &options), None),
            Some(source) => {
                let experts = source.snapshot();
                let executor: &dyn ExpertExecutor = &*experts;
                (
                    self.model.forward_with(seqs, &options, executor),
                    Some(experts),
                )
            }
        };
        let out = out.map_err(|e| match e {
            EngineError::Executor(m) => RouterError::Runtime(m),
            e => RouterError::Engine(e),
        })?;
        for (layer, routing) in &out.routing {
            let worker_of = |e: u32| {
                experts
                    .as_ref()
                    .and_then(|x| x.dispatcher().worker_for(*layer, e))
            };
            self.load.record(*layer, routing, &worker_of);
        }
        Ok(StepOutput {
            logits: out.logits.into_f32_vec(),
            timings: out.timings,
        })
    }
}
