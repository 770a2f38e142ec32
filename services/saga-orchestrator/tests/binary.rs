//! The `saga-orchestrator` binary passes the checks every service binary must pass.

use testkit::Binary;

const BINARY: Binary = Binary::new(
    &saga_orchestrator::MANIFEST,
    env!("CARGO_BIN_EXE_saga-orchestrator"),
)
.requiring(&[
    ("SERVICE_CLIENT_ID", "saga-orchestrator"),
    ("SERVICE_CLIENT_SECRET", "a-test-client-secret"),
]);

testkit::contract_tests!(BINARY);
