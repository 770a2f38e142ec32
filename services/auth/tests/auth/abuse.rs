//! Abuse of the password RPCs: login storms, password guessing, floods of
//! concurrent checks and of registrations, forged client addresses.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use api_auth::v1::auth_service_client::AuthServiceClient;
use api_auth::v1::{
    GetPublicKeysRequest, IssueServiceTokenRequest, LoginRequest, RefreshRequest, TokenPair,
};
use tokio::sync::Notify;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt as _;

use crate::{PASSWORD, SERVICE_SECRET, count, login, register_request, start};

/// The RetryInfo delay of a refusal: every refusal must carry one.
fn retry_delay(status: &Status) -> Duration {
    status
        .get_details_retry_info()
        .and_then(|retry| retry.retry_delay)
        .unwrap_or_else(|| panic!("no RetryInfo delay: {status:?}"))
}

fn median(latencies: &[Duration]) -> Duration {
    let mut sorted = latencies.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn longest(latencies: &[Duration]) -> Duration {
    latencies.iter().copied().max().unwrap_or_default()
}

/// Latencies of the RPCs a login storm must not starve.
#[derive(Debug, Default)]
struct Latencies {
    public_keys: Vec<Duration>,
    service_token: Vec<Duration>,
    refresh: Vec<Duration>,
}

/// `rounds` sequential calls of each, every one of which must succeed.
async fn measure(
    client: &mut AuthServiceClient<Channel>,
    refresh_token: &mut String,
    rounds: usize,
) -> Latencies {
    let mut latencies = Latencies::default();
    for _ in 0..rounds {
        let started = Instant::now();
        client
            .get_public_keys(GetPublicKeysRequest {})
            .await
            .unwrap();
        latencies.public_keys.push(started.elapsed());

        let started = Instant::now();
        client
            .issue_service_token(IssueServiceTokenRequest {
                client_id: "saga-orchestrator".into(),
                client_secret: SERVICE_SECRET.into(),
                scope: String::new(),
            })
            .await
            .unwrap();
        latencies.service_token.push(started.elapsed());

        let started = Instant::now();
        *refresh_token = client
            .refresh(RefreshRequest {
                refresh_token: refresh_token.clone(),
            })
            .await
            .unwrap()
            .into_inner()
            .refresh_token;
        latencies.refresh.push(started.elapsed());
    }
    latencies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_login_storm_leaves_public_keys_refresh_and_service_tokens_fast() {
    // Few connections: while a login held one as it waited for the
    // hasher, a storm of them took every connection there was.
    let auth = start(&[("DATABASE_MAX_CONNECTIONS", "4")]).await;
    auth.register("storm@example.com").await;
    let mut probe = auth.client_from("127.0.0.1").await;
    let mut refresh_token = login(&mut probe, "storm@example.com", PASSWORD)
        .await
        .unwrap()
        .refresh_token;
    let baseline = measure(&mut probe, &mut refresh_token, 20).await;

    // 48 clients, each from its own address, logging in as fast as they
    // are let in, and waiting as long as a refusal says.
    let stop = Arc::new(AtomicBool::new(false));
    let logged_in = Arc::new(AtomicUsize::new(0));
    let in_full_swing = Arc::new(Notify::new());
    let mut storm = Vec::new();
    for n in 1..=48 {
        let mut client = auth.client_from(&format!("127.0.1.{n}")).await;
        let (stop, logged_in, in_full_swing) = (
            Arc::clone(&stop),
            Arc::clone(&logged_in),
            Arc::clone(&in_full_swing),
        );
        storm.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match login(&mut client, "storm@example.com", PASSWORD).await {
                    Ok(_) => {
                        if logged_in.fetch_add(1, Ordering::Relaxed) == 20 {
                            in_full_swing.notify_one();
                        }
                    }
                    // A well-behaved client waits as long as it is told
                    // (and a little when it is not told).
                    Err(status)
                        if matches!(status.code(), Code::Unavailable | Code::ResourceExhausted) =>
                    {
                        let wait = status
                            .get_details_retry_info()
                            .and_then(|retry| retry.retry_delay)
                            .unwrap_or(Duration::from_millis(100));
                        tokio::time::sleep(wait).await;
                    }
                    Err(status) => panic!("a storm login failed: {status:?}"),
                }
            }
        }));
    }
    tokio::time::timeout(Duration::from_secs(30), in_full_swing.notified())
        .await
        .expect("the storm gets going");
    let during = measure(&mut probe, &mut refresh_token, 20).await;
    let storm_logins_while_measured = logged_in.load(Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    for login in storm {
        login.await.unwrap();
    }

    eprintln!("baseline: {baseline:?}\nduring the storm: {during:?}");
    assert!(
        storm_logins_while_measured > 20,
        "the storm was real: {storm_logins_while_measured} logins"
    );
    for (rpc, before, under_storm) in [
        ("GetPublicKeys", &baseline.public_keys, &during.public_keys),
        (
            "IssueServiceToken",
            &baseline.service_token,
            &during.service_token,
        ),
        ("Refresh", &baseline.refresh, &during.refresh),
    ] {
        // Generous: the hashers take both cores of a small machine, so
        // everything else gets slower; what must not happen is waiting
        // behind the logins (seconds, or UNAVAILABLE, before the fix).
        let bound = median(before) * 20 + Duration::from_millis(150);
        assert!(
            median(under_storm) <= bound,
            "{rpc}: median {:?} under the storm against {:?} before (bound {bound:?})",
            median(under_storm),
            median(before)
        );
        assert!(
            longest(under_storm) <= Duration::from_secs(2),
            "{rpc}: {:?} at worst under the storm",
            longest(under_storm)
        );
    }
}

