"""The embedded backend: one SQLite file in WAL mode, shared by processes on one host.

Every transition is one ``BEGIN IMMEDIATE`` transaction, which takes SQLite's single write
lock up front; that serializes claims across processes the way ``SKIP LOCKED`` does on
PostgreSQL, and rules out the lock-upgrade deadlocks of deferred transactions. The blocking
sqlite3 calls run on a worker thread, one at a time per store, so the event loop never waits
on disk.
"""

from __future__ import annotations

import functools
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from typing import Any, TypeVar

import anyio
import anyio.to_thread

from deferrun import serialization
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
from deferrun.store import sqlite_file
from deferrun.store.base import (
    ROLE_CHANNEL,
    STALE_UNCLAIMED,
    Channel,
    ReapReport,
    Role,
    Wakeup,
    fair_share,
)
from deferrun.store.local_notify import UdpListener, UdpSender
from deferrun.store.rows import TASK_INFO_COLUMNS, load_or_raw, task_info

SCHEMA_VERSION = 3
R = TypeVar("R")

_TASK_INFO_SQL = (
    f"SELECT {TASK_INFO_COLUMNS} FROM tasks t LEFT JOIN triggers g ON g.id = t.trigger_id"
)


def parse_sqlite_url(url: str) -> str:
    """``sqlite:///relative.db`` or ``sqlite:////absolute/path.db`` -> a file path."""
    prefix = "sqlite:///"
    if not url.startswith(prefix):
        raise ConfigError(
            f"SQLite URLs look like sqlite:///deferrun.db (relative) or sqlite:////var/lib/x.db "
            f"(absolute), not {url!r}"
        )
    path = url[len(prefix) :]
    if not path or path == ":memory:":
        raise ConfigError(
            "an in-memory or empty SQLite path cannot be shared between the worker and the "
            "triggerer; give a file, e.g. sqlite:///deferrun.db"
        )
    return path


