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
            log.warning(f"{retrying}; retrying", error=_brief(exc))
        await anyio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def register(store: Store, process_id: str, role: str, queues: Any, capacity: int) -> Wakeup:
    """Register this process, retrying a lost connection (``while_unreachable``)."""
    return await while_unreachable(
        lambda: store.register_process(process_id, role, queues, capacity),
        "could not register with the database",
    )


class Outage:
    """This process's view of whether the database is reachable, for quiet logs in an outage.

    Every loop that meets a connection error reports it here instead of logging it: the
    first makes one warning, a repeat comes at most every ``repeat_every`` s while it lasts,
    and the first success after it one info line with the outage's length. Errors that are
    not about reaching the database (``is_connection_error``) are the caller's to log.
    """

    def __init__(self, repeat_every: float = 30.0) -> None:
        self.repeat_every = repeat_every
        self.since: float | None = None  # monotonic; set while the database is unreachable
        self._said = 0.0
        self.failures = 0

    def failed(self, during: str, exc: BaseException) -> bool:
        """True (and logged, if due) when ``exc`` is a connection error; False otherwise."""
        if not is_connection_error(exc):
            return False
        now = time.monotonic()
        self.failures += 1
        if self.since is None:
            self.since = self._said = now
            log.warning(
                "database unreachable; retrying quietly until it is back",
                during=during,
                error=_brief(exc),
            )
        elif now - self._said >= self.repeat_every:
            self._said = now
            log.warning(
                "database still unreachable",
                seconds=round(now - self.since),
                failed_calls=self.failures,
                error=_brief(exc),
            )
        return True

    def ok(self) -> None:
        """A call reached the database: ends an outage (logged once)."""
        if self.since is not None:
            log.info(
                "database reachable again",
                outage_seconds=round(time.monotonic() - self.since, 1),
                failed_calls=self.failures,
            )
            self.since = None
            self.failures = 0


def _brief(exc: BaseException) -> str:
    """One line, no traceback: the store's own message, or the error's type and text."""
    text = str(exc) or type(exc).__name__
    return text if text.startswith(("PostgreSQL", "SQLite")) else f"{type(exc).__name__}: {text}"


#: the one per process: every loop of every component reports to it
outage = Outage()


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
            after_outage, failures = failures > 0, 0
            outage.ok()
            if now - began > dead_after / 2 or now - last_ok > dead_after:
                # after a failed beat the outage's own lines said it; only the pause is new
                (log.info if after_outage else log.warning)(
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
            if not outage.failed("heartbeat", exc):
                log.error("heartbeat failed; will retry", error=repr(exc), failures=failures)
