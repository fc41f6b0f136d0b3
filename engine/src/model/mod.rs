//! The model: one definition for DeepSeek-V2/V3 and the GQA families (Llama, Mistral, Mixtral,
//! Qwen3, Qwen3-MoE, Gemma 3), its layers as separate modules.
//!
//! Each layer type is a struct with `new(config, weights)` and `forward`; architecture variants
//! are knobs of [`crate::config::ModelConfig`], not copied model files.

pub mod cache;
pub mod causal_lm;
pub mod experts;
pub mod gate;
pub mod gqa;
pub mod linear;
pub mod mla;
pub mod mlp;
pub mod moe;
pub mod pipeline;
pub mod rope;
pub mod shard;

pub use cache::{BlockPool, KvBlock, KvCache, KvLayout};
pub use causal_lm::{
    CausalLm, ExpertSelection, ForwardOptions, ForwardOutput, ForwardTimings, LoadOptions,
    LogitsFor, SeqInput,
};
pub use gate::Routing;
pub use mla::AttentionMode;
pub use moe::{ExpertExecutor, Pending, PendingExperts, Ready};
