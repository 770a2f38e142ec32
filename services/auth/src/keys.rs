//! The Ed25519 keys that sign access tokens, kept in the `auth` schema.
//!
//! One key is current and signs; `RotateSigningKey` retires it and makes a
//! new one current. A retired key is still published, and still verifies,
//! until every token it can have signed has expired. Private keys are read
//! only to sign and never formatted anywhere.
//!
//! At rest a private key is sealed with the key-encryption key from the
//! settings (`AUTH_KEY_ENCRYPTION_KEY`), ChaCha20-Poly1305 with the key's
//! `kid` as associated data, so a copy of the table (a backup, a replica, a
//! stolen dump) signs nothing, and a sealed key moved to another row does
//! not open. A retired key can never sign again, so rotation deletes its
//! private half at once and only the public half stays, for as long as
//! tokens it signed are valid; the purge job deletes the row some time after
//! that (`signing_key_purge`).
use std::time::{Duration, SystemTime};

use access_control::{KeySource, VerificationKey};
use anyhow::{Context as _, bail};
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
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

/// The key that seals signing keys at rest: 32 bytes, given base64-encoded.
#[derive(Clone)]
pub struct KeyEncryptionKey(chacha20poly1305::Key);

impl std::fmt::Debug for KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KeyEncryptionKey(..)")
    }
}

impl KeyEncryptionKey {
    /// Standard base64 (padded or not) of exactly 32 bytes, e.g. from
    /// `openssl rand -base64 32`.
    pub fn parse(value: &str) -> Result<Self, String> {
        use base64::Engine as _;
        let value = value.trim().trim_end_matches('=');
        let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
            .decode(value)
            .map_err(|_| "is not base64".to_owned())?;
        let key: [u8; 32] = bytes
            .try_into()
            .map_err(|bytes: Vec<u8>| format!("is {} bytes; it must be 32", bytes.len()))?;
        Ok(Self(key.into()))
    }

    /// `seed` sealed for the row `kid`: a format byte, a random nonce, then
    /// the ciphertext and its tag.
    fn seal(&self, kid: &str, seed: &[u8; 32]) -> Vec<u8> {
        let nonce: [u8; 12] = rand::random();
        let sealed = ChaCha20Poly1305::new(&self.0)
            .encrypt(
                &Nonce::from(nonce),
                Payload {
                    msg: seed,
                    aad: kid.as_bytes(),
                },
            )
            .expect("sealing 32 bytes cannot fail");
        let mut stored = Vec::with_capacity(1 + nonce.len() + sealed.len());
        stored.push(SEALED_FORMAT);
        stored.extend_from_slice(&nonce);
        stored.extend_from_slice(&sealed);
        stored
    }

    /// The seed sealed for row `kid`; an error if this is not the key that
    /// sealed it (or the bytes were altered, or moved from another row).
    /// Public for tools that hold the key-encryption key (and for tests
    /// that play an attacker holding it).
    pub fn open(&self, kid: &str, stored: &[u8]) -> anyhow::Result<[u8; 32]> {
        let Some((&SEALED_FORMAT, rest)) = stored.split_first() else {
            bail!("signing key {kid} is sealed in an unknown format");
        };
        let Some((nonce, sealed)) = rest.split_first_chunk::<12>() else {
            bail!("signing key {kid} is sealed in an unknown format");
        };
        let seed = ChaCha20Poly1305::new(&self.0)
            .decrypt(
                &Nonce::from(*nonce),
                Payload {
                    msg: sealed,
                    aad: kid.as_bytes(),
                },
            )
            .map_err(|_| {
                anyhow::anyhow!(
                    "AUTH_KEY_ENCRYPTION_KEY does not open signing key {kid}: it is not the key \
                     the signing keys were sealed with"
                )
            })?;
        seed.try_into()
            .map_err(|_| anyhow::anyhow!("signing key {kid} does not hold a 32-byte seed"))
    }
}

/// The first byte of a sealed key: ChaCha20-Poly1305 under the one KEK.
/// (Another value would name another scheme, e.g. after a KEK rotation.)
const SEALED_FORMAT: u8 = 1;

