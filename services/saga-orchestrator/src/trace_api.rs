//! TraceService: the trace view and the flows in progress, for operators.

use std::pin::Pin;
use std::time::SystemTime;

use api_trace::v1 as pb;
use api_trace::v1::trace_service_server::TraceService;
use chrono::{DateTime, Utc};
use futures::{Stream, StreamExt as _};
use service_runtime::fields;
use service_runtime::paging::{Cursor, PageRequest};
use service_runtime::status::{self, FieldViolations};
use sqlx::PgPool;
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::trace_view::{self, LiveFeed, TraceEventRow};

/// What StreamEvents may filter on.
const MAX_EVENT_TYPES: usize = 50;
const MAX_EVENT_TYPE_CHARS: usize = 200;

#[derive(Debug, Clone)]
pub(crate) struct TraceApi {
    pub(crate) pool: PgPool,
    pub(crate) feed: LiveFeed,
}

/// What StreamEvents answers with (the generated service's `BoxStream`).
type EventStream = Pin<Box<dyn Stream<Item = Result<pb::TraceEvent, Status>> + Send>>;

#[tonic::async_trait]
impl TraceService for TraceApi {
    async fn get_trace_by_correlation(
        &self,
        request: Request<pb::GetTraceByCorrelationRequest>,
    ) -> Result<Response<pb::Trace>, Status> {
        let correlation_id = fields::correlation_id(&request.get_ref().correlation_id)
            .map_err(|reason| status::invalid_field("correlation_id", reason))?;
        self.trace(correlation_id.as_str()).await
    }

    async fn get_trace_by_order(
        &self,
        request: Request<pb::GetTraceByOrderRequest>,
    ) -> Result<Response<pb::Trace>, Status> {
        let order_id = status::parse_field("order_id", fields::uuid(&request.get_ref().order_id))?;
        let correlation = trace_view::correlation_of_order(&self.pool, order_id)
            .await
            .map_err(|e| status::internal(&e))?
            .ok_or_else(|| Status::not_found("no event mentions that order"))?;
        self.trace(&correlation).await
    }

    async fn stream_events(
        &self,
        request: Request<pb::StreamEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let filter = request.into_inner();
        let mut violations = FieldViolations::new();
        // Only compared in memory, but held to the same rules as the
        // fields that reach the database: one rule per kind of field.
        if !filter.correlation_id.is_empty() {
            violations.correlation_id("correlation_id", &filter.correlation_id);
        }
        if filter.event_types.len() > MAX_EVENT_TYPES {
            violations.add(
                "event_types",
                format!("must be at most {MAX_EVENT_TYPES} types"),
            );
        } else if let Some((index, error)) =
            filter
                .event_types
                .iter()
                .enumerate()
                .find_map(|(index, t)| {
                    fields::text(t, MAX_EVENT_TYPE_CHARS)
                        .err()
                        .map(|error| (index, error))
                })
        {
            violations.add(format!("event_types[{index}]"), error.to_string());
        }
        violations.into_result()?;
        // Subscribed before answering: everything recorded from now on.
        let events = BroadcastStream::new(self.feed.subscribe()).filter_map(move |received| {
            let keep = received.ok().filter(|row| {
                (filter.correlation_id.is_empty() || row.correlation_id == filter.correlation_id)
                    && (filter.event_types.is_empty()
                        || filter.event_types.contains(&row.event_type))
            });
            async move { keep.map(|row| Ok(to_proto(&row, None, None))) }
        });
        Ok(Response::new(Box::pin(events)))
    }

