//! The operators' view and controls of sagas (SagaService).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use api_saga::v1 as pb;
use api_saga::v1::saga_service_server::SagaService;
use chrono::{DateTime, Utc};
use saga_engine::store::{self, ListCursor};
use saga_engine::{Engine, RequestOutcome, SagaRecord, SagaState};
use service_runtime::fields;
use service_runtime::paging::{Cursor, PageRequest};
use service_runtime::status::{self, FieldViolations};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::order_saga::SAGA_TYPE;

/// Longest `older_than`: a century (no saga is older), which keeps
/// `now - older_than` a timestamp that chrono and PostgreSQL both hold.
const MAX_OLDER_THAN: Duration = Duration::from_secs(100 * 31_557_600);
/// Longest operator's reason for a compensation.
const MAX_REASON_CHARS: usize = 500;

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
                .and_then(state_from_proto)
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
        let sagas = instances
            .into_iter()
            .map(|instance| {
                self.to_proto(&SagaRecord {
                    instance,
                    steps: vec![],
                })
            })
            .collect();
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
        let mut tx = self
            .engine
            .pool()
            .begin()
            .await
            .map_err(|e| status::internal(&e.into()))?;
        let outcome = self
            .engine
            .retry(&mut tx, saga_id)
            .await
            .map_err(|e| status::internal(&e))?;
        tx.commit().await.map_err(|e| status::internal(&e.into()))?;
        self.answer(saga_id, outcome, "only a FAILED saga can be retried")
            .await
    }

    async fn compensate_saga(
        &self,
        request: Request<pb::CompensateSagaRequest>,
    ) -> Result<Response<pb::Saga>, Status> {
        let request = request.into_inner();
        let saga_id = parse_uuid("saga_id", &request.saga_id)?;
        fields::text(&request.reason, MAX_REASON_CHARS)
            .map_err(|error| status::invalid_field("reason", error.to_string()))?;
        let reason = if request.reason.trim().is_empty() {
            "compensated by an operator".to_owned()
        } else {
            format!("compensated by an operator: {}", request.reason.trim())
        };
        let mut tx = self
            .engine
            .pool()
            .begin()
            .await
            .map_err(|e| status::internal(&e.into()))?;
        let outcome = self
            .engine
            .request_compensation(&mut tx, saga_id, &reason)
            .await
            .map_err(|e| status::internal(&e))?;
        tx.commit().await.map_err(|e| status::internal(&e.into()))?;
        // Asking a compensating saga to compensate is a no-op, not an error.
        let outcome = match outcome {
            RequestOutcome::NotApplicable(SagaState::Compensating) => RequestOutcome::Accepted,
            other => other,
        };
        self.answer(saga_id, outcome, "the saga already finished")
            .await
    }
}

impl SagaApi {
    async fn answer(
        &self,
        saga_id: Uuid,
        outcome: RequestOutcome,
        refusal: &str,
    ) -> Result<Response<pb::Saga>, Status> {
        match outcome {
            RequestOutcome::NotFound => Err(Status::not_found("no such saga")),
            RequestOutcome::NotApplicable(state) => Err(Status::failed_precondition(format!(
                "{refusal}; it is {}",
                state.as_str()
            ))),
            RequestOutcome::ForwardOnly { pivot, since } => {
                Err(Status::failed_precondition(format!(
                    "the saga is past its pivot step {pivot} (attempted since {}): the order may be confirmed, so the saga only goes forward and cannot be compensated",
                    since.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
                )))
            }
            RequestOutcome::Accepted => {
                let saga = store::load(self.engine.pool(), saga_id)
                    .await
                    .map_err(|e| status::internal(&e))?;
                saga.map(|saga| Response::new(self.to_proto(&saga)))
                    .ok_or_else(|| Status::not_found("no such saga"))
            }
        }
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

fn state_from_proto(state: pb::SagaState) -> Option<SagaState> {
    Some(match state {
        pb::SagaState::Unspecified => return None,
        pb::SagaState::Running => SagaState::Running,
        pb::SagaState::Compensating => SagaState::Compensating,
        pb::SagaState::Completed => SagaState::Completed,
        pb::SagaState::Compensated => SagaState::Compensated,
        pb::SagaState::Failed => SagaState::Failed,
    })
}

fn state_to_proto(state: SagaState) -> pb::SagaState {
    match state {
        SagaState::Running => pb::SagaState::Running,
        SagaState::Compensating => pb::SagaState::Compensating,
        SagaState::Completed => pb::SagaState::Completed,
        SagaState::Compensated => pb::SagaState::Compensated,
        SagaState::Failed => pb::SagaState::Failed,
    }
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
        state: state_to_proto(state).into(),
        current_step,
        failure_reason: instance.failure_reason.clone().unwrap_or_default(),
        started_at: Some(timestamp(instance.created_at)),
        updated_at: Some(timestamp(instance.updated_at)),
        finished_at: instance.finished_at.map(timestamp),
        pivot_step: pivot.unwrap_or_default().to_owned(),
        forward_only_since: instance.forward_only_since.map(timestamp),
        overdue_step: instance.overdue_step.clone().unwrap_or_default(),
        overdue_since: instance.overdue_since.map(timestamp),
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
