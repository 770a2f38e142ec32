//! TLS on the gRPC connections, servers and clients alike (rustls, through
//! tonic's `tls-ring`).
//!
//! Why: the services trust what the auth service tells them. Over
//! cleartext, whoever can intercept a service's connection to auth can
//! answer `GetPublicKeys` with keys of their own and then mint tokens for
//! any role, admin included. With TLS a service talks only to a peer whose
//! certificate chains to the CA it was given and names the host it dialled.
//!
//! - [`TlsSettings`]: `GRPC_TLS_CERT`, `GRPC_TLS_KEY`, `GRPC_TLS_CA`,
//!   `GRPC_TLS_CLIENT_AUTH`, flattened into every binary's settings.
//! - [`Tls`]: those settings loaded once at start (files read and parsed,
//!   so a bad path or PEM stops the process naming the setting), giving the
//!   server its [`ServerTlsConfig`] and every client its [`Endpoint`].
//!
//! The rules, in one place:
//! - a server with a certificate serves TLS only; without one it serves
//!   cleartext (the local stack's and most tests' default);
//! - a client verifies a peer against `GRPC_TLS_CA` alone (no system
//!   roots: service certificates come from the deployment's own CA);
//! - once a CA is set, every peer URL must be `https://`: a cleartext URL
//!   is refused at start rather than silently downgrading the call, and an
//!   `https://` URL without a CA is refused for want of anything to trust;
//! - a process with a certificate presents it when it calls (mutual TLS),
//!   and with `GRPC_TLS_CLIENT_AUTH` a server refuses every caller without
//!   a client certificate from the CA, before any request is read.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// Longest a caller may take over its TLS handshake: handshakes run beside
/// the accept loop, so a caller that connects and says nothing would
/// otherwise hold its socket and task for good.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS settings of a binary's gRPC server and clients.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TlsSettings {
    /// PEM certificate (chain) this process presents: on its gRPC port,
    /// and as its client certificate when it calls another service. Unset:
    /// the gRPC port speaks cleartext.
    #[arg(
        id = "grpc_tls_cert",
        long = "grpc-tls-cert",
        env = "GRPC_TLS_CERT",
        requires = "grpc_tls_key"
    )]
    pub cert: Option<PathBuf>,

    /// PEM private key of `GRPC_TLS_CERT`.
    #[arg(
        id = "grpc_tls_key",
        long = "grpc-tls-key",
        env = "GRPC_TLS_KEY",
        requires = "grpc_tls_cert"
    )]
    pub key: Option<PathBuf>,

    /// PEM certificate(s) of the CA that peers' certificates must chain to:
    /// the servers this process calls (then every peer URL must be
    /// https://), and its callers when GRPC_TLS_CLIENT_AUTH is on.
    #[arg(id = "grpc_tls_ca", long = "grpc-tls-ca", env = "GRPC_TLS_CA")]
    pub ca: Option<PathBuf>,

    /// Require a client certificate signed by GRPC_TLS_CA from every caller
    /// of the gRPC port (needs GRPC_TLS_CERT and GRPC_TLS_CA).
    #[arg(long = "grpc-tls-client-auth", env = "GRPC_TLS_CLIENT_AUTH", default_value_t = false,
          action = clap::ArgAction::Set, value_parser = clap::builder::BoolishValueParser::new())]
    pub client_auth: bool,
}

/// [`TlsSettings`] loaded: what the server and the clients of one process
/// use. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Tls {
    identity: Option<Identity>,
    ca: Option<Certificate>,
    client_auth: bool,
}

impl Tls {
    /// Cleartext everywhere: no certificate, no CA.
    pub fn cleartext() -> Self {
        Self::default()
    }

