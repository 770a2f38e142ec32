//! The order aggregate.

use super::values::{CustomerId, OrderId, OrderLines, PaymentId, PaymentMethodToken, Reason};

/// What a placed order is: who ordered what, and how they pay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub order_id: OrderId,
    pub customer_id: CustomerId,
    pub lines: OrderLines,
    pub payment_method: PaymentMethodToken,
}

/// An order in each state it can be in. Only the states that make sense
/// exist: a confirmed order has a payment, a rejected one a reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Order {
    /// Nothing has happened yet: the stream is empty.
    #[default]
    Initial,
    /// Placed; payment not settled.
    Pending(Placed),
    /// The customer asked to cancel; the saga is undoing what was done.
    CancellationRequested {
        order: Placed,
        reason: Option<Reason>,
    },
    /// Paid and confirmed. Final.
    Confirmed {
        order: Placed,
        payment_id: PaymentId,
    },
    /// Payment failed; nothing was charged. Final.
    Rejected { order: Placed, reason: Reason },
    /// Cancelled after compensation. Final.
    Cancelled { order: Placed, reason: Reason },
}

/// The status of an order, for display and queries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderStatus {
    Pending,
    CancellationRequested,
    Confirmed,
    Rejected,
    Cancelled,
}

impl OrderStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::CancellationRequested => "cancellation_requested",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
        }
    }
}

impl std::fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What can be asked of an order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderCommand {
    /// A customer places an order.
    Place(Placed),
    /// The saga confirms the order after its payment was captured.
    Confirm { payment_id: PaymentId },
    /// The saga rejects the order because its payment failed.
    Reject { reason: Reason },
    /// The customer asks to cancel their order.
    RequestCancellation {
        requested_by: CustomerId,
        reason: Option<Reason>,
    },
    /// The saga cancels the order once any charge is refunded.
    Cancel { reason: Reason },
}

/// What happened to an order. Past tense; each is stored forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Placed(Placed),
    Confirmed { payment_id: PaymentId },
    Rejected { reason: Reason },
    CancellationRequested { reason: Option<Reason> },
    Cancelled { reason: Reason },
}

/// Why a command was refused. Each maps to a status on purpose.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("the order does not exist")]
    NotFound,
    #[error("the order was already placed")]
    AlreadyPlaced,
    #[error("the order is {status}; it cannot be {action}")]
    InvalidTransition {
        status: OrderStatus,
        action: &'static str,
    },
    #[error("the order was confirmed with another payment")]
    ConfirmedWithAnotherPayment,
}

impl Order {
    pub fn status(&self) -> Option<OrderStatus> {
        Some(match self {
            Self::Initial => return None,
            Self::Pending(_) => OrderStatus::Pending,
            Self::CancellationRequested { .. } => OrderStatus::CancellationRequested,
            Self::Confirmed { .. } => OrderStatus::Confirmed,
            Self::Rejected { .. } => OrderStatus::Rejected,
            Self::Cancelled { .. } => OrderStatus::Cancelled,
        })
    }

    /// The order as placed, once it has been.
    pub fn placed(&self) -> Option<&Placed> {
        match self {
            Self::Initial => None,
            Self::Pending(order)
            | Self::CancellationRequested { order, .. }
            | Self::Confirmed { order, .. }
            | Self::Rejected { order, .. }
            | Self::Cancelled { order, .. } => Some(order),
        }
    }

