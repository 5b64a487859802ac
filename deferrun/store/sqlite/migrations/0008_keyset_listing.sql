-- Version 8 (issue 15): newest-first task listing walks the (created_at, id) and
-- (state, created_at, id) indexes of version 7 instead of sorting every row; the state
-- index without the id tiebreak goes.
DROP INDEX IF EXISTS deferrun_tasks_state_created;
