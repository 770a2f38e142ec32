//! The `auth` binary: settings from the environment, then the service
//! until SIGTERM or SIGINT. Everything else lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let settings: auth_service::Settings =
        service_runtime::settings::load(auth_service::DEFAULT_PORT);
    let telemetry = settings.common.telemetry.clone();
    service_runtime::main(auth_service::NAME, &telemetry, |shutdown| async move {
        auth_service::Application::build(settings)
            .await?
            .run_until_stopped(shutdown)
            .await
    })
}
