"""The PostgreSQL backend (asyncpg), for workers and triggerers on several hosts.

Claims use ``FOR UPDATE SKIP LOCKED`` so concurrent claimers never wait on or double-take a
row; wake-ups use LISTEN/NOTIFY, sent inside the transaction that makes work available so a
notification is delivered exactly when the work is visible. Each transition is one statement
(or one transaction), guarded on state so it happens at most once. The listening connection
is re-established from the heartbeat after the server restarts or the connection drops.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Sequence
from importlib import resources
from typing import Any

import asyncpg
import structlog

from deferrun import config
from deferrun.exceptions import ConfigError
from deferrun.models import (
    ClaimedTask,
    ClaimedTrigger,
    Deferral,
    NewTask,
    ProcessInfo,
    TaskInfo,
    TaskState,
    TriggerInfo,
    ts,
)
from deferrun.operator import BaseOperator
from deferrun.store.base import (
    ROLE_CHANNEL,
    STALE_UNCLAIMED,
    Channel,
    ReapReport,
    Role,
    Wakeup,
    fair_share,
)
from deferrun.store.rows import TASK_INFO_COLUMNS, load_or_raw, task_info

log = structlog.get_logger("deferrun.store.postgres")

SCHEMA_VERSION = 3
MIGRATION_LOCK = 0x64656672  # "defr": one advisory lock id for schema changes
NOW = "extract(epoch from clock_timestamp())::double precision"
CHANNELS: dict[str, str] = {"tasks": "deferrun_tasks", "triggers": "deferrun_triggers"}
FINISHED = "('success', 'failed', 'skipped', 'cancelled')"
RUNNABLE = "('queued', 'up_for_retry', 'up_for_reschedule')"

_TASK_INFO_SQL = (
    f"SELECT {TASK_INFO_COLUMNS} FROM deferrun_tasks t "
    "LEFT JOIN deferrun_triggers g ON g.id = t.trigger_id"
)

_CLAIMED_TASK_COLUMNS = """id, name, classpath, kwargs, queue, try_number, max_tries,
    retry_delay, execution_timeout, next_method, next_kwargs, event, try_started_at, created_at,
    claim_token"""


async def _no_reset(_conn: asyncpg.Connection) -> None:
    """Skip asyncpg's reset-on-release round trip (UNLISTEN *, RESET ALL, ...).

    Pooled connections hold no session state here: LISTEN lives on its own connection and
    the only advisory lock is transaction-scoped. Measured: 8 % of a deferring worker's CPU.
    """


def _queue_match(queues: Sequence[str], param: int) -> str:
    """SQL matching the worker's queues.

    One queue (the common case) is an equality, so the planner walks the (queue, ready_at)
    index in order and stops at LIMIT; ``= ANY(array)`` on the leading column makes it read
    and sort every runnable row instead. Measured: the claim was most of PostgreSQL's CPU
    with 20,000 tasks queued.
    """
    return f"queue = ${param}" if len(queues) == 1 else f"queue = ANY(${param}::text[])"


def _queue_param(queues: Sequence[str]) -> str | list[str]:
    return queues[0] if len(queues) == 1 else list(queues)


def _notify(channel: Channel) -> str:
    return f"SELECT pg_notify('{CHANNELS[channel]}', '')"


class PostgresStore:
    def __init__(self, url: str, *, dead_after: float = 10.0, pool_size: int = 10) -> None:
        self.url = url
        self.dead_after = dead_after
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._wakeups: dict[str, tuple[Channel, Wakeup]] = {}
        self._registered: dict[str, tuple[Role, list[str], int]] = {}

    # -- plumbing -----------------------------------------------------------------------------

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("store is not open; call await store.open() first")
        return self._pool

    async def open(self) -> None:
        from deferrun.store import connect_timeout

        safe = config.redact_url(self.url)
        wait = connect_timeout()
        try:
            self._pool = await asyncpg.create_pool(
                self.url,
                min_size=1,
                max_size=self.pool_size,
                command_timeout=60,
                reset=_no_reset,
                timeout=wait,
            )
        except TimeoutError:
            raise ConfigError(
                f"cannot connect to {safe}: the server did not answer within {wait:g}s "
                "(DEFERRUN_CONNECT_TIMEOUT); is it a PostgreSQL server, and is it up?"
            ) from None
        except (OSError, asyncpg.PostgresError, ValueError) as exc:
            raise ConfigError(f"cannot connect to {safe}: {exc or type(exc).__name__}") from exc
        await self._migrate()

    async def _migrate(self) -> None:
        schema = resources.files("deferrun.store").joinpath("postgres_schema.sql").read_text()
        async with self.pool.acquire() as conn, conn.transaction():
            # Several processes may start at once: one migrates, the rest wait here.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS deferrun_schema (version integer NOT NULL)"
            )
            version = await conn.fetchval("SELECT max(version) FROM deferrun_schema") or 0
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"the database has deferrun schema version {version}, newer than this "
                    f"deferrun understands ({SCHEMA_VERSION}); upgrade deferrun"
                )
            if version < SCHEMA_VERSION:
                await conn.execute(schema)
                await conn.execute(
                    "INSERT INTO deferrun_schema (version) VALUES ($1)", SCHEMA_VERSION
                )

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await listener.close(timeout=5)
            except Exception as exc:
                log.debug("closing the listening connection failed", error=repr(exc))
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await pool.close()

    # -- wake-ups -----------------------------------------------------------------------------

    def _on_notification(self, _conn: Any, _pid: int, channel: str, _payload: str) -> None:
        for wanted, wakeup in self._wakeups.values():
            if CHANNELS[wanted] == channel:
                wakeup.set()

    def _on_listener_lost(self, _conn: Any) -> None:
        # Wake every loop: whatever was notified while we were deaf gets claimed by a poll.
        for _, wakeup in self._wakeups.values():
            wakeup.set()

    async def _ensure_listener(self) -> None:
        if self._listener is not None and not self._listener.is_closed():
            return
        if self._listener is not None:
            log.warning("LISTEN connection was lost; reconnecting")
        conn = await asyncpg.connect(self.url)
        conn.add_termination_listener(self._on_listener_lost)
        for channel in {c for c, _ in self._wakeups.values()}:
            await conn.add_listener(CHANNELS[channel], self._on_notification)
        self._listener = conn
        self._on_listener_lost(conn)  # catch up on anything missed

    # -- processes ----------------------------------------------------------------------------

    async def register_process(
        self, process_id: str, role: Role, queues: Sequence[str], capacity: int
    ) -> Wakeup:
        wakeup = Wakeup()
        self._wakeups[process_id] = (ROLE_CHANNEL[role], wakeup)
        self._registered[process_id] = (role, list(queues), capacity)
        if self._listener is not None and not self._listener.is_closed():
            await self._listener.add_listener(CHANNELS[ROLE_CHANNEL[role]], self._on_notification)
        await self._upsert_process(process_id)
        await self._ensure_listener()
        return wakeup

    async def _upsert_process(self, process_id: str) -> None:
        role, queues, capacity = self._registered[process_id]
        await self.pool.execute(
            f"INSERT INTO deferrun_processes (id, role, host, pid, queues, capacity, started_at, "
            f"heartbeat_at) VALUES ($1, $2, $3, $4, $5, $6, {NOW}, {NOW}) "
            f"ON CONFLICT (id) DO UPDATE SET heartbeat_at = {NOW}",
            process_id,
            role,
            socket.gethostname(),
            os.getpid(),
            json.dumps(queues),
            capacity,
        )

    async def heartbeat(self, process_id: str) -> None:
        status = await self.pool.execute(
            f"UPDATE deferrun_processes SET heartbeat_at = {NOW} WHERE id = $1", process_id
        )
        if status.endswith(" 0") and process_id in self._registered:
            await self._upsert_process(process_id)  # declared dead while alive: come back
        await self._ensure_listener()

    async def deregister_process(self, process_id: str) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "UPDATE deferrun_triggers SET triggerer_id = NULL WHERE triggerer_id = $1",
                process_id,
            )
            await conn.execute(
                f"UPDATE deferrun_tasks SET state = 'queued', ready_at = {NOW}, worker_id = NULL,"
                f" updated_at = {NOW} WHERE state = 'running' AND worker_id = $1",
                process_id,
            )
            await conn.execute("DELETE FROM deferrun_processes WHERE id = $1", process_id)
            await conn.execute(_notify("tasks"))
            await conn.execute(_notify("triggers"))
        self._wakeups.pop(process_id, None)
        self._registered.pop(process_id, None)

    async def list_processes(self) -> list[ProcessInfo]:
        rows = await self.pool.fetch(
            f"SELECT id, role, host, pid, queues, capacity, started_at, heartbeat_at, "
            f"heartbeat_at >= {NOW} - $1 FROM deferrun_processes ORDER BY role, started_at",
            self.dead_after,
        )
        return [
            ProcessInfo(
                id=r[0],
                role=r[1],
                host=r[2],
                pid=r[3],
                queues=json.loads(r[4]),
                capacity=r[5],
                started_at=ts(r[6]),
                heartbeat_at=ts(r[7]),
                alive=r[8],
            )
            for r in rows
        ]

    async def reap(self, dead_after: float) -> ReapReport:
        report = ReapReport()
        live = f"SELECT id FROM deferrun_processes WHERE heartbeat_at >= {NOW} - $1"
        async with self.pool.acquire() as conn, conn.transaction():
            lost = await conn.fetch(
                f"""
                WITH lost AS (
                    SELECT id FROM deferrun_tasks
                    WHERE state = 'running' AND (worker_id IS NULL OR worker_id NOT IN ({live}))
                    FOR UPDATE SKIP LOCKED)
                UPDATE deferrun_tasks t SET
                    state = CASE WHEN try_number < max_tries THEN 'up_for_retry' ELSE 'failed' END,
                    ready_at = CASE WHEN try_number < max_tries THEN {NOW} + retry_delay END,
                    finished_at = CASE WHEN try_number < max_tries THEN NULL ELSE {NOW} END,
                    next_method = CASE WHEN try_number < max_tries THEN NULL ELSE next_method END,
                    next_kwargs = CASE WHEN try_number < max_tries THEN NULL ELSE next_kwargs END,
                    event = CASE WHEN try_number < max_tries THEN NULL ELSE event END,
                    error = 'worker ' || coalesce(worker_id, '?') || ' stopped heartbeating for '
                        || $1::text || 's while running try ' || try_number
                        || ' (killed, lost or hung); '
                        || CASE WHEN try_number < max_tries THEN 'retrying'
                                ELSE 'no retries left' END,
                    worker_id = NULL, updated_at = {NOW}
                FROM lost WHERE t.id = lost.id
                RETURNING t.id, t.state
                """,
                dead_after,
            )
            report.retried = [r[0] for r in lost if r[1] == "up_for_retry"]
            report.failed = [r[0] for r in lost if r[1] == "failed"]
            status = await conn.execute(
                f"UPDATE deferrun_triggers SET triggerer_id = NULL WHERE triggerer_id IS NOT NULL"
                f" AND triggerer_id NOT IN ({live})",
                dead_after,
            )
            report.released_triggers = int(status.split()[-1])
            expired = await conn.fetch(
                f"""
                WITH expired AS (
                    SELECT t.id, t.trigger_id, g.classpath, g.created_at
                    FROM deferrun_tasks t LEFT JOIN deferrun_triggers g ON g.id = t.trigger_id
                    WHERE t.state = 'deferred' AND t.defer_deadline <= {NOW}
                    FOR UPDATE OF t SKIP LOCKED),
                gone AS (DELETE FROM deferrun_triggers g USING expired e
                         WHERE g.id = e.trigger_id)
                UPDATE deferrun_tasks t SET
                    state = 'queued', next_method = $1, next_kwargs = NULL,
                    event = json_build_object('error', 'deferral timed out after '
                        || round(({NOW} - coalesce(e.created_at, {NOW}))::numeric, 1)
                        || 's waiting for trigger ' || coalesce(e.trigger_id::text, '?')
                        || ' (' || coalesce(e.classpath, '?') || ')')::text,
                    ready_at = {NOW}, trigger_id = NULL, defer_deadline = NULL, updated_at = {NOW}
                FROM expired e WHERE t.id = e.id
                RETURNING t.id
                """,
                BaseOperator.DEFERRAL_TIMEOUT_METHOD,
            )
            report.timed_out = [r[0] for r in expired]
            dead = await conn.fetch(
                f"DELETE FROM deferrun_processes WHERE heartbeat_at < {NOW} - $1 RETURNING id",
                dead_after,
            )
            report.dead_processes = [r[0] for r in dead]
            if report.retried or report.timed_out:
                await conn.execute(_notify("tasks"))
            if report.released_triggers or report.timed_out:
                await conn.execute(_notify("triggers"))
        return report

    # -- tasks --------------------------------------------------------------------------------

    async def submit(self, task: NewTask) -> None:
        await self.submit_many([task])

    async def submit_many(self, tasks: Sequence[NewTask]) -> None:
        if not tasks:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                f"INSERT INTO deferrun_tasks (id, name, classpath, kwargs, queue, state, "
                f"max_tries, retry_delay, execution_timeout, ready_at, created_at, updated_at) "
                f"VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, {NOW}, {NOW}, {NOW})",
                [
                    (
                        t.id,
                        t.name,
                        t.classpath,
                        t.kwargs,
                        t.queue,
                        t.max_tries,
                        t.retry_delay,
                        t.execution_timeout,
                    )
                    for t in tasks
                ],
            )
            await conn.execute(_notify("tasks"))

    async def claim_tasks(
        self, worker_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTask]:
        if limit <= 0 or not queues:
            return []
        rows = await self.pool.fetch(
            f"""
            WITH picked AS (
                SELECT id FROM deferrun_tasks
                WHERE state IN {RUNNABLE} AND {_queue_match(queues, 2)} AND ready_at <= {NOW}
                ORDER BY ready_at LIMIT $3
                FOR UPDATE SKIP LOCKED)
            UPDATE deferrun_tasks t SET
                state = 'running', worker_id = $1, ready_at = NULL, updated_at = {NOW},
                try_number = CASE WHEN t.state = 'up_for_retry' OR t.try_number = 0
                                  THEN t.try_number + 1 ELSE t.try_number END,
                try_started_at = CASE WHEN t.state = 'up_for_retry' OR t.try_number = 0
                                      THEN {NOW} ELSE t.try_started_at END,
                started_at = coalesce(t.started_at, {NOW}), claim_token = t.claim_token + 1
            FROM picked WHERE t.id = picked.id
            RETURNING {", ".join("t." + c.strip() for c in _CLAIMED_TASK_COLUMNS.split(","))}
            """,
            worker_id,
            _queue_param(queues),
            limit,
        )
        return [ClaimedTask(*r) for r in rows]

    async def next_due(self, queues: Sequence[str]) -> float | None:
        if not queues:
            return None
        # Due times are on the server's clock; hand back a local time for the local sleep.
        row = await self.pool.fetchrow(
            f"SELECT min(ready_at), {NOW} FROM deferrun_tasks "
            f"WHERE state IN {RUNNABLE} AND {_queue_match(queues, 1)}",
            _queue_param(queues),
        )
        if row is None or row[0] is None:
            return None
        return time.time() + (row[0] - row[1])

    async def complete_task(self, task_id: str, claim_token: int, result: str | None) -> bool:
        status = await self.pool.execute(
            f"UPDATE deferrun_tasks SET state = 'success', result = $3, error = NULL, "
            f"updated_at = {NOW}, finished_at = {NOW} "
            f"WHERE id = $1 AND state = 'running' AND claim_token = $2",
            task_id,
            claim_token,
            result,
        )
        return status.endswith(" 1")

    async def fail_task(
        self, task_id: str, claim_token: int, error: str, *, retry: bool
    ) -> TaskState | None:
        retrying = "($4 AND try_number < max_tries)"
        async with self.pool.acquire() as conn, conn.transaction():
            state = await conn.fetchval(
                f"""
                UPDATE deferrun_tasks SET
                    state = CASE WHEN {retrying} THEN 'up_for_retry' ELSE 'failed' END,
                    ready_at = CASE WHEN {retrying} THEN {NOW} + retry_delay END,
                    worker_id = CASE WHEN {retrying} THEN NULL ELSE worker_id END,
                    next_method = CASE WHEN {retrying} THEN NULL ELSE next_method END,
                    next_kwargs = CASE WHEN {retrying} THEN NULL ELSE next_kwargs END,
                    event = CASE WHEN {retrying} THEN NULL ELSE event END,
                    finished_at = CASE WHEN {retrying} THEN NULL ELSE {NOW} END,
                    error = $3, updated_at = {NOW}
                WHERE id = $1 AND state = 'running' AND claim_token = $2
                RETURNING state
                """,
                task_id,
                claim_token,
                error,
                retry,
            )
            if state == "up_for_retry":
                await conn.execute(_notify("tasks"))
        return None if state is None else TaskState(state)

    async def skip_task(self, task_id: str, claim_token: int, reason: str | None) -> bool:
        status = await self.pool.execute(
            f"UPDATE deferrun_tasks SET state = 'skipped', error = $3, updated_at = {NOW}, "
            f"finished_at = {NOW} WHERE id = $1 AND state = 'running' AND claim_token = $2",
            task_id,
            claim_token,
            reason,
        )
        return status.endswith(" 1")

    async def reschedule_task(self, task_id: str, claim_token: int, delay: float) -> bool:
        status = await self.pool.execute(
            f"UPDATE deferrun_tasks SET state = 'up_for_reschedule', ready_at = {NOW} + $3, "
            f"worker_id = NULL, updated_at = {NOW} "
            f"WHERE id = $1 AND state = 'running' AND claim_token = $2",
            task_id,
            claim_token,
            max(delay, 0.0),
        )
        if status.endswith(" 1"):
            await self.pool.execute(_notify("tasks"))
        return status.endswith(" 1")

    async def defer_task(self, task_id: str, claim_token: int, deferral: Deferral) -> int | None:
        # One statement, one round trip: lock the running task, store its trigger, move the
        # task to deferred and wake the triggerers - or nothing at all if the fence fails.
        trigger_id = await self.pool.fetchval(
            f"""
            WITH task AS (
                SELECT id, queue FROM deferrun_tasks
                WHERE id = $1 AND state = 'running' AND claim_token = $2
                FOR UPDATE),
            trig AS (
                INSERT INTO deferrun_triggers (task_id, classpath, kwargs, queue, deadline,
                                               created_at)
                SELECT id, $3, $4, queue, {NOW} + $5, {NOW} FROM task
                ON CONFLICT (task_id) DO UPDATE SET
                    classpath = excluded.classpath, kwargs = excluded.kwargs,
                    queue = excluded.queue, deadline = excluded.deadline,
                    created_at = excluded.created_at, triggerer_id = NULL
                RETURNING id, task_id),
            moved AS (
                UPDATE deferrun_tasks t SET
                    state = 'deferred', worker_id = NULL, next_method = $6, next_kwargs = $7,
                    event = NULL, trigger_id = trig.id, defer_deadline = {NOW} + $5,
                    updated_at = {NOW}
                FROM trig WHERE t.id = trig.task_id
                RETURNING trig.id)
            SELECT id FROM moved, pg_notify('{CHANNELS["triggers"]}', '')
            """,
            task_id,
            claim_token,
            deferral.classpath,
            deferral.kwargs,
            deferral.timeout,
            deferral.method_name,
            deferral.method_kwargs,
        )
        return None if trigger_id is None else int(trigger_id)

    async def requeue_task(self, task_id: str, claim_token: int) -> bool:
        async with self.pool.acquire() as conn, conn.transaction():
            status = await conn.execute(
                f"UPDATE deferrun_tasks SET state = 'queued', ready_at = {NOW}, worker_id = NULL,"
                f" updated_at = {NOW} WHERE id = $1 AND state = 'running' AND claim_token = $2",
                task_id,
                claim_token,
            )
            await conn.execute(_notify("tasks"))
        return status.endswith(" 1")

    async def owned_claims(self, worker_id: str) -> set[tuple[str, int]]:
        rows = await self.pool.fetch(
            "SELECT id, claim_token FROM deferrun_tasks WHERE state = 'running' AND worker_id = $1",
            worker_id,
        )
        return {(r[0], r[1]) for r in rows}

    async def get_task(self, task_id: str) -> TaskInfo | None:
        row = await self.pool.fetchrow(_TASK_INFO_SQL + " WHERE t.id = $1", task_id)
        return task_info(row) if row else None

    async def list_tasks(self, state: TaskState | None = None, limit: int = 1000) -> list[TaskInfo]:
        if state is None:
            rows = await self.pool.fetch(
                _TASK_INFO_SQL + " ORDER BY t.created_at DESC LIMIT $1", limit
            )
        else:
            rows = await self.pool.fetch(
                _TASK_INFO_SQL + " WHERE t.state = $1 ORDER BY t.created_at DESC LIMIT $2",
                str(state),
                limit,
            )
        return [task_info(r) for r in rows]

    async def count_tasks(self) -> dict[str, int]:
        rows = await self.pool.fetch("SELECT state, count(*) FROM deferrun_tasks GROUP BY state")
        return {r[0]: r[1] for r in rows}

    async def cancel_task(self, task_id: str) -> TaskInfo | None:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                f"UPDATE deferrun_tasks SET state = 'cancelled', error = 'cancelled by user', "
                f"trigger_id = NULL, defer_deadline = NULL, ready_at = NULL, "
                f"updated_at = {NOW}, finished_at = {NOW} "
                f"WHERE id = $1 AND state NOT IN {FINISHED}",
                task_id,
            )
            await conn.execute("DELETE FROM deferrun_triggers WHERE task_id = $1", task_id)
            row = await conn.fetchrow(_TASK_INFO_SQL + " WHERE t.id = $1", task_id)
            await conn.execute(_notify("tasks"))
            await conn.execute(_notify("triggers"))
        return task_info(row) if row else None

    # -- triggers -----------------------------------------------------------------------------

    async def claim_triggers(
        self, triggerer_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTrigger]:
        if limit <= 0:
            return []
        queue_filter = "AND queue = ANY($3::text[])" if queues else "AND $3::text[] IS NOT NULL"
        async with self.pool.acquire() as conn:
            counts = await conn.fetchrow(
                f"SELECT (SELECT count(*) FROM deferrun_triggers WHERE triggerer_id IS NULL), "
                f"(SELECT count(*) FROM deferrun_processes WHERE role = 'triggerer' "
                f" AND heartbeat_at >= {NOW} - $1)",
                self.dead_after,
            )
            fair = fair_share(limit, counts[0], counts[1])
            claim = f"""
                WITH picked AS (
                    SELECT id FROM deferrun_triggers
                    WHERE triggerer_id IS NULL {queue_filter} AND created_at <= $4
                    ORDER BY id LIMIT $2
                    FOR UPDATE SKIP LOCKED)
                UPDATE deferrun_triggers g SET triggerer_id = $1 FROM picked
                WHERE g.id = picked.id
                RETURNING g.id, g.task_id, g.classpath, g.kwargs, g.deadline - {NOW}
            """
            rows = []
            if fair > 0:
                rows = await conn.fetch(claim, triggerer_id, fair, list(queues), float("inf"))
            if len(rows) < limit:
                # Triggers nobody took for a while (others full, or serving other queues).
                now = await conn.fetchval(f"SELECT {NOW}")
                rows += await conn.fetch(
                    claim, triggerer_id, limit - len(rows), list(queues), now - STALE_UNCLAIMED
                )
        return [ClaimedTrigger(*r) for r in rows]

    async def owned_trigger_ids(self, triggerer_id: str) -> set[int]:
        rows = await self.pool.fetch(
            "SELECT id FROM deferrun_triggers WHERE triggerer_id = $1", triggerer_id
        )
        return {r[0] for r in rows}

    async def _resume(
        self,
        trigger_ids: list[int],
        methods: list[str | None],
        events: list[str],
        clear_kwargs: bool,
    ) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            resumed = await conn.fetchval(
                f"""
                WITH ev AS (
                    SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[])
                        AS e(trigger_id, method, event)),
                gone AS (
                    DELETE FROM deferrun_triggers g USING ev WHERE g.id = ev.trigger_id
                    RETURNING g.id, g.task_id, ev.method, ev.event),
                resumed AS (
                    UPDATE deferrun_tasks t SET
                        state = 'queued', event = gone.event, ready_at = {NOW},
                        trigger_id = NULL, defer_deadline = NULL, updated_at = {NOW},
                        next_method = coalesce(gone.method, t.next_method),
                        next_kwargs = CASE WHEN $4 THEN NULL ELSE t.next_kwargs END
                    FROM gone
                    WHERE t.id = gone.task_id AND t.state = 'deferred' AND t.trigger_id = gone.id
                    RETURNING t.id)
                SELECT count(*) FROM resumed
                """,
                trigger_ids,
                methods,
                events,
                clear_kwargs,
            )
            if resumed:
                await conn.execute(_notify("tasks"))
        return int(resumed)

    async def fire_triggers(self, events: Sequence[tuple[int, str]]) -> int:
        if not events:
            return 0
        return await self._resume(
            [e[0] for e in events], [None] * len(events), [e[1] for e in events], clear_kwargs=False
        )

    async def fail_triggers(self, failures: Sequence[tuple[int, str, str]]) -> int:
        if not failures:
            return 0
        return await self._resume(
            [f[0] for f in failures],
            [f[1] for f in failures],
            [f[2] for f in failures],
            clear_kwargs=True,
        )

    async def release_triggers(self, triggerer_id: str, ids: Sequence[int] | None = None) -> int:
        async with self.pool.acquire() as conn, conn.transaction():
            if ids is None:
                status = await conn.execute(
                    "UPDATE deferrun_triggers SET triggerer_id = NULL WHERE triggerer_id = $1",
                    triggerer_id,
                )
            else:
                status = await conn.execute(
                    "UPDATE deferrun_triggers SET triggerer_id = NULL "
                    "WHERE triggerer_id = $1 AND id = ANY($2::bigint[])",
                    triggerer_id,
                    list(ids),
                )
            await conn.execute(_notify("triggers"))
        return int(status.split()[-1])

    async def list_triggers(self) -> list[TriggerInfo]:
        rows = await self.pool.fetch(
            "SELECT id, task_id, classpath, kwargs, queue, triggerer_id, created_at, deadline "
            "FROM deferrun_triggers ORDER BY id"
        )
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
            )
            for r in rows
        ]

    # -- per-task logs ------------------------------------------------------------------------

    async def append_task_logs(
        self, rows: Sequence[tuple[str, float, str, str]], keep: int
    ) -> None:
        if not rows:
            return
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.executemany(
                "INSERT INTO deferrun_task_logs (task_id, at, source, line) "
                "VALUES ($1, $2, $3, $4)",
                rows,
            )
            await conn.execute(
                """
                DELETE FROM deferrun_task_logs l USING (
                    SELECT id FROM (
                        SELECT id, row_number() OVER (PARTITION BY task_id ORDER BY id DESC) AS n
                        FROM deferrun_task_logs WHERE task_id = ANY($1::text[])) ranked
                    WHERE n > $2) old
                WHERE l.id = old.id
                """,
                list({r[0] for r in rows}),
                keep,
            )

    async def task_logs(self, task_id: str, limit: int = 10000) -> list[tuple[float, str, str]]:
        rows = await self.pool.fetch(
            "SELECT at, source, line FROM (SELECT id, at, source, line FROM deferrun_task_logs "
            "WHERE task_id = $1 ORDER BY id DESC LIMIT $2) newest ORDER BY at, id",
            task_id,
            limit,
        )
        return [(r[0], r[1], r[2]) for r in rows]
