//! Access tokens (JWTs) and refresh tokens (opaque, stored hashed).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use access_control::{Claims, Role, Scopes, TokenSettings};
use anyhow::Context as _;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Header};
use sha2::{Digest as _, Sha256};

use crate::keys::SigningKey;

/// A signed access token and when it expires.
#[derive(Debug, Clone)]
pub(crate) struct AccessToken {
    pub(crate) token: String,
    pub(crate) expires_at: SystemTime,
    /// What the token's `scope` claim grants (nothing, for a user).
    pub(crate) scope: Scopes,
}

/// Signs an access token for `subject` with `role` (and, for a service,
/// its `scope`), valid for `ttl`.
pub(crate) fn sign(
    key: &SigningKey,
    settings: &TokenSettings,
    subject: &str,
    role: Role,
    scope: Scopes,
    ttl: Duration,
) -> anyhow::Result<AccessToken> {
    let now = SystemTime::now();
    let expires_at = now + ttl;
    let claims = Claims {
        sub: subject.to_owned(),
        role,
        iat: unix_seconds(now),
        exp: unix_seconds(expires_at),
        iss: settings.issuer.clone(),
        aud: settings.audience.clone(),
        jti: uuid::Uuid::new_v4().to_string(),
        scope: scope.clone(),
    };
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(key.kid.clone());
    let token =
        jsonwebtoken::encode(&header, &claims, &key.encoding).context("signing an access token")?;
    Ok(AccessToken {
        token,
        expires_at,
        scope,
    })
}

fn unix_seconds(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// A new refresh token: 32 random bytes, URL-safe base64.
pub(crate) fn new_refresh_token() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What is stored for a refresh token: its SHA-256. The token has 256 bits
/// of entropy, so a fast hash is enough (no salt or stretching needed).
pub(crate) fn refresh_token_hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// Whether `token` looks like one of ours (so garbage is INVALID_ARGUMENT,
/// not a database lookup).
pub(crate) fn is_well_formed_refresh_token(token: &str) -> bool {
    token.len() == 43
        && URL_SAFE_NO_PAD
            .decode(token)
            .is_ok_and(|bytes| bytes.len() == 32)
}