#[tokio::test]
async fn an_attackers_guesses_slow_the_attacker_down_not_the_owner() {
    let auth = start(&[
        ("LOGIN_FAILURES_BEFORE_DELAY", "3"),
        ("LOGIN_SOURCE_FAILURES_BEFORE_DELAY", "5"),
    ])
    .await;
    auth.register("victim@example.com").await;
    auth.register("bystander@example.com").await;
    let mut attacker = auth.client_from("127.0.2.1").await;
    let mut refusal = None;
    for n in 0..10 {
        match login(
            &mut attacker,
            "victim@example.com",
            &format!("guess number {n}"),
        )
        .await
        {
            Err(status) if status.code() == Code::Unauthenticated => {}
            Err(status) if status.code() == Code::ResourceExhausted => {
                refusal = Some((n, status));
                break;
            }
            other => panic!("guess {n}: {other:?}"),
        }
    }
    let (guesses, refusal) = refusal.expect("the attacker is slowed down");
    assert_eq!(guesses, 3, "three free failures, then a wait");
    assert!(retry_delay(&refusal) > Duration::ZERO);
    // From the attacker's address even the right password waits its turn:
    // a refusal must not tell a right guess from a wrong one.
    let right_but_waiting = login(&mut attacker, "victim@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(right_but_waiting.code(), Code::ResourceExhausted);

    // The owner, elsewhere, is not affected at all.
    let mut owner = auth.client_from("127.0.2.2").await;
    for _ in 0..3 {
        login(&mut owner, "victim@example.com", PASSWORD)
            .await
            .expect("the owner logs in from another address");
    }

    // Guessing other accounts from the same address soon slows the
    // address itself down, for every account.
    for n in 0..2 {
        let error = login(
            &mut attacker,
            "bystander@example.com",
            &format!("guess {n}"),
        )
        .await
        .unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated, "{error:?}");
    }
    let source_slowed = login(&mut attacker, "someone-else@example.com", "guess")
        .await
        .unwrap_err();
    assert_eq!(
        source_slowed.code(),
        Code::ResourceExhausted,
        "{source_slowed:?}"
    );
    let mut bystander = auth.client_from("127.0.2.3").await;
    login(&mut bystander, "bystander@example.com", PASSWORD)
        .await
        .expect("other addresses are not slowed down");
}

#[tokio::test]
async fn each_wait_after_failures_is_longer_and_every_wait_ends() {
    let auth = start(&[
        ("LOGIN_FAILURES_BEFORE_DELAY", "2"),
        ("LOGIN_FAILURE_DELAY", "1s"),
    ])
    .await;
    auth.register("edsger@example.com").await;
    let mut client = auth.client_from("127.0.3.1").await;
    for _ in 0..2 {
        let error = login(&mut client, "edsger@example.com", "wrong password, again")
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated);
    }
    let first = login(&mut client, "edsger@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(first.code(), Code::ResourceExhausted, "{first:?}");
    let first_wait = retry_delay(&first);
    assert!(
        first_wait > Duration::ZERO && first_wait <= Duration::from_secs(1),
        "{first_wait:?}"
    );

    tokio::time::sleep(first_wait + Duration::from_millis(50)).await;
    let error = login(
        &mut client,
        "edsger@example.com",
        "still the wrong password",
    )
    .await
    .unwrap_err();
    assert_eq!(error.code(), Code::Unauthenticated, "the first wait ended");
    let second = login(&mut client, "edsger@example.com", PASSWORD)
        .await
        .unwrap_err();
    let second_wait = retry_delay(&second);
    assert!(
        second_wait > Duration::from_secs(1) && second_wait <= Duration::from_secs(2),
        "the wait doubled: {second_wait:?}"
    );

    tokio::time::sleep(second_wait + Duration::from_millis(50)).await;
    login(&mut client, "edsger@example.com", PASSWORD)
        .await
        .expect("the second wait ended too, and the right password is let in");
    // A right password forgets the failures: two are free again.
    for _ in 0..2 {
        let error = login(&mut client, "edsger@example.com", "a typo this time")
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated);
    }
}

async fn login_all(clients: Vec<AuthServiceClient<Channel>>) -> Vec<Result<TokenPair, Status>> {
    futures::future::join_all(
        clients
            .into_iter()
            .map(|mut client| async move { login(&mut client, "ada@example.com", PASSWORD).await }),
    )
    .await
}

