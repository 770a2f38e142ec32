//! `docker-compose.yml` and `.env.example`: the system's parts are there,
//! the services wait for the jobs, and every container of our image gets
//! the settings its program reads.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::settings::{Container, check_env};
use registry::SERVICES;

use super::{IMAGE, OPS, image_name, scalar, strings};

/// What is wrong with `compose` (parsed from `text`), given `.env.example`.
pub(super) fn check_compose(
    compose: &Value,
    text: &str,
    env_example: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let empty = serde_json::Map::new();
    let services = compose["services"].as_object().unwrap_or(&empty);
    let command_of = |service: &Value| -> Vec<String> { strings(&service["command"]) };
    let running = |program: &[&str]| -> Option<&String> {
        services
            .iter()
            .find(|(_, service)| {
                command_of(service)
                    .iter()
                    .map(String::as_str)
                    .eq(program.iter().copied())
            })
            .map(|(name, _)| name)
    };

    // The stores and the collector.
    let kafka_is_kraft = services.values().any(|service| {
        service["image"]
            .as_str()
            .is_some_and(|image| image.starts_with("apache/kafka"))
            && compose_env(service)
                .get("KAFKA_PROCESS_ROLES")
                .is_some_and(|roles| roles.contains("controller"))
    });
    if !kafka_is_kraft {
        problems.push(
            "no Apache Kafka service in KRaft mode (KAFKA_PROCESS_ROLES with controller)".into(),
        );
    }
    let jaeger_ui = services.values().any(|service| {
        service["image"]
            .as_str()
            .is_some_and(|image| image.contains("jaeger"))
            && strings(&service["ports"])
                .iter()
                .any(|port| port.ends_with(":16686"))
    });
    if !jaeger_ui {
        problems.push("no Jaeger service publishing its UI on 16686".into());
    }
    if !services.values().any(|service| {
        service["image"]
            .as_str()
            .is_some_and(|image| image.starts_with("postgres"))
    }) {
        problems.push("no PostgreSQL service".into());
    }

    // The jobs, which the services wait for.
    let provision = running(&[OPS, "provision"]);
    let topics = running(&[OPS, "create-topics"]);
    if provision.is_none() {
        problems.push(format!("no service runs `{OPS} provision`"));
    }
    if topics.is_none() {
        problems.push(format!("no service runs `{OPS} create-topics`"));
    }

    for binary in SERVICES {
        let Some((name, service)) = services.iter().find(|(_, service)| {
            command_of(service).first().map(String::as_str) == Some(binary.name)
        }) else {
            problems.push(format!("no service runs `{}`", binary.name));
            continue;
        };
        if service["healthcheck"]["test"].is_null() {
            problems.push(format!("{name}: no health check"));
        }
        for job in [provision, topics].into_iter().flatten() {
            if service["depends_on"][job]["condition"] != "service_completed_successfully" {
                problems.push(format!(
                    "{name}: does not wait for {job} to complete successfully"
                ));
            }
        }
        let grpc = format!(":{}", binary.grpc_port);
        if !strings(&service["ports"])
            .iter()
            .any(|port| port.ends_with(&grpc))
        {
            problems.push(format!(
                "{name}: does not publish its gRPC port {}",
                binary.grpc_port
            ));
        }
        if !compose_env(service).contains_key("OTEL_EXPORTER_OTLP_ENDPOINT") {
            problems.push(format!(
                "{name}: exports no traces (OTEL_EXPORTER_OTLP_ENDPOINT)"
            ));
        }
    }

    // Every container of our image gets exactly the settings its program reads.
    for (name, service) in services {
        let image = service["image"].as_str().unwrap_or_default();
        if image_name(image) != IMAGE {
            continue;
        }
        if !service["env_file"].is_null() {
            problems.push(format!(
                "{name}: env_file hides settings from this check; use environment"
            ));
        }
        problems.extend(check_env(&Container {
            place: name.clone(),
            command: command_of(service),
            env: compose_env(service).into_keys().collect(),
        }));
    }

    problems.extend(check_published_ports(services));
    problems.extend(check_interpolation(text, env_example));
    problems
}

