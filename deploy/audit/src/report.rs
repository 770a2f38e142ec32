//! The audit's findings, and how they are printed.

use std::fmt::Write as _;

/// How one invariant fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// It holds; `detail` says over what.
    Pass,
    /// It does not: how many rows break it, and the first of them.
    Fail { count: usize, examples: Vec<String> },
    /// Shown, not judged (dead letters).
    Info,
    /// Could not be checked here, and why.
    Skipped,
}

/// One invariant, checked.
#[derive(Debug, Clone)]
pub struct Check {
    /// A short name, stable for scripts (`ledger`, `outboxes`, ...).
    pub name: &'static str,
    /// The invariant, in words.
    pub invariant: &'static str,
    pub verdict: Verdict,
    /// What was looked at, or why it was skipped.
    pub detail: String,
}

/// How many violations of one invariant are spelled out.
const EXAMPLES: usize = 5;

/// Collects the violations of one invariant.
#[derive(Debug)]
pub(crate) struct CheckBuilder {
    name: &'static str,
    invariant: &'static str,
    violations: Vec<String>,
    count: usize,
}

impl CheckBuilder {
    pub(crate) fn new(name: &'static str, invariant: &'static str) -> Self {
        Self {
            name,
            invariant,
            violations: Vec::new(),
            count: 0,
        }
    }

    /// One row that breaks the invariant.
    pub(crate) fn violation(&mut self, what: impl Into<String>) {
        self.count += 1;
        if self.violations.len() < EXAMPLES {
            self.violations.push(what.into());
        }
    }

    /// Pass if nothing broke it, else fail; `detail` either way.
    pub(crate) fn finish(self, detail: impl Into<String>) -> Check {
        let verdict = if self.count == 0 {
            Verdict::Pass
        } else {
            Verdict::Fail {
                count: self.count,
                examples: self.violations,
            }
        };
        Check {
            name: self.name,
            invariant: self.invariant,
            verdict,
            detail: detail.into(),
        }
    }

    pub(crate) fn info(self, detail: impl Into<String>) -> Check {
        Check {
            name: self.name,
            invariant: self.invariant,
            verdict: Verdict::Info,
            detail: detail.into(),
        }
    }

    pub(crate) fn skipped(self, why: impl Into<String>) -> Check {
        Check {
            name: self.name,
            invariant: self.invariant,
            verdict: Verdict::Skipped,
            detail: why.into(),
        }
    }
}

/// Money and orders, as the audit counted them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub orders: usize,
    /// Orders by status (read model), in a fixed order.
    pub by_status: Vec<(String, usize)>,
    /// Sagas by state, and failure reasons of sagas that failed.
    pub sagas_by_state: Vec<(String, usize)>,
    pub confirmed_minor: i64,
    pub captured_minor: i64,
    pub refunded_minor: i64,
    /// What the simulated provider holds, if it is there.
    pub provider_held_minor: Option<i64>,
    /// Orders an admin approved, and declined, on review.
    pub reviews_approved: usize,
    pub reviews_declined: usize,
    /// Order sagas that turned back because the review timed out.
    pub reviews_timed_out: usize,
    /// Orders whose return was asked for, and orders returned.
    pub returns_requested: usize,
    pub returned: usize,
}

/// Everything the audit found.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
    pub totals: Totals,
}

impl Report {
    /// True if no invariant failed.
    pub fn passed(&self) -> bool {
        !self
            .checks
            .iter()
            .any(|check| matches!(check.verdict, Verdict::Fail { .. }))
    }

    /// The failed checks' names.
    pub fn failures(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|check| matches!(check.verdict, Verdict::Fail { .. }))
            .map(|check| check.name)
            .collect()
    }

    /// The check named `name`.
    pub fn check(&self, name: &str) -> Option<&Check> {
        self.checks.iter().find(|check| check.name == name)
    }

    /// The findings as Markdown tables: the invariants, then the totals,
    /// then every violation spelled out.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "| invariant | result | detail |");
        let _ = writeln!(out, "|---|---|---|");
        for check in &self.checks {
            let result = match &check.verdict {
                Verdict::Pass => "pass".to_owned(),
                Verdict::Fail { count, .. } => format!("**FAIL** ({count})"),
                Verdict::Info => "info".to_owned(),
                Verdict::Skipped => "not checked".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} (`{}`) | {result} | {} |",
                check.invariant, check.name, check.detail
            );
        }
        let totals = &self.totals;
        let _ = writeln!(out);
        let statuses: Vec<String> = totals
            .by_status
            .iter()
            .map(|(status, n)| format!("{n} {status}"))
            .collect();
        let states: Vec<String> = totals
            .sagas_by_state
            .iter()
            .map(|(state, n)| format!("{n} {state}"))
            .collect();
        let _ = writeln!(
            out,
            "{} orders ({}); sagas: {}.",
            totals.orders,
            if statuses.is_empty() {
                "none".to_owned()
            } else {
                statuses.join(", ")
            },
            if states.is_empty() {
                "none".to_owned()
            } else {
                states.join(", ")
            }
        );
        let _ = writeln!(
            out,
            "Money (minor units): confirmed {}, captured {}, refunded {}, held by the provider {}.",
            totals.confirmed_minor,
            totals.captured_minor,
            totals.refunded_minor,
            totals
                .provider_held_minor
                .map_or_else(|| "unknown".to_owned(), |held| held.to_string())
        );
        let _ = writeln!(
            out,
            "Reviews: {} approved, {} declined by an admin, {} timed out; returns: {} asked for, {} returned.",
            totals.reviews_approved,
            totals.reviews_declined,
            totals.reviews_timed_out,
            totals.returns_requested,
            totals.returned
        );
        for check in &self.checks {
            if let Verdict::Fail { count, examples } = &check.verdict {
                let _ = writeln!(out, "\n{} ({count} violations):", check.name);
                for example in examples {
                    let _ = writeln!(out, "  - {example}");
                }
                if *count > examples.len() {
                    let _ = writeln!(out, "  - ... and {} more", count - examples.len());
                }
            }
        }
        out
    }
}
