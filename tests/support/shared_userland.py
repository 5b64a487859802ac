"""Operators and a user trigger for the shared-poll and shared-run tests."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import anyio

from deferrun import BaseOperator, BaseTrigger, TriggerEvent
from deferrun.core.basetrigger import PollingTrigger
from triggers.http import HttpTrigger


class WaitHttp(BaseOperator):
    """Defers on an HttpTrigger; each resume appends the task id to ``log``."""

    def __init__(
        self,
        *,
        endpoint: str,
        log: str,
        poll_interval: float = 0.2,
        check: dict[str, Any] | None = None,
        defer_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.endpoint = endpoint
        self.log_path = log
        self.poll_interval = poll_interval
        self.check = check
        self.defer_timeout = defer_timeout

    def execute(self, context: dict[str, Any]) -> None:
        trigger = HttpTrigger(
            endpoint=self.endpoint, poll_interval=self.poll_interval, response_check=self.check
        )
        self.defer(trigger=trigger, method_name="resume", timeout=self.defer_timeout)

    def resume(self, context: dict[str, Any], event: Any = None) -> Any:
        with open(self.log_path, "a") as f:
            f.write(f"{context['task_id']}\n")
        return event["body"]


#: every batch a FeedTrigger poll answered: (monotonic time, sorted member names)
BATCHES: list[tuple[float, list[str]]] = []
#: names whose feed entry has arrived
ARRIVED: set[str] = set()


class FeedTrigger(PollingTrigger):
    """A user trigger that opts in to shared polls: one read of a feed answers every name."""

    def __init__(self, feed: str, name: str, poll_interval: float = 0.2) -> None:
        self.feed = feed
        self.name = name
        self.poll_interval = poll_interval

    def shared_poll_key(self) -> str:
        return self.feed

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | None]:
        BATCHES.append((time.monotonic(), sorted(t.name for t in triggers)))
        return [TriggerEvent(t.name) if t.name in ARRIVED else None for t in triggers]

    async def poll(self) -> TriggerEvent | None:
        [result] = await type(self).poll_many([self])
        return result


class WaitOn(BaseOperator):
    """Defers on ``tclass(**tkwargs)`` (a class of this module); each resume appends the task
    id to ``log``."""

    def __init__(
        self,
        *,
        tclass: str,
        tkwargs: dict[str, Any],
        log: str,
        defer_timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.tclass = tclass
        self.tkwargs = tkwargs
        self.log_path = log
        self.defer_timeout = defer_timeout

    def execute(self, context: dict[str, Any]) -> None:
        trigger = globals()[self.tclass](**self.tkwargs)
        self.defer(trigger=trigger, method_name="resume", timeout=self.defer_timeout)

    def resume(self, context: dict[str, Any], event: Any = None) -> Any:
        with open(self.log_path, "a") as f:
            f.write(f"{context['task_id']}\n")
        return event


class GateTrigger(BaseTrigger):
    """A plain trigger (no poll key): fires once ``name`` is in ARRIVED."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def run(self) -> AsyncIterator[TriggerEvent]:
        while self.name not in ARRIVED:
            await anyio.sleep(0.05)
        yield TriggerEvent(self.name)


class EqTrigger(GateTrigger):
    """A trigger with ``__eq__`` (as users write for unit tests), hence unhashable."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EqTrigger) and other.name == self.name


class FeedEqTrigger(FeedTrigger):
    """Shared-poll members that compare (and hash) equal by feed alone."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeedTrigger) and other.feed == self.feed

    def __hash__(self) -> int:
        return hash(self.feed)


class BadFeedTrigger(FeedTrigger):
    """A feed whose poll_many misbehaves once an entry arrived: ``mode`` says how."""

    def __init__(self, feed: str, name: str, mode: str, poll_interval: float = 0.2) -> None:
        super().__init__(feed, name, poll_interval)
        self.mode = mode

    def shared_poll_key(self) -> str:
        return f"{self.feed}:{self.mode}"

    @classmethod
    async def poll_many(cls, triggers: list[Any]) -> list[TriggerEvent | None]:
        results = await super().poll_many(triggers)
        if any(results) and triggers[0].mode == "genexit":
            raise GeneratorExit
        if any(results) and triggers[0].mode == "block":
            time.sleep(0.5)  # blocks the event loop, as a sync client would
        return results
