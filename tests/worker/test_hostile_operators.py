"""Operators that misbehave (odd results, swallowed timeouts, process-stopping exceptions),
workers that get reaped while their code still runs, and outcomes caught in a database outage.

A bad operator fails its own task with a clear error; the worker and every other task go on.
"""

from __future__ import annotations

import itertools
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.client import AsyncClient
from deferrun.store import Store
from deferrun.worker.worker import Worker
from tests.support.hostile_ops import (
    AsyncExits,
    AsyncOwnTimeout,
    AsyncStubborn,
    Exits,
    OwnTimeout,
    Returns,
    Steps,
    Stubborn,
    WaitFile,
)
from tests.support.pgcluster import PgCluster
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import OutageStore, runtime_for

# --------------------------------------------------------------------------- in-process


@pytest.mark.anyio
async def test_unstorable_results_and_error_texts_fail_only_their_task(store: Store) -> None:
    cases = {
        "str-subclass": (TaskState.FAILED, "task result cannot be stored"),
        "float-subclass": (TaskState.FAILED, "task result cannot be stored"),
        "int-subclass": (TaskState.FAILED, "task result cannot be stored"),
        "surrogate": (TaskState.FAILED, "task result cannot be stored"),
        "nul-error": (TaskState.FAILED, "ValueError: bad\\x00byte"),
        "surrogate-error": (TaskState.FAILED, "ValueError: bad\\udc80byte"),
        "nul-skip": (TaskState.SKIPPED, "skip\\x00reason"),
    }
    async with runtime_for(store, triggerer=False) as rt:
        ids = {what: await rt.client.submit(Returns(what=what)) for what in [*cases, "nul", "ok"]}
        infos = {what: await rt.client.wait(i, timeout=20) for what, i in ids.items()}
        thread = await rt.run_to_end(Returns(what="thread"))
    for what, (state, error) in cases.items():
        assert infos[what].state is state, (what, infos[what])
        assert error in (infos[what].error or ""), (what, infos[what].error)
    assert infos["nul"].state is TaskState.SUCCESS and infos["nul"].result == "a\x00b"
    assert infos["ok"].state is TaskState.SUCCESS and infos["ok"].result == "ok"
    # sync operator code runs in a thread of the worker's own, never anyio's shared pool
    assert str(thread.result).startswith("deferrun-task-"), thread.result


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("op_class", [Stubborn, AsyncStubborn])
async def test_timeout_and_cancel_cannot_be_swallowed(
    store: Store, tmp_path: Path, op_class: type[Stubborn]
) -> None:
    timed, cancelled = tmp_path / "timed", tmp_path / "cancelled"
    async with runtime_for(store, triggerer=False) as rt:
        info = await rt.run_to_end(op_class(marker=str(timed), execution_timeout=0.3))
        assert info.state is TaskState.FAILED
        assert "TaskTimeout: execution_timeout of 0.3s exceeded" in (info.error or "")
        task_id = await rt.client.submit(op_class(marker=str(cancelled)))
        with anyio.fail_after(10):
            while not cancelled.exists():
                await anyio.sleep(0.02)
        await rt.client.cancel(task_id)
        with anyio.fail_after(10):  # the code itself stopped, not just the record
            while "stopped" not in timed.read_text() or not cancelled.exists():
                await anyio.sleep(0.02)
            while "stopped" not in cancelled.read_text():
                await anyio.sleep(0.02)
        assert (await rt.run_to_end(Returns(what="ok"))).state is TaskState.SUCCESS
    assert "swallowed" not in timed.read_text() + cancelled.read_text()
    assert (await rt.client.get(task_id)).state is TaskState.CANCELLED


@pytest.mark.anyio
@pytest.mark.parametrize("op_class", [OwnTimeout, AsyncOwnTimeout])
async def test_own_timeout_error_is_reported_as_itself(store: Store, op_class: type) -> None:
    async with runtime_for(store, triggerer=False) as rt:
        info = await rt.run_to_end(op_class(retries=1, retry_delay=0))
    assert info.state is TaskState.FAILED and info.try_number == 2  # retried like any error
    error = info.error or ""
    assert "Traceback" in error and "TimeoutError: the upstream API timed out" in error, error
    assert "NoneType" not in error


