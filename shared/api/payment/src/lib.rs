//! PaymentService contract and the payment events.
//!
//! Generated from `proto/ordersaga/payment/v1/payment.proto` by `build.rs`; edit the `.proto`, not
//! this crate.

/// Generated messages, client and server of `ordersaga.payment.v1`.
#[allow(
    unreachable_pub,
    missing_debug_implementations,
    unused_qualifications,
    clippy::all,
    clippy::pedantic
)]
pub mod v1 {
    tonic::include_proto!("ordersaga.payment.v1");
}

/// Encoded `FileDescriptorSet` of this API and everything it imports, for
/// server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/payment_descriptor.bin"));
