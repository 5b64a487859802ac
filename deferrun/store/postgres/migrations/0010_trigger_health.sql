-- Version 10 (issue 24): a trigger's health on its own row (bounded: no row per poll). The
-- triggerer holding it writes these in batches: consecutive failed polls, the last error
-- (redacted), and when a poll last succeeded (NULL: not since it was claimed).
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS poll_failures integer NOT NULL DEFAULT 0;
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS last_error text;
ALTER TABLE deferrun_triggers ADD COLUMN IF NOT EXISTS last_ok_at double precision;
-- the failing ones only: the status page and `deferrun triggers` list them without a scan
CREATE INDEX IF NOT EXISTS deferrun_triggers_failing ON deferrun_triggers (id)
    WHERE poll_failures > 0;