@pytest.mark.anyio
async def test_process_stopping_exceptions_fail_only_their_task(store: Store) -> None:
    ops = [
        (cls, exc, where)
        for cls in (Exits, AsyncExits)
        for exc in ("SystemExit", "KeyboardInterrupt", "GeneratorExit", "CancelledError")
        for where in ("execute", "resume")
    ]
    async with runtime_for(store, slots=4) as rt:
        good = [await rt.client.submit(Returns(what="ok")) for _ in range(3)]
        bad = [await rt.client.submit(cls(exc=exc, where=where)) for cls, exc, where in ops]
        good += [await rt.client.submit(Returns(what="ok")) for _ in range(3)]
        bad_infos = [await rt.client.wait(i, timeout=30) for i in bad]
        good_infos = [await rt.client.wait(i, timeout=30) for i in good]
        after = await rt.run_to_end(Returns(what="ok"))  # the worker still runs
    for (cls, exc, where), info in zip(ops, bad_infos, strict=True):
        assert info.state is TaskState.FAILED, (cls.__name__, exc, where, info)
        assert f"operator code raised {exc}" in (info.error or ""), info.error
        if where == "resume":
            assert "in resume" in (info.error or "")
    assert all(i.state is TaskState.SUCCESS for i in good_infos)
    assert after.state is TaskState.SUCCESS


def _intervals(log: Path) -> dict[tuple[str, int], tuple[int, float, float]]:
    """(task, try) -> (pid, start, stop) from a Steps log; asserts each try ran once."""
    starts: dict[tuple[str, int], tuple[int, float]] = {}
    out: dict[tuple[str, int], tuple[int, float, float]] = {}
    for line in log.read_text().splitlines():
        kind, task, try_number, pid, at = line.split()
        key = (task, int(try_number))
        if kind == "start":
            assert key not in starts, f"try {key} started twice"
            starts[key] = (int(pid), float(at))
        else:
            out[key] = (*starts[key], float(at))
    assert set(out) == set(starts), "an attempt never stopped"
    return out


def _assert_one_at_a_time(runs: dict[tuple[str, int], tuple[int, float, float]]) -> None:
    by_pid: dict[int, list[tuple[float, float]]] = {}
    for pid, start, stop in runs.values():
        by_pid.setdefault(pid, []).append((start, stop))
    for spans in by_pid.values():
        spans.sort()
        for (_, stop), (start, _) in itertools.pairwise(spans):
            assert stop <= start, f"two attempts overlapped in one worker: {spans}"


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("steps,step", [(60, 0.05), (2, 1.5)], ids=["interruptible", "stuck"])
async def test_reclaimed_task_never_runs_twice_in_one_worker(
    store: Store, tmp_path: Path, steps: int, step: float
) -> None:
    """The worker's claim is taken away (as a reaper would) while try 1 runs; the task comes
    back to the same worker as try 2. Try 1 must stop before try 2 starts; if it cannot
    (stuck in one long C call), the new claim goes back to the queue until it can."""
    log = tmp_path / "steps.log"
    async with runtime_for(store, triggerer=False) as rt:
        assert rt.worker is not None
        rt.worker.supersede_wait = 0.5
        task_id = await rt.client.submit(
            Steps(log=str(log), steps=steps, step=step, retries=1, retry_delay=0)
        )
        with anyio.fail_after(10):
            while not log.exists():
                await anyio.sleep(0.02)
        (token,) = [t for i, t in await store.owned_claims(rt.worker.id) if i == task_id]
        assert await store.fail_task(task_id, token, "reaped (test)", retry=True)
        info = await rt.client.wait(task_id, timeout=20)
    assert info.state is TaskState.SUCCESS and info.try_number == 2, info
    assert info.result["try"] == 2  # try 1's result never lands
    runs = _intervals(log)
    assert set(runs) == {(task_id, 1), (task_id, 2)}
    _assert_one_at_a_time(runs)


@pytest.mark.anyio
async def test_outcome_outliving_the_record_window_is_recorded_later(store: Store) -> None:
    flaky = OutageStore(store)
    worker = Worker(flaky, slots=1, dead_after=2.0, grace_period=2.0, record_retry_for=0.3)  # type: ignore[arg-type]
    client = AsyncClient(store=store)
    async with anyio.create_task_group() as tg:
        tg.start_soon(worker.run)
        with anyio.fail_after(10):
            await worker.started.wait()
        flaky.down = True
        first = await client.submit(Returns(what="ok"))
        second = await client.submit(Returns(what="nul-error"))
        with anyio.fail_after(15):  # both kept: the one slot was freed for the second
            while len(worker.recorder.pending) < 2:
                await anyio.sleep(0.02)
        assert (await client.get(first)).state is TaskState.RUNNING
        flaky.down = False
        a = await client.wait(first, timeout=15)
        b = await client.wait(second, timeout=15)
        worker.stop()
    assert a.state is TaskState.SUCCESS and a.result == "ok"
    assert b.state is TaskState.FAILED and "bad\\x00byte" in (b.error or "")
    assert flaky.refused >= 2 and not worker.recorder.pending


