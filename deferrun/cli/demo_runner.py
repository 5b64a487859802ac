"""``deferrun standalone --demo``: submit the demo's tasks (:mod:`deferrun.demo`), print each
state change, and return when all have ended."""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime, timedelta

import anyio

from deferrun.cli import views
from deferrun.client import AsyncClient
from deferrun.core import config
from deferrun.core.models import FINISHED_STATES, TaskState
from deferrun.demo import (
    AsyncHello,
    Countdown,
    FetchResult,
    StartJobRun,
    WaitForRun,
    WriteFileLater,
)
from deferrun.store import Store


async def run_demo(store: Store) -> None:
    """Submit the demo tasks, print each state change, and return when all have ended."""
    from deferrun.sensors import DateTimeSensor, FileSensor, TimeDeltaSensor

    workdir = tempfile.mkdtemp(prefix="deferrun-demo-")
    path = os.path.join(workdir, "landing", "data.csv")
    client = AsyncClient(store=store)
    now = datetime.now(UTC)
    ops = [
        Countdown(task_id="countdown", rounds=3, seconds=1.0),
        TimeDeltaSensor(task_id="wait-3s", delta=3, mode="deferrable", poke_interval=1),
        WriteFileLater(task_id="land-file", path=path, delay=2.0),
        FileSensor(
            task_id="wait-for-file",
            filepath=os.path.join(workdir, "landing", "*.csv"),
            mode="deferrable",
            poke_interval=0.5,
        ),
        DateTimeSensor(
            task_id="until-t+4s",
            target_time=now + timedelta(seconds=4),
            mode="reschedule",
            poke_interval=1,
        ),
        AsyncHello(task_id="async-hello", name="deferrun"),
    ]
    ids = {await client.submit(op): op.task_id for op in ops}
    start_run = await client.submit(
        StartJobRun(task_id="start-run", runs_dir=os.path.join(workdir, "runs"))
    )
    wait_run = await client.submit(WaitForRun(task_id="wait-for-run"), after=[start_run])
    fetch = await client.submit(FetchResult(task_id="fetch-result"), after=[wait_run])
    ids.update({start_run: "start-run", wait_run: "wait-for-run", fetch: "fetch-result"})
    print(
        f"demo: submitted {len(ids)} tasks to {config.redact_url(store.url)}; the worker "
        "has 2 slots, yet all of them wait at once\n"
        "      (start-run >> wait-for-run >> fetch-result is a pipeline: submit(after=...))\n",
        flush=True,
    )
    start = time.monotonic()
    last: dict[str, str] = {}
    with anyio.fail_after(60):
        while True:
            infos = {tid: await client.get(tid) for tid in ids}
            waits = await views.upstream_waits(
                store, [t for t, i in infos.items() if views.waits_upstream(i)]
            )
            for tid, info in infos.items():
                extra = ""
                if tid in waits and views.waits_upstream(info):
                    extra = f"  ({waits[tid]}: no trigger, no slot)"
                elif info.state == "deferred":
                    extra = f"  ({info.trigger_classpath})"
                if last.get(tid) != f"{info.state}{extra}":
                    last[tid] = f"{info.state}{extra}"
                    print(
                        f"  t+{time.monotonic() - start:4.1f}s  {ids[tid]:<14} {info.state}{extra}",
                        flush=True,
                    )
            if all(i.state in FINISHED_STATES for i in infos.values()):
                break
            await anyio.sleep(0.1)
    print()
    rows = []
    for tid, info in infos.items():
        outcome = info.result if info.state == TaskState.SUCCESS else info.error
        rows.append([ids[tid], info.state, str(outcome)[:70]])
    print(views.table(["task", "state", "result"], rows))
    print(f"\ndemo finished in {time.monotonic() - start:.1f}s", flush=True)
