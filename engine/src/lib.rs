//! `switchyard-engine`: tensors and compute backends, checkpoint loading, model configuration,
//! the model layers, and single-process generation.
//!
//! The router, the expert workers and the command line build on this crate; it knows nothing of
//! networks. The CPU backend runs everything; with the `cuda` feature, the `cuda` module runs
//! routed experts, and the router's projections and FFNs, on a CUDA device (`Device::Cuda`).

pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod dtype;
pub mod error;
pub mod generate;
pub mod model;
pub mod sampling;
pub mod synth;
pub mod tensor;
pub mod tokenizer;

pub use config::ModelConfig;
pub use error::{EngineError, Result};
pub use tensor::{Device, Devices, Tensor};
