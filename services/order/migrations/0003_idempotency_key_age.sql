-- The purge job deletes CreateOrder's idempotency keys past their
-- retention, oldest first (`app.rs`, `idempotency_key_purge`): this index
-- finds each batch without scanning the rest.
CREATE INDEX idempotency_keys_created_at ON idempotency_keys (created_at);
