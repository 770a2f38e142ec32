//! Every string field of every RPC, with a NUL byte and oversized: always
//! INVALID_ARGUMENT naming the field, never INTERNAL (PostgreSQL's text
//! cannot hold a NUL) and never a lookup.

use api_auth::v1::auth_service_client::AuthServiceClient;
use api_auth::v1::set_password_request::User;
use api_auth::v1::{
    ChangePasswordRequest, IssueServiceTokenRequest, LoginRequest, LogoutRequest, RefreshRequest,
    RegisterRequest, SetPasswordRequest,
};
use testkit::grpc::{bearer, violated_fields};
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::{PASSWORD, SERVICE_SECRET, login, start};

/// One call of one RPC, every field valid but the one under test.
#[derive(Debug, Clone)]
enum Call {
    Register(RegisterRequest),
    Login(LoginRequest),
    Refresh(RefreshRequest),
    Logout(LogoutRequest),
    IssueServiceToken(IssueServiceTokenRequest),
    ChangePassword(ChangePasswordRequest),
    SetPassword(SetPasswordRequest),
}

struct Tokens {
    customer: String,
    admin: String,
}

async fn send(
    client: &mut AuthServiceClient<Channel>,
    call: Call,
    tokens: &Tokens,
) -> Result<(), Status> {
    match call {
        Call::Register(request) => client.register(request).await.map(drop),
        Call::Login(request) => client.login(request).await.map(drop),
        Call::Refresh(request) => client.refresh(request).await.map(drop),
        Call::Logout(request) => client.logout(request).await.map(drop),
        Call::IssueServiceToken(request) => client.issue_service_token(request).await.map(drop),
        Call::ChangePassword(request) => client
            .change_password(bearer(request, &tokens.customer))
            .await
            .map(drop),
        Call::SetPassword(request) => client
            .set_password(bearer(request, &tokens.admin))
            .await
            .map(drop),
    }
}

/// `valid` with a NUL byte in the middle.
fn with_nul(valid: &str) -> String {
    let (head, tail) = valid.split_at(valid.len() / 2);
    format!("{head}\0{tail}")
}

/// Every string field, as (field, a call with `value` in that field).
fn calls(value: &str) -> Vec<(&'static str, Call)> {
    let register = || RegisterRequest {
        email: "new@example.com".into(),
        password: PASSWORD.into(),
        display_name: "New Person".into(),
    };
    let login = || LoginRequest {
        email: "ada@example.com".into(),
        password: PASSWORD.into(),
    };
    let client_credentials = || IssueServiceTokenRequest {
        client_id: "saga-orchestrator".into(),
        client_secret: SERVICE_SECRET.into(),
        scope: "payments:charge".into(),
    };
    let change = || ChangePasswordRequest {
        old_password: PASSWORD.into(),
        new_password: "a brand new passphrase".into(),
    };
    let set = || SetPasswordRequest {
        user: Some(User::Email("ada@example.com".into())),
        new_password: "a brand new passphrase".into(),
    };
    let v = || value.to_owned();
    vec![
        (
            "email",
            Call::Register(RegisterRequest {
                email: v(),
                ..register()
            }),
        ),
        (
            "password",
            Call::Register(RegisterRequest {
                password: v(),
                ..register()
            }),
        ),
        (
            "display_name",
            Call::Register(RegisterRequest {
                display_name: v(),
                ..register()
            }),
        ),
        (
            "email",
            Call::Login(LoginRequest {
                email: v(),
                ..login()
            }),
        ),
        (
            "password",
            Call::Login(LoginRequest {
                password: v(),
                ..login()
            }),
        ),
        (
            "refresh_token",
            Call::Refresh(RefreshRequest { refresh_token: v() }),
        ),
        (
            "refresh_token",
            Call::Logout(LogoutRequest { refresh_token: v() }),
        ),
        (
            "client_id",
            Call::IssueServiceToken(IssueServiceTokenRequest {
                client_id: v(),
                ..client_credentials()
            }),
        ),
        (
            "client_secret",
            Call::IssueServiceToken(IssueServiceTokenRequest {
                client_secret: v(),
                ..client_credentials()
            }),
        ),
        (
            "scope",
            Call::IssueServiceToken(IssueServiceTokenRequest {
                scope: v(),
                ..client_credentials()
            }),
        ),
        (
            "old_password",
            Call::ChangePassword(ChangePasswordRequest {
                old_password: v(),
                ..change()
            }),
        ),
        (
            "new_password",
            Call::ChangePassword(ChangePasswordRequest {
                new_password: v(),
                ..change()
            }),
        ),
        (
            "user_id",
            Call::SetPassword(SetPasswordRequest {
                user: Some(User::UserId(v())),
                ..set()
            }),
        ),
        (
            "email",
            Call::SetPassword(SetPasswordRequest {
                user: Some(User::Email(v())),
                ..set()
            }),
        ),
        (
            "new_password",
            Call::SetPassword(SetPasswordRequest {
                new_password: v(),
                ..set()
            }),
        ),
    ]
}

#[tokio::test]
async fn nul_bytes_and_oversized_strings_are_invalid_arguments_naming_the_field() {
    let auth = start(&[]).await;
    auth.register("ada@example.com").await;
    let mut client = auth.client_from("127.0.10.1").await;
    let customer = login(&mut client, "ada@example.com", PASSWORD)
        .await
        .unwrap();
    let tokens = Tokens {
        customer: customer.access_token,
        admin: auth.admin_token().await,
    };
    let user_id = uuid::Uuid::new_v4().to_string();
    // Each value is valid for every field but for its NUL byte, or too
    // long for every field (the longest bound is 254 bytes, for emails).
    let mut hostile = vec![
        ("a NUL byte in an email", with_nul("ada@example.com")),
        ("a NUL byte in a password", with_nul(PASSWORD)),
        ("a NUL byte in an id", with_nul(&user_id)),
        (
            "a NUL byte in a refresh token",
            with_nul(&customer.refresh_token),
        ),
        ("a NUL byte in a secret", with_nul(SERVICE_SECRET)),
        ("a NUL byte alone", "\0".to_owned()),
        ("10 000 bytes", "x".repeat(10_000)),
        (
            "an email of 300 bytes",
            format!("{}@example.com", "a".repeat(288)),
        ),
    ];
    hostile.push(("1 MB", "y".repeat(1 << 20)));

    let mut checked = 0;
    for (what, value) in &hostile {
        for (field, call) in calls(value) {
            let Err(status) = send(&mut client, call, &tokens).await else {
                panic!("{what} in {field} was accepted");
            };
            assert_eq!(
                status.code(),
                Code::InvalidArgument,
                "{what} in {field}: {status:?}"
            );
            assert_eq!(violated_fields(&status), [field], "{what}: {status:?}");
            checked += 1;
        }
    }
    assert_eq!(checked, hostile.len() * 15);
}
