//! How order events are stored and published: as protobuf payloads from
//! `proto/ordersaga/order/v1/order.proto`, versioned.
//!
//! `OrderPlaced` has two schema versions. Version 1 priced lines in bare
//! minor units with one order-level currency (`OrderPlacedV1`); version 2
//! gives every price its currency (`OrderPlaced`). Only version 2 is
//! written; version 1 events are upcast when read.

use anyhow::{Context as _, bail};
use api_order::v1 as pb;
use money::{Currency, Money};
use prost::{Message, Name};
use uuid::Uuid;

use crate::domain::{
    CustomerId, DomainError, LineItem, Order, OrderCommand, OrderEvent, OrderId, OrderLines,
    PaymentId, PaymentMethodToken, Placed, Quantity, Reason, Sku,
};
use crate::event_store::{Aggregate, Encoded};

/// The schema version `OrderPlaced` is written with.
const ORDER_PLACED_VERSION: u32 = 2;

impl Aggregate for Order {
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = DomainError;

    const KIND: &'static str = "order";

    fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        Order::decide(self, command)
    }

    fn evolve(self, event: &OrderEvent) -> Self {
        Order::evolve(self, event)
    }

    fn encode(stream_id: Uuid, event: &OrderEvent) -> Encoded {
        let order_id = stream_id.to_string();
        match event {
            OrderEvent::Placed(placed) => encoded(&placed_to_proto(placed), ORDER_PLACED_VERSION),
            OrderEvent::Confirmed { payment_id } => encoded(
                &pb::OrderConfirmed {
                    order_id,
                    payment_id: payment_id.to_string(),
                },
                1,
            ),
            OrderEvent::Rejected { reason } => encoded(
                &pb::OrderRejected {
                    order_id,
                    reason: reason.as_str().to_owned(),
                },
                1,
            ),
            OrderEvent::CancellationRequested { reason } => encoded(
                &pb::OrderCancellationRequested {
                    order_id,
                    reason: reason
                        .as_ref()
                        .map(|r| r.as_str().to_owned())
                        .unwrap_or_default(),
                },
                1,
            ),
            OrderEvent::Cancelled { reason } => encoded(
                &pb::OrderCancelled {
                    order_id,
                    reason: reason.as_str().to_owned(),
                },
                1,
            ),
            OrderEvent::HeldForReview => encoded(&pb::OrderHeldForReview { order_id }, 1),
            OrderEvent::ReviewApproved => encoded(&pb::OrderReviewApproved { order_id }, 1),
            OrderEvent::ReviewDeclined { reason } => encoded(
                &pb::OrderReviewDeclined {
                    order_id,
                    reason: reason.as_str().to_owned(),
                },
                1,
            ),
            OrderEvent::ReturnRequested { payment_id, reason } => encoded(
                &pb::OrderReturnRequested {
                    order_id,
                    payment_id: payment_id.to_string(),
                    reason: reason.as_str().to_owned(),
                },
                1,
            ),
            OrderEvent::Returned { payment_id } => encoded(
                &pb::OrderReturned {
                    order_id,
                    payment_id: payment_id.to_string(),
                },
                1,
            ),
        }
    }

    fn decode(event_type: &str, schema_version: u32, payload: &[u8]) -> anyhow::Result<OrderEvent> {
        let known = |name: String| name == event_type;
        Ok(match schema_version {
            1 if known(pb::OrderPlaced::full_name()) => {
                OrderEvent::Placed(upcast_placed_v1(&pb::OrderPlacedV1::decode(payload)?)?)
            }
            2 if known(pb::OrderPlaced::full_name()) => {
                OrderEvent::Placed(placed_from_proto(&pb::OrderPlaced::decode(payload)?)?)
            }
            1 if known(pb::OrderConfirmed::full_name()) => OrderEvent::Confirmed {
                payment_id: PaymentId::parse(&pb::OrderConfirmed::decode(payload)?.payment_id)
                    .map_err(anyhow::Error::msg)?,
            },
            1 if known(pb::OrderRejected::full_name()) => OrderEvent::Rejected {
                reason: reason(&pb::OrderRejected::decode(payload)?.reason)?,
            },
            1 if known(pb::OrderCancellationRequested::full_name()) => {
                OrderEvent::CancellationRequested {
                    reason: Reason::parse_optional(
                        &pb::OrderCancellationRequested::decode(payload)?.reason,
                    )
                    .map_err(anyhow::Error::msg)?,
                }
            }
            1 if known(pb::OrderCancelled::full_name()) => OrderEvent::Cancelled {
                reason: reason(&pb::OrderCancelled::decode(payload)?.reason)?,
            },
            1 if known(pb::OrderHeldForReview::full_name()) => OrderEvent::HeldForReview,
            1 if known(pb::OrderReviewApproved::full_name()) => OrderEvent::ReviewApproved,
            1 if known(pb::OrderReviewDeclined::full_name()) => OrderEvent::ReviewDeclined {
                reason: reason(&pb::OrderReviewDeclined::decode(payload)?.reason)?,
            },
            1 if known(pb::OrderReturnRequested::full_name()) => {
                let requested = pb::OrderReturnRequested::decode(payload)?;
                OrderEvent::ReturnRequested {
                    payment_id: payment_id(&requested.payment_id)?,
                    reason: reason(&requested.reason)?,
                }
            }
            1 if known(pb::OrderReturned::full_name()) => OrderEvent::Returned {
                payment_id: payment_id(&pb::OrderReturned::decode(payload)?.payment_id)?,
            },
            _ => bail!("unknown order event {event_type} version {schema_version}"),
        })
    }
}

