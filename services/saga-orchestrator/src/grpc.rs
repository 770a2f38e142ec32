//! The operators' view and controls of sagas (SagaService).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api_saga::v1 as pb;
use api_saga::v1::saga_service_server::SagaService;
use chrono::{DateTime, Utc};
use saga_engine::store::{self, ListCursor, SagaFilter};
use saga_engine::{Engine, NewSignal, SagaDefinition, SagaRecord, SagaState};
use service_runtime::fields;
use service_runtime::paging::{Cursor, PageRequest};
use service_runtime::status::{self, FieldViolations};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::operator::{self, MAX_REASON_CHARS, Refused, TerminationReason};
use crate::order_saga::SAGA_TYPE;

/// Longest `older_than`: a century (no saga is older), which keeps
/// `now - older_than` a timestamp that chrono and PostgreSQL both hold.
const MAX_OLDER_THAN: Duration = Duration::from_secs(100 * 31_557_600);
/// Shortest failure-reason fragment a search takes: the trigram index
/// narrows nothing down with fewer.
const MIN_FRAGMENT_CHARS: usize = 3;
const MAX_FRAGMENT_CHARS: usize = 200;
/// Longest saga type or customer id a search takes.
const MAX_NAME_CHARS: usize = 200;
/// Longest signal name and signal id.
const MAX_SIGNAL_CHARS: usize = 200;
/// Largest signal payload, in bytes of JSON text.
const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub(crate) struct SagaApi {
    pub(crate) engine: Arc<Engine>,
}

#[tonic::async_trait]
impl SagaService for SagaApi {
    async fn get_saga_status(
        &self,
        request: Request<pb::GetSagaStatusRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let pool = self.engine.pool();
        let lookup = request.into_inner().lookup;
        let lookup =
            parse_lookup(lookup).map_err(|(field, reason)| status::invalid_field(field, reason))?;
        let found = find(pool, lookup).await?;
        let saga = match found {
            Some(saga_id) => store::load(pool, saga_id)
                .await
                .map_err(|e| status::internal(&e))?,
            None => None,
        };
        let Some(saga) = saga else {
            return Err(Status::not_found("no such saga"));
        };
        let carried = self.carried().await?;
        let mut answer = self.to_proto(&saga, &carried);
        answer.children = store::children(pool, &[saga.instance.saga_id])
            .await
            .map_err(|e| status::internal(&e))?
            .into_iter()
            .map(|child| pb::ChildSaga {
                saga_id: child.saga_id.to_string(),
                saga_type: child.saga_type,
                step: child.parent_step,
                state: child.state.to_proto().into(),
            })
            .collect();
        Ok(Response::new(answer))
    }

