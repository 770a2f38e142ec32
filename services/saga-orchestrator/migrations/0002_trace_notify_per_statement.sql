-- One statement records a whole consumer batch: announce its rows with a
-- few notifications per statement instead of one per row. A notification's
-- payload is at most 8000 bytes, and a row (its summary at most 500
-- characters) stays under 1000, so eight rows go in each.
DROP TRIGGER trace_events_notify ON trace_events;
CREATE OR REPLACE FUNCTION trace_events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    chunk text;
BEGIN
    FOR chunk IN
        SELECT json_agg(json_build_object(
                   'event_id', event_id, 'correlation_id', correlation_id, 'order_id', order_id,
                   'service', service, 'event_type', event_type, 'aggregate_type', aggregate_type,
                   'aggregate_id', aggregate_id, 'aggregate_version', aggregate_version,
                   'causation_id', causation_id, 'occurred_at', occurred_at, 'summary', summary)
                   ORDER BY occurred_at)::text
        FROM (SELECT *, (row_number() OVER () - 1) / 8 AS part FROM new_rows) AS numbered
        GROUP BY part
    LOOP
        PERFORM pg_notify(TG_TABLE_SCHEMA || '.trace_events', chunk);
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER trace_events_notify
    AFTER INSERT ON trace_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION trace_events_notify();
