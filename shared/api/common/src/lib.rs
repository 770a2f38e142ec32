//! Shared protobuf types: `Money`.
//!
//! Generated from `proto/ordersaga/common/v1/money.proto` by `build.rs`; edit the `.proto`, not
//! this crate.

/// Generated messages of `ordersaga.common.v1`.
#[allow(
    unreachable_pub,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("ordersaga.common.v1");
}

/// Encoded `FileDescriptorSet` of this API and everything it imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/common_descriptor.bin"));