    async fn list_active_sagas(
        &self,
        request: Request<pb::ListActiveSagasRequest>,
    ) -> Result<Response<pb::ListActiveSagasResponse>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let page = PageRequest::parse(&mut violations, request.page_size, &request.page_token);
        let mut states = Vec::new();
        let mut unknown = false;
        for state in &request.states {
            match pb::SagaState::try_from(*state)
                .ok()
                .and_then(SagaState::from_proto)
            {
                Some(state) if !states.contains(&state) => states.push(state),
                Some(_) => {}
                None => unknown = true,
            }
        }
        // Once, however many: the answer must not grow with the request.
        if unknown {
            violations.add("states", "contains an unknown state");
        }
        if states.is_empty() {
            states = vec![
                SagaState::Running,
                SagaState::Compensating,
                SagaState::Paused,
                SagaState::Failed,
            ];
        }
        let older_than = request
            .older_than
            .map_or(Some(Duration::ZERO), |older_than| {
                violations.duration("older_than", &older_than, MAX_OLDER_THAN)
            });
        violations.into_result()?;
        // Within a century of now: no overflow, and a timestamp PostgreSQL holds.
        let older_than = older_than
            .and_then(|older_than| chrono::Duration::from_std(older_than).ok())
            .unwrap_or_default();
        let started_before = Utc::now() - older_than;
        let mut instances = store::list(
            self.engine.pool(),
            &states,
            started_before,
            page.after.map(|after| ListCursor {
                created_at: after.at,
                saga_id: after.id,
            }),
            page.limit(),
        )
        .await
        .map_err(|e| status::internal(&e))?;
        let next_page_token = page.finish(&mut instances, |instance| Cursor {
            at: instance.created_at,
            id: instance.saga_id,
        });
        let sagas = self.summaries(instances).await?;
        Ok(Response::new(pb::ListActiveSagasResponse {
            sagas,
            next_page_token,
        }))
    }

    async fn retry_saga(
        &self,
        request: Request<pb::RetrySagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let saga_id = parse_uuid("saga_id", &request.get_ref().saga_id)?;
        let saga = operator::retry(&self.engine, saga_id).await?;
        Ok(Response::new(self.answer(&saga).await?))
    }

    async fn compensate_saga(
        &self,
        request: Request<pb::CompensateSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let request = request.into_inner();
        let saga_id = parse_uuid("saga_id", &request.saga_id)?;
        fields::text(&request.reason, MAX_REASON_CHARS)
            .map_err(|error| status::invalid_field("reason", error.to_string()))?;
        let saga = operator::compensate(&self.engine, saga_id, &request.reason).await?;
        Ok(Response::new(self.answer(&saga).await?))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let (instances, next_page_token) = search(&self.engine, &request.into_inner()).await?;
        let sagas = self.summaries(instances).await?;
        Ok(Response::new(pb::ListSagasResponse {
            sagas,
            next_page_token,
        }))
    }

    async fn pause_saga(
        &self,
        request: Request<pb::PauseSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let saga_id = parse_uuid("saga_id", &request.get_ref().saga_id)?;
        let saga = operator::pause(&self.engine, saga_id).await?;
        Ok(Response::new(self.answer(&saga).await?))
    }

    async fn resume_saga(
        &self,
        request: Request<pb::ResumeSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let saga_id = parse_uuid("saga_id", &request.get_ref().saga_id)?;
        let saga = operator::resume(&self.engine, saga_id).await?;
        Ok(Response::new(self.answer(&saga).await?))
    }

    async fn terminate_saga(
        &self,
        request: Request<pb::TerminateSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let saga_id = Uuid::parse_str(&request.saga_id)
            .map_err(|_| violations.add("saga_id", "must be a UUID"))
            .ok();
        let reason = TerminationReason::parse(&request.reason)
            .map_err(|reason| violations.add("reason", reason))
            .ok();
        violations.into_result()?;
        let (Some(saga_id), Some(reason)) = (saga_id, reason) else {
            unreachable!("no violations, so both parsed");
        };
        let saga = operator::terminate(&self.engine, saga_id, &reason, request.acknowledge_effects)
            .await?;
        Ok(Response::new(self.answer(&saga).await?))
    }

    async fn signal_saga(
        &self,
        request: Request<pb::SignalSagaRequest>,
    ) -> Result<Response<pb::SignalSagaResponse>, Status> {
        use pb::get_saga_status_request::Lookup as By;
        use pb::signal_saga_request::Lookup;
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        // The same keys as GetSagaStatus's.
        let lookup = request.lookup.map(|lookup| match lookup {
            Lookup::SagaId(id) => By::SagaId(id),
            Lookup::OrderId(id) => By::OrderId(id),
            Lookup::CorrelationId(id) => By::CorrelationId(id),
        });
        let lookup = parse_lookup(lookup)
            .map_err(|(field, reason)| violations.add(field, reason))
            .ok();
        let mut name = |field: &str, text: &str| {
            if text.trim().is_empty() {
                violations.add(field, "is required");
                return None;
            }
            violations
                .text(field, text, MAX_SIGNAL_CHARS)
                .map(str::to_owned)
        };
        let signal = name("signal", &request.signal);
        let signal_id = name("signal_id", &request.signal_id);
        let payload = if request.payload.is_empty() {
            Some(serde_json::Value::Null)
        } else if request.payload.len() > MAX_PAYLOAD_BYTES {
            violations.add(
                "payload",
                format!("must be at most {MAX_PAYLOAD_BYTES} bytes"),
            );
            None
        } else {
            match serde_json::from_str::<serde_json::Value>(&request.payload) {
                // PostgreSQL's JSONB holds no NUL (\u0000): refused here,
                // not failed there.
                Ok(payload) if has_nul(&payload) => {
                    violations.add("payload", "must not contain NUL characters (\\u0000)");
                    None
                }
                Ok(payload) => Some(payload),
                Err(error) => {
                    violations.add("payload", format!("is not JSON: {error}"));
                    None
                }
            }
        };
        violations.into_result()?;
        let (Some(lookup), Some(signal), Some(signal_id), Some(payload)) =
            (lookup, signal, signal_id, payload)
        else {
            unreachable!("no violations, so every field parsed");
        };
        let saga_id = find(self.engine.pool(), lookup)
            .await?
            .ok_or_else(|| Status::not_found("no such saga"))?;
        let kept = operator::signal(
            &self.engine,
            saga_id,
            NewSignal {
                signal: &signal,
                signal_id: &signal_id,
                payload: &payload,
            },
        )
        .await?;
        Ok(Response::new(pb::SignalSagaResponse {
            saga_id: saga_id.to_string(),
            signal: kept.signal,
            signal_id: kept.signal_id,
            payload: kept.payload.0.to_string(),
            received_at: Some(timestamp(kept.received_at)),
        }))
    }
}

