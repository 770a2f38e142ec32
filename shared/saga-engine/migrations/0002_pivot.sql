-- The point of no return, and outcomes nobody heard.

-- Set in the transaction that writes ahead the pivot step's first attempt;
-- cleared only if the pivot is refused for certain. While set, the saga only
-- goes forward: compensation requests are refused (under this row's lock, so
-- a request and the pivot's first attempt can never both go ahead).
ALTER TABLE saga_instances ADD COLUMN forward_only_since TIMESTAMPTZ;
-- A step that cannot give up (the pivot, or one after it) and is past its
-- deadline: it is retried on, and flagged here for operators until it
-- succeeds.
ALTER TABLE saga_instances ADD COLUMN overdue_step TEXT;
ALTER TABLE saga_instances ADD COLUMN overdue_since TIMESTAMPTZ;
CREATE INDEX saga_instances_overdue ON saga_instances (overdue_since)
    WHERE overdue_since IS NOT NULL;

-- The last attempt's answer was lost (timed out, cancelled, connection
-- broke): it may have taken effect. Cleared by the next definite answer.
ALTER TABLE saga_steps ADD COLUMN outcome_unknown BOOLEAN NOT NULL DEFAULT false;
