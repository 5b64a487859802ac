"""BaseTrigger and TriggerEvent: what a deferred task waits on, run inside the triggerer.

A trigger is stored as ``serialize() -> (classpath, kwargs)`` and rebuilt in the triggerer as
``cls(**kwargs)``. The default ``serialize()`` replays the keyword arguments the constructor was
called with, so most triggers need no boilerplate; Airflow-style triggers that override it keep
working unchanged.
"""

from __future__ import annotations

import contextvars
import inspect
import math
import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import structlog

from deferrun.core.classpaths import classpath_of
from deferrun.core.fieldlog import FieldLogger
from deferrun.exceptions import SerializationError, TransientError

_SIGNATURES: dict[type, inspect.Signature | None] = {}


def capture_init_kwargs(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Map a constructor call onto keyword arguments, so it can be replayed as ``cls(**kw)``.

    Positional arguments become keywords by name; ``*args`` cannot be replayed and are reported
    by the caller at serialization time (marker key ``"*args"``).
    """
    if not args:
        return dict(kwargs)
    sig = _SIGNATURES.get(cls, False)
    if sig is False:
        try:
            sig = inspect.signature(cls)
        except (TypeError, ValueError):
            sig = None
        _SIGNATURES[cls] = sig
    if sig is None:
        return {"*args": args, **kwargs}
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return {"*args": args, **kwargs}  # the real __init__ raises the user-facing error
    out: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                out["*args"] = value
        elif kind is inspect.Parameter.VAR_KEYWORD:
            out.update(value)
        else:
            out[name] = value
    return out


def replayable_kwargs(obj: object, kind: str) -> dict[str, Any]:
    captured: dict[str, Any] = dict(getattr(obj, "_init_kwargs", {}))
    if "*args" in captured:
        raise SerializationError(
            f"{kind} {type(obj).__qualname__} was built with *args {captured['*args']!r}, which "
            "cannot be stored; pass every argument by keyword, or override serialize()"
        )
    return captured


class TriggerEvent:
    """What a trigger yields when its condition holds; ``payload`` reaches the resumed task."""

    __slots__ = ("payload",)

    def __init__(self, payload: Any = None) -> None:
        self.payload = payload

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TriggerEvent) and other.payload == self.payload

    def __hash__(self) -> int:
        return hash(repr(self.payload))

    def __repr__(self) -> str:
        return f"TriggerEvent({self.payload!r})"


class TaskEndEvent(TriggerEvent):
    """Yielded by a trigger to end its task itself: no worker resumes it."""

    __slots__ = ("error", "state")

    state: str
    error: str | None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.payload!r})"


class TaskSuccessEvent(TaskEndEvent):
    """End the task ``success`` with ``result`` (Airflow's name)."""

    def __init__(self, result: Any = None) -> None:
        super().__init__(result)
        self.state, self.error = "success", None


class TaskFailedEvent(TaskEndEvent):
    """End the task ``failed`` with ``error``, without retries (Airflow's name)."""

    def __init__(self, error: str = "the trigger ended the task as failed") -> None:
        super().__init__(None)
        self.state, self.error = "failed", str(error)


class TaskSkippedEvent(TaskEndEvent):
    """End the task ``skipped`` (Airflow's name)."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(None)
        self.state, self.error = "skipped", reason


class BaseTrigger:
    """Subclass and implement ``async def run(self)`` yielding one :class:`TriggerEvent`.

    ``run()`` executes in the triggerer's event loop beside thousands of other triggers: await,
    never block (use ``anyio.to_thread.run_sync`` for blocking calls). Only the first event
    counts. ``cleanup()`` runs whenever ``run()`` ends, fires, fails or is cancelled.
    """

    #: set by the triggerer before ``run()``; useful in log lines
    trigger_id: int | None = None
    task_id: str | None = None

    _init_kwargs: dict[str, Any]
    _log: Any = None

    def __new__(cls, *args: Any, **kwargs: Any) -> BaseTrigger:
        self = super().__new__(cls)
        self._init_kwargs = capture_init_kwargs(cls, args, kwargs)
        return self

    def serialize(self) -> tuple[str, dict[str, Any]]:
        """``(classpath, kwargs)`` such that ``classpath(**kwargs)`` rebuilds this trigger."""
        return classpath_of(type(self)), replayable_kwargs(self, "trigger")

    async def run(self) -> AsyncIterator[TriggerEvent]:
        raise NotImplementedError(f"{type(self).__qualname__} must implement async def run()")
        yield  # pragma: no cover - makes this an async generator

    async def cleanup(self) -> None:
        """Release what ``run()`` held. Runs on fire, failure, timeout, cancel and shutdown."""

    async def on_task_cancelled(self) -> None:
        """Called after ``cleanup()`` only when a user cancelled the waiting task.

        Never on a triggerer's shutdown, restart or failover (another triggerer takes the
        trigger over), nor on fire, failure or timeout: the place to cancel an external job run
        that the task started. Bounded like ``cleanup()``; runs if the triggerer running the
        trigger is alive when the cancel happens (it notices within its reconcile interval).
        """

    def on_event_written(self, stored: bool) -> None:
        """Called in the triggerer once this trigger's outcome was written: ``stored`` is True
        when its event was stored (its task resumes with it), False when it was not (a failure
        was stored instead, the task was resumed by another triggerer meanwhile, or nothing
        could be stored).

        For a trigger that may act only once its event is durable, such as deleting the message
        the event carries. A plain ``def``: it runs on the triggerer's event loop, so keep it
        short and never block (a slow one is named in the log). Never called if the process
        dies first, nor outside a triggerer. A class with this hook never shares its run() with
        identical triggers, and its ``timer()`` is not used (it runs as a coroutine).
        """

    def watched_task(self) -> str | None:
        """The id of a task whose end fires this trigger from the store itself, or None.

        The store fires it in the transaction that ends that task, so nothing polls
        (``triggers.task.TaskStateTrigger``); ``run()`` is then only a fallback.
        """
        return None

    def timer(self) -> tuple[float, Any] | None:
        """``(fire_at, payload)`` if this trigger does nothing but wait for a moment.

        The triggerer then keeps it in one shared timer heap instead of running ``run()`` as a
        task of its own (a few hundred bytes instead of several KB). The default, None, runs
        ``run()``.
        """
        return None

    @property
    def log(self) -> Any:
        if self._log is None:
            self._log = FieldLogger(
                structlog.get_logger(f"trigger.{type(self).__qualname__}").bind(
                    trigger_id=self.trigger_id, task_id=self.task_id
                )
            )
        return self._log

    def __repr__(self) -> str:
        try:
            _, kwargs = self.serialize()
        except Exception:
            kwargs = getattr(self, "_init_kwargs", {})
        args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        return f"{type(self).__qualname__}({args})"


MIN_POLL_INTERVAL = 0.01


def check_interval(value: Any, name: str = "poll_interval") -> float:
    """``value`` as seconds if it is a finite number >= MIN_POLL_INTERVAL, else ValueError.

    Zero, negative, NaN or infinite intervals would busy-poll a service or never poll at all.
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or value < MIN_POLL_INTERVAL:
        raise ValueError(
            f"{name} must be a finite number of seconds >= {MIN_POLL_INTERVAL:g}, got {value!r}"
        )
    return float(value)


#: told each poll's outcome (the trigger, and its error or None) by ``PollingTrigger.run`` and
#: the shared polls; a triggerer sets it to store each trigger's health (None elsewhere)
poll_outcome: contextvars.ContextVar[Callable[[Any, BaseException | None], None] | None] = (
    contextvars.ContextVar("deferrun_poll_outcome", default=None)
)


def report_poll(trigger: Any, error: BaseException | None) -> None:
    """Tell the triggerer (if any) how ``trigger``'s poll went; never raises into the poll."""
    sink = poll_outcome.get()
    if sink is not None:
        try:
            sink(trigger, error)
        except Exception:  # health is a report: it must never fail the trigger
            pass


class PollingTrigger(BaseTrigger):
    """A trigger that checks a condition every ``poll_interval`` seconds.

    Implement ``async def poll(self) -> TriggerEvent | None``: return an event when the
    condition holds, None while it does not; raise ``TransientError`` for a failure worth
    retrying (with exponential backoff up to ``max_backoff``; a ``retry_after`` on it is a
    floor for the next wait), anything else to fail the task. Sensors in poke and reschedule
    mode call the same ``poll()``, so both paths agree.
    """

    poll_interval: float = 5.0
    max_backoff: float = 300.0

    async def poll(self) -> TriggerEvent | None:
        raise NotImplementedError(f"{type(self).__qualname__} must implement async def poll()")

    def shared_poll_key(self) -> str | None:
        """What this trigger polls, when one request can answer several triggers (e.g. one
        listing for many keys under a prefix); None (the default) polls alone. Triggers in
        one process with the same class (owner of ``poll_many``) and key share one poll loop
        (``deferrun.triggerer.shared_polls``); the key is shown by ``deferrun triggers``: no
        secrets."""
        return None

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | BaseException | None]:
        """Answer every trigger of one shared poll with one request: a result per trigger, in
        order (an event, None for "not yet", or an exception that fails that trigger).
        Raise ``TransientError`` to back off all of them, anything else to fail all."""
        raise NotImplementedError(
            f"{cls.__qualname__} has a shared_poll_key() but no classmethod poll_many()"
        )

    def _jittered(self, seconds: float) -> float:
        # +-10 % so a thousand triggers deferred together do not poll in lockstep forever
        return seconds * random.uniform(0.9, 1.1)

    def retry_delay(self, failures: int, retry_after: float | None) -> float:
        """Seconds to wait after the ``failures``-th transient error in a row (jitter included).

        Exponential from ``poll_interval``; a server's ``retry_after`` is a floor (jitter only
        adds to it). Both are capped at ``max_backoff`` (or the poll interval, if longer).
        """
        cap = max(self.max_backoff, self.poll_interval)
        delay = min(self.poll_interval * 2 ** min(failures, 16), cap)
        if retry_after is not None and math.isfinite(retry_after) and retry_after > delay:
            return min(retry_after, cap) * random.uniform(1.0, 1.1)
        return self._jittered(delay)

    async def run(self) -> AsyncIterator[TriggerEvent]:
        check_interval(self.poll_interval)
        key = self.shared_poll_key()
        if key is not None:
            from deferrun.triggerer import shared_polls

            yield await shared_polls.join(self, key)
            return
        failures = 0
        while True:
            try:
                event = await self.poll()
            except TransientError as exc:
                failures += 1
                retry_after = getattr(exc, "retry_after", None)  # a subclass may skip __init__
                if not isinstance(retry_after, int | float) or isinstance(retry_after, bool):
                    retry_after = None
                delay = self.retry_delay(failures, retry_after)
                report_poll(self, exc)
                self.log.warning(
                    "poll failed; retrying",
                    error=str(exc),
                    attempt=failures,
                    retry_in=round(delay, 2),
                )
                await anyio.sleep(delay)
                continue
            if failures:
                failures = 0
            report_poll(self, None)
            if event is not None:
                yield event
                return
            await anyio.sleep(self._jittered(self.poll_interval))
