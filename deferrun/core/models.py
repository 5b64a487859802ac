"""Records that cross the store boundary: task states, task info, claimed rows.

Timestamps travel as float epoch seconds inside the runtime (cheap to compare, identical on
every backend) and become tz-aware datetimes only in what users see (TaskInfo).
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime
from typing import Any

import msgspec


class TaskState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DEFERRED = "deferred"
    UP_FOR_RESCHEDULE = "up_for_reschedule"
    UP_FOR_RETRY = "up_for_retry"
    SUCCESS = "success"
    FAILED = "failed"
    SKIPPED = "skipped"
    CANCELLED = "cancelled"
    #: an upstream failed (or was cancelled) so this task's trigger rule can never hold
    UPSTREAM_FAILED = "upstream_failed"

    @property
    def finished(self) -> bool:
        return self in FINISHED_STATES


FINISHED_STATES = frozenset(
    {
        TaskState.SUCCESS,
        TaskState.FAILED,
        TaskState.SKIPPED,
        TaskState.CANCELLED,
        TaskState.UPSTREAM_FAILED,
    }
)


def ts(value: float | None) -> datetime | None:
    """A stored epoch time as a datetime; None for a value no datetime can hold (a NaN, a
    year past 9999, a string in a forged row), so one odd row never breaks a listing."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):
        return None


class Deferral(msgspec.Struct, frozen=True):
    """Everything persisted, in one transaction, when a running task defers."""

    classpath: str
    kwargs: str
    method_name: str
    method_kwargs: str
    #: seconds from now (on the database's clock) until the deferral times out
    timeout: float | None
    #: a task whose end fires this trigger from the store itself (TaskStateTrigger)
    watch_task_id: str | None = None
    #: hash of classpath + kwargs: identical triggers run once, claimed together (shared_runs)
    affinity: str | None = None
    #: the shared poll this trigger joins, for ``deferrun triggers`` (shared_polls)
    poll_key: str | None = None


class NewTask(msgspec.Struct, frozen=True):
    """A task as submitted: the serialized operator and its scheduling options."""

    id: str
    name: str
    classpath: str
    kwargs: str  # JSON
    queue: str
    max_tries: int
    retry_delay: float
    execution_timeout: float | None
    #: upstream task ids this task waits on, and the rule over their outcomes
    after: tuple[str, ...] = ()
    trigger_rule: str | None = None
    #: a trigger to wait on before the first try (start from a trigger)
    start: Deferral | None = None


class ClaimedTask(msgspec.Struct, frozen=True):
    """What a worker needs to run one try (or one resume) of a task."""

    id: str
    name: str
    classpath: str
    kwargs: str
    queue: str
    try_number: int
    max_tries: int
    retry_delay: float
    execution_timeout: float | None
    next_method: str | None
    next_kwargs: str | None
    event: str | None
    try_started_at: float
    created_at: float
    #: fencing token of this claim: every write of its outcome is guarded on it, so a stale
    #: attempt (its worker was reaped, the task claimed again) can never record anything
    claim_token: int
    #: set when the task has upstreams (whose results its context shows)
    trigger_rule: str | None = None
    #: the task has XCom values stored (read only then: most resumes have none to pull)
    has_xcoms: bool = True


class ClaimedTrigger(msgspec.Struct, frozen=True):
    id: int
    task_id: str
    classpath: str
    kwargs: str
    #: seconds left until the deferral times out, on the database's clock (None: no timeout)
    timeout_in: float | None
    #: the affinity key stored with the trigger (identical triggers share it); None for rows
    #: stored without one
    affinity: str | None = None


class TaskInfo(msgspec.Struct, frozen=True):
    """A task as users see it (``Client.get``, ``deferrun task``)."""

    id: str
    name: str
    classpath: str
    queue: str
    #: a TaskState; a row written by something else may hold an unknown state, shown as is
    state: TaskState | str
    try_number: int
    max_tries: int
    result: Any = None
    error: str | None = None
    next_method: str | None = None
    trigger_id: int | None = None
    trigger_classpath: str | None = None
    triggerer_id: str | None = None
    worker_id: str | None = None
    defer_deadline: datetime | None = None
    not_before: datetime | None = None
    created_at: datetime | None = None
    started_at: datetime | None = None
    updated_at: datetime | None = None
    finished_at: datetime | None = None
    #: the exact stored creation time: ``Client.list(before=info)`` continues from this row
    #: even once the row itself is deleted
    created_key: float | None = None

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_STATES


class TriggerInfo(msgspec.Struct, frozen=True):
    id: int
    task_id: str
    classpath: str
    kwargs: Any
    queue: str
    triggerer_id: str | None
    created_at: datetime | None
    deadline: datetime | None
    #: identical triggers share it (one run() per triggerer); None for unshareable classes
    affinity: str | None = None
    #: the shared poll the trigger joins, as ``Class key`` (None: polls alone)
    poll_key: str | None = None


class ProcessInfo(msgspec.Struct, frozen=True):
    id: str
    role: str
    host: str
    pid: int
    queues: list[str]
    capacity: int
    started_at: datetime | None
    heartbeat_at: datetime | None
    alive: bool


class UpstreamWait(msgspec.Struct, frozen=True):
    """What a task with upstreams waits for: its rule, how many upstreams, how many ended."""

    trigger_rule: str
    upstream: int
    ended: int

    def __str__(self) -> str:
        return f"waits on {self.upstream} upstream ({self.trigger_rule}), {self.ended} ended"
