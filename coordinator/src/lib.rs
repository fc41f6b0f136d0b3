//! `switchyard-coordinator`: cluster membership and expert placement.
//!
//! It tracks workers (register, heartbeat, lease expiry), computes placement as a pure function
//! (every routed expert on at least one live worker, hot experts replicated, load balanced), and
//! publishes versioned placement maps that routers watch. It arrives with the coordinator issue;
//! this crate holds no code yet.
