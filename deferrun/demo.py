"""Operators for ``deferrun standalone --demo``: each waits without holding a slot."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from typing import Any

from deferrun.baseoperator import BaseOperator, Context
from triggers.time import TimeDeltaTrigger


class Countdown(BaseOperator):
    """Defers ``rounds`` times for ``seconds`` each, carrying its progress in defer kwargs."""

    def __init__(self, *, rounds: int = 3, seconds: float = 1.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rounds = rounds
        self.seconds = seconds

    def execute(self, context: Context) -> Any:
        self.log.info("countdown starts", rounds=self.rounds)
        self.defer(
            trigger=TimeDeltaTrigger(timedelta(seconds=self.seconds)),
            method_name="tick",
            kwargs={"done": 1},
        )

    def tick(self, context: Context, event: Any = None, done: int = 0) -> Any:
        self.log.info("tick", done=done, moment=str(event))
        if done < self.rounds:
            self.defer(
                trigger=TimeDeltaTrigger(timedelta(seconds=self.seconds)),
                method_name="tick",
                kwargs={"done": done + 1},
            )
        return f"{done} rounds of {self.seconds:g}s, slot-free while waiting"


class WriteFileLater(BaseOperator):
    """Waits ``delay`` seconds deferred, then writes ``path`` (something for a FileSensor)."""

    def __init__(self, *, path: str, delay: float = 2.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.path = path
        self.delay = delay

    def execute(self, context: Context) -> Any:
        self.defer(trigger=TimeDeltaTrigger(self.delay), method_name="write")

    def write(self, context: Context, event: Any = None) -> str:
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        with open(self.path, "w") as f:
            f.write("ready\n")
        return self.path


class AsyncHello(BaseOperator):
    """An ``async def execute`` operator that defers once and then greets."""

    def __init__(self, *, name: str = "world", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name = name

    async def execute(self, context: Context) -> Any:
        await asyncio.sleep(0.1)
        self.defer(trigger=TimeDeltaTrigger(1.5), method_name="greet")

    async def greet(self, context: Context, event: Any = None) -> str:
        return f"hello, {self.name} (resumed after the trigger fired at {event:%H:%M:%S})"