    /// Reads and checks the files `settings` name. Errors name the setting.
    pub fn load(settings: &TlsSettings) -> anyhow::Result<Self> {
        let identity = match (&settings.cert, &settings.key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(
                read(cert, "GRPC_TLS_CERT")?,
                read(key, "GRPC_TLS_KEY")?,
            )),
            (None, None) => None,
            (Some(_), None) => bail!("GRPC_TLS_CERT is set without GRPC_TLS_KEY"),
            (None, Some(_)) => bail!("GRPC_TLS_KEY is set without GRPC_TLS_CERT"),
        };
        let ca = match &settings.ca {
            Some(path) => Some(Certificate::from_pem(read(path, "GRPC_TLS_CA")?)),
            None => None,
        };
        if settings.client_auth && (identity.is_none() || ca.is_none()) {
            bail!(
                "GRPC_TLS_CLIENT_AUTH needs GRPC_TLS_CERT, GRPC_TLS_KEY (the server's own certificate) \
                 and GRPC_TLS_CA (whom to accept client certificates from)"
            );
        }
        let tls = Self {
            identity,
            ca,
            client_auth: settings.client_auth,
        };
        tls.check()?;
        Ok(tls)
    }

    /// Whether the gRPC port speaks TLS.
    pub fn serves_tls(&self) -> bool {
        self.identity.is_some()
    }

    /// Whether peers are called over TLS (a CA to verify them is set).
    pub fn calls_tls(&self) -> bool {
        self.ca.is_some()
    }

    /// The server's TLS configuration, or `None` for cleartext.
    pub fn server_config(&self) -> Option<ServerTlsConfig> {
        let identity = self.identity.clone()?;
        let mut config = ServerTlsConfig::new()
            .identity(identity)
            .timeout(HANDSHAKE_TIMEOUT);
        if self.client_auth
            && let Some(ca) = &self.ca
        {
            config = config
                .client_ca_root(ca.clone())
                .client_auth_optional(false);
        }
        Some(config)
    }

    /// An endpoint for the peer at `url`: over TLS (verified against the
    /// CA, presenting this process's certificate if it has one) for
    /// `https://`, cleartext for `http://` when no CA is set; any other
    /// combination is refused.
    pub fn endpoint(&self, url: &str) -> anyhow::Result<Endpoint> {
        let endpoint = Endpoint::from_shared(url.to_owned())
            .with_context(|| format!("{url:?} is not a valid URL"))?;
        match (endpoint.uri().scheme_str(), &self.ca) {
            (Some("https"), Some(_)) => endpoint
                .tls_config(self.client_config())
                .with_context(|| format!("the TLS configuration for {url}")),
            (Some("https"), None) => bail!(
                "{url} is an https:// URL but GRPC_TLS_CA is not set: there is nothing to verify the peer against"
            ),
            (Some("http"), None) => Ok(endpoint),
            (Some("http"), Some(_)) => bail!(
                "{url} is a cleartext URL while GRPC_TLS_CA is set: use https:// (calls to peers are over TLS only)"
            ),
            _ => bail!("{url} is neither an http:// nor an https:// URL"),
        }
    }

    /// The URL scheme peers are called with.
    pub fn scheme(&self) -> &'static str {
        if self.calls_tls() { "https" } else { "http" }
    }

    fn client_config(&self) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new();
        if let Some(ca) = &self.ca {
            config = config.ca_certificate(ca.clone());
        }
        if let Some(identity) = &self.identity {
            config = config.identity(identity.clone());
        }
        config
    }

    /// Builds both configurations once, so a certificate or key that does
    /// not parse stops the process at start, not at its first call.
    fn check(&self) -> anyhow::Result<()> {
        if let Some(config) = self.server_config() {
            tonic::transport::Server::builder()
                .tls_config(config)
                .context(
                    "GRPC_TLS_CERT and GRPC_TLS_KEY do not make a usable certificate and key",
                )?;
        }
        if self.ca.is_some() {
            Endpoint::from_static("https://localhost")
                .tls_config(self.client_config())
                .context(
                    "GRPC_TLS_CA (with GRPC_TLS_CERT and GRPC_TLS_KEY, if set) is not usable",
                )?;
        }
        Ok(())
    }
}

