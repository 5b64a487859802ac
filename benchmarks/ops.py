"""Operators and triggers the benchmarks submit (importable by the worker and triggerer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from deferrun import BaseOperator, BaseTrigger, Context, TriggerEvent


class StampTrigger(BaseTrigger):
    """Fires at epoch second ``at``; the event carries when it actually fired."""

    def __init__(self, at: float) -> None:
        self.at = at

    async def run(self) -> AsyncIterator[TriggerEvent]:
        delay = self.at - time.time()
        if delay > 0:
            await anyio.sleep(delay)
        yield TriggerEvent({"at": self.at, "fired": time.time()})


class Roundtrip(BaseOperator):
    """Defers until ``at`` (epoch seconds), then reports when it was resumed."""

    def __init__(self, *, at: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at

    def execute(self, context: Context) -> Any:
        self.defer(trigger=StampTrigger(at=self.at), method_name="resume")

    def resume(self, context: Context, event: Any = None) -> Any:
        return {**event, "resumed": time.time()}
