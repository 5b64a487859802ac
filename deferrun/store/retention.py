"""Retention: delete finished tasks (with their log lines, dependency and trigger rows).

Written once, as store programs, for both backends. Each batch is its own short transaction
(select up to ``batch`` ids, delete their rows), so a clean of a million rows never holds a
lock for long: workers and triggerers keep claiming and resuming between batches.

A finished task is kept while something may still need it:

- a downstream task (``deferrun_deps``) has not ended, has ended too recently to be cleaned,
  or ended in a state this clean does not remove (its results are read from this task, and a
  re-run of it counts this task as an upstream);
- a trigger watches it (``TaskStateTrigger`` / ``TaskSensor``: ``watch_task_id``).
"""

from __future__ import annotations

from collections.abc import Sequence

from deferrun.core.models import FINISHED_STATES
from deferrun.store.sql import Program, Query, run, states_sql

FINISHED = states_sql(FINISHED_STATES)

_ELIGIBLE = f"""t.state IN_TEXTS(:states) AND t.finished_at < {{now}} - :older_than
      AND NOT EXISTS (
        SELECT 1 FROM deferrun_deps x JOIN deferrun_tasks d ON d.id = x.task_id
        WHERE x.upstream_id = t.id
          AND (d.state NOT IN {FINISHED} OR d.finished_at IS NULL
               OR d.finished_at >= {{now}} - :older_than OR NOT (d.state IN_TEXTS(:states))))
      AND NOT EXISTS (SELECT 1 FROM deferrun_triggers w WHERE w.watch_task_id = t.id)"""

# no ORDER BY: each batch takes the first eligible rows the (state, finished_at) index yields,
# so a batch costs the same whether 1,000 or 1,000,000 rows are eligible
CANDIDATES = Query(
    "clean_candidates",
    f"SELECT t.id FROM deferrun_tasks t WHERE {_ELIGIBLE} LIMIT :batch {{skip_locked}}",
)
COUNT_CANDIDATES = Query("clean_count", f"SELECT count(*) FROM deferrun_tasks t WHERE {_ELIGIBLE}")
DELETE_LOGS = Query("clean_logs", "DELETE FROM deferrun_task_logs WHERE task_id IN_TEXTS(:ids)")
DELETE_DEPS = Query(
    "clean_deps",
    "DELETE FROM deferrun_deps WHERE task_id IN_TEXTS(:ids) OR upstream_id IN_TEXTS(:ids)",
)
DELETE_XCOM = Query("clean_xcom", "DELETE FROM deferrun_xcom WHERE task_id IN_TEXTS(:ids)")
DELETE_TRIGGERS = Query(
    "clean_triggers", "DELETE FROM deferrun_triggers WHERE task_id IN_TEXTS(:ids)"
)
# the whole eligibility is re-checked by the DELETE itself (a downstream may have been
# submitted since the candidates were picked); only the rows it deleted lose their other rows
DELETE_TASKS = Query(
    "clean_tasks",
    "DELETE FROM deferrun_tasks WHERE id IN (SELECT t.id FROM deferrun_tasks t "
    f"WHERE t.id IN_TEXTS(:ids) AND {_ELIGIBLE}) RETURNING id",
)


def check_states(states: Sequence[str]) -> list[str]:
    """Only end states can be cleaned; anything else is a user error worth one line."""
    allowed = sorted(str(s) for s in FINISHED_STATES)
    wrong = [s for s in states if s not in allowed]
    if wrong:
        raise ValueError(
            f"cannot clean tasks in state {', '.join(wrong)}: only finished tasks are deleted "
            f"(states: {', '.join(allowed)})"
        )
    return sorted(set(states)) if states else allowed


def clean_batch(states: Sequence[str], older_than: float, batch: int) -> Program[int]:
    """Delete up to ``batch`` eligible finished tasks and their rows; how many were deleted."""
    params = {"states": list(states), "older_than": float(older_than)}
    rows = yield run(CANDIDATES, **params, batch=int(batch))
    ids = [r[0] for r in rows]
    if not ids:
        return 0
    deleted = [r[0] for r in (yield run(DELETE_TASKS, **params, ids=ids))]
    if deleted:
        yield run(DELETE_LOGS, ids=deleted)
        yield run(DELETE_DEPS, ids=deleted)
        yield run(DELETE_TRIGGERS, ids=deleted)
        yield run(DELETE_XCOM, ids=deleted)
    return len(deleted)
