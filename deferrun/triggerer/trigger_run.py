"""Run one stored trigger to its first event: the only place trigger code is called.

The triggerer and ``deferrun.testing.run_trigger`` both go through here, so a trigger behaves
the same in a unit test as in production. Every way a trigger can misbehave (cannot be rebuilt,
a bad ``timer()``, a ``run()`` that is not an async generator, raises anything at all, yields
something that is not a storable ``TriggerEvent``, an oversized payload, a ``cleanup()`` that
raises or hangs) ends in a failure :class:`Outcome` naming the trigger class and what it did
wrong. Nothing a trigger does escapes except a cancellation that really came from us.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import os
import sys
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

from deferrun.connections.redaction import format_error, redact
from deferrun.core import classpaths, serialization
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.basetrigger import BaseTrigger, TaskEndEvent, TriggerEvent
from deferrun.core.models import ClaimedTrigger
from deferrun.exceptions import ConfigError
from deferrun.process import containment
from deferrun.store.machine import stored_error
from deferrun.triggerer.hooks import bounded, close_generator

log = structlog.get_logger("deferrun.triggerer")

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
FIRED = ""  # Outcome.method of an event (the task resumes into its own next_method)
FAILED = BaseOperator.TRIGGER_FAILED_METHOD
TIMED_OUT = BaseOperator.DEFERRAL_TIMEOUT_METHOD
ENDED = "__ended__"  # the trigger ended its task itself (TaskSuccessEvent and friends)


def max_event_bytes_from_env() -> int:
    """``DEFERRUN_MAX_EVENT_BYTES`` (bytes of the stored JSON), default 1 MB."""
    raw = os.environ.get("DEFERRUN_MAX_EVENT_BYTES", "")
    if not raw:
        return DEFAULT_MAX_EVENT_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"DEFERRUN_MAX_EVENT_BYTES={raw!r} is not a whole number of bytes")
    if value < 64:
        raise ConfigError(f"DEFERRUN_MAX_EVENT_BYTES must be at least 64, got {raw!r}")
    return value


@dataclass(slots=True, frozen=True)
class Limits:
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    cleanup_timeout: float = 10.0


@dataclass(slots=True)
class Outcome:
    """What to write for one trigger: its event (``method == FIRED``) or a failure."""

    trigger_id: int
    method: str
    payload: str  # JSON: the event payload, or {"error": message}
    error: str | None = None
    exc: BaseException | None = None  # what the trigger raised, for run_trigger's caller
    end_state: str | None = None  # with ENDED: the state the trigger gave its task
    #: the trigger, where its class has an on_event_written() hook: the event writer writes
    #: this outcome alone, so that the hook hears whether its own event was stored
    hooked: BaseTrigger | None = None
    #: set by the event writer once a store call took this outcome (never unset by a retry)
    stored: bool = False

    @property
    def fired(self) -> bool:
        return self.method == FIRED


@dataclass(slots=True)
class Loaded:
    """A rebuilt trigger; ``timer`` is ``(fire_at, payload JSON)`` if it only waits for a time."""

    trigger: BaseTrigger
    classpath: str
    timer: tuple[float, str] | None


class Misbehaved(Exception):
    """A trigger broke the contract; the message says how (no traceback needed)."""


def failure(
    trigger_id: int, error: str, *, timeout: bool = False, exc: BaseException | None = None
) -> Outcome:
    error = stored_error(redact(error)) or ""  # a lone surrogate in a message must not lose it
    payload = serialization.dumps({"error": error})
    return Outcome(trigger_id, TIMED_OUT if timeout else FAILED, payload, error, exc)


def event_payload(payload: Any, classpath: str, limit: int) -> str:
    """The stored JSON of an event payload, refused when unstorable or over ``limit`` bytes.

    The size is checked right after serializing so an oversized text is dropped at once.
    """
    if isinstance(payload, str | bytes) and len(payload) > limit:
        _oversized(classpath, len(payload), limit)  # no need to copy it into JSON first
    try:
        text = serialization.dumps(payload, "event payload")
    except Exception as exc:
        raise Misbehaved(f"{classpath} yielded an event that cannot be stored: {exc}") from None
    size = len(text) if len(text) > limit or len(text) * 4 <= limit else len(text.encode())
    if size > limit:
        del text
        _oversized(classpath, size, limit)
    return text


def _oversized(classpath: str, size: int, limit: int) -> None:
    raise Misbehaved(
        f"{classpath} yielded an event payload of {size} bytes or more, over the limit of "
        f"{limit} bytes (DEFERRUN_MAX_EVENT_BYTES); store large data elsewhere and send a "
        "reference in the event"
    )


def load(row: ClaimedTrigger, limits: Limits) -> Loaded | Outcome:
    """Rebuild the trigger of ``row`` and ask it for a timer; a failure Outcome if it can't."""
    classpath = row.classpath if isinstance(row.classpath, str) else repr(row.classpath)
    if type(classpath) is str:  # one copy of each class's path, not one per live trigger
        classpath = sys.intern(classpath)
    timeout_in = row.timeout_in
    if timeout_in is not None and not _is_number(timeout_in):
        return failure(
            row.id,
            f"trigger {row.id} ({classpath}) has a stored deadline that is not a time "
            f"({type(timeout_in).__name__}: {timeout_in!r}); defer again with a valid timeout",
        )
    try:
        kwargs = serialization.loads(row.kwargs)
        trigger = classpaths.instantiate(classpath, kwargs, BaseTrigger, "trigger")
    except BaseException as exc:  # a constructor may raise anything, even SystemExit
        return failure(row.id, f"cannot load trigger {classpath}: {_describe(exc)}", exc=exc)
    try:
        trigger.trigger_id = row.id
        trigger.task_id = row.task_id
        # a timer runs in the heap, with no trigger object left to tell its event was written
        timer = None if has_written_hook(type(trigger)) else trigger.timer()
    except BaseException as exc:
        return failure(row.id, f"{classpath}.timer() raised:\n{format_error(exc)}", exc=exc)
    if timer is None:
        return Loaded(trigger, classpath, None)
    if not (isinstance(timer, tuple | list) and len(timer) == 2 and _is_number(timer[0])):
        return failure(
            row.id,
            f"{classpath}.timer() must return None or (fire_at epoch seconds, payload) with a "
            f"finite number, got {_short(timer)}",
        )
    try:
        payload = event_payload(timer[1], classpath, limits.max_event_bytes)
    except Misbehaved as exc:
        return failure(row.id, str(exc))
    return Loaded(trigger, classpath, (float(timer[0]), payload))


