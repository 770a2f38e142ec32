-- Operators' controls (pause, resume, terminate) and stuck-saga detection.

-- Two states of their own: paused (waits for ResumeSaga) and terminated
-- (stopped for good by an operator, without compensating; final).
ALTER TABLE saga_instances DROP CONSTRAINT saga_instances_state_check;
ALTER TABLE saga_instances ADD CONSTRAINT saga_instances_state_check
    CHECK (state IN ('running', 'compensating', 'completed', 'compensated', 'failed', 'paused', 'terminated'));
-- A pause accepted while a replica drives the saga: that replica pauses it
-- at its next turn boundary (an attempt in flight finishes first).
ALTER TABLE saga_instances ADD COLUMN pause_requested_at TIMESTAMPTZ;
-- While paused: since when (the deadlines of unfinished steps move on by
-- the time paused), and the state resuming returns it to.
ALTER TABLE saga_instances ADD COLUMN paused_at TIMESTAMPTZ;
ALTER TABLE saga_instances ADD COLUMN paused_from TEXT CHECK (paused_from IN ('running', 'compensating'));
-- Terminated: the steps that may have taken effect and were not
-- compensated, which the operator acknowledged (NULL or empty: none).
ALTER TABLE saga_instances ADD COLUMN left_in_effect TEXT[];

-- Progress: when a step last succeeded or the saga last changed state. A
-- running or compensating saga without progress for SAGA_STUCK_AFTER, or
-- with a step past its deadline, is stuck: flagged here once (by whichever
-- replica sees it first), cleared when it progresses again.
ALTER TABLE saga_instances ADD COLUMN progressed_at TIMESTAMPTZ NOT NULL DEFAULT now();
ALTER TABLE saga_instances ADD COLUMN stuck_since TIMESTAMPTZ;
ALTER TABLE saga_instances ADD COLUMN stuck_reason TEXT;
-- What detection reads: only the sagas that may become stuck, oldest
-- progress first; finished history is never in it.
CREATE INDEX saga_instances_unprogressed ON saga_instances (progressed_at)
    WHERE state IN ('running', 'compensating') AND stuck_since IS NULL;
CREATE INDEX saga_instances_stuck ON saga_instances (stuck_since) WHERE stuck_since IS NOT NULL;

-- Sagas not yet final now include paused ones: this replaces the index of
-- 0001 (whose states it covers, so its queries still use it).
CREATE INDEX saga_instances_unfinished ON saga_instances (created_at, saga_id)
    WHERE state IN ('running', 'compensating', 'paused', 'failed');
DROP INDEX saga_instances_active;
