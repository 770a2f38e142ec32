//! Changing and setting passwords, hashes made with older parameters, and
//! the absolute lifetime of a refresh-token family.

use std::time::{Duration, Instant, SystemTime};

use api_auth::v1::set_password_request::User;
use api_auth::v1::{ChangePasswordRequest, RefreshRequest, SetPasswordRequest};
use testkit::grpc::{bearer, violated_fields};
use tonic::Code;

use crate::{PASSWORD, SERVICE_SECRET, count, login, start};

const NEW_PASSWORD: &str = "a brand new passphrase";

fn change(old: &str, new: &str) -> ChangePasswordRequest {
    ChangePasswordRequest {
        old_password: old.into(),
        new_password: new.into(),
    }
}

#[tokio::test]
async fn changing_ones_password_ends_every_session() {
    let auth = start(&[]).await;
    auth.register("grace@example.com").await;
    let mut client = auth.client_from("127.0.8.1").await;
    let laptop = login(&mut client, "grace@example.com", PASSWORD)
        .await
        .unwrap();
    let phone = login(&mut client, "grace@example.com", PASSWORD)
        .await
        .unwrap();

    let anonymous = client
        .change_password(change(PASSWORD, NEW_PASSWORD))
        .await
        .unwrap_err();
    assert_eq!(anonymous.code(), Code::Unauthenticated);
    let service = client
        .issue_service_token(api_auth::v1::IssueServiceTokenRequest {
            client_id: "saga-orchestrator".into(),
            client_secret: SERVICE_SECRET.into(),
            scope: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .access_token;
    let not_a_person = client
        .change_password(bearer(change(PASSWORD, NEW_PASSWORD), &service))
        .await
        .unwrap_err();
    assert_eq!(not_a_person.code(), Code::PermissionDenied);
    let wrong_old = client
        .change_password(bearer(
            change("not my password at all", NEW_PASSWORD),
            &laptop.access_token,
        ))
        .await
        .unwrap_err();
    assert_eq!(wrong_old.code(), Code::PermissionDenied, "{wrong_old:?}");
    let too_short = client
        .change_password(bearer(change(PASSWORD, "short"), &laptop.access_token))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&too_short), ["new_password"]);

    client
        .change_password(bearer(change(PASSWORD, NEW_PASSWORD), &laptop.access_token))
        .await
        .unwrap();
    for session in [laptop.refresh_token, phone.refresh_token] {
        let ended = client
            .refresh(RefreshRequest {
                refresh_token: session,
            })
            .await
            .unwrap_err();
        assert_eq!(ended.code(), Code::Unauthenticated);
    }
    assert_eq!(
        count(
            &auth.scenario,
            "SELECT count(*) FROM auth.refresh_token_families WHERE revoked_reason = 'password changed'"
        )
        .await,
        2
    );
    let old = login(&mut client, "grace@example.com", PASSWORD)
        .await
        .unwrap_err();
    assert_eq!(old.code(), Code::Unauthenticated);
    let fresh = login(&mut client, "grace@example.com", NEW_PASSWORD)
        .await
        .unwrap();
    client
        .refresh(RefreshRequest {
            refresh_token: fresh.refresh_token,
        })
        .await
        .expect("a login after the change starts a family that works");
}

fn set(user: User, password: &str) -> SetPasswordRequest {
    SetPasswordRequest {
        user: Some(user),
        new_password: password.into(),
    }
}

#[tokio::test]
async fn an_admin_sets_a_users_password_and_every_session_ends() {
    let auth = start(&[]).await;
    let user_id = auth.register("alan@example.com").await;
    let mut client = auth.client_from("127.0.8.2").await;
    let session = login(&mut client, "alan@example.com", PASSWORD)
        .await
        .unwrap();
    let by_email = || set(User::Email("Alan@Example.com".into()), NEW_PASSWORD);

    let customer = client
        .set_password(bearer(by_email(), &session.access_token))
        .await
        .unwrap_err();
    assert_eq!(customer.code(), Code::PermissionDenied);

    let admin = auth.admin_token().await;
    let set_for = client
        .set_password(bearer(by_email(), &admin))
        .await
        .unwrap()
        .into_inner()
        .user_id;
    assert_eq!(set_for, user_id);
    let ended = client
        .refresh(RefreshRequest {
            refresh_token: session.refresh_token,
        })
        .await
        .unwrap_err();
    assert_eq!(ended.code(), Code::Unauthenticated);
    login(&mut client, "alan@example.com", NEW_PASSWORD)
        .await
        .expect("the password the admin set");

    client
        .set_password(bearer(
            set(User::UserId(user_id.clone()), "yet another passphrase"),
            &admin,
        ))
        .await
        .unwrap();
    login(&mut client, "alan@example.com", "yet another passphrase")
        .await
        .expect("set by user id too");

    for unknown in [
        User::UserId(uuid::Uuid::new_v4().to_string()),
        User::Email("nobody@example.com".into()),
    ] {
        let missing = client
            .set_password(bearer(set(unknown, NEW_PASSWORD), &admin))
            .await
            .unwrap_err();
        assert_eq!(missing.code(), Code::NotFound);
    }
    let no_user = client
        .set_password(bearer(
            SetPasswordRequest {
                user: None,
                new_password: NEW_PASSWORD.into(),
            },
            &admin,
        ))
        .await
        .unwrap_err();
    assert_eq!(violated_fields(&no_user), ["user"]);
}

