"""Tasks that wait on other tasks: trigger rules, settled in the transaction that ends a task.

A task submitted ``after`` upstream tasks is stored ``deferred`` with no trigger (it holds no
slot and nothing polls for it). Every transition that ends a task whose ``has_downstream`` is
set runs :func:`settle` in the same transaction: waiters whose rule now holds are queued,
waiters whose rule can no longer hold end ``upstream_failed`` or ``skipped`` (which settles
their own waiters in turn), and triggers watching the ended task (``TaskStateTrigger``) fire
with its final state. The rules are Airflow's; they are decided here, once, for both backends.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from deferrun.core import serialization
from deferrun.core.models import FINISHED_STATES, Deferral, NewTask, TaskState
from deferrun.exceptions import RetryRefused, TaskNotFound
from deferrun.store import machine, xcom
from deferrun.store.sql import Notify, Program, Query, run, run_many, states_sql

FINISHED = states_sql(FINISHED_STATES)

TRIGGER_RULES = (
    "all_success",
    "all_failed",
    "all_done",
    "one_success",
    "one_failed",
    "none_failed",
)
#: outcomes an upstream counts as failed for the rules (cancelled is a failure to downstreams)
_BAD = "('failed', 'upstream_failed', 'cancelled')"
WAITING = "state = 'deferred' AND trigger_id IS NULL AND trigger_rule IS NOT NULL"

INSERT_DEP = Query(
    "insert_dep",
    "INSERT INTO deferrun_deps (task_id, upstream_id) VALUES (:task_id, :upstream_id) {count}",
    many=True,
)
# also the existence check: the UPDATE locks each upstream row until the submit commits, so a
# concurrent `db clean` either skips the row (SKIP LOCKED) or deleted it first (no row: refused).
# The rows are locked in id order (byte order, as Python sorts): a worker that ends several
# of them in one transaction ends them in that order too (SqlStore.record_outcomes), so a
# fan-in over 2,000 upstreams and the workers ending them never deadlock.
MARK_WAITED_ON = Query(
    "mark_waited_on",
    """UPDATE deferrun_tasks SET has_downstream = true WHERE id IN (
        SELECT id FROM deferrun_tasks WHERE id IN_TEXTS(:ids) ORDER BY id{binary} {lock})
    RETURNING id""",
)
_WAITER_COUNTS = f"""SELECT d.id, d.trigger_rule, count(*),
        sum(CASE WHEN u.state = 'success' THEN 1 ELSE 0 END),
        sum(CASE WHEN u.state IN {_BAD} THEN 1 ELSE 0 END),
        sum(CASE WHEN u.state = 'skipped' THEN 1 ELSE 0 END)
    FROM deferrun_tasks d
    JOIN deferrun_deps x ON x.task_id = d.id
    JOIN deferrun_tasks u ON u.id = x.upstream_id
    WHERE d.id IN (SELECT task_id FROM deferrun_deps WHERE {{column}} IN_TEXTS(:ids))
      AND d.state = 'deferred' AND d.trigger_id IS NULL AND d.trigger_rule IS NOT NULL
    GROUP BY d.id, d.trigger_rule"""
# the same counts, for waiters named directly (a task just submitted)
# Locks the waiters first (PostgreSQL; in id order, so two settles never deadlock): an upstream
# ending in another transaction at the same moment then waits for this one to commit, and its
# own count, taken after, sees this upstream's end. Without it, two last upstreams ending
# together each counted the other as still running and the waiter was never released.
LOCK_BY_UPSTREAM = Query(
    "lock_by_upstream",
    f"""SELECT id, trigger_rule FROM deferrun_tasks
    WHERE id IN (SELECT task_id FROM deferrun_deps WHERE upstream_id IN_TEXTS(:ids))
      AND {WAITING}
    ORDER BY id{{binary}} {{lock}}""",
)
# waiters named directly, with or without dependency rows: one whose upstreams are all gone
# (deleted by an older `db clean`) is settled as a task without upstreams, not left waiting
LOCK_BY_ID = Query(
    "lock_by_id",
    f"""SELECT id, trigger_rule FROM deferrun_tasks WHERE id IN_TEXTS(:ids) AND {WAITING}
    ORDER BY id{{binary}} {{lock}}""",
)
WAITERS_BY_UPSTREAM = Query(
    "waiters_by_upstream", _WAITER_COUNTS.replace("{column}", "upstream_id")
)
WAITERS_BY_ID = Query("waiters_by_id", _WAITER_COUNTS.replace("{column}", "task_id"))
RELEASE = Query(
    "release_waiter",
    # a re-run (retry --downstream) counts a new try: up_for_retry is what claims count
    f"""UPDATE deferrun_tasks SET ready_at = {machine.READY_NOW}, updated_at = {{now}},
        state = CASE WHEN try_number = 0 THEN 'queued' ELSE 'up_for_retry' END
    WHERE id = :task_id AND {WAITING} {{count}}""",
    many=True,
)
END_WAITER = Query(
    "end_waiter",
    f"""UPDATE deferrun_tasks SET state = :state, error = :reason, updated_at = {{now}},
        finished_at = {{now}}
    WHERE id = :task_id AND {WAITING} {{count}}""",
    many=True,
)
WATCHERS = Query(
    "watchers",
    """SELECT g.id, t.id, t.state, t.result FROM deferrun_triggers g
    JOIN deferrun_tasks t ON t.id = g.watch_task_id
    WHERE g.watch_task_id IN_TEXTS(:ids)""",
)
UPSTREAM_RESULTS = Query(
    "upstream_results",
    """SELECT u.id, u.name, u.state, u.result FROM deferrun_deps x
    JOIN deferrun_tasks u ON u.id = x.upstream_id WHERE x.task_id = :task_id""",
)


DOWNSTREAM = Query(
    "downstream", "SELECT task_id FROM deferrun_deps WHERE upstream_id IN_TEXTS(:ids)"
)
UPSTREAM_IDS = Query(
    "upstream_ids", "SELECT upstream_id FROM deferrun_deps WHERE task_id = :task_id"
)
# worker_id is still set on a task cancelled while it ran: its attempt may run on until that
# worker notices, so the new try is held back until then (hold_until, read by READY_NOW)
_FRESH_TRY = """result = NULL, error = NULL, next_method = NULL, next_kwargs = NULL,
        event = NULL, finished_at = NULL, worker_id = NULL, updated_at = {now},
        max_tries = try_number + coalesce(retries, 0) + 1,
        hold_until = CASE WHEN worker_id IS NULL THEN NULL ELSE {now} + :stop_delay END"""
# locks the task (PostgreSQL): of two retries at once the second waits, then reads the state
# the first left and is refused (SQLite's write lock serializes them the same way)
RETRY_INFO = Query(
    "retry_info",
    "SELECT state, trigger_rule, start_trigger, worker_id FROM deferrun_tasks "
    "WHERE id = :task_id {lock}",
)
RETRY = Query(
    "retry",
    f"""UPDATE deferrun_tasks SET state = 'up_for_retry', {_FRESH_TRY},
        ready_at = {{now}} + CASE WHEN worker_id IS NULL THEN 0 ELSE :stop_delay END
    WHERE id = :task_id AND state IN {FINISHED} RETURNING id""",
)
#: what a re-run may re-arm: ended, still waiting, or queued but not started (never running)
_REARMABLE = f"""(state IN {FINISHED} OR ({WAITING})
        OR state IN ('queued', 'up_for_retry', 'up_for_reschedule'))"""
REARMABLE = Query(
    "rearmable",
    f"""SELECT id FROM deferrun_tasks WHERE id IN_TEXTS(:ids) AND trigger_rule IS NOT NULL
      AND {_REARMABLE} ORDER BY id{{binary}} {{lock}}""",
)
REARM_STARTED = Query(
    "rearm_started",
    f"""UPDATE deferrun_tasks SET state = 'deferred', ready_at = NULL, trigger_id = NULL,
        defer_deadline = NULL, {_FRESH_TRY}
    WHERE id = :task_id AND state IN {FINISHED} {{count}}""",
    many=True,
)
REARM = Query(
    "rearm",
    f"""UPDATE deferrun_tasks SET state = 'deferred', ready_at = NULL, trigger_id = NULL,
        defer_deadline = NULL, {_FRESH_TRY}
    WHERE id = :task_id AND {_REARMABLE} {{count}}""",
    many=True,
)


UPSTREAM_WAITS = Query(
    "upstream_waits",
    f"""SELECT x.task_id, t.trigger_rule, count(*),
        sum(CASE WHEN u.state IN {FINISHED} THEN 1 ELSE 0 END)
    FROM deferrun_deps x
    JOIN deferrun_tasks t ON t.id = x.task_id
    JOIN deferrun_tasks u ON u.id = x.upstream_id
    WHERE x.task_id IN_TEXTS(:ids)
    GROUP BY x.task_id, t.trigger_rule""",
)


def verdict(rule: str, total: int, ok: int, bad: int, skipped: int) -> TaskState | None:
    """What a waiter becomes: QUEUED (run it), an end state, or None (keep waiting).

    A task with no upstream (left: all deleted by an older clean) runs, whatever its rule, as
    in Airflow, where a task without upstream tasks always passes its trigger rule.
    """
    if total == 0:
        return TaskState.QUEUED
    done = ok + bad + skipped == total
    if rule == "all_success":
        if bad:
            return TaskState.UPSTREAM_FAILED
        if skipped:
            return TaskState.SKIPPED
        return TaskState.QUEUED if ok == total else None
    if rule == "all_failed":
        if ok or skipped:
            return TaskState.SKIPPED
        return TaskState.QUEUED if bad == total else None
    if rule == "all_done":
        return TaskState.QUEUED if done else None
    if rule == "one_success":
        if ok:
            return TaskState.QUEUED
        if done:
            return TaskState.UPSTREAM_FAILED if bad else TaskState.SKIPPED
        return None
    if rule == "one_failed":
        if bad:
            return TaskState.QUEUED
        return TaskState.SKIPPED if done else None
    if rule == "none_failed":
        if bad:
            return TaskState.UPSTREAM_FAILED
        return TaskState.QUEUED if done else None
    raise ValueError(f"unknown trigger_rule {rule!r}; use one of {', '.join(TRIGGER_RULES)}")


def _reason(rule: str, state: TaskState, ok: int, bad: int, skipped: int, total: int) -> str:
    return (
        f"trigger_rule {rule} can no longer hold: of {total} upstream tasks {ok} succeeded, "
        f"{bad} failed or were cancelled, {skipped} were skipped ({state})"
    )


def settle(ended: Sequence[str], *, by_id: bool = False) -> Program[int]:
    """Resolve everything that waits on the tasks ``ended`` (or, ``by_id``, those waiters).

    Runs inside the transaction that ended them, so a waiter is queued exactly when the
    upstream that satisfies its rule commits. Returns how many waiters were queued.
    """
    queued = 0
    frontier = list(ended)
    query = WAITERS_BY_ID if by_id else WAITERS_BY_UPSTREAM
    lock = LOCK_BY_ID if by_id else LOCK_BY_UPSTREAM
    while frontier:
        if not by_id:
            yield from fire_watchers(frontier)
        locked = yield run(lock, ids=frontier)
        rows = list((yield run(query, ids=frontier)))
        counted = {r[0] for r in rows}
        # a waiter with no upstream row left has no counts: nothing it waits on remains
        rows += [(w, rule, 0, 0, 0, 0) for w, rule in locked if w not in counted]
        release: list[dict[str, Any]] = []
        end: list[dict[str, Any]] = []
        for task_id, rule, total, ok, bad, skipped in rows:
            counts = (int(total), int(ok or 0), int(bad or 0), int(skipped or 0))
            state = verdict(rule, *counts)
            if state is TaskState.QUEUED:
                release.append({"task_id": task_id})
            elif state is not None:
                reason = _reason(rule, state, counts[1], counts[2], counts[3], counts[0])
                end.append({"task_id": task_id, "state": str(state), "reason": reason})
        if release:
            [(n,)] = yield run_many(RELEASE, release)
            queued += int(n)
        if end:
            yield run_many(END_WAITER, end)
        frontier = [e["task_id"] for e in end]
        query, lock = WAITERS_BY_UPSTREAM, LOCK_BY_UPSTREAM
        by_id = False
    if queued:
        yield Notify(("tasks",))
    return queued


def fire_watchers(ended: Sequence[str]) -> Program[None]:
    """Fire every trigger watching one of the ``ended`` tasks with that task's outcome."""
    rows = yield run(WATCHERS, ids=list(ended))
    if rows:
        items = [
            (int(trigger_id), None, _watch_event(task_id, state, result))
            for trigger_id, task_id, state, result in rows
        ]
        yield from machine.resume(items)


