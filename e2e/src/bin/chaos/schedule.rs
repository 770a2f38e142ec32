//! The fault schedule: a pure function of the seed, the run's length, the
//! gap between faults and the [`Topology`], so that a seed names a run.
//! (What the faults then meet, the load and the machine's timing, is not
//! reproducible; the schedule is.)

use std::fmt;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};

use crate::cluster::Topology;

/// One fault: what, on which target, for how long.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fault {
    /// SIGKILL the replica, wait `down`, start it again.
    Kill { replica: usize, down: Duration },
    /// SIGSTOP the replica, SIGCONT it after `hold`.
    Stop { replica: usize, hold: Duration },
    /// PostgreSQL's immediate shutdown, and a new postmaster at once.
    RestartPostgres,
    /// SIGSTOP the broker, SIGCONT it after `hold`.
    PauseBroker { hold: Duration },
    /// Close the link's connections and refuse new ones for `hold`.
    Cut { link: usize, hold: Duration },
    /// Hold every chunk on the link for `latency`, for `hold`.
    Delay {
        link: usize,
        latency: Duration,
        hold: Duration,
    },
    /// Deliver requests on a gRPC link but lose the answers, for `hold`.
    LoseAnswers { link: usize, hold: Duration },
    /// SIGKILL the load client mid-request, start a new one after `down`.
    /// For `stall` before the kill, its connections deliver requests and
    /// lose the answers, so that it dies with requests the service
    /// accepted and it never heard of.
    KillLoadClient { stall: Duration, down: Duration },
}

/// The kinds of fault, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum Kind {
    Kill,
    Stop,
    RestartPostgres,
    PauseBroker,
    Cut,
    Delay,
    LoseAnswers,
    KillLoadClient,
}

impl Kind {
    pub(crate) const ALL: [Kind; 8] = [
        Kind::Kill,
        Kind::Stop,
        Kind::RestartPostgres,
        Kind::PauseBroker,
        Kind::Cut,
        Kind::Delay,
        Kind::LoseAnswers,
        Kind::KillLoadClient,
    ];

    /// What the fault does, for the summary.
    pub(crate) fn describe(self) -> &'static str {
        match self {
            Kind::Kill => "SIGKILL a replica, then start it again",
            Kind::Stop => "SIGSTOP a replica, SIGCONT it later",
            Kind::RestartPostgres => "restart PostgreSQL in immediate mode",
            Kind::PauseBroker => "pause the broker (SIGSTOP)",
            Kind::Cut => "cut a connection (to PostgreSQL or a service)",
            Kind::Delay => "delay a connection",
            Kind::LoseAnswers => "lose the answers on a gRPC connection",
            Kind::KillLoadClient => "SIGKILL the load client mid-request",
        }
    }

    /// How often the schedule picks it, out of the weights' sum.
    fn weight(self) -> u32 {
        match self {
            Kind::Kill => 18,
            Kind::Stop => 14,
            Kind::RestartPostgres => 6,
            Kind::PauseBroker => 8,
            Kind::Cut => 16,
            Kind::Delay => 12,
            Kind::LoseAnswers => 12,
            Kind::KillLoadClient => 14,
        }
    }
}

impl Fault {
    pub(crate) fn kind(&self) -> Kind {
        match self {
            Fault::Kill { .. } => Kind::Kill,
            Fault::Stop { .. } => Kind::Stop,
            Fault::RestartPostgres => Kind::RestartPostgres,
            Fault::PauseBroker { .. } => Kind::PauseBroker,
            Fault::Cut { .. } => Kind::Cut,
            Fault::Delay { .. } => Kind::Delay,
            Fault::LoseAnswers { .. } => Kind::LoseAnswers,
            Fault::KillLoadClient { .. } => Kind::KillLoadClient,
        }
    }

    /// In words, with its target's name.
    pub(crate) fn describe(&self, topology: &Topology) -> String {
        let ms = |d: &Duration| d.as_millis();
        match self {
            Fault::Kill { replica, down } => format!(
                "SIGKILL {}, start it again after {} ms",
                topology.replicas[*replica],
                ms(down)
            ),
            Fault::Stop { replica, hold } => {
                format!(
                    "SIGSTOP {} for {} ms",
                    topology.replicas[*replica],
                    ms(hold)
                )
            }
            Fault::RestartPostgres => "restart PostgreSQL (immediate)".to_owned(),
            Fault::PauseBroker { hold } => format!("pause the broker for {} ms", ms(hold)),
            Fault::Cut { link, hold } => {
                format!("cut {} for {} ms", topology.links[*link].0, ms(hold))
            }
            Fault::Delay {
                link,
                latency,
                hold,
            } => format!(
                "delay {} by {} ms for {} ms",
                topology.links[*link].0,
                ms(latency),
                ms(hold)
            ),
            Fault::LoseAnswers { link, hold } => format!(
                "lose the answers on {} for {} ms",
                topology.links[*link].0,
                ms(hold)
            ),
            Fault::KillLoadClient { stall, down } => format!(
                "SIGKILL the load client after {} ms without answers, a new one after {} ms",
                ms(stall),
                ms(down)
            ),
        }
    }
}

