-- Version 6 (issue 16): XCom values a task pushed (ti.xcom_push), JSON, one row per key.
CREATE TABLE IF NOT EXISTS deferrun_xcom (
    task_id  text NOT NULL,
    xcom_key text NOT NULL,
    value    text NOT NULL,
    PRIMARY KEY (task_id, xcom_key)
);
