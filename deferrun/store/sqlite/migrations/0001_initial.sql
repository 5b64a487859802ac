-- deferrun schema for the embedded SQLite backend. Version 1.
-- Timestamps are REAL epoch seconds (UTC); JSON columns hold msgspec-encoded values.

CREATE TABLE IF NOT EXISTS tasks (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    classpath         TEXT NOT NULL,
    kwargs            TEXT NOT NULL,
    queue             TEXT NOT NULL,
    state             TEXT NOT NULL,
    try_number        INTEGER NOT NULL DEFAULT 0,
    max_tries         INTEGER NOT NULL,
    retry_delay       REAL NOT NULL,
    execution_timeout REAL,
    ready_at          REAL,
    worker_id         TEXT,
    next_method       TEXT,
    next_kwargs       TEXT,
    event             TEXT,
    trigger_id        INTEGER,
    defer_deadline    REAL,
    result            TEXT,
    error             TEXT,
    created_at        REAL NOT NULL,
    try_started_at    REAL,
    started_at        REAL,
    updated_at        REAL NOT NULL,
    finished_at       REAL
);

CREATE INDEX IF NOT EXISTS tasks_runnable ON tasks (queue, ready_at)
    WHERE state IN ('queued', 'up_for_retry', 'up_for_reschedule');
CREATE INDEX IF NOT EXISTS tasks_running ON tasks (worker_id) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS tasks_defer_deadline ON tasks (defer_deadline)
    WHERE state = 'deferred' AND defer_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_state_created ON tasks (state, created_at);

CREATE TABLE IF NOT EXISTS triggers (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id      TEXT NOT NULL UNIQUE,
    classpath    TEXT NOT NULL,
    kwargs       TEXT NOT NULL,
    queue        TEXT NOT NULL,
    triggerer_id TEXT,
    deadline     REAL,
    created_at   REAL NOT NULL
);

CREATE INDEX IF NOT EXISTS triggers_unclaimed ON triggers (queue, id) WHERE triggerer_id IS NULL;
CREATE INDEX IF NOT EXISTS triggers_owner ON triggers (triggerer_id);

CREATE TABLE IF NOT EXISTS processes (
    id           TEXT PRIMARY KEY,
    role         TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    queues       TEXT NOT NULL,
    capacity     INTEGER NOT NULL,
    wake_port    INTEGER,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);
