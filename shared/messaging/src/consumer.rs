//! The idempotent consumer.
//!
//! For each record: open the envelope, then in one transaction insert the
//! event id into the inbox and let the handler apply the event. A
//! redelivered event finds its inbox row and has no second effect. A handler
//! failure is retried with backoff; an event that fails for good (a
//! permanent error, or transient errors past the retry budget) is published
//! to the group's dead-letter topic with its error, recorded as such, and
//! the consumer moves on. Infrastructure failures (the database is down) are
//! not the event's fault: they are retried for as long as it takes, without
//! spending the event's budget.
//!
//! Records are handled in arrival order, which keeps each aggregate's
//! events (one key, one partition) in order. Whatever has already arrived
//! when the consumer looks (up to [`MAX_BATCH`] records) is applied in one
//! transaction, so a backlog costs one commit per batch, not per event; if
//! any record of a batch fails, the batch is rolled back and its records
//! are handled one at a time, each with its own retries.
//!
//! A handler whose every effect is keyed by the event id (a projection
//! that inserts one row per event and ignores a row it already has) says
//! so with [`EventHandler::KEYED_BY_EVENT_ID`]: a redelivery is harmless,
//! so its events get no inbox row, and a batch goes to
//! [`EventHandler::handle_batch`] at once, for one statement per batch.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use futures::FutureExt as _;
use prost::Message as _;
use rdkafka::Message as _;
use rdkafka::consumer::{CommitMode, Consumer as _, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers as _};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use sqlx::{PgConnection, PgPool};
use telemetry::CorrelationId;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::backoff::Backoff;
use crate::{EventEnvelope, KafkaSettings, Topics, kafka};

/// The most records applied in one transaction.
pub const MAX_BATCH: usize = 256;

/// An event as handed to an [`EventHandler`].
#[derive(Debug, Clone)]
pub struct ReceivedEvent {
    pub envelope: EventEnvelope,
    pub event_id: Uuid,
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// The flow the event belongs to (from the envelope).
    pub correlation: CorrelationId,
}

/// Why a handler did not apply an event.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Might succeed if tried again (a dependency was busy or down).
    #[error("{0:#}")]
    Transient(anyhow::Error),
    /// Will never succeed (the event is malformed or makes no sense here):
    /// dead-lettered without retrying.
    #[error("{0:#}")]
    Permanent(anyhow::Error),
}

/// Applies events of the topics a [`Consumer`] reads.
///
/// All of a handler's effects must live in the transaction it is given: an
/// event whose batch is rolled back is handed to it again.
pub trait EventHandler: Send + Sync + 'static {
    /// Whether applying an event twice has no second effect by itself,
    /// because every effect is keyed by the event id: then the consumer
    /// records no inbox row for it.
    const KEYED_BY_EVENT_ID: bool = false;

    /// Whether the handler acts on events like this one at all. Events it
    /// ignores are passed over without an inbox row. By default, all.
    fn wants(&self, envelope: &EventEnvelope) -> bool {
        let _ = envelope;
        true
    }

    /// Applies `event` using `conn`, which is inside the transaction that
    /// also records the event in the inbox: both commit or neither does.
    fn handle(
        &self,
        conn: &mut PgConnection,
        event: &ReceivedEvent,
    ) -> impl Future<Output = Result<(), HandleError>> + Send;

    /// Called once the transaction that took `events` has committed (those
    /// it passed over as duplicates or unwanted included), for work that may
    /// begin only when their effects are visible to others. Events of a
    /// transaction that rolled back are applied again later, or
    /// dead-lettered; this is not called for them then.
    fn committed(&self, events: &[&ReceivedEvent]) {
        let _ = events;
    }

    /// Applies `events`, in order, in one transaction (for a handler keyed
    /// by the event id). By default, one at a time.
    fn handle_batch(
        &self,
        conn: &mut PgConnection,
        events: &[ReceivedEvent],
    ) -> impl Future<Output = Result<(), HandleError>> + Send {
        async move {
            for event in events {
                self.handle(conn, event).await?;
            }
            Ok(())
        }
    }
}

/// How often a failing event is tried before it is dead-lettered.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(5),
        }
    }
}

