//! Keeps `docs/architecture.md` true to the code: its tests fail when an
//! RPC, a table or a view exists that the page does not name, when the
//! page names an event that no `.proto` file defines, or when its table of
//! services is not what the services' manifests say.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    fn root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("xtask lives in the workspace")
            .to_path_buf()
    }

    fn page() -> String {
        std::fs::read_to_string(root().join("docs/architecture.md"))
            .expect("docs/architecture.md exists")
    }

    /// Every file under `dir` (recursively) whose name ends with `suffix`,
    /// skipping build output.
    fn files(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(dir) else {
            return found;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                if path.file_name().is_some_and(|name| name != "target") {
                    found.extend(files(&path, suffix));
                }
            } else if path.to_string_lossy().ends_with(suffix) {
                found.push(path);
            }
        }
        found
    }

    /// The word after `keyword` on each line that starts with it.
    fn declared(text: &str, keyword: &str) -> Vec<String> {
        text.lines()
            .filter_map(|line| line.trim_start().strip_prefix(keyword))
            .filter_map(|rest| {
                let name: String = rest
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                (!name.is_empty()).then_some(name)
            })
            .collect()
    }

    fn protos() -> String {
        files(&root().join("proto"), ".proto")
            .iter()
            .map(|path| std::fs::read_to_string(path).expect("readable proto"))
            .collect()
    }

    #[test]
    fn every_rpc_is_on_the_architecture_page() {
        let page = page();
        let rpcs = declared(&protos(), "rpc ");
        assert!(rpcs.len() > 20, "found only {rpcs:?}");
        let missing: Vec<&String> = rpcs
            .iter()
            .filter(|rpc| !page.contains(&format!("| {rpc} |")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/architecture.md has no row for {missing:?}"
        );
    }

    #[test]
    fn every_table_and_view_is_on_the_architecture_page() {
        let page = page();
        let mut migrations = files(&root().join("services"), ".sql");
        migrations.extend(files(&root().join("shared"), ".sql"));
        let mut relations = Vec::new();
        for path in &migrations {
            // The messaging crate's test fixture is not part of the system.
            if path.components().any(|part| part.as_os_str() == "tests") {
                continue;
            }
            let sql = std::fs::read_to_string(path).expect("readable migration");
            for keyword in ["CREATE TABLE ", "CREATE VIEW ", "CREATE OR REPLACE VIEW "] {
                relations.extend(declared(&sql, keyword));
            }
        }
        assert!(relations.len() > 15, "found only {relations:?}");
        let missing: Vec<&String> = relations
            .iter()
            .filter(|name| !page.contains(&format!("`{name}`")))
            .collect();
        assert!(
            missing.is_empty(),
            "docs/architecture.md does not name the tables {missing:?}"
        );
    }

    #[test]
    fn every_event_on_the_page_is_a_message() {
        let page = page();
        let messages = declared(&protos(), "message ");
        let events: Vec<&str> = page
            .split("\n## Events")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("an Events section")
            .lines()
            .filter_map(|line| line.strip_prefix("| "))
            .filter_map(|row| row.split(" |").next())
            .filter(|name| name.chars().all(char::is_alphanumeric) && *name != "event")
            .collect();
        assert!(events.len() > 10, "found only {events:?}");
        let unknown: Vec<&&str> = events
            .iter()
            .filter(|event| !messages.iter().any(|message| message == *event))
            .collect();
        assert!(
            unknown.is_empty(),
            "docs/architecture.md names events no .proto defines: {unknown:?}"
        );
    }

    /// The cells of the row of the page's Services table that begins with
    /// `first`, without the first.
    fn row<'a>(section: &'a str, first: &str) -> Option<Vec<&'a str>> {
        let line = section
            .lines()
            .find(|line| line.starts_with(&format!("| {first} |")))?;
        Some(
            line.trim_matches('|')
                .split(" | ")
                .skip(1)
                .map(str::trim)
                .collect(),
        )
    }

    #[test]
    fn the_services_table_is_the_manifests() {
        let page = page();
        let section = page
            .split("\n## Services")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("a Services section");
        let rows = section
            .lines()
            .filter(|line| line.starts_with("| `"))
            .count();
        assert_eq!(rows, registry::SERVICES.len(), "one row per service");
        let quoted = |names: &[&str]| -> String {
            names
                .iter()
                .map(|name| format!("`{name}`"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        for service in registry::SERVICES {
            let cells = row(section, &format!("`{}`", service.name))
                .unwrap_or_else(|| panic!("no row for {}", service.name));
            let [grpc, http, schema, produces, consumes] = cells[..] else {
                panic!(
                    "{}: expected five cells after the name, got {cells:?}",
                    service.name
                );
            };
            assert_eq!(grpc, service.grpc_port.to_string(), "{}", service.name);
            assert!(
                http.starts_with(&service.http_port().to_string()),
                "{}: HTTP port {http}",
                service.name
            );
            assert_eq!(schema, format!("`{}`", service.schema));
            assert_eq!(produces, quoted(service.produces), "{}", service.name);
            let groups: Vec<String> = service
                .consumers
                .iter()
                .map(|group| format!("{} (group `{}`)", quoted(group.topics), group.group))
                .collect();
            let expected = if groups.is_empty() {
                "–".to_owned()
            } else {
                groups.join("; ")
            };
            assert_eq!(consumes, expected, "{}", service.name);
        }
    }
}
