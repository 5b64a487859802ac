-- deferrun schema for the embedded SQLite backend. Version 4. Every statement is idempotent; versions 1-2 used the
-- table names without the deferrun_ prefix and are renamed before this file runs.
-- Timestamps are REAL epoch seconds (UTC); JSON columns hold msgspec-encoded values.

CREATE TABLE IF NOT EXISTS deferrun_tasks (
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
    finished_at       REAL,
    claim_token       INTEGER NOT NULL DEFAULT 0,
    trigger_rule      TEXT,
    has_downstream    INTEGER NOT NULL DEFAULT 0,
    retries           INTEGER,
    start_trigger     TEXT,
    hold_until        REAL
);

CREATE INDEX IF NOT EXISTS deferrun_tasks_runnable ON deferrun_tasks (queue, ready_at)
    WHERE state IN ('queued', 'up_for_retry', 'up_for_reschedule');
CREATE INDEX IF NOT EXISTS deferrun_tasks_running ON deferrun_tasks (worker_id) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS deferrun_tasks_defer_deadline ON deferrun_tasks (defer_deadline)
    WHERE state = 'deferred' AND defer_deadline IS NOT NULL;
-- version 8: newest-first listing walks an index (keyset paging by (created_at, id))
CREATE INDEX IF NOT EXISTS deferrun_tasks_created ON deferrun_tasks (created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_created_id ON deferrun_tasks (state, created_at, id);

CREATE TABLE IF NOT EXISTS deferrun_triggers (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id      TEXT NOT NULL UNIQUE,
    classpath    TEXT NOT NULL,
    kwargs       TEXT NOT NULL,
    queue        TEXT NOT NULL,
    triggerer_id TEXT,
    deadline     REAL,
    created_at   REAL NOT NULL,
    watch_task_id TEXT,
    affinity     TEXT,
    poll_key     TEXT
);

CREATE INDEX IF NOT EXISTS deferrun_triggers_unclaimed ON deferrun_triggers (queue, id) WHERE triggerer_id IS NULL;
CREATE INDEX IF NOT EXISTS deferrun_triggers_unclaimed_id ON deferrun_triggers (id) WHERE triggerer_id IS NULL;
CREATE INDEX IF NOT EXISTS deferrun_triggers_owner ON deferrun_triggers (triggerer_id);

CREATE TABLE IF NOT EXISTS deferrun_processes (
    id           TEXT PRIMARY KEY,
    role         TEXT NOT NULL,
    host         TEXT NOT NULL,
    pid          INTEGER NOT NULL,
    queues       TEXT NOT NULL,
    capacity     INTEGER NOT NULL,
    wake_port    INTEGER,
    loop_lag     REAL,
    started_at   REAL NOT NULL,
    heartbeat_at REAL NOT NULL
);

-- Version 2: per-task log lines (worker and triggerer), bounded per task by the writer.
CREATE TABLE IF NOT EXISTS deferrun_task_logs (
    id      INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id TEXT NOT NULL,
    at      REAL NOT NULL,
    source  TEXT NOT NULL,
    line    TEXT NOT NULL
);

CREATE INDEX IF NOT EXISTS deferrun_task_logs_task ON deferrun_task_logs (task_id, id);

-- Per-database values. 'wake_secret': random token every local UDP wake-up must carry, so
-- that other local users cannot drive a process's claim loop (created on open if missing).
CREATE TABLE IF NOT EXISTS deferrun_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- Version 4: pipelines. A task may wait on upstream tasks (trigger_rule over the deps rows);
-- a trigger may watch another task (woken by the store when that task finishes).
CREATE TABLE IF NOT EXISTS deferrun_deps (
    task_id     TEXT NOT NULL,
    upstream_id TEXT NOT NULL,
    PRIMARY KEY (task_id, upstream_id)
);
CREATE INDEX IF NOT EXISTS deferrun_deps_upstream ON deferrun_deps (upstream_id);
CREATE INDEX IF NOT EXISTS deferrun_triggers_watch ON deferrun_triggers (watch_task_id)
    WHERE watch_task_id IS NOT NULL;
-- version 5 (issue 12): identical triggers share an affinity key (claimed together)
CREATE INDEX IF NOT EXISTS deferrun_triggers_affinity ON deferrun_triggers (affinity, triggerer_id)
    WHERE affinity IS NOT NULL;

-- Version 6 (issue 16): XCom values a task pushed (ti.xcom_push), JSON, one row per key.
CREATE TABLE IF NOT EXISTS deferrun_xcom (
    task_id  TEXT NOT NULL,
    xcom_key TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (task_id, xcom_key)
);

-- Version 7 (issue 13): the status page and retention. Keyset-paged task lists by time (all,
-- by name, by queue), and finished tasks by end time for `deferrun db clean`.
CREATE INDEX IF NOT EXISTS deferrun_tasks_created ON deferrun_tasks (created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_name_created ON deferrun_tasks (name, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_queue_created ON deferrun_tasks (queue, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_created_id ON deferrun_tasks (state, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_finished ON deferrun_tasks (state, finished_at);
