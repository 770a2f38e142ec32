-- The one statement that records trace rows now announces them itself, in
-- the same statement (trace_view.rs, `record`): the trigger's separate
-- aggregate and notifications per statement were work the writer already
-- had at hand.
DROP TRIGGER trace_events_notify ON trace_events;
DROP FUNCTION trace_events_notify();
