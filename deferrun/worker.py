"""The worker: claims queued tasks and runs them in N slots until they end or defer.

Synchronous ``execute`` methods run in threads so the worker's event loop stays free for
heartbeats and claims; ``async def`` methods run on the loop. Whatever the outcome, it is
recorded through one store call, fenced on (task, worker) so a worker that was declared dead
cannot overwrite the task's newer state.
"""

from __future__ import annotations

import contextlib
import ctypes
import inspect
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import anyio
import anyio.to_thread
import structlog

from deferrun import config, serialization
from deferrun.connections import close_shared_clients, redact
from deferrun.exceptions import (
    ClassLoadError,
    FailTask,
    SerializationError,
    SkipTask,
    TaskDeferred,
    TaskReschedule,
    TaskTimeout,
    TriggerFailed,
)
from deferrun.liveness import heartbeat_loop, new_process_id
from deferrun.metrics import Metrics
from deferrun.models import ClaimedTask, Deferral
from deferrun.operator import DEFAULT_QUEUE, BaseOperator, as_seconds
from deferrun.store.base import Store, Wakeup
from deferrun.trigger import BaseTrigger
from deferrun.watchdog import LoopWatchdog

log = structlog.get_logger("deferrun.worker")


def _interrupt_thread(ident: int | None, exc_type: type[BaseException]) -> None:
    """Raise ``exc_type`` inside a thread at its next bytecode (timeouts of sync execute)."""
    if ident is None:
        return
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc_type))


class TaskCancelled(Exception):
    """Injected into a sync task whose run was cancelled (task cancelled, or shutdown)."""


@dataclass
class _Success:
    result: Any


@dataclass
class _Failure:
    error: str
    retry: bool


@dataclass
class _Running:
    claimed: ClaimedTask
    scope: anyio.CancelScope
    cancel_event: threading.Event = field(default_factory=threading.Event)
    thread_ident: int | None = None
    cancel_reason: str | None = None
    recording: bool = False
    started: float = field(default_factory=time.monotonic)


def format_error(exc: BaseException) -> str:
    """The traceback as stored in the task row, with every known secret redacted."""
    return redact("".join(traceback.format_exception(exc)).rstrip())


def prepare_deferral(signal: TaskDeferred) -> Deferral:
    """Serialize a defer signal, refusing triggers the triggerer could not rebuild."""
    trigger = signal.trigger
    if not isinstance(trigger, BaseTrigger):
        raise SerializationError(f"defer() needs a BaseTrigger instance, got {trigger!r}")
    result = trigger.serialize()
    if not (isinstance(result, tuple | list) and len(result) == 2):
        raise SerializationError(
            f"{type(trigger).__qualname__}.serialize() must return (classpath, kwargs), "
            f"got {result!r}"
        )
    classpath, kwargs = result
    if not isinstance(kwargs, dict):
        raise SerializationError(f"{classpath}: serialize() kwargs must be a dict, got {kwargs!r}")
    cls, classpath = serialization.stored_classpath(classpath, trigger, BaseTrigger)
    serialization.check_kwargs_fit(cls, kwargs, "trigger")
    kwargs_json = serialization.dumps(kwargs, f"{cls.__qualname__} kwargs")
    timeout = as_seconds(signal.timeout, "defer timeout")
    return Deferral(
        classpath=classpath,
        kwargs=kwargs_json,
        method_name=signal.method_name,
        method_kwargs=serialization.dumps(signal.kwargs, f"defer(kwargs=...) of {classpath}"),
        timeout=timeout,
    )