    async fn list_active_flows(
        &self,
        request: Request<pb::ListActiveFlowsRequest>,
    ) -> Result<Response<pb::ListActiveFlowsResponse>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let page = PageRequest::parse(&mut violations, request.page_size, &request.page_token);
        violations.into_result()?;
        let mut flows = active_flows(&self.pool, page.after, page.limit())
            .await
            .map_err(|e| status::internal(&e))?;
        let next_page_token = page.finish(&mut flows, |flow| Cursor {
            at: flow.created_at,
            id: flow.saga_id,
        });
        let now = Utc::now();
        Ok(Response::new(pb::ListActiveFlowsResponse {
            flows: flows
                .into_iter()
                .map(|flow| pb::ActiveFlow {
                    saga_id: flow.saga_id.to_string(),
                    order_id: flow.business_key,
                    correlation_id: flow.correlation_id,
                    state: flow.state.to_uppercase(),
                    current_step: flow.current_step.unwrap_or_default(),
                    age: duration(now - flow.created_at),
                })
                .collect(),
            next_page_token,
        }))
    }
}

impl TraceApi {
    async fn trace(&self, correlation_id: &str) -> Result<Response<pb::Trace>, Status> {
        let rows = trace_view::by_correlation(&self.pool, correlation_id)
            .await
            .map_err(|e| status::internal(&e))?;
        let first = rows
            .first()
            .ok_or_else(|| Status::not_found("no event carries that correlation id"))?;
        let start = first.occurred_at;
        let order_id = rows
            .iter()
            .find_map(|row| row.order_id)
            .map(|id| id.to_string())
            .unwrap_or_default();
        let mut previous = start;
        let events = rows
            .iter()
            .map(|row| {
                let event = to_proto(row, Some(previous), Some(start));
                previous = row.occurred_at;
                event
            })
            .collect();
        let total = rows
            .last()
            .map_or(chrono::Duration::zero(), |last| last.occurred_at - start);
        Ok(Response::new(pb::Trace {
            correlation_id: correlation_id.to_owned(),
            order_id,
            events,
            total_duration: duration(total),
        }))
    }
}

/// A flow in progress: a saga not yet finished, with its current step.
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct ActiveFlow {
    pub(crate) saga_id: Uuid,
    pub(crate) business_key: String,
    pub(crate) correlation_id: String,
    pub(crate) state: String,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) current_step: Option<String>,
}

/// Sagas not finished, oldest first, after `cursor`.
pub(crate) async fn active_flows(
    pool: &PgPool,
    after: Option<Cursor>,
    limit: i64,
) -> anyhow::Result<Vec<ActiveFlow>> {
    Ok(sqlx::query_as(
        "SELECT i.saga_id, i.business_key, i.correlation_id, i.state, i.created_at,
                (SELECT s.step FROM saga_steps s WHERE s.saga_id = i.saga_id AND s.finished_at IS NULL
                 ORDER BY s.seq DESC LIMIT 1) AS current_step
         FROM saga_instances i
         WHERE i.state IN ('running', 'compensating', 'paused', 'failed')
           AND ($1::timestamptz IS NULL OR (i.created_at, i.saga_id) > ($1, $2))
         ORDER BY i.created_at, i.saga_id
         LIMIT $3",
    )
    .bind(after.map(|c| c.at))
    .bind(after.map(|c| c.id))
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

fn duration(span: chrono::Duration) -> Option<prost_types::Duration> {
    span.to_std()
        .ok()
        .and_then(|d| prost_types::Duration::try_from(d).ok())
}

pub(crate) fn to_proto(
    row: &TraceEventRow,
    previous: Option<DateTime<Utc>>,
    start: Option<DateTime<Utc>>,
) -> pb::TraceEvent {
    pb::TraceEvent {
        event_id: row.event_id.to_string(),
        service: row.service.clone(),
        event_type: row.event_type.clone(),
        aggregate_type: row.aggregate_type.clone(),
        aggregate_id: row.aggregate_id.clone(),
        correlation_id: row.correlation_id.clone(),
        causation_id: row.causation_id.clone().unwrap_or_default(),
        occurred_at: Some(SystemTime::from(row.occurred_at).into()),
        since_previous: previous.and_then(|at| duration(row.occurred_at - at)),
        since_start: start.and_then(|at| duration(row.occurred_at - at)),
        summary: row.summary.clone(),
    }
}
