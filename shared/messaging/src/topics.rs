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
        self.name("user.events")
    }

    /// Order aggregate events (order service).
    pub fn order_events(&self) -> String {
        self.name("order.events")
    }

    /// Payment events (payment service).
    pub fn payment_events(&self) -> String {
        self.name("payment.events")
    }

    /// Saga events (saga orchestrator).
    pub fn saga_events(&self) -> String {
        self.name("saga.events")
    }

    /// Consumer group name for a service's consumer.
    pub fn consumer_group(&self, group: &str) -> String {
        self.name(group)
    }

    /// Dead-letter topic of a consumer group.
    pub fn dead_letter(&self, group: &str) -> String {
        self.name(&format!("{group}.dead-letter"))
    }

    /// Every topic the system uses, given the consumer groups that exist:
    /// what deployment creates before the services start.
    pub fn all(&self, consumer_groups: &[&str]) -> Vec<String> {
        let mut topics = vec![
            self.user_events(),
            self.order_events(),
            self.payment_events(),
            self.saga_events(),
        ];
        topics.extend(consumer_groups.iter().map(|group| self.dead_letter(group)));
        topics
    }

    fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }
}
