use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::{Claims, Role, Verifier, VerifyError};

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token (login, registration, public keys).
    Public,
    /// A person: a customer or an admin (an admin acting on their own behalf).
    User,
    /// Another service of the system (role `service`): internal RPCs.
    Service,
    /// An operator (role `admin`).
    Admin,
    /// A service or an admin: internal reads an operator may also make.
    ServiceOrAdmin,
    /// Any verified caller.
    Authenticated,
}

impl Access {
    fn allows(self, role: Role) -> bool {
        match self {
            Self::Public | Self::Authenticated => true,
            Self::User => matches!(role, Role::Customer | Role::Admin),
            Self::Service => role == Role::Service,
            Self::Admin => role == Role::Admin,
            Self::ServiceOrAdmin => matches!(role, Role::Service | Role::Admin),
        }
    }
}

/// The access rule of every RPC of a server. An RPC without a rule is
/// refused: forgetting a rule must not open a door.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    rules: HashMap<String, Access>,
}

impl Policy {
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the rule of `service`'s `method`, e.g.
    /// `rpc("ordersaga.order.v1.OrderService", "CreateOrder", Access::User)`.
    pub fn rpc(mut self, service: &str, method: &str, access: Access) -> Self {
        self.rules.insert(format!("/{service}/{method}"), access);
        self
    }

    /// The rule for a request path; health and reflection are always open.
    pub fn access(&self, path: &str) -> Option<Access> {
        if path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.") {
            return Some(Access::Public);
        }
        self.rules.get(path).copied()
    }
}

/// Enforces a [`Policy`] with a [`Verifier`]; see the crate documentation.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    verifier: Arc<Verifier>,
    policy: Arc<Policy>,
}

impl AuthLayer {
    pub fn new(verifier: Verifier, policy: Policy) -> Self {
        Self {
            verifier: Arc::new(verifier),
            policy: Arc::new(policy),
        }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            verifier: self.verifier.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// The service [`AuthLayer`] wraps around a server.
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    verifier: Arc<Verifier>,
    policy: Arc<Policy>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for AuthService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqBody: Send + 'static,
    ResBody: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<ReqBody>) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        let access = self.policy.access(request.uri().path());
        Box::pin(async move {
            let denied = match access {
                Some(Access::Public) => None,
                None => Some(Status::permission_denied(format!(
                    "no access rule for {}",
                    request.uri().path()
                ))),
                Some(access) => match authenticate(&verifier, request.headers()).await {
                    Ok(claims) if access.allows(claims.role) => {
                        request.extensions_mut().insert(claims);
                        None
                    }
                    Ok(claims) => Some(Status::permission_denied(format!(
                        "role {} may not call {}",
                        claims.role,
                        request.uri().path()
                    ))),
                    Err(status) => Some(status),
                },
            };
            match denied {
                None => inner.call(request).await,
                Some(status) => Ok(status.into_http()),
            }
        })
    }
}

/// Verifies the bearer token of a request.
async fn authenticate(verifier: &Verifier, headers: &http::HeaderMap) -> Result<Claims, Status> {
    let header = headers
        .get(http::header::AUTHORIZATION)
        .ok_or_else(|| Status::unauthenticated("missing `authorization: Bearer <token>`"))?;
    let token = header
        .to_str()
        .ok()
        .and_then(|value| {
            let (scheme, token) = value.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or_else(|| Status::unauthenticated("authorization is not `Bearer <token>`"))?;
    verifier.verify(token).await.map_err(|error| match error {
        VerifyError::Invalid(reason) => {
            tracing::info!(%reason, "rejected a token");
            Status::unauthenticated("invalid token")
        }
        VerifyError::Unavailable(reason) => {
            tracing::warn!(%reason, "cannot verify tokens yet");
            Status::unavailable("cannot verify tokens yet; retry shortly")
        }
    })
}
