-- Version 9 (issue 15): unclaimed triggers in id order, so a claim takes the oldest across all
-- queues (FIFO) by walking unclaimed rows only, never the primary key past claimed ones.
CREATE INDEX IF NOT EXISTS deferrun_triggers_unclaimed_id ON deferrun_triggers (id)
    WHERE triggerer_id IS NULL;

-- The first release of version 8 came before version 7 and made databases without its
-- column and indexes (the (created_at, id) ones it made itself).
ALTER TABLE deferrun_processes ADD COLUMN IF NOT EXISTS loop_lag REAL;
CREATE INDEX IF NOT EXISTS deferrun_tasks_name_created ON deferrun_tasks (name, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_queue_created ON deferrun_tasks (queue, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_finished ON deferrun_tasks (state, finished_at);

-- Databases made by development builds between releases (branches whose versions 6 to 8 came
-- before versions 5 and 6 were merged) lack the shared-poll columns and index of version 5 and
-- the XCom table of version 6: made sure of here, as for every version-9 database.
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS affinity TEXT;
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS poll_key TEXT;
CREATE INDEX IF NOT EXISTS deferrun_triggers_affinity ON deferrun_triggers (affinity, triggerer_id)
    WHERE affinity IS NOT NULL;
CREATE TABLE IF NOT EXISTS deferrun_xcom (
    task_id  TEXT NOT NULL,
    xcom_key TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (task_id, xcom_key)
);
