//! The `saga-orchestrator` binary: settings from the environment, then the service
//! until SIGTERM or SIGINT. Everything else lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let settings: saga_orchestrator::Settings =
        service_runtime::settings::load(saga_orchestrator::DEFAULT_PORT);
    let telemetry = settings.common.telemetry.clone();
    service_runtime::main(saga_orchestrator::NAME, &telemetry, |shutdown| async move {
        saga_orchestrator::Application::build(settings)
            .await?
            .run_until_stopped(shutdown)
            .await
    })
}
