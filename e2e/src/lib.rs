//! The whole system in a test: the four real service binaries, started on
//! free ports against the run's PostgreSQL and broker, with a fresh database
//! and topic prefix per test.

use std::path::PathBuf;
use std::time::Duration;

use access_control::Scope;
use anyhow::{Context as _, bail};
use api_auth::v1::auth_service_client::AuthServiceClient;
use api_auth::v1::{LoginRequest, RegisterRequest};
use api_order::v1::order_service_client::OrderServiceClient;
use api_payment::v1::payment_service_client::PaymentServiceClient;
use api_saga::v1::saga_service_client::SagaServiceClient;
use api_trace::v1::trace_service_client::TraceServiceClient;
use auth_service::ServiceClients;
use dev_stack::{FaultProxy, ServiceProcess, ServingStatus, TopicReader};
use registry::SERVICES;
use service_runtime::Manifest;

use testkit::grpc::channel_with;
use testkit::{Binary, Scenario};
use tokio::sync::OnceCell;
use tonic::transport::Channel;

/// The binaries, in the registry's start order (auth first: the others
/// fetch its keys).
pub const BINARIES: [Binary; SERVICES.len()] = {
    let mut binaries = [Binary::new(SERVICES[0], ""); SERVICES.len()];
    let mut index = 1;
    while index < SERVICES.len() {
        binaries[index] = Binary::new(SERVICES[index], "");
        index += 1;
    }
    binaries
};

/// The operator account every stack bootstraps: the same as `cargo xtask
/// up`'s, so the README's commands run as written.
pub const ADMIN_EMAIL: &str = "admin@ordersaga.local";
pub const ADMIN_PASSWORD: &str = "ordersaga-admin-password";
/// The orchestrator's client credentials: those [`client_secret`] gives it.
pub const SAGA_CLIENT_ID: &str = saga_orchestrator::NAME;
pub const SAGA_CLIENT_SECRET: &str = "saga-orchestrator-test-secret";
/// A client of the tests' own, granted every scope, from which a test asks
/// for a token of exactly the scopes it means to try.
pub const TEST_CLIENT_ID: &str = "e2e-tests";
pub const TEST_CLIENT_SECRET: &str = "e2e-tests-client-secret";
/// The password of every customer the tests register.
pub const CUSTOMER_PASSWORD: &str = "correct horse battery staple";

/// The running system.
#[derive(Debug)]
pub struct Stack {
    pub scenario: Scenario,
    /// In the order of [`BINARIES`].
    pub services: Vec<ServiceProcess>,
    /// The environment each service was started with, to restart it.
    envs: Vec<Vec<(String, String)>>,
    /// Between the callers of a service and the service, by service name.
    proxies: Vec<(&'static str, FaultProxy)>,
    /// How the stack runs over TLS, if it does.
    tls: Option<TlsStack>,
}

/// Extra settings for some services of a [`Stack`].
#[derive(Debug, Default)]
pub struct StackBuilder {
    env: Vec<(&'static str, String, String)>,
    order_saga_version: Option<u32>,
    proxied: Vec<&'static str>,
    without_sagas: bool,
    tls: Option<TlsStack>,
}

/// A stack over TLS: every service serves and calls over TLS with its
/// certificate from `certificates` (and with `client_auth`, refuses callers
/// without one), on `infrastructure` (a PostgreSQL of its own that speaks
/// TLS only, and a broker reached over TLS only, see
/// [`tls_infrastructure`]), presenting the same certificate to the broker.
#[derive(Debug, Clone, Copy)]
pub struct TlsStack {
    pub certificates: &'static dev_stack::Certificates,
    pub infrastructure: &'static dev_stack::TestEnv,
    pub client_auth: bool,
}

/// The services' names in [`dev_stack::Certificates`] made for a TLS stack,
/// beside PostgreSQL's, the broker's and a client's of the tests' own.
pub const CERTIFICATE_NAMES: [&str; 7] = [
    auth_service::NAME,
    order_service::NAME,
    payment_service::NAME,
    saga_orchestrator::NAME,
    "postgres",
    dev_stack::certs::BROKER,
    dev_stack::certs::CLIENT,
];

/// Certificates from a CA of their own for every service, PostgreSQL, the
/// broker and a client, and a PostgreSQL and a broker of their own that
/// speak TLS only, with that CA's certificates (the broker requires a
/// client certificate from it too), for [`StackBuilder::tls`]. They live
/// until the test process exits.
pub async fn tls_infrastructure() -> anyhow::Result<(
    &'static dev_stack::Certificates,
    &'static dev_stack::TestEnv,
)> {
    let certificates: &'static _ = Box::leak(Box::new(dev_stack::Certificates::generate(
        "ordersaga test CA",
        &CERTIFICATE_NAMES,
    )?));
    let (postgres, broker) = tokio::try_join!(
        dev_stack::PostgresServer::start_tls(certificates),
        dev_stack::Broker::start_tls(certificates)
    )?;
    Ok((
        certificates,
        dev_stack::TestEnv::separate(postgres, broker)?,
    ))
}

