"""One attempt of operator code: load the operator, call its method with its context, and turn
whatever happens into an outcome, under execution_timeout and cancellation.

Operator code is hostile until proven otherwise. Sync methods run in a thread of their own
(never anyio's shared pool, which the SQLite store uses; reused only as attempt_threads
describes, never after a signal was injected), so a signal injected into that thread can only
ever land in this attempt. The injected signals (AttemptTimedOut,
AttemptCancelled) are BaseExceptions, so ``except Exception`` in operator code cannot swallow
them. Anything operator code raises - SystemExit, KeyboardInterrupt, GeneratorExit and
CancelledError included - fails only its own task, never the worker.
"""

from __future__ import annotations

import asyncio
import contextvars
import ctypes
import inspect
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import anyio
import structlog

from deferrun.connections.redaction import format_error
from deferrun.core import classpaths, serialization
from deferrun.core.baseoperator import BaseOperator
from deferrun.core.models import ClaimedTask
from deferrun.exceptions import (
    AttemptCancelled,
    AttemptTimedOut,
    ClassLoadError,
    FailTask,
    SerializationError,
    SkipTask,
    TaskDeferred,
    TaskReschedule,
    TaskTimeout,
    TriggerFailed,
)
from deferrun.process.containment import user_code
from deferrun.worker.attempt_threads import AttemptThreads
from deferrun.worker.context import XComState, airflow_context, start_call

log = structlog.get_logger("deferrun.worker")

#: exceptions that stop a process or a task when they escape; from operator code they only
#: fail the task that raised them
PROCESS_EXITS = (SystemExit, KeyboardInterrupt, GeneratorExit, asyncio.CancelledError)


@dataclass
class Succeeded:
    result: Any


@dataclass
class Failed:
    error: str
    retry: bool


#: what an attempt ends with; None means it was stopped (cancelled, taken over, shutdown)
Outcome = Succeeded | Failed | TaskDeferred | TaskReschedule | SkipTask | None


@dataclass
class _Returned:
    value: Any


@dataclass
class _Raised:
    exc: BaseException


#: threads for attempts run outside a worker
SHARED_THREADS = AttemptThreads()

_TIMED_OUT = "timed out"
_STOPPED = "stopped"


class Attempt:
    """One claim of a task running here: how to stop it, and whether its code still runs."""

    def __init__(self, claimed: ClaimedTask) -> None:
        self.claimed = claimed
        self.scope = anyio.CancelScope()
        self.cancel_event = threading.Event()
        self.cancel_reason: str | None = None
        self.recording = False
        self.started = time.monotonic()
        #: set once no code of this attempt runs any more (its thread included)
        self.code_done = anyio.Event()
        self._in_thread = False
        self._guard = threading.Lock()
        self._thread_ident: int | None = None  # set while sync operator code may be interrupted
        #: the upstream tasks' states and results (tasks submitted with after=...)
        self.upstream: dict[str, Any] = {}
        #: the database URL (sensors that read other tasks open their own client on it)
        self.db_url: str | None = None
        #: XCom values this attempt may pull, and those it pushed (deferrun.worker.context)
        self.xcom = XComState()
        #: the operator once built (for on_kill when a user cancels the task)
        self.operator: Any = None
        #: where its sync code runs (a worker gives each attempt its own pool)
        self.threads = SHARED_THREADS

    @property
    def key(self) -> tuple[str, int]:
        return (self.claimed.id, self.claimed.claim_token)

    def cancel(self, reason: str) -> None:
        self.cancel_reason = self.cancel_reason or reason
        self.cancel_event.set()
        self.scope.cancel()
        self.interrupt(AttemptCancelled)

    def interrupt(self, exc_type: type[BaseException]) -> None:
        """Raise ``exc_type`` in the attempt's thread at its next bytecode, at most once.

        Only while the thread is armed, under the lock the thread disarms with, so the thread
        is alive when hit (its id cannot have been reused by another thread).
        """
        if self._thread_ident is None:
            return
        with self._guard:
            ident, self._thread_ident = self._thread_ident, None
            if ident is not None:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(
                    ctypes.c_ulong(ident), ctypes.py_object(exc_type)
                )

    @property
    def thread_running(self) -> bool:
        """The attempt's sync code still runs in its thread (e.g. past execution_timeout,
        blocked in a C call that the interrupt cannot reach until it returns)."""
        return self._in_thread

    def end_code(self) -> None:
        """Mark the attempt's code as finished unless its thread still runs."""
        if not self._in_thread:
            self.code_done.set()


async def run_attempt(attempt: Attempt) -> Outcome:
    """Run the attempt's operator method and return its outcome."""
    try:
        prepared = _prepare(attempt)
        if not isinstance(prepared, tuple):
            return prepared
        fn, context, kwargs, method_name = prepared
        timeout = attempt.claimed.execution_timeout
        log.debug("running", method=method_name)
        if inspect.iscoroutinefunction(fn):
            raw = await _call_async(attempt, fn, context, kwargs, timeout)
        else:
            raw = await _call_sync(attempt, fn, context, kwargs, timeout)
        return _classify(raw, method_name, timeout)
    finally:
        attempt.end_code()


