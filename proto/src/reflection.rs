//! gRPC server reflection, so `grpcurl` and other generic clients work against any Switchyard
//! node without the `.proto` files. Both protocol versions are served: `grpc.reflection.v1`
//! and the older `v1alpha` that many clients (grpcio's reflection client among them) still use.

use tonic_reflection::server::{v1, v1alpha};

fn builder() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// `grpc.reflection.v1`, describing `switchyard.v1` and `grpc.health.v1`. `None` only if the
/// compiled-in descriptors were malformed (a build defect; the tests below rule it out), so
/// nodes add it with `add_optional_service`.
pub fn v1() -> Option<v1::ServerReflectionServer<impl v1::ServerReflection>> {
    builder().build_v1().ok()
}

/// `grpc.reflection.v1alpha`, the same descriptors.
pub fn v1alpha() -> Option<v1alpha::ServerReflectionServer<impl v1alpha::ServerReflection>> {
    builder().build_v1alpha().ok()
}

#[cfg(test)]
mod tests {
    #[test]
    fn both_reflection_versions_build_from_the_compiled_descriptors() {
        assert!(super::v1().is_some());
        assert!(super::v1alpha().is_some());
    }
}
