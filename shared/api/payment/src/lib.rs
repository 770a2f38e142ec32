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

/// The `ErrorInfo` domain of the payment service's refusals that carry one.
pub const ERROR_DOMAIN: &str = "payment.ordersaga";

/// The `ErrorInfo` reason of RefundPayment's `FAILED_PRECONDITION` for an
/// authorization not captured (yet): nothing was taken, so nothing can be
/// refunded. A caller that knows a capture is coming (a return of a
/// confirmed order, whose saga captures after confirming) waits for it
/// and asks again; any other voids the authorization instead.
pub const NOT_CAPTURED: &str = "PAYMENT_NOT_CAPTURED";
