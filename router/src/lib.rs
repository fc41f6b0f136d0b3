//! `switchyard-router`: the node that serves clients.
//!
//! It runs everything that is not a routed expert (the engine's model with no routed experts
//! loaded) and hands each MoE layer's routed-expert work to expert workers. The pieces:
//!
//! - [`experts`]: the expert pool — one per router, for its life: connections keyed by the
//!   coordinator's worker ids, the placement in force swapped between steps, call planning,
//!   dispatch with failover, and following the coordinator;
//! - [`request`]: every client request checked once into a `ValidRequest`;
//! - [`scheduler`]: continuous batching with chunked prefill over the paged KV cache,
//!   admission control, preemption, cancellation and deadlines, behind [`backend::Backend`];
//! - [`server`]: the gRPC client API (`InferenceService`, health, reflection) and the state the
//!   APIs share; [`http`]: the OpenAI-compatible HTTP API; [`api_tls`]: TLS for both;
//! - [`node`]: one way to assemble a router node — model, expert pool, scheduler, APIs;
//! - [`metrics`]: the Prometheus metrics; [`expert_load`]: exact per-(layer, expert) token
//!   counts.

pub mod api_tls;
pub mod backend;
pub mod error;
pub mod expert_load;
pub mod experts;
pub mod http;
pub mod metrics;
pub mod node;
pub mod request;
pub mod scheduler;
pub mod server;

pub use error::RouterError;
pub use experts::{DispatchOptions, ExpertPool, Placement};
pub use switchyard_proto::WorkerId;
