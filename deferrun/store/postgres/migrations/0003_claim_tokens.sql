-- Version 3: a fencing token per claim (every outcome write is guarded on it), and the UDP
-- wake-up port column the SQLite backend always had, so one set of statements serves both.
ALTER TABLE deferrun_tasks ADD COLUMN IF NOT EXISTS claim_token bigint NOT NULL DEFAULT 0;
ALTER TABLE deferrun_processes ADD COLUMN IF NOT EXISTS wake_port integer;
