//! Retention and signing keys at rest: the purge job removes what is past
//! its retention in bounded batches while the service serves, and private
//! keys are sealed with the key-encryption key.

use std::time::Duration;

use api_auth::v1::{GetPublicKeysRequest, RotateSigningKeyRequest};
use sqlx::PgPool;
use testkit::grpc::bearer;
use testkit::{Scenario, ServiceUnderTest};

use super::{ADMIN_EMAIL, ADMIN_PASSWORD, Auth, BINARY, channel, login};
use api_auth::v1::auth_service_client::AuthServiceClient;

/// The scenario's auth schema, migrated as the service would, so that a
/// test can fill it before the service's first purge pass (at its start).
async fn migrated(scenario: &Scenario) -> PgPool {
    let url = scenario
        .database
        .provision(&BINARY.account())
        .await
        .unwrap();
    let pool = PgPool::connect(&url).await.unwrap();
    sqlx::query("SET search_path TO auth")
        .execute(&pool)
        .await
        .unwrap();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect_with(
            pool.connect_options()
                .as_ref()
                .clone()
                .options([("search_path", auth_service::SCHEMA)]),
        )
        .await
        .unwrap();
    database::migrate(&pool, &[messaging::MIGRATIONS, auth_service::MIGRATIONS])
        .await
        .unwrap();
    pool
}

async fn start_on(scenario: Scenario, extra_env: &[(&str, &str)]) -> Auth {
    let clients = format!(
        "saga-orchestrator={} payments:charge payments:refund orders:settle",
        super::SERVICE_SECRET
    );
    let mut env = vec![
        ("AUTH_ADMIN_EMAIL", ADMIN_EMAIL),
        ("AUTH_ADMIN_PASSWORD", ADMIN_PASSWORD),
        ("AUTH_SERVICE_CLIENTS", clients.as_str()),
    ];
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

/// `/metrics` of the service, by a plain HTTP/1.1 request.
async fn metrics(auth: &Auth) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let address = auth._service.process.http_address().unwrap();
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut body = String::new();
    stream.read_to_string(&mut body).await.unwrap();
    body
}

