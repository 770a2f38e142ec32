//! What each binary reads from its environment, from its own clap
//! definition, and the check of one container against it.

use std::collections::BTreeSet;

use clap::CommandFactory as _;

use super::OPS;

/// A setting a binary reads from its environment.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Setting {
    pub(super) env: String,
    /// Whether a deployment must provide it: it has no default, or its
    /// default points at this machine (the local stack's broker or
    /// services), which in a container is never where they are.
    pub(super) required: bool,
}

/// The settings of the program `command` runs, or `None` if it is not one
/// of ours. Settings come from the binaries' own clap definitions.
pub(super) fn settings_of(command: &[String]) -> Option<Vec<Setting>> {
    let program = command.first()?;
    let clap_command = match registry::service(program) {
        Some(service) => (service.settings)(),
        None if program == OPS => {
            let job = command.get(1)?;
            ops::cli::Cli::command().find_subcommand(job)?.clone()
        }
        None => return None,
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
pub(crate) struct Container {
    pub(crate) place: String,
    pub(crate) command: Vec<String>,
    pub(crate) env: BTreeSet<String>,
}

pub(crate) fn check_env(container: &Container) -> Vec<String> {
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

#[cfg(test)]
mod tests {
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
}
