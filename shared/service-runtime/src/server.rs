use std::convert::Infallible;
use std::net::SocketAddr;

use anyhow::Context as _;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::{Routes, RoutesBuilder};
use tonic::transport::server::TcpIncoming;

use crate::ServerSettings;
use crate::health::{self, Readiness};
use crate::http::{Collector, HttpServer};

/// The gRPC server of a service: bound at construction, then given its
/// services, then served until shutdown.
///
/// Every server carries the same stack, outermost first:
/// 1. the telemetry layer, so even a refused or timed-out request has its
///    span and correlation id (named after the method only when it is one
///    this server serves, as listed by the descriptor sets given to
///    [`reflect`](Self::reflect): callers choose paths, and metric series
///    must stay few);
/// 2. access control, when the service has a policy, so no handler runs
///    for a caller the policy does not admit;
/// 3. the request timeout, so no handler can hold a connection forever;
/// 4. the routes: the service's own gRPC services, `grpc.health.v1.Health`
///    and reflection (v1 and v1alpha, the latter for grpcurl 1.8).
///
/// Beside it runs a small HTTP server with `/metrics` (and any routes the
/// service adds), on its own port.
pub struct GrpcServer {
    listener: TcpListener,
    settings: ServerSettings,
    routes: RoutesBuilder,
    services: Vec<&'static str>,
    descriptor_sets: Vec<&'static [u8]>,
    access_control: Option<access_control::AuthLayer>,
    /// The process's TLS settings: the server's certificate (none:
    /// cleartext), and what the service's clients use too.
    tls: tls::Tls,
    http: HttpServer,
}

impl std::fmt::Debug for GrpcServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrpcServer")
            .field("address", &self.listener.local_addr().ok())
            .field("services", &self.services)
            .field("tls", &self.tls.serves_tls())
            .finish_non_exhaustive()
    }
}

impl GrpcServer {
    /// Binds the listening socket now, so the port is known (and taken)
    /// before anything else starts. It serves TLS when `tls` has a
    /// certificate (and then, if `tls` says so, only to callers with a
    /// client certificate), cleartext otherwise.
    pub async fn bind(settings: ServerSettings, tls: &tls::Tls) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(settings.grpc_addr)
            .await
            .with_context(|| format!("binding the gRPC port {}", settings.grpc_addr))?;
        let http = HttpServer::bind(settings.metrics_addr).await?;
        Ok(Self {
            listener,
            settings,
            routes: Routes::builder(),
            services: Vec::new(),
            descriptor_sets: vec![tonic_health::pb::FILE_DESCRIPTOR_SET],
            access_control: None,
            tls: tls.clone(),
            http,
        })
    }

    /// The TLS settings the server was bound with, for the service's own
    /// clients (to auth and to its downstreams).
    pub fn tls(&self) -> &tls::Tls {
        &self.tls
    }

    /// The address the HTTP (metrics) server actually bound.
    pub fn metrics_addr(&self) -> SocketAddr {
        self.http.local_addr()
    }

    /// Serves `router`'s routes on the HTTP port, beside `/metrics`.
    pub fn http_routes(mut self, router: axum::Router) -> Self {
        self.http.merge(router);
        self
    }

    /// Runs `collector` before each metrics scrape, to set gauges that are
    /// read rather than counted.
    pub fn collect_metrics(mut self, collector: Collector) -> Self {
        self.http.collect(collector);
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves `service`; its health is reported under its full name.
    pub fn add_service<S>(mut self, service: S) -> Self
    where
        S: tower_service::Service<http::Request<tonic::body::Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes.add_service(service);
        self.services.push(S::NAME);
        self
    }

    /// Puts `layer` in front of every service: each RPC is let through only
    /// for the callers its policy names (health and reflection stay open).
    pub fn with_access_control(mut self, layer: access_control::AuthLayer) -> Self {
        self.access_control = Some(layer);
        self
    }

    /// Makes the services in `descriptor_set` (an encoded
    /// `FileDescriptorSet`) visible to reflection.
    pub fn reflect(mut self, descriptor_set: &'static [u8]) -> Self {
        self.descriptor_sets.push(descriptor_set);
        self
    }

    /// Serves until `shutdown`, then stops taking requests and lets those in
    /// flight finish (for at most the grace period). Health reports SERVING
    /// only while `readiness` holds, and NOT_SERVING from shutdown on.
    pub async fn serve(
        self,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let address = self.local_addr();
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // The reporter starts out SERVING; nothing is, until checked.
        health::set_all(
            &reporter,
            &self.services,
            tonic_health::ServingStatus::NotServing,
        )
        .await;
        // Liveness is the server answering at all: a database outage makes a
        // replica unready, never a candidate for a restart.
        reporter
            .set_service_status(health::LIVENESS, tonic_health::ServingStatus::Serving)
            .await;
        let reflection = || {
            self.descriptor_sets.iter().fold(
                tonic_reflection::server::Builder::configure(),
                |builder, set| builder.register_encoded_file_descriptor_set(set),
            )
        };
        let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
        let reflection_v1alpha = reflection()
            .build_v1alpha()
            .context("building reflection v1alpha")?;
        let mut routes = self.routes;
        routes
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        let health = tokio::spawn(health::report(
            readiness,
            reporter,
            self.services.clone(),
            self.settings.health_check_interval,
            shutdown.clone(),
        ));

        let methods = served_methods(&self.descriptor_sets, &self.services)?;
        let http = tokio::spawn(self.http.serve(self.settings.http(), shutdown.clone()));
        tracing::info!(%address, services = ?self.services, tls = self.tls.serves_tls(), "gRPC server listening");
        let mut builder = tonic::transport::Server::builder();
        if let Some(config) = self.tls.server_config() {
            builder = builder
                .tls_config(config)
                .context("the gRPC server's TLS configuration")?;
        }
        let serving = builder
            .layer(telemetry::grpc::ServerLayer::new(methods))
            .layer(tower::util::option_layer(self.access_control))
            .timeout(self.settings.request_timeout)
            .add_routes(routes.routes())
            .serve_with_incoming_shutdown(
                // Answers go out at once: with Nagle's algorithm a reply's
                // last frames wait for the peer's delayed ACK (~40 ms).
                TcpIncoming::from(self.listener).with_nodelay(Some(true)),
                shutdown.clone().cancelled_owned(),
            );
        let mut serving = std::pin::pin!(serving);

        let outcome = tokio::select! {
            result = &mut serving => result.context("gRPC server failed"),
            () = shutdown.cancelled() => {
                tracing::info!("shutting down: finishing in-flight requests");
                match tokio::time::timeout(self.settings.shutdown_grace_period, serving).await {
                    Ok(result) => result.context("gRPC server failed while stopping"),
                    Err(_) => {
                        tracing::warn!(grace = ?self.settings.shutdown_grace_period, "requests still in flight after the grace period were dropped");
                        Ok(())
                    }
                }
            }
        };
        shutdown.cancel();
        let _ = health.await;
        match http.await {
            Ok(Err(error)) => tracing::warn!(
                error = format!("{error:#}"),
                "HTTP server stopped with an error"
            ),
            Err(error) => tracing::warn!(%error, "HTTP server task failed"),
            Ok(Ok(())) => {}
        }
        outcome
    }
}

