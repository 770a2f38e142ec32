//! The gRPC face of the auth service: parse requests at the edge, call the
//! use case, map its errors to statuses deliberately.

use std::time::{Duration, SystemTime};

use access_control::Scopes;
use api_auth::v1::auth_service_server::AuthService;
use api_auth::v1::set_password_request::User;
use api_auth::v1::{
    ChangePasswordRequest, ChangePasswordResponse, GetPublicKeysRequest, GetPublicKeysResponse,
    IssueServiceTokenRequest, LoginRequest, LogoutRequest, LogoutResponse, PublicKey,
    RefreshRequest, RegisterRequest, RegisterResponse, RotateSigningKeyRequest, ServiceToken,
    SetPasswordRequest, SetPasswordResponse, TokenPair,
};
use service_runtime::fields;
use service_runtime::status::{self, FieldViolations};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};
use uuid::Uuid;

use crate::app::{
    self, Auth, ChangePasswordError, ClientCredentialsError, LoginError, RefreshError,
    RegisterError, SetPasswordError, UserRef,
};
use crate::domain::{DisplayName, Email, Password};
use crate::inflight::Overloaded;
use crate::keys;
use crate::source::{ClientAddresses, Source};
use crate::tokens;

/// Longest client id or secret accepted.
const MAX_CREDENTIAL_CHARS: usize = 256;
/// Longest user id looked at before parsing (a UUID is 36 characters).
const MAX_USER_ID_CHARS: usize = 36;

#[derive(Debug, Clone)]
pub(crate) struct AuthApi {
    pub(crate) auth: Auth,
    pub(crate) client_addresses: ClientAddresses,
}

impl AuthApi {
    /// Where `request` comes from, for throttling.
    fn source<T>(&self, request: &Request<T>) -> Source {
        self.client_addresses
            .source(request.remote_addr(), request.metadata())
    }
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let source = self.source(&request);
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let email = violations.check("email", Email::parse(&request.email));
        let password = violations.check("password", Password::parse(&request.password));
        let name = violations.check("display_name", DisplayName::parse(&request.display_name));
        let (Some(email), Some(password), Some(name)) = (email, password, name) else {
            return Err(violations.into_status());
        };
        let user_id = self.auth.register(&email, &password, &name, source).await?;
        Ok(Response::new(RegisterResponse {
            user_id: user_id.to_string(),
        }))
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<TokenPair>, Status> {
        let source = self.source(&request);
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let email = violations.check("email", Email::parse(&request.email));
        let password = violations.check("password", Password::presented(&request.password));
        let (Some(email), Some(password)) = (email, password) else {
            return Err(violations.into_status());
        };
        let pair = self.auth.login(&email, &password, source).await?;
        Ok(Response::new(token_pair(pair)))
    }

    async fn change_password(
        &self,
        request: Request<ChangePasswordRequest>,
    ) -> Result<Response<ChangePasswordResponse>, Status> {
        let source = self.source(&request);
        // The policy admits only users (customers and admins), whose tokens
        // name their user id.
        let user_id = Uuid::parse_str(&access_control::caller(&request)?.sub)
            .map_err(|_| Status::permission_denied("the token does not name a user"))?;
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let old = violations.check("old_password", Password::presented(&request.old_password));
        let new = violations.check("new_password", Password::parse(&request.new_password));
        let (Some(old), Some(new)) = (old, new) else {
            return Err(violations.into_status());
        };
        self.auth
            .change_password(user_id, &old, &new, source)
            .await?;
        Ok(Response::new(ChangePasswordResponse {}))
    }

    async fn set_password(
        &self,
        request: Request<SetPasswordRequest>,
    ) -> Result<Response<SetPasswordResponse>, Status> {
        let source = self.source(&request);
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let user = match &request.user {
            Some(User::UserId(id)) => violations
                .check(
                    "user_id",
                    fields::text(id, MAX_USER_ID_CHARS)
                        .map_err(|error| error.to_string())
                        .and_then(|id| {
                            Uuid::parse_str(id).map_err(|_| "must be a UUID".to_owned())
                        }),
                )
                .map(UserRef::Id),
            Some(User::Email(email)) => violations
                .check("email", Email::parse(email))
                .map(UserRef::Email),
            None => {
                violations.add("user", "set user_id or email");
                None
            }
        };
        let password = violations.check("new_password", Password::parse(&request.new_password));
        let (Some(user), Some(password)) = (user, password) else {
            return Err(violations.into_status());
        };
        let user_id = self.auth.set_password(&user, &password, source).await?;
        Ok(Response::new(SetPasswordResponse {
            user_id: user_id.to_string(),
        }))
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<TokenPair>, Status> {
        let token = refresh_token(&request.get_ref().refresh_token)?;
        let pair = self.auth.refresh(token).await?;
        Ok(Response::new(token_pair(pair)))
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let token = refresh_token(&request.get_ref().refresh_token)?;
        self.auth.logout(token).await?;
        Ok(Response::new(LogoutResponse {}))
    }

    async fn issue_service_token(
        &self,
        request: Request<IssueServiceTokenRequest>,
    ) -> Result<Response<ServiceToken>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        for (field, value) in [
            ("client_id", &request.client_id),
            ("client_secret", &request.client_secret),
        ] {
            if value.is_empty() {
                violations.add(field, "must not be empty");
            } else {
                violations.text(field, value, MAX_CREDENTIAL_CHARS);
            }
        }
        // Empty asks for every granted scope.
        let requested = match violations.text("scope", &request.scope, MAX_CREDENTIAL_CHARS) {
            Some(names) if !names.trim().is_empty() => Scopes::parse(names)
                .map_err(|error| violations.add("scope", error.to_string()))
                .ok(),
            _ => None,
        };
        violations.into_result()?;
        let token = self
            .auth
            .issue_service_token(
                &request.client_id,
                &request.client_secret,
                requested.as_ref(),
            )
            .await?;
        Ok(Response::new(ServiceToken {
            access_token: token.token,
            expires_at: Some(token.expires_at.into()),
            scope: token.scope.to_string(),
        }))
    }

