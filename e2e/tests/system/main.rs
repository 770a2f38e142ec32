//! The system's end-to-end tests, in one test binary: each module starts
//! the four real service binaries (with a private PostgreSQL and broker)
//! and exercises one area. One binary, not one per area, because each
//! links all four services and linking dominates a clean CI build.

mod access;
mod chaos;
mod dashboard;
mod deployment;
mod hostile_input;
mod observability;
mod operator;
mod order_saga_v2;
mod orders;
mod payments;
mod readme;
mod replicas;
mod retention;
mod sagas;
mod traces;
mod tracing;
mod transport_security;
mod webdriver;
