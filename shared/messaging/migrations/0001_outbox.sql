-- Events waiting to be published, written in the same transaction as the
-- change they announce. The relay publishes rows in id order and deletes
-- them once the broker has acknowledged them, so the table holds only the
-- backlog and never grows with history.
CREATE TABLE outbox (
    id          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id    UUID        NOT NULL,
    topic       TEXT        NOT NULL,
    message_key TEXT        NOT NULL,
    envelope    BYTEA       NOT NULL,
    -- Trace context and correlation id of the writer, as [name, value] pairs.
    headers     JSONB       NOT NULL DEFAULT '[]',
    created_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- Wake the relay when a transaction that wrote to the outbox commits
-- (PostgreSQL delivers notifications only on commit, once per transaction
-- and channel), instead of having it poll.
CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.outbox', '');
    RETURN NULL;
END
$$;

CREATE TRIGGER outbox_notify
    AFTER INSERT ON outbox
    FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify();