#[derive(Debug, sqlx::FromRow)]
struct StoredKeyRow {
    kid: String,
    private_key: Option<Vec<u8>>,
    sealed_private_key: Option<Vec<u8>>,
}

/// Brings the stored keys to what this version keeps at rest, and checks
/// that `kek` is the key they are sealed with; run at start, before
/// anything signs.
///
/// - Retired keys lose their private halves (they can no longer sign).
/// - A private key stored in plaintext (by a version before sealing) is
///   sealed, and its plaintext cleared in the same update.
/// - Every sealed key must open with `kek`: a wrong key stops the service
///   here, with an error that says so, rather than at its first login.
///
/// Replicas starting together may all do this: each update applies only
/// to a row still in the state it was read in.
pub(crate) async fn secure_at_rest(pool: &PgPool, kek: &KeyEncryptionKey) -> anyhow::Result<()> {
    let retired = sqlx::query(
        "UPDATE signing_keys SET private_key = NULL, sealed_private_key = NULL
         WHERE retired_at IS NOT NULL AND (private_key IS NOT NULL OR sealed_private_key IS NOT NULL)",
    )
    .execute(pool)
    .await
    .context("deleting the private halves of retired signing keys")?
    .rows_affected();
    if retired > 0 {
        tracing::info!(
            keys = retired,
            "deleted the private halves of retired signing keys"
        );
    }
    // Only the current key has a private half now: one row.
    let stored: Vec<StoredKeyRow> = sqlx::query_as(
        "SELECT kid, private_key, sealed_private_key FROM signing_keys WHERE retired_at IS NULL",
    )
    .fetch_all(pool)
    .await
    .context("reading the current signing key")?;
    for row in stored {
        match (row.private_key, row.sealed_private_key) {
            (_, Some(sealed)) => {
                kek.open(&row.kid, &sealed)?;
            }
            (Some(plain), None) => {
                let seed: [u8; 32] = plain.as_slice().try_into().map_err(|_| {
                    anyhow::anyhow!("signing key {} does not hold a 32-byte seed", row.kid)
                })?;
                sqlx::query(
                    "UPDATE signing_keys SET sealed_private_key = $2, private_key = NULL
                     WHERE kid = $1 AND private_key IS NOT NULL AND sealed_private_key IS NULL",
                )
                .bind(&row.kid)
                .bind(kek.seal(&row.kid, &seed))
                .execute(pool)
                .await
                .context("sealing a signing key stored in plaintext")?;
                tracing::info!(kid = %row.kid, "sealed a signing key stored in plaintext");
            }
            (None, None) => bail!("the current signing key {} has no private half", row.kid),
        }
    }
    Ok(())
}

/// Makes sure a current key exists. Replicas starting together may all try;
/// the unique index lets one insert win and the others do nothing.
pub(crate) async fn ensure_current(pool: &PgPool, kek: &KeyEncryptionKey) -> anyhow::Result<()> {
    let (seed, public) = generate();
    let kid = new_kid();
    sqlx::query(
        "INSERT INTO signing_keys (kid, sealed_private_key, public_key) VALUES ($1, $2, $3)
         ON CONFLICT ((true)) WHERE retired_at IS NULL DO NOTHING",
    )
    .bind(&kid)
    .bind(kek.seal(&kid, &seed))
    .bind(public.as_slice())
    .execute(pool)
    .await
    .context("creating the first signing key")?;
    Ok(())
}

/// The current signing key.
pub(crate) async fn current(
    conn: &mut PgConnection,
    kek: &KeyEncryptionKey,
) -> anyhow::Result<SigningKey> {
    let (kid, sealed): (String, Option<Vec<u8>>) =
        sqlx::query_as("SELECT kid, sealed_private_key FROM signing_keys WHERE retired_at IS NULL")
            .fetch_one(conn)
            .await
            .context("reading the current signing key")?;
    let sealed = sealed.with_context(|| format!("the current signing key {kid} is not sealed"))?;
    let seed = kek.open(&kid, &sealed)?;
    let mut der = PKCS8_ED25519_PREFIX.to_vec();
    der.extend_from_slice(&seed);
    Ok(SigningKey {
        kid,
        encoding: EncodingKey::from_ed_der(&der),
    })
}

