//! The gRPC face of the auth service: parse requests at the edge, call the
//! use case, map its errors to statuses deliberately.

use std::time::SystemTime;

use api_auth::v1::auth_service_server::AuthService;
use api_auth::v1::{
    GetPublicKeysRequest, GetPublicKeysResponse, IssueServiceTokenRequest, LoginRequest,
    LogoutRequest, LogoutResponse, PublicKey, RefreshRequest, RegisterRequest, RegisterResponse,
    RotateSigningKeyRequest, ServiceToken, TokenPair,
};
use service_runtime::status::{self, FieldViolations};
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt as _};

use crate::app::{self, Auth, ClientCredentialsError, LoginError, RefreshError, RegisterError};
use crate::domain::{DisplayName, Email, Password};
use crate::keys;
use crate::tokens;

/// Longest client id or secret accepted.
const MAX_CREDENTIAL_BYTES: usize = 256;

#[derive(Debug, Clone)]
pub(crate) struct AuthApi {
    pub(crate) auth: Auth,
}

#[tonic::async_trait]
impl AuthService for AuthApi {
    async fn register(
        &self,
        request: Request<RegisterRequest>,
    ) -> Result<Response<RegisterResponse>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let email = check(&mut violations, "email", Email::parse(&request.email));
        let password = check(
            &mut violations,
            "password",
            Password::parse(&request.password),
        );
        let name = check(
            &mut violations,
            "display_name",
            DisplayName::parse(&request.display_name),
        );
        let (Some(email), Some(password), Some(name)) = (email, password, name) else {
            return Err(violations.into_status());
        };
        match self.auth.register(&email, &password, &name).await {
            Ok(user_id) => Ok(Response::new(RegisterResponse {
                user_id: user_id.to_string(),
            })),
            Err(RegisterError::EmailTaken) => {
                Err(Status::already_exists("the email is already registered"))
            }
            Err(RegisterError::Unexpected(error)) => Err(status::internal(&error)),
        }
    }

    async fn login(&self, request: Request<LoginRequest>) -> Result<Response<TokenPair>, Status> {
        let peer = request.remote_addr().map(|address| address.ip());
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let email = check(&mut violations, "email", Email::parse(&request.email));
        let password = check(
            &mut violations,
            "password",
            Password::presented(&request.password),
        );
        let (Some(email), Some(password)) = (email, password) else {
            return Err(violations.into_status());
        };
        match self.auth.login(&email, &password, peer).await {
            Ok(pair) => Ok(Response::new(token_pair(pair))),
            Err(LoginError::InvalidCredentials) => {
                Err(Status::unauthenticated("invalid email or password"))
            }
            Err(LoginError::Throttled(wait)) => Err(Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "too many failed logins; retry in {} s",
                    wait.as_secs().max(1)
                ),
                ErrorDetails::with_retry_info(Some(wait)),
            )),
            Err(LoginError::Unexpected(error)) => Err(status::internal(&error)),
        }
    }

    async fn refresh(
        &self,
        request: Request<RefreshRequest>,
    ) -> Result<Response<TokenPair>, Status> {
        let token = refresh_token(&request.get_ref().refresh_token)?;
        match self.auth.refresh(token).await {
            Ok(pair) => Ok(Response::new(token_pair(pair))),
            Err(RefreshError::InvalidToken) => {
                Err(Status::unauthenticated("invalid refresh token"))
            }
            Err(RefreshError::Unexpected(error)) => Err(status::internal(&error)),
        }
    }

    async fn logout(
        &self,
        request: Request<LogoutRequest>,
    ) -> Result<Response<LogoutResponse>, Status> {
        let token = refresh_token(&request.get_ref().refresh_token)?;
        match self.auth.logout(token).await {
            Ok(()) => Ok(Response::new(LogoutResponse {})),
            Err(RefreshError::InvalidToken) => {
                Err(Status::unauthenticated("invalid refresh token"))
            }
            Err(RefreshError::Unexpected(error)) => Err(status::internal(&error)),
        }
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
            } else if value.len() > MAX_CREDENTIAL_BYTES {
                violations.add(field, "must be at most 256 bytes");
            }
        }
        violations.into_result()?;
        match self
            .auth
            .issue_service_token(&request.client_id, &request.client_secret)
            .await
        {
            Ok(token) => Ok(Response::new(ServiceToken {
                access_token: token.token,
                expires_at: Some(token.expires_at.into()),
            })),
            Err(ClientCredentialsError::InvalidCredentials) => {
                Err(Status::unauthenticated("invalid client credentials"))
            }
            Err(ClientCredentialsError::Unexpected(error)) => Err(status::internal(&error)),
        }
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

/// Records a parse failure as a violation of `field`.
fn check<T>(
    violations: &mut FieldViolations,
    field: &str,
    parsed: Result<T, &'static str>,
) -> Option<T> {
    parsed.map_err(|reason| violations.add(field, reason)).ok()
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
