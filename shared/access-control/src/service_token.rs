use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use api_auth::v1::IssueServiceTokenRequest;
use api_auth::v1::auth_service_client::AuthServiceClient;
use futures::future::BoxFuture;
use http::HeaderValue;
use tokio::sync::Mutex;
use tower_layer::Layer;
use tower_service::Service;

use crate::{Scopes, ServiceCredentials};

struct Current {
    header: HeaderValue,
    renew_at: Instant,
    expires_at: Instant,
}

/// A service's own access token (role `service`), obtained with its client
/// credentials and renewed when three quarters of its life have passed.
/// If renewal fails, the current token is used for as long as it is valid.
///
/// It asks for exactly the scopes the service calls with, not everything
/// its client was granted: a leaked token opens no more than this service
/// needs, and a client the operator granted too little fails to get a
/// token with an error naming the missing scope, instead of every call
/// failing later.
pub struct ServiceTokenSource {
    client: AuthServiceClient<crate::AuthChannel>,
    credentials: ServiceCredentials,
    scope: Scopes,
    current: Mutex<Option<Current>>,
}

impl std::fmt::Debug for ServiceTokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceTokenSource")
            .field("client_id", &self.credentials.client_id)
            .field("scope", &self.scope.to_string())
            .finish_non_exhaustive()
    }
}

impl ServiceTokenSource {
    /// Tokens carrying `scope`, which must not be empty (an empty request
    /// would ask for every scope the client was granted).
    pub fn new(
        auth_url: &str,
        credentials: ServiceCredentials,
        scope: Scopes,
        tls: &tls::Tls,
    ) -> anyhow::Result<Self> {
        anyhow::ensure!(
            !scope.is_empty(),
            "a service token needs at least one scope"
        );
        let channel = crate::auth_channel(auth_url, tls)?;
        Ok(Self {
            client: AuthServiceClient::new(channel),
            credentials,
            scope,
            current: Mutex::new(None),
        })
    }

    /// `Bearer <token>` for the `authorization` header.
    pub async fn authorization(&self) -> anyhow::Result<HeaderValue> {
        let mut current = self.current.lock().await;
        let now = Instant::now();
        if let Some(token) = current.as_ref().filter(|token| now < token.renew_at) {
            return Ok(token.header.clone());
        }
        match self.issue().await {
            Ok(fresh) => {
                let header = fresh.header.clone();
                *current = Some(fresh);
                Ok(header)
            }
            Err(error) => match current.as_ref().filter(|token| now < token.expires_at) {
                Some(token) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "could not renew the service token; using the current one"
                    );
                    Ok(token.header.clone())
                }
                None => Err(error),
            },
        }
    }

    async fn issue(&self) -> anyhow::Result<Current> {
        let issued = self
            .client
            .clone()
            .issue_service_token(IssueServiceTokenRequest {
                client_id: self.credentials.client_id.clone(),
                client_secret: self.credentials.client_secret.clone(),
                scope: self.scope.to_string(),
            })
            .await
            .with_context(|| {
                format!(
                    "obtaining a service token with scope {:?}",
                    self.scope.to_string()
                )
            })?
            .into_inner();
        let expires = issued
            .expires_at
            .and_then(|at| SystemTime::try_from(at).ok())
            .and_then(|at| at.duration_since(SystemTime::now()).ok())
            .unwrap_or_default();
        let now = Instant::now();
        Ok(Current {
            header: HeaderValue::from_str(&format!("Bearer {}", issued.access_token))?,
            renew_at: now + expires.mul_f64(0.75),
            expires_at: now + expires,
        })
    }
}

/// Attaches the service's token to every outgoing request.
#[derive(Debug, Clone)]
pub struct BearerLayer {
    source: Arc<ServiceTokenSource>,
}

impl BearerLayer {
    pub fn new(source: Arc<ServiceTokenSource>) -> Self {
        Self { source }
    }
}

impl<S> Layer<S> for BearerLayer {
    type Service = BearerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        BearerService {
            inner,
            source: self.source.clone(),
        }
    }
}

/// The service [`BearerLayer`] wraps around a channel.
#[derive(Debug, Clone)]
pub struct BearerService<S> {
    inner: S,
    source: Arc<ServiceTokenSource>,
}

impl<S, ReqBody, ResBody> Service<http::Request<ReqBody>> for BearerService<S>
where
    S: Service<http::Request<ReqBody>, Response = http::Response<ResBody>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
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
        let source = self.source.clone();
        Box::pin(async move {
            match source.authorization().await {
                Ok(header) => {
                    request
                        .headers_mut()
                        .insert(http::header::AUTHORIZATION, header);
                    inner.call(request).await
                }
                // Without a token the call cannot succeed; answer as the
                // server would, so callers see one kind of failure.
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "no service token");
                    Ok(
                        tonic::Status::unavailable(format!("no service token: {error:#}"))
                            .into_http(),
                    )
                }
            }
        })
    }
}