/// A fault and when it starts, from the start of the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Planned {
    pub(crate) at: Duration,
    pub(crate) fault: Fault,
}

/// How faults follow each other.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Pace {
    /// Shortest and longest gap between two faults' starts.
    pub(crate) min_gap: Duration,
    pub(crate) max_gap: Duration,
}

/// The faults of a run of `length`, from `seed`.
pub(crate) fn plan(seed: u64, length: Duration, pace: Pace, topology: &Topology) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let grpc_links: Vec<usize> = topology
        .links
        .iter()
        .enumerate()
        .filter(|(_, (_, grpc))| *grpc)
        .map(|(index, _)| index)
        .collect();
    let total: u32 = Kind::ALL.iter().map(|kind| kind.weight()).sum();
    let millis =
        |rng: &mut StdRng, low: u64, high: u64| Duration::from_millis(rng.random_range(low..=high));
    let mut planned = Vec::new();
    let mut at = millis(
        &mut rng,
        pace.min_gap.as_millis() as u64,
        pace.max_gap.as_millis() as u64,
    );
    while at < length {
        let mut pick = rng.random_range(0..total);
        let kind = *Kind::ALL
            .iter()
            .find(|kind| {
                if pick < kind.weight() {
                    true
                } else {
                    pick -= kind.weight();
                    false
                }
            })
            .expect("a pick below the weights' sum");
        let replica = rng.random_range(0..topology.replicas.len());
        let link = rng.random_range(0..topology.links.len());
        let fault = match kind {
            Kind::Kill => Fault::Kill {
                replica,
                down: millis(&mut rng, 0, 2000),
            },
            Kind::Stop => Fault::Stop {
                replica,
                // Sometimes longer than the orchestrators' 3 s lease: a
                // stopped owner is fenced off when it wakes.
                hold: millis(&mut rng, 500, 6000),
            },
            Kind::RestartPostgres => Fault::RestartPostgres,
            Kind::PauseBroker => Fault::PauseBroker {
                hold: millis(&mut rng, 500, 5000),
            },
            Kind::Cut => Fault::Cut {
                link,
                hold: millis(&mut rng, 500, 4000),
            },
            Kind::Delay => Fault::Delay {
                link,
                latency: millis(&mut rng, 20, 400),
                hold: millis(&mut rng, 1000, 5000),
            },
            Kind::LoseAnswers => Fault::LoseAnswers {
                link: grpc_links[rng.random_range(0..grpc_links.len())],
                hold: millis(&mut rng, 500, 3000),
            },
            Kind::KillLoadClient => Fault::KillLoadClient {
                stall: millis(&mut rng, 100, 1000),
                down: millis(&mut rng, 0, 1000),
            },
        };
        planned.push(Planned { at, fault });
        at += millis(
            &mut rng,
            pace.min_gap.as_millis() as u64,
            pace.max_gap.as_millis() as u64,
        );
    }
    planned
}

/// The schedule, one fault a line.
pub(crate) struct Listing<'a>(pub &'a [Planned], pub &'a Topology);

impl fmt::Display for Listing<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for planned in self.0 {
            writeln!(
                f,
                "{:>8.3} s  {}",
                planned.at.as_secs_f64(),
                planned.fault.describe(self.1)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace() -> Pace {
        Pace {
            min_gap: Duration::from_secs(1),
            max_gap: Duration::from_secs(3),
        }
    }

    #[test]
    fn a_seed_names_one_schedule() {
        let topology = Topology::new();
        let length = Duration::from_secs(600);
        let first = plan(17, length, pace(), &topology);
        assert_eq!(first, plan(17, length, pace(), &topology));
        assert_ne!(first, plan(18, length, pace(), &topology));
        // Faults every one to three seconds.
        assert!((200..=600).contains(&first.len()), "{}", first.len());
        for pair in first.windows(2) {
            let gap = pair[1].at - pair[0].at;
            assert!(gap >= Duration::from_secs(1) && gap <= Duration::from_secs(3));
        }
        // Over ten minutes every kind comes up.
        for kind in Kind::ALL {
            assert!(first.iter().any(|planned| planned.fault.kind() == kind));
        }
        // Answers are lost only where there are answers to lose.
        for planned in &first {
            if let Fault::LoseAnswers { link, .. } = planned.fault {
                assert!(topology.links[link].1);
            }
        }
    }
}
