//! Several replicas of every service against one database and broker, a
//! burst of a thousand orders with mixed payment tokens, and two of the
//! three orchestrator replicas killed with SIGKILL mid-burst. Afterwards
//! every saga has ended, each order is confirmed exactly when its payment
//! was captured and not refunded, no order was charged twice, every order
//! that did not go through has had its charge refunded, and the provider
//! holds exactly the confirmed orders' money.

use std::collections::HashMap;
use std::time::Duration;

use api_order::v1::order_service_client::OrderServiceClient;
use api_order::v1::{CreateOrderRequest, RequestOrderCancellationRequest};
use dev_stack::{ServiceProcess, ServingStatus};
use e2e::{BINARIES, order_request};
use futures::StreamExt as _;
use testkit::Scenario;
use testkit::grpc::{bearer, channel};

const ORDERS: usize = 1000;

struct Cluster {
    scenario: Scenario,
    auth: ServiceProcess,
    orders: Vec<ServiceProcess>,
    payments: Vec<ServiceProcess>,
    orchestrators: Vec<ServiceProcess>,
}

async fn start(scenario: Scenario, binary: usize, extra: &[(String, String)]) -> ServiceProcess {
    let binary = BINARIES[binary];
    let url = scenario
        .database
        .provision(&binary.account())
        .await
        .unwrap();
    let mut env = scenario.service_env(&url);
    env.extend(extra.iter().cloned());
    let folder = e2e::binaries_folder().await.unwrap();
    let mut process = ServiceProcess::start(binary.name(), &folder.join(binary.name()), env)
        .await
        .unwrap();
    process
        .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
        .await
        .unwrap();
    process
}

impl Cluster {
    /// One auth service, two order services, two payment services and
    /// three orchestrators; replicas of one service start at the same time.
    async fn start() -> Self {
        let scenario = Scenario::new(registry::SERVICES).await.unwrap();

        let scenario_ref = &scenario;
        let auth_env = e2e::peer_env(auth_service::NAME, |_| unreachable!("auth calls no one"));
        let auth = start(clone(scenario_ref), 0, &auth_env).await;
        let with_auth = e2e::peer_env(order_service::NAME, |_| auth.url());
        let (orders, payments) = tokio::join!(
            futures::future::join_all((0..2).map(|_| start(clone(scenario_ref), 1, &with_auth))),
            futures::future::join_all((0..2).map(|_| start(clone(scenario_ref), 2, &with_auth))),
        );
        let orchestrators = futures::future::join_all((0..3).map(|n| {
            // Each orchestrator calls its own pair of order and payment replicas.
            let mut env = e2e::peer_env(saga_orchestrator::NAME, |peer| match peer {
                order_service::NAME => orders[n % 2].url(),
                payment_service::NAME => payments[(n + 1) % 2].url(),
                _ => auth.url(),
            });
            env.extend([
                // A dead replica's sagas are taken over after this long.
                ("SAGA_LEASE".to_owned(), "3s".to_owned()),
                ("SAGA_ATTEMPT_TIMEOUT".to_owned(), "2s".to_owned()),
                ("SAGA_RETRY_BACKOFF".to_owned(), "50ms".to_owned()),
            ]);
            async move { start(clone(scenario_ref), 3, &env).await }
        }))
        .await;
        Self {
            scenario,
            auth,
            orders,
            payments,
            orchestrators,
        }
    }
}

/// A scenario handle for another replica: the same database and topics.
fn clone(scenario: &Scenario) -> Scenario {
    Scenario {
        env: scenario.env,
        database: scenario.database.clone(),
        topics: scenario.topics.clone(),
    }
}

