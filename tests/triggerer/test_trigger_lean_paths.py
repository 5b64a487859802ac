"""The lean per-trigger paths: a shared run alone keeps no members dict until an identical
trigger joins, a member's start time lives only in the deadline heap, and a trigger's own
generator is closed by its wrapper rather than registered with the loop."""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from deferrun import TaskState
from deferrun.core.basetrigger import BaseTrigger, TriggerEvent
from deferrun.process.containment import TriggerCode
from deferrun.store import Store
from deferrun.triggerer.trigger_run import Limits, run_until_event
from tests.support import shared_userland
from tests.support.runtime import runtime_for, wait_for
from tests.support.shared_userland import WaitOn

pytestmark = pytest.mark.anyio


@pytest.fixture
def arrived() -> Iterator[set[str]]:
    shared_userland.ARRIVED.clear()
    yield shared_userland.ARRIVED
    shared_userland.ARRIVED.clear()


def resumes(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


async def test_a_lone_run_shares_with_a_twin_that_comes_later(
    store: Store, arrived: set[str], tmp_path: Path
) -> None:
    name = f"lone-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "resumes.log"

    def gate() -> WaitOn:
        return WaitOn(tclass="GateTrigger", tkwargs={"name": name}, log=str(log))

    async with runtime_for(store, reconcile_interval=0.2) as rt:
        assert rt.triggerer is not None
        shared = rt.triggerer.shared
        first = await rt.client.submit(gate())
        await wait_for(lambda: len(shared.groups) == 1)
        [group] = shared.groups.values()
        assert group.members is None and group.count() == 1  # alone: no members dict
        second = await rt.client.submit(gate())
        await wait_for(lambda: group.count() == 2)
        assert list(shared.groups.values()) == [group]  # joined the lone run, no second run
        await rt.client.cancel(first)  # the lead leaves; its run goes on for the twin
        await wait_for(lambda: group.count() == 1)
        assert list(shared.groups.values()) == [group] and not group.task.done()
        third = await rt.client.submit(gate())  # a later twin joins the same run too
        await wait_for(lambda: group.count() == 2)
        assert list(shared.groups.values()) == [group]
        arrived.add(name)
        infos = [await rt.client.wait(i, timeout=20) for i in (second, third)]
        cancelled = await rt.client.get(first)
        await wait_for(lambda: not shared.groups and not shared.tasks)
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 2
    assert cancelled.state is TaskState.CANCELLED
    assert resumes(log) == Counter({second: 1, third: 1})  # each exactly once


async def test_a_lone_run_alone_leaving_stops_it_and_deadlines_say_how_long(
    store: Store, arrived: set[str], tmp_path: Path
) -> None:
    log = tmp_path / "resumes.log"
    async with runtime_for(store, reconcile_interval=0.2) as rt:
        assert rt.triggerer is not None
        shared = rt.triggerer.shared
        gone = await rt.client.submit(
            WaitOn(tclass="GateTrigger", tkwargs={"name": f"g-{uuid.uuid4().hex}"}, log=str(log))
        )
        await wait_for(lambda: len(shared.groups) == 1)
        [group] = shared.groups.values()
        await rt.client.cancel(gone)
        await wait_for(lambda: not shared.groups and not shared.tasks)
        assert group.task is not None and group.task.cancelled()
        late = await rt.client.submit(
            WaitOn(
                tclass="GateTrigger",
                tkwargs={"name": f"t-{uuid.uuid4().hex}"},
                log=str(log),
                defer_timeout=0.5,
            )
        )
        info = await rt.client.wait(late, timeout=20)
        await wait_for(lambda: not shared.groups and not shared.tasks)
    assert info.state is TaskState.FAILED, info
    assert re.search(r"did not fire within its timeout \(ran \d+\.\ds here\)", info.error or "")
    assert not log.exists()  # nothing resumed


class HoldsGenerators(BaseTrigger):
    """Waits forever; its run() starts an async generator of its own first."""

    shareable = False

    def __init__(self) -> None:
        self.inner: Any = None
        self.closed = False

    async def run(self) -> AsyncIterator[TriggerEvent]:
        async def inner() -> AsyncIterator[int]:
            yield 1
            await asyncio.sleep(3600)

        self.inner = inner()
        await self.inner.__anext__()
        try:
            await asyncio.sleep(3600)
            yield TriggerEvent(1)
        finally:
            self.closed = True


async def test_the_wrapper_closes_the_generator_the_loop_does_not_track() -> None:
    loop = asyncio.get_running_loop()
    registry = loop._asyncgens  # type: ignore[attr-defined]
    hooks = sys.get_asyncgen_hooks()
    trigger = HoldsGenerators()
    task = loop.create_task(run_until_event(trigger, TriggerCode("t.Holds", 1, "t"), Limits()))
    await wait_for(lambda: trigger.inner is not None)
    # the trigger's own generators are the loop's as usual; the one the wrapper closes is not
    assert trigger.inner in registry
    assert not [g for g in registry if g.ag_code is HoldsGenerators.run.__code__]
    assert sys.get_asyncgen_hooks() == hooks  # the hooks are back as they were
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert trigger.closed  # run()'s finally ran: closed by the wrapper
    await trigger.inner.aclose()