async def run_until_event(
    trigger: BaseTrigger,
    code: containment.TriggerCode,
    limits: Limits,
    timeout_in: float | None = None,
    watchdog: Any = None,
    describe: Callable[[str], dict[str, Any] | None] | None = None,
) -> Outcome:
    """Run ``run()`` to its first event, within ``timeout_in`` seconds; cleanup always.

    Only our own cancellation (``Task.cancel``) propagates; a CancelledError the trigger
    raises by itself fails its task like any other error.

    One coroutine frame per live trigger, as it is the body of the trigger's task: it steps
    the generator itself, timing each step for ``watchdog`` (a ``LoopWatchdog``, which names
    a step that blocks the loop), and marks the trigger's code and ids with one context
    variable, ``code`` (the triggerer's own record of the trigger, with its classpath); no
    ``Loaded`` is kept and no timeout object exists
    unless the trigger has a deadline. The frame stays small (it lives as long as the
    trigger): errors and the event are turned into outcomes by helpers, exceptions are read
    with ``sys.exception()`` rather than bound to names.
    """
    started = None if timeout_in is None else time.monotonic()
    outcome: Outcome | None = None
    token = containment.enter_trigger(code)
    timeout = None if timeout_in is None else asyncio.timeout(max(timeout_in, 0))
    agen: Any = None
    try:
        try:
            if timeout is not None:
                await timeout.__aenter__()
            try:
                agen = trigger.run()
                if not hasattr(agen, "__anext__"):
                    raise Misbehaved(_not_async_generator(code.classpath, agen))
                # ``await agen.__anext__()``, one step at a time (as a task would), timed
                step = _first_step(agen)
                value: Any = None
                error: BaseException | None = None
                while True:
                    began = time.monotonic()
                    try:
                        future = step.send(value) if error is None else step.throw(error)
                    except StopIteration:
                        value = sys.exception().value  # type: ignore[union-attr]
                        break
                    except StopAsyncIteration:  # returned without an event
                        value = _END
                        break
                    finally:
                        if watchdog is not None and time.monotonic() - began > watchdog.threshold:
                            _note_step(watchdog, time.monotonic() - began, describe, code)
                    error = None
                    try:
                        value = await _Pass(future)
                    except BaseException:  # delivered into the generator next step
                        value, error = None, sys.exception()
                del step
                outcome = _event_outcome(value, code.trigger_id, code.classpath, limits)
            except BaseException:
                outcome = _error_outcome(code.trigger_id, code.classpath)
                if outcome is None:
                    raise  # ours: shutdown, removal or the deadline
            finally:
                if agen is not None and hasattr(agen, "aclose"):
                    await close_generator(agen, limits.cleanup_timeout, code.classpath)
        except BaseException:
            # the deadline's cancellation becomes TimeoutError here; anything else goes on
            if timeout is None:
                raise
            await timeout.__aexit__(*sys.exc_info())
            raise
        else:
            if timeout is not None:
                await timeout.__aexit__(None, None, None)
    except TimeoutError:  # the trigger's own errors became outcomes above
        outcome = _timed_out(code.trigger_id, code.classpath, started)
    finally:
        try:
            if type(trigger).cleanup is not BaseTrigger.cleanup:  # the default: no-op
                await bounded(trigger.cleanup, limits.cleanup_timeout, code.classpath, "cleanup()")
        finally:
            containment.leave(token)
    assert outcome is not None
    if has_written_hook(type(trigger)):
        outcome.hooked = trigger  # its hook is looked up and called by the writer, guarded
    return outcome


