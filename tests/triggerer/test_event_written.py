"""``BaseTrigger.on_event_written(stored)``: the event writer tells a trigger once its outcome
is in the database, whatever the hook does (the SQS trigger deletes its message there)."""

from __future__ import annotations

from typing import Any, ClassVar

import pytest

from deferrun import BaseOperator, BaseTrigger, TaskState, TriggerEvent
from deferrun.store import Store
from tests.support.runtime import runtime_for

pytestmark = pytest.mark.anyio


class Told(BaseTrigger):
    """Fires at once; records what on_event_written() heard, then misbehaves as asked."""

    heard: ClassVar[list[tuple[str, bool]]] = []

    def __init__(self, name: str, payload: Any = None, hook: str = "ok") -> None:
        self.name = name
        self.payload = payload
        self.hook = hook

    async def run(self) -> Any:
        yield TriggerEvent(self.payload if self.payload is not None else self.name)

    def on_event_written(self, stored: bool) -> None:
        Told.heard.append((self.name, stored))
        if self.hook == "raise":
            raise ValueError("a hook that fails")
        if self.hook == "exit":
            raise SystemExit(3)


class WaitsOn(BaseOperator):
    def __init__(self, name: str, payload: Any = None, hook: str = "ok", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.name, self.payload, self.hook = name, payload, hook

    def execute(self, context: Any) -> Any:
        self.defer(trigger=Told(self.name, self.payload, self.hook), method_name="done")

    def done(self, context: Any, event: Any = None) -> Any:
        return event


async def test_the_hook_hears_each_stored_event_once_even_when_it_raises(store: Store) -> None:
    Told.heard.clear()
    async with runtime_for(store) as rt:
        ids = {
            name: await rt.client.submit(WaitsOn(name, hook=hook))
            for name, hook in [("plain", "ok"), ("raises", "raise"), ("exits", "exit")]
        }
        ids["later"] = await rt.client.submit(WaitsOn("later"))  # the triggerer still runs
        for name, task_id in ids.items():
            info = await rt.client.wait(task_id, timeout=20)
            assert info.state is TaskState.SUCCESS, (name, info.error)
            assert info.result == name
    assert sorted(Told.heard) == sorted((name, True) for name in ids)


async def test_the_hook_hears_not_stored_when_a_failure_is_stored_instead(store: Store) -> None:
    Told.heard.clear()
    async with runtime_for(store, max_event_bytes=1024) as rt:
        task_id = await rt.client.submit(WaitsOn("too big", payload="x" * 4096))
        info = await rt.client.wait(task_id, timeout=20)
    assert info.state is TaskState.FAILED
    assert Told.heard == [("too big", False)]
