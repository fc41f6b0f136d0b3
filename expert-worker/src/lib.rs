//! `switchyard-expert-worker`: the process that holds a subset of the routed experts.
//!
//! It loads only its experts' tensors from the checkpoint (memory-mapped shards, opened only
//! where they hold its experts), serves batched expert calls from any number of routers — each
//! call one MoE layer's rows for this worker, combined per row before replying — and counts the
//! tokens each expert saw and the time spent computing. [`ExpertWorker`] is the logic, testable
//! without sockets; [`service`] puts it behind gRPC.

pub mod agent;
pub mod error;
pub mod metrics;
pub mod service;
pub mod spec;
pub mod worker;

pub use error::WorkerError;
pub use spec::ExpertSpec;
pub use worker::{ExpertWorker, WorkerStats};
