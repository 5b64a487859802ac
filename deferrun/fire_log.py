"""The triggerer's "trigger fired" lines, cheap enough for 10,000 fires in one loop step.

A full structlog line costs ~50 us; in a burst every fire's line delays every later fire in
the same step. So each fire's line goes straight into its task's stored log
(``tasklogs.record``, the line ``deferrun logs ID`` shows), and stderr gets one "triggers
fired" line with a count per loop step. With debug logging on, every fire is logged in full
as before (time triggers at debug level, as 100,000 of them may fire in a burst).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import structlog

from deferrun import tasklogs

log = structlog.get_logger("deferrun.triggerer")


class FireLog:
    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.debug = False  # set by start(): a lazy logger binds on every attribute access
        self._count = self._timers = 0  # fires of this loop step, not yet counted

    def start(self) -> None:
        self.debug = log.is_enabled_for(logging.DEBUG)

    def fired(self, trigger_id: int, task_id: str | None, timer: bool) -> None:
        if self.debug:
            self.metrics.trigger_events.inc()
            (log.debug if timer else log.info)(
                "trigger fired", trigger_id=trigger_id, task_id=task_id
            )
            return
        if not timer:
            tasklogs.record("trigger fired", "info", trigger_id=trigger_id, task_id=task_id)
        if not self._count:
            asyncio.get_running_loop().call_soon(self._summary)
        self._count += 1
        self._timers += timer

    def _summary(self) -> None:
        count, timers = self._count, self._timers
        self._count = self._timers = 0
        self.metrics.trigger_events.inc(count)
        if count > timers:
            log.info("triggers fired", count=count - timers)
