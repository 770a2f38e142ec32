//! The whole system in a test: the four real service binaries, started on
//! free ports against the run's PostgreSQL and broker, with a fresh database
//! and topic prefix per test.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use dev_stack::{ServiceProcess, ServingStatus};
use testkit::{Binary, Scenario};
use tokio::sync::OnceCell;

/// The four binaries, in start order.
pub const BINARIES: [Binary; 4] = [
    Binary {
        name: auth_service::NAME,
        path: "",
        schema: auth_service::SCHEMA,
        role: auth_service::ROLE,
        services: &["ordersaga.auth.v1.AuthService"],
    },
    Binary {
        name: order_service::NAME,
        path: "",
        schema: order_service::SCHEMA,
        role: order_service::ROLE,
        services: &["ordersaga.order.v1.OrderService"],
    },
    Binary {
        name: payment_service::NAME,
        path: "",
        schema: payment_service::SCHEMA,
        role: payment_service::ROLE,
        services: &["ordersaga.payment.v1.PaymentService"],
    },
    Binary {
        name: saga_orchestrator::NAME,
        path: "",
        schema: saga_orchestrator::SCHEMA,
        role: saga_orchestrator::ROLE,
        services: &[
            "ordersaga.saga.v1.SagaService",
            "ordersaga.trace.v1.TraceService",
        ],
    },
];

/// The running system.
#[derive(Debug)]
pub struct Stack {
    pub scenario: Scenario,
    /// In the order of [`BINARIES`].
    pub services: Vec<ServiceProcess>,
}

impl Stack {
    /// Builds the binaries if needed, then starts all four and waits until
    /// each reports SERVING.
    pub async fn start() -> anyhow::Result<Self> {
        let folder = binaries_folder().await?;
        let scenario = Scenario::new().await?;
        let mut services = Vec::new();
        for binary in BINARIES {
            let url = scenario.database.provision(&binary.account()).await?;
            let env = scenario.service_env(&url);
            let mut process =
                ServiceProcess::start(binary.name, &folder.join(binary.name), env).await?;
            process
                .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
                .await?;
            services.push(process);
        }
        Ok(Self { scenario, services })
    }

    /// The running service named `name`.
    pub fn service(&self, name: &str) -> &ServiceProcess {
        let index = BINARIES
            .iter()
            .position(|b| b.name == name)
            .expect("a known service");
        &self.services[index]
    }

    /// Port of `name`'s gRPC server.
    pub fn port(&self, name: &str) -> u16 {
        self.service(name).address().port()
    }
}

/// The folder holding the built service binaries (next to this test's own
/// binary), building them once per test process: integration tests of one
/// package cannot name another package's binaries.
async fn binaries_folder() -> anyhow::Result<&'static PathBuf> {
    static FOLDER: OnceCell<PathBuf> = OnceCell::const_new();
    FOLDER
        .get_or_try_init(|| async {
            let exe = std::env::current_exe()?;
            // target/<profile>/deps/<test> -> target/<profile>
            let folder = exe
                .ancestors()
                .nth(2)
                .context("test binary location")?
                .to_owned();
            // The same command `cargo xtask test` runs before the tests, so
            // here it finds everything built.
            let mut build = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
            build.args(["build", "--quiet", "--workspace", "--bins"]);

            if folder.file_name().is_some_and(|name| name == "release") {
                build.arg("--release");
            }
            let status = build
                .current_dir(dev_stack::tools::workspace_root())
                .status()?;
            if !status.success() {
                bail!("building the service binaries failed");
            }
            Ok(folder)
        })
        .await
}
