"""How the triggerer counts and logs each outcome before the event writer stores it.

"Trigger fired" lines must be cheap enough for 10,000 fires in one loop step.

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

from deferrun.process import tasklogs
from deferrun.triggerer.trigger_run import ENDED, TIMED_OUT, Outcome

log = structlog.get_logger("deferrun.triggerer")


class OutcomeLog:
    def __init__(self, metrics: Any) -> None:
        self.metrics = metrics
        self.debug = False  # set by start(): a lazy logger binds on every attribute access
        self._count = self._timers = 0  # fires of this loop step, not yet counted
        self.events_total = self.failures_total = self.timeouts_total = 0

    def start(self) -> None:
        self.debug = log.is_enabled_for(logging.DEBUG)

    def record(self, outcome: Outcome, task_id: str | None, timer: bool = False) -> None:
        """Count and log ``outcome`` (in the trigger's own step, before it is queued)."""
        if outcome.fired:
            self.events_total += 1
            self.fired(outcome.trigger_id, task_id, timer)
            return
        ids = {"trigger_id": outcome.trigger_id, "task_id": task_id}
        if outcome.method == ENDED:
            self.events_total += 1
            self.metrics.trigger_events.inc()
            log.info("trigger ended its task", state=outcome.end_state, **ids)
        elif outcome.method == TIMED_OUT:
            self.timeouts_total += 1
            self.metrics.trigger_timeouts.inc()
            log.info("trigger timed out", **ids)
        else:
            self.failures_total += 1
            self.metrics.trigger_failures.inc()
            first_line = (outcome.error or "").splitlines()[0] if outcome.error else ""
            log.warning("trigger failed", error=first_line, **ids)

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
