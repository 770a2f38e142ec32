//! The `saga-orchestrator` binary passes the checks every service binary must pass.

use testkit::{Binary, contract};

const BINARY: Binary = Binary {
    name: saga_orchestrator::NAME,
    path: env!("CARGO_BIN_EXE_saga-orchestrator"),
    schema: saga_orchestrator::SCHEMA,
    role: saga_orchestrator::ROLE,
    services: &[
        "ordersaga.saga.v1.SagaService",
        "ordersaga.trace.v1.TraceService",
    ],
    required_env: &[
        ("SERVICE_CLIENT_ID", "saga-orchestrator"),
        ("SERVICE_CLIENT_SECRET", "a-test-client-secret"),
    ],
};

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