#: a watcher's event carries the watched result up to this size (each watcher gets a copy)
MAX_WATCHED_RESULT = 65536


def _watch_event(task_id: str, state: str, result: str | None) -> str:
    event: dict[str, Any] = {"task_id": task_id, "state": state}
    if result is None or len(result) <= MAX_WATCHED_RESULT:
        event["result"] = serialization.loads(result)
    else:  # read it from the task itself if needed: copying it to every watcher costs GBs
        event["result"] = None
        event["result_omitted"] = f"{len(result):,} bytes, over {MAX_WATCHED_RESULT:,}"
    return serialization.dumps(event)


def _refuse_cycles(tasks: Sequence[NewTask]) -> None:
    """A batch whose tasks wait on each other in a circle would wait forever: refuse it.

    Only a batch can hold a cycle: every other upstream already exists, and no existing task
    can come to wait on a new one.
    """
    inside = {t.id: [u for u in t.after] for t in tasks}
    waiting_on = {tid: {u for u in ups if u in inside} for tid, ups in inside.items()}
    ready = [tid for tid, ups in waiting_on.items() if not ups]
    done = 0
    while ready:
        tid = ready.pop()
        done += 1
        for other, ups in waiting_on.items():
            if tid in ups:
                ups.discard(tid)
                if not ups:
                    ready.append(other)
    if done < len(waiting_on):
        circle = sorted(tid for tid, ups in waiting_on.items() if ups)
        raise ValueError(
            f"these tasks wait on each other in a cycle and could never run: "
            f"{', '.join(circle[:5])}; a task can only wait on tasks submitted before it"
        )


