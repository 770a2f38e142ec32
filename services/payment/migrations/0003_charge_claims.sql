-- Who may call the provider for a charge key, and what is being done under
-- it: one row per key that a charge or a refund has touched. A request
-- claims the key here (committed) before it calls the provider, calls with
-- no transaction open, then records the outcome in `payments` and frees the
-- key in one short transaction. This replaces the per-key advisory lock,
-- which held a transaction and a pooled connection for as long as the
-- provider took. See `src/app.rs` for the protocol.
CREATE TABLE charge_claims (
    charge_key             TEXT        PRIMARY KEY,
    -- 'charge': a charge was asked for. 'undo': the key is being undone,
    -- for good (its capture refunded, or the key voided at the provider);
    -- it is never charged after that.
    intent                 TEXT        NOT NULL CHECK (intent IN ('charge', 'undo')),
    -- Digest of the charge request the key was first claimed with: the key
    -- charges that request or none. Empty when an undo came first.
    request_hash           BYTEA,
    -- The refund an undo was asked for with (the first one).
    refund_idempotency_key TEXT,
    refund_reason          TEXT,
    -- The lease: who is calling the provider for the key, until when at
    -- the latest. Empty when nobody is. After it expires (its holder
    -- crashed), another request may call the provider for the key; the
    -- provider is idempotent by key, so that call finds the first one's
    -- answer instead of charging again.
    lease_holder           UUID,
    lease_expires_at       TIMESTAMPTZ,
    -- Provider calls made under a lease, for the operator.
    provider_calls         INT         NOT NULL DEFAULT 0,
    -- Bumped by every change: a lease is taken only if the row is still as
    -- the request read it.
    version                BIGINT      NOT NULL DEFAULT 1,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    CHECK ((lease_holder IS NULL) = (lease_expires_at IS NULL)),
    CHECK (intent = 'charge' OR (refund_idempotency_key IS NOT NULL AND refund_reason IS NOT NULL))
);

-- Keys settled before this migration, as a claim of what settled them, so
-- a repeat request finds its payment without asking the provider.
INSERT INTO charge_claims (charge_key, intent, request_hash, refund_idempotency_key, refund_reason)
SELECT idempotency_key,
       CASE WHEN refund_idempotency_key IS NOT NULL THEN 'undo' ELSE 'charge' END,
       request_hash,
       refund_idempotency_key,
       CASE WHEN refund_idempotency_key IS NOT NULL THEN coalesce(refund_reason, '') END
FROM payments
ON CONFLICT (charge_key) DO NOTHING;
