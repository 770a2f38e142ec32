//! What the rest of the system must know of a service, said once, in the
//! service's own crate (its `MANIFEST`): its name and ports, the schema and
//! role it owns, the gRPC services it serves, its migrations, the topics it
//! produces, its consumer groups and the peers it calls.
//!
//! Everything that lists the services derives from their manifests, through
//! the one list of them in the `registry` crate: the local stack (`cargo
//! xtask up`), the deployment check, the deployment's jobs (roles,
//! passwords, topics), the end-to-end tests and each service's own binary
//! tests. [`problems`] holds the list to what the manifests promise of each
//! other (unique names, ports, schemas and groups; every topic consumed has
//! a producer; every peer is a service, reached through a setting it has).

use std::collections::BTreeSet;

use access_control::Scope;
use database::{MigrationSet, ServiceAccount};
use messaging::Topics;

use crate::settings::default_metrics_port;

/// One service, as the rest of the system sees it.
#[derive(Debug, Clone, Copy)]
pub struct Manifest {
    /// Service name: its binary, its logs, traces and event envelopes.
    pub name: &'static str,
    /// Default gRPC port; the HTTP port is [`Manifest::http_port`].
    pub grpc_port: u16,
    /// The PostgreSQL schema it owns, and the role it connects as (which
    /// can reach only that schema).
    pub schema: &'static str,
    pub role: &'static str,
    /// The variable from which the deployment's provision job reads the
    /// role's password.
    pub password_env: &'static str,
    /// Full names of the gRPC services it serves (beside health and
    /// reflection, which every service serves).
    pub grpc_services: &'static [&'static str],
    /// Its tables, in the order they are applied (after the messaging
    /// tables every service has).
    pub migrations: &'static [MigrationSet],
    /// The event topics it publishes on (base names, before the prefix).
    pub produces: &'static [&'static str],
    /// Its consumer groups, each with a dead-letter topic of its own.
    pub consumers: &'static [ConsumerGroup],
    /// The services it calls, and the settings that say where they are.
    pub peers: &'static [Peer],
    /// The scopes its service token asks for: a service with any is a
    /// client of the auth service, with its name as the client id and
    /// `SERVICE_CLIENT_ID` / `SERVICE_CLIENT_SECRET` as its credentials.
    pub scopes: &'static [Scope],
    /// Fewest replicas a deployment runs.
    pub min_replicas: u64,
    /// Its settings' command line (`Settings::command`), for the checks of
    /// what a deployment gives each container.
    pub settings: fn() -> clap::Command,
}

/// A consumer group of a service and the topics it reads.
#[derive(Debug, Clone, Copy)]
pub struct ConsumerGroup {
    pub group: &'static str,
    /// Base names, before the prefix.
    pub topics: &'static [&'static str],
}

impl ConsumerGroup {
    /// The topics it reads, under `names`' prefix.
    pub fn topic_names(&self, names: &Topics) -> Vec<String> {
        self.topics.iter().map(|topic| names.name(topic)).collect()
    }
}

/// A service another calls, and the setting that says where it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// The called service's name.
    pub service: &'static str,
    /// The caller's setting holding its gRPC URL.
    pub url_env: &'static str,
}

/// The auth service, as every service that verifies tokens reaches it
/// (`access_control::AuthSettings`).
pub const AUTH: Peer = Peer {
    service: "auth",
    url_env: "AUTH_URL",
};

impl Manifest {
    /// Default port of its HTTP server (metrics; the dashboard).
    pub fn http_port(&self) -> u16 {
        default_metrics_port(self.grpc_port)
    }

    /// Its role and schema, with `password`.
    pub fn account(&self, password: impl Into<String>) -> ServiceAccount {
        ServiceAccount {
            schema: self.schema,
            role: self.role,
            password: password.into(),
        }
    }

    /// The topics it reads, each once (base names).
    pub fn consumes(&self) -> Vec<&'static str> {
        let mut topics: Vec<&'static str> = Vec::new();
        for topic in self.consumers.iter().flat_map(|group| group.topics) {
            if !topics.contains(topic) {
                topics.push(topic);
            }
        }
        topics
    }

    /// Whether its service token makes it a client of the auth service.
    pub fn is_service_client(&self) -> bool {
        !self.scopes.is_empty()
    }
}

/// Every topic `manifests` use, each once, under `names`' prefix: the
/// topics they produce and consume, then each consumer group's dead-letter
/// topic. What a deployment creates before the services start.
pub fn topics(manifests: &[&Manifest], names: &Topics) -> Vec<String> {
    let mut all: Vec<String> = Vec::new();
    let events = manifests
        .iter()
        .flat_map(|manifest| manifest.produces.iter().copied().chain(manifest.consumes()));
    let dead_letters = manifests
        .iter()
        .flat_map(|manifest| manifest.consumers)
        .map(|group| names.dead_letter(group.group));
    for topic in events.map(|topic| names.name(topic)).chain(dead_letters) {
        if !all.contains(&topic) {
            all.push(topic);
        }
    }
    all
}