    /// What `command` means for this order. An empty list means the command
    /// is already satisfied (commands are idempotent where the caller may
    /// retry them).
    pub fn decide(&self, command: &OrderCommand) -> Result<Vec<OrderEvent>, DomainError> {
        use OrderCommand as C;
        use OrderEvent as E;
        let refuse = |action| match self.status() {
            Some(status) => Err(DomainError::InvalidTransition { status, action }),
            None => Err(DomainError::NotFound),
        };
        match (self, command) {
            (Self::Initial, C::Place(placed)) => Ok(vec![E::Placed(placed.clone())]),
            (_, C::Place(_)) => Err(DomainError::AlreadyPlaced),
            (Self::Initial, _) => Err(DomainError::NotFound),

            (Self::Pending(_), C::Confirm { payment_id }) => Ok(vec![E::Confirmed {
                payment_id: *payment_id,
            }]),
            (
                Self::Confirmed {
                    payment_id: confirmed,
                    ..
                },
                C::Confirm { payment_id },
            ) => {
                if confirmed == payment_id {
                    Ok(vec![])
                } else {
                    Err(DomainError::ConfirmedWithAnotherPayment)
                }
            }
            (_, C::Confirm { .. }) => refuse("confirmed"),

            (Self::Pending(_) | Self::CancellationRequested { .. }, C::Reject { reason }) => {
                Ok(vec![E::Rejected {
                    reason: reason.clone(),
                }])
            }
            (Self::Rejected { .. }, C::Reject { .. }) => Ok(vec![]),
            (_, C::Reject { .. }) => refuse("rejected"),

            // A customer may cancel only their own order; to anyone else it
            // does not exist.
            (_, C::RequestCancellation { requested_by, .. })
                if self
                    .placed()
                    .is_some_and(|placed| placed.customer_id != *requested_by) =>
            {
                Err(DomainError::NotFound)
            }
            (Self::Pending(_), C::RequestCancellation { reason, .. }) => {
                Ok(vec![E::CancellationRequested {
                    reason: reason.clone(),
                }])
            }
            (Self::CancellationRequested { .. }, C::RequestCancellation { .. }) => Ok(vec![]),
            (_, C::RequestCancellation { .. }) => refuse("cancelled by its customer"),

            (Self::Pending(_) | Self::CancellationRequested { .. }, C::Cancel { reason }) => {
                Ok(vec![E::Cancelled {
                    reason: reason.clone(),
                }])
            }
            (Self::Cancelled { .. }, C::Cancel { .. }) => Ok(vec![]),
            (_, C::Cancel { .. }) => refuse("cancelled"),
        }
    }

    /// The order after `event`. Events are facts that `decide` allowed, so
    /// every combination that can be stored is handled; any other leaves the
    /// order as it was.
    #[must_use]
    pub fn evolve(self, event: &OrderEvent) -> Self {
        use OrderEvent as E;
        match (self, event) {
            (Self::Initial, E::Placed(placed)) => Self::Pending(placed.clone()),
            (Self::Pending(order), E::Confirmed { payment_id }) => Self::Confirmed {
                order,
                payment_id: *payment_id,
            },
            (
                Self::Pending(order) | Self::CancellationRequested { order, .. },
                E::Rejected { reason },
            ) => Self::Rejected {
                order,
                reason: reason.clone(),
            },
            (Self::Pending(order), E::CancellationRequested { reason }) => {
                Self::CancellationRequested {
                    order,
                    reason: reason.clone(),
                }
            }
            (
                Self::Pending(order) | Self::CancellationRequested { order, .. },
                E::Cancelled { reason },
            ) => Self::Cancelled {
                order,
                reason: reason.clone(),
            },
            (unchanged, _) => unchanged,
        }
    }
}

/// Given/when/then tests for every command path of the aggregate.
#[cfg(test)]
mod tests {
    use money::{Currency, Money};
    use uuid::Uuid;

    use super::*;
    use crate::domain::values::{LineItem, Quantity, Sku};

    fn customer() -> CustomerId {
        CustomerId::new(Uuid::from_u128(1))
    }

    fn placed() -> Placed {
        let eur = Currency::parse("EUR").unwrap();
        Placed {
            order_id: OrderId::new(Uuid::from_u128(42)),
            customer_id: customer(),
            lines: OrderLines::new(vec![LineItem {
                sku: Sku::parse("BOOK-1").unwrap(),
                quantity: Quantity::new(2).unwrap(),
                unit_price: Money::positive(1250, eur).unwrap(),
            }])
            .unwrap(),
            payment_method: PaymentMethodToken::parse("tok_visa").unwrap(),
        }
    }

    fn payment(n: u128) -> PaymentId {
        PaymentId::new(Uuid::from_u128(n))
    }

    fn reason(text: &str) -> Reason {
        Reason::parse(text).unwrap()
    }

    /// The order after `history`.
    fn given(history: &[OrderEvent]) -> Order {
        history.iter().fold(Order::Initial, Order::evolve)
    }

    fn placed_event() -> OrderEvent {
        OrderEvent::Placed(placed())
    }

    fn confirmed(n: u128) -> OrderEvent {
        OrderEvent::Confirmed {
            payment_id: payment(n),
        }
    }

    fn cancellation_requested() -> OrderEvent {
        OrderEvent::CancellationRequested {
            reason: Some(reason("changed my mind")),
        }
    }

    fn request_cancellation(by: CustomerId) -> OrderCommand {
        OrderCommand::RequestCancellation {
            requested_by: by,
            reason: Some(reason("changed my mind")),
        }
    }

