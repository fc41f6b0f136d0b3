//! `switchyard-proto`: the wire protocol, package `switchyard.v1`.
//!
//! It will hold the `.proto` files and their generated code (with the data-plane issue); today
//! it holds the tensor wire codec every service will use: hidden states travel as raw
//! little-endian bf16 or f32 bytes with an explicit shape and dtype, never as `repeated float`.

pub mod codec;

pub use codec::{CodecError, WireDType, WireTensor};
