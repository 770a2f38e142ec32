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
    /// Held for an operator's review (a large order): neither confirmed
    /// nor approved until an admin decides.
    PendingReview(Placed),
    /// Reviewed and approved; payment and confirmation go on.
    ReviewApproved(Placed),
    /// Reviewed and declined; the saga is undoing what was done, then
    /// rejects it.
    ReviewDeclined { order: Placed, reason: Reason },
    /// The customer asked to cancel; the saga is undoing what was done.
    CancellationRequested {
        order: Placed,
        reason: Option<Reason>,
    },
    /// Paid and confirmed. Final, but for a return.
    Confirmed {
        order: Placed,
        payment_id: PaymentId,
    },
    /// Confirmed, and its return asked for: the saga refunds its payment,
    /// then marks it returned.
    ReturnRequested {
        order: Placed,
        payment_id: PaymentId,
        reason: Reason,
    },
    /// Returned; its payment was refunded. Final.
    Returned {
        order: Placed,
        payment_id: PaymentId,
        reason: Reason,
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
    PendingReview,
    ReviewApproved,
    ReviewDeclined,
    CancellationRequested,
    Confirmed,
    Rejected,
    Cancelled,
    ReturnRequested,
    Returned,
}

impl OrderStatus {
    pub const ALL: [Self; 10] = [
        Self::Pending,
        Self::PendingReview,
        Self::ReviewApproved,
        Self::ReviewDeclined,
        Self::CancellationRequested,
        Self::Confirmed,
        Self::Rejected,
        Self::Cancelled,
        Self::ReturnRequested,
        Self::Returned,
    ];

    /// The stored form (the read model's `status`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::PendingReview => "pending_review",
            Self::ReviewApproved => "review_approved",
            Self::ReviewDeclined => "review_declined",
            Self::CancellationRequested => "cancellation_requested",
            Self::Confirmed => "confirmed",
            Self::Rejected => "rejected",
            Self::Cancelled => "cancelled",
            Self::ReturnRequested => "return_requested",
            Self::Returned => "returned",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|status| status.as_str() == text)
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
    /// The saga holds a large order for an operator's review.
    HoldForReview,
    /// An admin approves an order held for review.
    ApproveReview,
    /// An admin declines an order held for review.
    DeclineReview { reason: Reason },
    /// The customer (or an admin, `requested_by` empty) asks to return a
    /// confirmed order.
    RequestReturn {
        requested_by: Option<CustomerId>,
        reason: Reason,
    },
    /// The saga marks the order returned once its payment is refunded.
    MarkReturned,
}

