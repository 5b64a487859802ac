-- Version 5 (issue 12): shared polls. Identical triggers (classpath + kwargs) share an
-- affinity key so claims keep them on one triggerer; poll_key names the shared poll a
-- trigger joins.
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS affinity text;
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS poll_key text;
CREATE INDEX IF NOT EXISTS deferrun_triggers_affinity ON deferrun_triggers (affinity, triggerer_id)
    WHERE affinity IS NOT NULL;

-- The first releases of version 4 made databases without start_trigger and hold_until
-- (added within version 4).
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS start_trigger text;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS hold_until double precision;
