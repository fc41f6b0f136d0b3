//! The model: one definition of the DeepSeek-V2/V3 family, its layers as separate modules.
//!
//! Each layer type is a struct with `new(config, weights)` and `forward`; architecture variants
//! are knobs of [`crate::config::ModelConfig`], not copied model files.

pub mod attention;
pub mod cache;
pub mod deepseek;
pub mod experts;
pub mod gate;
pub mod linear;
pub mod mlp;
pub mod moe;
pub mod rope;

pub use attention::AttentionMode;
pub use cache::{BlockPool, KvBlock, KvCache, KvLayout};
pub use deepseek::{
    DeepseekModel, ExpertSelection, ForwardOptions, ForwardOutput, ForwardTimings, LoadOptions,
    LogitsFor, SeqInput,
};
pub use gate::Routing;
pub use moe::ExpertExecutor;
