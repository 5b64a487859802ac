"""The store protocol: what workers, triggerers and clients may ask of the database.

It comes in two halves. :class:`Runtime` is the hot path (claim, defer, fire, record,
heartbeat): each call is one transaction of the state machine in :mod:`deferrun.store.machine`,
fenced so that a stale actor (a reaped worker's old attempt, a triggerer that lost its
trigger) cannot overwrite newer state. :class:`Inspection` is read-mostly (lists, counts,
logs, cancel) for the CLI and clients. After a commit that makes work available the backend
wakes the processes that can take it, so nobody has to poll fast.
"""

from __future__ import annotations

import sqlite3
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import msgspec

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
)
from deferrun.exceptions import StoreUnavailable
from deferrun.store.sql import Channel

if TYPE_CHECKING:
    from deferrun.store.xcom import XComWrite

Role = Literal["worker", "triggerer"]

ROLE_CHANNEL: dict[str, Channel] = {"worker": "tasks", "triggerer": "triggers"}


_SQLITE_TRANSIENT = ("database is locked", "disk i/o error", "database or disk is full")


def is_connection_error(exc: BaseException) -> bool:
    """True when ``exc`` says the database could not be reached, not that the write is bad.

    Only these are worth retrying: any other error on a write will fail the same way forever
    (a bad value, a constraint), so retrying it would stall everything queued behind it.
    """
    if isinstance(exc, StoreUnavailable | OSError | TimeoutError):
        return True
    if isinstance(exc, sqlite3.OperationalError):
        text = str(exc).lower()
        return any(marker in text for marker in _SQLITE_TRANSIENT)
    asyncpg = sys.modules.get("asyncpg")  # only loaded with the PostgreSQL backend
    if asyncpg is None:
        return False
    transient = (
        asyncpg.PostgresConnectionError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
        asyncpg.exceptions.OperatorInterventionError,
        asyncpg.exceptions.InsufficientResourcesError,
        asyncpg.exceptions.DeadlockDetectedError,
        asyncpg.exceptions.SerializationError,
    )
    # InterfaceError: "connection is closed", "pool is closing"; but DataError (a bad
    # argument, also an InterfaceError) is the write's own fault
    return isinstance(exc, transient) or (
        isinstance(exc, asyncpg.InterfaceError) and not isinstance(exc, ValueError)
    )


def is_deadlock(exc: BaseException) -> bool:
    """True when ``exc`` (or what it wraps) is PostgreSQL choosing this transaction as a
    deadlock's or a serialization conflict's victim: nothing was written, and the same
    transaction run again succeeds. Not an outage: a caller that retries it says so."""
    asyncpg = sys.modules.get("asyncpg")
    if asyncpg is None:
        return False
    victim = (asyncpg.exceptions.DeadlockDetectedError, asyncpg.exceptions.SerializationError)
    seen: BaseException | None = exc
    for _ in range(5):  # the connector wraps the driver's error as StoreUnavailable
        if seen is None:
            return False
        if isinstance(seen, victim):
            return True
        seen = seen.__cause__
    return False


class ReapReport(msgspec.Struct):
    """What one maintenance pass changed."""

    retried: list[str] = msgspec.field(default_factory=list)
    failed: list[str] = msgspec.field(default_factory=list)
    released_triggers: int = 0
    timed_out: list[str] = msgspec.field(default_factory=list)
    dead_processes: list[str] = msgspec.field(default_factory=list)
    #: nothing judged: the reaping process's own heartbeat was not fresh
    skipped: bool = False

    @property
    def changed(self) -> bool:
        return bool(
            self.retried
            or self.failed
            or self.released_triggers
            or self.timed_out
            or self.dead_processes
        )


class Wakeup:
    """A level-triggered wake-up flag a loop can sleep on with a timeout.

    Setting it while nobody waits is remembered, so a notification that arrives between two
    waits is never lost.
    """

    def __init__(self) -> None:
        self._event = anyio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self, timeout: float) -> bool:
        if not self._event.is_set():
            with anyio.move_on_after(max(timeout, 0.0)):
                await self._event.wait()
        fired = self._event.is_set()
        if fired:
            self._event = anyio.Event()
        return fired


