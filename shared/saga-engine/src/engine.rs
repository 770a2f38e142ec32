//! The engine: claims sagas with due work, drives each until it waits or
//! ends, and records every transition in one fenced transaction. It
//! decides (what a request means in which state, what each turn does); the
//! statements that carry it out are in `store`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, bail};
use api_saga::v1 as pb;
use chrono::{DateTime, Utc};
use messaging::Publisher;
use sqlx::postgres::PgListener;
use sqlx::{PgConnection, PgPool};
use telemetry::CorrelationId;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::definition::{
    Journal, SagaDefinition, Step, StepClass, StepContext, StepError, attempt_id,
};
use crate::plan::{Plan, plan};
use crate::store::{
    self, Carried, Claimed, Kind, Lease, Locked, SagaRecord, SagaState, Signal, WriteError, Written,
};
use crate::turn::{self, Count, Turn};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// This replica's name in leases (host name and process id, say).
    pub worker_id: String,
    /// How long a claim lasts. Longer than any attempt, so a live replica
    /// never loses a saga mid-step; a dead one's sagas wait this long.
    pub lease: Duration,
    /// Sagas driven at once by this replica.
    pub concurrency: usize,
    /// Topic of the saga events, and the producer named in their envelopes.
    pub events_topic: String,
    pub producer: &'static str,
}

/// The saga engine of one replica.
pub struct Engine {
    pool: PgPool,
    /// Every definition this replica carries, by type and version.
    definitions: HashMap<(&'static str, u32), SagaDefinition>,
    /// The newest version of each type: new sagas (and children) start on it.
    newest: Arc<HashMap<&'static str, u32>>,
    /// The same pairs, as the claim binds them.
    carried: Carried,
    config: EngineConfig,
    /// Seals and enqueues every saga event (`config`'s topic and producer).
    publisher: Publisher,
    journal: Option<Arc<dyn Journal>>,
    /// Sagas this replica may drive at once: each driver holds one hand.
    hands: Arc<Semaphore>,
    /// Sagas started here whose transaction has committed, on their way
    /// to a driver (see [`Engine::start_here`]).
    adopted: mpsc::UnboundedSender<Claimed>,
    adoptions: Mutex<Option<mpsc::UnboundedReceiver<Claimed>>>,
}

/// A saga just started by [`Engine::start_here`], in a transaction that
/// has not committed yet.
#[derive(Debug)]
#[must_use = "a saga started here waits for its lease to run out unless adopted"]
pub struct Started {
    pub saga_id: Uuid,
    /// Its row as written, leased to this replica; `None` if every hand
    /// was busy and it was left for any replica to claim.
    claim: Option<Claimed>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What an operator's or customer's request found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestOutcome {
    /// Done, or will be between steps.
    Accepted,
    /// The saga was already in this final (or failed) state.
    NotApplicable(SagaState),
    /// The saga's pivot may have taken effect (its first attempt began at
    /// `since`): it only goes forward, and cannot be compensated.
    ForwardOnly {
        pivot: &'static str,
        since: DateTime<Utc>,
    },
    NotFound,
    /// No definition of the saga's version is carried here, so what the
    /// request means cannot be decided here.
    UnknownVersion {
        version: i32,
    },
}

/// A signal for a saga, as its sender names it.
#[derive(Debug, Clone, Copy)]
pub struct NewSignal<'a> {
    pub signal: &'a str,
    pub signal_id: &'a str,
    pub payload: &'a serde_json::Value,
}

/// What a signal came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SignalOutcome {
    /// Kept: the step waiting for it (now or later) takes it.
    Kept(Signal),
    /// Its id was received before, with the same signal and payload: that
    /// first signal, and nothing new.
    Repeated(Signal),
    /// Its id was received before for another signal or payload: that one.
    Conflict(Signal),
    /// The saga waits for no signal in this state.
    NotApplicable(SagaState),
    /// The saga's definition at its version has no step waiting for this
    /// name; these are the names it waits for.
    UnknownSignal {
        saga_type: String,
        version: i32,
        known: Vec<&'static str>,
    },
    /// Every step waiting for this name is done (or has its signal): these.
    NoLongerAwaited(Vec<&'static str>),
    /// The saga's version is not carried here.
    UnknownVersion {
        saga_type: String,
        version: i32,
    },
    NotFound,
}
/// What a termination came to. Steps of a child saga are named by the
/// path of steps that started it: `refund/void` is the step `void` of the
/// child that the step `refund` started (and `a/b/c` one level deeper).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Termination {
    /// Terminated, leaving these steps in effect (acknowledged), with the
    /// child sagas under it that were not final (terminated too).
    Terminated {
        left_in_effect: Vec<String>,
        children: Vec<Uuid>,
    },
    /// These steps (its own, and its children's) may have taken effect and
    /// are not compensated, and the request did not acknowledge it:
    /// nothing was done.
    EffectsNotAcknowledged(Vec<String>),
    /// Not found, final, or past its pivot: nothing was done.
    Refused(RequestOutcome),
    /// A child saga under it (started by the step, or path of steps,
    /// `step`) cannot be terminated, so neither can it: the child is past
    /// its own pivot, or its version is not carried here. Nothing was done.
    ChildRefused {
        child: Uuid,
        saga_type: String,
        step: String,
        outcome: RequestOutcome,
    },
}