fn read(path: &Path, setting: &str) -> anyhow::Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("{setting}: reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let ca_key = rcgen::KeyPair::generate().unwrap();
            let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
            ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            let ca = ca_params.self_signed(&ca_key).unwrap();
            let issuer = rcgen::Issuer::new(ca_params, ca_key);
            let key = rcgen::KeyPair::generate().unwrap();
            let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
                .unwrap()
                .signed_by(&key, &issuer)
                .unwrap();
            std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
            std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
            std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
            Self { dir }
        }

        fn path(&self, name: &str) -> Option<PathBuf> {
            Some(self.dir.path().join(name))
        }

        fn settings(&self, client_auth: bool) -> TlsSettings {
            TlsSettings {
                cert: self.path("cert.pem"),
                key: self.path("key.pem"),
                ca: self.path("ca.pem"),
                client_auth,
            }
        }
    }

    #[derive(Debug, clap::Parser)]
    struct Example {
        #[command(flatten)]
        tls: TlsSettings,
    }

    fn parse(args: &[&str]) -> Result<TlsSettings, clap::Error> {
        use clap::Parser as _;
        Example::try_parse_from(std::iter::once("example").chain(args.iter().copied()))
            .map(|example| example.tls)
    }

    #[test]
    fn without_settings_everything_is_cleartext() {
        let tls = Tls::load(&parse(&[]).unwrap()).unwrap();
        assert!(!tls.serves_tls() && !tls.calls_tls());
        assert!(tls.server_config().is_none());
        assert_eq!(tls.scheme(), "http");
        tls.endpoint("http://localhost:50051").unwrap();
        let refused = tls.endpoint("https://localhost:50051").unwrap_err();
        assert!(refused.to_string().contains("GRPC_TLS_CA"), "{refused}");
    }

    #[test]
    fn a_certificate_needs_its_key_and_client_auth_needs_a_ca() {
        let files = Files::new();
        let cert = files.dir.path().join("cert.pem");
        let error = parse(&["--grpc-tls-cert", cert.to_str().unwrap()]).unwrap_err();
        assert_eq!(
            error.kind(),
            clap::error::ErrorKind::MissingRequiredArgument
        );

        let mut settings = files.settings(true);
        settings.ca = None;
        let error = Tls::load(&settings).unwrap_err().to_string();
        assert!(error.starts_with("GRPC_TLS_CLIENT_AUTH needs"), "{error}");

        let on = parse(&["--grpc-tls-client-auth", "yes"]).unwrap();
        assert!(on.client_auth);
    }

    #[test]
    fn a_missing_or_unreadable_file_names_its_setting() {
        let files = Files::new();
        let mut settings = files.settings(false);
        settings.ca = files.path("nowhere.pem");
        let error = format!("{:#}", Tls::load(&settings).unwrap_err());
        assert!(error.starts_with("GRPC_TLS_CA: reading"), "{error}");

        // A key that is not a key is found at start, not at the first call.
        let mut settings = files.settings(false);
        settings.key = files.path("ca.pem");
        let error = format!("{:#}", Tls::load(&settings).unwrap_err());
        assert!(error.contains("GRPC_TLS_KEY"), "{error}");
    }

    #[tokio::test]
    async fn with_a_ca_peers_are_called_over_tls_only() {
        let files = Files::new();
        let tls = Tls::load(&files.settings(false)).unwrap();
        assert!(tls.serves_tls() && tls.calls_tls());
        assert_eq!(tls.scheme(), "https");
        tls.endpoint("https://localhost:50051").unwrap();
        let refused = tls.endpoint("http://localhost:50051").unwrap_err();
        assert!(refused.to_string().contains("use https://"), "{refused}");
        assert!(tls.endpoint("ftp://localhost").is_err());
    }
}
