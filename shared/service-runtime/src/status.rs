//! Building the statuses services answer with.
//!
//! Errors are mapped to statuses deliberately, once per use case; these
//! helpers make the common shapes uniform: INVALID_ARGUMENT with a
//! `BadRequest` detail naming every bad field, and INTERNAL that logs the
//! whole cause chain but tells the client nothing about the internals.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

/// Bad fields of one request, collected so the client learns about all of
/// them at once.
#[derive(Debug, Default)]
pub struct FieldViolations {
    violations: Vec<FieldViolation>,
}

impl FieldViolations {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that `field` (a path such as `items[2].quantity`) is bad.
    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.violations
            .push(FieldViolation::new(field, description));
    }

    /// The parsed value, or `None` with the parser's reason recorded
    /// against `field`: every edge parse goes through here, so a request
    /// with several bad fields is told about all of them.
    pub fn check<T>(&mut self, field: &str, parsed: Result<T, impl Into<String>>) -> Option<T> {
        parsed.map_err(|reason| self.add(field, reason)).ok()
    }

    pub fn is_empty(&self) -> bool {
        self.violations.is_empty()
    }

    /// `Ok` if nothing was recorded, else INVALID_ARGUMENT naming every field.
    pub fn into_result(self) -> Result<(), Status> {
        if self.violations.is_empty() {
            Ok(())
        } else {
            Err(self.into_status())
        }
    }

    /// INVALID_ARGUMENT naming every recorded field, in the message and in
    /// a `BadRequest` detail.
    pub fn into_status(self) -> Status {
        let message = self
            .violations
            .iter()
            .map(|v| format!("{}: {}", v.field, v.description))
            .collect::<Vec<_>>()
            .join("; ");
        Status::with_error_details(
            Code::InvalidArgument,
            format!("invalid request: {message}"),
            ErrorDetails::with_bad_request(self.violations),
        )
    }
}

/// INVALID_ARGUMENT for one bad field.
pub fn invalid_field(field: impl Into<String>, description: impl Into<String>) -> Status {
    let mut violations = FieldViolations::new();
    violations.add(field, description);
    violations.into_status()
}

/// What a client is told when it sends an idempotency key again with a
/// different request: the key names one request, and the first one stands.
pub const KEY_REUSED: &str = "the idempotency key was used before with a different request";

/// FAILED_PRECONDITION for an idempotency key sent again with a different
/// request (see [`KEY_REUSED`]).
pub fn key_reused() -> Status {
    Status::failed_precondition(KEY_REUSED)
}

/// The parsed value, or INVALID_ARGUMENT naming `field` with the parser's
/// reason: for a request with one field to parse.
pub fn parse_field<T>(field: &str, parsed: Result<T, impl Into<String>>) -> Result<T, Status> {
    parsed.map_err(|reason| invalid_field(field, reason))
}

/// The status for an unexpected failure: UNAVAILABLE when the database was
/// unreachable or every connection busy (retrying later can succeed),
/// INTERNAL otherwise. The cause chain is logged (with the request's
/// correlation id, from the span); the client gets none of it.
pub fn internal(error: &anyhow::Error) -> Status {
    let unavailable = error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_))
        )
    });
    if unavailable {
        return self::unavailable("the database", error);
    }
    tracing::error!(error = format!("{error:#}"), "unexpected failure");
    Status::internal("internal error; the correlation id identifies it in the logs")
}

/// UNAVAILABLE for a dependency that did not answer; safe to retry.
pub fn unavailable(what: &str, error: &anyhow::Error) -> Status {
    tracing::warn!(error = format!("{error:#}"), "{what} unavailable");
    Status::unavailable(format!("{what} is unavailable; retry later"))
}
