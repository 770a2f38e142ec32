//! How the sagas' steps call the other services: each call carries the
//! attempt's time left as its deadline and the attempt's id as its request
//! id, and a failed call is classified for the engine.

use saga_engine::{StepContext, StepError};
use tonic::Code;

/// A request with the attempt's time left as its deadline and its id as
/// its request id.
pub(crate) fn request<T>(message: T, context: &StepContext) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(context.time_left);
    // Names this attempt as the cause of the events the call records.
    if let Ok(id) = context.request_id.parse() {
        request
            .metadata_mut()
            .insert(telemetry::causation::REQUEST_ID_HEADER, id);
    }
    request
}

/// What a failed call tells us. A call an open circuit refused was never
/// made, and costs no attempt. A call that timed out, was cancelled, or
/// broke (unavailable, unknown, internal) may have taken effect before its
/// answer was lost: unknown. A service that refused for now (overloaded, a
/// conflict, our token renewing) did nothing: retryable. Anything else is a
/// refusal for certain.
pub(crate) fn classify(status: &tonic::Status) -> StepError {
    let message = format!("{:?}: {}", status.code(), status.message());
    if let Some(retry_after) = service_runtime::client::refused_by_circuit(status) {
        return StepError::NotAttempted {
            reason: message,
            retry_after,
        };
    }
    match status.code() {
        Code::Unavailable
        | Code::DeadlineExceeded
        | Code::Cancelled
        | Code::Internal
        | Code::Unknown
        | Code::DataLoss => StepError::Unknown(message),
        Code::ResourceExhausted | Code::Aborted | Code::Unauthenticated => {
            StepError::Retryable(message)
        }
        _ => StepError::Permanent(message),
    }
}

/// A reason as the services take it: at most 500 characters.
pub(crate) fn reason(text: &str) -> String {
    text.chars().take(500).collect()
}
