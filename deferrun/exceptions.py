"""Signals an operator raises to steer its task, and errors users can hit.

The signals (TaskDeferred, SkipTask, FailTask, TaskTimeout) are part of the authoring API;
the errors name what went wrong and what to do about it.
"""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from deferrun.core.basetrigger import BaseTrigger


class DeferrunError(Exception):
    """Base of every error deferrun raises on its own account."""


class ConfigError(DeferrunError):
    """A setting (database URL, connection, CLI option) is unusable."""


class SerializationError(DeferrunError):
    """A value cannot be stored as JSON, or a stored row cannot be loaded."""


class ClassLoadError(SerializationError):
    """A stored classpath does not name a class deferrun is allowed to build."""


class StoreUnavailable(DeferrunError):
    """The database cannot be reached right now (connection lost, server down, disk full,
    locked past the busy timeout). Worth retrying; any other store error means the write
    itself is bad and retrying it can never succeed."""


class StoreGone(ConfigError):
    """The database this process opened is gone (its file deleted or replaced): fatal, the
    process must stop rather than write anywhere else."""


class TaskNotFound(DeferrunError):
    """No task has this id in the database."""


class TaskEnded(DeferrunError):
    """The task has already ended: there is nothing to cancel."""


class RetryRefused(DeferrunError, ValueError):
    """Only a finished task can be retried: this one was already retried (two retries at
    once: one runs, the other is refused) or has not ended yet."""


class TaskDeferred(BaseException):
    """Raised by an operator to hand its wait to the triggerer and free its worker slot.

    A BaseException so that a broad ``except Exception`` in user code does not swallow it.
    """

    def __init__(
        self,
        trigger: BaseTrigger,
        method_name: str = "execute_complete",
        kwargs: dict[str, Any] | None = None,
        timeout: timedelta | float | None = None,
    ) -> None:
        super().__init__(trigger, method_name, kwargs, timeout)
        self.trigger = trigger
        self.method_name = method_name
        self.kwargs = kwargs or {}
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"TaskDeferred(trigger={self.trigger!r}, method_name={self.method_name!r})"


class TaskReschedule(BaseException):
    """Raised by a reschedule-mode sensor: put the task back, runnable again ``delay`` seconds
    from now (measured on the database's clock, like every other due time)."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay)
        self.delay = delay


class SkipTask(Exception):
    """Ends the task in state ``skipped``."""


class FailTask(Exception):
    """Ends the task in state ``failed`` without using its remaining retries."""


class TaskTimeout(Exception):
    """The task ran past its execution_timeout, or its deferral past the defer timeout.

    Operators may raise it themselves. The worker never injects it: a running attempt is
    stopped with :class:`AttemptTimedOut`, and the task's error then reads
    ``TaskTimeout: execution_timeout of Xs exceeded``.
    """


class AttemptInterrupted(BaseException):
    """Injected into operator code to stop a running attempt (internal).

    A BaseException so that ``except Exception`` in operator code (a retry loop, say) cannot
    swallow it and keep running after the task was recorded failed or taken away.
    """


class AttemptTimedOut(AttemptInterrupted):
    """The attempt ran past its execution_timeout."""


class AttemptCancelled(AttemptInterrupted):
    """The attempt was stopped: task cancelled, taken over by a newer claim, or shutdown."""


class TriggerFailed(Exception):
    """The task's trigger raised, ended without an event, or could not be loaded."""


class TransientError(Exception):
    """Raised by ``PollingTrigger.poll()``: not an answer yet (network, 5xx, throttling).

    The trigger retries with exponential backoff instead of failing its task. ``retry_after``
    (seconds, e.g. from an HTTP ``Retry-After`` header) makes the next poll wait at least that
    long, capped at the trigger's ``max_backoff``.
    """

    def __init__(self, *args: object, retry_after: float | None = None) -> None:
        super().__init__(*args)
        self.retry_after = retry_after


__all__ = [
    "AttemptCancelled",
    "AttemptInterrupted",
    "AttemptTimedOut",
    "ClassLoadError",
    "ConfigError",
    "DeferrunError",
    "FailTask",
    "RetryRefused",
    "SerializationError",
    "SkipTask",
    "StoreGone",
    "StoreUnavailable",
    "TaskDeferred",
    "TaskEnded",
    "TaskNotFound",
    "TaskReschedule",
    "TaskTimeout",
    "TransientError",
    "TriggerFailed",
]
