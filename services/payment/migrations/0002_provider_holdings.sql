-- What the simulated provider knows of each charge, as a real provider
-- keeps it: the amount and the metadata it was charged with (the order and
-- the customer), and whether the key was voided. A void by key is how a
-- caller who lost the charge's answer undoes it: the provider refunds what
-- it captured under the key, or, when it captured nothing, remembers the
-- key as voided and refuses any later charge under it.
--
-- The new columns are empty for charges recorded before this migration;
-- the payment method and the amount also for a key voided before any
-- charge was asked for (attempts 0).
ALTER TABLE simulated_provider_charges
    ALTER COLUMN payment_method DROP NOT NULL,
    ADD COLUMN amount_minor BIGINT CHECK (amount_minor > 0),
    ADD COLUMN currency     TEXT,
    ADD COLUMN order_id     UUID,
    ADD COLUMN customer_id  UUID,
    ADD COLUMN voided_at    TIMESTAMPTZ;

-- What the provider holds of each order's money: captured and not
-- refunded. The provider's side of `order_ledger`, to check the two agree.
CREATE VIEW simulated_provider_holdings AS
SELECT order_id,
       currency,
       -- sum(bigint) is numeric; amounts are bounded far below 2^63.
       coalesce(sum(amount_minor) FILTER (WHERE outcome = 'captured' AND refunded_at IS NULL), 0)::bigint
           AS held_minor
FROM simulated_provider_charges
WHERE order_id IS NOT NULL
GROUP BY order_id, currency;

-- Charges made before this migration: their amount and metadata, from our
-- own record of them. (A charge whose answer was lost before it has none;
-- voiding it reports an error rather than a guess.)
UPDATE simulated_provider_charges AS charge
SET amount_minor = payment.amount_minor,
    currency     = payment.currency,
    order_id     = payment.order_id,
    customer_id  = payment.customer_id
FROM payments AS payment
WHERE payment.idempotency_key = charge.idempotency_key
  AND payment.order_id IS NOT NULL;
