use std::sync::Arc;

use jsonwebtoken::{Algorithm, Validation};

use crate::keys::KeyLookupError;
use crate::{AuthSettings, Claims, KeyCache, RemoteKeys, TokenSettings};

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    /// Not a token we accept: malformed, wrong algorithm, unknown key, bad
    /// signature, expired, or for another issuer or audience.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The keys to check it are not available (the auth service has not
    /// been reachable since start).
    #[error("{0}")]
    Unavailable(String),
}

/// Checks access tokens.
#[derive(Debug, Clone)]
pub struct Verifier {
    keys: Arc<KeyCache>,
    validation: Validation,
}

impl Verifier {
    pub fn new(keys: Arc<KeyCache>, settings: &TokenSettings) -> Self {
        // Only EdDSA: the header's `alg` must match, so a token claiming
        // `none` or HS256 (signed with the public key as an HMAC secret, the
        // classic confusion attack) is refused before any key is used.
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.set_issuer(&[&settings.issuer]);
        validation.set_audience(&[&settings.audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        validation.leeway = 5;
        Self { keys, validation }
    }

    /// A verifier whose keys come from the auth service named in
    /// `settings`. A first fetch starts now, so that the first request
    /// usually finds the keys in cache; if the auth service is not up yet,
    /// the first token seen fetches them. The auth service is reached as
    /// `tls` says: over TLS, only if its certificate chains to the CA.
    pub fn remote(settings: &AuthSettings, tls: &tls::Tls) -> anyhow::Result<Self> {
        let keys = Arc::new(KeyCache::new(
            RemoteKeys::new(&settings.url, tls)?,
            settings.key_refetch_interval,
        ));
        tokio::spawn({
            let keys = keys.clone();
            async move {
                if let Err(error) = keys.refresh().await {
                    tracing::info!(
                        error = format!("{error:#}"),
                        "verification keys not fetched yet"
                    );
                }
            }
        });
        Ok(Self::new(keys, &settings.token))
    }

    /// The claims of `token` if it is valid now.
    pub async fn verify(&self, token: &str) -> Result<Claims, VerifyError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|error| VerifyError::Invalid(error.to_string()))?;
        if header.alg != Algorithm::EdDSA {
            return Err(VerifyError::Invalid(format!(
                "algorithm {:?} is not accepted",
                header.alg
            )));
        }
        let kid = header
            .kid
            .ok_or_else(|| VerifyError::Invalid("no key id".into()))?;
        let key = self.keys.get(&kid).await.map_err(|error| match error {
            KeyLookupError::Unknown(_) => VerifyError::Invalid(error.to_string()),
            KeyLookupError::Unavailable(_) => VerifyError::Unavailable(error.to_string()),
        })?;
        jsonwebtoken::decode::<Claims>(token, &key, &self.validation)
            .map(|data| data.claims)
            .map_err(|error| VerifyError::Invalid(error.to_string()))
    }
}
