"""Batched claims and grouped outcomes: a slot's next task is claimed in the transaction that
records its outcome, and slots that free together claim together. None of that may run a task
twice on one try, lose one, or let one bad outcome fail the others. (A batch claim whose reply
is lost: tests/worker/test_perf_faults.py, for both the plain and the grouped claim.)"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from deferrun.client import AsyncClient, Client
from deferrun.core.models import TaskState
from deferrun.store import Store
from deferrun.worker.worker import Worker
from tests.support.hostile_ops import Returns, Steps
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import runtime_for, wait_for


class RefusesOne:
    """The real store, refusing (as a database refuses a value) the completion of one task:
    the first to arrive inside a group of several, then alone too."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.bad: str | None = None
        self.groups: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def record_outcomes(self, writes: Any, claim: Any = None) -> Any:
        ids = [args[0] for _, args, _ in writes]
        self.groups.append(ids)
        if self.bad is None and len(ids) > 1:
            self.bad = ids[0]
        if self.bad in ids:
            raise ValueError("simulated: the database refused a value")
        return await self.inner.record_outcomes(writes, claim)

    async def complete_task(self, task_id: str, *args: Any, **kwargs: Any) -> Any:
        if task_id == self.bad:
            raise ValueError("simulated: the database refused a value")
        return await self.inner.complete_task(task_id, *args, **kwargs)


@pytest.mark.slow
@pytest.mark.anyio
async def test_one_refused_outcome_fails_alone_in_its_group(store: Store, tmp_path: Path) -> None:
    log = tmp_path / "steps.log"
    refusing = RefusesOne(store)
    worker = Worker(refusing, slots=4, dead_after=3.0, grace_period=2.0)  # type: ignore[arg-type]
    worker._claim_in_record = True
    client = AsyncClient(store=store)
    # same length: slots finish together and their outcomes form groups
    ids = [await client.submit(Steps(log=str(log), steps=1, step=0.3)) for _ in range(16)]
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        try:
            with anyio.fail_after(30):
                infos = [await client.wait(i, timeout=30) for i in ids]
        finally:
            worker.stop()
    assert refusing.bad is not None, f"no group of several outcomes: {refusing.groups}"
    by_id = {i.id: i for i in infos}
    bad = by_id.pop(refusing.bad)
    assert bad.state is TaskState.FAILED and "could not be stored" in (bad.error or ""), bad
    assert all(i.state is TaskState.SUCCESS for i in by_id.values()), by_id
    starts = [line.split()[1] for line in log.read_text().splitlines() if line.startswith("start")]
    assert sorted(starts) == sorted(ids)  # each ran exactly once