impl StackBuilder {
    /// Sets `key=value` in the environment of `service`.
    pub fn env(mut self, service: &'static str, key: &str, value: &str) -> Self {
        self.env.push((service, key.to_owned(), value.to_owned()));
        self
    }

    /// Sets `key=value` in the environment of every service.
    pub fn env_all(mut self, key: &str, value: &str) -> Self {
        for service in SERVICES {
            self.env
                .push((service.name, key.to_owned(), value.to_owned()));
        }
        self
    }

    /// Starts new orders on `version` of the order saga. Unless a test
    /// asks, the stack starts version 1, which the suites written before
    /// version 2 exercise (every replica still carries it, and
    /// `ORDER_SAGA_VERSION=1` starts it); a deployment's default is the
    /// newest, [`order_saga::NEWEST`](saga_orchestrator::order_saga::NEWEST).
    pub fn order_saga_version(mut self, version: u32) -> Self {
        self.order_saga_version = Some(version);
        self
    }

    /// Runs the stack over TLS (see [`TlsStack`]).
    pub fn tls(mut self, tls: TlsStack) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Leaves the orchestrator out, for tests of the other services that
    /// must not have sagas acting on their orders meanwhile.
    pub fn without_sagas(mut self) -> Self {
        self.without_sagas = true;
        self
    }

    /// Routes the calls to `service` (of those that call it: payment's and
    /// order's of the orchestrator) through a [`FaultProxy`] that the test
    /// can cut, or make lose answers ([`Stack::proxy`]).
    pub fn proxy(mut self, service: &'static str) -> Self {
        self.proxied.push(service);
        self
    }

    /// Builds the binaries if needed, then starts all four, each once the
    /// one before reports SERVING.
    pub async fn start(self) -> anyhow::Result<Stack> {
        let folder = binaries_folder().await?;
        let scenario = match &self.tls {
            Some(tls) => Scenario::on(tls.infrastructure, SERVICES).await?,
            None => Scenario::new(SERVICES).await?,
        };
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        let mut services: Vec<ServiceProcess> = Vec::new();
        let mut envs = Vec::new();
        let mut proxies = Vec::new();
        for binary in BINARIES {
            let name = binary.name();
            if self.without_sagas && name == saga_orchestrator::NAME {
                continue;
            }
            let url = scenario.database.provision(&binary.account()).await?;
            for peer in binary.manifest.peers {
                let proxied = self.proxied.contains(&peer.service);
                if proxied && !proxies.iter().any(|(name, _)| *name == peer.service) {
                    let target = services[index_of(peer.service)].address();
                    proxies.push((peer.service, FaultProxy::start_grpc(target).await?));
                }
            }
            let mut env = scenario.service_env(&url);
            env.extend(peer_env(name, |peer| {
                match proxies.iter().find(|(name, _)| *name == peer) {
                    Some((_, proxy)) => format!("{scheme}://{}", proxy.address()),
                    None => services[index_of(peer)].url(),
                }
            }));
            if let Some(tls) = &self.tls {
                env.extend(tls.certificates.grpc_env(binary.name()));
                if tls.infrastructure.kafka_tls().is_some() {
                    // Each service presents its own certificate to the
                    // broker too, rather than the tests' client's.
                    let kafka = tls.certificates.kafka_client(binary.name()).env();
                    env.retain(|(key, _)| !kafka.iter().any(|(k, _)| k == key));
                    env.extend(kafka);
                }
                if tls.client_auth {
                    env.push(("GRPC_TLS_CLIENT_AUTH".into(), "true".into()));
                }
            }
            if name == saga_orchestrator::NAME {
                let version = self.order_saga_version.unwrap_or(1);
                env.push(("ORDER_SAGA_VERSION".into(), version.to_string()));
            }
            for (service, key, value) in &self.env {
                if *service == name {
                    env.retain(|(k, _)| k != key);
                    env.push((key.clone(), value.clone()));
                }
            }
            let mut process = ServiceProcess::start(name, &folder.join(name), env.clone()).await?;
            process
                .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
                .await?;
            services.push(process);
            envs.push(env);
        }
        Ok(Stack {
            scenario,
            services,
            envs,
            proxies,
            tls: self.tls,
        })
    }
}