impl Engine {
    /// An engine for `definitions`. Every attempt must fit in the lease.
    pub fn new(
        pool: PgPool,
        definitions: Vec<SagaDefinition>,
        config: EngineConfig,
    ) -> anyhow::Result<Self> {
        let mut by_version = HashMap::new();
        let mut newest: HashMap<&'static str, u32> = HashMap::new();
        let mut carried = Carried::default();
        for definition in definitions {
            definition.validate()?;
            if definition.longest_attempt() >= config.lease {
                bail!(
                    "saga {} has an attempt timeout longer than the lease",
                    definition.name
                );
            }
            let key = (definition.name, definition.version);
            let newer = newest.entry(definition.name).or_default();
            *newer = (*newer).max(definition.version);
            carried.types.push(definition.name.to_owned());
            carried.versions.push(i32::try_from(definition.version)?);
            if by_version.insert(key, definition).is_some() {
                bail!("saga {} version {} is given twice", key.0, key.1);
            }
        }
        let (adopted, adoptions) = mpsc::unbounded_channel();
        Ok(Self {
            pool,
            definitions: by_version,
            newest: Arc::new(newest),
            carried,
            hands: Arc::new(Semaphore::new(config.concurrency)),
            publisher: Publisher::new(config.producer, config.events_topic.clone()),
            config,
            journal: None,
            adopted,
            adoptions: Mutex::new(Some(adoptions)),
        })
    }

    /// This engine, recording every saga event in `journal`; see [`Journal`].
    #[must_use]
    pub fn with_journal(mut self, journal: Arc<dyn Journal>) -> Self {
        self.journal = Some(journal);
        self
    }

    /// Where a turn's events go: the journal, if any, records them all,
    /// and the events topic gets those worth publishing.
    pub(crate) fn events(&self) -> store::Events<'_> {
        store::Events {
            publisher: &self.publisher,
            journal: self.journal.as_deref(),
        }
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The definition of `saga_type` at `version`, if this engine carries it.
    pub fn definition(&self, saga_type: &str, version: i32) -> Option<&SagaDefinition> {
        let version = u32::try_from(version).ok()?;
        self.newest
            .get_key_value(saga_type)
            .and_then(|(name, _)| self.definitions.get(&(*name, version)))
    }

    /// The version of `saga_type` a saga this engine starts runs on: the
    /// newest it carries, unless [`starting_on`](Self::starting_on) chose
    /// another.
    pub fn newest_version(&self, saga_type: &str) -> Option<u32> {
        self.newest.get(saga_type).copied()
    }

    /// This engine, starting new sagas of `saga_type` on `version`, which
    /// it must carry, rather than on the newest. A new version is rolled
    /// out in two steps: first every replica carries it while still
    /// starting the old one, then they start it; so no saga is ever
    /// started on a version that a replica running it lacks. (Child sagas
    /// follow the same choice.)
    pub fn starting_on(mut self, saga_type: &str, version: u32) -> anyhow::Result<Self> {
        let Some((name, _)) = self.newest.get_key_value(saga_type) else {
            bail!("no definition for saga type {saga_type}");
        };
        let name: &'static str = name;
        if !self.definitions.contains_key(&(name, version)) {
            bail!("saga {saga_type} has no version {version} here");
        }
        Arc::make_mut(&mut self.newest).insert(name, version);
        Ok(self)
    }

    /// Starts a saga of `saga_type` for `business_key` in the caller's
    /// transaction, unless one exists: `None` then. Work is due at once and
    /// the engines are woken when the transaction commits; any replica may
    /// claim it.
    pub async fn start(
        &self,
        conn: &mut PgConnection,
        saga_type: &str,
        business_key: &str,
        data: serde_json::Value,
        correlation_id: &str,
    ) -> anyhow::Result<Option<Uuid>> {
        let started = self
            .create(conn, saga_type, business_key, &data, correlation_id, false)
            .await?;
        Ok(started.map(|started| started.saga_id))
    }

    /// Like [`start`](Self::start), but the saga is leased to this replica
    /// from the first (if it has a free hand), so that once the caller's
    /// transaction commits and the caller passes it to
    /// [`adopt`](Self::adopt), it is driven at once: no notification, no
    /// claim, no reading back what was just written (an eager start). If
    /// this replica dies first, the lease runs out and another claims it.
    pub async fn start_here(
        &self,
        conn: &mut PgConnection,
        saga_type: &str,
        business_key: &str,
        data: serde_json::Value,
        correlation_id: &str,
    ) -> anyhow::Result<Option<Started>> {
        let here = self.hands.available_permits() > 0;
        self.create(conn, saga_type, business_key, &data, correlation_id, here)
            .await
    }

    /// Drives a saga [`start_here`](Self::start_here) began, once the
    /// transaction that started it has committed (before, its row is not
    /// there to be written). A saga left for any replica needs nothing.
    pub fn adopt(&self, started: Started) {
        if let Some(claim) = started.claim {
            // Fails only when the engine has stopped running; the lease
            // then runs out and another replica claims the saga.
            let _ = self.adopted.send(claim);
        }
    }

    async fn create(
        &self,
        conn: &mut PgConnection,
        saga_type: &str,
        business_key: &str,
        data: &serde_json::Value,
        correlation_id: &str,
        here: bool,
    ) -> anyhow::Result<Option<Started>> {
        let version = self
            .newest_version(saga_type)
            .with_context(|| format!("no definition for saga type {saga_type}"))?;
        let trace_context = telemetry::propagation::current_headers();
        let new = store::NewSaga {
            saga_id: Uuid::now_v7(),
            saga_type,
            version: i32::try_from(version)?,
            business_key,
            data,
            correlation_id,
            trace_context: &trace_context,
        };
        let owner = here.then_some((self.config.worker_id.as_str(), self.config.lease));
        let Some(instance) = store::create(conn, &new, owner).await? else {
            return Ok(None);
        };
        let saga_id = instance.saga_id;
        let event = pb::SagaStarted {
            saga_id: saga_id.to_string(),
            saga_type: saga_type.to_owned(),
            order_id: business_key.to_owned(),
            version,
        };
        // Caused by what the starter is handling: the event that asked for
        // the saga.
        let envelope = turn::saga_event(
            &self.publisher,
            saga_id,
            correlation_id,
            telemetry::causation::current(),
            &event,
        );
        self.events()
            .write(conn, std::slice::from_ref(&envelope))
            .await?;
        let claim = here.then(|| Claimed {
            saga: SagaRecord {
                instance,
                steps: Vec::new(),
            },
            trace_context,
            signals: Vec::new(),
            children: Vec::new(),
        });
        Ok(Some(Started { saga_id, claim }))
    }

