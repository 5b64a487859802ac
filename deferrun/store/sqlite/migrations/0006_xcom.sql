-- Version 6 (issue 16): XCom values a task pushed (ti.xcom_push), JSON, one row per key.
CREATE TABLE IF NOT EXISTS deferrun_xcom (
    task_id  TEXT NOT NULL,
    xcom_key TEXT NOT NULL,
    value    TEXT NOT NULL,
    PRIMARY KEY (task_id, xcom_key)
);