@pytest.mark.slow
def test_sigkill_of_a_worker_holding_a_batch_runs_each_try_once(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    """A worker SIGKILLed while it holds a full batch of claims (one statement claimed them
    all): once it counts as dead its tasks are retried elsewhere, each try running once."""
    log = tmp_path / "steps.log"
    env = deferrun_env(db_url, dead_after="2")
    with Client(db_url) as client:
        ids = [
            client.submit(Steps(log=str(log), steps=200, step=0.05, retries=1, retry_delay=0))
            for _ in range(8)
        ]
        first = procs(["worker", "--slots", "8"], env)

        def started() -> int:
            text = log.read_text() if log.exists() else ""
            return sum(1 for line in text.splitlines() if line.startswith("start"))

        wait_until(lambda: started() == 8, 30, message="all eight to start on the first worker")
        first.kill(signal.SIGKILL)
        first.popen.wait(10)
        killed_at = time.monotonic()
        procs(["worker", "--slots", "8"], env)
        infos = [client.wait(i, timeout=60) for i in ids]
    assert all(i.state is TaskState.SUCCESS for i in infos), [(i.state, i.error) for i in infos]
    assert all(i.try_number == 2 for i in infos), [i.try_number for i in infos]
    tries = [tuple(line.split()[1:3]) for line in log.read_text().splitlines() if "start" in line]
    assert len(tries) == len(set(tries)) == 16, tries  # each (task, try) started once
    assert time.monotonic() - killed_at < 45


@pytest.mark.anyio
async def test_a_thread_that_cannot_start_fails_only_its_attempt(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop starts each sync attempt's thread without waiting for it; when the OS refuses
    a thread, that attempt fails (and is retried) and the worker goes on."""

    import deferrun.worker.attempt_threads

    real = deferrun.worker.attempt_threads._start_nowait
    refused: list[str] = []

    def flaky(thread: Any) -> None:
        if not refused:
            refused.append(thread.name)
            raise RuntimeError("can't start new thread")
        real(thread)

    monkeypatch.setattr(deferrun.worker.attempt_threads, "_start_nowait", flaky)
    monkeypatch.setattr(deferrun.worker.attempt_threads, "_NOWAIT", True)
    async with runtime_for(store, slots=2, triggerer=False) as rt:
        info = await rt.run_to_end(Returns(what="fine", retries=1, retry_delay=0), timeout=20)
        other = await rt.run_to_end(Returns(what="thread"), timeout=20)
    assert refused, "the fault was never injected"
    assert info.state is TaskState.SUCCESS and info.try_number == 2, info
    assert info.result == "ok", info
    assert other.state is TaskState.SUCCESS and other.result == f"deferrun-task-{other.id}", other


@pytest.mark.anyio
async def test_grouped_completions_each_keep_their_fence(store: Store) -> None:
    """Plain completions of a group go as one batch of statements: each still lands only for
    the claim that holds its task, and the rest of the group stands."""
    client = AsyncClient(store=store)
    ids = [await client.submit(Returns(what="fine")) for _ in range(4)]
    claimed = await store.claim_tasks("w1", ["default"], 4)
    assert len(claimed) == 4
    stale = claimed[1]
    assert await store.requeue_task(stale.id, stale.claim_token)
    [again] = await store.claim_tasks("w2", ["default"], 1)
    assert again.id == stale.id and again.claim_token > stale.claim_token
    writes = [("complete", (t.id, t.claim_token, f'"{t.id}"'), None) for t in claimed]
    writes.append(("fail", (claimed[3].id, claimed[3].claim_token, "after", False), None))
    results, _ = await store.record_outcomes(writes)
    assert results[:4] == [True, False, True, True], results
    assert results[4] is None  # fenced off: that claim already completed its task
    infos = {i: await client.get(i) for i in ids}
    for t in (claimed[0], claimed[2], claimed[3]):
        assert infos[t.id].state is TaskState.SUCCESS and infos[t.id].result == t.id
    assert infos[stale.id].state is TaskState.RUNNING  # still the second claim's
    assert await store.complete_task(again.id, again.claim_token, '"late"')


@pytest.mark.anyio
async def test_a_thread_scheduled_after_its_cancel_never_runs_the_code(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loop does not wait for a sync attempt's thread to be scheduled; a cancel that
    comes before the OS runs the thread finds nothing to interrupt, so the thread itself must
    see the cancel and not start the operator's code."""
    import threading

    import deferrun.worker.attempt_threads

    real = deferrun.worker.attempt_threads._start_nowait
    held: list[Any] = []
    release = threading.Event()

    def late(thread: Any) -> None:  # the OS schedules this thread only once released
        held.append(thread)
        threading.Thread(target=lambda: (release.wait(30), real(thread)), daemon=True).start()

    monkeypatch.setattr(deferrun.worker.attempt_threads, "_start_nowait", late)
    monkeypatch.setattr(deferrun.worker.attempt_threads, "_NOWAIT", True)
    log = tmp_path / "steps.log"
    async with runtime_for(store, slots=2, triggerer=False) as rt:
        assert rt.worker is not None
        client = AsyncClient(store=store)
        task_id = await client.submit(Steps(log=str(log), steps=2, step=0.01))
        await wait_for(lambda: bool(held))
        await client.cancel(task_id)
        await wait_for(lambda: not rt.worker.running)  # type: ignore[union-attr]
        release.set()
        await wait_for(lambda: held[0].ident is not None and not held[0].is_alive())
        info = await client.get(task_id)
    assert info.state is TaskState.CANCELLED, info
    assert not log.exists(), log.read_text()  # the operator's code never ran


class DropsRegistration:
    """The real store, whose first two registrations lose their connection (a failover or a
    proxy restart just as the process starts); a bad registration fails for good."""

    def __init__(self, inner: Store, error: Exception) -> None:
        self.inner = inner
        self.error = error
        self.refused = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def register_process(self, *args: Any) -> Any:
        if self.refused < 2:
            self.refused += 1
            raise self.error
        return await self.inner.register_process(*args)


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_connection_lost_at_registration_is_retried(store: Store) -> None:
    from deferrun.exceptions import StoreUnavailable
    from deferrun.triggerer.triggerer import Triggerer

    for make in (
        lambda s: Worker(s, slots=1, dead_after=3.0),
        lambda s: Triggerer(s, dead_after=3.0),
    ):
        flaky = DropsRegistration(store, StoreUnavailable("simulated: connection lost"))
        process = make(flaky)
        async with anyio.create_task_group() as tg:
            tg.start_soon(process.run)
            with anyio.fail_after(20):
                await process.started.wait()
            process.stop()
        assert flaky.refused == 2
    # a registration the database refuses for good (not a lost connection) is not retried
    refused = DropsRegistration(store, ValueError("simulated: a bad value"))
    with pytest.raises(BaseException) as caught:
        await Worker(refused, slots=1, dead_after=3.0).run()  # type: ignore[arg-type]
    assert refused.refused == 1, caught.value
