"""The triggerer takes at most CLAIM_BATCH triggers per claim and claims again at once after a
full batch, so triggerers starting together share a backlog; at capacity it stops claiming."""

from __future__ import annotations

import time
from typing import Any

import anyio
import pytest

from deferrun.store import Store
from deferrun.triggerer import triggerer as triggerer_module
from deferrun.triggerer.triggerer import Triggerer
from tests.support.hostile_userland import HostileDefer
from tests.support.runtime import runtime_for

pytestmark = pytest.mark.anyio


async def test_claims_in_batches_up_to_capacity(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(triggerer_module, "CLAIM_BATCH", 4)
    limits: list[int] = []

    class Recording:
        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

        async def claim_triggers(self, triggerer_id: str, queues: Any, limit: int) -> Any:
            limits.append(limit)
            return await store.claim_triggers(triggerer_id, queues, limit)

    async with runtime_for(store, triggerer=False) as rt:
        far = time.time() + 3600
        ids = [await rt.client.submit(HostileDefer(kind="good_run", at=far + i)) for i in range(10)]
        with anyio.fail_after(20):
            while len(await store.list_triggers()) < len(ids):
                await anyio.sleep(0.05)
        # a long poll: only the immediate re-claim after a full batch gets past the first 4
        t = Triggerer(Recording(), capacity=6, dead_after=2.0, poll_interval=30.0)  # type: ignore[arg-type]
        async with anyio.create_task_group() as tg:
            tg.start_soon(t.run)
            with anyio.fail_after(10):
                while len(t.running) < 6:
                    await anyio.sleep(0.02)
            await anyio.sleep(0.3)  # at capacity: no further claims may follow
            t.stop()
    assert limits[:2] == [4, 2], limits
    assert len(limits) == 2 and len(t.running) <= 6, limits


@pytest.mark.slow
@pytest.mark.anyio
async def test_claims_take_the_oldest_trigger_across_queues(store: Store) -> None:
    """A triggerer serving every queue claims oldest first across queues: a busy queue whose
    name sorts first must not hold back an older trigger of another queue (ordering by
    queue, then id, held one back for as long as the busy queue kept coming)."""
    from datetime import UTC, datetime, timedelta

    from deferrun.client import AsyncClient
    from tests.support.hostile_ops import Returns
    from triggers.time import DateTimeTrigger

    client = AsyncClient(store=store)
    later = DateTimeTrigger(moment=datetime.now(UTC) + timedelta(hours=1))
    old = await client.submit(Returns(what="old", queue="zz"), start_trigger=later)
    for _ in range(30):
        await client.submit(Returns(what="new", queue="aa"), start_trigger=later)
    await anyio.sleep(2.1)  # past the fallback age, so the single triggerer may take them all
    claimed = await store.claim_triggers("t1", [], 5)
    assert old in [c.task_id for c in claimed], [c.task_id for c in claimed]