def submit_waiting(
    tasks: Sequence[NewTask], insert: Query, params: Sequence[dict[str, Any]]
) -> Program[None]:
    """Insert tasks that wait on their ``after`` ids, refusing ids that do not exist.

    One statement of each kind for the whole batch (10,000 waiters are one transaction of a
    handful of statements), and an upstream may be another task of the same batch.
    """
    rows = []
    for task, p in zip(tasks, params, strict=True):
        if task.id in task.after:
            raise ValueError(f"task {task.id} cannot wait on itself")
        rule = task.trigger_rule or "all_success"
        if rule not in TRIGGER_RULES:
            raise ValueError(
                f"unknown trigger_rule {rule!r}; use one of {', '.join(TRIGGER_RULES)}"
            )
        rows.append({**p, "state": "deferred", "trigger_rule": rule})
    _refuse_cycles(tasks)
    yield run_many(insert, rows)
    upstream = sorted({u for t in tasks for u in t.after})
    found = {r[0] for r in (yield run(MARK_WAITED_ON, ids=upstream))}
    missing = [i for i in upstream if i not in found]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise TaskNotFound(
            f"cannot submit after unknown task id(s) {shown}; submit the upstream tasks "
            "first and pass the ids submit() returned"
        )
    deps = [{"task_id": t.id, "upstream_id": u} for t in tasks for u in sorted(set(t.after))]
    yield run_many(INSERT_DEP, deps)
    yield from settle([t.id for t in tasks], by_id=True)  # upstreams already ended count now


