"""Detects code that blocks the event loop, and names the asyncio task that did it.

A ticker on the loop records when it last ran; a daemon thread samples it. When the loop has
been silent past the threshold, the thread looks up the task the loop is stuck in (tasks are
named ``trigger:<id>``); when the loop comes back, the ticker reports how long it was blocked
and by whom.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

import anyio

Culprit = tuple[str, dict[str, Any]]
BlockHandler = Callable[[float, Culprit | None], None]


class LoopWatchdog:
    def __init__(
        self,
        threshold: float = 0.2,
        on_block: BlockHandler | None = None,
        on_lag: Callable[[float], None] | None = None,
        describe: Callable[[str], dict[str, Any]] | None = None,
    ) -> None:
        self.threshold = threshold
        self.interval = min(0.05, threshold / 4)
        self.on_block = on_block
        self.on_lag = on_lag
        self.describe = describe
        self.blocked_total = 0
        self._last_tick = time.monotonic()
        self._culprit: Culprit | None = None
        self._stop = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

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
                    # Described now, while the culprit is still running: by the time the
                    # loop is back it may have finished and be gone.
                    details = self.describe(name) if self.describe else {}
                    self._culprit = (name, details)

    async def run(self) -> None:
        self._loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._sample, name="deferrun-loop-watchdog", daemon=True)
        thread.start()
        try:
            while True:
                before = time.monotonic()
                self._last_tick = before
                await anyio.sleep(self.interval)
                now = time.monotonic()
                lag = now - before - self.interval
                if self.on_lag:
                    self.on_lag(max(lag, 0.0))
                culprit, self._culprit = self._culprit, None
                if lag > self.threshold:
                    self.blocked_total += 1
                    if self.on_block:
                        self.on_block(lag, culprit)
        finally:
            self._stop.set()
