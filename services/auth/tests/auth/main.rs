//! The auth service through its gRPC API, as a real binary against the test
//! PostgreSQL and broker.
//!
//! This file: the round trips and the helpers the other modules share.
//! - `abuse`: login storms, password guessing, registration floods, proxies.
//! - `passwords`: changing and setting passwords, old hashes, family lifetime.
//! - `validation`: NUL bytes and oversized strings on every RPC.
//! - `memory`: resident memory over many logins.

mod abuse;
#[cfg(target_os = "linux")]
mod memory;
mod passwords;
mod retention;
mod validation;

use std::net::IpAddr;
use std::time::Duration;

use api_auth::v1::auth_service_client::AuthServiceClient;
use api_auth::v1::{
    GetPublicKeysRequest, IssueServiceTokenRequest, LoginRequest, LogoutRequest, RefreshRequest,
    RegisterRequest, TokenPair,
};
use testkit::grpc::{channel, violated_fields};
use testkit::{Binary, Scenario, ServiceUnderTest};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

const BINARY: Binary = Binary::new(&auth_service::MANIFEST, env!("CARGO_BIN_EXE_auth"))
    .requiring(&[("AUTH_KEY_ENCRYPTION_KEY", testkit::TEST_KEY_ENCRYPTION_KEY)]);

const PASSWORD: &str = "correct horse battery staple";
const SERVICE_SECRET: &str = "a-long-random-client-secret";
const READER_SECRET: &str = "another-long-client-secret";
const ADMIN_EMAIL: &str = "root@ordersaga.test";
const ADMIN_PASSWORD: &str = "root-password-for-tests";

struct Auth {
    scenario: Scenario,
    _service: ServiceUnderTest,
    client: AuthServiceClient<Channel>,
}