    fn invalid(status: OrderStatus, action: &'static str) -> Result<Vec<OrderEvent>, DomainError> {
        Err(DomainError::InvalidTransition { status, action })
    }

    #[test]
    fn placing_a_new_order_records_it_as_pending() {
        let events = given(&[]).decide(&OrderCommand::Place(placed())).unwrap();
        assert_eq!(events, vec![placed_event()]);
        assert_eq!(given(&events).status(), Some(OrderStatus::Pending));
        assert_eq!(
            given(&events)
                .placed()
                .unwrap()
                .lines
                .total()
                .amount_minor(),
            2500
        );
    }

    #[test]
    fn an_order_is_placed_only_once() {
        assert_eq!(
            given(&[placed_event()]).decide(&OrderCommand::Place(placed())),
            Err(DomainError::AlreadyPlaced)
        );
    }

    #[test]
    fn commands_on_an_order_that_does_not_exist_are_refused() {
        for command in [
            OrderCommand::Confirm {
                payment_id: payment(1),
            },
            OrderCommand::Reject {
                reason: reason("declined"),
            },
            request_cancellation(customer()),
            OrderCommand::Cancel {
                reason: reason("refunded"),
            },
        ] {
            assert_eq!(
                given(&[]).decide(&command),
                Err(DomainError::NotFound),
                "{command:?}"
            );
        }
    }

    #[test]
    fn a_pending_order_is_confirmed_with_its_payment() {
        let order = given(&[placed_event()]);
        assert_eq!(
            order.decide(&OrderCommand::Confirm {
                payment_id: payment(7)
            }),
            Ok(vec![confirmed(7)])
        );
        assert_eq!(
            given(&[placed_event(), confirmed(7)]).status(),
            Some(OrderStatus::Confirmed)
        );
    }

    #[test]
    fn confirming_again_with_the_same_payment_changes_nothing() {
        let order = given(&[placed_event(), confirmed(7)]);
        assert_eq!(
            order.decide(&OrderCommand::Confirm {
                payment_id: payment(7)
            }),
            Ok(vec![])
        );
    }

    #[test]
    fn confirming_again_with_another_payment_is_refused() {
        let order = given(&[placed_event(), confirmed(7)]);
        assert_eq!(
            order.decide(&OrderCommand::Confirm {
                payment_id: payment(8)
            }),
            Err(DomainError::ConfirmedWithAnotherPayment)
        );
    }

    #[test]
    fn an_order_whose_customer_asked_to_cancel_cannot_be_confirmed() {
        let order = given(&[placed_event(), cancellation_requested()]);
        assert_eq!(
            order.decide(&OrderCommand::Confirm {
                payment_id: payment(7)
            }),
            invalid(OrderStatus::CancellationRequested, "confirmed")
        );
    }

    #[test]
    fn a_cancelled_order_cannot_be_confirmed() {
        let order = given(&[
            placed_event(),
            OrderEvent::Cancelled {
                reason: reason("refunded"),
            },
        ]);
        assert_eq!(
            order.decide(&OrderCommand::Confirm {
                payment_id: payment(7)
            }),
            invalid(OrderStatus::Cancelled, "confirmed")
        );
    }

    #[test]
    fn a_rejected_order_cannot_be_confirmed() {
        let order = given(&[
            placed_event(),
            OrderEvent::Rejected {
                reason: reason("declined"),
            },
        ]);
        assert_eq!(
            order.decide(&OrderCommand::Confirm {
                payment_id: payment(7)
            }),
            invalid(OrderStatus::Rejected, "confirmed")
        );
    }

    #[test]
    fn a_pending_order_is_rejected_when_payment_fails() {
        let events = given(&[placed_event()])
            .decide(&OrderCommand::Reject {
                reason: reason("card_declined"),
            })
            .unwrap();
        assert_eq!(
            events,
            vec![OrderEvent::Rejected {
                reason: reason("card_declined")
            }]
        );
    }

    #[test]
    fn an_order_awaiting_cancellation_is_rejected_when_payment_fails() {
        let order = given(&[placed_event(), cancellation_requested()]);
        let events = order
            .decide(&OrderCommand::Reject {
                reason: reason("card_declined"),
            })
            .unwrap();
        assert_eq!(
            given(&[placed_event(), cancellation_requested(), events[0].clone()]).status(),
            Some(OrderStatus::Rejected)
        );
    }

