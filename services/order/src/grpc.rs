//! The gRPC face of the order service: requests are parsed into domain
//! values at the edge (every bad field named, nothing written), use cases
//! run, and their errors become statuses deliberately.

use std::time::SystemTime;

use access_control::Claims;
use api_order::v1 as pb;
use api_order::v1::order_service_server::OrderService;
use money::{Currency, Money, MoneyError};
use prost::Message as _;
use service_runtime::fields;
use service_runtime::paging::{Cursor, PageRequest};
use service_runtime::status::{self, FieldViolations};
use sha2::{Digest as _, Sha256};
use tonic::{Request, Response, Status};

use crate::app::{CommandError, CreateError, IdempotencyKey, NewOrder, Orders};
use crate::domain::{
    CustomerId, DomainError, LineItem, LinesError, OrderCommand, OrderId, OrderLines, OrderStatus,
    PaymentId, PaymentMethodToken, Quantity, Reason, Sku,
};
use crate::read_model::OrderView;

#[derive(Debug, Clone)]
pub(crate) struct OrderApi {
    pub(crate) orders: Orders,
}

#[tonic::async_trait]
impl OrderService for OrderApi {
    async fn create_order(
        &self,
        request: Request<pb::CreateOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let customer_id = customer(&request)?;
        let new_order = parse_create(customer_id, request.into_inner())?;
        let view = self.orders.create(new_order).await?;
        Ok(Response::new(to_proto(&view)))
    }

    async fn get_order(
        &self,
        request: Request<pb::GetOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let claims = access_control::caller(&request)?.clone();
        let order_id =
            status::parse_field("order_id", OrderId::parse(&request.get_ref().order_id))?;
        let view = self
            .orders
            .get(order_id)
            .await
            .map_err(|error| status::internal(&error))?;
        // Someone else's order does not exist, as far as this caller knows.
        match view {
            Some(view) if claims.is_admin() || view.customer_id.to_string() == claims.sub => {
                Ok(Response::new(to_proto(&view)))
            }
            _ => Err(Status::not_found("no such order")),
        }
    }

    async fn list_orders(
        &self,
        request: Request<pb::ListOrdersRequest>,
    ) -> Result<Response<pb::ListOrdersResponse>, Status> {
        let customer_id = customer(&request)?;
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let page = PageRequest::parse(&mut violations, request.page_size, &request.page_token);
        let status = match pb::OrderStatus::try_from(request.status) {
            Ok(pb::OrderStatus::Unspecified) => None,
            Ok(status) => Some(status_from_proto(status)),
            Err(_) => {
                violations.add("status", "is not an order status");
                None
            }
        };
        violations.into_result()?;
        let mut orders = self
            .orders
            .list(customer_id, status, page)
            .await
            .map_err(|error| status::internal(&error))?;
        let next_page_token = page.finish(&mut orders, |order| Cursor {
            at: order.created_at,
            id: order.order_id,
        });
        Ok(Response::new(pb::ListOrdersResponse {
            orders: orders.iter().map(to_proto).collect(),
            next_page_token,
        }))
    }

    async fn request_order_cancellation(
        &self,
        request: Request<pb::RequestOrderCancellationRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let customer_id = customer(&request)?;
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let order_id = violations.check("order_id", OrderId::parse(&request.order_id));
        let reason = violations.check(
            "reason",
            reason_text(&request.reason).and_then(Reason::parse_optional),
        );
        let (Some(order_id), Some(reason)) = (order_id, reason) else {
            return Err(violations.into_status());
        };
        self.command(
            order_id,
            OrderCommand::RequestCancellation {
                requested_by: customer_id,
                reason,
            },
        )
        .await
    }

    async fn confirm_order(
        &self,
        request: Request<pb::ConfirmOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let request = request.into_inner();
        let mut violations = FieldViolations::new();
        let order_id = violations.check("order_id", OrderId::parse(&request.order_id));
        let payment_id = violations.check("payment_id", PaymentId::parse(&request.payment_id));
        let (Some(order_id), Some(payment_id)) = (order_id, payment_id) else {
            return Err(violations.into_status());
        };
        self.command(order_id, OrderCommand::Confirm { payment_id })
            .await
    }

    async fn reject_order(
        &self,
        request: Request<pb::RejectOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let (order_id, reason) =
            parse_with_reason(&request.get_ref().order_id, &request.get_ref().reason)?;
        self.command(order_id, OrderCommand::Reject { reason })
            .await
    }

    async fn cancel_order(
        &self,
        request: Request<pb::CancelOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let (order_id, reason) =
            parse_with_reason(&request.get_ref().order_id, &request.get_ref().reason)?;
        self.command(order_id, OrderCommand::Cancel { reason })
            .await
    }

    async fn hold_order_for_review(
        &self,
        request: Request<pb::HoldOrderForReviewRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        self.command(order_id, OrderCommand::HoldForReview).await
    }

