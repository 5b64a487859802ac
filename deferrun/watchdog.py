"""Detects code that blocks the event loop, and names the asyncio task that did it.

A ticker on the loop records when it last ran; a daemon thread samples it. When the loop has
been silent past half the threshold, the thread asks the registered describers who the
current asyncio task is (tasks are named ``trigger:<id>`` / ``task:<id>``) while the culprit
is still running. When the loop comes back, the ticker logs how long it was blocked and by
whom. There is one watchdog per event loop, shared by the worker and triggerer of a
standalone process.
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any

import anyio
import structlog

log = structlog.get_logger("deferrun.watchdog")

Describer = Callable[[str], dict[str, Any] | None]

_BY_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopWatchdog] = (
    weakref.WeakKeyDictionary()
)


class LoopWatchdog:
    def __init__(self, threshold: float = 0.2) -> None:
        self.threshold = threshold
        self.interval = min(0.05, threshold / 4)
        self.describers: list[Describer] = []
        self.metrics: Any = None  # deferrun.metrics.Metrics, when the process exports them
        self.blocked_total = 0
        self.recent_lags: deque[float] = deque(maxlen=200)
        self.running = False
        self._last_tick = time.monotonic()
        self._culprit: tuple[str, dict[str, Any]] | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def for_current_loop(cls, threshold: float = 0.2) -> LoopWatchdog:
        loop = asyncio.get_running_loop()
        existing = _BY_LOOP.get(loop)
        if existing is None:
            existing = _BY_LOOP[loop] = cls(threshold)
        return existing

    def _describe(self, name: str) -> dict[str, Any]:
        for describe in self.describers:
            try:
                details = describe(name)
            except Exception:  # describing must never break detection
                details = None
            if details:
                return details
        return {}

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            silent = time.monotonic() - self._last_tick
            if silent > self.threshold / 2 and self._culprit is None and self._loop:
                try:
                    task = asyncio.current_task(self._loop)
                except RuntimeError:
                    task = None
                if task is not None:
                    name = task.get_name()
                    self._culprit = (name, self._describe(name))

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
                before = time.monotonic()
                self._last_tick = before
                await anyio.sleep(self.interval)
                lag = max(time.monotonic() - before - self.interval, 0.0)
                self.recent_lags.append(lag)
                if self.metrics is not None:
                    self.metrics.loop_lag.observe(lag)
                culprit, self._culprit = self._culprit, None
                if lag > self.threshold:
                    self.blocked_total += 1
                    if self.metrics is not None:
                        self.metrics.loop_blocked.inc()
                    self._report(lag, culprit)
        finally:
            self._stop.set()
            self.running = False

    def _report(self, seconds: float, culprit: tuple[str, dict[str, Any]] | None) -> None:
        name, details = culprit or (None, {})
        if details.get("trigger_id") is not None:
            log.warning(
                f"trigger {details['trigger_id']} ({details.get('trigger')}) blocked the event "
                f"loop for {seconds:.2f}s; every other trigger waited. Use await, or "
                "anyio.to_thread.run_sync for blocking calls",
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
