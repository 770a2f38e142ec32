//! Outbox, relay and idempotent consumer against a real PostgreSQL and a
//! real Kafka-protocol broker.

mod support;

use std::sync::atomic::Ordering;
use std::time::Duration;

use dev_stack::header;
use messaging::Relay;
use messaging::consumer::RetryPolicy;
use prost::Message as _;
use rdkafka::Message as _;
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use support::{Fixture, RecordingHandler, assert_nothing_more, receive, widget_event};
use telemetry::CorrelationId;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(50),
    }
}

/// Writes one event to the outbox in a transaction together with a widget
/// row, committing or rolling back.
async fn change_with_event(
    fixture: &Fixture,
    aggregate: &str,
    commit: bool,
) -> messaging::EventEnvelope {
    let envelope = widget_event(aggregate, &CorrelationId::generate());
    let mut tx = fixture.pool.begin().await.unwrap();
    sqlx::query("INSERT INTO widgets (name) VALUES ($1)")
        .bind(aggregate)
        .execute(&mut *tx)
        .await
        .unwrap();
    messaging::outbox::enqueue(&mut tx, &fixture.topics.order_events(), &envelope)
        .await
        .unwrap();
    if commit {
        tx.commit().await.unwrap();
    } else {
        tx.rollback().await.unwrap();
    }
    envelope
}

#[tokio::test]
async fn a_committed_change_is_published_and_a_rolled_back_one_is_not() {
    let fixture = Fixture::new().await;
    let reader = fixture.reader(&fixture.topics.order_events());
    let shutdown = CancellationToken::new();
    // A sweep that never comes: only the commit notification can wake it.
    let relay = Relay::new(fixture.pool.clone(), fixture.producer())
        .with_sweep_interval(Duration::from_secs(3600));
    let relay_task = tokio::spawn(relay.run(shutdown.clone()));

    let rolled_back = change_with_event(&fixture, "rolled-back", false).await;
    let committed = change_with_event(&fixture, "committed", true).await;

    let records = receive(&reader, 1, WAIT).await;
    let published = messaging::EventEnvelope::decode(records[0].payload().unwrap()).unwrap();
    assert_eq!(published, committed);
    assert_eq!(
        records[0].key(),
        Some(b"committed".as_slice()),
        "keyed by aggregate id"
    );
    assert_ne!(published.event_id, rolled_back.event_id);
    assert_nothing_more(&reader, Duration::from_secs(1)).await;

    let (backlog,): (i64,) = sqlx::query_as("SELECT count(*) FROM outbox")
        .fetch_one(&fixture.pool)
        .await
        .unwrap();
    assert_eq!(backlog, 0, "published rows leave the outbox");
    shutdown.cancel();
    relay_task.await.unwrap();
}

#[tokio::test]
async fn one_aggregates_events_are_published_in_the_order_written() {
    let fixture = Fixture::new().await;
    let reader = fixture.reader(&fixture.topics.order_events());
    let correlation = CorrelationId::generate();
    let envelopes: Vec<_> = (0..50)
        .map(|_| widget_event("ordered", &correlation))
        .collect();
    let mut tx = fixture.pool.begin().await.unwrap();
    for chunk in envelopes.chunks(7) {
        messaging::outbox::enqueue_all(&mut tx, &fixture.topics.order_events(), chunk)
            .await
            .unwrap();
    }
    tx.commit().await.unwrap();

    let relay = Relay::new(fixture.pool.clone(), fixture.producer());
    assert_eq!(relay.publish_pending().await.unwrap(), 50);

    let records = receive(&reader, 50, WAIT).await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| {
            messaging::EventEnvelope::decode(r.payload().unwrap())
                .unwrap()
                .event_id
        })
        .collect();
    let written: Vec<String> = envelopes.iter().map(|e| e.event_id.clone()).collect();
    assert_eq!(ids, written);
}