    async fn approve_order(
        &self,
        request: Request<pb::ApproveOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        self.command(order_id, OrderCommand::ApproveReview).await
    }

    async fn decline_order(
        &self,
        request: Request<pb::DeclineOrderRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let (order_id, reason) =
            parse_with_reason(&request.get_ref().order_id, &request.get_ref().reason)?;
        self.command(order_id, OrderCommand::DeclineReview { reason })
            .await
    }

    async fn request_return(
        &self,
        request: Request<pb::RequestReturnRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let claims = access_control::caller(&request)?.clone();
        // An admin may ask on a customer's behalf; a customer only for
        // their own orders (the aggregate checks).
        let requested_by = if claims.is_admin() {
            None
        } else {
            Some(customer(&request)?)
        };
        let (order_id, reason) =
            parse_with_reason(&request.get_ref().order_id, &request.get_ref().reason)?;
        self.command(
            order_id,
            OrderCommand::RequestReturn {
                requested_by,
                reason,
            },
        )
        .await
    }

    async fn mark_order_returned(
        &self,
        request: Request<pb::MarkOrderReturnedRequest>,
    ) -> Result<Response<pb::Order>, Status> {
        let order_id = parse_order_id(&request.get_ref().order_id)?;
        self.command(order_id, OrderCommand::MarkReturned).await
    }

    async fn rebuild_read_model(
        &self,
        _request: Request<pb::RebuildReadModelRequest>,
    ) -> Result<Response<pb::RebuildReadModelResponse>, Status> {
        let rebuilt = self
            .orders
            .rebuild_read_model()
            .await
            .map_err(|error| status::internal(&error))?;
        Ok(Response::new(pb::RebuildReadModelResponse {
            events_replayed: rebuilt.events,
            orders: rebuilt.orders,
        }))
    }
}

impl OrderApi {
    async fn command(
        &self,
        order_id: OrderId,
        command: OrderCommand,
    ) -> Result<Response<pb::Order>, Status> {
        let view = self.orders.handle(order_id, command).await?;
        Ok(Response::new(to_proto(&view)))
    }
}

// Each use case's errors become statuses here, each variant on purpose.

impl From<CreateError> for Status {
    fn from(error: CreateError) -> Self {
        match error {
            CreateError::KeyReused => status::key_reused(),
            CreateError::Unexpected(error) => status::internal(&error),
        }
    }
}

impl From<CommandError> for Status {
    fn from(error: CommandError) -> Self {
        match error {
            CommandError::Refused(DomainError::NotFound) => Status::not_found("no such order"),
            CommandError::Refused(refusal) => Status::failed_precondition(refusal.to_string()),
            CommandError::Conflict => {
                Status::aborted("the order kept changing concurrently; retry the request")
            }
            CommandError::Unexpected(error) => status::internal(&error),
        }
    }
}

/// The calling customer (or admin acting as one).
fn customer<T>(request: &Request<T>) -> Result<CustomerId, Status> {
    let claims: &Claims = access_control::caller(request)?;
    CustomerId::parse(&claims.sub)
        .map_err(|_| Status::permission_denied("the caller is not a user"))
}

fn parse_create(
    customer_id: CustomerId,
    request: pb::CreateOrderRequest,
) -> Result<NewOrder, Status> {
    let mut violations = FieldViolations::new();
    let key = violations.check(
        "idempotency_key",
        IdempotencyKey::parse(&request.idempotency_key),
    );
    let payment_method = violations.check(
        "payment_method_token",
        PaymentMethodToken::parse(&request.payment_method_token),
    );
    if request.items.is_empty() {
        violations.add("items", "an order needs at least one line");
    } else if request.items.len() > OrderLines::MAX_LINES {
        violations.add(
            "items",
            format!("an order has at most {} lines", OrderLines::MAX_LINES),
        );
    }
    let items: Vec<Option<LineItem>> = request
        .items
        .iter()
        .take(OrderLines::MAX_LINES)
        .enumerate()
        .map(|(index, item)| parse_item(&mut violations, index, item))
        .collect();
    let lines = if violations.is_empty() {
        let items = items.into_iter().flatten().collect();
        OrderLines::new(items)
            .map_err(|error| match error {
                LinesError::MixedCurrencies => {
                    violations.add("items", "every line must be in the same currency")
                }
                LinesError::TotalTooLarge => violations.add("items", "the total is too large"),
                LinesError::Empty | LinesError::TooMany => {
                    violations.add("items", error.to_string())
                }
            })
            .ok()
    } else {
        None
    };
    let (Some(key), Some(payment_method), Some(lines)) = (key, payment_method, lines) else {
        return Err(violations.into_status());
    };
    // The same key must come with the same request: hash what the customer
    // asked for (the protobuf encoding of the request without its key).
    let request_hash = Sha256::digest(
        pb::CreateOrderRequest {
            idempotency_key: String::new(),
            ..request
        }
        .encode_to_vec(),
    )
    .to_vec();
    Ok(NewOrder {
        customer_id,
        key,
        request_hash,
        lines,
        payment_method,
    })
}

