"""Operators and triggers the benchmarks submit (importable by the worker and triggerer)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from deferrun import BaseOperator, BaseSensor, BaseTrigger, Context, TriggerEvent


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


class AtMoment(BaseOperator):
    """Defers on a DateTimeTrigger at epoch ``at``; the result says when it resumed."""

    def __init__(self, *, at: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at

    def execute(self, context: Context) -> Any:
        from datetime import UTC, datetime

        from triggers.time import DateTimeTrigger

        self.defer(
            trigger=DateTimeTrigger(moment=datetime.fromtimestamp(self.at, UTC)),
            method_name="resume",
        )

    def resume(self, context: Context, event: Any = None) -> Any:
        return {"at": self.at, "resumed": time.time()}


def _record(path: str, kind: str, start: float) -> None:
    with open(path, "a") as f:  # small O_APPEND writes: whole lines, safe across threads
        f.write(f"{kind} {start:.6f} {time.time():.6f}\n")


class BenchSensor(BaseSensor):
    """True once epoch ``ready_at`` has passed; logs every slot occupancy to ``log``."""

    def __init__(self, *, ready_at: float, log: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ready_at = ready_at
        self.log_path = log

    def poke(self, context: Context) -> Any:
        return time.time() >= self.ready_at

    def trigger(self) -> BaseTrigger:
        from datetime import UTC, datetime

        from triggers.time import DateTimeTrigger

        return DateTimeTrigger(moment=datetime.fromtimestamp(self.ready_at, UTC))

    def execute(self, context: Context) -> Any:
        start = time.time()
        try:
            return super().execute(context)
        finally:  # also when it defers or reschedules: the slot is released then
            _record(self.log_path, "sensor", start)

    def execute_complete(self, context: Context, event: Any = None) -> Any:
        start = time.time()
        try:
            return super().execute_complete(context, event)
        finally:
            _record(self.log_path, "sensor", start)


class Compute(BaseOperator):
    """Holds its slot for ``seconds`` (sleeping: slot-bound, not CPU-bound, on purpose)."""

    def __init__(self, *, seconds: float, log: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seconds = seconds
        self.log_path = log

    def execute(self, context: Context) -> Any:
        start = time.time()
        time.sleep(self.seconds)
        _record(self.log_path, "compute", start)


class Nop(BaseOperator):
    """Does nothing: what is measured is everything around it."""

    def execute(self, context: Context) -> Any:
        return None


class WaitOn(BaseOperator):
    """Defers on ``trigger`` (classpath, kwargs); each resume appends the task id to ``log``."""

    def __init__(self, *, trigger: str, trigger_kwargs: dict[str, Any], log: str, **kw: Any):
        super().__init__(**kw)
        self.trigger = trigger
        self.trigger_kwargs = trigger_kwargs
        self.log_path = log

    def execute(self, context: Context) -> Any:
        from deferrun.core.classpaths import instantiate

        trigger = instantiate(self.trigger, self.trigger_kwargs, BaseTrigger, "trigger")
        self.defer(trigger=trigger, method_name="resume")

    def resume(self, context: Context, event: Any = None) -> Any:
        with open(self.log_path, "a") as f:
            f.write(f"{context['task_id']}\n")
        return None


class SleepUntilTrigger(BaseTrigger):
    """A user-written trigger as users write them: one coroutine that sleeps, then yields.

    No ``timer()``: the triggerer must run it as a coroutine (the burst case).
    """

    def __init__(self, at: float, seq: int | None = None) -> None:
        self.at = at
        self.seq = seq  # set: no two triggers are identical, each gets its own run()

    async def run(self) -> AsyncIterator[TriggerEvent]:
        import asyncio

        # a loop, as a careful user writes it: a loop's timers may wake up early (uvloop's
        # are whole milliseconds), and the moment must not be seen before it comes
        while (left := self.at - time.time()) > 0:
            await asyncio.sleep(left)
        yield TriggerEvent({"at": self.at, "fired": time.time()})


class BurstOp(BaseOperator):
    """Defers on a SleepUntilTrigger at epoch ``at``; the result says when it fired/resumed."""

    def __init__(self, *, at: float, seq: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at
        self.seq = seq

    def execute(self, context: Context) -> Any:
        trigger = SleepUntilTrigger(at=self.at, seq=self.seq)
        self.defer(trigger=trigger, method_name="resume")

    def resume(self, context: Context, event: Any = None) -> Any:
        return {**event, "resumed": time.time()}
