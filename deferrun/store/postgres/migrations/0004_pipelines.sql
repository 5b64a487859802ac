-- Version 4: pipelines. A task may wait on upstream tasks (trigger_rule over the deps rows),
-- start from a trigger (start_trigger) or be held back after a cancelled try (hold_until);
-- a trigger may watch another task (woken by the store when that task finishes).
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS trigger_rule text;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS has_downstream boolean NOT NULL DEFAULT false;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS retries integer;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS start_trigger text;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS hold_until double precision;
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS watch_task_id text;

CREATE TABLE IF NOT EXISTS deferrun_deps (
    task_id     text NOT NULL,
    upstream_id text NOT NULL,
    PRIMARY KEY (task_id, upstream_id)
);
CREATE INDEX IF NOT EXISTS deferrun_deps_upstream ON deferrun_deps (upstream_id);
CREATE INDEX IF NOT EXISTS deferrun_triggers_watch ON deferrun_triggers (watch_task_id)
    WHERE watch_task_id IS NOT NULL;

-- The first release of version 3 made databases without wake_port (added within version 3).
ALTER TABLE deferrun_processes ADD COLUMN IF NOT EXISTS wake_port integer;
