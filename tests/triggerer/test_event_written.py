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


# -- found by an attack ------------------------------------------------------------------------


class PropertyHook(BaseTrigger):
    """Its hook is a property that raises SystemExit when looked up."""

    def __init__(self, name: str) -> None:
        self.name = name

    async def run(self) -> Any:
        yield TriggerEvent(self.name)

    @property
    def on_event_written(self) -> Any:  # type: ignore[override]
        raise SystemExit(4)


class AsyncHook(Told):
    async def on_event_written(self, stored: bool) -> None:  # type: ignore[override]
        Told.heard.append((self.name, stored))


class TimerHook(Told):
    """Would run in the timer heap, where no trigger object is left to tell."""

    def timer(self) -> Any:
        import time

        return (time.time(), '"timer"')


class Runs(BaseOperator):
    def __init__(self, kind: str, name: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kind, self.name = kind, name

    def execute(self, context: Any) -> Any:
        cls = {"property": PropertyHook, "async": AsyncHook, "timer": TimerHook}[self.kind]
        self.defer(trigger=cls(self.name), method_name="done")

    def done(self, context: Any, event: Any = None) -> Any:
        return event


async def test_a_hook_of_any_shape_stops_neither_its_task_nor_the_triggerer(
    store: Store,
) -> None:
    import structlog

    Told.heard.clear()
    with structlog.testing.capture_logs() as logs:
        async with runtime_for(store) as rt:
            ids = {
                kind: await rt.client.submit(Runs(kind, kind))
                for kind in ("property", "async", "timer")
            }
            ids["later"] = await rt.client.submit(WaitsOn("later"))
            for kind, task_id in ids.items():
                info = await rt.client.wait(task_id, timeout=20)
                assert info.state is TaskState.SUCCESS, (kind, info.error)
    assert ("timer", True) in Told.heard  # a timer() trigger with a hook is told too
    assert ("async", True) not in Told.heard  # an async hook cannot run: it is said, not skipped
    errors = [e for e in logs if e.get("log_level") == "error"]
    assert any("not async" in e["event"] and e["trigger"] == "AsyncHook" for e in errors)
    assert any("raised" in e["event"] and e["trigger"] == "PropertyHook" for e in errors)


class Blocks(Told):
    def on_event_written(self, stored: bool) -> None:
        import time

        time.sleep(0.5)  # blocks the loop on purpose


class BlocksOp(WaitsOn):
    def execute(self, context: Any) -> Any:
        self.defer(trigger=Blocks(self.name), method_name="done")


async def test_a_blocking_hook_is_named_in_the_log(store: Store) -> None:
    import structlog

    with structlog.testing.capture_logs() as logs:
        async with runtime_for(store) as rt:
            info = await rt.client.wait(await rt.client.submit(BlocksOp("slow")), timeout=20)
    assert info.state is TaskState.SUCCESS
    assert any(
        "blocked" in e["event"] and e.get("trigger") == "Blocks" and e["seconds"] >= 0.5
        for e in logs
    )


async def test_a_hook_hears_not_stored_when_its_task_was_resumed_elsewhere(store: Store) -> None:
    """A paused triggerer's late event is dropped by the store: its hook must not hear
    'stored' (the SQS trigger would delete a message no task received)."""
    from deferrun.client import AsyncClient
    from deferrun.triggerer.event_writer import EventWriter
    from deferrun.triggerer.trigger_run import FIRED, Outcome

    Told.heard.clear()
    client = AsyncClient(store=store)
    task_id = await client.submit(Returns(), start_trigger=Told("never"))
    [claimed] = await store.claim_triggers("paused", [], 10)
    assert await store.fire_triggers([(claimed.id, '"first"')]) == 1  # another triggerer won
    writer = EventWriter(store)
    late = Outcome(claimed.id, FIRED, '"late"')
    late.hooked = Told("late")
    writer.put(late)
    writer.close()
    await writer.run()
    assert Told.heard == [("late", False)]
    info = await store.get_task(task_id)
    assert info is not None and info.state is TaskState.QUEUED  # resumed once, by the first


class Returns(BaseOperator):
    def execute(self, context: Any) -> Any:
        return "ran"
