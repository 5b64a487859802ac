"""Failure tests with real processes: triggerer SIGKILL, worker SIGKILL, database restart."""

from __future__ import annotations

import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import anyio
import pytest

from deferrun import Client, TaskState
from deferrun.store import open_store
from tests.support.pgcluster import PgCluster
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import install_user_module

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

DEAD_AFTER = 3.0

USER_MODULE = '''
import os
import time
from datetime import datetime, timezone
from typing import Any

from deferrun import BaseOperator
from triggers.time import DateTimeTrigger


class AtMoment(BaseOperator):
    """Defers until epoch second ``at``; each resume appends a line to ``log``."""

    def __init__(self, *, at: float, log: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.at = at
        self.log_path = log

    def execute(self, context):
        moment = datetime.fromtimestamp(self.at, timezone.utc)
        self.defer(trigger=DateTimeTrigger(moment=moment), method_name="resume")

    def resume(self, context, event=None):
        resumed = time.time()
        with open(self.log_path, "a") as f:
            f.write(f"{context['task_id']} {resumed} {os.getpid()}\\n")
        return resumed - self.at
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return install_user_module(tmp_path, monkeypatch, "failover_ops", USER_MODULE)


def owners(url: str) -> Counter[str | None]:
    async def fetch() -> Counter[str | None]:
        store = await open_store(url)
        try:
            return Counter(t.triggerer_id for t in await store.list_triggers())
        finally:
            await store.close()

    return anyio.run(fetch)


def started(proc: Proc) -> bool:
    return "started" in proc.output()


def test_sigkill_a_triggerer_every_task_resumes_exactly_once(
    pg_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from failover_ops import AtMoment

    log = tmp_path / "resumes.log"
    env = deferrun_env(
        pg_url,
        user_module,
        dead_after=str(DEAD_AFTER),
        DEFERRUN_IMPORTS="tests.support,failover_ops",
    )
    a = procs(["triggerer"], env)
    b = procs(["triggerer"], env)
    worker = procs(["worker", "--slots", "4"], env)
    for p in (a, b, worker):
        wait_until(lambda p=p: started(p), 20, message="processes to start")
    base = time.time() + 8.0
    with Client(pg_url) as client:
        ids = [client.submit(AtMoment(at=base + i * 0.02, log=str(log))) for i in range(300)]
        wait_until(
            lambda: sum(owners(pg_url).values()) == 300 and None not in owners(pg_url),
            30,
            interval=0.3,
            message="all 300 triggers claimed",
        )
        shares = owners(pg_url)
        # Spread over both triggerers rather than grabbed by whoever woke first.
        assert len(shares) == 2 and min(shares.values()) >= 60, shares
        wait_until(lambda: time.time() >= base + 1.0, 20, message="some triggers to fire")
        a.kill(signal.SIGKILL)
        a.popen.wait(10)
        killed_at = time.time()
        a_id = next(o for o in owners(pg_url) if o and f"-{a.popen.pid}-" in o)
        held_by_dead = owners(pg_url)[a_id]
        assert held_by_dead > 0  # the killed triggerer held pending triggers
        wait_until(
            lambda: owners(pg_url)[a_id] == 0,
            DEAD_AFTER + 10,
            interval=0.1,
            message="the dead triggerer's triggers to be adopted",
        )
        adoption_delay = time.time() - killed_at
        print(f"adopted {held_by_dead} triggers {adoption_delay:.2f}s after SIGKILL")
        infos = [client.wait(i, timeout=60) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 300, {i.error for i in infos}
    resumes = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert set(resumes) == set(ids)
    assert max(resumes.values()) == 1, "a task resumed more than once"
    lateness = max(i.result for i in infos)
    assert lateness <= DEAD_AFTER + 6.0, lateness
    assert adoption_delay <= DEAD_AFTER + 5.0, adoption_delay


def test_sigkill_worker_on_postgres_is_retried(
    pg_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from tests.support.userland import Outcome

    env = deferrun_env(pg_url, dead_after=str(DEAD_AFTER))
    first = procs(["worker"], env)
    wait_until(lambda: started(first), 20, message="worker to start")
    with Client(pg_url) as client:
        task_id = client.submit(Outcome(what="sleep", retries=1, retry_delay=0))
        wait_until(
            lambda: client.get(task_id).state is TaskState.RUNNING, 20, message="the task to run"
        )
        first.kill(signal.SIGKILL)
        first.popen.wait(10)
        procs(["worker"], env)
        info = client.wait(task_id, timeout=40)
    assert info.state is TaskState.SUCCESS and info.try_number == 2


def test_database_restart_while_tasks_are_deferred(
    pg_cluster: PgCluster,
    pg_url: str,
    user_module: Path,
    procs: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    from failover_ops import AtMoment

    log = tmp_path / "resumes.log"
    env = deferrun_env(
        pg_url,
        user_module,
        dead_after=str(DEAD_AFTER),
        DEFERRUN_IMPORTS="tests.support,failover_ops",
    )
    triggerer = procs(["triggerer"], env)
    worker = procs(["worker", "--slots", "4"], env)
    for p in (triggerer, worker):
        wait_until(lambda p=p: started(p), 20, message="processes to start")
    base = time.time() + 4.0
    with Client(pg_url) as client:
        ids = [client.submit(AtMoment(at=base + i * 0.05, log=str(log))) for i in range(50)]
        wait_until(lambda: sum(owners(pg_url).values()) == 50, 20, message="triggers claimed")
    # Down from before the first moment until after the last: events fire while it is down.
    pg_cluster.stop("fast")
    time.sleep(max(0.0, base + 3.0 - time.time()))
    pg_cluster.start()
    with Client(pg_url) as client:
        infos = [client.wait(i, timeout=60) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 50, {i.error for i in infos}
    resumes = Counter(line.split()[0] for line in log.read_text().splitlines())
    assert set(resumes) == set(ids) and max(resumes.values()) == 1
    assert triggerer.popen.poll() is None and worker.popen.poll() is None  # both survived
    # Tasks can finish before the next heartbeat reports the recovery: allow one more beat.
    wait_until(
        lambda: "database reachable again" in triggerer.output(),
        10,
        message="the triggerer to report the database back",
    )
