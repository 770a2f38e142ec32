-- Authorizations (AuthorizePayment, CapturePayment, VoidPayment): an
-- amount held on the customer's payment method, taken later in full or
-- released, and lapsing at the provider after its lifetime.
--
-- A payment is a charge (ProcessPayment: authorized and captured at once)
-- or an authorization. An authorization goes authorized -> captured |
-- voided | expired, and captured -> refunded, as a charge does. Captured
-- authorizations count in `order_ledger` like charges (status 'captured').
ALTER TABLE payments DROP CONSTRAINT payments_status_check;
ALTER TABLE payments
    ADD CONSTRAINT payments_status_check
        CHECK (status IN ('captured', 'declined', 'refunded', 'voided', 'authorized', 'expired')),
    ADD COLUMN kind TEXT NOT NULL DEFAULT 'charge' CHECK (kind IN ('charge', 'authorization')),
    -- When the provider lets the authorization lapse unless captured.
    ADD COLUMN authorization_expires_at TIMESTAMPTZ,
    ADD COLUMN captured_at TIMESTAMPTZ,
    ADD COLUMN voided_at TIMESTAMPTZ,
    ADD CONSTRAINT payments_authorization_lapses
        CHECK (status <> 'authorized' OR (kind = 'authorization' AND authorization_expires_at IS NOT NULL));
-- `refund_idempotency_key` and `refund_reason` also record the void that
-- released an authorization.

-- A key's claim may now be taken to capture an authorization ('capture')
-- or to release one ('release': the key is released for good, like an
-- undo, but nothing captured under it is ever refunded).
ALTER TABLE charge_claims DROP CONSTRAINT charge_claims_intent_check;
ALTER TABLE charge_claims DROP CONSTRAINT charge_claims_check1;
ALTER TABLE charge_claims
    ADD CONSTRAINT charge_claims_intent_check
        CHECK (intent IN ('charge', 'undo', 'capture', 'release')),
    ADD CONSTRAINT charge_claims_undo_has_its_refund
        CHECK (intent NOT IN ('undo', 'release')
               OR (refund_idempotency_key IS NOT NULL AND refund_reason IS NOT NULL));

-- The simulated provider's authorizations: outcome 'authorized' until
-- captured (then 'captured', as a charge) or voided (`voided_at`). It
-- holds the amount until `authorized_until`, and nothing after. Its
-- `settled_at` (when it is done with the key) is that moment, set ahead:
-- an authorization nobody captures is done when it lapses.
ALTER TABLE simulated_provider_charges
    ADD COLUMN kind TEXT NOT NULL DEFAULT 'charge' CHECK (kind IN ('charge', 'authorization')),
    ADD COLUMN authorized_until TIMESTAMPTZ,
    ADD COLUMN captured_at TIMESTAMPTZ,
    ADD COLUMN capture_attempts INT NOT NULL DEFAULT 0;

-- What the provider holds of each order: `held_minor`, taken (captured,
-- not refunded), as before; `authorized_minor`, reserved on the payment
-- method by live authorizations (neither captured, voided nor lapsed).
CREATE OR REPLACE VIEW simulated_provider_holdings AS
SELECT order_id,
       currency,
       -- sum(bigint) is numeric; amounts are bounded far below 2^63.
       coalesce(sum(amount_minor) FILTER (WHERE outcome = 'captured' AND refunded_at IS NULL), 0)::bigint
           AS held_minor,
       coalesce(sum(amount_minor) FILTER (WHERE outcome = 'authorized' AND voided_at IS NULL
                                                AND authorized_until > now()), 0)::bigint
           AS authorized_minor
FROM simulated_provider_charges
WHERE order_id IS NOT NULL
GROUP BY order_id, currency;
