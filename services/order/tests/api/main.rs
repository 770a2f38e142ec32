//! The order binary through its gRPC API, against a real PostgreSQL and
//! broker, with a stand-in for the auth service.
//!
//! - `review`: a large order held for review, approved or declined by an
//!   admin, and cancelled by its customer meanwhile.
//! - `returns`: a confirmed order's return, asked for and marked done.
//! - `support`: the running service, its tokens and what its tests inspect.

mod returns;
mod review;
mod support;