    /// Asks a running saga to compensate (it does so between steps, never
    /// overtaking one in flight), or sends a failed one back to compensating.
    /// Refused once the saga's pivot may have taken effect: the row's lock
    /// orders this request and the pivot's first attempt, so exactly one of
    /// them goes ahead.
    pub async fn request_compensation(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
        reason: &str,
    ) -> anyhow::Result<RequestOutcome> {
        let Some(saga) = store::lock(conn, saga_id).await? else {
            return Ok(RequestOutcome::NotFound);
        };
        if let Some(since) = saga.forward_only_since.filter(|_| !saga.state.is_final()) {
            let pivot = self
                .definition(&saga.saga_type, saga.version)
                .and_then(|d| d.pivot)
                .unwrap_or("the pivot");
            return Ok(RequestOutcome::ForwardOnly { pivot, since });
        }
        match saga.state {
            SagaState::Running => {
                store::request_compensation(conn, &saga, reason).await?;
                Ok(RequestOutcome::Accepted)
            }
            SagaState::Failed => {
                reopen(conn, &saga, SagaState::Compensating).await?;
                Ok(RequestOutcome::Accepted)
            }
            // Recorded, and acted on once resumed (as if it came just
            // before the pause); a saga paused while compensating is
            // compensating already.
            SagaState::Paused => {
                if saga.paused_from == Some(SagaState::Running) {
                    store::request_compensation(conn, &saga, reason).await?;
                }
                Ok(RequestOutcome::Accepted)
            }
            other => Ok(RequestOutcome::NotApplicable(other)),
        }
    }

    /// Resumes a failed saga: its failed compensations get a fresh retry
    /// budget, or, for a saga that failed past its pivot, its failed steps
    /// do and it goes forward again.
    pub async fn retry(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
    ) -> anyhow::Result<RequestOutcome> {
        let Some(saga) = store::lock(conn, saga_id).await? else {
            return Ok(RequestOutcome::NotFound);
        };
        match (saga.state, saga.forward_only_since) {
            // Failed past its pivot: it can only go forward.
            (SagaState::Failed, Some(_)) => {
                reopen(conn, &saga, SagaState::Running).await?;
                Ok(RequestOutcome::Accepted)
            }
            (SagaState::Failed, None) => {
                reopen(conn, &saga, SagaState::Compensating).await?;
                Ok(RequestOutcome::Accepted)
            }
            (other, _) => Ok(RequestOutcome::NotApplicable(other)),
        }
    }

    /// Pauses a running or compensating saga between steps. Nobody driving
    /// it, it is paused now; a replica driving it pauses it at its next
    /// turn boundary (an attempt in flight finishes and is recorded first):
    /// the request is recorded under the row's lock, which the owner's next
    /// write waits for. A paused saga, or one already asked to pause, needs
    /// nothing more. A failed saga runs nothing: there is nothing to pause.
    ///
    /// Pausing a parent does not pause its child sagas, on purpose: a pause
    /// stops this saga between its own steps (before it goes on to the next,
    /// say), and a child is a saga of its own, already asked for, which an
    /// operator pauses by its own id if they mean to. A child that ends
    /// while its parent is paused wakes it all the same (`signal_pending`):
    /// the parent reads the outcome once resumed. Neither is stuck for the
    /// other meanwhile: a paused saga never is, and a parent waiting on a
    /// paused child is not either (see [`store::flag_stuck`]).
    pub async fn pause(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
    ) -> anyhow::Result<RequestOutcome> {
        let Some(saga) = store::lock(conn, saga_id).await? else {
            return Ok(RequestOutcome::NotFound);
        };
        match saga.state {
            SagaState::Paused => Ok(RequestOutcome::Accepted),
            SagaState::Running | SagaState::Compensating if saga.pause_requested => {
                Ok(RequestOutcome::Accepted)
            }
            SagaState::Running | SagaState::Compensating if saga.driven => {
                store::request_pause(conn, &saga).await?;
                Ok(RequestOutcome::Accepted)
            }
            SagaState::Running | SagaState::Compensating => {
                store::pause(conn, &saga).await?;
                let event = pb::SagaPaused {
                    saga_id: saga_id.to_string(),
                    order_id: saga.business_key.clone(),
                    resumes_to: saga.state.to_proto().into(),
                };
                self.record(conn, &saga, &event).await?;
                count_committed(&saga.saga_type, Count::Paused);
                Ok(RequestOutcome::Accepted)
            }
            other => Ok(RequestOutcome::NotApplicable(other)),
        }
    }

    /// Resumes a paused saga in the state it was paused in, due now, with a
    /// new fence; or withdraws a pause requested but not yet taken.
    pub async fn resume(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
    ) -> anyhow::Result<RequestOutcome> {
        let Some(saga) = store::lock(conn, saga_id).await? else {
            return Ok(RequestOutcome::NotFound);
        };
        match saga.state {
            SagaState::Paused => {
                let state = saga.paused_from.unwrap_or(SagaState::Running);
                store::resume(conn, &saga, state).await?;
                let event = pb::SagaResumed {
                    saga_id: saga_id.to_string(),
                    order_id: saga.business_key.clone(),
                    state: state.to_proto().into(),
                };
                self.record(conn, &saga, &event).await?;
                Ok(RequestOutcome::Accepted)
            }
            SagaState::Running | SagaState::Compensating if saga.pause_requested => {
                store::withdraw_pause(conn, &saga).await?;
                Ok(RequestOutcome::Accepted)
            }
            other => Ok(RequestOutcome::NotApplicable(other)),
        }
    }

