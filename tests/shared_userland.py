"""Operators and a user trigger for the shared-poll and shared-run tests."""

from __future__ import annotations

import time
from typing import Any

from deferrun import BaseOperator, TriggerEvent
from deferrun.basetrigger import PollingTrigger
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