def has_written_hook(cls: type) -> bool:
    """Whether ``cls`` overrides ``on_event_written`` (a static lookup: no user code runs)."""
    try:
        return _has_written_hook(cls)
    except TypeError:  # a class whose metaclass makes it unhashable
        return _written_hook_of(cls) is not _NO_HOOK


def _written_hook_of(cls: type) -> Any:
    return inspect.getattr_static(cls, "on_event_written", None)


_NO_HOOK = vars(BaseTrigger)["on_event_written"]


@functools.lru_cache(maxsize=4096)
def _has_written_hook(cls: type) -> bool:
    return _written_hook_of(cls) is not _NO_HOOK


def _first_step(agen: Any) -> Any:
    """``agen.__anext__()`` (one object less than ``anext(agen, _END)``), without the loop's
    ``firstiter`` hook: the loop would keep the generator in a weak set of its own (about 130
    bytes per live trigger) only to close it at loop shutdown, and ``run_until_event`` always
    closes it itself. The ``finalizer`` hook stays, so a generator dropped unfinished is still
    closed by the loop. The hook runs when ``__anext__()`` is called, before any of the
    trigger's code, so generators that code creates are registered as usual."""
    hooks = sys.get_asyncgen_hooks()
    if hooks.firstiter is None or type(agen) is not types.AsyncGeneratorType:
        # another object's __anext__ is user code (hooks as usual); it may return any
        # awaitable (a Future, a Task, an object with __await__), as ``async for`` accepts
        step = agen.__anext__()
        if hasattr(step, "send") and hasattr(step, "throw"):
            return step
        if not hasattr(step, "__await__"):
            raise TypeError(
                f"{type(agen).__qualname__}.__anext__() returned {_short(step)} "
                f"({type(step).__name__}), which is not awaitable"
            )
        return step.__await__()
    sys.set_asyncgen_hooks(firstiter=None, finalizer=hooks.finalizer)
    try:
        return agen.__anext__()
    finally:
        sys.set_asyncgen_hooks(*hooks)


def _note_step(watchdog: Any, seconds: float, describe: Any, code: containment.TriggerCode) -> None:
    details = {"trigger_id": code.trigger_id, "task_id": code.task_id, "trigger": code.classpath}
    watchdog.note_current_step(seconds, describe, details)


def _event_outcome(event: Any, trigger_id: int, cp: str, limits: Limits) -> Outcome:
    """The outcome of what ``run()`` gave (``_END``: it returned); Misbehaved if unstorable."""
    if event is _END:
        raise Misbehaved(f"{cp}.run() returned without yielding an event")
    if not isinstance(event, TriggerEvent):
        raise Misbehaved(
            f"{cp}.run() yielded {_short(event)} ({type(event).__name__}), "
            "not a TriggerEvent; yield TriggerEvent(payload)"
        )
    payload = event_payload(event.payload, cp, limits.max_event_bytes)
    if isinstance(event, TaskEndEvent):
        return Outcome(trigger_id, ENDED, payload, event.error, end_state=event.state)
    return Outcome(trigger_id, FIRED, payload)


