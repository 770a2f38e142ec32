//! The operators' view and controls of sagas (SagaService).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api_saga::v1 as pb;
use api_saga::v1::saga_service_server::SagaService;
use chrono::{DateTime, Utc};
use saga_engine::store::{self, ListCursor, SagaFilter};
use saga_engine::{Engine, SagaRecord, SagaState};
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
        use pb::get_saga_status_request::Lookup;
        let pool = self.engine.pool();
        let found = match request.into_inner().lookup {
            None => {
                return Err(status::invalid_field(
                    "lookup",
                    "set one of saga_id, order_id, correlation_id",
                ));
            }
            Some(Lookup::SagaId(id)) => Some(parse_uuid("saga_id", &id)?),
            Some(Lookup::OrderId(id)) => {
                let order_id = parse_uuid("order_id", &id)?;
                store::find_by_business_key(pool, SAGA_TYPE, &order_id.to_string())
                    .await
                    .map_err(|e| status::internal(&e))?
            }
            Some(Lookup::CorrelationId(id)) => {
                let id = fields::correlation_id(&id)
                    .map_err(|reason| status::invalid_field("correlation_id", reason))?;
                store::find_by_correlation(pool, id.as_str())
                    .await
                    .map_err(|e| status::internal(&e))?
            }
        };
        let saga = match found {
            Some(saga_id) => store::load(pool, saga_id)
                .await
                .map_err(|e| status::internal(&e))?,
            None => None,
        };
        saga.map(|saga| Response::new(self.to_proto(&saga)))
            .ok_or_else(|| Status::not_found("no such saga"))
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
        let sagas = self.summaries(instances);
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
        Ok(Response::new(self.to_proto(&saga)))
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
        Ok(Response::new(self.to_proto(&saga)))
    }

    async fn list_sagas(
        &self,
        request: Request<pb::ListSagasRequest>,
    ) -> Result<Response<pb::ListSagasResponse>, Status> {
        let (instances, next_page_token) = search(&self.engine, &request.into_inner()).await?;
        let sagas = self.summaries(instances);
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
        Ok(Response::new(self.to_proto(&saga)))
    }

    async fn resume_saga(
        &self,
        request: Request<pb::ResumeSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let saga_id = parse_uuid("saga_id", &request.get_ref().saga_id)?;
        let saga = operator::resume(&self.engine, saga_id).await?;
        Ok(Response::new(self.to_proto(&saga)))
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
        Ok(Response::new(self.to_proto(&saga)))
    }
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
            refusal @ (Refused::InState { .. }
            | Refused::ForwardOnly { .. }
            | Refused::EffectsNotAcknowledged(_)) => {
                Status::failed_precondition(refusal.to_string())
            }
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
    /// Sagas for a listing: each without its step log.
    fn summaries(&self, instances: Vec<store::Instance>) -> Vec<pb::Saga> {
        instances
            .into_iter()
            .map(|instance| {
                self.to_proto(&SagaRecord {
                    instance,
                    steps: vec![],
                })
            })
            .collect()
    }

    /// The saga for the wire, with what its definition says of it.
    fn to_proto(&self, saga: &SagaRecord) -> pb::Saga {
        let pivot = self
            .engine
            .definition(&saga.instance.saga_type)
            .and_then(|definition| definition.pivot);
        to_proto(saga, pivot)
    }
}

fn parse_uuid(field: &str, text: &str) -> Result<Uuid, Status> {
    status::parse_field(field, fields::uuid(text))
}

fn timestamp(at: DateTime<Utc>) -> prost_types::Timestamp {
    SystemTime::from(at).into()
}

pub(crate) fn to_proto(saga: &SagaRecord, pivot: Option<&str>) -> pb::Saga {
    let instance = &saga.instance;
    let state = instance.state;
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
        steps: saga
            .steps
            .iter()
            .map(|step| {
                use pb::step_execution::{Kind, Status};
                let status = match step.status {
                    saga_engine::StepStatus::Running => Status::Running,
                    saga_engine::StepStatus::Waiting => Status::Pending,
                    saga_engine::StepStatus::Succeeded => Status::Succeeded,
                    saga_engine::StepStatus::Failed => Status::Failed,
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
                }
            })
            .collect(),
    }
}
