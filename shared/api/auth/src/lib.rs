//! AuthService contract and the user events.
//!
//! Generated from `proto/ordersaga/auth/v1/auth.proto` by `build.rs`; edit the `.proto`, not
//! this crate.

/// Generated messages, client and server of `ordersaga.auth.v1`.
#[allow(
    unreachable_pub,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("ordersaga.auth.v1");
}

/// Encoded `FileDescriptorSet` of this API and everything it imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/auth_descriptor.bin"));
