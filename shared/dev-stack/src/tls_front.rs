//! A TLS listener in front of the private broker, for [`Broker::start_tls`].
//!
//! Why not the broker's own TLS: `tansu broker` 0.6.0 has `--cert` and
//! `--key`, but declares both in one clap argument group (`group = "tls"`,
//! which clap makes mutually exclusive), and builds its TLS configuration
//! only when both are given. So `--cert X --key Y` is refused ("the
//! argument '--cert <CERT>' cannot be used with '--key <KEY>'"), and
//! either one alone leaves the listener in cleartext (a TLS ClientHello
//! is then read as a Kafka frame and the connection hangs). The same code
//! is on tansu's main branch (now `nisshi-cli/src/cli/broker.rs`).
//!
//! So the broker listens in cleartext on a loopback port of its own and
//! advertises this listener, which terminates TLS (rustls: TLS 1.2 and
//! 1.3, a client certificate from the CA required) and forwards the bytes.
//! Clients see only TLS: the bootstrap address, and every broker address
//! in the metadata, is this listener. It runs on a thread of its own so
//! it lives exactly as long as the [`Broker`](crate::Broker), whichever
//! runtime started it.
//!
//! [`Broker::start_tls`]: crate::Broker::start_tls

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};

use crate::Certificates;

/// Longest a client may take over its handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The TLS listener; dropping it closes the listener and every connection.
#[derive(Debug)]
pub(crate) struct TlsFront {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TlsFront {
    /// Serves TLS on `listener` as `name` of `certificates`, forwarding
    /// each connection to `target`.
    pub(crate) fn start(
        listener: std::net::TcpListener,
        target: SocketAddr,
        certificates: &Certificates,
        name: &str,
    ) -> anyhow::Result<Self> {
        let acceptor = TlsAcceptor::from(Arc::new(server_config(certificates, name)?));
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("broker-tls".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = TcpListener::from_std(listener) else {
                        return;
                    };
                    let accepting = async {
                        while let Ok((inbound, peer)) = listener.accept().await {
                            tokio::spawn(forward(acceptor.clone(), inbound, peer, target));
                        }
                    };
                    tokio::select! {
                        _ = stopped => {}
                        () = accepting => {}
                    }
                });
                // Dropping the runtime here ends every forwarding task,
                // closing its connections.
            })?;
        Ok(Self {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for TlsFront {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn forward(acceptor: TlsAcceptor, inbound: TcpStream, peer: SocketAddr, target: SocketAddr) {
    let mut tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(inbound)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(error)) => {
            tracing::debug!(%peer, %error, "broker TLS handshake refused");
            return;
        }
        Err(_) => return,
    };
    let Ok(mut outbound) = TcpStream::connect(target).await else {
        return;
    };
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut outbound).await;
}

/// The broker's side: `name`'s certificate, and client certificates
/// required, from the same CA.
fn server_config(certificates: &Certificates, name: &str) -> anyhow::Result<ServerConfig> {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let chain = CertificateDer::pem_file_iter(certificates.cert(name))
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .with_context(|| format!("reading the certificate of {name}"))?;
    let key = PrivateKeyDer::from_pem_file(certificates.key(name))
        .with_context(|| format!("reading the key of {name}"))?;
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(certificates.ca()).context("reading the CA")? {
        roots.add(ca.context("reading the CA")?)?;
    }
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    Ok(ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)?)
}
