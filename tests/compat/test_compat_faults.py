"""Faults around the Airflow layer: an attempt's XCom pushes are part of its fenced outcome
write, so a database outage at the end of an attempt keeps both and never runs it twice."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.client import AsyncClient
from deferrun.store import Store
from deferrun.triggerer.triggerer import Triggerer
from deferrun.worker.worker import Worker
from tests.support.airflow_style import PushWhenFlagged
from tests.support.pgcluster import PgCluster
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import OutageStore, runtime_for


def _runs(marker: Path) -> int:
    return len(marker.read_text().splitlines()) if marker.exists() else 0


@pytest.mark.slow
@pytest.mark.anyio
@pytest.mark.parametrize("how", ["return", "defer", "fail"])
async def test_outage_at_the_end_keeps_xcom_with_the_outcome_and_runs_once(
    store: Store, tmp_path: Path, how: str
) -> None:
    marker, flag = tmp_path / "runs", tmp_path / "flag"
    flaky = OutageStore(store)
    worker = Worker(flaky, slots=1, dead_after=2.0, grace_period=2.0, record_retry_for=0.3)  # type: ignore[arg-type]
    triggerer = Triggerer(store, dead_after=2.0)
    client = AsyncClient(store=store)
    async with anyio.create_task_group() as tg:
        for part in (worker, triggerer):
            tg.start_soon(part.run)
            with anyio.fail_after(10):
                await part.started.wait()
        op = PushWhenFlagged(task_id="pusher", marker=str(marker), flag=str(flag), how=how)
        task_id = await client.submit(op)
        with anyio.fail_after(15):
            while _runs(marker) < 1:
                await anyio.sleep(0.02)
        flaky.down = True  # execute is running: its end meets a database that is down
        flag.touch()
        with anyio.fail_after(15):
            while not worker.recorder.pending:
                await anyio.sleep(0.02)
        flaky.down = False
        info = await client.wait(task_id, timeout=20)
        xcoms = await store.load_xcoms(task_id)
        worker.stop()
        triggerer.stop()
    assert flaky.refused >= 1 and not worker.recorder.pending
    assert _runs(marker) == 1, "execute ran again after the outage"
    assert xcoms == {task_id: {"pushed": json.dumps(how)}}
    if how == "fail":
        assert info.state is TaskState.FAILED, info
    else:
        assert info.state is TaskState.SUCCESS, info
        assert info.result == ("done" if how == "return" else "defer")


def _xcom_rows(url: str, task_id: str) -> list[tuple[str, str]]:
    query = "SELECT xcom_key, value FROM deferrun_xcom WHERE task_id = "
    if url.startswith("sqlite"):
        conn = sqlite3.connect(url.removeprefix("sqlite:///"))
        try:
            return [tuple(r) for r in conn.execute(query + "?", (task_id,))]
        finally:
            conn.close()
    import asyncpg

    async def fetch() -> list[tuple[str, str]]:
        conn = await asyncpg.connect(url)
        try:
            return [tuple(r) for r in await conn.fetch(query + "$1", task_id)]
        finally:
            await conn.close()

    return anyio.run(fetch)


def _flush_wal(url: str) -> None:
    import asyncpg

    async def checkpoint() -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CHECKPOINT")
        finally:
            await conn.close()

    anyio.run(checkpoint)


@pytest.mark.slow
@pytest.mark.e2e
def test_postgres_stopped_immediately_after_execute_keeps_the_xcom_and_runs_once(
    pg_cluster: PgCluster, pg_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    marker, flag = tmp_path / "runs", tmp_path / "flag"
    env = deferrun_env(
        pg_url,
        dead_after="3",
        DEFERRUN_RECORD_RETRY_FOR="1",
        DEFERRUN_IMPORTS="tests.support.airflow_style",
    )
    worker = procs(["worker"], env)
    wait_until(lambda: "worker started" in worker.output(), 20, message="worker to start")
    with Client(pg_url) as client:
        task_id = client.submit(PushWhenFlagged(task_id="p", marker=str(marker), flag=str(flag)))
        wait_until(lambda: _runs(marker) == 1, 20, message="execute to start")
    _flush_wal(pg_url)  # the test cluster runs synchronous_commit=off
    pg_cluster.stop("immediate")
    try:
        flag.touch()  # execute pushes and returns while the database is down
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
    assert _runs(marker) == 1, "execute ran again after the outage"
    assert _xcom_rows(pg_url, task_id) == [("pushed", '"return"')]
    assert worker.popen.poll() is None


@pytest.mark.anyio
async def test_attempts_ending_together_keep_every_xcom(store: Store, tmp_path: Path) -> None:
    """Eight slots finish in the same moment, so their outcomes are written as one group:
    each attempt's XCom push is in that group with its outcome (it was once dropped there)."""
    flag = tmp_path / "flag"
    async with runtime_for(store, slots=8, triggerer=False) as rt:
        ids = [
            await rt.client.submit(
                PushWhenFlagged(marker=str(tmp_path / f"m{i}"), flag=str(flag), how="return")
            )
            for i in range(8)
        ]
        with anyio.fail_after(30):
            while sum((tmp_path / f"m{i}").exists() for i in range(8)) < 8:
                await anyio.sleep(0.02)
        flag.touch()
        infos = [await rt.client.wait(t, timeout=30) for t in ids]
    assert all(i.state is TaskState.SUCCESS for i in infos), [i.error for i in infos]
    for t in ids:
        assert json.loads((await store.load_xcoms(t))[t]["pushed"]) == "return"
