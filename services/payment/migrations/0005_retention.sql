-- Retention (`src/retention.rs`).
--
-- A charge key's claim is purged once the key is settled (its payment is
-- recorded, and the payment row, never purged, answers for the key from
-- then on) and nobody holds its lease; oldest change first.
CREATE INDEX charge_claims_free_by_age ON charge_claims (updated_at)
    WHERE lease_holder IS NULL;

-- When the simulated provider was done with a key for good: declined,
-- refunded or voided, so that it holds nothing and nothing more can happen
-- under the key. Empty while it holds the money (captured, not refunded)
-- or has not answered. Like a real provider, it forgets such keys after a
-- while.
ALTER TABLE simulated_provider_charges ADD COLUMN settled_at TIMESTAMPTZ;
UPDATE simulated_provider_charges SET settled_at = now()
WHERE outcome <> 'captured' OR refunded_at IS NOT NULL OR voided_at IS NOT NULL;
CREATE INDEX simulated_provider_charges_settled_at ON simulated_provider_charges (settled_at)
    WHERE settled_at IS NOT NULL;