    /// Stops a saga for good without compensating. Refused for a final saga
    /// and once its pivot may have taken effect (it only goes forward; the
    /// row's lock orders this and the pivot's first attempt), and, unless
    /// `acknowledge_effects`, while a step may have taken effect and is not
    /// compensated: stopping then leaves that effect (a charge) in place,
    /// which the operator must own. An attempt in flight is cut off by the
    /// new fence; it counts as in effect.
    ///
    /// The child sagas under it (at any depth) that are not final are
    /// terminated with it, in this transaction, under the same rules: if one
    /// cannot be (it is past its own pivot, or its version is not carried
    /// here), nothing is done and the refusal names it
    /// ([`Termination::ChildRefused`]). The steps of its children (those
    /// terminated, and those that completed, which compensating it would
    /// have undone) that may have taken effect are its effects to
    /// acknowledge, named by their path (`refund/void`), and each child
    /// terminated records its own (`void`); each gets its SagaTerminated. A
    /// child already compensated or terminated leaves nothing new.
    ///
    /// Terminating a child saga on its own wakes its parent, for which the
    /// child ended: terminated, the child step's failure.
    ///
    /// The rows are locked parent first, as a parent's turns lock them; a
    /// child's last turn, which locks it then wakes its parent, may meet
    /// this request in a deadlock, which PostgreSQL breaks by failing one:
    /// the turn is written again, the request fails and may be repeated.
    pub async fn terminate(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
        reason: &str,
        acknowledge_effects: bool,
    ) -> anyhow::Result<Termination> {
        let Some(saga) = store::lock(conn, saga_id).await? else {
            return Ok(Termination::Refused(RequestOutcome::NotFound));
        };
        if saga.state.is_final() {
            return Ok(Termination::Refused(RequestOutcome::NotApplicable(
                saga.state,
            )));
        }
        let Some(definition) = self.definition(&saga.saga_type, saga.version) else {
            return Ok(Termination::Refused(RequestOutcome::UnknownVersion {
                version: saga.version,
            }));
        };
        if let Some(since) = saga.forward_only_since {
            let pivot = definition.pivot.unwrap_or("the pivot");
            return Ok(Termination::Refused(RequestOutcome::ForwardOnly {
                pivot,
                since,
            }));
        }
        let record = SagaRecord {
            steps: store::steps(conn, saga_id).await?,
            instance: store::load_instance(conn, saga_id)
                .await?
                .context("a locked saga exists")?,
        };
        let family = Family::of(record, store::descendants(conn, saga_id).await?);
        if let Some(refusal) = self.refusal_under(&family) {
            return Ok(refusal);
        }
        let left_in_effect = self.left_by(&family, &family.root);
        if !left_in_effect.is_empty() && !acknowledge_effects {
            return Ok(Termination::EffectsNotAcknowledged(left_in_effect));
        }

        let terminated: Vec<&SagaRecord> = family
            .under
            .iter()
            .filter(|child| !child.instance.state.is_final())
            .collect();
        let mut stops = vec![store::Stop {
            saga_id,
            reason: reason.to_owned(),
            left_in_effect: left_in_effect.clone(),
        }];
        let child_reason = format!("terminated with its parent saga {saga_id}: {reason}");
        stops.extend(terminated.iter().map(|child| store::Stop {
            saga_id: child.instance.saga_id,
            reason: child_reason.clone(),
            left_in_effect: self.left_by(&family, child),
        }));
        store::terminate(conn, &stops).await?;
        let cause = telemetry::causation::current();
        let envelopes: Vec<_> = stops
            .iter()
            .zip(std::iter::once(&family.root).chain(terminated.iter().copied()))
            .map(|(stop, saga)| {
                let instance = &saga.instance;
                // A child works for its parent's order, as its SagaStarted
                // said.
                let order_id = instance
                    .parent_saga_id
                    .filter(|_| instance.saga_id != saga_id)
                    .and_then(|parent| family.get(parent))
                    .map_or(&instance.business_key, |parent| {
                        &parent.instance.business_key
                    });
                let event = pb::SagaTerminated {
                    saga_id: instance.saga_id.to_string(),
                    order_id: order_id.clone(),
                    reason: stop.reason.clone(),
                    steps_left_in_effect: stop.left_in_effect.clone(),
                };
                turn::saga_event(
                    &self.publisher,
                    instance.saga_id,
                    &instance.correlation_id,
                    cause.clone(),
                    &event,
                )
            })
            .collect();
        self.events().write(conn, &envelopes).await?;
        let children: Vec<Uuid> = terminated.iter().map(|c| c.instance.saga_id).collect();
        tracing::warn!(%saga_id, %reason, left_in_effect = ?left_in_effect, children = ?children, "saga terminated by an operator");
        for saga in std::iter::once(&family.root).chain(terminated.iter().copied()) {
            count_committed(
                &saga.instance.saga_type,
                Count::Finished(SagaState::Terminated),
            );
        }
        Ok(Termination::Terminated {
            left_in_effect,
            children,
        })
    }

    /// Why the children under a saga keep it from being terminated, if they
    /// do: one not final is past its own pivot, or one whose steps count
    /// (not final, or completed) is of a version not carried here.
    fn refusal_under(&self, family: &Family) -> Option<Termination> {
        family.under.iter().find_map(|child| {
            let instance = &child.instance;
            let refused = |outcome| Termination::ChildRefused {
                child: instance.saga_id,
                saga_type: instance.saga_type.clone(),
                step: family.path(child),
                outcome,
            };
            let counted = !matches!(
                instance.state,
                SagaState::Compensated | SagaState::Terminated
            );
            let Some(definition) = self.definition(&instance.saga_type, instance.version) else {
                return counted.then(|| {
                    refused(RequestOutcome::UnknownVersion {
                        version: instance.version,
                    })
                });
            };
            let since = instance
                .forward_only_since
                .filter(|_| !instance.state.is_final())?;
            Some(refused(RequestOutcome::ForwardOnly {
                pivot: definition.pivot.unwrap_or("the pivot"),
                since,
            }))
        })
    }

