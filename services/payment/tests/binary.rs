//! The `payment` binary passes the checks every service binary must pass.

use testkit::{Binary, contract};

const BINARY: Binary = Binary::new(&payment_service::MANIFEST, env!("CARGO_BIN_EXE_payment"));

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
