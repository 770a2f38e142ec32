//! The cause: what the code running now is handling, so that every event
//! it publishes can name it as its causation id.
//!
//! Two things cause events here. A consumed event causes what its handler
//! publishes: the cause is that event's id (the event consumer opens the
//! scope). A gRPC request causes what its handler publishes: the cause is
//! the request's id, the caller's `x-request-id` metadata if it sent one
//! (1 to 128 visible ASCII characters), else a fresh UUIDv7; the server
//! layer opens the scope, records the id in the request's span and echoes
//! it in the response metadata, so a client can always tell which of its
//! requests caused an event.
//!
//! A request id names one request: unlike the correlation id, it is never
//! passed on to the calls a handler makes. A caller that wants its own
//! call named (the saga names each step attempt) sets `x-request-id` on it.

use std::future::Future;

/// Metadata key of a request's id, on the request and echoed on its answer.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Longest accepted request id; a longer one is replaced, not truncated.
const MAX_LEN: usize = 128;

/// A request id from outside, if it is 1 to 128 visible ASCII characters
/// without spaces (safe in logs, headers and envelopes).
pub fn parse_request_id(value: &str) -> Option<String> {
    let acceptable =
        !value.is_empty() && value.len() <= MAX_LEN && value.bytes().all(|b| b.is_ascii_graphic());
    acceptable.then(|| value.to_owned())
}

/// A fresh request id, for a request that came without one.
pub fn generate_request_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

tokio::task_local! {
    static CURRENT: String;
}

/// Runs `future` with `cause` (an event id or a request id) as what is
/// being handled.
pub async fn scope<F: Future>(cause: String, future: F) -> F::Output {
    CURRENT.scope(cause, future).await
}

/// The id of the event or request being handled, if inside a [`scope`].
pub fn current() -> Option<String> {
    CURRENT.try_with(Clone::clone).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_outside_are_bounded_visible_ascii() {
        assert_eq!(parse_request_id("req-1").as_deref(), Some("req-1"));
        assert_eq!(parse_request_id(""), None);
        assert_eq!(parse_request_id("a b"), None);
        assert_eq!(parse_request_id(&"r".repeat(129)), None);
        assert!(parse_request_id(&generate_request_id()).is_some());
    }

    #[tokio::test]
    async fn the_cause_is_the_innermost_scope() {
        assert_eq!(current(), None);
        let seen = scope("event-1".to_owned(), async {
            let inner = scope("request-2".to_owned(), async { current() }).await;
            (current(), inner)
        })
        .await;
        assert_eq!(
            seen,
            (Some("event-1".to_owned()), Some("request-2".to_owned()))
        );
    }
}
