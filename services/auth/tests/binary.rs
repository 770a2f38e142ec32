//! The `auth` binary passes the checks every service binary must pass.

use testkit::Binary;

const BINARY: Binary = Binary::new(&auth_service::MANIFEST, env!("CARGO_BIN_EXE_auth"))
    .requiring(&[("AUTH_KEY_ENCRYPTION_KEY", testkit::TEST_KEY_ENCRYPTION_KEY)]);

testkit::contract_tests!(BINARY);

#[test]
fn an_unknown_scope_stops_it_naming_the_setting_and_the_scope_but_not_the_secret() {
    let output = std::process::Command::new(BINARY.path)
        .env_clear()
        .env("DATABASE_URL", "postgres://x@localhost/db")
        .env(
            "AUTH_SERVICE_CLIENTS",
            "saga-orchestrator=a-long-random-client-secret payments:charge payments:chrage",
        )
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("AUTH_SERVICE_CLIENTS"), "{stderr}");
    assert!(stderr.contains("\"payments:chrage\""), "{stderr}");
    assert!(
        stderr.contains("payments:refund"),
        "lists the scopes: {stderr}"
    );
    assert!(!stderr.contains("a-long-random"), "{stderr}");
}
