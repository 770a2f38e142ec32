//! The `payment` binary: settings from the environment, then the service
//! until SIGTERM or SIGINT. Everything else lives in the library.

use std::process::ExitCode;

fn main() -> ExitCode {
    let settings: payment_service::Settings =
        service_runtime::settings::load(payment_service::DEFAULT_PORT);
    let telemetry = settings.common.telemetry.clone();
    service_runtime::main(payment_service::NAME, &telemetry, |shutdown| async move {
        payment_service::Application::build(settings)
            .await?
            .run_until_stopped(shutdown)
            .await
    })
}
