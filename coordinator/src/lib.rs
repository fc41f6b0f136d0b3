//! `switchyard-coordinator`: cluster membership and expert placement.
//!
//! It will track workers (register, heartbeat, lease expiry) and publish versioned placement
//! maps that routers watch. Today it holds the placement policy itself, [`placement`]: a pure
//! function from the problem (MoE layers × routed experts, workers and their memory, replicas,
//! observed load, the previous plan) to a plan, used by `switchyard plan` and, with the
//! membership service, by the coordinator.

pub mod capacity;
pub mod membership;
pub mod metrics;
pub mod placement;
pub mod service;
