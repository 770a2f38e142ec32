-- The read side: one row per order, what queries read. Kept in the same
-- transaction as every append, and rebuildable from the events at any time.
CREATE TABLE order_view (
    order_id       UUID        PRIMARY KEY,
    customer_id    UUID        NOT NULL,
    status         TEXT        NOT NULL,
    -- [{"sku": ..., "quantity": ..., "unit_price_minor": ...}]
    items          JSONB       NOT NULL,
    total_minor    BIGINT      NOT NULL,
    currency       TEXT        NOT NULL,
    payment_id     UUID,
    status_reason  TEXT,
    correlation_id TEXT        NOT NULL,
    created_at     TIMESTAMPTZ NOT NULL,
    updated_at     TIMESTAMPTZ NOT NULL,
    -- The projection's checkpoint for this order: the stream version the
    -- row reflects. A row is only ever replaced by a later version.
    version        BIGINT      NOT NULL
);
-- A customer's orders, newest first, with or without a status filter.
CREATE INDEX order_view_customer_newest ON order_view (customer_id, created_at DESC, order_id DESC);
CREATE INDEX order_view_customer_status_newest ON order_view (customer_id, status, created_at DESC, order_id DESC);

-- CreateOrder's idempotency keys: the same key with the same request
-- returns the first order; the primary key makes concurrent duplicates
-- wait for the first and then find it.
CREATE TABLE idempotency_keys (
    customer_id  UUID        NOT NULL,
    key          TEXT        NOT NULL,
    request_hash BYTEA       NOT NULL,
    order_id     UUID        NOT NULL,
    created_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, key)
);
