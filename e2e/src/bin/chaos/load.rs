//! The load: customers placing orders of every kind the simulated provider
//! knows, some of them cancelling or returning, an operator compensating
//! sagas, and an admin deciding the large orders held for review.
//!
//! It runs as a child process of the driver ([`LoadClient`]), so that the
//! run can kill it mid-request like any other process: every CreateOrder
//! is written down (`audit::record`) before it is sent, and a new load
//! client first sends again, with the same idempotency key and request,
//! every one its predecessor did not see answered. The child reads its
//! standard input: `stop` asks it to place no more orders and to finish
//! what it started; end of input (the driver died) ends it at once.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use api_auth::v1::LoginRequest;
use api_auth::v1::auth_service_client::AuthServiceClient;
use api_order::v1::order_service_client::OrderServiceClient;
use api_order::v1::{
    ApproveOrderRequest, CreateOrderRequest, DeclineOrderRequest, GetOrderRequest, OrderStatus,
    RequestOrderCancellationRequest, RequestReturnRequest,
};
use api_saga::v1::saga_service_client::SagaServiceClient;
use api_saga::v1::{CompensateSagaRequest, GetSagaStatusRequest, get_saga_status_request};
use audit::record::{self, Entry, Intent, Writer};
use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde::{Deserialize, Serialize};
use testkit::grpc::bearer;
use tokio::io::AsyncWriteExt as _;
use tokio::sync::RwLock;
use tonic::Code;
use tonic::transport::{Channel, Endpoint};
use uuid::Uuid;

/// A customer the driver registered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Customer {
    pub(crate) email: String,
    pub(crate) id: Uuid,
}

#[derive(Debug, Clone, clap::Args)]
pub(crate) struct LoadArgs {
    /// The record to append to (and to resume from).
    #[arg(long)]
    record: PathBuf,
    /// The customers, as JSON.
    #[arg(long)]
    customers: PathBuf,
    /// Order service URLs.
    #[arg(long, value_delimiter = ',')]
    orders: Vec<String>,
    /// Orchestrator URLs.
    #[arg(long, value_delimiter = ',')]
    sagas: Vec<String>,
    #[arg(long)]
    auth: String,
    /// New orders per second.
    #[arg(long)]
    rate: f64,
    #[arg(long)]
    seed: u64,
    /// How many load clients ran before this one: part of every key.
    #[arg(long)]
    generation: u32,
    /// Only send again what is unanswered; place no new orders.
    #[arg(long)]
    resume_only: bool,
}

/// What follows an order's acceptance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FollowUp {
    None,
    /// The customer cancels after this long.
    Cancel(Duration),
    /// An operator compensates the saga after this long.
    Compensate(Duration),
    /// A large order: once it is held for review, this, after this long.
    Review(Decision, Duration),
    /// The customer returns the order this long after it is confirmed.
    Return(Duration),
}

/// What follows a large order's hold for review.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decision {
    /// An admin's ApproveOrder.
    Approve,
    /// An admin's DeclineOrder.
    Decline,
    /// The customer's RequestOrderCancellation while it waits.
    Cancel,
    /// Nobody decides: `REVIEW_TIMEOUT` declines it.
    Never,
}

impl Decision {
    fn as_str(self) -> &'static str {
        match self {
            Self::Approve => "approve",
            Self::Decline => "decline",
            Self::Cancel => "cancel",
            Self::Never => "none",
        }
    }
}

/// The share of orders (out of 100) that are large enough to be reviewed.
const LARGE_SHARE: u32 = 12;

/// How long a follow-up waits for its order to reach the state it acts on
/// (held for review, confirmed) before it gives up; faults can hold a saga
/// back for a while.
const REACH_WITHIN: Duration = Duration::from_secs(90);

/// A catalogue to pick lines from: (sku, unit price in minor units).
const CATALOGUE: [(&str, i64); 6] = [
    ("BOOK-42", 1300),
    ("PEN-1", 199),
    ("MUG-7", 850),
    ("LAMP-3", 4999),
    ("CABLE-9", 1250),
    ("CHAIR-2", 18900),
];

