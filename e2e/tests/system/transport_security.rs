//! TLS on every connection, with the real binaries: gRPC between clients
//! and services and between services (rustls, the `tls` crate), the
//! services' PostgreSQL connections (`sslmode=verify-full`), and their
//! Kafka connections (`KAFKA_SECURITY_PROTOCOL=ssl`, librdkafka with
//! OpenSSL, to a broker reached over TLS only that wants a client
//! certificate).
//!
//! The finding these close: over cleartext, whoever could intercept a
//! service's connection to auth could serve public keys of their own and
//! mint tokens for any role. With TLS a service only talks to a server
//! whose certificate chains to its CA.

use std::time::Duration;

use api_auth::v1::auth_service_client::AuthServiceClient;
use api_auth::v1::{LoginRequest, RegisterRequest};
use api_order::v1::ListOrdersRequest;
use api_order::v1::order_service_client::OrderServiceClient;
use dev_stack::{Certificates, ServiceProcess, ServingStatus};
use e2e::{BINARIES, CUSTOMER_PASSWORD, Stack, TlsStack, binaries_folder, peer_env};
use sqlx::Connection as _;
use testkit::Scenario;
use testkit::grpc::{bearer, channel_with};
use tonic::Code;

async fn tls_stack(client_auth: bool) -> Stack {
    let (certificates, infrastructure) = e2e::tls_infrastructure().await.unwrap();
    Stack::builder()
        .tls(TlsStack {
            certificates,
            infrastructure,
            client_auth,
        })
        .without_sagas()
        .start()
        .await
        .unwrap()
}

/// A CA that is not the stack's, with a certificate for `names`, valid for
/// 127.0.0.1 like the stack's own.
fn rogue_ca(names: &[&str]) -> Certificates {
    Certificates::generate("rogue CA", names).unwrap()
}

#[tokio::test]
async fn a_client_trusting_another_ca_is_refused() {
    let stack = tls_stack(false).await;
    let url = stack.service(order_service::NAME).url();
    assert!(url.starts_with("https://"), "{url}");

    let rogue = rogue_ca(&["client"]);
    let refused = channel_with(&url, &rogue.anonymous_client().unwrap()).await;
    let error = format!(
        "{:?}",
        refused.expect_err("a server the client cannot verify")
    );
    assert!(error.contains("UnknownIssuer"), "{error}");

    // Cleartext to a TLS port gets no gRPC answer either.
    let cleartext = url.replace("https://", "http://");
    let answered = match channel_with(&cleartext, &tls::Tls::cleartext()).await {
        Ok(channel) => OrderServiceClient::new(channel)
            .list_orders(ListOrdersRequest::default())
            .await
            .map(drop),
        Err(_) => Ok(()),
    };
    assert!(
        !matches!(answered, Err(ref status) if status.code() == Code::Unauthenticated),
        "a cleartext call reached the service: {answered:?}"
    );

    // The stack's CA, and no certificate of the client's own: admitted.
    let certificates = stack.tls().expect("a TLS stack").certificates;
    let channel = channel_with(&url, &certificates.anonymous_client().unwrap())
        .await
        .unwrap();
    let status = OrderServiceClient::new(channel)
        .list_orders(ListOrdersRequest::default())
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
}

#[tokio::test]
async fn with_client_auth_a_caller_without_a_certificate_is_refused_and_writes_nothing() {
    let stack = tls_stack(true).await;
    let certificates = stack.tls().expect("a TLS stack").certificates;
    let url = stack.service(auth_service::NAME).url();
    let register = |email: &str| RegisterRequest {
        email: email.to_owned(),
        password: CUSTOMER_PASSWORD.to_owned(),
        display_name: "Mallory".to_owned(),
    };

    // Trusting the right CA is not enough: the server wants a certificate.
    // (rustls clients finish their handshake before the server's refusal
    // arrives, so the refusal may come with the first call.)
    let anonymous = certificates.anonymous_client().unwrap();
    let refused = match channel_with(&url, &anonymous).await {
        Ok(channel) => AuthServiceClient::new(channel)
            .register(register("anonymous@example.com"))
            .await
            .map(drop)
            .map_err(|status| format!("{status:?}")),
        Err(error) => Err(format!("{error:?}")),
    };
    // The client sees the server's alert, or, when its request was already
    // on the way as the server closed the connection, a broken transport
    // (or a cancelled call, "connection closed"):
    // either way no service answered it (the same server answers a caller
    // with a certificate below).
    let error = refused.expect_err("a caller without a client certificate");
    assert!(
        error.contains("CertificateRequired")
            || error.contains("certificate required")
            || error.contains("transport error")
            || error.contains("connection closed"),
        "{error}"
    );
    // A certificate from another CA is refused as well.
    let rogue = rogue_ca(&["client"]);
    let refused = match channel_with(&url, &rogue.client("client").unwrap()).await {
        Ok(channel) => AuthServiceClient::new(channel)
            .register(register("rogue@example.com"))
            .await
            .map(drop)
            .map_err(|status| format!("{status:?}")),
        Err(error) => Err(format!("{error:?}")),
    };
    assert!(refused.is_err(), "a client certificate from another CA");

    let users = || async {
        let pool = stack.scenario.inspect().await.unwrap();
        let emails: Vec<String> = sqlx::query_scalar("SELECT email FROM auth.users")
            .fetch_all(&pool)
            .await
            .unwrap();
        pool.close().await;
        emails
    };
    assert!(
        !users()
            .await
            .iter()
            .any(|email| email.ends_with("@example.com")),
        "refused callers wrote nothing"
    );

    // With the client certificate the same call goes through.
    let channel = channel_with(&url, &certificates.client("client").unwrap())
        .await
        .unwrap();
    AuthServiceClient::new(channel)
        .register(register("ada@example.com"))
        .await
        .unwrap();
    assert!(users().await.contains(&"ada@example.com".to_owned()));
}

