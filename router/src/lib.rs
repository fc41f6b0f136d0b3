//! `switchyard-router`: the node that serves clients.
//!
//! It runs everything that is not a routed expert (the engine's model with no routed experts
//! loaded) and hands each MoE layer's routed-expert work to expert workers. The pieces:
//!
//! - [`placement`]: which worker serves which expert of which layer (pure, built from what the
//!   workers report);
//! - [`dispatch`]: turns one layer's routing into one request per worker — each token's row
//!   once per worker however many of its experts that worker holds — sends them concurrently
//!   behind the [`dispatch::Transport`] trait, and adds the partial sums;
//! - [`grpc`]: the gRPC transport, a client per worker with TCP_NODELAY and deadlines;
//! - [`remote`]: connects a pool of workers and checks they serve this model;
//! - [`request`]: every client request checked once into a `ValidRequest`;
//! - [`scheduler`]: continuous batching with chunked prefill over the paged KV cache,
//!   admission control, preemption, cancellation and deadlines, behind [`backend::Backend`];
//! - [`server`]: the gRPC client API (`InferenceService`, health, reflection) and the state the
//!   APIs share; [`http`]: the OpenAI-compatible HTTP API;
//! - [`metrics`]: the Prometheus metrics; [`load`]: exact per-(layer, expert) token counts.

pub mod backend;
pub mod coordinated;
pub mod dispatch;
pub mod error;
pub mod grpc;
pub mod http;
pub mod load;
pub mod metrics;
pub mod placement;
pub mod remote;
pub mod request;
pub mod scheduler;
pub mod server;

pub use dispatch::{Dispatcher, Transport, WorkerId};
pub use error::RouterError;
pub use placement::Placement;
pub use remote::RemoteExperts;
