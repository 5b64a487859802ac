"""Identical triggers run once in a triggerer: a real worker and triggerer on both backends,
and two real triggerer processes on PostgreSQL for failover."""

from __future__ import annotations

import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.store import Store, open_store
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import runtime_for, wait_for
from tests.support.services import FakeServices
from tests.support.shared_userland import WaitHttp

pytestmark = pytest.mark.anyio


@pytest.fixture
def api(services: FakeServices, monkeypatch: pytest.MonkeyPatch) -> FakeServices:
    monkeypatch.setenv("DEFERRUN_CONN_HTTP_DEFAULT", services.uri())
    return services


def resumes(log: Path) -> Counter[str]:
    return Counter(log.read_text().split()) if log.exists() else Counter()


@pytest.mark.slow
async def test_one_event_resumes_every_waiting_task_once(
    store: Store, db_url: str, api: FakeServices, tmp_path: Path
) -> None:
    name = f"fan-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "resumes.log"
    async with runtime_for(store, slots=8) as rt:
        assert rt.triggerer is not None
        ids = [
            await rt.client.submit(WaitHttp(endpoint=f"health/{name}", log=str(log)))
            for _ in range(40)
        ]
        shared = rt.triggerer.shared
        await wait_for(lambda: sum(g.count() for g in shared.groups.values()) == 40)
        assert len(shared.groups) == 1  # one run() for the 40 identical triggers
        before = api.requests[f"/health/{name}"]
        await anyio.sleep(1.0)
        per_second = api.requests[f"/health/{name}"] - before
        assert per_second <= 7, per_second  # one request per 0.2 s interval, not 40
        poll = f"HttpTrigger http_default GET /health/{name} max=1000000"
        metrics = rt.triggerer.metrics.render().decode()
        assert f'deferrun_shared_poll_members{{poll="{poll}"}} 40.0' in metrics
        shown = await anyio.run_process(
            [sys.executable, "-m", "deferrun", "triggers", "--db", db_url], check=True
        )
        [row] = [line for line in shown.stdout.decode().splitlines() if line.startswith(poll)]
        assert row.split()[-2:] == ["40", "1"], row  # 40 tasks, 1 distinct trigger
        api.ready[name] = {"state": "green"}
        infos = [await rt.client.wait(i, timeout=30) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 40, {i.error for i in infos}
    assert resumes(log) == Counter({i: 1 for i in ids})


@pytest.mark.slow
async def test_a_member_cancelled_or_timed_out_leaves_the_others_waiting(
    store: Store, api: FakeServices, tmp_path: Path
) -> None:
    name = f"cancel-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "resumes.log"
    async with runtime_for(store, slots=8, reconcile_interval=0.2) as rt:
        assert rt.triggerer is not None
        shared = rt.triggerer.shared
        # a timeout is not part of the trigger: the short one shares the run too
        waiting = [
            await rt.client.submit(WaitHttp(endpoint=f"health/{name}", log=str(log)))
            for _ in range(5)
        ]
        short = await rt.client.submit(
            WaitHttp(endpoint=f"health/{name}", log=str(log), defer_timeout=1.0)
        )
        await wait_for(lambda: sum(g.count() for g in shared.groups.values()) == 6)
        assert len(shared.groups) == 1
        await rt.client.cancel(waiting[0])
        timed_out = await rt.client.wait(short, timeout=20)
        await wait_for(lambda: sum(g.count() for g in shared.groups.values()) == 4)
        assert len(shared.groups) == 1
        requests = api.requests[f"/health/{name}"]
        await wait_for(lambda: api.requests[f"/health/{name}"] > requests + 1)  # still polling
        api.ready[name] = {"state": "green"}
        infos = [await rt.client.wait(i, timeout=30) for i in waiting[1:]]
        cancelled = await rt.client.get(waiting[0])
        # the last member leaving stops the run: no request after the group ends
        await wait_for(lambda: not shared.groups)
    assert timed_out.state is TaskState.FAILED and "timed out" in (timed_out.error or "")
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 4
    assert cancelled.state is TaskState.CANCELLED
    assert resumes(log) == Counter({i: 1 for i in waiting[1:]})


async def test_the_run_stops_when_every_member_left(
    store: Store, api: FakeServices, tmp_path: Path
) -> None:
    name = f"gone-{uuid.uuid4().hex[:8]}"
    async with runtime_for(store, reconcile_interval=0.2) as rt:
        assert rt.triggerer is not None
        shared = rt.triggerer.shared
        ids = [
            await rt.client.submit(WaitHttp(endpoint=f"health/{name}", log=str(tmp_path / "l")))
            for _ in range(3)
        ]
        await wait_for(lambda: sum(g.count() for g in shared.groups.values()) == 3)
        for task_id in ids:
            await rt.client.cancel(task_id)
        await wait_for(lambda: not shared.groups and not shared.tasks)
        after = api.requests[f"/health/{name}"]
        await anyio.sleep(0.6)
        assert api.requests[f"/health/{name}"] == after  # nobody polls for nobody


def owners(url: str) -> Counter[str | None]:
    async def fetch() -> Counter[str | None]:
        store = await open_store(url)
        try:
            return Counter(t.triggerer_id for t in await store.list_triggers())
        finally:
            await store.close()

    return anyio.run(fetch)


@pytest.mark.slow
@pytest.mark.e2e
def test_failover_moves_the_group_together_and_fires_once_per_task(
    pg_url: str, api: FakeServices, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    name = f"failover-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "resumes.log"
    env = deferrun_env(pg_url, DEFERRUN_CONN_HTTP_DEFAULT=api.uri())
    a = procs(["triggerer"], env)
    b = procs(["triggerer"], env)
    worker = procs(["worker", "--slots", "8"], env)
    for p in (a, b, worker):
        wait_until(lambda p=p: "started" in p.output(), 20, message="processes to start")
    with Client(pg_url) as client:
        ids = [client.submit(WaitHttp(endpoint=f"health/{name}", log=str(log))) for _ in range(60)]
        wait_until(
            lambda: sum(owners(pg_url).values()) == 60 and None not in owners(pg_url),
            30,
            interval=0.3,
            message="all 60 triggers claimed",
        )
        [(holder, held)] = owners(pg_url).items()  # one triggerer holds the whole group
        assert held == 60
        victim, survivor = (a, b) if f"-{a.popen.pid}-" in str(holder) else (b, a)
        victim.kill(signal.SIGKILL)
        victim.popen.wait(10)
        wait_until(
            lambda: holder not in owners(pg_url) and None not in owners(pg_url),
            20,
            interval=0.2,
            message="the group to be adopted",
        )
        [(adopter, adopted)] = owners(pg_url).items()  # moved together
        assert adopted == 60 and f"-{survivor.popen.pid}-" in str(adopter)
        before = api.requests[f"/health/{name}"]
        time.sleep(1.0)
        assert api.requests[f"/health/{name}"] - before <= 7  # one shared run again
        api.ready[name] = {"state": "green"}
        infos = [client.wait(i, timeout=60) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 60, {i.error for i in infos}
    assert resumes(log) == Counter({i: 1 for i in ids})