/// The refusals among `results`, checking each carries a retry delay.
fn refusals(results: &[Result<TokenPair, Status>]) -> Vec<Code> {
    results
        .iter()
        .filter_map(|result| result.as_ref().err())
        .map(|status| {
            assert!(
                retry_delay(status) >= Duration::from_millis(100),
                "{status:?}"
            );
            status.code()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_checks_in_flight_are_limited_per_source_and_per_replica() {
    let auth = start(&[
        ("PASSWORD_HASH_CONCURRENCY", "1"),
        ("PASSWORD_MAX_IN_FLIGHT", "6"),
        ("PASSWORD_MAX_IN_FLIGHT_PER_SOURCE", "2"),
    ])
    .await;
    auth.register("ada@example.com").await;

    // Twelve at once from one address: two are let in at a time.
    let one_source = auth.client_from("127.0.4.1").await;
    let results = login_all(vec![one_source; 12]).await;
    let refused = refusals(&results);
    assert!(!refused.is_empty(), "some were refused: {results:?}");
    assert!(
        refused.iter().all(|code| *code == Code::ResourceExhausted),
        "{refused:?}"
    );
    assert!(results.iter().filter(|r| r.is_ok()).count() >= 2);

    // Twelve at once from twelve addresses: the replica lets in six.
    let mut clients = Vec::new();
    for n in 1..=12 {
        clients.push(auth.client_from(&format!("127.0.5.{n}")).await);
    }
    let results = login_all(clients).await;
    let refused = refusals(&results);
    assert!(!refused.is_empty(), "some were refused: {results:?}");
    assert!(
        refused.iter().all(|code| *code == Code::Unavailable),
        "{refused:?}"
    );
    assert!(results.iter().filter(|r| r.is_ok()).count() >= 6);
}

/// A login carrying `x-forwarded-for: <forwarded_for>`.
async fn login_forwarded(
    client: &mut AuthServiceClient<Channel>,
    forwarded_for: &str,
    password: &str,
) -> Result<TokenPair, Status> {
    let mut request = tonic::Request::new(LoginRequest {
        email: "victim@example.com".into(),
        password: password.into(),
    });
    request
        .metadata_mut()
        .insert("x-forwarded-for", forwarded_for.parse().unwrap());
    client.login(request).await.map(tonic::Response::into_inner)
}

#[tokio::test]
async fn a_trusted_proxy_names_the_source_and_no_one_else_can() {
    let auth = start(&[
        ("TRUSTED_PROXIES", "127.0.6.1/32"),
        ("LOGIN_FAILURES_BEFORE_DELAY", "2"),
    ])
    .await;
    auth.register("victim@example.com").await;
    let mut proxy = auth.client_from("127.0.6.1").await;
    let (attacker, owner) = ("198.51.100.7", "203.0.113.5");

    // Through the proxy, the attacker's address is slowed down...
    for _ in 0..2 {
        let error = login_forwarded(&mut proxy, attacker, "a wrong guess")
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated);
    }
    let slowed = login_forwarded(&mut proxy, attacker, "a wrong guess")
        .await
        .unwrap_err();
    assert_eq!(slowed.code(), Code::ResourceExhausted, "{slowed:?}");
    // ...even when it prepends another address: only what the proxy
    // appended counts.
    let prepended = login_forwarded(&mut proxy, &format!("{owner}, {attacker}"), PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(prepended.code(), Code::ResourceExhausted);
    // ...and the owner, through the same proxy, is not.
    login_forwarded(&mut proxy, owner, PASSWORD)
        .await
        .expect("the owner's address is not slowed down");

    // A peer that is not a trusted proxy cannot choose its source: claiming
    // the owner's address, its guesses count against its own.
    let mut forger = auth.client_from("127.0.6.2").await;
    for _ in 0..2 {
        let error = login_forwarded(&mut forger, owner, "a wrong guess")
            .await
            .unwrap_err();
        assert_eq!(error.code(), Code::Unauthenticated);
    }
    let forger_slowed = login_forwarded(&mut forger, owner, PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(forger_slowed.code(), Code::ResourceExhausted);
    login_forwarded(&mut proxy, owner, PASSWORD)
        .await
        .expect("the forged guesses did not slow the owner down");
}

#[tokio::test]
async fn registrations_are_paced_per_source() {
    let auth = start(&[
        ("REGISTER_BURST_PER_SOURCE", "3"),
        ("REGISTER_INTERVAL_PER_SOURCE", "1h"),
    ])
    .await;
    let mut flood = auth.client_from("127.0.7.1").await;
    for n in 0..3 {
        flood
            .register(register_request(&format!("bot-{n}@example.com")))
            .await
            .unwrap();
    }
    let refused = flood
        .register(register_request("bot-3@example.com"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    let wait = retry_delay(&refused);
    assert!(
        wait > Duration::from_secs(59 * 60) && wait <= Duration::from_secs(3600),
        "one more per hour: {wait:?}"
    );

    let mut someone_else = auth.client_from("127.0.7.2").await;
    someone_else
        .register(register_request("ada@example.com"))
        .await
        .expect("another address registers freely");
    assert_eq!(
        count(
            &auth.scenario,
            "SELECT count(*) FROM auth.users WHERE role = 'customer'"
        )
        .await,
        4,
        "the refused registration created nothing"
    );
}