/// What happened to an order. Past tense; each is stored forever.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OrderEvent {
    Placed(Placed),
    Confirmed {
        payment_id: PaymentId,
    },
    Rejected {
        reason: Reason,
    },
    CancellationRequested {
        reason: Option<Reason>,
    },
    Cancelled {
        reason: Reason,
    },
    HeldForReview,
    ReviewApproved,
    ReviewDeclined {
        reason: Reason,
    },
    /// With the payment to refund.
    ReturnRequested {
        payment_id: PaymentId,
        reason: Reason,
    },
    Returned {
        payment_id: PaymentId,
    },
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
            Self::PendingReview(_) => OrderStatus::PendingReview,
            Self::ReviewApproved(_) => OrderStatus::ReviewApproved,
            Self::ReviewDeclined { .. } => OrderStatus::ReviewDeclined,
            Self::CancellationRequested { .. } => OrderStatus::CancellationRequested,
            Self::Confirmed { .. } => OrderStatus::Confirmed,
            Self::Rejected { .. } => OrderStatus::Rejected,
            Self::Cancelled { .. } => OrderStatus::Cancelled,
            Self::ReturnRequested { .. } => OrderStatus::ReturnRequested,
            Self::Returned { .. } => OrderStatus::Returned,
        })
    }

    /// The order as placed, once it has been.
    pub fn placed(&self) -> Option<&Placed> {
        match self {
            Self::Initial => None,
            Self::Pending(order)
            | Self::PendingReview(order)
            | Self::ReviewApproved(order)
            | Self::ReviewDeclined { order, .. }
            | Self::CancellationRequested { order, .. }
            | Self::Confirmed { order, .. }
            | Self::Rejected { order, .. }
            | Self::Cancelled { order, .. }
            | Self::ReturnRequested { order, .. }
            | Self::Returned { order, .. } => Some(order),
        }
    }

    /// Whether the order is still before its confirmation and not closed:
    /// what the saga may still reject or cancel.
    fn is_open(&self) -> bool {
        matches!(
            self,
            Self::Pending(_)
                | Self::PendingReview(_)
                | Self::ReviewApproved(_)
                | Self::ReviewDeclined { .. }
                | Self::CancellationRequested { .. }
        )
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

            // An order held for review is confirmed only once approved.
            (Self::Pending(_) | Self::ReviewApproved(_), C::Confirm { payment_id }) => {
                Ok(vec![E::Confirmed {
                    payment_id: *payment_id,
                }])
            }
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

            (order, C::Reject { reason }) if order.is_open() => Ok(vec![E::Rejected {
                reason: reason.clone(),
            }]),
            (Self::Rejected { .. }, C::Reject { .. }) => Ok(vec![]),
            (_, C::Reject { .. }) => refuse("rejected"),

            // A customer may cancel or return only their own order; to
            // anyone else it does not exist.
            (_, C::RequestCancellation { requested_by, .. })
                if self
                    .placed()
                    .is_some_and(|placed| placed.customer_id != *requested_by) =>
            {
                Err(DomainError::NotFound)
            }
            // Also while it waits for its review, or after its approval:
            // until it is confirmed, a customer may change their mind.
            (
                Self::Pending(_) | Self::PendingReview(_) | Self::ReviewApproved(_),
                C::RequestCancellation { reason, .. },
            ) => Ok(vec![E::CancellationRequested {
                reason: reason.clone(),
            }]),
            (Self::CancellationRequested { .. }, C::RequestCancellation { .. }) => Ok(vec![]),
            (_, C::RequestCancellation { .. }) => refuse("cancelled by its customer"),

            (order, C::Cancel { reason }) if order.is_open() => Ok(vec![E::Cancelled {
                reason: reason.clone(),
            }]),
            (Self::Cancelled { .. }, C::Cancel { .. }) => Ok(vec![]),
            (_, C::Cancel { .. }) => refuse("cancelled"),

            (Self::Pending(_), C::HoldForReview) => Ok(vec![E::HeldForReview]),
            // Held already, or decided since: a retry of the hold changes
            // nothing.
            (
                Self::PendingReview(_) | Self::ReviewApproved(_) | Self::ReviewDeclined { .. },
                C::HoldForReview,
            ) => Ok(vec![]),
            (_, C::HoldForReview) => refuse("held for review"),

            (Self::PendingReview(_), C::ApproveReview) => Ok(vec![E::ReviewApproved]),
            (Self::ReviewApproved(_), C::ApproveReview) => Ok(vec![]),
            (_, C::ApproveReview) => refuse("approved"),

            (Self::PendingReview(_), C::DeclineReview { reason }) => Ok(vec![E::ReviewDeclined {
                reason: reason.clone(),
            }]),
            (Self::ReviewDeclined { .. }, C::DeclineReview { .. }) => Ok(vec![]),
            (_, C::DeclineReview { .. }) => refuse("declined"),

            (
                _,
                C::RequestReturn {
                    requested_by: Some(customer),
                    ..
                },
            ) if self
                .placed()
                .is_some_and(|placed| placed.customer_id != *customer) =>
            {
                Err(DomainError::NotFound)
            }
            (Self::Confirmed { payment_id, .. }, C::RequestReturn { reason, .. }) => {
                Ok(vec![E::ReturnRequested {
                    payment_id: *payment_id,
                    reason: reason.clone(),
                }])
            }
            (Self::ReturnRequested { .. } | Self::Returned { .. }, C::RequestReturn { .. }) => {
                Ok(vec![])
            }
            (_, C::RequestReturn { .. }) => refuse("returned"),

            (Self::ReturnRequested { payment_id, .. }, C::MarkReturned) => Ok(vec![E::Returned {
                payment_id: *payment_id,
            }]),
            (Self::Returned { .. }, C::MarkReturned) => Ok(vec![]),
            (_, C::MarkReturned) => refuse("marked returned"),
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
            (Self::Pending(order) | Self::ReviewApproved(order), E::Confirmed { payment_id }) => {
                Self::Confirmed {
                    order,
                    payment_id: *payment_id,
                }
            }
            (order, E::Rejected { reason }) => match order.open_placement() {
                Ok(order) => Self::Rejected {
                    order,
                    reason: reason.clone(),
                },
                Err(unchanged) => unchanged,
            },
            (
                Self::Pending(order) | Self::PendingReview(order) | Self::ReviewApproved(order),
                E::CancellationRequested { reason },
            ) => Self::CancellationRequested {
                order,
                reason: reason.clone(),
            },
            (order, E::Cancelled { reason }) => match order.open_placement() {
                Ok(order) => Self::Cancelled {
                    order,
                    reason: reason.clone(),
                },
                Err(unchanged) => unchanged,
            },
            (Self::Pending(order), E::HeldForReview) => Self::PendingReview(order),
            (Self::PendingReview(order), E::ReviewApproved) => Self::ReviewApproved(order),
            (Self::PendingReview(order), E::ReviewDeclined { reason }) => Self::ReviewDeclined {
                order,
                reason: reason.clone(),
            },
            (Self::Confirmed { order, payment_id }, E::ReturnRequested { reason, .. }) => {
                Self::ReturnRequested {
                    order,
                    payment_id,
                    reason: reason.clone(),
                }
            }
            (
                Self::ReturnRequested {
                    order,
                    payment_id,
                    reason,
                },
                E::Returned { .. },
            ) => Self::Returned {
                order,
                payment_id,
                reason,
            },
            (unchanged, _) => unchanged,
        }
    }

    /// The order as placed, if it is open (see [`Order::is_open`]); the
    /// order unchanged otherwise.
    // The error is the order itself, handed back as it was: moved, not
    // copied, so its size costs nothing.
    #[allow(clippy::result_large_err)]
    fn open_placement(self) -> Result<Placed, Self> {
        match self {
            Self::Pending(order)
            | Self::PendingReview(order)
            | Self::ReviewApproved(order)
            | Self::ReviewDeclined { order, .. }
            | Self::CancellationRequested { order, .. } => Ok(order),
            closed => Err(closed),
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

    // Review and returns.

    fn held() -> OrderEvent {
        OrderEvent::HeldForReview
    }

    fn declined() -> OrderEvent {
        OrderEvent::ReviewDeclined {
            reason: reason("looks like fraud"),
        }
    }

    fn return_requested(n: u128) -> OrderEvent {
        OrderEvent::ReturnRequested {
            payment_id: payment(n),
            reason: reason("does not fit"),
        }
    }

    fn request_return(by: Option<CustomerId>) -> OrderCommand {
        OrderCommand::RequestReturn {
            requested_by: by,
            reason: reason("does not fit"),
        }
    }

    /// A history that ends in each status, for tables of every state.
    fn every_state() -> Vec<(OrderStatus, Vec<OrderEvent>)> {
        let rejected = OrderEvent::Rejected {
            reason: reason("declined"),
        };
        let cancelled = OrderEvent::Cancelled {
            reason: reason("refunded"),
        };
        let states = vec![
            (OrderStatus::Pending, vec![placed_event()]),
            (OrderStatus::PendingReview, vec![placed_event(), held()]),
            (
                OrderStatus::ReviewApproved,
                vec![placed_event(), held(), OrderEvent::ReviewApproved],
            ),
            (
                OrderStatus::ReviewDeclined,
                vec![placed_event(), held(), declined()],
            ),
            (
                OrderStatus::CancellationRequested,
                vec![placed_event(), cancellation_requested()],
            ),
            (OrderStatus::Confirmed, vec![placed_event(), confirmed(1)]),
            (OrderStatus::Rejected, vec![placed_event(), rejected]),
            (OrderStatus::Cancelled, vec![placed_event(), cancelled]),
            (
                OrderStatus::ReturnRequested,
                vec![placed_event(), confirmed(1), return_requested(1)],
            ),
            (
                OrderStatus::Returned,
                vec![
                    placed_event(),
                    confirmed(1),
                    return_requested(1),
                    OrderEvent::Returned {
                        payment_id: payment(1),
                    },
                ],
            ),
        ];
        for (status, history) in &states {
            assert_eq!(given(history).status(), Some(*status), "{history:?}");
        }
        assert_eq!(states.len(), OrderStatus::ALL.len());
        states
    }

    /// What `command` does in every state: the event it appends, nothing
    /// (already done), or a refusal naming the state and `action`.
    fn in_every_state(
        command: &OrderCommand,
        action: &'static str,
        appends: &[(OrderStatus, OrderEvent)],
        unchanged: &[OrderStatus],
    ) {
        for (status, history) in every_state() {
            let decided = given(&history).decide(command);
            if let Some((_, event)) = appends.iter().find(|(s, _)| *s == status) {
                assert_eq!(decided, Ok(vec![event.clone()]), "{status}");
            } else if unchanged.contains(&status) {
                assert_eq!(decided, Ok(vec![]), "{status}: already done");
            } else {
                assert_eq!(decided, invalid(status, action), "{status}");
            }
        }
        assert_eq!(given(&[]).decide(command), Err(DomainError::NotFound));
    }

    #[test]
    fn the_saga_holds_a_pending_order_for_review_and_a_retry_changes_nothing() {
        in_every_state(
            &OrderCommand::HoldForReview,
            "held for review",
            &[(OrderStatus::Pending, held())],
            &[
                OrderStatus::PendingReview,
                OrderStatus::ReviewApproved,
                OrderStatus::ReviewDeclined,
            ],
        );
    }

    #[test]
    fn an_admin_approves_only_an_order_pending_review_and_approving_again_changes_nothing() {
        in_every_state(
            &OrderCommand::ApproveReview,
            "approved",
            &[(OrderStatus::PendingReview, OrderEvent::ReviewApproved)],
            &[OrderStatus::ReviewApproved],
        );
    }

    #[test]
    fn an_admin_declines_only_an_order_pending_review_and_declining_again_changes_nothing() {
        in_every_state(
            &OrderCommand::DeclineReview {
                reason: reason("looks like fraud"),
            },
            "declined",
            &[(OrderStatus::PendingReview, declined())],
            &[OrderStatus::ReviewDeclined],
        );
        // The first reason stands.
        let order = given(&[placed_event(), held(), declined()]);
        assert_eq!(
            order.decide(&OrderCommand::DeclineReview {
                reason: reason("another")
            }),
            Ok(vec![])
        );
    }

    #[test]
    fn a_decision_does_not_take_back_the_other_one() {
        let approved = given(&[placed_event(), held(), OrderEvent::ReviewApproved]);
        assert_eq!(
            approved.decide(&OrderCommand::DeclineReview {
                reason: reason("changed my mind")
            }),
            invalid(OrderStatus::ReviewApproved, "declined")
        );
        let declined = given(&[placed_event(), held(), declined()]);
        assert_eq!(
            declined.decide(&OrderCommand::ApproveReview),
            invalid(OrderStatus::ReviewDeclined, "approved")
        );
    }

    #[test]
    fn an_order_held_for_review_is_confirmed_only_once_approved() {
        let confirm = OrderCommand::Confirm {
            payment_id: payment(7),
        };
        assert_eq!(
            given(&[placed_event(), held()]).decide(&confirm),
            invalid(OrderStatus::PendingReview, "confirmed")
        );
        let approved = [placed_event(), held(), OrderEvent::ReviewApproved];
        let events = given(&approved).decide(&confirm).unwrap();
        assert_eq!(events, vec![confirmed(7)]);
        let after: Vec<_> = approved.into_iter().chain(events).collect();
        assert_eq!(given(&after).status(), Some(OrderStatus::Confirmed));
        assert_eq!(
            given(&[placed_event(), held(), declined()]).decide(&confirm),
            invalid(OrderStatus::ReviewDeclined, "confirmed")
        );
    }

    #[test]
    fn a_customer_may_cancel_while_the_order_waits_for_its_review_or_after_its_approval() {
        for history in [
            vec![placed_event(), held()],
            vec![placed_event(), held(), OrderEvent::ReviewApproved],
        ] {
            let events = given(&history)
                .decide(&request_cancellation(customer()))
                .unwrap();
            assert_eq!(events, vec![cancellation_requested()]);
            let after: Vec<_> = history.into_iter().chain(events).collect();
            let order = given(&after);
            assert_eq!(order.status(), Some(OrderStatus::CancellationRequested));
            // The review can no longer be decided; the saga undoes it.
            assert_eq!(
                order.decide(&OrderCommand::ApproveReview),
                invalid(OrderStatus::CancellationRequested, "approved")
            );
        }
        let stranger = CustomerId::new(Uuid::from_u128(99));
        assert_eq!(
            given(&[placed_event(), held()]).decide(&request_cancellation(stranger)),
            Err(DomainError::NotFound)
        );
        assert_eq!(
            given(&[placed_event(), held(), declined()]).decide(&request_cancellation(customer())),
            invalid(OrderStatus::ReviewDeclined, "cancelled by its customer")
        );
    }

    #[test]
    fn the_saga_rejects_or_cancels_an_order_in_or_after_review() {
        for history in [
            vec![placed_event(), held()],
            vec![placed_event(), held(), OrderEvent::ReviewApproved],
            vec![placed_event(), held(), declined()],
        ] {
            for (command, status) in [
                (
                    OrderCommand::Reject {
                        reason: reason("declined in review"),
                    },
                    OrderStatus::Rejected,
                ),
                (
                    OrderCommand::Cancel {
                        reason: reason("review timed out"),
                    },
                    OrderStatus::Cancelled,
                ),
            ] {
                let events = given(&history).decide(&command).unwrap();
                let after: Vec<_> = history.iter().cloned().chain(events).collect();
                assert_eq!(given(&after).status(), Some(status), "{history:?}");
            }
        }
    }

    #[test]
    fn the_owner_or_an_admin_asks_to_return_a_confirmed_order_only() {
        for by in [Some(customer()), None] {
            in_every_state(
                &request_return(by),
                "returned",
                &[(OrderStatus::Confirmed, return_requested(1))],
                &[OrderStatus::ReturnRequested, OrderStatus::Returned],
            );
        }
        let stranger = CustomerId::new(Uuid::from_u128(99));
        assert_eq!(
            given(&[placed_event(), confirmed(1)]).decide(&request_return(Some(stranger))),
            Err(DomainError::NotFound)
        );
    }

    #[test]
    fn the_saga_marks_returned_an_order_whose_return_was_asked_for() {
        in_every_state(
            &OrderCommand::MarkReturned,
            "marked returned",
            &[(
                OrderStatus::ReturnRequested,
                OrderEvent::Returned {
                    payment_id: payment(1),
                },
            )],
            &[OrderStatus::Returned],
        );
        let returned = given(&[
            placed_event(),
            confirmed(1),
            return_requested(1),
            OrderEvent::Returned {
                payment_id: payment(1),
            },
        ]);
        assert_eq!(
            returned,
            Order::Returned {
                order: placed(),
                payment_id: payment(1),
                reason: reason("does not fit"),
            }
        );
    }

    #[test]
    fn a_returned_or_returning_order_is_neither_confirmed_again_nor_cancelled() {
        for history in [
            vec![placed_event(), confirmed(1), return_requested(1)],
            vec![
                placed_event(),
                confirmed(1),
                return_requested(1),
                OrderEvent::Returned {
                    payment_id: payment(1),
                },
            ],
        ] {
            let order = given(&history);
            let status = order.status().unwrap();
            assert_eq!(
                order.decide(&OrderCommand::Confirm {
                    payment_id: payment(1)
                }),
                invalid(status, "confirmed")
            );
            assert_eq!(
                order.decide(&OrderCommand::Cancel {
                    reason: reason("x")
                }),
                invalid(status, "cancelled")
            );
            assert_eq!(
                order.decide(&request_cancellation(customer())),
                invalid(status, "cancelled by its customer")
            );
        }
    }

    #[test]
    fn every_status_is_stored_by_name() {
        for status in OrderStatus::ALL {
            assert_eq!(OrderStatus::parse(status.as_str()), Some(status));
        }
        assert_eq!(OrderStatus::parse("shipped"), None);
    }
}
