use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use api_auth::v1::GetPublicKeysRequest;
use api_auth::v1::auth_service_client::AuthServiceClient;
use futures::future::BoxFuture;
use jsonwebtoken::DecodingKey;

/// The public half of a signing key, as published by the auth service.
#[derive(Debug, Clone)]
pub struct VerificationKey {
    pub kid: String,
    /// The 32-byte Ed25519 public key.
    pub public_key: Vec<u8>,
    /// After this, no token signed by the key is valid; `None` while it signs.
    pub verify_until: Option<SystemTime>,
}

/// Where verification keys come from.
pub trait KeySource: Send + Sync + 'static {
    fn fetch(&self) -> BoxFuture<'_, anyhow::Result<Vec<VerificationKey>>>;
}

/// The auth service's `GetPublicKeys`.
#[derive(Debug, Clone)]
pub struct RemoteKeys {
    client: AuthServiceClient<crate::AuthChannel>,
}

impl RemoteKeys {
    /// Connects lazily: the auth service may start after us.
    pub fn new(url: &str, tls: &tls::Tls) -> anyhow::Result<Self> {
        let channel = crate::auth_channel(url, tls)?;
        Ok(Self {
            client: AuthServiceClient::new(channel),
        })
    }
}

impl KeySource for RemoteKeys {
    fn fetch(&self) -> BoxFuture<'_, anyhow::Result<Vec<VerificationKey>>> {
        let mut client = self.client.clone();
        Box::pin(async move {
            let response = client
                .get_public_keys(GetPublicKeysRequest {})
                .await
                .context("fetching public keys from the auth service")?;
            Ok(response
                .into_inner()
                .keys
                .into_iter()
                .map(|key| VerificationKey {
                    kid: key.kid,
                    public_key: key.public_key,
                    verify_until: key.verify_until.and_then(|t| SystemTime::try_from(t).ok()),
                })
                .collect())
        })
    }
}

/// Why no key could be found for a token.
#[derive(Debug, thiserror::Error)]
pub enum KeyLookupError {
    /// The key id is not one the auth service publishes (or has expired).
    #[error("unknown signing key {0:?}")]
    Unknown(String),
    /// No keys at all: the auth service has not answered yet.
    #[error("no verification keys available yet: {0:#}")]
    Unavailable(anyhow::Error),
}

struct CachedKey {
    decoding: DecodingKey,
    verify_until: Option<SystemTime>,
}

/// Verification keys by key id, fetched from a [`KeySource`] and cached.
///
/// A token naming an unknown key id triggers a fetch (concurrent lookups
/// share it), at most one per `min_refetch` so forged key ids cannot turn
/// into a flood of fetches. When a fetch fails, the cache stays as it was:
/// services keep verifying while the auth service is down.
pub struct KeyCache {
    source: Box<dyn KeySource>,
    keys: RwLock<HashMap<String, CachedKey>>,
    last_fetch: tokio::sync::Mutex<Option<Instant>>,
    min_refetch: Duration,
}

impl std::fmt::Debug for KeyCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<String> = self
            .keys
            .read()
            .map(|keys| keys.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("KeyCache")
            .field("kids", &kids)
            .finish_non_exhaustive()
    }
}

impl KeyCache {
    pub fn new(source: impl KeySource, min_refetch: Duration) -> Self {
        Self {
            source: Box::new(source),
            keys: RwLock::new(HashMap::new()),
            last_fetch: tokio::sync::Mutex::new(None),
            min_refetch,
        }
    }

    /// Fetches the keys now (at start, to be warm for the first request).
    pub async fn refresh(&self) -> anyhow::Result<()> {
        let mut last_fetch = self.last_fetch.lock().await;
        *last_fetch = Some(Instant::now());
        let keys = self.source.fetch().await?;
        self.replace(keys);
        Ok(())
    }

    /// The key `kid`, from cache or, if unknown, from a fresh fetch.
    pub async fn get(&self, kid: &str) -> Result<DecodingKey, KeyLookupError> {
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        let mut last_fetch = self.last_fetch.lock().await;
        // Someone may have fetched while we waited for the lock.
        if let Some(key) = self.cached(kid) {
            return Ok(key);
        }
        // Fetch at most once per `min_refetch`: a key that appeared just
        // after the last fetch (a rotation) waits for the next slot rather
        // than being refused, and a flood of forged key ids queues here and
        // costs the auth service one fetch per interval.
        if let Some(at) = *last_fetch {
            tokio::time::sleep_until((at + self.min_refetch).into()).await;
        }
        *last_fetch = Some(Instant::now());

        match self.source.fetch().await {
            Ok(keys) => {
                self.replace(keys);
                self.cached(kid)
                    .ok_or_else(|| KeyLookupError::Unknown(kid.to_owned()))
            }
            Err(error) if self.is_empty() => Err(KeyLookupError::Unavailable(error)),
            Err(error) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "could not refresh verification keys; using the cached ones"
                );
                Err(KeyLookupError::Unknown(kid.to_owned()))
            }
        }
    }

    fn cached(&self, kid: &str) -> Option<DecodingKey> {
        let keys = self.keys.read().expect("key cache lock");
        let key = keys.get(kid)?;
        let usable = key
            .verify_until
            .is_none_or(|until| SystemTime::now() < until);
        usable.then(|| key.decoding.clone())
    }

    fn is_empty(&self) -> bool {
        self.keys.read().expect("key cache lock").is_empty()
    }

    fn replace(&self, keys: Vec<VerificationKey>) {
        let fresh = keys
            .into_iter()
            .filter(|key| key.public_key.len() == 32)
            .map(|key| {
                let cached = CachedKey {
                    decoding: DecodingKey::from_ed_der(&key.public_key),
                    verify_until: key.verify_until,
                };
                (key.kid, cached)
            })
            .collect();
        *self.keys.write().expect("key cache lock") = fresh;
    }
}
