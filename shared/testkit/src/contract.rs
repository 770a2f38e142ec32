//! The checks every service binary must pass, run by each service's
//! `tests/binary.rs` against its own binary ([`contract_tests!`]).

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail, ensure};
use dev_stack::{FaultProxy, ServingStatus, tools};

use crate::{Binary, Scenario, ServiceUnderTest};

/// Health reports NOT_SERVING while the database is unreachable and
/// SERVING again once it is back, for the whole server and each service;
/// liveness stays SERVING throughout.
pub async fn health_follows_the_database(binary: Binary) -> anyhow::Result<()> {
    let scenario = Scenario::new(&[binary.manifest]).await?;
    let url = scenario.database.provision(&binary.account()).await?;
    let proxy = FaultProxy::start(scenario.database.address()).await?;
    let proxied_url = url.replace(
        &scenario.database.address().to_string(),
        &proxy.address().to_string(),
    );
    let mut service =
        ServiceUnderTest::start_with_database_url(&scenario, binary, &proxied_url, &[]).await?;
    let process = &mut service.process;
    for name in binary.manifest.grpc_services {
        process
            .wait_for_health(name, ServingStatus::Serving, Duration::from_secs(10))
            .await?;
    }

    proxy.cut();
    process
        .wait_for_health("", ServingStatus::NotServing, Duration::from_secs(10))
        .await?;
    for name in binary.manifest.grpc_services {
        process
            .wait_for_health(name, ServingStatus::NotServing, Duration::from_secs(10))
            .await?;
    }
    // Unready, yet alive: a liveness probe must not restart it for this.
    ensure!(
        process.health(service_runtime::LIVENESS).await? == ServingStatus::Serving,
        "liveness must stay SERVING while the database is away"
    );

    proxy.restore();
    process
        .wait_for_health("", ServingStatus::Serving, Duration::from_secs(15))
        .await?;
    for name in binary.manifest.grpc_services {
        process
            .wait_for_health(name, ServingStatus::Serving, Duration::from_secs(10))
            .await?;
    }
    Ok(())
}

/// `grpcurl list` (which speaks reflection v1alpha) shows the binary's
/// services, health and reflection, and `grpcurl` can call the health
/// check without any .proto file.
pub async fn reflection_lists_its_services(binary: Binary) -> anyhow::Result<()> {
    let scenario = Scenario::new(&[binary.manifest]).await?;
    let service = ServiceUnderTest::start(&scenario, binary, &[]).await?;
    let address = service.process.address().to_string();

    let listed = grpcurl(&["-plaintext", &address, "list"])?;
    let mut expected: Vec<&str> = binary.manifest.grpc_services.to_vec();
    expected.extend([
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    ]);
    for name in expected {
        ensure!(
            listed.lines().any(|line| line == name),
            "`grpcurl list` lacks {name}:\n{listed}"
        );
    }
    for name in binary.manifest.grpc_services {
        let described = grpcurl(&["-plaintext", &address, "describe", name])?;
        ensure!(
            described.contains("rpc "),
            "`grpcurl describe {name}` shows no RPCs:\n{described}"
        );
    }
    let health = grpcurl(&["-plaintext", &address, "grpc.health.v1.Health/Check"])?;
    ensure!(health.contains("SERVING"), "health check said:\n{health}");
    Ok(())
}

/// A bad or missing setting stops the binary at once with status 2 and a
/// message naming the environment variable.
pub fn a_bad_setting_stops_it_naming_the_setting(binary: Binary) -> anyhow::Result<()> {
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("DATABASE_URL", "postgres://x@localhost/db"),
                ("GRPC_ADDR", "not-an-address"),
            ],
            "GRPC_ADDR",
        ),
        (
            &[("DATABASE_URL", "mysql://x@localhost/db")],
            "DATABASE_URL",
        ),
        (&[], "DATABASE_URL"),
    ];
    for (env, named) in cases {
        let output = Command::new(binary.path)
            .env_clear()
            .envs(binary.required_env.iter().copied())
            .envs(env.iter().copied())
            .output()
            .with_context(|| format!("running {}", binary.path))?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            output.status.code() == Some(2),
            "{env:?}: exit status {:?}, stderr:\n{stderr}",
            output.status
        );
        ensure!(
            stderr.contains(named),
            "{env:?}: stderr does not name {named}:\n{stderr}"
        );
    }
    Ok(())
}

/// `--help` lists every setting with its environment variable.
pub fn help_lists_the_settings(binary: Binary) -> anyhow::Result<()> {
    let output = Command::new(binary.path)
        .arg("--help")
        .env_clear()
        .output()?;
    ensure!(output.status.success(), "--help failed");
    let help = String::from_utf8_lossy(&output.stdout);
    for variable in [
        "GRPC_ADDR",
        "DATABASE_URL",
        "KAFKA_BROKERS",
        "LOG_FORMAT",
        "OTEL_EXPORTER_OTLP_ENDPOINT",
    ] {
        ensure!(
            help.contains(&format!("[env: {variable}")),
            "--help does not list {variable}:\n{help}"
        );
    }
    Ok(())
}

/// SIGTERM makes the binary stop serving, finish, and exit 0.
pub async fn sigterm_stops_it_cleanly(binary: Binary) -> anyhow::Result<()> {
    let scenario = Scenario::new(&[binary.manifest]).await?;
    let mut service = ServiceUnderTest::start(&scenario, binary, &[]).await?;
    let code = service.process.stop(Duration::from_secs(20)).await?;

    let logs = service.process.logs();
    ensure!(code == Some(0), "exit code {code:?}; log:\n{logs}");
    ensure!(
        logs.contains("shutdown signal received") && logs.contains("stopped cleanly"),
        "log:\n{logs}"
    );
    Ok(())
}

/// The tests of the checks above, for `$binary` (a [`Binary`] constant):
/// a service's `tests/binary.rs` is its `Binary` and this line, so every
/// binary runs every check under the same names.
#[macro_export]
macro_rules! contract_tests {
    ($binary:expr) => {
        #[tokio::test]
        async fn health_follows_the_database() {
            $crate::contract::health_follows_the_database($binary)
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn reflection_lists_its_services() {
            $crate::contract::reflection_lists_its_services($binary)
                .await
                .unwrap();
        }

        #[tokio::test]
        async fn sigterm_stops_it_cleanly() {
            $crate::contract::sigterm_stops_it_cleanly($binary)
                .await
                .unwrap();
        }

        #[test]
        fn a_bad_setting_stops_it_naming_the_setting() {
            $crate::contract::a_bad_setting_stops_it_naming_the_setting($binary).unwrap();
        }

        #[test]
        fn help_lists_the_settings() {
            $crate::contract::help_lists_the_settings($binary).unwrap();
        }
    };
}

fn grpcurl(args: &[&str]) -> anyhow::Result<String> {
    let output = Command::new(tools::grpcurl()?)
        .args(args)
        .output()
        .context("running grpcurl")?;
    if !output.status.success() {
        bail!(
            "grpcurl {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}
