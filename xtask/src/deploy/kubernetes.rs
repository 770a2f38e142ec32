//! The rendered Kubernetes manifests of an overlay: every container of our
//! image gets the settings its program reads, and each service keeps what
//! the project promises of it (replicas, probes, resources, a hardened pod,
//! a disruption budget, an autoscaler), next to the jobs and a default-deny
//! network policy.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::settings::{Container, check_env};
use registry::SERVICES;
use service_runtime::Manifest;

use super::{IMAGE, OPS, image_name, prefixed, scalar, strings};

/// What is wrong with one overlay's rendered `documents`.
pub(super) fn check_kubernetes(documents: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let of_kind = |kind: &'static str| documents.iter().filter(move |doc| doc["kind"] == kind);
    let name_of = |doc: &Value| {
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };

    // Keys of every ConfigMap and Secret, for envFrom.
    let keys = |kind: &'static str| -> BTreeMap<String, BTreeSet<String>> {
        of_kind(kind)
            .map(|doc| {
                let keys = ["data", "stringData", "binaryData"]
                    .iter()
                    .filter_map(|field| doc[field].as_object())
                    .flat_map(|map| map.keys().cloned())
                    .collect();
                (name_of(doc), keys)
            })
            .collect()
    };
    let config_maps = keys("ConfigMap");
    let secrets = keys("Secret");

    // Every container of our image, in every kind of workload.
    let workloads: Vec<&Value> = documents
        .iter()
        .filter(|doc| !doc["spec"]["template"]["spec"]["containers"].is_null())
        .collect();
    let mut ours: Vec<(&Value, &Value)> = Vec::new();
    for workload in &workloads {
        let pod = &workload["spec"]["template"]["spec"];
        for container in pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(pod["initContainers"].as_array().into_iter().flatten())
        {
            if image_name(container["image"].as_str().unwrap_or_default()) != IMAGE {
                continue;
            }
            let place = format!(
                "{}/{} container {}",
                workload["kind"].as_str().unwrap_or_default(),
                name_of(workload),
                container["name"].as_str().unwrap_or_default()
            );
            let mut env: BTreeSet<String> = container["env"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|var| var["name"].as_str().map(str::to_owned))
                .collect();
            for source in container["envFrom"].as_array().into_iter().flatten() {
                let prefix = source["prefix"].as_str().unwrap_or_default();
                let (reference, sources) = if source["configMapRef"].is_null() {
                    (&source["secretRef"], &secrets)
                } else {
                    (&source["configMapRef"], &config_maps)
                };
                let referenced = reference["name"].as_str().unwrap_or_default();
                match sources.get(referenced) {
                    Some(keys) => env.extend(keys.iter().map(|key| format!("{prefix}{key}"))),
                    None => problems.push(format!(
                        "{place}: envFrom names {referenced:?}, which this overlay does not define"
                    )),
                }
            }
            problems.extend(check_env(&Container {
                place: place.clone(),
                command: strings(&container["command"]),
                env,
            }));
            ours.push((workload, container));
        }
    }

    for binary in SERVICES {
        let Some((deployment, container)) = ours.iter().copied().find(|(workload, container)| {
            workload["kind"] == "Deployment"
                && strings(&container["command"]).first().map(String::as_str) == Some(binary.name)
        }) else {
            problems.push(format!("no Deployment runs `{}`", binary.name));
            continue;
        };
        let place = format!("Deployment/{}", name_of(deployment));
        problems.extend(prefixed(
            &place,
            check_deployment(deployment, container, binary),
        ));
        let pod_labels = &deployment["spec"]["template"]["metadata"]["labels"];
        let selects_pods = |selector: &Value| {
            selector.as_object().is_some_and(|selector| {
                !selector.is_empty()
                    && selector
                        .iter()
                        .all(|(key, value)| pod_labels[key] == *value)
            })
        };
        let service = of_kind("Service").find(|service| selects_pods(&service["spec"]["selector"]));
        match service {
            None => problems.push(format!("{place}: no Service selects its pods")),
            Some(service) => {
                let grpc_port = service["spec"]["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|port| port["name"] == "grpc");
                if !grpc_port {
                    problems.push(format!("Service/{}: no port named grpc", name_of(service)));
                }
            }
        }
        if !of_kind("PodDisruptionBudget")
            .any(|pdb| selects_pods(&pdb["spec"]["selector"]["matchLabels"]))
        {
            problems.push(format!("{place}: no PodDisruptionBudget covers it"));
        }
        let hpa = of_kind("HorizontalPodAutoscaler").find(|hpa| {
            hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"
                && hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
        });
        match hpa {
            None => problems.push(format!("{place}: no HorizontalPodAutoscaler scales it")),
            Some(hpa) if hpa["spec"]["minReplicas"].as_u64().unwrap_or(1) < binary.min_replicas => {
                problems.push(format!(
                    "HorizontalPodAutoscaler/{}: minReplicas below {}",
                    name_of(hpa),
                    binary.min_replicas
                ))
            }
            Some(_) => {}
        }
    }

    for job in ["provision", "create-topics"] {
        let runs_job = ours.iter().any(|(workload, container)| {
            workload["kind"] == "Job" && strings(&container["command"]) == [OPS, job]
        });
        if !runs_job {
            problems.push(format!("no Job runs `{OPS} {job}`"));
        }
    }

    let default_deny = of_kind("NetworkPolicy").any(|policy| {
        let spec = &policy["spec"];
        spec["podSelector"]
            .as_object()
            .is_some_and(serde_json::Map::is_empty)
            && strings(&spec["policyTypes"]) == ["Ingress", "Egress"]
            && spec["ingress"].is_null()
            && spec["egress"].is_null()
    });
    if !default_deny {
        problems
            .push("no default-deny NetworkPolicy (all pods, Ingress and Egress, no rules)".into());
    }
    problems
}

