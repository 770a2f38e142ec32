-- Saga search (SagaService/ListSagas): an index for each filter, so that a
-- search reads what it finds, not the history of finished sagas. Pages are
-- newest first, by (created_at, saga_id); where the planner finds matches
-- dense enough, it reads the created index backwards and stops at a page.
CREATE INDEX saga_instances_by_created ON saga_instances (created_at, saga_id);
CREATE INDEX saga_instances_by_state ON saga_instances (state, created_at, saga_id);
-- By order id (and any business key), whatever the saga's type.
CREATE INDEX saga_instances_by_key ON saga_instances (business_key);
-- By the customer a saga acts for, when its data names one, in page order:
-- a customer's page reads that customer's newest sagas, however many
-- others there are.
CREATE INDEX saga_instances_by_customer ON saga_instances ((data ->> 'customer_id'), created_at, saga_id)
    WHERE data ? 'customer_id';
-- By a fragment of the failure reason, in any case: trigrams (pg_trgm, which
-- provisioning creates in the schema `extensions`).
CREATE INDEX saga_instances_by_failure ON saga_instances
    USING gin (failure_reason extensions.gin_trgm_ops) WHERE failure_reason IS NOT NULL;
