//! gRPC server reflection (`grpc.reflection.v1`), so `grpcurl` and other generic clients work
//! against any Switchyard node without the `.proto` files.

use tonic_reflection::server::v1::{ServerReflection, ServerReflectionServer};

/// The reflection service, describing `switchyard.v1` and `grpc.health.v1`.
pub fn service() -> Result<ServerReflectionServer<impl ServerReflection>, String> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| format!("building the reflection service: {e}"))
}
