//! The `payment` binary passes the checks every service binary must pass.

use testkit::Binary;

const BINARY: Binary = Binary::new(&payment_service::MANIFEST, env!("CARGO_BIN_EXE_payment"));

testkit::contract_tests!(BINARY);