/// What `k8s/components/tls` promises of a rendered overlay: each service
/// has a cert-manager Certificate for its Service name and 127.0.0.1 (the
/// probes' address) in the Secret its pods mount, TLS settings with client
/// certificates required, and https:// peer URLs only.
pub(super) fn check_tls(documents: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let named = |kind: &str, name: &str| {
        documents
            .iter()
            .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
    };
    for binary in SERVICES {
        let secret = format!("{}-tls", binary.name);
        match named("Certificate", binary.name) {
            None => problems.push(format!("no Certificate {}", binary.name)),
            Some(certificate) => {
                let spec = &certificate["spec"];
                if spec["secretName"] != secret.as_str() {
                    problems.push(format!(
                        "Certificate {} is not kept in {secret}",
                        binary.name
                    ));
                }
                if !strings(&spec["dnsNames"])
                    .iter()
                    .any(|name| name == binary.name)
                    || !strings(&spec["ipAddresses"])
                        .iter()
                        .any(|ip| ip == "127.0.0.1")
                {
                    problems.push(format!(
                        "Certificate {} must name {} (what peers dial) and 127.0.0.1 (what the probes dial)",
                        binary.name, binary.name
                    ));
                }
                let usages = strings(&spec["usages"]);
                if !["server auth", "client auth"]
                    .iter()
                    .all(|usage| usages.iter().any(|u| u == usage))
                {
                    problems.push(format!(
                        "Certificate {} needs the usages server auth and client auth (mutual TLS)",
                        binary.name
                    ));
                }
            }
        }
        let Some(deployment) = named("Deployment", binary.name) else {
            continue;
        };
        let pod = &deployment["spec"]["template"]["spec"];
        let mounted = pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|volume| volume["secret"]["secretName"] == secret.as_str());
        if !mounted {
            problems.push(format!(
                "Deployment/{} does not mount {secret}",
                binary.name
            ));
        }
        let env: BTreeMap<String, String> = pod["containers"][0]["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|var| (scalar(&var["name"]), scalar(&var["value"])))
            .collect();
        for setting in ["GRPC_TLS_CERT", "GRPC_TLS_KEY", "GRPC_TLS_CA"] {
            if !env.contains_key(setting) {
                problems.push(format!("Deployment/{} does not set {setting}", binary.name));
            }
        }
        if env.get("GRPC_TLS_CLIENT_AUTH").map(String::as_str) != Some("true") {
            problems.push(format!(
                "Deployment/{} does not require client certificates (GRPC_TLS_CLIENT_AUTH)",
                binary.name
            ));
        }
    }
    for config in documents.iter().filter(|doc| doc["kind"] == "ConfigMap") {
        for (key, value) in config["data"].as_object().into_iter().flatten() {
            if key.ends_with("_URL")
                && key != "DASHBOARD_TRACE_URL"
                && key != "OTEL_EXPORTER_OTLP_ENDPOINT"
                && value.as_str().is_some_and(|url| url.starts_with("http://"))
            {
                problems.push(format!(
                    "ConfigMap/{}: {key} is cleartext ({})",
                    scalar(&config["metadata"]["name"]),
                    scalar(value)
                ));
            }
        }
    }
    problems
}

