//! The auth service's use cases, independent of gRPC.
//!
//! Each use case has its own error type; `grpc.rs` maps each variant to a
//! status on purpose.

use std::sync::Arc;
use std::time::Duration;

use access_control::{Role, Scopes, TokenSettings};
use anyhow::Context as _;
use chrono::{DateTime, Utc};
use messaging::envelope::Subject;
use messaging::{Publisher, Topics};
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

use crate::clients::ServiceClients;
use crate::domain::{DisplayName, Email, Password};
use crate::inflight::{Admission, Admitted, Overloaded};
use crate::passwords::Passwords;
use crate::source::Source;
use crate::throttle::{self, LoginSubjects, LoginThrottle, RegistrationPace};
use crate::tokens::{self, AccessToken};
use crate::{NAME, keys};

/// Lifetimes and limits of the auth service.
#[derive(Debug, Clone)]
pub(crate) struct AuthPolicy {
    pub(crate) tokens: TokenSettings,
    pub(crate) access_token_ttl: Duration,
    pub(crate) refresh_token_ttl: Duration,
    /// How long a refresh-token family lives from its login, however
    /// often it is refreshed.
    pub(crate) refresh_family_lifetime: Duration,
    pub(crate) service_token_ttl: Duration,
    pub(crate) login_throttle: LoginThrottle,
    pub(crate) registration_pace: RegistrationPace,
    pub(crate) service_clients: ServiceClients,
    /// Seals and opens the signing keys at rest.
    pub(crate) key_encryption_key: keys::KeyEncryptionKey,
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
    #[error("too many registrations from this source; retry in {0:?}")]
    Throttled(Duration),
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
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
    Overloaded(#[from] Overloaded),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ChangePasswordError {
    #[error("the old password is wrong")]
    WrongPassword,
    /// The token names a user that does not exist.
    #[error("unknown user")]
    UnknownUser,
    #[error("too many failed attempts; retry in {0:?}")]
    Throttled(Duration),
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SetPasswordError {
    #[error("no such user")]
    UnknownUser,
    #[error(transparent)]
    Overloaded(#[from] Overloaded),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum RefreshError {
    /// Unknown, expired, revoked, reused (which revokes its family), or
    /// of a family past its lifetime.
    #[error("invalid refresh token")]
    InvalidToken,
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ClientCredentialsError {
    #[error("invalid client credentials")]
    InvalidCredentials,
    /// The client asked for scopes it was not granted (they are listed).
    #[error("the client is not granted {0}")]
    ScopesNotGranted(Scopes),
    #[error(transparent)]
    Unexpected(#[from] anyhow::Error),
}

/// Whose password an admin sets.
#[derive(Debug, Clone)]
pub(crate) enum UserRef {
    Id(Uuid),
    Email(Email),
}

/// A refresh token as Refresh finds it, with its family and user.
#[derive(Debug, sqlx::FromRow)]
struct RefreshTokenState {
    family_id: Uuid,
    user_id: Uuid,
    role: String,
    used: bool,
    expired: bool,
    revoked: bool,
    /// The family has lived its whole lifetime.
    family_over: bool,
    family_expires_at: DateTime<Utc>,
}

/// What a password check needs to know of a user.
#[derive(Debug, sqlx::FromRow)]
struct Credentials {
    user_id: Uuid,
    email: String,
    password_hash: String,
    role: String,
}

/// The auth service's state: its database, password hasher and policy.
#[derive(Debug, Clone)]
pub(crate) struct Auth {
    pool: PgPool,
    passwords: Passwords,
    admission: Admission,
    policy: Arc<AuthPolicy>,
    user_events: Publisher,
}

impl Auth {
    pub(crate) fn new(
        pool: PgPool,
        passwords: Passwords,
        admission: Admission,
        policy: AuthPolicy,
        topics: &Topics,
    ) -> Self {
        Self {
            pool,
            passwords,
            admission,
            policy: Arc::new(policy),
            user_events: Publisher::new(NAME, topics.user_events()),
        }
    }

    /// A place among the password checks in flight, or why there is none.
    fn admit(&self, source: Source) -> Result<Admitted, Overloaded> {
        self.admission.admit(source, self.passwords.expected_wait())
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
        source: Source,
    ) -> Result<Uuid, RegisterError> {
        let _admitted = self.admit(source)?;
        // Counted before hashing, in a transaction of its own: a refused
        // registration costs no hash, and no connection waits for one.
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        if let Err(wait) =
            throttle::count_registration(&mut tx, source, &self.policy.registration_pace).await?
        {
            return Err(RegisterError::Throttled(wait));
        }
        tx.commit()
            .await
            .context("committing the registration count")?;
        let hash = self.passwords.hash(password).await?;
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        let user_id = insert_user(
            &mut tx,
            email,
            name,
            &hash,
            Role::Customer,
            &self.user_events,
        )
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
        if insert_user(&mut tx, email, &name, &hash, Role::Admin, &self.user_events)
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
    /// password hasher and give the same error. No database connection is
    /// held while the password is checked: the attempt is counted and the
    /// user read in one short transaction, and the token family is written
    /// in another once the hasher has answered.
    pub(crate) async fn login(
        &self,
        email: &Email,
        password: &Password,
        source: Source,
    ) -> Result<TokenPair, LoginError> {
        let _admitted = self.admit(source)?;
        let subjects = LoginSubjects::new(email, source);
        let (user, counted) = {
            let mut tx = self.pool.begin().await.context("starting a transaction")?;
            let throttle = &self.policy.login_throttle;
            let counted = match throttle::check_login_attempt(&mut tx, &subjects, throttle).await? {
                Ok(counted) => counted,
                Err(wait) => return Err(LoginError::Throttled(wait)),
            };
            let user = credentials_by_email(&mut tx, email).await?;
            tx.commit().await.context("committing the login attempt")?;
            (user, counted)
        };
        let verified = self
            .passwords
            .verify(
                password,
                user.as_ref().map(|user| user.password_hash.as_str()),
            )
            .await?;
        let Some(user) = user.filter(|_| verified.matches) else {
            self.count_failure(&subjects, counted).await?;
            return Err(LoginError::InvalidCredentials);
        };
        let role = parse_role(&user.role)?;
        let rehashed = if verified.needs_rehash {
            Some(self.passwords.hash(password).await?)
        } else {
            None
        };

        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        throttle::forgive_login_attempt(&mut tx, &subjects, counted).await?;
        if let Some(hash) = rehashed {
            // Only over the hash just verified: a password changed in the
            // meantime stays changed.
            sqlx::query(
                "UPDATE users SET password_hash = $3 WHERE user_id = $1 AND password_hash = $2",
            )
            .bind(user.user_id)
            .bind(&user.password_hash)
            .bind(hash)
            .execute(&mut *tx)
            .await
            .context("storing a hash with today's parameters")?;
        }
        let (family_id, family_expires_at) = self.start_family(&mut tx, user.user_id).await?;
        let pair = self
            .issue_pair(&mut tx, family_id, family_expires_at, user.user_id, role)
            .await?;
        tx.commit().await.context("committing the login")?;
        Ok(pair)
    }

    /// Changes a user's own password, given the old one, and ends every
    /// session of theirs (a thief holding a refresh token is locked out).
    /// Old-password attempts are counted like logins, so a stolen access
    /// token is no way around the login throttle.
    pub(crate) async fn change_password(
        &self,
        user_id: Uuid,
        old: &Password,
        new: &Password,
        source: Source,
    ) -> Result<(), ChangePasswordError> {
        let _admitted = self.admit(source)?;
        let (user, subjects, counted) = {
            let mut tx = self.pool.begin().await.context("starting a transaction")?;
            let user = credentials_by_id(&mut tx, user_id)
                .await?
                .ok_or(ChangePasswordError::UnknownUser)?;
            let email = Email::parse(&user.email).map_err(anyhow::Error::msg)?;
            let subjects = LoginSubjects::new(&email, source);
            let throttle = &self.policy.login_throttle;
            let counted = match throttle::check_login_attempt(&mut tx, &subjects, throttle).await? {
                Ok(counted) => counted,
                Err(wait) => return Err(ChangePasswordError::Throttled(wait)),
            };
            tx.commit().await.context("committing the attempt")?;
            (user, subjects, counted)
        };
        let verified = self
            .passwords
            .verify(old, Some(&user.password_hash))
            .await?;
        if !verified.matches {
            self.count_failure(&subjects, counted).await?;
            return Err(ChangePasswordError::WrongPassword);
        }
        let hash = self.passwords.hash(new).await?;

        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        throttle::forgive_login_attempt(&mut tx, &subjects, counted).await?;
        sqlx::query("UPDATE users SET password_hash = $2 WHERE user_id = $1")
            .bind(user_id)
            .bind(hash)
            .execute(&mut *tx)
            .await
            .context("storing the new password")?;
        revoke_families_of(&mut tx, user_id, "password changed").await?;
        tx.commit()
            .await
            .context("committing the password change")?;
        tracing::info!(%user_id, "password changed; every session ended");
        Ok(())
    }

    /// Sets a user's password (an admin's act, for someone who lost theirs),
    /// ends every session of theirs, and forgets their failed logins.
    pub(crate) async fn set_password(
        &self,
        user: &UserRef,
        new: &Password,
        source: Source,
    ) -> Result<Uuid, SetPasswordError> {
        let _admitted = self.admit(source)?;
        let hash = self.passwords.hash(new).await?;
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        let updated: Option<(Uuid, String)> = match user {
            UserRef::Id(user_id) => sqlx::query_as(
                "UPDATE users SET password_hash = $2 WHERE user_id = $1 RETURNING user_id, email",
            )
            .bind(user_id),
            UserRef::Email(email) => sqlx::query_as(
                "UPDATE users SET password_hash = $2 WHERE email = $1 RETURNING user_id, email",
            )
            .bind(email.as_str()),
        }
        .bind(hash)
        .fetch_optional(&mut *tx)
        .await
        .context("storing the new password")?;
        let (user_id, email) = updated.ok_or(SetPasswordError::UnknownUser)?;
        revoke_families_of(&mut tx, user_id, "password set by an admin").await?;
        let email = Email::parse(&email).map_err(anyhow::Error::msg)?;
        throttle::forget_account(&mut tx, &email).await?;
        tx.commit().await.context("committing the new password")?;
        tracing::info!(%user_id, "password set by an admin; every session ended");
        Ok(user_id)
    }

    /// Exchanges a refresh token for a new pair. A token presented a second
    /// time revokes its whole family: either the client or a thief holds a
    /// copy, and we cannot tell which.
    pub(crate) async fn refresh(&self, refresh_token: &str) -> Result<TokenPair, RefreshError> {
        let lifetime = chrono::Duration::from_std(self.policy.refresh_family_lifetime)
            .context("the refresh family lifetime")?;
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        let found: Option<RefreshTokenState> = sqlx::query_as(
            "SELECT f.family_id, f.user_id, u.role,
                    t.used_at IS NOT NULL AS used, t.expires_at <= now() AS expired,
                    f.revoked_at IS NOT NULL AS revoked,
                    f.created_at + $2 <= now() AS family_over,
                    f.created_at + $2 AS family_expires_at
             FROM refresh_tokens t
             JOIN refresh_token_families f USING (family_id)
             JOIN users u USING (user_id)
             WHERE t.token_hash = $1
             FOR UPDATE OF t, f",
        )
        .bind(tokens::refresh_token_hash(refresh_token))
        .bind(lifetime)
        .fetch_optional(&mut *tx)
        .await
        .context("looking up the refresh token")?;
        let Some(RefreshTokenState {
            family_id,
            user_id,
            role,
            used,
            expired,
            revoked,
            family_over,
            family_expires_at,
        }) = found
        else {
            return Err(RefreshError::InvalidToken);
        };
        // A family past its lifetime ends even if used every minute: a
        // stolen refresh token, rotated diligently by its thief, is not a
        // login for ever.
        if revoked || expired || family_over {
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
            .issue_pair(
                &mut tx,
                family_id,
                family_expires_at,
                user_id,
                parse_role(&role)?,
            )
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

    /// Client-credentials grant: a token with role `service` carrying the
    /// client's scopes, or the subset `requested` of them.
    pub(crate) async fn issue_service_token(
        &self,
        client_id: &str,
        secret: &str,
        requested: Option<&Scopes>,
    ) -> Result<AccessToken, ClientCredentialsError> {
        let granted = self
            .policy
            .service_clients
            .authenticate(client_id, secret)
            .ok_or(ClientCredentialsError::InvalidCredentials)?;
        let scope = match requested {
            None => granted.clone(),
            Some(requested) if requested.is_subset(granted) => requested.clone(),
            Some(requested) => {
                return Err(ClientCredentialsError::ScopesNotGranted(
                    requested.missing_from(granted).collect(),
                ));
            }
        };
        let mut conn = self
            .pool
            .acquire()
            .await
            .context("acquiring a connection")?;
        let key = keys::current(&mut conn, &self.policy.key_encryption_key).await?;
        Ok(tokens::sign(
            &key,
            &self.policy.tokens,
            client_id,
            Role::Service,
            scope,
            self.policy.service_token_ttl,
        )?)
    }

    /// Retires the signing key; the new one signs from now on.
    pub(crate) async fn rotate_signing_key(&self) -> anyhow::Result<keys::PublicKeyRow> {
        let longest = self
            .policy
            .access_token_ttl
            .max(self.policy.service_token_ttl);
        keys::rotate(&self.pool, longest, &self.policy.key_encryption_key).await
    }

    /// Counts a wrong password the check did not count already.
    async fn count_failure(
        &self,
        subjects: &LoginSubjects,
        counted: throttle::Counted,
    ) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await.context("starting a transaction")?;
        throttle::count_login_failure(&mut tx, subjects, &self.policy.login_throttle, counted)
            .await?;
        tx.commit().await.context("committing the failed attempt")?;
        Ok(())
    }

    /// Starts the token family of a login: its id, and when it ends.
    async fn start_family(
        &self,
        conn: &mut PgConnection,
        user_id: Uuid,
    ) -> anyhow::Result<(Uuid, DateTime<Utc>)> {
        let family_id = Uuid::now_v7();
        let lifetime = chrono::Duration::from_std(self.policy.refresh_family_lifetime)
            .context("the refresh family lifetime")?;
        let expires_at: DateTime<Utc> = sqlx::query_scalar(
            "INSERT INTO refresh_token_families (family_id, user_id) VALUES ($1, $2)
             RETURNING created_at + $3",
        )
        .bind(family_id)
        .bind(user_id)
        .bind(lifetime)
        .fetch_one(&mut *conn)
        .await
        .context("starting a token family")?;
        Ok((family_id, expires_at))
    }

    /// A new access token and the family's next refresh token, which
    /// expires after its own lifetime or with its family, whichever is first.
    async fn issue_pair(
        &self,
        conn: &mut PgConnection,
        family_id: Uuid,
        family_expires_at: DateTime<Utc>,
        user_id: Uuid,
        role: Role,
    ) -> anyhow::Result<TokenPair> {
        let refresh_token = tokens::new_refresh_token();
        let refresh_expires_at = (Utc::now()
            + chrono::Duration::from_std(self.policy.refresh_token_ttl)?)
        .min(family_expires_at);
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, expires_at) VALUES ($1, $2, $3)",
        )
        .bind(tokens::refresh_token_hash(&refresh_token))
        .bind(family_id)
        .bind(refresh_expires_at)
        .execute(&mut *conn)
        .await
        .context("storing the refresh token")?;
        let key = keys::current(conn, &self.policy.key_encryption_key).await?;
        let access = tokens::sign(
            &key,
            &self.policy.tokens,
            &user_id.to_string(),
            role,
            Scopes::default(),
            self.policy.access_token_ttl,
        )?;
        Ok(TokenPair {
            access,
            refresh_token,
            refresh_expires_at,
        })
    }
}

async fn credentials_by_email(
    conn: &mut PgConnection,
    email: &Email,
) -> anyhow::Result<Option<Credentials>> {
    sqlx::query_as("SELECT user_id, email, password_hash, role FROM users WHERE email = $1")
        .bind(email.as_str())
        .fetch_optional(conn)
        .await
        .context("looking up the user by email")
}

async fn credentials_by_id(
    conn: &mut PgConnection,
    user_id: Uuid,
) -> anyhow::Result<Option<Credentials>> {
    sqlx::query_as("SELECT user_id, email, password_hash, role FROM users WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(conn)
        .await
        .context("looking up the user by id")
}

/// Inserts a user and its `UserRegistered` event; `None` if the email is taken.
async fn insert_user(
    conn: &mut PgConnection,
    email: &Email,
    name: &DisplayName,
    password_hash: &str,
    role: Role,
    user_events: &Publisher,
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
    user_events
        .publish(conn, Subject::unversioned("user", &user_id), 1, &event)
        .await?;
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

/// Revokes every live token family of a user: every session ends.
async fn revoke_families_of(
    conn: &mut PgConnection,
    user_id: Uuid,
    reason: &str,
) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE refresh_token_families SET revoked_at = now(), revoked_reason = $2
         WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user_id)
    .bind(reason)
    .execute(conn)
    .await
    .context("revoking the user's token families")?;
    Ok(())
}

/// The purge of refresh tokens that expired longer than `retention` ago:
/// they refresh nothing. (A spent one presented after it is gone is refused
/// as unknown instead of as reused; either way it gets nothing.)
pub(crate) fn refresh_token_purge(retention: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "refresh_tokens",
        retention,
        // Oldest first through `refresh_tokens_expires_at`.
        statement: "DELETE FROM refresh_tokens WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM refresh_tokens WHERE expires_at < now() - $1
                        ORDER BY expires_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

/// The purge of refresh-token families created longer than `age` ago,
/// where `age` is at least the families' absolute lifetime: revoked or not,
/// they can no longer refresh. Their remaining tokens go with them.
pub(crate) fn refresh_family_purge(age: Duration) -> database::PurgeTarget {
    database::PurgeTarget {
        table: "refresh_token_families",
        retention: age,
        // Oldest first through `refresh_token_families_created_at`.
        statement: "DELETE FROM refresh_token_families WHERE ctid = ANY(ARRAY(
                        SELECT ctid FROM refresh_token_families WHERE created_at < now() - $1
                        ORDER BY created_at LIMIT $2 FOR UPDATE SKIP LOCKED))",
    }
}

fn parse_role(role: &str) -> anyhow::Result<Role> {
    match role {
        "customer" => Ok(Role::Customer),
        "admin" => Ok(Role::Admin),
        other => anyhow::bail!("unknown stored role {other:?}"),
    }
}