fn parse_item(
    violations: &mut FieldViolations,
    index: usize,
    item: &pb::LineItem,
) -> Option<LineItem> {
    let field = |name: &str| format!("items[{index}].{name}");
    let sku = violations.check(&field("sku"), Sku::parse(&item.sku));
    let quantity = violations.check(&field("quantity"), Quantity::new(item.quantity));
    let unit_price = match &item.unit_price {
        None => {
            violations.add(field("unit_price"), "is required");
            None
        }
        Some(price) => match Currency::parse(&price.currency) {
            Err(error) => {
                violations.add(field("unit_price.currency"), error.to_string());
                None
            }
            Ok(currency) => Money::positive(price.amount_minor, currency)
                .map_err(|error: MoneyError| {
                    violations.add(field("unit_price.amount_minor"), error.to_string())
                })
                .ok(),
        },
    };
    Some(LineItem {
        sku: sku?,
        quantity: quantity?,
        unit_price: unit_price?,
    })
}

fn parse_order_id(order_id: &str) -> Result<OrderId, Status> {
    status::parse_field("order_id", OrderId::parse(order_id))
}

fn parse_with_reason(order_id: &str, reason: &str) -> Result<(OrderId, Reason), Status> {
    let mut violations = FieldViolations::new();
    let order_id = violations.check("order_id", OrderId::parse(order_id));
    let reason = violations.check("reason", reason_text(reason).and_then(Reason::parse));
    match (order_id, reason) {
        (Some(order_id), Some(reason)) => Ok((order_id, reason)),
        _ => Err(violations.into_status()),
    }
}

/// A reason's text, refused with a NUL character (which PostgreSQL's text
/// cannot hold); `Reason` bounds its length.
fn reason_text(text: &str) -> Result<&str, &'static str> {
    fields::without_nul(text).map_err(|_| "must not contain NUL characters")
}

fn status_from_proto(status: pb::OrderStatus) -> OrderStatus {
    match status {
        pb::OrderStatus::Unspecified | pb::OrderStatus::Pending => OrderStatus::Pending,
        pb::OrderStatus::Confirmed => OrderStatus::Confirmed,
        pb::OrderStatus::Rejected => OrderStatus::Rejected,
        pb::OrderStatus::CancellationRequested => OrderStatus::CancellationRequested,
        pb::OrderStatus::Cancelled => OrderStatus::Cancelled,
        pb::OrderStatus::PendingReview => OrderStatus::PendingReview,
        pb::OrderStatus::ReviewApproved => OrderStatus::ReviewApproved,
        pb::OrderStatus::ReviewDeclined => OrderStatus::ReviewDeclined,
        pb::OrderStatus::ReturnRequested => OrderStatus::ReturnRequested,
        pb::OrderStatus::Returned => OrderStatus::Returned,
    }
}

fn status_to_proto(status: &str) -> pb::OrderStatus {
    match OrderStatus::parse(status) {
        None => pb::OrderStatus::Unspecified,
        Some(OrderStatus::Pending) => pb::OrderStatus::Pending,
        Some(OrderStatus::Confirmed) => pb::OrderStatus::Confirmed,
        Some(OrderStatus::Rejected) => pb::OrderStatus::Rejected,
        Some(OrderStatus::CancellationRequested) => pb::OrderStatus::CancellationRequested,
        Some(OrderStatus::Cancelled) => pb::OrderStatus::Cancelled,
        Some(OrderStatus::PendingReview) => pb::OrderStatus::PendingReview,
        Some(OrderStatus::ReviewApproved) => pb::OrderStatus::ReviewApproved,
        Some(OrderStatus::ReviewDeclined) => pb::OrderStatus::ReviewDeclined,
        Some(OrderStatus::ReturnRequested) => pb::OrderStatus::ReturnRequested,
        Some(OrderStatus::Returned) => pb::OrderStatus::Returned,
    }
}

pub(crate) fn to_proto(view: &OrderView) -> pb::Order {
    let money = |amount_minor| api_common::v1::Money {
        amount_minor,
        currency: view.currency.clone(),
    };
    pb::Order {
        order_id: view.order_id.to_string(),
        customer_id: view.customer_id.to_string(),
        status: status_to_proto(&view.status).into(),
        items: view
            .items
            .iter()
            .map(|item| pb::LineItem {
                sku: item.sku.clone(),
                quantity: item.quantity,
                unit_price: Some(money(item.unit_price_minor)),
            })
            .collect(),
        total: Some(money(view.total_minor)),
        payment_id: view.payment_id.map(|id| id.to_string()).unwrap_or_default(),
        status_reason: view.status_reason.clone().unwrap_or_default(),
        created_at: Some(SystemTime::from(view.created_at).into()),
        updated_at: Some(SystemTime::from(view.updated_at).into()),
        version: u64::try_from(view.version).unwrap_or_default(),
        correlation_id: view.correlation_id.clone(),
    }
}
