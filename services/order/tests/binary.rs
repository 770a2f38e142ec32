//! The `order` binary passes the checks every service binary must pass.

use testkit::Binary;

const BINARY: Binary = Binary::new(&order_service::MANIFEST, env!("CARGO_BIN_EXE_order"));

testkit::contract_tests!(BINARY);
