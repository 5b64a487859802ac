"""Triggers whose code blocks the loop outside a run() step, and a swarm of tiny sleepers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

from deferrun import BaseOperator, BaseTrigger, Context, TriggerEvent


class BlockingCleanup(BaseTrigger):
    """Fires at once; its cleanup() blocks the loop."""

    shareable = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        yield TriggerEvent("fired")

    async def cleanup(self) -> None:
        time.sleep(self.seconds)


class BlockingFinally(BaseTrigger):
    """Fires at once; the finally of its run() blocks the loop when the generator is closed."""

    shareable = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        try:
            yield TriggerEvent("fired")
        finally:
            time.sleep(self.seconds)


class BlockingBackground(BaseTrigger):
    """Starts a background task that blocks the loop, then fires once it is done."""

    shareable = False

    def __init__(self, seconds: float, name: str | None = None) -> None:
        self.seconds, self.name = seconds, name

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async def block() -> None:
            await asyncio.sleep(0)
            time.sleep(self.seconds)

        background: Any = asyncio.ensure_future(block())
        if self.name is not None:
            background.set_name(self.name)
        await background
        yield TriggerEvent("fired")


class BlockingHook(BaseTrigger):
    """Never fires; its on_task_cancelled() blocks the loop."""

    shareable = False

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await asyncio.sleep(3600)
        yield TriggerEvent("never")

    async def on_task_cancelled(self) -> None:
        time.sleep(self.seconds)


class Ticker(BaseTrigger):
    """Never fires: wakes every ``period`` s and spends ``busy`` s in each step (sleeping, so
    no CPU), so that one of a few dozen is likely mid-step at any moment. Notes its start in
    ``marker``."""

    shareable = False

    def __init__(self, n: int, marker: str, period: float = 0.05, busy: float = 0.002) -> None:
        self.n, self.marker, self.period, self.busy = n, marker, period, busy

    async def run(self) -> AsyncIterator[TriggerEvent]:
        with open(self.marker, "a") as f:
            f.write(f"{self.n}\n")
        while True:
            await asyncio.sleep(self.period)
            time.sleep(self.busy)
        yield TriggerEvent("never")


class DeferToTicker(BaseOperator):
    """Defers on a :class:`Ticker` that never fires."""

    def __init__(self, *, n: int, marker: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.n, self.marker = n, marker

    def execute(self, context: Context) -> Any:
        self.defer(trigger=Ticker(self.n, self.marker), method_name="execute_complete")


class BlocksInRun(BaseTrigger):
    """Blocks the loop in one step of run(), at ``at`` (epoch seconds), then fires."""

    def __init__(self, at: float, seconds: float) -> None:
        self.at = at
        self.seconds = seconds

    async def run(self) -> AsyncIterator[TriggerEvent]:
        await asyncio.sleep(max(self.at - time.time(), 0))
        time.sleep(self.seconds)
        yield TriggerEvent(None)