#[tokio::test]
async fn a_refresh_family_ends_at_its_lifetime_however_often_it_is_used() {
    const LIFETIME: Duration = Duration::from_secs(3);
    let auth = start(&[("REFRESH_FAMILY_LIFETIME", "3s")]).await;
    auth.register("hedy@example.com").await;
    let mut client = auth.client_from("127.0.8.3").await;
    let started = Instant::now();
    let logged_in_at = SystemTime::now();
    let mut pair = login(&mut client, "hedy@example.com", PASSWORD)
        .await
        .unwrap();
    let says_it_expires = SystemTime::try_from(pair.refresh_token_expires_at.unwrap()).unwrap();
    assert!(
        says_it_expires <= logged_in_at + LIFETIME + Duration::from_secs(1),
        "the refresh token says when its family ends, not in 30 days"
    );

    // A client refreshing diligently, four times a second.
    let mut refreshed = 0;
    let ended = loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        match client
            .refresh(RefreshRequest {
                refresh_token: pair.refresh_token.clone(),
            })
            .await
        {
            Ok(next) => {
                assert!(
                    started.elapsed() < LIFETIME + Duration::from_millis(500),
                    "refreshed after the family's end: {:?}",
                    started.elapsed()
                );
                refreshed += 1;
                pair = next.into_inner();
            }
            Err(status) => break status,
        }
    };
    assert_eq!(ended.code(), Code::Unauthenticated, "{ended:?}");
    assert!(
        started.elapsed() >= LIFETIME - Duration::from_millis(100),
        "ended early: {:?}",
        started.elapsed()
    );
    assert!(refreshed >= 5, "refreshed {refreshed} times");

    let next_login = login(&mut client, "hedy@example.com", PASSWORD)
        .await
        .unwrap();
    client
        .refresh(RefreshRequest {
            refresh_token: next_login.refresh_token,
        })
        .await
        .expect("a new login starts a new family");
}

#[tokio::test]
async fn a_hash_made_with_the_old_parameters_is_replaced_at_the_next_login() {
    use argon2::password_hash::PasswordHasher as _;
    let auth = start(&[]).await;
    let user_id = auth.register("barbara@example.com").await;
    // What this service stored before: argon2id with m = 19 MiB, t = 2.
    let old = argon2::Argon2::new(
        argon2::Algorithm::Argon2id,
        argon2::Version::V0x13,
        argon2::Params::new(19 * 1024, 2, 1, None).unwrap(),
    )
    .hash_password(PASSWORD.as_bytes())
    .unwrap()
    .to_string();
    let pool = auth.scenario.inspect().await.unwrap();
    let stored = async |pool: &sqlx::PgPool| -> String {
        sqlx::query_scalar("SELECT password_hash FROM auth.users WHERE user_id = $1::uuid")
            .bind(&user_id)
            .fetch_one(pool)
            .await
            .unwrap()
    };
    sqlx::query("UPDATE auth.users SET password_hash = $2 WHERE user_id = $1::uuid")
        .bind(&user_id)
        .bind(&old)
        .execute(&pool)
        .await
        .unwrap();

    let mut client = auth.client_from("127.0.8.4").await;
    let wrong = login(&mut client, "barbara@example.com", "not the password")
        .await
        .unwrap_err();
    assert_eq!(wrong.code(), Code::Unauthenticated);
    assert_eq!(stored(&pool).await, old, "a wrong password changes nothing");
    login(&mut client, "barbara@example.com", PASSWORD)
        .await
        .expect("an old hash still verifies");
    let new = stored(&pool).await;
    assert!(new.starts_with("$argon2id$v=19$m=12288,t=3,p=1$"), "{new}");
    login(&mut client, "barbara@example.com", PASSWORD)
        .await
        .expect("and so does its replacement");
    pool.close().await;
}
