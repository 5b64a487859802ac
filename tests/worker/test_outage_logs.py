"""A 40 s PostgreSQL outage under a real worker and a real triggerer, each running user code
that logs all along (a task, a trigger), keeps the issue-24 promise: per process one warning
when the database becomes unreachable, a repeat at most every 30 s, one info line when it is
back with the outage's length; no error lines, no tracebacks, no per-retry lines from any loop
(task-log flushing retried every 250 ms, claims every poll), and no asyncpg protocol-state
error ("cannot switch to state 12") nor ``terminate()`` on a connection already released."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from deferrun import BaseOperator, BaseTrigger, Context, TriggerEvent
from deferrun.client import AsyncClient
from deferrun.store import open_store
from tests.support.pgcluster import PgCluster
from tests.support.processes import TEST_IMPORTS, Proc, deferrun_env, wait_until

pytestmark = pytest.mark.slow

OUTAGE = 40.0  # seconds the cluster stays down: past one 30 s repeat of the warning
LIMIT = 150.0  # no user code here runs longer than this, whatever happens to the test


class Chatty(BaseOperator):
    """Logs a line every 0.2 s until ``stop`` exists (bounded), then defers to a trigger that
    does the same (``defer``) or returns."""

    def __init__(self, *, stop: str, defer: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stop = stop
        self.defer_to_trigger = defer

    def execute(self, context: Context) -> Any:
        if self.defer_to_trigger:
            self.defer(trigger=ChattyTrigger(stop=self.stop), method_name="done")
        deadline = time.monotonic() + LIMIT
        n = 0
        while not Path(self.stop).exists() and time.monotonic() < deadline:
            n += 1
            self.log.info("task working", n=n)
            time.sleep(0.2)
        return n

    def done(self, context: Context, event: Any = None) -> Any:
        return event


class ChattyTrigger(BaseTrigger):
    def __init__(self, stop: str) -> None:
        self.stop = stop

    async def run(self) -> AsyncIterator[TriggerEvent]:
        deadline = time.monotonic() + LIMIT
        n = 0
        while not Path(self.stop).exists() and time.monotonic() < deadline:
            n += 1
            self.log.info("trigger waiting", n=n)
            await anyio.sleep(0.2)
        yield TriggerEvent(n)


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            out.append({"event": line, "level": "raw"})
    return out


async def _submit(url: str, stop: Path) -> list[str]:
    store = await open_store(url)
    try:
        client = AsyncClient(store=store)
        return [
            await client.submit(Chatty(stop=str(stop))),
            await client.submit(Chatty(stop=str(stop), defer=True)),
        ]
    finally:
        await store.close()


def _held_to_the_promise(name: str, whole: str, during: list[dict[str, Any]]) -> None:
    text = "\n".join(json.dumps(line) for line in during)
    where = f"{name}:\n{text}"
    counted = [line for line in during if line.get("level") in ("warning", "error", "raw")]
    assert [w["event"] for w in counted if "unreachable" in w["event"]][:1] == [
        "database unreachable; retrying quietly until it is back"
    ], where
    firsts = [w for w in counted if w["event"].startswith("database unreachable")]
    assert len(firsts) == 1, where
    repeats = [w for w in counted if w["event"] == "database still unreachable"]
    assert len(repeats) <= int(OUTAGE // 30) + 1, where  # at most one every 30 s
    assert not [line for line in during if line.get("level") == "error"], where
    for chatter in (
        "storing task log lines failed",
        "claiming tasks failed",
        "claiming triggers failed",
        "recording the outcome failed",
        "database unavailable; re-queueing",
    ):
        assert chatter not in text, where
    assert len(counted) <= 5, where  # a handful in a 40 s outage, not one per retry
    [back] = [line for line in during if line["event"] == "database reachable again"]
    assert back["level"] == "info" and back["outage_seconds"] >= OUTAGE - 1, where
    for never in ("Traceback", "cannot switch to state", "released back to the pool"):
        assert never not in whole, f"{name}: {never!r} in its output:\n{whole[-20000:]}"


def test_outage_under_worker_and_triggerer_with_chatty_user_code(
    pg_cluster: PgCluster, pg_url: str, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    env = deferrun_env(pg_url, DEFERRUN_IMPORTS=f"{TEST_IMPORTS},{__name__}")
    triggerer = procs(["triggerer", "--log-level", "info"], env)
    worker = procs(["worker", "--log-level", "info"], env)
    for proc, started in ((triggerer, "triggerer started"), (worker, "worker started")):
        wait_until(lambda p=proc, s=started: s in p.output(), 30, message=started)
    stop = tmp_path / "stop"
    anyio.run(_submit, pg_url, stop)
    wait_until(lambda: "task working" in worker.output(), 30, message="task logging")
    wait_until(lambda: "trigger waiting" in triggerer.output(), 30, message="trigger logging")
    before = {p: len(_lines(p.output())) for p in (worker, triggerer)}
    pg_cluster.stop("fast")
    try:
        for proc in (worker, triggerer):
            wait_until(
                lambda p=proc: "database unreachable" in p.output(), 20, message="outage noticed"
            )
        down_at = time.monotonic()
        wait_until(lambda: time.monotonic() - down_at > OUTAGE, OUTAGE + 5, message="outage")
    finally:
        pg_cluster.start()
    for proc in (worker, triggerer):
        wait_until(lambda p=proc: "database reachable again" in p.output(), 40, message="recovery")
    logged = worker.output().count('"task working"')
    stop.touch()
    # the task's lines, kept through the outage, reach the database afterwards
    wait_until(
        lambda: anyio.run(_stored_logs, pg_url).count("task working") >= logged,
        30,
        0.5,
        message="the task's lines logged during the outage stored",
    )
    for proc in (worker, triggerer):
        proc.stop()
    for name, proc in (("worker", worker), ("triggerer", triggerer)):
        whole = proc.output()
        _held_to_the_promise(name, whole, _lines(whole)[before[proc] :])


async def _stored_logs(url: str) -> str:
    store = await open_store(url)
    try:
        lines = []
        for task in await store.list_tasks():
            lines += [line for _, _, line in await store.task_logs(task.id)]
        return "\n".join(lines)
    finally:
        await store.close()