#[tokio::test]
async fn relays_of_several_replicas_publish_each_event_once_in_order() {
    let fixture = Fixture::new().await;
    let reader = fixture.reader(&fixture.topics.order_events());
    let shutdown = CancellationToken::new();
    let relays: Vec<_> = (0..3)
        .map(|_| {
            tokio::spawn(Relay::new(fixture.pool.clone(), fixture.producer()).run(shutdown.clone()))
        })
        .collect();

    let correlation = CorrelationId::generate();
    let mut written = Vec::new();
    for _ in 0..40 {
        let envelope = widget_event("shared-key", &correlation);
        let mut tx = fixture.pool.begin().await.unwrap();
        messaging::outbox::enqueue(&mut tx, &fixture.topics.order_events(), &envelope)
            .await
            .unwrap();
        tx.commit().await.unwrap();
        written.push(envelope.event_id);
    }

    let records = receive(&reader, 40, WAIT).await;
    let ids: Vec<String> = records
        .iter()
        .map(|r| {
            messaging::EventEnvelope::decode(r.payload().unwrap())
                .unwrap()
                .event_id
        })
        .collect();
    assert_eq!(ids, written);
    assert_nothing_more(&reader, Duration::from_secs(1)).await;
    shutdown.cancel();
    for relay in relays {
        relay.await.unwrap();
    }
}

#[tokio::test]
async fn a_redelivered_event_has_no_second_effect() {
    let fixture = Fixture::new().await;
    let topic = fixture.topics.order_events();
    let producer = fixture.producer();
    let envelope = widget_event("once", &CorrelationId::generate()).encode_to_vec();
    for _ in 0..3 {
        producer
            .send(
                FutureRecord::to(&topic).key("once").payload(&envelope),
                Timeout::Never,
            )
            .await
            .unwrap();
    }
    let marker = widget_event("after", &CorrelationId::generate()).encode_to_vec();
    // Same key, same partition: once the marker is handled, so are the copies.
    producer
        .send(
            FutureRecord::to(&topic).key("once").payload(&marker),
            Timeout::Never,
        )
        .await
        .unwrap();

    let shutdown = CancellationToken::new();
    let consumer = fixture.consumer(&topic, RecordingHandler::default());
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    fixture.wait_for_effects(2).await;
    shutdown.cancel();
    task.await.unwrap();

    let effects = fixture.effects().await;
    assert_eq!(
        effects.iter().map(|(_, a)| a.as_str()).collect::<Vec<_>>(),
        vec!["after", "once"]
    );
}

#[tokio::test]
async fn a_poison_event_is_dead_lettered_with_its_error_and_later_events_still_flow() {
    let fixture = Fixture::new().await;
    let topic = fixture.topics.order_events();
    let producer = fixture.producer();
    // Same key, so the same partition: the later events queue behind poison.
    let poison = widget_event("poison", &CorrelationId::generate());
    for payload in [
        poison.encode_to_vec(),
        b"not an envelope".to_vec(),
        widget_event("flaky", &CorrelationId::generate()).encode_to_vec(),
        widget_event("healthy", &CorrelationId::generate()).encode_to_vec(),
    ] {
        producer
            .send(
                FutureRecord::to(&topic).key("same-key").payload(&payload),
                Timeout::Never,
            )
            .await
            .unwrap();
    }

    let dead_letters = fixture.reader(&fixture.topics.dead_letter("shop-consumer"));
    let shutdown = CancellationToken::new();
    let handler = RecordingHandler::default();
    let consumer = fixture
        .consumer(&topic, handler.clone())
        .with_retry(fast_retries());
    let task = tokio::spawn(consumer.run(shutdown.clone()));

    fixture.wait_for_effects(2).await;
    let effects: Vec<String> = fixture
        .effects()
        .await
        .into_iter()
        .map(|(_, a)| a)
        .collect();
    assert_eq!(
        effects,
        vec!["flaky", "healthy"],
        "events after the poison are handled"
    );
    assert_eq!(
        handler.flaky_attempts.load(Ordering::SeqCst),
        3,
        "a transient failure is retried"
    );

    let dead = receive(&dead_letters, 2, WAIT).await;
    let poisoned = dead
        .iter()
        .find(|m| header(m, "dead-letter-error").unwrap().contains("poison"))
        .expect("poison");
    assert_eq!(
        poisoned.payload(),
        Some(poison.encode_to_vec().as_slice()),
        "dead-lettered unchanged"
    );
    assert_eq!(
        header(poisoned, "dead-letter-attempts").as_deref(),
        Some("3")
    );
    assert!(
        header(poisoned, "dead-letter-source")
            .unwrap()
            .starts_with(&fixture.topics.order_events())
    );
    let garbage = dead
        .iter()
        .find(|m| m.payload() == Some(b"not an envelope".as_slice()))
        .expect("garbage");
    assert!(
        header(garbage, "dead-letter-error")
            .unwrap()
            .contains("not an event envelope")
    );

    let (outcome,): (String,) = sqlx::query_as("SELECT outcome FROM inbox WHERE event_id = $1")
        .bind(uuid::Uuid::parse_str(&poison.event_id).unwrap())
        .fetch_one(&fixture.pool)
        .await
        .unwrap();
    assert_eq!(outcome, "dead_lettered");
    shutdown.cancel();
    task.await.unwrap();
}

