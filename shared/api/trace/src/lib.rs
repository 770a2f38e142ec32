//! TraceService contract: the cross-service event trace view.
//!
//! Generated from `proto/ordersaga/trace/v1/trace.proto` by `build.rs`; edit the `.proto`, not
//! this crate.

/// Generated messages, client and server of `ordersaga.trace.v1`.
#[allow(
    unreachable_pub,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("ordersaga.trace.v1");
}

/// Encoded `FileDescriptorSet` of this API and everything it imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/trace_descriptor.bin"));
