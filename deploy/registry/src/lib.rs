//! The system's services: the one list of their manifests, in start order
//! (auth first: the others fetch its keys; a caller after the services it
//! calls). Everything that runs, deploys or tests the whole system goes
//! through this list (`cargo xtask up` and `deploy-check`, the
//! deployment's jobs in `ops`, the end-to-end tests), so that a new
//! service is its own crate, with its `MANIFEST`, and one line here.

use messaging::Topics;
use service_runtime::Manifest;
use service_runtime::manifest;

/// Every service, in start order.
pub const SERVICES: &[&Manifest] = &[
    &auth_service::MANIFEST,
    &order_service::MANIFEST,
    &payment_service::MANIFEST,
    &saga_orchestrator::MANIFEST,
];

/// The service named `name`.
pub fn service(name: &str) -> Option<&'static Manifest> {
    SERVICES
        .iter()
        .copied()
        .find(|manifest| manifest.name == name)
}

/// Every topic of the system under `names`' prefix: the event topics, then
/// each consumer group's dead-letter topic. What deployment creates before
/// the services start.
pub fn topics(names: &Topics) -> Vec<String> {
    manifest::topics(SERVICES, names)
}

/// The services whose service tokens make them clients of the auth
/// service, each to be given credentials.
pub fn service_clients() -> impl Iterator<Item = &'static Manifest> {
    SERVICES
        .iter()
        .copied()
        .filter(|manifest| manifest.is_service_client())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_manifests_agree_with_each_other() {
        assert_eq!(manifest::problems(SERVICES), Vec::<String>::new());
    }

    #[test]
    fn every_service_starts_after_the_services_it_calls() {
        for (index, manifest) in SERVICES.iter().enumerate() {
            for peer in manifest.peers {
                let callee = SERVICES.iter().position(|m| m.name == peer.service);
                assert!(
                    callee.is_some_and(|callee| callee < index),
                    "{} calls {}, which starts after it",
                    manifest.name,
                    peer.service
                );
            }
        }
    }

    #[test]
    fn every_service_reads_the_common_settings() {
        for manifest in SERVICES {
            let settings = (manifest.settings)();
            for env in ["GRPC_ADDR", "METRICS_ADDR", "DATABASE_URL", "KAFKA_BROKERS"] {
                assert!(
                    settings
                        .get_arguments()
                        .any(|arg| arg.get_env().is_some_and(|e| e == env)),
                    "{} does not read {env}",
                    manifest.name
                );
            }
        }
    }
}
