-- Version 2: per-task log lines (worker and triggerer), bounded per task by the writer.
CREATE TABLE IF NOT EXISTS deferrun_task_logs (
    id      bigserial PRIMARY KEY,
    task_id text NOT NULL,
    at      double precision NOT NULL,
    source  text NOT NULL,
    line    text NOT NULL
);

CREATE INDEX IF NOT EXISTS deferrun_task_logs_task ON deferrun_task_logs (task_id, id);
