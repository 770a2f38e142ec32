-- The purge job deletes sagas that completed or compensated longer ago
-- than their retention, oldest first, with their steps (`store.rs`,
-- `finished_purge`). Failed sagas wait for an operator and are never
-- purged, so they stay out of this index instead of being passed over by
-- every batch.
CREATE INDEX saga_instances_ended_by_age ON saga_instances (finished_at)
    WHERE state IN ('completed', 'compensated');