def _error_outcome(trigger_id: int, cp: str) -> Outcome | None:
    """The failure for the exception being handled; None when it is our own cancellation."""
    exc = sys.exception()
    assert exc is not None
    if isinstance(exc, Misbehaved):
        return failure(trigger_id, str(exc))
    if isinstance(exc, asyncio.CancelledError):
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            return None  # ours: shutdown, removal or the deadline
        return failure(
            trigger_id,
            f"trigger {cp} raised CancelledError by itself (nothing cancelled it); "
            f"a trigger must not raise it:\n{format_error(exc)}",
            exc=exc,
        )
    # SystemExit, KeyboardInterrupt, GeneratorExit included
    log.warning("trigger raised", trigger=cp, error=repr(exc))
    return failure(trigger_id, f"trigger {cp} raised:\n{format_error(exc)}", exc=exc)


def _timed_out(trigger_id: int, cp: str, started: float | None) -> Outcome:
    ran = 0.0 if started is None else time.monotonic() - started
    return failure(
        trigger_id,
        f"deferral timed out: trigger {trigger_id} ({cp}) did not fire "
        f"within its timeout (ran {ran:.1f}s here)",
        timeout=True,
    )


class _Pass:
    """Hands what the trigger's step yielded (a future, or None) to the task and returns the
    task's reply: ``(yield future)`` for an ``async def``, in 48 bytes instead of a frame."""

    __slots__ = ("_future",)

    def __init__(self, future: Any) -> None:
        self._future = future

    def __await__(self) -> _Pass:
        return self

    def __iter__(self) -> _Pass:
        return self

    def __next__(self) -> Any:
        return self.send(None)

    def send(self, value: Any) -> Any:
        future = self._future
        if future is _SENT:
            raise StopIteration(value)
        self._future = _SENT
        return future

    def throw(self, typ: Any, value: Any = None, tb: Any = None) -> Any:
        self._future = _SENT
        if isinstance(typ, BaseException):
            raise typ
        raise (value if isinstance(value, BaseException) else typ(value or ())).with_traceback(tb)

    def close(self) -> None:
        self._future = _SENT


_SENT = object()


_END = object()


async def run_to_first_event(row: ClaimedTrigger, limits: Limits) -> Outcome:
    """Everything the triggerer does for one row, in one coroutine (timer path included)."""
    loaded = load(row, limits)
    if isinstance(loaded, Outcome):
        return loaded
    if loaded.timer is None:
        code = containment.TriggerCode(loaded.classpath, row.id, None)
        return await run_until_event(loaded.trigger, code, limits, row.timeout_in)
    fire_at, payload = loaded.timer
    wait = fire_at - time.time()
    if row.timeout_in is not None and row.timeout_in < wait:
        await asyncio.sleep(max(row.timeout_in, 0))
        return failure(
            row.id,
            f"deferral timed out: trigger {row.id} (a timer) did not fire before its timeout",
            timeout=True,
        )
    while (wait := fire_at - time.time()) > 0:
        await asyncio.sleep(min(wait, 3600.0))
    return Outcome(row.id, FIRED, payload)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception as exc:
        text = f"<unprintable {type(value).__name__}: {exc!r}>"
    return text if len(text) <= 200 else text[:200] + "..."


def _describe(exc: BaseException) -> str:
    """``exc`` as one line of text, even when its own ``__str__``/``__repr__`` raise."""
    try:
        text = str(exc) or repr(exc)
    except Exception as err:
        text = f"<str() of the exception raised {type(err).__name__}>"
    return text if type(exc).__name__ in text else f"{type(exc).__name__}: {text}"


def _not_async_generator(classpath: str, result: Any) -> str:
    fix = "write it as: async def run(self): ... yield TriggerEvent(payload)"
    if inspect.iscoroutine(result):
        result.close()  # never awaited: nothing of it ran
        return f"{classpath}.run() is a plain coroutine (async def with no yield); {fix}"
    if inspect.isgenerator(result):
        result.close()
        return f"{classpath}.run() is a sync generator (def with yield, no async); {fix}"
    return f"{classpath}.run() is not an async generator (it returned {_short(result)}); {fix}"