# --------------------------------------------------------------------------- real processes


def _started(proc: Proc) -> bool:
    return "worker started" in proc.output() or "triggerer started" in proc.output()


def _quiescent(db_url: str) -> bool:
    """No transaction is left open (a SIGSTOP inside one would block everyone else)."""
    if db_url.startswith("sqlite"):
        conn = sqlite3.connect(db_url.removeprefix("sqlite:///"), timeout=0.3)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("ROLLBACK")
            return True
        except sqlite3.OperationalError:
            return False
        finally:
            conn.close()
    import asyncpg

    async def idle_in_tx() -> int:
        conn = await asyncpg.connect(db_url)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                    " AND state LIKE 'idle in transaction%'"
                )
            )
        finally:
            await conn.close()

    return anyio.run(idle_in_tx) == 0


def _pause(proc: Proc, db_url: str) -> None:
    for _ in range(20):
        proc.kill(signal.SIGSTOP)
        if _quiescent(db_url):
            return
        proc.kill(signal.SIGCONT)
        time.sleep(0.05)
    raise AssertionError("could not pause the worker outside a transaction")


@pytest.mark.slow
@pytest.mark.e2e
@pytest.mark.parametrize("taker", ["second-worker", "same-worker"])
def test_paused_worker_reaped_each_result_lands_on_its_own_try(
    db_url: str, procs: Callable[..., Proc], tmp_path: Path, taker: str
) -> None:
    """SIGSTOP a worker running a long sync task until it is reaped; try 2 runs (on another
    worker, or on the same one once it is continued). Try 1's result never lands; the task
    ends with try 2's; no worker ever runs two attempts at once."""
    log = tmp_path / "steps.log"
    env = deferrun_env(db_url, dead_after="2")
    first = procs(["worker", "--slots", "2"], env)
    wait_until(lambda: _started(first), 20, message="the first worker to start")
    with Client(db_url) as client:
        task_id = client.submit(Steps(log=str(log), steps=60, retries=1, retry_delay=0))
        wait_until(
            lambda: f"{first.popen.pid} " in (log.read_text() if log.exists() else ""),
            20,
            interval=0.02,
            message="try 1 to start on the first worker",
        )
        _pause(first, db_url)
        try:
            # any process reaps; a triggerer takes no tasks, so the same worker gets try 2
            other = procs(["worker" if taker == "second-worker" else "triggerer"], env)
            wait_until(
                lambda: (
                    client.get(task_id).try_number == 2
                    or client.get(task_id).state is TaskState.UP_FOR_RETRY
                ),
                20,
                message="the paused worker to be reaped",
            )
            if taker == "second-worker":
                wait_until(
                    lambda: f"{task_id} 2 " in log.read_text(),
                    20,
                    interval=0.02,
                    message="try 2 to start on the second worker",
                )
        finally:
            first.kill(signal.SIGCONT)
        info = client.wait(task_id, timeout=40)
    assert info.state is TaskState.SUCCESS and info.try_number == 2, info
    assert info.result["try"] == 2, info.result
    expected_pid = other.popen.pid if taker == "second-worker" else first.popen.pid
    assert info.result["pid"] == expected_pid
    runs = _intervals(log)
    assert set(runs) == {(task_id, 1), (task_id, 2)}, runs
    _assert_one_at_a_time(runs)
    assert first.popen.poll() is None and other.popen.poll() is None


@pytest.mark.slow
@pytest.mark.e2e
def test_postgres_outage_longer_than_the_record_window(
    pg_cluster: PgCluster, pg_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    flag = tmp_path / "flag"
    env = deferrun_env(pg_url, dead_after="3", DEFERRUN_RECORD_RETRY_FOR="1")
    worker = procs(["worker"], env)
    wait_until(lambda: _started(worker), 20, message="worker to start")
    with Client(pg_url) as client:
        task_id = client.submit(WaitFile(path=str(flag)))
        wait_until(
            lambda: client.get(task_id).state is TaskState.RUNNING, 20, message="the task to run"
        )
    pg_cluster.stop("fast")
    try:
        flag.touch()  # the task returns while the database is down
        wait_until(
            lambda: "the outcome is kept" in worker.output(),
            30,
            message="the worker to keep the outcome past its record window",
        )
    finally:
        pg_cluster.start()
    with Client(pg_url) as client:
        info = client.wait(task_id, timeout=60)
    assert info.state is TaskState.SUCCESS and info.result == "done", info
    assert "recorded an outcome kept through a database outage" in worker.output()
    assert worker.popen.poll() is None