/// Tokens by share of the orders (out of 100): what the simulated provider
/// does with each is in the README's table.
const TOKENS: [(&str, u32); 8] = [
    ("tok_visa", 50),
    ("tok_declined", 8),
    ("tok_insufficient_funds", 5),
    ("tok_flaky", 12),
    ("tok_refund_fails_once", 7),
    ("tok_capture_answer_lost", 5),
    ("tok_slow", 6),
    // Approved by the card, declined for its amount (`amount_over_limit`).
    ("over_limit", 7),
];

/// The order `n` of generation `generation`, and what follows it.
fn order_of(seed: u64, generation: u32, n: u64, customer: Uuid) -> (Intent, FollowUp) {
    let mut rng = StdRng::seed_from_u64(mix(seed, (u64::from(generation) << 40) ^ n));
    let mut pick = rng.random_range(0..100);
    let (token, _) = *TOKENS
        .iter()
        .find(|(_, share)| {
            if pick < *share {
                true
            } else {
                pick -= share;
                false
            }
        })
        .expect("shares add up to 100");
    let mut lines: Vec<(String, u32, i64)> = (0..rng.random_range(1..=3))
        .map(|_| {
            let (sku, price) = CATALOGUE[rng.random_range(0..CATALOGUE.len())];
            (sku.to_owned(), rng.random_range(1..=3), price)
        })
        .collect();
    lines.sort();
    lines.dedup_by(|a, b| a.0 == b.0);
    let large = rng.random_range(0..100) < LARGE_SHARE;
    let token = if token == "over_limit" && !large {
        // Well over the provider's 1 000 000 limit.
        lines.push(("PIANO-1".to_owned(), 1, 1_500_000));
        "tok_visa"
    } else if token == "over_limit" {
        "tok_visa"
    } else {
        token
    };
    if large {
        // At or above the review threshold, and with the other lines (at
        // most 75 597) still under the provider's 1 000 000 limit.
        let threshold = crate::cluster::REVIEW_THRESHOLD_MINOR;
        lines.push((
            "TV-55".to_owned(),
            1,
            rng.random_range(threshold..=threshold * 7),
        ));
    }
    let total_minor = lines
        .iter()
        .map(|(_, quantity, price)| i64::from(*quantity) * price)
        .sum();
    let follow_up = if large {
        // Decisions spread over the review's 5 s, some of them late enough
        // to race its timeout once faults slow the way to the saga.
        let decision = match rng.random_range(0..100) {
            0..40 => Decision::Approve,
            40..60 => Decision::Decline,
            60..80 => Decision::Cancel,
            _ => Decision::Never,
        };
        FollowUp::Review(decision, Duration::from_millis(rng.random_range(200..4800)))
    } else {
        match rng.random_range(0..100) {
            0..10 => FollowUp::Cancel(Duration::from_millis(rng.random_range(0..400))),
            10..16 => FollowUp::Compensate(Duration::from_millis(rng.random_range(0..600))),
            16..26 => FollowUp::Return(Duration::from_millis(rng.random_range(0..1000))),
            _ => FollowUp::None,
        }
    };
    let intent = Intent {
        key: format!("chaos-{seed}-g{generation}-{n}"),
        customer_id: customer,
        total_minor,
        currency: "EUR".to_owned(),
        payment_method: token.to_owned(),
        lines,
        at_ms: 0,
    };
    (intent, follow_up)
}

/// SplitMix64 of `a` and `b`: independent streams per order.
fn mix(a: u64, b: u64) -> u64 {
    let mut z = a ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What every task of the load client shares.
struct Load {
    orders: Vec<OrderServiceClient<Channel>>,
    sagas: Vec<SagaServiceClient<Channel>>,
    auth: AuthServiceClient<Channel>,
    customers: Vec<Customer>,
    tokens: RwLock<Vec<String>>,
    admin: RwLock<String>,
    record: Writer,
}

fn lazy_channel(url: &str) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_shared(url.to_owned())?
        .connect_timeout(Duration::from_secs(1))
        .connect_lazy())
}

/// Pauses before attempt `attempt` (from 1) of a retry: 50 ms, doubling
/// up to a second, jittered.
async fn backoff(attempt: u32) {
    let base = Duration::from_millis(50) * 2u32.saturating_pow(attempt.min(5));
    let base = base.min(Duration::from_secs(1));
    tokio::time::sleep(base.mul_f64(rand::random_range(0.5..1.5))).await;
}