    /// What stopping `saga` now leaves in effect: its own steps that may
    /// have taken effect and are not compensated (see `plan::in_effect`),
    /// then those of the children under it, named by their path from it;
    /// a child compensated or terminated already adds none of its own.
    fn left_by(&self, family: &Family, saga: &SagaRecord) -> Vec<String> {
        let instance = &saga.instance;
        let mut left: Vec<String> = match instance.state {
            SagaState::Compensated | SagaState::Terminated => Vec::new(),
            _ => self
                .definition(&instance.saga_type, instance.version)
                .map(|definition| crate::plan::in_effect(definition, saga))
                .unwrap_or_default()
                .into_iter()
                .map(str::to_owned)
                .collect(),
        };
        for child in family.children_of(instance.saga_id) {
            let step = child.instance.parent_step.as_deref().unwrap_or("?");
            left.extend(
                self.left_by(family, child)
                    .into_iter()
                    .map(|theirs| format!("{step}/{theirs}")),
            );
        }
        left
    }

    /// Keeps a signal for a running saga (or one paused while running),
    /// whether or not its step waits yet, and makes the saga due so that
    /// the step takes it; see [`SignalOutcome`] for what else it may come
    /// to. A repeated signal id is answered with the first signal, whatever
    /// the saga's state since; nothing is written then, nor for a refusal.
    pub async fn signal(
        &self,
        conn: &mut PgConnection,
        saga_id: Uuid,
        new: NewSignal<'_>,
    ) -> anyhow::Result<SignalOutcome> {
        let Some(saga) = store::lock(conn, saga_id).await? else {
            return Ok(SignalOutcome::NotFound);
        };
        if let Some(first) = store::find_signal(conn, saga_id, new.signal_id).await? {
            let same = first.signal == new.signal && first.payload.0 == *new.payload;
            return Ok(if same {
                SignalOutcome::Repeated(first)
            } else {
                SignalOutcome::Conflict(first)
            });
        }
        let forward = saga.state == SagaState::Running
            || (saga.state == SagaState::Paused && saga.paused_from == Some(SagaState::Running));
        if !forward {
            return Ok(SignalOutcome::NotApplicable(saga.state));
        }
        let Some(definition) = self.definition(&saga.saga_type, saga.version) else {
            return Ok(SignalOutcome::UnknownVersion {
                saga_type: saga.saga_type.clone(),
                version: saga.version,
            });
        };
        let waiting: Vec<&'static str> = definition
            .groups
            .iter()
            .flatten()
            .filter(|step| step.wait.as_ref().is_some_and(|w| w.signal == new.signal))
            .map(|step| step.name)
            .collect();
        if waiting.is_empty() {
            let mut known: Vec<&'static str> = definition.signals().collect();
            known.dedup();
            return Ok(SignalOutcome::UnknownSignal {
                saga_type: saga.saga_type.clone(),
                version: saga.version,
                known,
            });
        }
        // The k-th step waiting for a name takes the k-th signal of it:
        // this one goes to the step after those already signalled, unless
        // that step is done (it timed out, or was skipped).
        let received = store::signals(&mut *conn, &[saga_id])
            .await?
            .remove(&saga_id)
            .unwrap_or_default()
            .iter()
            .filter(|signal| signal.signal == new.signal)
            .count();
        let steps = store::steps(conn, saga_id).await?;
        let done = |name: &str| {
            steps
                .iter()
                .any(|r| r.step == name && r.kind == Kind::Action && r.status.is_finished())
        };
        match waiting.get(received) {
            Some(step) if !done(step) => {}
            Some(step) => return Ok(SignalOutcome::NoLongerAwaited(vec![step])),
            None => return Ok(SignalOutcome::NoLongerAwaited(waiting)),
        }
        let kept = store::keep_signal(conn, &saga, new.signal_id, new.signal, new.payload).await?;
        tracing::info!(%saga_id, signal = new.signal, signal_id = new.signal_id, "signal kept for a saga");
        Ok(SignalOutcome::Kept(kept))
    }

    /// Writes an operator's request's event, in its transaction: to the
    /// journal, and (if worth publishing) to the events topic.
    async fn record<M: prost::Message + prost::Name>(
        &self,
        conn: &mut PgConnection,
        saga: &Locked,
        event: &M,
    ) -> anyhow::Result<()> {
        let envelope = turn::saga_event(
            &self.publisher,
            saga.saga_id,
            &saga.correlation_id,
            telemetry::causation::current(),
            event,
        );
        self.events()
            .write(conn, std::slice::from_ref(&envelope))
            .await
    }