#[tokio::test]
async fn trace_context_and_correlation_id_survive_the_kafka_hop() {
    let fixture = Fixture::new().await;
    let reader = fixture.reader(&fixture.topics.order_events());
    let correlation = CorrelationId::parse("kafka-hop-1").unwrap();
    let _telemetry = support::install_telemetry();

    // Write the event as a request handler would: inside a span, in a
    // correlation scope.
    let request_span = tracing::info_span!("request");
    let request_trace = telemetry::propagation::trace_id(&request_span);
    let envelope = widget_event("traced", &correlation);
    let pool = fixture.pool.clone();
    let topic = fixture.topics.order_events();
    let env = envelope.clone();
    telemetry::correlation::scope(correlation.clone(), async move {
        let _entered = request_span.enter();
        let mut tx = pool.begin().await.unwrap();
        messaging::outbox::enqueue(&mut tx, &topic, &env)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    })
    .await;
    Relay::new(fixture.pool.clone(), fixture.producer())
        .publish_pending()
        .await
        .unwrap();

    let record = receive(&reader, 1, WAIT).await.remove(0);
    assert_eq!(
        header(&record, "x-correlation-id").as_deref(),
        Some("kafka-hop-1")
    );
    let traceparent = header(&record, "traceparent").expect("traceparent header");
    assert_eq!(
        traceparent.split('-').nth(1),
        Some(request_trace.as_str()),
        "same trace as the request"
    );
    let published = messaging::EventEnvelope::decode(record.payload().unwrap()).unwrap();
    assert_eq!(published.correlation_id, "kafka-hop-1");
}

#[tokio::test]
async fn a_backlog_is_applied_in_batches_once_each_in_order() {
    const EVENTS: usize = 300;
    let fixture = Fixture::new().await;
    let topic = fixture.topics.order_events();
    let producer = fixture.producer();
    // Three aggregates, interleaved, all published before the consumer runs.
    let mut produced: Vec<(String, uuid::Uuid)> = Vec::new();
    for n in 0..EVENTS {
        let aggregate = format!("widget-{}", n % 3);
        let event = widget_event(&aggregate, &CorrelationId::generate());
        produced.push((aggregate.clone(), event.event_id.parse().unwrap()));
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(&aggregate)
                    .payload(&event.encode_to_vec()),
                Timeout::Never,
            )
            .await
            .unwrap();
    }

    let shutdown = CancellationToken::new();
    let consumer = fixture.consumer(&topic, RecordingHandler::default());
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    fixture.wait_for_effects(EVENTS).await;
    shutdown.cancel();
    task.await.unwrap();

    // Each event once, each aggregate's events in the order published.
    let applied: Vec<(String, uuid::Uuid)> =
        sqlx::query_as("SELECT aggregate_id, event_id FROM effects ORDER BY seq")
            .fetch_all(&fixture.pool)
            .await
            .unwrap();
    assert_eq!(applied.len(), EVENTS);
    for aggregate in ["widget-0", "widget-1", "widget-2"] {
        let of = |events: &[(String, uuid::Uuid)]| -> Vec<uuid::Uuid> {
            events
                .iter()
                .filter(|(a, _)| a == aggregate)
                .map(|(_, id)| *id)
                .collect()
        };
        assert_eq!(of(&applied), of(&produced), "{aggregate} in order");
    }
    // A backlog costs a commit per batch, not per event.
    let transactions: i64 = sqlx::query_scalar("SELECT count(DISTINCT tx) FROM effects")
        .fetch_one(&fixture.pool)
        .await
        .unwrap();
    assert!(
        transactions <= (EVENTS / 10) as i64,
        "{EVENTS} events took {transactions} transactions"
    );
}

