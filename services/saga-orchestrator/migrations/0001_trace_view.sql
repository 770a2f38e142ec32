-- The trace view: every event of every service, by the flow it belongs to.
-- A read model fed from the event topics; rebuildable by replaying them.
CREATE TABLE trace_events (
    event_id          UUID        PRIMARY KEY,
    correlation_id    TEXT        NOT NULL,
    -- The order the event is about, when it is about one.
    order_id          UUID,
    service           TEXT        NOT NULL,
    event_type        TEXT        NOT NULL,
    aggregate_type    TEXT        NOT NULL,
    aggregate_id      TEXT        NOT NULL,
    aggregate_version BIGINT      NOT NULL,
    causation_id      TEXT,
    occurred_at       TIMESTAMPTZ NOT NULL,
    summary           TEXT        NOT NULL,
    recorded_at       TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX trace_events_by_correlation ON trace_events (correlation_id, occurred_at);
CREATE INDEX trace_events_by_order ON trace_events (order_id, occurred_at) WHERE order_id IS NOT NULL;
CREATE INDEX trace_events_recent ON trace_events (recorded_at);

-- Every replica's live streams learn of each new event at once: the row
-- itself travels in the notification (summaries are short).
CREATE FUNCTION trace_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '.trace_events', row_to_json(NEW)::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER trace_events_notify
    AFTER INSERT ON trace_events
    FOR EACH ROW EXECUTE FUNCTION trace_events_notify();