/// The port and health service a probe asks about: a native gRPC probe,
/// or (over TLS, which the kubelet's gRPC probes do not speak) an exec of
/// `ordersaga-ops healthcheck --address 127.0.0.1:PORT [--service NAME]`.
fn probe_target(probe: &Value) -> Option<(u64, String)> {
    if let Some(port) = probe["grpc"]["port"].as_u64() {
        let service = probe["grpc"]["service"].as_str().unwrap_or_default();
        return Some((port, service.to_owned()));
    }
    let command = strings(&probe["exec"]["command"]);
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let [program, "healthcheck", "--address", address, rest @ ..] = command.as_slice() else {
        return None;
    };
    let port = address.strip_prefix("127.0.0.1:")?.parse().ok()?;
    let service = match rest {
        [] => "",
        ["--service", service] => service,
        _ => return None,
    };
    (*program == OPS).then(|| (port, service.to_owned()))
}

/// Replicas, probes, resources and the hardened pod of one service.
fn check_deployment(deployment: &Value, container: &Value, binary: &Manifest) -> Vec<String> {
    let mut problems = Vec::new();
    let pod = &deployment["spec"]["template"]["spec"];
    if deployment["spec"]["replicas"].as_u64().unwrap_or(1) < binary.min_replicas {
        problems.push(format!("fewer than {} replicas", binary.min_replicas));
    }
    let grpc_port = container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|port| port["name"] == "grpc")
        .and_then(|port| port["containerPort"].as_u64());
    if grpc_port != Some(u64::from(binary.grpc_port)) {
        problems.push(format!(
            "its port named grpc is not {} (the port {} listens on)",
            binary.grpc_port, binary.name
        ));
    }
    for probe in ["readinessProbe", "livenessProbe"] {
        if probe_target(&container[probe]).map(|(port, _)| port)
            != Some(u64::from(binary.grpc_port))
        {
            problems.push(format!(
                "{probe} is not a gRPC probe of port {}",
                binary.grpc_port
            ));
        }
    }
    if probe_target(&container["livenessProbe"]).map(|(_, service)| service)
        != Some(service_runtime::LIVENESS.to_owned())
    {
        problems.push(format!(
            "livenessProbe must ask for {:?}: readiness follows the database, and an outage must not restart pods",
            service_runtime::LIVENESS
        ));
    }
    for field in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            if container["resources"][field][resource].is_null() {
                problems.push(format!("no {resource} {field}"));
            }
        }
    }
    let pod_security = &pod["securityContext"];
    let security = &container["securityContext"];
    let hardened = [
        (
            "runAsNonRoot",
            pod_security["runAsNonRoot"] == true || security["runAsNonRoot"] == true,
        ),
        (
            "readOnlyRootFilesystem",
            security["readOnlyRootFilesystem"] == true,
        ),
        (
            "allowPrivilegeEscalation: false",
            security["allowPrivilegeEscalation"] == false,
        ),
        (
            "capabilities drop ALL",
            strings(&security["capabilities"]["drop"])
                .iter()
                .any(|cap| cap == "ALL"),
        ),
    ];
    for (requirement, holds) in hardened {
        if !holds {
            problems.push(format!("pod not hardened: {requirement}"));
        }
    }
    problems
}

