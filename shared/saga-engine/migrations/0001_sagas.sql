-- Durable sagas. Every transition is one transaction on these tables (and
-- the outbox), guarded by the instance's fence.
CREATE TABLE saga_instances (
    saga_id                UUID        PRIMARY KEY,
    saga_type              TEXT        NOT NULL,
    -- What the saga is about (an order id): at most one saga per key.
    business_key           TEXT        NOT NULL,
    state                  TEXT        NOT NULL
        CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'failed')),
    -- The saga's input, as its definition reads it.
    data                   JSONB       NOT NULL,
    correlation_id         TEXT        NOT NULL,
    -- W3C trace context of what started the saga, as [name, value] pairs:
    -- every step continues that trace, on whichever replica it runs.
    trace_context          JSONB       NOT NULL DEFAULT '[]',
    -- Index of the step group being run (forward) while running.
    position               INT         NOT NULL DEFAULT 0,
    failure_reason         TEXT,
    -- Set by a customer or an operator; acted on between steps, so a step
    -- in flight is never overtaken.
    compensation_requested TEXT,
    -- When work is next due (a new saga, a retry, a deadline); NULL when
    -- there is none. Timers are this column: they survive restarts.
    next_run_at            TIMESTAMPTZ,
    -- The replica driving the saga, until when, and the fencing version of
    -- its claim: every write checks the fence, so a replica whose lease was
    -- taken over cannot overwrite the new owner's work.
    lease_owner            TEXT,
    lease_expires_at       TIMESTAMPTZ,
    fence                  BIGINT      NOT NULL DEFAULT 0,
    created_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at             TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at            TIMESTAMPTZ,
    UNIQUE (saga_type, business_key)
);
CREATE INDEX saga_instances_due ON saga_instances (next_run_at) WHERE next_run_at IS NOT NULL;
CREATE INDEX saga_instances_by_correlation ON saga_instances (correlation_id);
CREATE INDEX saga_instances_active ON saga_instances (created_at, saga_id)
    WHERE state IN ('running', 'compensating', 'failed');
-- Recently finished sagas, for the dashboard's rates and reasons.
CREATE INDEX saga_instances_finished ON saga_instances (finished_at) WHERE finished_at IS NOT NULL;

-- The step log: one row per step action or compensation, written before
-- each attempt (so a crash mid-call is known to have attempted it) and
-- after its outcome.
CREATE TABLE saga_steps (
    saga_id         UUID        NOT NULL REFERENCES saga_instances ON DELETE CASCADE,
    step            TEXT        NOT NULL,
    kind            TEXT        NOT NULL CHECK (kind IN ('action', 'compensation')),
    -- running: an attempt is in flight (or its replica died in it);
    -- waiting: a retry is scheduled at next_attempt_at.
    status          TEXT        NOT NULL CHECK (status IN ('running', 'waiting', 'succeeded', 'failed')),
    attempts        INT         NOT NULL DEFAULT 0,
    last_error      TEXT,
    output          JSONB,
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ,
    next_attempt_at TIMESTAMPTZ,
    deadline_at     TIMESTAMPTZ,
    -- Order in which step executions began, for the log.
    seq             BIGINT      GENERATED ALWAYS AS IDENTITY,
    PRIMARY KEY (saga_id, step, kind)
);

-- Wakes the engines of every replica when work becomes due now.
CREATE FUNCTION saga_work_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.next_run_at IS NOT NULL AND NEW.lease_owner IS NULL THEN
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.saga_work', '');
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER saga_work_notify
    AFTER INSERT OR UPDATE OF next_run_at, lease_owner ON saga_instances
    FOR EACH ROW EXECUTE FUNCTION saga_work_notify();
