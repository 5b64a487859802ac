"""Operators and triggers for the pipeline tests (importable by path, as user code is)."""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from deferrun import (
    BaseOperator,
    BaseTrigger,
    Context,
    FailTask,
    SkipTask,
    TaskFailedEvent,
    TaskSkippedEvent,
    TaskSuccessEvent,
    TriggerEvent,
)


class Step(BaseOperator):
    """Ends as told (``success`` returns ``value``); returns what it saw upstream.

    ``marker``: a file each run appends "task_id try pid" to; ``sleep_first``: seconds the
    first try sleeps in its slot after that (long enough to be killed mid-run).
    """

    def __init__(
        self,
        *,
        outcome: str = "success",
        value: Any = None,
        marker: str | None = None,
        sleep_first: float = 0.0,
        **kw: Any,
    ) -> None:
        super().__init__(**kw)
        self.outcome = outcome
        self.value = value
        self.marker = marker
        self.sleep_first = sleep_first

    def execute(self, context: Context) -> Any:
        if self.marker:
            with open(self.marker, "a") as f:
                f.write(f"{context['task_id']} {context['try_number']} {os.getpid()}\n")
        if self.sleep_first and context["try_number"] == 1:
            time.sleep(self.sleep_first)
        if self.outcome == "failed":
            raise FailTask("told to fail")
        if self.outcome == "skipped":
            raise SkipTask("told to skip")
        upstream = {k: v["result"] for k, v in context["upstream"].items() if k == v["task_id"]}
        return {
            "value": self.value,
            "upstream": upstream,
            "trigger_event": context.get("trigger_event"),
        }


class Ends(BaseTrigger):
    """Ends its task itself after ``delay`` seconds, as ``how`` says."""

    def __init__(self, how: str, value: Any = None, delay: float = 0.0) -> None:
        self.how = how
        self.value = value
        self.delay = delay

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await anyio.sleep(self.delay)
        if self.how == "success":
            yield TaskSuccessEvent(self.value)
        elif self.how == "failed":
            yield TaskFailedEvent(f"the job said no: {self.value}")
        elif self.how == "skipped":
            yield TaskSkippedEvent("nothing to do")
        else:
            yield TriggerEvent(self.value)


class WatchSelf(BaseOperator):
    """Defers on a TaskStateTrigger watching its own task (must be refused)."""

    def execute(self, context: Context) -> Any:
        from triggers.task import TaskStateTrigger

        self.defer(trigger=TaskStateTrigger(context["task_id"]))
