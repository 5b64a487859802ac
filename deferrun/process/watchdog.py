"""Detects code that blocks the event loop, and names the asyncio task that did it.

A ticker on the loop records when it last ran. When it runs late past the threshold, the
watchdog names a culprit only if one step of one task really blocked that long:

- a trigger's ``run()`` (``trigger_run.run_until_event``) and coroutines driven through
  :func:`timed_steps` (shared polls) time each of their own steps exactly, and report a
  step over the threshold;
- for other tasks (``task:<id>`` in a worker) a daemon thread samples the current task while
  the loop is silent, and blames it only if every sample saw that same task.

A trigger's other code (its ``cleanup()``, ``on_task_cancelled()``, a background task its
``run()`` started) runs in tasks :mod:`deferrun.process.containment` knows; the sampler
blames one of them when it saw that task without a break for the threshold.

When the whole process is stopped (SIGSTOP, a VM pause, swap) the sampler thread stops too and
wakes up far later than it asked without the process having used the CPU: a lag or a step that
overlaps such a gap is logged once as a pause, blamed on nobody and not counted as blocked.

Otherwise the loop was merely busy with many short steps (a burst of 20,000 wake-ups): that
is logged as "loop lagging under load" with counts, and nobody is blamed. There is one
watchdog per event loop, shared by the worker and triggerer of a standalone process.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Generator
from typing import Any, TypeVar

import anyio
import structlog

from deferrun.process import containment

log = structlog.get_logger("deferrun.watchdog")

#: steps named one by one when several blocked the loop in one stall; the rest are counted
NAMED_PER_STALL = 10

Describer = Callable[[str], dict[str, Any] | None]
T = TypeVar("T")

_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatchdog] = (
    weakref.WeakKeyDictionary()
)


class LoopWatchdog:
    def __init__(self, threshold: float = 0.2) -> None:
        self.threshold = threshold
        self.interval = min(0.05, threshold / 4)
        self.describers: list[Describer] = []
        self.metrics: Any = None  # deferrun.process.metrics.Metrics, when the process exports them
        self.blocked_total = 0
        self.recent_lags: deque[float] = deque(maxlen=200)
        self.running = False
        self._last_tick = time.monotonic()
        self._culprit: tuple[str, dict[str, Any]] | None = None
        self._consistent = True  # every sample of this silence saw the culprit's task
        self._samples = 0
        self._tasks_seen: set[str] = set()
        self._long_steps: list[tuple[float, str, dict[str, Any]]] = []
        self._streak: tuple[str, float, float] = ("", 0.0, 0.0)  # task seen since, until
        self._best_streak: tuple[float, str, dict[str, Any]] | None = None
        self._woke = time.monotonic()  # the sampler's last wake-up, and the CPU time then
        self._woke_cpu = time.process_time()
        self._pauses: deque[tuple[float, float]] = deque(maxlen=16)
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_current_loop(cls, threshold: float = 0.2) -> LoopWatchdog:
        loop = asyncio.get_running_loop()
        existing = _BY_LOOP.get(loop)
        if existing is None:
            existing = _BY_LOOP[loop] = cls(threshold)
        return existing

    @staticmethod
    def of_running_loop() -> LoopWatchdog | None:
        """The watchdog of the running loop, if one was started (None: nothing to time)."""
        return _BY_LOOP.get(asyncio.get_running_loop())

    def _describe(self, name: str) -> dict[str, Any]:
        for describe in self.describers:
            try:
                details = describe(name)
            except Exception:  # describing must never break detection
                details = None
            if details:
                return details
        return {}

    def note_step(self, name: str, seconds: float, details: dict[str, Any]) -> None:
        """One step of task ``name`` ran ``seconds`` without yielding (called on the loop)."""
        self._long_steps.append((seconds, name, details))

    def note_current_step(
        self,
        seconds: float,
        describe: Describer | None,
        fallback: dict[str, Any] | None = None,
    ) -> None:
        """The current task's step ran ``seconds``: named by ``describe`` (an error of its own
        goes into the report), else by ``fallback``."""
        task = asyncio.current_task()
        name = task.get_name() if task is not None else "?"
        details: dict[str, Any] | None = None
        if describe is not None:
            try:
                details = describe(name)
            except Exception as exc:
                details = {"describe_error": repr(exc)}
        self.note_step(name, seconds, details or fallback or {})

    def _describe_task(self, task: asyncio.Task[Any] | None) -> tuple[str, dict[str, Any]]:
        """The task's name and who it belongs to; a trigger's code says what of it ran."""
        name = task.get_name() if task is not None else "<between tasks>"
        code = containment.code_of(task)
        if code is None:
            return name, self._describe(name)
        role = name.split(":")[2] if name.startswith(f"trigger:{code.trigger_id}:") else ""
        ran = _RAN.get(role, "a background task its run() started")
        return name, {
            "trigger_id": code.trigger_id,
            "task_id": code.task_id,
            "trigger": code.classpath,
            "ran": ran,
            "asyncio_task": name,
        }

    def _woke_up(self) -> None:
        """Note the sampler's wake-up; one far later than asked, while the process used
        little CPU, means the process was stopped or starved."""
        now, cpu = time.monotonic(), time.process_time()
        late = now - self._woke - self.interval
        if late > self.threshold and cpu - self._woke_cpu < late / 2:
            self._pauses.append((self._woke, now))
        self._woke, self._woke_cpu = now, cpu

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._woke_up()
            now = time.monotonic()
            silent = now - self._last_tick
            if silent <= self.threshold / 2 or not self._loop:
                continue
            try:
                task = asyncio.current_task(self._loop)
            except RuntimeError:
                task = None
            name = task.get_name() if task is not None else "<between tasks>"
            self._samples += 1
            if len(self._tasks_seen) < 1000:
                self._tasks_seen.add(name)
            if self._culprit is None:
                self._culprit = self._describe_task(task)
            elif self._culprit[0] != name:
                self._consistent = False
            # the longest run of samples that saw one task of a trigger's code, other than the
            # run() steps (timed exactly): it did not yield all that time
            seen, since, _ = self._streak
            if seen != name:
                since = now
            self._streak = (name, since, now)
            if now - since >= self.threshold / 2 and task is not None:
                best = self._best_streak
                if best is None or best[1] != name or now - since > best[0]:
                    details = self._describe_task(task)[1]
                    if details.get("ran"):
                        self._best_streak = (now - since, name, details)

    def _pause_in(self, start: float, end: float, consume: bool = True) -> float:
        """Seconds the process was paused between ``start`` and ``end`` (each pause once,
        unless ``consume`` is false)."""
        if self.running and time.monotonic() - self._woke > self.interval + self.threshold:
            # the sampler has not run since: let it wake up and say whether it was stopped
            for _ in range(20):
                time.sleep(0.002)
                if time.monotonic() - self._woke <= self.interval + self.threshold:
                    break
        paused = 0.0
        for pause in list(self._pauses):
            if pause[1] > start and pause[0] < end:
                paused += pause[1] - pause[0]
                if consume:
                    self._pauses.remove(pause)
        return paused

    def paused_during(self, start: float, end: float) -> bool:
        """Whether the process was stopped between ``start`` and ``end`` (monotonic): a slow
        call that overlaps a pause says nothing about the code that ran."""
        return self._pause_in(start, end, consume=False) > 0

    async def run(self) -> None:
        """Run the ticker; a second caller on the same loop returns at once."""
        if self.running:
            return
        self.running = True
        self._loop = asyncio.get_running_loop()
        self._stop.clear()
        thread = threading.Thread(target=self._sample, name="deferrun-loop-watchdog", daemon=True)
        thread.start()
        try:
            while True:
                before, cpu_before = time.monotonic(), time.process_time()
                self._last_tick = before
                await anyio.sleep(self.interval)
                woke = time.monotonic()
                lag = max(woke - before - self.interval, 0.0)
                cpu_used = time.process_time() - cpu_before
                self.recent_lags.append(lag)
                if self.metrics is not None:
                    self.metrics.loop_lag.observe(lag)
                culprit, self._culprit = self._culprit, None
                consistent, self._consistent = self._consistent, True
                samples, self._samples = self._samples, 0
                seen, self._tasks_seen = self._tasks_seen, set()
                long_steps, self._long_steps = self._long_steps, []
                streak, self._best_streak = self._best_streak, None
                self._streak = ("", 0.0, 0.0)
                paused = self._pause_in(before, time.monotonic()) if lag > self.threshold else 0
                # after a SIGCONT the loop may run before the sampler notes the pause: a
                # sampler that has not woken in the latter half of the silence was stopped too
                sampler_silent = self._woke < woke - lag / 2
                if (
                    not paused
                    and lag > self.threshold
                    and (not samples or sampler_silent)  # nor did the sampler thread
                    and not long_steps
                    and cpu_used < lag / 2  # and nothing computed: the process was stopped
                ):
                    paused = lag
                if paused:
                    log.warning(
                        f"process was paused or starved for {paused:.2f}s (SIGSTOP, VM pause, "
                        "swap); not blamed on a trigger",
                        paused_seconds=round(paused, 3),
                        lag_seconds=round(lag, 3),
                    )
                elif lag > self.threshold:
                    self.blocked_total += 1
                    if self.metrics is not None:
                        self.metrics.loop_blocked.inc()
                    if long_steps:  # each step that blocked is named and counted
                        worst = sorted(long_steps, key=lambda s: s[0], reverse=True)
                        for step in worst[:NAMED_PER_STALL]:
                            self._report_step(lag, step)
                        if len(worst) > NAMED_PER_STALL:
                            log.warning(
                                "more steps blocked the event loop in the same stall",
                                steps=len(worst) - NAMED_PER_STALL,
                                lag_seconds=round(lag, 3),
                            )
                        self.blocked_total += len(worst) - 1
                        if self.metrics is not None:
                            self.metrics.loop_blocked.inc(len(worst) - 1)
                    elif streak is not None:
                        seconds = min(lag, streak[0] + self.threshold / 2)
                        self._report(seconds, (streak[1], streak[2]))
                    elif (
                        culprit and consistent and samples >= 2 and not culprit[1].get("trigger_id")
                    ):
                        self._report(lag, culprit)
                    else:
                        log.warning(
                            f"event loop lagging under load: {lag:.2f}s late, no single step "
                            "blocked it (many short steps ran)",
                            lag_seconds=round(lag, 3),
                            samples=samples,
                            tasks_seen=len(seen),
                            ready_callbacks=len(getattr(self._loop, "_ready", ())),
                        )
        finally:
            self._stop.set()
            self.running = False

    def _report_step(self, lag: float, step: tuple[float, str, dict[str, Any]]) -> None:
        seconds, name, details = step
        if details.get("trigger_id") is not None:
            log.warning(
                f"trigger {details['trigger_id']} ({details.get('trigger')}) blocked the event "
                f"loop for {seconds:.2f}s in one step"
                + (f" of {details['ran']}" if details.get("ran") else "")
                + "; every other trigger waited. Use await, "
                "or anyio.to_thread.run_sync for blocking calls",
                blocked_seconds=round(seconds, 3),
                lag_seconds=round(lag, 3),
                **details,
            )
        else:
            self._report(seconds, (name, details))

    def _report(self, seconds: float, culprit: tuple[str, dict[str, Any]] | None) -> None:
        name, details = culprit or (None, {})
        if details.get("trigger_id") is not None:
            # code outside run()'s own steps is timed by sampling: "about", and where it ran
            where = f"about {seconds:.2f}s in {details['ran']}" if details.get("ran") else ""
            log.warning(
                f"trigger {details['trigger_id']} ({details.get('trigger')}) blocked the event "
                f"loop for {where or f'{seconds:.2f}s'}; every other trigger waited. Use "
                "await, or anyio.to_thread.run_sync for blocking calls",
                blocked_seconds=round(seconds, 3),
                **details,
            )
        elif details.get("task_id") is not None:
            log.warning(
                f"task {details['task_id']} ({details.get('operator')}) blocked the worker's "
                f"event loop for {seconds:.2f}s in async code; use await, or a plain def "
                "method (those run in threads)",
                blocked_seconds=round(seconds, 3),
                **details,
            )
        else:
            log.warning(
                f"event loop blocked for {seconds:.2f}s",
                blocked_by=name,
                blocked_seconds=round(seconds, 3),
            )


_RAN = {
    "cleanup": "cleanup()",
    "on_task_cancelled": "on_task_cancelled()",
    "closing": "the finally of its run()",
}


def timed_steps(
    coro: Coroutine[Any, Any, T], watchdog: LoopWatchdog | None, describe: Describer
) -> Awaitable[T]:
    """Await ``coro``, timing each of its steps; a step over the threshold is reported."""
    return coro if watchdog is None else _TimedSteps(coro, watchdog, describe)


class _TimedSteps:
    """Drives a coroutine step by step (as ``await`` would) and measures each step."""

    __slots__ = ("_coro", "_describe", "_watchdog")

    def __init__(self, coro: Coroutine[Any, Any, Any], watchdog: LoopWatchdog, d: Describer):
        self._coro = coro
        self._watchdog = watchdog
        self._describe = d

    def __await__(self) -> Generator[Any, Any, Any]:
        coro, watchdog = self._coro, self._watchdog
        send, throw, clock = coro.send, coro.throw, time.monotonic
        value: Any = None
        error: BaseException | None = None
        while True:
            start = clock()
            try:
                future = send(value) if error is None else throw(error)
            except StopIteration as stop:
                return stop.value
            finally:
                seconds = clock() - start
                if seconds > watchdog.threshold:
                    watchdog.note_current_step(seconds, self._describe)
            error = None
            try:
                value = yield future
            except BaseException as exc:  # delivered into the coroutine on the next step
                value, error = None, exc


def worst_recent_lag() -> float | None:
    """The worst of this loop's recent lags (seconds), or None when no watchdog runs here."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return None
    dog = _BY_LOOP.get(loop)
    if dog is None or not dog.recent_lags:
        return None
    return max(list(dog.recent_lags)[-100:])
