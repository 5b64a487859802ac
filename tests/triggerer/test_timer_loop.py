"""The timer loop and reconciling at scale: many timers due close together are popped in a
bounded number of wake-ups, never early; a reconcile over many live triggers lets due timers
fire while it runs, and still cancels what is gone and releases what is stray."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import anyio
import pytest

from deferrun.core import serialization
from deferrun.core.models import ClaimedTrigger
from deferrun.process.metrics import Metrics
from deferrun.triggerer import reconcile
from deferrun.triggerer.timers import MIN_WAIT, Timer, TimerHeap, fire_timers
from deferrun.triggerer.triggerer import Triggerer
from triggers.time import DateTimeTrigger

pytestmark = pytest.mark.anyio


async def test_close_timers_fire_in_few_wakeups_and_never_early() -> None:
    """2,000 timers 0.05 ms apart: a sub-millisecond sleep per timer spun under uvloop (its
    clock is in whole ms); now the loop sleeps at least MIN_WAIT and pops them together."""
    heap = TimerHeap()
    start = time.time() + 0.05
    for i in range(2000):
        heap.push(Timer(i + 1, f"t{i}", start + i * 0.00005, False, "{}"))
    fired: list[tuple[float, float]] = []
    pops = 0
    pop_due = heap.pop_due

    def counted(now: float, limit: int = 10_000) -> list[Timer]:
        nonlocal pops
        pops += 1
        due = pop_due(now, limit)
        fired.extend((timer.due, now) for timer in due)
        return due

    heap.pop_due = counted  # type: ignore[method-assign]
    running: dict[int, Any] = {}
    with anyio.move_on_after(5):
        async with anyio.create_task_group() as tg:
            tg.start_soon(fire_timers, heap, running, lambda *a: None, Metrics().fire_lateness)
            while len(fired) < 2000:
                await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert len(fired) == 2000
    assert all(now >= due for due, now in fired)  # never before its moment
    # 100 ms of moments: about one wake-up per MIN_WAIT (twice that allowed for a loaded
    # machine); the old loop woke for every few timers under asyncio, and under uvloop spun
    assert pops <= 2 * 0.1 / MIN_WAIT + 20, pops


async def test_reconcile_over_many_triggers_yields_and_stays_exact(
    store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reconcile, "RECONCILE_STEP", 100)
    t = Triggerer(store, capacity=10_000)
    classpath, _ = DateTimeTrigger(moment=datetime.now(UTC)).serialize()
    moment = serialization.dumps({"moment": datetime.fromtimestamp(time.time() + 3600, UTC)})
    for i in range(1, 2001):
        t._start(ClaimedTrigger(i, f"task-{i}", classpath, moment, None))
    gone = {7, 1500}
    owned = (set(range(1, 2001)) - gone) | {5000}  # 5000: held here, not running (stray)
    released: list[int] = []

    class Owned:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def owned_trigger_ids(self, triggerer_id: str) -> set[int]:
            return set(owned)

        async def release_triggers(self, triggerer_id: str, ids: Any) -> int:
            released.extend(ids)
            return len(ids)

    t.store = t.reconciler.store = Owned()  # type: ignore[assignment]  # it takes the store it uses
    steps = 0

    async def count_steps() -> None:
        nonlocal steps
        while True:
            steps += 1
            await anyio.sleep(0)

    async with anyio.create_task_group() as tg:
        tg.start_soon(count_steps)
        await anyio.sleep(0)
        before = steps
        await t._reconcile()
        during = steps - before
        tg.cancel_scope.cancel()
    assert during >= 15, during  # 2,000 running + 2,000 owned, a yield every 100
    assert not gone & set(t.running) and len(t.running) == 1998
    assert released == [5000]
