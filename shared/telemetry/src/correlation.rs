//! The correlation id: one id for every request and event of one business
//! flow, from the first gRPC call to the last event it causes.
//!
//! A client may send one in `x-correlation-id`; otherwise the first service
//! makes one. Inside a service the current id lives in a task-local
//! [`scope`], which the gRPC server layer and the event consumer open, and
//! which outgoing calls and outbox writes read with [`current`].

use std::fmt;
use std::future::Future;

/// Metadata key and Kafka header name of the correlation id.
pub const HEADER: &str = "x-correlation-id";

/// Longest accepted correlation id; longer ones are replaced, not truncated.
const MAX_LEN: usize = 128;

/// An opaque id shared by every request and event of one flow.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct CorrelationId(String);

impl CorrelationId {
    /// A fresh id (a random UUID).
    pub fn generate() -> Self {
        Self(uuid::Uuid::new_v4().to_string())
    }

    /// Accepts an id from outside if it is 1 to 128 visible ASCII
    /// characters without spaces, so it is safe in logs and headers.
    pub fn parse(value: &str) -> Option<Self> {
        let acceptable = !value.is_empty()
            && value.len() <= MAX_LEN
            && value.bytes().all(|b| b.is_ascii_graphic());
        acceptable.then(|| Self(value.to_owned()))
    }

    /// The id sent by a client, or a fresh one when it sent none or an
    /// unacceptable one.
    pub fn from_header_or_generate(value: Option<&str>) -> Self {
        value.and_then(Self::parse).unwrap_or_else(Self::generate)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for CorrelationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CorrelationId({})", self.0)
    }
}

tokio::task_local! {
    static CURRENT: CorrelationId;
}

/// Runs `future` with `id` as the current correlation id.
pub async fn scope<F: Future>(id: CorrelationId, future: F) -> F::Output {
    CURRENT.scope(id, future).await
}

/// The correlation id of the flow being handled, if inside a [`scope`].
pub fn current() -> Option<CorrelationId> {
    CURRENT.try_with(Clone::clone).ok()
}
