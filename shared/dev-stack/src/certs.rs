//! A local certificate authority for TLS on the local stack and in tests
//! (`cargo xtask up --tls`, the e2e tests over TLS): a CA made with rcgen
//! and, signed by it, one certificate per name, each good as a server
//! certificate and as a client one (mutual TLS).
//!
//! Every certificate names `localhost` and `127.0.0.1`, where the local
//! stack listens, and its own name, which is the host name of that service
//! in docker-compose.yml. Nothing here is for a deployment: there the
//! deployment's own CA (cert-manager in `k8s/components/tls`) issues them.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};

/// The certificate a TLS broker presents ([`Broker::start_tls`]); `kafka`
/// is also the broker's host name in docker-compose.yml.
///
/// [`Broker::start_tls`]: crate::Broker::start_tls
pub const BROKER: &str = "kafka";
/// The certificate the tests' own clients (and grpcurl) present.
pub const CLIENT: &str = "client";

/// How a Kafka client reaches a TLS broker: the CA the broker's
/// certificate chains to, and the client certificate it presents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KafkaTls {
    pub ca: PathBuf,
    pub certificate: PathBuf,
    pub key: PathBuf,
}

impl KafkaTls {
    /// As settings (`KAFKA_SECURITY_PROTOCOL=ssl`, `KAFKA_SSL_*`).
    pub fn env(&self) -> Vec<(String, String)> {
        [
            ("KAFKA_SECURITY_PROTOCOL", "ssl".into()),
            ("KAFKA_SSL_CA_LOCATION", self.ca.display().to_string()),
            (
                "KAFKA_SSL_CERTIFICATE_LOCATION",
                self.certificate.display().to_string(),
            ),
            ("KAFKA_SSL_KEY_LOCATION", self.key.display().to_string()),
        ]
        .into_iter()
        .map(|(key, value)| (key.to_owned(), value))
        .collect()
    }
}

/// A CA and the certificates it signed, as PEM files in one folder:
/// `ca.pem`, and `<name>.pem` with `<name>.key` for each name.
#[derive(Debug)]
pub struct Certificates {
    dir: PathBuf,
    /// Set when the folder is ours to delete.
    _temporary: Option<tempfile::TempDir>,
}

impl Certificates {
    /// A new CA named `ca_name` and a certificate for each of `names`, in
    /// `dir` (created if needed; files there are replaced).
    pub fn generate_in(dir: &Path, ca_name: &str, names: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name = name(ca_name);
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = ca_params.self_signed(&ca_key)?;
        write(&dir.join("ca.pem"), &ca.pem())?;
        let issuer = Issuer::new(ca_params, ca_key);
        for service in names {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(vec![
                (*service).to_owned(),
                "localhost".to_owned(),
                "127.0.0.1".to_owned(),
            ])?;
            params.distinguished_name = name(service);
            params.extended_key_usages = vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ];
            let cert = params.signed_by(&key, &issuer)?;
            write(&dir.join(format!("{service}.pem")), &cert.pem())?;
            write_private(&dir.join(format!("{service}.key")), &key.serialize_pem())?;
        }
        Ok(Self {
            dir: dir.to_owned(),
            _temporary: None,
        })
    }

    /// Like [`generate_in`](Self::generate_in), in a temporary folder that
    /// is deleted with the value.
    pub fn generate(ca_name: &str, names: &[&str]) -> anyhow::Result<Self> {
        let temporary = tempfile::Builder::new()
            .prefix("ordersaga-certs-")
            .tempdir()?;
        let certificates = Self::generate_in(temporary.path(), ca_name, names)?;
        Ok(Self {
            _temporary: Some(temporary),
            ..certificates
        })
    }

    /// The folder holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The CA's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The certificate of `name`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.pem"))
    }

    /// The private key of `name`'s certificate.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.key"))
    }

    /// The settings (`GRPC_TLS_CERT`, `GRPC_TLS_KEY`, `GRPC_TLS_CA`) that
    /// make `name` serve and call over TLS with its certificate.
    pub fn grpc_env(&self, name: &str) -> Vec<(String, String)> {
        [
            ("GRPC_TLS_CERT", self.cert(name)),
            ("GRPC_TLS_KEY", self.key(name)),
            ("GRPC_TLS_CA", self.ca()),
        ]
        .into_iter()
        .map(|(key, path)| (key.to_owned(), path.display().to_string()))
        .collect()
    }

    /// A Kafka client's TLS as `name`: trusting the CA, presenting
    /// `name`'s certificate.
    pub fn kafka_client(&self, name: &str) -> KafkaTls {
        KafkaTls {
            ca: self.ca(),
            certificate: self.cert(name),
            key: self.key(name),
        }
    }

    /// A client's TLS as `name`: trusting the CA, presenting `name`'s
    /// certificate.
    pub fn client(&self, name: &str) -> anyhow::Result<tls::Tls> {
        tls::Tls::load(&tls::TlsSettings {
            cert: Some(self.cert(name)),
            key: Some(self.key(name)),
            ca: Some(self.ca()),
            client_auth: false,
        })
    }

    /// A client's TLS trusting the CA, without a certificate of its own.
    pub fn anonymous_client(&self) -> anyhow::Result<tls::Tls> {
        tls::Tls::load(&tls::TlsSettings {
            ca: Some(self.ca()),
            ..tls::TlsSettings::default()
        })
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "ordersaga (local)");
    name.push(DnType::CommonName, common_name);
    name
}

/// Writes a private key readable by its owner only (PostgreSQL insists).
fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let _ = std::fs::remove_file(path);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut file| file.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

fn write(path: &Path, contents: &str) -> anyhow::Result<()> {
    std::fs::write(path, contents).with_context(|| format!("writing {}", path.display()))
}