/// What `k8s/components/kafka-tls` promises of a rendered overlay: every
/// service and the create-topics job speak TLS to the brokers, verify
/// them against a CA and present a client certificate.
pub(super) fn check_kafka_tls(documents: &[Value]) -> Vec<String> {
    let workloads = SERVICES
        .iter()
        .map(|binary| ("Deployment", binary.name))
        .chain([("Job", "create-topics")]);
    let mut problems = Vec::new();
    for (kind, name) in workloads {
        let Some(workload) = documents
            .iter()
            .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        else {
            problems.push(format!("no {kind}/{name}"));
            continue;
        };
        let env: BTreeMap<String, String> =
            workload["spec"]["template"]["spec"]["containers"][0]["env"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|var| (scalar(&var["name"]), scalar(&var["value"])))
                .collect();
        if env.get("KAFKA_SECURITY_PROTOCOL").map(String::as_str) != Some("ssl") {
            problems.push(format!(
                "{kind}/{name} does not speak TLS to the brokers (KAFKA_SECURITY_PROTOCOL)"
            ));
        }
        for setting in [
            "KAFKA_SSL_CA_LOCATION",
            "KAFKA_SSL_CERTIFICATE_LOCATION",
            "KAFKA_SSL_KEY_LOCATION",
        ] {
            if !env.contains_key(setting) {
                problems.push(format!("{kind}/{name} does not set {setting}"));
            }
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// A minimal overlay that passes, for the tests below to break.
    fn good_overlay() -> Vec<Value> {
        let mut documents = vec![
            json!({"kind": "ConfigMap", "metadata": {"name": "platform-abc"}, "data": {"KAFKA_BROKERS": "kafka:9092"}}),
            json!({"kind": "NetworkPolicy", "metadata": {"name": "deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}),
        ];
        for job in ["provision", "create-topics"] {
            let env = if job == "provision" {
                let passwords = SERVICES.iter().map(|service| service.password_env);
                std::iter::once("ADMIN_DATABASE_URL")
                    .chain(passwords)
                    .map(|name| json!({"name": name}))
                    .collect()
            } else {
                json!([{"name": "KAFKA_BROKERS"}])
            };
            documents.push(json!({"kind": "Job", "metadata": {"name": job}, "spec": {"template": {"spec": {
                "containers": [{"name": job, "image": "ordersaga:dev", "command": [OPS, job], "env": env}]}}}}));
        }
        for binary in SERVICES {
            let name = binary.name;
            // What it cannot start without, but the broker (from the ConfigMap).
            let required = super::super::settings::settings_of(&[name.to_owned()])
                .expect("one of ours")
                .into_iter()
                .filter(|setting| setting.required && setting.env != "KAFKA_BROKERS");
            let env: Vec<Value> = required
                .map(|setting| json!({"name": setting.env}))
                .collect();
            let labels = json!({"app": name});
            let probe = |service: Option<&str>| match service {
                Some(service) => json!({"grpc": {"port": binary.grpc_port, "service": service}}),
                None => json!({"grpc": {"port": binary.grpc_port}}),
            };
            documents.push(json!({"kind": "Deployment", "metadata": {"name": name}, "spec": {
                "replicas": binary.min_replicas,
                "template": {"metadata": {"labels": labels}, "spec": {
                    "securityContext": {"runAsNonRoot": true},
                    "containers": [{
                        "name": name, "image": "registry.example.com/ordersaga:1", "command": [name],
                        "ports": [{"name": "grpc", "containerPort": binary.grpc_port}],
                        "env": env,
                        "envFrom": [{"configMapRef": {"name": "platform-abc"}}],
                        "readinessProbe": probe(None),
                        "livenessProbe": probe(Some(service_runtime::LIVENESS)),
                        "resources": {"requests": {"cpu": "1", "memory": "1"}, "limits": {"cpu": "1", "memory": "1"}},
                        "securityContext": {"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}}
                    }]}}}}));
            documents.push(json!({"kind": "Service", "metadata": {"name": name}, "spec": {"selector": labels, "ports": [{"name": "grpc", "port": binary.grpc_port}]}}));
            documents.push(json!({"kind": "PodDisruptionBudget", "metadata": {"name": name}, "spec": {"selector": {"matchLabels": labels}}}));
            documents.push(json!({"kind": "HorizontalPodAutoscaler", "metadata": {"name": name}, "spec": {
                "scaleTargetRef": {"kind": "Deployment", "name": name}, "minReplicas": binary.min_replicas}}));
        }
        documents
    }

    #[test]
    fn a_complete_overlay_passes() {
        assert_eq!(check_kubernetes(&good_overlay()), Vec::<String>::new());
    }

    #[test]
    fn a_config_map_key_counts_and_a_missing_map_is_reported() {
        let mut documents = good_overlay();
        // KAFKA_BROKERS comes only from the ConfigMap: without it, every service misses it.
        documents.retain(|doc| doc["kind"] != "ConfigMap");
        let problems = check_kubernetes(&documents);
        assert!(
            problems
                .iter()
                .any(|p| p.contains("envFrom names \"platform-abc\"")),
            "{problems:?}"
        );
        assert!(
            problems
                .iter()
                .any(|p| p
                    .contains("Deployment/order container order: required setting KAFKA_BROKERS")),
            "{problems:?}"
        );
    }

    /// The good overlay with `components/tls` applied as it renders it.
    fn with_tls(mut documents: Vec<Value>) -> Vec<Value> {
        for binary in SERVICES {
            let name = binary.name;
            documents.push(
                json!({"kind": "Certificate", "metadata": {"name": name}, "spec": {
                "secretName": format!("{name}-tls"), "dnsNames": [name, "localhost"],
                "ipAddresses": ["127.0.0.1"], "usages": ["server auth", "client auth"]}}),
            );
        }
        for doc in &mut documents {
            if doc["kind"] != "Deployment" {
                continue;
            }
            let name = scalar(&doc["metadata"]["name"]);
            let port = SERVICES.iter().find(|b| b.name == name).unwrap().grpc_port;
            let pod = &mut doc["spec"]["template"]["spec"];
            pod["volumes"] =
                json!([{"name": "tls", "secret": {"secretName": format!("{name}-tls")}}]);
            let container = &mut pod["containers"][0];
            for (key, value) in [
                ("GRPC_TLS_CERT", "/c"),
                ("GRPC_TLS_KEY", "/k"),
                ("GRPC_TLS_CA", "/ca"),
                ("GRPC_TLS_CLIENT_AUTH", "true"),
            ] {
                container["env"]
                    .as_array_mut()
                    .unwrap()
                    .push(json!({"name": key, "value": value}));
            }
            let address = format!("127.0.0.1:{port}");
            container["readinessProbe"] =
                json!({"exec": {"command": [OPS, "healthcheck", "--address", address]}});
            container["livenessProbe"] = json!({"exec": {"command": [OPS, "healthcheck", "--address", address, "--service", "liveness"]}});
        }
        documents
    }

    #[test]
    fn without_the_kafka_tls_component_each_workload_is_reported() {
        let problems = check_kafka_tls(&with_tls(good_overlay()));
        for name in SERVICES.iter().map(|binary| binary.name) {
            assert!(
                problems
                    .iter()
                    .any(|p| p.contains(&format!("Deployment/{name} does not speak TLS"))),
                "{problems:?}"
            );
        }
    }

    #[test]
    fn the_tls_component_passes_and_its_weakenings_are_reported() {
        let documents = with_tls(good_overlay());
        assert_eq!(check_kubernetes(&documents), Vec::<String>::new());
        assert_eq!(check_tls(&documents), Vec::<String>::new());
        assert!(!check_tls(&good_overlay()).is_empty(), "no TLS at all");

        let mut weakened = documents;
        for doc in &mut weakened {
            if doc["kind"] == "Deployment" && doc["metadata"]["name"] == "order" {
                let container = &mut doc["spec"]["template"]["spec"]["containers"][0];
                container["env"]
                    .as_array_mut()
                    .unwrap()
                    .retain(|var| var["name"] != "GRPC_TLS_CLIENT_AUTH");
                container["livenessProbe"]["exec"]["command"] =
                    json!([OPS, "healthcheck", "--address", "127.0.0.1:50052"]);
            }
            if doc["kind"] == "Certificate" && doc["metadata"]["name"] == "payment" {
                doc["spec"]["ipAddresses"] = json!([]);
            }
            if doc["kind"] == "ConfigMap" {
                doc["data"]["AUTH_URL"] = json!("http://auth:50051");
            }
        }
        let mut problems = check_kubernetes(&weakened);
        problems.extend(check_tls(&weakened));
        for expected in [
            "Deployment/order: livenessProbe must ask for \"liveness\"",
            "Deployment/order does not require client certificates",
            "Certificate payment must name payment",
            "ConfigMap/platform-abc: AUTH_URL is cleartext",
        ] {
            assert!(
                problems.iter().any(|problem| problem.starts_with(expected)),
                "{expected:?} not in {problems:#?}"
            );
        }
    }

    #[test]
    fn weakened_manifests_are_reported() {
        let mut documents = good_overlay();
        for doc in &mut documents {
            if doc["kind"] == "Deployment" && doc["metadata"]["name"] == "saga-orchestrator" {
                doc["spec"]["replicas"] = json!(2);
                let container = &mut doc["spec"]["template"]["spec"]["containers"][0];
                container["securityContext"]["readOnlyRootFilesystem"] = json!(false);
                container["livenessProbe"] = json!({"grpc": {"port": 50054}});
            }
        }
        documents.retain(|doc| {
            !(doc["kind"] == "HorizontalPodAutoscaler" && doc["metadata"]["name"] == "payment")
        });
        documents
            .retain(|doc| !(doc["kind"] == "Job" && doc["metadata"]["name"] == "create-topics"));
        documents.retain(|doc| doc["kind"] != "NetworkPolicy");
        let problems = check_kubernetes(&documents);
        for expected in [
            "Deployment/saga-orchestrator: fewer than 3 replicas",
            "Deployment/saga-orchestrator: pod not hardened: readOnlyRootFilesystem",
            "Deployment/saga-orchestrator: livenessProbe must ask for \"liveness\"",
            "Deployment/payment: no HorizontalPodAutoscaler scales it",
            "no Job runs `ordersaga-ops create-topics`",
            "no default-deny NetworkPolicy",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(expected)),
                "missing {expected:?} in {problems:?}"
            );
        }
        assert_eq!(problems.len(), 6, "{problems:?}");
    }
}
