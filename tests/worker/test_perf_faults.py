"""Faults the performance round (group commit, claim in the outcome transaction, thread
start off the loop, long idle polls, keyset listing) must survive.

A claim whose COMMIT reached the database but whose reply was lost leaves tasks ``running``
for a live worker that never started them: the worker's ownership check re-queues them, and
each still runs exactly once."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from deferrun.client import AsyncClient
from deferrun.core.models import TaskState
from deferrun.exceptions import StoreUnavailable
from deferrun.store import Store, make_store
from deferrun.worker.worker import Worker
from tests.support.hostile_ops import Returns, Steps, ThreadLocalPeek
from tests.support.loopback_proxy import SilencingProxy
from tests.support.runtime import runtime_for


class LostReplyStore:
    """The real store; the first ``method`` call that claims something commits, then raises
    as if the connection dropped while the COMMIT's reply was on its way."""

    def __init__(self, inner: Store, method: str) -> None:
        self.inner = inner
        self.method = method
        self.lost: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name != self.method:
            return attr

        async def call(*args: Any, **kwargs: Any) -> Any:
            answer = await attr(*args, **kwargs)
            claimed = answer[1] if name == "record_outcomes" else answer
            if claimed and not self.lost:
                self.lost += [t.id for t in claimed]
                raise StoreUnavailable("simulated: connection lost reading the COMMIT reply")
            return answer

        return call


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("method", ["claim_tasks", "record_outcomes"])
async def test_tasks_of_a_claim_whose_reply_was_lost_run_once(
    store: Store, method: str, tmp_path: Path
) -> None:
    log = tmp_path / "steps.log"
    lossy = LostReplyStore(store, method)
    worker = Worker(lossy, slots=2, dead_after=2.0, grace_period=2.0)  # type: ignore[arg-type]
    worker._claim_in_record = True  # claim in the outcome transaction on SQLite too
    client = AsyncClient(store=store)
    ids = [await client.submit(Steps(log=str(log), steps=2, step=0.01)) for _ in range(6)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            with anyio.fail_after(20):
                infos = [await client.wait(i, timeout=20) for i in ids]
        finally:
            worker.stop()
    assert lossy.lost, "the fault was never injected"
    assert [i.state for i in infos] == [TaskState.SUCCESS] * len(ids), infos
    assert all(i.try_number == 1 for i in infos), infos  # re-queued on the same try
    starts = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start")]
    assert sorted(starts) == sorted(ids)  # each ran exactly once


@pytest.mark.anyio
async def test_thread_local_state_never_reaches_another_task(store: Store) -> None:
    """Each sync attempt has a thread of its own: what one leaves in a threading.local (or
    its thread's name) is not what the next finds, even on a single slot."""
    async with runtime_for(store, slots=1, triggerer=False) as rt:
        results = [(await rt.run_to_end(ThreadLocalPeek(), timeout=10)) for _ in range(5)]
    assert all(i.state is TaskState.SUCCESS for i in results), results
    assert [i.result["seen"] for i in results] == [None] * 5
    assert all(i.result["name"] == f"deferrun-task-{i.id}" for i in results), results


@asynccontextmanager
async def worker_behind_silencer(
    pg_url: str,
) -> AsyncIterator[tuple[SilencingProxy, Worker, AsyncClient]]:
    """A started worker whose database connections go through a SilencingProxy (LISTEN
    pinged every second), and a client that talks to the database directly."""
    real_port = int(pg_url.split("@127.0.0.1:")[1].split("/")[0])
    proxy = SilencingProxy(real_port)
    proxied = pg_url.replace(f":{real_port}/", f":{proxy.port}/")
    store = make_store(proxied, dead_after=2.0)
    await store.open()
    store.connector.ping_every = 1.0  # type: ignore[attr-defined]
    direct = make_store(pg_url, dead_after=2.0)
    await direct.open()
    worker = Worker(store, slots=2, dead_after=2.0, grace_period=2.0)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker.run)
            try:
                with anyio.fail_after(10):
                    await worker.started.wait()
                yield proxy, worker, AsyncClient(store=direct)
            finally:
                worker.stop()
    finally:
        await direct.close()
        await store.close()
        proxy.close()


@pytest.mark.slow
@pytest.mark.anyio
async def test_silently_dropped_listen_connection_is_replaced(pg_url: str) -> None:
    """PostgreSQL only (SQLite has no LISTEN and polls every second). Once the proxy swallows
    the LISTEN connection's traffic, a new task still starts well before the 15 s idle poll:
    the ping finds the connection dead and its replacement catches up."""
    async with worker_behind_silencer(pg_url) as (proxy, worker, client):
        assert worker.poll_interval == 15.0
        first = await client.wait(await client.submit(Returns(what="ok")), timeout=10)
        proxy.silent.set()
        beat = worker.health.get("ok_at", 0.0)
        with anyio.fail_after(10):  # the claim loop is back in its idle wait by then
            while worker.health.get("ok_at", 0.0) <= beat + 0.5:
                await anyio.sleep(0.05)
        submitted = time.monotonic()
        second = await client.wait(await client.submit(Returns(what="ok")), timeout=10)
        took = time.monotonic() - submitted
    assert first.state is TaskState.SUCCESS and second.state is TaskState.SUCCESS
    assert proxy.swallowed, "the LISTEN connection was never silenced"
    assert took < 10


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_hanging_listen_replacement_never_stops_the_heartbeat(pg_url: str) -> None:
    """The LISTEN connection goes silent and so does its replacement (the same dropped path):
    the replacement hangs in the background while heartbeats go on (a stopped heartbeat got a
    live worker declared dead while it kept running its tasks); once the path recovers, a
    later replacement brings wake-ups back."""
    gaps: list[float] = []
    async with worker_behind_silencer(pg_url) as (proxy, worker, client):
        proxy.silent.set()
        last, seen_at = worker.health.get("ok_at", 0.0), time.monotonic()
        silent_until = time.monotonic() + 8.0
        for _ in range(200):  # 8 s of silence, sampled every 0.05 s
            if time.monotonic() > silent_until:
                break
            await anyio.sleep(0.05)
            now, beat = time.monotonic(), worker.health.get("ok_at", 0.0)
            if beat != last:
                gaps.append(now - seen_at)
                last, seen_at = beat, now
        gaps.append(time.monotonic() - seen_at)
        proxy.silent.clear()
        done = await client.wait(await client.submit(Returns(what="ok")), timeout=20)
    assert proxy.swallowed, "the LISTEN connection was never silenced"
    assert max(gaps) < 2.0, gaps  # never as long as dead_after
    assert done.state is TaskState.SUCCESS
