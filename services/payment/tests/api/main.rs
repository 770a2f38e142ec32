//! The payment binary through its gRPC API, against a real PostgreSQL and
//! broker, with a stand-in for the auth service: what no provider, however
//! slow, and no race may break.
//!
//! - `authorizations`: an authorization holds once per key, is captured
//!   once, voided or lapses, and the provider's holdings show the money.
//! - `load`: slow payments in flight do not hold up anyone else's.
//! - `races`: racing duplicates, voids and refunds of one key charge at
//!   most once and refund once.
//! - `retention`: purged claims and provider keys never let a key charge
//!   twice.
//! - `validation`: every string field of every RPC is checked at the edge.
//! - `support`: the running service, its tokens and what its tests inspect.

mod authorizations;
mod load;
mod races;
mod retention;
mod support;
mod validation;