fn counter(metrics: &str, name: &str, table: &str) -> u64 {
    let series = format!("{name}{{table=\"{table}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(&series))
        .map_or(0, |value| value.trim().parse().unwrap())
}

/// Every table the auth service purges, each filled with 35 rows past its
/// retention and 5 within it.
const TABLES: [&str; 7] = [
    "inbox",
    "refresh_tokens",
    "refresh_token_families",
    "login_attempts",
    "registration_pace",
    "login_throttle",
    "signing_keys",
];

const FILL: &str = "
    INSERT INTO inbox (consumer, event_id, outcome, processed_at)
    SELECT 'somebody', gen_random_uuid(), 'handled',
           CASE WHEN n <= 35 THEN now() - interval '31 days' - n * interval '1 second' ELSE now() END
    FROM generate_series(1, 40) AS n;

    INSERT INTO users (user_id, email, display_name, password_hash, role)
    VALUES ('00000000-0000-7000-8000-000000000001', 'old@example.com', 'Old', 'x', 'customer');
    -- 35 families past their lifetime (90 days) and retention (7 days), 5 young.
    INSERT INTO refresh_token_families (family_id, user_id, created_at)
    SELECT gen_random_uuid(), '00000000-0000-7000-8000-000000000001',
           CASE WHEN n <= 35 THEN now() - interval '98 days' - n * interval '1 second' ELSE now() END
    FROM generate_series(1, 40) AS n;
    -- In one young family: 35 tokens expired over 7 days ago, 5 live.
    INSERT INTO refresh_tokens (token_hash, family_id, expires_at)
    SELECT sha256(n::text::bytea),
           (SELECT family_id FROM refresh_token_families WHERE created_at > now() - interval '1 day' LIMIT 1),
           CASE WHEN n <= 35 THEN now() - interval '8 days' - n * interval '1 second' ELSE now() + interval '1 day' END
    FROM generate_series(1, 40) AS n;

    INSERT INTO login_attempts (subject, failures, last_attempt_at, forget_at)
    SELECT 'source:10.0.0.' || n, 1,
           now() - interval '3 days',
           CASE WHEN n <= 35 THEN now() - interval '2 days' - n * interval '1 second' ELSE now() + interval '1 hour' END
    FROM generate_series(1, 40) AS n;

    INSERT INTO registration_pace (source, restored_at)
    SELECT '10.0.1.' || n,
           CASE WHEN n <= 35 THEN now() - interval '2 days' - n * interval '1 second' ELSE now() + interval '1 minute' END
    FROM generate_series(1, 40) AS n;

    INSERT INTO login_throttle (subject, failures, window_started_at)
    SELECT 'peer:10.0.2.' || n, 1,
           CASE WHEN n <= 35 THEN now() - interval '2 days' - n * interval '1 second' ELSE now() END
    FROM generate_series(1, 40) AS n;

    -- Retired keys: 35 whose last token expired over 30 days ago, 5 that
    -- still verify. Only public halves, as rotation leaves them.
    INSERT INTO signing_keys (kid, public_key, created_at, retired_at, verify_until)
    SELECT 'retired-' || n, sha256(n::text::bytea), now() - interval '60 days', now() - interval '59 days',
           CASE WHEN n <= 35 THEN now() - interval '31 days' - n * interval '1 second' ELSE now() + interval '10 minutes' END
    FROM generate_series(1, 40) AS n;
";

async fn remaining(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_purge_removes_rows_past_their_retention_in_bounded_batches_while_serving() {
    let scenario = Scenario::new(&[BINARY.manifest]).await.unwrap();
    let pool = migrated(&scenario).await;
    sqlx::raw_sql(FILL).execute(&pool).await.unwrap();
    let before_current_key = remaining(&pool, "signing_keys").await;
    assert_eq!(before_current_key, 40);

    // One pass at start, the next an hour later: what the counters show is
    // that one pass.
    let auth = start_on(
        scenario,
        &[("PURGE_BATCH_SIZE", "10"), ("PURGE_INTERVAL", "1h")],
    )
    .await;

    // The service keeps answering while it purges.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut client = auth.client.clone();
    loop {
        let keys = client
            .get_public_keys(GetPublicKeysRequest {})
            .await
            .unwrap()
            .into_inner()
            .keys;
        assert!(!keys.is_empty());
        let body = metrics(&auth).await;
        if TABLES
            .iter()
            .all(|table| counter(&body, "purged_rows_total", table) >= 35)
        {
            for table in TABLES {
                assert_eq!(
                    (
                        counter(&body, "purged_rows_total", table),
                        counter(&body, "purge_statements_total", table)
                    ),
                    (35, 4),
                    "{table}: 35 rows in batches of 10 take 4 statements"
                );
            }
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the purge did not finish:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    for table in TABLES {
        let left = remaining(&pool, table).await;
        // The service's own key, and the family and user it made for the
        // admin, are not part of the fill.
        let own = match table {
            "signing_keys" => 1,
            _ => 0,
        };
        assert_eq!(left, 5 + own, "{table}: the recent rows stay");
    }
    // The young family with live tokens is still there, its tokens too.
    let live_tokens: i64 =
        sqlx::query_scalar("SELECT count(*) FROM refresh_tokens WHERE expires_at > now()")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(live_tokens, 5);
}

/// Whether any 32 bytes of `stored` are the seed of `public_key`: a
/// plaintext private key, wherever it sits in the value.
fn holds_the_seed_of(stored: &[u8], public_key: &[u8]) -> bool {
    stored.windows(32).any(|window| {
        let seed: [u8; 32] = window.try_into().unwrap();
        ed25519_dalek::SigningKey::from_bytes(&seed)
            .verifying_key()
            .as_bytes()
            == public_key
    })
}

fn kid_of(token: &str) -> String {
    use base64::Engine as _;
    let header = token.split('.').next().unwrap();
    let header: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(header)
            .unwrap(),
    )
    .unwrap();
    header["kid"].as_str().unwrap().to_owned()
}

#[derive(Debug, sqlx::FromRow)]
struct KeyRow {
    kid: String,
    private_key: Option<Vec<u8>>,
    sealed_private_key: Option<Vec<u8>>,
    public_key: Vec<u8>,
}

async fn key_rows(pool: &PgPool) -> Vec<KeyRow> {
    sqlx::query_as(
        "SELECT kid, private_key, sealed_private_key, public_key FROM signing_keys ORDER BY created_at",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn signing_keys_are_sealed_at_rest_and_open_only_with_their_key() {
    let scenario = Scenario::new(&[BINARY.manifest]).await.unwrap();
    let pool = migrated(&scenario).await;
    // A key stored in plaintext by the version before sealing.
    let seed: [u8; 32] = rand::random();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    sqlx::query(
        "INSERT INTO signing_keys (kid, private_key, public_key) VALUES ('legacy', $1, $2)",
    )
    .bind(seed.as_slice())
    .bind(public.as_slice())
    .execute(&pool)
    .await
    .unwrap();

    let mut auth = start_on(scenario, &[]).await;
    let rows = key_rows(&pool).await;
    assert_eq!(rows.len(), 1, "the stored key stays current");
    let legacy = &rows[0];
    assert_eq!(legacy.kid, "legacy");
    assert_eq!(legacy.private_key, None, "the plaintext is gone");
    let sealed = legacy.sealed_private_key.as_deref().unwrap();
    assert!(!holds_the_seed_of(sealed, &legacy.public_key));

    // It still signs: opened with the key-encryption key.
    let admin = login(&mut auth.client, ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .unwrap()
        .access_token;
    assert_eq!(kid_of(&admin), "legacy");

    // A restart with the same key-encryption key verifies the token signed
    // before it, and signs with the sealed keys.
    let scenario = {
        let Auth {
            scenario,
            mut _service,
            ..
        } = auth;
        _service
            .process
            .stop(Duration::from_secs(10))
            .await
            .unwrap();
        scenario
    };
    let mut auth = start_on(scenario, &[]).await;
    let rotated = auth
        .client
        .rotate_signing_key(bearer(RotateSigningKeyRequest {}, &admin))
        .await
        .expect("the admin token from before the restart verifies")
        .into_inner();
    let rows = key_rows(&pool).await;
    assert_eq!(rows.len(), 2);
    let (retired, current) = (&rows[0], &rows[1]);
    assert_eq!(current.kid, rotated.kid);
    assert_eq!(
        (
            retired.private_key.as_deref(),
            retired.sealed_private_key.as_deref()
        ),
        (None, None),
        "a retired key keeps only its public half"
    );
    let sealed = current.sealed_private_key.as_deref().unwrap();
    assert!(current.private_key.is_none());
    assert!(!holds_the_seed_of(sealed, &current.public_key));
    let fresh = login(&mut auth.client, ADMIN_EMAIL, ADMIN_PASSWORD)
        .await
        .unwrap()
        .access_token;
    assert_eq!(kid_of(&fresh), rotated.kid);

    // Another key-encryption key does not open them: the service refuses
    // to start, and says why.
    let Auth {
        scenario,
        mut _service,
        ..
    } = auth;
    _service
        .process
        .stop(Duration::from_secs(10))
        .await
        .unwrap();
    let url = scenario
        .database
        .provision(&BINARY.account())
        .await
        .unwrap();
    let wrong_key = "d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3JvbmctMzI=";
    assert_eq!(
        auth_service::KeyEncryptionKey::parse(wrong_key).map(|_| ()),
        Ok(())
    );
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(BINARY.path)
            .env_clear()
            .envs(scenario.service_env(&url))
            .env("GRPC_ADDR", "127.0.0.1:0")
            .env("AUTH_KEY_ENCRYPTION_KEY", wrong_key)
            .output(),
    )
    .await
    .expect("it stops at once")
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!output.status.success(), "{said}");
    assert!(
        said.contains("AUTH_KEY_ENCRYPTION_KEY does not open signing key"),
        "{said}"
    );
}
