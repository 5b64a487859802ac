-- deferrun schema for the PostgreSQL backend. Version 1.
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
    finished_at       double precision
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
    started_at   double precision NOT NULL,
    heartbeat_at double precision NOT NULL
);