fn encoded<M: Message + Name>(message: &M, schema_version: u32) -> Encoded {
    Encoded {
        event_type: M::full_name(),
        schema_version,
        payload: message.encode_to_vec(),
    }
}

fn payment_id(text: &str) -> anyhow::Result<PaymentId> {
    PaymentId::parse(text).map_err(|error| anyhow::anyhow!("stored payment id {error}"))
}

fn reason(text: &str) -> anyhow::Result<Reason> {
    Reason::parse(text).map_err(|error| anyhow::anyhow!("stored reason {error}"))
}

/// The version 2 payload of a placed order; also what the saga reads.
pub(crate) fn placed_to_proto(placed: &Placed) -> pb::OrderPlaced {
    pb::OrderPlaced {
        order_id: placed.order_id.to_string(),
        customer_id: placed.customer_id.to_string(),
        items: placed.lines.items().iter().map(line_to_proto).collect(),
        total: Some(placed.lines.total().to_proto()),
        payment_method_token: placed.payment_method.as_str().to_owned(),
    }
}

pub(crate) fn line_to_proto(item: &LineItem) -> pb::LineItem {
    pb::LineItem {
        sku: item.sku.as_str().to_owned(),
        quantity: item.quantity.get(),
        unit_price: Some(item.unit_price.to_proto()),
    }
}