/// Whether any string or key of `value` contains a NUL character.
fn has_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(text) => text.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(has_nul),
        serde_json::Value::Object(fields) => fields
            .iter()
            .any(|(key, value)| key.contains('\0') || has_nul(value)),
        _ => false,
    }
}

/// A lookup whose key is well formed: a saga's id, its order's, or its
/// flow's.
enum Lookup {
    Saga(Uuid),
    Order(Uuid),
    Correlation(telemetry::CorrelationId),
}

fn parse_lookup(
    lookup: Option<pb::get_saga_status_request::Lookup>,
) -> Result<Lookup, (&'static str, String)> {
    use pb::get_saga_status_request::Lookup as By;
    let uuid = |field, text: &str| fields::uuid(text).map_err(|reason| (field, reason.to_owned()));
    Ok(match lookup {
        None => {
            return Err((
                "lookup",
                "set one of saga_id, order_id, correlation_id".to_owned(),
            ));
        }
        Some(By::SagaId(id)) => Lookup::Saga(uuid("saga_id", &id)?),
        Some(By::OrderId(id)) => Lookup::Order(uuid("order_id", &id)?),
        Some(By::CorrelationId(id)) => Lookup::Correlation(
            fields::correlation_id(&id).map_err(|reason| ("correlation_id", reason.to_owned()))?,
        ),
    })
}

/// The id of the saga a lookup names, if any.
async fn find(pool: &sqlx::PgPool, lookup: Lookup) -> Result<Option<Uuid>, Status> {
    match lookup {
        Lookup::Saga(id) => Ok(Some(id)),
        Lookup::Order(order_id) => {
            store::find_by_business_key(pool, SAGA_TYPE, &order_id.to_string()).await
        }
        Lookup::Correlation(id) => store::find_by_correlation(pool, id.as_str()).await,
    }
    .map_err(|e| status::internal(&e))
}

/// The page of sagas a ListSagas request asks for, and the next page's
/// token; the dashboard's search calls it too.
pub(crate) async fn search(
    engine: &Engine,
    request: &pb::ListSagasRequest,
) -> Result<(Vec<store::Instance>, String), Status> {
    let (filter, page) = search_of(request)?;
    let mut instances = store::search(
        engine.pool(),
        &filter,
        page.after.map(|after| ListCursor {
            created_at: after.at,
            saga_id: after.id,
        }),
        page.limit(),
    )
    .await
    .map_err(|e| status::internal(&e))?;
    let next_page_token = page.finish(&mut instances, |last| Cursor {
        at: last.created_at,
        id: last.saga_id,
    });
    Ok((instances, next_page_token))
}