def retry(task_id: str, downstream: bool, stop_delay: float) -> Program[list[str]]:
    """Re-run a finished task with a fresh try, the way it first ran: a plain task is queued
    (after ``stop_delay`` if it was cancelled while running, so its old attempt has stopped),
    a task with upstreams waits on them again, a task that starts from a trigger waits on
    that trigger again. With ``downstream``, every task downstream of it that has ended,
    still waits or has not started is re-armed to wait again; a running one is left alone.
    Returns the ids put back, the task first."""
    rows = yield run(RETRY_INFO, task_id=task_id)
    if not rows:
        raise TaskNotFound(f"no task {task_id!r} in this database")
    state, rule, start, _ = rows[0]
    if state not in {str(s) for s in FINISHED_STATES}:
        raise RetryRefused(not_retryable(task_id, state))
    # its earlier try's XComs go with its result: a downstream task that reads it before the
    # new try ends must not see one try's return value gone and another's pushes kept
    yield run(xcom.CLEAR, task_id=task_id)
    held = {"task_id": task_id, "stop_delay": stop_delay}
    if rule is not None:
        yield run_many(REARM, [held])
    elif start is not None:
        yield run_many(REARM_STARTED, [held])
        yield from machine.start_from(task_id, Deferral(**serialization.loads(start)))
    else:
        yield run(RETRY, task_id=task_id, stop_delay=stop_delay)
    touched = [task_id]
    if downstream:
        seen: set[str] = {task_id}
        frontier = [task_id]
        while frontier:  # everything downstream, read first
            down = yield run(DOWNSTREAM, ids=frontier)
            frontier = sorted({r[0] for r in down} - seen)
            seen.update(frontier)
        below = sorted(seen - {task_id})
        if below:
            # locked in id order, as settle() locks waiters: the two can never deadlock
            ready = [r[0] for r in (yield run(REARMABLE, ids=below))]
            if ready:
                yield run_many(REARM, [{"task_id": t, "stop_delay": stop_delay} for t in ready])
                touched += ready
    # every task put back waiting is settled now: its upstreams may all have ended (or be gone)
    waiting = touched if rule is not None else touched[1:]
    if waiting:
        yield from settle(waiting, by_id=True)
    yield Notify(("tasks", "triggers"))
    return touched


def not_retryable(task_id: str, state: str) -> str:
    """The one line a refused retry answers (client, CLI and status page alike)."""
    return (
        f"task {task_id} is {state}, not finished: already retried, or still running; retry "
        "it again once it has ended (cancel it first to stop it)"
    )


def upstream_results(rows: Sequence[Any]) -> dict[str, Any]:
    """``context["upstream"]``: each upstream by task id, and by name where names are unique."""
    out: dict[str, Any] = {}
    names: dict[str, int] = {}
    for task_id, name, state, result in rows:
        entry = {"task_id": task_id, "name": name, "state": state}
        entry["result"] = serialization.loads(result) if result is not None else None
        out[task_id] = entry
        names[name] = names.get(name, 0) + 1
    for entry in list(out.values()):
        if names[entry["name"]] == 1 and entry["name"] not in out:
            out[entry["name"]] = entry
    return out
