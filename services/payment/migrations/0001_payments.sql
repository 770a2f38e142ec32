-- Every payment attempt, by the idempotency key it was made with. The key
-- is unique, and ProcessPayment holds a per-key lock while it talks to the
-- provider: one key, one charge, whatever the races and retries.
CREATE TABLE payments (
    payment_id             UUID        PRIMARY KEY,
    idempotency_key        TEXT        NOT NULL UNIQUE,
    status                 TEXT        NOT NULL CHECK (status IN ('captured', 'declined', 'refunded', 'voided')),
    -- Digest of the request: the same key with another request is refused.
    -- The columns below are empty only for a voided key (no request seen).
    request_hash           BYTEA,
    order_id               UUID,
    customer_id            UUID,
    amount_minor           BIGINT      CHECK (amount_minor > 0),
    currency               TEXT,
    decline_reason         TEXT,
    provider_reference     TEXT,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    refunded_at            TIMESTAMPTZ,
    refund_idempotency_key TEXT,
    refund_reason          TEXT,
    CHECK (status = 'voided' OR (order_id IS NOT NULL AND customer_id IS NOT NULL
                                 AND amount_minor IS NOT NULL AND currency IS NOT NULL))
);
CREATE INDEX payments_by_order ON payments (order_id, created_at);

-- What each order has paid: captured charges (refunded ones included)
-- minus refunds. The audit's view of money moved.
CREATE VIEW order_ledger AS
SELECT order_id,
       currency,
       -- sum(bigint) is numeric; amounts are bounded far below 2^63.
       coalesce(sum(amount_minor) FILTER (WHERE status IN ('captured', 'refunded')), 0)::bigint AS captured_minor,
       coalesce(sum(amount_minor) FILTER (WHERE status = 'refunded'), 0)::bigint AS refunded_minor
FROM payments
WHERE order_id IS NOT NULL
GROUP BY order_id, currency;

-- The simulated provider's own memory, standing for the provider's side of
-- the world: what it charged under which key. It is written outside the
-- payment's transaction, as a real provider's records would be.
CREATE TABLE simulated_provider_charges (
    idempotency_key TEXT        PRIMARY KEY,
    payment_method  TEXT        NOT NULL,
    attempts        INT         NOT NULL,
    -- 'captured', or the decline reason; empty until the provider answered.
    outcome         TEXT,
    reference       TEXT,
    refund_attempts INT         NOT NULL DEFAULT 0,
    refunded_at     TIMESTAMPTZ
);