/// Every refusal on purpose: what the saga's state or history forbids is
/// FAILED_PRECONDITION, with the reason; the rest is INTERNAL.
impl From<Refused> for Status {
    fn from(refused: Refused) -> Self {
        match refused {
            Refused::NotFound => Status::not_found("no such saga"),
            Refused::Unexpected(error) => status::internal(&error),
            refusal @ Refused::UnknownSignal { .. } => {
                status::invalid_field("signal", refusal.to_string())
            }
            refusal @ Refused::SignalIdReused(_) => Status::already_exists(refusal.to_string()),
            refusal @ (Refused::InState { .. }
            | Refused::ForwardOnly { .. }
            | Refused::EffectsNotAcknowledged(_)
            | Refused::ChildCannotBeTerminated { .. }
            | Refused::UnknownVersion { .. }
            | Refused::NoLongerAwaited(_)) => Status::failed_precondition(refusal.to_string()),
        }
    }
}

/// The search a ListSagas request asks for, and its page; every field that
/// is wrong is named.
fn search_of(request: &pb::ListSagasRequest) -> Result<(SagaFilter, PageRequest), Status> {
    let mut violations = FieldViolations::new();
    let page = PageRequest::parse(&mut violations, request.page_size, &request.page_token);
    let mut filter = SagaFilter::default();
    let mut unknown = false;
    for state in &request.states {
        match pb::SagaState::try_from(*state)
            .ok()
            .and_then(SagaState::from_proto)
        {
            Some(state) if !filter.states.contains(&state) => filter.states.push(state),
            Some(_) => {}
            None => unknown = true,
        }
    }
    // Once, however many: the answer must not grow with the request.
    if unknown {
        violations.add("states", "contains an unknown state");
    }
    if !request.saga_type.is_empty() {
        filter.saga_type = violations
            .text("saga_type", &request.saga_type, MAX_NAME_CHARS)
            .map(str::to_owned);
    }
    let mut range =
        |(after_field, after): (&str, Option<prost_types::Timestamp>),
         (before_field, before): (&str, Option<prost_types::Timestamp>)| {
            let after = after.and_then(|at| instant(&mut violations, after_field, &at));
            let before = before.and_then(|at| instant(&mut violations, before_field, &at));
            if let (Some(after), Some(before)) = (after, before)
                && after > before
            {
                violations.add(after_field, format!("must not be after {before_field}"));
            }
            (after, before)
        };
    (filter.created_after, filter.created_before) = range(
        ("created_after", request.created_after),
        ("created_before", request.created_before),
    );
    (filter.finished_after, filter.finished_before) = range(
        ("finished_after", request.finished_after),
        ("finished_before", request.finished_before),
    );
    if !request.failure_reason_contains.is_empty() {
        let fragment = &request.failure_reason_contains;
        let chars = fragment.chars().count();
        if chars < MIN_FRAGMENT_CHARS {
            violations.add(
                "failure_reason_contains",
                format!("must be at least {MIN_FRAGMENT_CHARS} characters"),
            );
        } else if let Some(fragment) =
            violations.text("failure_reason_contains", fragment, MAX_FRAGMENT_CHARS)
        {
            filter.failure_reason_contains = Some(fragment.to_owned());
        }
    }
    let mut uuid = |field: &str, text: &str| {
        (!text.is_empty())
            .then(|| {
                Uuid::parse_str(text)
                    .map_err(|_| violations.add(field, "must be a UUID"))
                    .ok()
            })
            .flatten()
            .map(|id| id.to_string())
    };
    filter.business_key = uuid("order_id", &request.order_id);
    filter.customer_id = uuid("customer_id", &request.customer_id);
    filter.stuck_only = request.stuck_only;
    filter.unknown_version_only = request.unknown_version_only;
    if request.version != 0 {
        if request.saga_type.is_empty() {
            violations.add(
                "version",
                "needs saga_type: a version is a version of one saga type",
            );
        }
        match i32::try_from(request.version) {
            Ok(version) => filter.version = Some(version),
            Err(_) => violations.add("version", "is too large"),
        }
    }
    violations.into_result()?;
    Ok((filter, page))
}

