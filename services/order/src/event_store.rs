//! An event store on PostgreSQL, for any event-sourced aggregate.
//!
//! A stream is loaded by folding its events with the aggregate's `evolve`;
//! a command is decided on that state and its events are appended at the
//! next versions. The unique (stream, version) constraint is the optimistic
//! lock: a concurrent writer that appended first makes ours conflict, and
//! [`execute`] then loads the stream again and decides again, a bounded
//! number of times.
//!
//! A command's events are published as they are stored
//! ([`append_and_publish`]): the events table and the outbox get the same
//! envelopes in one transaction, so what is stored is what is announced.
//! Whatever else must change with an append (the read model) is a
//! [`Projection`], run in the same transaction.

use std::time::Duration;

use anyhow::Context as _;
use futures::future::BoxFuture;
use messaging::envelope::{Origin, Subject};
use messaging::{EventEnvelope, Publisher};
use prost::Message as _;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

/// An event-sourced aggregate: pure decisions and state changes, plus how
/// its events are stored.
pub trait Aggregate: Default + Send + Sync + Sized + 'static {
    type Command: Send + Sync;
    type Event: Send + Sync;
    type Error: Send;

    /// Kind of aggregate, in event envelopes ("order").
    const KIND: &'static str;

    fn decide(&self, command: &Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    #[must_use]
    fn evolve(self, event: &Self::Event) -> Self;

    /// The event's payload as stored: protobuf message name, schema
    /// version and bytes.
    fn encode(stream_id: Uuid, event: &Self::Event) -> Encoded;

    /// The event from a stored payload, upcasting older schema versions.
    fn decode(event_type: &str, schema_version: u32, payload: &[u8])
    -> anyhow::Result<Self::Event>;
}

/// A stored form of an event.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub event_type: String,
    pub schema_version: u32,
    pub payload: Vec<u8>,
}

/// An event as recorded in its stream.
#[derive(Debug, Clone)]
pub struct Recorded<E> {
    pub event: E,
    pub envelope: EventEnvelope,
}

/// A stream with the state its events produce.
#[derive(Debug, Clone)]
pub struct Stream<A: Aggregate> {
    pub id: Uuid,
    pub state: A,
    pub history: Vec<Recorded<A::Event>>,
}

impl<A: Aggregate> Stream<A> {
    pub fn new(id: Uuid) -> Self {
        Self {
            id,
            state: A::default(),
            history: Vec::new(),
        }
    }

    /// Number of events in the stream: the version of its last event.
    pub fn version(&self) -> u64 {
        self.history.len() as u64
    }
}

/// Who is writing: where the new events are published, and what caused
/// them.
#[derive(Debug, Clone)]
pub struct Writer {
    pub publisher: Publisher,
    pub origin: Origin,
}

/// Loads a stream and folds it into its state.
pub async fn load<A: Aggregate>(conn: &mut PgConnection, id: Uuid) -> anyhow::Result<Stream<A>> {
    let rows: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT envelope FROM events WHERE stream_id = $1 ORDER BY version")
            .bind(id)
            .fetch_all(conn)
            .await
            .context("loading an event stream")?;
    replay(id, rows)
}

/// Folds stored envelopes (in version order) into their stream.
pub fn replay<A: Aggregate>(
    id: Uuid,
    envelopes: impl IntoIterator<Item = Vec<u8>>,
) -> anyhow::Result<Stream<A>> {
    let mut stream = Stream::<A>::new(id);
    for bytes in envelopes {
        let envelope = EventEnvelope::decode(bytes.as_slice()).context("stored envelope")?;
        let event = A::decode(
            &envelope.event_type,
            envelope.schema_version,
            &envelope.payload,
        )
        .with_context(|| {
            format!(
                "stored {} v{}",
                envelope.event_type, envelope.schema_version
            )
        })?;
        stream.state = std::mem::take(&mut stream.state).evolve(&event);
        stream.history.push(Recorded { event, envelope });
    }
    Ok(stream)
}

/// Why an append did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Another writer appended to the stream since it was loaded.
    #[error("the stream changed concurrently")]
    Conflict,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Appends `events` to `stream` at the versions after its current one, in
