/// The base names of the event topics, before the deployment's prefix: what
/// the services' manifests name when they say what they produce and consume.
pub const USER_EVENTS: &str = "user.events";
pub const ORDER_EVENTS: &str = "order.events";
pub const PAYMENT_EVENTS: &str = "payment.events";
pub const SAGA_EVENTS: &str = "saga.events";

/// The topic names of the system, under an optional prefix.
///
/// Each service publishes its events on one topic, keyed by aggregate id.
/// Each consumer group has a dead-letter topic of its own, so an event that
/// one consumer cannot handle does not disturb another's.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// User events (auth service).
    pub fn user_events(&self) -> String {
        self.name(USER_EVENTS)
    }

    /// Order aggregate events (order service).
    pub fn order_events(&self) -> String {
        self.name(ORDER_EVENTS)
    }

    /// Payment events (payment service).
    pub fn payment_events(&self) -> String {
        self.name(PAYMENT_EVENTS)
    }

    /// Saga events (saga orchestrator).
    pub fn saga_events(&self) -> String {
        self.name(SAGA_EVENTS)
    }

    /// Consumer group name for a service's consumer.
    pub fn consumer_group(&self, group: &str) -> String {
        self.name(group)
    }

    /// Dead-letter topic of a consumer group.
    pub fn dead_letter(&self, group: &str) -> String {
        self.name(&format!("{group}.dead-letter"))
    }

    /// The topic `base` (one of the names above, or a test's own) under
    /// this prefix.
    pub fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }
}
