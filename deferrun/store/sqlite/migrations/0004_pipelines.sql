-- Version 4: pipelines. A task may wait on upstream tasks (trigger_rule over the deps rows),
-- start from a trigger (start_trigger) or be held back after a cancelled try (hold_until);
-- a trigger may watch another task (woken by the store when that task finishes).
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS trigger_rule TEXT;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS has_downstream INTEGER NOT NULL DEFAULT 0;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS retries INTEGER;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS start_trigger TEXT;
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS hold_until REAL;
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS watch_task_id TEXT;

CREATE TABLE IF NOT EXISTS deferrun_deps (
    task_id     TEXT NOT NULL,
    upstream_id TEXT NOT NULL,
    PRIMARY KEY (task_id, upstream_id)
);
CREATE INDEX IF NOT EXISTS deferrun_deps_upstream ON deferrun_deps (upstream_id);
CREATE INDEX IF NOT EXISTS deferrun_triggers_watch ON deferrun_triggers (watch_task_id)
    WHERE watch_task_id IS NOT NULL;
