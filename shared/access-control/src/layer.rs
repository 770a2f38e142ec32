use std::collections::HashMap;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::future::BoxFuture;
use tonic::Status;
use tower_layer::Layer;
use tower_service::Service;

use crate::{Claims, Role, Scope, Verifier, VerifyError};

/// Who may call an RPC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, without a token (login, registration, public keys).
    Public,
    /// A person: a customer or an admin (an admin acting on their own behalf).
    User,
    /// Another service of the system (role `service`) whose token carries
    /// the scope: internal RPCs.
    Service(Scope),
    /// An operator (role `admin`).
    Admin,
    /// A person, or a service with the scope: reads whose handlers show a
    /// customer only their own.
    UserOrService(Scope),
    /// An operator, or a service with the scope: what a person at a console
    /// and another system may both do (signal a waiting saga).
    AdminOrService(Scope),
}

impl Access {
    /// Whether a verified caller may make a call of this rule; the refusal
    /// says why (the role, or the scope the token lacks).
    pub fn admits(self, caller: &Claims) -> Result<(), Refusal> {
        let scope = match (self, caller.role) {
            (Self::Public, _)
            | (Self::User | Self::UserOrService(_), Role::Customer | Role::Admin)
            | (Self::Admin | Self::AdminOrService(_), Role::Admin) => return Ok(()),
            (
                Self::Service(scope) | Self::UserOrService(scope) | Self::AdminOrService(scope),
                Role::Service,
            ) => scope,
            // Whatever a rule does not name is refused.
            _ => return Err(Refusal::Role(caller.role)),
        };
        if caller.scope.contains(scope) {
            Ok(())
        } else {
            Err(Refusal::MissingScope(scope))
        }
    }
}

/// Why [`Access::admits`] refused a caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The rule is not for callers of this role.
    Role(Role),
    /// A service token without the scope the rule requires.
    MissingScope(Scope),
}

impl Refusal {
    /// PERMISSION_DENIED naming what was missing, so whoever configures the
    /// client sees which scope to grant.
    fn status(self, path: &str) -> Status {
        match self {
            Self::Role(role) => {
                Status::permission_denied(format!("role {role} may not call {path}"))
            }
            Self::MissingScope(scope) => Status::permission_denied(format!(
                "the service token lacks scope {scope}, which {path} requires"
            )),
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
                    Ok(claims) => match access.admits(&claims) {
                        Ok(()) => {
                            request.extensions_mut().insert(claims);
                            None
                        }
                        Err(refusal) => Some(refusal.status(request.uri().path())),
                    },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Scopes;

    fn caller(role: Role, scope: &str) -> Claims {
        Claims {
            sub: "caller".into(),
            role,
            iat: 0,
            exp: 0,
            iss: "ordersaga-auth".into(),
            aud: "ordersaga".into(),
            jti: "jti".into(),
            scope: Scopes::parse(scope).unwrap(),
        }
    }

    #[test]
    fn an_internal_rpc_admits_only_a_service_with_its_scope() {
        let charge = Access::Service(Scope::PaymentsCharge);
        assert_eq!(
            charge.admits(&caller(Role::Service, "payments:charge")),
            Ok(())
        );
        assert_eq!(
            charge.admits(&caller(Role::Service, "payments:read")),
            Err(Refusal::MissingScope(Scope::PaymentsCharge)),
            "a read scope does not charge"
        );
        assert_eq!(
            charge.admits(&caller(Role::Service, "")),
            Err(Refusal::MissingScope(Scope::PaymentsCharge)),
            "a service token without scopes opens nothing"
        );
        // Scopes mean nothing on a person's token: the role decides.
        for role in [Role::Customer, Role::Admin] {
            assert_eq!(
                charge.admits(&caller(role, "payments:charge")),
                Err(Refusal::Role(role))
            );
        }
    }

    #[test]
    fn a_shared_read_admits_people_and_services_with_the_read_scope() {
        let read = Access::UserOrService(Scope::PaymentsRead);
        assert_eq!(read.admits(&caller(Role::Customer, "")), Ok(()));
        assert_eq!(read.admits(&caller(Role::Admin, "")), Ok(()));
        assert_eq!(read.admits(&caller(Role::Service, "payments:read")), Ok(()));
        assert_eq!(
            read.admits(&caller(
                Role::Service,
                "payments:charge payments:refund orders:settle"
            )),
            Err(Refusal::MissingScope(Scope::PaymentsRead))
        );
    }

    #[test]
    fn an_admin_or_a_service_with_the_scope_may_signal() {
        let signal = Access::AdminOrService(Scope::SagasSignal);
        assert_eq!(signal.admits(&caller(Role::Admin, "")), Ok(()));
        assert_eq!(
            signal.admits(&caller(Role::Service, "sagas:signal")),
            Ok(())
        );
        assert_eq!(
            signal.admits(&caller(Role::Service, "orders:settle")),
            Err(Refusal::MissingScope(Scope::SagasSignal))
        );
        assert_eq!(
            signal.admits(&caller(Role::Customer, "")),
            Err(Refusal::Role(Role::Customer))
        );
    }

    #[test]
    fn user_and_admin_rules_ignore_scopes() {
        let every_scope = Scope::ALL.map(Scope::as_str).join(" ");
        assert_eq!(
            Access::User.admits(&caller(Role::Service, &every_scope)),
            Err(Refusal::Role(Role::Service))
        );
        assert_eq!(Access::User.admits(&caller(Role::Customer, "")), Ok(()));
        assert_eq!(
            Access::Admin.admits(&caller(Role::Customer, "")),
            Err(Refusal::Role(Role::Customer))
        );
        assert_eq!(
            Access::Admin.admits(&caller(Role::Service, &every_scope)),
            Err(Refusal::Role(Role::Service))
        );
        assert_eq!(Access::Admin.admits(&caller(Role::Admin, "")), Ok(()));
    }

    #[test]
    fn the_refusal_names_the_missing_scope() {
        let status = Refusal::MissingScope(Scope::OrdersSettle)
            .status("/ordersaga.order.v1.OrderService/ConfirmOrder");
        assert_eq!(status.code(), tonic::Code::PermissionDenied);
        assert!(
            status.message().contains("orders:settle"),
            "{}",
            status.message()
        );
        assert!(
            status.message().contains("ConfirmOrder"),
            "{}",
            status.message()
        );
    }

    #[test]
    fn an_rpc_without_a_rule_has_no_access() {
        let policy = Policy::new().rpc(
            "ordersaga.payment.v1.PaymentService",
            "ProcessPayment",
            Access::Service(Scope::PaymentsCharge),
        );
        assert_eq!(
            policy.access("/ordersaga.payment.v1.PaymentService/ProcessPayment"),
            Some(Access::Service(Scope::PaymentsCharge))
        );
        assert_eq!(
            policy.access("/ordersaga.payment.v1.PaymentService/Other"),
            None
        );
        assert_eq!(
            policy.access("/grpc.health.v1.Health/Check"),
            Some(Access::Public)
        );
    }
}