/// What is wrong with `manifests` as one system: the same name, port,
/// schema, role, password variable or consumer group twice; a topic read
/// that no one produces; a peer that is none of them, or reached through a
/// setting its caller does not have, or whose default URL is not the
/// peer's default port.
pub fn problems(manifests: &[&Manifest]) -> Vec<String> {
    let mut problems = Vec::new();
    let mut unique = |what: &str, values: Vec<String>| {
        let mut seen = BTreeSet::new();
        for value in values {
            if !seen.insert(value.clone()) {
                problems.push(format!("two services have the {what} {value}"));
            }
        }
    };
    let each = |field: fn(&Manifest) -> String| manifests.iter().map(|m| field(m)).collect();
    unique("name", each(|m| m.name.to_owned()));
    unique("gRPC port", each(|m| m.grpc_port.to_string()));
    unique("HTTP port", each(|m| m.http_port().to_string()));
    unique("schema", each(|m| m.schema.to_owned()));
    unique("role", each(|m| m.role.to_owned()));
    unique("password variable", each(|m| m.password_env.to_owned()));
    let groups = manifests
        .iter()
        .flat_map(|m| m.consumers)
        .map(|group| group.group.to_owned())
        .collect();
    unique("consumer group", groups);

    for manifest in manifests {
        let name = manifest.name;
        for topic in manifest.consumes() {
            if !manifests.iter().any(|m| m.produces.contains(&topic)) {
                problems.push(format!("{name} reads {topic}, which no service produces"));
            }
        }
        let settings = (manifest.settings)();
        for peer in manifest.peers {
            let Some(callee) = manifests.iter().find(|m| m.name == peer.service) else {
                problems.push(format!(
                    "{name} calls {}, which is no service",
                    peer.service
                ));
                continue;
            };
            let setting = settings
                .get_arguments()
                .find(|arg| arg.get_env().is_some_and(|env| env == peer.url_env));
            let Some(setting) = setting else {
                problems.push(format!("{name} has no setting {}", peer.url_env));
                continue;
            };
            let local = format!("http://localhost:{}", callee.grpc_port);
            for default in setting.get_default_values() {
                if default.to_string_lossy() != local {
                    problems.push(format!(
                        "{name}'s {} defaults to {default:?}, not {local}",
                        peer.url_env
                    ));
                }
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, clap::Parser)]
    struct Caller {
        #[arg(long, env = "CALLEE_URL", default_value = "http://localhost:50071")]
        _callee_url: String,
    }

    fn settings() -> clap::Command {
        <Caller as clap::CommandFactory>::command()
    }

    const CALLEE: Manifest = Manifest {
        name: "callee",
        grpc_port: 50071,
        schema: "callee",
        role: "callee_service",
        password_env: "CALLEE_DB_PASSWORD",
        grpc_services: &[],
        migrations: &[],
        produces: &["callee.events"],
        consumers: &[],
        peers: &[],
        scopes: &[],
        min_replicas: 1,
        settings,
    };

    const CALLER: Manifest = Manifest {
        name: "caller",
        grpc_port: 50072,
        schema: "caller",
        role: "caller_service",
        password_env: "CALLER_DB_PASSWORD",
        consumers: &[ConsumerGroup {
            group: "caller",
            topics: &["callee.events", "caller.events"],
        }],
        produces: &["caller.events"],
        peers: &[Peer {
            service: "callee",
            url_env: "CALLEE_URL",
        }],
        ..CALLEE
    };

    #[test]
    fn topics_are_listed_once_with_the_dead_letter_topics_last() {
        assert_eq!(
            topics(&[&CALLEE, &CALLER], &Topics::new("t.")),
            ["t.callee.events", "t.caller.events", "t.caller.dead-letter"]
        );
    }

    #[test]
    fn a_consistent_system_has_no_problems() {
        assert_eq!(problems(&[&CALLEE, &CALLER]), Vec::<String>::new());
    }

    #[test]
    fn duplicates_orphan_topics_and_unknown_peers_are_reported() {
        let twin = Manifest {
            name: "twin",
            role: "twin_service",
            password_env: "TWIN_DB_PASSWORD",
            consumers: &[ConsumerGroup {
                group: "caller",
                topics: &["nobody.events"],
            }],
            peers: &[Peer {
                service: "nobody",
                url_env: "CALLEE_URL",
            }],
            ..CALLER
        };
        let problems = problems(&[&CALLEE, &CALLER, &twin]);
        for expected in [
            "two services have the gRPC port 50072",
            "two services have the HTTP port 9072",
            "two services have the schema caller",
            "two services have the consumer group caller",
            "twin reads nobody.events, which no service produces",
            "twin calls nobody, which is no service",
        ] {
            assert!(
                problems.iter().any(|problem| problem == expected),
                "{expected:?} not in {problems:?}"
            );
        }
        assert_eq!(problems.len(), 6, "{problems:?}");
    }

    #[test]
    fn a_peer_needs_its_setting_and_the_peers_default_port() {
        let lost = Manifest {
            peers: &[Peer {
                service: "callee",
                url_env: "ELSEWHERE_URL",
            }],
            ..CALLER
        };
        assert_eq!(
            problems(&[&CALLEE, &lost]),
            ["caller has no setting ELSEWHERE_URL"]
        );
        let moved = Manifest {
            grpc_port: 50073,
            ..CALLEE
        };
        assert_eq!(
            problems(&[&moved, &CALLER]),
            [
                "caller's CALLEE_URL defaults to \"http://localhost:50071\", not http://localhost:50073"
            ]
        );
    }
}
