//! The `auth` binary passes the checks every service binary must pass.

use testkit::{Binary, contract};

const BINARY: Binary = Binary::new(&auth_service::MANIFEST, env!("CARGO_BIN_EXE_auth"))
    .requiring(&[("AUTH_KEY_ENCRYPTION_KEY", testkit::TEST_KEY_ENCRYPTION_KEY)]);

#[tokio::test]
async fn health_follows_the_database() {
    contract::health_follows_the_database(BINARY).await.unwrap();
}

#[tokio::test]
async fn reflection_lists_its_services() {
    contract::reflection_lists_its_services(BINARY)
        .await
        .unwrap();
}

#[tokio::test]
async fn sigterm_stops_it_cleanly() {
    contract::sigterm_stops_it_cleanly(BINARY).await.unwrap();
}

#[test]
fn a_bad_setting_stops_it_naming_the_setting() {
    contract::a_bad_setting_stops_it_naming_the_setting(BINARY).unwrap();
}

#[test]
fn help_lists_the_settings() {
    contract::help_lists_the_settings(BINARY).unwrap();
}

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