#[tokio::test]
async fn a_service_refuses_keys_from_an_auth_server_of_another_ca() {
    // A rogue auth service: the real binary, with its own signing keys and
    // a certificate for the right address from a CA of its own.
    let rogue_certificates = rogue_ca(&[auth_service::NAME, "client"]);
    let rogue_scenario = Scenario::new(&[&auth_service::MANIFEST]).await.unwrap();
    let auth = BINARIES[0];
    let url = rogue_scenario
        .database
        .provision(&auth.account())
        .await
        .unwrap();
    let mut env = rogue_scenario.service_env(&url);
    env.extend(peer_env(auth.name(), |_| unreachable!("auth calls no one")));
    env.extend(rogue_certificates.grpc_env(auth.name()));
    let folder = binaries_folder().await.unwrap();
    let mut rogue = ServiceProcess::start("rogue-auth", &folder.join(auth.name()), env)
        .await
        .unwrap();
    rogue
        .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
        .await
        .unwrap();
    // A token the rogue signed.
    let mut rogue_auth =
        AuthServiceClient::new(channel_with(&rogue.url(), rogue.tls()).await.unwrap());
    rogue_auth
        .register(RegisterRequest {
            email: "mallory@example.com".to_owned(),
            password: CUSTOMER_PASSWORD.to_owned(),
            display_name: "Mallory".to_owned(),
        })
        .await
        .unwrap();
    let forged = rogue_auth
        .login(LoginRequest {
            email: "mallory@example.com".to_owned(),
            password: CUSTOMER_PASSWORD.to_owned(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;

    // The order service is pointed at the rogue (as interception would).
    let (certificates, infrastructure) = e2e::tls_infrastructure().await.unwrap();
    let stack = Stack::builder()
        .tls(TlsStack {
            certificates,
            infrastructure,
            client_auth: false,
        })
        .without_sagas()
        .env(order_service::NAME, "AUTH_URL", &rogue.url())
        .start()
        .await
        .unwrap();
    // It has no keys to verify with, so the rogue's token gets nowhere:
    // the service says it cannot verify tokens (yet), and lists nothing.
    let status = stack
        .orders()
        .await
        .list_orders(bearer(ListOrdersRequest::default(), &forged))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert_eq!(status.message(), "cannot verify tokens yet; retry shortly");
    let logs = stack.service(order_service::NAME).logs();
    assert!(
        logs.contains("UnknownIssuer"),
        "the order service refused the rogue's certificate:\n{logs}"
    );
}

#[tokio::test]
async fn postgres_verify_full_works_and_a_wrong_root_cert_is_refused() {
    let (certificates, infrastructure) = e2e::tls_infrastructure().await.unwrap();
    let base = infrastructure.postgres_base_url();
    let ca = certificates.ca();

    for host in ["127.0.0.1", "localhost"] {
        let url = format!(
            "{}/postgres?sslmode=verify-full&sslrootcert={}",
            base.replace("127.0.0.1", host),
            ca.display()
        );
        let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
        let ssl: bool =
            sqlx::query_scalar("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
                .fetch_one(&mut connection)
                .await
                .unwrap();
        assert!(ssl, "connected to {host} over TLS");
        connection.close().await.unwrap();
    }

    let rogue = rogue_ca(&["postgres"]);
    let wrong = format!(
        "{base}/postgres?sslmode=verify-full&sslrootcert={}",
        rogue.ca().display()
    );
    let error = sqlx::PgConnection::connect(&wrong)
        .await
        .expect_err("a server certificate the root cert does not sign");
    assert!(format!("{error:?}").contains("UnknownIssuer"), "{error:?}");

    // The server takes no cleartext connection either.
    let cleartext = format!("{base}/postgres?sslmode=disable");
    let error = sqlx::PgConnection::connect(&cleartext)
        .await
        .expect_err("a cleartext connection");
    assert!(format!("{error}").contains("pg_hba.conf"), "{error}");

    // And a service connects with DATABASE_URL verifying the server.
    let stack = tls_stack_on(certificates, infrastructure).await;
    let pool = stack.scenario.inspect().await.unwrap();
    let (tls, cleartext): (i64, i64) = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE s.ssl), count(*) FILTER (WHERE NOT s.ssl)
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
         WHERE a.usename LIKE '%\\_service' AND a.backend_type = 'client backend'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(tls > 0, "the services are connected");
    assert_eq!(cleartext, 0, "none of them in cleartext");
}

async fn tls_stack_on(
    certificates: &'static Certificates,
    infrastructure: &'static dev_stack::TestEnv,
) -> Stack {
    Stack::builder()
        .tls(TlsStack {
            certificates,
            infrastructure,
            client_auth: true,
        })
        .without_sagas()
        .start()
        .await
        .unwrap()
}

/// The auth binary on `scenario`, over TLS with its certificate from
/// `certificates`, and with `kafka` as its only Kafka TLS settings.
async fn auth_with_kafka(
    scenario: &Scenario,
    certificates: &Certificates,
    kafka: Vec<(String, String)>,
) -> anyhow::Result<ServiceProcess> {
    let auth = BINARIES[0];
    assert_eq!(auth.name(), auth_service::NAME);
    let url = scenario.database.provision(&auth.account()).await.unwrap();
    let mut env = scenario.service_env(&url);
    env.extend(peer_env(auth.name(), |_| unreachable!("auth calls no one")));
    env.extend(certificates.grpc_env(auth.name()));
    env.retain(|(key, _)| key != "KAFKA_SECURITY_PROTOCOL" && !key.starts_with("KAFKA_SSL_"));
    env.extend(kafka);
    let folder = binaries_folder().await.unwrap();
    ServiceProcess::start(auth.name(), &folder.join(auth.name()), env).await
}

#[tokio::test]
async fn a_service_that_cannot_verify_the_broker_is_not_ready_and_says_why() {
    let (certificates, infrastructure) = e2e::tls_infrastructure().await.unwrap();
    let scenario = Scenario::on(infrastructure, &[&auth_service::MANIFEST])
        .await
        .unwrap();
    let right = certificates.kafka_client(auth_service::NAME);

    // Trusting another CA (with its own certificate from the right one):
    // the broker's certificate does not verify, and there is no cleartext
    // to fall back to.
    let rogue = rogue_ca(&[]);
    let mut kafka = right.env();
    kafka.retain(|(key, _)| key != "KAFKA_SSL_CA_LOCATION");
    kafka.push((
        "KAFKA_SSL_CA_LOCATION".into(),
        rogue.ca().display().to_string(),
    ));
    let mut misled = auth_with_kafka(&scenario, certificates, kafka)
        .await
        .unwrap();
    let logs = misled
        .wait_for_log(
            "certificate verify failed: broker certificate could not be verified",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
    assert!(logs.contains("SSL handshake failed"), "{logs}");
    assert!(!logs.contains("ready: reporting SERVING"), "{logs}");
    assert_eq!(
        misled.health("").await.unwrap(),
        ServingStatus::NotServing,
        "not ready without its broker"
    );

    // Trusting the right CA but presenting no certificate: the broker
    // refuses it (under TLS 1.3 the client has finished its handshake by
    // then, so librdkafka sees the broker's alert on its first request).
    let mut kafka = right.env();
    kafka.retain(|(key, _)| {
        !key.starts_with("KAFKA_SSL_CERTIFICATE") && !key.starts_with("KAFKA_SSL_KEY")
    });
    let mut anonymous = auth_with_kafka(&scenario, certificates, kafka)
        .await
        .unwrap();
    let logs = anonymous
        .wait_for_log("alert certificate required", Duration::from_secs(30))
        .await
        .unwrap();
    assert!(!logs.contains("ready: reporting SERVING"), "{logs}");
    assert_eq!(
        anonymous.health("").await.unwrap(),
        ServingStatus::NotServing
    );

    // The same binary with the right settings is ready.
    let mut trusting = auth_with_kafka(&scenario, certificates, right.env())
        .await
        .unwrap();
    trusting
        .wait_for_health("", ServingStatus::Serving, Duration::from_secs(30))
        .await
        .unwrap();
    // And a certificate without its key stops it at start, naming the
    // setting.
    let mut kafka = right.env();
    kafka.retain(|(key, _)| key != "KAFKA_SSL_KEY_LOCATION");
    let stopped = auth_with_kafka(&scenario, certificates, kafka)
        .await
        .expect_err("a certificate without its key");
    let error = format!("{stopped:#}");
    assert!(
        error.contains("KAFKA_SSL_CERTIFICATE_LOCATION is set without KAFKA_SSL_KEY_LOCATION"),
        "{error}"
    );
}
