"""The task state machine, written once for every backend.

Each rule lives here exactly once: who may write a transition (its fence), what it does to
``try_number`` and ``claim_token``, when a failure is retried, and whom it wakes. The
programs below are transaction bodies (see :mod:`deferrun.store.sql`); the backends only
run them.

States: queued -> running -> (success | failed | skipped | up_for_retry | up_for_reschedule |
deferred); deferred -> queued (its trigger fired, failed or timed out); anything unfinished
-> cancelled. ``claim_token`` grows by one on every claim and fences every write of that
attempt's outcome; ``try_number`` grows only when a claim starts a new try.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from deferrun.core import serialization
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.models import (
    FINISHED_STATES,
    ClaimedTask,
    Deferral,
    NewTask,
    TaskState,
)
from deferrun.exceptions import TaskNotFound
from deferrun.store import pipelines
from deferrun.store.sql import Notify, Program, Query, Row, run, run_each, run_many, states_sql

#: an error text kept in a task row is cut to this many characters (its head and its tail)
MAX_ERROR_CHARS = 65536
#: at most this many deadlines are enforced per maintenance pass (the next pass takes the rest)
EXPIRE_BATCH = 5000


FINISHED = states_sql(FINISHED_STATES)
#: Written exactly as the partial index deferrun_tasks_runnable's WHERE (same order): SQLite
#: uses a partial index only for a term identical to its own, and otherwise claimed through
#: the (queue, created_at) listing index, reading and sorting every row of the queue.
RUNNABLE = "('queued', 'up_for_retry', 'up_for_reschedule')"
LIVE_PROCESSES = "SELECT id FROM deferrun_processes WHERE heartbeat_at >= {now} - :dead_after"

# -- the rules --------------------------------------------------------------------------------

#: Only the attempt that holds the task may write its outcome.
FENCE = "id = :task_id AND state = 'running' AND claim_token = :claim_token"

#: A claim starts a new try when the task is new, was up for retry, or starts (again) from its
#: start trigger; resumes and reschedules continue the same try.
_NEW_TRY = (
    f"(state = 'up_for_retry' OR try_number = 0 OR next_method = '{BaseOperator.START_METHOD}')"
)
CLAIM = f"""
    state = 'running', worker_id = :worker_id, ready_at = NULL, updated_at = {{now}},
    try_number = CASE WHEN {_NEW_TRY} THEN try_number + 1 ELSE try_number END,
    try_started_at = CASE WHEN {_NEW_TRY} THEN {{now}} ELSE try_started_at END,
    started_at = coalesce(started_at, {{now}}),
    claim_token = claim_token + 1"""

#: A failed attempt is retried when the failure allows it and tries remain, else it fails.
_RETRYING = "(:retry AND try_number < max_tries)"


def end_in_failure(error: str) -> str:
    return f"""
    state = CASE WHEN {_RETRYING} THEN 'up_for_retry' ELSE 'failed' END,
    ready_at = CASE WHEN {_RETRYING} THEN {{now}} + retry_delay END,
    finished_at = CASE WHEN {_RETRYING} THEN NULL ELSE {{now}} END,
    next_method = NULL, next_kwargs = NULL, event = NULL,
    worker_id = NULL, error = {error}, updated_at = {{now}}"""


#: Back on the queue, same try (the worker stopped before the attempt ended).
REQUEUE = "state = 'queued', ready_at = {now}, worker_id = NULL, updated_at = {now}"

#: When a task becomes runnable from waiting: now, unless a retry holds it back until an
#: attempt cancelled while it ran has surely stopped (hold_until).
READY_NOW = "CASE WHEN hold_until > {now} THEN hold_until ELSE {now} END"

#: A deferred task resumes exactly once: only while it still waits on this very trigger.
#: ``:method`` NULL keeps the operator's resume method and kwargs; otherwise the wait failed.
RESUME = Query(
    "resume",
    f"""UPDATE deferrun_tasks SET state = 'queued', event = :event, ready_at = {READY_NOW},
        trigger_id = NULL, defer_deadline = NULL, updated_at = {{now}},
        next_method = coalesce(:method, next_method),
        next_kwargs = CASE WHEN :method IS NULL THEN next_kwargs END
    WHERE id = (SELECT task_id FROM deferrun_triggers WHERE id = :trigger_id)
      AND state = 'deferred' AND trigger_id = :trigger_id {{count}}""",
    many=True,
)
DROP_TRIGGER = Query(
    "drop_trigger", "DELETE FROM deferrun_triggers WHERE id = :trigger_id {count}", many=True
)

# -- statements -------------------------------------------------------------------------------

_CLAIMED = """id, name, classpath, kwargs, queue, try_number, max_tries, retry_delay,
    execution_timeout, next_method, next_kwargs, event, try_started_at, created_at, claim_token,
    trigger_rule,
    EXISTS (SELECT 1 FROM deferrun_xcom x WHERE x.task_id = deferrun_tasks.id)"""


def _claim_tasks(name: str, queue_match: str) -> Query:
    return Query(
        name,
        f"""WITH picked AS (
            SELECT id FROM deferrun_tasks
            WHERE state IN {RUNNABLE} AND {queue_match} AND ready_at <= {{now}}
            ORDER BY ready_at LIMIT :limit {{skip_locked}})
        UPDATE deferrun_tasks SET {CLAIM}
        WHERE id IN (SELECT id FROM picked)
        RETURNING {_CLAIMED}""",
    )


# One queue is an equality so the (queue, ready_at) index is walked in order and stops at
# LIMIT; a list match makes PostgreSQL read and sort every runnable row (measured).
CLAIM_ONE_QUEUE = _claim_tasks("claim_one_queue", "queue = :queue")
CLAIM_QUEUES = _claim_tasks("claim_queues", "queue IN_TEXTS(:queues)")

INSERT_TASK = Query(
    "insert_task",
    """INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state, max_tries,
        retry_delay, execution_timeout, ready_at, created_at, updated_at, trigger_rule, retries,
        start_trigger)
    VALUES (:id, :name, :classpath, :kwargs, :queue, :state, :max_tries, :retry_delay,
        :execution_timeout, CASE WHEN :state = 'queued' THEN {now} END, {now}, {now},
        :trigger_rule, :max_tries - 1, :start_trigger) {count}""",
    many=True,
)
COMPLETE = Query(
    "complete",
    f"""UPDATE deferrun_tasks SET state = 'success', result = :result, error = NULL,
        worker_id = NULL, updated_at = {{now}}, finished_at = {{now}}
    WHERE {FENCE} RETURNING id, has_downstream, claim_token""",
)
FAIL = Query(
    "fail",
    f"UPDATE deferrun_tasks SET {end_in_failure(':error')} WHERE {FENCE} "
    "RETURNING state, has_downstream",
)
SKIP = Query(
    "skip",
    f"""UPDATE deferrun_tasks SET state = 'skipped', error = :reason, worker_id = NULL,
        updated_at = {{now}}, finished_at = {{now}}
    WHERE {FENCE} RETURNING id, has_downstream""",
)
RESCHEDULE = Query(
    "reschedule",
    f"""UPDATE deferrun_tasks SET state = 'up_for_reschedule', ready_at = {{now}} + :delay,
        worker_id = NULL, updated_at = {{now}}
    WHERE {FENCE} RETURNING id""",
)
REQUEUE_ATTEMPT = Query(
    "requeue_attempt", f"UPDATE deferrun_tasks SET {REQUEUE} WHERE {FENCE} RETURNING id"
)
DROP_TASK_TRIGGER = Query(
    "drop_task_trigger", "DELETE FROM deferrun_triggers WHERE task_id = :task_id"
)
DEFER_INSERT_TRIGGER = Query(
    "defer_insert_trigger",
    # Locks the task row (PostgreSQL) so a cancel cannot slip between this and DEFER_TASK;
    # "WHERE true" lets SQLite parse an upsert after a SELECT.
    f"""INSERT INTO deferrun_triggers (task_id, classpath, kwargs, queue, deadline, created_at,
        watch_task_id, affinity, poll_key)
    SELECT id, :classpath, :kwargs, queue, {{now}} + :timeout, {{now}}, :watch_task_id,
        :affinity, :poll_key
    FROM deferrun_tasks WHERE {FENCE} AND true {{lock}}
    ON CONFLICT (task_id) DO UPDATE SET classpath = excluded.classpath,
        kwargs = excluded.kwargs, queue = excluded.queue, deadline = excluded.deadline,
        created_at = excluded.created_at, triggerer_id = NULL,
        watch_task_id = excluded.watch_task_id, affinity = excluded.affinity,
        poll_key = excluded.poll_key
    RETURNING id""",
)
DEFER_TASK = Query(
    "defer_task",
    f"""UPDATE deferrun_tasks SET state = 'deferred', worker_id = NULL,
        next_method = :method_name, next_kwargs = :method_kwargs, event = NULL,
        trigger_id = :trigger_id, defer_deadline = {{now}} + :timeout, updated_at = {{now}}
    WHERE {FENCE} RETURNING id""",
)
CANCEL = Query(
    "cancel",
    # worker_id stays on a running task: its attempt may run on until that worker notices,
    # and a retry waits for that (pipelines.RETRY)
    f"""UPDATE deferrun_tasks SET state = 'cancelled', error = 'cancelled by user',
        worker_id = CASE WHEN state = 'running' THEN worker_id END,
        trigger_id = NULL, defer_deadline = NULL, ready_at = NULL,
        updated_at = {{now}}, finished_at = {{now}}
    WHERE id = :task_id AND state NOT IN {FINISHED} RETURNING id, has_downstream""",
)
#: a task that starts from a trigger: stored deferred on it before its first try
START_TRIGGER = Query(
    "start_trigger",
    """INSERT INTO deferrun_triggers (task_id, classpath, kwargs, queue, deadline, created_at,
        watch_task_id, affinity, poll_key)
    SELECT id, :classpath, :kwargs, queue, {now} + :timeout, {now}, :watch_task_id,
        :affinity, :poll_key
    FROM deferrun_tasks WHERE id = :task_id
    RETURNING id""",
)
START_WAITING = Query(
    "start_waiting",
    f"""UPDATE deferrun_tasks SET next_method = '{BaseOperator.START_METHOD}',
        next_kwargs = '{{{{}}}}', trigger_id = :trigger_id, defer_deadline = {{now}} + :timeout
    WHERE id = :task_id AND state = 'deferred' RETURNING id""",
)
WATCHED = Query(
    "watched",
    f"""UPDATE deferrun_tasks SET has_downstream = true WHERE id = :task_id
    RETURNING state IN {FINISHED}""",
)
#: a trigger ended its task itself (TaskSuccessEvent / TaskFailedEvent / TaskSkippedEvent)
END_FROM_TRIGGER = Query(
    "end_from_trigger",
    """UPDATE deferrun_tasks SET state = :state, result = :result, error = :error,
        trigger_id = NULL, defer_deadline = NULL, updated_at = {now}, finished_at = {now}
    WHERE id = (SELECT task_id FROM deferrun_triggers WHERE id = :trigger_id)
      AND state = 'deferred' AND trigger_id = :trigger_id
    RETURNING id, has_downstream""",
)

# -- programs: one transaction each -----------------------------------------------------------


def clean_text(text: str | None) -> str | None:
    """Text any backend can store: PostgreSQL refuses NUL, and no driver encodes surrogates."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def stored_error(text: str | None) -> str | None:
    """An error or reason as a task row keeps it: text any backend stores (see
    :func:`clean_text`), cut to its head and tail past ``MAX_ERROR_CHARS`` so a huge traceback
    cannot clog the writes it rides in. Every stored error goes through here."""
    text = clean_text(text)
    if text is not None and len(text) > MAX_ERROR_CHARS:
        text = text[: MAX_ERROR_CHARS // 2] + "\n...[truncated]...\n" + text[-4096:]
    return text


def _one(rows: list[Row]) -> bool:
    return len(rows) == 1


def _task_params(
    t: NewTask, state: str = "queued", start_trigger: str | None = None
) -> dict[str, Any]:
    return {
        "id": t.id,
        "name": t.name,
        "classpath": t.classpath,
        "kwargs": t.kwargs,
        "queue": t.queue,
        "max_tries": t.max_tries,
        "retry_delay": t.retry_delay,
        "execution_timeout": t.execution_timeout,
        "state": state,
        "trigger_rule": None,
        "start_trigger": start_trigger,
    }


def submit(tasks: Sequence[NewTask]) -> Program[None]:
    """Insert tasks: plain ones queued at once, the rest waiting on upstreams or a trigger."""
    plain = [_task_params(t) for t in tasks if not t.after and t.start is None]
    if plain:
        yield run_many(INSERT_TASK, plain)
    for t in tasks:
        if t.after and t.start is not None:
            raise ValueError(
                f"task {t.name}: a task starts either after upstream tasks or from a trigger, "
                "not both; put the trigger on a task of its own"
            )
    for t in tasks:  # before the waiters: a waiter of this batch may name one as upstream
        if t.start is not None:
            yield from _submit_started(t, t.start)
    waiting = [t for t in tasks if t.after]
    if waiting:
        params = [_task_params(t) for t in waiting]
        yield from pipelines.submit_waiting(waiting, INSERT_TASK, params)
    yield Notify(("tasks", "triggers"))


def _submit_started(task: NewTask, start: Deferral) -> Program[None]:
    """A task that starts from a trigger: deferred on it before its first try."""
    spec = serialization.dumps(msgspec.structs.asdict(start))
    yield run_many(INSERT_TASK, [_task_params(task, state="deferred", start_trigger=spec)])
    yield from start_from(task.id, start)


def start_from(task_id: str, start: Deferral) -> Program[None]:
    """Put a deferred task on its start trigger (at submit, and again on a re-run)."""
    timeout = None if start.timeout is None else float(start.timeout)
    params = {
        "task_id": task_id,
        "timeout": timeout,
        "watch_task_id": start.watch_task_id,
        "affinity": start.affinity,
        "poll_key": start.poll_key,
    }
    [(trigger_id,)] = yield run(
        START_TRIGGER, **params, classpath=start.classpath, kwargs=start.kwargs
    )
    yield run(START_WAITING, task_id=task_id, trigger_id=int(trigger_id), timeout=timeout)
    yield from _watch(start.watch_task_id)


def _watch(watched: str | None) -> Program[None]:
    """A trigger watches ``watched``: mark it, and fire at once if it already ended."""
    if watched is not None:
        rows = yield run(WATCHED, task_id=watched)
        if not rows:
            raise TaskNotFound(f"cannot wait on unknown task id {watched}")
        if rows[0][0]:
            yield from pipelines.fire_watchers([watched])


def _ended(rows: list[Row]) -> Program[None]:
    """After a statement that ended a task (RETURNING id, has_downstream): settle its waiters."""
    ended = [r[0] for r in rows if r[1]]
    if ended:
        yield from pipelines.settle(ended)


def claim_tasks(worker_id: str, queues: Sequence[str], limit: int) -> Program[list[ClaimedTask]]:
    if len(queues) == 1:
        rows = yield run(CLAIM_ONE_QUEUE, worker_id=worker_id, queue=queues[0], limit=limit)
    else:
        rows = yield run(CLAIM_QUEUES, worker_id=worker_id, queues=list(queues), limit=limit)
    return [ClaimedTask(*r) for r in rows]


def complete(task_id: str, claim_token: int, result: str | None) -> Program[bool]:
    rows = yield run(COMPLETE, task_id=task_id, claim_token=claim_token, result=result)
    yield from _ended(rows)
    return _one(rows)


def complete_each(items: Sequence[tuple[str, int, str | None]]) -> Program[list[bool]]:
    """Several attempts' completions, (task_id, claim_token, result) each: one statement per
    item, each fenced on its own claim, sent together; whether each one was ours."""
    rows = yield run_each(
        COMPLETE, [{"task_id": t, "claim_token": c, "result": r} for t, c, r in items]
    )
    yield from _ended(rows)
    done = {(r[0], int(r[2])) for r in rows}
    return [(t, c) in done for t, c, _ in items]


def fail(task_id: str, claim_token: int, error: str, retry: bool) -> Program[TaskState | None]:
    rows = yield run(
        FAIL, task_id=task_id, claim_token=claim_token, error=stored_error(error), retry=retry
    )
    if not rows:
        return None
    state = TaskState(rows[0][0])
    if state is TaskState.UP_FOR_RETRY:
        yield Notify(("tasks",))
    elif rows[0][1]:
        yield from pipelines.settle([task_id])
    return state


def skip(task_id: str, claim_token: int, reason: str | None) -> Program[bool]:
    rows = yield run(SKIP, task_id=task_id, claim_token=claim_token, reason=stored_error(reason))
    yield from _ended(rows)
    return _one(rows)


def reschedule(task_id: str, claim_token: int, delay: float) -> Program[bool]:
    rows = yield run(
        RESCHEDULE, task_id=task_id, claim_token=claim_token, delay=max(float(delay), 0.0)
    )
    if rows:
        yield Notify(("tasks",))
    return _one(rows)


def requeue(task_id: str, claim_token: int) -> Program[bool]:
    rows = yield run(REQUEUE_ATTEMPT, task_id=task_id, claim_token=claim_token)
    if rows:
        yield Notify(("tasks",))
    return _one(rows)


def defer(task_id: str, claim_token: int, deferral: Deferral) -> Program[int | None]:
    if deferral.watch_task_id == task_id:
        raise ValueError(f"task {task_id} cannot wait on its own end (TaskStateTrigger on itself)")
    fence = {"task_id": task_id, "claim_token": claim_token}
    timeout = None if deferral.timeout is None else float(deferral.timeout)
    rows = yield run(
        DEFER_INSERT_TRIGGER,
        **fence,
        classpath=deferral.classpath,
        kwargs=deferral.kwargs,
        timeout=timeout,
        watch_task_id=deferral.watch_task_id,
        affinity=deferral.affinity,
        poll_key=deferral.poll_key,
    )
    if not rows:
        return None
    trigger_id = int(rows[0][0])
    yield run(
        DEFER_TASK,
        **fence,
        method_name=deferral.method_name,
        method_kwargs=deferral.method_kwargs,
        trigger_id=trigger_id,
        timeout=timeout,
    )
    yield from _watch(deferral.watch_task_id)
    yield Notify(("triggers",))
    return trigger_id


def together(
    programs: Sequence[Program[Any]], then: Program[Any] | None = None
) -> Program[tuple[list[Any], Any]]:
    """Several attempts' outcome writes in one transaction (group commit across slots), then
    ``then`` (the claim of the slots they free) in the same transaction.

    Each program keeps its own fence: a write fenced off changes nothing and returns what it
    would alone. Any error aborts them all; the caller then writes them one by one.
    """
    results: list[Any] = []
    for program in programs:
        results.append((yield from program))
    after = (yield from then) if then is not None else None
    return results, after


def cancel(task_id: str) -> Program[bool]:
    rows = yield run(CANCEL, task_id=task_id)
    yield run(DROP_TASK_TRIGGER, task_id=task_id)
    if rows:
        yield from _ended(rows)  # cancelling propagates in the same transaction
        yield Notify(("tasks", "triggers"))
    return _one(rows)


def end_from_triggers(items: Sequence[tuple[int, str, str | None, str | None]]) -> Program[int]:
    """Triggers that ended their task themselves: (trigger_id, state, result JSON, error)."""
    ended: list[Row] = []
    for trigger_id, state, result, error in items:
        ended += yield run(
            END_FROM_TRIGGER,
            trigger_id=trigger_id,
            state=state,
            result=result,
            error=stored_error(error),
        )
    yield run_many(DROP_TRIGGER, [{"trigger_id": t} for t, _, _, _ in items])
    yield from _ended(ended)
    return len(ended)


def resume(items: Sequence[tuple[int, str | None, str]]) -> Program[int]:
    """Resume deferred tasks with (trigger_id, failure method or None, event JSON)."""
    rows = yield run_many(RESUME, [{"trigger_id": t, "method": m, "event": e} for t, m, e in items])
    yield run_many(DROP_TRIGGER, [{"trigger_id": t} for t, _, _ in items])
    resumed = int(rows[0][0])
    if resumed:
        yield Notify(("tasks",))
    return resumed
