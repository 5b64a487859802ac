"""Upkeep transitions: processes coming and going, reaping the dead, per-task log lines.

They use the task rules of :mod:`deferrun.store.machine` (a lost attempt ends like any failed
attempt; an expired deferral resumes like any fired trigger) and add none of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deferrun.core import serialization
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.models import TaskState
from deferrun.store import pipelines
from deferrun.store.machine import (
    EXPIRE_BATCH,
    LIVE_PROCESSES,
    REQUEUE,
    clean_text,
    end_in_failure,
    resume,
)
from deferrun.store.sql import Notify, Program, Query, run, run_many
from deferrun.store.trigger_claims import RELEASE_ALL_TRIGGERS

# -- processes and reaping ----------------------------------------------------------------

UPSERT_PROCESS = Query(
    "upsert_process",
    """INSERT INTO deferrun_processes (id, role, host, pid, queues, capacity, wake_port,
        started_at, heartbeat_at)
    VALUES (:id, :role, :host, :pid, :queues, :capacity, :wake_port, {now}, {now})
    ON CONFLICT (id) DO UPDATE SET heartbeat_at = excluded.heartbeat_at""",
)
HEARTBEAT = Query(
    "heartbeat",
    "UPDATE deferrun_processes SET heartbeat_at = {now}, loop_lag = :loop_lag WHERE id = :id "
    "RETURNING id",
)
REQUEUE_WORKER = Query(
    "requeue_worker",
    f"UPDATE deferrun_tasks SET {REQUEUE} WHERE state = 'running' AND worker_id = :worker_id "
    "RETURNING id",
)
DELETE_PROCESS = Query("delete_process", "DELETE FROM deferrun_processes WHERE id = :id")
REAP_LOST = Query(
    "reap_lost",
    f"""WITH lost AS (
        SELECT id FROM deferrun_tasks
        WHERE state = 'running'
          AND (worker_id IS NULL OR worker_id NOT IN ({LIVE_PROCESSES}))
        {{skip_locked}})
    UPDATE deferrun_tasks SET {
        end_in_failure(
            "'worker ' || coalesce(worker_id, '?') || ' stopped heartbeating for ' || "
            ":dead_after_text || 's while running try ' || try_number || "
            "' (killed, lost or hung); ' || CASE WHEN try_number < max_tries "
            "THEN 'retrying' ELSE 'no retries left' END"
        )
    }
    WHERE id IN (SELECT id FROM lost) RETURNING id, state, has_downstream""",
)
RELEASE_DEAD_TRIGGERERS = Query(
    "release_dead_triggerers",
    f"""UPDATE deferrun_triggers SET triggerer_id = NULL
    WHERE triggerer_id IS NOT NULL AND triggerer_id NOT IN ({LIVE_PROCESSES}) RETURNING id""",
)
EXPIRED = Query(
    "expired",
    f"""SELECT t.id, t.trigger_id,
        (SELECT g.classpath FROM deferrun_triggers g WHERE g.id = t.trigger_id),
        {{now}} - coalesce(
            (SELECT g.created_at FROM deferrun_triggers g WHERE g.id = t.trigger_id), {{now}})
    FROM deferrun_tasks t
    WHERE t.state = 'deferred' AND t.defer_deadline <= {{now}}
    ORDER BY t.defer_deadline LIMIT {EXPIRE_BATCH} {{skip_locked}}""",
)
DELETE_DEAD_PROCESSES = Query(
    "delete_dead_processes",
    "DELETE FROM deferrun_processes WHERE heartbeat_at < {now} - :dead_after RETURNING id",
)

# -- logs -------------------------------------------------------------------------------------

INSERT_LOG = Query(
    "insert_log",
    "INSERT INTO deferrun_task_logs (task_id, at, source, line) "
    "VALUES (:task_id, :at, :source, :line) {count}",
    many=True,
)
TRIM_LOGS = Query(
    "trim_logs",
    """DELETE FROM deferrun_task_logs WHERE task_id = :task_id AND id <= (
        SELECT id FROM deferrun_task_logs WHERE task_id = :task_id
        ORDER BY id DESC LIMIT 1 OFFSET :keep) {count}""",
    many=True,
)


# -- programs: one transaction each -----------------------------------------------------------


def deregister(process_id: str) -> Program[None]:
    """A graceful exit: hand back this process's triggers and unfinished attempts."""
    yield run(RELEASE_ALL_TRIGGERS, triggerer_id=process_id)
    yield run(REQUEUE_WORKER, worker_id=process_id)
    yield run(DELETE_PROCESS, id=process_id)
    yield Notify(("tasks", "triggers"))


