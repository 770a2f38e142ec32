-- A parent waiting on its child saga is not stuck while the child runs.

-- Set when a saga is released waiting for a child saga that is running,
-- compensating or paused (it has no timer: the child's end wakes it).
-- Its progress is then the child's business: the child is flagged stuck
-- on its own, and the detector flags a waiting parent of a stuck child.
-- Cleared by the child's end (which also restarts the parent's progress
-- clock) and by the parent's next turn.
ALTER TABLE saga_instances ADD COLUMN awaits_child BOOLEAN NOT NULL DEFAULT false;
-- What detection reads: as in 0003, without the parents waiting on a
-- child, so that neither the flagging nor the detector's sleep (the least
-- progressed saga) passes over them, however many there are.
DROP INDEX saga_instances_unprogressed;
CREATE INDEX saga_instances_unprogressed ON saga_instances (progressed_at)
    WHERE state IN ('running', 'compensating') AND stuck_since IS NULL AND NOT awaits_child;