fn placed_from_proto(proto: &pb::OrderPlaced) -> anyhow::Result<Placed> {
    let items = proto
        .items
        .iter()
        .map(|item| {
            let price = item.unit_price.as_ref().context("a line without a price")?;
            Ok(LineItem {
                sku: Sku::parse(&item.sku).map_err(anyhow::Error::msg)?,
                quantity: Quantity::new(item.quantity).map_err(anyhow::Error::msg)?,
                unit_price: Money::from_proto(price)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    placed(
        &proto.order_id,
        &proto.customer_id,
        items,
        &proto.payment_method_token,
    )
}

/// Version 1 to version 2: each line's price gets the order's currency.
fn upcast_placed_v1(v1: &pb::OrderPlacedV1) -> anyhow::Result<Placed> {
    let currency = Currency::parse(&v1.currency)?;
    let items = v1
        .lines
        .iter()
        .map(|line| {
            Ok(LineItem {
                sku: Sku::parse(&line.sku).map_err(anyhow::Error::msg)?,
                quantity: Quantity::new(line.quantity).map_err(anyhow::Error::msg)?,
                unit_price: Money::positive(line.unit_price_minor, currency)?,
            })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let placed = placed(
        &v1.order_id,
        &v1.customer_id,
        items,
        &v1.payment_method_token,
    )?;
    if placed.lines.total().amount_minor() != v1.total_minor {
        bail!("stored total {} does not match its lines", v1.total_minor);
    }
    Ok(placed)
}

fn placed(
    order_id: &str,
    customer_id: &str,
    items: Vec<LineItem>,
    token: &str,
) -> anyhow::Result<Placed> {
    Ok(Placed {
        order_id: OrderId::parse(order_id).map_err(anyhow::Error::msg)?,
        customer_id: CustomerId::parse(customer_id).map_err(anyhow::Error::msg)?,
        lines: OrderLines::new(items)?,
        payment_method: PaymentMethodToken::parse(token).map_err(anyhow::Error::msg)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eur(amount: i64) -> Money {
        Money::positive(amount, Currency::parse("EUR").unwrap()).unwrap()
    }

    #[test]
    fn a_version_1_order_placed_is_upcast_to_version_2() {
        let order_id = Uuid::now_v7();
        let customer_id = Uuid::now_v7();
        let v1 = pb::OrderPlacedV1 {
            order_id: order_id.to_string(),
            customer_id: customer_id.to_string(),
            lines: vec![
                pb::order_placed_v1::Line {
                    sku: "BOOK-1".into(),
                    quantity: 2,
                    unit_price_minor: 1250,
                },
                pb::order_placed_v1::Line {
                    sku: "PEN".into(),
                    quantity: 1,
                    unit_price_minor: 199,
                },
            ],
            currency: "EUR".into(),
            total_minor: 2699,
            payment_method_token: "tok_visa".into(),
        };
        let event = Order::decode(&pb::OrderPlaced::full_name(), 1, &v1.encode_to_vec()).unwrap();
        let OrderEvent::Placed(placed) = event else {
            panic!("not a placed event: {event:?}")
        };
        assert_eq!(placed.order_id.as_uuid(), order_id);
        assert_eq!(placed.lines.items()[0].unit_price, eur(1250));
        assert_eq!(placed.lines.items()[1].unit_price, eur(199));
        assert_eq!(placed.lines.total(), eur(2699));

        // Written again, it is version 2, and reads back the same.
        let encoded = Order::encode(order_id, &OrderEvent::Placed(placed.clone()));
        assert_eq!(encoded.schema_version, 2);
        let again = Order::decode(&encoded.event_type, 2, &encoded.payload).unwrap();
        assert_eq!(again, OrderEvent::Placed(placed));
    }

    #[test]
    fn a_version_1_event_whose_total_disagrees_is_refused() {
        let v1 = pb::OrderPlacedV1 {
            order_id: Uuid::now_v7().to_string(),
            customer_id: Uuid::now_v7().to_string(),
            lines: vec![pb::order_placed_v1::Line {
                sku: "A".into(),
                quantity: 1,
                unit_price_minor: 100,
            }],
            currency: "EUR".into(),
            total_minor: 999,
            payment_method_token: "tok".into(),
        };
        assert!(Order::decode(&pb::OrderPlaced::full_name(), 1, &v1.encode_to_vec()).is_err());
    }

    #[test]
    fn every_event_round_trips() {
        let id = Uuid::now_v7();
        let events = [
            OrderEvent::Confirmed {
                payment_id: PaymentId::new(Uuid::now_v7()),
            },
            OrderEvent::Rejected {
                reason: Reason::parse("card_declined").unwrap(),
            },
            OrderEvent::CancellationRequested { reason: None },
            OrderEvent::CancellationRequested {
                reason: Some(Reason::parse("too slow").unwrap()),
            },
            OrderEvent::Cancelled {
                reason: Reason::parse("refunded").unwrap(),
            },
            OrderEvent::HeldForReview,
            OrderEvent::ReviewApproved,
            OrderEvent::ReviewDeclined {
                reason: Reason::parse("looks like fraud").unwrap(),
            },
            OrderEvent::ReturnRequested {
                payment_id: PaymentId::new(Uuid::now_v7()),
                reason: Reason::parse("too small").unwrap(),
            },
            OrderEvent::Returned {
                payment_id: PaymentId::new(Uuid::now_v7()),
            },
        ];
        for event in events {
            let encoded = Order::encode(id, &event);
            assert_eq!(
                Order::decode(
                    &encoded.event_type,
                    encoded.schema_version,
                    &encoded.payload
                )
                .unwrap(),
                event
            );
        }
        assert!(Order::decode("ordersaga.order.v1.OrderShipped", 1, &[]).is_err());
    }
}
