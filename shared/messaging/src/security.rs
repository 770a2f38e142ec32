//! How every Kafka client of the system secures its connections: the
//! `KAFKA_SECURITY_PROTOCOL` and `KAFKA_SSL_*` settings, checked once,
//! and [`client_config`], the one place where an rdkafka [`ClientConfig`]
//! is made (the services' producers and consumers, the
//! `create-topics` job, the tests' readers).
//!
//! The rules:
//! - `plaintext` (the default) takes no TLS setting: one that is set
//!   stops the process at start, since it says the operator expected a
//!   protection that the connection would silently lack;
//! - `ssl` verifies the broker's certificate against
//!   `KAFKA_SSL_CA_LOCATION` and checks that it names the host dialled.
//!   The CA is required: a PEM file, or the word `system` for the
//!   operating system's roots (a managed cluster with a public
//!   certificate). There is no implicit fallback to system roots, as
//!   there is none for gRPC (`GRPC_TLS_CA`): the brokers of a deployment
//!   normally carry its own CA's certificates;
//! - a client certificate (mutual TLS) is `KAFKA_SSL_CERTIFICATE_LOCATION`
//!   with `KAFKA_SSL_KEY_LOCATION`, both or neither, and only over TLS.
//!
//! SASL (`sasl_plaintext`, `sasl_ssl`) is not offered yet: librdkafka as
//! built here has PLAIN and SCRAM (not GSSAPI, which needs cyrus-sasl),
//! but the tests' broker cannot be given a first SASL user, so nothing
//! could test the settings; `KAFKA_SECURITY_PROTOCOL=sasl_ssl` is refused
//! as an unknown value rather than accepted untested.
//!
//! Files are read at start, so a wrong path stops the process naming the
//! setting rather than failing every connection later.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use rdkafka::ClientConfig;

/// `security.protocol` of librdkafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
#[clap(rename_all = "snake_case")]
pub enum SecurityProtocol {
    /// No TLS.
    #[default]
    Plaintext,
    /// TLS.
    Ssl,
}

impl SecurityProtocol {
    fn as_librdkafka(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Ssl => "ssl",
        }
    }

    /// Whether connections are encrypted.
    pub fn uses_tls(self) -> bool {
        self == Self::Ssl
    }
}

/// The word that makes `KAFKA_SSL_CA_LOCATION` the system's roots.
pub const SYSTEM_ROOTS: &str = "system";

/// How Kafka clients secure their connections (see the module docs).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct KafkaSecurity {
    /// plaintext, or ssl (TLS, verifying the brokers' certificates).
    #[arg(id = "kafka_security_protocol", long = "kafka-security-protocol",
          env = "KAFKA_SECURITY_PROTOCOL", value_enum, default_value_t = SecurityProtocol::Plaintext)]
    pub protocol: SecurityProtocol,

    /// PEM CA certificate(s) the brokers' certificates must chain to, or
    /// `system` for the operating system's roots (required with ssl).
    #[arg(
        id = "kafka_ssl_ca_location",
        long = "kafka-ssl-ca-location",
        env = "KAFKA_SSL_CA_LOCATION"
    )]
    pub ca_location: Option<String>,

    /// PEM client certificate presented to the brokers (mutual TLS), with
    /// KAFKA_SSL_KEY_LOCATION.
    #[arg(
        id = "kafka_ssl_certificate_location",
        long = "kafka-ssl-certificate-location",
        env = "KAFKA_SSL_CERTIFICATE_LOCATION"
    )]
    pub certificate_location: Option<PathBuf>,

    /// PEM private key of KAFKA_SSL_CERTIFICATE_LOCATION.
    #[arg(
        id = "kafka_ssl_key_location",
        long = "kafka-ssl-key-location",
        env = "KAFKA_SSL_KEY_LOCATION"
    )]
    pub key_location: Option<PathBuf>,
}

impl KafkaSecurity {
    /// TLS trusting the CA in `ca`, with no client certificate.
    pub fn tls(ca: impl Into<PathBuf>) -> Self {
        Self {
            protocol: SecurityProtocol::Ssl,
            ca_location: Some(ca.into().display().to_string()),
            ..Self::default()
        }
    }