async fn start(extra_env: &[(&str, &str)]) -> Auth {
    let scenario = Scenario::new(&[BINARY.manifest]).await.unwrap();
    let mut env = vec![
        ("AUTH_ADMIN_EMAIL", ADMIN_EMAIL),
        ("AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD),
    ];
    let clients = format!(
        "saga-orchestrator={SERVICE_SECRET} payments:charge payments:refund orders:settle, \
         reader={READER_SECRET} payments:read"
    );
    env.push(("AUTH_SERVICE_CLIENTS", &clients));
    env.extend_from_slice(extra_env);
    let service = ServiceUnderTest::start(&scenario, BINARY, &env)
        .await
        .unwrap();
    let client = AuthServiceClient::new(channel(&service.process.url()).await.unwrap());
    Auth {
        scenario,
        _service: service,
        client,
    }
}

impl Auth {
    fn url(&self) -> String {
        self._service.process.url()
    }

    /// A client whose connections come from `source`. Every 127.x.y.z
    /// address is this machine's loopback on Linux, so a test can play as
    /// many sources as it likes.
    async fn client_from(&self, source: &str) -> AuthServiceClient<Channel> {
        let source: IpAddr = source.parse().unwrap();
        let channel = Endpoint::from_shared(self.url())
            .unwrap()
            .local_address(Some(source))
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect()
            .await
            .unwrap();
        AuthServiceClient::new(channel)
    }

    /// Registers `email` with [`PASSWORD`] from a source of its own (so
    /// that registrations do not count against the sources a test uses).
    async fn register(&self, email: &str) -> String {
        self.client_from("127.0.9.9")
            .await
            .register(register_request(email))
            .await
            .unwrap()
            .into_inner()
            .user_id
    }

    async fn admin_token(&self) -> String {
        let mut client = self.client_from("127.0.9.8").await;
        login(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD)
            .await
            .unwrap()
            .access_token
    }
}

fn register_request(email: &str) -> RegisterRequest {
    RegisterRequest {
        email: email.into(),
        password: PASSWORD.into(),
        display_name: "Ada Lovelace".into(),
    }
}

async fn login(
    client: &mut AuthServiceClient<Channel>,
    email: &str,
    password: &str,
) -> Result<TokenPair, tonic::Status> {
    client
        .login(LoginRequest {
            email: email.into(),
            password: password.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The claims of a JWT, read without verifying it (the tests check what
/// the auth service put in; verification is the other services' job).
fn claims(token: &str) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

async fn count(scenario: &Scenario, sql: &'static str) -> i64 {
    let pool = scenario.inspect().await.unwrap();
    let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

#[tokio::test]
async fn register_login_refresh_and_logout_round_trip() {
    let Auth {
        mut client,
        _service,
        ..
    } = start(&[]).await;
    let user_id = client
        .register(register_request("  Ada@Example.COM "))
        .await
        .unwrap()
        .into_inner()
        .user_id;

    let first = login(&mut client, "ada@example.com", PASSWORD)
        .await
        .unwrap();
    assert_eq!(first.token_type, "Bearer");
    let access = claims(&first.access_token);
    assert_eq!(access["sub"], user_id.as_str());
    assert_eq!(access["role"], "customer");
    assert_eq!(access["iss"], "ordersaga-auth");
    assert_eq!(access["aud"], "ordersaga");
    let lifetime = access["exp"].as_i64().unwrap() - access["iat"].as_i64().unwrap();
    assert_eq!(
        lifetime,
        15 * 60,
        "access tokens live 15 minutes by default"
    );

    let second = client
        .refresh(RefreshRequest {
            refresh_token: first.refresh_token.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(
        second.refresh_token, first.refresh_token,
        "refresh rotates the token"
    );
    assert_eq!(claims(&second.access_token)["sub"], user_id.as_str());

    client
        .logout(LogoutRequest {
            refresh_token: second.refresh_token.clone(),
        })
        .await
        .unwrap();
    let after_logout = client
        .refresh(RefreshRequest {
            refresh_token: second.refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(after_logout.code(), Code::Unauthenticated);
}

#[tokio::test]
async fn reusing_a_spent_refresh_token_revokes_its_whole_family() {
    let Auth {
        mut client,
        scenario,
        _service,
    } = start(&[]).await;
    client
        .register(register_request("grace@example.com"))
        .await
        .unwrap();
    let stolen = login(&mut client, "grace@example.com", PASSWORD)
        .await
        .unwrap()
        .refresh_token;
    let rotated = client
        .refresh(RefreshRequest {
            refresh_token: stolen.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .refresh_token;

    // Someone presents the spent token again...
    let reuse = client
        .refresh(RefreshRequest {
            refresh_token: stolen,
        })
        .await
        .unwrap_err();
    assert_eq!(reuse.code(), Code::Unauthenticated);
    // ...so the token the legitimate client holds is dead too.
    let legitimate = client
        .refresh(RefreshRequest {
            refresh_token: rotated,
        })
        .await
        .unwrap_err();
    assert_eq!(legitimate.code(), Code::Unauthenticated);
    let revoked = count(&scenario, "SELECT count(*) FROM auth.refresh_token_families WHERE revoked_reason = 'refresh token reused'").await;
    assert_eq!(revoked, 1);

    // Another login starts a fresh family.
    let fresh = login(&mut client, "grace@example.com", PASSWORD)
        .await
        .unwrap();
    client
        .refresh(RefreshRequest {
            refresh_token: fresh.refresh_token,
        })
        .await
        .unwrap();
}

#[tokio::test]
async fn an_unknown_email_and_a_wrong_password_get_the_same_answer() {
    let Auth {
        mut client,
        _service,
        ..
    } = start(&[]).await;
    client
        .register(register_request("alan@example.com"))
        .await
        .unwrap();
    let wrong_password = login(&mut client, "alan@example.com", "not the password at all")
        .await
        .unwrap_err();
    let unknown_email = login(&mut client, "nobody@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(wrong_password.code(), Code::Unauthenticated);
    assert_eq!(unknown_email.code(), wrong_password.code());
    assert_eq!(unknown_email.message(), wrong_password.message());
}

#[tokio::test]
async fn bad_registrations_name_the_field_and_create_nothing() {
    let Auth {
        mut client,
        scenario,
        _service,
    } = start(&[]).await;
    let cases = [
        (
            RegisterRequest {
                email: String::new(),
                ..register_request("")
            },
            "email",
        ),
        (register_request("not-an-email"), "email"),
        (
            register_request(&format!("{}@example.com", "a".repeat(300))),
            "email",
        ),
        (
            RegisterRequest {
                password: "too short".into(),
                ..register_request("a@example.com")
            },
            "password",
        ),
        (
            RegisterRequest {
                password: "p".repeat(129),
                ..register_request("a@example.com")
            },
            "password",
        ),
        (
            RegisterRequest {
                display_name: "  ".into(),
                ..register_request("a@example.com")
            },
            "display_name",
        ),
        (
            RegisterRequest {
                display_name: "x".repeat(101),
                ..register_request("a@example.com")
            },
            "display_name",
        ),
    ];
    for (request, field) in cases {
        let error = client.register(request).await.unwrap_err();
        assert_eq!(error.code(), Code::InvalidArgument, "{field}: {error:?}");
        assert_eq!(violated_fields(&error), vec![field.to_owned()], "{error:?}");
    }
    let everything_wrong = client
        .register(RegisterRequest {
            email: "x".into(),
            password: "y".into(),
            display_name: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(
        violated_fields(&everything_wrong),
        vec!["email", "password", "display_name"]
    );

    // Only the bootstrap admin exists; no event was written either.
    assert_eq!(
        count(
            &scenario,
            "SELECT count(*) FROM auth.users WHERE role = 'customer'"
        )
        .await,
        0
    );

    let login_error = login(&mut client, "", "").await.unwrap_err();
    assert_eq!(login_error.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&login_error), vec!["email", "password"]);
    let refresh_error = client
        .refresh(RefreshRequest {
            refresh_token: "garbage".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&refresh_error), vec!["refresh_token"]);
}

#[tokio::test]
async fn a_taken_email_is_already_exists_whatever_its_case() {
    let Auth {
        mut client,
        scenario,
        _service,
    } = start(&[]).await;
    client
        .register(register_request("linus@example.com"))
        .await
        .unwrap();
    let error = client
        .register(register_request("LINUS@example.com"))
        .await
        .unwrap_err();
    assert_eq!(error.code(), Code::AlreadyExists);
    assert_eq!(
        count(
            &scenario,
            "SELECT count(*) FROM auth.users WHERE role = 'customer'"
        )
        .await,
        1
    );
}

#[tokio::test]
async fn service_clients_get_service_tokens_and_the_admin_is_bootstrapped() {
    let Auth {
        mut client,
        _service,
        ..
    } = start(&[]).await;
    let token = client
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "saga-orchestrator".into(),
            client_secret: SERVICE_SECRET.into(),
            scope: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    let service = claims(&token.access_token);
    assert_eq!(service["role"], "service");
    assert_eq!(service["sub"], "saga-orchestrator");
    assert_eq!(
        service["scope"], "payments:charge payments:refund orders:settle",
        "every scope granted, when none is asked for"
    );
    assert_eq!(token.scope, "payments:charge payments:refund orders:settle");

    let wrong = client
        .issue_service_token(IssueServiceTokenRequest {
            client_id: "saga-orchestrator".into(),
            client_secret: "not-the-secret-at-all".into(),
            scope: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);

    let admin = login(&mut client, ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .unwrap();
    assert_eq!(claims(&admin.access_token)["role"], "admin");

    let keys = client
        .get_public_keys(GetPublicKeysRequest {})
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].algorithm, "EdDSA");
    assert_eq!(keys[0].public_key.len(), 32);
    let header: serde_json::Value = {
        use base64::Engine as _;
        let encoded = admin.access_token.split('.').next().unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(encoded)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(header["alg"], "EdDSA");
    assert_eq!(header["kid"], keys[0].kid.as_str());
}

#[tokio::test]
async fn a_service_token_carries_its_clients_scopes_or_the_subset_asked_for() {
    let Auth {
        client, _service, ..
    } = start(&[]).await;
    let issue = |client_id: &str, client_secret: &str, scope: &str| {
        let request = IssueServiceTokenRequest {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            scope: scope.into(),
        };
        let mut client = client.clone();
        async move {
            client
                .issue_service_token(request)
                .await
                .map(tonic::Response::into_inner)
        }
    };

    let reader = issue("reader", READER_SECRET, "").await.unwrap();
    assert_eq!(claims(&reader.access_token)["scope"], "payments:read");

    // Asking for less: the token carries only that.
    let charge_only = issue("saga-orchestrator", SERVICE_SECRET, "payments:charge")
        .await
        .unwrap();
    assert_eq!(charge_only.scope, "payments:charge");
    assert_eq!(
        claims(&charge_only.access_token)["scope"],
        "payments:charge"
    );
    let both = issue(
        "saga-orchestrator",
        SERVICE_SECRET,
        " orders:settle  payments:refund",
    )
    .await
    .unwrap();
    assert_eq!(both.scope, "payments:refund orders:settle");

    // Asking for more than was granted: refused, naming what is missing.
    let more = issue(
        "saga-orchestrator",
        SERVICE_SECRET,
        "payments:charge payments:read",
    )
    .await
    .unwrap_err();
    assert_eq!(more.code(), Code::PermissionDenied);
    assert!(
        more.message().contains("payments:read"),
        "{}",
        more.message()
    );
    assert!(
        !more.message().contains("payments:charge"),
        "{}",
        more.message()
    );

    // An unknown name is a bad argument, naming the field.
    let unknown = issue("reader", READER_SECRET, "payments:read payments:everything")
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::InvalidArgument);
    assert_eq!(violated_fields(&unknown), ["scope"], "{unknown:?}");

    // Credentials come first: a wrong secret learns nothing about grants.
    let wrong = issue("reader", SERVICE_SECRET, "orders:settle")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
}
