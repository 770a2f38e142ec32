use std::time::Duration;

/// Who issues tokens and for whom: shared by the auth service (which puts
/// these into tokens) and every verifier (which insists on them).
#[derive(Debug, Clone, clap::Args)]
pub struct TokenSettings {
    /// `iss` of every token.
    #[arg(
        long = "auth-issuer",
        env = "AUTH_ISSUER",
        default_value = "ordersaga-auth"
    )]
    pub issuer: String,

    /// `aud` of every token.
    #[arg(
        long = "auth-audience",
        env = "AUTH_AUDIENCE",
        default_value = "ordersaga"
    )]
    pub audience: String,
}

/// How a service reaches the auth service to verify tokens.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthSettings {
    /// gRPC URL of the auth service, for its public keys.
    #[arg(id = "auth_url", long = "auth-url", env = "AUTH_URL", default_value = "http://localhost:50051", value_parser = parse_url)]
    pub url: String,

    #[command(flatten)]
    pub token: TokenSettings,

    /// Shortest pause between two key fetches triggered by unknown key ids,
    /// so forged key ids cannot flood the auth service.
    #[arg(long = "auth-key-refetch-interval", env = "AUTH_KEY_REFETCH_INTERVAL", default_value = "1s",
          value_parser = humantime::parse_duration)]
    pub key_refetch_interval: Duration,
}

/// A service's own client credentials, for the tokens it sends.
#[derive(Clone, clap::Args)]
pub struct ServiceCredentials {
    /// Client id configured in the auth service (`AUTH_SERVICE_CLIENTS`).
    #[arg(long = "service-client-id", env = "SERVICE_CLIENT_ID")]
    pub client_id: String,

    /// The client's secret.
    #[arg(
        long = "service-client-secret",
        env = "SERVICE_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: String,
}

impl std::fmt::Debug for ServiceCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceCredentials")
            .field("client_id", &self.client_id)
            .finish_non_exhaustive()
    }
}

pub(crate) fn parse_url(value: &str) -> Result<String, String> {
    let uri: http::Uri = value
        .parse()
        .map_err(|error: http::uri::InvalidUri| error.to_string())?;
    match (uri.scheme_str(), uri.host()) {
        (Some("http" | "https"), Some(_)) => Ok(value.to_owned()),
        _ => Err("expected an http:// or https:// URL".to_owned()),
    }
}
