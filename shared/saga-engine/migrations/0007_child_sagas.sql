-- Child sagas: a step that starts a saga of another type and waits for
-- its outcome.

-- The parent saga and its step that started this one; NULL for a saga
-- started by anything else.
ALTER TABLE saga_instances ADD COLUMN parent_saga_id UUID REFERENCES saga_instances ON DELETE SET NULL;
ALTER TABLE saga_instances ADD COLUMN parent_step TEXT;
-- A parent reads its children when claimed, and its status shows them.
CREATE INDEX saga_instances_children ON saga_instances (parent_saga_id)
    WHERE parent_saga_id IS NOT NULL;