    /// Adds a client certificate (mutual TLS).
    pub fn with_client_certificate(
        mut self,
        certificate: impl Into<PathBuf>,
        key: impl Into<PathBuf>,
    ) -> Self {
        self.certificate_location = Some(certificate.into());
        self.key_location = Some(key.into());
        self
    }

    /// The settings as this process's environment gives them (for a tool
    /// without a command line of its own, such as `cargo xtask up`).
    pub fn from_env() -> anyhow::Result<Self> {
        #[derive(clap::Parser)]
        struct Environment {
            #[command(flatten)]
            security: KafkaSecurity,
        }
        use clap::Parser as _;
        let parsed = Environment::try_parse_from(["environment"])
            .context("reading KAFKA_SECURITY_PROTOCOL and KAFKA_SSL_*")?;
        Ok(parsed.security)
    }

    /// The settings as `(variable, value)` pairs, for a child process.
    pub fn env(&self) -> Vec<(String, String)> {
        let path = |path: &Option<PathBuf>| path.as_ref().map(|p| p.display().to_string());
        [
            (
                "KAFKA_SECURITY_PROTOCOL",
                Some(self.protocol.as_librdkafka().to_owned()),
            ),
            ("KAFKA_SSL_CA_LOCATION", self.ca_location.clone()),
            (
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                path(&self.certificate_location),
            ),
            ("KAFKA_SSL_KEY_LOCATION", path(&self.key_location)),
        ]
        .into_iter()
        .filter_map(|(key, value)| Some((key.to_owned(), value?)))
        .collect()
    }

    /// Checks the rules of the module docs, reading the files named.
    /// Errors name the setting.
    pub fn check(&self) -> anyhow::Result<()> {
        self.applied().map(drop)
    }

    /// The librdkafka properties these settings stand for, checked.
    fn applied(&self) -> anyhow::Result<Vec<(&'static str, String)>> {
        let protocol = self.protocol;
        let name = protocol.as_librdkafka();
        let mut properties = vec![("security.protocol", name.to_owned())];

        let tls_settings = [
            ("KAFKA_SSL_CA_LOCATION", self.ca_location.is_some()),
            (
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                self.certificate_location.is_some(),
            ),
            ("KAFKA_SSL_KEY_LOCATION", self.key_location.is_some()),
        ];
        if !protocol.uses_tls() {
            if let Some((setting, _)) = tls_settings.iter().find(|(_, set)| *set) {
                bail!(
                    "{setting} is set but KAFKA_SECURITY_PROTOCOL is {name}, which has no TLS: \
                     set it to ssl, or unset {setting}"
                );
            }
        } else {
            match self.ca_location.as_deref() {
                None | Some("") => bail!(
                    "KAFKA_SECURITY_PROTOCOL={name} needs KAFKA_SSL_CA_LOCATION: the CA file \
                     the brokers' certificates chain to, or `{SYSTEM_ROOTS}` for the system's roots"
                ),
                // librdkafka looks for the system's CA bundle in the usual
                // places (OpenSSL is built from source here, so its own
                // default folder may not be the system's).
                Some(SYSTEM_ROOTS) => properties.push(("ssl.ca.location", "probe".to_owned())),
                Some(path) => {
                    let path = Path::new(path);
                    readable_pem(path, "KAFKA_SSL_CA_LOCATION", "CERTIFICATE")?;
                    properties.push(("ssl.ca.location", path.display().to_string()));
                }
            }
            match (&self.certificate_location, &self.key_location) {
                (Some(certificate), Some(key)) => {
                    readable_pem(certificate, "KAFKA_SSL_CERTIFICATE_LOCATION", "CERTIFICATE")?;
                    readable_pem(key, "KAFKA_SSL_KEY_LOCATION", "PRIVATE KEY")?;
                    properties.push((
                        "ssl.certificate.location",
                        certificate.display().to_string(),
                    ));
                    properties.push(("ssl.key.location", key.display().to_string()));
                }
                (None, None) => {}
                (Some(_), None) => {
                    bail!("KAFKA_SSL_CERTIFICATE_LOCATION is set without KAFKA_SSL_KEY_LOCATION")
                }
                (None, Some(_)) => {
                    bail!("KAFKA_SSL_KEY_LOCATION is set without KAFKA_SSL_CERTIFICATE_LOCATION")
                }
            }
            // The broker's certificate must name the host dialled
            // (librdkafka's default too, said here so no one wonders).
            properties.push(("ssl.endpoint.identification.algorithm", "https".to_owned()));
        }

        Ok(properties)
    }
}