class SQLiteStore:
    def __init__(self, url: str, *, dead_after: float = 10.0) -> None:
        self.url = url
        self.path = parse_sqlite_url(url)
        self.dead_after = dead_after
        self._conn: sqlite3.Connection | None = None
        self._limiter = anyio.CapacityLimiter(1)
        self._sender: UdpSender | None = None
        self._listeners: dict[str, UdpListener] = {}
        self._registered: dict[str, tuple[Role, list[str], int, int]] = {}
        self._ports: dict[str, list[int]] = {"tasks": [], "triggers": []}
        self._ports_at = 0.0

    # -- plumbing -----------------------------------------------------------------------------

    async def _run(self, fn: Callable[..., R], *args: Any) -> R:
        return await anyio.to_thread.run_sync(functools.partial(fn, *args), limiter=self._limiter)

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("store is not open; call await store.open() first")
        return self._conn

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        c = self.conn
        self._guard.check()
        c.execute("BEGIN IMMEDIATE")
        try:
            yield c
        except BaseException:
            sqlite_file.rollback(c)
            raise
        c.execute("COMMIT")

    def _connect(self) -> None:
        try:
            conn, self._guard = sqlite_file.connect(self.path, create=getattr(self, "create", True))
            conn.execute("PRAGMA busy_timeout = 30000")
            mode = self._enable_wal(conn)
            conn.execute("PRAGMA synchronous = NORMAL")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot open SQLite database {self.path!r}: {exc}") from exc
        if str(mode).lower() != "wal":
            raise ConfigError(
                f"{self.path!r} could not switch to WAL mode (got {mode}); is it on "
                "a network file system? Use a local disk or PostgreSQL"
            )
        self._conn = conn
        self._migrate()

    @staticmethod
    def _enable_wal(conn: sqlite3.Connection) -> str:
        """Switch to WAL, waiting out other processes doing the same on a new file.

        The switch needs an exclusive lock and SQLite does not call the busy handler for it,
        so processes starting together on a fresh database must retry by hand.
        """
        delay = 0.01
        deadline = time.monotonic() + 30.0
        while True:
            try:
                return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0])
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    def _migrate(self) -> None:
        schema = resources.files("deferrun.store").joinpath("sqlite_schema.sql").read_text()
        with self._tx() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise ConfigError(
                    f"{self.path} has schema version {version}, newer than this deferrun "
                    f"understands ({SCHEMA_VERSION}); upgrade deferrun"
                )
            if version < SCHEMA_VERSION:
                code = "\n".join(
                    line for line in schema.splitlines() if not line.lstrip().startswith("--")
                )
                for statement in code.split(";"):
                    if statement.strip():
                        c.execute(statement)
                columns = {r[1] for r in c.execute("PRAGMA table_info(tasks)")}
                if "claim_token" not in columns:  # version 3
                    c.execute("ALTER TABLE tasks ADD COLUMN claim_token INTEGER NOT NULL DEFAULT 0")
                c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    async def open(self) -> None:
        await self._run(self._connect)
        self._sender = UdpSender(await self._run(sqlite_file.wake_secret, self.conn))

    async def close(self) -> None:
        for listener in self._listeners.values():
            listener.close()
        self._listeners.clear()
        if self._sender:
            self._sender.close()
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await self._run(conn.close)

    # -- wake-ups -----------------------------------------------------------------------------

    def _refresh_ports_sync(self) -> None:
        now = time.time()
        rows = self.conn.execute(
            "SELECT role, wake_port FROM processes WHERE wake_port IS NOT NULL "
            "AND heartbeat_at >= ?",
            (now - self.dead_after,),
        ).fetchall()
        ports: dict[str, list[int]] = {"tasks": [], "triggers": []}
        for role, port in rows:
            ports[ROLE_CHANNEL.get(role, "tasks")].append(port)
        self._ports = ports
        self._ports_at = now

    def _ports_stale(self) -> bool:
        return time.time() - self._ports_at > 1.0

    def _notify(self, *channels: Channel) -> None:
        if self._sender is None:
            return
        for channel in channels:
            self._sender.send(self._ports[channel])

    async def _write(self, fn: Callable[..., R], *args: Any, notify: tuple[Channel, ...] = ()) -> R:
        def job() -> R:
            try:
                with self._tx():
                    result = fn(*args)
            except sqlite3.Error as exc:
                sqlite_file.raise_write_error(self.conn, exc)
            if notify:
                sqlite_file.refresh_ports(self)
            return result

        result = await self._run(job)
        self._notify(*notify)
        return result

    # -- processes ----------------------------------------------------------------------------

    async def register_process(
        self, process_id: str, role: Role, queues: Sequence[str], capacity: int
    ) -> Wakeup:
        wakeup = Wakeup()
        listener = UdpListener(wakeup)
        self._listeners[process_id] = listener
        self._registered[process_id] = (role, list(queues), capacity, listener.port)
        await self._write(self._upsert_process_sync, process_id)
        await self._run(self._refresh_ports_sync)
        return wakeup

    def _upsert_process_sync(self, process_id: str) -> None:
        role, queues, capacity, port = self._registered[process_id]
        now = time.time()
        self.conn.execute(
            "INSERT INTO processes (id, role, host, pid, queues, capacity, wake_port, started_at,"
            " heartbeat_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
            "heartbeat_at = excluded.heartbeat_at",
            (
                process_id,
                role,
                socket.gethostname(),
                os.getpid(),
                serialization.dumps(queues),
                capacity,
                port,
                now,
                now,
            ),
        )

    async def heartbeat(self, process_id: str) -> None:
        def job() -> None:
            cur = self.conn.execute(
                "UPDATE processes SET heartbeat_at = ? WHERE id = ?", (time.time(), process_id)
            )
            if cur.rowcount == 0:  # declared dead while we were alive: come back
                with self._tx():
                    self._upsert_process_sync(process_id)
            self._refresh_ports_sync()

        await self._run(job)

    async def deregister_process(self, process_id: str) -> None:
        def job() -> None:
            now = time.time()
            c = self.conn
            c.execute(
                "UPDATE triggers SET triggerer_id = NULL WHERE triggerer_id = ?", (process_id,)
            )
            c.execute(
                "UPDATE tasks SET state = 'queued', ready_at = ?, worker_id = NULL, "
                "updated_at = ? WHERE state = 'running' AND worker_id = ?",
                (now, now, process_id),
            )
            c.execute("DELETE FROM processes WHERE id = ?", (process_id,))

        await self._write(job, notify=("tasks", "triggers"))
        listener = self._listeners.pop(process_id, None)
        if listener:
            listener.close()
        self._registered.pop(process_id, None)

    async def list_processes(self) -> list[ProcessInfo]:
        def job() -> list[ProcessInfo]:
            now = time.time()
            rows = self.conn.execute(
                "SELECT id, role, host, pid, queues, capacity, started_at, heartbeat_at "
                "FROM processes ORDER BY role, started_at"
            ).fetchall()
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
                    alive=r[7] >= now - self.dead_after,
                )
                for r in rows
            ]

        return await self._run(job)

    async def reap(self, dead_after: float) -> ReapReport:
        def job() -> ReapReport:
            report = ReapReport()
            now = time.time()
            c = self.conn
            live = "SELECT id FROM processes WHERE heartbeat_at >= ?"
            cutoff = now - dead_after
            lost = c.execute(
                f"SELECT id, try_number, max_tries, retry_delay, worker_id FROM tasks "
                f"WHERE state = 'running' AND (worker_id IS NULL OR worker_id NOT IN ({live}))",
                (cutoff,),
            ).fetchall()
            for task_id, try_number, max_tries, retry_delay, worker_id in lost:
                error = (
                    f"worker {worker_id} stopped heartbeating for {dead_after:g}s while "
                    f"running try {try_number} (killed, lost or hung)"
                )
                if try_number < max_tries:
                    c.execute(
                        "UPDATE tasks SET state = 'up_for_retry', ready_at = ?, worker_id = NULL,"
                        " next_method = NULL, next_kwargs = NULL, event = NULL, error = ?, "
                        "updated_at = ? WHERE id = ?",
                        (now + retry_delay, error + "; retrying", now, task_id),
                    )
                    report.retried.append(task_id)
                else:
                    c.execute(
                        "UPDATE tasks SET state = 'failed', worker_id = NULL, error = ?, "
                        "updated_at = ?, finished_at = ? WHERE id = ?",
                        (error + "; no retries left", now, now, task_id),
                    )
                    report.failed.append(task_id)
            cur = c.execute(
                f"UPDATE triggers SET triggerer_id = NULL WHERE triggerer_id IS NOT NULL "
                f"AND triggerer_id NOT IN ({live})",
                (cutoff,),
            )
            report.released_triggers = cur.rowcount
            expired = c.execute(
                "SELECT t.id, t.trigger_id, g.classpath, g.created_at FROM tasks t "
                "LEFT JOIN triggers g ON g.id = t.trigger_id WHERE t.state = 'deferred' "
                "AND t.defer_deadline IS NOT NULL AND t.defer_deadline <= ?",
                (now,),
            ).fetchall()
            for task_id, trigger_id, classpath, created_at in expired:
                waited = now - created_at if created_at else 0.0
                event = serialization.dumps(
                    {
                        "error": (
                            f"deferral timed out after {waited:.1f}s waiting for trigger "
                            f"{trigger_id} ({classpath})"
                        )
                    }
                )
                self._expire_sync(task_id, trigger_id, event, now)
                report.timed_out.append(task_id)
            dead = c.execute(
                "SELECT id FROM processes WHERE heartbeat_at < ?", (cutoff,)
            ).fetchall()
            report.dead_processes = [r[0] for r in dead]
            if dead:
                c.execute("DELETE FROM processes WHERE heartbeat_at < ?", (cutoff,))
            return report

        report = await self._write(job)
        if report.retried or report.timed_out:
            self._notify("tasks")
        if report.released_triggers or report.timed_out:
            self._notify("triggers")
        return report

    # -- tasks --------------------------------------------------------------------------------

    async def submit(self, task: NewTask) -> None:
        await self.submit_many([task])

    async def submit_many(self, tasks: Sequence[NewTask]) -> None:
        def job() -> None:
            now = time.time()
            self.conn.executemany(
                "INSERT INTO tasks (id, name, classpath, kwargs, queue, state, max_tries, "
                "retry_delay, execution_timeout, ready_at, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?)",
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
                        now,
                        now,
                        now,
                    )
                    for t in tasks
                ],
            )

        if tasks:
            await self._write(job, notify=("tasks",))

    async def claim_tasks(
        self, worker_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTask]:
        if limit <= 0 or not queues:
            return []

        def job() -> list[ClaimedTask]:
            now = time.time()
            marks = ",".join("?" * len(queues))
            rows = self.conn.execute(
                f"""
                UPDATE tasks SET
                    state = 'running', worker_id = ?, ready_at = NULL, updated_at = ?,
                    try_number = CASE WHEN state = 'up_for_retry' OR try_number = 0
                                      THEN try_number + 1 ELSE try_number END,
                    try_started_at = CASE WHEN state = 'up_for_retry' OR try_number = 0
                                          THEN ? ELSE try_started_at END,
                    started_at = COALESCE(started_at, ?), claim_token = claim_token + 1
                WHERE id IN (
                    SELECT id FROM tasks
                    WHERE state IN ('queued', 'up_for_retry', 'up_for_reschedule')
                      AND queue IN ({marks}) AND ready_at <= ?
                    ORDER BY ready_at LIMIT ?)
                RETURNING id, name, classpath, kwargs, queue, try_number, max_tries, retry_delay,
                          execution_timeout, next_method, next_kwargs, event, try_started_at,
                          created_at, claim_token
                """,
                (worker_id, now, now, now, *queues, now, limit),
            ).fetchall()
            return [ClaimedTask(*r) for r in rows]

        return await self._write(job)

    async def next_due(self, queues: Sequence[str]) -> float | None:
        if not queues:
            return None
        marks = ",".join("?" * len(queues))

        def job() -> float | None:
            row = self.conn.execute(
                f"SELECT min(ready_at) FROM tasks WHERE state IN "
                f"('queued', 'up_for_retry', 'up_for_reschedule') AND queue IN ({marks})",
                tuple(queues),
            ).fetchone()
            return row[0] if row else None

        return await self._run(job)

    def _owned(self, task_id: str, claim_token: int) -> Any:
        return self.conn.execute(
            "SELECT try_number, max_tries, retry_delay FROM tasks WHERE id = ? "
            "AND state = 'running' AND claim_token = ?",
            (task_id, claim_token),
        ).fetchone()

    async def complete_task(self, task_id: str, claim_token: int, result: str | None) -> bool:
        def job() -> bool:
            now = time.time()
            cur = self.conn.execute(
                "UPDATE tasks SET state = 'success', result = ?, error = NULL, updated_at = ?, "
                "finished_at = ? WHERE id = ? AND state = 'running' AND claim_token = ?",
                (result, now, now, task_id, claim_token),
            )
            return cur.rowcount == 1

        return await self._write(job)

    async def fail_task(
        self, task_id: str, claim_token: int, error: str, *, retry: bool
    ) -> TaskState | None:
        def job() -> TaskState | None:
            row = self._owned(task_id, claim_token)
            if row is None:
                return None
            try_number, max_tries, retry_delay = row
            now = time.time()
            if retry and try_number < max_tries:
                self.conn.execute(
                    "UPDATE tasks SET state = 'up_for_retry', ready_at = ?, worker_id = NULL, "
                    "next_method = NULL, next_kwargs = NULL, event = NULL, error = ?, "
                    "updated_at = ? WHERE id = ?",
                    (now + retry_delay, error, now, task_id),
                )
                return TaskState.UP_FOR_RETRY
            self.conn.execute(
                "UPDATE tasks SET state = 'failed', error = ?, updated_at = ?, finished_at = ? "
                "WHERE id = ?",
                (error, now, now, task_id),
            )
            return TaskState.FAILED

        return await self._write(job, notify=("tasks",))

    async def skip_task(self, task_id: str, claim_token: int, reason: str | None) -> bool:
        def job() -> bool:
            now = time.time()
            cur = self.conn.execute(
                "UPDATE tasks SET state = 'skipped', error = ?, updated_at = ?, finished_at = ? "
                "WHERE id = ? AND state = 'running' AND claim_token = ?",
                (reason, now, now, task_id, claim_token),
            )
            return cur.rowcount == 1

        return await self._write(job)

    async def reschedule_task(self, task_id: str, claim_token: int, delay: float) -> bool:
        def job() -> bool:
            now = time.time()
            cur = self.conn.execute(
                "UPDATE tasks SET state = 'up_for_reschedule', ready_at = ?, worker_id = NULL, "
                "updated_at = ? WHERE id = ? AND state = 'running' AND claim_token = ?",
                (now + max(delay, 0.0), now, task_id, claim_token),
            )
            return cur.rowcount == 1

        return await self._write(job, notify=("tasks",))

    async def defer_task(self, task_id: str, claim_token: int, deferral: Deferral) -> int | None:
        def job() -> int | None:
            c = self.conn
            row = c.execute(
                "SELECT queue FROM tasks WHERE id = ? AND state = 'running' AND claim_token = ?",
                (task_id, claim_token),
            ).fetchone()
            if row is None:
                return None
            now = time.time()
            deadline = None if deferral.timeout is None else now + deferral.timeout
            c.execute("DELETE FROM triggers WHERE task_id = ?", (task_id,))
            trigger_id = c.execute(
                "INSERT INTO triggers (task_id, classpath, kwargs, queue, deadline, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (task_id, deferral.classpath, deferral.kwargs, row[0], deadline, now),
            ).lastrowid
            c.execute(
                "UPDATE tasks SET state = 'deferred', worker_id = NULL, next_method = ?, "
                "next_kwargs = ?, event = NULL, trigger_id = ?, defer_deadline = ?, "
                "updated_at = ? WHERE id = ?",
                (
                    deferral.method_name,
                    deferral.method_kwargs,
                    trigger_id,
                    deadline,
                    now,
                    task_id,
                ),
            )
            return trigger_id

        return await self._write(job, notify=("triggers",))

    async def requeue_task(self, task_id: str, claim_token: int) -> bool:
        def job() -> bool:
            now = time.time()
            cur = self.conn.execute(
                "UPDATE tasks SET state = 'queued', ready_at = ?, worker_id = NULL, "
                "updated_at = ? WHERE id = ? AND state = 'running' AND claim_token = ?",
                (now, now, task_id, claim_token),
            )
            return cur.rowcount == 1

        return await self._write(job, notify=("tasks",))

    async def owned_claims(self, worker_id: str) -> set[tuple[str, int]]:
        def job() -> set[tuple[str, int]]:
            rows = self.conn.execute(
                "SELECT id, claim_token FROM tasks WHERE state = 'running' AND worker_id = ?",
                (worker_id,),
            ).fetchall()
            return {(r[0], r[1]) for r in rows}

        return await self._run(job)

    async def get_task(self, task_id: str) -> TaskInfo | None:
        def job() -> TaskInfo | None:
            row = self.conn.execute(_TASK_INFO_SQL + " WHERE t.id = ?", (task_id,)).fetchone()
            return task_info(row) if row else None

        return await self._run(job)

    async def list_tasks(self, state: TaskState | None = None, limit: int = 1000) -> list[TaskInfo]:
        def job() -> list[TaskInfo]:
            if state is None:
                rows = self.conn.execute(
                    _TASK_INFO_SQL + " ORDER BY t.created_at DESC LIMIT ?", (limit,)
                ).fetchall()
            else:
                rows = self.conn.execute(
                    _TASK_INFO_SQL + " WHERE t.state = ? ORDER BY t.created_at DESC LIMIT ?",
                    (str(state), limit),
                ).fetchall()
            return [task_info(r) for r in rows]

        return await self._run(job)

    async def count_tasks(self) -> dict[str, int]:
        def job() -> dict[str, int]:
            rows = self.conn.execute("SELECT state, count(*) FROM tasks GROUP BY state").fetchall()
            return {r[0]: r[1] for r in rows}

        return await self._run(job)

    async def cancel_task(self, task_id: str) -> TaskInfo | None:
        def job() -> TaskInfo | None:
            c = self.conn
            now = time.time()
            c.execute(
                "UPDATE tasks SET state = 'cancelled', error = 'cancelled by user', "
                "trigger_id = NULL, defer_deadline = NULL, ready_at = NULL, updated_at = ?, "
                "finished_at = ? WHERE id = ? AND state NOT IN "
                "('success', 'failed', 'skipped', 'cancelled')",
                (now, now, task_id),
            )
            c.execute("DELETE FROM triggers WHERE task_id = ?", (task_id,))
            row = c.execute(_TASK_INFO_SQL + " WHERE t.id = ?", (task_id,)).fetchone()
            return task_info(row) if row else None

        return await self._write(job, notify=("tasks", "triggers"))

    # -- triggers -----------------------------------------------------------------------------

    async def claim_triggers(
        self, triggerer_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTrigger]:
        if limit <= 0:
            return []

        def job() -> list[ClaimedTrigger]:
            c = self.conn
            now = time.time()
            unclaimed = c.execute(
                "SELECT count(*) FROM triggers WHERE triggerer_id IS NULL"
            ).fetchone()[0]
            live = c.execute(
                "SELECT count(*) FROM processes WHERE role = 'triggerer' AND heartbeat_at >= ?",
                (now - self.dead_after,),
            ).fetchone()[0]
            where = "triggerer_id IS NULL AND created_at <= ?"
            if queues:
                where += f" AND queue IN ({','.join('?' * len(queues))})"
            sql = (
                f"UPDATE triggers SET triggerer_id = ? WHERE id IN (SELECT id FROM triggers "
                f"WHERE {where} ORDER BY id LIMIT ?) "
                f"RETURNING id, task_id, classpath, kwargs, deadline - {now!r}"
            )
            rows: list[Any] = []
            fair = fair_share(limit, unclaimed, live)
            if fair > 0:
                rows = c.execute(sql, (triggerer_id, now, *queues, fair)).fetchall()
            if len(rows) < limit:  # left unclaimed for a while: anyone with room takes them
                rows += c.execute(
                    sql, (triggerer_id, now - STALE_UNCLAIMED, *queues, limit - len(rows))
                ).fetchall()
            return [ClaimedTrigger(*r) for r in rows]

        return await self._write(job)

    async def owned_trigger_ids(self, triggerer_id: str) -> set[int]:
        def job() -> set[int]:
            rows = self.conn.execute(
                "SELECT id FROM triggers WHERE triggerer_id = ?", (triggerer_id,)
            ).fetchall()
            return {r[0] for r in rows}

        return await self._run(job)

    def _expire_sync(self, task_id: str, trigger_id: int, event: str, now: float) -> None:
        """Resume a task whose deferral deadline passed into its timeout method, once."""
        self.conn.execute(
            "UPDATE tasks SET state = 'queued', event = ?, ready_at = ?, trigger_id = NULL, "
            "defer_deadline = NULL, updated_at = ?, next_method = ?, next_kwargs = NULL "
            "WHERE id = ? AND state = 'deferred' AND trigger_id = ?",
            (event, now, now, BaseOperator.DEFERRAL_TIMEOUT_METHOD, task_id, trigger_id),
        )
        self.conn.execute("DELETE FROM triggers WHERE id = ?", (trigger_id,))

    def _resume_many_sync(
        self, items: list[tuple[int, str | None, str]], clear_kwargs: bool
    ) -> int:
        """Re-queue many deferred tasks with their events, at most once each.

        executemany keeps the per-event loop in C: with one Python-level statement per
        event, a burst of 100,000 timers kept the GIL busy in the database thread and
        starved the triggerer's event loop (fire lateness of seconds).
        """
        now = time.time()
        c = self.conn
        cur = c.executemany(
            "UPDATE tasks SET state = 'queued', event = ?, ready_at = ?, trigger_id = NULL, "
            "defer_deadline = NULL, updated_at = ?, next_method = coalesce(?, next_method), "
            "next_kwargs = CASE WHEN ? THEN NULL ELSE next_kwargs END "
            "WHERE id = (SELECT task_id FROM triggers WHERE id = ?) AND state = 'deferred' "
            "AND trigger_id = ?",
            [(event, now, now, method, clear_kwargs, tid, tid) for tid, method, event in items],
        )
        resumed = cur.rowcount
        c.executemany("DELETE FROM triggers WHERE id = ?", [(item[0],) for item in items])
        return resumed

    async def fire_triggers(self, events: Sequence[tuple[int, str]]) -> int:
        if not events:
            return 0
        items = [(tid, None, event) for tid, event in events]
        return await self._write(self._resume_many_sync, items, False, notify=("tasks",))

    async def fail_triggers(self, failures: Sequence[tuple[int, str, str]]) -> int:
        if not failures:
            return 0
        return await self._write(self._resume_many_sync, list(failures), True, notify=("tasks",))

    async def release_triggers(self, triggerer_id: str, ids: Sequence[int] | None = None) -> int:
        def job() -> int:
            if ids is None:
                cur = self.conn.execute(
                    "UPDATE triggers SET triggerer_id = NULL WHERE triggerer_id = ?",
                    (triggerer_id,),
                )
                return cur.rowcount
            total = 0
            for tid in ids:
                total += self.conn.execute(
                    "UPDATE triggers SET triggerer_id = NULL WHERE id = ? AND triggerer_id = ?",
                    (tid, triggerer_id),
                ).rowcount
            return total

        return await self._write(job, notify=("triggers",))

    async def list_triggers(self) -> list[TriggerInfo]:
        def job() -> list[TriggerInfo]:
            rows = self.conn.execute(
                "SELECT id, task_id, classpath, kwargs, queue, triggerer_id, created_at, deadline"
                " FROM triggers ORDER BY id"
            ).fetchall()
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

        return await self._run(job)

    # -- per-task logs ------------------------------------------------------------------------

    async def append_task_logs(
        self, rows: Sequence[tuple[str, float, str, str]], keep: int
    ) -> None:
        if not rows:
            return

        def job() -> None:
            c = self.conn
            c.executemany(
                "INSERT INTO task_logs (task_id, at, source, line) VALUES (?, ?, ?, ?)", rows
            )
            for task_id in {r[0] for r in rows}:
                c.execute(
                    "DELETE FROM task_logs WHERE task_id = ? AND id <= (SELECT id FROM task_logs"
                    " WHERE task_id = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                    (task_id, task_id, keep),
                )

        await self._write(job)

    async def task_logs(self, task_id: str, limit: int = 10000) -> list[tuple[float, str, str]]:
        def job() -> list[tuple[float, str, str]]:
            rows = self.conn.execute(
                "SELECT at, source, line FROM (SELECT id, at, source, line FROM task_logs "
                "WHERE task_id = ? ORDER BY id DESC LIMIT ?) ORDER BY at, id",
                (task_id, limit),
            ).fetchall()
            return [tuple(r) for r in rows]  # type: ignore[misc]

        return await self._run(job)
