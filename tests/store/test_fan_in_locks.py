"""PostgreSQL: a fan-in submit over many upstreams while workers end those upstreams
(issue 24, bug 2). The submit once locked its upstreams in whatever order the server read
them and workers ended theirs in the order attempts finished: the two deadlocked, and the
submit failed with "PostgreSQL unavailable: DeadlockDetectedError"."""

from __future__ import annotations

import random

import anyio
import pytest

from deferrun.client import build_task
from deferrun.core.models import NewTask, TaskState
from deferrun.exceptions import StoreUnavailable
from deferrun.store import make_store
from deferrun.store.base import is_deadlock
from tests.support.pipeline_userland import Step

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

UPSTREAMS = 1500
WORKERS = 4
BATCH = 25
FAN_INS = 12


async def test_fan_in_submit_while_workers_end_its_upstreams(pg_url: str) -> None:
    store = make_store(pg_url, dead_after=30.0)
    await store.open()
    try:
        ups = [build_task(Step()) for _ in range(UPSTREAMS)]
        await store.submit_many(ups)
        claims = await store.claim_tasks("w1", ["default"], UPSTREAMS)
        assert len(claims) == UPSTREAMS
        random.Random(24).shuffle(claims)  # attempts end in any order
        after = [t.id for t in ups]
        fan_ins: list[NewTask] = []
        errors: list[BaseException] = []

        async def worker(k: int) -> None:
            mine = claims[k::WORKERS]
            for i in range(0, len(mine), BATCH):
                writes = [("complete", (c.id, c.claim_token, None), None) for c in mine[i:][:BATCH]]
                try:
                    results, _ = await store.record_outcomes(writes)
                except Exception as exc:  # a deadlock victim among the completions
                    errors.append(exc)
                    continue
                assert all(results)

        async def submitter() -> None:
            for _ in range(FAN_INS):
                task = build_task(Step(), after=after)
                try:
                    await store.submit(task)
                except Exception as exc:
                    errors.append(exc)
                else:
                    fan_ins.append(task)
                await anyio.sleep(0)

        with anyio.fail_after(180):
            async with anyio.create_task_group() as tg:
                for k in range(WORKERS):
                    tg.start_soon(worker, k)
                tg.start_soon(submitter)
                tg.start_soon(submitter)
        assert not errors, [repr(e) for e in errors[:5]]
        assert len(fan_ins) == 2 * FAN_INS
        for task in fan_ins:  # every upstream succeeded: each fan-in was released once
            info = await store.get_task(task.id)
            assert info is not None and info.state is TaskState.QUEUED, info
    finally:
        await store.close()


async def test_a_submit_that_loses_a_deadlock_is_run_again(pg_url: str) -> None:
    """A writer outside the id order (here a raw transaction) deadlocks with a fan-in submit;
    PostgreSQL picks the submit, which waited first: the store runs it again, and the caller
    sees a plain success."""
    import asyncpg

    store = make_store(pg_url, dead_after=30.0)
    await store.open()
    raw = await asyncpg.connect(pg_url)
    watch = await asyncpg.connect(pg_url)
    try:
        ups = [build_task(Step()) for _ in range(2)]
        await store.submit_many(ups)
        first, second = sorted(t.id for t in ups)
        fan_in = build_task(Step(), after=[first, second])
        lock = "SELECT id FROM deferrun_tasks WHERE id = $1 FOR UPDATE"
        waiting = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
        tr = raw.transaction()
        await tr.start()
        await raw.execute(lock, second)
        outcome: list[BaseException | None] = []

        async def submit() -> None:
            try:
                await store.submit(fan_in)  # locks `first`, then waits on `second`
                outcome.append(None)
            except Exception as exc:
                outcome.append(exc)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(submit)
                while not await watch.fetchval(waiting):
                    await anyio.sleep(0.01)
                await raw.execute(lock, first)  # the cycle: the submit is chosen and retried
                await tr.commit()
        assert outcome == [None], outcome
        info = await store.get_task(fan_in.id)
        assert info is not None and info.state is TaskState.DEFERRED
        assert sorted((await store.dependencies(fan_in.id))[0]) == [first, second]
        deadlocks = "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        for _ in range(200):  # the server counts it once its stats are flushed
            await watch.execute("SELECT pg_stat_clear_snapshot()")
            if await watch.fetchval(deadlocks):
                break
            await anyio.sleep(0.05)
        assert await watch.fetchval(deadlocks) >= 1, "no deadlock happened: nothing was tested"
    finally:
        await raw.close()
        await watch.close()
        await store.close()


def test_a_deadlock_is_told_apart_from_an_outage() -> None:
    import asyncpg

    wrapped = StoreUnavailable("PostgreSQL unavailable: DeadlockDetectedError()")
    wrapped.__cause__ = asyncpg.exceptions.DeadlockDetectedError("deadlock detected")
    assert is_deadlock(wrapped)
    assert not is_deadlock(StoreUnavailable("PostgreSQL unavailable: ConnectionResetError()"))
    assert not is_deadlock(ValueError("bad"))