/// A stack of the test's own whose broker speaks TLS only and wants a
/// client certificate from `certificates`' CA (see `Broker::start_tls`).
async fn tls_env() -> (
    &'static dev_stack::Certificates,
    &'static dev_stack::TestEnv,
) {
    let certificates: &'static _ = Box::leak(Box::new(
        dev_stack::Certificates::generate(
            "messaging test CA",
            &[dev_stack::certs::BROKER, dev_stack::certs::CLIENT],
        )
        .unwrap(),
    ));
    let (postgres, broker) = tokio::try_join!(
        dev_stack::PostgresServer::start(),
        dev_stack::Broker::start_tls(certificates)
    )
    .unwrap();
    (
        certificates,
        dev_stack::TestEnv::separate(postgres, broker).unwrap(),
    )
}

#[tokio::test]
async fn over_tls_the_relay_publishes_and_a_consumer_group_applies_each_event() {
    let (_, env) = tls_env().await;
    let fixture = Fixture::on(env).await;
    assert_eq!(
        fixture.kafka.security.protocol,
        messaging::SecurityProtocol::Ssl
    );
    let topic = fixture.topics.order_events();
    let reader = fixture.reader(&topic);
    let shutdown = CancellationToken::new();
    let relay =
        tokio::spawn(Relay::new(fixture.pool.clone(), fixture.producer()).run(shutdown.clone()));
    let consumer = fixture.consumer(&topic, RecordingHandler::default());
    let consuming = tokio::spawn(consumer.run(shutdown.clone()));

    let committed = change_with_event(&fixture, "over-tls", true).await;
    let records = receive(&reader, 1, WAIT).await;
    let published = messaging::EventEnvelope::decode(records[0].payload().unwrap()).unwrap();
    assert_eq!(published, committed);
    fixture.wait_for_effects(1).await;
    assert_eq!(fixture.effects().await[0].1, "over-tls");

    shutdown.cancel();
    relay.await.unwrap();
    consuming.await.unwrap();
}

#[tokio::test]
async fn a_tls_broker_answers_only_a_client_that_trusts_its_ca_and_presents_a_certificate() {
    let (certificates, env) = tls_env().await;
    let probe = |security: messaging::KafkaSecurity| async move {
        let settings = messaging::KafkaSettings {
            brokers: env.bootstrap_servers().to_owned(),
            topic_prefix: String::new(),
            publish_timeout: Duration::from_secs(5),
            session_timeout: Duration::from_secs(2),
            security,
        };
        let producer = messaging::producer(&settings, "probe").unwrap();
        messaging::BrokerProbe::new(producer)
            .check(Duration::from_secs(3))
            .await
    };
    let tls = env.kafka_tls().expect("a TLS broker");
    let trusted =
        messaging::KafkaSecurity::tls(&tls.ca).with_client_certificate(&tls.certificate, &tls.key);
    probe(trusted).await.expect("the broker answers over TLS");

    // Trusting another CA (even presenting a certificate of that CA's):
    // the broker's certificate does not verify, so no metadata.
    let rogue = dev_stack::Certificates::generate("rogue CA", &["client"]).unwrap();
    let refused = probe(
        messaging::KafkaSecurity::tls(rogue.ca())
            .with_client_certificate(rogue.cert("client"), rogue.key("client")),
    )
    .await;
    assert!(refused.is_err(), "a client trusting another CA");
    // Trusting the right CA without a certificate of its own.
    let refused = probe(messaging::KafkaSecurity::tls(certificates.ca())).await;
    assert!(refused.is_err(), "a client without a certificate");
    // Cleartext to the TLS port.
    let refused = probe(messaging::KafkaSecurity::default()).await;
    assert!(refused.is_err(), "a cleartext client");
}
