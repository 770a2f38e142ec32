//! Who may call what.
//!
//! The auth service alone signs tokens (Ed25519 JWTs); every other service
//! only verifies them with public keys, so no secret is shared. This crate
//! is the verifying side and the client side of that arrangement:
//!
//! - [`Claims`] and [`Role`]: what a verified token says.
//! - [`KeyCache`]: public keys fetched from the auth service, cached, and
//!   fetched again when a token names an unknown key (after a rotation); it
//!   keeps verifying from cache while the auth service is down.
//! - [`Verifier`]: checks a token: algorithm pinned to EdDSA (so `alg:
//!   none` and HS256-signed-with-the-public-key forgeries fail), signature,
//!   `exp`, `iss`, `aud`.
//! - [`Scope`]: the one list of what a service token can be granted; each
//!   internal RPC requires one.
//! - [`AuthLayer`] with a [`Policy`]: a tower layer in front of a service
//!   that lets each RPC through only for the roles (and, for services, the
//!   scope) the policy names, and puts the caller's [`Claims`] into the
//!   request extensions. Health and reflection stay open.
//! - [`ServiceTokenSource`] and [`BearerLayer`]: a service's own token
//!   (client-credentials grant), renewed before it expires, attached to
//!   outgoing calls.

mod claims;
mod keys;
mod layer;
mod scope;
mod service_token;
mod settings;
mod verify;

pub use claims::{Claims, Role};
pub use keys::{KeyCache, KeySource, RemoteKeys, VerificationKey};
pub use layer::{Access, AuthLayer, AuthService, Policy, Refusal};
pub use scope::{Scope, Scopes, UnknownScope};
pub use service_token::{BearerLayer, BearerService, ServiceTokenSource};
pub use settings::{AuthSettings, ServiceCredentials, TokenSettings};
pub use verify::{Verifier, VerifyError};

/// A channel to the auth service, traced like every other call (a token
/// fetched inside a request belongs to that request's trace).
pub(crate) type AuthChannel = telemetry::grpc::ClientService<tonic::transport::Channel>;

/// Connects lazily: the auth service may start after us. Over TLS when
/// `tls` has a CA, and then only to a server whose certificate chains to
/// it: the public keys this channel fetches decide whom every token
/// names, so they must come from the real auth service.
pub(crate) fn auth_channel(url: &str, tls: &tls::Tls) -> anyhow::Result<AuthChannel> {
    use anyhow::Context as _;
    let channel = tls
        .endpoint(url)
        .context("auth service URL")?
        .connect_timeout(std::time::Duration::from_secs(2))
        .timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    Ok(tower_layer::Layer::layer(
        &telemetry::grpc::ClientLayer,
        channel,
    ))
}

/// The caller of the RPC being handled, as the [`AuthLayer`] verified it.
///
/// Handlers of RPCs that the policy does not leave public can rely on it.
pub fn caller<T>(request: &tonic::Request<T>) -> Result<&Claims, tonic::Status> {
    request
        .extensions()
        .get::<Claims>()
        .ok_or_else(|| tonic::Status::unauthenticated("no verified caller"))
}
