#![allow(unreachable_pub, dead_code)]
//! A private schema, topics and Kafka clients for one messaging test.

use std::str::FromStr as _;
use std::time::Duration;

use database::{DatabaseSettings, Migration, MigrationSet, ServiceAccount};
use dev_stack::TestEnv;
use dev_stack::TopicReader;
use messaging::envelope::EventMeta;
use messaging::{EventEnvelope, KafkaSettings, Topics};
use rdkafka::Message as _;
use rdkafka::message::OwnedMessage;
use sqlx::PgPool;
use telemetry::CorrelationId;

/// A table the test handler writes its effects to.
const EFFECTS: MigrationSet = MigrationSet {
    component: "messaging-test",
    migrations: &[Migration {
        name: "0001_effects.sql",
        // `seq` is the order effects were applied in, `tx` the transaction
        // that applied them.
        sql: "CREATE TABLE effects (seq BIGSERIAL, event_id UUID NOT NULL, aggregate_id TEXT NOT NULL,
                                    tx BIGINT NOT NULL DEFAULT txid_current());
              CREATE TABLE widgets (name TEXT PRIMARY KEY);",
    }],
};

/// Partitions of every test topic.
const PARTITIONS: i32 = 3;

pub struct Fixture {
    pub pool: PgPool,
    pub kafka: KafkaSettings,
    pub topics: Topics,
}

impl Fixture {
    pub async fn new() -> Self {
        Self::on(TestEnv::get().await).await
    }

    /// A fixture on `env` (a stack of the test's own, such as one whose
    /// broker speaks TLS only), its clients secured as that broker wants.
    pub async fn on(env: &'static TestEnv) -> Self {
        let db = env.database().await.unwrap();
        let account = ServiceAccount {
            schema: "shop",
            role: "shop_service",
            password: "shop-test".into(),
        };
        let url = db.provision(&account).await.unwrap();
        let settings = DatabaseSettings {
            url: sqlx::postgres::PgConnectOptions::from_str(&url).unwrap(),
            max_connections: 10,
            connect_timeout: Duration::from_secs(10),
        };
        let pool = database::connect(&settings, "shop").await.unwrap();
        database::migrate(&pool, &[messaging::MIGRATIONS, EFFECTS])
            .await
            .unwrap();

        let topics = Topics::new(env.unique_topic_prefix());
        env.create_topics(
            &[topics.order_events(), topics.dead_letter("shop-consumer")],
            PARTITIONS as u32,
        )
        .unwrap();
        let kafka = KafkaSettings {
            brokers: env.bootstrap_servers().to_owned(),
            topic_prefix: topics.prefix().to_owned(),
            publish_timeout: Duration::from_secs(10),
            // Joining a group takes about half the session timeout here.
            session_timeout: Duration::from_secs(2),
            security: match env.kafka_tls() {
                Some(tls) => messaging::KafkaSecurity::tls(&tls.ca)
                    .with_client_certificate(&tls.certificate, &tls.key),
                None => messaging::KafkaSecurity::default(),
            },
        };
        Self {
            pool,
            kafka,
            topics,
        }
    }

    pub fn producer(&self) -> rdkafka::producer::FutureProducer {
        messaging::producer(&self.kafka, "test").unwrap()
    }

    /// A member of the test consumer group "shop-consumer", reading `topic`
    /// with `handler`.
    pub fn consumer(
        &self,
        topic: &str,
        handler: RecordingHandler,
    ) -> messaging::Consumer<RecordingHandler> {
        messaging::Consumer::new(
            &self.kafka,
            "shop-consumer",
            &[topic.to_owned()],
            self.pool.clone(),
            self.producer(),
            handler,
        )
        .unwrap()
    }

    /// Reads every record of `topic` from the beginning.
    pub fn reader(&self, topic: &str) -> TopicReader {
        let config = messaging::client_config(&self.kafka.brokers, &self.kafka.security).unwrap();
        TopicReader::new(config, topic, PARTITIONS).unwrap()
    }

    pub async fn effects(&self) -> Vec<(uuid::Uuid, String)> {
        sqlx::query_as("SELECT event_id, aggregate_id FROM effects ORDER BY aggregate_id")
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }
}

/// A test event (any protobuf message will do as payload).
pub fn widget_event(aggregate_id: &str, correlation: &CorrelationId) -> EventEnvelope {
    let payload = prost_types::Duration {
        seconds: 1,
        nanos: 0,
    };
    messaging::envelope::seal(
        EventMeta {
            producer: "test",
            aggregate_type: "widget",
            aggregate_id: aggregate_id.to_owned(),
            aggregate_version: 1,
            correlation_id: correlation.clone(),
            causation_id: None,
        },
        1,
        &payload,
    )
}

/// Receives `count` records, failing after `timeout`.
pub async fn receive(reader: &TopicReader, count: usize, timeout: Duration) -> Vec<OwnedMessage> {
    reader.receive(count, timeout).await.unwrap()
}

/// Asserts nothing more arrives within `quiet`.
pub async fn assert_nothing_more(reader: &TopicReader, quiet: Duration) {
    if let Some(message) = reader.next_within(quiet).await {
        panic!("unexpected record at offset {}", message.offset());
    }
}

/// Installs the services' tracing pipeline for this test's thread, so spans
/// get trace ids that propagation can carry.
pub fn install_telemetry() -> tracing::subscriber::DefaultGuard {
    let settings = telemetry::TelemetrySettings {
        log_format: telemetry::LogFormat::Pretty,
        log_level: std::env::var("TEST_LOG").unwrap_or_else(|_| "off".into()),
        otlp_endpoint: None,
        service_name: None,
    };
    let (subscriber, _provider) =
        telemetry::subscriber(&settings, "test", std::io::stderr).unwrap();
    tracing::subscriber::set_default(subscriber)
}

/// Records each event's effect in `effects`; fails on aggregates named
/// "poison", and transiently on "flaky" until its third attempt.
#[derive(Default, Clone)]
pub struct RecordingHandler {
    pub flaky_attempts: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl messaging::EventHandler for RecordingHandler {
    async fn handle(
        &self,
        conn: &mut sqlx::PgConnection,
        event: &messaging::ReceivedEvent,
    ) -> Result<(), messaging::HandleError> {
        use messaging::HandleError;
        let aggregate = event.envelope.aggregate_id.as_str();
        if aggregate == "poison" {
            return Err(HandleError::Transient(anyhow::anyhow!(
                "poison cannot be digested"
            )));
        }
        if aggregate == "flaky"
            && self
                .flaky_attempts
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst)
                < 2
        {
            return Err(HandleError::Transient(anyhow::anyhow!("not yet")));
        }
        sqlx::query("INSERT INTO effects (event_id, aggregate_id) VALUES ($1, $2)")
            .bind(event.event_id)
            .bind(aggregate)
            .execute(conn)
            .await
            .map_err(|error| HandleError::Transient(error.into()))?;
        Ok(())
    }
}

impl Fixture {
    /// Waits until the handler has recorded at least `count` effects.
    pub async fn wait_for_effects(&self, count: usize) {
        tokio::time::timeout(Duration::from_secs(20), async {
            while self.effects().await.len() < count {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("fewer than {count} effects"));
    }
}
