"""A try past its execution_timeout whose code is still running (its thread blocked in a C
call, which the interrupt reaches only when the call returns) must not let the next try start
on another worker: one task never runs twice at once."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from deferrun import BaseOperator
from deferrun.client import AsyncClient, Client
from deferrun.core.models import TaskState
from deferrun.store import Store
from deferrun.worker.worker import Worker
from tests.support.hostile_ops import Steps
from tests.support.processes import Proc, deferrun_env
from tests.support.runtime import runtime_for


@pytest.mark.slow
def test_the_retry_starts_only_after_the_timed_out_code_stopped(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    log = tmp_path / "steps.log"
    env = deferrun_env(db_url)
    with Client(db_url) as client:
        # one time.sleep(2.5): a C call the 0.5 s timeout cannot interrupt until it returns
        ids = [
            client.submit(
                Steps(
                    log=str(log),
                    steps=1,
                    step=2.5,
                    execution_timeout=0.5,
                    retries=1,
                    retry_delay=0,
                )
            )
            for _ in range(6)
        ]
        for _ in range(2):  # two workers: the retry could start on the other one
            procs(["worker", "--slots", "2"], env)
        infos = [client.wait(i, timeout=60) for i in ids]
    assert all(i.state is TaskState.FAILED and i.try_number == 2 for i in infos), infos
    assert all("execution_timeout" in (i.error or "") for i in infos), [i.error for i in infos]
    events: dict[tuple[str, str], dict[str, float]] = {}
    for line in log.read_text().splitlines():
        kind, task_id, try_number, _pid, at = line.split()
        events.setdefault((task_id, try_number), {})[kind] = float(at)
    overlaps = [
        (task_id, events[(task_id, "1")], events[(task_id, "2")])
        for task_id in ids
        if events[(task_id, "2")]["start"] < events[(task_id, "1")]["stop"]
    ]
    assert not overlaps, overlaps  # never two tries of one task at once


class BlocksTheLoop(BaseOperator):
    """An async method that blocks the worker's loop (no await the timeout could cancel)."""

    async def execute(self, context: Any) -> Any:
        time.sleep(0.6)
        return "done"


@pytest.mark.anyio
async def test_an_async_method_that_blocks_past_its_timeout_times_out(store: Store) -> None:
    """It used to end in success: nothing could cancel it, and nothing looked at the clock."""
    async with runtime_for(store, slots=1, triggerer=False, dead_after=10.0) as rt:
        info = await rt.run_to_end(BlocksTheLoop(execution_timeout=0.2), timeout=20)
    assert info.state is TaskState.FAILED and "execution_timeout" in (info.error or ""), info


@pytest.mark.slow
@pytest.mark.anyio
async def test_a_shutdown_while_timed_out_code_stops_records_the_timeout(
    store: Store, tmp_path: Path
) -> None:
    """A worker stopped while it waited for timed-out code put the same try back on the
    queue, so the timeout did not use up a try (a task with retries=2 ran 4 times)."""
    log = tmp_path / "steps.log"
    worker = Worker(store, slots=1, dead_after=10.0, grace_period=1.0)
    client = AsyncClient(store=store)
    task_id = await client.submit(
        Steps(log=str(log), steps=1, step=3.0, execution_timeout=0.4, retries=1, retry_delay=60)
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(20):
            while not (log.exists() and "start" in log.read_text()):
                await anyio.sleep(0.02)
        worker.stop()  # its grace (1 s) ends while the timed-out sleep (3 s) still runs
    info = await client.get(task_id)
    assert info.state is TaskState.UP_FOR_RETRY, info
    assert "execution_timeout" in (info.error or ""), info
