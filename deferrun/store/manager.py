"""One store for every backend: the state machine's programs run through a connector.

:class:`SqlStore` implements :class:`~deferrun.store.base.Store` once. Everything a backend
does differently (driver, transactions, migrations, how wake-ups travel) sits behind the small
:class:`Connector` protocol, so a rule fixed here is fixed on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Sequence
from typing import Any, Protocol

import anyio

from deferrun.core import serialization
from deferrun.core.models import (
    ClaimedTask,
    ClaimedTrigger,
    Deferral,
    NewTask,
    ProcessInfo,
    TaskInfo,
    TaskState,
    TriggerInfo,
    UpstreamWait,
    ts,
)
from deferrun.exceptions import StoreUnavailable, TaskNotFound
from deferrun.store import machine, maintenance, pipelines, trigger_claims, xcom
from deferrun.store.base import ROLE_CHANNEL, Channel, ReapReport, Role, Wakeup, is_deadlock
from deferrun.store.observe import Observe
from deferrun.store.rows import TASK_INFO_COLUMNS, load_or_raw, task_info
from deferrun.store.sql import Program, Query, R, Row
from deferrun.store.xcom import XComWrite, with_xcoms

_TASK_INFO = (
    f"SELECT {TASK_INFO_COLUMNS} FROM deferrun_tasks t "
    "LEFT JOIN deferrun_triggers g ON g.id = t.trigger_id"
)
GET_TASK = Query("get_task", _TASK_INFO + " WHERE t.id = :task_id")
_NEWEST_FIRST = " ORDER BY t.created_at DESC, t.id DESC LIMIT :limit"
#: keyset paging: the page after the row (:before_at, :before), walking the (created_at, id)
#: index (schema v8); the key is given, not looked up, so a deleted row still ends a page
_AFTER = "(t.created_at, t.id) < (:before_at, :before)"
TASK_CREATED = Query("task_created", "SELECT created_at FROM deferrun_tasks WHERE id = :task_id")
LIST_TASKS = Query("list_tasks", _TASK_INFO + _NEWEST_FIRST)
LIST_TASKS_IN_STATE = Query(
    "list_tasks_in_state", _TASK_INFO + " WHERE t.state = :state" + _NEWEST_FIRST
)
LIST_TASKS_BEFORE = Query("list_tasks_before", _TASK_INFO + f" WHERE {_AFTER}" + _NEWEST_FIRST)
LIST_TASKS_IN_STATE_BEFORE = Query(
    "list_tasks_in_state_before",
    _TASK_INFO + f" WHERE t.state = :state AND {_AFTER}" + _NEWEST_FIRST,
)
COUNT_TASKS = Query("count_tasks", "SELECT state, count(*) FROM deferrun_tasks GROUP BY state")
# The first entry of the runnable index, not min(): PostgreSQL aggregated every runnable row
# (2.5 ms at 5,000 queued, a tenth of the database's CPU in a 10,000-task burst drain)
NEXT_DUE_ONE = Query(
    "next_due_one",
    f"SELECT ready_at - {{now}} FROM deferrun_tasks "
    f"WHERE state IN {machine.RUNNABLE} AND queue = :queue ORDER BY ready_at LIMIT 1",
)
NEXT_DUE = Query(
    "next_due",
    f"SELECT min(ready_at) - {{now}} FROM deferrun_tasks "
    f"WHERE state IN {machine.RUNNABLE} AND queue IN_TEXTS(:queues)",
)
OWNED_CLAIMS = Query(
    "owned_claims",
    "SELECT id, claim_token FROM deferrun_tasks WHERE state = 'running' AND worker_id = :worker_id",
)
OWNED_STEP = 50_000
#: how often a submit that lost a deadlock is run again before the caller is told
SUBMIT_TRIES = 5
OWNED_TRIGGERS = Query(
    "owned_triggers", "SELECT id FROM deferrun_triggers WHERE triggerer_id = :triggerer_id"
)
OWNED_TRIGGERS_SUM = Query(
    "owned_triggers_sum",
    "SELECT count(*), coalesce(sum(id), 0) FROM deferrun_triggers "
    "WHERE triggerer_id = :triggerer_id",
)
LIST_TRIGGERS = Query(
    "list_triggers",
    "SELECT id, task_id, classpath, kwargs, queue, triggerer_id, created_at, deadline, "
    "affinity, poll_key FROM deferrun_triggers ORDER BY id",
)
LIST_PROCESSES = Query(
    "list_processes",
    "SELECT id, role, host, pid, queues, capacity, started_at, heartbeat_at, "
    "heartbeat_at >= {now} - :dead_after FROM deferrun_processes ORDER BY role, started_at",
)
TASK_LOGS = Query(
    "task_logs",
    "SELECT at, source, line FROM (SELECT id, at, source, line FROM deferrun_task_logs "
    "WHERE task_id = :task_id ORDER BY id DESC LIMIT :limit) newest ORDER BY at, id",
)


class Connector(Protocol):
    """What a backend provides: a driver, transactions, schema and wake-ups."""

    url: str

    async def open(self) -> None:
        """Connect, and create or migrate the schema (safe when several processes start)."""

    async def close(self) -> None: ...

    async def transact(self, program: Program[R], *, atomic: bool = True) -> R:
        """Run ``program`` as one transaction, delivering its Notify steps after commit.

        ``atomic=False`` says the program's statements are each complete on their own (one
        statement and a wake-up, or claims that may commit separately): a backend may then
        skip the transaction's extra round trips.
        """

    async def fetch(self, query: Query, **params: Any) -> list[Row]:
        """One read outside any write transaction."""

    async def listen(self, process_id: str, channel: Channel) -> tuple[Wakeup, int | None]:
        """Start delivering ``channel`` wake-ups to this process; the port others reach it on."""

    async def unlisten(self, process_id: str) -> None: ...

    async def upkeep(self) -> None:
        """Called at every heartbeat: re-establish listeners, refresh whom to wake."""


class SqlStore(Observe):
    """The :class:`~deferrun.store.base.Store` of every SQL backend."""

    def __init__(self, connector: Connector, *, dead_after: float = 10.0) -> None:
        self.db = connector
        self.url = connector.url
        self.dead_after = dead_after
        self._processes: dict[str, dict[str, Any]] = {}
        #: every wake-up reaches its listener: idle loops may poll rarely (config.idle_poll)
        self.reliable_wakeups: bool = getattr(connector, "reliable_wakeups", False)
        #: transactions of several processes proceed at once (not SQLite's one write lock)
        self.concurrent_writes: bool = getattr(connector, "concurrent_writes", False)

    async def open(self) -> None:
        await self.db.open()

    async def close(self) -> None:
        await self.db.close()

    # -- processes and liveness ---------------------------------------------------------------

    async def register_process(
        self, process_id: str, role: Role, queues: Sequence[str], capacity: int
    ) -> Wakeup:
        wakeup, port = await self.db.listen(process_id, ROLE_CHANNEL[role])
        process = {
            "id": process_id,
            "role": role,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "queues": serialization.dumps(list(queues)),
            "capacity": capacity,
            "wake_port": port,
        }
        self._processes[process_id] = process
        await self.db.transact(maintenance.register(process), atomic=False)
        await self.db.upkeep()
        return wakeup

    async def heartbeat(self, process_id: str, loop_lag: float | None = None) -> None:
        process = self._processes.get(process_id)
        if process is not None:
            process["loop_lag"] = loop_lag  # shown on the status page
            await self.db.transact(maintenance.heartbeat(process), atomic=False)
        await self.db.upkeep()

    async def deregister_process(self, process_id: str) -> None:
        await self.db.transact(maintenance.deregister(process_id))
        self._processes.pop(process_id, None)
        await self.db.unlisten(process_id)

    async def reap(self, dead_after: float, judge: str | None = None) -> ReapReport:
        report: ReapReport = await self.db.transact(
            maintenance.reap(dead_after, ReapReport(), judge)
        )
        return report

    async def list_processes(self) -> list[ProcessInfo]:
        rows = await self.db.fetch(LIST_PROCESSES, dead_after=self.dead_after)
        return [
            ProcessInfo(
                id=r[0],
                role=r[1],
                host=r[2],
                pid=r[3],
                queues=serialization.loads(r[4]),
                capacity=r[5],
                started_at=ts(r[6]),
                heartbeat_at=ts(r[7]),
                alive=bool(r[8]),
            )
            for r in rows
        ]

    # -- tasks --------------------------------------------------------------------------------

    async def submit(self, task: NewTask) -> None:
        await self.submit_many([task])

    async def submit_many(self, tasks: Sequence[NewTask]) -> None:
        """One transaction; a deadlock it loses (a fan-in's upstreams locked by a writer that
        does not take them in id order: a reap, a cancel) is rolled back and run again."""
        if not tasks:
            return
        for attempt in range(1, SUBMIT_TRIES + 1):
            try:
                await self.db.transact(machine.submit(tasks))
                return
            except Exception as exc:
                if not is_deadlock(exc):
                    raise
                if attempt == SUBMIT_TRIES:
                    raise StoreUnavailable(
                        f"submit of {len(tasks)} task(s) lost a lock conflict with concurrent "
                        f"writes {SUBMIT_TRIES} times (deadlock; nothing was stored); submit "
                        "them again"
                    ) from exc
                await anyio.sleep(0.02 * attempt)

    async def claim_tasks(
        self, worker_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTask]:
        if limit <= 0 or not queues:
            return []
        return await self.db.transact(machine.claim_tasks(worker_id, queues, limit), atomic=False)

    async def next_due(self, queues: Sequence[str]) -> float | None:
        """When (local clock) the earliest retry or reschedule comes due."""
        if not queues:
            return None
        if len(queues) == 1:
            rows = await self.db.fetch(NEXT_DUE_ONE, queue=queues[0])
        else:
            rows = await self.db.fetch(NEXT_DUE, queues=list(queues))
        if not rows or rows[0][0] is None:
            return None
        return time.time() + float(rows[0][0])

    async def complete_task(
        self, task_id: str, claim_token: int, result: str | None, xcoms: XComWrite | None = None
    ) -> bool:
        # atomic: ending a task and settling what waits on it must commit together
        program = machine.complete(task_id, claim_token, result)
        return await self.db.transact(with_xcoms(task_id, claim_token, xcoms, program))

    async def fail_task(
        self,
        task_id: str,
        claim_token: int,
        error: str,
        *,
        retry: bool,
        xcoms: XComWrite | None = None,
    ) -> TaskState | None:
        program = machine.fail(task_id, claim_token, error, retry)
        return await self.db.transact(with_xcoms(task_id, claim_token, xcoms, program))

    async def skip_task(
        self, task_id: str, claim_token: int, reason: str | None, xcoms: XComWrite | None = None
    ) -> bool:
        program = machine.skip(task_id, claim_token, reason)
        return await self.db.transact(with_xcoms(task_id, claim_token, xcoms, program))

    async def reschedule_task(
        self, task_id: str, claim_token: int, delay: float, xcoms: XComWrite | None = None
    ) -> bool:
        program = machine.reschedule(task_id, claim_token, delay)
        return await self.db.transact(
            with_xcoms(task_id, claim_token, xcoms, program), atomic=xcoms is not None
        )

    async def defer_task(
        self, task_id: str, claim_token: int, deferral: Deferral, xcoms: XComWrite | None = None
    ) -> int | None:
        program = machine.defer(task_id, claim_token, deferral)
        return await self.db.transact(with_xcoms(task_id, claim_token, xcoms, program))

    async def record_outcomes(
        self,
        writes: Sequence[tuple[str, tuple[Any, ...], XComWrite | None]],
        claim: tuple[str, Sequence[str], int] | None = None,
    ) -> tuple[list[Any], list[ClaimedTask]]:
        """Outcome writes of several attempts, ``(kind, args, xcoms)`` each, in one
        transaction, and with ``claim`` = (worker_id, queues, limit) the claim of the slots
        they free.

        ``kind`` names the single-write method (complete, fail, skip, reschedule, defer,
        requeue); ``args`` start with (task_id, claim_token); each write carries its attempt's
        XComs as the single-write method would. The result list holds what each of those
        would have returned.
        """
        programs = {
            "complete": machine.complete,
            "fail": machine.fail,
            "skip": machine.skip,
            "reschedule": machine.reschedule,
            "defer": machine.defer,
            "requeue": machine.requeue,
        }
        then = None
        if claim is not None and claim[2] > 0 and claim[1]:
            then = machine.claim_tasks(*claim)
        # the rows are written in task id order (byte order), the order a fan-in submit locks
        # its upstreams in (pipelines.MARK_WAITED_ON): the two never deadlock. Runs of plain
        # completions (no XComs) go as one batch of statements: one round trip each.
        groups: list[tuple[bool, list[int]]] = []
        for i in sorted(range(len(writes)), key=lambda i: str(writes[i][1][0])):
            kind, _, xcoms = writes[i]
            plain = kind == "complete" and not xcoms
            if plain and groups and groups[-1][0]:
                groups[-1][1].append(i)
            else:
                groups.append((plain, [i]))
        steps: list[Program[Any]] = []
        for _plain, group in groups:
            if len(group) > 1:
                steps.append(machine.complete_each([writes[i][1] for i in group]))  # type: ignore[misc]
            else:
                kind, args, xcoms = writes[group[0]]
                steps.append(with_xcoms(args[0], args[1], xcoms, programs[kind](*args)))
        answers, claimed = await self.db.transact(machine.together(steps, then))
        results: list[Any] = [None] * len(writes)
        for (_, group), answer in zip(groups, answers, strict=True):
            for i, one in zip(group, answer if len(group) > 1 else [answer], strict=True):
                results[i] = one
        return results, claimed or []

    async def requeue_task(self, task_id: str, claim_token: int) -> bool:
        return await self.db.transact(machine.requeue(task_id, claim_token), atomic=False)

    async def owned_claims(self, worker_id: str) -> set[tuple[str, int]]:
        rows = await self.db.fetch(OWNED_CLAIMS, worker_id=worker_id)
        return {(r[0], int(r[1])) for r in rows}

    async def retry_task(self, task_id: str, *, downstream: bool = False) -> list[str]:
        # a task cancelled while it ran may still run on its worker until that worker's next
        # ownership check (a heartbeat): its new try waits that long
        return await self.db.transact(
            pipelines.retry(task_id, downstream, stop_delay=self.dead_after / 2)
        )

    async def upstream_results(self, task_id: str) -> dict[str, Any]:
        return pipelines.upstream_results(
            await self.db.fetch(pipelines.UPSTREAM_RESULTS, task_id=task_id)
        )

    async def load_xcoms(self, task_id: str) -> dict[str, dict[str, str]]:
        """XCom JSON by task id and key: the task's own and its upstream tasks'."""
        out: dict[str, dict[str, str]] = {}
        for owner, key, value in await self.db.fetch(xcom.LOAD, task_id=task_id):
            out.setdefault(owner, {})[key] = value
        return out

    async def write_xcoms(
        self, task_id: str, claim_token: int, values: dict[str, str], *, clear: bool
    ) -> bool:
        """Store an attempt's pushed XComs, fenced on its claim; False if it lost the task."""
        return await self.db.transact(xcom.write(task_id, claim_token, values, clear))

    async def dependencies(self, task_id: str) -> tuple[list[str], list[str]]:
        """(upstream ids, downstream ids) of a task."""
        up = await self.db.fetch(pipelines.UPSTREAM_IDS, task_id=task_id)
        down = await self.db.fetch(pipelines.DOWNSTREAM, ids=[task_id])
        return [r[0] for r in up], [r[0] for r in down]

    async def upstream_waits(self, ids: Sequence[str]) -> dict[str, UpstreamWait]:
        rows = await self.db.fetch(pipelines.UPSTREAM_WAITS, ids=list(ids))
        return {
            task_id: UpstreamWait(rule or "all_success", int(total), int(ended or 0))
            for task_id, rule, total, ended in rows
        }

    async def end_triggers(self, items: Sequence[tuple[int, str, str | None, str | None]]) -> int:
        """Triggers that ended their own task: (trigger_id, state, result JSON, error)."""
        if not items:
            return 0
        return await self.db.transact(machine.end_from_triggers(list(items)))

    async def cancel_task(self, task_id: str) -> TaskInfo | None:
        await self.db.transact(machine.cancel(task_id))
        return await self.get_task(task_id)

    # -- inspection ---------------------------------------------------------------------------

    async def get_task(self, task_id: str) -> TaskInfo | None:
        rows = await self.db.fetch(GET_TASK, task_id=task_id)
        return task_info(rows[0]) if rows else None

    async def list_tasks(
        self,
        state: TaskState | None = None,
        limit: int = 1000,
        before: str | TaskInfo | None = None,
    ) -> list[TaskInfo]:
        if before is None:
            if state is None:
                rows = await self.db.fetch(LIST_TASKS, limit=limit)
            else:
                rows = await self.db.fetch(LIST_TASKS_IN_STATE, state=str(state), limit=limit)
            return [task_info(r) for r in rows]
        key = await self._list_key(before)
        if state is None:
            rows = await self.db.fetch(LIST_TASKS_BEFORE, limit=limit, **key)
        else:
            rows = await self.db.fetch(
                LIST_TASKS_IN_STATE_BEFORE, state=str(state), limit=limit, **key
            )
        return [task_info(r) for r in rows]

    async def _list_key(self, before: str | TaskInfo) -> dict[str, Any]:
        """The (created_at, id) a page continues from: a listed TaskInfo carries it; a task id
        is looked up, and an unknown one is refused rather than answered with an empty page."""
        if isinstance(before, TaskInfo) and before.created_key is not None:
            return {"before_at": before.created_key, "before": before.id}
        task_id = before.id if isinstance(before, TaskInfo) else before
        rows = await self.db.fetch(TASK_CREATED, task_id=task_id)
        if not rows:
            raise TaskNotFound(
                f"no task {task_id!r} to list from (deleted, or not in this database); "
                "pass the last TaskInfo of the previous page as before= instead of its id"
            )
        return {"before_at": float(rows[0][0]), "before": task_id}

    async def count_tasks(self) -> dict[str, int]:
        return {r[0]: int(r[1]) for r in await self.db.fetch(COUNT_TASKS)}

    # -- triggers -----------------------------------------------------------------------------

    async def claim_triggers(
        self, triggerer_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTrigger]:
        if limit <= 0:
            return []
        return await self.db.transact(
            # one transaction: its claim lock keeps groups of identical triggers together
            trigger_claims.claim_triggers(triggerer_id, queues, limit, self.dead_after)
        )

    async def record_trigger_health(
        self, triggerer_id: str, rows: Sequence[tuple[int, int, str | None, float | None]]
    ) -> None:
        if rows:
            await self.db.transact(trigger_claims.record_health(triggerer_id, rows), atomic=False)

    async def owned_trigger_sum(self, triggerer_id: str) -> tuple[int, int]:
        rows = await self.db.fetch(OWNED_TRIGGERS_SUM, triggerer_id=triggerer_id)
        return int(rows[0][0]), int(rows[0][1])

    async def owned_trigger_ids(self, triggerer_id: str) -> set[int]:
        rows = await self.db.fetch(OWNED_TRIGGERS, triggerer_id=triggerer_id)
        owned: set[int] = set()
        while rows:  # in steps, freeing the rows as it goes: 1M rows at once stalled the loop
            owned.update(int(r[0]) for r in rows[-OWNED_STEP:])
            del rows[-OWNED_STEP:]
            if rows:
                await anyio.sleep(0)
        return owned

    async def fire_triggers(self, events: Sequence[tuple[int, str]]) -> int:
        if not events:
            return 0
        return await self.db.transact(machine.resume([(t, None, e) for t, e in events]))

    async def fail_triggers(self, failures: Sequence[tuple[int, str, str]]) -> int:
        if not failures:
            return 0
        return await self.db.transact(machine.resume(list(failures)))

    async def release_triggers(self, triggerer_id: str, ids: Sequence[int] | None = None) -> int:
        return await self.db.transact(trigger_claims.release_triggers(triggerer_id, ids))

    async def list_triggers(self) -> list[TriggerInfo]:
        return [
            TriggerInfo(
                id=r[0],
                task_id=r[1],
                classpath=r[2],
                kwargs=load_or_raw(r[3]),
                queue=r[4],
                triggerer_id=r[5],
                created_at=ts(r[6]),
                deadline=ts(r[7]),
                affinity=r[8],
                poll_key=r[9],
            )
            for r in await self.db.fetch(LIST_TRIGGERS)
        ]

    # -- per-task logs ------------------------------------------------------------------------

    async def append_task_logs(
        self, rows: Sequence[tuple[str, float, str, str]], keep: int
    ) -> None:
        if rows:
            await self.db.transact(maintenance.append_logs(rows, keep))

    async def task_logs(self, task_id: str, limit: int = 10000) -> list[tuple[float, str, str]]:
        rows = await self.db.fetch(TASK_LOGS, task_id=task_id, limit=limit)
        return [(r[0], r[1], r[2]) for r in rows]
