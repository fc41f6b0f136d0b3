//! What the scheduler runs a step on: the model and wherever its routed experts are. Behind a
//! trait so the scheduler's batching, paging and preemption are testable without a model.

use std::sync::Arc;

use switchyard_engine::EngineError;
use switchyard_engine::model::{
    DeepseekModel, ExpertExecutor, ForwardOptions, KvLayout, LogitsFor, SeqInput,
};

use crate::error::RouterError;
use crate::server::ExpertSource;

/// One forward step over a batch of sequences.
pub trait Backend: Send + Sync + 'static {
    fn kv_layout(&self, block_size: usize) -> KvLayout;
    fn vocab_size(&self) -> usize;
    /// The model's end-of-sequence tokens.
    fn eos_token_ids(&self) -> &[u32];
    /// Runs every sequence's new tokens through the model, appending them to its cache.
    /// Returns the logits of each sequence's last new token: `[sequences, vocab]`, row-major.
    fn step(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<f32>, RouterError>;
}

/// The engine's model, its routed experts local or on expert workers.
#[derive(Debug, Clone)]
pub struct ModelBackend {
    model: Arc<DeepseekModel>,
    /// `None`: the model holds its own experts.
    experts: Option<ExpertSource>,
}

impl ModelBackend {
    pub fn local(model: Arc<DeepseekModel>) -> ModelBackend {
        ModelBackend {
            model,
            experts: None,
        }
    }

    pub fn remote(model: Arc<DeepseekModel>, experts: ExpertSource) -> ModelBackend {
        ModelBackend {
            model,
            experts: Some(experts),
        }
    }

    pub fn model(&self) -> &Arc<DeepseekModel> {
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

    fn step(&self, seqs: &mut [SeqInput<'_>]) -> Result<Vec<f32>, RouterError> {
        let options = ForwardOptions {
            logits: LogitsFor::Last,
            ..Default::default()
        };
        // One placement per step: a switch lands between steps, never inside one.
        let out = match &self.experts {
            None => self.model.forward(seqs, &options),
            Some(source) => {
                let experts = source.snapshot();
                let executor: &dyn ExpertExecutor = &*experts;
                self.model.forward_with(seqs, &options, executor)
            }
        };
        let out = out.map_err(|e| match e {
            EngineError::Executor(m) => RouterError::Runtime(m),
            e => RouterError::Engine(e),
        })?;
        Ok(out.logits.into_f32_vec())
    }
}