    async fn get_public_keys(
        &self,
        _request: Request<GetPublicKeysRequest>,
    ) -> Result<Response<GetPublicKeysResponse>, Status> {
        let rows = keys::published(self.auth.pool())
            .await
            .map_err(|error| status::internal(&error))?;
        Ok(Response::new(GetPublicKeysResponse {
            keys: rows.into_iter().map(public_key).collect(),
        }))
    }

    async fn rotate_signing_key(
        &self,
        _request: Request<RotateSigningKeyRequest>,
    ) -> Result<Response<PublicKey>, Status> {
        let row = self
            .auth
            .rotate_signing_key()
            .await
            .map_err(|error| status::internal(&error))?;
        Ok(Response::new(public_key(row)))
    }
}

// Each use case's errors become statuses here, each variant on purpose.

impl From<RegisterError> for Status {
    fn from(error: RegisterError) -> Self {
        match error {
            RegisterError::EmailTaken => Status::already_exists("the email is already registered"),
            RegisterError::Throttled(wait) => retry_later(
                Code::ResourceExhausted,
                "too many registrations from your address",
                wait,
            ),
            RegisterError::Overloaded(overloaded) => busy(overloaded),
            RegisterError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<LoginError> for Status {
    fn from(error: LoginError) -> Self {
        match error {
            LoginError::InvalidCredentials => Status::unauthenticated("invalid email or password"),
            LoginError::Throttled(wait) => {
                retry_later(Code::ResourceExhausted, "too many failed logins", wait)
            }
            LoginError::Overloaded(overloaded) => busy(overloaded),
            LoginError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<ChangePasswordError> for Status {
    fn from(error: ChangePasswordError) -> Self {
        match error {
            ChangePasswordError::WrongPassword => {
                Status::permission_denied("the old password is wrong")
            }
            ChangePasswordError::UnknownUser => {
                Status::not_found("the user of this token does not exist")
            }
            ChangePasswordError::Throttled(wait) => {
                retry_later(Code::ResourceExhausted, "too many failed attempts", wait)
            }
            ChangePasswordError::Overloaded(overloaded) => busy(overloaded),
            ChangePasswordError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<SetPasswordError> for Status {
    fn from(error: SetPasswordError) -> Self {
        match error {
            SetPasswordError::UnknownUser => Status::not_found("no such user"),
            SetPasswordError::Overloaded(overloaded) => busy(overloaded),
            SetPasswordError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<RefreshError> for Status {
    fn from(error: RefreshError) -> Self {
        match error {
            RefreshError::InvalidToken => Status::unauthenticated("invalid refresh token"),
            RefreshError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<ClientCredentialsError> for Status {
    fn from(error: ClientCredentialsError) -> Self {
        match error {
            ClientCredentialsError::InvalidCredentials => {
                Status::unauthenticated("invalid client credentials")
            }
            // Names the scopes asked for beyond the grant, only to a
            // caller whose credentials were right.
            ClientCredentialsError::ScopesNotGranted(_) => {
                Status::permission_denied(error.to_string())
            }
            ClientCredentialsError::Unexpected(error) => status::internal(&error),
        }
    }
}

/// A refusal that a later attempt can overcome: `code`, a message saying
/// when, and a RetryInfo detail saying it to programs.
fn retry_later(code: Code, what: &str, wait: Duration) -> Status {
    let when = if wait < Duration::from_secs(1) {
        format!("{} ms", wait.as_millis().max(1))
    } else {
        format!("{} s", wait.as_secs_f64().ceil())
    };
    Status::with_error_details(
        code,
        format!("{what}; retry in {when}"),
        ErrorDetails::with_retry_info(Some(wait)),
    )
}

/// A full replica is UNAVAILABLE (another replica may serve the request,
/// and clients retry that code); a source over its share is
/// RESOURCE_EXHAUSTED (its own quota, wherever it goes).
fn busy(overloaded: Overloaded) -> Status {
    match overloaded {
        Overloaded::Replica(wait) => retry_later(
            Code::Unavailable,
            "this replica is checking as many passwords as it can",
            wait,
        ),
        Overloaded::Source(wait) => retry_later(
            Code::ResourceExhausted,
            "too many password checks in flight from your address",
            wait,
        ),
    }
}

fn refresh_token(token: &str) -> Result<&str, Status> {
    if token.is_empty() {
        return Err(status::invalid_field("refresh_token", "must not be empty"));
    }
    if !tokens::is_well_formed_refresh_token(token) {
        return Err(status::invalid_field(
            "refresh_token",
            "is not a refresh token",
        ));
    }
    Ok(token)
}

fn token_pair(pair: app::TokenPair) -> TokenPair {
    TokenPair {
        access_token: pair.access.token,
        access_token_expires_at: Some(pair.access.expires_at.into()),
        refresh_token: pair.refresh_token,
        refresh_token_expires_at: Some(SystemTime::from(pair.refresh_expires_at).into()),
        token_type: "Bearer".to_owned(),
    }
}

fn public_key(row: keys::PublicKeyRow) -> PublicKey {
    PublicKey {
        kid: row.kid,
        algorithm: "EdDSA".to_owned(),
        public_key: row.public_key,
        created_at: Some(SystemTime::from(row.created_at).into()),
        verify_until: row.verify_until.map(|at| SystemTime::from(at).into()),
    }
}