class Worker:
    def __init__(
        self,
        store: Store,
        *,
        slots: int = 8,
        queues: Sequence[str] = (DEFAULT_QUEUE,),
        dead_after: float | None = None,
        poll_interval: float = 1.0,
        grace_period: float = 30.0,
        process_id: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        if slots < 1:
            raise ValueError(f"--slots must be at least 1, got {slots}")
        self.store = store
        self.slots = slots
        self.queues = list(queues) or [DEFAULT_QUEUE]
        self.dead_after = config.dead_after() if dead_after is None else dead_after
        self.health: dict[str, float] = {}
        self.record_retry_for = 120.0
        self.claim_debounce = 0.002
        self.poll_interval = poll_interval
        self.grace_period = grace_period
        self.id = process_id or new_process_id("worker")
        self.running: dict[str, _Running] = {}
        self.tasks_done = 0
        self._stopping = anyio.Event()
        self._wakeup: Wakeup | None = None
        self._thread_limiter = anyio.CapacityLimiter(slots * 2)
        self.started = anyio.Event()
        self.metrics = metrics or Metrics()
        self.metrics.slots.set(slots)
        self.metrics.slots_busy.set_function(lambda: len(self.running))

    # -- lifecycle ----------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop claiming; running tasks get ``grace_period`` seconds, then are re-queued."""
        self._stopping.set()
        if self._wakeup:
            self._wakeup.set()

    async def run(self) -> None:
        self._wakeup = await self.store.register_process(self.id, "worker", self.queues, self.slots)
        log.info(
            "worker started",
            worker_id=self.id,
            slots=self.slots,
            queues=self.queues,
            db=config.redact_url(self.store.url),
        )
        self.started.set()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._heartbeat_loop, name="worker-heartbeat")
                watchdog = LoopWatchdog.for_current_loop()
                watchdog.describers.append(self._describe_task)
                watchdog.metrics = watchdog.metrics or self.metrics
                tg.start_soon(watchdog.run, name="loop-watchdog")
                async with anyio.create_task_group() as slots_tg:
                    await self._claim_loop(slots_tg)
                    await self._drain()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                await self.store.deregister_process(self.id)
                await close_shared_clients()
            log.info("worker stopped", worker_id=self.id, tasks_done=self.tasks_done)

    async def _claim_loop(self, slots_tg: anyio.abc.TaskGroup) -> None:
        assert self._wakeup is not None
        while not self._stopping.is_set():
            try:
                free = self.slots - len(self.running)
                if free > 0:
                    for task in await self.store.claim_tasks(self.id, self.queues, free):
                        self._start(slots_tg, task)
                wait = (
                    await self._idle_wait()
                    if self.slots - len(self.running) > 0
                    else self.poll_interval
                )  # slots full: a finishing task wakes us
            except Exception as exc:
                log.error("claiming tasks failed; retrying", error=repr(exc))
                wait = self.poll_interval
            if await self._wakeup.wait(wait):
                await anyio.sleep(self.claim_debounce)  # one claim for a burst of arrivals

    async def _idle_wait(self) -> float:
        due = await self.store.next_due(self.queues)
        wait = self.poll_interval
        if due is not None:
            wait = min(wait, max(0.0, due - time.time()) + 0.005)
        return max(wait, 0.005)

    async def _drain(self) -> None:
        if not self.running:
            return
        log.info(
            "waiting for running tasks to finish",
            count=len(self.running),
            grace_period=self.grace_period,
        )
        with anyio.move_on_after(self.grace_period):
            while self.running:
                await anyio.sleep(0.05)
        for run in list(self.running.values()):
            if not run.recording:
                self._cancel(run, "shutdown")

    def _start(self, tg: anyio.abc.TaskGroup, task: ClaimedTask) -> None:
        run = _Running(claimed=task, scope=anyio.CancelScope())
        self.running[task.id] = run
        tg.start_soon(self._run_task, run, name=f"task:{task.id}")

    def _cancel(self, run: _Running, reason: str) -> None:
        run.cancel_reason = reason
        run.cancel_event.set()
        run.scope.cancel()
        _interrupt_thread(run.thread_ident, TaskCancelled)

    def _describe_task(self, name: str) -> dict[str, Any] | None:
        """Called from the watchdog thread while async task code blocks the loop."""
        run = self.running.get(name.split(":", 1)[1]) if name.startswith("task:") else None
        if run is None:
            return None
        return {"task_id": run.claimed.id, "operator": run.claimed.classpath}

    async def _heartbeat_loop(self) -> None:
        await heartbeat_loop(self.store, self.id, self.dead_after, self._check_owned, self.health)

    async def _check_owned(self) -> None:
        """Stop local runs of tasks that are no longer ours (cancelled, or reassigned)."""
        if not self.running:
            return
        # Only runs that began before we asked can be judged: a claim committing while the
        # query is in flight is ours but absent from its answer.
        asked = time.monotonic()
        owned = await self.store.owned_claims(self.id)
        for task_id, run in list(self.running.items()):
            if (
                (task_id, run.claimed.claim_token) not in owned
                and not run.recording
                and run.started < asked
            ):
                log.warning(
                    "task is no longer ours (cancelled, or reassigned after a missed "
                    "heartbeat); stopping it",
                    task_id=task_id,
                )
                self._cancel(run, "lost")

    # -- running one task ---------------------------------------------------------------------

    async def _run_task(self, run: _Running) -> None:
        task = run.claimed
        structlog.contextvars.bind_contextvars(
            task_id=task.id, task_name=task.name, try_number=task.try_number, worker_id=self.id
        )
        outcome: Any = None
        try:
            with run.scope:
                outcome = await self._execute(run)
            if run.scope.cancelled_caught or run.cancel_reason:
                outcome = None
            run.recording = True
            with anyio.CancelScope(shield=True):
                await self._record_with_retry(run, outcome)
        finally:
            self.running.pop(task.id, None)
            self.tasks_done += 1
            if self._wakeup:
                self._wakeup.set()

    async def _record_with_retry(self, run: _Running, outcome: Any) -> None:
        """Record the outcome, retrying through a database outage.

        Safe to repeat: every transition is fenced on (task, worker), so a write that did
        commit before the connection dropped just makes the retry a no-op.
        """
        delay = 0.2
        deadline = time.monotonic() + self.record_retry_for
        while True:
            try:
                await self._record(run, outcome)
                return
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    log.error(
                        "could not record the task's outcome; it will be retried once "
                        "this worker counts as dead",
                        error=format_error(exc),
                    )
                    return
                log.warning("recording the outcome failed; retrying", error=repr(exc))
                await anyio.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _context(self, run: _Running, op: BaseOperator) -> dict[str, Any]:
        task = run.claimed
        return {
            "task_id": task.id,
            "task_name": task.name,
            "try_number": task.try_number,
            "max_tries": task.max_tries,
            "queue": task.queue,
            "try_started_at": datetime.fromtimestamp(task.try_started_at, UTC),
            "created_at": datetime.fromtimestamp(task.created_at, UTC),
            "resumed": task.next_method is not None,
            "cancel_event": run.cancel_event,
            "operator": op,
            "log": op.log,
        }

    async def _execute(self, run: _Running) -> Any:
        task = run.claimed
        try:
            op = serialization.instantiate(
                task.classpath, serialization.loads(task.kwargs), BaseOperator, "operator"
            )
        except (ClassLoadError, SerializationError) as exc:
            return _Failure(f"cannot load operator {task.classpath}: {exc}", retry=False)
        except Exception as exc:
            return _Failure(
                f"constructing operator {task.classpath} raised:\n{format_error(exc)}", retry=True
            )

        method_name = task.next_method or "execute"
        kwargs: dict[str, Any] = {}
        if task.next_method is not None:
            try:
                kwargs = serialization.loads(task.next_kwargs) or {}
                kwargs["event"] = serialization.loads(task.event)
            except SerializationError as exc:
                return _Failure(
                    f"cannot load the stored event of task {task.id}: {exc}", retry=False
                )
        if method_name == BaseOperator.DEFERRAL_TIMEOUT_METHOD:
            fn = op.on_deferral_timeout
        elif method_name == BaseOperator.TRIGGER_FAILED_METHOD:
            fn = op.on_trigger_failed
        else:
            fn = getattr(op, method_name, None)
            if fn is None or not callable(fn) or method_name.startswith("_"):
                return _Failure(
                    f"operator {task.classpath} has no method {method_name!r} to "
                    "resume with; check defer(method_name=...)",
                    retry=False,
                )
        context = self._context(run, op)
        timeout = task.execution_timeout
        log.debug("running", method=method_name)
        try:
            if inspect.iscoroutinefunction(fn):
                try:
                    with anyio.fail_after(timeout) if timeout else contextlib.nullcontext():
                        result = await fn(context, **kwargs)
                except TimeoutError:
                    raise TaskTimeout(f"execution_timeout of {timeout:g}s exceeded") from None
            else:
                result = await self._call_sync(run, fn, context, kwargs, timeout)
            if inspect.isawaitable(result):
                result = await result
            return _Success(result)
        except TaskDeferred as signal:
            return signal
        except TaskReschedule as signal:
            return signal
        except SkipTask as exc:
            return exc
        except FailTask as exc:
            return _Failure(format_error(exc), retry=False)
        except (TriggerFailed, TaskTimeout) as exc:
            if method_name.startswith("__"):
                return _Failure(f"{type(exc).__name__}: {exc}", retry=True)
            return _Failure(format_error(exc), retry=True)
        except TaskCancelled:
            return None
        except Exception as exc:
            return _Failure(format_error(exc), retry=True)

    async def _call_sync(
        self,
        run: _Running,
        fn: Any,
        context: dict[str, Any],
        kwargs: dict[str, Any],
        timeout: float | None,
    ) -> Any:
        ctx_vars = structlog.contextvars.get_contextvars()

        def target() -> Any:
            run.thread_ident = threading.get_ident()
            structlog.contextvars.bind_contextvars(**ctx_vars)
            try:
                return fn(context, **kwargs)
            finally:
                run.thread_ident = None

        if timeout is None:
            return await anyio.to_thread.run_sync(
                target, abandon_on_cancel=True, limiter=self._thread_limiter
            )
        with anyio.move_on_after(timeout):
            return await anyio.to_thread.run_sync(
                target, abandon_on_cancel=True, limiter=self._thread_limiter
            )
        run.cancel_event.set()
        _interrupt_thread(run.thread_ident, TaskTimeout)
        raise TaskTimeout(f"execution_timeout of {timeout:g}s exceeded")

    async def _record(self, run: _Running, outcome: Any) -> None:
        task = run.claimed
        if outcome is None:  # stopped before it finished (shutdown, cancelled, taken away)
            # Fenced on (task, worker, running): a no-op when the task really was cancelled or
            # taken over, and a safety net when it is still ours, so it is never orphaned.
            if await self.store.requeue_task(task.id, task.claim_token):
                log.info("task re-queued", reason=run.cancel_reason)
            return
        state = await self._store_outcome(task, outcome)
        if state is None:
            log.warning("outcome discarded: the task was cancelled or taken over meanwhile")
        else:
            self.metrics.tasks.labels(state=state).inc()

    async def _store_outcome(self, task: ClaimedTask, outcome: Any) -> str | None:
        """Persist one outcome; returns the task's new state, or None if fenced off."""
        store = self.store
        if isinstance(outcome, _Success):
            try:
                result = serialization.dumps(outcome.result, "return value")
            except SerializationError as exc:
                outcome = _Failure(f"task result cannot be stored: {exc}", retry=False)
            else:
                if not await store.complete_task(task.id, task.claim_token, result):
                    return None
                log.info("task succeeded")
                return "success"
        if isinstance(outcome, TaskDeferred):
            try:
                deferral = prepare_deferral(outcome)
            except (SerializationError, ValueError, TypeError) as exc:
                log.error("cannot defer", error=str(exc))
                outcome = _Failure(f"cannot defer: {exc}", retry=False)
            else:
                trigger_id = await store.defer_task(task.id, task.claim_token, deferral)
                if trigger_id is None:
                    return None
                log.info(
                    "task deferred",
                    trigger_id=trigger_id,
                    trigger=deferral.classpath,
                    method=deferral.method_name,
                )
                return "deferred"
        if isinstance(outcome, TaskReschedule):
            if not await store.reschedule_task(task.id, task.claim_token, outcome.delay):
                return None
            log.debug("task rescheduled", delay=outcome.delay)
            return "up_for_reschedule"
        if isinstance(outcome, SkipTask):
            if not await store.skip_task(task.id, task.claim_token, str(outcome) or None):
                return None
            log.info("task skipped", reason=str(outcome))
            return "skipped"
        assert isinstance(outcome, _Failure)
        new_state = await store.fail_task(
            task.id, task.claim_token, outcome.error, retry=outcome.retry
        )
        if new_state is not None:
            log.warning("task failed", state=str(new_state), error=outcome.error.splitlines()[-1])
        return None if new_state is None else str(new_state)
