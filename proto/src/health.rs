//! The standard `grpc.health.v1` service every Switchyard node serves, so load balancers,
//! Kubernetes gRPC probes and `grpc_health_probe` work without our protos.

use tonic_health::ServingStatus;
use tonic_health::pb::health_server::{Health, HealthServer};

/// A health service reporting SERVING for the whole server ("") and for `service_name`.
pub async fn serving(service_name: &str) -> HealthServer<impl Health> {
    let (reporter, service) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", ServingStatus::Serving)
        .await;
    reporter
        .set_service_status(service_name, ServingStatus::Serving)
        .await;
    service
}
