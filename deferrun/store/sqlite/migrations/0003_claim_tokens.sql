-- Version 3: a fencing token per claim (every outcome write is guarded on it), and
-- PostgreSQL's table names, so that one set of statements serves both backends. An index
-- keeps its name through a table rename: the old-named ones are dropped and made anew.
DROP INDEX IF EXISTS tasks_runnable;
DROP INDEX IF EXISTS tasks_running;
DROP INDEX IF EXISTS tasks_defer_deadline;
DROP INDEX IF EXISTS tasks_state_created;
DROP INDEX IF EXISTS triggers_unclaimed;
DROP INDEX IF EXISTS triggers_owner;
DROP INDEX IF EXISTS task_logs_task;

ALTER TABLE tasks RENAME TO deferrun_tasks;
ALTER TABLE triggers RENAME TO deferrun_triggers;
ALTER TABLE processes RENAME TO deferrun_processes;
ALTER TABLE task_logs RENAME TO deferrun_task_logs;

ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS claim_token INTEGER NOT NULL DEFAULT 0;

CREATE INDEX IF NOT EXISTS deferrun_tasks_runnable ON deferrun_tasks (queue, ready_at)
    WHERE state IN ('queued', 'up_for_retry', 'up_for_reschedule');
CREATE INDEX IF NOT EXISTS deferrun_tasks_running ON deferrun_tasks (worker_id) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS deferrun_tasks_defer_deadline ON deferrun_tasks (defer_deadline)
    WHERE state = 'deferred' AND defer_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_created ON deferrun_tasks (state, created_at);
CREATE INDEX IF NOT EXISTS deferrun_triggers_unclaimed ON deferrun_triggers (queue, id) WHERE triggerer_id IS NULL;
CREATE INDEX IF NOT EXISTS deferrun_triggers_owner ON deferrun_triggers (triggerer_id);
CREATE INDEX IF NOT EXISTS deferrun_task_logs_task ON deferrun_task_logs (task_id, id);

-- Per-database values. 'wake_secret': random token every local UDP wake-up must carry, so
-- that other local users cannot drive a process's claim loop (created on open if missing).
-- An older release may have made this table already.
CREATE TABLE IF NOT EXISTS deferrun_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