class Runtime(Protocol):
    """The hot path: every state transition a worker or triggerer makes."""

    url: str

    async def open(self) -> None:
        """Connect, and create or migrate the schema (safe when several processes start)."""

    async def close(self) -> None: ...

    # -- processes and liveness ---------------------------------------------------------------

    async def register_process(
        self, process_id: str, role: Role, queues: Sequence[str], capacity: int
    ) -> Wakeup:
        """Record a live worker/triggerer and return the Wakeup its loop sleeps on."""

    async def heartbeat(self, process_id: str, loop_lag: float | None = None) -> None:
        """Refresh this process's liveness; ``loop_lag`` (its event loop's worst recent lag,
        seconds) is shown on the status page."""

    async def deregister_process(self, process_id: str) -> None:
        """Graceful exit: release this process's triggers and requeue its running tasks."""

    async def reap(self, dead_after: float, judge: str | None = None) -> ReapReport:
        """Recover from dead processes and enforce deferral deadlines.

        ``judge``: the reaping process's id; nothing happens unless its own heartbeat is
        under ``dead_after / 2`` old (``report.skipped`` then).

        Running tasks of a worker silent for ``dead_after`` seconds are retried or failed;
        triggers of a silent triggerer are released for adoption; deferred tasks past their
        deadline are queued to resume with a timeout.
        """

    # -- tasks --------------------------------------------------------------------------------

    async def submit(self, task: NewTask) -> None: ...

    async def submit_many(self, tasks: Sequence[NewTask]) -> None:
        """Insert many tasks in one transaction (bulk loads, fan-out)."""

    async def claim_tasks(
        self, worker_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTask]:
        """Move up to ``limit`` runnable tasks to ``running`` for ``worker_id``."""

    async def next_due(self, queues: Sequence[str]) -> float | None:
        """When (local clock) the earliest task waiting on a retry or reschedule is due."""

    # Every write of an attempt's outcome is fenced on (task_id, claim_token): it changes
    # nothing (returns False/None) unless that very claim is still the task's live attempt.

    # ``xcoms``: what the attempt pushed, written in the same transaction as its outcome.

    async def complete_task(
        self, task_id: str, claim_token: int, result: str | None, xcoms: XComWrite | None = None
    ) -> bool: ...

    async def record_outcomes(
        self,
        writes: Sequence[tuple[str, tuple[Any, ...], Any]],
        claim: tuple[str, Sequence[str], int] | None = None,
    ) -> tuple[list[Any], list[ClaimedTask]]:
        """Several outcome writes ``(kind, args, xcoms)`` in one transaction, each fenced as
        alone and carrying its attempt's XComs;
        then, with ``claim`` = (worker_id, queues, limit), claim tasks for the freed slots."""

    async def fail_task(
        self,
        task_id: str,
        claim_token: int,
        error: str,
        *,
        retry: bool,
        xcoms: XComWrite | None = None,
    ) -> TaskState | None:
        """``up_for_retry`` if ``retry`` and tries remain, else ``failed``."""

    async def skip_task(
        self, task_id: str, claim_token: int, reason: str | None, xcoms: XComWrite | None = None
    ) -> bool: ...

    async def reschedule_task(
        self, task_id: str, claim_token: int, delay: float, xcoms: XComWrite | None = None
    ) -> bool:
        """Free the slot; the task is runnable again ``delay`` seconds from now (DB clock)."""

    async def defer_task(
        self, task_id: str, claim_token: int, deferral: Deferral, xcoms: XComWrite | None = None
    ) -> int | None:
        """Store the trigger and free the task in one transaction; returns the trigger id."""

    async def requeue_task(self, task_id: str, claim_token: int) -> bool:
        """Put a task this worker could not finish back on the queue, same try."""

    async def owned_claims(self, worker_id: str) -> set[tuple[str, int]]:
        """(task_id, claim_token) of the attempts still running under ``worker_id``."""

    # -- triggers -----------------------------------------------------------------------------

    async def claim_triggers(
        self, triggerer_id: str, queues: Sequence[str], limit: int
    ) -> list[ClaimedTrigger]:
        """Assign up to ``limit`` unowned triggers (``queues`` empty = every queue)."""

    async def owned_trigger_ids(self, triggerer_id: str) -> set[int]: ...

    async def owned_trigger_sum(self, triggerer_id: str) -> tuple[int, int]:
        """How many triggers this triggerer holds, and the sum of their ids."""
        ...

    async def fire_triggers(self, events: Sequence[tuple[int, str]]) -> int:
        """Store each (trigger_id, event JSON) and re-queue its task, exactly once per task.

        Returns how many tasks were resumed; an event for a trigger that already fired, was
        cancelled or timed out is dropped.
        """

    async def fail_triggers(self, failures: Sequence[tuple[int, str, str]]) -> int:
        """For each (trigger_id, resume method, event JSON), resume the task into a failure."""

    async def record_trigger_health(
        self, triggerer_id: str, rows: Sequence[tuple[int, int, str | None, float | None]]
    ) -> None:
        """Store (trigger_id, consecutive failed polls, last error, last success) of triggers
        this triggerer holds: one batch, not a write per poll."""

    async def release_triggers(self, triggerer_id: str, ids: Sequence[int] | None = None) -> int:
        """Give up triggers (all, or ``ids``) so another triggerer adopts them at once."""

    async def end_triggers(self, items: Sequence[tuple[int, str, str | None, str | None]]) -> int:
        """Triggers that ended their own task: (trigger_id, state, result JSON, error)."""

    async def upstream_results(self, task_id: str) -> dict[str, Any]:
        """``context["upstream"]`` of a task: its upstreams' states and results."""

    async def load_xcoms(self, task_id: str) -> dict[str, dict[str, str]]:
        """XCom JSON by task id and key: the task's own and its upstream tasks'."""

    async def write_xcoms(
        self, task_id: str, claim_token: int, values: dict[str, str], *, clear: bool
    ) -> bool:
        """Store an attempt's pushed XComs, fenced on its claim; False if it lost the task."""

    async def append_task_logs(
        self, rows: Sequence[tuple[str, float, str, str]], keep: int
    ) -> None:
        """Insert (task_id, at, source, line) rows, then keep the newest ``keep`` per task."""


