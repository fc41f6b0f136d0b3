//! `switchyard-expert-worker`: the process that holds a subset of the routed experts.
//!
//! It loads only its experts' tensors from the checkpoint (memory-mapped), serves batched
//! expert calls from routers (one grouped GEMM per expert, combined per token before replying),
//! and reports its load. The expert math it runs is `switchyard-engine`'s `RoutedExperts`; the
//! gRPC service arrives with the data-plane issue, so this crate holds no code yet.