/// A timestamp PostgreSQL can hold, or a violation of `field`.
fn instant(
    violations: &mut FieldViolations,
    field: &str,
    at: &prost_types::Timestamp,
) -> Option<DateTime<Utc>> {
    let micros = at
        .seconds
        .checked_mul(1_000_000)
        .and_then(|micros| micros.checked_add(i64::from(at.nanos / 1000)))
        .filter(|micros| {
            fields::TIMESTAMP_MICROS.contains(micros) && (0..1_000_000_000).contains(&at.nanos)
        });
    match micros.and_then(DateTime::from_timestamp_micros) {
        Some(at) => Some(at),
        None => {
            violations.add(field, "must be a valid timestamp between years 1 and 9999");
            None
        }
    }
}

impl SagaApi {
    /// The definitions live replicas carry.
    async fn carried(&self) -> Result<Carried, Status> {
        carried(&self.engine)
            .await
            .map_err(|e| status::internal(&e))
    }

    /// Sagas for a listing: each without its step log.
    async fn summaries(&self, instances: Vec<store::Instance>) -> Result<Vec<pb::Saga>, Status> {
        let carried = self.carried().await?;
        Ok(instances
            .into_iter()
            .map(|instance| {
                self.to_proto(
                    &SagaRecord {
                        instance,
                        steps: vec![],
                    },
                    &carried,
                )
            })
            .collect())
    }

    /// An operator action's answer: the saga as it then is.
    async fn answer(&self, saga: &SagaRecord) -> Result<pb::Saga, Status> {
        let carried = self.carried().await?;
        Ok(self.to_proto(saga, &carried))
    }

    /// The saga for the wire, with what its definition says of it.
    fn to_proto(&self, saga: &SagaRecord, carried: &Carried) -> pb::Saga {
        let instance = &saga.instance;
        let definition = self
            .engine
            .definition(&instance.saga_type, instance.version);
        to_proto(saga, definition, carried.carries(instance))
    }
}

/// Which definitions (type, version) live replicas carry.
pub(crate) struct Carried(Vec<(String, i32)>);

impl Carried {
    pub(crate) fn carries(&self, instance: &store::Instance) -> bool {
        self.0
            .iter()
            .any(|(t, v)| *t == instance.saga_type && *v == instance.version)
    }
}

pub(crate) async fn carried(engine: &Engine) -> anyhow::Result<Carried> {
    Ok(Carried(store::carried_definitions(engine.pool()).await?))
}

fn parse_uuid(field: &str, text: &str) -> Result<Uuid, Status> {
    status::parse_field(field, fields::uuid(text))
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    SystemTime::from(at).into()
}

/// A step waiting for its signal: its name, and when the wait times out.
pub(crate) fn waiting_for(
    definition: Option<&SagaDefinition>,
    step: &saga_engine::StepRecord,
) -> Option<(&'static str, Option<DateTime<Utc>>)> {
    let (_, defined) = definition?.step(&step.step)?;
    let wait = defined.wait.as_ref()?;
    let until = (step.status == saga_engine::StepStatus::Waiting)
        .then_some(step.deadline_at)
        .flatten();
    Some((wait.signal, until))
}

