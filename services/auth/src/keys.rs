//! The Ed25519 keys that sign access tokens, kept in the `auth` schema.
//!
//! One key is current and signs; `RotateSigningKey` retires it and makes a
//! new one current. A retired key is still published, and still verifies,
//! until every token it can have signed has expired. Private keys are read
//! only to sign and never formatted anywhere.

use std::time::{Duration, SystemTime};

use access_control::{KeySource, VerificationKey};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use jsonwebtoken::EncodingKey;
use sqlx::{PgConnection, PgPool};

/// PKCS#8 v1 prefix of an Ed25519 private key: the DER that wraps the
/// 32-byte seed (RFC 8410), which is the form `jsonwebtoken` reads.
const PKCS8_ED25519_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The key that signs now.
pub(crate) struct SigningKey {
    pub(crate) kid: String,
    pub(crate) encoding: EncodingKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

/// A published key.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct PublicKeyRow {
    pub(crate) kid: String,
    pub(crate) public_key: Vec<u8>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) verify_until: Option<DateTime<Utc>>,
}

#[derive(Debug, sqlx::FromRow)]
struct PrivateKeyRow {
    kid: String,
    private_key: Vec<u8>,
}

/// Makes sure a current key exists. Replicas starting together may all try;
/// the unique index lets one insert win and the others do nothing.
pub(crate) async fn ensure_current(pool: &PgPool) -> anyhow::Result<()> {
    let (seed, public) = generate();
    sqlx::query(
        "INSERT INTO signing_keys (kid, private_key, public_key) VALUES ($1, $2, $3)
         ON CONFLICT ((true)) WHERE retired_at IS NULL DO NOTHING",
    )
    .bind(new_kid())
    .bind(seed.as_slice())
    .bind(public.as_slice())
    .execute(pool)
    .await
    .context("creating the first signing key")?;
    Ok(())
}

/// The current signing key.
pub(crate) async fn current(conn: &mut PgConnection) -> anyhow::Result<SigningKey> {
    let row: PrivateKeyRow =
        sqlx::query_as("SELECT kid, private_key FROM signing_keys WHERE retired_at IS NULL")
            .fetch_one(conn)
            .await
            .context("reading the current signing key")?;
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&row.private_key);
    Ok(SigningKey {
        kid: row.kid,
        encoding: EncodingKey::from_ed_der(&der),
    })
}

/// Retires the current key and makes a new one current. The retired key
/// keeps verifying for `longest_token_life` (plus a minute of clock skew).
pub(crate) async fn rotate(
    pool: &PgPool,
    longest_token_life: Duration,
) -> anyhow::Result<PublicKeyRow> {
    let mut tx = pool.begin().await?;
    let grace = chrono::Duration::from_std(longest_token_life + Duration::from_secs(60))?;
    // Locking the current row serialises concurrent rotations.
    sqlx::query(
        "UPDATE signing_keys SET retired_at = now(), verify_until = now() + $1
         WHERE kid = (SELECT kid FROM signing_keys WHERE retired_at IS NULL FOR UPDATE)",
    )
    .bind(grace)
    .execute(&mut *tx)
    .await
    .context("retiring the current signing key")?;
    let (seed, public) = generate();
    let row: PublicKeyRow = sqlx::query_as(
        "INSERT INTO signing_keys (kid, private_key, public_key) VALUES ($1, $2, $3)
         RETURNING kid, public_key, created_at, verify_until",
    )
    .bind(new_kid())
    .bind(seed.as_slice())
    .bind(public.as_slice())
    .fetch_one(&mut *tx)
    .await
    .context("creating the new signing key")?;
    tx.commit().await?;
    tracing::info!(kid = %row.kid, "rotated the signing key");
    Ok(row)
}

/// Every key that may still verify a valid token, the current one first.
pub(crate) async fn published(pool: &PgPool) -> anyhow::Result<Vec<PublicKeyRow>> {
    sqlx::query_as(
        "SELECT kid, public_key, created_at, verify_until FROM signing_keys
         WHERE verify_until IS NULL OR verify_until > now()
         ORDER BY retired_at IS NULL DESC, created_at DESC",
    )
    .fetch_all(pool)
    .await
    .context("reading the published keys")
}

/// The auth service verifies its own tokens (for its admin RPC) straight
/// from its database.
#[derive(Debug, Clone)]
pub(crate) struct LocalKeys(pub PgPool);

impl KeySource for LocalKeys {
    fn fetch(&self) -> BoxFuture<'_, anyhow::Result<Vec<VerificationKey>>> {
        Box::pin(async move {
            Ok(published(&self.0)
                .await?
                .into_iter()
                .map(|row| VerificationKey {
                    kid: row.kid,
                    public_key: row.public_key,
                    verify_until: row.verify_until.map(SystemTime::from),
                })
                .collect())
        })
    }
}

/// A fresh key pair: a 32-byte seed from a CSPRNG seeded by the OS,
/// and its public key.
fn generate() -> ([u8; 32], [u8; 32]) {
    let seed: [u8; 32] = rand::random();
    let public = ed25519_dalek::SigningKey::from_bytes(&seed)
        .verifying_key()
        .to_bytes();
    (seed, public)
}

fn new_kid() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}
