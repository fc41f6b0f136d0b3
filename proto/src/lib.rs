//! `switchyard-proto`: the wire protocol, package `switchyard.v1`, and the tensor codec.
//!
//! The `.proto` files live in `proto/switchyard/v1/`; the generated messages and services are
//! re-exported from [`v1`]. Hidden states travel as raw little-endian bf16 or f32 bytes with an
//! explicit shape and dtype, never as `repeated float`: [`codec`] turns them into f32 rows and
//! back, checking lengths, shapes and size limits.

pub mod backoff;
pub mod client;
pub mod codec;
pub mod grpc_codec;
pub mod health;
pub mod ids;
pub mod reflection;
pub mod tls;

/// Generated code for package `switchyard.v1`.
#[allow(clippy::all, missing_debug_implementations, rust_2018_idioms)]
pub mod v1 {
    tonic::include_proto!("switchyard.v1");

    /// The encoded descriptors of every `switchyard.v1` file, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("switchyard_descriptor");
}

pub use codec::CodecError;
pub use ids::WorkerId;
