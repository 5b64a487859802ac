-- Version 2: per-task log lines (worker and triggerer), bounded per task by the writer.
CREATE TABLE IF NOT EXISTS task_logs (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    at      REAL NOT NULL,
    source  TEXT NOT NULL,
    line    TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS task_logs_task ON task_logs (task_id, id);