/// A consumer group member applying events with an [`EventHandler`]; see
/// the module documentation.
pub struct Consumer<H> {
    group: String,
    dead_letter_topic: String,
    kafka: StreamConsumer<kafka::LagReporter>,
    producer: FutureProducer,
    pool: PgPool,
    handler: Arc<H>,
    retry: RetryPolicy,
}

impl<H> std::fmt::Debug for Consumer<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

/// The purge of inbox rows older than `retention` (by when they were
/// processed), for every consumer of the schema.
///
/// An inbox row is what makes a redelivered event do nothing, so it must
/// outlive every redelivery: keep `retention` longer than the topics keep
/// their records (a consumer group reset to the earliest offset replays
/// whatever the broker still has).
pub fn inbox_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "inbox",
        retention,
        // Oldest first through `inbox_processed_at`.
        statement: "DELETE FROM inbox WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM inbox WHERE processed_at < now() - $1
                        ORDER BY processed_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

/// Outcome of one event, as recorded in the inbox.
enum Outcome {
    Handled,
    Duplicate,
    /// The handler does not act on events of this kind.
    Ignored,
    Failed {
        error: String,
        attempts: u32,
    },
}

impl<H: EventHandler> Consumer<H> {
    /// Joins consumer group `group` (prefixed like the topics) and
    /// subscribes to `topics`.
    pub fn new(
        settings: &KafkaSettings,
        group: &str,
        topics: &[String],
        pool: PgPool,
        producer: FutureProducer,
        handler: H,
    ) -> anyhow::Result<Self> {
        let names = Topics::new(settings.topic_prefix.clone());
        let group_id = names.consumer_group(group);
        let lag = kafka::LagReporter {
            group: group_id.clone(),
        };
        let kafka: StreamConsumer<kafka::LagReporter> =
            kafka::consumer_config(settings, &group_id, &group_id)?
                .create_with_context(lag)
                .context("creating the Kafka consumer")?;
        let topic_refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        kafka.subscribe(&topic_refs).context("subscribing")?;
        Ok(Self {
            group: group_id,
            dead_letter_topic: names.dead_letter(group),
            kafka,
            producer,
            pool,
            handler: Arc::new(handler),
            retry: RetryPolicy::default(),
        })
    }

