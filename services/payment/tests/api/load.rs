//! Slow payments hold nothing another payment needs: no transaction, no
//! lock and no pooled connection is held while the provider answers.

use std::time::{Duration, Instant};

use api_payment::v1::PaymentStatus;

use crate::support::{Service, charge};

/// Charges `n` fast payments one after another and returns how long each
/// took.
async fn fast_charges(service: &Service, label: &str, n: usize) -> Vec<Duration> {
    let mut latencies = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let paid = service
            .process(charge(&format!("{label}-{i}"), "tok_visa", 1000))
            .await
            .unwrap_or_else(|status| panic!("a fast payment failed ({label}): {status:?}"));
        latencies.push(started.elapsed());
        assert_eq!(paid.status(), PaymentStatus::Captured);
    }
    latencies
}

fn median(latencies: &[Duration]) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

#[tokio::test]
async fn fifty_slow_payments_in_flight_do_not_delay_or_fail_a_fast_one() {
    const SLOW: usize = 50;
    const FAST: usize = 20;
    const SLOW_DELAY: Duration = Duration::from_secs(8);
    // Ten connections (the default) for fifty slow payments: holding one
    // per payment in flight would starve everyone else.
    let service = Service::start(&[
        ("DATABASE_MAX_CONNECTIONS", "10"),
        ("PROVIDER_SLOW_DELAY", "8s"),
    ])
    .await;
    fast_charges(&service, "warm-up", 5).await;
    let usual = fast_charges(&service, "alone", FAST).await;

    let slow: Vec<_> = (0..SLOW)
        .map(|i| {
            let service = &service;
            async move {
                service
                    .process(charge(&format!("slow-{i}"), "tok_slow", 1000))
                    .await
            }
        })
        .collect();
    let slow = futures::future::join_all(slow);
    let measured = async {
        // Every slow payment is at the provider, waiting for its answer.
        service
            .until_count(
                "SELECT count(*) FROM payments.simulated_provider_charges WHERE payment_method = 'tok_slow'",
                i64::try_from(SLOW).unwrap(),
                Duration::from_secs(5),
            )
            .await;
        let in_flight_since = Instant::now();
        let during = fast_charges(&service, "during", FAST).await;
        assert!(
            in_flight_since.elapsed() < SLOW_DELAY / 2,
            "measured while the slow ones were still in flight"
        );
        assert_eq!(
            service
                .count("SELECT count(*) FROM payments.payments WHERE idempotency_key LIKE 'slow-%'")
                .await,
            0,
            "no slow payment had finished"
        );
        during
    };
    let (slow, during) = tokio::join!(slow, measured);

    let (usual_median, during_median) = (median(&usual), median(&during));
    let during_max = during.iter().max().copied().unwrap_or_default();
    eprintln!(
        "fast payment alone: median {usual_median:?}, max {:?}; with {SLOW} slow in flight: median {during_median:?}, max {during_max:?}",
        usual.iter().max().copied().unwrap_or_default()
    );
    // Its usual latency, give or take a busy machine; holding a connection
    // per slow payment made it wait for a slow one to finish (seconds) or
    // fail.
    assert!(
        during_median <= usual_median * 5 + Duration::from_millis(200),
        "median {during_median:?} with slow payments in flight, {usual_median:?} without"
    );
    assert!(
        during_max < Duration::from_secs(1),
        "a fast payment took {during_max:?}"
    );
    // And the slow ones went through too, each charged once.
    for result in slow {
        assert_eq!(result.unwrap().status(), PaymentStatus::Captured);
    }
    assert_eq!(
        service
            .count("SELECT sum(attempts)::bigint FROM payments.simulated_provider_charges WHERE payment_method = 'tok_slow'")
            .await,
        i64::try_from(SLOW).unwrap()
    );
}
