"""Due times live on the database's clock, and every write that makes work due wakes someone.

A worker whose clock is an hour ahead (a badly synced host) must not move a deferral's
timeout or a reschedule an hour away: durations travel to the database, which adds them to
its own clock. And a reschedule must wake the other processes like any other runnable task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.client import build_task
from deferrun.store import Store
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.userland import DeferOnce, FlagSensor

SKEWED_CLOCK = """
import time

_real = time.time
time.time = lambda: _real() + 3600.0  # this host's clock is an hour ahead
"""


@pytest.mark.anyio
async def test_reschedule_wakes_the_other_processes(store: Store) -> None:
    task = build_task(DeferOnce())
    await store.submit(task)
    [claim] = await store.claim_tasks("w1", ["default"], 1)
    other = await store.register_process("w2", "worker", ["default"], 1)
    await other.wait(0)  # forget the wake-up of the registration itself
    assert await store.reschedule_task(task.id, claim.claim_token, 0.1)
    with anyio.fail_after(5):
        assert await other.wait(5), "a reschedule woke no other worker"


@pytest.mark.slow
@pytest.mark.e2e
def test_a_skewed_worker_clock_moves_no_due_time(
    pg_url: str, tmp_path: Path, procs: Callable[..., Proc]
) -> None:
    skew = tmp_path / "skew"
    skew.mkdir()
    (skew / "sitecustomize.py").write_text(SKEWED_CLOCK)
    procs(["triggerer"], deferrun_env(pg_url))
    env = deferrun_env(pg_url)
    env["PYTHONPATH"] = f"{skew}:{env['PYTHONPATH']}"
    procs(["worker", "--slots", "4"], env)
    flag = tmp_path / "flag"
    with Client(pg_url) as client:
        timed = client.submit(DeferOnce(kind="never", timeout=2.0))
        sensor = client.submit(FlagSensor(path=str(flag), mode="reschedule", poke_interval=0.5))
        wait_until(lambda: Path(f"{flag}.pokes").exists(), 20, message="the first poke")
        flag.touch()
        started = time.monotonic()
        timed_info = client.wait(timed, timeout=30)
        sensor_info = client.wait(sensor, timeout=30)
        waited = time.monotonic() - started
    assert timed_info.state is TaskState.FAILED, timed_info
    assert "timed out" in (timed_info.error or ""), timed_info.error
    assert sensor_info.state is TaskState.SUCCESS, sensor_info.error
    assert waited < 20, f"due times moved by the worker's clock: took {waited:.1f}s"
