//! Keeps `docs/architecture.md` true to the code: its tests fail when an
//! RPC, a table or a view exists that the page does not name, or when the
//! page names an event that no `.proto` file defines.

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
}
