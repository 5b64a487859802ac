"""Heartbeats and maintenance shared by workers and triggerers.

Every process heartbeats; any process may reap (recover the work of dead ones, enforce
deferral deadlines), since all reaps are idempotent transactions. A process only judges others
after it has itself been connected for a full ``dead_after``: after a database outage every
heartbeat is stale, and reaping at once would declare the whole fleet dead. A lock held on the
database (SQLite ``BEGIN EXCLUSIVE``) makes heartbeats wait rather than fail: a beat that took
over ``dead_after / 2``, or came over ``dead_after`` after the previous one, counts as an
outage too, and the reap itself only runs while this process's own heartbeat is fresh.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import anyio
import structlog

from deferrun.process.watchdog import worst_recent_lag
from deferrun.store.base import ReapReport, Store, Wakeup, is_connection_error

log = structlog.get_logger("deferrun.liveness")

T = TypeVar("T")


def new_process_id(role: str) -> str:
    return f"{role}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def log_reap(report: ReapReport) -> None:
    log.info(
        "maintenance",
        retried=report.retried,
        failed=report.failed,
        timed_out=report.timed_out,
        released_triggers=report.released_triggers,
        dead_processes=report.dead_processes,
    )


async def while_unreachable(
    call: Callable[[], Awaitable[T]],
    retrying: str,
    transient: Callable[[BaseException], bool] = is_connection_error,
    within: float = 30.0,
) -> T:
    """``call()``, again while it fails with a ``transient`` error, for up to ``within`` s.

    A process starting while its database restarts, fails over or drops a connection
    mid-handshake should outlast that, not exit with a traceback; anything else (a refused
    login, a bad value) is raised at once, and the last error once time is up.
    """
    deadline = time.monotonic() + within
    delay = 0.25
    while True:
        try:
            return await call()
        except Exception as exc:
            if not transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning(f"{retrying}; retrying", error=repr(exc))
        await anyio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def register(store: Store, process_id: str, role: str, queues: Any, capacity: int) -> Wakeup:
    """Register this process, retrying a lost connection (``while_unreachable``)."""
    return await while_unreachable(
        lambda: store.register_process(process_id, role, queues, capacity),
        "could not register with the database",
    )


def heartbeat_interval(dead_after: float) -> float:
    return max(0.2, min(2.0, dead_after / 5))


async def heartbeat_loop(
    store: Store,
    process_id: str,
    dead_after: float,
    on_beat: Callable[[], Awaitable[None]] | None = None,
    health: dict[str, float] | None = None,
) -> None:
    """Heartbeat forever; ``health['ok_at']`` is the time of the last successful beat."""
    interval = heartbeat_interval(dead_after)
    healthy_since: float | None = time.monotonic()
    last_reap = 0.0
    failures = 0
    last_ok = time.monotonic()
    while True:
        await anyio.sleep(interval)
        try:
            began = time.monotonic()
            await store.heartbeat(process_id, worst_recent_lag())
            now = time.monotonic()
            if health is not None:
                health["ok_at"] = now
            if failures:
                log.info("database reachable again", after_failures=failures)
                failures = 0
            if now - began > dead_after / 2 or now - last_ok > dead_after:
                log.warning(
                    "heartbeat held back (database locked or unreachable); judging no other "
                    "process for a full dead_after",
                    took=round(now - began, 2),
                    since_last=round(now - last_ok, 2),
                )
                healthy_since = now
            last_ok = now
            if healthy_since is None:
                healthy_since = now
            if on_beat is not None:
                await on_beat()
            now = time.monotonic()
            if now - healthy_since >= dead_after and now - last_reap >= dead_after / 2:
                last_reap = now
                report = await store.reap(dead_after, process_id)
                if report.changed:
                    log_reap(report)
        except Exception as exc:  # a database hiccup must not kill the process
            failures += 1
            healthy_since = None
            log.error("heartbeat failed; will retry", error=repr(exc), failures=failures)