    /// Replaces the default retry policy.
    pub fn with_retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    /// Consumes until `shutdown`, then commits the offsets of what it
    /// finished and leaves the group.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::default();
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => break,
                message = self.kafka.recv() => message,
            };
            match message {
                Ok(message) => {
                    backoff.reset();
                    // Records that have arrived meanwhile join this one,
                    // without waiting for more.
                    let mut batch = vec![message];
                    while batch.len() < MAX_BATCH {
                        match self.kafka.recv().now_or_never() {
                            Some(Ok(message)) => batch.push(message),
                            Some(Err(error)) => {
                                tracing::warn!(%error, group = %self.group, "Kafka consumer error");
                                break;
                            }
                            None => break,
                        }
                    }
                    let done = self.process_batch(&batch, &shutdown).await;
                    for message in &batch[..done] {
                        if let Err(error) = self.kafka.store_offset_from_message(message) {
                            tracing::warn!(%error, "could not store the consumer offset");
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, group = %self.group, "Kafka consumer error");
                    backoff.wait(&shutdown).await;
                }
            }
        }
        if let Err(error) = self.kafka.commit_consumer_state(CommitMode::Sync) {
            // Nothing stored since the last commit, or the broker is gone:
            // either way, redelivery is safe.
            tracing::debug!(%error, "final offset commit");
        }
        tracing::debug!(group = %self.group, "consumer stopped");
    }

    /// Handles `batch` in order; returns how many of its records, from the
    /// first, are done (the rest, interrupted by shutdown, come again).
    async fn process_batch(
        &self,
        batch: &[BorrowedMessage<'_>],
        shutdown: &CancellationToken,
    ) -> usize {
        if batch.len() > 1 && self.apply_all_at_once(batch).await {
            return batch.len();
        }
        for (done, message) in batch.iter().enumerate() {
            if !self.process(message, shutdown).await {
                return done;
            }
        }
        batch.len()
    }

    /// The fast path: every record of `batch` applied in one transaction.
    /// False, with nothing applied, if a record is undecodable, a handler
    /// fails or the transaction does: then each record goes the slow way.
    async fn apply_all_at_once(&self, batch: &[BorrowedMessage<'_>]) -> bool {
        let mut events = Vec::with_capacity(batch.len());
        for message in batch {
            let Ok(event) = decode(message) else {
                return false;
            };
            let span = self.span_for(message);
            record_event(&span, &event);
            events.push((span, event));
        }
        let Ok(mut tx) = self.pool.begin().await else {
            return false;
        };
        if H::KEYED_BY_EVENT_ID {
            let events: Vec<ReceivedEvent> = events.into_iter().map(|(_, event)| event).collect();
            if self.handler.handle_batch(&mut tx, &events).await.is_err()
                || tx.commit().await.is_err()
            {
                tracing::debug!(size = batch.len(), "the batch failed; one at a time");
                return false;
            }
            self.handler.committed(&events.iter().collect::<Vec<_>>());
            metrics::counter!("events_consumed_total", "group" => self.group.clone(), "outcome" => "handled")
                .increment(events.len() as u64);
            return true;
        }
        let mut outcomes = Vec::with_capacity(events.len());
        for (span, event) in &events {
            let apply = self.apply_in(&mut tx, event).instrument(span.clone());
            match in_scope(event, apply).await {
                Ok(outcome) => outcomes.push(outcome),
                Err(_) => {
                    tracing::debug!(
                        size = batch.len(),
                        "a record of the batch failed; one at a time"
                    );
                    return false;
                }
            }
        }
        if tx.commit().await.is_err() {
            return false;
        }
        self.handler
            .committed(&events.iter().map(|(_, event)| event).collect::<Vec<_>>());
        for outcome in outcomes {
            let outcome = match outcome {
                Outcome::Duplicate => "duplicate",
                Outcome::Ignored => "ignored",
                _ => "handled",
            };
            metrics::counter!("events_consumed_total", "group" => self.group.clone(), "outcome" => outcome)
                .increment(1);
        }
        true
    }

    /// The span of processing `message`, a child of the span that produced
    /// it (from its `traceparent` header).
    fn span_for(&self, message: &BorrowedMessage<'_>) -> tracing::Span {
        let headers: Vec<(String, String)> = message
            .headers()
            .map(|headers| {
                headers
                    .iter()
                    .filter_map(|h| {
                        Some((h.key.to_owned(), String::from_utf8(h.value?.to_vec()).ok()?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let received =
            telemetry::propagation::extract(headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let span = tracing::info_span!(
            "consumer.process",
            otel.name = format!("{} process", message.topic()),
            otel.kind = "consumer",
            messaging.system = "kafka",
            messaging.operation.type = "process",
            messaging.destination.name = message.topic(),
            messaging.consumer.group.name = %self.group,
            messaging.kafka.offset = message.offset(),
            messaging.message.id = tracing::field::Empty,
            correlation_id = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::propagation::adopt_parent(&span, received.context);
        span
    }

    /// Handles one record; returns false when shutdown interrupted it (the
    /// record will be delivered again).
    async fn process(&self, message: &BorrowedMessage<'_>, shutdown: &CancellationToken) -> bool {
        let span = self.span_for(message);
        let event = match decode(message) {
            Ok(event) => event,
            Err(error) => {
                // Not even an envelope: nothing to deduplicate on, straight
                // to the dead-letter topic.
                let error = format!("{error:#}");
                tracing::error!(parent: &span, %error, "undecodable record");
                metrics::counter!("events_consumed_total", "group" => self.group.clone(), "outcome" => "dead_lettered")
                    .increment(1);
                return self
                    .dead_letter(message, &error, 1, shutdown)
                    .instrument(span)
                    .await;
            }
        };
        record_event(&span, &event);
        let count = |outcome: &'static str| {
            metrics::counter!("events_consumed_total", "group" => self.group.clone(), "outcome" => outcome).increment(1);
        };
        let work = async {
            match self.apply_with_retries(&event, shutdown).await {
                None => false,
                Some(Outcome::Handled) => {
                    count("handled");
                    true
                }
                Some(Outcome::Duplicate) => {
                    count("duplicate");
                    true
                }
                Some(Outcome::Ignored) => {
                    count("ignored");
                    true
                }
                Some(Outcome::Failed { error, attempts }) => {
                    tracing::error!(%error, attempts, "event failed for good; dead-lettering it");
                    count("dead_lettered");
                    self.dead_letter(message, &error, attempts, shutdown).await
                        && self.record_dead_lettered(&event, shutdown).await
                }
            }
        };
        in_scope(&event, work.instrument(span)).await
    }

    /// Applies the event until it succeeds, turns out to be a duplicate, or
    /// fails for good; `None` if shutdown came first.
    async fn apply_with_retries(
        &self,
        event: &ReceivedEvent,
        shutdown: &CancellationToken,
    ) -> Option<Outcome> {
        let mut attempts = 0;
        let mut handler_backoff = self.retry.initial_backoff;
        let mut infrastructure_backoff = Backoff::default();
        loop {
            if shutdown.is_cancelled() {
                return None;
            }
            match self.apply_once(event).await {
                Ok(outcome) => return Some(outcome),
                Err(Failure::Infrastructure(error)) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "database unavailable; will retry the event"
                    );
                    infrastructure_backoff.wait(shutdown).await;
                }
                Err(Failure::Handler(HandleError::Permanent(error))) => {
                    return Some(Outcome::Failed {
                        error: format!("{error:#}"),
                        attempts: attempts + 1,
                    });
                }
                Err(Failure::Handler(HandleError::Transient(error))) => {
                    attempts += 1;
                    if attempts >= self.retry.max_attempts {
                        return Some(Outcome::Failed {
                            error: format!("{error:#}"),
                            attempts,
                        });
                    }
                    tracing::warn!(
                        error = format!("{error:#}"),
                        attempts,
                        "event failed; will retry"
                    );
                    tokio::select! {
                        () = shutdown.cancelled() => return None,
                        () = tokio::time::sleep(jitter(handler_backoff)) => {}
                    }
                    handler_backoff = (handler_backoff * 2).min(self.retry.max_backoff);
                }
            }
        }
    }

    async fn apply_once(&self, event: &ReceivedEvent) -> Result<Outcome, Failure> {
        let mut tx = self.pool.begin().await.map_err(infrastructure)?;
        let outcome = self.apply_in(&mut tx, event).await?;
        tx.commit().await.map_err(infrastructure)?;
        self.handler.committed(&[event]);
        Ok(outcome)
    }

    /// Records `event` in the inbox and applies it, inside the caller's
    /// transaction: a duplicate is recognised and skipped. (A handler keyed
    /// by the event id recognises duplicates itself.)
    async fn apply_in(
        &self,
        conn: &mut PgConnection,
        event: &ReceivedEvent,
    ) -> Result<Outcome, Failure> {
        if !self.handler.wants(&event.envelope) {
            return Ok(Outcome::Ignored);
        }
        let first_time = H::KEYED_BY_EVENT_ID
            || sqlx::query(
            "INSERT INTO inbox (consumer, event_id, outcome) VALUES ($1, $2, 'handled') ON CONFLICT DO NOTHING",
        )
        .bind(&self.group)
        .bind(event.event_id)
        .execute(&mut *conn)
        .await
        .map_err(infrastructure)?
        .rows_affected()
            == 1;
        if !first_time {
            tracing::debug!("duplicate delivery; already handled");
            return Ok(Outcome::Duplicate);
        }
        if let Err(error) = self.handler.handle(conn, event).await {
            // A handler whose queries failed because the database went away
            // is not at fault.
            return Err(match &error {
                HandleError::Transient(cause) | HandleError::Permanent(cause)
                    if is_connection_error(cause) =>
                {
                    Failure::Infrastructure(error.into())
                }
                _ => Failure::Handler(error),
            });
        }
        Ok(Outcome::Handled)
    }

    /// Publishes the record unchanged to the dead-letter topic, with the
    /// error and where it came from in headers. Retries until the broker
    /// takes it; false if shutdown came first.
    async fn dead_letter(
        &self,
        message: &BorrowedMessage<'_>,
        error: &str,
        attempts: u32,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut headers = message.headers().map(|h| h.detach()).unwrap_or_default();
        let source = format!(
            "{}/{}/{}",
            message.topic(),
            message.partition(),
            message.offset()
        );
        let attempts = attempts.to_string();
        for (key, value) in [
            ("dead-letter-error", error),
            ("dead-letter-consumer", self.group.as_str()),
            ("dead-letter-source", source.as_str()),
            ("dead-letter-attempts", attempts.as_str()),
        ] {
            headers = headers.insert(Header {
                key,
                value: Some(value.as_bytes()),
            });
        }
        let mut backoff = Backoff::default();
        loop {
            let mut record = FutureRecord::to(&self.dead_letter_topic).headers(headers.clone());
            if let Some(key) = message.key() {
                record = record.key(key);
            }
            if let Some(payload) = message.payload() {
                record = record.payload(payload);
            }
            match self.producer.send(record, Timeout::Never).await {
                Ok(_) => return true,
                Err((error, _)) => {
                    tracing::warn!(%error, topic = %self.dead_letter_topic, "could not dead-letter; will retry");
                    backoff.wait(shutdown).await;
                    if shutdown.is_cancelled() {
                        return false;
                    }
                }
            }
        }
    }

    /// Records that the event went to the dead-letter topic, so a
    /// redelivery does not try it (and dead-letter it) again.
    async fn record_dead_lettered(
        &self,
        event: &ReceivedEvent,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut backoff = Backoff::default();
        loop {
            let recorded = sqlx::query(
                "INSERT INTO inbox (consumer, event_id, outcome) VALUES ($1, $2, 'dead_lettered')
                 ON CONFLICT DO NOTHING",
            )
            .bind(&self.group)
            .bind(event.event_id)
            .execute(&self.pool)
            .await;
            match recorded {
                Ok(_) => return true,
                Err(error) => {
                    tracing::warn!(%error, "could not record a dead-lettered event; will retry");
                    backoff.wait(shutdown).await;
                    if shutdown.is_cancelled() {
                        return false;
                    }
                }
            }
        }
    }
}

enum Failure {
    /// The database was unreachable: retry without limit.
    Infrastructure(anyhow::Error),
    /// The handler refused or failed.
    Handler(HandleError),
}

fn infrastructure(error: sqlx::Error) -> Failure {
    Failure::Infrastructure(error.into())
}

/// Whether an error comes from losing the database rather than from the
/// statement itself.
fn is_connection_error(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<sqlx::Error>(),
            Some(
                sqlx::Error::Io(_)
                    | sqlx::Error::PoolTimedOut
                    | sqlx::Error::PoolClosed
                    | sqlx::Error::Protocol(_)
            )
        )
    })
}

/// Runs `work` as the handling of `event`: in its flow (correlation id),
/// and as the cause of whatever it publishes (causation id).
async fn in_scope<F: Future>(event: &ReceivedEvent, work: F) -> F::Output {
    telemetry::correlation::scope(
        event.correlation.clone(),
        telemetry::causation::scope(event.envelope.event_id.clone(), work),
    )
    .await
}

fn decode(message: &BorrowedMessage<'_>) -> anyhow::Result<ReceivedEvent> {
    let payload = message.payload().context("record without a payload")?;
    let envelope = EventEnvelope::decode(payload).context("payload is not an event envelope")?;
    let event_id =
        Uuid::parse_str(&envelope.event_id).context("envelope event id is not a UUID")?;
    let correlation =
        CorrelationId::parse(&envelope.correlation_id).unwrap_or_else(CorrelationId::generate);
    Ok(ReceivedEvent {
        event_id,
        topic: message.topic().to_owned(),
        partition: message.partition(),
        offset: message.offset(),
        correlation,
        envelope,
    })
}

/// Puts what the envelope says on the span of processing it.
fn record_event(span: &tracing::Span, event: &ReceivedEvent) {
    span.record(
        "messaging.message.id",
        tracing::field::display(event.event_id),
    );
    span.record(
        "correlation_id",
        tracing::field::display(&event.correlation),
    );
}

/// Full jitter on a backoff step, so retrying replicas spread out.
fn jitter(duration: Duration) -> Duration {
    duration.mul_f64(rand::random_range(0.5..=1.0))
}
