//! The order aggregate: pure, synchronous, no I/O.
//!
//! `decide(&order, command) -> Result<events, DomainError>` says what a
//! command means for an order in its current state; `evolve(order, event)`
//! says what an order becomes after an event. Everything an order needs to
//! decide comes in the command; nothing is looked up.

mod order;
mod values;

pub use order::{DomainError, Order, OrderCommand, OrderEvent, OrderStatus, Placed};
pub use values::{
    CustomerId, LineItem, LinesError, OrderId, OrderLines, PaymentId, PaymentMethodToken, Quantity,
    Reason, Sku,
};
