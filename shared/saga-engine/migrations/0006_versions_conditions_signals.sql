-- Versioned definitions, conditional steps and signals.

-- The version of its definition a saga started on, and runs to its end on.
-- Sagas from before versions are version 1.
ALTER TABLE saga_instances ADD COLUMN version INT NOT NULL DEFAULT 1;
-- A signal arrived that the replica driving the saga (if any) may not have
-- read: released, the saga is due at once, and the next claim reads its
-- signals (and clears this).
ALTER TABLE saga_instances ADD COLUMN signal_pending BOOLEAN NOT NULL DEFAULT false;

-- A replica claims only the due sagas whose (type, version) it carries:
-- this replaces the index of 0001, so a claim reads its own definitions'
-- due sagas, never those of a version it lacks (nor finished ones, which
-- have no work due).
CREATE INDEX saga_instances_due_by_definition ON saga_instances (saga_type, version, next_run_at)
    WHERE next_run_at IS NOT NULL;
DROP INDEX saga_instances_due;
-- ListSagas by type and version, in page order.
CREATE INDEX saga_instances_by_version ON saga_instances (saga_type, version, created_at, saga_id);
-- Sagas of a version no replica carries (count, search, stuck detection)
-- are found among the unfinished ones, through the partial index of
-- 0003 (`saga_instances_unfinished`): never in finished history.

-- Which definitions live replicas carry: each replica renews its own
-- (type, version) pairs while it runs, until `carried_until`. A pair past
-- it is carried by no live replica: its unfinished sagas are reported.
CREATE TABLE saga_definitions (
    saga_type     TEXT        NOT NULL,
    version       INT         NOT NULL,
    carried_until TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (saga_type, version)
);
-- The sagas that exist now ran on version 1 of their type; a replica that
-- carries it says so when it starts.
INSERT INTO saga_definitions (saga_type, version, carried_until)
    SELECT DISTINCT saga_type, 1, now() FROM saga_instances
    WHERE state IN ('running', 'compensating', 'paused', 'failed');

-- A step whose condition did not hold.
ALTER TABLE saga_steps DROP CONSTRAINT saga_steps_status_check;
ALTER TABLE saga_steps ADD CONSTRAINT saga_steps_status_check
    CHECK (status IN ('running', 'waiting', 'succeeded', 'failed', 'skipped'));

-- Signals sent to sagas (SagaService/SignalSaga), kept from their arrival,
-- whether or not a step waits yet: the k-th step waiting for a name takes
-- the k-th signal of that name. Idempotent by the sender's signal id.
CREATE TABLE saga_signals (
    saga_id     UUID        NOT NULL REFERENCES saga_instances ON DELETE CASCADE,
    signal_id   TEXT        NOT NULL,
    signal      TEXT        NOT NULL,
    payload     JSONB       NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    seq         BIGINT      GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (saga_id, signal_id)
);