impl Stack {
    pub fn builder() -> StackBuilder {
        StackBuilder::default()
    }

    /// The system with default settings.
    pub async fn start() -> anyhow::Result<Self> {
        Self::builder().start().await
    }

    /// How the stack runs over TLS, if it does.
    pub fn tls(&self) -> Option<TlsStack> {
        self.tls
    }

    /// The proxy between the orchestrator and `service`, when the stack was
    /// built with [`StackBuilder::proxy`] for it.
    pub fn proxy(&self, service: &str) -> &FaultProxy {
        self.proxies
            .iter()
            .find(|(name, _)| *name == service)
            .map(|(_, proxy)| proxy)
            .expect("a stack built with proxy() for this service")
    }

    /// The running service named `name`.
    pub fn service(&self, name: &str) -> &ServiceProcess {
        &self.services[index_of(name)]
    }

    /// The running service named `name`, to stop or signal it.
    pub fn service_mut(&mut self, name: &str) -> &mut ServiceProcess {
        &mut self.services[index_of(name)]
    }

    /// SIGKILLs `name`, as a crash would, and waits until it is gone (its
    /// port free), so that [`restart`](Self::restart) may follow.
    pub async fn crash(&mut self, name: &str) -> anyhow::Result<()> {
        let process = self.service_mut(name).process();
        process.signal("KILL")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while process.is_running() {
            if tokio::time::Instant::now() >= deadline {
                bail!("{name} still runs 10 s after SIGKILL");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Sets `key=value` in the environment `name` is restarted with.
    pub fn set_env(&mut self, name: &str, key: &str, value: &str) {
        let env = &mut self.envs[index_of(name)];
        env.retain(|(k, _)| k != key);
        env.push((key.to_owned(), value.to_owned()));
    }

    /// Starts `name` again on the address it had (after a test killed it),
    /// and waits until it is SERVING.
    pub async fn restart(&mut self, name: &str) -> anyhow::Result<()> {
        let index = index_of(name);
        let mut env = self.envs[index].clone();
        env.retain(|(key, _)| key != "GRPC_ADDR");
        env.push((
            "GRPC_ADDR".into(),
            self.services[index].address().to_string(),
        ));
        let folder = binaries_folder().await?;
        let mut process = ServiceProcess::start(name, &folder.join(name), env).await?;
        process
            .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
            .await?;
        self.services[index] = process;
        Ok(())
    }

    /// Port of `name`'s gRPC server.
    pub fn port(&self, name: &str) -> u16 {
        self.service(name).address().port()
    }

    pub async fn auth(&self) -> AuthServiceClient<Channel> {
        AuthServiceClient::new(self.channel(auth_service::NAME).await)
    }

    pub async fn orders(&self) -> OrderServiceClient<Channel> {
        OrderServiceClient::new(self.channel(order_service::NAME).await)
    }

    /// Places [`order_request`]'s order for `customer`, paid with
    /// `payment_method_token`.
    pub async fn place_order(
        &self,
        customer: &str,
        idempotency_key: &str,
        payment_method_token: &str,
    ) -> api_order::v1::Order {
        self.orders()
            .await
            .create_order(testkit::grpc::bearer(
                order_request(idempotency_key, payment_method_token),
                customer,
            ))
            .await
            .unwrap()
            .into_inner()
    }

    /// `order_id` as its customer (or an admin, with their token) reads it.
    pub async fn order(&self, token: &str, order_id: &str) -> api_order::v1::Order {
        let request = api_order::v1::GetOrderRequest {
            order_id: order_id.to_owned(),
        };
        self.orders()
            .await
            .get_order(testkit::grpc::bearer(request, token))
            .await
            .unwrap()
            .into_inner()
    }

    /// The payments of `order_id`, as its customer reads them.
    pub async fn payments_of(&self, token: &str, order_id: &str) -> Vec<api_payment::v1::Payment> {
        let request = api_payment::v1::ListPaymentsByOrderRequest {
            order_id: order_id.to_owned(),
        };
        self.payments()
            .await
            .list_payments_by_order(testkit::grpc::bearer(request, token))
            .await
            .unwrap()
            .into_inner()
            .payments
    }

    pub async fn payments(&self) -> PaymentServiceClient<Channel> {
        PaymentServiceClient::new(self.channel(payment_service::NAME).await)
    }

    pub async fn sagas(&self) -> SagaServiceClient<Channel> {
        SagaServiceClient::new(self.channel(saga_orchestrator::NAME).await)
    }

    pub async fn traces(&self) -> TraceServiceClient<Channel> {
        TraceServiceClient::new(self.channel(saga_orchestrator::NAME).await)
    }

    /// A channel to `name`, over TLS (as the service itself) on a TLS stack.
    async fn channel(&self, name: &str) -> Channel {
        let service = self.service(name);
        channel_with(&service.url(), service.tls())
            .await
            .expect("a channel to a running service")
    }

    /// Registers a customer and returns their access token.
    pub async fn customer_token(&self, email: &str) -> anyhow::Result<String> {
        let mut auth = self.auth().await;
        auth.register(RegisterRequest {
            email: email.to_owned(),
            password: CUSTOMER_PASSWORD.to_owned(),
            display_name: "Test Customer".to_owned(),
        })
        .await?;
        self.login(email, CUSTOMER_PASSWORD).await
    }

    /// A token with role `service` and the orchestrator's scopes, as the
    /// orchestrator gets it.
    pub async fn service_token(&self) -> anyhow::Result<String> {
        let token = self
            .auth()
            .await
            .issue_service_token(api_auth::v1::IssueServiceTokenRequest {
                client_id: SAGA_CLIENT_ID.to_owned(),
                client_secret: SAGA_CLIENT_SECRET.to_owned(),
                scope: String::new(),
            })
            .await?
            .into_inner();
        Ok(token.access_token)
    }

    /// A token with role `service` carrying exactly `scopes` (at least one).
    pub async fn service_token_with(
        &self,
        scopes: impl IntoIterator<Item = Scope>,
    ) -> anyhow::Result<String> {
        let scope: access_control::Scopes = scopes.into_iter().collect();
        anyhow::ensure!(!scope.is_empty(), "an empty scope asks for every scope");
        let token = self
            .auth()
            .await
            .issue_service_token(api_auth::v1::IssueServiceTokenRequest {
                client_id: TEST_CLIENT_ID.to_owned(),
                client_secret: TEST_CLIENT_SECRET.to_owned(),
                scope: scope.to_string(),
            })
            .await?
            .into_inner();
        anyhow::ensure!(token.scope == scope.to_string(), "issued {:?}", token.scope);
        Ok(token.access_token)
    }

    /// Reads `topic` (of this stack's prefix) from its beginning.
    pub fn reader(&self, topic: &str) -> TopicReader {
        self.scenario
            .topic_reader(topic, 3)
            .expect("a topic reader")
    }

    /// The saga of `order_id` as it is now (NOT_FOUND until it started).
    pub async fn saga_status(
        &self,
        order_id: &str,
        admin: &str,
    ) -> Result<api_saga::v1::Saga, tonic::Status> {
        use api_saga::v1::GetSagaStatusRequest;
        use api_saga::v1::get_saga_status_request::Lookup;
        let request = GetSagaStatusRequest {
            lookup: Some(Lookup::OrderId(order_id.to_owned())),
        };
        self.sagas()
            .await
            .get_saga_status(testkit::grpc::bearer(request, admin))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Waits until the saga of `order_id` is in a final state (or FAILED),
    /// and returns it.
    pub async fn settled_saga(
        &self,
        order_id: &str,
        timeout: Duration,
    ) -> anyhow::Result<api_saga::v1::Saga> {
        use api_saga::v1::SagaState;
        let admin = self.admin_token().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut last = None;
        while tokio::time::Instant::now() < deadline {
            if let Ok(saga) = self.saga_status(order_id, &admin).await {
                if matches!(
                    saga.state(),
                    SagaState::Completed | SagaState::Compensated | SagaState::Failed
                ) {
                    return Ok(saga);
                }
                last = Some(saga);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!(
            "the saga of order {order_id} did not settle within {timeout:?}; last seen: {last:#?}"
        )
    }

    /// Waits until the saga of `order_id` has begun step `step` (an attempt
    /// of its action is in flight or done), and returns the saga.
    pub async fn saga_reaching(
        &self,
        order_id: &str,
        step: &str,
        timeout: Duration,
    ) -> anyhow::Result<api_saga::v1::Saga> {
        let admin = self.admin_token().await?;
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            if let Ok(saga) = self.saga_status(order_id, &admin).await
                && saga.steps.iter().any(|s| s.step == step && s.attempts > 0)
            {
                return Ok(saga);
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("the saga of order {order_id} did not reach {step} within {timeout:?}")
    }

    /// The bootstrapped admin's access token.
    pub async fn admin_token(&self) -> anyhow::Result<String> {
        self.login(ADMIN_EMAIL, ADMIN_PASSWORD).await
    }

    async fn login(&self, email: &str, password: &str) -> anyhow::Result<String> {
        let pair = self
            .auth()
            .await
            .login(LoginRequest {
                email: email.to_owned(),
                password: password.to_owned(),
            })
            .await
            .context("logging in")?
            .into_inner();
        Ok(pair.access_token)
    }
}

/// The tests' client secret of a service that is a client of the auth
/// service.
pub fn client_secret(service: &Manifest) -> String {
    format!("{}-test-secret", service.name)
}

/// What `binary` needs beyond its database and broker: for auth, the admin
/// and the client credentials (of each service that is a client, with the
/// scopes it asks for, and the tests' own); for the others, where the
/// services they call are (`url_of` gives the URL of a peer service by
/// name), and their own credentials if they are clients.
pub fn peer_env(binary: &str, url_of: impl Fn(&str) -> String) -> Vec<(String, String)> {
    let service = registry::service(binary).expect("a known service");
    let mut env: Vec<(&str, String)> = Vec::new();
    if binary == auth_service::NAME {
        env.push(("AUTH_ADMIN_EMAIL", ADMIN_EMAIL.into()));
        env.push(("AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD.into()));
        env.push((
            "AUTH_KEY_ENCRYPTION_KEY",
            testkit::TEST_KEY_ENCRYPTION_KEY.into(),
        ));
        let clients: Vec<String> = registry::service_clients()
            .map(|client| {
                ServiceClients::entry(
                    client.name,
                    &client_secret(client),
                    client.scopes.iter().copied(),
                )
            })
            .chain([ServiceClients::entry(
                TEST_CLIENT_ID,
                TEST_CLIENT_SECRET,
                Scope::ALL,
            )])
            .collect();
        env.push(("AUTH_SERVICE_CLIENTS", clients.join(",")));
    }
    for peer in service.peers {
        env.push((peer.url_env, url_of(peer.service)));
    }
    if service.is_service_client() {
        env.push(("SERVICE_CLIENT_ID", service.name.into()));
        env.push(("SERVICE_CLIENT_SECRET", client_secret(service)));
    }
    env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

fn index_of(name: &str) -> usize {
    SERVICES
        .iter()
        .position(|service| service.name == name)
        .expect("a known service")
}

/// The folder holding the built service binaries (next to this test's own
/// binary), building them once per test process: integration tests of one
/// package cannot name another package's binaries.
pub async fn binaries_folder() -> anyhow::Result<&'static PathBuf> {
    static FOLDER: OnceCell<PathBuf> = OnceCell::const_new();
    FOLDER
        .get_or_try_init(|| async {
            let exe = std::env::current_exe()?;
            // target/<profile>/deps/<test> -> target/<profile>
            let folder = exe
                .ancestors()
                .nth(2)
                .context("test binary location")?
                .to_owned();
            // The same command `cargo xtask test` runs before the tests, so
            // here it finds everything built.
            let mut build = dev_stack::tools::cargo();
            build.args(["build", "--quiet", "--workspace", "--bins"]);
            if folder.file_name().is_some_and(|name| name == "release") {
                build.arg("--release");
            }
            let status = build
                .current_dir(dev_stack::tools::workspace_root())
                .status()?;
            if !status.success() {
                bail!("building the service binaries failed");
            }
            Ok(folder)
        })
        .await
}

/// A line of `quantity` units of `sku` at `unit_price_minor` of `currency`.
pub fn line(
    sku: &str,
    quantity: u32,
    unit_price_minor: i64,
    currency: &str,
) -> api_order::v1::LineItem {
    api_order::v1::LineItem {
        sku: sku.to_owned(),
        quantity,
        unit_price: Some(api_common::v1::Money {
            amount_minor: unit_price_minor,
            currency: currency.to_owned(),
        }),
    }
}

/// A valid order of two books and a pen (27.99 EUR), paid with `payment_method_token`.
pub fn order_request(
    idempotency_key: &str,
    payment_method_token: &str,
) -> api_order::v1::CreateOrderRequest {
    api_order::v1::CreateOrderRequest {
        idempotency_key: idempotency_key.to_owned(),
        items: vec![
            line("BOOK-42", 2, 1300, "EUR"),
            line("PEN-1", 1, 199, "EUR"),
        ],
        payment_method_token: payment_method_token.to_owned(),
    }
}

/// GET over plain HTTP/1.1 (all the tests need: metrics and the
/// dashboard), optionally with a token; the body of a 200 answer.
pub async fn http_get(url: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let rest = url.strip_prefix("http://").unwrap();
    let (host, path) = rest
        .split_once('/')
        .map_or((rest, "/".to_owned()), |(h, p)| (h, format!("/{p}")));
    let mut stream = tokio::net::TcpStream::connect(host).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.1\r\nhost: {host}\r\n{auth}connection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}
