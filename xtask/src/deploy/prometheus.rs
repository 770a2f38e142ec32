//! `deploy/prometheus`: the scrape configuration and the alert rules,
//! checked by `promtool` (the configuration, the rules' syntax, and the
//! rules' unit tests on example series in `alerts.test.yml`), and held to
//! the metrics the services actually export.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use anyhow::Context as _;

use super::run_tool;

/// Runs `promtool check config`, `check rules` and `test rules`.
pub(super) fn check(dir: &Path) -> anyhow::Result<()> {
    let promtool = crate::install::promtool()?;
    run_tool(
        Command::new(&promtool)
            .args(["check", "config"])
            .arg(dir.join("prometheus.yml")),
    )
    .context("deploy/prometheus/prometheus.yml is not a valid Prometheus configuration")?;
    run_tool(
        Command::new(&promtool)
            .args(["check", "rules"])
            .arg(dir.join("alerts.yml")),
    )
    .context("deploy/prometheus/alerts.yml has invalid rules")?;
    run_tool(
        Command::new(&promtool)
            .args(["test", "rules"])
            .arg(dir.join("alerts.test.yml")),
    )
    .context("deploy/prometheus/alerts.test.yml: an alert does not fire as its test expects")?;
    eprintln!("deploy/prometheus: configuration valid, rules checked and tested");
    Ok(())
}

/// The metric names the rules' expressions use that no service source
/// declares (as `"name"` in a `metrics::` macro), so that a renamed metric
/// cannot leave an alert that never fires.
pub(super) fn unexported_metrics(rules: &str, root: &Path) -> anyhow::Result<Vec<String>> {
    let mut sources = String::new();
    for dir in ["shared", "services"] {
        collect_sources(&root.join(dir), &mut sources)?;
    }
    Ok(metric_names(rules)
        .into_iter()
        .filter(|name| !sources.contains(&format!("\"{name}\"")))
        .map(|name| format!("alerts use {name}, which no service exports"))
        .collect())
}

fn collect_sources(dir: &Path, into: &mut String) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|name| name != "tests") {
                collect_sources(&path, into)?;
            }
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            into.push_str(&std::fs::read_to_string(&path)?);
        }
    }
    Ok(())
}

/// The metric names in the rules' `expr:` lines: the identifiers with an
/// underscore that are not PromQL functions, labels or keywords.
fn metric_names(rules: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &["by", "without", "sum", "max", "increase", "rate"];
    rules
        .lines()
        .filter_map(|line| line.trim().strip_prefix("expr:"))
        .flat_map(|expr| {
            // Label matchers and groupings name labels, not metrics.
            let mut bare = String::new();
            let mut depth = 0;
            for c in expr.chars() {
                match c {
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ if depth == 0 => bare.push(c),
                    _ => {}
                }
            }
            let bare = bare
                .split(" by (")
                .enumerate()
                .map(|(i, part)| {
                    if i == 0 {
                        part.to_owned()
                    } else {
                        part.split_once(')').map_or("", |(_, rest)| rest).to_owned()
                    }
                })
                .collect::<String>();
            bare.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .filter(|word| word.contains('_') && !NOT_METRICS.contains(word))
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_are_read_from_the_expressions_only() {
        let rules = "      - alert: A\n        expr: sum by (group) (increase(events_consumed_total{outcome=\"dead_lettered\"}[10m])) > 0\n        annotations:\n          summary: not_a_metric\n      - alert: B\n        expr: max(sagas_stuck) > 0\n";
        assert_eq!(
            metric_names(rules).into_iter().collect::<Vec<_>>(),
            ["events_consumed_total", "sagas_stuck"]
        );
    }
}
