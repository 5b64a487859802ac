"""Between full reconciles a count and id-sum check stands in for fetching every held id;
any difference it cannot explain by the event writer's store calls under way means a full
pass (which stops triggers removed elsewhere and releases strays)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from deferrun.client import AsyncClient
from deferrun.store.base import Store
from deferrun.triggerer.trigger_run import Outcome
from deferrun.triggerer.triggerer import Triggerer
from tests.support.hostile_ops import Returns
from triggers.time import DateTimeTrigger


class CountsFetches:
    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.fetches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def owned_trigger_ids(self, triggerer_id: str) -> set[int]:
        self.fetches += 1
        return await self.inner.owned_trigger_ids(triggerer_id)


async def _holding(store: Store, n: int) -> tuple[Triggerer, CountsFetches, list[str]]:
    client = AsyncClient(store=store)
    later = DateTimeTrigger(moment=datetime.now(UTC) + timedelta(hours=1))
    ids = [await client.submit(Returns(what="x"), start_trigger=later) for _ in range(n)]
    t = Triggerer(store, capacity=1000)
    for claimed in await store.claim_triggers(t.id, ["default"], 1000):
        t._start(claimed)
    assert len(t.running) == n
    counting = CountsFetches(store)
    t.store = counting  # type: ignore[assignment]
    t.reconciler.store = counting  # type: ignore[assignment]  # it takes the store it uses
    return t, counting, ids


@pytest.mark.anyio
async def test_an_unchanged_holding_is_not_fetched_and_a_removal_is_found(store: Store) -> None:
    t, counting, ids = await _holding(store, 20)
    await t.reconciler.run()  # the first pass is full
    assert counting.fetches == 1
    await t.reconciler.run()
    await t.reconciler.run()
    assert counting.fetches == 1  # nothing changed: the check stood in
    await AsyncClient(store=store).cancel(ids[3])  # its trigger row is removed elsewhere
    await t.reconciler.run()
    assert counting.fetches == 2
    assert len(t.running) == 19  # the full pass stopped it
    await t.reconciler.run()
    assert counting.fetches == 2
    for run in list(t.running.values()):
        t._cancel(run, "test over")


@pytest.mark.anyio
async def test_the_check_allows_for_the_writers_store_calls_under_way(store: Store) -> None:
    """A fired trigger's row is deleted by the writer's store call, which may commit before
    the writer forgets it: that is no difference, whether the call committed or not."""
    t, counting, _ = await _holding(store, 10)
    await t.reconciler.run()
    fired = next(iter(t.running))
    t.running.pop(fired)  # it fired: its outcome waits in the writer
    t.writer.pending[fired] = Outcome(fired, "fired", '{"ok": true}')
    assert await t.reconciler._held_as_known()  # written but not yet stored
    t.writer._unit([fired])  # the writer's call is under way ...
    assert await t.reconciler._held_as_known()
    await store.fire_triggers([(fired, '{"ok": true}')])  # ... and has committed
    assert await t.reconciler._held_as_known()
    t.writer.open_units.clear()  # had the call not been seen, the difference is real
    t.writer.units.clear()
    assert not await t.reconciler._held_as_known()
    assert counting.fetches == 1
    for run in list(t.running.values()):
        t._cancel(run, "test over")