class Inspection(Protocol):
    """What clients and the CLI read, and the one write an operator makes by hand."""

    async def get_task(self, task_id: str) -> TaskInfo | None: ...

    async def list_tasks(
        self,
        state: TaskState | None = None,
        limit: int = 1000,
        before: str | TaskInfo | None = None,
    ) -> list[TaskInfo]:
        """Newest first; ``before`` (a listed TaskInfo, or a task id that exists) gives the
        page after that task (keyset); an unknown id raises TaskNotFound."""

    async def count_tasks(self) -> dict[str, int]: ...

    async def cancel_task(self, task_id: str) -> TaskInfo | None:
        """Cancel an unfinished task; its waiters settle in the same transaction."""

    async def retry_task(self, task_id: str, *, downstream: bool = False) -> list[str]:
        """Re-run a finished task (and re-arm its downstream); the ids touched."""

    async def dependencies(self, task_id: str) -> tuple[list[str], list[str]]:
        """(upstream ids, downstream ids) of a task."""

    async def upstream_waits(self, ids: Sequence[str]) -> dict[str, UpstreamWait]:
        """What each task in ``ids`` that has upstreams waits for."""

    async def list_triggers(self) -> list[TriggerInfo]: ...

    async def list_processes(self) -> list[ProcessInfo]: ...

    async def task_logs(self, task_id: str, limit: int = 10000) -> list[tuple[float, str, str]]:
        """(at, source, line) in the order they were logged, across processes."""


class Observation(Protocol):
    """The status page's reads and retention (``deferrun web``, ``deferrun db clean``);
    implemented in :mod:`deferrun.store.observe`."""

    async def clean_finished(
        self,
        older_than: float,
        states: Sequence[str] = (),
        *,
        batch_size: int = 500,
        dry_run: bool = False,
        on_batch: Any = None,
    ) -> Any:
        """Delete finished tasks older than ``older_than`` s in short batches (a CleanReport)."""

    async def active_counts(self) -> dict[str, int]: ...

    async def capped_state_counts(self) -> dict[str, int]: ...

    async def process_load(self) -> list[dict[str, Any]]: ...

    async def oldest_triggers(self) -> dict[str, dict[str, Any] | None]: ...

    async def trigger_groups(self) -> list[dict[str, Any]]: ...

    async def failing_triggers(self, limit: int = 100) -> list[dict[str, Any]]:
        """Triggers whose last polls failed, with their health (oldest first)."""

    async def trigger_health(self, trigger_id: int) -> dict[str, Any] | None:
        """The poll health of a trigger (None once it is gone)."""

    async def alert_state(self, dead_after: float) -> dict[str, Any]:
        """Oldest unclaimed trigger and queued task ages, live processes by role."""

    async def triggers_of_class(
        self, classpath: str, after: int = 0, limit: int = 100
    ) -> list[dict[str, Any]]: ...

    async def task_page(
        self,
        *,
        state: str | None = None,
        name: str | None = None,
        queue: str | None = None,
        cursor: str | None = None,
        limit: int = 50,
    ) -> tuple[list[TaskInfo], str | None]:
        """Keyset-paged tasks, newest first, and the next page's cursor."""

    async def task_detail(self, task_id: str) -> dict[str, Any] | None: ...

    async def task_logs_after(
        self, task_id: str, after: int = 0, limit: int = 500
    ) -> list[dict[str, Any]]: ...


class Store(Runtime, Inspection, Observation, Protocol):
    """Both halves: what every backend implements."""