    #[test]
    fn rejecting_again_changes_nothing_and_a_confirmed_order_cannot_be_rejected() {
        let rejected = given(&[
            placed_event(),
            OrderEvent::Rejected {
                reason: reason("declined"),
            },
        ]);
        assert_eq!(
            rejected.decide(&OrderCommand::Reject {
                reason: reason("declined")
            }),
            Ok(vec![])
        );
        let paid = given(&[placed_event(), confirmed(1)]);
        assert_eq!(
            paid.decide(&OrderCommand::Reject {
                reason: reason("declined")
            }),
            invalid(OrderStatus::Confirmed, "rejected")
        );
    }

    #[test]
    fn a_customer_asks_to_cancel_their_pending_order() {
        let events = given(&[placed_event()])
            .decide(&request_cancellation(customer()))
            .unwrap();
        assert_eq!(events, vec![cancellation_requested()]);
        assert_eq!(
            given(&[placed_event(), cancellation_requested()]).status(),
            Some(OrderStatus::CancellationRequested)
        );
    }

    #[test]
    fn asking_to_cancel_twice_changes_nothing() {
        let order = given(&[placed_event(), cancellation_requested()]);
        assert_eq!(order.decide(&request_cancellation(customer())), Ok(vec![]));
    }

    #[test]
    fn another_customer_cannot_cancel_an_order_that_is_not_theirs() {
        let stranger = CustomerId::new(Uuid::from_u128(99));
        assert_eq!(
            given(&[placed_event()]).decide(&request_cancellation(stranger)),
            Err(DomainError::NotFound)
        );
    }

    #[test]
    fn a_confirmed_order_cannot_be_cancelled_by_its_customer() {
        let order = given(&[placed_event(), confirmed(1)]);
        assert_eq!(
            order.decide(&request_cancellation(customer())),
            invalid(OrderStatus::Confirmed, "cancelled by its customer")
        );
    }

    #[test]
    fn a_closed_order_cannot_be_cancelled_by_its_customer() {
        let rejected = given(&[
            placed_event(),
            OrderEvent::Rejected {
                reason: reason("declined"),
            },
        ]);
        assert_eq!(
            rejected.decide(&request_cancellation(customer())),
            invalid(OrderStatus::Rejected, "cancelled by its customer")
        );
        let cancelled = given(&[
            placed_event(),
            OrderEvent::Cancelled {
                reason: reason("refunded"),
            },
        ]);
        assert_eq!(
            cancelled.decide(&request_cancellation(customer())),
            invalid(OrderStatus::Cancelled, "cancelled by its customer")
        );
    }

    #[test]
    fn the_saga_cancels_a_pending_order_or_one_awaiting_cancellation() {
        let cancel = OrderCommand::Cancel {
            reason: reason("refunded after failed confirmation"),
        };
        for history in [
            vec![placed_event()],
            vec![placed_event(), cancellation_requested()],
        ] {
            let events = given(&history).decide(&cancel).unwrap();
            assert_eq!(
                events,
                vec![OrderEvent::Cancelled {
                    reason: reason("refunded after failed confirmation")
                }]
            );
            let after: Vec<_> = history.into_iter().chain(events).collect();
            assert_eq!(given(&after).status(), Some(OrderStatus::Cancelled));
        }
    }

    #[test]
    fn cancelling_again_changes_nothing_and_paid_or_rejected_orders_are_not_cancelled() {
        let cancel = OrderCommand::Cancel {
            reason: reason("refunded"),
        };
        let cancelled = given(&[
            placed_event(),
            OrderEvent::Cancelled {
                reason: reason("refunded"),
            },
        ]);
        assert_eq!(cancelled.decide(&cancel), Ok(vec![]));
        assert_eq!(
            given(&[placed_event(), confirmed(1)]).decide(&cancel),
            invalid(OrderStatus::Confirmed, "cancelled")
        );
        let rejected = given(&[
            placed_event(),
            OrderEvent::Rejected {
                reason: reason("declined"),
            },
        ]);
        assert_eq!(
            rejected.decide(&cancel),
            invalid(OrderStatus::Rejected, "cancelled")
        );
    }

    #[test]
    fn events_that_cannot_follow_leave_the_order_unchanged() {
        let order = given(&[placed_event(), confirmed(1)]);
        assert_eq!(
            order.clone().evolve(&OrderEvent::Cancelled {
                reason: reason("x")
            }),
            order
        );
    }
}