/// the caller's transaction, and evolves the stream. Stores only: a new
/// change is announced too, with [`append_and_publish`].
pub async fn append<A: Aggregate>(
    conn: &mut PgConnection,
    stream: &mut Stream<A>,
    events: Vec<A::Event>,
    writer: &Writer,
) -> Result<(), AppendError> {
    if events.is_empty() {
        return Ok(());
    }
    let mut versions = Vec::with_capacity(events.len());
    let mut event_ids = Vec::with_capacity(events.len());
    let mut types = Vec::with_capacity(events.len());
    let mut schema_versions = Vec::with_capacity(events.len());
    let mut bodies = Vec::with_capacity(events.len());
    let mut recorded = Vec::with_capacity(events.len());
    for (offset, event) in events.into_iter().enumerate() {
        let version = stream.version() + offset as u64 + 1;
        let encoded = A::encode(stream.id, &event);
        let envelope = writer.publisher.seal_encoded(
            Subject {
                aggregate_type: A::KIND,
                aggregate_id: stream.id.to_string(),
                aggregate_version: version,
            },
            writer.origin.clone(),
            encoded.event_type.clone(),
            encoded.schema_version,
            encoded.payload,
        );
        versions.push(i64::try_from(version).context("stream version")?);
        event_ids.push(Uuid::parse_str(&envelope.event_id).context("event id")?);
        types.push(envelope.event_type.clone());
        schema_versions.push(i32::try_from(encoded.schema_version).context("schema version")?);
        bodies.push(envelope.encode_to_vec());
        recorded.push(Recorded { event, envelope });
    }
    let inserted = sqlx::query(
        "INSERT INTO events (stream_id, version, event_id, event_type, schema_version, envelope)
         SELECT $1, * FROM UNNEST($2::bigint[], $3::uuid[], $4::text[], $5::int[], $6::bytea[])",
    )
    .bind(stream.id)
    .bind(&versions)
    .bind(&event_ids)
    .bind(&types)
    .bind(&schema_versions)
    .bind(&bodies)
    .execute(conn)
    .await;
    match inserted {
        Ok(_) => {}
        Err(sqlx::Error::Database(error))
            if error.constraint() == Some("events_stream_version") =>
        {
            return Err(AppendError::Conflict);
        }
        Err(error) => return Err(anyhow::Error::new(error).context("appending events").into()),
    }
    for record in recorded {
        stream.state = std::mem::take(&mut stream.state).evolve(&record.event);
        stream.history.push(record);
    }
    Ok(())
}

/// [`append`], and the new events to the writer's outbox, in the caller's
/// transaction.
pub async fn append_and_publish<A: Aggregate>(
    conn: &mut PgConnection,
    stream: &mut Stream<A>,
    events: Vec<A::Event>,
    writer: &Writer,
) -> Result<(), AppendError> {
    let appended = events.len();
    append(conn, stream, events, writer).await?;
    let new: Vec<EventEnvelope> = stream.history[stream.history.len() - appended..]
        .iter()
        .map(|recorded| recorded.envelope.clone())
        .collect();
    writer.publisher.enqueue(conn, &new).await?;
    Ok(())
}

/// What must change in the same transaction as an append, besides the
/// outbox: the read model is a projection of the stream.
pub trait Projection<A: Aggregate>: Send + Sync {
    /// `stream` has just had its last `appended` events appended.
    fn apply<'a>(
        &'a self,
        conn: &'a mut PgConnection,
        stream: &'a Stream<A>,
        appended: usize,
    ) -> BoxFuture<'a, anyhow::Result<()>>;
}

/// Why a command was not carried out.
#[derive(Debug, thiserror::Error)]
pub enum ExecuteError<E> {
    /// The aggregate refused the command.
    #[error("refused by the aggregate")]
    Refused(E),
    /// Concurrent writers kept winning; the caller may retry.
    #[error("the stream kept changing concurrently ({attempts} attempts)")]
    Conflict { attempts: u32 },
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// How often [`execute`] tries before giving up on conflicts.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    pub max_attempts: u32,
    /// Pause before the second attempt (jittered, doubling after).
    pub backoff: Duration,
}

/// Loads the stream, decides the command and appends its events, with the
/// projections, in one transaction; on a conflict, does it all again.
/// Returns the stream as it is afterwards (unchanged if the command was
/// already satisfied).
pub async fn execute<A: Aggregate>(
    pool: &PgPool,
    id: Uuid,
    command: &A::Command,
    writer: &Writer,
    projection: &dyn Projection<A>,
    retry: Retry,
) -> Result<Stream<A>, ExecuteError<A::Error>> {
    let mut backoff = retry.backoff;
    for attempt in 1..=retry.max_attempts {
        let mut tx = pool.begin().await.context("starting a transaction")?;
        let mut stream = load::<A>(&mut tx, id).await?;
        let events = stream
            .state
            .decide(command)
            .map_err(ExecuteError::Refused)?;
        if events.is_empty() {
            return Ok(stream);
        }
        let appended = events.len();
        match append_and_publish(&mut tx, &mut stream, events, writer).await {
            Ok(()) => {}
            Err(AppendError::Conflict) => {
                drop(tx);
                tracing::debug!(attempt, "concurrent append; deciding again");
                if attempt < retry.max_attempts {
                    tokio::time::sleep(backoff.mul_f64(rand::random_range(0.5..1.5))).await;
                    backoff *= 2;
                }
                continue;
            }
            Err(AppendError::Unexpected(error)) => return Err(error.into()),
        }
        projection.apply(&mut tx, &stream, appended).await?;
        match tx.commit().await {
            Ok(()) => return Ok(stream),
            // A unique violation can also surface at commit with deferred
            // checks; ours are immediate, so any failure here is unexpected.
            Err(error) => return Err(anyhow::Error::new(error).context("committing").into()),
        }
    }
    Err(ExecuteError::Conflict {
        attempts: retry.max_attempts,
    })
}
