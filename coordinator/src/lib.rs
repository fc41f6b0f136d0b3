//! `switchyard-coordinator`: cluster membership and expert placement.
//!
//! - [`placement`]: the policy, a pure function from the problem (MoE layers × routed experts,
//!   workers and their memory, replicas, observed load, the previous plan) to a plan, also
//!   used by `switchyard plan`;
//! - [`membership`]: the cluster as a state machine with explicit times — workers register,
//!   heartbeat, drain and fail to load; routers report the version they use; every change
//!   re-plans into a target version that goes live once its workers have loaded it;
//! - [`service`]: the gRPC face (`CoordinatorService`: register, heartbeat, leave, router
//!   reports, placement watch, status), lease sweeping and health; [`capacity`]: expert sizes
//!   and byte parsing; [`metrics`]: its Prometheus metrics.

pub mod capacity;
pub mod load;
pub mod membership;
pub mod metrics;
pub mod placement;
pub mod service;
