-- deferrun schema for the PostgreSQL backend. Version 9 (every statement is idempotent: applying this file upgrades any older version).
-- Times are double precision epoch seconds, taken from the database server's clock so that
-- hosts with skewed clocks still agree on heartbeats and due times. JSON is stored as text,
-- exactly as serialized.

CREATE TABLE IF NOT EXISTS deferrun_tasks (
    id                text PRIMARY KEY,
    name              text NOT NULL,
    classpath         text NOT NULL,
    kwargs            text NOT NULL,
    queue             text NOT NULL,
    state             text NOT NULL,
    try_number        integer NOT NULL DEFAULT 0,
    max_tries         integer NOT NULL,
    retry_delay       double precision NOT NULL,
    execution_timeout double precision,
    ready_at          double precision,
    worker_id         text,
    next_method       text,
    next_kwargs       text,
    event             text,
    trigger_id        bigint,
    defer_deadline    double precision,
    result            text,
    error             text,
    created_at        double precision NOT NULL,
    try_started_at    double precision,
    started_at        double precision,
    updated_at        double precision NOT NULL,
    finished_at       double precision,
    claim_token       bigint NOT NULL DEFAULT 0
);

CREATE INDEX IF NOT EXISTS deferrun_tasks_runnable ON deferrun_tasks (queue, ready_at)
    WHERE state IN ('queued', 'up_for_retry', 'up_for_reschedule');
CREATE INDEX IF NOT EXISTS deferrun_tasks_running ON deferrun_tasks (worker_id)
    WHERE state = 'running';
CREATE INDEX IF NOT EXISTS deferrun_tasks_defer_deadline ON deferrun_tasks (defer_deadline)
    WHERE state = 'deferred' AND defer_deadline IS NOT NULL;
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_created ON deferrun_tasks (state, created_at);

CREATE TABLE IF NOT EXISTS deferrun_triggers (
    id           bigserial PRIMARY KEY,
    task_id      text NOT NULL UNIQUE,
    classpath    text NOT NULL,
    kwargs       text NOT NULL,
    queue        text NOT NULL,
    triggerer_id text,
    deadline     double precision,
    created_at   double precision NOT NULL
);

CREATE INDEX IF NOT EXISTS deferrun_triggers_unclaimed ON deferrun_triggers (queue, id)
    WHERE triggerer_id IS NULL;
CREATE INDEX IF NOT EXISTS deferrun_triggers_owner ON deferrun_triggers (triggerer_id);

CREATE TABLE IF NOT EXISTS deferrun_processes (
    id           text PRIMARY KEY,
    role         text NOT NULL,
    host         text NOT NULL,
    pid          integer NOT NULL,
    queues       text NOT NULL,
    capacity     integer NOT NULL,
    wake_port    integer,
    started_at   double precision NOT NULL,
    heartbeat_at double precision NOT NULL
);

-- Version 2: per-task log lines (worker and triggerer), bounded per task by the writer.
CREATE TABLE IF NOT EXISTS deferrun_task_logs (
    id      bigserial PRIMARY KEY,
    task_id text NOT NULL,
    at      double precision NOT NULL,
    source  text NOT NULL,
    line    text NOT NULL
);

CREATE INDEX IF NOT EXISTS deferrun_task_logs_task ON deferrun_task_logs (task_id, id);

-- Version 3: a fencing token per claim (every outcome write is guarded on it).
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS claim_token bigint NOT NULL DEFAULT 0;
ALTER TABLE deferrun_processes ADD COLUMN IF NOT EXISTS wake_port integer;

-- Version 4: pipelines. A task may wait on upstream tasks (trigger_rule over the deps rows);
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

-- version 5 (issue 12): shared polls. Identical triggers (classpath + kwargs) share an affinity
-- key so claims keep them on one triggerer; poll_key names the shared poll a trigger joins.
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS affinity text;
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS poll_key text;
CREATE INDEX IF NOT EXISTS deferrun_triggers_affinity ON deferrun_triggers (affinity, triggerer_id)
    WHERE affinity IS NOT NULL;

-- version 6 (issue 16): XCom values a task pushed (ti.xcom_push), JSON, one row per key.
CREATE TABLE IF NOT EXISTS deferrun_xcom (
    task_id  text NOT NULL,
    xcom_key text NOT NULL,
    value    text NOT NULL,
    PRIMARY KEY (task_id, xcom_key)
);

-- version 7 (issue 13): the status page and retention. Each process's recent event-loop lag;
-- keyset-paged task lists by time (all, by name, by queue); finished tasks by end time.
ALTER TABLE deferrun_processes ADD COLUMN IF NOT EXISTS loop_lag double precision;
CREATE INDEX IF NOT EXISTS deferrun_tasks_created ON deferrun_tasks (created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_name_created ON deferrun_tasks (name, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_queue_created ON deferrun_tasks (queue, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_created_id ON deferrun_tasks (state, created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_finished ON deferrun_tasks (state, finished_at);

-- version 8 (issue 15): newest-first task listing walks an index (keyset paging by
-- (created_at, id)) instead of sorting every row; the state index gains the id tiebreak.
CREATE INDEX IF NOT EXISTS deferrun_tasks_created ON deferrun_tasks (created_at, id);
CREATE INDEX IF NOT EXISTS deferrun_tasks_state_created_id ON deferrun_tasks (state, created_at, id);
DROP INDEX IF EXISTS deferrun_tasks_state_created;

-- version 9 (issue 15): unclaimed triggers in id order, so a claim takes the oldest across all
-- queues (FIFO) by walking unclaimed rows only, never the primary key past claimed ones.
CREATE INDEX IF NOT EXISTS deferrun_triggers_unclaimed_id ON deferrun_triggers (id)
    WHERE triggerer_id IS NULL;
