//! The rdp-preflight gRPC contract (`preflight.v1`), compiled without a system `protoc`.
//!
//! Messages serialize to the proto3 JSON mapping through `serde` (pbjson).
#![allow(missing_docs, unreachable_pub, clippy::all, clippy::unwrap_used)]

/// `preflight.v1`: the service, its messages and the cause enum.
pub mod v1 {
    include!(concat!(env!("OUT_DIR"), "/preflight.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/preflight.v1.serde.rs"));
}

/// Encoded `FileDescriptorSet` of the contract, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/preflight_descriptor.bin"));

/// The proto file itself, so a test can compare its cause enum with the catalog.
pub const PROTO_SOURCE: &str = include_str!("../preflight/v1/preflight.proto");