def _prepare(attempt: Attempt) -> Failed | tuple[Callable[..., Any], Any, dict[str, Any], str]:
    """Load the operator, the method to call and its arguments; a Failed if that is impossible.

    The constructor is operator code too: whatever it raises fails the task only.
    """
    task = attempt.claimed
    damage = _damaged(task)
    if damage:
        return Failed(f"task {task.id} has a stored row this worker cannot run: {damage}", False)
    try:
        op = classpaths.instantiate(
            task.classpath, serialization.loads(task.kwargs), BaseOperator, "operator"
        )
    except (ClassLoadError, SerializationError) as exc:
        return Failed(f"cannot load operator {task.classpath}: {exc}", retry=False)
    except BaseException as exc:  # operator code: anything, SystemExit included
        return Failed(
            f"constructing operator {task.classpath} raised:\n{format_error(exc)}", retry=True
        )
    attempt.operator = op
    method_name = task.next_method or "execute"
    kwargs: dict[str, Any] = {}
    if task.next_method is not None:
        try:
            kwargs = serialization.loads(task.next_kwargs) or {}
            if not isinstance(kwargs, dict):
                raise SerializationError(
                    f"its resume kwargs are a {type(kwargs).__name__}, not an object"
                )
            kwargs["event"] = serialization.loads(task.event)
        except SerializationError as exc:
            return Failed(f"cannot load the stored event of task {task.id}: {exc}", retry=False)
    trigger_event: Any = None
    if method_name == BaseOperator.START_METHOD:  # started from a trigger: execute, with it
        trigger_event = kwargs.get("event")
        kwargs = {}
    try:
        if method_name == BaseOperator.START_METHOD:
            fn, kwargs = start_call(op, trigger_event)
        elif method_name == BaseOperator.DEFERRAL_TIMEOUT_METHOD:
            fn = op.on_deferral_timeout
        elif method_name == BaseOperator.TRIGGER_FAILED_METHOD:
            fn = op.on_trigger_failed
        else:
            fn = getattr(op, method_name, None)
            if fn is None or not callable(fn) or method_name.startswith("_"):
                return Failed(
                    f"operator {task.classpath} has no method {method_name!r} to "
                    "resume with; check defer(method_name=...)",
                    retry=False,
                )
        context = build_context(attempt, op)
        if method_name == BaseOperator.START_METHOD:
            context["trigger_event"] = trigger_event
    except BaseException as exc:  # a property or __getattr__ of the operator raised
        return Failed(f"preparing {task.classpath}.{method_name}:\n{format_error(exc)}", True)
    return fn, context, kwargs, method_name


def _damaged(task: Any) -> str | None:
    """What is wrong with a claimed row's own columns (a forged or corrupted row), if anything.

    Checked before anything runs: such a row must fail its own task, never the worker.
    """
    timeout = task.execution_timeout
    if timeout is not None and not (
        isinstance(timeout, int | float)
        and not isinstance(timeout, bool)
        and math.isfinite(timeout)
        and timeout >= 0
    ):
        return f"execution_timeout {timeout!r} is not a number of seconds"
    for name in ("try_started_at", "created_at"):
        value = getattr(task, name)
        if not (isinstance(value, int | float) and math.isfinite(value)):
            return f"{name} {value!r} is not a time"
    for name in ("classpath", "kwargs"):
        if not isinstance(getattr(task, name), str):
            return f"{name} is not text"
    if task.next_method is not None and not isinstance(task.next_method, str):
        return f"next_method {task.next_method!r} is not a method name"
    return None


def build_context(attempt: Attempt, op: BaseOperator) -> dict[str, Any]:
    task = attempt.claimed
    return airflow_context(attempt, op) | {
        "task_id": task.id,
        "task_name": task.name,
        "try_number": task.try_number,
        "max_tries": task.max_tries,
        "queue": task.queue,
        "try_started_at": datetime.fromtimestamp(task.try_started_at, UTC),
        "created_at": datetime.fromtimestamp(task.created_at, UTC),
        "resumed": task.next_method is not None,
        "cancel_event": attempt.cancel_event,
        "operator": op,
        "log": op.log,
        #: upstream tasks by id (and by name where unique): {"state", "result", ...}
        "upstream": attempt.upstream,
        "db": attempt.db_url,
    }


