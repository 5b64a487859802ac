-- Version 7 (issue 13): the status page and retention. Each process's recent event-loop lag;
-- keyset-paged task lists by time (all, by name, by queue, by state); finished tasks by end
-- time for `deferrun db clean`.
ALTER TABLE deferrun_processes ADD COLUMN IF NOT EXISTS loop_lag double precision;
CREATE INDEX IF NOT EXISTS deferrun_tasks_created ON deferrun_tasks (created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_name_created ON deferrun_tasks (name, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_queue_created ON deferrun_tasks (queue, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_created_id ON deferrun_tasks (state, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_finished ON deferrun_tasks (state, finished_at);
