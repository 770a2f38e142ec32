//! The auth service's use cases, independent of gRPC.
//!
//! Each use case has its own error type; `grpc.rs` maps each variant to a
//! status on purpose.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use access_control::{Role, TokenSettings};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use messaging::Topics;
use messaging::envelope::EventMeta;
use sqlx::{PgConnection, PgPool};
use telemetry::CorrelationId;
use uuid::Uuid;

use crate::clients::ServiceClients;
use crate::domain::{DisplayName, Email, Password};
use crate::passwords::Passwords;
use crate::throttle::{self, Subjects, ThrottlePolicy};
use crate::tokens::{self, AccessToken};
use crate::{NAME, keys};

/// Lifetimes and limits of the auth service.
#[derive(Debug, Clone)]
pub(crate) struct AuthPolicy {
    pub(crate) tokens: TokenSettings,
    pub(crate) access_token_ttl: Duration,
    pub(crate) refresh_token_ttl: Duration,
    pub(crate) service_token_ttl: Duration,
    pub(crate) throttle: ThrottlePolicy,
    pub(crate) service_clients: ServiceClients,
}

/// What Login and Refresh hand out.
#[derive(Debug, Clone)]
pub(crate) struct TokenPair {
    pub(crate) access: AccessToken,
    pub(crate) refresh_token: String,
    pub(crate) refresh_expires_at: DateTime<Utc>,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RegisterError {
    #[error("the email is already registered")]
    EmailTaken,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoginError {
    #[error("invalid email or password")]
    InvalidCredentials,
    #[error("too many failed logins; retry in {0:?}")]
    Throttled(Duration),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RefreshError {
    /// Unknown, expired, revoked, or reused (which revokes its family).
    #[error("invalid refresh token")]
    InvalidToken,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientCredentialsError {
    #[error("invalid client credentials")]
    InvalidCredentials,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// The auth service's state: its database, password hasher and policy.
#[derive(Debug, Clone)]
pub(crate) struct Auth {
    pool: PgPool,
    passwords: Passwords,
    policy: Arc<AuthPolicy>,
    topics: Topics,
}

impl Auth {
    pub(crate) fn new(
        pool: PgPool,
        passwords: Passwords,
        policy: AuthPolicy,
        topics: Topics,
    ) -> Self {
        Self {
            pool,
            passwords,
            policy: Arc::new(policy),
            topics,
        }
    }

    pub(crate) fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Creates a customer account and announces it.
    pub(crate) async fn register(
        &self,
        email: &Email,
        password: &Password,
        name: &DisplayName,
    ) -> Result<Uuid, RegisterError> {
        let hash = self.passwords.hash(password).await?;
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        let user_id = insert_user(&mut tx, email, name, &hash, Role::Customer, &self.topics)
            .await?
            .ok_or(RegisterError::EmailTaken)?;
        tx.commit().await.context("committing the registration")?;
        Ok(user_id)
    }

    /// Creates the configured admin on first start (nothing if the email
    /// exists; safe when replicas start together).
    pub(crate) async fn bootstrap_admin(
        &self,
        email: &Email,
        password: &Password,
    ) -> anyhow::Result<()> {
        let hash = self.passwords.hash(password).await?;
        let name = DisplayName::parse("Administrator").map_err(anyhow::Error::msg)?;
        let mut tx = self.pool.begin().await?;
        if insert_user(&mut tx, email, &name, &hash, Role::Admin, &self.topics)
            .await?
            .is_some()
        {
            tracing::info!(%email, "created the bootstrap admin");
        }
        tx.commit().await?;
        Ok(())
    }

    /// Checks credentials and starts a new token family.
    ///
    /// An unknown email and a wrong password take the same path through the
    /// password hasher and give the same error.
    pub(crate) async fn login(
        &self,
        email: &Email,
        password: &Password,
        peer: Option<IpAddr>,
    ) -> Result<TokenPair, LoginError> {
        let subjects = Subjects::new(email, peer);
        let mut conn = self
            .pool
            .acquire()
            .await
            .context("acquiring a connection")?;
        if let Some(wait) = throttle::blocked_for(&mut conn, &subjects).await? {
            return Err(LoginError::Throttled(wait));
        }
        let user: Option<(Uuid, String, String)> =
            sqlx::query_as("SELECT user_id, password_hash, role FROM users WHERE email = $1")
                .bind(email.as_str())
                .fetch_optional(&mut *conn)
                .await
                .context("looking up the user")?;
        let matches = self
            .passwords
            .verify(password, user.as_ref().map(|(_, hash, _)| hash.as_str()))
            .await?;
        let Some((user_id, _, role)) = user.filter(|_| matches) else {
            throttle::record_failure(&mut conn, &subjects, &self.policy.throttle).await?;
            return Err(LoginError::InvalidCredentials);
        };
        let role = parse_role(&role)?;
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        throttle::record_success(&mut tx, &subjects).await?;
        let family_id = Uuid::now_v7();
        sqlx::query("INSERT INTO refresh_token_families (family_id, user_id) VALUES ($1, $2)")
            .bind(family_id)
            .bind(user_id)
            .execute(&mut *tx)
            .await
            .context("starting a token family")?;
        let pair = self.issue_pair(&mut tx, family_id, user_id, role).await?;
        tx.commit().await.context("committing the login")?;
        Ok(pair)
    }

    /// Exchanges a refresh token for a new pair. A token presented a second
    /// time revokes its whole family: either the client or a thief holds a
    /// copy, and we cannot tell which.
    pub(crate) async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, RefreshError> {
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        let found: Option<(Uuid, Uuid, String, bool, bool, bool)> = sqlx::query_as(
            "SELECT f.family_id, f.user_id, u.role,
                    t.used_at IS NOT NULL, t.expires_at <= now(), f.revoked_at IS NOT NULL
             FROM refresh_tokens t
             JOIN refresh_token_families f USING (family_id)
             JOIN users u USING (user_id)
             WHERE t.token_hash = $1
             FOR UPDATE OF t, f",
        )
        .bind(tokens::refresh_token_hash(refresh_token))
        .fetch_optional(&mut *tx)
        .await
        .context("looking up the refresh token")?;
        let Some((family_id, user_id, role, used, expired, revoked)) = found else {
            return Err(RefreshError::InvalidToken);
        };
        if revoked || expired {
            return Err(RefreshError::InvalidToken);
        }
        if used {
            revoke_family(&mut tx, family_id, "refresh token reused").await?;
            tx.commit().await.context("committing the revocation")?;
            tracing::warn!(%family_id, %user_id, "refresh token reused; revoked its family");
            return Err(RefreshError::InvalidToken);
        }
        sqlx::query("UPDATE refresh_tokens SET used_at = now() WHERE token_hash = $1")
            .bind(tokens::refresh_token_hash(refresh_token))
            .execute(&mut *tx)
            .await
            .context("spending the refresh token")?;
        let pair = self
            .issue_pair(&mut tx, family_id, user_id, parse_role(&role)?)
            .await?;
        tx.commit().await.context("committing the refresh")?;
        Ok(pair)
    }

    /// Revokes the family of a refresh token; `Ok` also when it already was.
    pub(crate) async fn logout(&self, refresh_token: &str) -> Result<(), RefreshError> {
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        let family: Option<Uuid> =
            sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
                .bind(tokens::refresh_token_hash(refresh_token))
                .fetch_optional(&mut *tx)
                .await
                .context("looking up the refresh token")?;
        let family_id = family.ok_or(RefreshError::InvalidToken)?;
        revoke_family(&mut tx, family_id, "logout").await?;
        tx.commit().await.context("committing the logout")?;
        Ok(())
    }

    /// Client-credentials grant: a token with role `service`.
    pub(crate) async fn issue_service_token(
        &self,
        client_id: &str,
        secret: &str,
    ) -> Result<AccessToken, ClientCredentialsError> {
        if !self.policy.service_clients.verify(client_id, secret) {
            return Err(ClientCredentialsError::InvalidCredentials);
        }
        let mut conn = self
            .pool
            .acquire()
            .await
            .context("acquiring a connection")?;
        let key = keys::current(&mut conn).await?;
        Ok(tokens::sign(
            &key,
            &self.policy.tokens,
            client_id,
            Role::Service,
            self.policy.service_token_ttl,
        )?)
    }

    /// Retires the signing key; the new one signs from now on.
    pub(crate) async fn rotate_signing_key(&self) -> anyhow::Result<keys::PublicKeyRow> {
        let longest = self
            .policy
            .access_token_ttl
            .max(self.policy.service_token_ttl);
        keys::rotate(&self.pool, longest).await
    }

    async fn issue_pair(
        &self,
        conn: &mut PgConnection,
        family_id: Uuid,
        user_id: Uuid,
        role: Role,
    ) -> anyhow::Result<TokenPair> {
        let refresh_token = tokens::new_refresh_token();
        let refresh_expires_at =
            Utc::now() + chrono::Duration::from_std(self.policy.refresh_token_ttl)?;
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(tokens::refresh_token_hash(&refresh_token))
        .bind(family_id)
        .bind(refresh_expires_at)
        .execute(&mut *conn)
        .await
        .context("storing the refresh token")?;
        let key = keys::current(conn).await?;
        let access = tokens::sign(
            &key,
            &self.policy.tokens,
            &user_id.to_string(),
            role,
            self.policy.access_token_ttl,
        )?;
        Ok(TokenPair {
            access,
            refresh_token,
            refresh_expires_at,
        })
    }
}

/// Inserts a user and its `UserRegistered` event; `None` if the email is taken.
async fn insert_user(
    conn: &mut PgConnection,
    email: &Email,
    name: &DisplayName,
    password_hash: &str,
    role: Role,
    topics: &Topics,
) -> anyhow::Result<Option<Uuid>> {
    let user_id = Uuid::now_v7();
    let inserted = sqlx::query(
        "INSERT INTO users (user_id, email, display_name, password_hash, role) VALUES ($1, $2, $3, $4, $5)
         ON CONFLICT (email) DO NOTHING",
    )
    .bind(user_id)
    .bind(email.as_str())
    .bind(name.as_str())
    .bind(password_hash)
    .bind(role.as_str())
    .execute(&mut *conn)
    .await
    .context("inserting the user")?
    .rows_affected();
    if inserted == 0 {
        return Ok(None);
    }
    let event = api_auth::v1::UserRegistered {
        user_id: user_id.to_string(),
        email: email.to_string(),
        display_name: name.as_str().to_owned(),
        role: role.as_str().to_owned(),
    };
    let envelope = messaging::envelope::seal(
        EventMeta {
            producer: NAME,
            aggregate_type: "user",
            aggregate_id: user_id.to_string(),
            aggregate_version: 0,
            correlation_id: telemetry::correlation::current()
                .unwrap_or_else(CorrelationId::generate),
            causation_id: None,
        },
        1,
        &event,
    );
    messaging::outbox::enqueue(conn, &topics.user_events(), &envelope).await?;
    Ok(Some(user_id))
}

async fn revoke_family(
    conn: &mut PgConnection,
    family_id: Uuid,
    reason: &str,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = $2
         WHERE family_id = $1 AND revoked_at IS NULL",
    )
    .bind(family_id)
    .bind(reason)
    .execute(conn)
    .await
    .context("revoking a token family")?;
    Ok(())
}

fn parse_role(role: &str) -> anyhow::Result<Role> {
    match role {
        "customer" => Ok(Role::Customer),
        "admin" => Ok(Role::Admin),
        other => anyhow::bail!("unknown stored role {other:?}"),
    }
}
