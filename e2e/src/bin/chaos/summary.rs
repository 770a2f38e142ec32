//! The run's table: faults by kind, orders by outcome, throughput under
//! faults, time to quiesce, and the audit's verdict on every invariant.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use audit::{Record, Report};

use crate::faults::Done;
use crate::schedule::{Kind, Pace};

/// What the table is made of.
#[derive(Debug)]
pub(crate) struct Run<'a> {
    pub(crate) seed: u64,
    pub(crate) length: Duration,
    pub(crate) pace: Pace,
    pub(crate) rate: f64,
    pub(crate) commit: String,
    pub(crate) planned: usize,
    pub(crate) faults: &'a [Done],
    pub(crate) load_clients: u32,
    pub(crate) record: &'a Record,
    pub(crate) report: &'a Report,
    /// From the last fault healed to quiescence; `None` if it never came.
    pub(crate) quiesced_after: Option<Duration>,
    pub(crate) quiesce_timeout: Duration,
    pub(crate) accepted_per_second: f64,
    pub(crate) ended_per_second: f64,
    pub(crate) exits: Vec<String>,
    /// Why sagas compensated or failed, with how many.
    pub(crate) reasons: Vec<(String, i64)>,
    /// Keys a later load client sent again, and how many of those the
    /// service had accepted from the killed one already.
    pub(crate) resent: (usize, usize),
}

/// `text`, or "0" if there is none.
fn or_zero(text: String) -> String {
    if text.is_empty() {
        "0".to_owned()
    } else {
        text
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

/// p50 and max of some durations, or "".
fn spread(mut durations: Vec<Duration>) -> String {
    if durations.is_empty() {
        return String::new();
    }
    durations.sort();
    format!(
        "p50 {} / max {}",
        seconds(durations[durations.len() / 2]),
        seconds(durations[durations.len() - 1])
    )
}

impl Run<'_> {
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "chaos run at {}: seed {}, {} of faults every {}–{} s, {} orders/s, \
             1 auth, 2 order, 2 payment and 3 orchestrator replicas on a durable PostgreSQL\n",
            self.commit,
            self.seed,
            seconds(self.length),
            self.pace.min_gap.as_secs_f64(),
            self.pace.max_gap.as_secs_f64(),
            self.rate
        );

        let _ = writeln!(out, "| fault | injected | notes |");
        let _ = writeln!(out, "|---|---|---|");
        let mut by_kind: BTreeMap<Kind, Vec<&Done>> = BTreeMap::new();
        for fault in self.faults {
            by_kind.entry(fault.kind).or_default().push(fault);
        }
        for kind in Kind::ALL {
            let faults = by_kind.remove(&kind).unwrap_or_default();
            let mut notes = Vec::new();
            let recoveries = faults.iter().filter_map(|fault| fault.recovery).collect();
            let recoveries = spread(recoveries);
            if !recoveries.is_empty() {
                notes.push(match kind {
                    Kind::RestartPostgres => format!("accepting again after {recoveries}"),
                    _ => format!("serving again after {recoveries}"),
                });
            }
            let errors = faults.iter().filter(|fault| fault.error.is_some()).count();
            if errors > 0 {
                notes.push(format!("{errors} could not be carried out (see stderr)"));
            }
            let _ = writeln!(
                out,
                "| {} | {} | {} |",
                kind.describe(),
                faults.len(),
                notes.join("; ")
            );
        }
        let _ = writeln!(
            out,
            "| all | {} of {} planned | {} load clients in turn |",
            self.faults.len(),
            self.planned,
            self.load_clients
        );

        let record = self.record;
        let answered = record.accepted.len();
        let outcomes = |counts: &BTreeMap<String, u64>| {
            counts
                .iter()
                .map(|(outcome, n)| format!("{n} {outcome}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let cancels = outcomes(&record.cancels);
        let compensations = outcomes(&record.compensations);
        let _ = writeln!(out, "\n| orders | count |");
        let _ = writeln!(out, "|---|---|");
        let _ = writeln!(
            out,
            "| CreateOrder requests (idempotency keys) | {} |",
            record.intents.len()
        );
        let _ = writeln!(out, "| accepted, answer received | {answered} |");
        let retried = record
            .accepted
            .values()
            .filter_map(|answers| answers.first())
            .filter(|answer| answer.attempts > 1)
            .count();
        let _ = writeln!(
            out,
            "| accepted after more than one send by the same client | {retried} |"
        );
        let _ = writeln!(
            out,
            "| sent again by a new load client after one was killed | {} ({} of them already accepted from the killed one) |",
            self.resent.0, self.resent.1
        );
        let _ = writeln!(out, "| refused for good | {} |", record.refused.len());
        for (status, n) in &self.report.totals.by_status {
            let _ = writeln!(out, "| orders {status} | {n} |");
        }
        for (state, n) in &self.report.totals.sagas_by_state {
            let _ = writeln!(out, "| sagas {state} | {n} |");
        }
        let _ = writeln!(
            out,
            "| customer cancellations (RequestOrderCancellation) | {} |",
            if cancels.is_empty() {
                "0".into()
            } else {
                cancels
            }
        );
        let _ = writeln!(
            out,
            "| operator compensations (CompensateSaga) | {} |",
            if compensations.is_empty() {
                "0".into()
            } else {
                compensations
            }
        );
        let reviews: BTreeMap<String, u64> = record
            .reviews
            .iter()
            .map(|((decision, outcome), n)| (format!("{decision}: {outcome}"), *n))
            .collect();
        let _ = writeln!(
            out,
            "| large orders' reviews, what followed the hold (ApproveOrder, DeclineOrder, the customer's cancellation, none) | {} |",
            or_zero(outcomes(&reviews))
        );
        let totals = &self.report.totals;
        let _ = writeln!(
            out,
            "| reviews approved / declined / timed out | {} / {} / {} |",
            totals.reviews_approved, totals.reviews_declined, totals.reviews_timed_out
        );
        let _ = writeln!(
            out,
            "| customer returns (RequestReturn) | {} |",
            or_zero(outcomes(&record.returns))
        );
        let _ = writeln!(
            out,
            "| returns requested / returned | {} / {} |",
            totals.returns_requested, totals.returned
        );

        let _ = writeln!(out, "\n| measure | value |");
        let _ = writeln!(out, "|---|---|");
        let _ = writeln!(
            out,
            "| throughput under faults: CreateOrders accepted | {:.1}/s |",
            self.accepted_per_second
        );
        let _ = writeln!(
            out,
            "| throughput under faults: sagas ended | {:.1}/s |",
            self.ended_per_second
        );
        let _ = writeln!(
            out,
            "| time to quiesce after the last fault | {} |",
            match self.quiesced_after {
                Some(after) => seconds(after),
                None => format!("**not within {}**", seconds(self.quiesce_timeout)),
            }
        );
        let _ = writeln!(
            out,
            "| replicas that exited by themselves | {} |",
            if self.exits.is_empty() {
                "none".to_owned()
            } else {
                self.exits.join("; ")
            }
        );
        if !self.reasons.is_empty() {
            let _ = writeln!(out, "\n| why sagas turned back | sagas |");
            let _ = writeln!(out, "|---|---|");
            for (reason, n) in &self.reasons {
                let _ = writeln!(out, "| {} | {n} |", reason.replace('|', "/"));
            }
        }
        let _ = writeln!(out, "\n{}", self.report.render());
        out
    }
}