/// The full names (`package.Service/Method`) of every method of `services`,
/// from the encoded `FileDescriptorSet`s. A served service missing from them
/// is an error: its calls would all be counted as `unknown`.
fn served_methods(
    descriptor_sets: &[&[u8]],
    services: &[&str],
) -> anyhow::Result<telemetry::grpc::KnownMethods> {
    use prost::Message as _;
    let mut methods = Vec::new();
    let mut found = Vec::new();
    for set in descriptor_sets {
        let set = prost_types::FileDescriptorSet::decode(*set)
            .context("decoding a file descriptor set")?;
        for file in &set.file {
            let package = file.package();
            for service in &file.service {
                let name = if package.is_empty() {
                    service.name().to_owned()
                } else {
                    format!("{package}.{}", service.name())
                };
                if services.contains(&name.as_str()) {
                    methods.extend(
                        service
                            .method
                            .iter()
                            .map(|method| format!("{name}/{}", method.name())),
                    );
                    found.push(name);
                }
            }
        }
    }
    if let Some(missing) = services.iter().find(|s| !found.iter().any(|f| f == *s)) {
        anyhow::bail!(
            "the service {missing} is served but no descriptor set describes it: pass its FILE_DESCRIPTOR_SET to reflect()"
        );
    }
    Ok(telemetry::grpc::KnownMethods::new(methods))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_served_methods_come_from_the_descriptor_sets() {
        let methods = served_methods(
            &[tonic_health::pb::FILE_DESCRIPTOR_SET],
            &["grpc.health.v1.Health"],
        )
        .unwrap();
        assert!(methods.contains("grpc.health.v1.Health/Check"));
        assert!(methods.contains("grpc.health.v1.Health/Watch"));
        assert!(!methods.contains("grpc.health.v1.Health/Nope"));
        assert_eq!(methods.len(), methods_of_health());

        let missing = served_methods(&[tonic_health::pb::FILE_DESCRIPTOR_SET], &["x.y.Z"])
            .unwrap_err()
            .to_string();
        assert!(missing.contains("x.y.Z"), "{missing}");
    }

    fn methods_of_health() -> usize {
        use prost::Message as _;
        prost_types::FileDescriptorSet::decode(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .unwrap()
            .file
            .iter()
            .flat_map(|file| &file.service)
            .map(|service| service.method.len())
            .sum()
    }
}