/// `carried`: whether a live replica carries the saga's definition version.
pub(crate) fn to_proto(
    saga: &SagaRecord,
    definition: Option<&SagaDefinition>,
    carried: bool,
) -> pb::Saga {
    let instance = &saga.instance;
    let pivot = definition.and_then(|definition| definition.pivot);
    let state = instance.state;
    let waiting = if state.is_driven() || state == SagaState::Paused {
        saga.steps
            .iter()
            .filter_map(|step| waiting_for(definition, step))
            .find_map(|(signal, until)| until.map(|until| (signal, until)))
    } else {
        None
    };
    // The step running or compensating now: the last one begun, unfinished.
    let current_step = if state.is_final() {
        String::new()
    } else {
        saga.steps
            .iter()
            .rev()
            .find(|s| s.finished_at.is_none())
            .map(|s| s.step.clone())
            .unwrap_or_default()
    };
    pb::Saga {
        saga_id: instance.saga_id.to_string(),
        saga_type: instance.saga_type.clone(),
        order_id: instance.business_key.clone(),
        correlation_id: instance.correlation_id.clone(),
        state: state.to_proto().into(),
        current_step,
        failure_reason: instance.failure_reason.clone().unwrap_or_default(),
        started_at: Some(timestamp(instance.created_at)),
        updated_at: Some(timestamp(instance.updated_at)),
        finished_at: instance.finished_at.map(timestamp),
        pivot_step: pivot.unwrap_or_default().to_owned(),
        forward_only_since: instance.forward_only_since.map(timestamp),
        overdue_step: instance.overdue_step.clone().unwrap_or_default(),
        overdue_since: instance.overdue_since.map(timestamp),
        pause_requested: instance.pause_requested_at.is_some(),
        paused_at: instance.paused_at.map(timestamp),
        resumes_to: instance
            .paused_from
            .map_or(pb::SagaState::Unspecified, SagaState::to_proto)
            .into(),
        steps_left_in_effect: instance.left_in_effect.clone().unwrap_or_default(),
        stuck_since: instance.stuck_since.map(timestamp),
        stuck_reason: instance.stuck_reason.clone().unwrap_or_default(),
        customer_id: instance
            .data
            .0
            .get("customer_id")
            .and_then(|id| id.as_str())
            .unwrap_or_default()
            .to_owned(),
        version: u32::try_from(instance.version).unwrap_or_default(),
        parent_saga_id: instance
            .parent_saga_id
            .map(|id| id.to_string())
            .unwrap_or_default(),
        parent_step: instance.parent_step.clone().unwrap_or_default(),
        children: Vec::new(),
        version_unknown: !carried && !state.is_final(),
        waiting_for_signal: waiting
            .map(|(signal, _)| signal.to_owned())
            .unwrap_or_default(),
        waiting_until: waiting.map(|(_, until)| timestamp(until)),
        steps: saga
            .steps
            .iter()
            .map(|step| {
                let wait = waiting_for(definition, step);
                use pb::step_execution::{Kind, Status};
                let status = match step.status {
                    saga_engine::StepStatus::Running => Status::Running,
                    saga_engine::StepStatus::Waiting => Status::Pending,
                    saga_engine::StepStatus::Succeeded => Status::Succeeded,
                    saga_engine::StepStatus::Failed => Status::Failed,
                    saga_engine::StepStatus::Skipped => Status::Skipped,
                };
                let kind = match step.kind {
                    saga_engine::Kind::Action => Kind::Action,
                    saga_engine::Kind::Compensation => Kind::Compensation,
                };
                let end = step.finished_at.unwrap_or_else(Utc::now);
                pb::StepExecution {
                    step: step.step.clone(),
                    kind: kind.into(),
                    status: status.into(),
                    attempts: u32::try_from(step.attempts).unwrap_or_default(),
                    last_error: step.last_error.clone().unwrap_or_default(),
                    started_at: Some(timestamp(step.started_at)),
                    finished_at: step.finished_at.map(timestamp),
                    duration: (end - step.started_at)
                        .to_std()
                        .ok()
                        .and_then(|d| prost_types::Duration::try_from(d).ok()),
                    outcome_unknown: step.outcome_unknown(),
                    signal: wait
                        .map(|(signal, _)| signal.to_owned())
                        .unwrap_or_default(),
                    waiting_until: wait.and_then(|(_, until)| until).map(timestamp),
                }
            })
            .collect(),
    }
}