    /// Runs until `shutdown`, flagging sagas that have made no progress for
    /// `stuck_after` (each logged once, by whichever replica flags it). It
    /// sleeps until the least progressed saga could become stuck: a saga
    /// that progresses, starts or resumes only becomes stuck later.
    pub async fn watch_stuck(self: Arc<Self>, stuck_after: Duration, shutdown: CancellationToken) {
        // Say first what this replica carries (its engine says so too, and
        // renews it): otherwise a replica starting after every replica was
        // gone for two leases would flag its own sagas as carried by none.
        if let Err(error) = store::carry(&self.pool, &self.carried, self.config.lease * 2).await {
            tracing::warn!(
                error = format!("{error:#}"),
                "saying which definitions this replica carries failed"
            );
        }
        while !shutdown.is_cancelled() {
            match store::flag_stuck(&self.pool, stuck_after).await {
                Ok(stuck) => {
                    for saga in stuck {
                        tracing::warn!(
                            saga_id = %saga.saga_id,
                            saga = saga.saga_type,
                            order_id = saga.business_key,
                            correlation_id = saga.correlation_id,
                            progressed_at = %saga.progressed_at,
                            reason = saga.stuck_reason,
                            "saga is stuck (stuck after {})",
                            humantime_secs(stuck_after)
                        );
                    }
                }
                Err(error) => {
                    tracing::warn!(error = format!("{error:#}"), "flagging stuck sagas failed");
                }
            }
            let wait = store::next_stuck(&self.pool, stuck_after)
                .await
                .ok()
                .flatten()
                .unwrap_or(stuck_after)
                .min(stuck_after)
                // A definition may stop being carried (its replicas gone)
                // at any time: look again within a lease.
                .min(self.config.lease)
                // Past the instant, not on it: the clocks are the database's.
                + Duration::from_millis(10);
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Runs until `shutdown`: claims due sagas whenever work appears
    /// (notification) or a timer falls due, and drives them.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let permits = self.hands.clone();
        let mut adoptions = self
            .adoptions
            .lock()
            .expect("not poisoned")
            .take()
            .expect("an engine runs once");
        let mut drivers = tokio::task::JoinSet::new();
        let mut listener: Option<PgListener> = None;
        // When to say again which definitions this replica carries: it
        // says so for two leases, every half lease.
        let mut carry_at = tokio::time::Instant::now();
        'run: while !shutdown.is_cancelled() {
            if tokio::time::Instant::now() >= carry_at {
                match store::carry(&self.pool, &self.carried, self.config.lease * 2).await {
                    Ok(()) => carry_at = tokio::time::Instant::now() + self.config.lease / 2,
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "saying which definitions this replica carries failed"
                        );
                    }
                }
            }
            if listener.is_none() {
                listener = match store::listen(&self.pool).await {
                    Ok(listener) => Some(listener),
                    Err(error) => {
                        tracing::warn!(
                            error = format!("{error:#}"),
                            "saga engine cannot listen yet"
                        );
                        None
                    }
                };
            }
            // Claim as much work as there are free hands.
            let free = permits.available_permits();
            let claimed = if free == 0 {
                Vec::new()
            } else {
                self.claim(free as i64).await.unwrap_or_else(|error| {
                    tracing::warn!(error = format!("{error:#}"), "claiming sagas failed");
                    Vec::new()
                })
            };
            let claimed_any = !claimed.is_empty();
            for claim in claimed {
                let permit = permits
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed");
                let engine = self.clone();
                let shutdown = shutdown.clone();
                // Boxed: a driver's future is large (its PostgreSQL
                // connection's TLS state among it), and each task holds one.
                drivers.spawn(async move {
                    engine.drive(claim, &shutdown).await;
                    drop(permit);
                });
            }
            while drivers.try_join_next().is_some() {}
            if claimed_any {
                continue;
            }
            // Sleep until the next timer, a notification, a driver freeing
            // its hands (if every hand was busy: work may be waiting), or a
            // slow safety sweep.
            let saturated = permits.available_permits() == 0;
            let next_due = store::next_due(&self.pool, &self.carried)
                .await
                .ok()
                .flatten();
            let sleep = next_due
                .map(|at| (at - Utc::now()).to_std().unwrap_or_default())
                .unwrap_or(Duration::from_secs(5))
                .min(Duration::from_secs(5));
            let wake_at = (tokio::time::Instant::now() + sleep).min(carry_at);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break 'run,
                    Some(claim) = adoptions.recv() => {
                        // A hand was free when it started; if it has been
                        // taken since, the saga waits here for the next (it
                        // is leased to no one else). Nothing new is due for
                        // claiming: wait on.
                        let permit = permits.clone().acquire_owned();
                        let engine = self.clone();
                        let shutdown = shutdown.clone();
                        drivers.spawn(async move {
                            let permit = permit.await.expect("the semaphore is never closed");
                            engine.drive(claim, &shutdown).await;
                            drop(permit);
                        });
                        while drivers.try_join_next().is_some() {}
                    }
                    () = tokio::time::sleep_until(wake_at) => break,
                    Some(_) = drivers.join_next(), if saturated && !drivers.is_empty() => break,
                    received = async { listener.as_mut().expect("guarded").try_recv().await }, if listener.is_some() => {
                        if received.is_err() {
                            listener = None;
                        }
                        break;
                    }
                }
            }
        }
        // Sagas started here but not yet driven go back to being claimable
        // (a driver does that first thing once shutdown is cancelled), and
        // drivers stop between steps.
        adoptions.close();
        while let Some(claim) = adoptions.recv().await {
            let engine = self.clone();
            let shutdown = shutdown.clone();
            drivers.spawn(async move { engine.drive(claim, &shutdown).await });
        }
        while drivers.join_next().await.is_some() {}
        tracing::debug!("saga engine stopped");
    }

    /// Claims up to `limit` due sagas of the definitions carried here, with
    /// their signals when their definition waits for any.
    async fn claim(&self, limit: i64) -> anyhow::Result<Vec<Claimed>> {
        let mut claimed = store::claim(
            &self.pool,
            &self.config.worker_id,
            &self.carried,
            limit,
            self.config.lease,
        )
        .await?;
        let waiting: Vec<Uuid> = claimed
            .iter()
            .filter(|claim| {
                let instance = &claim.saga.instance;
                self.definition(&instance.saga_type, instance.version)
                    .is_some_and(SagaDefinition::waits)
            })
            .map(|claim| claim.saga.instance.saga_id)
            .collect();
        if !waiting.is_empty() {
            let mut signals = store::signals(&self.pool, &waiting).await?;
            for claim in &mut claimed {
                if let Some(theirs) = signals.remove(&claim.saga.instance.saga_id) {
                    claim.signals = theirs;
                }
            }
        }
        let parents: Vec<Uuid> = claimed
            .iter()
            .filter(|claim| {
                let instance = &claim.saga.instance;
                self.definition(&instance.saga_type, instance.version)
                    .is_some_and(SagaDefinition::has_children)
            })
            .map(|claim| claim.saga.instance.saga_id)
            .collect();
        if !parents.is_empty() {
            for child in store::children(&self.pool, &parents).await? {
                if let Some(claim) = claimed
                    .iter_mut()
                    .find(|claim| claim.saga.instance.saga_id == child.parent_saga_id)
                {
                    claim.children.push(child);
                }
            }
        }
        Ok(claimed)
    }

    /// Drives one claimed saga until it waits, ends, or is taken over. Its
    /// spans continue the trace of what started the saga.
    pub async fn drive(&self, claim: Claimed, shutdown: &CancellationToken) {
        let span = tracing::info_span!(
            "saga.drive",
            saga_id = %claim.saga.instance.saga_id,
            correlation_id = claim.saga.instance.correlation_id.as_str(),
            trace_id = tracing::field::Empty,
        );
        let received = telemetry::propagation::extract(
            claim
                .trace_context
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        telemetry::propagation::adopt_parent(&span, received.context);
        // Boxed: a turn's future holds the whole saga record and the
        // attempts in flight, too large to move around on the stack.
        async {
            match Box::pin(self.drive_inner(claim, shutdown)).await {
                Ok(()) | Err(WriteError::Fenced) => {}
                Err(WriteError::Unexpected(error)) => {
                    tracing::warn!(
                        error = format!("{error:#}"),
                        "driving a saga failed; it will be retried"
                    );
                    // The lease runs out and the saga is claimed again.
                }
            }
        }
        .instrument(span)
        .await;
    }

    /// The saga lives in memory while this replica holds it: each plan is
    /// made from the record as the last turn left it, and each turn (the
    /// outcomes of the attempts just made, the transitions they lead to,
    /// and the write-ahead of the next attempts) is one fenced transaction.
    async fn drive_inner(
        &self,
        claim: Claimed,
        shutdown: &CancellationToken,
    ) -> Result<(), WriteError> {
        let fence = claim.fence();
        let (saga_type, version) = (&claim.saga.instance.saga_type, claim.saga.instance.version);
        // Claimed only if carried here: this holds.
        let definition = self.definition(saga_type, version).with_context(|| {
            format!("no definition for saga type {saga_type} version {version}")
        })?;
        let correlation = CorrelationId::parse(&claim.saga.instance.correlation_id)
            .unwrap_or_else(CorrelationId::generate);
        let mut turn = Turn::new(
            claim.saga,
            claim.signals,
            claim.children,
            self.newest.clone(),
            self.publisher.clone(),
        );
        loop {
            let now = Utc::now();
            if shutdown.is_cancelled() {
                // Hand the saga to whichever replica is still running.
                return self
                    .commit(&mut turn, fence, Lease::Release(Some(now)))
                    .await
                    .map(drop);
            }
            match plan(definition, &turn.saga, &turn.signals, &turn.children, now) {
                Plan::Transition(transition) => turn.transition(definition, transition, now),
                Plan::Attempt { kind, steps } => {
                    let began = telemetry::correlation::scope(
                        correlation.clone(),
                        self.attempt(definition, &mut turn, fence, kind, &steps),
                    )
                    .await?;
                    if !began {
                        // A compensation or pause request came first: the
                        // turn is as it was before these attempts, with
                        // the request; plan from that.
                        continue;
                    }
                }
                Plan::Wait(until) => {
                    turn.awaits_until = turn.awaited(definition);
                    turn.awaits_child = turn.awaiting_child();
                    return self
                        .commit(&mut turn, fence, Lease::Release(Some(until)))
                        .await
                        .map(drop);
                }
                Plan::Idle => {
                    turn.awaits_child = turn.awaiting_child();
                    return self
                        .commit(&mut turn, fence, Lease::Release(None))
                        .await
                        .map(drop);
                }
            }
        }
    }

    /// Writes the turn, and starts the next one from what was written.
    /// Nothing is written, and the saga's row comes back for its requests,
    /// if the turn began attempts that a request accepted since the saga
    /// was read must come before (see [`Written::Interrupted`]).
    async fn commit(
        &self,
        turn: &mut Turn,
        fence: i64,
        lease: Lease,
    ) -> Result<Written, WriteError> {
        // A parent's turn locks its row, then a child's (asking it to
        // compensate); a child's last turn locks its row, then its
        // parent's (waking it): at once, PostgreSQL breaks the deadlock by
        // failing one, which is written again (the turn is as it was).
        let mut tries = 0;
        let written = loop {
            tries += 1;
            match store::write(&self.pool, fence, turn, lease, self.events()).await {
                Err(WriteError::Unexpected(error)) if tries < 3 && store::is_deadlock(&error) => {
                    tracing::debug!("a turn's write met a deadlock; writing it again");
                }
                written => break written?,
            }
        };
        if let Written::Committed(instance) = &written {
            turn.saga.instance = (**instance).clone();
            for count in turn.committed() {
                count_committed(&turn.saga.instance.saga_type, count);
            }
        }
        Ok(written)
    }

    /// One attempt of each of `names`, in parallel: written ahead with the
    /// turn so far, run with their time limits, and their outcomes added to
    /// the next turn. Returns false, having begun nothing, if a compensation
    /// request was accepted since the saga was read (the turn was rolled
    /// back).
    async fn attempt(
        &self,
        definition: &SagaDefinition,
        turn: &mut Turn,
        fence: i64,
        kind: Kind,
        names: &[&'static str],
    ) -> Result<bool, WriteError> {
        let forward = kind == Kind::Action && turn.saga.instance.state == SagaState::Running;
        let steps: Vec<(&Step, StepClass)> = names
            .iter()
            .filter_map(|name| definition.step(name))
            .map(|(index, step)| (step, definition.class(index)))
            .collect();
        // The pivot and the steps after it never give up, and neither does
        // asking again whether an action took effect: their deadline only
        // flags them, and bounds neither their attempts nor their time.
        let persistent = |class: StepClass| {
            class != StepClass::Compensatable || (kind == Kind::Action && !forward)
        };
        // A step with nothing to do (it exists to be compensated) takes no
        // effect, so it needs no write-ahead: it succeeds in this turn.
        let acts = |step: &Step| match kind {
            Kind::Action => step.action.is_some(),
            Kind::Compensation => step.compensation.is_some(),
        };
        let acting = steps.iter().any(|(step, _)| acts(step));
        // The turn as it stands before these attempts, to go back to if a
        // request must come first: what it has recorded so far (an attempt
        // that finished, say) is then written with the request's outcome.
        let before = acting.then(|| turn.clone());
        let now = Utc::now();
        let started: Vec<(u32, Option<DateTime<Utc>>)> = steps
            .iter()
            .map(|(step, _)| turn.begin(step, kind, now))
            .collect();

        if let Some(mut before) = before {
            // Write ahead: after a crash, the next owner knows these
            // attempts were made and may have had an effect.
            turn.begins_forward = forward;
            turn.begins_attempts = true;
            turn.begins_pivot =
                forward && steps.iter().any(|(_, class)| *class == StepClass::Pivot);
            if let Written::Interrupted(row) = self
                .commit(turn, fence, Lease::Keep(self.config.lease))
                .await?
            {
                before.saga.instance.compensation_requested = row.compensation_requested;
                before.saga.instance.pause_requested_at = row.pause_requested_at;
                *turn = before;
                return Ok(false);
            }
        }

        let saga = &turn.saga;
        let outputs = saga.outputs(Kind::Action);
        let compensation_outputs = saga.outputs(Kind::Compensation);
        let failed_actions = saga.failed_actions();
        let runs = steps
            .iter()
            .zip(&started)
            .map(|((step, class), (attempt, deadline_at))| {
                let limit = match kind {
                    Kind::Action => step.attempt_timeout,
                    Kind::Compensation => step.compensation_attempt_timeout,
                };
                let time_left = deadline_at
                    .filter(|_| !persistent(*class))
                    .map(|deadline| (deadline - Utc::now()).to_std().unwrap_or_default())
                    .map_or(limit, |left| left.min(limit));
                let context = StepContext {
                    saga_id: saga.instance.saga_id,
                    step: step.name,
                    data: saga.instance.data.0.clone(),
                    outputs: outputs.clone(),
                    compensation_outputs: compensation_outputs.clone(),
                    failed_actions: failed_actions.clone(),
                    failure_reason: saga.instance.failure_reason.clone(),
                    attempt: *attempt,
                    time_left,
                    correlation_id: saga.instance.correlation_id.clone(),
                    request_id: attempt_id(saga.instance.saga_id, step.name, kind, *attempt),
                };
                let action = match kind {
                    Kind::Action => step.action.clone(),
                    Kind::Compensation => step.compensation.clone(),
                };
                let span = tracing::info_span!(
                    "saga.step",
                    otel.name = format!("{} {} {}", definition.name, step.name, kind.as_str()),
                    saga.step = step.name,
                    saga.kind = kind.as_str(),
                    saga.attempt = *attempt,
                );
                async move {
                    let started = std::time::Instant::now();
                    let outcome = match action {
                        None => Ok(serde_json::Value::Null),
                        Some(action) => {
                            match tokio::time::timeout(time_left, action.run(&context)).await {
                                Ok(outcome) => outcome,
                                Err(_) => Err(StepError::Unknown(format!(
                                    "attempt timed out after {time_left:?}"
                                ))),
                            }
                        }
                    };
                    (outcome, started.elapsed())
                }
                .instrument(span)
            });
        let outcomes = futures::future::join_all(runs).await;

        let now = Utc::now();
        for (((step, class), (attempt, deadline_at)), (outcome, took)) in
            steps.iter().zip(&started).zip(outcomes)
        {
            if *class == StepClass::Pivot && matches!(outcome, Err(StepError::Permanent(_))) {
                // Refused for certain: the pivot did not take effect.
                turn.pivot_refused();
            }
            turn.outcome(
                step,
                kind,
                persistent(*class),
                *attempt,
                *deadline_at,
                outcome,
                took,
                now,
            );
        }
        Ok(true)
    }
}

/// A saga being terminated and every saga under it, as read under their
/// locks: parents before their children.
struct Family {
    root: SagaRecord,
    under: Vec<SagaRecord>,
}

impl Family {
    fn of(root: SagaRecord, under: Vec<SagaRecord>) -> Self {
        Self { root, under }
    }

    fn get(&self, saga_id: Uuid) -> Option<&SagaRecord> {
        std::iter::once(&self.root)
            .chain(&self.under)
            .find(|saga| saga.instance.saga_id == saga_id)
    }

    /// The children `parent`'s steps started, in the order they started.
    fn children_of(&self, parent: Uuid) -> impl Iterator<Item = &SagaRecord> {
        self.under
            .iter()
            .filter(move |child| child.instance.parent_saga_id == Some(parent))
    }

    /// The path of steps from the root that started `saga`: `refund`, or
    /// `refund/void-child` a level deeper.
    fn path(&self, saga: &SagaRecord) -> String {
        let step = saga.instance.parent_step.as_deref().unwrap_or("?");
        match saga
            .instance
            .parent_saga_id
            .filter(|parent| *parent != self.root.instance.saga_id)
            .and_then(|parent| self.get(parent))
        {
            Some(parent) => format!("{}/{step}", self.path(parent)),
            None => step.to_owned(),
        }
    }
}

/// A duration as an operator reads it, to the second.
fn humantime_secs(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

/// Sends a failed saga (locked) back to `state`, running or compensating:
/// the executions that failed in that direction get a fresh retry budget,
/// and the saga a new fence.
async fn reopen(conn: &mut PgConnection, saga: &Locked, state: SagaState) -> anyhow::Result<()> {
    let kind = match state {
        SagaState::Running => Kind::Action,
        _ => Kind::Compensation,
    };
    store::reopen(conn, saga, state, kind).await
}

/// Counts what a turn did, once it is written.
fn count_committed(saga: &str, count: Count) {
    let saga = saga.to_owned();
    match count {
        Count::Finished(state) => {
            metrics::counter!("sagas_finished_total", "saga" => saga, "state" => state.as_str())
                .increment(1);
        }
        Count::CompensationStarted => {
            metrics::counter!("saga_compensations_started_total", "saga" => saga).increment(1);
        }
        Count::Paused => {
            metrics::counter!("saga_pauses_total", "saga" => saga).increment(1);
        }
        Count::Overdue(step) => {
            metrics::counter!("saga_steps_overdue_total", "saga" => saga, "step" => step)
                .increment(1);
        }
        Count::PastDeadline(step, kind) => {
            metrics::counter!("saga_step_failures_total", "step" => step, "kind" => kind.as_str(), "reason" => "deadline")
                .increment(1);
        }
    }
}