async def _call_async(
    attempt: Attempt,
    fn: Callable[..., Any],
    context: Any,
    kwargs: dict[str, Any],
    timeout: float | None,
) -> _Returned | _Raised | str:
    """Await ``fn`` on the loop under execution_timeout; a CancelledError of its own is an error.

    Our own cancellations (timeout, attempt stopped) are told apart from one the operator
    raised by whether one of our scopes was cancelled.
    """
    deadline = anyio.current_time() + timeout if timeout else math.inf
    raw: _Returned | _Raised
    with anyio.CancelScope(deadline=deadline) as limit:
        try:
            with user_code(f"operator {attempt.claimed.classpath}"):
                value = await fn(context, **kwargs)
                if inspect.isawaitable(value):
                    value = await value
            raw = _Returned(value)
        except BaseException as exc:  # operator code may raise anything
            if isinstance(exc, asyncio.CancelledError) and (
                limit.cancel_called or attempt.scope.cancel_called
            ):
                raise  # ours: let the scopes take it
            raw = _Raised(exc)
    if timeout and limit.cancel_called and not attempt.scope.cancel_called:
        return _TIMED_OUT
    if attempt.scope.cancel_called:
        return _STOPPED
    if anyio.current_time() > deadline:
        # it blocked the loop past the deadline (no await to cancel): late is late, as for
        # a plain def that overran
        return _TIMED_OUT
    return raw


async def _call_sync(
    attempt: Attempt,
    fn: Callable[..., Any],
    context: Any,
    kwargs: dict[str, Any],
    timeout: float | None,
) -> _Returned | _Raised | str:
    """Run ``fn`` in a dedicated thread; on timeout or cancel, interrupt it and move on."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future[None] = loop.create_future()
    box: list[_Returned | _Raised] = []
    ctx = contextvars.copy_context()  # the task's bound log fields

    def on_thread_end() -> None:
        attempt._in_thread = False
        if not finished.done():  # (cancelled when the wait for it was)
            finished.set_result(None)
        attempt.code_done.set()

    def main() -> bool:
        """The attempt's code; True if nothing was injected into the thread (reusable)."""
        armed = False
        try:
            try:
                with attempt._guard:
                    # The thread starts after the loop moved on: a cancel or timeout that came
                    # first found nothing to interrupt, so the code must not run at all.
                    if attempt.cancel_event.is_set():
                        raise AttemptCancelled
                    attempt._thread_ident = threading.get_ident()
                box.append(_Returned(ctx.run(fn, context, **kwargs)))
            except BaseException as exc:  # operator code may raise anything
                box.append(_Raised(exc))
            finally:
                with attempt._guard:
                    armed, attempt._thread_ident = attempt._thread_ident is not None, None
        except BaseException as exc:  # a signal injected just as the method returned
            if not box:
                box.append(_Raised(exc))
            return False
        return armed  # disarmed by interrupt(): its exception may still be pending

    def done() -> None:
        try:
            loop.call_soon_threadsafe(on_thread_end)
        except RuntimeError:  # the loop is closed: the worker has exited
            pass

    def not_started(exc: BaseException) -> None:
        box.append(_Raised(exc))
        done()

    attempt._in_thread = True
    thread_name = f"deferrun-task-{attempt.claimed.id}"
    try:
        attempt.threads.start(main, done, thread_name, not_started)
    except BaseException:
        attempt._in_thread = False
        raise
    try:
        if not timeout:
            await finished
            return box[0]
        with anyio.move_on_after(timeout):
            await finished
            return box[0]
    except BaseException:  # stopped from outside (cancel, lost, shutdown)
        attempt.cancel_event.set()
        attempt.interrupt(AttemptCancelled)
        raise
    attempt.cancel_event.set()
    attempt.interrupt(AttemptTimedOut)
    log.warning(
        "execution_timeout passed: its thread was interrupted and ends at its next Python "
        "instruction; the task fails once that code has stopped",
        thread=thread_name,
    )
    return _TIMED_OUT


def _classify(raw: _Returned | _Raised | str, method_name: str, timeout: float | None) -> Outcome:
    if raw == _TIMED_OUT:
        return Failed(f"TaskTimeout: execution_timeout of {timeout:g}s exceeded", retry=True)
    if raw == _STOPPED:
        return None
    if isinstance(raw, _Returned):
        return Succeeded(raw.value)
    assert isinstance(raw, _Raised)
    exc = raw.exc
    if isinstance(exc, TaskDeferred | TaskReschedule | SkipTask):
        return exc
    if isinstance(exc, FailTask):
        return Failed(format_error(exc), retry=False)
    if isinstance(exc, TriggerFailed | TaskTimeout) and method_name.startswith("__"):
        return Failed(f"{type(exc).__name__}: {exc}", retry=True)
    if isinstance(exc, PROCESS_EXITS):
        return Failed(
            f"operator code raised {type(exc).__name__}, which would stop the worker; only "
            f"this task fails. Raise an Exception (or FailTask) instead:\n{format_error(exc)}",
            retry=True,
        )
    return Failed(format_error(exc), retry=True)
