//! `switchyard-router`: the node that serves clients.
//!
//! It owns the client APIs (gRPC and OpenAI-compatible HTTP), request validation, the
//! continuous-batching scheduler, the latent KV cache, attention execution, and the dispatch of
//! each MoE layer's routed-expert work to expert workers behind a `Dispatch` trait. The model
//! math it runs comes from `switchyard-engine`; until the data-plane issue lands, the engine's
//! in-process [`ExpertExecutor`](https://docs.rs/switchyard-engine) is the only dispatcher and
//! this crate holds no code.