/// Retires the current key and makes a new one current. The retired key
/// keeps verifying for `longest_token_life` (plus a minute of clock skew);
/// its private half is deleted, since it will never sign again.
pub(crate) async fn rotate(
    pool: &PgPool,
    longest_token_life: Duration,
    kek: &KeyEncryptionKey,
) -> anyhow::Result<PublicKeyRow> {
    let mut tx = pool.begin().await?;
    let grace = chrono::Duration::from_std(longest_token_life + Duration::from_secs(60))?;
    // Locking the current row serialises concurrent rotations.
    sqlx::query(
        "UPDATE signing_keys SET retired_at = now(), verify_until = now() + $1,
                                 private_key = NULL, sealed_private_key = NULL
         WHERE kid = (SELECT kid FROM signing_keys WHERE retired_at IS NULL FOR UPDATE)",
    )
    .bind(grace)
    .execute(&mut *tx)
    .await
    .context("retiring the current signing key")?;
    let (seed, public) = generate();
    let kid = new_kid();
    let row: PublicKeyRow = sqlx::query_as(
        "INSERT INTO signing_keys (kid, sealed_private_key, public_key) VALUES ($1, $2, $3)
         RETURNING kid, public_key, created_at, verify_until",
    )
    .bind(&kid)
    .bind(kek.seal(&kid, &seed))
    .bind(public.as_slice())
    .fetch_one(&mut *tx)
    .await
    .context("creating the new signing key")?;
    tx.commit().await?;
    tracing::info!(kid = %row.kid, "rotated the signing key");
    Ok(row)
}

/// The purge of retired keys whose last token expired (`verify_until`)
/// longer than `retention` ago: by then they verify nothing and are no
/// longer published.
pub(crate) fn signing_key_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "signing_keys",
        retention,
        // Oldest first through `signing_keys_verify_until`.
        statement: "DELETE FROM signing_keys WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM signing_keys WHERE verify_until < now() - $1
                        ORDER BY verify_until LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    const KEK: &str = "b3JkZXJzYWdhLXRlc3Qta2V5LWVuY3J5cHRpb24tayE=";

    #[test]
    fn a_sealed_key_opens_only_with_its_kek_and_in_its_own_row() {
        let kek = KeyEncryptionKey::parse(KEK).unwrap();
        let seed: [u8; 32] = rand::random();
        let sealed = kek.seal("kid-1", &seed);
        assert_eq!(kek.open("kid-1", &sealed).unwrap(), seed);
        assert!(
            !sealed.windows(32).any(|window| window == seed),
            "the seed is not in the sealed bytes"
        );
        assert_ne!(kek.seal("kid-1", &seed), sealed, "a fresh nonce every time");

        let other =
            KeyEncryptionKey::parse("d3Jvbmctd3Jvbmctd3Jvbmctd3Jvbmctd3JvbmctMzI=").unwrap();
        let error = other.open("kid-1", &sealed).unwrap_err().to_string();
        assert!(
            error.contains("AUTH_KEY_ENCRYPTION_KEY does not open signing key kid-1"),
            "{error}"
        );
        assert!(kek.open("kid-2", &sealed).is_err(), "moved to another row");
        let mut altered = sealed.clone();
        *altered.last_mut().unwrap() ^= 1;
        assert!(kek.open("kid-1", &altered).is_err(), "altered");
        assert!(kek.open("kid-1", &sealed[..10]).is_err(), "cut short");
    }

    #[test]
    fn a_kek_is_32_bytes_of_base64() {
        assert!(KeyEncryptionKey::parse(KEK.trim_end_matches('=')).is_ok());
        assert_eq!(
            KeyEncryptionKey::parse("c2hvcnQ=").map(|_| ()),
            Err("is 5 bytes; it must be 32".to_owned())
        );
        assert_eq!(
            KeyEncryptionKey::parse("not base64!").map(|_| ()),
            Err("is not base64".to_owned())
        );
        assert_eq!(
            format!("{:?}", KeyEncryptionKey::parse(KEK).unwrap()),
            "KeyEncryptionKey(..)"
        );
    }
}
