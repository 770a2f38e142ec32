//! Password hashing with argon2id at the OWASP-recommended cost.

use std::sync::Arc;

use anyhow::Context as _;
use argon2::password_hash::phc::PasswordHash;
use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
use argon2::{Algorithm, Argon2, Params, Version};
use tokio::sync::Semaphore;

use crate::domain::Password;

/// Hashes and verifies passwords off the async threads, a bounded number at
/// a time: each hash costs 19 MiB and tens of milliseconds of CPU, and an
/// unbounded number of them at once would starve everything else.
#[derive(Clone)]
pub(crate) struct Passwords {
    argon2: Argon2<'static>,
    permits: Arc<Semaphore>,
    /// Verified against when the email is unknown, so that a login for a
    /// missing account costs what one for an existing account costs.
    dummy_hash: Arc<str>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("available", &self.permits.available_permits())
            .finish_non_exhaustive()
    }
}

impl Passwords {
    /// argon2id, m = 19 MiB, t = 2, p = 1 (OWASP's first recommendation).
    pub(crate) fn new(concurrency: usize) -> anyhow::Result<Self> {
        let params = Params::new(19 * 1024, 2, 1, None)
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let dummy_hash = argon2
            .hash_password(b"a password nobody has")
            .map_err(|e| anyhow::anyhow!("hashing the dummy password: {e}"))?
            .to_string();
        Ok(Self {
            argon2,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            dummy_hash: dummy_hash.into(),
        })
    }

    /// The PHC string of a new hash of `password`, with a fresh salt.
    pub(crate) async fn hash(&self, password: &Password) -> anyhow::Result<String> {
        let _permit = self
            .permits
            .acquire()
            .await
            .context("password hasher closed")?;
        let argon2 = self.argon2.clone();
        let password = password.expose().to_owned();
        tokio::task::spawn_blocking(move || {
            argon2
                .hash_password(password.as_bytes())
                .map(|hash| hash.to_string())
                .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))
        })
        .await?
    }

    /// Whether `password` matches `stored` (a PHC string). With no stored
    /// hash the dummy is checked instead, and the answer is no.
    pub(crate) async fn verify(
        &self,
        password: &Password,
        stored: Option<&str>,
    ) -> anyhow::Result<bool> {
        let _permit = self
            .permits
            .acquire()
            .await
            .context("password hasher closed")?;
        let argon2 = self.argon2.clone();
        let known = stored.is_some();
        let hash = stored.map_or_else(|| self.dummy_hash.to_string(), str::to_owned);
        let password = password.expose().to_owned();
        let matches = tokio::task::spawn_blocking(move || -> anyhow::Result<bool> {
            let parsed = PasswordHash::new(&hash)
                .map_err(|e| anyhow::anyhow!("stored hash is not a PHC string: {e}"))?;
            Ok(argon2.verify_password(password.as_bytes(), &parsed).is_ok())
        })
        .await??;
        Ok(known && matches)
    }
}
