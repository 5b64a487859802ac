"""End to end: real `deferrun triggerer` and `deferrun worker` processes on one SQLite file."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from deferrun import Client, TaskState
from tests.support.processes import Proc, deferrun_env, wait_until
from tests.support.runtime import install_user_module

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

USER_MODULE = """
import os
import time
from typing import Any

import anyio

from deferrun import BaseOperator, BaseTrigger, TriggerEvent


class ValueTrigger(BaseTrigger):
    def __init__(self, value: Any, delay: float = 0.0, fail: bool = False) -> None:
        self.value = value
        self.delay = delay
        self.fail = fail

    async def run(self):
        await anyio.sleep(self.delay)
        if self.fail:
            raise ValueError(f"external system said no to {self.value}")
        yield TriggerEvent({"value": self.value, "triggerer_pid": os.getpid()})


class Forged(BaseTrigger):
    def __init__(self, path: str) -> None:
        self.path = path

    def serialize(self):
        return ("os.system", {"command": f"touch {self.path}"})

    async def run(self):
        yield TriggerEvent(None)


class WaitFor(BaseOperator):
    def __init__(self, *, index: int, delay: float = 1.0, fail: bool = False,
                 timeout: float | None = None, forge: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.index = index
        self.delay = delay
        self.fail = fail
        self.timeout = timeout
        self.forge = forge

    def execute(self, context):
        trigger = (Forged(path=self.forge) if self.forge else
                   ValueTrigger(value=self.index, delay=self.delay, fail=self.fail))
        self.defer(trigger=trigger, method_name="resume", kwargs={"index": self.index},
                   timeout=self.timeout)

    def resume(self, context, event=None, index=None):
        return {"index": index, "event": event, "worker_pid": os.getpid()}


class SlowWork(BaseOperator):
    def __init__(self, *, marker: str, seconds: float = 60.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.marker = marker
        self.seconds = seconds

    def execute(self, context):
        with open(self.marker, "a") as f:
            f.write(f"{context['try_number']} {os.getpid()}\\n")
        if context["try_number"] == 1:
            time.sleep(self.seconds)
        return context["try_number"]
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    return install_user_module(tmp_path, monkeypatch, "e2e_ops", USER_MODULE)


def start_both(
    procs: Callable[..., Proc], env: dict[str, str], slots: int = 2
) -> tuple[Proc, Proc]:
    triggerer = procs(["triggerer"], env)
    worker = procs(["worker", "--slots", str(slots)], env)
    for p in (triggerer, worker):
        wait_until(lambda p=p: "started" in p.output(), 20, message=f"{p.args[0]} to start")
    return triggerer, worker


def test_forty_tasks_defer_at_once_on_two_slots(
    db_url: str, user_module: Path, procs: Callable[..., Proc]
) -> None:
    from e2e_ops import WaitFor

    env = deferrun_env(db_url, user_module, DEFERRUN_IMPORTS="tests.support,e2e_ops")
    triggerer, worker = start_both(procs, env, slots=2)
    with Client(db_url) as client:
        ids = [client.submit(WaitFor(index=i, delay=3.0)) for i in range(40)]
        # All 40 wait at the same time although the worker has 2 slots.
        wait_until(
            lambda: sum(client.get(i).state == TaskState.DEFERRED for i in ids) == 40,
            timeout=20,
            interval=0.2,
            message="all 40 tasks deferred at once",
        )
        infos = [client.wait(i, timeout=60) for i in ids]
    assert [i.state for i in infos] == [TaskState.SUCCESS] * 40, [i.error for i in infos]
    for n, info in enumerate(infos):
        assert info.result["index"] == n
        assert info.result["event"]["value"] == n  # each resumed with its own event
        assert info.result["event"]["triggerer_pid"] == triggerer.popen.pid
        assert info.result["worker_pid"] == worker.popen.pid
        assert info.try_number == 1


def test_timeout_trigger_error_and_forged_classpath(
    db_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from e2e_ops import WaitFor

    marker = tmp_path / "pwned"
    # "os" trusted too: the forged path is refused for what it names (not a BaseTrigger), not
    # only because its module is not trusted (the default without --import os)
    env = deferrun_env(db_url, user_module, DEFERRUN_IMPORTS="tests.support,e2e_ops,os")
    start_both(procs, env)
    with Client(db_url) as client:
        timeout_id = client.submit(WaitFor(index=1, delay=60, timeout=1.0))
        error_id = client.submit(WaitFor(index=2, delay=0.1, fail=True))
        forged_id = client.submit(WaitFor(index=3, forge=str(marker)))
        ok_id = client.submit(WaitFor(index=4, delay=0.2))
        timed_out = client.wait(timeout_id, timeout=30)
        errored = client.wait(error_id, timeout=30)
        forged = client.wait(forged_id, timeout=30)
        ok = client.wait(ok_id, timeout=30)
    assert timed_out.state is TaskState.FAILED
    assert "TaskTimeout: deferral timed out" in (timed_out.error or "")
    assert errored.state is TaskState.FAILED
    assert "ValueError: external system said no to 2" in (errored.error or "")
    assert "Traceback" in (errored.error or "")
    assert forged.state is TaskState.FAILED
    assert "'os.system' is not a BaseTrigger subclass" in (forged.error or "")
    assert not marker.exists()
    assert ok.state is TaskState.SUCCESS


def test_sigkill_worker_mid_task_is_retried_by_a_new_worker(
    sqlite_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from e2e_ops import SlowWork

    marker = tmp_path / "tries.txt"
    env = deferrun_env(
        sqlite_url, user_module, dead_after="2", DEFERRUN_IMPORTS="tests.support,e2e_ops"
    )
    first = procs(["worker", "--slots", "2"], env)
    with Client(sqlite_url) as client:
        task_id = client.submit(SlowWork(marker=str(marker), retries=1, retry_delay=0))
        wait_until(
            lambda: marker.exists() and marker.read_text().strip(),
            20,
            message="the first try to start",
        )
        assert client.get(task_id).state is TaskState.RUNNING
        first.kill(signal.SIGKILL)
        first.popen.wait(10)
        killed_at = time.monotonic()
        second = procs(["worker", "--slots", "2"], env)
        info = client.wait(task_id, timeout=30)
        recovered_after = time.monotonic() - killed_at
    assert info.state is TaskState.SUCCESS, info.error
    assert info.result == 2 and info.try_number == 2
    tries = [line.split() for line in marker.read_text().splitlines()]
    assert tries == [["1", str(first.popen.pid)], ["2", str(second.popen.pid)]]
    assert recovered_after < 15


def test_sigkill_worker_without_retries_fails_the_task(
    sqlite_url: str, user_module: Path, procs: Callable[..., Proc], tmp_path: Path
) -> None:
    from e2e_ops import SlowWork

    marker = tmp_path / "tries.txt"
    env = deferrun_env(
        sqlite_url, user_module, dead_after="2", DEFERRUN_IMPORTS="tests.support,e2e_ops"
    )
    first = procs(["worker"], env)
    with Client(sqlite_url) as client:
        task_id = client.submit(SlowWork(marker=str(marker)))
        wait_until(lambda: marker.exists(), 20, message="the task to start")
        first.kill(signal.SIGKILL)
        first.popen.wait(10)
        procs(["worker"], env)
        info = client.wait(task_id, timeout=30)
    assert info.state is TaskState.FAILED
    assert "stopped heartbeating" in (info.error or "")
    assert "no retries left" in (info.error or "")