/// Whom a follow-up call is made as.
#[derive(Debug, Clone, Copy)]
enum Caller {
    /// The customer, by index.
    Customer(usize),
    Admin,
}

/// A follow-up call's outcome, as the record keeps it.
fn outcome<T>(answer: Result<T, String>) -> String {
    answer.map_or_else(|why| why, |_| "ok".to_owned())
}

/// Codes that say a request was refused for good: sending it again gets
/// the same answer.
fn is_definite(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::FailedPrecondition
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::NotFound
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

impl Load {
    async fn login(&self, email: &str, password: &str) -> String {
        let mut attempt = 0;
        loop {
            let mut request = tonic::Request::new(LoginRequest {
                email: email.to_owned(),
                password: password.to_owned(),
            });
            request.set_timeout(Duration::from_secs(10));
            match self.auth.clone().login(request).await {
                Ok(pair) => return pair.into_inner().access_token,
                Err(status) => {
                    attempt += 1;
                    if attempt % 20 == 0 {
                        eprintln!("logging in {email}: {status:?}; trying on");
                    }
                    backoff(attempt).await;
                }
            }
        }
    }

    async fn log_in_everyone(&self) {
        let mut tokens = Vec::new();
        for customer in &self.customers {
            tokens.push(self.login(&customer.email, e2e::CUSTOMER_PASSWORD).await);
        }
        *self.tokens.write().await = tokens;
        *self.admin.write().await = self.login(e2e::ADMIN_EMAIL, e2e::ADMIN_PASSWORD).await;
    }

    fn customer_index(&self, id: Uuid) -> usize {
        self.customers
            .iter()
            .position(|customer| customer.id == id)
            .unwrap_or(0)
    }

    /// Sends `intent`'s CreateOrder until it is answered, spreading the
    /// attempts over the order replicas, and writes the answer down.
    async fn place(&self, intent: &Intent, spread: usize) -> Option<Uuid> {
        let customer = self.customer_index(intent.customer_id);
        let request = CreateOrderRequest {
            idempotency_key: intent.key.clone(),
            items: intent
                .lines
                .iter()
                .map(|(sku, quantity, price)| e2e::line(sku, *quantity, *price, &intent.currency))
                .collect(),
            payment_method_token: intent.payment_method.clone(),
        };
        let mut attempt = 0u32;
        loop {
            let token = self.tokens.read().await[customer].clone();
            let mut call = bearer(request.clone(), &token);
            call.set_timeout(Duration::from_secs(5));
            let mut client = self.orders[(spread + attempt as usize) % self.orders.len()].clone();
            match client.create_order(call).await {
                Ok(order) => {
                    let order = order.into_inner();
                    let total = order.total.unwrap_or_default();
                    let order_id = Uuid::parse_str(&order.order_id).ok()?;
                    self.write(&Entry::Accepted {
                        key: intent.key.clone(),
                        order_id,
                        total_minor: total.amount_minor,
                        currency: total.currency,
                        at_ms: record::now_ms(),
                        attempts: attempt + 1,
                    });
                    return Some(order_id);
                }
                Err(status) if status.code() == Code::Unauthenticated => {
                    let email = self.customers[customer].email.clone();
                    let fresh = self.login(&email, e2e::CUSTOMER_PASSWORD).await;
                    self.tokens.write().await[customer] = fresh;
                }
                Err(status) if is_definite(status.code()) => {
                    eprintln!("CreateOrder {} refused: {status:?}", intent.key);
                    self.write(&Entry::Refused {
                        key: intent.key.clone(),
                        code: format!("{:?}", status.code()),
                        message: status.message().to_owned(),
                        at_ms: record::now_ms(),
                    });
                    return None;
                }
                Err(_) => {}
            }
            attempt += 1;
            backoff(attempt).await;
        }
    }

    /// Sends an order service call, made by `call` from a token and a
    /// replica, until it is answered (or `tries` times), as `caller`:
    /// spread over the replicas, backing off after a transient failure,
    /// logging in again when the token is refused. `Err` is the outcome to
    /// write down: the code of a refusal for good, or "gave up".
    async fn order_call<T, F, Fut>(
        &self,
        caller: Caller,
        tries: usize,
        mut call: F,
    ) -> Result<T, String>
    where
        F: FnMut(String, OrderServiceClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        for attempt in 1..=tries {
            let token = match caller {
                Caller::Customer(index) => self.tokens.read().await[index].clone(),
                Caller::Admin => self.admin.read().await.clone(),
            };
            let client = self.orders[attempt % self.orders.len()].clone();
            match call(token, client).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(status) if status.code() == Code::Unauthenticated => match caller {
                    Caller::Customer(index) => {
                        let email = self.customers[index].email.clone();
                        let fresh = self.login(&email, e2e::CUSTOMER_PASSWORD).await;
                        self.tokens.write().await[index] = fresh;
                    }
                    Caller::Admin => {
                        *self.admin.write().await =
                            self.login(e2e::ADMIN_EMAIL, e2e::ADMIN_PASSWORD).await;
                    }
                },
                Err(status) if is_definite(status.code()) => {
                    return Err(format!("{:?}", status.code()));
                }
                Err(_) => backoff(attempt as u32).await,
            }
        }
        Err("gave up".to_owned())
    }

    /// The customer's RequestOrderCancellation, until it is answered (or 30
    /// tries): "ok", or why not.
    async fn request_cancellation(&self, order_id: Uuid, customer: Uuid) -> String {
        let caller = Caller::Customer(self.customer_index(customer));
        let answer = self
            .order_call(caller, 30, |token, mut client| {
                let mut call = bearer(
                    RequestOrderCancellationRequest {
                        order_id: order_id.to_string(),
                        reason: "changed my mind".to_owned(),
                    },
                    &token,
                );
                call.set_timeout(Duration::from_secs(5));
                async move { client.request_order_cancellation(call).await }
            })
            .await;
        outcome(answer)
    }

    /// The customer's RequestOrderCancellation, written down.
    async fn cancel(&self, order_id: Uuid, customer: Uuid) {
        let outcome = self.request_cancellation(order_id, customer).await;
        self.write(&Entry::Cancel {
            order_id,
            outcome,
            at_ms: record::now_ms(),
        });
    }

    /// Polls the order until `reached` says its status is one to act on,
    /// for at most [`REACH_WITHIN`]: that status, or `None`.
    async fn wait_for(
        &self,
        order_id: Uuid,
        customer: Uuid,
        reached: impl Fn(OrderStatus) -> bool,
    ) -> Option<OrderStatus> {
        let caller = Caller::Customer(self.customer_index(customer));
        let deadline = tokio::time::Instant::now() + REACH_WITHIN;
        while tokio::time::Instant::now() < deadline {
            let order = self
                .order_call(caller, 10, |token, mut client| {
                    let mut call = bearer(
                        GetOrderRequest {
                            order_id: order_id.to_string(),
                        },
                        &token,
                    );
                    call.set_timeout(Duration::from_secs(5));
                    async move { client.get_order(call).await }
                })
                .await;
            if let Ok(order) = order
                && reached(order.status())
            {
                return Some(order.status());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }

    /// A large order's review: once it is held (or has moved on without
    /// being held), `decision` after `after`, written down.
    async fn review(&self, order_id: Uuid, customer: Uuid, decision: Decision, after: Duration) {
        let status = self
            .wait_for(order_id, customer, |status| {
                !matches!(status, OrderStatus::Pending | OrderStatus::Unspecified)
            })
            .await;
        let outcome = match status {
            Some(OrderStatus::PendingReview) => {
                tokio::time::sleep(after).await;
                match decision {
                    Decision::Approve => outcome(
                        self.order_call(Caller::Admin, 30, |token, mut client| {
                            let mut call = bearer(
                                ApproveOrderRequest {
                                    order_id: order_id.to_string(),
                                },
                                &token,
                            );
                            call.set_timeout(Duration::from_secs(5));
                            async move { client.approve_order(call).await }
                        })
                        .await,
                    ),
                    Decision::Decline => outcome(
                        self.order_call(Caller::Admin, 30, |token, mut client| {
                            let mut call = bearer(
                                DeclineOrderRequest {
                                    order_id: order_id.to_string(),
                                    reason: "chaos reviewer".to_owned(),
                                },
                                &token,
                            );
                            call.set_timeout(Duration::from_secs(5));
                            async move { client.decline_order(call).await }
                        })
                        .await,
                    ),
                    Decision::Cancel => self.request_cancellation(order_id, customer).await,
                    Decision::Never => "left to time out".to_owned(),
                }
            }
            // Its payment said no first, say: nothing to review.
            Some(other) => format!("not held ({})", other.as_str_name()),
            None => "never held".to_owned(),
        };
        self.write(&Entry::Review {
            order_id,
            decision: decision.as_str().to_owned(),
            outcome,
            at_ms: record::now_ms(),
        });
    }

    /// The customer's RequestReturn `after` the order is confirmed (if it
    /// is), written down.
    async fn request_return(&self, order_id: Uuid, customer: Uuid, after: Duration) {
        let status = self
            .wait_for(order_id, customer, |status| {
                matches!(
                    status,
                    OrderStatus::Confirmed
                        | OrderStatus::Rejected
                        | OrderStatus::Cancelled
                        | OrderStatus::ReturnRequested
                        | OrderStatus::Returned
                )
            })
            .await;
        let outcome = match status {
            Some(OrderStatus::Confirmed) => {
                tokio::time::sleep(after).await;
                let caller = Caller::Customer(self.customer_index(customer));
                outcome(
                    self.order_call(caller, 30, |token, mut client| {
                        let mut call = bearer(
                            RequestReturnRequest {
                                order_id: order_id.to_string(),
                                reason: "not what I expected".to_owned(),
                            },
                            &token,
                        );
                        call.set_timeout(Duration::from_secs(5));
                        async move { client.request_return(call).await }
                    })
                    .await,
                )
            }
            Some(other) => format!("not confirmed ({})", other.as_str_name()),
            None => "never confirmed".to_owned(),
        };
        self.write(&Entry::Return {
            order_id,
            outcome,
            at_ms: record::now_ms(),
        });
    }

    /// An operator's CompensateSaga on the order's saga, once it exists.
    async fn compensate(&self, order_id: Uuid) {
        let mut outcome = "gave up".to_owned();
        let mut saga_id = None;
        for attempt in 1..=60 {
            let admin = self.admin.read().await.clone();
            let client = &self.sagas[attempt % self.sagas.len()];
            let result = match saga_id.clone() {
                None => {
                    let mut call = bearer(
                        GetSagaStatusRequest {
                            lookup: Some(get_saga_status_request::Lookup::OrderId(
                                order_id.to_string(),
                            )),
                        },
                        &admin,
                    );
                    call.set_timeout(Duration::from_secs(5));
                    client.clone().get_saga_status(call).await.map(|saga| {
                        saga_id = Some(saga.into_inner().saga_id);
                        false
                    })
                }
                Some(saga) => {
                    let mut call = bearer(
                        CompensateSagaRequest {
                            saga_id: saga,
                            reason: "chaos operator".to_owned(),
                        },
                        &admin,
                    );
                    call.set_timeout(Duration::from_secs(5));
                    client.clone().compensate_saga(call).await.map(|_| true)
                }
            };
            match result {
                Ok(true) => {
                    outcome = "ok".to_owned();
                    break;
                }
                Ok(false) => continue,
                // Not started yet.
                Err(status) if status.code() == Code::NotFound && saga_id.is_none() => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(status) if status.code() == Code::Unauthenticated => {
                    *self.admin.write().await =
                        self.login(e2e::ADMIN_EMAIL, e2e::ADMIN_PASSWORD).await;
                }
                Err(status) if is_definite(status.code()) => {
                    outcome = format!("{:?}", status.code());
                    break;
                }
                Err(_) => backoff(attempt as u32).await,
            }
        }
        self.write(&Entry::Compensate {
            order_id,
            outcome,
            at_ms: record::now_ms(),
        });
    }

    fn write(&self, entry: &Entry) {
        if let Err(error) = self.record.write(entry) {
            // Without its record the run proves nothing: stop here.
            eprintln!("{error:#}");
            std::process::exit(3);
        }
    }

    /// An order from its intent to its follow-up.
    async fn run_order(self: Arc<Self>, intent: Intent, follow_up: FollowUp, spread: usize) {
        let Some(order_id) = self.place(&intent, spread).await else {
            return;
        };
        match follow_up {
            FollowUp::None => {}
            FollowUp::Cancel(after) => {
                tokio::time::sleep(after).await;
                self.cancel(order_id, intent.customer_id).await;
            }
            FollowUp::Compensate(after) => {
                tokio::time::sleep(after).await;
                self.compensate(order_id).await;
            }
            FollowUp::Review(decision, after) => {
                self.review(order_id, intent.customer_id, decision, after)
                    .await;
            }
            FollowUp::Return(after) => {
                self.request_return(order_id, intent.customer_id, after)
                    .await;
            }
        }
    }
}

/// Orders in flight above which new ones wait.
const MAX_IN_FLIGHT: usize = 200;

/// The load client's own process.
pub(crate) async fn run(args: LoadArgs) -> anyhow::Result<()> {
    let record = Writer::open(&args.record)?;
    let earlier = audit::Record::read(&args.record)?;
    let customers: Vec<Customer> =
        serde_json::from_slice(&std::fs::read(&args.customers).context("reading the customers")?)?;
    anyhow::ensure!(!customers.is_empty(), "no customers");
    let load = Arc::new(Load {
        orders: args
            .orders
            .iter()
            .map(|url| lazy_channel(url).map(OrderServiceClient::new))
            .collect::<anyhow::Result<_>>()?,
        sagas: args
            .sagas
            .iter()
            .map(|url| lazy_channel(url).map(SagaServiceClient::new))
            .collect::<anyhow::Result<_>>()?,
        auth: AuthServiceClient::new(lazy_channel(&args.auth)?),
        customers,
        tokens: RwLock::new(Vec::new()),
        admin: RwLock::new(String::new()),
        record,
    });

    // `stop` on stdin: finish up. End of stdin: the driver is gone. (A
    // thread of its own: reading stdin blocks.)
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    std::thread::spawn(move || {
        for line in std::io::stdin().lines() {
            match line {
                Ok(line) if line.trim() == "stop" => {
                    let _ = stop_tx.send(true);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        std::process::exit(0);
    });

    load.log_in_everyone().await;
    let mut tasks = tokio::task::JoinSet::new();
    let unanswered: Vec<Intent> = earlier.unanswered().cloned().collect();
    eprintln!(
        "load client {}: {} unanswered orders to send again",
        args.generation,
        unanswered.len()
    );
    for (spread, intent) in unanswered.into_iter().enumerate() {
        load.write(&Entry::Resent {
            key: intent.key.clone(),
            at_ms: record::now_ms(),
        });
        tasks.spawn(Arc::clone(&load).run_order(intent, FollowUp::None, spread));
    }

    if !args.resume_only && args.rate > 0.0 {
        let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / args.rate));
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = ticks.tick() => {}
                _ = stop_rx.wait_for(|stop| *stop) => break,
            }
            while tasks.try_join_next().is_some() {}
            if tasks.len() >= MAX_IN_FLIGHT {
                continue;
            }
            let customer = load.customers[(n as usize) % load.customers.len()].id;
            let (mut intent, follow_up) = order_of(args.seed, args.generation, n, customer);
            intent.at_ms = record::now_ms();
            load.write(&Entry::Intent {
                key: intent.key.clone(),
                customer_id: intent.customer_id,
                total_minor: intent.total_minor,
                currency: intent.currency.clone(),
                payment_method: intent.payment_method.clone(),
                lines: intent.lines.clone(),
                at_ms: intent.at_ms,
            });
            tasks.spawn(Arc::clone(&load).run_order(intent, follow_up, n as usize));
            n += 1;
        }
    }
    while tasks.join_next().await.is_some() {}
    eprintln!("load client {}: done", args.generation);
    Ok(())
}

/// The driver's handle on the load client process.
#[derive(Debug)]
pub(crate) struct LoadClient {
    program: PathBuf,
    args: Vec<String>,
    logs: PathBuf,
    child: Option<(tokio::process::Child, tokio::process::ChildStdin)>,
    /// Load clients started so far.
    pub(crate) generation: u32,
}

impl LoadClient {
    /// A load client with these arguments (all but `--generation`), not
    /// started yet.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        record: &Path,
        customers: &Path,
        orders: &[String],
        sagas: &[String],
        auth: &str,
        rate: f64,
        seed: u64,
        logs: &Path,
    ) -> anyhow::Result<Self> {
        let args = vec![
            "load".to_owned(),
            "--record".to_owned(),
            record.display().to_string(),
            "--customers".to_owned(),
            customers.display().to_string(),
            "--orders".to_owned(),
            orders.join(","),
            "--sagas".to_owned(),
            sagas.join(","),
            "--auth".to_owned(),
            auth.to_owned(),
            "--rate".to_owned(),
            rate.to_string(),
            "--seed".to_owned(),
            seed.to_string(),
        ];
        Ok(Self {
            program: std::env::current_exe().context("this program's path")?,
            args,
            logs: logs.to_owned(),
            child: None,
            generation: 0,
        })
    }

    /// Starts the next load client.
    pub(crate) fn start(&mut self, resume_only: bool) -> anyhow::Result<()> {
        anyhow::ensure!(self.child.is_none(), "a load client is running");
        self.generation += 1;
        let log = std::fs::File::create(
            self.logs
                .join(format!("load-client.{}.log", self.generation)),
        )?;
        let mut command = tokio::process::Command::new(&self.program);
        command
            .args(&self.args)
            .args(["--generation", &self.generation.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true);
        if resume_only {
            command.arg("--resume-only");
        }
        let mut child = command.spawn().context("starting the load client")?;
        let stdin = child.stdin.take().context("the load client's stdin")?;
        self.child = Some((child, stdin));
        Ok(())
    }

    /// SIGKILL, wherever it is.
    pub(crate) async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some((mut child, _stdin)) = self.child.take() {
            child.kill().await.context("killing the load client")?;
        }
        Ok(())
    }

    /// Asks it to finish what it started and waits up to `timeout`;
    /// kills it after that. True if it finished.
    pub(crate) async fn stop(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let Some((mut child, mut stdin)) = self.child.take() else {
            return Ok(true);
        };
        stdin.write_all(b"stop\n").await?;
        stdin.flush().await?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => Ok(status?.success()),
            Err(_) => {
                child.kill().await?;
                Ok(false)
            }
        }
    }

    /// Waits for a client that places no new orders (`--resume-only`) to
    /// send everything unanswered and exit.
    pub(crate) async fn finish(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        self.stop(timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_order_is_a_function_of_the_seed_generation_and_number() {
        let customer = Uuid::now_v7();
        let (a, follow_a) = order_of(7, 1, 42, customer);
        let (b, follow_b) = order_of(7, 1, 42, customer);
        assert_eq!((a.clone(), follow_a), (b, follow_b));
        assert_ne!(order_of(7, 2, 42, customer).0.key, a.key);
        // Every token comes up, and totals add up.
        let mut tokens = std::collections::BTreeSet::new();
        for n in 0..2000 {
            let (intent, _) = order_of(7, 1, n, customer);
            let total: i64 = intent.lines.iter().map(|(_, q, p)| i64::from(*q) * p).sum();
            assert_eq!(total, intent.total_minor);
            tokens.insert(intent.payment_method);
        }
        assert_eq!(tokens.len(), TOKENS.len() - 1, "{tokens:?}");
    }

    #[test]
    fn large_orders_are_reviewed_within_the_providers_limit_and_some_are_returned() {
        let customer = Uuid::now_v7();
        let threshold = crate::cluster::REVIEW_THRESHOLD_MINOR;
        let mut decisions = std::collections::BTreeSet::new();
        let (mut large, mut returned) = (0, 0);
        for n in 0..2000 {
            let (intent, follow_up) = order_of(7, 1, n, customer);
            match follow_up {
                FollowUp::Review(decision, _) => {
                    large += 1;
                    decisions.insert(decision.as_str());
                    assert!(intent.total_minor >= threshold, "{intent:?}");
                    assert!(intent.total_minor < 1_000_000, "{intent:?}");
                }
                follow_up => {
                    returned += usize::from(matches!(follow_up, FollowUp::Return(_)));
                    // Small, or over the limit on purpose (declined first).
                    assert!(
                        intent.total_minor < threshold || intent.total_minor > 1_000_000,
                        "{intent:?}"
                    );
                }
            }
        }
        assert_eq!(decisions.len(), 4, "{decisions:?}");
        assert!((150..330).contains(&large), "{large} large orders of 2000");
        assert!(returned > 100, "{returned} returns of 2000");
    }
}