/// Whether `path` can be read and holds a PEM block of `kind` (a key's
/// label ends with it: `PRIVATE KEY`, `EC PRIVATE KEY`, ...).
fn readable_pem(path: &Path, setting: &str, kind: &str) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{setting}: reading {}", path.display()))?;
    let holds = text
        .lines()
        .any(|line| line.starts_with("-----BEGIN ") && line.ends_with(&format!("{kind}-----")));
    if !holds {
        bail!("{setting}: {} holds no PEM {kind}", path.display());
    }
    Ok(())
}

/// A client configuration for `brokers` secured by `security`: the one
/// place every rdkafka client of the system starts from, so none of them
/// can miss a setting (a producer over TLS whose consumer would talk
/// cleartext, say).
pub fn client_config(brokers: &str, security: &KafkaSecurity) -> anyhow::Result<ClientConfig> {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in security.applied()? {
        config.set(key, value);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[derive(Debug, clap::Parser)]
    struct Example {
        #[command(flatten)]
        security: KafkaSecurity,
    }

    fn parse(args: &[&str]) -> Result<KafkaSecurity, clap::Error> {
        Example::try_parse_from(std::iter::once("example").chain(args.iter().copied()))
            .map(|example| example.security)
    }

    fn refused(args: &[&str]) -> String {
        let security = parse(args).unwrap();
        format!("{:#}", security.check().unwrap_err())
    }

    /// A CA certificate and a client key pair, as PEM files.
    struct Files {
        dir: tempfile::TempDir,
    }

    impl Files {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let certificate = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";
            std::fs::write(dir.path().join("ca.pem"), certificate).unwrap();
            std::fs::write(dir.path().join("client.pem"), certificate).unwrap();
            std::fs::write(
                dir.path().join("client.key"),
                "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n",
            )
            .unwrap();
            Self { dir }
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }
    }

    fn property(config: &ClientConfig, key: &str) -> Option<String> {
        config.get(key).map(str::to_owned)
    }

    #[test]
    fn by_default_clients_speak_plaintext() {
        let security = parse(&[]).unwrap();
        assert_eq!(security.protocol, SecurityProtocol::Plaintext);
        let config = client_config("b:9092", &security).unwrap();
        assert_eq!(property(&config, "bootstrap.servers").unwrap(), "b:9092");
        assert_eq!(property(&config, "security.protocol").unwrap(), "plaintext");
        assert_eq!(property(&config, "ssl.ca.location"), None);
    }

    #[test]
    fn tls_verifies_the_broker_against_the_ca_and_its_name() {
        let files = Files::new();
        let security = parse(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-ca-location",
            &files.path("ca.pem"),
        ])
        .unwrap();
        let config = client_config("b:9093", &security).unwrap();
        assert_eq!(property(&config, "security.protocol").unwrap(), "ssl");
        assert_eq!(
            property(&config, "ssl.ca.location").unwrap(),
            files.path("ca.pem")
        );
        assert_eq!(
            property(&config, "ssl.endpoint.identification.algorithm").unwrap(),
            "https"
        );
        assert_eq!(property(&config, "ssl.certificate.location"), None);
    }

    #[test]
    fn tls_needs_a_ca_or_the_word_system() {
        let message = refused(&["--kafka-security-protocol", "ssl"]);
        assert!(message.contains("needs KAFKA_SSL_CA_LOCATION"), "{message}");

        let security = parse(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-ca-location",
            "system",
        ])
        .unwrap();
        let config = client_config("b:9093", &security).unwrap();
        assert_eq!(property(&config, "ssl.ca.location").unwrap(), "probe");
    }

    #[test]
    fn a_file_that_cannot_be_read_or_is_no_pem_is_refused_naming_the_setting() {
        let files = Files::new();
        let message = refused(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-ca-location",
            "/nonexistent/ca.pem",
        ]);
        assert!(
            message.starts_with("KAFKA_SSL_CA_LOCATION: reading /nonexistent/ca.pem"),
            "{message}"
        );
        // A key where the certificate belongs.
        let message = refused(&[
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-ca-location",
            &files.path("client.key"),
        ]);
        assert!(
            message.contains("KAFKA_SSL_CA_LOCATION") && message.contains("no PEM CERTIFICATE"),
            "{message}"
        );
    }

    #[test]
    fn a_client_certificate_needs_its_key_and_the_other_way_round() {
        let files = Files::new();
        let tls = [
            "--kafka-security-protocol",
            "ssl",
            "--kafka-ssl-ca-location",
        ];
        let ca = files.path("ca.pem");
        let cert = files.path("client.pem");
        let key = files.path("client.key");

        let mut args = tls.to_vec();
        args.extend([ca.as_str(), "--kafka-ssl-certificate-location", &cert]);
        let message = refused(&args);
        assert_eq!(
            message,
            "KAFKA_SSL_CERTIFICATE_LOCATION is set without KAFKA_SSL_KEY_LOCATION"
        );

        let mut args = tls.to_vec();
        args.extend([ca.as_str(), "--kafka-ssl-key-location", &key]);
        let message = refused(&args);
        assert_eq!(
            message,
            "KAFKA_SSL_KEY_LOCATION is set without KAFKA_SSL_CERTIFICATE_LOCATION"
        );

        let mut args = tls.to_vec();
        args.extend([
            ca.as_str(),
            "--kafka-ssl-certificate-location",
            &cert,
            "--kafka-ssl-key-location",
            &key,
        ]);
        let config = client_config("b:9093", &parse(&args).unwrap()).unwrap();
        assert_eq!(property(&config, "ssl.certificate.location").unwrap(), cert);
        assert_eq!(property(&config, "ssl.key.location").unwrap(), key);
    }

    #[test]
    fn tls_settings_without_tls_are_refused_rather_than_ignored() {
        let files = Files::new();
        let message = refused(&["--kafka-ssl-ca-location", &files.path("ca.pem")]);
        assert!(
            message.starts_with(
                "KAFKA_SSL_CA_LOCATION is set but KAFKA_SECURITY_PROTOCOL is plaintext"
            ),
            "{message}"
        );
        let message = refused(&[
            "--kafka-ssl-certificate-location",
            &files.path("client.pem"),
        ]);
        assert!(
            message.starts_with(
                "KAFKA_SSL_CERTIFICATE_LOCATION is set but KAFKA_SECURITY_PROTOCOL is plaintext"
            ),
            "{message}"
        );
    }

    #[test]
    fn an_unknown_protocol_is_a_parse_error_and_sasl_is_not_offered_yet() {
        for protocol in ["tls", "sasl_plaintext", "sasl_ssl"] {
            assert!(
                parse(&["--kafka-security-protocol", protocol]).is_err(),
                "{protocol}"
            );
        }
    }

    #[test]
    fn the_settings_survive_a_trip_through_the_environment() {
        let files = Files::new();
        let security = KafkaSecurity::tls(files.path("ca.pem"))
            .with_client_certificate(files.path("client.pem"), files.path("client.key"));
        let env = security.env();
        let args: Vec<String> = env
            .iter()
            .flat_map(|(key, value)| {
                [
                    format!("--{}", key.to_ascii_lowercase().replace('_', "-")),
                    value.clone(),
                ]
            })
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let parsed = parse(&args).unwrap();
        assert_eq!(
            client_config("b", &parsed).unwrap().config_map(),
            client_config("b", &security).unwrap().config_map()
        );
    }

    /// librdkafka as built here: TLS, and the SASL mechanisms built in
    /// (for when SASL is offered), without GSSAPI (which would need
    /// cyrus-sasl, a system library). librdkafka refuses a
    /// `builtin.features` naming one it lacks.
    #[test]
    fn librdkafka_is_built_with_tls_plain_and_scram_but_not_gssapi() {
        let create = |features: &str| {
            let mut config = client_config("127.0.0.1:1", &KafkaSecurity::default()).unwrap();
            config.set("builtin.features", features);
            config
                .create::<rdkafka::consumer::BaseConsumer>()
                .map(drop)
                .map_err(|error| error.to_string())
        };
        create("ssl,sasl_plain,sasl_scram").unwrap();
        let error = create("sasl_gssapi").unwrap_err();
        assert!(error.contains("builtin.features"), "{error}");
    }
}
