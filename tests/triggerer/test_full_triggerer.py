"""A triggerer at capacity sleeps: with no free slot it waits for a trigger to end (or for
reconcile), not for a claim time that already passed (the loop used to spin at 100 % CPU)."""

from __future__ import annotations

import time

import anyio
import pytest

from deferrun.store import Store
from deferrun.triggerer.triggerer import Triggerer
from tests.support.hostile_userland import HostileDefer
from tests.support.runtime import runtime_for

pytestmark = pytest.mark.anyio


async def test_full_triggerer_sleeps_until_a_slot_frees(store: Store) -> None:
    async with runtime_for(store, triggerer=False) as rt:
        far = time.time() + 3600
        ids = [await rt.client.submit(HostileDefer(kind="good_run", at=far + i)) for i in range(4)]
        with anyio.fail_after(20):
            while len(await store.list_triggers()) < len(ids):
                await anyio.sleep(0.05)
        t = Triggerer(store, capacity=3, dead_after=5.0, poll_interval=0.2, reconcile_interval=0.5)
        async with anyio.create_task_group() as tg:
            tg.start_soon(t.run)
            with anyio.fail_after(10):
                while len(t.running) < 3:
                    await anyio.sleep(0.02)
            assert t._wakeup is not None
            waits = 0
            plain_wait = t._wakeup.wait

            async def counted(timeout: float) -> bool:
                nonlocal waits
                waits += 1
                return await plain_wait(timeout)

            t._wakeup.wait = counted  # type: ignore[method-assign]
            # A bounded window at capacity: reconcile (every 0.5 s) is all that may wake it.
            # The spinning loop woke here tens of thousands of times.
            with anyio.move_on_after(1.5):
                while waits < 1000:
                    await anyio.sleep(0.05)
            assert waits <= 15, f"a full triggerer's claim loop woke {waits} times in 1.5 s"
            assert len(t.running) == 3
            # a trigger ends (its task is cancelled): the slot is claimed into promptly
            running_tasks = {run.task_id for run in t.running.values()}
            waiting = [i for i in ids if i not in running_tasks]
            assert len(waiting) == 1
            await rt.client.cancel(sorted(running_tasks)[0])
            with anyio.fail_after(10):
                while not any(r.task_id == waiting[0] for r in t.running.values()):
                    await anyio.sleep(0.02)
            t.stop()