def heartbeat(process: dict[str, Any]) -> Program[None]:
    rows = yield run(HEARTBEAT, id=process["id"], loop_lag=process.get("loop_lag"))
    if not rows:  # declared dead while we were alive: come back
        yield run(UPSERT_PROCESS, **process)


def register(process: dict[str, Any]) -> Program[None]:
    yield run(UPSERT_PROCESS, **process)


#: the reaping process's own heartbeat is recent: it is not itself just back from an outage
SELF_FRESH = Query(
    "self_fresh",
    "SELECT id FROM deferrun_processes WHERE id = :id AND heartbeat_at >= {now} - :fresh",
)


def reap(dead_after: float, report: Any, judge: str | None = None) -> Program[Any]:
    """Recover the work of silent processes and enforce deferral deadlines.

    With ``judge`` (the reaping process's id) nothing is judged unless that process's own
    heartbeat is under ``dead_after / 2`` old when the reap runs: a reap that waited on a
    locked database would otherwise judge others by heartbeats the lock held back.
    """
    if judge is not None:
        fresh = yield run(SELF_FRESH, id=judge, fresh=dead_after / 2)
        if not fresh:
            report.skipped = True
            return report
    lost = yield run(
        REAP_LOST, dead_after=dead_after, dead_after_text=f"{dead_after:g}", retry=True
    )
    report.retried = [r[0] for r in lost if r[1] == TaskState.UP_FOR_RETRY]
    report.failed = [r[0] for r in lost if r[1] == TaskState.FAILED]
    waited_on = [r[0] for r in lost if r[1] == TaskState.FAILED and r[2]]
    if waited_on:
        yield from pipelines.settle(waited_on)
    released = yield run(RELEASE_DEAD_TRIGGERERS, dead_after=dead_after)
    report.released_triggers = len(released)
    expired = yield run(EXPIRED)
    if expired:
        items = [
            (
                int(trigger_id),
                BaseOperator.DEFERRAL_TIMEOUT_METHOD,
                serialization.dumps(
                    {
                        "error": f"deferral timed out after {float(waited):.1f}s waiting for "
                        f"trigger {trigger_id} ({classpath or '?'})"
                    }
                ),
            )
            for _, trigger_id, classpath, waited in expired
            if trigger_id is not None
        ]
        if items:
            yield from resume(items)
        report.timed_out = [r[0] for r in expired if r[1] is not None]
    dead = yield run(DELETE_DEAD_PROCESSES, dead_after=dead_after)
    report.dead_processes = [r[0] for r in dead]
    wake: tuple[Any, ...] = ()
    if report.retried or report.timed_out:
        wake += ("tasks",)
    if report.released_triggers or report.timed_out:
        wake += ("triggers",)
    if wake:
        yield Notify(wake)
    return report


def append_logs(rows: Sequence[tuple[str, float, str, str]], keep: int) -> Program[None]:
    yield run_many(
        INSERT_LOG,
        [{"task_id": t, "at": a, "source": s, "line": clean_text(line)} for t, a, s, line in rows],
    )
    yield run_many(TRIM_LOGS, [{"task_id": t, "keep": keep} for t in {r[0] for r in rows}])