fn token_for(n: usize) -> &'static str {
    match n % 20 {
        0..=11 => "tok_visa",
        12..=14 => "tok_declined",
        15..=16 => "tok_insufficient_funds",
        _ => "tok_flaky",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_survive_a_killed_orchestrator_and_keep_the_money_right() {
    let mut cluster = Cluster::start().await;
    let pool = cluster.scenario.inspect().await.unwrap();

    // Ten customers, logged in through the one auth service.
    let mut auth = api_auth::v1::auth_service_client::AuthServiceClient::new(
        channel(&cluster.auth.url()).await.unwrap(),
    );
    let mut customers = Vec::new();
    for n in 0..10 {
        let email = format!("customer-{n}@example.com");
        auth.register(api_auth::v1::RegisterRequest {
            email: email.clone(),
            password: e2e::CUSTOMER_PASSWORD.into(),
            display_name: format!("Customer {n}"),
        })
        .await
        .unwrap();
        let login = api_auth::v1::LoginRequest {
            email,
            password: e2e::CUSTOMER_PASSWORD.into(),
        };
        customers.push(auth.login(login).await.unwrap().into_inner().access_token);
    }
    let order_clients = [
        OrderServiceClient::new(channel(&cluster.orders[0].url()).await.unwrap()),
        OrderServiceClient::new(channel(&cluster.orders[1].url()).await.unwrap()),
    ];

    // Place the orders twenty at a time across both order replicas; some
    // customers change their minds at once.
    let placing = futures::stream::iter(0..ORDERS)
        .map(move |n| {
            let mut client = order_clients[n % 2].clone();
            let token = customers[n % customers.len()].clone();
            async move {
                let request: CreateOrderRequest =
                    order_request(&format!("order-{n}"), token_for(n));
                let order = client
                    .create_order(bearer(request, &token))
                    .await
                    .unwrap()
                    .into_inner();
                if n % 23 == 0 {
                    let cancel = RequestOrderCancellationRequest {
                        order_id: order.order_id.clone(),
                        reason: "changed my mind".into(),
                    };
                    // Refused if the order was confirmed first: either is fine.
                    let _ = client
                        .request_order_cancellation(bearer(cancel, &token))
                        .await;
                }
                order.order_id
            }
        })
        .buffer_unordered(20);
    let placing = tokio::spawn(placing.collect::<Vec<String>>());

    // Once a quarter of the sagas have ended, one orchestrator dies hard
    // mid-burst; at half, a second one does. The last takes over theirs.
    for (victim, kill_after) in [(0, ORDERS / 4), (1, ORDERS / 2)] {
        tokio::time::timeout(Duration::from_secs(180), async {
            loop {
                let ended: i64 = sqlx::query_scalar("SELECT count(*) FROM saga.saga_instances WHERE state IN ('completed', 'compensated')")
                    .fetch_one(&pool)
                    .await
                    .unwrap();
                if ended as usize >= kill_after {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
        .expect("sagas progress");
        cluster.orchestrators[victim]
            .process()
            .signal("KILL")
            .unwrap();
    }
    let placed = placing.await.unwrap();
    assert_eq!(placed.len(), ORDERS);

    // Every saga ends, the killed replica's too.
    tokio::time::timeout(Duration::from_secs(300), async {
        loop {
            let (sagas, open): (i64, i64) = sqlx::query_as(
                "SELECT count(*), count(*) FILTER (WHERE state NOT IN ('completed', 'compensated')) FROM saga.saga_instances",
            )
            .fetch_one(&pool)
            .await
            .unwrap();
            if sagas as usize == ORDERS && open == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("sagas did not all end"));

    let orders: HashMap<String, String> =
        sqlx::query_as::<_, (uuid::Uuid, String)>("SELECT order_id, status FROM orders.order_view")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|(id, status)| (id.to_string(), status))
            .collect();
    let sagas: HashMap<String, String> =
        sqlx::query_as("SELECT business_key, state FROM saga.saga_instances")
            .fetch_all(&pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let payments: Vec<(uuid::Uuid, String)> =
        sqlx::query_as("SELECT order_id, status FROM payments.payments WHERE order_id IS NOT NULL")
            .fetch_all(&pool)
            .await
            .unwrap();
    // What the provider itself holds of each order's money.
    let held: HashMap<String, i64> = sqlx::query_as::<_, (uuid::Uuid, i64)>(
        "SELECT order_id, held_minor FROM payments.simulated_provider_holdings",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(id, held)| (id.to_string(), held))
    .collect();
    let mut captured: HashMap<String, usize> = HashMap::new();
    let mut charged: HashMap<String, usize> = HashMap::new();
    for (order_id, status) in &payments {
        let order_id = order_id.to_string();
        if status == "captured" {
            *captured.entry(order_id.clone()).or_default() += 1;
        }
        if status == "captured" || status == "refunded" {
            *charged.entry(order_id).or_default() += 1;
        }
    }

    assert_eq!(orders.len(), ORDERS);
    let (mut confirmed, mut closed) = (0, 0);
    for order_id in &placed {
        let status = orders[order_id].as_str();
        let saga = sagas[order_id].as_str();
        let kept = captured.get(order_id).copied().unwrap_or(0);
        let provider_holds = held.get(order_id).copied().unwrap_or(0);
        assert!(
            charged.get(order_id).copied().unwrap_or(0) <= 1,
            "order {order_id} was charged twice"
        );
        match status {
            "confirmed" => {
                confirmed += 1;
                assert_eq!(
                    (saga, kept, provider_holds),
                    ("completed", 1, 2799),
                    "a confirmed order keeps exactly one capture, and the provider its money"
                );
            }
            "rejected" | "cancelled" => {
                closed += 1;
                assert_eq!(
                    (saga, kept, provider_holds),
                    ("compensated", 0, 0),
                    "order {order_id}: every charge was refunded, at the provider too"
                );
            }
            other => panic!("order {order_id} ended {other} with saga {saga}"),
        }
    }
    let reasons: Vec<(Option<String>, i64)> = sqlx::query_as(
        "SELECT failure_reason, count(*) FROM saga.saga_instances GROUP BY 1 ORDER BY 2 DESC",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(
        confirmed > ORDERS / 2 && closed > ORDERS / 10,
        "{confirmed} confirmed, {closed} closed; saga failure reasons: {reasons:?}"
    );
    let survivors = &mut cluster.orchestrators[2..];
    for orchestrator in survivors {
        assert!(orchestrator.process().is_running());
    }
    drop(cluster.payments);
}