/// Published ports bind the loopback address only: the compose stack is
/// for one machine, and its gRPC, metrics and broker ports have no TLS.
fn check_published_ports(services: &serde_json::Map<String, Value>) -> Vec<String> {
    let mut problems = Vec::new();
    for (name, service) in services {
        for port in strings(&service["ports"]) {
            if !port.starts_with("127.0.0.1:") {
                problems.push(format!(
                    "{name}: publishes {port:?} on every address; bind it to 127.0.0.1"
                ));
            }
        }
        let external_listener = compose_env(service)
            .get("KAFKA_LISTENERS")
            .is_some_and(|listeners| listeners.contains("EXTERNAL"));
        if external_listener {
            problems.push(format!(
                "{name}: has an EXTERNAL Kafka listener; keep it off by default"
            ));
        }
    }
    problems
}

/// A compose service's `environment`, as a map or as a list of `K=V`.
fn compose_env(service: &Value) -> BTreeMap<String, String> {
    match &service["environment"] {
        Value::Object(map) => map
            .iter()
            .map(|(key, value)| (key.clone(), scalar(value)))
            .collect(),
        Value::Array(items) => items
            .iter()
            .filter_map(Value::as_str)
            .map(|item| match item.split_once('=') {
                Some((key, value)) => (key.to_owned(), value.to_owned()),
                None => (item.to_owned(), String::new()),
            })
            .collect(),
        _ => BTreeMap::new(),
    }
}

/// Every `${NAME:-default}` of the compose file is listed in .env.example
/// with the same value, and every name there is used.
fn check_interpolation(text: &str, env_example: &BTreeMap<String, String>) -> Vec<String> {
    let mut problems = Vec::new();
    let mut used = BTreeSet::new();
    for (name, default) in interpolations(text) {
        match (env_example.get(&name), default) {
            (None, _) => problems.push(format!("${{{name}}} is not in .env.example")),
            (Some(example), Some(default)) if *example != default => problems.push(format!(
                "${{{name}}} defaults to {default:?}, but .env.example says {example:?}"
            )),
            _ => {}
        }
        used.insert(name);
    }
    for name in env_example.keys().filter(|name| !used.contains(*name)) {
        problems.push(format!(
            ".env.example sets {name}, which docker-compose.yml never uses"
        ));
    }
    problems
}

/// The `${NAME}`, `${NAME:-default}` and `${NAME-default}` of a compose
/// file, with their defaults. `$${...}` is an escaped dollar.
fn interpolations(text: &str) -> Vec<(String, Option<String>)> {
    let mut found = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let escaped = rest[..start].ends_with('$');
        rest = &rest[start + 2..];
        let Some(end) = rest.find('}') else { break };
        let expression = &rest[..end];
        rest = &rest[end + 1..];
        if escaped {
            continue;
        }
        let name_end = expression
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(expression.len());
        let (name, modifier) = expression.split_at(name_end);
        let default = modifier
            .strip_prefix(":-")
            .or_else(|| modifier.strip_prefix('-'))
            .map(str::to_owned);
        found.push((name.to_owned(), default));
    }
    found
}

/// `KEY=value` lines, without comments and blank lines.
pub(super) fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_ports_must_bind_the_loopback_address() {
        let services = serde_json::json!({
            "open": { "ports": ["50052:50052"] },
            "local": { "ports": ["127.0.0.1:50053:50053"] },
            "kafka": { "environment": { "KAFKA_LISTENERS": "PLAINTEXT://:9092,EXTERNAL://:9094" } },
        });
        let problems = check_published_ports(services.as_object().unwrap());
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems.iter().any(|p| p.starts_with("open:")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.starts_with("kafka:")),
            "{problems:?}"
        );
    }

    #[test]
    fn interpolations_must_match_the_example_file() {
        let example = parse_env_file("# comment\nA=1\n\nB=two\nUNUSED=x\n");
        let text = "x: ${A:-1}\ny: ${B:-three}\nz: ${C}\nescaped: $${NOT_A_VARIABLE}\n";
        let problems = check_interpolation(text, &example);
        assert_eq!(problems.len(), 3, "{problems:?}");
        assert!(
            problems[0].contains("${B} defaults to \"three\""),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("${C} is not in .env.example"),
            "{problems:?}"
        );
        assert!(problems[2].contains("sets UNUSED"), "{problems:?}");
    }
}
