"""Retention: delete finished tasks (with their log lines, dependency and trigger rows).

Written once, as store programs, for both backends. Each batch is its own short transaction
(select up to ``batch`` ids, delete their rows), so a clean of a million rows never holds a
lock for long: workers and triggerers keep claiming and resuming between batches.

A finished task is kept while something may still need it:

- any task downstream of it (``deferrun_deps``) is still there: a pipeline is deleted from its
  last tasks up, so a task kept for any reason (not ended, ended too recently, in a state this
  clean does not remove, watched) keeps every task above it, and a re-run of it still finds
  its upstreams' outcomes and results. Checking only that no dependency row names it keeps
  each candidate's test one index probe, however large the table;
- a trigger watches it (``TaskStateTrigger`` / ``TaskSensor``: ``watch_task_id``).
"""

from __future__ import annotations

from collections.abc import Sequence

from deferrun.core.models import FINISHED_STATES
from deferrun.store.sql import Program, Query, run, states_sql

FINISHED = states_sql(FINISHED_STATES)

_ELIGIBLE = """t.state IN_TEXTS(:states) AND t.finished_at < {now} - :older_than
      AND NOT EXISTS (SELECT 1 FROM deferrun_deps x WHERE x.upstream_id = t.id)
      AND NOT EXISTS (SELECT 1 FROM deferrun_triggers w WHERE w.watch_task_id = t.id)"""
#: a task this clean keeps for its own sake (its upstreams are then kept too)
_KEPT_ITSELF = f"""(d.state NOT IN {FINISHED} OR NOT (d.state IN_TEXTS(:states))
        OR d.finished_at IS NULL OR d.finished_at >= {{now}} - :older_than
        OR EXISTS (SELECT 1 FROM deferrun_triggers w WHERE w.watch_task_id = d.id))"""

# no ORDER BY: each batch takes the first eligible rows the (state, finished_at) index yields,
# so a batch costs the same whether 1,000 or 1,000,000 rows are eligible
CANDIDATES = Query(
    "clean_candidates",
    f"SELECT t.id FROM deferrun_tasks t WHERE {_ELIGIBLE} LIMIT :batch {{skip_locked}}",
)
# after a level is deleted, the tasks just above it are looked at by id, not by walking the
# index again: a chain of 1,000 ended tasks costs 1,000 look-ups, not 1,000 index walks
CANDIDATES_BY_ID = Query(
    "clean_candidates_by_id",
    f"SELECT t.id FROM deferrun_tasks t WHERE t.id IN_TEXTS(:ids) AND {_ELIGIBLE} "
    "LIMIT :batch {skip_locked}",
)
UPSTREAMS_OF = Query(
    "clean_upstreams_of",
    "SELECT DISTINCT upstream_id FROM deferrun_deps WHERE task_id IN_TEXTS(:ids)",
)
# a dry run counts what the batches would delete, level after level: every task eligible for
# its own sake except the upstreams, at any depth, of a task kept for its own sake
COUNT_CANDIDATES = Query(
    "clean_count",
    f"""WITH RECURSIVE kept(id) AS (
        SELECT x.upstream_id FROM deferrun_deps x JOIN deferrun_tasks d ON d.id = x.task_id
        WHERE {_KEPT_ITSELF}
      UNION
        SELECT x.upstream_id FROM deferrun_deps x JOIN kept k ON x.task_id = k.id)
    SELECT count(*) FROM deferrun_tasks t
    WHERE t.state IN_TEXTS(:states) AND t.finished_at < {{now}} - :older_than
      AND NOT EXISTS (SELECT 1 FROM deferrun_triggers w WHERE w.watch_task_id = t.id)
      AND t.id NOT IN (SELECT id FROM kept)""",
)
DELETE_LOGS = Query("clean_logs", "DELETE FROM deferrun_task_logs WHERE task_id IN_TEXTS(:ids)")
# only the deleted tasks' own rows: no row names a deleted task as upstream (_ELIGIBLE)
DELETE_DEPS = Query("clean_deps", "DELETE FROM deferrun_deps WHERE task_id IN_TEXTS(:ids)")
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
    """Delete up to ``batch`` eligible finished tasks and their rows; how many were deleted.

    Deleting the last tasks of a pipeline makes the ones above them eligible: the batch goes
    on, a level at a time, until it is full or nothing is left to delete.
    """
    params = {"states": list(states), "older_than": float(older_than)}
    total = 0
    above: list[str] = []  # upstreams of the level just deleted: maybe eligible now
    while total < batch:
        if above:
            rows = yield run(CANDIDATES_BY_ID, **params, ids=above, batch=int(batch - total))
            above = []
            if not rows:
                continue  # none of them: walk the index for the rest
        else:
            rows = yield run(CANDIDATES, **params, batch=int(batch - total))
            if not rows:
                break
        ids = [r[0] for r in rows]
        if total + len(ids) < batch:  # room left in this batch for the level above
            above = [r[0] for r in (yield run(UPSTREAMS_OF, ids=ids))]
        deleted = [r[0] for r in (yield run(DELETE_TASKS, **params, ids=ids))]
        if not deleted:  # each candidate changed meanwhile: the next batch looks again
            break
        yield run(DELETE_LOGS, ids=deleted)
        yield run(DELETE_DEPS, ids=deleted)
        yield run(DELETE_TRIGGERS, ids=deleted)
        yield run(DELETE_XCOM, ids=deleted)
        total += len(deleted)
    return total
